import pytest
import torch
import torch.nn.functional as F

from bldseg.models.resize import resize_bilinear

SIZES = [
    ((6, 6), (48, 48)),  # the UPerNet levels to stride 4
    ((12, 12), (48, 48)),
    ((48, 48), (192, 192)),  # logits to the crop
    ((1, 1), (6, 6)),  # pyramid pooling's 1x1 grid
    ((3, 3), (6, 6)),
    ((5, 7), (13, 11)),  # odd, non-square, one side shrinking
    ((9, 9), (4, 4)),  # downsampling (two taps, no antialiasing, as F.interpolate)
    ((7, 7), (56, 56)),
]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("src", "dst"), SIZES)
def test_matches_interpolate_in_float64(src, dst, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, *src, dtype=torch.float64, generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    ours = resize_bilinear(x, dst)
    ref = F.interpolate(x, size=dst, mode="bilinear", align_corners=False)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    cl = torch.channels_last  # the same memory format as F.interpolate's result
    assert ours.is_contiguous(memory_format=cl) == ref.is_contiguous(memory_format=cl)
    assert ours.is_contiguous() == ref.is_contiguous()
    grad = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    (g_ours,) = torch.autograd.grad(ours, x, grad)
    (g_ref,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)


def test_float32_one_channel_and_same_size():
    x = torch.randn(4, 1, 48, 48)
    torch.testing.assert_close(
        resize_bilinear(x, (192, 192)),
        F.interpolate(x, size=(192, 192), mode="bilinear", align_corners=False),
        rtol=1e-5,
        atol=1e-6,
    )
    assert resize_bilinear(x, (48, 48)) is x


@pytest.mark.parametrize("channels_last", [False, True])
def test_without_gradients_and_in_several_gemm_batches(channels_last, monkeypatch):
    x = torch.randn(3, 4, 7, 9, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ref = F.interpolate(x, size=(28, 36), mode="bilinear", align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(resize_bilinear(x, (28, 36)), ref, rtol=1e-12, atol=1e-12)
    # one image per GEMM batch (a small chunk size) gives the same map and gradient
    monkeypatch.setattr("bldseg.models.resize._CHUNK_FLOATS", 100)
    x.requires_grad_(True)
    out = resize_bilinear(x, (28, 36))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn(ref.shape, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad(out, x, grad)
    (g_ref,) = torch.autograd.grad(
        F.interpolate(x, size=(28, 36), mode="bilinear", align_corners=False), x, grad
    )
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)


def test_a_channels_last_gradient_of_an_nchw_map():
    # the backward's GEMMs take any gradient layout (copied to NCHW by the reshapes)
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 5, 24, 24, dtype=torch.float64).to(memory_format=torch.channels_last)
    (g_ours,) = torch.autograd.grad(resize_bilinear(x, (24, 24)), x, grad)
    ref = F.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False)
    (g_ref,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)
