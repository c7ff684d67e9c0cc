"""End-to-end: the whole pipeline at its smallest size, as a user runs it (slow: ~2 minutes)."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pipeline_end_to_end_and_rerun_skips(tmp_path):
    args = [
        sys.executable,
        str(REPO / "experiments" / "pipeline.py"),
        "--trials",
        "2",
        "--epochs",
        "1",
        "--k-max",
        "2",
        "--set",
        "samples_per_epoch=32",
    ]
    env = {"PYTHONPATH": str(REPO), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    out = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-4000:]
    res = tmp_path / "results" / "pipeline"
    state = json.loads((res / "pipeline_state.json").read_text())
    assert list(state["stages"]) == ["tune_aug", "tune_sched", "tune_tau"]
    sub = pd.read_csv(res / "submission.csv")
    test_ids = pd.read_csv(tmp_path / "data" / "synthetic" / "test.csv")["img_id"]
    assert list(sub["img_id"]) == list(test_ids) and sub["mask_rle"].notna().all()
    assert 0.0 <= state["predict"]["test_dice"] <= 1.0
    report = (res / "REPORT.md").read_text()
    for section in (
        "Best single model per search stage",
        "Plain BCE vs co-teaching",
        "Thresholds: 0.5 vs sweep vs Youden",
        "Best single model vs best ensemble",
    ):
        assert section in report
    for png in ("stages", "coteaching", "thresholds", "ensemble"):
        assert (res / "report" / f"{png}.png").stat().st_size > 5000
    # every trial of every stage is one MLflow child run; stages are linked
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    prev = state["pipeline_run_id"]
    for stage in ("tune_aug", "tune_sched", "tune_tau"):
        parent = client.get_run(state["stages"][stage]["parent_run_id"])
        assert parent.data.tags["bldseg.previous_run_id"] == prev
        prev = parent.info.run_id
    # later stages start from the best config found before them
    aug_best = state["stages"]["tune_aug"]["best_config"]
    sched = client.get_run(state["stages"]["tune_sched"]["parent_run_id"])
    children = client.search_runs(
        [sched.info.experiment_id], f"tags.`mlflow.parentRunId` = '{sched.info.run_id}'"
    )
    assert len(children) == 2
    for child in children:
        for key, value in aug_best.items():
            assert child.data.params[key] == str(value), key

    # re-running continues: nothing is trained again
    mtime = (res / "submission.csv").stat().st_mtime_ns
    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert (res / "submission.csv").stat().st_mtime_ns == mtime
    assert "Trial status" not in again.stdout + again.stderr  # no Ray Tune search ran
