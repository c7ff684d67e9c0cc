"""Bilinear resizing (mmseg's ``resize``, ``align_corners=False``) with GEMMs on CPUs.

``F.interpolate(x, size, mode="bilinear", align_corners=False)`` is a separable linear map:
``out = A_h @ x @ A_w^T`` with ``A`` an (out, in) matrix of at most two non-zero weights per
row, so its backward is ``A_h^T @ g @ A_w``: two GEMMs. On a CPU PyTorch's own bilinear
backward walks the output pixel by pixel with scattered adds, and its NCHW forward is slow as
well: for UPerNet-InternImage-T's head maps ((8, 512, 28², 7²) -> 56²) 180-210 ms forward and
backward against about 40 ms as GEMMs.

:func:`resize_bilinear` computes NCHW maps and their input gradient as GEMMs over a few
images at a time, saving nothing for the backward, so a step's peak memory does not grow;
channels-last maps stay ATen's (fast). Equal to ``F.interpolate`` up to float rounding
(tested in float64: upsampling, downsampling, NCHW and NHWC, values and gradients).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

#: Images per GEMM batch: about this many floats of input at a time, so the GEMMs' temporaries
#: stay a few MiB (whole-batch GEMMs saving their products raised T's step peak ~140 MiB).
_CHUNK_FLOATS = 1 << 21


def resize_bilinear(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, H, W), bilinear, ``align_corners=False``, no antialiasing.

    NCHW float maps on a CPU: forward and backward (``A_h^T @ g @ A_w``) as GEMMs. Channels-last
    maps, CUDA tensors and non-float ones: ``F.interpolate`` (ATen's kernels are fast there).
    """
    out_h, out_w = int(size[0]), int(size[1])
    if (out_h, out_w) == tuple(x.shape[-2:]):
        return x
    if not x.is_floating_point() or x.device.type != "cpu" or _channels_last(x):
        # ATen's kernels are fast on CUDA and for NHWC maps (the GEMMs measured 1.15x slower
        # in the channels-last tiny model's step)
        return F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False)
    if torch.is_grad_enabled() and x.requires_grad:
        return _ResizeBilinear.apply(x, out_h, out_w)
    return _forward(x, out_h, out_w)


class _ResizeBilinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
        ctx.in_size = tuple(x.shape[-2:])
        return _forward(x, out_h, out_w)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (h, w), (out_h, out_w) = ctx.in_size, grad.shape[-2:]
        a_h = _weights(h, out_h, grad.dtype, grad.device)  # (H, h)
        a_w = _weights(w, out_w, grad.dtype, grad.device)  # (W, w)
        # grad_x = A_h^T @ grad @ A_w: the same separable map with the transposed matrices
        return _separable(grad, a_h.t(), a_w.t()), None, None


def _forward(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    # ATen's NCHW kernel is slow (T's 28² -> 56² maps: 137 ms against 33 as GEMMs)
    h, w = x.shape[-2:]
    a_h = _weights(h, out_h, x.dtype, x.device)  # (H, h)
    a_w = _weights(w, out_w, x.dtype, x.device)  # (W, w)
    return _separable(x, a_h, a_w)


@functools.lru_cache(maxsize=64)
def _weights(n_in: int, n_out: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # As ATen's upsample_bilinear2d with an output size and no scale factor:
    # src = (dst + 0.5) * n_in / n_out - 0.5, clamped at 0; the right tap clamped at the edge.
    scale = n_in / n_out
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * scale - 0.5).clamp_(min=0.0)
    left = src.floor().long().clamp_(max=n_in - 1)
    right = (left + 1).clamp_(max=n_in - 1)
    frac = (src - left).clamp_(0.0, 1.0)
    a = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    a.index_put_((rows, left), 1.0 - frac, accumulate=True)
    a.index_put_((rows, right), frac, accumulate=True)
    return a.to(dtype=dtype, device=device)  # (n_out, n_in)


def _separable(x: torch.Tensor, m_h: torch.Tensor, m_w: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, H, W) = m_h (H, h) @ x @ m_w (W, w)^T, NCHW out.

    Only NCHW maps come here (channels-last ones go to ATen); a gradient in another layout is
    copied to NCHW by the reshapes, which stays correct.
    """
    b, c, h, w = x.shape
    out_h, out_w = m_h.shape[0], m_w.shape[0]
    out = torch.empty((b, c, out_h, out_w), dtype=x.dtype, device=x.device)
    step = max(1, _CHUNK_FLOATS // max(1, c * h * w))
    for i in range(0, b, step):
        xs, n = x[i : i + step], min(step, b - i)
        # one plain GEMM over the columns, then the rows per (image, channel) map
        y = (xs.reshape(n * c * h, w) @ m_w.t()).reshape(n * c, h, out_w)  # (n*C, h, W)
        out[i : i + n] = torch.matmul(m_h, y).reshape(n, c, out_h, out_w)
    return out


def _channels_last(x: torch.Tensor) -> bool:
    # NHWC in memory, judged by the strides as ATen does: a 1x1 map is contiguous in both
    # formats, and its strides say which one it was made as (C is 1 apart, W is C apart).
    return (
        x.shape[1] > 1
        and x.is_contiguous(memory_format=torch.channels_last)
        and x.stride(1) == 1
        and x.stride(3) == x.shape[1]
    )
