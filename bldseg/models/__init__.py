"""Segmentation models and backbones, built by name.

create_model("upernet_internimage_t")                          # a segmentation model
create_model("upernet_internimage_t", pretrained="internimage_t_1k_224.pth")
create_backbone("internimage_t", num_classes=1000)             # the ImageNet classifier
"""

from bldseg.models import segmentor as _segmentor  # noqa: F401  (registers the models)
from bldseg.models import smp as _smp  # noqa: F401  (smp peers, when smp is installed)
from bldseg.models.pretrained import (
    LoadReport,
    load_pretrained,
    overrides_for_checkpoint,
    read_checkpoint,
)
from bldseg.models.registry import (
    create_backbone,
    create_model,
    list_backbones,
    list_models,
    model_name_problem,
    register_backbone,
    register_model,
)
from bldseg.models.segmentor import SegmentationModel

__all__ = [
    "LoadReport",
    "SegmentationModel",
    "create_backbone",
    "create_model",
    "list_backbones",
    "list_models",
    "load_pretrained",
    "model_name_problem",
    "overrides_for_checkpoint",
    "read_checkpoint",
    "register_backbone",
    "register_model",
]
