"""DCNv3: compiled op vs reference vs a naive loop, autograd, torch.compile, errors, module."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from bldseg.ops import DCNv3, dcnv3, dcnv3_reference
from bldseg.ops.dcnv3 import IMPL_ENV_VAR, point_softmax
from tests.ops.cases import Case

F64 = torch.float64
REPO = Path(__file__).resolve().parents[2]


def make_inputs(
    case: Case, dtype: torch.dtype = F64, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ho, wo = case.out_size()
    p = case.kernel[0] * case.kernel[1]
    x = torch.randn(case.n, case.h, case.w, case.group * case.gc, generator=gen, dtype=F64)
    offset = case.offset_std * torch.randn(
        case.n, ho, wo, case.group * p * 2, generator=gen, dtype=F64
    )
    mask = torch.randn(case.n, ho, wo, case.group * p, generator=gen, dtype=F64)
    return x.to(dtype), offset.to(dtype), mask.to(dtype)


def naive_dcnv3(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    case: Case,
    remove_center: bool = False,
) -> torch.Tensor:
    """Point-by-point loop over the official CUDA kernel's formula (tiny shapes only)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = case.kernel, case.stride, case.pad, case.dilation
    g_, c_, s = case.group, case.gc, case.offset_scale
    n_, h_in, w_in, _ = input.shape
    _, h_out, w_out, _ = offset.shape
    points = kh * kw - int(remove_center)
    off = offset.reshape(n_, h_out, w_out, g_, points, 2).tolist()
    msk = mask.reshape(n_, h_out, w_out, g_, points).tolist()
    out = torch.zeros(n_, h_out, w_out, g_ * c_, dtype=input.dtype)
    half_h, half_w = (dh * (kh - 1)) // 2, (dw * (kw - 1)) // 2
    for n in range(n_):
        for ho in range(h_out):
            for wo in range(w_out):
                for g in range(g_):
                    feats = input[n, :, :, g * c_ : (g + 1) * c_]
                    acc = torch.zeros(c_, dtype=input.dtype)
                    p = 0
                    for i in range(kw):  # w outer
                        for j in range(kh):  # h inner
                            if remove_center and i == kw // 2 and j == kh // 2:
                                continue
                            ox, oy = off[n][ho][wo][g][p]
                            x = half_w - pw + wo * sw - half_w * s + (i * dw + ox) * s
                            y = half_h - ph + ho * sh - half_h * s + (j * dh + oy) * s
                            if -1 < y < h_in and -1 < x < w_in:
                                y0, x0 = math.floor(y), math.floor(x)
                                ly, lx = y - y0, x - x0
                                val = torch.zeros(c_, dtype=input.dtype)
                                for yy, xx, wt in (
                                    (y0, x0, (1 - ly) * (1 - lx)),
                                    (y0, x0 + 1, (1 - ly) * lx),
                                    (y0 + 1, x0, ly * (1 - lx)),
                                    (y0 + 1, x0 + 1, ly * lx),
                                ):
                                    if 0 <= yy < h_in and 0 <= xx < w_in:
                                        val += wt * feats[yy, xx]
                                acc += msk[n][ho][wo][g][p] * val
                            p += 1
                    out[n, ho, wo, g * c_ : (g + 1) * c_] = acc
    return out


# Kernels 3 and 5, strides 1/2, pads 0/1/2, dilations 1/2, groups 1..8, group_channels
# 1/3/16/30/64, batches 0/1/odd, asymmetric parameters, offset_scale != 1, far offsets.
CASES = [
    Case(2, 8, 8, 4, 16),
    Case(1, 7, 9, 1, 1, pad=(0, 0), offset_std=2.0),
    Case(3, 9, 7, 2, 3, stride=(2, 2)),
    Case(2, 10, 11, 3, 30, kernel=(5, 5), pad=(2, 2), offset_scale=0.5),
    Case(1, 12, 12, 8, 3, kernel=(5, 5), stride=(2, 2), pad=(2, 2), dilation=(2, 2)),
    Case(3, 6, 6, 5, 16, pad=(2, 2), dilation=(2, 2), offset_scale=2.0),
    Case(1, 5, 5, 1, 64),
    Case(0, 6, 6, 2, 3),
    Case(2, 6, 8, 2, 16, kernel=(3, 5), stride=(1, 2), pad=(1, 2), dilation=(2, 1)),
    Case(1, 9, 9, 6, 8, kernel=(5, 3), pad=(0, 1), offset_scale=1.7),
    Case(5, 4, 4, 7, 1, offset_scale=0.3, offset_std=3.0),
    Case(1, 1, 1, 1, 1),
    Case(2, 7, 7, 3, 5, offset_std=60.0),  # most samples far outside the image
    Case(1, 13, 12, 1, 16, stride=(2, 1)),  # one (n, g) pair: row-chunked backward
    Case(3, 5, 6, 2, 30, kernel=(5, 5), pad=(0, 0), dilation=(1, 1)),
    Case(2, 6, 5, 2, 32, stride=(2, 1), offset_std=2.5),  # specialised group_channels 32
]


def _ids(case: Case) -> str:
    return (
        f"n{case.n}_{case.h}x{case.w}_g{case.group}c{case.gc}_k{case.kernel}_s{case.stride}"
        f"_p{case.pad}_d{case.dilation}_os{case.offset_scale}_std{case.offset_std}"
    ).replace(" ", "")


def _forward_and_grads(
    fn, case: Case, inputs: tuple[torch.Tensor, ...], grad_out: torch.Tensor | None = None
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves, *case.params())
    if grad_out is None:
        grad_out = torch.randn(
            out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype
        )
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    grads = tuple(
        torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads, strict=True)
    )
    return out.detach(), grads


def _compiled(*args):
    return dcnv3(*args, impl="compiled")


# ---------------------------------------------------------------------------------------------
# Semantics


@pytest.mark.parametrize(
    "case",
    [
        Case(2, 5, 6, 2, 3),
        Case(1, 6, 9, 3, 2, kernel=(3, 5), stride=(2, 1), pad=(2, 0), dilation=(1, 2)),
        Case(1, 4, 4, 1, 2, offset_scale=0.7, offset_std=4.0),
    ],
    ids=_ids,
)
def test_reference_matches_naive_loop(case: Case) -> None:
    x, offset, mask = make_inputs(case)
    expected = naive_dcnv3(x, offset, mask, case)
    torch.testing.assert_close(
        dcnv3_reference(x, offset, mask, *case.params()), expected, atol=1e-12, rtol=0
    )


def test_zero_offsets_is_mask_weighted_window() -> None:
    # With zero offsets, a 3x3 kernel, pad 1 and a mask of 1 on one point, the op is a shift.
    case = Case(1, 5, 6, 2, 4, offset_std=0.0)
    x, offset, _ = make_inputs(case)
    mask = torch.zeros(1, 5, 6, 2 * 9, dtype=F64)
    mask[..., 9 + 1] = 1.0  # group 1, point (i=0, j=1): dx = -1, dy = 0
    mask[..., 0 + 4] = 1.0  # group 0, centre point
    out = dcnv3(x, offset, mask, *case.params(), impl="reference")
    torch.testing.assert_close(out[..., :4], x[..., :4])
    shifted = torch.zeros_like(x[..., 4:])
    shifted[:, :, 1:] = x[:, :, :-1, 4:]
    torch.testing.assert_close(out[..., 4:], shifted)


# ---------------------------------------------------------------------------------------------
# Compiled op vs reference


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_compiled_matches_reference_float64(dcnv3_op, case: Case) -> None:
    inputs = make_inputs(case)
    out_ref, grads_ref = _forward_and_grads(dcnv3_reference, case, inputs)
    out, grads = _forward_and_grads(_compiled, case, inputs)
    assert out.shape == (case.n, *case.out_size(), case.group * case.gc)
    torch.testing.assert_close(out, out_ref, atol=1e-10, rtol=0)
    for name, g, g_ref in zip(("input", "offset", "mask"), grads, grads_ref, strict=True):
        torch.testing.assert_close(
            g, g_ref, atol=1e-10, rtol=0, msg=lambda m, n=name: f"grad_{n}: {m}"
        )


def _softmax_then_reference(input, offset, logits, *params):
    """The readable path of mask_softmax: softmax over each group's points, then the op."""
    return dcnv3_reference(input, offset, point_softmax(logits, params[8]), *params)


def _compiled_softmax(*args):
    return dcnv3(*args, impl="compiled", mask_softmax=True)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_fused_mask_softmax_matches_reference_float64(dcnv3_op, case: Case) -> None:
    # The kernels take the softmax of the logits themselves and return the logits' gradient.
    inputs = make_inputs(case, seed=7)
    out_ref, grads_ref = _forward_and_grads(_softmax_then_reference, case, inputs)
    out, grads = _forward_and_grads(_compiled_softmax, case, inputs)
    torch.testing.assert_close(out, out_ref, atol=1e-10, rtol=0)
    for name, g, g_ref in zip(("input", "offset", "logits"), grads, grads_ref, strict=True):
        torch.testing.assert_close(
            g, g_ref, atol=1e-10, rtol=0, msg=lambda m, n=name: f"grad_{n}: {m}"
        )
    if case.n:  # the logits' gradient sums to zero over each group's points
        p = case.kernel[0] * case.kernel[1]
        sums = grads[2].reshape(*grads[2].shape[:3], case.group, p).sum(-1)
        torch.testing.assert_close(sums, torch.zeros_like(sums), atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_mask_softmax_keeps_a_nan_logit(dcnv3_op, dtype) -> None:
    # The float exponentials clamped x with x as max's first operand, which returns the other
    # operand for NaN: a diverged mask branch gave a finite uniform mask on AVX2 CPUs.
    case = Case(1, 5, 6, 2, 16)
    x, offset, logits = make_inputs(case, dtype)
    logits[0, 2, 2, 0] = float("nan")  # group 0's first point at output pixel (2, 2)
    out = _compiled_softmax(x, offset, logits, *case.params())
    ref = _softmax_then_reference(x, offset, logits, *case.params())
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().any()


def test_double_backward_is_refused_not_zero(dcnv3_op) -> None:
    # The backward op had no derivative, so autograd took it as constant: a gradient of the
    # gradient (a gradient penalty) silently came out zero.
    case = Case(1, 4, 5, 1, 8)
    x, offset, mask = (t.requires_grad_() for t in make_inputs(case))
    y = _compiled(x, offset, mask, *case.params())
    (gx,) = torch.autograd.grad((y**2).sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match=r"no double backward.*impl='reference'"):
        torch.autograd.grad(gx.sum(), (x, offset, mask))


def test_fused_mask_softmax_reference_impl_and_gradcheck(dcnv3_op) -> None:
    case = Case(2, 4, 5, 2, 3, offset_std=0.7)
    inputs = make_inputs(case, seed=2)
    want, _ = _forward_and_grads(_softmax_then_reference, case, inputs)
    got, _ = _forward_and_grads(
        lambda *a: dcnv3(*a, impl="reference", mask_softmax=True), case, inputs
    )
    assert torch.equal(got, want)
    leaves = [t.clone().requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(
        lambda a, b, c: _compiled_softmax(a, b, c, *case.params()), leaves
    )


@pytest.mark.parametrize("threads", [1, 3])
def test_backward_paths_agree_for_any_thread_count(dcnv3_op, threads: int) -> None:
    # One (n, g) pair: with 1 thread it scatters directly, with 3 into row-chunk buffers.
    case = Case(1, 11, 9, 1, 16)
    inputs = make_inputs(case, seed=3)
    _, grads_ref = _forward_and_grads(dcnv3_reference, case, inputs)
    _, grads_ref_softmax = _forward_and_grads(_softmax_then_reference, case, inputs)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _, grads = _forward_and_grads(_compiled, case, inputs)
        _, grads_softmax = _forward_and_grads(_compiled_softmax, case, inputs)
    finally:
        torch.set_num_threads(before)
    for g, g_ref in zip(grads + grads_softmax, grads_ref + grads_ref_softmax, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=0)


def test_backward_task_split_does_not_change_results(dcnv3_op) -> None:
    # 2 images x 4 groups: with 1 thread each task is a whole image; with 2, 3 and 8 threads
    # the groups are split into blocks of 2, 2 and 1. Each grad_input element gets its
    # contributions in the same order either way, so the results are bit for bit the same.
    case = Case(2, 7, 6, 4, 16)
    inputs = make_inputs(case, seed=5)
    _, grads_ref = _forward_and_grads(dcnv3_reference, case, inputs)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3, 8):
            torch.set_num_threads(threads)
            results.append(_forward_and_grads(_compiled, case, inputs)[1])
    finally:
        torch.set_num_threads(before)
    for g, g_ref in zip(results[0], grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=0)
    for grads in results[1:]:
        for g, g_first in zip(grads, results[0], strict=True):
            assert torch.equal(g, g_first)


def _cpu_has_avx512() -> bool:
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    return all(f in flags for f in ("avx512f", "avx512vl", "avx512dq", "avx512bw"))


@pytest.mark.parametrize(
    "env_var",
    [
        "BLDSEG_CPU_NO_AVX2",  # the baseline kernels
        pytest.param(
            "BLDSEG_CPU_AVX512",  # the opt-in AVX-512 kernels
            marks=pytest.mark.skipif(not _cpu_has_avx512(), reason="CPU without AVX-512"),
        ),
    ],
)
def test_other_isa_kernels(dcnv3_op, env_var: str) -> None:
    # The ISA is chosen once per process, at run time: force the others in a fresh process.
    script = textwrap.dedent(
        f"""
        import itertools
        import sys
        sys.path.insert(0, {str(REPO)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import torch
        from test_dcnv3 import (Case, make_inputs, _forward_and_grads, _compiled,
                                _compiled_softmax, _softmax_then_reference)
        from bldseg.ops import dcnv3_reference
        cases = (Case(2, 6, 5, 2, 16), Case(1, 5, 6, 3, 5, stride=(2, 1)), Case(1, 7, 5, 1, 32),
                 Case(4, 6, 5, 3, 16))
        paths = ((_compiled, dcnv3_reference), (_compiled_softmax, _softmax_then_reference))
        for case, dtype, (fn, ref) in itertools.product(
            cases, (torch.float64, torch.float32), paths
        ):
                inputs = make_inputs(case, dtype)
                out_ref, grads_ref = _forward_and_grads(ref, case, inputs)
                out, grads = _forward_and_grads(fn, case, inputs)
                tol = 1e-10 if dtype == torch.float64 else 1e-4
                for a, b in zip((out, *grads), (out_ref, *grads_ref), strict=True):
                    torch.testing.assert_close(a, b, atol=tol, rtol=tol)
        print("ok")
        """
    )
    env = dict(os.environ, **{env_var: "1"})
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# Prints a digest of a float32 forward and backward: the kernels of each ISA round differently
# (FMA, vector widths), so the digest says which ones ran.
_ISA_DIGEST = textwrap.dedent(
    f"""
    import hashlib, sys
    sys.path.insert(0, {str(REPO)!r})
    import torch
    from bldseg.ops import dcnv3
    gen = torch.Generator().manual_seed(0)
    leaves = [torch.randn(1, 9, 9, c, generator=gen).requires_grad_() for c in (64, 72, 36)]
    out = dcnv3(*leaves, 3, 3, 1, 1, 1, 1, 1, 1, 4, 16, 1.0, impl="compiled", mask_softmax=True)
    grads = torch.autograd.grad(out, leaves, torch.randn(out.shape, generator=gen))
    print(hashlib.sha256(b"".join(t.numpy().tobytes() for t in (out.detach(), *grads))).hexdigest())
    """
)


def test_isa_switches_set_to_an_off_value_are_off(dcnv3_op) -> None:
    # The switches counted when set at all: BLDSEG_CPU_NO_AVX2=0 forced the baseline kernels,
    # BLDSEG_CPU_AVX512=0 turned AVX-512 on. One process per setting (the ISA is chosen once
    # per process), both switches in each.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BLDSEG_CPU_")}
    clean["OMP_NUM_THREADS"] = "1"
    settings = {
        "default": {},
        "baseline": {"BLDSEG_CPU_NO_AVX2": "1"},
        "avx512": {"BLDSEG_CPU_AVX512": "1"},
        "0": {"BLDSEG_CPU_NO_AVX2": "0", "BLDSEG_CPU_AVX512": "0"},
        "off": {"BLDSEG_CPU_NO_AVX2": "Off", "BLDSEG_CPU_AVX512": "FALSE"},
        "empty": {"BLDSEG_CPU_NO_AVX2": "", "BLDSEG_CPU_AVX512": "no"},
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", _ISA_DIGEST],
            env={**clean, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, env in settings.items()
    }
    digests = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        digests[name] = out.strip()
    if digests["baseline"] == digests["default"]:
        pytest.skip("the baseline kernels are this CPU's default (no AVX2, or not x86)")
    assert digests["avx512"] != digests["default"] or not _cpu_has_avx512()
    for name in ("0", "off", "empty"):
        assert digests[name] == digests["default"], f"{settings[name]} changed the kernels"


def test_non_contiguous_inputs(dcnv3_op) -> None:
    case = Case(2, 6, 7, 2, 8, stride=(2, 1))
    x, offset, mask = make_inputs(case)
    # Same values, other layouts: channels-first storage, strided channels, a transposed view.
    x_nc = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    offset_nc = torch.stack([offset, torch.zeros_like(offset)], -1)[..., 0]
    mask_nc = mask.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (x_nc.is_contiguous() or offset_nc.is_contiguous() or mask_nc.is_contiguous())
    out_ref, grads_ref = _forward_and_grads(dcnv3_reference, case, (x, offset, mask))
    out, grads = _forward_and_grads(_compiled, case, (x_nc, offset_nc, mask_nc))
    torch.testing.assert_close(out, out_ref, atol=1e-10, rtol=0)
    # Non-contiguous grad_output too.
    grad_out = torch.randn((*out.shape[:3], out.shape[3] * 2), dtype=F64)[..., ::2]
    _, grads_ref = _forward_and_grads(dcnv3_reference, case, (x, offset, mask), grad_out)
    _, grads = _forward_and_grads(_compiled, case, (x_nc, offset_nc, mask_nc), grad_out)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=0)


def _one_sided_offset_gradient_holds(fn, case, inputs, grad_out) -> bool:
    """Whether ``fn``'s offset gradient is the derivative for a small step right, and for one
    down.

    Bilinear sampling is linear in x inside a pixel cell (and in y), so from integer locations
    a step of ``h * v`` along one axis (v in [0, 1)) changes ``<out, grad_out>`` by exactly
    ``h <grad_offset, v>`` when the gradient is taken on the side of an exact floor (the
    official CUDA kernel's).
    """
    x, offset, mask = inputs
    out, grads = _forward_and_grads(fn, case, inputs, grad_out)
    h, holds = 1e-3, True
    for axis in (0, 1):  # the offsets' last dim interleaves (x, y) per point
        v = torch.rand(offset.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
        v[..., 1 - axis :: 2] = 0
        moved = ((fn(x, offset + h * v, mask, *case.params()) - out) * grad_out).sum()
        predicted = h * (grads[1] * v).sum()
        holds &= bool(torch.isclose(moved, predicted, rtol=1e-9, atol=1e-13))
    return holds


@pytest.mark.parametrize("size", [6, 7])
def test_zero_offsets_at_init(dcnv3_op, size) -> None:
    # Integer sampling locations, as at initialisation (offset layers start at zero). The
    # forward and the input/mask gradients agree with the reference at any size; output
    # pixels whose window reaches the -1 border (a documented difference) get no gradient.
    case = Case(2, size, size, 2, 4, offset_std=0.0)
    inputs = make_inputs(case)
    grad_out = torch.randn(2, size, size, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    grad_out[:, [0, -1]] = 0
    grad_out[:, :, [0, -1]] = 0
    out_ref, grads_ref = _forward_and_grads(dcnv3_reference, case, inputs, grad_out)
    out, grads = _forward_and_grads(_compiled, case, inputs, grad_out)
    torch.testing.assert_close(out, out_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(grads[0], grads_ref[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(grads[2], grads_ref[2], atol=1e-10, rtol=0)
    # The offset gradient there is a one-sided derivative at the bilinear kink: the compiled
    # op's is the exact floor's side at every size. grid_sample's coordinate round trip lands
    # a hair below the integer for padded sizes that are not powers of two (9 here, not 8) and
    # takes the other side's: the reference's docstring and the README say so.
    assert _one_sided_offset_gradient_holds(_compiled, case, inputs, grad_out)
    assert _one_sided_offset_gradient_holds(dcnv3_reference, case, inputs, grad_out) == (size == 6)


def test_gradcheck(dcnv3_op) -> None:
    case = Case(2, 4, 5, 2, 2, stride=(1, 2), offset_scale=0.8)
    x, offset, mask = (t.requires_grad_() for t in make_inputs(case, seed=5))
    assert torch.autograd.gradcheck(
        lambda a, b, c: dcnv3(a, b, c, *case.params(), impl="compiled"), (x, offset, mask)
    )


def test_float32_close_to_float64(dcnv3_op) -> None:
    case = Case(2, 8, 8, 4, 16, offset_std=2.0)
    inputs64 = make_inputs(case)
    inputs32 = tuple(t.float() for t in inputs64)
    out64, grads64 = _forward_and_grads(dcnv3_reference, case, inputs64)
    grad_out = torch.randn(out64.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    _, grads64 = _forward_and_grads(dcnv3_reference, case, inputs64, grad_out)
    out32, grads32 = _forward_and_grads(_compiled, case, inputs32, grad_out.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out64, atol=1e-4, rtol=1e-4)
    for g32, g64 in zip(grads32, grads64, strict=True):
        torch.testing.assert_close(g32.double(), g64, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("spread", [1.0, 40.0])
def test_fused_mask_softmax_float32_close_to_float64(dcnv3_op, spread: float) -> None:
    # float32 takes the vectorised exponentials; logits 40x wider push some probabilities
    # below float32's range (the clamped path), where they must come out as ~0, not NaN.
    case = Case(2, 8, 8, 4, 16, offset_std=2.0)
    x, offset, logits = make_inputs(case, seed=3)
    inputs64 = (x, offset, spread * logits)
    out64, _ = _forward_and_grads(_softmax_then_reference, case, inputs64)
    grad_out = torch.randn(out64.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    _, grads64 = _forward_and_grads(_softmax_then_reference, case, inputs64, grad_out)
    inputs32 = tuple(t.float() for t in inputs64)
    out32, grads32 = _forward_and_grads(_compiled_softmax, case, inputs32, grad_out.float())
    torch.testing.assert_close(out32.double(), out64, atol=1e-4, rtol=1e-4)
    for g32, g64 in zip(grads32, grads64, strict=True):
        torch.testing.assert_close(g32.double(), g64, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_runs_in_float32(dcnv3_op, dtype: torch.dtype) -> None:
    case = Case(1, 6, 6, 2, 8)
    inputs = tuple(t.to(dtype) for t in make_inputs(case))
    out, grads = _forward_and_grads(_compiled, case, inputs)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    expected = dcnv3(*(t.float() for t in inputs), *case.params(), impl="compiled")
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)


def test_reference_samples_in_float32_under_bf16_autocast(dcnv3_op) -> None:
    # Zero offsets and only the centre point: the output is the input. At 128 px bfloat16
    # cannot hold the sampling locations; the reference used to sample in it (2.6e38 here).
    s = 128
    x = torch.randn(1, s, s, 8, generator=torch.Generator().manual_seed(0)).bfloat16()
    offset = torch.zeros(1, s, s, 18, dtype=torch.bfloat16)
    mask = torch.zeros(1, s, s, 9, dtype=torch.bfloat16)
    mask[..., 4] = 1.0
    outs, grads = {}, {}
    for impl in ("reference", "compiled"):
        leaf = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = dcnv3(leaf, offset, mask, 3, 3, 1, 1, 1, 1, 1, 1, 1, 8, 1.0, impl=impl)
        out.float().square().sum().backward()
        outs[impl], grads[impl] = out.detach(), leaf.grad
        assert out.dtype == leaf.grad.dtype == torch.bfloat16
        torch.testing.assert_close(out.detach(), x, atol=1e-4, rtol=1.6e-2)
        torch.testing.assert_close(leaf.grad, 2 * x, atol=1e-4, rtol=1.6e-2)
    torch.testing.assert_close(outs["reference"], outs["compiled"], atol=1e-4, rtol=1.6e-2)
    torch.testing.assert_close(grads["reference"], grads["compiled"], atol=1e-4, rtol=1.6e-2)


def test_module_reference_matches_compiled_under_bf16_autocast(dcnv3_op) -> None:
    # How precision=bf16 trains on a CPU (float32 weights, autocast); a fresh module, whose
    # zero offsets sample on the kernel grid, as at the start of training.
    torch.manual_seed(0)
    module = DCNv3(channels=16, group=2)
    x = torch.randn(1, 128, 128, 16, generator=torch.Generator().manual_seed(1))
    outs, grads = {}, {}
    for impl in ("reference", "compiled"):
        module.impl = impl
        module.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x)
        out.float().square().mean().backward()
        outs[impl] = out.detach().float()
        grads[impl] = {name: p.grad.clone() for name, p in module.named_parameters()}
    # Both sample in float32; they differ only where a bfloat16 rounding flips (1 ulp).
    assert outs["reference"].abs().max() < 4
    torch.testing.assert_close(outs["reference"], outs["compiled"], atol=1.6e-2, rtol=0)
    for name, g in grads["compiled"].items():
        scale = float(g.abs().max()) or 1.0
        torch.testing.assert_close(
            grads["reference"][name],
            g,
            atol=0.02 * scale,
            rtol=0,
            msg=lambda m, n=name: f"{n}: {m}",
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_takes_the_fused_mask_softmax_in_float32(dcnv3_op, dtype: torch.dtype) -> None:
    # The compiled op takes the softmax of half-type logits in float32, and so does the
    # fallback: the two round once, at the end, so they differ only where float32 summation
    # order flips a rounding (a softmax in the half type changed about 30% of the outputs).
    case = Case(2, 16, 16, 2, 4, offset_std=2.0)
    x, offset, logits = (t.to(dtype) for t in make_inputs(case))
    logits = 3 * logits
    outs = [
        dcnv3(x, offset, logits, *case.params(), impl=impl, mask_softmax=True)
        for impl in ("reference", "compiled")
    ]
    assert outs[0].dtype == dtype
    assert (outs[0] != outs[1]).float().mean() < 0.01
    torch.testing.assert_close(outs[0], outs[1])


def test_offset_and_mask_gradients_vanish_far_outside(dcnv3_op) -> None:
    case = Case(1, 5, 5, 2, 4, offset_std=0.0)
    x, offset, mask = make_inputs(case)
    offset = offset + 1e4  # every sample far below/right of the image
    out, grads = _forward_and_grads(_compiled, case, (x, offset, mask))
    assert torch.count_nonzero(out) == 0
    assert all(torch.count_nonzero(g) == 0 for g in grads)


# ---------------------------------------------------------------------------------------------
# torch.compile / torch.export


class _TinyNet(nn.Module):
    def __init__(self, impl: str = "compiled") -> None:
        super().__init__()
        self.offset = nn.Linear(8, 2 * 9 * 2)
        self.mask = nn.Linear(8, 2 * 9)
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset = self.offset(x)
        mask = self.mask(x).softmax(-1)
        return dcnv3(x, offset, mask, 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0, impl=self.impl)


def _check_compiled_module(backend: str) -> None:
    torch.manual_seed(0)
    net = _TinyNet().double()
    x = torch.randn(2, 5, 6, 8, dtype=F64, requires_grad=True)
    expected = net(x)
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), x)
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True, backend=backend)  # graph break = error
    out = compiled(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(grad, grad_expected, atol=1e-10, rtol=0)


def test_torch_compile_fullgraph_aot_eager(dcnv3_op) -> None:
    # aot_eager traces forward and backward with the fake kernels, like inductor, but fast.
    _check_compiled_module("aot_eager")


@pytest.mark.slow
def test_torch_compile_fullgraph_inductor(dcnv3_op) -> None:
    _check_compiled_module("inductor")


def test_module_compiles_fullgraph_in_a_fresh_process(dcnv3_op) -> None:
    # The module loads the op when it is built. Loaded at the first forward, under
    # torch.compile, the loader (which tracing must skip) was an error with fullgraph=True.
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        import torch
        from bldseg.ops import DCNv3
        targets = []
        def backend(gm, example_inputs):
            targets.extend(str(node.target) for node in gm.graph.nodes)
            return gm.forward
        torch.manual_seed(0)
        mod = DCNv3(channels=8, group=2).double()  # impl "auto", as models pass it
        x = torch.randn(1, 5, 6, 8, dtype=torch.float64)
        out = torch.compile(mod, backend=backend, fullgraph=True)(x)
        torch.testing.assert_close(out, mod(x), atol=1e-12, rtol=0)
        print("ok", targets.count("bldseg.dcnv3_forward"))  # the op, not the reference
        """
    )
    env = {k: v for k, v in os.environ.items() if k != IMPL_ENV_VAR}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ok", "1"], proc.stdout


def test_torch_export(dcnv3_op) -> None:
    torch.manual_seed(0)
    net = _TinyNet().double().eval()
    x = torch.randn(1, 4, 5, 8, dtype=F64)
    exported = torch.export.export(net, (x,))
    targets = {str(node.target) for node in exported.graph.nodes}
    assert "bldseg.dcnv3_forward.default" in targets
    torch.testing.assert_close(exported.module()(x), net(x), atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------
# Bad input


def _good() -> tuple[Case, torch.Tensor, torch.Tensor, torch.Tensor]:
    case = Case(1, 5, 5, 2, 4)
    return (case, *make_inputs(case))


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda x, o, m, p: (x[0], o, m, p), "input must have rank 4"),
        (lambda x, o, m, p: (x[..., :-1], o, m, p), "group \\* group_channels"),
        (lambda x, o, m, p: (x, o[..., :-2], m, p), "offset must have shape"),
        (lambda x, o, m, p: (x, o, m[:, :-1], p), "mask must have shape"),
        (lambda x, o, m, p: (x, o.float(), m, p), "share a dtype"),
        (lambda x, o, m, p: (x.long(), o.long(), m.long(), p), "floating"),
        (lambda x, o, m, p: (x, o, m, (0, *p[1:])), "kernel_h must be > 0"),
        (lambda x, o, m, p: (x, o, m, (*p[:2], 0, *p[3:])), "stride_h must be > 0"),
        (lambda x, o, m, p: (x, o, m, (*p[:4], -1, *p[5:])), "pad_h and pad_w must be >= 0"),
        (lambda x, o, m, p: (x[:, :1, :1], o, m, (*p[:4], 0, 0, *p[6:])), "too small"),
        (lambda x, o, m, p: (x, o, m, (*p[:8], 3, *p[9:])), "group \\* group_channels"),
    ],
)
def test_functional_rejects_bad_input(mutate, match: str) -> None:
    case, x, offset, mask = _good()
    x, offset, mask, params = mutate(x, offset, mask, case.params())
    with pytest.raises(ValueError, match=match):
        dcnv3(x, offset, mask, *params, impl="reference")


def test_functional_rejects_bad_impl(monkeypatch: pytest.MonkeyPatch) -> None:
    case, x, offset, mask = _good()
    with pytest.raises(ValueError, match="impl must be one of"):
        dcnv3(x, offset, mask, *case.params(), impl="fast")  # type: ignore[arg-type]
    monkeypatch.setenv(IMPL_ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=IMPL_ENV_VAR):
        dcnv3(x, offset, mask, *case.params())


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda x, o, m: (x[0], o, m), "expected input of rank 4"),
        (lambda x, o, m: (x, o[0], m), "expected offset of rank 4"),
        (lambda x, o, m: (x[..., :-1].contiguous(), o, m), "group \\* group_channels"),
        (lambda x, o, m: (x, o[..., :-2].contiguous(), m), "expected offset of shape"),
        (lambda x, o, m: (x, o, m[:, :, :-1].contiguous()), "expected mask of shape"),
        (lambda x, o, m: (x, o.float(), m), "same dtype"),
        (lambda x, o, m: (x.int(), o.int(), m.int()), "floating dtype"),
        (lambda x, o, m: (x.transpose(1, 2), o, m), "contiguous"),
    ],
)
def test_cpp_op_rejects_bad_input(dcnv3_op, mutate, match: str) -> None:
    case, x, offset, mask = _good()
    x, offset, mask = mutate(x, offset, mask)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.bldseg.dcnv3_forward(x, offset, mask, *case.params(), 64)


def test_cpp_op_rejects_bad_parameters_and_grad(dcnv3_op) -> None:
    case, x, offset, mask = _good()
    p = case.params()
    with pytest.raises(RuntimeError, match="kernel_h and kernel_w must be > 0"):
        torch.ops.bldseg.dcnv3_forward(x, offset, mask, 0, *p[1:], 64)
    with pytest.raises(RuntimeError, match="empty output"):
        tiny = x[:, :1, :1].contiguous()
        torch.ops.bldseg.dcnv3_forward(tiny, offset, mask, 3, 3, 1, 1, 0, 0, *p[6:], 64)
    with pytest.raises(RuntimeError, match="im2col_step must be > 0"):
        torch.ops.bldseg.dcnv3_forward(x, offset, mask, *p, 0)
    with pytest.raises(RuntimeError, match="expected grad_output of shape"):
        torch.ops.bldseg.dcnv3_backward(x, offset, mask, x[:, :-1].contiguous(), *p, 64)
    with pytest.raises(RuntimeError, match="grad_output must have the dtype"):
        torch.ops.bldseg.dcnv3_backward(x, offset, mask, x.float(), *p, 64)


@pytest.mark.parametrize("mask_softmax", [False, True])
def test_cpp_op_rejects_group_zero_before_the_softmax(dcnv3_op, mask_softmax: bool) -> None:
    # The softmax splits the mask by group: the op must refuse group 0 before dividing by it.
    case, x, offset, mask = _good()
    p = case.params()
    bad = (*p[:8], 0, *p[9:], 64, mask_softmax)
    with pytest.raises(RuntimeError, match="group and group_channels must be > 0, got 0"):
        torch.ops.bldseg.dcnv3_forward(x, offset, mask, *bad)
    with pytest.raises(RuntimeError, match="group and group_channels must be > 0, got 0"):
        torch.ops.bldseg.dcnv3_backward(x, offset, mask, x, *bad)


# ---------------------------------------------------------------------------------------------
# Module

# Parameter names and shapes of the official InternImage DCNv3 module (ops_dcnv3/modules/
# dcnv3.py) for channels=64, kernel_size=3, group=4, norm 'LN', as in internimage_t_1k_224.pth.
OFFICIAL_KEYS_64_G4 = {
    "dw_conv.0.weight": (64, 1, 3, 3),
    "dw_conv.0.bias": (64,),
    "dw_conv.1.1.weight": (64,),
    "dw_conv.1.1.bias": (64,),
    "offset.weight": (72, 64),
    "offset.bias": (72,),
    "mask.weight": (36, 64),
    "mask.bias": (36,),
    "input_proj.weight": (64, 64),
    "input_proj.bias": (64,),
    "output_proj.weight": (64, 64),
    "output_proj.bias": (64,),
}


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_module_state_dict_matches_official() -> None:
    module = DCNv3()
    assert _shapes(module) == OFFICIAL_KEYS_64_G4
    # An official checkpoint loads strictly.
    state = {k: torch.randn(s) for k, s in OFFICIAL_KEYS_64_G4.items()}
    module.load_state_dict(state, strict=True)
    assert torch.equal(module.offset.weight, state["offset.weight"])


def test_module_variant_keys() -> None:
    cfs = DCNv3(channels=112, group=7, center_feature_scale=True, dw_kernel_size=5)
    shapes = _shapes(cfs)
    assert shapes["center_feature_scale_proj_weight"] == (7, 112)
    assert shapes["center_feature_scale_proj_bias"] == (7,)
    assert shapes["dw_conv.0.weight"] == (112, 1, 5, 5)
    assert shapes["offset.weight"] == (7 * 9 * 2, 112)
    bn = DCNv3(channels=16, group=2, norm_layer="BN")
    assert {"dw_conv.1.0.weight", "dw_conv.1.0.running_mean"} <= set(bn.state_dict())
    rc = DCNv3(channels=16, group=2, remove_center=True)
    assert _shapes(rc)["offset.weight"] == (2 * 8 * 2, 16)
    assert _shapes(rc)["mask.weight"] == (2 * 8, 16)


def test_module_init_and_shape_errors() -> None:
    torch.manual_seed(0)
    module = DCNv3(channels=32, group=4)
    for layer in (module.offset, module.mask):
        assert torch.count_nonzero(layer.weight) == 0 and torch.count_nonzero(layer.bias) == 0
    bound = math.sqrt(6 / (32 + 32))  # xavier_uniform
    assert module.input_proj.weight.abs().max() <= bound
    assert module.input_proj.weight.std() > bound / 4
    assert torch.count_nonzero(module.input_proj.bias) == 0
    with pytest.raises(ValueError, match="divisible by group"):
        DCNv3(channels=30, group=4)
    with pytest.raises(ValueError, match="keep the size"):
        DCNv3(channels=32, group=4, stride=2)


def _randomise(module: DCNv3, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=gen, dtype=param.dtype))


@pytest.mark.parametrize(
    "channels, group, center_feature_scale",
    [(16, 2, False), (16, 2, True), (64, 4, False)],  # 64/4: InternImage's group_channels 16
)
def test_module_compiled_matches_reference(
    dcnv3_op, channels: int, group: int, center_feature_scale: bool
) -> None:
    # The compiled path takes the mask softmax inside the op; the reference one before it.
    module = DCNv3(channels, group=group, center_feature_scale=center_feature_scale).double()
    _randomise(module)
    x = torch.randn(2, 6, 5, channels, dtype=F64, generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for impl in ("compiled", "reference"):
        module.impl = impl
        module.zero_grad()
        out = module(x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in module.parameters()])
    assert outs[0].shape == x.shape
    torch.testing.assert_close(outs[0], outs[1], atol=1e-10, rtol=0)
    for g0, g1 in zip(*grads, strict=True):
        torch.testing.assert_close(g0, g1, atol=1e-9, rtol=0)


def test_module_remove_center_matches_naive(dcnv3_op) -> None:
    module = DCNv3(channels=6, group=2, remove_center=True, impl="compiled").double()
    _randomise(module, seed=2)
    x = torch.randn(1, 4, 5, 6, dtype=F64, generator=torch.Generator().manual_seed(3))
    # Recompute the op's inputs as the module does, then run the naive loop without centre.
    proj = module.input_proj(x)
    x1 = module.dw_conv(x.permute(0, 3, 1, 2))
    offset = module.offset(x1)
    mask = module.mask(x1).reshape(1, 4, 5, 2, -1).softmax(-1).reshape(1, 4, 5, -1)
    core = naive_dcnv3(proj, offset, mask, Case(1, 4, 5, 2, 3), remove_center=True)
    expected = module.output_proj(core)
    torch.testing.assert_close(module(x), expected, atol=1e-10, rtol=0)
