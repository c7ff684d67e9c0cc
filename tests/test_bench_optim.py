"""experiments/bench_optim.py: times both paths and checks their numerics side by side."""

import json
import sys
from pathlib import Path

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
        assert key in row
    # the clipped norm is the same to float32 rounding, and max_norm (1e-3) is below it
    assert abs(r["norm_bldseg"] - r["norm_torch"]) <= 1e-5 * r["norm_torch"]
    assert r["norm_torch"] > 1e-3
    assert r["clip_max_abs_diff"] < 1e-8 and r["step_max_abs_diff"] < 1e-5
    assert "clipped norm torch" in capsys.readouterr().out
