"""UPerNet-InternImage: encoder -> UPerNet decoder (+ auxiliary FCN head) -> one logit per pixel.

    model = create_model("upernet_internimage_t")
    model.eval(); logits = model(x)            # (B, 1, H, W)
    model.train(); out = model(x)              # {"logits": (B,1,H,W), "aux_logits": (B,1,H,W)}
    loss = bce(out["logits"], y) + model.aux_weight * bce(out["aux_logits"], y)

Any input size works: inputs whose sides are not multiples of 32 are zero-padded at the
bottom/right and the logits cropped back, so a 224 or 250 tile gives a 224 or 250 map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bldseg.models.backbones.internimage import InternImage, internimage
from bldseg.models.decoders.upernet import FCNHead, UPerHead
from bldseg.models.registry import register_model
from bldseg.models.resize import resize_bilinear


class SegmentationModel(nn.Module):
    """Backbone + UPerNet head + optional auxiliary head.

    Parameters live under ``backbone.*``, ``decode_head.*`` and ``aux_head.*`` (mmseg's
    ``auxiliary_head``): the names of the official mmseg checkpoints, but for three prefixes
    (:data:`bldseg.models.pretrained.MMSEG_TO_BLDSEG`).

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
        """(B, 3, H, W) -> logits (B, num_classes, H, W); in training, where the model has an
        auxiliary head (``aux_channels`` > 0), a dict of ``logits`` and ``aux_logits``."""
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % self.stride, (-w) % self.stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        feats = self.backbone(x)
        size = x.shape[-2:]
        # (B, K, H/4, W/4) -> (B, K, H, W), then drop the padding
        logits = resize_bilinear(self.decode_head(feats), size)[..., :h, :w]
        if not (self.training and self.aux_head is not None):
            return logits
        aux = resize_bilinear(self.aux_head(feats[2]), size)[..., :h, :w]
        return {"logits": logits, "aux_logits": aux}


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
    # backbone_kw: InternImageConfig fields (drop_path_rate, with_cp, layer_scale, impl, ...)
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
    """Tiny UPerNet-InternImage for CPU tests and demos (C=16, depths 1-1-2-1, head 32).

    Our own size, not a published one (0.58M parameters). The head is 32 channels wide: at
    192-px crops a 64-wide head spends most of a step in its 3x3 convolutions at 1/4
    resolution, and halving it makes a step 1.8x faster (111 -> 61 ms, batch 4, 2 threads)
    while the test Dice after the same steps moves by 0.007, within noise
    (experiments/bench_quality.py).
    """
    return _upernet("tiny", kw.pop("head_channels", 32), kw.pop("aux_channels", 16), **kw)


@register_model
def upernet_internimage_t(**kw) -> SegmentationModel:
    """UPerNet-InternImage-T (59M parameters with 150 classes).

    Layer scale 1.0 (``gamma1``/``gamma2`` in every block), as in the official segmentation
    config; the classification T has none. Fine-tuned from the classification checkpoint the
    scales start at 1, so every block computes what the checkpoint's did, and then train.
    """
    kw.setdefault("layer_scale", 1.0)
    return _upernet("t", kw.pop("head_channels", 512), kw.pop("aux_channels", 256), **kw)


@register_model
def upernet_internimage_s(**kw) -> SegmentationModel:
    """UPerNet-InternImage-S (80M parameters with 150 classes)."""
    return _upernet("s", kw.pop("head_channels", 512), kw.pop("aux_channels", 256), **kw)


@register_model
def upernet_internimage_b(**kw) -> SegmentationModel:
    """UPerNet-InternImage-B (128M parameters with 150 classes)."""
    return _upernet("b", kw.pop("head_channels", 512), kw.pop("aux_channels", 256), **kw)
