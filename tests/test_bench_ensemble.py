"""experiments/bench_ensemble.py: repeated, interleaved timings, and a non-zero exit when the
methods disagree on the best result."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import bench_ensemble  # noqa: E402

QUICK = ["--quick", "--skip-scale", "--repeats", "2"]


def test_rounds_run_every_arm_once_per_round_in_alternating_order():
    calls = []
    arms = {name: (lambda name=name: calls.append(name) or name) for name in ("a", "b", "c")}
    seconds, results = bench_ensemble.rounds(arms, 3)
    assert calls == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert {k: len(v) for k, v in seconds.items()} == {"a": 3, "b": 3, "c": 3}
    assert results == {"a": "a", "b": "b", "c": "c"}


def test_timings_report_median_and_spread_over_rounds(tmp_path, capsys):
    out = tmp_path / "ens.json"
    assert bench_ensemble.main([*QUICK, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["machine"]["cores"] >= 1 and r["machine"]["torch_threads"] >= 1
    pc = r["per_combination"]
    assert pc["same_result"] is True and pc["disagreements"] == [] and pc["repeats"] == 2
    for key in ("naive_ms", "numpy_hist_ms", "native_ms", "native_all_ms"):
        sp = pc["spread"][key]
        assert len(sp["rounds"]) == 2
        assert sp["min"] <= pc[key] == sp["median"] <= sp["max"]  # the old keys: medians
    assert pc["speedup_vs_naive"] == pc["naive_ms"] / pc["native_ms"]
    assert set(pc["blocks_ms"]) == {"4", "1000"} == set(pc["spread"]["blocks_ms"])
    assert "[min-max]" in capsys.readouterr().out


def test_disagreeing_methods_exit_nonzero_after_writing_the_json(tmp_path, monkeypatch, capsys):
    real = bench_ensemble.naive_best

    def off_by_one(*args):  # the plain loop answers one level higher
        level, score = real(*args)
        return level + 1, score

    monkeypatch.setattr(bench_ensemble, "naive_best", off_by_one)
    out = tmp_path / "ens.json"
    assert bench_ensemble.main([*QUICK, "--json", str(out)]) == 1
    pc = json.loads(out.read_text())["per_combination"]
    assert pc["same_result"] is False
    assert pc["disagreements"] == ["numpy-hist vs naive", "native vs naive"]
    err = capsys.readouterr().err
    assert "numpy-hist vs naive, native vs naive" in err and str(out) in err
