"""The trial table reads a trial's epochs from its run folder; a resume names what it finds.

Tune's ``result.json`` loses rows when a trial's worker is killed and Ray retries the trial
(seen on a cluster: an empty ``result.json`` beside a ``history.json`` with an epoch), so the
table's figures must be the run folder's, as ``summary.json`` and MLflow have them.
"""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from ray.tune import Result

from bldseg.tune import cli, runner
from bldseg.tune.runner import META_FILE, METRIC, SearchSpec, run_search, trial_table


def _epoch(epoch: int, dice: float, epoch_s: float = 1.0) -> dict:
    """A history row as :func:`fit` writes it (the fields the table reads)."""
    return {
        "epoch": epoch,
        METRIC: dice,
        "val_thr_best": 0.1 * epoch,
        "val_dice_05": dice - 0.05,
        "epoch_s": epoch_s,
    }


def _reported(row: dict, diverged: int = 0) -> dict:
    """The row as Tune keeps it: the epoch plus Tune's own clock."""
    e = row["epoch"]
    return {**row, "diverged": diverged, "timestamp": 100 + 2 * e, "time_this_iter_s": 2.0} | {
        "time_total_s": 2.0 * e
    }


def _result(exp_dir: Path, trial_id: str, reported: list[dict]) -> Result:
    return Result(
        metrics={"trial_id": trial_id},
        checkpoint=None,
        error=None,
        path=str(exp_dir / f"trial_{trial_id}"),
        metrics_dataframe=pd.DataFrame(reported),
    )


def _write_history(exp_dir: Path, trial_id: str, history: list[dict]) -> Path:
    run_dir = runner.trial_run_dir(exp_dir, trial_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "history.json").write_text(json.dumps(history))
    return run_dir


def test_epochs_tune_lost_are_in_the_table_and_choose_the_best_trial(tmp_path):
    # Trial "lost": Tune kept only epoch 1 of 3; its best epoch (2) and its last are in the
    # run folder's history alone. Read from Tune, it was early-stopped at Dice 0.5 and ranked
    # below "kept", though its model (best.pt, summary.json, MLflow) scores 0.7.
    lost = [_epoch(1, 0.5, 1.5), _epoch(2, 0.7, 2.0), _epoch(3, 0.65, 2.5)]
    kept = [_epoch(1, 0.6), _epoch(2, 0.68), _epoch(3, 0.62)]
    _write_history(tmp_path, "lost", lost)
    _write_history(tmp_path, "kept", kept)
    grid = [
        _result(tmp_path, "lost", [_reported(lost[0])]),
        _result(tmp_path, "kept", [_reported(r) for r in kept]),
    ]
    table = trial_table(grid, max_epochs=3, exp_dir=tmp_path)
    assert list(table["trial_id"]) == ["lost", "kept"]
    row = table.iloc[0]
    assert row[METRIC] == 0.7
    assert row["val_thr_best"] == lost[1]["val_thr_best"]
    assert row["val_dice_05"] == lost[1]["val_dice_05"]
    assert row["best_epoch"] == 2 and row["epochs_run"] == 3
    assert row["train_s"] == pytest.approx(6.0)
    assert row["status"] == "completed"
    # the trial's clock counts its epochs at least, those Tune lost too
    assert row["trial_s"] >= row["train_s"]


def test_a_trial_with_an_empty_result_json_shows_the_epoch_it_trained(tmp_path):
    # search s4, trial 436bd541: result.json 0 bytes, history.json epoch 1 (Dice 0.3877), final
    # record "error"; the table showed no epoch, Dice NaN and train_s 0.0 (100% not training)
    history = [_epoch(1, 0.3877, 2.74)]
    run_dir = _write_history(tmp_path, "killed", history)
    runner.write_trial_record(
        run_dir,
        trial_id="killed",
        status="error",
        message="FileNotFoundError: the cache is gone",
        history=history,
        max_epochs=4,
        final=True,
    )
    table = trial_table([_result(tmp_path, "killed", [])], max_epochs=4, exp_dir=tmp_path)
    row = table.iloc[0]
    assert row[METRIC] == 0.3877 and row["best_epoch"] == 1 and row["epochs_run"] == 1
    assert row["train_s"] == pytest.approx(2.74) and row["trial_s"] >= row["train_s"]
    assert row["status"] == "error" and row["message"] == "FileNotFoundError: the cache is gone"


@pytest.mark.parametrize("tune_kept_the_diverged_report", [True, False])
def test_a_diverged_trial_keeps_its_good_epochs_and_its_status(
    tmp_path, tune_kept_the_diverged_report
):
    # A diverged trial's history holds the epochs it trained; its last report to Tune is a
    # "diverged" row (Dice 0.0), which Tune may have lost. Without a final record the status
    # comes from the run folder's status.json (written by fit), not from that lost row.
    history = [_epoch(1, 0.4), _epoch(2, 0.45)]
    run_dir = _write_history(tmp_path, "nan", history)
    (run_dir / "status.json").write_text(
        json.dumps({"status": "diverged", "message": "loss of network 0 became nan at epoch 3"})
    )
    reported = [_reported(r) for r in history]
    if tune_kept_the_diverged_report:
        reported.append(_reported({"epoch": 2, METRIC: 0.0}, diverged=1))
    table = trial_table([_result(tmp_path, "nan", reported)], max_epochs=5, exp_dir=tmp_path)
    row = table.iloc[0]
    assert row[METRIC] == 0.45 and row["best_epoch"] == 2 and row["epochs_run"] == 2
    assert row["train_s"] == pytest.approx(2.0)
    assert row["status"] == "diverged"
    assert row["message"] == "loss of network 0 became nan at epoch 3"


def test_without_a_history_the_table_reads_tunes_reports(tmp_path):
    # an older search, or a trial that never wrote history.json: Tune's rows, the diverged
    # report left out of the scores
    reported = [_reported(_epoch(1, 0.3)), _reported({"epoch": 1, METRIC: 0.0}, diverged=1)]
    table = trial_table([_result(tmp_path, "old", reported)], max_epochs=3, exp_dir=tmp_path)
    row = table.iloc[0]
    assert row[METRIC] == 0.3 and row["epochs_run"] == 1 and row["train_s"] == 1.0
    assert row["status"] == "diverged"
    empty = trial_table([_result(tmp_path, "none", [])], max_epochs=3, exp_dir=tmp_path)
    assert np.isnan(empty[METRIC].iloc[0]) and empty["status"].iloc[0] == "error"


def _searches(storage: Path, *names: str) -> None:
    for i, name in enumerate(names):
        (storage / name).mkdir(parents=True)
        (storage / name / META_FILE).write_text("{}")
        os.utime(storage / name / META_FILE, (1000 + i, 1000 + i))  # the later, the newer


def test_resume_of_a_search_that_is_not_there_names_those_that_are(tmp_path, capsys):
    # was: "error: [Errno 2] No such file or directory: '.../store/s7/bldseg_search.json'"
    storage = tmp_path / "store"
    _searches(storage, "s1", "s3", "s4")
    (storage / "s8").mkdir()  # a folder that is not a search is not offered
    argv = ["--resume", "--name", "s7", "--storage", str(storage)]
    assert cli.main("augmentation", "test", argv) == 2
    err = capsys.readouterr().err
    assert (
        f"error: no search s7 under {storage.resolve()} to resume (check --storage and --name); "
        "searches there: s4, s3, s1\n"
    ) in err, err
    assert "Errno" not in err and not (storage / "s7").exists()


def test_resume_names_a_folder_that_is_not_a_search_and_an_empty_storage(tmp_path):
    storage = tmp_path / "store"
    _searches(storage, *(f"s{i}" for i in range(7)))
    (storage / "half").mkdir()
    spec = SearchSpec(space="augmentation", resume=True, name="half", storage=str(storage))
    with pytest.raises(FileNotFoundError) as e:
        run_search(spec)
    assert f"; {storage / 'half'} is no search (it has no {META_FILE}); " in str(e.value)
    assert str(e.value).endswith("searches there: s6, s5, s4, s3, s2 and 2 more")
    spec = SearchSpec(space="augmentation", resume=True, name="s7", storage=str(tmp_path / "no"))
    with pytest.raises(FileNotFoundError, match=r"under .*/no to resume .*; .*/no does not exist"):
        run_search(spec)


def test_resume_without_a_name_finds_the_latest_search_of_the_space_by_its_record(tmp_path):
    # --resume without --name looked only at default names (<space>-<timestamp>): a search
    # started with --name was never found, though --help says "the latest of this space"
    from bldseg.tune.runner import _latest

    storage = tmp_path / "store"
    _searches(storage, "augmentation-20261201-000000", "mine", "theirs", "nospec")
    for name, space in (("mine", "augmentation"), ("theirs", "scheduler")):
        (storage / name / META_FILE).write_text(json.dumps({"spec": {"space": space}}))
    os.utime(storage / "mine" / META_FILE, (2000, 2000))
    os.utime(storage / "theirs" / META_FILE, (3000, 3000))
    assert _latest(storage, "augmentation") == storage / "mine"
    assert _latest(storage, "scheduler") == storage / "theirs"
    with pytest.raises(FileNotFoundError, match="no coteaching search under"):
        _latest(storage, "coteaching")


def test_trial_ids_that_look_like_numbers_stay_text(tmp_path):
    # Ray's ids are 8 hex digits: about one in 40 is all digits, and some read as floats;
    # pandas made 00012345 the number 12345 and 1234e567 inf, so --from named another trial
    folder = tmp_path / "augmentation-x"
    folder.mkdir()
    (folder / META_FILE).write_text(json.dumps({"base": {"epochs": 2}, "spec": {}}))
    table = pd.DataFrame(
        {
            "trial_id": ["00012345", "1234e567"],
            "status": ["completed", "completed"],
            METRIC: [0.5, 0.7],
            "config/aug.hflip_p": [0.1, 0.3],
        }
    )
    table.to_csv(folder / "trials.csv", index=False)
    assert list(runner.read_trial_table(folder / "trials.csv")["trial_id"]) == list(
        table["trial_id"]
    )
    start = cli.start_from(str(folder), str(tmp_path))
    assert "best trial 1234e567 " in start.said and start.config["aug.hflip_p"] == 0.3
