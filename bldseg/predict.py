"""Prediction: a model or an ensemble -> probability maps -> the competition's submission CSV.

An ensemble spec is JSON (written by the ensemble search, or by hand)::

    {"members": [{"checkpoint": "runs/a/best.pt", "weight": 1.0}, ...],
     "threshold": 0.43, "min_area": 0, "tta": false}

Members' probabilities are quantised to uint8 exactly as in validation and summed, and the sum
is thresholded at the same integer level the ensemble search chose, so a submission reproduces
the searched ensemble bit for bit. A tile whose predicted area is below ``min_area`` pixels is
written empty (``-1``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from bldseg import metrics
from bldseg.data.cache import DatasetCache
from bldseg.data.dataset import TileDataset, validation_tiles
from bldseg.data.rle import rle_encode
from bldseg.models import create_model
from bldseg.train.augment import build_eval_transform
from bldseg.train.config import RunConfig
from bldseg.train.engine import predict_probs, resolve_device


@dataclass
class EnsembleSpec:
    """Members, weights and decision rule of a submission."""

    checkpoints: list[str]  # best.pt files of the members
    weights: list[float] = field(default_factory=list)  # per member; empty: equal weights
    threshold: float = 0.5  # positive iff (weighted) mean probability >= threshold
    min_area: int = 0  # tiles with fewer predicted pixels are written empty
    tta: bool = False  # flip test-time augmentation

    @classmethod
    def load(cls, path: str | os.PathLike) -> EnsembleSpec:
        """Reads a spec JSON; member paths are relative to the JSON's folder."""
        path = Path(path)
        d = json.loads(path.read_text())
        if "members" not in d or not d["members"]:
            raise ValueError(f"{path}: an ensemble spec needs a non-empty 'members' list")
        ckpts = [str((path.parent / m["checkpoint"]).resolve()) for m in d["members"]]
        weights = [float(m.get("weight", 1.0)) for m in d["members"]]
        return cls(
            ckpts,
            weights,
            float(d.get("threshold", 0.5)),
            int(d.get("min_area", 0)),
            bool(d.get("tta", False)),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Writes the spec JSON atomically."""
        path = Path(path)
        members = [
            {"checkpoint": c, "weight": w}
            for c, w in zip(
                self.checkpoints, self.weights or [1.0] * len(self.checkpoints), strict=True
            )
        ]
        d = {
            "members": members,
            "threshold": self.threshold,
            "min_area": self.min_area,
            "tta": self.tta,
        }
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(d, indent=2))
        os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """A trained model from ``best.pt``: ``(model in eval mode, RunConfig, metrics dict)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{path} is not a bldseg checkpoint (no 'model'/'config' entries)")
    cfg = RunConfig.from_flat(state["config"])
    model = create_model(cfg.model, impl=cfg.impl)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg, state.get("metrics", {})


def image_loader(cache: DatasetCache, batch_size: int = 16) -> DataLoader:
    """Every (square) image of a cache as one normalised tile, in cache order."""
    h, w = cache.image_size
    if h != w:
        raise ValueError(f"{cache.root}: prediction expects square tiles, got {h}x{w}")
    tiles = validation_tiles(cache, range(len(cache)), h)
    return DataLoader(TileDataset(cache, tiles, build_eval_transform()), batch_size=batch_size)


def predict_cache(
    spec: EnsembleSpec,
    cache: DatasetCache,
    *,
    batch_size: int = 16,
    device: str = "auto",
    progress: bool = True,
) -> np.ndarray:
    """Binary predictions (N, H, W) bool for every image of a cache (whole images as tiles)."""
    dev = resolve_device(device)
    loader = image_loader(cache, batch_size)
    weights = spec.weights or [1.0] * len(spec.checkpoints)
    equal = len(set(weights)) == 1
    total = None
    members = tqdm(spec.checkpoints, desc="members", disable=not progress or len(weights) == 1)
    for ckpt, wt in zip(members, weights, strict=True):
        model, _, _ = load_checkpoint(ckpt, dev)
        q = predict_probs(model, loader, dev, tta=spec.tta)  # uint8 (N, H, W)
        if equal:
            total = q.astype(np.uint32) if total is None else total + q
        else:
            total = (q * wt if total is None else total + q * wt).astype(np.float64)
    k = len(weights)
    if equal:
        # the same integer rule as the ensemble search: sum >= L(t) on the 0..255k scale
        pred = total >= metrics.level_from_threshold(spec.threshold, metrics.QUANT_MAX * k)
    else:
        pred = total / (metrics.QUANT_MAX * sum(weights)) >= spec.threshold
    if spec.min_area > 0:
        pred[pred.reshape(len(pred), -1).sum(1) < spec.min_area] = False
    return pred


def write_submission(ids: Sequence[str], pred: np.ndarray, path: str | os.PathLike) -> pd.DataFrame:
    """Writes ``img_id,mask_rle`` (``-1`` for empty) atomically; every id exactly once."""
    if len(ids) != len(pred):
        raise ValueError(f"{len(ids)} ids but {len(pred)} predictions")
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate img_id in the test set")
    df = pd.DataFrame({"img_id": list(ids), "mask_rle": [rle_encode(p) for p in pred]})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return df
