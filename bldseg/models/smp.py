"""segmentation_models_pytorch (smp) models as bldseg segmentation models: standard peers.

Registered only when ``segmentation_models_pytorch`` imports (``pip install 'bldseg[smp]'``);
without it the names are simply absent from :func:`bldseg.models.list_models`.

    model = create_model("smp_upernet_convnext_atto")    # UPerNet, ConvNeXt-Atto, random init
    model(x)                                            # logits (B, 1, H, W), train and eval
    model = smp_model("DeepLabV3Plus", "tu-resnet50")     # any smp architecture and encoder
    register_smp_model("FPN", "tu-resnet50")              # -> "smp_fpn_resnet50", for configs

The registered names are ``smp_<decoder>_<encoder>``: every decoder of :data:`ARCHS` (UNet,
UPerNet, FPN) with every encoder of :data:`ENCODERS`, plus ``smp_<decoder>_tiny`` on timm's
test ResNet for fast CPU tests. Each is :func:`smp_model` with fixed arguments. Parameters with
one class, in millions (smp 0.6.0, timm 1.0; ``_param_table()`` prints them)::

    encoder            unet   upernet   fpn
    resnet18          14.33    19.49  13.05
    resnet34          24.44    29.60  23.16
    mobilenet_v2       6.63    13.02   4.22
    mobilenetv3_small  3.59     9.36   2.72
    efficientnet_b0    6.25    11.61   5.76   (0.41 of them unused: see below)
    efficientnetv2_b0  7.57    12.79   7.33
    convnext_atto      5.77    11.01   5.15
    convnext_femto     7.48    12.69   6.64
    tiny               0.49     0.52   0.45
    mobilenetv3_small_075_narrow
                       0.94      -      -    (CPU_UNETS: UNet only)

smp's own EfficientNet-B0 encoder keeps the classifier's 1x1 conv and norm (``_conv_head``,
``_bn1``) though its features end before them: they get no gradient (a
DistributedDataParallel would need ``find_unused_parameters``); the timm EfficientNetV2-B0
encoder has no such layers.

Encoders start from random weights (``encoder_weights=None``): nothing is downloaded, and a
comparison with our models (also trained from scratch on the synthetic world) is like for like.
``create_model(name, pretrained=PATH)`` loads weights from a file on disk instead
(:func:`load_smp_pretrained`): the encoder's ImageNet weights as the timm or torchvision model
names them, or a whole model (a bldseg ``best.pt`` or an smp ``state_dict``).

Any input size works, as with our models: the input is zero-padded at the bottom/right to a
multiple of the encoder's output stride (32) and the logits cropped back, so a 100 x 100 window
gives a 100 x 100 map.

The run-config keywords every model receives (:meth:`bldseg.train.config.RunConfig.model_kwargs`)
are handled so a search over models can pass them blindly:

- ``impl`` (the DCNv3 implementation) is ignored: these models have no DCNv3 layer;
- ``drop_path_rate`` goes to timm encoders (``tu-`` names), which build stochastic depth from
  it; smp's own encoders (ResNet, MobileNetV2, EfficientNet) have none, so a rate above 0 is
  refused rather than silently dropped;
- ``with_cp`` turns on timm's activation checkpointing in ``tu-`` encoders and is refused for
  the others.

Any other keyword goes to the smp architecture (``decoder_channels``,
``decoder_attention_type``, ...). There is no auxiliary head and no layer-wise LR decay
(:func:`bldseg.train.engine.build_optimizer` gives every parameter of these models the same LR).
UPerNet pools its coarsest map to 1 x 1 before a BatchNorm, as our UPerNet does, so it cannot
train on a batch of one image.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bldseg.models.pretrained import (
    Checkpoint,
    CheckpointMismatchError,
    LoadReport,
    read_checkpoint,
)
from bldseg.models.registry import register_model

__all__ = [
    "ARCHS",
    "ENCODERS",
    "SmpSegmentor",
    "load_smp_pretrained",
    "register_smp_model",
    "smp_available",
    "smp_model",
]

#: The encoders registered with every decoder: the name in model names -> smp's encoder name.
ENCODERS: dict[str, str] = {
    "resnet18": "resnet18",
    "resnet34": "resnet34",
    "mobilenet_v2": "mobilenet_v2",
    "mobilenetv3_small": "tu-mobilenetv3_small_100",
    "efficientnet_b0": "efficientnet-b0",
    "efficientnetv2_b0": "tu-tf_efficientnetv2_b0",  # the 3rd place's family
    "convnext_atto": "tu-convnext_atto",
    "convnext_femto": "tu-convnext_femto",
}

#: Peers sized for a CPU, registered with the UNet decoder only: name -> (encoder, keywords).
#: ``smp_unet_mobilenetv3_small_075_narrow`` (0.94M parameters: the 0.75-width MobileNetV3-small
#: encoder, 0.57M, and decoder channels 64/32/16/16/8) is the peer the time-to-quality
#: benchmark (experiments/bench_train.py) was first measured against.
CPU_UNETS: dict[str, tuple[str, dict[str, Any]]] = {
    "mobilenetv3_small_075_narrow": (
        "tu-mobilenetv3_small_075",
        {"decoder_channels": (64, 32, 16, 16, 8)},
    ),
}

#: The registered decoders: the name in model names -> smp's architecture.
ARCHS: dict[str, str] = {"unet": "Unet", "upernet": "UPerNet", "fpn": "FPN"}

#: ``smp_<decoder>_tiny``: timm's test ResNet (0.14M parameters) and a narrow decoder, so a
#: training step on a 64-px batch takes milliseconds on a CPU.
TINY_ENCODER = "tu-test_resnet"
TINY_DECODERS: dict[str, dict[str, Any]] = {
    "unet": {"decoder_channels": (32, 16, 16, 8, 8)},
    "upernet": {"decoder_channels": 32},
    # FPN's segmentation blocks normalise with GroupNorm(32, C): C a multiple of 32.
    "fpn": {"decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32},
}

#: Keys of an ImageNet classifier that smp's own encoders delete (``fc`` of ResNet, ``_fc`` of
#: EfficientNet, ``classifier`` of MobileNetV2): dropped from a torchvision-style state dict.
_SMP_CLASSIFIERS = ("fc.", "_fc.", "classifier.", "last_linear.")

_SHOWN = 5  # keys listed per group in an error message


def smp_available() -> bool:
    """Whether ``segmentation_models_pytorch`` (and with it timm) can be imported."""
    return importlib.util.find_spec("segmentation_models_pytorch") is not None


class SmpSegmentor(nn.Module):
    """An smp architecture with one logit per pixel, padded to its stride like our models.

    Parameters live under ``net.*`` (``net.encoder``, ``net.decoder``,
    ``net.segmentation_head``). There is no auxiliary head: ``forward`` returns the logits
    tensor in training too, which the training loop accepts as ``{"logits": ...}``.

    Args:
        arch: smp architecture name, e.g. ``"Unet"``, ``"UPerNet"``, ``"FPN"``.
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
        if not smp_available():
            raise ImportError(
                "segmentation_models_pytorch is not installed: pip install 'bldseg[smp]'"
            )
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
            # so UNet skips and FPN/UPerNet laterals line up with the upsampled coarser maps;
            # the padded border is cropped off the logits below.
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.net(x)[..., :h, :w]


def smp_model(arch: str, encoder: str, **kw: Any) -> SmpSegmentor:
    """Any smp architecture on any smp or timm encoder, as a bldseg model (random init).

    The registered ``smp_*`` names are this function with fixed arguments; to name another
    pair in a run config, register it with :func:`register_smp_model`.

    Args:
        arch: An smp architecture (``"Unet"``, ``"UPerNet"``, ``"FPN"``, ``"DeepLabV3Plus"``,
            ...; any case, as ``smp.create_model`` takes it).
        encoder: An smp encoder (``"resnet34"``) or a timm model as ``"tu-<timm name>"``.
        **kw: :class:`SmpSegmentor` keywords, then the architecture's.
    """
    return SmpSegmentor(arch, encoder, **kw)


def register_smp_model(
    arch: str, encoder: str, *, name: str | None = None, doc: str | None = None, **defaults: Any
) -> str:
    """Registers ``smp_model(arch, encoder, **defaults)`` as a segmentation model.

    The name is then valid wherever a model name is (``create_model``, ``RunConfig.model``, a
    search space). A Ray trial or a later ``load_checkpoint`` runs in another process: the
    registration must happen there too, e.g. in a module that process imports.

    Args:
        arch: An smp architecture, as in :func:`smp_model`.
        encoder: An smp or ``tu-`` timm encoder.
        name: The model name; default ``smp_<arch>_<encoder>`` in lower case, without ``tu-``
            and with ``-`` as ``_`` (``"FPN", "tu-resnet50"`` -> ``smp_fpn_resnet50``).
        doc: Its docstring (one line for listings).
        **defaults: Architecture keywords the name fixes; a caller's keywords override them.

    Returns:
        The registered name.

    Raises:
        ValueError: The name is already registered.
    """
    if name is None:
        slug = re.sub(r"\W+", "_", encoder.removeprefix("tu-")).lower()
        name = f"smp_{arch.lower()}_{slug}"

    def build(**kw: Any) -> SmpSegmentor:
        return smp_model(arch, encoder, **{**defaults, **kw})

    build.__name__ = build.__qualname__ = name
    build.__doc__ = doc or f"smp {arch}, encoder {encoder!r}, random init."
    # create_model(name, pretrained=PATH) hands the checkpoint to this loader rather than to
    # the InternImage one (bldseg.models.registry).
    build.load_pretrained = load_smp_pretrained
    register_model(build)
    return name


def load_smp_pretrained(
    model: SmpSegmentor, checkpoint: str | os.PathLike | Checkpoint
) -> LoadReport:
    """Loads weights from disk into an smp model, strictly, telling the format by its keys.

    Three formats:

    - a bldseg checkpoint (``best.pt``; ``net.*`` keys) or an smp model's ``state_dict()``
      (``encoder.*``, ``decoder.*``, ``segmentation_head.*``): the whole model;
    - an encoder: the ``state_dict()`` of the timm model (``timm.create_model("convnext_atto")``
      for ``tu-convnext_atto``) or of the torchvision-style model smp's own encoders are
      (``torchvision.models.resnet18()``), bare or as ``{"model": ...}`` / ``{"state_dict":
      ...}``; or of smp's encoder itself (``model.net.encoder.state_dict()``, also with an
      ``encoder.`` prefix). The classifier and the layers after the last feature stage are
      dropped; the decoder keeps its fresh init.

    Args:
        model: The model to fill.
        checkpoint: A path, or what :func:`bldseg.models.pretrained.read_checkpoint` returned.

    Returns:
        What was loaded, dropped and left at init.

    Raises:
        FileNotFoundError: No file at the path.
        ValueError: An unsafe or unreadable file.
        CheckpointMismatchError: (a ValueError) The weights do not fit: names the file and a
            few of the missing, unexpected and mis-shaped keys.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
    state = dict(ckpt.state_dict)
    # Whole models load by their own names and drop nothing.
    own_key: Callable[[str], str | None] = _same
    droppable: Callable[[str], bool] = _never
    if any(k.startswith("net.") for k in state):
        layout, target, prefix = "bldseg", model, ""
    elif any(k.startswith(("decoder.", "segmentation_head.")) for k in state):
        layout, target, prefix = "smp", model.net, "net."
    else:
        layout, target, prefix = "encoder", model.net.encoder, "net.encoder."
        if all(k.startswith("encoder.") for k in state):  # the encoder part of an smp model
            state = {k.removeprefix("encoder."): v for k, v in state.items()}
        own_key, droppable = _encoder_keys(model.encoder_name, target.state_dict())
    own = target.state_dict()

    mapped: dict[str, str] = {}  # our key -> the file's key
    unexpected, dropped = [], []
    for k in state:
        ours = own_key(k)
        if ours is not None and ours in own:
            mapped[ours] = k
        elif droppable(k):
            dropped.append(k)
        else:
            unexpected.append(k)
    missing = sorted(set(own) - set(mapped))
    shapes = sorted(k for k, f in mapped.items() if state[f].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(
            _mismatch_message(ckpt.path, model, layout, own, state, mapped, missing, unexpected)
        )
    target.load_state_dict({k: state[f] for k, f in mapped.items()}, strict=True)
    loaded = {prefix + k for k in mapped}
    why = "ImageNet head: classifier, final conv or norm (not part of the encoder)"
    return LoadReport(
        path=ckpt.path,
        layout=layout,
        loaded=sorted(loaded),
        dropped={why: sorted(dropped)} if dropped else {},
        initialised=sorted(k for k in model.state_dict() if k not in loaded),
    )


def _same(key: str) -> str:
    return key


def _never(key: str) -> bool:
    return False


def _smp_classifier(key: str) -> bool:
    return key.startswith(_SMP_CLASSIFIERS)


def _encoder_keys(
    encoder: str, own: Mapping[str, torch.Tensor]
) -> tuple[Callable[[str], str | None], Callable[[str], bool]]:
    """(file key -> the encoder's key or None, whether an unmatched file key may be dropped)."""
    if not encoder.startswith("tu-"):
        # smp's own encoders subclass the torchvision-style model: the same names, less the
        # classifier they delete.
        return _same, _smp_classifier
    import timm

    # smp's TimmUniversalEncoder holds timm's features_only model as `model`, and that model
    # renames what it flattens out of a Sequential: `stages.0.blocks...` -> `stages_0.blocks...`.
    # The whole timm model (built on the meta device: names only, no memory) tells which keys
    # of a timm state dict the feature model leaves out (head, final norm/conv).
    with torch.device("meta"):
        whole = set(timm.create_model(encoder.removeprefix("tu-"), pretrained=False).state_dict())

    def own_key(k: str) -> str | None:
        first, _, rest = k.partition(".")
        second, _, rest = rest.partition(".")
        flat = f"model.{first}_{second}.{rest}" if rest else None
        for cand in (k, "model." + k, flat):
            if cand in own:
                return cand
        return None

    return own_key, whole.__contains__


def _mismatch_message(
    path: str,
    model: SmpSegmentor,
    layout: str,
    own: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    mapped: Mapping[str, str],
    missing: list[str],
    unexpected: list[str],
) -> str:
    what = {
        "bldseg": "a bldseg checkpoint",
        "smp": "an smp model's state_dict",
        "encoder": "encoder weights",
    }[layout]
    shapes = [
        f"{mapped[k]}: checkpoint {tuple(state[mapped[k]].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(mapped)
        if state[mapped[k]].shape != own[k].shape
    ]
    lines = [
        f"{path} (read as {what}) does not fit smp {model.arch} with encoder "
        f"{model.encoder_name!r}: {len(missing)} missing, {len(unexpected)} unexpected, "
        f"{len(shapes)} of another shape"
    ]
    for title, keys in (
        ("missing from the checkpoint (names in smp's encoder)", missing),
        ("unexpected in the checkpoint", sorted(unexpected)),
        ("shape mismatch", shapes),
    ):
        if keys:
            more = f", and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
            lines.append(f"  {title}: {', '.join(keys[:_SHOWN])}{more}")
    timm_name = model.encoder_name.removeprefix("tu-")
    source = (
        f"timm.create_model({timm_name!r})"
        if model.encoder_name.startswith("tu-")
        else "the torchvision-style model of smp's encoder"
    )
    lines.append(
        f"Expected the state_dict of {source} (encoder weights), of a whole model of this "
        "architecture and encoder (a bldseg best.pt or an smp state_dict), or of the encoder "
        "of another model with the same encoder. Is the file for this encoder?"
    )
    return "\n".join(lines)


def _param_table() -> str:
    """The registered smp models and their parameter counts, one per line (for docs)."""
    from bldseg.models.registry import create_model, list_models

    rows = []
    for name in (n for n in list_models() if n.startswith("smp_")):
        n_params = sum(p.numel() for p in create_model(name).parameters())
        rows.append(f"{name:32s} {n_params / 1e6:7.2f}M")
    return "\n".join(rows)


def _register_defaults() -> None:
    for arch_name, arch in ARCHS.items():
        for enc_name, encoder in ENCODERS.items():
            register_smp_model(
                arch,
                encoder,
                name=f"smp_{arch_name}_{enc_name}",
                doc=f"smp {arch}, encoder {encoder!r}, random init.",
            )
        if arch_name == "unet":
            for enc_name, (encoder, kwargs) in CPU_UNETS.items():
                register_smp_model(
                    arch,
                    encoder,
                    name=f"smp_unet_{enc_name}",
                    doc=f"smp Unet, encoder {encoder!r}, {kwargs}, random init.",
                    **kwargs,
                )
        register_smp_model(
            arch,
            TINY_ENCODER,
            name=f"smp_{arch_name}_tiny",
            doc=f"smp {arch} on timm's test ResNet with a narrow decoder, for fast CPU tests.",
            **TINY_DECODERS[arch_name],
        )


if smp_available():
    _register_defaults()
