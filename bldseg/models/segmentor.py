"""UPerNet-InternImage: encoder -> UPerNet decoder (+ auxiliary FCN head) -> one logit per pixel.

    model = create_model("upernet_internimage_t")
    model.eval(); logits = model(x)            # (B, 1, H, W)
    model.train(); out = model(x)              # {"logits": (B,1,H,W), "aux_logits": (B,1,H,W)}
    loss = bce(out["logits"], y) + model.aux_weight * bce(out["aux_logits"], y)

Any input size works: inputs whose sides are not multiples of 32 are zero-padded at the
bottom/right and the logits cropped back, so a 224 or 250 tile gives a 224 or 250 map.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from bldseg.models.backbones.internimage import InternImage, internimage
from bldseg.models.decoders.upernet import FCNHead, UPerHead
from bldseg.models.registry import register_model

#: Official classification checkpoints keep the ImageNet classifier under these prefixes.
CLASSIFIER_PREFIXES = ("conv_head.", "head.")


class SegmentationModel(nn.Module):
    """Backbone + UPerNet head + optional auxiliary head.

    Args:
        backbone: Returns four NCHW feature maps at strides 4/8/16/32 and has ``out_channels``.
        head_channels: UPerNet width (512 in the published models).
        aux_channels: Auxiliary FCN head width (256); 0 disables the auxiliary head.
        aux_weight: Weight of the auxiliary loss (0.4); stored for the training loop.
        num_classes: Logits per pixel (1 for building vs background).
        dropout: Dropout before both classifiers.
    """

    def __init__(
        self,
        backbone: InternImage,
        head_channels: int = 512,
        aux_channels: int = 256,
        aux_weight: float = 0.4,
        num_classes: int = 1,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.backbone = backbone
        chans = backbone.out_channels
        self.decode_head = UPerHead(chans, head_channels, num_classes, dropout=dropout)
        self.aux_head = (
            FCNHead(chans[2], aux_channels, num_classes, dropout=dropout) if aux_channels else None
        )
        self.aux_weight = aux_weight if aux_channels else 0.0
        self.stride = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """(B, 3, H, W) -> logits (B, num_classes, H, W); in training a dict with aux logits."""
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % self.stride, (-w) % self.stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        feats = self.backbone(x)
        size = x.shape[-2:]
        # (B, K, H/4, W/4) -> (B, K, H, W), then drop the padding
        logits = F.interpolate(
            self.decode_head(feats), size=size, mode="bilinear", align_corners=False
        )[..., :h, :w]
        if not (self.training and self.aux_head is not None):
            return logits
        aux = F.interpolate(
            self.aux_head(feats[2]), size=size, mode="bilinear", align_corners=False
        )[..., :h, :w]
        return {"logits": logits, "aux_logits": aux}


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Loads an official InternImage classification checkpoint into a backbone, strictly.

    Args:
        model: A :class:`SegmentationModel` (loads into ``model.backbone``) or an
            :class:`InternImage`.
        path: ``internimage_{t,s,b}_1k_224.pth`` (weights under ``"model"``, or a bare state
            dict). Never downloaded: it must be on disk.

    Returns:
        The checkpoint keys that were dropped (the ImageNet classifier).

    Raises:
        FileNotFoundError: No file at ``path``.
        RuntimeError: Missing, unexpected or mis-shaped parameters, listed by name.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path} (bldseg never downloads weights)")
    backbone = model.backbone if isinstance(model, SegmentationModel) else model
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else ckpt
    own = backbone.state_dict()
    has_classifier = any(k.startswith(CLASSIFIER_PREFIXES) for k in own)
    dropped = [] if has_classifier else [k for k in state if k.startswith(CLASSIFIER_PREFIXES)]
    state = {k: v for k, v in state.items() if k not in dropped}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise RuntimeError(
            f"{path} does not match {type(backbone).__name__}"
            f" ({len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} mis-shaped):"
            f"\n  missing: {missing[:20]}\n  unexpected: {unexpected[:20]}\n  shapes: {shapes[:20]}"
            "\nIs it the checkpoint of the same variant (t/s/b)?"
        )
    backbone.load_state_dict(state, strict=True)
    return dropped


def _upernet(
    variant: str,
    head_channels: int,
    aux_channels: int,
    *,
    aux_weight: float = 0.4,
    num_classes: int = 1,
    dropout: float = 0.1,
    **backbone_kw,
) -> SegmentationModel:
    return SegmentationModel(
        internimage(variant, **backbone_kw),
        head_channels=head_channels,
        aux_channels=aux_channels,
        aux_weight=aux_weight,
        num_classes=num_classes,
        dropout=dropout,
    )


@register_model
def upernet_internimage_tiny(**kw) -> SegmentationModel:
    """Tiny UPerNet-InternImage for CPU tests and demos (C=16, depths 1-1-2-1, head 64)."""
    return _upernet("tiny", kw.pop("head_channels", 64), kw.pop("aux_channels", 32), **kw)


@register_model
def upernet_internimage_t(**kw) -> SegmentationModel:
    """UPerNet-InternImage-T (59M parameters with 150 classes)."""
    return _upernet("t", kw.pop("head_channels", 512), kw.pop("aux_channels", 256), **kw)


@register_model
def upernet_internimage_s(**kw) -> SegmentationModel:
    """UPerNet-InternImage-S (80M parameters with 150 classes)."""
    return _upernet("s", kw.pop("head_channels", 512), kw.pop("aux_channels", 256), **kw)


@register_model
def upernet_internimage_b(**kw) -> SegmentationModel:
    """UPerNet-InternImage-B (128M parameters with 150 classes)."""
    return _upernet("b", kw.pop("head_channels", 512), kw.pop("aux_channels", 256), **kw)


@register_model
def internimage_t(**kw) -> InternImage:
    """InternImage-T classifier/backbone (30M parameters with the ImageNet head)."""
    return internimage("t", **kw)


@register_model
def internimage_s(**kw) -> InternImage:
    """InternImage-S classifier/backbone (50M parameters with the ImageNet head)."""
    return internimage("s", **kw)


@register_model
def internimage_b(**kw) -> InternImage:
    """InternImage-B classifier/backbone (97M parameters with the ImageNet head)."""
    return internimage("b", **kw)


@register_model
def internimage_tiny(**kw) -> InternImage:
    """Tiny InternImage backbone for tests."""
    return internimage("tiny", **kw)
