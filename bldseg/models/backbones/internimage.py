"""InternImage backbone (Wang et al., CVPR 2023), channels-last inside, DCNv3 core op.

Parameter names and shapes are those of the official classification checkpoints
(``internimage_{t,s,b}_1k_224.pth``, weights under ``"model"``), so they load strictly into the
backbone; only the classifier (``conv_head.*``, ``head.*``) is dropped for segmentation.

Layout (T: C=64, depths 4-4-18-4, groups 4-8-16-32)::

    x (B, 3, H, W)
    patch_embed: conv3x3 s2 -> LN -> GELU -> conv3x3 s2 -> LN      (B, H/4, W/4, C)
    levels[i], i = 0..3:
        blocks: depth_i x InternImageLayer(DCNv3 + MLP)            (B, H/2^(i+2), W/.., C*2^i)
        norm (pre-norm variants only)
        -> feature i, returned NCHW
        downsample: conv3x3 s2 -> LN                               (B, .., .., C*2^(i+1))
    [classification] conv_head 1x1 -> BN -> GELU, avgpool, head Linear
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint as cp
from torch import nn

from bldseg.models.registry import register_backbone
from bldseg.ops import DCNv3
from bldseg.ops._layers import build_act_layer, build_norm_layer


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample with probability ``p``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        # one Bernoulli per sample, broadcast over (H, W, C): (B, 1, 1, 1)
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


@dataclass
class InternImageConfig:
    """Architecture of one InternImage variant."""

    channels: int = 64  # width of level 0; level i has channels * 2**i
    depths: Sequence[int] = (4, 4, 18, 4)  # InternImageLayers per level
    groups: Sequence[int] = (4, 8, 16, 32)  # DCNv3 groups per level (group_channels = 16)
    mlp_ratio: float = 4.0  # MLP hidden width / channels
    drop_path_rate: float = 0.1  # stochastic depth, rising linearly to this over all blocks
    post_norm: bool = False  # norm after each branch (S/B) instead of before (T)
    # init value of the per-channel branch scales gamma1/gamma2; None: no scales (T). S/B: 1e-5
    # (their ImageNet runs); the official segmentation configs use 1.0, also for T.
    layer_scale: float | None = None
    offset_scale: float = 1.0  # DCNv3 offset_scale
    with_cp: bool = False  # activation checkpointing per block (saves GPU memory)
    num_classes: int = 0  # > 0 adds the ImageNet classifier (for parameter counts and loading)
    cls_scale: float = 1.5  # classifier width / last level width
    impl: str = "auto"  # DCNv3 implementation: "auto" | "compiled" | "reference"
    extra: dict = field(default_factory=dict)  # reserved for forward-compatible options


class StemLayer(nn.Module):
    """Two 3x3 stride-2 convs: (B, 3, H, W) -> (B, H/4, W/4, C) channels-last."""

    def __init__(self, in_chans: int, out_chans: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans // 2, 3, stride=2, padding=1)
        self.norm1 = build_norm_layer(out_chans // 2, "LN", "channels_first", "channels_first")
        self.act = build_act_layer("GELU")
        self.conv2 = nn.Conv2d(out_chans // 2, out_chans, 3, stride=2, padding=1)
        self.norm2 = build_norm_layer(out_chans, "LN", "channels_first", "channels_last")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


class DownsampleLayer(nn.Module):
    """3x3 stride-2 conv doubling the width: (B, H, W, C) -> (B, H/2, W/2, 2C)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False)
        self.norm = build_norm_layer(2 * channels, "LN", "channels_first", "channels_last")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)))


class MLPLayer(nn.Module):
    """Linear -> GELU -> Linear on channels-last tensors."""

    def __init__(self, channels: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.act = build_act_layer("GELU")
        self.fc2 = nn.Linear(hidden, channels)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class InternImageLayer(nn.Module):
    """DCNv3 branch + MLP branch, each residual, pre- or post-norm, optional layer scale."""

    def __init__(
        self,
        channels: int,
        groups: int,
        mlp_ratio: float,
        drop_path: float,
        post_norm: bool,
        layer_scale: float | None,
        offset_scale: float,
        with_cp: bool,
        impl: str,
    ):
        super().__init__()
        self.post_norm = post_norm
        self.with_cp = with_cp
        self.norm1 = build_norm_layer(channels, "LN")
        self.dcn = DCNv3(
            channels=channels,
            kernel_size=3,
            stride=1,
            pad=1,
            dilation=1,
            group=groups,
            offset_scale=offset_scale,
            impl=impl,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = build_norm_layer(channels, "LN")
        self.mlp = MLPLayer(channels, int(channels * mlp_ratio))
        self.layer_scale = layer_scale is not None
        if self.layer_scale:
            self.gamma1 = nn.Parameter(layer_scale * torch.ones(channels))
            self.gamma2 = nn.Parameter(layer_scale * torch.ones(channels))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, H, W, C)
        g1 = self.gamma1 if self.layer_scale else 1.0
        g2 = self.gamma2 if self.layer_scale else 1.0
        if self.post_norm:
            x = x + self.drop_path(g1 * self.norm1(self.dcn(x)))
            x = x + self.drop_path(g2 * self.norm2(self.mlp(x)))
        else:
            x = x + self.drop_path(g1 * self.dcn(self.norm1(x)))
            x = x + self.drop_path(g2 * self.mlp(self.norm2(x)))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_cp and x.requires_grad:
            return cp.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class InternImageBlock(nn.Module):
    """One level: ``depth`` layers, a final norm (pre-norm variants), then downsampling."""

    def __init__(
        self,
        channels: int,
        depth: int,
        groups: int,
        drop_path: Sequence[float],
        downsample: bool,
        cfg: InternImageConfig,
    ):
        super().__init__()
        self.post_norm = cfg.post_norm
        self.blocks = nn.ModuleList(
            InternImageLayer(
                channels,
                groups,
                cfg.mlp_ratio,
                drop_path[i],
                cfg.post_norm,
                cfg.layer_scale,
                cfg.offset_scale,
                cfg.with_cp,
                cfg.impl,
            )
            for i in range(depth)
        )
        if not cfg.post_norm:
            self.norm = build_norm_layer(channels, "LN")
        self.downsample = DownsampleLayer(channels) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, W, C) -> (features before downsampling, input of the next level)."""
        for blk in self.blocks:
            x = blk(x)
        if not self.post_norm:
            x = self.norm(x)
        out = x
        if self.downsample is not None:
            x = self.downsample(x)
        return out, x


class InternImage(nn.Module):
    """InternImage backbone returning NCHW features at strides 4, 8, 16, 32.

    With ``num_classes > 0`` it also carries the ImageNet classifier, so that it is the exact
    module of the official classification checkpoints (used for parameter counts).
    """

    def __init__(self, cfg: InternImageConfig):
        super().__init__()
        self.cfg = cfg
        n_levels = len(cfg.depths)
        self.out_channels = [cfg.channels * 2**i for i in range(n_levels)]
        self.patch_embed = StemLayer(3, cfg.channels)
        dpr = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
        starts = [sum(cfg.depths[:i]) for i in range(n_levels)]
        self.levels = nn.ModuleList(
            InternImageBlock(
                self.out_channels[i],
                cfg.depths[i],
                cfg.groups[i],
                dpr[starts[i] : starts[i] + cfg.depths[i]],
                downsample=i < n_levels - 1,
                cfg=cfg,
            )
            for i in range(n_levels)
        )
        if cfg.num_classes > 0:
            width = self.out_channels[-1]
            cls_width = int(width * cfg.cls_scale)
            self.conv_head = nn.Sequential(
                nn.Conv2d(width, cls_width, 1, bias=False),
                build_norm_layer(cls_width, "BN", "channels_first", "channels_first"),
                build_act_layer("GELU"),
            )
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Linear(cls_width, cfg.num_classes)
        self.apply(self._init_weights)
        for m in self.modules():
            if isinstance(m, DCNv3):
                m._reset_parameters()  # the op's own init (zero offsets/masks) wins

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> [(B, C*2^i, H/2^(i+2), W/2^(i+2)) for each level], NCHW."""
        x = self.patch_embed(x)
        feats = []
        for level in self.levels:
            out, x = level(x)
            feats.append(out.permute(0, 3, 1, 2))
        return feats

    def forward(self, x: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        """Features for segmentation; ImageNet logits when the classifier is present."""
        feats = self.forward_features(x)
        if self.cfg.num_classes <= 0:
            return feats
        y = self.avgpool(self.conv_head(feats[-1])).flatten(1)
        return self.head(y)


#: The published variants (PRODUCT.md), plus a tiny one for CPU tests and demos.
INTERNIMAGE_VARIANTS: dict[str, dict] = {
    "tiny": dict(channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8), drop_path_rate=0.0),
    "t": dict(channels=64, depths=(4, 4, 18, 4), groups=(4, 8, 16, 32), drop_path_rate=0.2),
    "s": dict(
        channels=80,
        depths=(4, 4, 21, 4),
        groups=(5, 10, 20, 40),
        post_norm=True,
        layer_scale=1e-5,
        drop_path_rate=0.3,
    ),
    "b": dict(
        channels=112,
        depths=(4, 4, 21, 4),
        groups=(7, 14, 28, 56),
        post_norm=True,
        layer_scale=1e-5,
        drop_path_rate=0.4,
    ),
}


def internimage(variant: str, **overrides) -> InternImage:
    """Builds an InternImage variant (``tiny``, ``t``, ``s``, ``b``) with config overrides."""
    if variant not in INTERNIMAGE_VARIANTS:
        raise ValueError(f"unknown InternImage variant {variant!r}: {list(INTERNIMAGE_VARIANTS)}")
    return InternImage(InternImageConfig(**{**INTERNIMAGE_VARIANTS[variant], **overrides}))


@register_backbone
def internimage_tiny(**kw) -> InternImage:
    """Tiny InternImage backbone for tests."""
    return internimage("tiny", **kw)


@register_backbone
def internimage_t(**kw) -> InternImage:
    """InternImage-T backbone (30M parameters as a classifier, ``num_classes=1000``)."""
    return internimage("t", **kw)


@register_backbone
def internimage_s(**kw) -> InternImage:
    """InternImage-S backbone (50M parameters as a classifier, ``num_classes=1000``)."""
    return internimage("s", **kw)


@register_backbone
def internimage_b(**kw) -> InternImage:
    """InternImage-B backbone (97M parameters as a classifier, ``num_classes=1000``)."""
    return internimage("b", **kw)
