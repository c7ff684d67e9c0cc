"""UPerNet decode head and the auxiliary FCN head (as in mmsegmentation's UPerHead/FCNHead).

Inputs are the backbone's multi-scale features, NCHW, at strides 4/8/16/32. Every 3x3/1x1 conv
is followed by BatchNorm and ReLU and has no bias (the BN's shift plays that role), matching
the parameter counts of the published UPerNet-InternImage models.

Module names follow mmseg's, so the official checkpoints load key for key: ``psp_modules.i.1``,
``bottleneck``, ``lateral_convs.i``, ``fpn_convs.i`` and ``fpn_bottleneck`` are mmcv
``ConvModule``s (``conv`` + ``bn``). Only the classifiers (mmseg ``conv_seg``, ours
``classifier``) and the auxiliary conv (mmseg ``convs.0``, ours ``conv``) differ; the key map is
:data:`bldseg.models.pretrained.MMSEG_TO_BLDSEG`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from bldseg.models.resize import resize_bilinear


def _rename_prefix(state_dict: dict, old: str, new: str) -> None:
    """Moves every ``old*`` key of a state dict to ``new*`` (in place)."""
    for k in [k for k in state_dict if k.startswith(old)]:
        state_dict[new + k[len(old) :]] = state_dict.pop(k)


def _classifier(channels: int, num_classes: int) -> nn.Conv2d:
    """The per-pixel 1x1 classifier, initialised as mmseg's ``conv_seg``: N(0, 0.01), bias 0."""
    conv = nn.Conv2d(channels, num_classes, 1)
    nn.init.normal_(conv.weight, 0.0, 0.01)
    nn.init.zeros_(conv.bias)
    return conv


class ConvBNReLU(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU, named ``conv``/``bn``/``act`` as mmcv's
    ConvModule."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(
                    in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False
                ),
                bn=nn.BatchNorm2d(out_channels),
                act=nn.ReLU(inplace=True),
            )
        )
        # mmcv's ConvModule.init_weights: Kaiming normal, fan_out, for the ReLU after it
        # (PyTorch's default leaves these weights about 5x smaller at 512 channels)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        self.register_load_state_dict_pre_hook(self._load_legacy_names)

    @staticmethod
    def _load_legacy_names(module, state_dict, prefix, *_) -> None:
        # Run folders written before the mmseg names numbered the children: 0 (conv), 1 (bn).
        _rename_prefix(state_dict, prefix + "0.", prefix + "conv.")
        _rename_prefix(state_dict, prefix + "1.", prefix + "bn.")


class PyramidPooling(nn.ModuleList):
    """Pyramid pooling module: pooled context at several grid sizes, upsampled.

    Entry ``i`` is (AdaptiveAvgPool2d(s_i), ConvBNReLU 1x1), as mmseg's PPM.
    """

    def __init__(self, in_channels: int, channels: int, pool_scales: Sequence[int]):
        super().__init__(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_channels, channels, 1))
            for s in pool_scales
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        size = x.shape[-2:]
        # each: (B, channels, s, s) -> (B, channels, H, W)
        return [resize_bilinear(stage(x), size) for stage in self]


class UPerHead(nn.Module):
    """UPerNet head: PPM on the last level, FPN top-down path, fusion at stride 4.

    Args:
        in_channels: Channels of the four input levels (strides 4, 8, 16, 32).
        channels: Width of the head (512 in the published models).
        num_classes: Output channels (1: one building logit per pixel).
        pool_scales: Grid sizes of the pyramid pooling.
        dropout: Dropout before the classifier.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int = 512,
        num_classes: int = 1,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ):
        super().__init__()
        *lower, last = in_channels
        self.psp_modules = PyramidPooling(last, channels, pool_scales)
        self.bottleneck = ConvBNReLU(last + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in lower)
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in lower)
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = _classifier(channels, num_classes)
        self.register_load_state_dict_pre_hook(self._load_legacy_names)

    @staticmethod
    def _load_legacy_names(module, state_dict, prefix, *_) -> None:
        # Run folders written before the mmseg names kept the pooling under ppm.stages.
        _rename_prefix(state_dict, prefix + "ppm.stages.", prefix + "psp_modules.")

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Maps features [(B, C_i, H/s_i, W/s_i)] to logits (B, num_classes, H/4, W/4)."""
        *lower, last = features
        # 1. Pyramid pooling on the last level: (B, C_last + n*ch, H/32, W/32) -> (B, ch, ...).
        top = self.bottleneck(torch.cat([last, *self.psp_modules(last)], dim=1))
        # 2. Laterals: every lower level to `channels`.
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, lower, strict=True)] + [top]
        # 3. Top-down path: add each upsampled coarser level to the finer one.
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize_bilinear(
                laterals[i], laterals[i - 1].shape[-2:]
            )
        # 4. 3x3 FPN convs on all but the top, then everything up to stride 4 and concatenated.
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1], strict=True)]
        outs.append(laterals[-1])
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [resize_bilinear(o, size) for o in outs[1:]]
        # 5. Fuse (B, 4*ch, H/4, W/4) -> (B, ch, H/4, W/4) and classify.
        fused = self.fpn_bottleneck(torch.cat(outs, dim=1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """Auxiliary head: one 3x3 conv block and a classifier on a single level.

    Args:
        in_channels: Channels of its input level (level 3, stride 16).
        channels: Width (256 in the published models).
        num_classes: Output channels.
        dropout: Dropout before the classifier.
    """

    def __init__(
        self, in_channels: int, channels: int = 256, num_classes: int = 1, dropout: float = 0.1
    ):
        super().__init__()
        self.conv = ConvBNReLU(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = _classifier(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, num_classes, h, w)."""
        return self.classifier(self.dropout(self.conv(x)))
