"""Bilinear resizing as two small matrix products (mmseg's ``resize``, ``align_corners=False``).

``F.interpolate(x, size, mode="bilinear", align_corners=False)`` is a separable linear map:
``out = A_h @ x @ A_w^T`` with ``A`` an (out, in) matrix of at most two non-zero weights per
row. Written that way the forward and the backward (``A_h^T @ g @ A_w``) are GEMMs. On a CPU
PyTorch's own bilinear backward walks the output pixel by pixel with scattered adds; for the
demo's tiny UPerNet it was 8% of a training step (12 resizes per step, 192-px crops).

:func:`resize_bilinear` gives what ``F.interpolate`` gives up to float rounding (tested in
float64 against it, values and gradients, upsampling and downsampling, NCHW and NHWC).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


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


def resize_bilinear(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, H, W), bilinear, ``align_corners=False``, no antialiasing.

    The result keeps the input's memory format (channels-last in, channels-last out).
    Non-float inputs, and CUDA tensors (where ATen's kernel is already fast), go through
    ``F.interpolate``.
    """
    b, c, h, w = x.shape
    out_h, out_w = int(size[0]), int(size[1])
    if (out_h, out_w) == (h, w):
        return x
    if not x.is_floating_point() or x.device.type != "cpu":
        return F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False)
    a_h = _weights(h, out_h, x.dtype, x.device)  # (H, h)
    a_w = _weights(w, out_w, x.dtype, x.device)  # (W, w)
    if _channels_last(x):
        # NHWC in memory: (B, h, w*C) rows first, then (B*H, w, C) columns, no layout copies
        nhwc = x.permute(0, 2, 3, 1)  # (B, h, w, C), a view
        y = torch.matmul(a_h, nhwc.reshape(b, h, w * c))  # (B, H, w*C)
        y = torch.matmul(a_w, y.reshape(b * out_h, w, c))  # (B*H, W, C)
        return y.reshape(b, out_h, out_w, c).permute(0, 3, 1, 2)  # (B, C, H, W), NHWC memory
    y = torch.matmul(x, a_w.t())  # (B, C, h, W)
    return torch.matmul(a_h, y)  # (B, C, H, W)


def _channels_last(x: torch.Tensor) -> bool:
    # NHWC in memory, judged by the strides as ATen does: a 1x1 map is contiguous in both
    # formats, and its strides say which one it was made as (C is 1 apart, W is C apart).
    return (
        x.shape[1] > 1
        and x.is_contiguous(memory_format=torch.channels_last)
        and x.stride(1) == 1
        and x.stride(3) == x.shape[1]
    )
