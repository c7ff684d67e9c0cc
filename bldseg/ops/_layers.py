"""Small layers shared by the DCNv3 module and the InternImage backbone.

They reproduce the official InternImage helpers, so the Sequential indices (and therefore the
state-dict keys such as ``dw_conv.1.1.weight``) are the same as in official checkpoints.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LayerNorm",
    "ToChannelsFirst",
    "ToChannelsLast",
    "build_act_layer",
    "build_norm_layer",
]

NormName = Literal["LN", "BN"]
ActName = Literal["GELU", "ReLU", "SiLU"]
Format = Literal["channels_first", "channels_last"]


class ToChannelsFirst(nn.Module):
    """(N, H, W, C) -> (N, C, H, W), a view."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


class ToChannelsLast(nn.Module):
    """(N, C, H, W) -> (N, H, W, C), a view."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` that normalises in float32 under autocast, on every device.

    CUDA's autocast already runs layer_norm in float32. The CPU's runs it in the input's
    bfloat16, output and backward rounded to 8-bit mantissas, which cost the demo's tiny model
    0.025 test Dice (README, CPU bf16). Same parameters and state-dict keys as
    ``nn.LayerNorm``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduced = x.dtype in (torch.float16, torch.bfloat16)
        if not reduced or not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)  # float32 / float64 as they come; a bf16 model as it is
        with torch.autocast(x.device.type, enabled=False):
            # (..., C) float32 out, as CUDA's autocast returns it
            return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps)


def build_norm_layer(
    dim: int,
    norm_layer: NormName,
    in_format: Format = "channels_last",
    out_format: Format = "channels_last",
    eps: float = 1e-6,
) -> nn.Sequential:
    """A normalisation layer wrapped with the permutes its input and output formats need.

    LayerNorm normalises the last dim, so it runs channels-last; BatchNorm2d runs
    channels-first. The permutes are parameter-free Sequential entries, which is why the
    official LN weight of a channels-first input sits at index 1 (``<name>.1.weight``).

    Args:
        dim: Number of channels.
        norm_layer: "LN" (LayerNorm) or "BN" (BatchNorm2d).
        in_format: Layout of the input.
        out_format: Layout of the output.
        eps: LayerNorm epsilon (BatchNorm keeps its default, as official).

    Returns:
        An ``nn.Sequential`` of permutes and the norm.
    """
    layers: list[nn.Module] = []
    if norm_layer == "BN":
        if in_format == "channels_last":
            layers.append(ToChannelsFirst())
        layers.append(nn.BatchNorm2d(dim))
        if out_format == "channels_last":
            layers.append(ToChannelsLast())
    elif norm_layer == "LN":
        if in_format == "channels_first":
            layers.append(ToChannelsLast())
        layers.append(LayerNorm(dim, eps=eps))
        if out_format == "channels_first":
            layers.append(ToChannelsFirst())
    else:
        raise ValueError(f"norm_layer must be 'LN' or 'BN', got {norm_layer!r}")
    return nn.Sequential(*layers)


def build_act_layer(act_layer: ActName) -> nn.Module:
    """The activation named ``act_layer``: "GELU", "ReLU" or "SiLU" (in-place, as official)."""
    if act_layer == "GELU":
        return nn.GELU()
    if act_layer == "ReLU":
        return nn.ReLU(inplace=True)
    if act_layer == "SiLU":
        return nn.SiLU(inplace=True)
    raise ValueError(f"act_layer must be 'GELU', 'ReLU' or 'SiLU', got {act_layer!r}")
