"""One training run: the reference workflow's loop as a library call.

    result = fit(RunConfig(epochs=5), "runs/demo")

Per epoch: random crops from the cache through the augmentation pipeline, AdamW with a
per-iteration schedule, optional co-teaching, then validation on fixed tiles with the official
Dice at 0.5, at the best threshold of a sweep and at Youden's threshold. The best epoch's
validation probabilities (uint8, with tile ids and ground truth; the input of the ensemble
search) and its weights are saved; ``last.pt`` makes the run resumable exactly (model,
optimizer, scheduler, epoch, RNG states). A non-finite loss ends the run with status
``"diverged"`` instead of raising.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
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
    split_groups,
    split_indices,
    validation_tiles,
)
from bldseg.data.prepare import PreparedData, prepare_data
from bldseg.models import create_model
from bldseg.train.augment import build_eval_transform, build_train_transform, serialize
from bldseg.train.config import RunConfig
from bldseg.train.coteaching import coteaching_losses
from bldseg.train.losses import build_loss
from bldseg.train.plots import tiles_from_cache, write_run_plots
from bldseg.train.schedulers import build_scheduler

log = logging.getLogger(__name__)

EpochCallback = Callable[[dict[str, Any], Path], None]


@dataclass
class FitResult:
    """Outcome of :func:`fit`.

    Attributes:
        status: "completed", "diverged" or "stopped".
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
    """A loss became NaN or infinite."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting (None: float32, no autocast)."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    return torch.bfloat16


def seed_everything(seed: int) -> None:
    """Seeds Python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002  (global state other libraries draw from)
    torch.manual_seed(seed)


def _layer_id(name: str, depths: list[int]) -> int:
    """Depth index of a backbone parameter for layer-wise LR decay (0 = stem)."""
    parts = name.split(".")
    if parts[0] != "backbone":
        return sum(depths) + 1  # heads: the top
    if parts[1] == "patch_embed":
        return 0
    if parts[1] == "levels":
        lvl = int(parts[2])
        before = sum(depths[:lvl])
        if parts[3] == "blocks":
            return before + int(parts[4]) + 1
        return before + depths[lvl]  # the level's norm/downsample: with its last block
    return sum(depths) + 1


def build_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW with no decay on norms/biases/gammas and optional layer-wise LR decay."""
    o = cfg.optim
    backbone_cfg = getattr(getattr(model, "backbone", None), "cfg", None)
    depths = list(backbone_cfg.depths) if backbone_cfg is not None else [0]
    top = sum(depths) + 1
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = 0.0 if p.ndim <= 1 or name.endswith((".gamma1", ".gamma2")) else o.weight_decay
        scale = o.layer_decay ** (top - _layer_id(name, depths)) if o.layer_decay < 1 else 1.0
        groups.setdefault((wd, scale), []).append(p)
    param_groups = [
        {"params": ps, "weight_decay": wd, "lr": o.lr * scale, "lr_scale": scale}
        for (wd, scale), ps in sorted(groups.items())
    ]
    return torch.optim.AdamW(param_groups, lr=o.lr, betas=(o.beta1, o.beta2))


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    os.replace(tmp, path)


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp: torch.dtype | None = None,
    tta: bool = False,
) -> np.ndarray:
    """Sigmoid probabilities of every tile in ``loader``, quantised: uint8 (N, S, S).

    With ``tta``, the mean of the identity, horizontal-flip and vertical-flip predictions.
    """
    model.eval()
    out = []
    for batch in loader:
        x = batch["image"].to(device, non_blocking=True)  # (B, 3, S, S)
        ctx = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
        with ctx:
            p = torch.sigmoid(model(x).float())  # (B, 1, S, S)
            if tta:
                p = p + torch.sigmoid(model(x.flip(-1)).float()).flip(-1)
                p = p + torch.sigmoid(model(x.flip(-2)).float()).flip(-2)
                p = p / 3
        out.append(p[:, 0].cpu().numpy())
    probs = np.concatenate(out) if out else np.zeros((0, 1, 1), np.float32)
    return metrics.quantise(np.clip(probs, 0.0, 1.0))


def threshold_metrics(
    probs: np.ndarray, truth: np.ndarray, lo: float = 0.3, hi: float = 0.7
) -> dict[str, float]:
    """Official Dice at 0.5, at the best threshold in ``[lo, hi]`` and at Youden's threshold.

    Args:
        probs: uint8 (N, S, S) quantised probabilities.
        truth: (N, S, S) binary ground truth.
        lo: Low end of the sweep.
        hi: High end of the sweep.
    """
    scores = metrics.dice_at_levels(probs, truth)  # (256,)
    level_05 = metrics.level_from_threshold(0.5)
    best_level, best_score = metrics.best_level(scores, metrics.QUANT_MAX, lo, hi)
    try:
        t_youden, _ = metrics.youden_threshold(probs, truth)
    except ValueError:  # no building or no background pixel at all: J is undefined
        t_youden = 0.5
    return {
        "dice_05": float(scores[level_05]),
        "dice_best": float(best_score),
        "thr_best": best_level / metrics.QUANT_MAX,
        "dice_youden": float(scores[metrics.level_from_threshold(t_youden)]),
        "thr_youden": float(t_youden),
    }


def _step_losses(
    models: list[nn.Module],
    batch: dict,
    cfg: RunConfig,
    loss_fn,
    keep_ratio: float,
    device: torch.device,
    amp: torch.dtype | None,
) -> list[torch.Tensor]:
    """One loss per network for this batch (co-teaching swaps the kept samples)."""
    x = batch["image"].to(device, non_blocking=True)  # (B, 3, S, S)
    y = batch["mask"].to(device, non_blocking=True)  # (B, 1, S, S)
    outs = []
    for m in models:
        ctx = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
        with ctx:
            o = m(x)
        if isinstance(o, torch.Tensor):
            o = {"logits": o}
        outs.append({k: v.float() for k, v in o.items()})
    if len(models) == 1:
        o = outs[0]
        loss = loss_fn(o["logits"], y, None).mean()
        if "aux_logits" in o and cfg.aux_weight > 0:
            loss = loss + cfg.aux_weight * loss_fn(o["aux_logits"], y, None).mean()
        return [loss]
    return coteaching_losses(outs, y, loss_fn, keep_ratio, cfg.coteach.granularity, cfg.aux_weight)


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),  # noqa: NPY002
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    random.setstate(state["python"])


def fit(
    cfg: RunConfig,
    out_dir: str | os.PathLike,
    *,
    data: PreparedData | None = None,
    on_epoch_end: EpochCallback | None = None,
    resume: bool = True,
    progress: bool = False,
) -> FitResult:
    """Trains one model (or a co-teaching pair) and validates it every epoch.

    Args:
        cfg: The run config.
        out_dir: Run folder; ``last.pt`` there is resumed from when ``resume``.
        data: Prepared caches; default ``prepare_data(cfg.data)``.
        on_epoch_end: Called after every epoch with the epoch's metrics and ``out_dir`` (after
            the checkpoints are written), e.g. to report to Ray Tune.
        resume: Continue from ``out_dir/last.pt`` if present.
        progress: Show a per-epoch progress bar.

    Returns:
        A :class:`FitResult`; ``status == "diverged"`` when a loss became non-finite.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = data or prepare_data(cfg.data, progress=progress)
    device = resolve_device(cfg.device)
    amp = autocast_dtype(cfg.precision, device)
    seed_everything(cfg.seed)

    cache = data.train
    # By source scene (or the configured group): tiles of one scene never sit on both sides.
    groups = split_groups(cache, cfg.split_group)
    train_idx, val_idx = split_indices(len(cache), cfg.val_fraction, cfg.split_seed, groups)
    crop = cfg.aug.crop_size
    h, w = cache.image_size
    if crop > min(h, w):
        raise ValueError(f"aug.crop_size={crop} is larger than the cached images ({h}x{w})")
    train_tf = build_train_transform(cfg.aug)
    _write_json(out / "augmentation.json", serialize(train_tf))
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
    models, optimizers, schedulers = [], [], []
    steps_per_epoch = math.ceil(len(train_ds) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    for k in range(n_nets):
        torch.manual_seed(cfg.seed + k)  # the two co-teaching networks start differently
        kw = {"impl": cfg.impl}
        if cfg.drop_path_rate is not None:
            kw["drop_path_rate"] = cfg.drop_path_rate
        m = create_model(cfg.model, **kw).to(device)
        if device.type == "cuda":
            m = m.to(memory_format=torch.channels_last)
        opt = build_optimizer(m, cfg)
        sch = build_scheduler(
            cfg.sched.name, opt, total_steps, **cfg.sched.scheduler_kwargs(total_steps)
        )
        models.append(m)
        optimizers.append(opt)
        schedulers.append(sch)
    scaler = torch.amp.GradScaler(enabled=amp == torch.float16)
    loss_fn = build_loss(cfg.loss)

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {}
    start_epoch = 0
    last_path = out / "last.pt"
    if resume and last_path.exists():
        state = torch.load(last_path, map_location=device, weights_only=False)
        if state["config"] != cfg.to_flat():
            raise ValueError(f"{last_path} was written by a different config; use a new out_dir")
        for m, s in zip(models, state["models"], strict=True):
            m.load_state_dict(s)
        for o, s in zip(optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)
        for sc, s in zip(schedulers, state["schedulers"], strict=True):
            sc.load_state_dict(s)
        _set_rng_state(state["rng"])
        history, best, start_epoch = state["history"], state["best"], state["epoch"]
        log.info("resumed %s at epoch %d", out, start_epoch)

    status, message = "completed", f"trained {cfg.epochs} epochs"
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        train_ds.set_epoch(epoch)
        order = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        loader = DataLoader(
            train_ds,
            batch_size=cfg.batch_size,
            shuffle=True,
            generator=order,
            num_workers=cfg.num_workers,
            pin_memory=pin,
            drop_last=False,
        )
        keep = cfg.coteach.keep_ratio(epoch) if cfg.coteach.enabled else 1.0
        for m in models:
            m.train()
        sums = [0.0] * n_nets
        n_batches = 0
        try:
            iterator = loader
            if progress:
                from tqdm.auto import tqdm

                iterator = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
            for batch in iterator:
                losses = _step_losses(models, batch, cfg, loss_fn, keep, device, amp)
                for k, (loss, m, opt, sch) in enumerate(
                    zip(losses, models, optimizers, schedulers, strict=True)
                ):
                    if not torch.isfinite(loss):
                        raise DivergedError(
                            f"loss of network {k} became {loss.item()} at epoch {epoch + 1}, "
                            f"step {n_batches + 1}; lower optim.lr / optim.weight_decay or "
                            "set optim.grad_clip"
                        )
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if cfg.optim.grad_clip > 0:
                        scaler.unscale_(opt)
                        nn.utils.clip_grad_norm_(m.parameters(), cfg.optim.grad_clip)
                    scaler.step(opt)
                    sch.step()
                    sums[k] += loss.item()
                scaler.update()
                n_batches += 1
        except DivergedError as e:
            status, message = "diverged", str(e)
            _write_json(out / "status.json", {"status": status, "message": message})
            return FitResult(status, message, history, best, out)

        # Validate every network; co-teaching keeps the better one (reported as such).
        val = []
        for m in models:
            probs = predict_probs(m, val_loader, device, amp, cfg.tta)
            val.append(
                (threshold_metrics(probs, val_truth, cfg.threshold_lo, cfg.threshold_hi), probs)
            )
        chosen = int(np.argmax([v[0]["dice_best"] for v in val]))
        vm, probs = val[chosen]
        row = {
            "epoch": epoch + 1,
            "train_loss": sums[chosen] / max(1, n_batches),
            "lr": optimizers[0].param_groups[-1]["lr"],
            **{f"val_{k}": v for k, v in vm.items()},
            "epoch_s": time.perf_counter() - t0,
        }
        if cfg.coteach.enabled:
            row.update(
                {
                    "keep_ratio": keep,
                    "val_net": "fg"[chosen],
                    "val_dice_best_other": val[1 - chosen][0]["dice_best"],
                }
            )
        history.append(row)
        if not best or row["val_dice_best"] > best["val_dice_best"]:
            best = dict(row)
            _save_atomic(
                {
                    "config": cfg.to_flat(),
                    "model": models[chosen].state_dict(),
                    "epoch": epoch + 1,
                    "metrics": row,
                },
                out / "best.pt",
            )
            save_val_probs(out / "val_probs.npz", probs, val_truth, tiles, cache.ids)
        _save_atomic(
            {
                "config": cfg.to_flat(),
                "epoch": epoch + 1,
                "history": history,
                "best": best,
                "status": "running",
                "models": [m.state_dict() for m in models],
                "optimizers": [o.state_dict() for o in optimizers],
                "schedulers": [s.state_dict() for s in schedulers],
                "rng": _rng_state(),
            },
            last_path,
        )
        _write_json(out / "history.json", history)
        if on_epoch_end is not None:
            on_epoch_end(row, out)
    _write_json(out / "status.json", {"status": status, "message": message})
    write_run_plots(out, tiles_from_cache(cache), lo=cfg.threshold_lo, hi=cfg.threshold_hi)
    return FitResult(status, message, history, best, out)


def save_val_probs(path: Path, probs: np.ndarray, truth: np.ndarray, tiles, ids) -> None:
    """Writes the validation library entry of one model (atomically).

    Arrays: ``probs`` uint8 (N, S, S), ``truth`` uint8 (N, S, S), ``tile_ids`` (N,) str,
    ``image_ids`` (N,) str: the source image of each tile (for splits by source image),
    ``tile_yx`` (N, 2) int: the tile's top-left corner in its source image.
    """
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(
        tmp,
        probs=probs,
        truth=truth.astype(np.uint8),
        tile_ids=np.array([t.tile_id(ids) for t in tiles]),
        image_ids=np.array([ids[t.index] for t in tiles]),
        tile_yx=np.array([(t.y, t.x) for t in tiles], dtype=np.int64).reshape(-1, 2),
    )
    os.replace(tmp, path)
