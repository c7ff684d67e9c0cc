"""The built-in synthetic world: satellite-like scenes with buildings, in the competition layout.

Demos, tests and benchmarks run on this world, so it has to look like aerial imagery at about
0.5 m/pixel and must not be solvable by a colour threshold. A scene is built in layers:

1. ground: land-cover classes (forest, grass, dry grass, soil, pavement) blended by
   multi-octave value noise, each with its own texture; farm fields in rural areas;
2. roads: straight-ish polylines on a rotated grid, asphalt/concrete/dirt, sidewalks, dashed
   markings, cars;
3. distractors that are NOT buildings: parking lots, concrete pads, pools, sports courts,
   greenhouses;
4. shadows of buildings (and greenhouses) in one sun direction per scene;
5. buildings: rectangles, L-shapes, courtyard rings, sheds, apartment blocks, industrial
   halls; hip/gable/flat roofs shaded by the sun, roof colours grey, red, blue, green, white,
   brown and some copied from the ground around them;
6. trees (with their shadows), some of them hiding roof edges (the mask keeps the footprint);
7. sensor: exposure, colour cast, haze, blur, noise.

``generate_world`` writes train scenes, test tiles cut from other scenes, the CSVs and the
held-out truth; ``corrupt_mask`` imitates wrong ground truth (missing buildings, shifted,
dilated, eroded or empty masks) on a chosen share of the training images.

Every image has its own random stream keyed by ``(seed, split, index)``, so image ``i`` does
not depend on how many images are generated and generation can run in parallel.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import cv2
import numpy as np
import pandas as pd

from bldseg.data.rle import EMPTY_RLE, rle_encode
from bldseg.io import file_lock

__all__ = [
    "BUILDING_SIZES",
    "FORMAT_VERSION",
    "NOISE_KINDS",
    "SyntheticScene",
    "SyntheticWorld",
    "corrupt_mask",
    "generate_scene",
    "generate_world",
    "is_world",
]

#: Bumped whenever the generator's output changes, so an old world on disk is not mistaken for
#: a current one (the version is part of the parameters compared by ``generate_world``).
FORMAT_VERSION = 2

NoiseKind = Literal["missing", "shift", "dilate", "erode", "empty"]
#: Kinds of label noise, in the order ``corrupt_mask`` documents them.
NOISE_KINDS: tuple[str, ...] = ("missing", "shift", "dilate", "erode", "empty")

# Stream keys: each image draws from SeedSequence([seed, split, index]).
_TRAIN, _TEST, _NOISE_PICK, _NOISE_APPLY = 0, 1, 2, 3
# Sub-pixel precision for cv2 polygon filling (coordinates are multiplied by 2**_SUB).
_SUB = 3
# Metres per pixel: converts building heights (m) into shadow lengths (px).
_GSD = 0.5
_WORLD_JSON = "world.json"
_K = TypeVar("_K")
# Written first, removed never: marks a folder as ours, so a half-written world (marker but
# no world.json) may be regenerated in place, while a folder of someone else's data may not.
_MARKER = ".bldseg_synthetic"


# --------------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------------


@dataclass
class SyntheticScene:
    """One generated scene and its clean ground truth."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    mask: np.ndarray  # (H, W) uint8 in {0, 1}: building footprints, including occluded parts
    instances: np.ndarray  # (H, W) int32: 0 background, k > 0 building k (label noise drops some)
    kinds: tuple[str, ...] = ()  # kind of building k at kinds[k - 1] (keys of BUILDING_SIZES)


@dataclass
class SyntheticWorld:
    """Paths of a generated world (the competition layout) and the parameters that made it."""

    root: Path  # the world folder
    train_csv: Path  # img_id,img_path,mask_rle: the masks training sees (noisy if noise is on)
    train_clean_csv: Path  # same columns, clean masks for honest evaluation
    train_noise_csv: Path  # img_id,noise: the noise kind applied to each image, or "none"
    test_csv: Path  # img_id,img_path
    test_truth_csv: Path  # img_id,mask_rle,height,width: held-out truth of the test tiles
    sample_submission_csv: Path  # img_id,mask_rle with every mask "-1"
    params: dict[str, Any] = field(default_factory=dict)  # what world.json records

    @classmethod
    def at(cls, root: str | os.PathLike, params: dict[str, Any] | None = None) -> SyntheticWorld:
        """The paths of a world rooted at ``root`` (nothing is read or checked)."""
        root = Path(root)
        return cls(
            root=root,
            train_csv=root / "train.csv",
            train_clean_csv=root / "train_clean.csv",
            train_noise_csv=root / "train_noise.csv",
            test_csv=root / "test.csv",
            test_truth_csv=root / "test_truth.csv",
            sample_submission_csv=root / "sample_submission.csv",
            params=dict(params or {}),
        )


@dataclass
class _Building:
    contours: list[np.ndarray]  # (N, 2) float64 x, y image coordinates; outer ring, then holes
    kind: str  # house / apartment / l_shape / courtyard / shed / industrial
    height_m: float  # height above ground, sets the shadow length
    roof: str  # "flat", "gable" or "hip"
    colour: np.ndarray  # (3,) RGB in [0, 1] before shading
    angle: float  # long-axis direction (radians): the ridge of a gable roof runs along it
    center: np.ndarray  # (2,) x, y
    depth: float  # extent across the long axis (px): where a gable's ridge sits


@dataclass
class _Flat:
    contours: list[np.ndarray]  # (N, 2) x, y; outer ring only
    kind: str  # parking / pad / pool / court / greenhouse / field
    angle: float  # long-axis direction (radians), for stripes and stall lines
    colour: np.ndarray  # (3,) RGB base colour
    height_m: float = 0.0  # greenhouses cast a short shadow; the rest lie flat


@dataclass
class _Style:
    archetype: str  # dense / suburban / rural / industrial / empty
    sun_azimuth: float  # direction the light comes FROM (radians, image x right, y down)
    sun_elevation: float  # radians above the horizon: shadows are height / tan(elevation) long
    shadow_strength: float  # fraction of light left in shadow
    grid_angle: float  # dominant orientation of roads and buildings (radians)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _fbm(rng: np.random.Generator, h: int, w: int, cell: float, octaves: int = 3) -> np.ndarray:
    """Multi-octave value noise, standardised to zero mean and unit std.

    Args:
        rng: Random stream.
        h: Output height.
        w: Output width.
        cell: Size (px) of the coarsest lattice cell; each octave halves it.
        octaves: Number of octaves, amplitude halving each time.

    Returns:
        (h, w) float32 noise.
    """
    out = np.zeros((h, w), np.float32)
    amp = 1.0
    for o in range(octaves):
        c = max(cell / 2**o, 1.0)
        # A lattice of ~c px cells stretched straight onto the output: no pixel is wasted.
        grid = rng.random((int(h / c) + 2, int(w / c) + 2), dtype=np.float32)
        out += amp * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
        amp *= 0.5
    out -= out.mean()
    out /= out.std() + 1e-6
    return out


def _rot(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def _place(local: list[np.ndarray], center: np.ndarray, angle: float) -> list[np.ndarray]:
    # local (N, 2) shapes around the origin, x along the long axis -> image coordinates.
    r = _rot(angle)
    return [p @ r.T + center for p in local]


def _rect(length: float, depth: float) -> np.ndarray:
    a, b = length / 2, depth / 2
    return np.array([[-a, -b], [a, -b], [a, b], [-a, b]], dtype=np.float64)


def _bbox(
    contours: list[np.ndarray], h: int, w: int, pad: int = 0
) -> tuple[int, int, int, int] | None:
    # (y0, y1, x0, x1) of the contours' pixels clipped to the image, or None when outside.
    pts = np.concatenate(contours)
    x0 = max(int(np.floor(pts[:, 0].min())) - pad, 0)
    x1 = min(int(np.ceil(pts[:, 0].max())) + 1 + pad, w)
    y0 = max(int(np.floor(pts[:, 1].min())) - pad, 0)
    y1 = min(int(np.ceil(pts[:, 1].max())) + 1 + pad, h)
    if x1 <= x0 or y1 <= y0:
        return None
    return y0, y1, x0, x1


def _raster(contours: list[np.ndarray], bb: tuple[int, int, int, int]) -> np.ndarray:
    """(y1-y0, x1-x0) uint8 {0,1} raster of the outer ring minus the holes, inside ``bb``."""
    y0, y1, x0, x1 = bb
    out = np.zeros((y1 - y0, x1 - x0), np.uint8)
    # Pixel (i, j) covers [j, j+1) x [i, i+1); shift by half a pixel to sample its centre.
    pts = [
        np.round((c - (x0 - 0.5, y0 - 0.5)) * (1 << _SUB) - 0.5).astype(np.int32) for c in contours
    ]
    cv2.fillPoly(out, pts[:1], 1, lineType=cv2.LINE_8, shift=_SUB)
    if len(pts) > 1:
        cv2.fillPoly(out, pts[1:], 0, lineType=cv2.LINE_8, shift=_SUB)
    return out


def _fill_full(canvas: np.ndarray, contours: list[np.ndarray], value: int | float = 1) -> None:
    pts = [np.round((c + 0.5) * (1 << _SUB) - 0.5).astype(np.int32) for c in contours]
    cv2.fillPoly(canvas, pts[:1], value, lineType=cv2.LINE_8, shift=_SUB)
    if len(pts) > 1:
        cv2.fillPoly(canvas, pts[1:], 0, lineType=cv2.LINE_8, shift=_SUB)


def _sweep(canvas: np.ndarray, contours: list[np.ndarray], d: np.ndarray) -> None:
    """Fills the region swept by moving ``contours`` along vector ``d`` (their shadow)."""
    # Exact Minkowski sum with the segment [0, d]: the shape moved by d plus a parallelogram
    # per edge; any point of the sweep lies in one of them (see the module tests).
    s = 1 << _SUB
    for c in contours:
        nxt = np.roll(c, -1, axis=0)
        quads = np.stack([c, nxt, nxt + d, c + d], axis=1)  # (N, 4, 2)
        for q in np.round((quads + 0.5) * s - 0.5).astype(np.int32):
            cv2.fillConvexPoly(canvas, q, 1, lineType=cv2.LINE_8, shift=_SUB)
    _fill_full(canvas, [c + d for c in contours], 1)


def _pick(rng: np.random.Generator, table: dict[_K, float]) -> _K:
    # Weighted choice over a handful of keys; a Python scan is ~10x cheaper than
    # rng.choice(p=...), and this runs thousands of times per 1024 scene.
    r = rng.random() * sum(table.values())
    for key, weight in table.items():
        r -= weight
        if r < 0:
            return key
    return key


def _jitter(rng: np.random.Generator, colour: tuple[float, ...], amount: float) -> np.ndarray:
    c = np.asarray(colour, np.float32)
    # A common brightness change plus a smaller per-channel one: keeps hues recognisable.
    c = c * rng.uniform(1 - amount, 1 + amount) * rng.uniform(1 - amount / 3, 1 + amount / 3, 3)
    return np.clip(c, 0.02, 0.98).astype(np.float32)


def _lambert(hgt: np.ndarray, light: np.ndarray) -> np.ndarray:
    # Brightness of a height field lit from `light` (unit 3-vector towards the sun), relative
    # to flat ground: 1 on flat parts, > 1 on faces turned to the sun.
    gy, gx = np.gradient(hgt)
    norm = np.sqrt(gx * gx + gy * gy + 1.0)
    dot = (-gx * light[0] - gy * light[1] + light[2]) / norm
    return np.clip(dot / light[2], 0.35, 1.6).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Scene planning
# --------------------------------------------------------------------------------------------

# Land-cover palettes (RGB in [0, 1]) and texture amplitudes (fine, medium): forest canopy is
# clumpy, pavement smooth.
_GROUND = {
    "forest": ((0.16, 0.22, 0.13), 0.30, 0.18),
    "grass": ((0.34, 0.41, 0.24), 0.08, 0.12),
    "dry": ((0.50, 0.48, 0.36), 0.07, 0.12),
    "soil": ((0.52, 0.43, 0.34), 0.09, 0.14),
    "paved": ((0.47, 0.46, 0.44), 0.05, 0.08),
}
# Archetype -> (probability in train, urban-field bias, building-kind mix).
_ARCHETYPES: dict[str, tuple[float, float, dict[str, float]]] = {
    "dense": (
        0.30,
        1.6,
        {"house": 30, "apartment": 25, "l_shape": 15, "courtyard": 10, "shed": 6, "industrial": 8},
    ),
    "suburban": (0.35, 0.6, {"house": 60, "l_shape": 20, "shed": 10, "apartment": 5}),
    "rural": (0.20, -0.6, {"house": 50, "shed": 20, "l_shape": 15, "industrial": 8}),
    "industrial": (0.15, 1.0, {"industrial": 45, "house": 15, "shed": 12, "apartment": 15}),
}
# Roof colours (RGB) and weights; "ground" copies the ground under the building.
_ROOFS: dict[str, tuple[tuple[float, float, float] | None, float]] = {
    "grey": ((0.55, 0.55, 0.54), 2.0),
    "dark": ((0.31, 0.32, 0.34), 1.5),
    "red": ((0.60, 0.31, 0.25), 2.0),
    "blue": ((0.30, 0.45, 0.60), 2.0),
    "green": ((0.33, 0.50, 0.40), 1.5),
    "white": ((0.86, 0.86, 0.84), 1.5),
    "brown": ((0.44, 0.34, 0.27), 1.5),
    "beige": ((0.68, 0.63, 0.52), 1.0),
    "ground": (None, 0.8),
}


def _style(rng: np.random.Generator, allow_empty: bool) -> _Style:
    arche = _pick(rng, {k: v[0] for k, v in _ARCHETYPES.items()})
    if allow_empty and rng.random() < 0.05:
        arche = "empty"
    return _Style(
        archetype=arche,
        sun_azimuth=float(rng.uniform(0, 2 * math.pi)),
        sun_elevation=float(np.deg2rad(rng.uniform(35, 68))),
        shadow_strength=float(rng.uniform(0.38, 0.58)),
        grid_angle=float(rng.uniform(0, math.pi)),
    )


def _render_ground(
    rng: np.random.Generator, urban: np.ndarray, fine: np.ndarray, med: np.ndarray
) -> np.ndarray:
    """(h, w, 3) float32 ground colour from blended land-cover classes."""
    h, w = urban.shape
    names = list(_GROUND)
    # Class weights vary over tens of pixels: computed at 1/4 resolution, then upsampled.
    hs, ws = max(h // 4, 4), max(w // 4, 4)
    u = cv2.resize(urban, (ws, hs), interpolation=cv2.INTER_AREA)
    # Urban areas are paved with lawns; the countryside forest, soil and dry grass.
    bias = {
        "forest": 1.2 * (1 - u) - 0.3,
        "grass": np.full_like(u, 0.4),
        "dry": 0.3 * (1 - u),
        "soil": 0.4 * (1 - u) - 0.2,
        "paved": 1.4 * u - 0.6,
    }
    ragged = 0.35 * _fbm(rng, hs, ws, 3, 2)
    logits = np.stack(
        [_fbm(rng, hs, ws, rng.uniform(15, 45), 3) + ragged + 2.2 * bias[n] for n in names], -1
    )
    logits *= 3.0  # sharpness of class boundaries
    logits -= logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)
    weights /= weights.sum(axis=-1, keepdims=True)  # (hs, ws, K)
    weights = cv2.resize(weights, (w, h), interpolation=cv2.INTER_LINEAR)  # (h, w, K)
    # sum_k w_k col_k (1 + a_k fine + b_k med), as three (h, w, 3) maps.
    cols = np.stack([_jitter(rng, _GROUND[n][0], 0.12) for n in names])  # (K, 3)
    a_fine = np.array([_GROUND[n][1] for n in names], np.float32)[:, None]
    a_med = np.array([_GROUND[n][2] for n in names], np.float32)[:, None]
    base = weights @ cols
    img = (
        base
        + fine[..., None] * (weights @ (a_fine * cols))
        + med[..., None] * (weights @ (a_med * cols))
    )
    return img.astype(np.float32)


def _road_polylines(
    rng: np.random.Generator, h: int, w: int, st: _Style
) -> list[tuple[np.ndarray, float, str]]:
    """Roads as (points (N, 2) x/y, width px, surface) on a rotated, thinned grid."""
    spacing_by = {"dense": (55, 100), "suburban": (70, 130), "industrial": (90, 160)}
    spacing_by |= {"rural": (120, 260), "empty": (200, 400)}
    lo, hi = spacing_by[st.archetype]
    diag = math.hypot(h, w)
    centre = np.array([w / 2, h / 2])
    roads: list[tuple[np.ndarray, float, str]] = []
    for fam in range(2):
        ang = st.grid_angle + fam * math.pi / 2 + rng.normal(0, 0.03)
        d = np.array([math.cos(ang), math.sin(ang)])
        n = np.array([-d[1], d[0]])
        spacing = rng.uniform(lo, hi)
        off = rng.uniform(-spacing, 0) - diag / 2
        keep = {"rural": 0.45, "empty": 0.3}.get(st.archetype, 0.8)
        while off < diag / 2:
            off += spacing * rng.uniform(0.8, 1.2)
            if rng.random() > keep:
                continue
            # Some roads end (cul-de-sacs); points every ~30 px with a small lateral wobble.
            t0 = -diag / 2 if rng.random() < 0.7 else rng.uniform(-diag / 2, 0)
            t1 = diag / 2 if rng.random() < 0.7 else rng.uniform(0, diag / 2)
            ts = np.arange(t0, t1, 30.0)
            if len(ts) < 2:
                continue
            wob = np.cumsum(rng.normal(0, 0.6, len(ts)))
            pts = centre + off * n + ts[:, None] * d + wob[:, None] * n
            width = float(rng.choice([5, 6, 8, 10, 12, 16], p=[0.1, 0.2, 0.25, 0.2, 0.15, 0.1]))
            if st.archetype in ("rural", "empty"):
                surface = "dirt" if rng.random() < 0.4 else "asphalt"
                width = min(width, 10.0)
            else:
                surface = "concrete" if rng.random() < 0.2 else "asphalt"
            roads.append((pts, width, surface))
    return roads


#: Footprint sizes (px at 0.5 m/px) of each building kind, before the scene's size cap:
#: (length range, depth range, height range in metres). Length runs along the long axis. Houses
#: are 10-20 m (20-40 px) long, apartment blocks and halls 25-90 m (50-180 px), sheds and
#: garages 4-7 m; the test in tests/data checks that generated footprints keep to these.
BUILDING_SIZES: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "shed": ((8, 14), (6, 11), (2.0, 3.5)),
    "house": ((20, 40), (16, 30), (5.0, 9.0)),
    "l_shape": ((30, 60), (26, 46), (6.0, 14.0)),
    "apartment": ((50, 120), (22, 36), (15.0, 40.0)),
    "courtyard": ((56, 110), (50, 90), (10.0, 22.0)),
    "industrial": ((60, 180), (40, 100), (6.0, 12.0)),
}


def _building_shape(
    rng: np.random.Generator, kind: str, cap: float
) -> tuple[list[np.ndarray], float, float]:
    """Local contours (x along the long axis), height (m) and depth (px) of one building."""
    if kind not in BUILDING_SIZES:
        raise ValueError(f"unknown building kind {kind!r}")
    (l0, l1), (d0, d1), (h0, h1) = BUILDING_SIZES[kind]
    # A square-ish footprint keeps its long axis: depth never exceeds length.
    length = float(min(rng.uniform(l0, l1), cap))
    depth = float(min(rng.uniform(d0, d1), cap, length))
    height = float(rng.uniform(h0, h1))
    if kind == "l_shape":
        cw, ch = length * rng.uniform(0.35, 0.6), depth * rng.uniform(0.35, 0.6)
        a, b = length / 2, depth / 2
        poly = np.array(
            [[-a + cw, -b], [a, -b], [a, b], [-a, b], [-a, -b + ch], [-a + cw, -b + ch]]
        )
        poly *= rng.choice([-1, 1], size=2)  # which corner is cut
        return [poly], height, depth
    if kind == "courtyard":
        ring = min(rng.uniform(10, 18), depth / 3, length / 3)
        inner = _rect(length - 2 * ring, depth - 2 * ring)
        return [_rect(length, depth), inner], height, ring * 2
    return [_rect(length, depth)], height, depth


def _roof_colour(rng: np.random.Generator, ground: np.ndarray, centre: np.ndarray) -> np.ndarray:
    name = _pick(rng, {k: v[1] for k, v in _ROOFS.items()})
    base = _ROOFS[name][0]
    if base is None:
        # Close to the surrounding ground: the hardest roofs to see, as in real imagery.
        h, w = ground.shape[:2]
        x = int(np.clip(centre[0], 0, w - 1))
        y = int(np.clip(centre[1], 0, h - 1))
        return _jitter(rng, tuple(ground[y, x] * rng.uniform(0.9, 1.15)), 0.06)
    return _jitter(rng, base, 0.12)


def _try_occupy(
    occ: np.ndarray, contours: list[np.ndarray], gap: int, min_inside: float = 0.5
) -> bool:
    """Claims the outer ring (+gap px) in ``occ`` if it is free and mostly inside the image."""
    h, w = occ.shape
    outer = contours[:1]
    bb = _bbox(outer, h, w, pad=gap)
    if bb is None:
        return False
    m = _raster(outer, bb)
    area = cv2.contourArea(outer[0].astype(np.float32))
    if m.sum() < min_inside * area or m.sum() < 12:
        return False
    if gap:
        m = cv2.dilate(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * gap + 1,) * 2))
    y0, y1, x0, x1 = bb
    if (occ[y0:y1, x0:x1] & m).any():
        return False
    occ[y0:y1, x0:x1] |= m
    return True


def _plan_buildings(
    rng: np.random.Generator,
    st: _Style,
    urban: np.ndarray,
    occ: np.ndarray,
    roads: list[tuple[np.ndarray, float, str]],
    ground: np.ndarray,
    min_buildings: int,
) -> list[_Building]:
    h, w = occ.shape
    if st.archetype == "empty" and min_buildings == 0:
        return []
    mix = _ARCHETYPES["suburban" if st.archetype == "empty" else st.archetype][2]
    cap = 0.45 * min(h, w)
    out: list[_Building] = []

    def attempt(
        center: np.ndarray,
        angle: float,
        kind: str | None,
        force: bool = False,
        facing: tuple[np.ndarray, float] | None = None,
    ) -> bool:
        # facing = (unit normal away from the road, road half-width + front yard in px):
        # `center` is then a point on the road and the building stands its half-depth further.
        if facing is None:
            # Cheap rejections first (taken spot, countryside), then the shape and the raster.
            x, y = min(max(int(center[0]), 0), w - 1), min(max(int(center[1]), 0), h - 1)
            if not force and (occ[y, x] or rng.random() > urban[y, x]):
                return False
        kind = kind or _pick(rng, mix)
        local, height, depth = _building_shape(rng, kind, cap)
        if facing is not None:
            normal, verge = facing
            center = center + normal * (verge + np.abs(local[0][:, 1]).max())
            x, y = min(max(int(center[0]), 0), w - 1), min(max(int(center[1]), 0), h - 1)
            if occ[y, x] or rng.random() > urban[y, x]:
                return False
        if rng.random() < 0.15:
            angle += rng.normal(0, 0.08)  # not every building is square to the street
        contours = _place(local, center, angle)
        if not _try_occupy(occ, contours, gap=int(rng.integers(2, 5))):
            return False
        if kind in ("apartment", "industrial"):
            roof = "flat" if rng.random() < 0.8 else "gable"
        elif kind == "courtyard":
            roof = "flat" if rng.random() < 0.6 else "hip"
        elif kind == "l_shape":
            roof = "hip" if rng.random() < 0.65 else "flat"
        else:
            r = rng.random()
            roof = "gable" if r < 0.5 else ("hip" if r < 0.75 else "flat")
        out.append(
            _Building(
                contours=contours,
                kind=kind,
                height_m=float(height),
                roof=roof,
                colour=_roof_colour(rng, ground, center),
                angle=angle,
                center=np.asarray(center, np.float64),
                depth=float(depth),
            )
        )
        return True

    # 1. Along the roads, facing them, set back a few metres on both sides.
    for pts, width, _ in roads:
        seg = np.diff(pts, axis=0)
        seg_len = np.hypot(seg[:, 0], seg[:, 1])
        cum = np.concatenate([[0], np.cumsum(seg_len)])
        t = rng.uniform(0, 20)
        while t < cum[-1]:
            i = min(int(np.searchsorted(cum, t, side="right")) - 1, len(seg) - 1)
            d = seg[i] / max(seg_len[i], 1e-6)
            n = np.array([-d[1], d[0]])
            p = pts[i] + d * (t - cum[i])
            for side in (-1, 1):
                # A front yard of 2-6 m between the kerb (or sidewalk) and the wall.
                verge = width / 2 + rng.uniform(4, 12)
                attempt(p, math.atan2(d[1], d[0]), None, facing=(side * n, verge))
            t += rng.uniform(12, 30)

    # 2. Inside the blocks, aligned with the street grid (a second row, backyards, halls).
    n_free = int(h * w / 600 * (1.0 if st.archetype != "rural" else 0.5))
    for _ in range(n_free):
        center = rng.uniform((0, 0), (w, h))
        angle = st.grid_angle + (math.pi / 2 if rng.random() < 0.5 else 0.0)
        if rng.random() < 0.08:
            angle = rng.uniform(0, math.pi)
        attempt(center, angle, None)

    # 3. Training images always hold a building (as in the competition); force some in.
    tries = 0
    while len(out) < min_buildings and tries < 400:
        tries += 1
        center = rng.uniform((0.15 * w, 0.15 * h), (0.85 * w, 0.85 * h))
        kind = "house" if tries < 200 else "shed"
        attempt(center, st.grid_angle, kind, force=True)
    return out


def _plan_flats(
    rng: np.random.Generator,
    st: _Style,
    urban: np.ndarray,
    occ: np.ndarray,
) -> list[_Flat]:
    """Things that look like roofs but are not buildings (parking, pads, pools, courts...)."""
    h, w = occ.shape
    area = h * w / 256**2
    urbanness = float(urban.mean())
    kinds = {
        "parking": 1.2 * urbanness,
        "pad": 1.0,
        "pool": 0.8 * urbanness,
        "court": 0.4 * urbanness,
        "greenhouse": 1.2 * (1 - urbanness),
    }
    n = rng.poisson(4.0 * area)
    out: list[_Flat] = []
    for _ in range(n):
        kind = _pick(rng, kinds)
        angle = st.grid_angle + (math.pi / 2 if rng.random() < 0.5 else 0.0)
        angle += rng.normal(0, 0.05)
        height = 0.0
        if kind == "parking":
            local = _rect(rng.uniform(30, 80), rng.uniform(22, 46))
            colour = _jitter(
                rng, (0.36, 0.36, 0.37) if rng.random() < 0.6 else (0.6, 0.6, 0.58), 0.1
            )
        elif kind == "pad":
            local = _rect(rng.uniform(12, 50), rng.uniform(10, 35))
            base = (0.66, 0.65, 0.62) if rng.random() < 0.6 else (0.55, 0.50, 0.43)
            colour = _jitter(rng, base, 0.12)
        elif kind == "pool":
            local = _rect(rng.uniform(10, 24), rng.uniform(6, 13))
            colour = _jitter(rng, (0.22, 0.58, 0.72), 0.1)
        elif kind == "court":
            local = _rect(rng.uniform(42, 52), rng.uniform(20, 26))
            base = [(0.25, 0.48, 0.35), (0.58, 0.32, 0.26), (0.27, 0.40, 0.58)][rng.integers(3)]
            colour = _jitter(rng, base, 0.08)
        else:  # greenhouse: plastic tunnels, bright, ribbed, low
            local = _rect(rng.uniform(35, 90), rng.uniform(9, 15))
            colour = _jitter(rng, (0.80, 0.82, 0.80), 0.08)
            height = float(rng.uniform(2.5, 4))
        center = rng.uniform((0, 0), (w, h))
        contours = _place([local], center, angle)
        if _try_occupy(occ, contours, gap=2, min_inside=0.3):
            out.append(_Flat(contours, kind, angle, colour, height))
    return out


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _paint(img: np.ndarray, m: np.ndarray, bb: tuple[int, int, int, int], col: np.ndarray) -> None:
    y0, y1, x0, x1 = bb
    patch = img[y0:y1, x0:x1]
    patch[m.astype(bool)] = col[m.astype(bool)] if col.ndim == 3 else col


def _stripes(bb: tuple[int, int, int, int], angle: float, period: float) -> np.ndarray:
    # (y1-y0, x1-x0) in [-1, 1]: stripes running along `angle`, `period` px apart.
    y0, y1, x0, x1 = bb
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    v = -xs * math.sin(angle) + ys * math.cos(angle)
    return np.sin(2 * math.pi * v / period)


def _render_flat(rng: np.random.Generator, img: np.ndarray, f: _Flat, fine: np.ndarray) -> None:
    h, w = img.shape[:2]
    bb = _bbox(f.contours, h, w, pad=1)
    if bb is None:
        return
    y0, y1, x0, x1 = bb
    m = _raster(f.contours, bb)
    if not m.any():
        return
    tex = 1 + 0.04 * fine[y0:y1, x0:x1, None]
    col = np.broadcast_to(f.colour, (y1 - y0, x1 - x0, 3)) * tex
    if f.kind == "greenhouse":
        ribs = _stripes(bb, f.angle + math.pi / 2, 3.0)
        col = col * (1 + 0.08 * ribs[..., None])
    elif f.kind == "pad":
        # Poured concrete: expansion joints on a 3-5 m grid, darker hairlines in both directions.
        period = rng.uniform(6, 10)
        joints = (_stripes(bb, f.angle, period) > 0.93) | (
            _stripes(bb, f.angle + math.pi / 2, period) > 0.93
        )
        col = col * np.where(joints, 0.85, 1.0)[..., None]
    _paint(img, m, bb, col.astype(np.float32))
    dt = cv2.distanceTransform(m, cv2.DIST_L2, 3)
    if f.kind == "pool":
        rim = (dt > 0) & (dt <= 1.5)
        img[y0:y1, x0:x1][rim] = (0.85, 0.85, 0.82)
    elif f.kind == "court":
        line = (dt > 2) & (dt <= 3)
        img[y0:y1, x0:x1][line] = (0.9, 0.9, 0.9)
        # Centre line across the long axis.
        c = f.contours[0].mean(axis=0)
        d = np.array([-math.sin(f.angle), math.cos(f.angle)]) * 10
        cv2.line(
            img,
            tuple(np.round(c - d).astype(int)),
            tuple(np.round(c + d).astype(int)),
            (0.9, 0.9, 0.9),
            1,
        )
    elif f.kind == "parking":
        # Stall lines every ~5.5 px across two rows, cars in some stalls.
        inner = dt > 2
        stalls = (_stripes(bb, f.angle + math.pi / 2, 5.5) > 0.85) & inner
        img[y0:y1, x0:x1][stalls] = (0.82, 0.82, 0.8)
        pts = np.argwhere(inner)
        if len(pts):
            r = _rot(f.angle)
            for _ in range(int(rng.poisson(len(pts) / 120))):
                py, px = pts[rng.integers(len(pts))]
                car = _rect(8, 4) @ r.T + (px + x0, py + y0)
                car_col = _jitter(rng, _car_colour(rng), 0.1)
                _fill_full(img, [car], tuple(float(v) for v in car_col))


# Car paint (RGB) and how common it is: white, black, silver, red, blue.
_CARS = {
    (0.9, 0.9, 0.9): 0.35,
    (0.1, 0.1, 0.12): 0.25,
    (0.6, 0.6, 0.62): 0.2,
    (0.55, 0.12, 0.1): 0.1,
    (0.15, 0.25, 0.5): 0.1,
}


def _car_colour(rng: np.random.Generator) -> tuple[float, float, float]:
    return _pick(rng, _CARS)


def _render_roads(
    rng: np.random.Generator,
    img: np.ndarray,
    roads: list[tuple[np.ndarray, float, str]],
    fine: np.ndarray,
    med: np.ndarray,
    st: _Style,
) -> np.ndarray:
    """Draws roads onto ``img``; returns their (h, w) uint8 mask."""
    h, w = img.shape[:2]
    roads = roads[:120]  # ids 2i+1 (sidewalk) and 2i+2 (lane) must fit in uint8
    colours = {
        "asphalt": (0.30, 0.30, 0.31),
        "concrete": (0.58, 0.57, 0.54),
        "dirt": (0.55, 0.47, 0.37),
    }
    urbanish = st.archetype in ("dense", "suburban", "industrial")
    ids = np.zeros((h, w), np.uint8)
    palette = np.zeros((2 * len(roads) + 1, 3), np.float32)
    med_amp = np.zeros(2 * len(roads) + 1, np.float32)
    polys = [np.round(pts * 8).astype(np.int32).reshape(-1, 1, 2) for pts, _, _ in roads]
    # Sidewalks first, then every lane on top, so crossings stay clean.
    for i, ((_, width, _), ip) in enumerate(zip(roads, polys, strict=True)):
        if urbanish and width >= 8:
            cv2.polylines(ids, [ip], False, 2 * i + 1, int(width + 5), cv2.LINE_8, shift=3)
            palette[2 * i + 1] = _jitter(rng, (0.62, 0.61, 0.58), 0.05)
            med_amp[2 * i + 1] = 0.04
    for i, ((_, width, surface), ip) in enumerate(zip(roads, polys, strict=True)):
        cv2.polylines(ids, [ip], False, 2 * i + 2, int(width), cv2.LINE_8, shift=3)
        palette[2 * i + 2] = _jitter(rng, colours[surface], 0.1)
        med_amp[2 * i + 2] = 0.12 if surface == "dirt" else 0.05
    sel = ids > 0
    idx = ids[sel]
    tex = 1 + 0.05 * fine[sel] + med_amp[idx] * med[sel]
    img[sel] = palette[idx] * tex[:, None]

    for pts, width, surface in roads:
        if surface == "dirt":
            continue
        seg = np.diff(pts, axis=0)
        if width >= 8 and rng.random() < 0.6:
            # Dashed centre line: 6 px dashes every 12 px.
            paint = (0.85, 0.83, 0.75) if rng.random() < 0.7 else (0.8, 0.7, 0.3)
            for p, s in zip(pts[:-1], seg, strict=True):
                for t in np.arange(0, 1, 0.4):
                    a, b = p + s * t, p + s * (t + 0.2)
                    cv2.line(
                        img,
                        tuple(np.round(a).astype(int)),
                        tuple(np.round(b).astype(int)),
                        paint,
                        1,
                    )
        # Cars, parallel to the road, on either lane.
        for p, s in zip(pts[:-1], seg, strict=True):
            if rng.random() < 0.25:
                t = rng.random()
                d = s / (np.hypot(*s) + 1e-6)
                nrm = np.array([-d[1], d[0]]) * rng.choice([-1, 1]) * width / 4
                car = _rect(8, 4) @ _rot(math.atan2(d[1], d[0])).T + p + s * t + nrm
                col = _jitter(rng, _car_colour(rng), 0.1)
                _fill_full(img, [car], tuple(float(v) for v in col))
    return sel.astype(np.uint8)


def _render_building(
    img: np.ndarray,
    inst: np.ndarray,
    k: int,
    b: _Building,
    fine: np.ndarray,
    med: np.ndarray,
    light: np.ndarray,
    rng: np.random.Generator,
) -> None:
    h, w = img.shape[:2]
    bb = _bbox(b.contours, h, w, pad=1)
    if bb is None:
        return
    y0, y1, x0, x1 = bb
    m = _raster(b.contours, bb)
    if not m.any():
        return
    inst[y0:y1, x0:x1][m.astype(bool)] = k
    dt = cv2.distanceTransform(m, cv2.DIST_L2, 5)
    slope = rng.uniform(0.5, 1.0)
    if b.roof == "gable" and len(b.contours) == 1:
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        v = -(xs + 0.5 - b.center[0]) * math.sin(b.angle) + (ys + 0.5 - b.center[1]) * math.cos(
            b.angle
        )
        hgt = np.clip(b.depth / 2 - np.abs(v), 0, None) * slope
        shade = _lambert(hgt, light)
        shade *= 1 + 0.035 * np.sin(2 * math.pi * hgt / slope / 2.2)  # tile rows along the eaves
        shade[np.abs(v) < 0.6] *= 1.08  # ridge cap
    elif b.roof in ("hip", "gable"):
        hgt = np.minimum(dt, b.depth / 2) * slope
        shade = _lambert(hgt, light)
        shade *= 1 + 0.035 * np.sin(2 * math.pi * dt / 2.2)
    if b.roof in ("hip", "gable"):
        # Eaves and gutters: the outermost half metre of a pitched roof is a darker rim.
        shade[(dt > 0) & (dt <= 1.0)] *= 0.82
    else:
        shade = np.ones_like(dt)
        shade[(dt > 0) & (dt <= 1.5)] = rng.uniform(1.05, 1.2)  # parapet catches light
        shade[(dt > 1.5) & (dt <= 2.5)] = rng.uniform(0.85, 0.95)
    stains = 1 + 0.05 * fine[y0:y1, x0:x1] + rng.uniform(0.02, 0.08) * med[y0:y1, x0:x1]
    col = b.colour * (shade * stains)[..., None]
    _paint(img, m, bb, col.astype(np.float32))
    if b.roof == "flat" and b.kind in ("apartment", "industrial", "courtyard", "house"):
        # Rooftop units: small light boxes with a dark side away from the sun.
        inner = np.argwhere(dt > 4)
        sd = -light[:2] / (np.hypot(*light[:2]) + 1e-6)
        for _ in range(int(rng.poisson(len(inner) / 250)) if len(inner) else 0):
            py, px = inner[rng.integers(len(inner))]
            s = rng.uniform(2, 5)
            box = _rect(s * rng.uniform(1, 1.8), s) @ _rot(b.angle).T + (px + x0, py + y0)
            _fill_full(img, [box + sd * 1.5], tuple(float(v) for v in b.colour * 0.5))
            _fill_full(img, [box], tuple(float(v) for v in np.clip(b.colour * 1.25 + 0.1, 0, 1)))


def _render_trees(
    rng: np.random.Generator,
    img: np.ndarray,
    st: _Style,
    buildings: list[_Building],
    fine: np.ndarray,
    light: np.ndarray,
    shadow_vec: np.ndarray,
) -> None:
    h, w = img.shape[:2]
    area = h * w / 256**2
    rate = {"dense": 14, "suburban": 30, "rural": 30, "industrial": 10, "empty": 25}[st.archetype]
    crowns: list[tuple[float, float, float]] = []  # (x, y, radius)
    for _ in range(int(rng.poisson(rate * area))):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        crowns.append((x, y, rng.uniform(3, 9)))
    # Trees hiding roof edges: the mask still holds the whole footprint under them.
    for b in buildings:
        if rng.random() < 0.25:
            c = b.contours[0]
            i = rng.integers(len(c))
            p = c[i] + (c[(i + 1) % len(c)] - c[i]) * rng.random()
            crowns.append((p[0], p[1], rng.uniform(3, 8)))
    if not crowns:
        return
    tree = np.zeros((h, w), np.uint8)
    colour = np.zeros((h, w, 3), np.float32)
    shadow = np.zeros((h, w), np.uint8)
    tan_el = math.tan(st.sun_elevation)
    for x, y, r in crowns:
        col = tuple(float(v) for v in _jitter(rng, (0.17, 0.26, 0.12), 0.2))
        blobs = [(x, y, r)] + [
            (x + rng.normal(0, r / 2), y + rng.normal(0, r / 2), r * rng.uniform(0.5, 0.8))
            for _ in range(int(rng.integers(0, 4)))
        ]
        for bx, by, br in blobs:
            c = (round(bx * 8), round(by * 8))
            rad = max(round(br * 8), 8)
            cv2.circle(tree, c, rad, 1, -1, cv2.LINE_8, 3)
            cv2.circle(colour, c, rad, col, -1, cv2.LINE_8, 3)
            # The crown casts the shadow, its centre ~1.2 radii above the ground; the thin
            # trunk's shadow is invisible at 0.5 m/px.
            off = shadow_vec * (1.2 * br / tan_el)
            c2 = (round((bx + off[0]) * 8), round((by + off[1]) * 8))
            cv2.circle(shadow, c2, rad, 1, -1, cv2.LINE_8, 3)
    soft = cv2.GaussianBlur(shadow.astype(np.float32) * (1 - tree), (0, 0), 0.8)
    img *= 1 - (soft * (1 - st.shadow_strength))[..., None]
    sel = tree.astype(bool)
    dt = cv2.distanceTransform(tree, cv2.DIST_L2, 3)
    hgt = 2.2 * np.sqrt(dt) + 0.8 * fine
    shade = _lambert(hgt, light)
    img[sel] = colour[sel] * (shade[sel] * (1 + 0.12 * fine[sel]))[:, None]


def _light(st: _Style) -> tuple[np.ndarray, np.ndarray]:
    # Unit vector towards the sun, and the unit (x, y) direction shadows fall in.
    ce = math.cos(st.sun_elevation)
    to_sun = np.array(
        [math.cos(st.sun_azimuth) * ce, math.sin(st.sun_azimuth) * ce, math.sin(st.sun_elevation)]
    )
    shadow_dir = -to_sun[:2] / np.hypot(*to_sun[:2])
    return to_sun, shadow_dir


def generate_scene(
    seed: int | np.random.SeedSequence,
    height: int,
    width: int,
    *,
    min_buildings: int = 0,
) -> SyntheticScene:
    """Generates one satellite-like scene and its clean building mask.

    Args:
        seed: Seed or ``SeedSequence`` of this scene's random stream.
        height: Image height (px, about 0.5 m each).
        width: Image width (px).
        min_buildings: Guarantees at least this many buildings (training images of the
            competition always hold one); 0 lets rural/empty scenes have none.

    Returns:
        The image, its mask and the building instance map.
    """
    if height < 16 or width < 16:
        raise ValueError(f"scene size {height}x{width} is too small; use at least 16x16")
    rng = np.random.default_rng(seed)
    h, w = height, width
    st = _style(rng, allow_empty=min_buildings == 0)
    bias = _ARCHETYPES[st.archetype][1] if st.archetype != "empty" else -3.0
    # Where buildings may stand: a smooth field in [0, 1], high in town, low in the fields.
    urban = 1 / (1 + np.exp(-(1.6 * _fbm(rng, h, w, rng.uniform(90, 220), 2) + 1.6 * bias)))
    urban = urban.astype(np.float32)
    fine = _fbm(rng, h, w, 2.5, 2)  # pixel-scale texture shared by every layer
    med = _fbm(rng, h, w, 14, 3)  # stains and patches of a few metres
    ground = _render_ground(rng, urban, fine, med)
    to_sun, shadow_dir = _light(st)

    img = ground.copy()
    # Farm fields in the countryside: big rectangles with crop rows.
    if st.archetype in ("rural", "empty"):
        for _ in range(int(rng.poisson(3 * h * w / 256**2))):
            ang = st.grid_angle + rng.normal(0, 0.05)
            f = _place(
                [_rect(rng.uniform(60, 200), rng.uniform(40, 120))],
                rng.uniform((0, 0), (w, h)),
                ang,
            )
            bb = _bbox(f, h, w)
            if bb is None:
                continue
            y0, y1, x0, x1 = bb
            m = _raster(f, bb).astype(bool)
            crop = [(0.42, 0.48, 0.26), (0.55, 0.47, 0.36), (0.62, 0.58, 0.40), (0.30, 0.40, 0.22)]
            col = _jitter(rng, crop[rng.integers(4)], 0.1)
            rows = 1 + 0.06 * _stripes(bb, ang, rng.uniform(2.5, 5))
            patch = img[y0:y1, x0:x1]
            tex = (rows * (1 + 0.06 * med[y0:y1, x0:x1]))[..., None] * col
            patch[m] = 0.25 * patch[m] + 0.75 * tex[m]

    roads = _road_polylines(rng, h, w, st)
    road_mask = _render_roads(rng, img, roads, fine, med, st)
    occ = cv2.dilate(road_mask, np.ones((3, 3), np.uint8))
    buildings = _plan_buildings(rng, st, urban, occ, roads, ground, min_buildings)
    flats = _plan_flats(rng, st, urban, occ)

    for f in flats:
        _render_flat(rng, img, f, fine)

    # Shadows of everything with a height, cast on what lies below (ground, roads, flats).
    tan_el = math.tan(st.sun_elevation)
    shadow = np.zeros((h, w), np.uint8)
    for b in buildings:
        _sweep(shadow, b.contours, shadow_dir * b.height_m / _GSD / tan_el)
    for f in flats:
        if f.height_m > 0:
            # A greenhouse is drawn before the shadows: its own roof stays lit (a self-shadowed
            # tunnel turns dark and bluish and looks like a slate roof).
            own = np.zeros((h, w), np.uint8)
            _sweep(own, f.contours, shadow_dir * f.height_m / _GSD / tan_el)
            _fill_full(own, f.contours, 0)
            shadow |= own
    soft = cv2.GaussianBlur(shadow.astype(np.float32), (0, 0), 0.7)
    # Shadows are lit by the blue sky only: darker in red than in blue.
    tint = st.shadow_strength * np.array([0.92, 1.0, 1.15], np.float32)
    img *= 1 - soft[..., None] * (1 - tint)

    inst = np.zeros((h, w), np.int32)
    for k, b in enumerate(buildings, start=1):
        _render_building(img, inst, k, b, fine, med, to_sun, rng)

    _render_trees(rng, img, st, buildings, fine, to_sun, shadow_dir)

    # Sensor: exposure, colour cast, haze, optics blur, noise.
    img *= rng.uniform(0.85, 1.15) * rng.uniform(0.95, 1.05, 3).astype(np.float32)
    haze = rng.uniform(0, 0.08)
    img = (1 - haze) * img + haze * np.array([0.62, 0.66, 0.72], np.float32)
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 0.9))
    img += rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(0.006, 0.018)
    image = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return SyntheticScene(
        image=image,
        mask=(inst > 0).astype(np.uint8),
        instances=inst,
        kinds=tuple(b.kind for b in buildings),
    )


# --------------------------------------------------------------------------------------------
# Label noise
# --------------------------------------------------------------------------------------------


def corrupt_mask(
    mask: np.ndarray, instances: np.ndarray, kind: str, rng: np.random.Generator
) -> np.ndarray:
    """Imitates a wrong ground-truth mask, as found in real building datasets.

    Args:
        mask: (H, W) clean {0, 1} mask.
        instances: (H, W) int instance map (0 background) matching ``mask``.
        kind: One of ``NOISE_KINDS``: ``missing`` drops 30-70 % of the buildings (at least
            one), ``shift`` moves the mask 2-6 px, ``dilate``/``erode`` grow/shrink it by 2-3
            px, ``empty`` loses the whole mask.
        rng: Random stream.

    Returns:
        (H, W) uint8 noisy mask. For a non-empty mask it always differs from ``mask``.
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; choose one of {NOISE_KINDS}")
    mask = (np.asarray(mask) > 0).astype(np.uint8)
    if kind == "empty":
        return np.zeros_like(mask)
    if kind == "missing":
        ids = np.unique(instances[instances > 0])
        if len(ids) == 0:
            return mask.copy()
        n_drop = max(1, round(len(ids) * rng.uniform(0.3, 0.7)))
        drop = rng.choice(ids, size=n_drop, replace=False)
        return (mask & ~np.isin(instances, drop)).astype(np.uint8)
    if kind == "shift":
        dy, dx = 0, 0
        while dy == 0 and dx == 0:
            dy, dx = (int(v) for v in rng.integers(-6, 7, size=2))
        if max(abs(dy), abs(dx)) < 2:
            dx = 2 if dx >= 0 else -2
        out = np.zeros_like(mask)
        h, w = mask.shape
        out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
            max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
        ]
        return out
    r = int(rng.integers(2, 4))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    if kind == "dilate":
        return cv2.dilate(mask, kernel)
    return cv2.erode(mask, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)


# --------------------------------------------------------------------------------------------
# The world on disk
# --------------------------------------------------------------------------------------------


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_png(path: Path, rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode {path.name} as PNG")
    _write_bytes(path, buf.tobytes())


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    _write_bytes(path, df.to_csv(index=False, lineterminator="\n").encode())


def _noise_plan(seed: int, n_train: int, noise_fraction: float) -> list[str]:
    # Exactly round(fraction * n) noisy images, chosen by their own stream; the kind of each
    # is drawn per image, so it does not depend on which others are noisy.
    n_noisy = round(noise_fraction * n_train)
    pick = np.random.default_rng(np.random.SeedSequence([seed, _NOISE_PICK]))
    noisy = set(pick.permutation(n_train)[:n_noisy].tolist())
    kinds = []
    for i in range(n_train):
        if i in noisy:
            r = np.random.default_rng(np.random.SeedSequence([seed, _NOISE_APPLY, i]))
            kinds.append(NOISE_KINDS[int(r.integers(len(NOISE_KINDS)))])
        else:
            kinds.append("none")
    return kinds


def generate_world(
    out_dir: str | os.PathLike,
    *,
    n_train: int = 96,
    train_size: int = 512,
    n_test: int = 256,
    test_size: int = 224,
    test_scene_size: int | None = 448,
    noise_fraction: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> SyntheticWorld:
    """Generates (or finds) a synthetic world in the competition layout.

    The defaults are the demo's world at the competition's scale (0.5 m/pixel, houses 20-40 px
    long, test tiles of the competition's 224x224): 96 training scenes of 512x512 and 256 test
    tiles cut from 64 other 448x448 scenes, 4 tiles per scene. The competition's training
    images are 1024x1024; 512 keeps the world's generation and a demo search within minutes on
    a 2-core CPU, and training sees crops of them anyway.

    Layout (paths in the CSVs are relative to ``out_dir``)::

        train_img/TRAIN_0000.png ...   train.csv (img_id,img_path,mask_rle; noisy masks)
        train_clean.csv                train_noise.csv (img_id,noise)
        test_img/TEST_00000.png ...    test.csv (img_id,img_path,group)
        test_truth.csv (img_id,mask_rle,height,width)   sample_submission.csv (all -1)
        world.json                     parameters + format version, written last

    Args:
        out_dir: Folder of the world (created if needed).
        n_train: Number of training scenes (each holds at least one building).
        train_size: Side of a training scene (px).
        n_test: Number of test tiles.
        test_size: Side of a test tile (px); some tiles hold no building.
        test_scene_size: Side of the scenes test tiles are cut from (None: ``train_size``);
            they are separate from the training scenes.
        noise_fraction: Share of training images whose mask in ``train.csv`` is corrupted
            (see ``corrupt_mask``); ``train_clean.csv`` keeps the clean masks.
        seed: Seed of the whole world; the same seed gives the same bytes.
        progress: Show a progress bar.
        overwrite: Replace a world made with other parameters instead of raising. A folder
            that holds anything but a world written here is refused even so.

    Safe to call from several processes at once: a file lock beside the folder
    (``.NAME.lock``) serialises generation, and a process that waited finds the world the first
    one generated.

    Returns:
        The world's paths and parameters.

    Raises:
        ValueError: Bad parameters, or ``out_dir`` holds a world with other parameters (pass
            ``overwrite=True`` or another folder), or is a non-empty folder that holds no
            synthetic world (whatever ``overwrite`` says).
    """
    test_scene_size = train_size if test_scene_size is None else test_scene_size
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train={n_train} and n_test={n_test} must both be at least 1")
    if min(train_size, test_size) < 16:
        raise ValueError(f"train_size={train_size} and test_size={test_size} must be >= 16")
    if test_size > test_scene_size:
        raise ValueError(
            f"test_size={test_size} exceeds test_scene_size={test_scene_size}; tiles are cut "
            "from test scenes, so raise test_scene_size or lower test_size"
        )
    if not 0.0 <= noise_fraction <= 1.0:
        raise ValueError(f"noise_fraction={noise_fraction} must lie in [0, 1]")
    params: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "n_train": int(n_train),
        "train_size": int(train_size),
        "n_test": int(n_test),
        "test_size": int(test_size),
        "test_scene_size": int(test_scene_size),
        "noise_fraction": float(noise_fraction),
        "seed": int(seed),
    }
    root = Path(out_dir)
    world = SyntheticWorld.at(root, params)
    if is_world(root) and _recorded_params(root) == params:
        return world  # complete: no lock needed to read it (the folder may be read-only)
    # Two commands starting on a missing or outdated world would both build it, each deleting
    # train_img/ while the other writes or reads it (the other then fails with "image not
    # found"). The lock sits beside the folder, which must stay empty until a build starts.
    lock = root.resolve().parent / f".{root.resolve().name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(lock):
        # A process that waited finds the world the holder finished (or checks it as before).
        _generate_locked(world, params, progress, overwrite)
    return world


def _recorded_params(root: Path) -> dict | None:
    """The parameters of the complete world in ``root`` (its world.json), or None."""
    try:
        meta = json.loads((root / _WORLD_JSON).read_text())
    except (OSError, ValueError):
        return None
    return meta.get("params") if isinstance(meta, dict) else None


def _generate_locked(
    world: SyntheticWorld, params: dict[str, Any], progress: bool, overwrite: bool
) -> None:
    """:func:`generate_world` under its lock: refuses, keeps or (re)builds the world."""
    root = world.root
    meta_path = root / _WORLD_JSON
    if root.is_dir() and any(root.iterdir()) and not is_world(root):
        # Never, not even with overwrite: building deletes train_img/ and test_img/ and replaces
        # train.csv and test.csv, which in a competition folder are the user's real dataset.
        raise ValueError(
            f"{root} is not empty and is not a synthetic world (it has no {_MARKER}, nor a "
            f"{_WORLD_JSON} written by bldseg); choose an empty or new folder: --overwrite "
            "(overwrite=True) replaces only a synthetic world"
        )
    if meta_path.is_file():
        old = json.loads(meta_path.read_text()).get("params")
        if old == params:
            return
        diff = {
            k: (old.get(k) if old else None, v)
            for k, v in params.items()
            if not old or old.get(k) != v
        }
        if overwrite and progress:
            print(
                f"{root}: replacing the synthetic world made with other parameters (old, new): "
                f"{diff}",
                flush=True,
            )
        if not overwrite:
            raise ValueError(
                f"{root} holds a synthetic world made with other parameters (old, new): {diff}; "
                "pass --overwrite (overwrite=True) to replace it, or choose another folder"
            )
    _build(world, progress)


def is_world(root: str | os.PathLike) -> bool:
    """Whether ``root`` holds a world written by :func:`generate_world` (complete or not)."""
    root = Path(root)
    if (root / _MARKER).is_file():
        return True
    try:
        meta = json.loads((root / _WORLD_JSON).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("generator") == "bldseg.data.synthetic"


def _build(world: SyntheticWorld, progress: bool) -> None:
    from tqdm.auto import tqdm

    p = world.params
    root = world.root
    root.mkdir(parents=True, exist_ok=True)
    # Not complete any more from here on: world.json goes first, comes back last.
    (root / _WORLD_JSON).unlink(missing_ok=True)
    _write_bytes(root / _MARKER, json.dumps(p).encode())
    for sub in ("train_img", "test_img"):
        shutil.rmtree(root / sub, ignore_errors=True)
        (root / sub).mkdir()

    seed, n_train, size = p["seed"], p["n_train"], p["train_size"]
    kinds = _noise_plan(seed, n_train, p["noise_fraction"])
    tiles_per_side = p["test_scene_size"] // p["test_size"]
    per_scene = tiles_per_side**2
    n_test_scenes = -(-p["n_test"] // per_scene)
    bar = tqdm(total=n_train + n_test_scenes, desc="synthetic world", disable=not progress)

    train_rows, clean_rows, noise_rows = [], [], []
    for i in range(n_train):
        img_id = f"TRAIN_{i:04d}"
        rel = f"train_img/{img_id}.png"
        scene = generate_scene(
            np.random.SeedSequence([seed, _TRAIN, i]), size, size, min_buildings=1
        )
        _write_png(root / rel, scene.image)
        noisy = scene.mask
        if kinds[i] != "none":
            r = np.random.default_rng(np.random.SeedSequence([seed, _NOISE_APPLY, i, 1]))
            noisy = corrupt_mask(scene.mask, scene.instances, kinds[i], r)
        clean_rle = rle_encode(scene.mask)
        train_rows.append((img_id, rel, rle_encode(noisy)))
        clean_rows.append((img_id, rel, clean_rle))
        noise_rows.append((img_id, kinds[i]))
        bar.update()

    test_rows, truth_rows = [], []
    t, ts, ss = 0, p["test_size"], p["test_scene_size"]
    for s in range(n_test_scenes):
        scene = generate_scene(np.random.SeedSequence([seed, _TEST, s]), ss, ss)
        for ty in range(tiles_per_side):
            for tx in range(tiles_per_side):
                if t >= p["n_test"]:
                    break
                img_id = f"TEST_{t:05d}"
                rel = f"test_img/{img_id}.png"
                sl = (slice(ty * ts, (ty + 1) * ts), slice(tx * ts, (tx + 1) * ts))
                _write_png(root / rel, np.ascontiguousarray(scene.image[sl]))
                test_rows.append((img_id, rel, f"scene_{s:04d}"))
                truth_rows.append((img_id, rle_encode(scene.mask[sl]), ts, ts))
                t += 1
        bar.update()
    bar.close()

    cols = ["img_id", "img_path", "mask_rle"]
    _write_csv(world.train_csv, pd.DataFrame(train_rows, columns=cols))
    _write_csv(world.train_clean_csv, pd.DataFrame(clean_rows, columns=cols))
    _write_csv(world.train_noise_csv, pd.DataFrame(noise_rows, columns=["img_id", "noise"]))
    # `group`: the source scene of each tile. Tiles of one scene share its buildings, roads and
    # light, so they are not independent samples: readers take the column as the split group,
    # and the bootstrap intervals over the test split resample whole scenes (bldseg.stats).
    _write_csv(world.test_csv, pd.DataFrame(test_rows, columns=["img_id", "img_path", "group"]))
    _write_csv(
        world.test_truth_csv,
        pd.DataFrame(truth_rows, columns=["img_id", "mask_rle", "height", "width"]),
    )
    _write_csv(
        world.sample_submission_csv,
        pd.DataFrame({"img_id": [r[0] for r in test_rows], "mask_rle": EMPTY_RLE}),
    )
    meta = {
        "generator": "bldseg.data.synthetic",
        "params": p,
        "n_noisy": sum(k != "none" for k in kinds),
        "files": {
            k: str(v.relative_to(root))
            for k, v in asdict(world).items()
            if isinstance(v, Path) and v != root
        },
    }
    _write_bytes(root / _WORLD_JSON, (json.dumps(meta, indent=2) + "\n").encode())
