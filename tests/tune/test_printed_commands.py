"""Commands the search prints for the user to copy run as printed, whatever the paths hold."""

import shlex
from pathlib import Path

import pandas as pd

from bldseg.tune import cli
from bldseg.tune.runner import SearchResult


def test_the_printed_mlflow_ui_command_keeps_a_path_with_spaces_whole(
    tmp_path, monkeypatch, capsys
):
    # `mlflow ui --backend-store-uri sqlite:////my runs/mlflow.db` opened `sqlite:////my`
    uri = f"sqlite:///{tmp_path}/my runs/mlflow.db"
    result = SearchResult(
        name="s",
        path=Path(tmp_path / "my runs" / "s"),
        table=pd.DataFrame(),
        best={},
        parent_run_id="0" * 32,
        tracking_uri=uri,
        wall_s=1.0,
        train_s=0.0,
        slots=1,
        ray_address="127.0.0.1:6379",
        ideal_s=0.0,
        experiment_id="1",
    )
    monkeypatch.setattr(cli, "run_search", lambda spec: result)
    assert cli.main("augmentation", "test", ["--trials", "1", "--epochs", "1"]) == 1
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("MLflow: ")]
    command = line.removeprefix("MLflow: ").split(", then open ")[0]
    assert shlex.split(command) == ["mlflow", "ui", "--backend-store-uri", uri]


def test_the_trial_table_prints_thresholds_that_type_back_to_the_trials_level():
    # 105/255 = 0.411765 printed "0.4118" (rounded to nearest), which predict --threshold reads
    # as level 106: another mask and another score than the trial's own
    from bldseg import metrics
    from bldseg.tune.cli import trial_table_text

    table = pd.DataFrame(
        [
            {"trial_id": "a", "val_dice_best": 0.61234, "val_thr_best": 105 / 255, "status": "ok"},
            {"trial_id": "b", "val_dice_best": 0.5, "val_thr_best": float("nan"), "status": "x"},
        ]
    )
    lines = trial_table_text(table).splitlines()
    row = lines[1].split()
    assert row[:3] == ["a", "0.6123", "0.4117"], lines
    assert metrics.level_from_threshold(float(row[2])) == 105
    assert lines[2].split()[2] == "NaN"
