"""Run precision: bf16 autocast on the CPU, fp16 refused there, and the CPU's bf16 flag."""

import json
import logging

import pytest
import torch
from torch import nn

from bldseg.train import engine
from bldseg.train.config import RunConfig
from bldseg.train.engine import autocast_dtype, fit
from tests.train.test_engine import BASE  # small, fast runs

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_autocast_dtype_by_device_and_setting():
    assert autocast_dtype("auto", CPU) is None  # float32 on the CPU unless asked
    assert autocast_dtype("fp32", CPU) is None
    assert autocast_dtype("bf16", CPU) is torch.bfloat16
    with pytest.raises(ValueError, match=r"precision='fp16' needs a CUDA device.*bf16"):
        autocast_dtype("fp16", CPU)
    # a GPU (only the mapping: no GPU needed to ask)
    assert autocast_dtype("auto", CUDA) is torch.bfloat16
    assert autocast_dtype("bf16", CUDA) is torch.bfloat16
    assert autocast_dtype("fp16", CUDA) is torch.float16
    assert autocast_dtype("fp32", CUDA) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n", True),
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 amx_tile amx_bf16\n", True),
        ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),  # Arm
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n", False),
        (None, None),  # no /proc/cpuinfo: unknown
    ],
)
def test_cpu_bf16_flag(tmp_path, monkeypatch, text, expected):
    info = tmp_path / "cpuinfo"
    if text is not None:
        info.write_text(text)
    monkeypatch.setattr(engine, "CPUINFO", info)
    assert engine.cpu_has_native_bf16() is expected


def test_bf16_on_a_cpu_without_it_is_logged(monkeypatch, caplog):
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="bldseg.train.engine"):
        assert autocast_dtype("bf16", CPU) is torch.bfloat16
    assert "emulates it" in caplog.text
    caplog.clear()
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: None)  # unknown: no warning
    with caplog.at_level(logging.WARNING, logger="bldseg.train.engine"):
        autocast_dtype("bf16", CPU)
    assert caplog.text == ""


def _record_conv_dtypes(monkeypatch, where=engine) -> list[torch.dtype]:
    """Every model ``where`` (fit's module, or prediction's) creates gets a hook recording its
    convolutions' output dtypes."""
    seen: list[torch.dtype] = []
    create = where.create_model

    def create_and_hook(*args, **kwargs):
        model = create(*args, **kwargs)
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
        return model

    monkeypatch.setattr(where, "create_model", create_and_hook)
    return seen


def test_fit_trains_in_bf16_on_the_cpu(small_world, tmp_path, monkeypatch):
    seen = _record_conv_dtypes(monkeypatch)
    c = RunConfig.from_flat({**BASE, "epochs": 4, "precision": "bf16"})
    bf16 = fit(c, tmp_path / "bf16", data=small_world)
    assert set(seen) == {torch.bfloat16}  # training and validation ran under autocast
    seen.clear()
    fp32 = fit(c.with_updates({"precision": "fp32"}), tmp_path / "fp32", data=small_world)
    assert set(seen) == {torch.float32}

    assert bf16.status == "completed"
    losses = [h["train_loss"] for h in bf16.history]
    assert losses[-1] < 0.8 * losses[0], losses
    # the same run in float32 lands close: bf16 changes rounding, not what is learned
    for a, b in zip(bf16.history, fp32.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=0.05)
    assert bf16.history[-1]["train_loss"] != fp32.history[-1]["train_loss"]
    # weights and optimizer state stay float32; the checkpoint predicts as any other
    last = torch.load(tmp_path / "bf16" / "last.pt", weights_only=True)
    assert {w.dtype for w in last["models"][0].values() if w.is_floating_point()} == {torch.float32}


def test_fit_refuses_fp16_on_the_cpu(small_world, tmp_path):
    c = RunConfig.from_flat({**BASE, "epochs": 1, "precision": "fp16"})
    with pytest.raises(ValueError, match=r"precision='fp16' needs a CUDA device"):
        fit(c, tmp_path, data=small_world)
    assert not (tmp_path / "last.pt").exists()


def test_layer_norm_normalises_in_float32_under_autocast():
    from bldseg.ops._layers import LayerNorm, build_norm_layer

    torch.manual_seed(0)
    ln = LayerNorm(16, eps=1e-6)
    nn.init.normal_(ln.weight)
    nn.init.normal_(ln.bias)
    x = (3 + 5 * torch.randn(2, 5, 5, 16)).bfloat16()  # (N, H, W, C), off-centre as features are
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ln(x)
        plain = nn.functional.layer_norm(x, (16,), ln.weight, ln.bias, 1e-6)
    want = nn.functional.layer_norm(x.double(), (16,), ln.weight.double(), ln.bias.double(), 1e-6)
    assert y.dtype == torch.float32  # as CUDA's autocast returns layer_norm
    torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)
    assert (plain.double() - want).abs().max() > 1e-3  # CPU autocast alone: bf16 out
    # outside autocast it is nn.LayerNorm, in any dtype (the float64 module tests)
    x64 = x.double()
    torch.testing.assert_close(ln.double()(x64), want)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 is never narrowed
        y64 = ln(x64)
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64, want)
    # official state-dict keys: the norm sits at the same Sequential index
    norm = build_norm_layer(16, "LN", "channels_first", "channels_first")
    assert isinstance(norm[1], LayerNorm) and set(norm.state_dict()) == {"1.weight", "1.bias"}


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_prediction_runs_in_the_precision_of_validation(
    small_world, tmp_path, monkeypatch, precision, dtype
):
    # thresholds are chosen on validation maps made under the run's autocast; predict and the
    # pipeline's test maps ran in float32 and moved about a tenth of the levels by one
    from bldseg import pipeline, predict

    c = RunConfig.from_flat({**BASE, "epochs": 1, "precision": precision})
    fit(c, tmp_path / "run", data=small_world)
    seen = _record_conv_dtypes(monkeypatch, predict)
    spec = predict.EnsembleSpec([str(tmp_path / "run" / "best.pt")], threshold=0.5)
    predict.predict_cache(spec, small_world.test, device="cpu", progress=False)
    assert set(seen) == {dtype}
    seen.clear()
    pipeline.write_test_library(tmp_path / "run", small_world, pipeline.test_truth(small_world))
    assert set(seen) == {dtype}
    assert engine.eval_autocast("fp16", CPU) is None  # a GPU's fp16 run predicted on a CPU


def test_prediction_runs_in_the_precision_the_run_validated_in_on_any_device(
    small_world, tmp_path, monkeypatch
):
    # `auto` is float32 on a CPU and bf16 on a GPU: resolved again on the predicting device, a
    # run validated on a GPU (bf16 maps, thresholds chosen on them) was predicted on a CPU in
    # float32, and a CPU-validated one on a GPU in bf16. best.pt and folds.json record it.
    from bldseg import predict
    from bldseg.train.folds import FOLDS_FILE, fit_folds

    c = RunConfig.from_flat({**BASE, "epochs": 1, "precision": "auto"})
    fit(c, tmp_path / "run", data=small_world)
    best = tmp_path / "run" / "best.pt"
    assert torch.load(best, weights_only=True)["amp"] == "fp32"  # validated on this CPU
    # as a GPU machine's fit records the same run (auto: bf16 there)
    state = torch.load(best, weights_only=True)
    assert engine.validated_precision("auto", torch.device("cuda")) == "bf16"
    torch.save({**state, "amp": "bf16"}, best)
    _, cfg, _ = predict.load_checkpoint(best)
    assert cfg.precision == "bf16" and engine.eval_autocast(cfg.precision, CPU) == torch.bfloat16
    assert predict.member_config(best)[0].precision == "bf16"
    seen = _record_conv_dtypes(monkeypatch, predict)
    spec = predict.EnsembleSpec([str(best)], threshold=0.5)
    predict.predict_cache(spec, small_world.test, device="cpu", progress=False)
    assert set(seen) == {torch.bfloat16}
    # a checkpoint of older bldseg records none: `auto` resolved where it predicts, as before
    torch.save({k: v for k, v in state.items() if k != "amp"}, best)
    assert predict.load_checkpoint(best)[1].precision == "auto"
    # a K-fold run's manifest records it too
    folds = c.with_updates({"folds": 2})
    fit_folds(folds, tmp_path / "kfold", data=small_world, progress=False)
    manifest = json.loads((tmp_path / "kfold" / FOLDS_FILE).read_text())
    assert manifest["amp"] == "fp32" and manifest["config"]["precision"] == "auto"
    manifest["amp"] = "bf16"
    (tmp_path / "kfold" / FOLDS_FILE).write_text(json.dumps(manifest))
    assert predict.member_config(tmp_path / "kfold")[0].precision == "bf16"
    assert predict.load_member(tmp_path / "kfold")[1].precision == "bf16"
    # continued on a device that validates otherwise, it keeps what its folds validated in
    with pytest.warns(UserWarning, match=r"its folds validated in bf16, this device validates"):
        fit_folds(folds, tmp_path / "kfold", data=small_world, progress=False)
    assert json.loads((tmp_path / "kfold" / FOLDS_FILE).read_text())["amp"] == "bf16"


def test_pipeline_test_maps_use_the_runs_tta(small_world, tmp_path):
    # thresholds of a tta=True run are chosen on flip-averaged maps; its held-out test maps
    # were made without flips, and an older file without the record was kept
    import numpy as np

    from bldseg import pipeline
    from bldseg.predict import image_loader, load_member

    c = RunConfig.from_flat({**BASE, "epochs": 1, "tta": True})
    fit(c, tmp_path / "run", data=small_world)
    truth = pipeline.test_truth(small_world)
    path = pipeline.write_test_library(tmp_path / "run", small_world, truth)
    model, _, _ = load_member(tmp_path / "run")
    loader = image_loader(small_world.test, 16)
    with np.load(path) as z:
        got = z["probs"]
    assert np.array_equal(got, engine.predict_probs(model, loader, CPU, None, True))
    assert not np.array_equal(got, engine.predict_probs(model, loader, CPU, None, False))
    # a file made otherwise (here: without its record) is made again, not kept
    with np.load(path) as z:
        np.savez(path, **{k: z[k] for k in z.files if k != "made_as"})
    pipeline.write_test_library(tmp_path / "run", small_world, truth)
    with np.load(path) as z:
        assert "made_as" in z.files
