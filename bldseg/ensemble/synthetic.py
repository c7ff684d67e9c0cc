"""Fake model libraries that look like real segmentation outputs, for tests and benchmarks.

A library is N models' uint8 probability maps on T shared tiles. Real maps are confident
almost everywhere (0 or 255), uncertain in a band along building edges, and wrong in
blob-shaped places (a roof missed, a parking lot taken for a building), with errors partly
shared between models trained on the same data. Here:

1. ground truth: axis-aligned rectangles of random size, none on ``empty_fraction`` of the
   tiles; tiles are grouped into source images of ``tiles_per_image`` tiles;
2. a soft truth: the truth box-blurred over ``edge`` pixels (0 inside the background, 1 inside
   a building, in between along edges);
3. model ``m``: ``logit = gain (2 soft - 1) + bias_m + amp_m (sqrt(rho) shared + sqrt(1-rho)
   own_m)`` with smooth (bilinearly upsampled) noise fields, then a sigmoid and quantisation.
   Models differ in bias and noise amplitude, so some are better than others.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bldseg.ensemble.library import CHECKPOINT_FILE, VAL_FILE, ModelLibrary
from bldseg.train.config import RunConfig

__all__ = ["fake_library", "write_checkpoint_stand_in", "write_runs"]

# Tiles generated per torch call: bounds the float32 temporaries (64 x 224^2 x 4 B = 13 MB).
_CHUNK = 64


def _truth(rng: np.random.Generator, n_tiles: int, size: int, empty_fraction: float):
    truth = np.zeros((n_tiles, size, size), dtype=bool)
    for t in range(n_tiles):
        if rng.random() < empty_fraction:
            continue
        for _ in range(1 + rng.poisson(2.5)):
            h, w = rng.integers(max(2, size // 16), max(3, size // 3), size=2)
            y, x = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
            truth[t, y : y + h, x : x + w] = True
    return truth


def _smooth_noise(rng: np.random.Generator, n: int, size: int, cell: int) -> torch.Tensor:
    """(n, size, size) float32 noise with unit std, correlated over ~cell pixels."""
    low = max(2, size // cell + 1)
    z = torch.from_numpy(rng.standard_normal((n, 1, low, low), dtype=np.float32))
    up = F.interpolate(z, size=(size, size), mode="bilinear", align_corners=True)[:, 0]
    return up / up.std().clamp_min(1e-6)


def fake_library(
    n_models: int = 8,
    n_tiles: int = 64,
    size: int = 32,
    *,
    empty_fraction: float = 0.25,
    tiles_per_image: int = 4,
    edge: int = 2,
    gain: float = 7.0,
    noise: float = 2.5,
    rho: float = 0.5,
    seed: int = 0,
) -> ModelLibrary:
    """A synthetic library of N models on T tiles of ``size`` x ``size`` pixels.

    Args:
        n_models: N.
        n_tiles: T.
        size: tile side S.
        empty_fraction: share of tiles without any building.
        tiles_per_image: tiles per source image (the unit of honest splits).
        edge: half-width in pixels of the uncertain band along building edges.
        gain: confidence away from edges (logit at the centre of a building).
        noise: typical amplitude of the smooth logit noise (model errors).
        rho: share of the noise variance common to all models.
        seed: everything is drawn from this seed.

    Returns:
        The library (checkpoints point at ``best.pt`` files that do not exist;
        :func:`write_runs` writes stand-ins holding a run config).
    """
    rng = np.random.default_rng(seed)
    truth = _truth(rng, n_tiles, size, empty_fraction)
    bias = rng.normal(0.0, 1.0, n_models)
    amp = noise * rng.uniform(0.6, 1.4, n_models)
    probs = np.empty((n_models, n_tiles, size, size), dtype=np.uint8)
    cell = max(4, size // 10)
    for s in range(0, n_tiles, _CHUNK):
        tr = torch.from_numpy(truth[s : s + _CHUNK]).float()[:, None]  # (c, 1, S, S)
        soft = F.avg_pool2d(F.pad(tr, (edge,) * 4, mode="replicate"), 2 * edge + 1, stride=1)[
            :, 0
        ]  # (c, S, S) in [0, 1]
        base = gain * (2 * soft - 1)
        shared = _smooth_noise(rng, tr.shape[0], size, cell)
        for m in range(n_models):
            own = _smooth_noise(rng, tr.shape[0], size, cell)
            logit = base + bias[m] + amp[m] * (rho**0.5 * shared + (1 - rho) ** 0.5 * own)
            q = torch.round(torch.sigmoid(logit) * 255).to(torch.uint8)
            probs[m, s : s + _CHUNK] = q.numpy()
    tile_ids = np.array([f"tile{t:05d}" for t in range(n_tiles)])
    image_ids = np.array([f"img{t // tiles_per_image:04d}" for t in range(n_tiles)])
    fake = [Path(f"model{m:02d}") for m in range(n_models)]
    return ModelLibrary(
        names=[p.name for p in fake],
        sources=[p / VAL_FILE for p in fake],
        checkpoints=[p / CHECKPOINT_FILE for p in fake],
        probs=probs,
        truth=truth,
        tile_ids=tile_ids,
        image_ids=image_ids,
    )


def write_runs(
    lib: ModelLibrary,
    root: str | os.PathLike,
    file_name: str = VAL_FILE,
    *,
    config: RunConfig | None = None,
) -> list[Path]:
    """Writes a library as run folders ``root/trial_<m>/<file_name>`` (the training layout).

    Each folder also gets a ``best.pt`` stand-in for the model the fake library does not have:
    a checkpoint as training writes it, with the run config but no weights. It is what the
    ensemble search reads of a member (``bldseg.predict.member_config``: whether its maps were
    flip-averaged), and an ensemble spec chosen from these runs passes ``EnsembleSpec.load``'s
    check that every member file exists; loading it as a model fails. A ``best.pt`` already
    there is kept (one a test wrote, or this one when a test library is written beside).

    Args:
        lib: The library.
        root: Folder of the run folders (created).
        file_name: The npz each run folder gets (``test_probs.npz``: a held-out test library).
        config: The run config of every stand-in (default: ``RunConfig()``, no TTA).

    Returns:
        The run folders, in model order.
    """
    root = Path(root)
    out = []
    tile_yx = np.zeros((lib.n_tiles, 2), dtype=np.int64)
    for m, name in enumerate(lib.names):
        run = root / f"trial_{name}"
        run.mkdir(parents=True, exist_ok=True)
        tmp = run / (Path(file_name).stem + ".tmp.npz")
        np.savez(
            tmp,
            probs=lib.probs[m],
            truth=lib.truth.astype(np.uint8),
            tile_ids=lib.tile_ids,
            image_ids=lib.image_ids,
            tile_yx=tile_yx,
        )
        os.replace(tmp, run / file_name)
        if not (run / CHECKPOINT_FILE).exists():
            write_checkpoint_stand_in(run, config)
        out.append(run)
    return out


def write_checkpoint_stand_in(run: str | os.PathLike, config: RunConfig | None = None) -> Path:
    """Writes ``run/best.pt`` as training writes it, with a run config but no weights.

    What the ensemble search and ``bldseg predict`` read of a member before they load its
    weights (``bldseg.predict.member_config``); loading it as a model fails.

    Args:
        run: The run folder (created).
        config: Its run config (default: ``RunConfig()``, no TTA).

    Returns:
        The checkpoint's path.
    """
    ckpt = Path(run) / CHECKPOINT_FILE
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    tmp = ckpt.with_suffix(".tmp.pt")
    state = {"model": {}, "config": (config or RunConfig()).to_flat(), "metrics": {}}
    torch.save(state, tmp)
    os.replace(tmp, ckpt)
    return ckpt
