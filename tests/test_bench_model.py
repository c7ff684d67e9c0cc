"""experiments/bench_model.py: the training step under the run config's precision."""

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import bench_model  # noqa: E402


def test_step_runs_under_the_precision_it_reports(monkeypatch):
    seen: list[torch.dtype] = []
    create = bench_model.create_model

    def create_and_hook(*args, **kwargs):
        model = create(*args, **kwargs)
        model.decode_head.classifier.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        return model

    monkeypatch.setattr(bench_model, "create_model", create_and_hook)
    cpu = torch.device("cpu")
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        seen.clear()
        r = bench_model.train_step_stats(
            "upernet_internimage_tiny", "reference", 64, 2, 2, cpu, precision
        )
        assert r["precision"] == precision and r["impl"] == "reference"
        assert 0 < r["ms_min"] <= r["ms_median"] <= r["ms_max"]
        assert seen == [dtype] * 3  # the warm-up step and two timed ones
    with pytest.raises(ValueError, match="needs a CUDA device"):
        bench_model.train_step_stats("upernet_internimage_tiny", "reference", 64, 2, 1, cpu, "fp16")


def test_step_table_shows_the_slowest_step_beside_best_and_median():
    # A noisy reference run (slowest step twice its best) must show in the table.
    steps = {
        "compiled": {"ms_min": 100.0, "ms_median": 105.0, "ms_max": 110.0},
        "reference": {"ms_min": 300.0, "ms_median": 320.0, "ms_max": 600.0},
    }
    for r in steps.values():
        r |= {"images_per_s": 8 / (r["ms_min"] / 1e3), "peak_mib": 50.0}
    head, comp, ref, speed = bench_model.step_table(steps)
    assert head.split()[2:8] == ["best", "ms", "median", "ms", "max", "ms"]
    assert comp.split()[:4] == ["compiled", "100", "105", "110"]
    assert ref.split()[:4] == ["reference", "300", "320", "600"]
    assert speed.strip().startswith("speed-up 3.00x (best), 3.05x (median)")


def test_json_is_replaced_whole_or_left_as_it_was(tmp_path, monkeypatch, capsys):
    # A full disk while the JSON is written must leave the previous file whole, not half a
    # file that no reader can parse: the record is written under another name and renamed.
    # Here the rename fails (as the write would on a full disk): the earlier file stays.
    import errno
    import os

    path = tmp_path / "model.json"
    path.write_text('{"earlier": true}\n')

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    small = ["--model", "upernet_internimage_tiny", "--size", "32", "--batch", "2", "--iters", "1"]
    monkeypatch.setattr(
        sys, "argv", ["bench_model.py", *small, "--skip-params", "--json", str(path)]
    )
    with pytest.raises(OSError, match="No space left"):
        bench_model.main()
    out = capsys.readouterr().out
    assert "speed-up" in out and "max ms" in out  # the steps ran; only the write failed
    assert json.loads(path.read_text()) == {"earlier": True}
    assert [p.name for p in tmp_path.iterdir()] == ["model.json"]  # no temporary left


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--iters", "0"], "--iters must be at least 1, got 0"),
        (["--batch", "0"], "--batch must be at least 1, got 0"),
    ],
)
def test_a_count_below_one_is_refused_naming_the_flag(monkeypatch, capsys, argv, says):
    # --iters 0 counted every model's parameters, then its child failed in statistics.median([])
    def no_setup():
        raise AssertionError("the benchmark started before its flags were checked")

    monkeypatch.setattr(bench_model, "load_dcnv3_op", no_setup)
    monkeypatch.setattr(sys, "argv", ["bench_model.py", "--skip-params", *argv])
    with pytest.raises(SystemExit) as e:
        bench_model.main()
    assert e.value.code == 2 and says in capsys.readouterr().err
