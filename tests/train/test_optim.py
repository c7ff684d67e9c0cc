"""The compiled schedule-free AdamW step against the schedulefree package's own step."""

import copy

import pytest
import schedulefree
import torch
from torch import nn

from bldseg.train.optim import AdamWScheduleFree, clip_grad_norm_, update_reference


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.GELU(), nn.Conv2d(8, 1, 1)
    )
    # channels-last weights: their gradients and state are not contiguous, but dense
    return m.to(dtype=dtype, memory_format=torch.channels_last)


def _groups(m: nn.Module) -> list[dict]:
    decay = [p for p in m.parameters() if p.ndim > 1]
    no_decay = [p for p in m.parameters() if p.ndim <= 1]
    return [
        {"params": decay, "weight_decay": 0.05},
        {"params": no_decay, "weight_decay": 0.0, "lr": 2e-3},
    ]


def _train(opt_cls, dtype, steps=7, **kw):
    """``steps`` steps on the same gradients for any optimizer (drawn, not back-propagated, so
    that rounding differences do not compound through the model)."""
    m = _model(dtype)
    opt = opt_cls(_groups(m), lr=3e-3, betas=(0.9, 0.999), warmup_steps=3, **kw)
    opt.train()
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in m.parameters():
            # empty_like keeps the parameter's layout, as autograd's gradients do
            p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
        opt.step()
    return m, opt


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-13), (torch.float32, 2e-6)])
def test_fused_step_matches_the_package(dtype, tol):
    ref_m, ref_opt = _train(schedulefree.AdamWScheduleFree, dtype)
    m, opt = _train(AdamWScheduleFree, dtype, fused=True)
    for p, q in zip(ref_m.parameters(), m.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=tol, atol=tol)
        for key in ("z", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[q][key], ref_opt.state[p][key], rtol=tol, atol=tol)
            assert opt.state[q][key].stride() == q.stride()
    for g, h in zip(opt.param_groups, ref_opt.param_groups, strict=True):
        for key in ("k", "weight_sum", "lr_max", "scheduled_lr"):
            assert g[key] == pytest.approx(h[key], rel=1e-15)
    # eval mode (the average x) and back, through the package's own mode switches
    opt.eval(), ref_opt.eval()
    for p, q in zip(ref_m.parameters(), m.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=tol, atol=tol)
    # a checkpoint of one loads into the other
    other = AdamWScheduleFree(_groups(copy.deepcopy(ref_m)), lr=3e-3, warmup_steps=3)
    other.load_state_dict(ref_opt.state_dict())
    assert other.param_groups[0]["k"] == 7


def test_fused_default_on_cpu_and_the_package_elsewhere():
    # autograd's gradients of channels-last weights share their layout: the flat pass takes all
    m = _model(torch.float32)
    opt = AdamWScheduleFree(_groups(m))
    opt.train()
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    m(x).sum().backward()
    assert all(p.grad.stride() == p.stride() for p in m.parameters())
    assert any(not p.is_contiguous() for p in m.parameters())
    before = [p.detach().clone() for p in m.parameters()]
    opt.step()
    assert opt._use_fused()
    assert all(not torch.equal(a, p) for a, p in zip(before, m.parameters(), strict=True))
    _, off = _train(AdamWScheduleFree, torch.float32, steps=1, fused=False)
    assert not off._use_fused()
    half = nn.Linear(2, 2).to(torch.bfloat16)
    assert not AdamWScheduleFree(half.parameters())._use_fused()
    with pytest.raises(ValueError, match="float32 or float64 CPU"):
        AdamWScheduleFree(half.parameters(), fused=True)._use_fused()


def test_assigning_fused_after_a_step_switches_the_step():
    # Observable without timing: the package's step leaves its normalised update in .grad,
    # the compiled step leaves the gradient as autograd made it.
    m = _model(torch.float32)
    opt = AdamWScheduleFree(_groups(m))
    opt.train()
    x = torch.randn(2, 3, 8, 8)

    def step_keeps_grads() -> bool:
        opt.zero_grad()
        m(x).sum().backward()
        grads = [p.grad.clone() for p in m.parameters()]
        opt.step()
        return all(torch.equal(g, p.grad) for g, p in zip(grads, m.parameters(), strict=True))

    assert step_keeps_grads()  # decided at the first step: compiled
    opt.fused = False
    assert opt.fused is False
    assert not step_keeps_grads()  # the package's step from the next step on
    opt.fused = None
    assert step_keeps_grads()
    # bf16 parameters take the package's step by default; asking for the compiled one after
    # that first decision must refuse at the next step, not go on with the package's
    half = nn.Linear(2, 2).to(torch.bfloat16)
    opt = AdamWScheduleFree(half.parameters())
    opt.train()
    half(torch.ones(1, 2, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    opt.fused = True
    with pytest.raises(ValueError, match="float32 or float64 CPU"):
        opt.step()


def test_a_gradient_of_another_layout_takes_the_reference_update():
    # A gradient assigned by hand with a layout unlike its parameter's: the flat pass cannot
    # walk them together, so that parameter alone goes through update_reference.
    results = []
    for cls, kw in ((schedulefree.AdamWScheduleFree, {}), (AdamWScheduleFree, {"fused": True})):
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(4, 6, dtype=torch.float64))
        b = nn.Parameter(torch.randn(6, dtype=torch.float64))
        opt = cls([w, b], lr=1e-2, weight_decay=0.1, **kw)
        opt.train()
        for step in range(3):
            g = torch.randn(
                6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(step)
            )
            w.grad = g.t()  # (4, 6) with strides (1, 4)
            b.grad = g[:, 0].clone()
            opt.step()
        results.append((w.detach().clone(), b.detach().clone(), opt.state[w]["z"].clone()))
    for ref, got in zip(*results, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_op_rejects_mismatched_lists_before_changing_anything():
    y = torch.zeros(3)
    z, v, g = torch.ones(3), torch.zeros(3), torch.ones(4)
    assert AdamWScheduleFree([nn.Parameter(y)], fused=True)._use_fused()  # loads the op
    with pytest.raises(RuntimeError, match=r"parameter 0 .* differs"):
        torch.ops.bldseg.schedulefree_adamw_step_(
            [y], [g], [z], [v], 0.1, 0.9, 0.99, 1e-8, 0.0, 0.5, 0.01
        )
    with pytest.raises(RuntimeError, match="one entry per parameter"):
        torch.ops.bldseg.schedulefree_adamw_step_(
            [y], [], [z], [v], 0.1, 0.9, 0.99, 1e-8, 0.0, 0.5, 0.01
        )
    assert torch.equal(y, torch.zeros(3)) and torch.equal(z, torch.ones(3))


def test_update_reference_is_the_packages_update():
    # One step of the package on one tensor against update_reference with its scalars.
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5, dtype=torch.float64))
    q = p.detach().clone()
    opt = schedulefree.AdamWScheduleFree([p], lr=0.1, warmup_steps=0, weight_decay=0.2)
    opt.train()
    p.grad = torch.randn(5, dtype=torch.float64)
    g = p.grad.clone()
    opt.step()
    z, v = q.clone(), torch.zeros_like(q)
    update_reference(q, g, z, v, 0.1, 0.9, 0.999, 1e-8, 0.2, 1.0, 1 - 0.999)
    torch.testing.assert_close(q, p.detach(), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(z, opt.state[p]["z"], rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(v, opt.state[p]["exp_avg_sq"], rtol=1e-14, atol=1e-14)


def test_without_the_op_the_package_steps_with_one_warning(monkeypatch, tmp_path):
    from bldseg.ops._build import NativeExtension
    from bldseg.train import optim
    from tests.ops.test_build import _write_broken

    monkeypatch.setenv("BLDSEG_BUILD_DIR", str(tmp_path / "builds"))
    broken = NativeExtension("bldseg_broken", [_write_broken(tmp_path / "src")])
    monkeypatch.setattr(optim, "_EXT", broken)
    with pytest.warns(RuntimeWarning, match="bldseg_broken") as caught:
        m, opt = _train(AdamWScheduleFree, torch.float64, steps=3)
    assert len([w for w in caught if "bldseg" in str(w.message)]) == 1
    assert not opt._use_fused()
    ref_m, _ = _train(schedulefree.AdamWScheduleFree, torch.float64, steps=3)
    for p, q in zip(ref_m.parameters(), m.parameters(), strict=True):
        assert torch.equal(p, q)  # the package's own step, bit for bit
    with pytest.raises(Exception, match="broken"):
        AdamWScheduleFree(nn.Linear(2, 2).parameters(), fused=True)._use_fused()


def _grads(dtype: torch.dtype, scale: float) -> nn.Module:
    """The test model with drawn gradients of about ``scale`` global norm per element."""
    m = _model(dtype)
    gen = torch.Generator().manual_seed(2)
    for p in m.parameters():
        p.grad = torch.empty_like(p).copy_(scale * torch.randn(p.shape, generator=gen, dtype=dtype))
    return m


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-13), (torch.float32, 2e-6)])
@pytest.mark.parametrize("scale", [1.0, 1e-4])  # clipped, and below max_norm (left unchanged)
def test_clip_grad_norm_matches_torch(dtype, tol, scale):
    ref, ours = _grads(dtype, scale), _grads(dtype, scale)
    total_ref = nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    total = clip_grad_norm_(ours.parameters(), 0.5, fused=True)
    assert total.dtype == total_ref.dtype and total.ndim == 0
    torch.testing.assert_close(total, total_ref, rtol=tol, atol=0)
    assert (float(total) > 0.5) == (scale == 1.0)
    drawn = _grads(dtype, scale)  # the gradients before any clipping
    for p, q, d in zip(ref.parameters(), ours.parameters(), drawn.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=tol, atol=0)
        assert q.grad.stride() == q.stride()
        if scale != 1.0:
            assert torch.equal(q.grad, d.grad)  # below max_norm: left bit for bit
    clipped = torch.sqrt(sum((q.grad.double() ** 2).sum() for q in ours.parameters()))
    assert float(clipped) == pytest.approx(min(0.5, float(total)), rel=1e-5)


def _reviewers_grads() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, generator=gen), torch.randn(3, 3, generator=gen), torch.ones(1)]
    grads[0][0] = 1e30
    return grads


F64 = torch.float64


# torch squares float32 gradients in float32: its norm is inf where their squares sum past
# FLT_MAX (except a one-element tensor's, its absolute value), and with several gradients
# again where the per-tensor norms' squares do (in float64 if any gradient is float64).
@pytest.mark.parametrize(
    "grads",
    [
        pytest.param(_reviewers_grads, id="1e30_among_small"),
        pytest.param(lambda: [torch.full((2,), 1e20)], id="one_tensor"),
        pytest.param(lambda: [torch.full((3,), 1e19), torch.full((3,), 1e19)], id="each_fits"),
        pytest.param(lambda: [torch.full((1, 1), 1e30)], id="one_element_finite"),
        pytest.param(lambda: [torch.full((1,), 1e20), torch.ones(1)], id="norm_of_norms"),
        pytest.param(lambda: [torch.full((2,), 1e20), torch.ones(1, dtype=F64)], id="mixed_inf"),
        pytest.param(lambda: [torch.full((1,), 1e20), torch.ones(3, dtype=F64)], id="mixed_fin"),
        pytest.param(
            lambda: [torch.full((1,), 3e38), torch.full((1,), 3e38, dtype=F64)],
            id="mixed_past_float32",
        ),
        pytest.param(lambda: [torch.ones(3), torch.ones(3, dtype=F64)], id="mixed_small"),
    ],
)
def test_clip_grad_norm_overflows_and_promotes_as_torch(grads):
    def params():
        ps = []
        for g in grads():
            p = nn.Parameter(torch.zeros_like(g))
            p.grad = g
            ps.append(p)
        return ps

    ref, ours = params(), params()
    total_ref = nn.utils.clip_grad_norm_(ref, 1.0)
    total = clip_grad_norm_(ours, 1.0, fused=True)
    assert total.dtype == total_ref.dtype
    torch.testing.assert_close(total, total_ref, rtol=1e-6, atol=0)
    for p, q in zip(ref, ours, strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=0)


def test_clip_grad_norm_sums_in_one_order_whatever_the_threads():
    # more elements than one task's block, so the two passes split across threads
    g = torch.randn(300_000, generator=torch.Generator().manual_seed(3))
    totals = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            p = nn.Parameter(torch.zeros_like(g))
            p.grad = g.clone()
            totals.append((clip_grad_norm_([p], 1.0, fused=True), p.grad))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(totals[0][0], totals[1][0]) and torch.equal(totals[0][1], totals[1][1])
    torch.testing.assert_close(totals[0][0], g.double().norm().float(), rtol=1e-6, atol=0)


def test_clip_grad_norm_nonfinite_and_fallbacks():
    # a NaN gradient: torch scales every gradient by NaN (error_if_nonfinite=False); so do we
    for fused in (True, False):
        a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
        a.grad, b.grad = torch.tensor([1.0, float("nan"), 0.0]), torch.ones(2)
        assert torch.isnan(clip_grad_norm_([a, b], 1.0, fused=fused))
        assert torch.isnan(b.grad).all()
    # gradients off the CPU (meta here, CUDA where there is one) go to torch's own
    m = nn.Parameter(torch.ones(3, device="meta"))
    m.grad = torch.ones(3, device="meta")
    assert clip_grad_norm_([m], 1.0).device.type == "meta"
    # no gradients: zero, as torch
    assert float(clip_grad_norm_([nn.Parameter(torch.ones(2))], 1.0)) == 0.0
    # bfloat16 (or any gradient the op cannot take) goes to torch's own, which the op refuses
    h = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    h.grad = torch.full((4,), 2.0, dtype=torch.bfloat16)
    assert float(clip_grad_norm_([h], 1.0)) == pytest.approx(4.0)
    assert float(h.grad.float().norm()) == pytest.approx(1.0, rel=1e-2)
    h.grad = torch.full((4,), 2.0, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"gradient 0 is BFloat16"):
        clip_grad_norm_([h], 1.0, fused=True)
    assert torch.equal(h.grad, torch.full((4,), 2.0, dtype=torch.bfloat16))


def _resumed(opt_cls, dtype, **kw):
    """A checkpoint of a contiguous model's optimizer resumed in its channels-last copy (as a
    run that turns on channels-last does): the state keeps the checkpoint's layout."""
    saved = _model(dtype).to(memory_format=torch.contiguous_format)
    opt = opt_cls(saved.parameters(), lr=1e-2, weight_decay=0.05, **kw)
    opt.train()
    gen = torch.Generator().manual_seed(4)
    for p in saved.parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
    opt.step()
    m = copy.deepcopy(saved).to(memory_format=torch.channels_last)
    resumed = opt_cls(m.parameters(), lr=1e-2, weight_decay=0.05, **kw)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    resumed.train()
    for _ in range(2):
        for p in m.parameters():
            p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
        resumed.step()
    return m, resumed


def test_state_of_another_memory_format_steps_as_the_package():
    ref_m, ref_opt = _resumed(schedulefree.AdamWScheduleFree, torch.float64)
    m, opt = _resumed(AdamWScheduleFree, torch.float64, fused=True)
    # the conv weights' state is contiguous, their gradients channels-last: not one flat pass
    w = m[0].weight
    assert opt.state[w]["z"].stride() != w.grad.stride()
    for p, q in zip(ref_m.parameters(), m.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-12)
        for key in ("z", "exp_avg_sq"):
            torch.testing.assert_close(
                opt.state[q][key], ref_opt.state[p][key], rtol=1e-12, atol=1e-12
            )
    assert opt.param_groups[0]["k"] == ref_opt.param_groups[0]["k"] == 3


def test_parameters_of_two_dtypes_in_one_group_match_the_package(monkeypatch):
    from bldseg.train import optim

    # both dtypes go through the compiled op (one call each), none through the reference
    calls = []
    monkeypatch.setattr(optim, "update_reference", lambda *a: calls.append(a))
    results = []
    for cls, kw in ((schedulefree.AdamWScheduleFree, {}), (AdamWScheduleFree, {"fused": True})):
        gen = torch.Generator().manual_seed(5)
        a = nn.Parameter(torch.randn(7, generator=gen))
        b = nn.Parameter(torch.randn(3, 2, generator=gen, dtype=torch.float64))
        opt = cls([a, b], lr=1e-2, warmup_steps=2, weight_decay=0.1, **kw)
        opt.train()
        for _ in range(3):
            a.grad = torch.randn(7, generator=gen)
            b.grad = torch.randn(3, 2, generator=gen, dtype=torch.float64)
            opt.step()
        results.append((a, b, opt))
    (a_ref, b_ref, ref), (a, b, opt) = results
    assert not calls
    torch.testing.assert_close(a, a_ref, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(b, b_ref, rtol=1e-13, atol=1e-13)
    for key in ("k", "weight_sum", "lr_max", "scheduled_lr"):
        assert opt.param_groups[0][key] == ref.param_groups[0][key]


def test_a_step_that_raises_leaves_the_group_as_it_was():
    # state of another parameter's shape (a checkpoint of another model): the op refuses it,
    # and the group's step count and average weights must not count a step that did not happen
    p = nn.Parameter(torch.ones(4))
    opt = AdamWScheduleFree([p], fused=True)
    opt.train()
    opt.state[p]["z"], opt.state[p]["exp_avg_sq"] = torch.ones(5), torch.zeros(5)
    p.grad = torch.ones(4)
    before = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    with pytest.raises(RuntimeError, match=r"parameter 0 .* differs"):
        opt.step()
    assert {k: v for k, v in opt.param_groups[0].items() if k != "params"} == before
    assert torch.equal(p, torch.ones(4))


@pytest.mark.parametrize(
    "second",
    [
        pytest.param(lambda: torch.full((5,), 2.0, dtype=torch.bfloat16), id="bf16"),
        pytest.param(lambda: torch.full((5, 2), 2.0)[:, 0], id="strided"),
    ],
)
def test_clip_grad_norm_takes_torchs_way_for_a_gradient_the_op_refuses(second):
    # a float32 gradient first, one the op refuses second: torch's own clipping, as if unfused
    def grads():
        a, b = nn.Parameter(torch.ones(3)), nn.Parameter(second())
        a.grad, b.grad = torch.full((3,), 3.0), second()
        return [a, b]

    ref, ours = grads(), grads()
    total_ref = nn.utils.clip_grad_norm_(ref, 1.0)
    total = clip_grad_norm_(ours, 1.0)
    torch.testing.assert_close(total, total_ref, rtol=1e-6, atol=0)
    for p, q in zip(ref, ours, strict=True):
        assert q.grad.dtype == p.grad.dtype and q.grad.stride() == p.grad.stride()
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=0)


def test_clip_grad_norm_raises_as_torch_for_a_sparse_gradient():
    def params():
        a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(4))
        a.grad, b.grad = torch.ones(3), torch.ones(4).to_sparse()
        return [a, b]

    with pytest.raises(NotImplementedError) as ref:
        nn.utils.clip_grad_norm_(params(), 1.0)
    with pytest.raises(NotImplementedError) as ours:
        clip_grad_norm_(params(), 1.0)
    assert str(ours.value) == str(ref.value)
