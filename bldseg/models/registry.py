"""Model registry: every model is a small registered function, built by name.

A model named by a string is what a search space needs (``{"model": "upernet_internimage_t"}``).

    @register_model
    def upernet_internimage_t(**kwargs) -> nn.Module: ...

    model = create_model("upernet_internimage_t", drop_path_rate=0.1)
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Registers ``fn`` under its own name (decorator)."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_MODELS)


def create_model(name: str, **overrides) -> nn.Module:
    """Builds a registered model.

    Args:
        name: A name from :func:`list_models`.
        **overrides: Keyword arguments for the model function (e.g. ``drop_path_rate``,
            ``impl``), overriding the variant's defaults.

    Raises:
        ValueError: Unknown name (the message lists the known ones).
    """
    try:
        fn = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {list_models()}") from None
    return fn(**overrides)
