"""Learning-rate schedulers by name, stepped once per iteration.

* ``onecycle``: :class:`torch.optim.lr_scheduler.OneCycleLR` (the reference workflow's first).
* ``cosine_restarts``: :class:`CosineAnnealingWarmupRestarts` — linear warm-up then cosine
  decay in each cycle, cycles growing by ``cycle_mult``, the peak multiplied by ``gamma`` each
  cycle (torch has no such scheduler: implemented here with the parameter names and the
  curve of the widely used implementation, katsura-jp/pytorch-cosine-annealing-with-warmup,
  which the reference workflow used, so a ported config gives the same curve).
* ``poly``: polynomial decay to ``min_lr`` with a linear warm-up, as mmcv's poly hook
  (mmsegmentation's default; the official InternImage recipe).
* ``constant``: the optimizer's LR throughout.
* ``schedulefree``: no schedule at all: the run trains with schedule-free AdamW (Defazio et
  al. 2024, the ``schedulefree`` package), which warms up by itself and evaluates at an average
  of its iterates, so every epoch's model is as good as a schedule ending there would make it.
  The optimizer is built by :func:`bldseg.train.engine.build_optimizer`; the scheduler here
  keeps its LR constant.
"""

from __future__ import annotations

import bisect
import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR


def next_cycle_steps(length: int, warmup_steps: int, cycle_mult: float) -> int:
    """Length of the cycle after one of ``length`` steps in :class:`CosineAnnealingWarmupRestarts`.

    Only the part after the warm-up grows, truncated to whole steps: the widely used
    implementation's rule, not ``first_cycle_steps * cycle_mult**c``.
    """
    return int((length - warmup_steps) * cycle_mult) + warmup_steps


class CosineAnnealingWarmupRestarts(LRScheduler):
    """Cosine annealing with linear warm-up and warm restarts.

    The first cycle lasts ``first_cycle_steps`` steps and each next one
    ``int((L - warmup_steps) * cycle_mult) + warmup_steps`` where ``L`` is the previous cycle's
    length (:func:`next_cycle_steps`). Within cycle ``c`` (0-based) the LR rises linearly from
    ``min_lr`` to ``max_lr * gamma**c`` over ``warmup_steps`` steps, then follows a half cosine
    back down towards ``min_lr`` at the cycle's end. The cycles go on past any run length:
    :meth:`bldseg.train.config.SchedConfig.cosine_first_cycle` picks ``first_cycle_steps`` so
    that a run ends in the decay of its last cycle.

    Args:
        optimizer: The optimizer; its parameter groups' LRs are overwritten.
        first_cycle_steps: Length of the first cycle, in steps.
        cycle_mult: Growth factor of the cycle length (1.0: equal cycles).
        max_lr: Peak LR of the first cycle.
        min_lr: Floor LR.
        warmup_steps: Linear warm-up steps at the start of every cycle (< first_cycle_steps).
        gamma: Decay of the peak per cycle.
        last_epoch: Index of the last step (-1 to start).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        first_cycle_steps: int,
        cycle_mult: float = 1.0,
        max_lr: float = 1e-3,
        min_lr: float = 1e-6,
        warmup_steps: int = 0,
        gamma: float = 1.0,
        last_epoch: int = -1,
    ):
        if first_cycle_steps < 1:
            raise ValueError(f"first_cycle_steps={first_cycle_steps} must be >= 1")
        if not 0 <= warmup_steps < first_cycle_steps:
            raise ValueError(
                f"warmup_steps={warmup_steps} must be in [0, first_cycle_steps={first_cycle_steps})"
            )
        if not 0 < gamma <= 1.0:
            raise ValueError(f"gamma={gamma} must be in (0, 1]")
        if cycle_mult < 1.0:
            raise ValueError(f"cycle_mult={cycle_mult} must be >= 1")
        if not 0 <= min_lr <= max_lr:
            raise ValueError(f"need 0 <= min_lr ({min_lr}) <= max_lr ({max_lr})")
        self.first_cycle_steps = first_cycle_steps
        self.cycle_mult = cycle_mult
        self.max_lr = max_lr
        self.min_lr = min_lr
        self.warmup_steps = warmup_steps
        self.gamma = gamma
        self._starts = [0, first_cycle_steps]  # global step at which each cycle starts
        super().__init__(optimizer, last_epoch)

    def _cycle_position(self, step: int) -> tuple[int, int, int]:
        """(cycle index, step within the cycle, cycle length) of a global step."""
        # Cycle starts, extended on demand: a run holds few cycles, so this stays short.
        while self._starts[-1] <= step:
            length = self._starts[-1] - self._starts[-2]
            grown = next_cycle_steps(length, self.warmup_steps, self.cycle_mult)
            self._starts.append(self._starts[-1] + grown)
        c = bisect.bisect_right(self._starts, step) - 1
        return c, step - self._starts[c], self._starts[c + 1] - self._starts[c]

    def lr_at(self, step: int) -> float:
        """The LR at a global step (a pure function: used by tests and plots)."""
        cycle, pos, length = self._cycle_position(step)
        peak = self.max_lr * self.gamma**cycle
        if pos < self.warmup_steps:
            return self.min_lr + (peak - self.min_lr) * pos / self.warmup_steps
        frac = (pos - self.warmup_steps) / (length - self.warmup_steps)
        return self.min_lr + (peak - self.min_lr) * (1 + math.cos(math.pi * frac)) / 2

    def get_lr(self) -> list[float]:
        # The curve is for the group with the largest initial LR; the other groups (layer-wise
        # decay) follow it scaled by their own initial LR, keeping their ratios.
        lr = self.lr_at(max(0, self.last_epoch))
        top = max(self.base_lrs)
        return [lr * base / top if top > 0 else lr for base in self.base_lrs]


#: Where poly's linear warm-up starts, as a share of the LR (the official recipe's warmup_ratio).
POLY_WARMUP_RATIO = 1e-6


def poly_factor(
    step: int,
    total_steps: int,
    warmup_steps: int,
    power: float,
    floor: float,
    warmup_ratio: float = POLY_WARMUP_RATIO,
) -> float:
    """Poly's LR at ``step`` as a share of the group's LR (:func:`poly_warmup`)."""
    t = min(1.0, step / max(1, total_steps))
    regular = (1 - floor) * (1 - t) ** power + floor
    if step < warmup_steps:
        return regular * (warmup_ratio + (1 - warmup_ratio) * step / warmup_steps)
    return regular


def poly_warmup(
    optimizer: Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    power: float = 1.0,
    min_lr: float = 0.0,
    warmup_ratio: float = POLY_WARMUP_RATIO,
) -> LambdaLR:
    """mmcv's poly schedule with linear warm-up (``PolyLrUpdaterHook``, ``warmup='linear'``),
    as the official UPerNet-InternImage recipe runs it.

    The poly curve ``(1 - step / total_steps)^power`` spans the whole run from step 0; during
    the first ``warmup_steps`` steps it is scaled by a factor rising linearly from
    ``warmup_ratio`` (the recipe's 1e-6) to 1, so the LR peaks just below ``lr`` at the end of
    the warm-up (at ``1 - warmup_steps / total_steps`` of it) and decays on the same line as a run
    without warm-up.

    ``min_lr`` is the floor of the group with the largest LR; the other groups (layer-wise
    decay) end at the same fraction of their own LR, as in :class:`CosineAnnealingWarmupRestarts`
    (one absolute floor, as mmcv's poly hook has it, would make a group whose LR is below it
    rise instead of decay, and undo the layer-wise ratios).
    """
    top = max(g["lr"] for g in optimizer.param_groups)
    floor = min(1.0, min_lr / top) if top > 0 else 0.0

    def factor(step: int) -> float:
        return poly_factor(step, total_steps, warmup_steps, power, floor, warmup_ratio)

    return LambdaLR(optimizer, factor)


SCHEDULERS = ("onecycle", "cosine_restarts", "poly", "constant", "schedulefree")


def build_scheduler(name: str, optimizer: Optimizer, total_steps: int, **kw) -> LRScheduler:
    """Builds a per-iteration scheduler by name.

    Args:
        name: One of :data:`SCHEDULERS`.
        optimizer: The optimizer (its LR is the peak for ``onecycle``/``poly``).
        total_steps: Iterations of the whole run.
        **kw: The scheduler's own parameters. ``onecycle``: ``pct_start``, ``div_factor``,
            ``final_div_factor``; ``cosine_restarts``: ``first_cycle_steps`` (default: the
            whole run), ``cycle_mult``, ``min_lr``, ``warmup_steps``, ``gamma`` (``max_lr`` is
            the optimizer's LR); ``poly``: ``warmup_steps``, ``power``, ``min_lr``.

    Raises:
        ValueError: Unknown name or parameter (named).
    """
    # every group's own LR is its peak, so layer-wise LR ratios survive scheduling
    group_lrs = [g["lr"] for g in optimizer.param_groups]
    allowed = {
        "onecycle": {"pct_start", "div_factor", "final_div_factor", "cycle_momentum"},
        "cosine_restarts": {"first_cycle_steps", "cycle_mult", "min_lr", "warmup_steps", "gamma"},
        "poly": {"warmup_steps", "power", "min_lr"},
        "constant": set(),
        "schedulefree": set(),  # the optimizer warms up and averages itself
    }
    if name not in allowed:
        raise ValueError(f"unknown scheduler {name!r}; known: {list(SCHEDULERS)}")
    unknown = sorted(set(kw) - allowed[name])
    if unknown:
        raise ValueError(
            f"scheduler {name!r} has no parameter(s) {unknown}; it takes {sorted(allowed[name])}"
        )
    if name == "onecycle":
        return OneCycleLR(optimizer, max_lr=group_lrs, total_steps=max(2, total_steps), **kw)
    if name == "cosine_restarts":
        kw.setdefault("first_cycle_steps", total_steps)
        return CosineAnnealingWarmupRestarts(optimizer, max_lr=max(group_lrs), **kw)
    if name == "poly":
        if not 0 <= kw.get("warmup_steps", 0) < max(1, total_steps):
            raise ValueError(
                f"poly: warmup_steps={kw['warmup_steps']} must be in [0, total_steps={total_steps})"
            )
        if kw.get("power", 1.0) <= 0 or kw.get("min_lr", 0.0) < 0:
            raise ValueError(f"poly: power must be > 0 and min_lr >= 0, got {kw}")
        return poly_warmup(optimizer, total_steps, **kw)
    return LambdaLR(optimizer, lambda _: 1.0)
