"""DCNv3 (deformable convolution v3, InternImage): typed functional and ``nn.Module``.

The compiled op (``csrc/dcnv3``, ops ``torch.ops.bldseg.dcnv3_forward`` / ``_backward``) is
built on first use by the JIT loader in ``_build.py``. Autograd and fake (meta) kernels are
registered here with ``torch.library``, so the op works with autograd, ``torch.compile``
(no graph break) and ``torch.export``. The pure-PyTorch ``dcnv3_reference`` documents the
semantics and is the fallback.

``torch.compile``: :class:`DCNv3` loads the op when it is built, because the loader cannot be
traced, so a model compiles with ``fullgraph=True`` in a fresh process too; a bare
:func:`dcnv3` compiled before any eager call needs :func:`load_dcnv3_op` first. With inductor,
tiles whose H and W vary between calls fail when the parameters require grad: torch's
automatic dynamic shapes (``dynamic=None``, the default) recompile with symbolic H and W at the
second size, and inductor's lowering raises "cannot determine truth value of Relational"
(torch 2.13). Compile such models with ``dynamic=False`` (one graph per tile size) or mark H
and W static (``torch._dynamo.mark_static(x, 1)`` and ``(x, 2)`` on each input); a varying
batch size alone is fine.

Choosing the implementation (``impl``):
    "auto"       compiled op if it builds, else the reference with one warning per process;
    "compiled"   compiled op, raising the compiler's message if it cannot be built;
    "reference"  the pure-PyTorch reference.
``impl=None`` (the default) and ``"auto"`` read ``$BLDSEG_DCNV3_IMPL``, falling back to
"auto": the variable forces every model's op (models and run configs pass "auto") without
touching their configs; an explicit "compiled" or "reference" wins over it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ._build import CSRC_DIR, BuildError, BuildInfo, NativeExtension
from ._layers import ActName, NormName, build_act_layer, build_norm_layer
from .dcnv3_reference import dcnv3_reference

__all__ = ["DCNv3", "Impl", "dcnv3", "dcnv3_output_size", "load_dcnv3_op", "point_softmax"]

Impl = Literal["auto", "compiled", "reference"]
IMPL_ENV_VAR = "BLDSEG_DCNV3_IMPL"
_IMPLS = ("auto", "compiled", "reference")

_DCNV3_DIR = CSRC_DIR / "dcnv3"


def _register_python_kernels(_library: object) -> None:
    """Fake (shape-only) and autograd kernels of the two ops; run once after loading."""
    torch.library.register_fake("bldseg::dcnv3_forward")(_forward_fake)
    torch.library.register_fake("bldseg::dcnv3_backward")(_backward_fake)
    torch.library.register_autograd(
        "bldseg::dcnv3_forward", _forward_backward, setup_context=_forward_setup_context
    )
    # The backward has no derivative of its own: without this, autograd treated it as a
    # constant and a double backward (a gradient penalty) silently gave zeros.
    torch.library.register_autograd(
        "bldseg::dcnv3_backward", _no_double_backward, setup_context=_no_setup
    )


def _no_setup(ctx: Any, inputs: tuple, output: Any) -> None:
    pass


def _no_double_backward(ctx: Any, *grads: torch.Tensor) -> tuple:
    raise NotImplementedError(
        "the compiled DCNv3 op has no double backward (gradients of its gradients); use "
        "impl='reference' for that"
    )


def _cuda_sources() -> list[os.PathLike]:
    # The CUDA helper's kernels and glue; absent folders simply give a CPU-only build.
    folder = _DCNV3_DIR / "cuda"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix in (".cu", ".cpp"))


_OP = NativeExtension(
    "bldseg_dcnv3",
    [_DCNV3_DIR / "dcnv3.cpp", _DCNV3_DIR / "cpu" / "dcnv3_cpu_kernel.cpp"],
    cuda_sources=_cuda_sources(),
    on_load=_register_python_kernels,
)


def load_dcnv3_op(verbose: bool = False) -> BuildInfo:
    """Builds (once per machine) and loads (once per process) the compiled DCNv3 op.

    Args:
        verbose: Print the compiler commands and output.

    Returns:
        Where the op was built and whether this call compiled it.

    Raises:
        BuildError: The op cannot be built; the message carries the compiler output.
    """
    return _OP.load(verbose=verbose)


# ----------------------------------------------------------------------------------------
# torch.library kernels


def _forward_fake(
    input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, *args: Any
) -> torch.Tensor:
    # Output (N, H_out, W_out, G*C): spatial size from offset, channels from input.
    return input.new_empty((offset.shape[0], offset.shape[1], offset.shape[2], input.shape[3]))


def _backward_fake(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    grad_output: torch.Tensor,
    *args: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(input), torch.empty_like(offset), torch.empty_like(mask)


def _forward_setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    input, offset, mask, *params = inputs
    ctx.save_for_backward(input, offset, mask)
    ctx.params = params  # the ints, float and bool after the tensors, in schema order


def _forward_backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    input, offset, mask = ctx.saved_tensors
    grad_input, grad_offset, grad_mask = torch.ops.bldseg.dcnv3_backward(
        input, offset, mask, grad_output.contiguous(), *ctx.params
    )
    return (grad_input, grad_offset, grad_mask) + (None,) * len(ctx.params)


# ----------------------------------------------------------------------------------------
# Functional


def dcnv3_output_size(
    size: int, kernel: int, stride: int = 1, pad: int = 0, dilation: int = 1
) -> int:
    """Output length of DCNv3 along one axis (the convolution formula)."""
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def _validate(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    group: int,
    group_channels: int,
    im2col_step: int,
) -> None:
    for name, t in (("input", input), ("offset", offset), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"dcnv3: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"dcnv3: {name} must have rank 4 (channels-last N, H, W, C), got shape "
                f"{tuple(t.shape)}"
            )
    ints = {
        "kernel_h": kernel_h,
        "kernel_w": kernel_w,
        "stride_h": stride_h,
        "stride_w": stride_w,
        "dilation_h": dilation_h,
        "dilation_w": dilation_w,
        "group": group,
        "group_channels": group_channels,
        "im2col_step": im2col_step,
    }
    for name, value in ints.items():
        if value <= 0:
            raise ValueError(f"dcnv3: {name} must be > 0, got {value}")
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"dcnv3: pad_h and pad_w must be >= 0, got {pad_h} and {pad_w}")
    if not (input.dtype == offset.dtype == mask.dtype):
        raise ValueError(
            f"dcnv3: input, offset and mask must share a dtype, got {input.dtype}, "
            f"{offset.dtype} and {mask.dtype}"
        )
    if not input.dtype.is_floating_point:
        raise ValueError(f"dcnv3: expected floating tensors, got {input.dtype}")
    if not (input.device == offset.device == mask.device):
        raise ValueError(
            f"dcnv3: input, offset and mask must be on one device, got {input.device}, "
            f"{offset.device} and {mask.device}"
        )
    n, h_in, w_in, channels = input.shape
    if channels != group * group_channels:
        raise ValueError(
            f"dcnv3: input has {channels} channels but group * group_channels = {group} * "
            f"{group_channels} = {group * group_channels}"
        )
    h_out = dcnv3_output_size(h_in, kernel_h, stride_h, pad_h, dilation_h)
    w_out = dcnv3_output_size(w_in, kernel_w, stride_w, pad_w, dilation_w)
    if h_out <= 0 or w_out <= 0:
        raise ValueError(
            f"dcnv3: input {h_in}x{w_in} is too small for kernel ({kernel_h}, {kernel_w}), "
            f"dilation ({dilation_h}, {dilation_w}) and pad ({pad_h}, {pad_w}): output would "
            f"be {h_out}x{w_out}"
        )
    points = kernel_h * kernel_w
    expected = {
        "offset": (n, h_out, w_out, group * points * 2),
        "mask": (n, h_out, w_out, group * points),
    }
    for name, t in (("offset", offset), ("mask", mask)):
        if tuple(t.shape) != expected[name]:
            what = "group*kernel_h*kernel_w" + ("*2" if name == "offset" else "")
            raise ValueError(
                f"dcnv3: {name} must have shape {expected[name]} = (N, H_out, W_out, {what}), "
                f"got {tuple(t.shape)}"
            )


def _resolve_impl(impl: Impl | None) -> Impl:
    if impl in (None, "auto"):
        impl = os.environ.get(IMPL_ENV_VAR) or "auto"  # type: ignore[assignment]
    if impl not in _IMPLS:
        raise ValueError(
            f"dcnv3: impl must be one of {_IMPLS}, got {impl!r} (check ${IMPL_ENV_VAR})"
        )
    return impl  # type: ignore[return-value]


def _load_for(impl: Impl | None) -> None:
    """Loads the compiled op now if ``impl`` may run it (see :class:`DCNv3`).

    A failure is left to the op's first call to report, as without this: "auto" warns once
    (now) and runs the reference, "compiled" raises the remembered build error there, and an
    unknown ``impl`` raises there too.
    """
    if _OP.ready:
        return
    try:
        impl = _resolve_impl(impl)
    except ValueError:
        return  # the first call says what is wrong with it
    if impl == "auto":
        _OP.try_load()
    elif impl == "compiled":
        # remembered by _OP: the first call raises it, where "compiled" is used
        with contextlib.suppress(BuildError):
            _OP.load()


def _compiled_available(impl: Impl, device: torch.device) -> bool:
    """Whether to run the compiled op; raises for "compiled" when it cannot."""
    if impl == "reference":
        return False
    if impl == "compiled":
        if not _OP.ready:  # checked first: torch.compile must not trace into load()
            _OP.load()  # raises BuildError with the compiler output
    elif not (_OP.ready or _OP.try_load()):
        return False
    info = _OP.info
    assert info is not None
    if device.type == "cuda" and not info.with_cuda:
        reason = (
            "the op was built without CUDA kernels (no CUDA toolkit found when it was built, "
            f"or none in {_DCNV3_DIR / 'cuda'})"
        )
        if impl == "compiled":
            raise BuildError(f"dcnv3: impl='compiled' on a CUDA tensor, but {reason}")
        _OP.warn_once(reason)
        return False
    return device.type in ("cpu", "cuda", "meta")


def dcnv3(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    group: int,
    group_channels: int,
    offset_scale: float,
    im2col_step: int = 256,
    impl: Impl | None = None,
    mask_softmax: bool = False,
) -> torch.Tensor:
    """Deformable convolution v3 core, channels-last (no learnable weights).

    Same semantics as :func:`~bldseg.ops.dcnv3_reference.dcnv3_reference` (see there) and
    the official InternImage op. Differentiable in ``input``, ``offset`` and ``mask``.

    Args:
        input: (N, H_in, W_in, group*group_channels).
        offset: (N, H_out, W_out, group*P*2), ordered [group][point][x, y], P =
            kernel_h*kernel_w (points w outer, h inner).
        mask: (N, H_out, W_out, group*P).
        kernel_h: Kernel points along h.
        kernel_w: Kernel points along w.
        stride_h: Output stride along h.
        stride_w: Output stride along w.
        pad_h: Virtual zero padding along h.
        pad_w: Virtual zero padding along w.
        dilation_h: Spacing of the kernel points along h.
        dilation_w: Spacing of the kernel points along w.
        group: Number of groups G.
        group_channels: Channels per group C.
        offset_scale: Scales both the kernel-point grid and the offsets.
        im2col_step: The official op's batch chunk (its default 256); validated for
            compatibility, unused by both our kernels.
        impl: "auto", "compiled" or "reference"; None and "auto" read ``$BLDSEG_DCNV3_IMPL``
            (default "auto").
        mask_softmax: ``mask`` holds logits: the op uses the softmax over the P points of
            each group (what the DCNv3 module does before the op), and its gradient is that of
            the logits. The CPU kernels fuse it (PyTorch's CPU softmax over a last dimension
            of 9 is slow); elsewhere it runs as ``torch.softmax``.

    Returns:
        (N, H_out, W_out, group*group_channels), dtype of ``input``; float16 and bfloat16
        are sampled in float32 by every implementation (as under bf16 autocast).

    Raises:
        ValueError: Inconsistent shapes, dtypes, devices or parameters.
        BuildError: ``impl="compiled"`` and the op cannot be built.
    """
    _validate(
        input,
        offset,
        mask,
        kernel_h,
        kernel_w,
        stride_h,
        stride_w,
        pad_h,
        pad_w,
        dilation_h,
        dilation_w,
        group,
        group_channels,
        im2col_step,
    )
    params = (
        kernel_h,
        kernel_w,
        stride_h,
        stride_w,
        pad_h,
        pad_w,
        dilation_h,
        dilation_w,
        group,
        group_channels,
        float(offset_scale),
    )
    if not _compiled_available(_resolve_impl(impl), input.device):
        if mask_softmax:
            # Half types: the softmax in float32 too, as the compiled op takes it; the
            # reference computes them in float32 anyway.
            if mask.dtype in (torch.float16, torch.bfloat16):
                mask = mask.float()
            mask = point_softmax(mask, group)
        return dcnv3_reference(input, offset, mask, *params)
    return torch.ops.bldseg.dcnv3_forward(
        input.contiguous(),
        offset.contiguous(),
        mask.contiguous(),
        *params,
        im2col_step,
        mask_softmax,
    )


def point_softmax(mask: torch.Tensor, group: int) -> torch.Tensor:
    """(N, H, W, group*P) logits -> probabilities, softmax over each group's P points."""
    n, h, w, gp = mask.shape
    return F.softmax(mask.reshape(n, h, w, group, gp // group), -1).reshape(n, h, w, gp)


# ----------------------------------------------------------------------------------------
# Module


class DCNv3(nn.Module):
    """The DCNv3 block of InternImage, with the official parameter names and shapes.

    x -> input_proj -> dcnv3(offset, mask) [-> centre feature scale] -> output_proj, where
    offsets and masks are predicted from depthwise-conv(x) -> LN -> GELU, masks go through a
    softmax over the P points of each group, and offset/mask layers start at zero (so the op
    starts as a plain mask-averaged 3x3 sampling).

    Args:
        channels: Input and output channels, group * group_channels.
        kernel_size: Kernel points per side (P = kernel_size**2).
        dw_kernel_size: Kernel of the depthwise conv; default ``kernel_size``.
        stride: Op stride; offsets are predicted at input resolution, so it must be 1.
        pad: Op padding; must keep the size, (dilation*(kernel_size-1)) / 2.
        dilation: Spacing of the kernel points.
        group: Number of groups; channels must be divisible by it.
        offset_scale: Scales the kernel grid and the offsets.
        act_layer: Activation after the depthwise conv: "GELU", "ReLU" or "SiLU".
        norm_layer: Norm after the depthwise conv: "LN" or "BN".
        center_feature_scale: Blend the op output with the projected input by a learned
            per-group sigmoid gate (adds ``center_feature_scale_proj_{weight,bias}``).
        remove_center: Drop the centre point of the kernel (odd kernel_size only); the op
            then sees it with a zero mask, which is identical.
        impl: Implementation of the op, see :func:`dcnv3`.
    """

    def __init__(
        self,
        channels: int = 64,
        kernel_size: int = 3,
        dw_kernel_size: int | None = None,
        stride: int = 1,
        pad: int = 1,
        dilation: int = 1,
        group: int = 4,
        offset_scale: float = 1.0,
        act_layer: ActName = "GELU",
        norm_layer: NormName = "LN",
        center_feature_scale: bool = False,
        remove_center: bool = False,
        impl: Impl | None = None,
    ) -> None:
        super().__init__()
        if channels % group != 0:
            raise ValueError(f"channels ({channels}) must be divisible by group ({group})")
        if stride != 1 or 2 * pad != dilation * (kernel_size - 1):
            raise ValueError(
                "DCNv3 predicts offsets at the input resolution, so the op must keep the size: "
                f"use stride=1 and pad=dilation*(kernel_size-1)/2, got stride={stride}, "
                f"pad={pad}, dilation={dilation}, kernel_size={kernel_size}"
            )
        if remove_center and kernel_size % 2 == 0:
            raise ValueError(f"remove_center needs an odd kernel_size, got {kernel_size}")
        dw_kernel_size = dw_kernel_size if dw_kernel_size is not None else kernel_size
        self.channels = channels
        self.kernel_size = kernel_size
        self.dw_kernel_size = dw_kernel_size
        self.stride = stride
        self.pad = pad
        self.dilation = dilation
        self.group = group
        self.group_channels = channels // group
        self.offset_scale = offset_scale
        self.center_feature_scale = center_feature_scale
        self.remove_center = int(remove_center)
        self.impl = impl
        # Load the compiled op now, not at the first forward: that may be under torch.compile,
        # which cannot trace the loader (it builds and registers ops, so it is excluded from
        # tracing): a graph break there, an error with fullgraph=True.
        _load_for(impl)
        # Whether the op takes the mask softmax itself (fused in the CPU kernels, where torch's
        # softmax over 9 points was a fifth of the module); False: torch.softmax before the op,
        # as the official module does (the readable path; same result within rounding).
        self.fused_softmax = True
        # Points with learned offsets and masks (the centre one is dropped by remove_center).
        points = kernel_size * kernel_size - self.remove_center

        self.dw_conv = nn.Sequential(
            nn.Conv2d(
                channels,
                channels,
                kernel_size=dw_kernel_size,
                stride=1,
                padding=(dw_kernel_size - 1) // 2,
                groups=channels,
            ),
            build_norm_layer(channels, norm_layer, "channels_first", "channels_last"),
            build_act_layer(act_layer),
        )
        self.offset = nn.Linear(channels, group * points * 2)
        self.mask = nn.Linear(channels, group * points)
        self.input_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        if center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(
                torch.zeros((group, channels), dtype=torch.float)
            )
            self.center_feature_scale_proj_bias = nn.Parameter(
                torch.zeros((group,), dtype=torch.float)
            )
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.constant_(self.offset.weight, 0.0)
        nn.init.constant_(self.offset.bias, 0.0)
        nn.init.constant_(self.mask.weight, 0.0)
        nn.init.constant_(self.mask.bias, 0.0)
        nn.init.xavier_uniform_(self.input_proj.weight)
        nn.init.constant_(self.input_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def _insert_center(
        self, offset: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # remove_center: give the op the full kernel with a zero-offset, zero-mask centre point
        # (p = (P-1)/2 in w-outer order), which contributes exactly nothing.
        n, h, w, _ = mask.shape
        g, centre = self.group, (self.kernel_size * self.kernel_size - 1) // 2
        offset = offset.reshape(n, h, w, g, -1, 2)
        mask = mask.reshape(n, h, w, g, -1)
        offset = torch.cat(
            [offset[..., :centre, :], offset.new_zeros(n, h, w, g, 1, 2), offset[..., centre:, :]],
            dim=-2,
        )
        mask = torch.cat(
            [mask[..., :centre], mask.new_zeros(n, h, w, g, 1), mask[..., centre:]], dim=-1
        )
        return offset.reshape(n, h, w, -1), mask.reshape(n, h, w, -1)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """(N, H, W, channels) -> (N, H, W, channels)."""
        x = self.input_proj(input)  # (N, H, W, C)
        x_proj = x
        x1 = self.dw_conv(input.permute(0, 3, 1, 2))  # (N, H, W, C), channels-last after LN
        offset = self.offset(x1)  # (N, H, W, G*P*2)
        mask = self.mask(x1).type(x.dtype)  # (N, H, W, G*P) logits
        # The op takes the softmax over each group's points (fused in the CPU kernel), except
        # with remove_center: the inserted centre needs a zero probability, not a zero logit.
        fused_softmax = self.fused_softmax and not self.remove_center
        if not fused_softmax:
            mask = point_softmax(mask, self.group).type(x.dtype)  # autocast: float32 out
        if self.remove_center:
            offset, mask = self._insert_center(offset, mask)
        k = self.kernel_size
        x = dcnv3(
            x,
            offset,
            mask,
            k,
            k,
            self.stride,
            self.stride,
            self.pad,
            self.pad,
            self.dilation,
            self.dilation,
            self.group,
            self.group_channels,
            self.offset_scale,
            256,
            impl=self.impl,
            mask_softmax=fused_softmax,
        )
        if self.center_feature_scale:
            scale = F.linear(
                x1, self.center_feature_scale_proj_weight, self.center_feature_scale_proj_bias
            ).sigmoid()  # (N, H, W, G)
            scale = scale[..., None].expand(-1, -1, -1, -1, self.group_channels).flatten(-2)
            x = x * (1 - scale) + x_proj * scale
        return self.output_proj(x)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, kernel_size={self.kernel_size}, group={self.group}, "
            f"offset_scale={self.offset_scale}, remove_center={bool(self.remove_center)}"
        )
