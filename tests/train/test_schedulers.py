"""LR schedulers: hand-computed values of the cosine restarts curve, and build_scheduler."""

import itertools
import math

import pytest
import torch

from bldseg.train.schedulers import SCHEDULERS, CosineAnnealingWarmupRestarts, build_scheduler


def _optimizer(lr: float = 0.1, group_lrs: tuple[float, ...] = ()) -> torch.optim.Optimizer:
    """SGD over one (or one per ``group_lrs``) scalar parameter."""
    if not group_lrs:
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": g} for g in group_lrs]
    return torch.optim.SGD(groups, lr=lr)


def _lrs(opt: torch.optim.Optimizer, sched, n: int) -> list[float]:
    """LR of group 0 at steps 0 .. n-1 (read before each ``sched.step()``)."""
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _cosine(**kw) -> CosineAnnealingWarmupRestarts:
    args = dict(first_cycle_steps=10, max_lr=1.0, min_lr=0.1, warmup_steps=2, gamma=0.5)
    return CosineAnnealingWarmupRestarts(_optimizer(), **{**args, **kw})


# --- CosineAnnealingWarmupRestarts -------------------------------------------------------------


def test_cosine_warmup_values_by_hand():
    s = _cosine()  # cycle 10 steps, warm-up 2, lr in [0.1, 1.0]
    assert s.lr_at(0) == pytest.approx(0.1)  # warm-up starts at min_lr
    assert s.lr_at(1) == pytest.approx(0.55)  # half-way up
    assert s.lr_at(2) == pytest.approx(1.0)  # end of warm-up: the peak


def test_cosine_decay_values_by_hand():
    s = _cosine()
    # Decay spans steps 2..10 (8 steps): step 6 is half-way, cos(pi/2) = 0.
    assert s.lr_at(6) == pytest.approx(0.55)
    # Step 9 (the cycle's last): frac = 7/8.
    last = 0.1 + 0.9 * (1 + math.cos(math.pi * 7 / 8)) / 2
    assert s.lr_at(9) == pytest.approx(last)
    assert 0.1 < s.lr_at(9) < 0.14
    # Monotone decay after the warm-up.
    decay = [s.lr_at(k) for k in range(2, 10)]
    assert all(a > b for a, b in itertools.pairwise(decay))


def test_cosine_second_cycle_peak_decays_by_gamma():
    s = _cosine()
    assert s.lr_at(10) == pytest.approx(0.1)  # restart: warm-up from min_lr again
    assert s.lr_at(11) == pytest.approx(0.1 + (0.5 - 0.1) / 2)
    assert s.lr_at(12) == pytest.approx(0.5)  # peak of cycle 1 = max_lr * gamma
    assert s.lr_at(22) == pytest.approx(0.25)  # peak of cycle 2 = max_lr * gamma**2
    assert s.lr_at(16) == pytest.approx(0.1 + 0.4 * 0.5)  # mid-cosine of cycle 1


def test_cosine_cycle_mult_boundaries():
    # No warm-up: the LR equals max_lr exactly at the start of each cycle and nowhere else.
    s = _cosine(cycle_mult=2.0, warmup_steps=0, gamma=1.0)
    peaks = [k for k in range(80) if s.lr_at(k) == pytest.approx(1.0)]
    assert peaks == [0, 10, 30, 70]  # cycle lengths 10, 20, 40


def test_cosine_cycle_mult_with_warmup():
    s = _cosine(cycle_mult=2.0, warmup_steps=2, gamma=0.5)
    # Cycle 1: int((10 - 2) * 2) + 2 = 18 steps, 10..27: warm-up 10..12, decay over 16 steps.
    assert s.lr_at(10) == pytest.approx(0.1)
    assert s.lr_at(12) == pytest.approx(0.5)
    assert s.lr_at(20) == pytest.approx(0.1 + 0.4 * 0.5)
    assert s.lr_at(27) == pytest.approx(0.1 + 0.4 * (1 + math.cos(math.pi * 15 / 16)) / 2)
    # Cycle 2: int((18 - 2) * 2) + 2 = 34 steps, 28..61.
    assert s.lr_at(28) == pytest.approx(0.1)
    assert s.lr_at(30) == pytest.approx(0.25)
    assert s.lr_at(62) == pytest.approx(0.1)


def _published_curve(first, mult, max_lr, min_lr, warmup, gamma, steps):
    """The widely used implementation's per-step rule, transcribed from its published
    formula: step_in_cycle += 1; on reaching the cycle's length, cycle += 1 and the next
    length is int((length - warmup) * mult) + warmup; the peak is max_lr * gamma**cycle."""
    out, cycle, pos, length = [], 0, 0, first
    for _ in range(steps):
        peak = max_lr * gamma**cycle
        if pos < warmup:
            out.append((peak - min_lr) * pos / warmup + min_lr)
        else:
            frac = (pos - warmup) / (length - warmup)
            out.append(min_lr + (peak - min_lr) * (1 + math.cos(math.pi * frac)) / 2)
        pos += 1
        if pos >= length:
            cycle, pos = cycle + 1, pos - length
            length = int((length - warmup) * mult) + warmup
    return out


@pytest.mark.parametrize(
    "first, mult, warmup, gamma",
    [(10, 1.0, 3, 0.8), (10, 1.5, 3, 0.9), (7, 2.0, 2, 0.5), (25, 1.3, 0, 1.0), (12, 2.7, 5, 0.7)],
)
def test_cosine_matches_the_published_formula(first, mult, warmup, gamma):
    s = _cosine(first_cycle_steps=first, cycle_mult=mult, warmup_steps=warmup, gamma=gamma)
    expected = _published_curve(first, mult, 1.0, 0.1, warmup, gamma, 300)
    assert [s.lr_at(k) for k in range(300)] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # ... and stepping the real scheduler gives the same curve.
    assert _lrs(s.optimizer, s, 300) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_cosine_ported_config_known_steps():
    # first 10, mult 1.5, warm-up 3: cycles of 10, int(7 * 1.5) + 3 = 13, int(10 * 1.5) + 3 = 18,
    # 25 steps, so restarts (LR back at min_lr) at steps 10, 23, 41, 66 — not at 10, 25, 47.
    s = _cosine(first_cycle_steps=10, cycle_mult=1.5, warmup_steps=3, gamma=1.0)
    restarts = [k for k in range(1, 80) if s.lr_at(k) == pytest.approx(0.1)]
    assert restarts == [10, 23, 41, 66]


def test_cosine_real_stepping_matches_lr_at():
    s = _cosine(cycle_mult=2.0)
    got = _lrs(s.optimizer, s, 75)
    assert got == pytest.approx([s.lr_at(k) for k in range(75)])
    assert s.get_last_lr() == pytest.approx([s.lr_at(75)])


def test_cosine_state_dict_round_trip_resumes_curve():
    ref = _cosine(cycle_mult=2.0)
    expected = _lrs(ref.optimizer, ref, 40)

    first = _cosine(cycle_mult=2.0)
    head = _lrs(first.optimizer, first, 13)
    state = first.state_dict()

    resumed = _cosine(cycle_mult=2.0)
    resumed.optimizer.load_state_dict(first.optimizer.state_dict())
    resumed.load_state_dict(state)
    tail = _lrs(resumed.optimizer, resumed, 27)
    assert head + tail == pytest.approx(expected)


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(first_cycle_steps=0), "first_cycle_steps"),
        (dict(warmup_steps=10), "warmup_steps"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(cycle_mult=0.5), "cycle_mult"),
        (dict(min_lr=2.0), "min_lr"),
        (dict(min_lr=-1e-3), "min_lr"),
    ],
)
def test_cosine_invalid_args_named(kw, name):
    with pytest.raises(ValueError, match=name):
        _cosine(**kw)


# --- build_scheduler ---------------------------------------------------------------------------


def test_onecycle_peaks_at_optimizer_lr_at_pct_start():
    opt = _optimizer(0.1)
    s = build_scheduler("onecycle", opt, 100, pct_start=0.3, div_factor=25.0, final_div_factor=1e4)
    lrs = _lrs(opt, s, 100)
    assert lrs[0] == pytest.approx(0.1 / 25)
    assert max(lrs) == pytest.approx(0.1)
    assert lrs.index(max(lrs)) == 29  # torch's OneCycleLR: peak at pct_start * total - 1
    assert lrs[-1] == pytest.approx(0.1 / 25 / 1e4)


def test_onecycle_cycles_beta1_only_when_asked():
    # With cycle_momentum (the default, torch's one-cycle) AdamW's beta1 follows 0.95 -> 0.85
    # -> 0.95 and optim.beta1 is not used; without it beta1 stays what the config says.
    from bldseg.train.config import RunConfig

    def beta1s(cycle: bool) -> list[float]:
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.1, betas=(0.9, 0.99))
        kw = RunConfig.from_flat({"sched.cycle_momentum": cycle}).sched.scheduler_kwargs(100)
        s = build_scheduler("onecycle", opt, 100, **kw)
        out = []
        for _ in range(100):
            out.append(opt.param_groups[0]["betas"][0])
            opt.step()
            s.step()
        return out

    cycled = beta1s(True)
    assert cycled[0] == pytest.approx(0.95) and min(cycled) == pytest.approx(0.85)
    assert beta1s(False) == [0.9] * 100


def test_cosine_restarts_by_name_uses_optimizer_lr_and_whole_run():
    opt = _optimizer(0.1)
    s = build_scheduler("cosine_restarts", opt, 50, min_lr=1e-4, warmup_steps=5)
    assert isinstance(s, CosineAnnealingWarmupRestarts)
    lrs = _lrs(opt, s, 50)
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[5] == pytest.approx(0.1)  # peak = the optimizer's LR
    assert max(lrs) == pytest.approx(0.1)
    assert lrs[-1] < 1e-3  # one cycle spanning the run: ends near min_lr
    assert s.lr_at(50) == pytest.approx(1e-4)  # ... and would restart after it


def test_poly_warmup_and_decay_values():
    # mmcv's PolyLrUpdaterHook with warmup="linear": the poly curve over the whole run, scaled
    # during the warm-up by a factor rising from warmup_ratio to 1
    opt = _optimizer(0.1)
    s = build_scheduler("poly", opt, 100, warmup_steps=10, power=2.0, min_lr=1e-3)
    lrs = _lrs(opt, s, 120)
    floor = 0.01  # min_lr / lr

    def regular(step):
        return 0.1 * ((1 - floor) * (1 - step / 100) ** 2 + floor)

    ratio = 1e-6  # the official recipe's warmup_ratio, poly_warmup's default
    assert lrs[0] == pytest.approx(0.1 * ratio)
    assert lrs[5] == pytest.approx(regular(5) * (ratio + (1 - ratio) * 0.5))
    assert lrs[10] == pytest.approx(regular(10)) and lrs[10] == max(lrs)
    assert lrs[55] == pytest.approx(0.1 * (0.99 * 0.45**2 + 0.01))
    assert lrs[100] == pytest.approx(1e-3)
    assert lrs[119] == pytest.approx(1e-3)  # stays at the floor past the end
    # past the warm-up it is the curve of a run without one
    plain_opt = _optimizer(0.1)
    plain = _lrs(plain_opt, build_scheduler("poly", plain_opt, 100, power=2.0, min_lr=1e-3), 100)
    assert lrs[10:100] == pytest.approx(plain[10:100])


def test_constant_keeps_optimizer_lr():
    opt = _optimizer(0.03)
    s = build_scheduler("constant", opt, 10)
    assert _lrs(opt, s, 20) == pytest.approx([0.03] * 20)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_name_builds_and_steps(name):
    opt = _optimizer(0.1)
    lrs = _lrs(opt, build_scheduler(name, opt, 20), 20)
    assert all(0 <= lr <= 0.1 + 1e-12 for lr in lrs)
    assert max(lrs) == pytest.approx(0.1, rel=0.05)


def test_unknown_name_is_named():
    with pytest.raises(ValueError, match=r"'cosine'.*onecycle"):
        build_scheduler("cosine", _optimizer(), 10)


@pytest.mark.parametrize(
    "name, kw, bad",
    [
        ("poly", dict(gamma=0.5), "gamma"),
        ("constant", dict(pct_start=0.2), "pct_start"),
        ("onecycle", dict(warmup_steps=3), "warmup_steps"),
        ("cosine_restarts", dict(max_lr=1.0), "max_lr"),  # max_lr is the optimizer's LR
    ],
)
def test_unknown_parameter_is_named(name, kw, bad):
    with pytest.raises(ValueError, match=bad):
        build_scheduler(name, _optimizer(), 10, **kw)


@pytest.mark.parametrize(
    "name, kw, bad",
    [
        ("cosine_restarts", dict(warmup_steps=10), "warmup_steps"),
        ("cosine_restarts", dict(cycle_mult=0.5), "cycle_mult"),
        ("cosine_restarts", dict(min_lr=1.0), "min_lr"),
        ("onecycle", dict(pct_start=1.5), "pct_start"),
    ],
)
def test_invalid_argument_is_named(name, kw, bad):
    with pytest.raises(ValueError, match=bad):
        build_scheduler(name, _optimizer(0.1), 10, **kw)


@pytest.mark.parametrize(
    "name",
    ["onecycle", "cosine_restarts", "poly", "constant"],
)
def test_per_group_lr_ratios_are_kept(name):
    # engine.build_optimizer gives each layer-decay group its own LR (o.lr * lr_scale); a
    # schedule must scale them together, not flatten them to param_groups[0]["lr"].
    opt = _optimizer(0.1, group_lrs=(0.01, 0.1))
    s = build_scheduler(name, opt, 100)
    for _ in range(30):
        opt.step()
        s.step()
    lo, hi = (g["lr"] for g in opt.param_groups)
    assert hi == pytest.approx(10 * lo)


@pytest.mark.parametrize("name", ["cosine_restarts", "poly"])
def test_floor_keeps_group_ratios(name):
    # min_lr is the top group's floor: a layer-decay group whose LR lies below it must decay,
    # not rise to it (poly took min_lr as every group's absolute floor: 1e-7 -> 9.9e-7)
    opt = _optimizer(1e-3, group_lrs=(1e-7, 1e-3))
    s = build_scheduler(name, opt, 100, min_lr=1e-5)
    for _ in range(99):
        opt.step()
        s.step()
    lo, hi = (g["lr"] for g in opt.param_groups)
    assert lo <= 1e-7
    assert hi == pytest.approx(1e4 * lo)
    assert 1e-5 <= hi < 2.5e-5  # the last step: near the floor
