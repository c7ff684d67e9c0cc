"""Segmentation models, built by name: ``create_model("upernet_internimage_t")``."""

from bldseg.models import segmentor as _segmentor  # noqa: F401  (registers the models)
from bldseg.models.registry import create_model, list_models, register_model
from bldseg.models.segmentor import SegmentationModel, load_pretrained

__all__ = ["SegmentationModel", "create_model", "list_models", "load_pretrained", "register_model"]
