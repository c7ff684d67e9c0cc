"""experiments/bench_optim.py: times both paths and checks their numerics side by side."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import bench_optim  # noqa: E402


def test_bench_optim_writes_rows_and_agreeing_numerics(monkeypatch, tmp_path, capsys):
    out = tmp_path / "b.json"
    argv = ["bench_optim.py", "--size", "64", "--batch", "2", "--threads", "1"]
    argv += ["--warmup", "1", "--calls", "3", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    bench_optim.main()
    r = json.loads(out.read_text())
    assert r["tensors"] > 100 and r["parameters"] > 500_000  # the demo model's 168 tensors
    (row,) = r["rows"]
    assert row["threads"] == 1
    for key in ("step_package_ms", "step_bldseg_ms", "clip_torch_ms", "clip_bldseg_ms"):
        assert row[key] <= row[f"{key}_max"]  # the median and the slowest call
    assert row["restore_ms"] <= row["restore_ms_max"]
    # the clipped norm is the same to float32 rounding, and max_norm (1e-3) is below it
    assert abs(r["norm_bldseg"] - r["norm_torch"]) <= 1e-5 * r["norm_torch"]
    assert r["norm_torch"] > 1e-3
    assert r["clip_max_abs_diff"] < 1e-8 and r["step_max_abs_diff"] < 1e-5
    assert r["numerics_ok"] is True
    out = capsys.readouterr().out
    assert "clipped norm torch" in out and "median / slowest of 3" in out


def test_table_shows_the_slowest_call_beside_the_median():
    row = {"threads": 2, "step_package_ms": 1.5, "step_package_ms_max": 9.25}
    row |= {"step_bldseg_ms": 0.5, "step_bldseg_ms_max": 0.625, "clip_torch_ms": 2.0}
    row |= {"clip_torch_ms_max": 2.5, "clip_bldseg_ms": 0.25, "clip_bldseg_ms_max": 0.375}
    head, line = bench_optim.table([row])
    assert head.split()[:3] == ["threads", "step", "pkg"] and head.endswith("clip ours")
    cells = line.split()
    assert cells[0] == "2"
    assert [" ".join(cells[i : i + 3]) for i in range(1, len(cells), 3)] == [
        "1.500 / 9.250",
        "0.500 / 0.625",
        "2.000 / 2.500",
        "0.250 / 0.375",
    ]
    assert len(head) == len(line) <= 80


def test_numerics_beyond_tolerance_or_not_finite_are_named():
    ok = {"norm_torch": 0.5, "norm_bldseg": 0.5, "clip_max_abs_diff": 1e-11}
    ok["step_max_abs_diff"] = 1e-7
    assert bench_optim.numerics_problems(ok, 1e-3) == []
    (msg,) = bench_optim.numerics_problems({**ok, "norm_bldseg": float("nan")}, 1e-3)
    assert msg.startswith("non-finite norm_bldseg=nan")
    (msg,) = bench_optim.numerics_problems({**ok, "clip_max_abs_diff": 2e-8}, 1e-3)
    assert "clipped gradient differs by 2e-08 (tolerance 1e-05 x the clipped norm 0.001)" in msg
    # without clipping (max_norm above the norm) the gradients keep the norm's scale
    assert bench_optim.numerics_problems({**ok, "clip_max_abs_diff": 2e-8}, 10.0) == []
    (msg,) = bench_optim.numerics_problems({**ok, "step_max_abs_diff": 3e-5}, 1e-3)
    assert "a parameter after 5 steps differs by 3e-05" in msg


def test_a_clipping_that_disagrees_exits_nonzero_after_writing_the_json(monkeypatch, tmp_path):
    real = bench_optim.clip_grad_norm_

    def off(params, max_norm, **kw):  # ours clips to a slightly different norm
        norm = real(params, max_norm, **kw)
        for p in params:
            p.grad.mul_(1.001)
        return norm

    monkeypatch.setattr(bench_optim, "clip_grad_norm_", off)
    out = tmp_path / "b.json"
    argv = ["bench_optim.py", "--size", "64", "--batch", "2", "--threads", "1"]
    argv += ["--warmup", "0", "--calls", "1", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        bench_optim.main()
    assert "ours and the reference disagree: clipped gradient differs" in str(e.value.code)
    r = json.loads(out.read_text())
    assert r["numerics_ok"] is False and r["tolerances"]["clip_rtol"] == bench_optim.CLIP_RTOL


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--calls", "0"], "--calls must be at least 1, got 0"),
        (["--batch", "0"], "--batch must be at least 1, got 0"),
        (["--threads", "2", "0"], "--threads must each be at least 1, got 0"),
        (["--warmup", "-1"], "--warmup must be 0 or more, got -1"),
    ],
)
def test_a_count_below_one_is_refused_naming_the_flag(monkeypatch, capsys, argv, says):
    # --calls 0 built the model and its gradients, then failed in statistics.median([])
    def no_setup():
        raise AssertionError("the benchmark started before its flags were checked")

    monkeypatch.setattr(bench_optim, "load_step_op", no_setup)
    monkeypatch.setattr(sys, "argv", ["bench_optim.py", *argv])
    with pytest.raises(SystemExit) as e:
        bench_optim.main()
    assert e.value.code == 2 and says in capsys.readouterr().err
