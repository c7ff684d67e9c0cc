import pytest
import torch
from torch import nn

from bldseg.train.config import RunConfig
from bldseg.train.ema import WeightEMA
from bldseg.train.engine import eval_weights, fit
from tests.train.test_engine import BASE  # the engine tests' small, fast run


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 1, 1))


def test_average_follows_the_formula_with_its_warm_up():
    model = _net()
    ema = WeightEMA(model, decay=0.9)
    init0 = model[0].weight.detach().clone()
    # float64 mirror of every floating tensor, updated by the formula in the docstring
    expect = [t.detach().double().clone() for t in [*model.parameters(), *model.buffers()]]
    floating = [t.is_floating_point() for t in [*model.parameters(), *model.buffers()]]
    model.train()
    for n in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(2, 3, 8, 8))  # moves BatchNorm's running stats and its counter
        d = min(0.9, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(d)
        ema.update(model)
        current = [t.detach() for t in [*model.parameters(), *model.buffers()]]
        for i, t in enumerate(current):
            expect[i] = d * expect[i] + (1 - d) * t.double() if floating[i] else t.double()
    got = [*ema.module.parameters(), *ema.module.buffers()]
    for g, e, f in zip(got, expect, floating, strict=True):
        if f:
            torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-6)
        else:  # num_batches_tracked: the model's count, not an average
            assert int(g) == int(e) == 30
    # still warming up after 30 updates: (1 + 30) / (10 + 30) < 0.9
    assert ema.updates == 30 and ema.current_decay() == pytest.approx(31 / 40)
    # the warm-up let the average leave the initial weights: nearer the trained ones
    w_avg, w_now = ema.module[0].weight, model[0].weight
    assert (w_avg - w_now).norm() < 0.5 * (w_avg - init0).norm()
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_state_round_trip_and_bad_decay():
    model = _net()
    ema = WeightEMA(model, 0.99)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    other = WeightEMA(_net(), 0.99)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1
    torch.testing.assert_close(other.module[0].weight, ema.module[0].weight, rtol=0, atol=0)
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="EMA decay"):
            WeightEMA(model, bad)
    with pytest.raises(ValueError, match=r"optim\.ema=1\.0 must be in \[0, 1\)"):
        RunConfig.from_flat({**BASE, "optim.ema": 1.0})


def test_fit_validates_saves_and_resumes_the_average(small_world, tmp_path):
    c = RunConfig.from_flat({**BASE, "epochs": 3, "optim.ema": 0.9})
    straight = fit(c, tmp_path / "a", data=small_world)
    last = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    steps = 3 * (64 // 8)
    assert last["emas"][0]["updates"] == steps
    avg, trained = last["emas"][0]["module"], last["models"][0]
    assert avg.keys() == trained.keys()
    assert eval_weights(last)[0] is avg
    # the average is not the trained weights
    assert any(not torch.equal(avg[k], trained[k]) for k in avg if avg[k].is_floating_point())

    # stopping after 1 epoch: that epoch is the best so far, and best.pt holds the average
    # (what validation scored and predictions use), not the trained weights
    fit(c, tmp_path / "b", data=small_world, stop_after=1)
    best = torch.load(tmp_path / "b" / "best.pt", weights_only=True)
    first = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert best["epoch"] == 1
    for k, v in first["emas"][0]["module"].items():
        assert torch.equal(best["model"][k], v), k
    assert not torch.equal(
        best["model"]["decode_head.classifier.weight"],
        first["models"][0]["decode_head.classifier.weight"],
    )

    # resuming continues the average exactly
    resumed = fit(c, tmp_path / "b", data=small_world)
    assert [h["val_dice_best"] for h in resumed.history] == [
        h["val_dice_best"] for h in straight.history
    ]
    last_b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    for k in avg:
        assert torch.equal(last_b["emas"][0]["module"][k], avg[k]), k


def test_without_ema_the_trained_weights_predict(small_world, tmp_path):
    fit(RunConfig.from_flat({**BASE, "epochs": 1}), tmp_path, data=small_world)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["emas"] == [] and eval_weights(last)[0] is last["models"][0]
    # an older last.pt without the key
    del last["emas"]
    assert eval_weights(last)[0] is last["models"][0]
