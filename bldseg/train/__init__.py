"""Training engine: config, losses, augmentation, schedulers, co-teaching, fit, plots."""

from bldseg.train.augment import AugConfig, build_eval_transform, build_train_transform
from bldseg.train.config import CoTeachConfig, OptimConfig, RunConfig, SchedConfig
from bldseg.train.engine import FitResult, fit, threshold_metrics

__all__ = [
    "AugConfig",
    "CoTeachConfig",
    "FitResult",
    "OptimConfig",
    "RunConfig",
    "SchedConfig",
    "build_eval_transform",
    "build_train_transform",
    "fit",
    "threshold_metrics",
]
