"""The typed run config of one training run, and its round trip to a flat dict.

A flat dict (``{"aug.crop_size": 224, "optim.lr": 1e-3, ...}``) is what MLflow params and Ray
Tune search spaces see; :meth:`RunConfig.from_flat` rebuilds the config and names any unknown
or invalid key.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import numbers
import os
import warnings
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Literal

from bldseg.train.augment import AugConfig
from bldseg.train.fieldtypes import checked
from bldseg.train.losses import LOSSES
from bldseg.train.schedulers import SCHEDULERS, next_cycle_steps, poly_factor


@dataclass
class OptimConfig:
    """AdamW settings."""

    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.05  # decoupled weight decay (not applied to norms, biases, gammas)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.999  # AdamW beta2
    layer_decay: float = 1.0  # layer-wise LR decay of the backbone (1.0 = off; InternImage: 0.9)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # decay of an exponential moving average of the weights, used for validation, best.pt and
    # predictions (bldseg.train.ema); 0 = off. Averages over about 1 / (1 - ema) steps.
    ema: float = 0.0


@dataclass
class SchedConfig:
    """Per-iteration LR schedule."""

    # schedulefree: schedule-free AdamW instead of AdamW and a schedule (bldseg.train.schedulers)
    name: Literal["onecycle", "cosine_restarts", "poly", "constant", "schedulefree"] = "onecycle"
    pct_start: float = 0.3  # onecycle: share of steps rising
    div_factor: float = 25.0  # onecycle: initial lr = lr / div_factor
    final_div_factor: float = 1e4  # onecycle: final lr = initial / final_div_factor
    # onecycle: AdamW's beta1 cycles 0.95 -> 0.85 -> 0.95 against the lr (PyTorch's and
    # fast.ai's one-cycle) in place of optim.beta1; False keeps optim.beta1 throughout
    cycle_momentum: bool = True
    # cosine_restarts: cycles in the run (cycles - 1 restarts), its last step near the end of
    # the last one; fewer, with a warning, in a run too short for them (cosine_first_cycle)
    cycles: int = 1
    cycle_mult: float = 1.0  # cosine_restarts: growth of each cycle's length over the previous
    gamma: float = 1.0  # cosine_restarts: peak decay per cycle
    # cosine_restarts/poly: warm-up share of a (first) cycle; schedulefree: of the whole run
    warmup_frac: float = 0.05
    # warm-up in iterations (> 0 replaces warmup_frac; official poly 1500); cosine_restarts:
    # every cycle's, kept shorter than the first cycle
    warmup_steps: int = 0
    # the largest share of the run (cosine_restarts: of its first cycle) warmup_steps may fill; a
    # longer warm-up is cut to it, with a warning. 1.0: warmup_steps as set (warned past
    # WARMUP_WARN_SHARE). The fine-tuning recipe sets 0.05: its 1500 steps are 0.9% of the
    # official 160k, and a short run keeps a short warm-up instead of one that fills it and never
    # decays.
    warmup_max_frac: float = 1.0
    min_lr: float = 1e-6  # cosine_restarts/poly: floor
    power: float = 1.0  # poly: exponent

    # The run's optimizer settings, which RunConfig binds here (not a field: no parameter of the
    # schedule): poly's scheduler reads min_lr as a share of optim.lr, so the peak its warm-up
    # warning states depends on both. A SchedConfig on its own has OptimConfig's defaults.
    _optim = OptimConfig()

    def _floor_share(self) -> float:
        """``min_lr`` as a share of the peak LR, ``optim.lr``, as poly's scheduler reads it
        (:func:`bldseg.train.schedulers.poly_warmup`)."""
        lr = self._optim.lr
        return min(1.0, self.min_lr / lr) if lr > 0 else 0.0

    def warmup_iterations(self, total_steps: int) -> int:
        """Warm-up iterations of ``poly`` and ``schedulefree`` in a run of ``total_steps``.

        ``warmup_steps`` when set (> 0), cut to ``warmup_max_frac`` of the run with a warning
        when longer; else ``warmup_frac`` of the run. A warm-up set in steps that takes more
        than :data:`WARMUP_WARN_SHARE` of the run is kept (it was asked for) but warned about:
        the LR then decays over the rest only.
        """
        if self.warmup_steps <= 0:
            return int(self.warmup_frac * total_steps)
        steps = self._capped_warmup_steps(total_steps)
        self._warn_warmup(steps, total_steps, "this run's", "the run", stacklevel=4)
        return steps

    def _capped_warmup_steps(self, span: int) -> int:
        """``warmup_steps`` cut to ``warmup_max_frac`` of ``span`` steps (no warning)."""
        if self.warmup_max_frac < 1:
            return min(self.warmup_steps, int(self.warmup_max_frac * span))
        return self.warmup_steps

    def _warn_warmup(self, used: int, span: int, of: str, share_of: str, stacklevel: int) -> None:
        """Warns when ``warmup_steps`` was cut to ``used`` steps of a ``span``-step run or cycle
        (named by ``of`` / ``share_of``), or fills more than :data:`WARMUP_WARN_SHARE` of it."""
        steps = self.warmup_steps
        share = steps / max(1, span)
        head = f"sched.warmup_steps={steps} is {share:.0%} of {of} {span} steps: "
        if used < steps:
            how = (
                f"warming up over {used} ({self.warmup_max_frac:g} of {share_of}, "
                f"sched.warmup_max_frac); set sched.warmup_max_frac=1 to keep all {steps}"
                if self.warmup_max_frac < 1 and used == int(self.warmup_max_frac * span)
                else f"warming up over {used}, one step less than {share_of}"
            )
            warnings.warn(head + how, stacklevel=stacklevel)
        elif share > WARMUP_WARN_SHARE:
            effect = (
                f"the LR rises through the whole of {share_of} and never decays"
                if steps >= span
                else "the LR peaks late and decays over the rest only"
            )
            if self.name == "poly":
                # mmcv's poly: the warm-up scales a line decaying from step 0, so the LR never
                # reaches optim.lr; the scheduler warms up over at most span - 1 steps
                w = min(steps, max(0, span - 1))
                floor = self._floor_share()
                top = max(range(w + 1), key=lambda s: poly_factor(s, span, w, self.power, floor))
                peak = poly_factor(top, span, w, self.power, floor)
                effect = f"the LR peaks at {peak:.2f} x optim.lr, at step {top}"
            elif self.name == "schedulefree":
                # no decay after the warm-up: the LR stays at optim.lr once it gets there
                effect = (
                    f"the LR rises through the whole of {share_of} and reaches only "
                    f"{span / steps:.2f} x optim.lr"
                    if span / steps < 0.995  # shown as 1.00 above: it reaches optim.lr at the end
                    else f"the LR reaches optim.lr only at step {min(steps, span)} (schedule-free "
                    "keeps it there; it has no decay)"
                )
            warnings.warn(
                f"{head}{effect}; lower sched.warmup_steps, or set sched.warmup_max_frac to cut "
                f"it to a share of {share_of}",
                stacklevel=stacklevel,
            )

    def cosine_first_cycle(self, total_steps: int) -> tuple[int, int]:
        """First cycle and warm-up steps of ``cosine_restarts`` in a run of ``total_steps``.

        The first cycle is the shortest for which ``cycles`` cycles, each grown from the one
        before by ``cycle_mult`` (:func:`bldseg.train.schedulers.next_cycle_steps`), cover the
        run: the run holds exactly ``cycles`` cycles and its last step is in the decay of the
        last one, a few steps before that cycle's end (the rounding of whole-step cycles: fewer
        than ``cycles`` steps with ``cycle_mult=1``), never on a restart. A run too
        short for that, where the last step would not be three quarters through the last
        cycle's decay, holds fewer cycles, with a warning.

        Returns:
            ``(first_cycle_steps, warmup_steps)``; the warm-up is ``warmup_frac`` of the first
            cycle, or ``warmup_steps`` when set (> 0; cut to ``warmup_max_frac`` of the first
            cycle, with a warning), shorter than it; every cycle warms up as long.
        """
        total = max(1, total_steps)
        for n in range(self.cycles, 0, -1):
            lengths = self._shortest_cosine_cycles(total, n)
            warmup = self._cosine_warmup(lengths[0])
            in_last = total - sum(lengths[:-1])  # the run's steps in its last cycle
            # The run's last step must be three quarters through that cycle's decay or more
            # (an LR within 15% of the floor), not on or just after a restart.
            if n == 1 or 4 * (in_last - 1 - warmup) >= 3 * (lengths[-1] - warmup):
                break
        if n < self.cycles:
            warnings.warn(
                f"sched.cycles={self.cycles}: this run's {total_steps} steps are too few for "
                f"{self.cycles} cosine cycles that each decay; running {n}",
                stacklevel=3,
            )
        if self.warmup_steps > 0:
            self._warn_warmup(
                warmup, lengths[0], "the first cosine cycle's", "the cycle", stacklevel=4
            )
        return lengths[0], warmup

    def _cosine_warmup(self, first: int) -> int:
        """Warm-up steps of every cosine cycle when the first lasts ``first`` steps."""
        if self.warmup_steps > 0:
            return min(first - 1, self._capped_warmup_steps(first))
        return min(first - 1, int(self.warmup_frac * first))

    def _shortest_cosine_cycles(self, total: int, n: int) -> list[int]:
        """Lengths of the ``n`` cycles from the shortest first one (>= 2) covering ``total``."""

        def lengths(first: int) -> list[int]:
            warmup = self._cosine_warmup(first)
            out = [first]
            while len(out) < n:
                out.append(next_cycle_steps(out[-1], warmup, self.cycle_mult))
            return out

        # Every cycle's length grows with the first one's, so their sum does: bisect on it.
        lo, hi = 2, max(2, total)
        while lo < hi:
            mid = (lo + hi) // 2
            if sum(lengths(mid)) >= total:
                hi = mid
            else:
                lo = mid + 1
        return lengths(lo)

    def scheduler_kwargs(self, total_steps: int) -> dict[str, Any]:
        """Keyword arguments of :func:`bldseg.train.schedulers.build_scheduler` for this run.

        Warns when a warm-up set in steps is cut to the run or is a large share of it
        (:meth:`warmup_iterations`).
        """
        if self.name in ("onecycle", "constant") and self.warmup_steps > 0:
            # e.g. the fine-tuning recipe's 1500 under --set sched.name=onecycle
            rise = "its rise is sched.pct_start" if self.name == "onecycle" else "it has none"
            warnings.warn(
                f"sched.warmup_steps={self.warmup_steps} is not used by sched.name={self.name} "
                f"({rise}); set sched.warmup_steps=0 to silence this",
                stacklevel=2,
            )
        if self.name == "onecycle":
            return dict(
                pct_start=self.pct_start,
                div_factor=self.div_factor,
                final_div_factor=self.final_div_factor,
                cycle_momentum=self.cycle_momentum,
            )
        if self.name == "cosine_restarts":
            first, warmup = self.cosine_first_cycle(total_steps)
            return dict(
                first_cycle_steps=first,
                cycle_mult=self.cycle_mult,
                gamma=self.gamma,
                min_lr=self.min_lr,
                warmup_steps=warmup,
            )
        if self.name == "poly":
            # A warm-up asked for longer than the run fills all of it but the last step (the
            # scheduler needs one step after it; warmup_iterations has warned).
            warmup = min(self.warmup_iterations(total_steps), max(0, total_steps - 1))
            return dict(
                warmup_steps=warmup,
                power=self.power,
                min_lr=self.min_lr,
            )
        return {}


#: A warm-up set in steps (``sched.warmup_steps``) longer than this share of the run is warned
#: about: the official recipe's is under 1% of its run.
WARMUP_WARN_SHARE = 0.2


@dataclass
class CoTeachConfig:
    """Co-teaching (Han et al., 2018): two networks teach each other on small-loss samples."""

    enabled: bool = False  # train two networks with co-teaching
    tau: float = 0.1  # final forget rate: share of samples/pixels dropped per batch
    t_k: int = 5  # epochs over which the forget rate ramps linearly up to tau
    granularity: Literal["tile", "pixel"] = "tile"  # what is ranked and dropped

    def keep_ratio(self, epoch: int) -> float:
        """R(T) = 1 - min(T / T_k * tau, tau), with T the 0-based epoch."""
        return 1.0 - min(epoch / max(1, self.t_k) * self.tau, self.tau)


@dataclass
class RunConfig:
    """Everything one training run depends on."""

    model: str = "upernet_internimage_tiny"  # a name from bldseg.models.list_models()
    # Official checkpoint to start from, a path on the training machine (never downloaded):
    # ImageNet internimage_{t,s,b}_1k_224.pth (backbone) or mmseg
    # upernet_internimage_{t,s,b}_512_160k_ade20k.pth (whole model). See recipe_defaults().
    pretrained: str | None = None
    drop_path_rate: float | None = None  # override the variant's stochastic depth (T/S/B: .2/.3/.4)
    with_cp: bool = False  # activation checkpointing per backbone block: less GPU memory, slower
    data: str | None = None  # competition/image-mask folder or cache; None: synthetic world
    val_fraction: float = 0.05  # share of samples held out for validation (by source scene)
    split_group: str | None = None  # regex on source file names whose match groups tiles
    split_seed: int = 0  # seed of the train/val split: keep it fixed across compared runs
    # K-fold training (by split group): 0 = the plain holdout split of val_fraction; K >= 2 =
    # K models, fold f validated on the f-th partition of the groups (val_fraction unused).
    folds: int = 0
    fold: int = 0  # with folds >= 2: the held-out partition this run trains without (0..K-1)
    val_tile: int = 0  # side of validation tiles; 0: the training crop size
    epochs: int = 10  # training epochs
    # crops per epoch; 0: one per training image. Fewer than the images: epochs go on through
    # one shuffled pass over all of them (RandomCropDataset)
    samples_per_epoch: int = 0
    batch_size: int = 8  # crops per step
    loss: str = "bce"  # bce | dice | bce_dice | lovasz
    aux_weight: float = 0.4  # weight of the auxiliary head's loss
    aug: AugConfig = field(default_factory=AugConfig)  # training augmentation
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer
    sched: SchedConfig = field(default_factory=SchedConfig)  # LR schedule
    coteach: CoTeachConfig = field(default_factory=CoTeachConfig)  # noisy-label training
    threshold_lo: float = 0.30  # threshold sweep range, low end
    threshold_hi: float = 0.70  # threshold sweep range, high end
    tta: bool = False  # flip test-time augmentation in validation
    seed: int = 0  # seeds the crops, the init and the batches (the split: split_seed)
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1"
    # auto: bf16 on GPU, fp32 on CPU; bf16 on a CPU: T's step 1.7-2.2x on AVX512-BF16
    # (CPU_DEMO sets bf16 where the CPU has it natively)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # DataLoader worker processes; 0: batches made in the loop (the history's data_s says
    # how long it waited for them; with the demo's crops 4% of an epoch, so workers do not pay)
    num_workers: int = 0
    impl: Literal["auto", "compiled", "reference"] = "auto"  # DCNv3 implementation
    # torch.compile backend of the training steps ("inductor"), as timm's --torchcompile;
    # "" = eager. Validation and prediction stay eager (no recompiles for their batch shapes).
    # On a 2-core CPU it does not pay for the tiny model (0.95x per step after 55 s of
    # compiling, experiments/bench_compile.py); measure it on your hardware first.
    compile: str = ""
    # Channels-last (NHWC) weights, so the convolutions run NHWC; None: on a GPU only. On a
    # 2-core CPU it pays for the demo's tiny model (a training step 11% and a validation
    # forward 16% less CPU, 192-px crops; CPU_DEMO turns it on) but not for T at 224 (2% more).
    channels_last: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.pretrained, os.PathLike):
            self.pretrained = os.fspath(self.pretrained)  # flat dicts stay JSON
        if isinstance(self.aug, dict):
            self.aug = AugConfig.from_dict(self.aug)
        for name, cls in (
            ("optim", OptimConfig),
            ("sched", SchedConfig),
            ("coteach", CoTeachConfig),
        ):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, _from_dict(cls, getattr(self, name), name))
        # its LR floor is a share of optim.lr (SchedConfig); bound on a copy, as
        # dataclasses.replace(cfg, optim=...) hands the new config this config's sched object
        self.sched = copy.copy(self.sched)
        self.sched._optim = self.optim
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the first invalid parameter."""
        from bldseg.models import model_name_problem

        def bad(name: str, why: str) -> None:
            raise ValueError(f"run config: {name}={_lookup(self, name)!r} {why}")

        typed: list[tuple[str, Any]] = []
        for f in fields(self):
            if f.name not in ("aug", "optim", "sched", "coteach"):
                v = checked(f"run config: {f.name}", getattr(self, f.name), f.type)
                setattr(self, f.name, v)
                typed.append((f.name, v))
        for section in ("optim", "sched", "coteach"):
            part = getattr(self, section)
            for f in fields(part):
                v = checked(f"run config: {section}.{f.name}", getattr(part, f.name), f.type)
                setattr(part, f.name, v)
                typed.append((f"{section}.{f.name}", v))
        # No parameter means anything at infinity or NaN, and the open-ended ranges below
        # (sched.cycle_mult >= 1, sched.power > 0, aux_weight >= 0) would let inf through to
        # fail deep in a run (the cosine restarts' cycle lengths: OverflowError); nor is either
        # valid JSON in the run's record.
        for name, v in typed:
            if isinstance(v, numbers.Real) and not math.isfinite(v):
                bad(name, "must be a finite number")

        problem = model_name_problem(self.model)
        if problem is not None:
            bad("model", problem)
        # The file itself is checked where it is read (fit): a saved run's config stays valid
        # on a machine without the checkpoint.
        if self.pretrained is not None and not (
            isinstance(self.pretrained, str) and self.pretrained
        ):
            bad("pretrained", "must be the path of a checkpoint file, or None")
        if self.drop_path_rate is not None and not 0 <= self.drop_path_rate < 1:
            bad("drop_path_rate", "must be in [0, 1), or None for the variant's default")
        if self.loss not in LOSSES:
            bad("loss", f"is not one of {sorted(LOSSES)}")
        if self.sched.name not in SCHEDULERS:
            bad("sched.name", f"is not one of {list(SCHEDULERS)}")
        if self.coteach.granularity not in ("tile", "pixel"):
            bad("coteach.granularity", "must be 'tile' or 'pixel'")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            bad("precision", "must be auto, fp32, bf16 or fp16")
        if self.impl not in ("auto", "compiled", "reference"):
            bad("impl", "must be auto, compiled or reference")
        if self.device != "auto":
            # parsed only: a config made on one machine may run on another (availability is
            # checked where the run starts, bldseg.train.engine.resolve_device)
            import torch

            try:
                torch.device(self.device)
            except RuntimeError:
                bad("device", "is not a torch device (auto, cpu, cuda, cuda:N)")
        if self.compile:
            import torch._dynamo

            backends = torch._dynamo.list_backends(exclude_tags=())
            if self.compile not in backends:
                bad("compile", f"is not a torch.compile backend ({', '.join(backends)}), or ''")
        if self.batch_size == 1 and "upernet" in self.model:
            # every training step failed with torch's "Expected more than 1 value per channel"
            bad(
                "batch_size",
                "must be >= 2 for UPerNet models: their pyramid pooling runs BatchNorm on 1x1 "
                "maps, which cannot train on one image (with_cp=true saves memory instead)",
            )
        if self.sched.name == "schedulefree" and self.optim.ema:
            # Its model is already an average of the iterates; a second average would lag it.
            bad(
                "optim.ema",
                "must be 0 with sched.name=schedulefree (it averages the weights already; "
                "schedule-free is the CPU settings' schedule, CPU_DEMO: set sched.name=onecycle, "
                "or another schedule, to use optim.ema)",
            )
        if self.folds == 1 or self.folds < 0:
            bad("folds", "must be 0 (the holdout split of val_fraction) or at least 2 (--folds K)")
        if self.folds >= 2 and not 0 <= self.fold < self.folds:
            bad("fold", f"is not one of the folds 0..{self.folds - 1} of folds={self.folds}")
        if self.folds == 0 and self.fold != 0:
            bad("fold", "selects a fold of K-fold training: set folds (--folds K) too")
        checks = [
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            (
                "samples_per_epoch",
                self.samples_per_epoch >= 0,
                "must be >= 0 (0 = one crop per training image)",
            ),
            # the smallest tile a model takes, as aug.crop_size (AugConfig)
            ("val_tile", self.val_tile == 0 or self.val_tile >= 8, "must be 0 (the crop) or >= 8"),
            ("num_workers", self.num_workers >= 0, "must be >= 0 (0 = batches made in the loop)"),
            # numpy's generators, which split and crop, take no negative seed
            ("seed", self.seed >= 0, "must be >= 0"),
            ("split_seed", self.split_seed >= 0, "must be >= 0"),
            ("val_fraction", 0 < self.val_fraction < 1, "must be in (0, 1)"),
            ("optim.lr", 0 < self.optim.lr < 1, "must be in (0, 1)"),
            # (written so that NaN fails too; infinite decay or clipping would mean nothing)
            ("optim.weight_decay", 0 <= self.optim.weight_decay < math.inf, "must be >= 0"),
            ("optim.beta1", 0 <= self.optim.beta1 < 1, "must be in [0, 1)"),
            (
                "optim.beta1",
                # the weights it validates and saves are y + (1 - 1/beta1) (z - y): at 0 the
                # first validation divided by zero, and y = z leaves no average to recover
                self.sched.name != "schedulefree" or self.optim.beta1 > 0,
                "must be > 0 with sched.name=schedulefree, whose averaged weights (validated "
                "and saved) are recovered by dividing by beta1: set optim.beta1 in (0, 1), "
                "e.g. its default 0.9",
            ),
            ("optim.beta2", 0 <= self.optim.beta2 < 1, "must be in [0, 1)"),
            ("optim.grad_clip", 0 <= self.optim.grad_clip < math.inf, "must be >= 0 (0 = off)"),
            ("optim.layer_decay", 0 < self.optim.layer_decay <= 1, "must be in (0, 1]"),
            ("optim.ema", 0 <= self.optim.ema < 1, "must be in [0, 1) (0 = off)"),
            ("coteach.tau", 0 <= self.coteach.tau < 1, "must be in [0, 1)"),
            ("coteach.t_k", self.coteach.t_k >= 1, "must be >= 1 (epochs of the ramp)"),
            (
                "threshold_lo",
                0 <= self.threshold_lo <= self.threshold_hi <= 1,
                "needs 0 <= threshold_lo <= threshold_hi <= 1",
            ),
            ("aux_weight", self.aux_weight >= 0, "must be >= 0"),
            ("sched.pct_start", 0 < self.sched.pct_start < 1, "must be in (0, 1)"),
            ("sched.div_factor", self.sched.div_factor > 0, "must be > 0"),
            ("sched.final_div_factor", self.sched.final_div_factor > 0, "must be > 0"),
            ("sched.cycles", self.sched.cycles >= 1, "must be >= 1"),
            ("sched.cycle_mult", self.sched.cycle_mult >= 1, "must be >= 1"),
            ("sched.gamma", 0 < self.sched.gamma <= 1, "must be in (0, 1]"),
            ("sched.warmup_frac", 0 <= self.sched.warmup_frac < 1, "must be in [0, 1)"),
            ("sched.warmup_steps", self.sched.warmup_steps >= 0, "must be >= 0"),
            ("sched.warmup_max_frac", 0 < self.sched.warmup_max_frac <= 1, "must be in (0, 1]"),
            (
                "sched.min_lr",
                # a floor only cosine_restarts and poly read (OneCycle's is final_div_factor)
                self.sched.name not in ("cosine_restarts", "poly")
                or 0 <= self.sched.min_lr < self.optim.lr,
                "must be in [0, optim.lr)",
            ),
            ("sched.power", self.sched.power > 0, "must be > 0"),
        ]
        for name, ok, why in checks:
            if not ok:
                bad(name, why)

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`bldseg.models.create_model` for this run (not the
        checkpoint: ``pretrained=self.pretrained`` is passed on its own)."""
        kw: dict[str, Any] = {"impl": self.impl, "with_cp": self.with_cp}
        if self.drop_path_rate is not None:
            kw["drop_path_rate"] = self.drop_path_rate
        return kw

    def to_flat(self) -> dict[str, Any]:
        """Flat dict with dotted keys for the nested configs (MLflow params, Ray configs)."""
        out: dict[str, Any] = {}
        for k, v in asdict(self).items():
            if isinstance(v, dict):
                out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                out[k] = v
        return out

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_flat`; also accepts nested dicts. Unknown keys are an error."""
        nested: dict[str, Any] = {}
        sections = _sections(cls)  # aug, optim, ... and their leaves
        for k, v in flat.items():
            if "." in k:
                head, tail = k.split(".", 1)
                if head not in sections and head in {f.name for f in fields(cls)}:
                    # model.head_channels=64 ended in "'str' object does not support item
                    # assignment", or was dropped when the value came after it
                    raise ValueError(
                        f"run config: {k!r}: {head!r} is a value of the run config, not a "
                        f"section with settings of its own (set it as {head}=...)"
                    )
                nested.setdefault(head, {})[tail] = v
            elif isinstance(v, dict):
                nested.setdefault(k, {}).update(v)
            elif k in sections:
                # aug=1 built a config whose aug was 1, which failed later with an
                # AttributeError naming neither the key nor what to do
                leaves = ", ".join(f"{k}.{leaf}" for leaf in sections[k])
                raise ValueError(
                    f"run config: {k!r} is a section of the run config, not a value: set its "
                    f"leaves by their dotted names ({leaves})"
                )
            else:
                nested[k] = v
        return _from_dict(cls, nested, "run config")

    def with_updates(self, flat: dict[str, Any]) -> RunConfig:
        """A copy with some flat (dotted) keys replaced."""
        return RunConfig.from_flat({**self.to_flat(), **flat})

    def to_json(self) -> str:
        """JSON of the flat dict."""
        return json.dumps(self.to_flat(), indent=2, sort_keys=True)


#: The official UPerNet-InternImage fine-tuning recipe (segmentation/configs/ade20k/
#: upernet_internimage_{t,s,b}_512_160k_ade20k.py): AdamW 6e-5, betas (0.9, 0.999), weight decay
#: 0.05, layer decay 1.0 (off), mmcv's poly decay (power 1, to 0, over the whole run) with a
#: 1500-iteration linear warm-up from 1e-6 of the LR, no gradient clipping (mmseg's
#: schedule_160k has none; bldseg's default clips at 1.0).
#: Its drop path rates 0.2/0.3/0.4 (T/S/B) are the variants' defaults already, so a searched
#: model keeps its own. Its 1500 warm-up steps are 0.9% of its 160k: a run shorter than 30k
#: steps warms up over 5% of itself instead (``sched.warmup_max_frac``), with a warning.
PRETRAINED_RECIPE: dict[str, Any] = {
    "optim.lr": 6e-5,
    "optim.beta1": 0.9,
    "optim.beta2": 0.999,
    "optim.weight_decay": 0.05,
    "optim.layer_decay": 1.0,
    "optim.grad_clip": 0.0,
    "sched.name": "poly",
    "sched.power": 1.0,
    "sched.min_lr": 0.0,
    "sched.warmup_steps": 1500,
    "sched.warmup_max_frac": 0.05,
}


def recipe_defaults(pretrained: str | os.PathLike) -> dict[str, Any]:
    """Flat run-config defaults for fine-tuning from ``pretrained``: the official recipe.

    Merge them *under* the values the user set, and the search space over both::

        base = {**scripts_defaults, **recipe_defaults(path), **user_sets}
        cfg = RunConfig.from_flat({**base, **trial_config})

    Args:
        pretrained: The checkpoint. Made absolute, since trials may run in another folder;
            not opened here (it may exist only on the training machines).

    Returns:
        :data:`PRETRAINED_RECIPE` plus ``{"pretrained": absolute path}``.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(pretrained)))
    return {**PRETRAINED_RECIPE, "pretrained": path}


def _lookup(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def config_sections() -> dict[str, tuple[str, ...]]:
    """The run config's sections (``aug``, ``optim``, ...) and the leaves of each, in order."""
    return _sections(RunConfig)


@functools.cache
def _sections(cls: type) -> dict[str, tuple[str, ...]]:
    """A config class's sections (fields holding a dataclass: ``aug``, ``optim``, ...) and
    each one's leaves."""
    default = cls()
    return {
        f.name: tuple(leaf.name for leaf in fields(getattr(default, f.name)))
        for f in fields(cls)
        if is_dataclass(getattr(default, f.name))
    }


def _from_dict(cls: type, d: dict[str, Any], where: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where}: unknown parameter(s) {unknown}; known: {sorted(known)}")
    return cls(**d)
