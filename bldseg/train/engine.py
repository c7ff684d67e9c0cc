"""One training run: the reference workflow's loop as a library call.

    result = fit(RunConfig(epochs=5), "runs/demo")

Per epoch: random crops from the cache through the augmentation pipeline, AdamW with a
per-iteration schedule (or schedule-free AdamW, ``sched.name=schedulefree``), optional
co-teaching, then validation on fixed tiles with the official Dice at 0.5, at the best
threshold of a sweep and at Youden's threshold. The best epoch's validation probabilities
(uint8, with tile ids and ground truth; the input of the ensemble search) and its weights are
saved; ``last.pt`` makes the run resumable exactly (model, optimizer, scheduler, epoch, RNG
states). A non-finite loss, or weights or validation probabilities that became non-finite
(a step whose loss was finite but whose gradients were not), end the run with status
``"diverged"`` instead of raising.

A co-teaching run's model is its network f, always: the run's validation scores, train_loss,
``best.pt``, validation probabilities and predictions are f's (or f's weight average). Its
peer g is trained and validated too (``val_dice_best_peer``) but never chosen: picking the
better of two on validation every epoch would be a selection a single network's run does not
get. Each epoch also records ``keep_ratio`` (R(T)) and ``dropped_share``, the share of tiles
or pixels the small-loss selections actually dropped.

Each co-teaching network draws its dropout and drop-path masks from its own random stream: f
from the global one, seeded and drawn from exactly as a single network's run does, g from a
stream of its own (seeded ``seed + 1``; ``last.pt`` records it). So co-teaching with tau 0 (and
the first epoch of any, R(0) = 1) trains f exactly as plain training with the same seed:
same split, crops, initialisation, masks and loss (bit for bit on a CPU; tested). A ``last.pt``
of an older bldseg, whose two networks drew from the global stream in turn, resumes with g on a
new stream (seeded by the seed and the epoch) and a warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import random
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from bldseg import metrics
from bldseg.data.dataset import (
    RandomCropDataset,
    TileDataset,
    fold_indices,
    split_groups,
    split_indices,
    split_record,
    validation_tiles,
)
from bldseg.data.prepare import DataOptions, PreparedData, absolute_folders, prepare_data
from bldseg.data.readers import ReadOptions
from bldseg.io import atomic_path, file_lock, write_json
from bldseg.models import create_model
from bldseg.models.pretrained import check_archive, file_fingerprint, overrides_for_checkpoint
from bldseg.train.augment import (
    blur_problem,
    build_eval_transform,
    build_train_transform,
    serialize,
)
from bldseg.train.config import RunConfig
from bldseg.train.coteaching import (
    DropTally,
    coteaching_losses,
    first_dropping_epoch,
    longest_dropping_ramp,
)
from bldseg.train.ema import WeightEMA
from bldseg.train.losses import build_loss
from bldseg.train.optim import AdamWScheduleFree, clip_grad_norm_
from bldseg.train.plots import tiles_from_cache, write_run_plots
from bldseg.train.resume_checks import check_same_data, data_record, data_source
from bldseg.train.schedulers import build_scheduler

log = logging.getLogger(__name__)

CPUINFO = Path("/proc/cpuinfo")  # the CPU's feature flags (Linux)

EpochCallback = Callable[[dict[str, Any], Path], None]


@dataclass
class FitResult:
    """Outcome of :func:`fit`.

    Attributes:
        status: "completed", "diverged" or "stopped" (at ``stop_after``, to be resumed).
        message: Why the run ended, in words.
        history: One metrics dict per finished epoch.
        best: Metrics of the best epoch (by Dice at the best threshold), or {}.
        out_dir: The run folder (``best.pt``, ``last.pt``, ``val_probs.npz``, ``history.json``).
    """

    status: str
    message: str
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None


class DivergedError(RuntimeError):
    """A loss, the weights or the validation probabilities became NaN or infinite."""


class NonFiniteProbabilitiesError(ValueError):
    """A model's probabilities hold NaN or infinity (its weights have diverged)."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available, else cpu.

    Raises:
        ValueError: ``name`` is not a torch device, or a CUDA device this machine lacks (torch's
            own error is an AssertionError deep inside the first ``.to``).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device={name!r} is not a torch device (auto, cpu, cuda, cuda:N)") from e
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device={name!r}: no CUDA device here; use device=auto or cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"device={name!r}: this machine has {count} CUDA device(s): "
                f"cuda:0..cuda:{count - 1}"
            )
    return device


def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU computes bfloat16 products in hardware (x86 AVX512-BF16 or AMX-BF16,
    Arm BF16); None where the CPU's flags cannot be read (not Linux)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[-1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def fitted_crop(cfg: RunConfig, image_size: tuple[int, int]) -> RunConfig:
    """``cfg`` with the training crop :func:`fit` uses on images of ``image_size`` (H, W).

    With ``aug.crop_fit`` a crop larger than the images (the CPU defaults' 192 px on a user's
    128-px tiles) becomes their side: whole tiles are trained on.

    Raises:
        ValueError: The crop is larger than the images and ``aug.crop_fit`` is off.
    """
    h, w = image_size
    if cfg.aug.crop_size <= min(h, w):
        return cfg
    if not cfg.aug.crop_fit:
        raise ValueError(
            f"aug.crop_size={cfg.aug.crop_size} is larger than the cached images ({h}x{w}); "
            f"pass e.g. --set aug.crop_size={min(h, w)}"
        )
    return cfg.with_updates({"aug.crop_size": min(h, w)})


def eval_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype to predict with a run's model on ``device``: its validation's.

    Thresholds and ensembles are chosen on validation maps made under the run's autocast
    (bf16 in the CPU settings where the CPU has it); predicting in another precision moves
    about a tenth of the quantised levels by one. fp16 on a CPU (a GPU run predicted on a
    CPU) has no kernels there: float32.
    """
    try:
        return autocast_dtype(precision, device)
    except ValueError:
        return None


def validated_precision(precision: str, device: torch.device) -> str:
    """The precision a run's validation maps are made in on ``device``: ``precision`` with
    ``auto`` resolved ("bf16", "fp16" or "fp32"). ``best.pt`` and ``folds.json`` record it
    (``amp``): ``auto`` alone resolved on the predicting device is float32 on a CPU and bf16
    on a GPU, so a run validated on one and predicted on the other was predicted in another
    precision than its thresholds were chosen in."""
    try:
        return precision_name(autocast_dtype(precision, device))
    except ValueError:  # fp16 on a CPU: fit refuses it before this is asked
        return precision


def precision_name(amp: torch.dtype | None) -> str:
    """The precision setting of an autocast dtype: "bf16", "fp16", or "fp32" (None)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp, "fp32")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting (None: float32, no autocast).

    ``auto`` is bf16 on a GPU and float32 on a CPU. ``bf16`` on a CPU runs CPU autocast:
    convolutions and matrix products in bfloat16 through oneDNN (native on AVX512-BF16 / AMX
    CPUs, where UPerNet-InternImage-T's training step is 1.7-2.2x faster; emulated elsewhere,
    usually slower, which is logged). The DCNv3 op samples in float32, LayerNorm normalises
    in float32 (``bldseg.ops._layers.LayerNorm``), the loss takes float32 logits, and the
    rest follows torch's CPU autocast rules.

    Raises:
        ValueError: ``fp16`` on a CPU (CPUs have no fast float16 kernels, and its loss scaling
            is CUDA's); use bf16 or fp32 there.
    """
    if precision == "fp32" or device.type not in ("cuda", "cpu"):
        return None
    if device.type == "cpu":
        if precision == "fp16":
            raise ValueError(
                "precision='fp16' needs a CUDA device; on the CPU use precision=bf16 (native on "
                "CPUs with AVX512-BF16 or AMX) or fp32"
            )
        if precision == "auto":
            return None
        if cpu_has_native_bf16() is False:
            log.warning(
                "precision=bf16 on a CPU without native bfloat16 (no avx512_bf16 / amx_bf16 "
                "flag): oneDNN emulates it, usually slower than fp32"
            )
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    return torch.bfloat16


def seed_everything(seed: int) -> None:
    """Seeds Python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002  (global state other libraries draw from)
    torch.manual_seed(seed)


def _layer_id(name: str, depths: list[int]) -> int:
    """Depth index of a backbone parameter for layer-wise LR decay (0 = stem, 1 + sum(depths)
    = heads), numbered as the official InternImage optimizer constructor does.

    A level's norm and downsample go with the next level's first block (they make its input);
    the last two levels' both go with the last level's first block, as in the official
    constructor, so that official fine-tuning configs with ``layer_decay_rate < 1`` give the
    same per-parameter LRs here.
    """
    parts = name.split(".")
    if parts[0] != "backbone":
        return sum(depths) + 1  # heads: the top
    if parts[1] == "patch_embed":
        return 0
    if parts[1] == "levels":
        lvl = int(parts[2])
        if parts[3] == "blocks":
            return sum(depths[:lvl]) + int(parts[4]) + 1
        return 1 + sum(depths[: min(lvl, max(len(depths) - 2, 0)) + 1])
    return sum(depths) + 1


def _decays(name: str, p: nn.Parameter) -> bool:
    """Whether AdamW's weight decay applies: not to norms, biases and layer-scale gammas (1-D),
    as the official constructor (its ``sampling_offsets`` rule matches no InternImage name: the
    DCNv3 offset projection is ``dcn.offset``, decayed there as here)."""
    return p.ndim > 1 and not name.endswith((".gamma1", ".gamma2"))


def optimizer_layout(model: nn.Module, opt: torch.optim.Optimizer) -> list[list[str]]:
    """The parameter names of each of ``opt``'s groups, in order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in opt.param_groups]


def _check_optimizer_layout(
    saved: list[list[str]] | list[int], model: nn.Module, opt: torch.optim.Optimizer, path: Path
) -> None:
    """Refuses a resume whose optimizer state was written for other parameter groups.

    An optimizer's state is keyed by position: loaded into groups laid out otherwise, it would
    raise deep in torch or, with equal group sizes, give one parameter another's moments.
    ``saved`` is the checkpoint's :func:`optimizer_layout`, or only its group sizes (checkpoints
    written before bldseg recorded names).
    """
    layout = optimizer_layout(model, opt)
    if saved and isinstance(saved[0], int):
        if saved == [len(g) for g in layout]:
            return
        where = f"group sizes {saved} there, {[len(g) for g in layout]} here"
    else:
        if saved == layout:
            return
        group = {n: i for i, g in enumerate(saved) for n in g}
        moved = [n for i, g in enumerate(layout) for n in g if group.get(n) != i]
        where = f"{len(moved)} parameter(s) in another group, e.g. {moved[0] if moved else '?'}"
    raise ValueError(
        f"{path}: its optimizer state was written for other parameter groups ({where}). "
        "It comes from an older bldseg, which grouped the parameters for layer decay "
        "otherwise (optim.layer_decay < 1: level norms and downsamples with the level before); "
        "resuming would mix up the optimizer's moments. Finish it with the version that "
        "started it, or train anew in another --out"
    )


def build_optimizer(
    model: nn.Module, cfg: RunConfig, total_steps: int = 0
) -> torch.optim.Optimizer:
    """AdamW with no decay on norms/biases/gammas (:func:`_decays`) and optional
    layer-wise LR decay (:func:`_layer_id`).

    With ``sched.name=schedulefree``, schedule-free AdamW with the same parameter groups,
    warming up over ``sched.warmup_steps`` steps where that is set (> 0; at most
    ``sched.warmup_max_frac`` of ``total_steps``), else over ``sched.warmup_frac`` of
    ``total_steps`` (:meth:`~bldseg.train.config.SchedConfig.warmup_iterations`). Its parameters
    hold the point the gradients are taken at while it is in train mode and its average in eval
    mode (:func:`set_optimizer_mode`).
    """
    o = cfg.optim
    backbone_cfg = getattr(getattr(model, "backbone", None), "cfg", None)
    depths = list(backbone_cfg.depths) if backbone_cfg is not None else [0]
    top = sum(depths) + 1
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = o.weight_decay if _decays(name, p) else 0.0
        scale = o.layer_decay ** (top - _layer_id(name, depths)) if o.layer_decay < 1 else 1.0
        groups.setdefault((wd, scale), []).append(p)
    param_groups = [
        {"params": ps, "weight_decay": wd, "lr": o.lr * scale, "lr_scale": scale}
        for (wd, scale), ps in sorted(groups.items())
    ]
    if cfg.sched.name == "schedulefree":
        # Its warm-up is the only part of its "schedule" that depends on the run's length.
        warmup = cfg.sched.warmup_iterations(total_steps)
        # The package's optimizer with its CPU step compiled (bldseg.train.optim).
        return AdamWScheduleFree(
            param_groups, lr=o.lr, betas=(o.beta1, o.beta2), warmup_steps=warmup
        )
    # torch's fused AdamW kernel, where it has one: one pass over each parameter instead of a
    # dozen small ops (experiments/bench_model.py: 4.0 -> 0.75 ms per step for the tiny model,
    # 154 -> 37 ms for T, on 2 CPU cores). The same update up to rounding (tested).
    devices = {p.device.type for g in param_groups for p in g["params"]}
    fused = bool(devices) and devices <= {"cpu", "cuda"}
    return torch.optim.AdamW(
        param_groups, lr=o.lr, betas=(o.beta1, o.beta2), fused=True if fused else None
    )


def set_optimizer_mode(optimizers: Sequence[torch.optim.Optimizer], train: bool) -> None:
    """Puts schedule-free optimizers in train or eval mode (others have no modes).

    In train mode their parameters hold the point the gradients are taken at; in eval mode
    the average the run predicts with. Validation, ``best.pt`` and ``last.pt`` see eval mode
    (the package's rule for checkpoints), so a ``last.pt`` holds the weights to predict with
    and a resumed run switches back exactly as the uninterrupted one did.
    """
    for opt in optimizers:
        switch = getattr(opt, "train" if train else "eval", None)
        if callable(switch):
            switch()


def _stepped_lr(group: dict[str, Any]) -> float:
    return float(group.get("scheduled_lr", group["lr"]))


#: What a checkpoint may hold besides tensors: plain config data, nothing that unpickling would
#: have to construct from a class (``torch.load(weights_only=True)`` refuses anything else).
_PLAIN = (str, int, float, bool, type(None))


def _check_plain(obj: Any, where: str) -> None:
    """Raises TypeError naming the first entry that ``weights_only=True`` could not load."""
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN:  # exact types: np.float64 is a float
        return
    if isinstance(obj, dict):  # dict or OrderedDict (state dicts)
        for k, v in obj.items():
            if type(k) not in _PLAIN:
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}: a checkpoint holds only "
        "tensors, dicts, lists, str, int, float, bool and None (convert it, e.g. with .item(), "
        "float() or torch.as_tensor(), where it is made)"
    )


#: The :class:`~bldseg.data.readers.ReadOptions` fields that decide how an image (not its mask)
#: is decoded: ``best.pt`` and ``last.pt`` record them (:func:`image_read_record`), and
#: prediction reads new images the same way unless its flags say otherwise.
IMAGE_READ_FIELDS = ("alpha", "bands", "stretch")


def image_read_record(read: ReadOptions) -> dict[str, Any]:
    """How images were decoded, as a checkpoint records it: plain JSON-able data (a
    weights-only load reads it), one entry per :data:`IMAGE_READ_FIELDS` field."""
    return {
        "alpha": str(read.alpha),
        "bands": None if read.bands is None else [int(b) for b in read.bands],
        "stretch": [float(s) for s in read.stretch],
    }


def data_options_record(options: DataOptions) -> dict[str, Any]:
    """How the training data was found and decoded, as a checkpoint records it: every
    :class:`~bldseg.data.prepare.DataOptions` field (mask values, tiles, mask names... beside
    the image fields of :func:`image_read_record`), so that a command reading the data again
    without the training's flags (``bldseg suspects``, ``predict --masks``) reads its masks as
    the model learnt them. Plain JSON-able data (a weights-only load reads it), folder paths
    absolute (a command run from another folder finds them); ``DataOptions.from_dict`` reads
    it back."""
    record = asdict(absolute_folders(options))
    return json.loads(json.dumps(record))  # tuples to lists; anything else fails here


VAL_PROBS_FILE = "val_probs.npz"
_BEST_FILES = ("best.pt", VAL_PROBS_FILE)  # written together for each new best epoch


def _pending(out: Path, name: str, epoch: int) -> Path:
    """Where a best epoch's file waits until last.pt records that epoch as the best."""
    return out / f"{name}.epoch{epoch:05d}.pending"


def _settle_pending(out: Path, best_epoch: int | None) -> None:
    """Renames the best epoch's pending files into place; removes any other pending file (an
    epoch whose last.pt was never written: it is trained again after a resume)."""
    for name in _BEST_FILES:
        for path in out.glob(f"{name}.epoch*.pending"):
            if best_epoch is not None and path == _pending(out, name, best_epoch):
                os.replace(path, out / name)
            else:
                path.unlink()


def _check_best_file(path: Path, best_epoch: int, last_epoch: int) -> None:
    """Refuses a resume (or a rerun of a finished run) whose ``best.pt`` is missing or damaged:
    the run went on, or said "completed ... best.pt", over a file nothing can load.

    last.pt keeps the last epoch's training state, not the best epoch's weights (nor their
    average under EMA or schedule-free), so they cannot be written again from it.
    """
    try:
        check_archive(path)  # the checksums: damaged tensor bytes load silently otherwise
        load_state(path, mmap=True)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{path} holds the best epoch ({best_epoch}) of this run and cannot be read: {e}. "
            f"last.pt (epoch {last_epoch}) does not keep that epoch's weights; train again "
            "into a new --out (or remove the folder)"
        ) from None


def _save_atomic(obj: Any, path: Path) -> None:
    # Checked before writing: a file that load_state would refuse is never written.
    _check_plain(obj, path.name)
    # One process writes a run folder: a fixed name, which the next write overwrites when a
    # killed process left it; a full disk leaves no half checkpoint behind.
    with atomic_path(path, unique=False) as tmp:
        torch.save(obj, tmp)


def load_state(
    path: str | os.PathLike, map_location: torch.device | str = "cpu", *, mmap: bool = False
) -> Any:
    """Reads a checkpoint (``best.pt``, ``last.pt``) without unpickling arbitrary objects.

    ``torch.load(weights_only=True)``: tensors and plain data only. Unpickling anything else can
    run code chosen by whoever wrote the file, so such a file is refused, not loaded.

    Args:
        path: The checkpoint file.
        map_location: Where tensors go, as in :func:`torch.load`.
        mmap: Map the file instead of reading it (to read the small entries of a large file).

    Raises:
        ValueError: The file holds a pickled object other than tensors and plain data (the
            message names the file and the object), or is not a PyTorch checkpoint at all
            (empty, truncated, or foreign bytes), or (``mmap=False``: the weights are read) its
            checksums do not match its bytes.
        OSError: The file is missing or cannot be read (the error names it).
    """
    if not mmap:  # mapped: the config and names are read, not the (large) tensors
        # torch.load does not check the archive's checksums: damaged tensor bytes load
        # silently (reading the file once costs ~0.1 s per 100 MB)
        check_archive(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except OSError as e:
        if e.filename is not None:
            raise  # a missing or unreadable file says so itself, naming it
        # torch's zip reader fails on some truncated files with a bare OSError(22, 'Invalid
        # argument') that names no file
        raise _load_error(path, e) from None
    except Exception as e:  # torch's readers fail on foreign bytes in many ways (KeyError...)
        raise _load_error(path, e) from None


def _load_error(path: str | os.PathLike, e: Exception) -> ValueError:
    """Why ``path`` did not load, for the user: a text file (a Git LFS pointer, a web page from
    a failed download), pickled objects that are refused, or bytes that are no checkpoint."""
    try:
        with open(path, "rb") as f:
            head = f.read(256).lstrip().lower()
    except OSError:
        head = b""
    if head.startswith(b"version https://git-lfs"):
        return ValueError(
            f"{path} is a Git LFS pointer, not the checkpoint: fetch the file (git lfs pull)"
        )
    if head.startswith((b"<!doctype html", b"<html", b"<?xml")):
        return ValueError(
            f"{path} is a web page or XML document, not a checkpoint (a failed download?)"
        )
    if isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e):
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"a pickled {found.group(1)}" if found else "pickled Python objects"
        return ValueError(
            f"{path} holds {what}, not only tensors and plain data; it will not be unpickled "
            "(unpickling can run arbitrary code). bldseg writes checkpoints that load safely: "
            "retrain, or re-save the weights as a plain state dict if you trust where the file "
            "came from"
        )
    # empty, truncated or not a torch.save file at all; torch's weights-only message suggests
    # weights_only=False, wrong for bytes that are no checkpoint: keep only its reason
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)\n", str(e))
    if detail:
        why = f" ({detail.group(1)})"
    elif isinstance(e, (KeyError, IndexError, EOFError)):
        # torch's readers fail on foreign bytes with a bare key or index ("KeyError: 101")
        why = " (torch.load could not unpickle it)"
    else:
        why = f" ({type(e).__name__}: {e})"
    return ValueError(
        f"{path} is not a readable PyTorch checkpoint{why}: not a file torch.save wrote, "
        "or a damaged one"
    )


def eval_weights(state: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
    """The state dicts a ``last.pt`` predicts with, one per network: the weights' moving
    averages when the run kept them (``optim.ema``), else the trained weights."""
    emas = state.get("emas") or []
    return [e["module"] for e in emas] or list(state["models"])


def view_logits(model: nn.Module, x: torch.Tensor, tta: bool = False) -> Iterator[torch.Tensor]:
    """float32 logits (B, 1, H, W) of each view of ``x`` (B, 3, H, W), flipped back: the
    image alone, or with ``tta`` also its horizontal and vertical flips.

    The one definition of a run's test-time augmentation: validation (hence its thresholds)
    and everything predicting at those thresholds use it.
    """
    yield model(x).float()
    if tta:
        yield model(x.flip(-1)).float().flip(-1)
        yield model(x.flip(-2)).float().flip(-2)


@torch.no_grad()
def predict_probs(
    model: nn.Module | Sequence[nn.Module],
    loader: DataLoader,
    device: torch.device,
    amp: torch.dtype | None = None,
    tta: bool = False,
    on_batch: Callable[[int], object] | None = None,
) -> np.ndarray:
    """Sigmoid probabilities of every tile in ``loader``, quantised: uint8 (N, S, S).

    With ``tta``, the mean of the identity, horizontal-flip and vertical-flip predictions.
    Several models (the K folds of a K-fold run): the mean of their probabilities (and flips),
    quantised once, as one model's are. Each batch is quantised as it comes (clipping and
    quantising are per pixel): the maps held are 1 byte per pixel, not float32 copies.
    ``on_batch`` is called with each batch's tile count as it is done (a progress bar's
    ``update``: a chunk of thousands of tiles takes an hour on a CPU for InternImage-T).

    Raises:
        NonFiniteProbabilitiesError: A probability is NaN (weights that diverged, e.g. a last
            training step whose gradients overflowed); names the batch.
    """
    models = [model] if isinstance(model, nn.Module) else list(model)
    for m in models:
        m.eval()
    n_views = len(models) * (3 if tta else 1)
    out = []
    for batch in loader:
        x = batch["image"].to(device, non_blocking=True)  # (B, 3, S, S)
        ctx = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
        with ctx:
            p = 0
            for m in models:
                for logits in view_logits(m, x, tta):
                    p = p + torch.sigmoid(logits)  # (B, 1, S, S)
            if n_views > 1:
                p = p / n_views
        p = p[:, 0].cpu().numpy()  # (B, S, S)
        # np.clip keeps NaN, which quantise would report as a caller's missing sigmoid.
        if not np.isfinite(p).all():
            raise NonFiniteProbabilitiesError(
                f"the model's probabilities of batch {len(out)} hold NaN or infinity: its "
                "weights are not finite (the training diverged)"
            )
        out.append(metrics.quantise(np.clip(p, 0.0, 1.0)))  # (B, S, S)
        if on_batch is not None:
            on_batch(len(p))
    return np.concatenate(out) if out else np.zeros((0, 1, 1), np.uint8)


def threshold_metrics(
    probs: np.ndarray,
    truth: np.ndarray,
    lo: float = 0.3,
    hi: float = 0.7,
    *,
    wide: tuple[float, float] | None = metrics.WIDE_RANGE,
) -> dict[str, float]:
    """Official Dice at 0.5, at the best threshold of the sweep and at Youden's threshold.

    The sweep covers ``[lo, hi]``; when its best threshold sits on an edge, it widens to
    ``wide`` (:func:`bldseg.metrics.choose_level`) and ``thr_widened`` is 1.

    Args:
        probs: uint8 (N, S, S) quantised probabilities.
        truth: (N, S, S) binary ground truth.
        lo: Low end of the sweep.
        hi: High end of the sweep.
        wide: Range to widen to; None keeps the sweep at ``[lo, hi]``.
    """
    scores = metrics.dice_at_levels(probs, truth)  # (256,)
    level_05 = metrics.level_from_threshold(0.5)
    choice = metrics.choose_level(scores, metrics.QUANT_MAX, lo, hi, wide)
    try:
        t_youden, _ = metrics.youden_threshold(probs, truth)
    except ValueError:  # no building or no background pixel at all: J is undefined
        t_youden = 0.5
    return {
        "dice_05": float(scores[level_05]),
        "dice_best": float(choice.score),
        "thr_best": choice.threshold,
        "dice_youden": float(scores[metrics.level_from_threshold(t_youden)]),
        "thr_youden": float(t_youden),
        # 1.0, not True: epoch metrics go to MLflow and Tune, which take numbers only
        "thr_widened": float(choice.widened),
    }


def to_run_memory_format(model: nn.Module, cfg: RunConfig, device: torch.device) -> nn.Module:
    """The model with channels-last (NHWC) weights when the run asks for them (``channels_last``;
    None: on a GPU): every convolution then runs NHWC, its input following the weight."""
    if cfg.channels_last or (cfg.channels_last is None and device.type == "cuda"):
        return model.to(memory_format=torch.channels_last)
    return model


def _step_losses(
    models: list[nn.Module],
    batch: dict,
    cfg: RunConfig,
    loss_fn,
    keep_ratio: float,
    device: torch.device,
    amp: torch.dtype | None,
    tally: DropTally | None = None,
    streams: Sequence[dict[str, Any] | None] = (),
) -> list[torch.Tensor]:
    """One loss per network for this batch (co-teaching swaps the kept samples and counts
    what it dropped into ``tally``).

    ``streams``: per network, its own random stream (:func:`_drawing_from`) or None (the
    global one, network f's); missing entries are None.
    """
    x = batch["image"].to(device, non_blocking=True)  # (B, 3, S, S)
    y = batch["mask"].to(device, non_blocking=True)  # (B, 1, S, S)
    outs = []
    for i, m in enumerate(models):
        stream = streams[i] if i < len(streams) else None
        ctx = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
        # g's dropout and drop-path draws come from its own stream: drawn from the global one
        # between f's forwards, they shifted every mask f drew after the first batch
        with _drawing_from(stream, device) if stream is not None else nullcontext(), ctx:
            o = m(x)
        if isinstance(o, torch.Tensor):
            o = {"logits": o}
        outs.append({k: v.float() for k, v in o.items()})
    if len(models) == 1 or keep_ratio >= 1.0:
        # Keeping everything (R(0) = 1, tau 0), each network's update is the plain loss, computed
        # as a single network's run computes it: coteaching_losses' indexing and weighting give
        # the same value up to rounding (measured on 48-px crops), and f would drift from it.
        losses = []
        for o in outs:
            loss = loss_fn(o["logits"], y, None).mean()
            if "aux_logits" in o and cfg.aux_weight > 0:
                loss = loss + cfg.aux_weight * loss_fn(o["aux_logits"], y, None).mean()
            losses.append(loss)
        if tally is not None and len(models) > 1:  # seen, none dropped
            unit = y.shape[:1] if cfg.coteach.granularity == "tile" else y.shape
            tally.add([torch.ones(unit, dtype=torch.bool)] * len(models))
        return losses
    return coteaching_losses(
        outs, y, loss_fn, keep_ratio, cfg.coteach.granularity, cfg.aux_weight, tally
    )


def _stream_device(device: torch.device) -> int | None:
    """The GPU whose random stream a network on ``device`` draws from (None: on the CPU)."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def _seeded_stream(seed: int, device: torch.device) -> dict[str, Any]:
    """A network's own random stream, as ``torch.manual_seed(seed)`` would start the global one:
    ``{"cpu": state, "cuda": state or None}`` (uint8 tensors; the GPU's only on a GPU)."""
    gpu = _stream_device(device)
    return {
        "cpu": torch.Generator().manual_seed(seed).get_state(),
        "cuda": None
        if gpu is None
        else torch.Generator(device=f"cuda:{gpu}").manual_seed(seed).get_state(),
    }


@contextmanager
def _drawing_from(stream: dict[str, Any], device: torch.device) -> Iterator[None]:
    """Runs the block on ``stream``'s random states and saves them back into it at its end; the
    global streams are as they were before the block (:func:`torch.random.fork_rng`).

    Co-teaching's network g runs its forwards (dropout, drop-path) and is built in here, so
    that f, on the global streams, draws exactly what a single network's run draws.
    """
    gpu = _stream_device(device)
    with torch.random.fork_rng(devices=[] if gpu is None else [gpu]):
        torch.set_rng_state(stream["cpu"])
        if gpu is not None:
            torch.cuda.set_rng_state(stream["cuda"], gpu)
        yield
        stream["cpu"] = torch.get_rng_state()
        if gpu is not None:
            stream["cuda"] = torch.cuda.get_rng_state(gpu)


def _rng_state() -> dict[str, Any]:
    """The global RNG states as tensors and plain data (a checkpoint must load safely)."""
    algo, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),  # uint8 tensor
        "numpy": {
            "algo": str(algo),
            "keys": torch.from_numpy(keys.astype(np.int64)),  # (624,) uint32 values
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        },
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        # one uint8 tensor per GPU: drop-path and dropout draw there on CUDA, and building the
        # networks re-seeds it, so a resume without it replays the first epoch's masks
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    # .cpu(): last.pt is loaded onto the training device, the RNG states live on the host
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            n["algo"],
            n["keys"].cpu().numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    cuda = state.get("cuda", [])
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all([t.cpu() for t in cuda])
    elif cuda:
        warnings.warn(
            f"the checkpoint's CUDA random state is for {len(cuda)} GPU(s), this machine has "
            f"{torch.cuda.device_count()}: the run continues with other dropout draws",
            stacklevel=2,
        )


def _resume_peer_streams(
    streams: list[dict[str, Any]],
    state: dict[str, Any],
    cfg: RunConfig,
    device: torch.device,
    epoch: int,
    path: Path,
) -> None:
    """Sets co-teaching's network g's random stream (in place) to what ``last.pt`` recorded.

    A ``last.pt`` written before bldseg gave g a stream of its own (f and g drew from the global
    one, in turn) records none: g continues from a stream seeded by the run's seed and the
    epoch resumed at, with a warning; f continues exactly, on the global stream.
    """
    if not streams:
        return
    recorded = state.get("peer_rng")
    if not recorded:
        warnings.warn(
            f"{path} was written by an older bldseg, whose co-teaching networks drew their "
            "dropout and drop-path masks from one random stream: network g continues from a "
            f"new stream (seed {cfg.seed + 1}, epoch {epoch}), so the rest of the run is not the "
            "one the older version would have trained; a last.pt written from now on records "
            "g's stream",
            stacklevel=4,  # fit's caller (through _fit)
        )
        fresh = _seeded_stream((cfg.seed + 1) * 100_003 + epoch, device)
        for s in streams:
            s.update(fresh)
        return
    for s, r in zip(streams, recorded, strict=True):
        # .cpu(): last.pt is loaded onto the training device, the RNG states live on the host
        s["cpu"] = r["cpu"].cpu()
        if s["cuda"] is not None:
            # a stream recorded on a CPU and continued on a GPU keeps the seeded GPU stream
            s["cuda"] = r["cuda"].cpu() if r.get("cuda") is not None else s["cuda"]


def check_same_config(
    recorded: dict[str, Any],
    cfg: RunConfig,
    where: str | Path,
    content: str | None = None,
) -> None:
    """Raises ValueError naming the settings in which a recorded run config differs from ``cfg``.

    Args:
        recorded: The flat config a run folder records (``last.pt``, ``folds.json``).
        cfg: The config asked for now.
        where: The file that records it, for the message.
        content: Given when the training data's content digest now is the one the run
            recorded: ``data`` may then name another folder (the same data moved, copied or
            regenerated), with a note; the data checks decide whether the data changed.
    """
    # normalised through RunConfig so keys added since (with their defaults) compare equal
    was = RunConfig.from_flat(recorded).to_flat()
    now = cfg.to_flat()
    differ = sorted(k for k in was.keys() | now.keys() if was.get(k) != now.get(k))
    if "data" in differ and _same_folder(was.get("data"), now.get("data")):
        # `--data mydata/` from the run's folder, `--data /abs/mydata` from elsewhere: the same
        # data (the split check compares its images' ids)
        differ.remove("data")
    elif "data" in differ and content is not None:
        # the same decoded images, masks, ids and groups in another folder (moved to a faster
        # disk, copied, the built-in world regenerated): the run goes on on them
        differ.remove("data")
        print(
            f"{where}: continuing on {now.get('data')}, which holds the data the run started on "
            f"in {was.get('data')} (the same content digest)",
            flush=True,
        )
    if differ:
        shown = ", ".join(f"{k}: {was.get(k)!r} -> {now.get(k)!r}" for k in differ[:5])
        raise ValueError(
            f"{where} was written by a different config ({shown}); use a new out_dir, or "
            "the recorded settings to continue it"
        )


def _same_folder(a: str | None, b: str | None) -> bool:
    """Whether two ``data`` values name one folder (relative ones from the working folder)."""
    if a is None or b is None:
        return False
    return os.path.realpath(a) == os.path.realpath(b)


def check_run_folder(out: Path) -> None:
    """Refuses to train a single run into a K-fold run folder, before anything is written.

    Its files would mix with the folds': prediction and the ensemble search read
    ``folds.json`` first (the K fold models), beside a single run's ``val_probs.npz``.

    Raises:
        ValueError: ``out`` holds ``folds.json`` or a fold's run folder (``fold<f>/last.pt``).
    """
    # bldseg.train.folds.FOLDS_FILE (it imports this module)
    found = [out / "folds.json"] if (out / "folds.json").is_file() else []
    if not found and out.is_dir():
        found = sorted(
            d / name
            for d in out.iterdir()
            if re.fullmatch(r"fold\d+", d.name) and d.is_dir()
            for name in ("last.pt", "best.pt")
            if (d / name).is_file()
        )
    if found:
        raise ValueError(
            f"{found[0]}: {out} is a K-fold run folder (--folds); a single run there would mix "
            "its files with the folds'. Use another --out (or --folds K to continue it)"
        )


#: Held by :func:`fit` in its run folder for the whole run: a second process training into the
#: same folder is refused instead of writing its checkpoints over the first's.
RUN_LOCK_FILE = ".run.lock"


class RunFolderInUseError(ValueError):
    """Another process is training into the run folder (it holds :data:`RUN_LOCK_FILE`)."""


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Holds ``out/.run.lock`` for the block; refuses at once where another process holds it.

    An OS file lock (:func:`bldseg.io.file_lock`): the OS releases it when its process dies, so
    a killed run leaves nothing to clean up, and the next ``fit`` in this process (a search's
    next trial, a resume) takes it again once the block has ended, normally or not.

    Creates ``out``. A folder it created is removed again when the block raises before anything
    but the lock was written into it: a run that fails its checks (a checkpoint that does not
    fit the model) leaves no empty folder behind.

    Raises:
        RunFolderInUseError: Another process holds the lock.
        OSError: ``out`` cannot be created (a read-only folder; a file of that name).
    """
    from filelock import Timeout

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock_path = out / RUN_LOCK_FILE
    soft = out / f"{RUN_LOCK_FILE}.soft"  # file_lock's lock where the filesystem has no flock
    held = ExitStack()
    try:
        held.enter_context(file_lock(lock_path, timeout=0))
    except Timeout:
        stale = (
            f"; this filesystem cannot lock files, and a killed run leaves {soft} behind: "
            "delete it if no process trains there"
            if soft.exists()
            else ""
        )
        raise RunFolderInUseError(
            f"another process is training into {out} (it holds {lock_path}): wait for it to "
            f"end, or pass another --out{stale}"
        ) from None
    remove = False
    try:
        with held:
            try:
                yield
            except BaseException:
                remove = created and {p.name for p in out.iterdir()} <= {lock_path.name, soft.name}
                if remove:
                    # Unlinked while still held: a process that opens it now finds a live run
                    # (after the release it would lock a file no longer in the folder).
                    lock_path.unlink(missing_ok=True)
                raise
    finally:
        if remove:
            # After the release (the soft lock's file goes with it); rmdir only removes the
            # folder while empty: another process may have started writing into it meanwhile.
            with suppress(OSError):
                out.rmdir()


def _divergence_advice(cfg: RunConfig, amp: torch.dtype | None) -> str:
    """What may keep a diverged run finite, leaving out what it already does: clipping is
    suggested only where it was off, float32 only where the run computed under autocast."""
    hints = ["lower optim.lr / optim.weight_decay"]
    if cfg.optim.grad_clip <= 0:
        hints.append("set optim.grad_clip (e.g. 1.0)")
    if amp is not None:
        hints.append("train with precision=fp32")
    return ", ".join(hints[:-1]) + (" or " if len(hints) > 1 else "") + hints[-1]


def _check_finite_weights(
    modules: Sequence[tuple[str, nn.Module]], epoch: int, advice: str
) -> None:
    """Raises DivergedError naming the first weight or buffer that is NaN or infinite.

    A step whose loss was finite but whose gradients were not (an overflowing backward)
    leaves non-finite weights that no loss has seen yet when it is the epoch's last one.
    A tensor's sum is NaN or infinite when an entry is (short of finite weights summing past
    3e38): one read of the weights and one read-back, about 10 ms for InternImage-T's 59M
    weights on a CPU core (isfinite per tensor: 20x that), negligible beside an epoch.
    """
    named = [
        (f"{who}: {name}", t)
        for who, m in modules
        for name, t in m.state_dict().items()
        if t.is_floating_point()
    ]
    if not named:
        return
    finite = torch.isfinite(torch.stack([t.sum(dtype=torch.float32) for _, t in named]))
    if bool(finite.all()):
        return
    where = named[int(torch.argmin(finite.int()))][0]  # the first non-finite one
    raise DivergedError(
        f"weights became non-finite at epoch {epoch + 1} ({where}) after a step with a finite "
        f"loss (its gradients overflowed); {advice}"
    )


def _diverged(
    out: Path, message: str, history: list[dict[str, Any]], best: dict[str, Any]
) -> FitResult:
    """Ends a run as diverged: ``status.json`` says so, last.pt stays the last good epoch's."""
    write_json(out / "status.json", {"status": "diverged", "message": message})
    return FitResult("diverged", message, history, best, out)


def _timed(batches: Any, waited: list[float]):
    """Yields from ``batches``, adding the time each batch took to arrive to ``waited[0]``."""
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        waited[0] += time.perf_counter() - t0
        yield batch


def _check_same_split(was: dict | None, now: dict[str, Any], last_path: Path) -> None:
    """Refuses to resume a run whose validation images would be others now.

    The split groups (``--group-column``) are a data option, not part of the run config, so
    the config check misses them; a run resumed with others would validate on images it
    trained on. ``was`` is None for a ``last.pt`` written before bldseg recorded its split.

    Raises:
        ValueError: Other images, or the same images split otherwise (naming the flags).
    """
    if was is None:
        return
    again = (
        "Resume with the --group-column / --split-group (and the --data) the run was started "
        "with, or use another --out"
    )
    if was.get("ids_sha256") != now["ids_sha256"]:
        raise ValueError(
            f"{last_path}: the run was trained on {was.get('images')} images, the data now has "
            f"{now['images']} images with other ids (the data changed). " + again
        )
    if was.get("folds_sha256") != now["folds_sha256"]:
        raise ValueError(
            f"{last_path}: the data's {now['images']} images are split into training and "
            "validation otherwise than when the run started (other split groups: "
            "--group-column or --split-group differ); the resumed run would validate on images "
            "it trained on. " + again
        )


def _check_same_data(
    recorded: dict[str, Any], cfg: RunConfig, data: PreparedData, last_path: Path
) -> None:
    """Refuses to resume (or re-run a finished) run whose training data changed since it
    started, e.g. masks fixed after an interruption (:func:`check_same_data`).

    The config and split checks miss it: the images' ids stay, and the cache is rebuilt from
    the edited files without a word. A ``last.pt`` from before bldseg recorded the data is
    resumed as it was, with a warning.

    Raises:
        ValueError: The cache's fingerprint is not the one ``last.pt`` records.
    """
    if not recorded.get("data_fingerprint"):
        warnings.warn(
            f"{last_path} was written by an older bldseg, which did not record the training "
            "data's fingerprint: whether the data changed since the run started cannot be "
            "checked (a last.pt written from now on records it)",
            stacklevel=4,  # fit's caller (through _fit)
        )
        return
    if recorded["epoch"] >= cfg.epochs:
        consequence = (
            "the finished run's result (best.pt, val_probs.npz, its Dice) is of those data, "
            "not of these"
        )
    else:
        consequence = (
            f"its {recorded['epoch']} epoch(s) so far were trained and scored on those, the rest "
            "would be on these, and its best epoch chosen across both"
        )
    check_same_data(
        str(last_path),
        "run",
        recorded,
        data.train.fingerprint,
        data_source(data),
        consequence=consequence,
        remedy="train into a new --out",
        content=data.train.content,
    )


def split_for(cfg: RunConfig, cache: Any) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices of ``cache``'s images that :func:`fit` uses for ``cfg``.

    By source scene (or ``cfg.split_group``): tiles of one scene never sit on both sides;
    with ``cfg.folds >= 2``, fold ``cfg.fold`` validates and the others train.
    """
    groups = split_groups(cache, cfg.split_group)
    if cfg.folds >= 2:
        return fold_indices(len(cache), cfg.folds, cfg.fold, cfg.split_seed, groups)
    return split_indices(len(cache), cfg.val_fraction, cfg.split_seed, groups)


def _batches(n: int, batch_size: int) -> tuple[int, bool]:
    """(optimizer steps per epoch, whether the last batch is dropped) for ``n`` samples.

    A last batch of one image is dropped: BatchNorm cannot train on one value per channel, and
    UPerNet's pyramid pooling makes exactly that (its 1x1 pooled maps). Shorter last batches
    are kept.
    """
    drop = batch_size > 1 and n % batch_size == 1
    return math.ceil(n / batch_size) - drop, drop


def checked_config(cfg: RunConfig, cache: Any) -> RunConfig:
    """``cfg`` as :func:`fit` trains it on ``cache``: with the crop it uses
    (:func:`fitted_crop`), once checked against the images and the training split.

    These are the checks of a config against the data that fail a run before it writes
    anything: :func:`bldseg.train.folds.fit_folds` makes them for every fold before it writes
    its manifest, and records the config returned (the crop a K-fold member predicts with).

    Raises:
        ValueError: A crop larger than the images without ``aug.crop_fit``, a ``val_tile``
            larger than the images, or no optimizer step in an epoch (naming the settings).
    """
    h, w = cache.image_size
    used = fitted_crop(cfg, (h, w))
    if cfg.val_tile > min(h, w):
        # validation_tiles' own message names its argument, not the setting
        raise ValueError(
            f"run config: val_tile={cfg.val_tile} is larger than the images ({h}x{w}); use "
            f"val_tile <= {min(h, w)}, or 0 for tiles of aug.crop_size"
        )
    train_idx, _ = split_for(cfg, cache)
    samples = cfg.samples_per_epoch or len(train_idx)  # RandomCropDataset's length
    if _batches(samples, cfg.batch_size)[0] == 0:
        raise ValueError(
            f"no training step in an epoch: {samples} sample(s) per epoch "
            f"(samples_per_epoch={cfg.samples_per_epoch}, {len(train_idx)} training images) "
            f"with batch_size={cfg.batch_size}; a last batch of one is dropped (BatchNorm), so "
            "raise samples_per_epoch or lower batch_size"
        )
    return used


def steps_per_epoch(cfg: RunConfig, data: PreparedData) -> int:
    """Optimizer steps in one epoch of ``fit(cfg, data=data)`` (the last batch may be short)."""
    n = cfg.samples_per_epoch or len(split_for(cfg, data.train)[0])
    return _batches(n, cfg.batch_size)[0]


def _warn_idle_tile_selection(cfg: RunConfig) -> None:
    """Warns (before training) where tile co-teaching drops no tile in epochs past the first.

    Selection keeps ``ceil(R(T) * B)`` tiles of a batch of ``B`` (Algorithm 1 keeps at least
    R(T)|D|), so it drops ``floor(B * tau * min(T / t_k, 1))``. R(0) = 1 makes the first epoch
    plain training by design; a small batch or a long ramp leaves more epochs, or all of them,
    training two plain networks while keep_ratio says otherwise.
    """
    ct, b = cfg.coteach, cfg.batch_size
    if not ct.enabled or ct.granularity != "tile" or ct.tau <= 0:
        return
    # the ramp reaches tau at T = t_k: what the run would drop there, whatever its epochs
    ramp = first_dropping_epoch(ct, b, ct.t_k + 1)
    if ramp is None:
        warnings.warn(
            f"co-teaching drops floor(tau * batch_size) = floor({ct.tau:g} * {b}) "
            "= 0 tiles per batch: the two networks train on every tile, as with tau = 0; use "
            f"batch_size >= {math.ceil(1 / ct.tau)} or coteach.granularity=pixel",
            stacklevel=4,
        )
        return
    if ramp <= 1:
        return
    if ramp < cfg.epochs:
        where = f"before epoch {ramp + 1} of {cfg.epochs}"
    else:
        where = f"in any of its {cfg.epochs} epochs (its ramp first drops one in epoch {ramp + 1})"
    warnings.warn(
        f"co-teaching drops no tile {where}: tile selection drops floor(batch_size * tau * "
        f"min(T / t_k, 1)) = floor({b} * {ct.tau:g} * min(T / {ct.t_k}, 1)) tiles per batch in "
        f"0-based epoch T, 0 for T < {ramp}; until then the two networks train on every tile, "
        "as without co-teaching (the history's dropped_share records what was dropped); use "
        f"coteach.t_k <= {longest_dropping_ramp(ct, b, ct.t_k)} to drop from epoch 2, a larger "
        "batch_size or coteach.granularity=pixel",
        stacklevel=4,
    )


def fit(
    cfg: RunConfig,
    out_dir: str | os.PathLike,
    *,
    data: PreparedData | None = None,
    on_epoch_end: EpochCallback | None = None,
    resume: bool = True,
    progress: bool = False,
    stop_after: int | None = None,
) -> FitResult:
    """Trains one model (or a co-teaching pair) and validates it every epoch.

    With ``cfg.folds >= 2`` it trains fold ``cfg.fold`` of K: validated on that partition of
    the split groups, trained on the others (:func:`bldseg.data.dataset.fold_indices`);
    :func:`bldseg.train.folds.fit_folds` trains all K.

    One process at a time trains into ``out_dir``: the run holds its lock from start to end
    (:func:`run_lock`), and a second ``fit`` there is refused before it reads or writes the
    run's files.

    With ``cfg.pretrained`` the networks start from that file (``pretrained.json`` records what
    was loaded, the file's size and sha256). The models are built, and the file checked
    against them, before anything is written into ``out_dir``. A resumed run does not read the
    file: ``last.pt`` holds every weight, and ``pretrained.json`` stays that of the start.

    Args:
        cfg: The run config.
        out_dir: Run folder; ``last.pt`` there is resumed from when ``resume``.
        data: Prepared caches; default ``prepare_data(cfg.data)``. When they carry the
            :class:`~bldseg.data.prepare.DataOptions` they were read with (``options``),
            ``best.pt`` and ``last.pt`` record how the images were decoded (``image_read``,
            :func:`image_read_record`), and prediction reads new images the same way, and all
            the options (``data_options``, :func:`data_options_record`), with which ``bldseg
            suspects`` reads the data again and ``predict --masks`` decodes masks.
        on_epoch_end: Called after every epoch with the epoch's metrics and ``out_dir`` (after
            the checkpoints are written), e.g. to report to Ray Tune.
        resume: Continue from ``out_dir/last.pt`` if present.
        progress: Show a per-epoch progress bar.
        stop_after: Return (status ``"stopped"``, no plots) once this many epochs are trained;
            calling again with ``resume`` continues exactly (K folds trained in lockstep).

    Returns:
        A :class:`FitResult`; ``status == "diverged"`` when a loss, the weights or the
        validation probabilities became non-finite (``last.pt`` stays the last good epoch's).

    Raises:
        ValueError: A config or data the run cannot use, e.g. another run's ``last.pt`` in
            ``out_dir``, training data that changed since ``last.pt`` was written (edited
            masks: :func:`~bldseg.train.resume_checks.check_same_data`), a K-fold run folder
            as ``out_dir`` (:func:`check_run_folder`), or a
            ``cfg.pretrained`` file that does not fit ``cfg.model``
            (:class:`~bldseg.models.pretrained.CheckpointMismatchError`, naming the model the
            file is for).
        FileNotFoundError: No ``cfg.pretrained`` file (when not resuming).
        RunFolderInUseError: Another process is training into ``out_dir`` (:func:`run_lock`).
        OSError: ``out_dir`` cannot be created or written (a read-only folder, a file there).
    """
    out = Path(out_dir)
    check_run_folder(out)
    with run_lock(out):
        return _fit(cfg, out, data, on_epoch_end, resume, progress, stop_after)


def _fit(
    cfg: RunConfig,
    out: Path,
    data: PreparedData | None,
    on_epoch_end: EpochCallback | None,
    resume: bool,
    progress: bool,
    stop_after: int | None,
) -> FitResult:
    """:func:`fit`'s run, with the run folder's lock held."""
    data = data or prepare_data(cfg.data, progress=progress, test_split=False)
    # How the training images were decoded (bands, stretch, alpha), for prediction to read new
    # images alike, and how the data was found and its masks decoded, for commands that read
    # it (or other masks) again: known when the prepared data records its options, the flags
    # it was read with or, for a bldseg cache given as the data, the read options its manifest
    # records (None: a cache built before caches recorded them, or data made by hand; then
    # nothing is recorded, as before).
    image_read = None if data.options is None else image_read_record(data.options.read)
    data_options = None if data.options is None else data_options_record(data.options)
    device = resolve_device(cfg.device)
    amp = autocast_dtype(cfg.precision, device)
    seed_everything(cfg.seed)

    cache = data.train
    groups = split_groups(cache, cfg.split_group)  # the validation probabilities record them
    train_idx, val_idx = split_for(cfg, cache)
    validated = np.zeros(len(cache), np.int64)
    validated[val_idx] = 1
    split = split_record(cache.ids, validated)  # last.pt records it; a resume compares it
    h, w = cache.image_size
    used = checked_config(cfg, cache)
    if used.aug.crop_size != cfg.aug.crop_size:
        # The checkpoint and the run's files record the crop that was used.
        print(f"aug.crop_size={cfg.aug.crop_size} > images {h}x{w}: crops of {min(h, w)} px")
    cfg = used
    crop = cfg.aug.crop_size
    last_path = out / "last.pt"
    resuming = resume and last_path.exists()
    if (why := blur_problem(cfg.aug)) is not None:
        if not resuming:
            raise ValueError(why)
        # recorded before the limit: the run continues as it trained (blur_sigma_range)
        warnings.warn(f"{last_path}: {why}; the run continues as recorded", stacklevel=3)
    # Architecture settings a pretrained file chose (layer scale): on a resume they are read
    # from last.pt's weights, and the file itself is not read at all (last.pt holds every
    # weight; the file may have moved, or been replaced by another one).
    rebuild: dict[str, Any] = {}
    if resuming:
        # Before anything is written into out: a run with another config must leave it as is.
        # mmap: the config and the names of the weights, without reading them
        try:
            recorded = load_state(last_path, mmap=True)
        except ValueError as e:  # damaged: say how to go on, not only what is wrong
            raise ValueError(
                f"{e}. The run cannot continue from it: train into another --out, or remove "
                f"{last_path} to train this folder again from the start"
            ) from None
        same = data.train.content and recorded.get("data_content") == data.train.content
        check_same_config(recorded["config"], cfg, last_path, data.train.content if same else None)
        _check_same_split(recorded.get("split"), split, last_path)
        # After the split: other split groups change the fingerprint too, and that message
        # names the flags.
        _check_same_data(recorded, cfg, data, last_path)
        # The saved weights decide the layer scale: a pretrained file chose it, and T runs
        # made before upernet_internimage_t had layer scale have none.
        rebuild = overrides_for_checkpoint(recorded["models"][0])
        saved_layout = recorded.get("optimizer_groups") or [
            len(g["params"]) for g in recorded["optimizers"][0]["param_groups"]
        ]
        del recorded
    train_tf = build_train_transform(cfg.aug)
    train_ds = RandomCropDataset(
        cache,
        train_idx,
        train_tf,
        window=min(cfg.aug.window, h, w),
        samples_per_epoch=cfg.samples_per_epoch or None,
        seed=cfg.seed,
    )
    tiles = validation_tiles(cache, val_idx, cfg.val_tile or crop)
    val_ds = TileDataset(cache, tiles, build_eval_transform())
    val_truth = np.stack(
        [np.asarray(cache.masks[t.index, t.y : t.y + t.size, t.x : t.x + t.size]) for t in tiles]
    )
    pin = device.type == "cuda"
    val_loader = DataLoader(
        val_ds, batch_size=cfg.batch_size * 2, num_workers=cfg.num_workers, pin_memory=pin
    )

    n_nets = 2 if cfg.coteach.enabled else 1
    _warn_idle_tile_selection(cfg)
    models, optimizers, schedulers = [], [], []
    epoch_steps, drop_last = _batches(len(train_ds), cfg.batch_size)
    total_steps = epoch_steps * cfg.epochs
    # Network g's own random stream (f draws from the global one, as a single network's run);
    # its init draws come from it too, so building g moves nothing f draws later.
    peer_streams = [_seeded_stream(cfg.seed + k, device) for k in range(1, n_nets)]
    for k in range(n_nets):
        # The two co-teaching networks start differently: everything a checkpoint does not set
        # (the decoder under ImageNet weights, the re-made classifiers) has its own seed.
        if k == 0:
            torch.manual_seed(cfg.seed)
        pretrained = None if resuming else cfg.pretrained
        with _drawing_from(peer_streams[k - 1], device) if k else nullcontext():
            m = create_model(cfg.model, pretrained=pretrained, **cfg.model_kwargs(), **rebuild)
        m = m.to(device)
        m = to_run_memory_format(m, cfg, device)
        opt = build_optimizer(m, cfg, total_steps)
        sch = build_scheduler(
            cfg.sched.name, opt, total_steps, **cfg.sched.scheduler_kwargs(total_steps)
        )
        models.append(m)
        optimizers.append(opt)
        schedulers.append(sch)
    if resuming:
        _check_optimizer_layout(saved_layout, models[0], optimizers[0], last_path)
    # The weights validation, best.pt and predictions use: each network's average, with optim.ema
    emas = [WeightEMA(m, cfg.optim.ema) for m in models] if cfg.optim.ema else []
    eval_models = [e.module for e in emas] or models
    # The first writes into out: a checkpoint that does not fit the model has failed above and
    # left the folder as it was.
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "augmentation.json", serialize(train_tf))
    if cfg.pretrained is not None and not resuming:
        # Every network reads the same file the same way: one record for the run, with the
        # file's size and digest (another file later put behind the same path shows). A resumed
        # run keeps the record of the file it started from.
        report = models[0].pretrained_report
        # printed, not only logged: the CLI configures no logging, and what a fine-tune started
        # from is the first thing to check in its output (pretrained.json keeps the details)
        print(f"pretrained: {report.summary()}", flush=True)
        record = {**report.to_dict(), **file_fingerprint(cfg.pretrained), "networks": n_nets}
        write_json(out / "pretrained.json", record)
    scaler = torch.amp.GradScaler(enabled=amp == torch.float16)
    loss_fn = build_loss(cfg.loss)

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {}
    start_epoch = 0
    if resuming:
        state = load_state(last_path, map_location=device)
        for m, s in zip(models, state["models"], strict=True):
            m.load_state_dict(s)
        for o, s in zip(optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)
        for sc, s in zip(schedulers, state["schedulers"], strict=True):
            sc.load_state_dict(s)
        for e, s in zip(emas, state.get("emas", []), strict=True):
            e.load_state_dict(s)
        if state.get("scaler"):  # fp16's loss scale (else its first steps are skipped again)
            scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        history, best, start_epoch = state["history"], state["best"], state["epoch"]
        _resume_peer_streams(peer_streams, state, cfg, device, start_epoch, last_path)
        if best.get("val_net") == "g":
            # an older bldseg kept the better network each epoch: its rows have val_net
            warnings.warn(
                f"{last_path}: this co-teaching run was started by an older bldseg, which kept "
                f"the better of its two networks each epoch; its best.pt (epoch {best['epoch']}) "
                "is network g's. From here on the run's model is network f: best.pt changes only "
                f"when f scores above {best['val_dice_best']:.4f}. Train it again in a new folder "
                "for a model that is f throughout",
                stacklevel=3,  # fit's caller (through _fit)
            )
        _settle_pending(out, best.get("epoch"))
        if best.get("epoch") is not None:
            _check_best_file(out / "best.pt", best["epoch"], start_epoch)
        print(f"resumed {out} at epoch {start_epoch}", flush=True)

    # The training steps run through torch.compile when asked; the wrappers share the models'
    # parameters, so validation, checkpoints and state dicts use the eager modules.
    steppers = [torch.compile(m, backend=cfg.compile) for m in models] if cfg.compile else models

    status, message = "completed", f"trained {cfg.epochs} epochs"
    for epoch in range(start_epoch, cfg.epochs):
        if stop_after is not None and epoch >= stop_after:
            status, message = "stopped", f"stopped after epoch {epoch} of {cfg.epochs}"
            break
        t0, c0 = time.perf_counter(), time.process_time()
        train_ds.set_epoch(epoch)
        order = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        # The epoch's order drawn here, not by a shuffling sampler: that one draws when its
        # iterator starts, and tqdm starts one iterator more (tqdm.asyncio calls iter() in its
        # constructor), so runs with and without a progress bar trained on other batches.
        # The loader's own generator only seeds workers (crops are keyed by seed, epoch, item).
        loader = DataLoader(
            train_ds,
            batch_size=cfg.batch_size,
            sampler=torch.randperm(len(train_ds), generator=order).tolist(),
            generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch),
            num_workers=cfg.num_workers,
            pin_memory=pin,
            drop_last=drop_last,
        )
        keep = cfg.coteach.keep_ratio(epoch) if cfg.coteach.enabled else 1.0
        tally = DropTally()  # what the selections dropped: R(T) rounds up to whole tiles
        for m in models:
            m.train()
        set_optimizer_mode(optimizers, train=True)
        sums = [0.0] * n_nets
        n_batches = 0
        stepped_lr = _stepped_lr(optimizers[0].param_groups[-1])
        waited = [0.0]  # seconds the loop waited for batches (cropping, augmenting, collating)
        try:
            iterator = loader
            if progress:
                from tqdm.auto import tqdm

                iterator = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
            for batch in _timed(iterator, waited):
                losses = _step_losses(
                    steppers, batch, cfg, loss_fn, keep, device, amp, tally, [None, *peer_streams]
                )
                for k, (loss, m, opt, sch) in enumerate(
                    zip(losses, models, optimizers, schedulers, strict=True)
                ):
                    if not torch.isfinite(loss):
                        raise DivergedError(
                            f"loss of network {k} became {loss.item()} at epoch {epoch + 1}, "
                            f"step {n_batches + 1}; {_divergence_advice(cfg, amp)}"
                        )
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if cfg.optim.grad_clip > 0:
                        scaler.unscale_(opt)
                        clip_grad_norm_(m.parameters(), cfg.optim.grad_clip)
                    scaler.step(opt)
                    if k == 0:  # the LR this step used (read before the schedule moves on)
                        stepped_lr = _stepped_lr(opt.param_groups[-1])
                    sch.step()
                    if emas:
                        emas[k].update(m)
                    sums[k] += loss.item()
                scaler.update()
                n_batches += 1
        except DivergedError as e:
            return _diverged(out, str(e), history, best)

        # Validate every network. A co-teaching run's model is f, whatever g scores: choosing
        # the better of two on validation each epoch is a selection a single network's run
        # does not get, and would bias every comparison with one (carry-forward, compare_noisy).
        set_optimizer_mode(optimizers, train=False)
        val = []
        try:
            _check_finite_weights(
                [(f"network {k}", m) for k, m in enumerate(models)]
                + [(f"network {k} (optim.ema)", e.module) for k, e in enumerate(emas)],
                epoch,
                _divergence_advice(cfg, amp),
            )
            for k, m in enumerate(eval_models):
                # g's on its own stream: each pass over the loader draws its base seed from the
                # global one, which f's next epoch would then draw after
                own = _drawing_from(peer_streams[k - 1], device) if k else nullcontext()
                try:
                    with own:
                        probs = predict_probs(m, val_loader, device, amp, cfg.tta)
                except NonFiniteProbabilitiesError as e:
                    raise DivergedError(f"validation of epoch {epoch + 1}: {e}") from e
                val.append(
                    (
                        threshold_metrics(probs, val_truth, cfg.threshold_lo, cfg.threshold_hi),
                        probs,
                    )
                )
        except DivergedError as e:
            return _diverged(out, str(e), history, best)
        vm, probs = val[0]
        row = {
            "epoch": epoch + 1,
            "train_loss": sums[0] / max(1, n_batches),
            # the LR the epoch's last step used (after it, OneCycle's schedule is read past its
            # end); schedule-free AdamW keeps its base LR and logs the warmed-up one
            "lr": stepped_lr,
            **{f"val_{k}": v for k, v in vm.items()},
            "epoch_s": time.perf_counter() - t0,
            # of which the training loop waited for its batches (mmseg's data_time): with
            # num_workers=0 it is the cropping and augmentation itself; workers overlap it
            "data_s": waited[0],
            # CPU seconds of this process, every torch thread counted (DataLoader workers,
            # num_workers > 0, are other processes and not included).
            "cpu_s": time.process_time() - c0,
        }
        if cfg.coteach.enabled:
            row.update(
                {
                    "keep_ratio": keep,
                    # measured: ceil(R(T) * B) keeps every tile of a small batch early in the
                    # ramp, where keep_ratio still says 0.9
                    "dropped_share": tally.share,
                    "val_dice_best_peer": val[1][0]["dice_best"],
                }
            )
        history.append(row)
        improved = not best or row["val_dice_best"] > best["val_dice_best"]
        if improved:
            # Written under pending names, renamed once last.pt records this epoch as the
            # best: a run killed in between resumes with best.pt and last.pt telling one story.
            best = dict(row)
            _save_atomic(
                {
                    "config": cfg.to_flat(),
                    "model": eval_models[0].state_dict(),
                    "epoch": epoch + 1,
                    "metrics": row,
                    "image_read": image_read,
                    "data_options": data_options,  # how its data was read; None: not known
                    "data_kind": data.kind,  # the synthetic world, or which kind of user data
                    # the precision its validation ran in (`auto` resolved on this device):
                    # what prediction runs in, wherever it runs (predict.as_validated)
                    "amp": precision_name(amp),
                },
                _pending(out, "best.pt", epoch + 1),
            )
            save_val_probs(
                _pending(out, VAL_PROBS_FILE, epoch + 1),
                probs,
                val_truth,
                tiles,
                cache.ids,
                groups,
            )
        _save_atomic(
            {
                "config": cfg.to_flat(),
                "epoch": epoch + 1,
                "history": history,
                "best": best,
                "status": "running",
                "models": [m.state_dict() for m in models],  # the trained weights
                "emas": [e.state_dict() for e in emas],  # their averages (optim.ema)
                "optimizers": [o.state_dict() for o in optimizers],
                # which parameter is in which group (the states above hold only positions)
                "optimizer_groups": optimizer_layout(models[0], optimizers[0]),
                "schedulers": [s.state_dict() for s in schedulers],
                "scaler": scaler.state_dict(),  # {} unless fp16
                "rng": _rng_state(),  # network f's (a single network's) and the data's
                "peer_rng": peer_streams,  # network g's own stream, [] without co-teaching
                "split": split,  # which images trained and which validated
                "image_read": image_read,  # how its images were decoded; None: not known
                "data_options": data_options,  # how its data was found and read (masks too)
                "data_kind": data.kind,
                # which data (masks edited since are refused on a resume: _check_same_data);
                # a resume got here with the same fingerprint or none recorded
                **data_record(cache.fingerprint, cache.content),
            },
            last_path,
        )
        if improved:
            _settle_pending(out, best["epoch"])
        write_json(out / "history.json", history)
        if on_epoch_end is not None:
            on_epoch_end(row, out)
    # Once more after the loop: a run killed between its last last.pt and history.json resumes
    # at its last epoch, where the loop body never runs (last.pt's history is the truth).
    write_json(out / "history.json", history)
    write_json(out / "status.json", {"status": status, "message": message})
    if status == "stopped":  # plots once the run is done
        return FitResult(status, message, history, best, out)
    # The plot shades the range the best epoch's threshold was chosen in.
    lo, hi = cfg.threshold_lo, cfg.threshold_hi
    if best.get("val_thr_widened"):
        lo, hi = metrics.widened_range(lo, hi)
    write_run_plots(out, tiles_from_cache(cache), lo=lo, hi=hi)
    return FitResult(status, message, history, best, out)


def save_val_probs(
    path: Path, probs: np.ndarray, truth: np.ndarray, tiles, ids, groups=None
) -> None:
    """Writes the validation library entry of one model (atomically).

    Arrays: ``probs`` uint8 (N, S, S), ``truth`` uint8 (N, S, S), ``tile_ids`` (N,) str,
    ``image_ids`` (N,) str: the cached sample each tile was read from (plots find its pixels
    by it), ``group_ids`` (N,) str: the sample's split group, i.e. its source scene (the
    ensemble library splits and resamples by it, so tiles cut from one scene stay together),
    ``tile_yx`` (N, 2) int: the tile's top-left corner in its sample.
    """
    groups = ids if groups is None else groups
    # one writer per run folder (as last.pt); np.savez appends .npz to other names
    with atomic_path(path, suffix=".npz", unique=False) as tmp:
        np.savez(
            tmp,
            probs=probs,
            truth=truth.astype(np.uint8),
            tile_ids=np.array([t.tile_id(ids) for t in tiles]),
            image_ids=np.array([ids[t.index] for t in tiles]),
            group_ids=np.array([str(groups[t.index]) for t in tiles]),
            tile_yx=np.array([(t.y, t.x) for t in tiles], dtype=np.int64).reshape(-1, 2),
        )
