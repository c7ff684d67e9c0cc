"""Pure-PyTorch DCNv3: the documented semantics of the op, used by tests as ground truth.

It is written to be read, not to be fast: it samples a (N*G, C, H_out*W_out, P) tensor with
``grid_sample``, P = kernel_h*kernel_w times the output, which is what makes the official
fallback slow and memory hungry. The compiled op in ``csrc/dcnv3`` computes the same thing
point by point without materialising it.

Semantics (official InternImage DCNv3, channels-last):
    For output pixel (ho, wo), group g and kernel point (i, j) (i along w, j along h; the
    points are ordered w outer, h inner: p = i*kernel_h + j), with
    half_w = (dilation_w*(kernel_w-1)) // 2 and s = offset_scale, the sampling location in
    pixels of the zero-padded input (pixel centres at integers) is

        x = half_w + wo*stride_w + (i*dilation_w - half_w) * s + offset[..., g, p, 0] * s
        y = half_h + ho*stride_h + (j*dilation_h - half_h) * s + offset[..., g, p, 1] * s

    and output[..., g, :] = sum_p mask[..., g, p] * bilinear(input[..., g, :], y, x), reading
    zeros outside the padded input.

float16 and bfloat16 inputs are computed in float32 and the output rounded to the input's
dtype once, as the compiled op does. bfloat16 keeps 8 significant bits, too few for sampling
locations in pixels (they are 1 apart from 128 on): sampled in bfloat16, what CPU bf16
autocast hands the op, an identity sampling was off by 0.16 on a 32-pixel tile and gave
2.6e38 or NaN on 128- and 224-pixel ones.

Differences from the official ``dcnv3_core_pytorch`` (both deliberate, both invisible for the
square kernels and equal paddings InternImage uses):
    - the base grid is built in the input's dtype (float32 for half types), not always
      float32, so float64 is exact;
    - ``F.pad`` pads H by pad_h and W by pad_w (the official call swaps them).
And one difference from the official CUDA kernel, which the compiled op follows: at a
location exactly on the -1 border (x == -1 or y == -1) the CUDA kernel skips the point, so the
offset gradient is 0 there, while ``grid_sample`` returns the one-sided derivative. Likewise a
non-finite location (a NaN or infinite offset) is skipped by the compiled and official kernels
(the point adds nothing), while ``grid_sample`` gives NaN. And at a location exactly on an
integer pixel position the bilinear weights have a kink: the kernels take the derivative on
the side of an exact ``floor``, while ``grid_sample`` maps its normalised coordinate back to
pixels as ``((g + 1) * size - 1) / 2``, which for many padded sizes (not powers of two)
lands a hair below the integer and takes the other side's. Outputs and the input and mask
gradients agree; the offset gradient of such points can differ. At initialisation (offset
projections zero) every point sits on an integer, so the fallback's first-step offset
gradient differs from the compiled op's (both are one-sided derivatives; the official
``dcnv3_core_pytorch``, also built on ``grid_sample``, behaves as this reference does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dcnv3_reference"]


def _base_grid(
    h_out: int,
    w_out: int,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    dilation_h: int,
    dilation_w: int,
    offset_scale: float,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Sampling locations for zero offsets, in padded-input pixels: (H_out, W_out, P, 2)."""
    half_h = (dilation_h * (kernel_h - 1)) // 2
    half_w = (dilation_w * (kernel_w - 1)) // 2
    # Kernel centres of the output pixels.
    centre_y = half_h + stride_h * torch.arange(h_out, dtype=dtype, device=device)  # (H_out,)
    centre_x = half_w + stride_w * torch.arange(w_out, dtype=dtype, device=device)  # (W_out,)
    # Kernel points around a centre, w outer and h inner, scaled by offset_scale.
    kx = (dilation_w * torch.arange(kernel_w, dtype=dtype, device=device) - half_w) * offset_scale
    ky = (dilation_h * torch.arange(kernel_h, dtype=dtype, device=device) - half_h) * offset_scale
    kx, ky = torch.meshgrid(kx, ky, indexing="ij")  # (kernel_w, kernel_h) each
    points = torch.stack((kx.reshape(-1), ky.reshape(-1)), -1)  # (P, 2) as (x, y)
    centres = torch.stack(
        torch.meshgrid(centre_x, centre_y, indexing="xy"), -1
    )  # (H_out, W_out, 2)
    return centres[:, :, None, :] + points  # (H_out, W_out, P, 2)


def dcnv3_reference(
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
) -> torch.Tensor:
    """Deformable convolution v3 core, pure PyTorch (no learnable weights).

    Args:
        input: (N, H_in, W_in, group*group_channels), channels-last.
        offset: (N, H_out, W_out, group*P*2), ordered [group][point][x, y], P =
            kernel_h*kernel_w, in input pixels (before offset_scale).
        mask: (N, H_out, W_out, group*P), the weight of each sampled point.
        kernel_h: Kernel points along h.
        kernel_w: Kernel points along w.
        stride_h: Output stride along h.
        stride_w: Output stride along w.
        pad_h: Zero padding of the input along h.
        pad_w: Zero padding of the input along w.
        dilation_h: Spacing of the kernel points along h.
        dilation_w: Spacing of the kernel points along w.
        group: Number of groups G; each has its own offsets and mask.
        group_channels: Channels per group C.
        offset_scale: Scales both the kernel-point grid and the offsets.

    Returns:
        (N, H_out, W_out, group*group_channels), dtype of ``input``; float16 and bfloat16
        are computed in float32 (gradients flow back through the casts).
    """
    dtype = input.dtype
    if dtype in (torch.float16, torch.bfloat16):
        input, offset, mask = input.float(), offset.float(), mask.float()
    n, h_in, w_in, _ = input.shape
    _, h_out, w_out, _ = offset.shape
    g, c, p = group, group_channels, kernel_h * kernel_w

    # 1. Zero-pad the input; locations are then in padded pixels.
    x = F.pad(input, [0, 0, pad_w, pad_w, pad_h, pad_h])  # (N, Hp, Wp, G*C)
    h_pad, w_pad = h_in + 2 * pad_h, w_in + 2 * pad_w

    # 2. Sampling locations = base grid + scaled offsets.
    base = _base_grid(
        h_out,
        w_out,
        kernel_h,
        kernel_w,
        stride_h,
        stride_w,
        dilation_h,
        dilation_w,
        offset_scale,
        input.dtype,
        input.device,
    )  # (H_out, W_out, P, 2)
    offset = offset.reshape(n, h_out, w_out, g, p, 2)
    loc = base[:, :, None] + offset * offset_scale  # (N, H_out, W_out, G, P, 2)

    # 3. To grid_sample's [-1, 1] coordinates (align_corners=False: pixel centre i sits at
    #    (2i + 1) / size - 1).
    size = torch.tensor([w_pad, h_pad], dtype=input.dtype, device=input.device)
    grid = (2 * loc + 1) / size - 1  # (N, H_out, W_out, G, P, 2)
    grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(n * g, h_out * w_out, p, 2)

    # 4. Bilinear sampling of every point: (N*G, C, H_out*W_out, P), P times the output.
    x = x.reshape(n, h_pad, w_pad, g, c).permute(0, 3, 4, 1, 2).reshape(n * g, c, h_pad, w_pad)
    sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # 5. Weighted sum over the points with the mask.
    mask = (
        mask.reshape(n, h_out * w_out, g, p).permute(0, 2, 1, 3).reshape(n * g, 1, h_out * w_out, p)
    )
    out = (sampled * mask).sum(-1)  # (N*G, C, H_out*W_out)
    out = out.reshape(n, g * c, h_out, w_out).permute(0, 2, 3, 1)  # (N, H_out, W_out, G*C)
    return out.to(dtype).contiguous()
