"""Two registries, each of small registered functions built by name: segmentation models and
backbones.

A model named by a string is what a search space needs (``{"model": "upernet_internimage_t"}``).
Only segmentation models can be trained; backbones are their encoders (and, with their ImageNet
head, the classifiers of the official checkpoints).

    @register_model
    def upernet_internimage_t(**kwargs) -> nn.Module: ...

    model = create_model("upernet_internimage_t", drop_path_rate=0.1)
    model = create_model("upernet_internimage_t", pretrained="internimage_t_1k_224.pth")
    encoder = create_backbone("internimage_t")
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def _register(table: dict[str, Callable[..., nn.Module]], fn: Callable[..., nn.Module]):
    name = fn.__name__
    if name in _MODELS or name in _BACKBONES:
        raise ValueError(f"{name!r} is registered twice")
    table[name] = fn
    return fn


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Registers a segmentation model under its function's name (decorator)."""
    return _register(_MODELS, fn)


def register_backbone(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Registers a backbone under its function's name (decorator)."""
    return _register(_BACKBONES, fn)


def list_models() -> list[str]:
    """Names of every registered segmentation model, sorted."""
    return sorted(_MODELS)


def list_backbones() -> list[str]:
    """Names of every registered backbone, sorted."""
    return sorted(_BACKBONES)


def model_name_problem(name: str) -> str | None:
    """Why ``name`` is not a segmentation model, in words; None when it is one."""
    if name in _MODELS:
        return None
    if name in _BACKBONES:
        hint = f"upernet_{name}"
        use = f"; use {hint!r}" if hint in _MODELS else f"; segmentation models: {list_models()}"
        return f"is a backbone, not a segmentation model{use}"
    if name.startswith("smp_") and importlib.util.find_spec("segmentation_models_pytorch") is None:
        # the smp peers register only where the smp extra is installed (bldseg.models.smp)
        return (
            "is a segmentation_models_pytorch peer, which this environment lacks: install "
            "the smp extra (pip install 'bldseg[smp]')"
        )
    return f"is not a registered model; known models: {list_models()}"


def create_model(name: str, pretrained: str | os.PathLike | None = None, **overrides) -> nn.Module:
    """Builds a registered segmentation model, optionally from official weights.

    Args:
        name: A name from :func:`list_models`.
        pretrained: Path of an official checkpoint on disk (never downloaded): ImageNet
            classification (``internimage_{t,s,b}_1k_224.pth``, into the backbone) or mmseg
            UPerNet (``upernet_internimage_{t,s,b}_512_160k_ade20k.pth``, into the whole
            model). See :func:`bldseg.models.pretrained.load_pretrained`; what was loaded and
            dropped is ``model.pretrained_report``. A model function with a
            ``load_pretrained(model, checkpoint)`` attribute reads its own formats instead
            (the smp models' encoder weights, :func:`bldseg.models.smp.load_smp_pretrained`).
        **overrides: Keyword arguments for the model function (e.g. ``drop_path_rate``,
            ``with_cp``, ``impl``), overriding the variant's defaults.

    Raises:
        ValueError: Not a segmentation model (the message says what to use instead).
        FileNotFoundError: No file at ``pretrained``.
        CheckpointMismatchError: (a ValueError) The checkpoint does not fit the model (every bad
            key is listed, by the file's names; another variant it fits is named).
    """
    problem = model_name_problem(name)
    if problem is not None:
        raise ValueError(f"model {name!r} {problem}")
    return _build(_MODELS[name], pretrained, overrides)


def create_backbone(
    name: str, pretrained: str | os.PathLike | None = None, **overrides
) -> nn.Module:
    """Builds a registered backbone, optionally from official weights.

    Args:
        name: A name from :func:`list_backbones`.
        pretrained: As in :func:`create_model`; a segmentation checkpoint gives its backbone.
        **overrides: Keyword arguments for the backbone function (e.g. ``num_classes=1000``
            for the ImageNet classifier).

    Raises:
        ValueError: Unknown name (the message lists the known ones).
    """
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {list_backbones()}")
    return _build(_BACKBONES[name], pretrained, overrides)


def _build(fn: Callable[..., nn.Module], pretrained, overrides: dict) -> nn.Module:
    if pretrained is None:
        return fn(**overrides)
    from bldseg.models.pretrained import load_pretrained, overrides_for_checkpoint, read_checkpoint

    # Read first: the checkpoint decides parts of the architecture (layer scale), and a missing
    # or unsafe file fails before a large model is built.
    ckpt = read_checkpoint(pretrained)
    own_loader = getattr(fn, "load_pretrained", None)
    if own_loader is not None:
        # A family with its own weight formats (bldseg.models.smp): built as asked, then loaded
        # by its loader, which returns the same LoadReport.
        model = fn(**overrides)
        model.pretrained_report = own_loader(model, ckpt)
        return model
    chosen = overrides_for_checkpoint(ckpt.state_dict)
    model = fn(**{**chosen, **overrides})
    report = load_pretrained(model, ckpt)
    # None: no layer scale, the architecture of every variant but T and S/B ("built with
    # {'layer_scale': None}" said nothing for the tiny model)
    report.overrides = {k: v for k, v in chosen.items() if k not in overrides and v is not None}
    model.pretrained_report = report
    return model
