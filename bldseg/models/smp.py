"""segmentation_models_pytorch (smp) models as bldseg segmentation models: standard peers.

Registered only when ``segmentation_models_pytorch`` imports (``pip install 'bldseg[smp]'``);
without it the names are simply absent from :func:`bldseg.models.list_models`.

    model = create_model("smp_unet_resnet18")      # UNet, ResNet-18 encoder, random init
    model(x)                                       # logits (B, 1, H, W), train and eval alike

Encoders start from random weights (``encoder_weights=None``): nothing is downloaded, and a
comparison with our models (also trained from scratch on the synthetic world) is like for like.
Any input size works, as with our models: the input is zero-padded at the bottom/right to a
multiple of the encoder's output stride (32) and the logits cropped back.

The run-config keywords every model receives (:meth:`bldseg.train.config.RunConfig.model_kwargs`)
are handled so a search over models can pass them blindly:

- ``impl`` (the DCNv3 implementation) is ignored: these models have no DCNv3 layer;
- ``drop_path_rate`` goes to timm encoders (``tu-`` names), which build stochastic depth from
  it; smp's own encoders (ResNet, MobileNetV2, EfficientNet) have none, so a rate above 0 is
  refused rather than silently dropped;
- ``with_cp`` turns on timm's activation checkpointing in ``tu-`` encoders and is refused for
  the others.

Any other keyword goes to the smp architecture (``decoder_channels``,
``decoder_attention_type``, ...).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bldseg.models.registry import register_model

__all__ = ["SmpSegmentor", "smp_available"]


def smp_available() -> bool:
    """Whether ``segmentation_models_pytorch`` (and with it timm) can be imported."""
    return importlib.util.find_spec("segmentation_models_pytorch") is not None


class SmpSegmentor(nn.Module):
    """An smp architecture with one logit per pixel, padded to its stride like our models.

    Parameters live under ``net.*`` (``net.encoder``, ``net.decoder``,
    ``net.segmentation_head``). There is no auxiliary head: ``forward`` returns the logits
    tensor in training too, which the training loop accepts as ``{"logits": ...}``.

    Args:
        arch: smp architecture name, e.g. ``"Unet"``, ``"UnetPlusPlus"``, ``"FPN"``.
        encoder: smp encoder name, e.g. ``"resnet18"``, ``"efficientnet-b0"`` or a timm
            encoder as ``"tu-<timm name>"``.
        num_classes: Logits per pixel (1 for building vs background).
        drop_path_rate: Stochastic depth of a timm encoder; None or 0 for smp's own encoders.
        with_cp: Activation checkpointing in a timm encoder (less memory, slower).
        impl: Accepted for the shared run-config keywords and ignored (no DCNv3 here).
        **arch_kw: Further keyword arguments of the smp architecture.

    Raises:
        ValueError: ``drop_path_rate`` > 0 or ``with_cp`` for an encoder that cannot honour it.
        ImportError: segmentation_models_pytorch is not installed.
    """

    def __init__(
        self,
        arch: str,
        encoder: str,
        *,
        num_classes: int = 1,
        drop_path_rate: float | None = None,
        with_cp: bool = False,
        impl: str = "auto",
        **arch_kw: Any,
    ):
        super().__init__()
        import segmentation_models_pytorch as smp

        del impl  # the DCNv3 implementation: nothing to choose in an smp model
        timm_encoder = encoder.startswith("tu-")
        if drop_path_rate:
            if not timm_encoder:
                raise ValueError(
                    f"drop_path_rate={drop_path_rate}: the smp encoder {encoder!r} has no "
                    "stochastic depth; leave drop_path_rate unset (or 0), or use a timm encoder "
                    "('tu-' names, e.g. smp_unet_convnext_atto)"
                )
            # smp passes unknown keywords of a tu- encoder on to timm.create_model.
            arch_kw["drop_path_rate"] = drop_path_rate
        if with_cp and not timm_encoder:
            raise ValueError(
                f"with_cp=True: activation checkpointing is available for timm encoders ('tu-' "
                f"names) only, not for {encoder!r}; set with_cp=False"
            )
        self.arch, self.encoder_name = arch, encoder
        self.net = smp.create_model(
            arch, encoder_name=encoder, encoder_weights=None, classes=num_classes, **arch_kw
        )
        if with_cp:
            # The features_only wrapper timm builds for smp checkpoints each of its stages.
            self.net.encoder.model.set_grad_checkpointing(True)
        self.stride = self.net.encoder.output_stride  # 32 with the default encoder_depth 5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> logits (B, num_classes, H, W), in training and evaluation."""
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % self.stride, (-w) % self.stride
        if pad_h or pad_w:
            # (B, 3, H + pad_h, W + pad_w): every encoder stage halves a multiple of 32 exactly,
            # so the UNet skips line up; the padded border is cropped off the logits below.
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.net(x)[..., :h, :w]


def _unet(encoder: str, kw: dict[str, Any]) -> SmpSegmentor:
    return SmpSegmentor("Unet", encoder, **kw)


if smp_available():

    @register_model
    def smp_unet_resnet18(**kw) -> SmpSegmentor:
        """smp UNet, ResNet-18 encoder (14.3M parameters): the standard small peer."""
        return _unet("resnet18", kw)

    @register_model
    def smp_unet_resnet34(**kw) -> SmpSegmentor:
        """smp UNet, ResNet-34 encoder (24.4M parameters)."""
        return _unet("resnet34", kw)

    @register_model
    def smp_unet_mobilenet_v2(**kw) -> SmpSegmentor:
        """smp UNet, MobileNetV2 encoder (6.6M parameters)."""
        return _unet("mobilenet_v2", kw)

    @register_model
    def smp_unet_mobilenetv3_small(**kw) -> SmpSegmentor:
        """smp UNet, timm MobileNetV3-Small 1.0 encoder (3.6M parameters)."""
        return _unet("tu-mobilenetv3_small_100", kw)

    @register_model
    def smp_unet_efficientnet_b0(**kw) -> SmpSegmentor:
        """smp UNet, EfficientNet-B0 encoder (6.3M parameters)."""
        return _unet("efficientnet-b0", kw)

    @register_model
    def smp_unet_efficientnetv2_b0(**kw) -> SmpSegmentor:
        """smp UNet, timm EfficientNetV2-B0 encoder (7.6M parameters; the 3rd place's family)."""
        return _unet("tu-tf_efficientnetv2_b0", kw)

    @register_model
    def smp_unet_convnext_atto(**kw) -> SmpSegmentor:
        """smp UNet, timm ConvNeXt-Atto encoder (5.8M parameters)."""
        return _unet("tu-convnext_atto", kw)

    @register_model
    def smp_unet_tiny(**kw) -> SmpSegmentor:
        """smp UNet on timm's test ResNet with a narrow decoder, for fast CPU tests."""
        kw.setdefault("decoder_channels", (32, 16, 16, 8, 8))
        return _unet("tu-test_resnet", kw)
