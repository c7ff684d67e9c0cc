"""Augmentation pipelines built from plain data, through albumentations.

The reference workflow's pipeline is the default::

    RandomScale(0.2, p=0.5) -> RandomCrop(224) -> VerticalFlip -> HorizontalFlip -> Normalize

Every knob a search space may turn is a field of :class:`AugConfig`, so a trial's augmentation
is a flat dict of numbers; the built pipeline is serialised with ``A.to_dict`` into the run's
record.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields

import albumentations as A
import cv2

from bldseg.train.fieldtypes import checked

# ImageNet statistics, as the pretrained InternImage backbones expect (x/255 then standardised).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: The weakest blur drawn, in pixels, and the smallest ``blur_sigma`` accepted. albumentations
#: sizes the kernel from sigma as PIL does, ``int(3.5 * sigma) * 2 + 1``: below 2/7 that is one
#: pixel and the tile comes back unchanged. At 0.3 the kernel has 3 taps but side weights of
#: 0.004: a sharp roof edge moves by one grey level, a 72-level edge not at all. From 0.4 (side
#: weights 0.04) a roof edge softens by about 14 levels, at 0.5 by about 35.
MIN_BLUR_SIGMA = 0.4
#: The weakest blur of earlier bldseg versions, newest first: a run recorded with a
#: ``blur_sigma`` below today's minimum drew from [the minimum then in force, blur_sigma], and
#: a resumed one goes on so (:func:`blur_sigma_range`).
EARLIER_BLUR_MINIMA = (0.3, 0.1)


def blur_sigma_range(blur_sigma: float) -> tuple[float, float]:
    """The sigmas a config's blurs draw from: [:data:`MIN_BLUR_SIGMA`, blur_sigma]; a recorded
    ``blur_sigma`` below it keeps the range it trained with (albumentations would sort
    (0.4, 0.35) into [0.35, 0.4], a stronger blur than the run's earlier epochs had)."""
    if blur_sigma >= MIN_BLUR_SIGMA:
        return (MIN_BLUR_SIGMA, blur_sigma)
    low = next((m for m in EARLIER_BLUR_MINIMA if m <= blur_sigma), blur_sigma)
    return (low, blur_sigma)


@dataclass
class AugConfig:
    """Training augmentation; probabilities are per sample, 0 disables a step."""

    crop_size: int = 224  # side of the training crops (the competition's test tiles are 224)
    crop_fit: bool = False  # a crop_size above the images' side becomes that side (else an error)
    scale_limit: float = 0.2  # RandomScale range: factor in [1 - limit, 1 + limit]
    scale_p: float = 0.5  # probability of RandomScale
    vflip_p: float = 0.5  # VerticalFlip
    hflip_p: float = 0.5  # HorizontalFlip
    rotate90_p: float = 0.0  # RandomRotate90 (nadir imagery has no "up")
    transpose_p: float = 0.0  # Transpose (swap rows and columns)
    brightness_contrast_p: float = 0.0  # RandomBrightnessContrast
    brightness_limit: float = 0.2  # its brightness range (+-)
    contrast_limit: float = 0.2  # its contrast range (+-)
    hsv_p: float = 0.0  # HueSaturationValue
    hue_shift: int = 10  # its hue shift limit (+-, OpenCV units)
    sat_shift: int = 20  # its saturation shift limit (+-)
    val_shift: int = 10  # its value shift limit (+-)
    noise_p: float = 0.0  # GaussNoise
    noise_std: float = 0.05  # its maximum standard deviation, as a fraction of 255
    blur_p: float = 0.0  # GaussianBlur
    # its maximum sigma (pixels): each blur draws sigma from [MIN_BLUR_SIGMA, blur_sigma]
    blur_sigma: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            v = checked(f"augmentation parameter {f.name}", v, f.type)
            setattr(self, f.name, v)
            if isinstance(v, numbers.Real) and not math.isfinite(v):
                raise ValueError(f"augmentation parameter {f.name}={v}: must be a finite number")
            if f.name.endswith("_p") and not 0.0 <= v <= 1.0:
                raise ValueError(f"augmentation parameter {f.name}={v}: a probability in [0, 1]")
        checks = {
            "crop_size": self.crop_size >= 8,
            "scale_limit": 0.0 <= self.scale_limit < 1.0,
            "brightness_limit": 0.0 <= self.brightness_limit <= 1.0,
            "contrast_limit": 0.0 <= self.contrast_limit <= 1.0,
            "hue_shift": 0 <= self.hue_shift <= 180,
            "sat_shift": 0 <= self.sat_shift <= 255,
            "val_shift": 0 <= self.val_shift <= 255,
            "noise_std": 0.0 < self.noise_std <= 1.0,
            "blur_sigma": self.blur_sigma >= 0.1,  # the range accepted before MIN_BLUR_SIGMA
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(
                    f"augmentation parameter {name}={getattr(self, name)} is out of range"
                )

    @classmethod
    def from_dict(cls, d: dict) -> AugConfig:
        """Builds a config from a (search-space) dict, naming any unknown key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown augmentation parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        """Plain dict (what MLflow and Ray see)."""
        return asdict(self)

    @property
    def window(self) -> int:
        """Side of the window to read from the cache so scale + crop never pads.

        A tile smaller than this is read whole, and a crop from it may be padded (by
        reflection, see :func:`build_train_transform`).
        """
        import math

        return (
            math.ceil(self.crop_size / (1.0 - self.scale_limit))
            if self.scale_p > 0
            else (self.crop_size)
        )


def blur_problem(cfg: AugConfig) -> str | None:
    """Why ``cfg``'s blur would train (almost) nothing (blur on with ``blur_sigma`` below
    :data:`MIN_BLUR_SIGMA`, where a drawn blur moves a sharp edge by a few grey levels at most,
    or returns the tile unchanged), or None.

    Not refused by :class:`AugConfig` itself: configs recorded before the limit (checkpoints,
    runs to resume) must keep loading. New runs are refused (:func:`bldseg.train.engine.fit`,
    and a search before it starts); a resumed run continues as recorded, with a warning.
    """
    if cfg.blur_p > 0 and cfg.blur_sigma < MIN_BLUR_SIGMA:
        return (
            f"augmentation parameter blur_sigma={cfg.blur_sigma} is below {MIN_BLUR_SIGMA}, the "
            f"weakest blur bldseg draws: its blur (blur_p={cfg.blur_p}) would barely change a "
            "tile (a sharp roof edge by a few grey levels at most, by one at 0.3, not at all "
            f"below 2/7); set aug.blur_sigma >= {MIN_BLUR_SIGMA}, or aug.blur_p=0 for no blur"
        )
    return None


def build_train_transform(cfg: AugConfig, normalize: bool = True) -> A.Compose:
    """The training pipeline for ``cfg`` (image uint8 (H, W, 3) + mask (H, W))."""
    t: list = []
    if cfg.scale_p > 0 and cfg.scale_limit > 0:
        # The mask by pixel centres as the linear image resize does (INTER_NEAREST maps by
        # floor(dst * s) and shifted masks up to half a pixel against their image).
        t.append(
            A.RandomScale(
                scale_limit=cfg.scale_limit,
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST_EXACT,
                p=cfg.scale_p,
            )
        )
    # Images smaller than the window (a small tile, or one scaled down) are padded by
    # reflection, image and mask alike, as prediction pads a scene: zeros would train on black
    # borders labelled "no building" that never occur at test time.
    t.append(
        A.RandomCrop(
            cfg.crop_size,
            cfg.crop_size,
            pad_if_needed=True,
            border_mode=cv2.BORDER_REFLECT_101,
        )
    )
    optional = [
        (cfg.vflip_p, lambda p: A.VerticalFlip(p=p)),
        (cfg.hflip_p, lambda p: A.HorizontalFlip(p=p)),
        (cfg.rotate90_p, lambda p: A.RandomRotate90(p=p)),
        (cfg.transpose_p, lambda p: A.Transpose(p=p)),
        (
            cfg.brightness_contrast_p,
            lambda p: A.RandomBrightnessContrast(cfg.brightness_limit, cfg.contrast_limit, p=p),
        ),
        (
            cfg.hsv_p,
            lambda p: A.HueSaturationValue(cfg.hue_shift, cfg.sat_shift, cfg.val_shift, p=p),
        ),
        (cfg.noise_p, lambda p: A.GaussNoise(std_range=(0.0, cfg.noise_std), p=p)),
        (
            cfg.blur_p,
            # blur_limit=0: the kernel grows with the drawn sigma, 3 taps or more from
            # MIN_BLUR_SIGMA, so every applied blur softens the tile's edges
            lambda p: A.GaussianBlur(
                blur_limit=0, sigma_limit=blur_sigma_range(cfg.blur_sigma), p=p
            ),
        ),
    ]
    t += [make(p) for p, make in optional if p > 0]
    if normalize:
        t.append(A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD))
    return A.Compose(t)


def build_eval_transform(normalize: bool = True) -> A.Compose | None:
    """Deterministic pipeline for validation and prediction tiles."""
    return A.Compose([A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)]) if normalize else None


def serialize(transform: A.Compose) -> dict:
    """The pipeline as a plain dict (``A.to_dict``), for the run's record."""
    return A.to_dict(transform)
