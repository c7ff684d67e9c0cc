"""experiments/bench_ensemble_rules.py: repeated, interleaved timings, and a disagreement that
exits non-zero whatever python's -O says (it was an assert)."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import bench_ensemble_rules  # noqa: E402

TINY = ["--models", "5", "--tiles", "8", "--size", "32", "-k", "2", "--starts", "1"]


def test_rows_report_median_and_spread_over_rounds(tmp_path, capsys):
    out = tmp_path / "rules.json"
    assert bench_ensemble_rules.main([*TINY, "--repeats", "3", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["machine"]["cpus"] >= 1 and r["machine"]["torch_threads"] >= 1
    assert r["config"]["repeats"] == 3 and len(r["rows"]) == 3
    for row in r["rows"]:
        assert row["same_result"] is True
        for key in ("fast_s", "plain_s"):
            sp = row["spread"][key]
            assert len(sp["rounds"]) == 3 and sp["min"] <= row[key] == sp["median"] <= sp["max"]
        assert row["speedup"] == row["plain_s"] / row["fast_s"]
    assert "[min-max]" in capsys.readouterr().out


def test_a_disagreement_exits_nonzero_after_writing_the_json(tmp_path, monkeypatch, capsys):
    real = bench_ensemble_rules.plain_vote

    def wrong(lib, levels, k):  # the plain loop's best vote scores a little higher
        out = real(lib, levels, k)
        return [dataclasses.replace(out[0], score=out[0].score + 1e-3), *out[1:]]

    monkeypatch.setattr(bench_ensemble_rules, "plain_vote", wrong)
    out = tmp_path / "rules.json"
    assert bench_ensemble_rules.main([*TINY, "--repeats", "1", "--json", str(out)]) == 1
    rows = json.loads(out.read_text())["rows"]
    assert [r["same_result"] for r in rows] == [False, True, True]
    assert "disagree: vote (all combinations x counts)" in capsys.readouterr().err


def test_the_check_survives_python_dash_O(tmp_path):
    # python -O strips asserts: the check must not be one (the disagreement injected as above).
    script = f"""
import dataclasses, sys
sys.path.insert(0, {str(REPO / "experiments")!r})
import bench_ensemble_rules as b
real = b.plain_vote
def wrong(lib, levels, k):
    out = real(lib, levels, k)
    return [dataclasses.replace(out[0], score=out[0].score + 1e-3), *out[1:]]
b.plain_vote = wrong
sys.exit(b.main({[*TINY, "--repeats", "1"]!r}))
"""
    done = subprocess.run(
        [sys.executable, "-O", "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "the fast and the plain search disagree" in done.stderr
