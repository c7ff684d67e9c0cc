"""Schedule-free AdamW (sched.name=schedulefree): the optimizer, its modes, and fit()."""

import pytest
import torch
from torch import nn

from bldseg.train import engine
from bldseg.train.config import RunConfig
from bldseg.train.engine import build_optimizer, eval_weights, fit, set_optimizer_mode
from tests.train.test_engine import BASE, check_layer_decay_groups  # small, fast runs

SF = {**BASE, "sched.name": "schedulefree"}


def test_groups_warm_up_and_config_checks():
    from bldseg.models import create_model

    model = create_model("upernet_internimage_tiny", impl="reference")
    c = RunConfig.from_flat(
        {**SF, "optim.layer_decay": 0.5, "optim.weight_decay": 0.1, "sched.warmup_frac": 0.1}
    )
    opt = build_optimizer(model, c, total_steps=1000)
    assert type(opt).__name__ == "AdamWScheduleFree"
    # the same groups as AdamW's: layer-wise LRs, no decay on biases and norms
    check_layer_decay_groups(model, opt)
    assert all(g["warmup_steps"] == 100 for g in opt.param_groups)
    # a fixed warm-up length replaces the share, whatever the run's length
    fixed = RunConfig.from_flat({**SF, "sched.warmup_frac": 0.1, "sched.warmup_steps": 128})
    for total in (1000, 3840):
        opt = build_optimizer(model, fixed, total_steps=total)
        assert all(g["warmup_steps"] == 128 for g in opt.param_groups)
    # AdamW itself has no modes: switching it is a no-op
    adamw = build_optimizer(model, RunConfig.from_flat(BASE))
    set_optimizer_mode([adamw], train=False)
    # the CPU settings choose schedule-free: the message says how to use EMA there
    with pytest.raises(
        ValueError,
        match=r"optim\.ema=0\.9 must be 0 with sched\.name=sched.*"
        r"set sched\.name=onecycle",
    ):
        RunConfig.from_flat({**SF, "optim.ema": 0.9})


def test_modes_hold_the_gradient_point_and_the_average():
    """A float64 mirror of the method (Defazio et al. 2024, with warm-up and lr^2 weights):
    z takes AdamW-normalised steps, x is the lr^2-weighted average of the z's, and the
    gradient is taken at y = (1 - beta1) z + beta1 x. Train mode holds y, eval mode x."""
    torch.manual_seed(0)
    net = nn.Linear(3, 2).double()
    c = RunConfig.from_flat({**SF, "optim.weight_decay": 0.0, "sched.warmup_frac": 0.5})
    opt = build_optimizer(net, c, total_steps=8)  # warm-up over 4 steps
    p0 = [p.detach().clone() for p in net.parameters()]
    z, x = [t.clone() for t in p0], [t.clone() for t in p0]
    v = [torch.zeros_like(t) for t in p0]
    lr, (b1, b2), eps = 3e-3, (0.9, 0.999), 1e-8
    wsum, lr_max = 0.0, 0.0
    set_optimizer_mode([opt], train=True)
    for k in range(8):
        inp = torch.randn(5, 3, dtype=torch.float64)
        opt.zero_grad()
        net(inp).pow(2).sum().backward()
        grads = [p.grad.clone() for p in net.parameters()]
        opt.step()
        lr_k = lr * min(1.0, (k + 1) / 4)
        lr_max = max(lr_max, lr_k)
        wsum += lr_max**2
        ck = lr_max**2 / wsum
        for i, g in enumerate(grads):
            v[i] = b2 * v[i] + (1 - b2) * g * g
            z[i] = z[i] - lr_k * g / ((v[i] / (1 - b2 ** (k + 1))).sqrt() + eps)
            x[i] = (1 - ck) * x[i] + ck * z[i]
        for p, zi, xi in zip(net.parameters(), z, x, strict=True):  # train mode: y
            torch.testing.assert_close(p.detach(), (1 - b1) * zi + b1 * xi)
    set_optimizer_mode([opt], train=False)
    for p, xi in zip(net.parameters(), x, strict=True):
        torch.testing.assert_close(p.detach(), xi)
    assert not torch.allclose(x[0], z[0])  # the average is not the last iterate
    set_optimizer_mode([opt], train=False)  # idempotent
    for p, xi in zip(net.parameters(), x, strict=True):
        torch.testing.assert_close(p.detach(), xi)


def test_fit_validates_saves_and_resumes_the_average(small_world, tmp_path):
    c = RunConfig.from_flat({**SF, "epochs": 3, "sched.warmup_frac": 0.5})
    straight = fit(c, tmp_path / "a", data=small_world)
    assert straight.status == "completed"
    # 8 steps per epoch, warm-up over 12: the LR the last step of each epoch took
    assert [h["lr"] for h in straight.history] == pytest.approx([2e-3, 3e-3, 3e-3])
    last = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    # saved in eval mode: the checkpoint's weights are the average, the ones to predict with
    assert not any(g["train_mode"] for g in last["optimizers"][0]["param_groups"])
    assert eval_weights(last)[0] is last["models"][0]
    assert last["optimizers"][0]["param_groups"][0]["k"] == 24

    # stopping after 1 epoch: best.pt holds what validation scored, the average
    fit(c, tmp_path / "b", data=small_world, stop_after=1)
    best = torch.load(tmp_path / "b" / "best.pt", weights_only=True)
    first = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert best["epoch"] == 1
    for k, w in first["models"][0].items():
        assert torch.equal(best["model"][k], w), k
    # ... which is not the point the gradients were taken at
    model = engine.create_model(c.model, **c.model_kwargs())
    model.load_state_dict(first["models"][0])
    opt = build_optimizer(model, c, total_steps=24)
    opt.load_state_dict(first["optimizers"][0])
    set_optimizer_mode([opt], train=True)
    w = model.state_dict()["decode_head.classifier.weight"]
    assert not torch.equal(w, best["model"]["decode_head.classifier.weight"])

    # resuming switches back to the gradient point exactly as the straight run did
    resumed = fit(c, tmp_path / "b", data=small_world)
    assert [h["val_dice_best"] for h in resumed.history] == [
        h["val_dice_best"] for h in straight.history
    ]
    last_b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    for k, w in last["models"][0].items():
        assert torch.equal(last_b["models"][0][k], w), k


def test_coteaching_switches_both_networks(small_world, tmp_path):
    c = RunConfig.from_flat({**SF, "epochs": 2, "coteach.enabled": True, "coteach.t_k": 1})
    fit(c, tmp_path, data=small_world, stop_after=1)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    for o in last["optimizers"]:  # both saved at their averages, one step per batch each
        assert [(g["train_mode"], g["k"]) for g in o["param_groups"]] == [(False, 8)] * len(
            o["param_groups"]
        )
    chosen = 0  # the run's model is network f
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    for k, w in last["models"][chosen].items():
        assert torch.equal(best["model"][k], w), k
    assert fit(c, tmp_path, data=small_world).status == "completed"
