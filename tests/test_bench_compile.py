"""experiments/bench_compile.py: the eager and compiled first-step losses are checked, not only
printed (torch.compile itself is not run here: its compilation takes minutes on a CPU)."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import bench_compile  # noqa: E402

from bldseg.train.config import RunConfig  # noqa: E402
from bldseg.tune.cli import CPU_DEMO  # noqa: E402


def test_loss_problem_uses_the_autocast_tolerance_and_refuses_non_finite():
    assert bench_compile.loss_problem(0.7, 0.7 * (1 + 5e-5), None) is None
    assert "tolerance 0.0001" in bench_compile.loss_problem(0.7, 0.7 * (1 + 5e-4), None)
    assert bench_compile.loss_problem(0.7, 0.7 * (1 + 5e-3), torch.bfloat16) is None
    assert "not finite" in bench_compile.loss_problem(0.7, float("nan"), torch.bfloat16)
    assert "not finite" in bench_compile.loss_problem(float("inf"), 0.7, None)


def _run(monkeypatch, tmp_path, compiled_loss: float) -> Path:
    def measure(cfg, compiled, warmup, steps):  # stands in for the timed steps
        loss = compiled_loss if compiled else 0.7
        return {"first_s": 2.0, "step_s": 0.05, "step_max_s": 0.08, "compile_s": 1.95, "loss": loss}

    monkeypatch.setattr(bench_compile, "measure", measure)
    out = tmp_path / "compile.json"
    argv = ["bench_compile.py", "--set", "precision=fp32", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    bench_compile.main()
    return out


def test_agreeing_losses_pass_and_are_recorded(monkeypatch, tmp_path):
    r = json.loads(_run(monkeypatch, tmp_path, 0.7).read_text())
    assert r["loss_ok"] is True and r["loss_rtol"] == 1e-4


def test_eager_steps_report_the_median_and_the_slowest(monkeypatch):
    # The eager arm only (compiling takes minutes): the tiny model at 32 px, three steps.
    flat = {**CPU_DEMO, "aug.crop_size": 32, "batch_size": 2, "precision": "fp32"}
    cfg = RunConfig.from_flat(flat)
    r = bench_compile.measure(cfg, compiled=False, warmup=0, steps=3)
    assert 0 < r["step_s"] <= r["step_max_s"]
    assert r["compile_s"] == r["first_s"] - r["step_s"] and math.isfinite(r["loss"])


def test_table_shows_the_slowest_step_beside_the_median():
    eager = {"first_s": 0.2, "step_s": 0.05, "step_max_s": 0.125, "compile_s": 0.15, "loss": 0.7}
    compiled = eager | {"first_s": 30.0, "step_s": 0.04, "step_max_s": 0.045, "compile_s": 29.96}
    head, e, c = bench_compile.table({"eager": eager, "compiled": compiled})
    assert head.split()[1:5] == ["step", "ms", "max", "ms"]
    assert e.split()[:4] == ["eager", "50.0", "125.0", "0.20"]
    assert c.split()[:5] == ["compiled", "40.0", "45.0", "30.00", "30.0"]


@pytest.mark.parametrize("loss", [0.71, float("nan")])
def test_disagreeing_losses_exit_nonzero_after_writing_the_json(monkeypatch, tmp_path, loss):
    with pytest.raises(SystemExit) as e:
        _run(monkeypatch, tmp_path, loss)
    assert str(e.value.code).startswith("bench_compile: eager and compiled disagree:")
    r = json.loads((tmp_path / "compile.json").read_text())
    assert r["loss_ok"] is False and r["rows"]["compiled"]["loss"] in (0.71, None)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--warmup", "-1"], "--warmup must"),
    ],
)
def test_no_timed_step_is_refused_naming_the_flag(monkeypatch, capsys, argv, says):
    # --steps 0 compiled for minutes, then failed in statistics.median([]) with a traceback
    def measure(*args, **kwargs):
        raise AssertionError("a step ran before the flags were checked")

    monkeypatch.setattr(bench_compile, "measure", measure)
    monkeypatch.setattr(sys, "argv", ["bench_compile.py", *argv])
    with pytest.raises(SystemExit) as e:
        bench_compile.main()
    assert e.value.code == 2 and says in capsys.readouterr().err
