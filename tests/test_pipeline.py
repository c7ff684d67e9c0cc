"""The pipeline: end to end at its smallest size as a user runs it (slow), and its control flow
(interruption at every stage, resuming, repairing a state that recorded an unfinished search)
with the searches replaced by copies of two trained models (fast)."""

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
ARGS = [
    "--trials",
    "2",
    "--epochs",
    "1",
    "--k-max",
    "2",
    "--set",
    "samples_per_epoch=32",
]


def _env() -> dict[str, str]:
    return {"PYTHONPATH": str(REPO), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}


def _pipeline_cmd() -> list[str]:
    return [sys.executable, str(REPO / "experiments" / "pipeline.py"), *ARGS]


def normalise_report(text: str) -> str:
    """A report without what differs between two equal runs: timings and Ray's trial ids."""
    text = re.sub(r"\| wall time of the last pipeline call \| \d+ s \|", "| wall time |", text)
    text = re.sub(r"\| wall time of the searches[^|]*\| \d+ s \(\d+ min\) \|", "| total |", text)
    # the stage table's wall (s) and overhead columns
    text = re.sub(r"(\| tune_\w+ \| \d+ \| )\d+ \| \d+% \|", r"\1W | O |", text)
    # trial ids are random: two runs name the same trial differently
    return re.sub(r"trial_[0-9a-f]{5,}(_\d+)?", "trial_*", text)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The pipeline run once, start to end, as a user runs it."""
    cwd = tmp_path_factory.mktemp("pipeline")
    out = subprocess.run(
        _pipeline_cmd(), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=1200
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return cwd


@pytest.mark.slow
def test_pipeline_end_to_end_and_rerun_skips(uninterrupted):
    tmp_path = uninterrupted
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
        "**Submitted: ",
    ):
        assert section in report
    for png in ("stages", "coteaching", "thresholds", "ensemble"):
        assert (res / "report" / f"{png}.png").stat().st_size > 5000
    # every trial of every stage is one MLflow child run; stages are linked
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_run(state["pipeline_run_id"]).info.status == "FINISHED"
    prev = state["pipeline_run_id"]
    for stage in ("tune_aug", "tune_sched", "tune_tau"):
        parent = client.get_run(state["stages"][stage]["parent_run_id"])
        assert parent.data.tags["bldseg.previous_run_id"] == prev
        prev = parent.info.run_id
    # later stages start from the best config found before them: it is among the constants of
    # the next search (its parent run's params; the trials log only what they searched)
    aug_best = state["stages"]["tune_aug"]["best_config"]
    sched = client.get_run(state["stages"]["tune_sched"]["parent_run_id"])
    for key, value in aug_best.items():
        got = sched.data.params[key]
        if isinstance(value, float):  # MLflow params are strings, floats written shortened
            assert float(got) == pytest.approx(value, rel=1e-5), key
        else:
            assert got == str(value), key
    children = client.search_runs(
        [sched.info.experiment_id], f"tags.`mlflow.parentRunId` = '{sched.info.run_id}'"
    )
    assert len(children) == 2

    # re-running continues: nothing is trained again
    mtime = (res / "submission.csv").stat().st_mtime_ns
    again = subprocess.run(
        _pipeline_cmd(), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr[-4000:]
    assert (res / "submission.csv").stat().st_mtime_ns == mtime
    assert "Trial status" not in again.stdout + again.stderr  # no Ray Tune search ran


@pytest.mark.slow
def test_ctrl_c_during_a_search_then_the_same_command_resumes(uninterrupted, tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) once the first trial
    folder exists: the command stops within seconds with status 130, records no stage, and
    the same command then finishes with the uninterrupted run's report."""
    proc = subprocess.Popen(
        _pipeline_cmd(),
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, like a foreground job
    )
    search = tmp_path / "runs" / "pipeline" / "pipeline-tune_aug"
    deadline = time.monotonic() + 600
    while not list(search.glob("trial_*/run")):
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.monotonic() < deadline, "no trial folder appeared"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    t0 = time.monotonic()
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    stopped_s = time.monotonic() - t0
    assert proc.returncode == 130, output[-4000:]
    assert stopped_s < 60, stopped_s  # a bound on a hang, not a speed test
    state = json.loads((tmp_path / "results" / "pipeline" / "pipeline_state.json").read_text())
    assert state["stages"] == {} and "ensemble" not in state
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_run(state["pipeline_run_id"]).info.status == "KILLED"

    again = subprocess.run(
        _pipeline_cmd(), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=1200
    )
    assert again.returncode == 0, again.stderr[-4000:]
    report = (tmp_path / "results" / "pipeline" / "REPORT.md").read_text()
    want = (uninterrupted / "results" / "pipeline" / "REPORT.md").read_text()
    assert normalise_report(report) == normalise_report(want)
    assert client.get_run(state["pipeline_run_id"]).info.status == "FINISHED"


# --------------------------------------------------------------------------------------------
# Control flow with the searches replaced by copies of two trained models (fast)
# --------------------------------------------------------------------------------------------

TRAIN = {
    "aug.crop_size": 64,
    "batch_size": 8,
    "val_fraction": 0.25,
    "samples_per_epoch": 32,
    "epochs": 1,
    "impl": "compiled",
}
SEARCHED = {"tune_aug": "aug.hflip_p", "tune_sched": "optim.lr", "tune_tau": "coteach.tau"}


@pytest.fixture(scope="module")
def two_models(small_world, tmp_path_factory):
    """Run folders of two tiny models (one epoch each, different seeds)."""
    from bldseg.train import RunConfig, fit

    root = tmp_path_factory.mktemp("models")
    for seed in (0, 1):
        fit(RunConfig.from_flat({**TRAIN, "seed": seed}), root / f"m{seed}", data=small_world)
    return [root / "m0", root / "m1"]


class FakeSearches:
    """Stands in for :func:`bldseg.tune.runner.run_search`: a search "trains" its two trials
    by copying the trained run folders. ``interrupt = stage`` stops that search once by Ctrl-C,
    after its first trial and with the second trial's folder half-written."""

    def __init__(self, models: list[Path], val_shift: dict[str, float] | None = None):
        self.models = models
        self.interrupt: str | None = None
        self.calls: list[tuple[str, bool]] = []
        self.val_shift = val_shift or {}  # added to a stage's recorded validation Dice
        self.bases: dict[str, dict] = {}  # the base config each stage's search started from

    def __call__(self, spec):
        from bldseg.tune.runner import META_FILE, SearchResult

        stage = spec.name.split("-", 1)[1]
        self.calls.append((stage, spec.resume))
        self.bases[stage] = dict(spec.base)
        exp = Path(spec.storage) / spec.name
        assert spec.resume == exp.exists()
        exp.mkdir(parents=True, exist_ok=True)
        (exp / META_FILE).write_text(json.dumps({"spec": {"trials": spec.trials}}))
        # Ray Tune's saved state, which the pipeline reads before it resumes a search
        (exp / "tuner.pkl").write_bytes(pickle.dumps({}))
        (exp / "experiment_state-0.json").write_text("{}")
        rows = []
        for i, model in enumerate(self.models):
            run = exp / f"trial_{i}" / "run"
            if self.interrupt == stage and i == 1:
                self.interrupt = None
                run.mkdir(parents=True)  # started, no epoch finished: no history.json
                (run / "augmentation.json").write_text("{}")
                raise KeyboardInterrupt
            if not (run / "history.json").exists():
                shutil.copytree(model, run, dirs_exist_ok=True)
                # what the search's driver writes when it closes a trial
                (run / "status.json").write_text(json.dumps({"status": "completed", "final": True}))
            best = json.loads((run / "history.json").read_text())[-1]
            rows.append(
                {
                    "trial_id": str(i),
                    "val_dice_best": best["val_dice_best"] + self.val_shift.get(stage, 0.0),
                    "val_thr_best": best["val_thr_best"],
                    "val_dice_05": best["val_dice_05"],
                    "best_epoch": 1,
                    "epochs_run": 1,
                    "status": "completed",
                    "run_dir": str(run),
                    "message": "",
                    f"config/{SEARCHED[stage]}": 0.1 * (i + 1),
                }
            )
        table = pd.DataFrame(rows).sort_values("val_dice_best", ascending=False, kind="stable")
        table = table.reset_index(drop=True)
        table.to_csv(exp / "trials.csv", index=False)
        return SearchResult(
            name=spec.name,
            path=exp,
            table=table,
            best=table.iloc[0].to_dict(),
            parent_run_id=f"parent-{stage}",
            tracking_uri=spec.tracking_uri,
            wall_s=2.0,
            train_s=2.0,
            slots=2,
            ray_address="fake",
            ideal_s=2.0,
            n_completed=len(table),
        )


def _config(small_world, root: Path):
    from bldseg.pipeline import PipelineConfig

    return PipelineConfig(
        out=str(root / "results"),
        storage=str(root / "runs"),
        data=str(small_world.root),
        data_root=str(small_world.root.parent),
        base=dict(TRAIN),
        trials=2,
        epochs=1,
        k_max=2,
        tracking_uri=f"sqlite:///{root}/mlflow.db",
    )


def _state(root: Path) -> dict:
    return json.loads((root / "results" / "pipeline" / "pipeline_state.json").read_text())


def _report(root: Path) -> str:
    # the report names the submission by its path: compare it relative to the run's folder
    text = (root / "results" / "pipeline" / "REPORT.md").read_text()
    return normalise_report(text.replace(str(root), "<root>"))


@pytest.fixture(scope="module")
def fake_baseline(small_world, two_models, tmp_path_factory):
    """The fake pipeline run once without interruption: (its folder, its state)."""
    from bldseg import pipeline

    root = tmp_path_factory.mktemp("baseline")
    mp = pytest.MonkeyPatch()
    mp.setattr(pipeline, "run_search", FakeSearches(two_models))
    try:
        state = pipeline.run_pipeline(_config(small_world, root))
    finally:
        mp.undo()
    return root, state


def _raise_on_call(n: int, real):
    """A stand-in for ``real`` that raises KeyboardInterrupt on its ``n``-th call."""
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return wrapper


def test_the_pipeline_run_records_bldsegs_own_commit_not_the_current_folders(fake_baseline):
    # it ran `git` in the current folder: a pip-installed bldseg run inside the user's own
    # project recorded that project's commit as bldseg's, and no bldseg.version
    from mlflow.tracking import MlflowClient

    from bldseg.tune import tracking
    from bldseg.tune.runner import CODE_DIR

    root, state = fake_baseline
    tags = MlflowClient(f"sqlite:///{root}/mlflow.db").get_run(state["pipeline_run_id"]).data.tags
    assert "git_commit" not in tags
    want = tracking.source_tags(CODE_DIR)
    for key in ("mlflow.source.git.commit", "bldseg.version"):
        assert tags.get(key) == want.get(key), key


def test_continuing_with_other_settings_is_refused(fake_baseline, small_world):
    # The same --name with other epochs/trials would reuse the finished stages, ensemble and
    # test maps as if they were the new settings': refused before anything runs.
    from dataclasses import replace

    from bldseg import pipeline

    root, state = fake_baseline
    before = (root / "results" / "pipeline" / "pipeline_state.json").read_text()
    same = _config(small_world, root)
    pipeline.check_continuation(same, state, small_world.train.fingerprint)  # no complaint
    other = replace(same, epochs=2, trials=3)
    with pytest.raises(pipeline.ContinuationError, match=r"trials: 2 -> 3; epochs: 1 -> 2"):
        pipeline.run_pipeline(other)
    assert (root / "results" / "pipeline" / "pipeline_state.json").read_text() == before
    with pytest.raises(pipeline.ContinuationError, match="training data fingerprint"):
        pipeline.check_continuation(same, state, "0" * 32)


def test_fake_pipeline_with_kfold_trials(small_world, tmp_path, monkeypatch):
    # --folds K: a trial's run folder holds the K folds and one out-of-fold library. It is one
    # model for the test library, the ensemble search and the report, not K + 1.
    from bldseg import pipeline
    from bldseg.ensemble.library import find_runs
    from bldseg.train import RunConfig
    from bldseg.train.folds import fit_folds

    kfolds = [tmp_path / "models" / f"k{seed}" for seed in (0, 1)]
    for seed, out in enumerate(kfolds):
        flat = {**TRAIN, "folds": 2, "split_group": r"TRAIN_\d\d(\d)", "seed": seed}
        assert fit_folds(RunConfig.from_flat(flat), out, data=small_world).status == "completed"
    monkeypatch.setattr(pipeline, "run_search", FakeSearches(kfolds))
    state = pipeline.run_pipeline(_config(small_world, tmp_path))
    storage = tmp_path / "runs" / "pipeline"
    assert len(find_runs(storage)) == 6  # 3 stages x 2 trials
    for stage in ("tune_aug", "tune_sched", "tune_tau"):
        run = storage / f"pipeline-{stage}" / "trial_0" / "run"
        assert (run / "folds.json").is_file() and (run / "test_probs.npz").is_file()
        assert not list(run.glob("fold*/test_probs.npz"))
        assert "sweep" in {k.removeprefix("test_dice_") for k in state["stages"][stage]["test"]}
    assert np.isfinite(state["ensemble"]["best"]["test_dice"])  # the test column is there
    assert (tmp_path / "results" / "pipeline" / "REPORT.md").is_file()


def test_fake_pipeline_submits_what_the_ensemble_search_decided(fake_baseline):
    _, state = fake_baseline
    ens, pred = state["ensemble"], state["predict"]
    decision = ens["decision"]
    assert decision["submit"] == ("ensemble" if ens["gain"]["check"]["low"] > 0 else "single")
    row = ens["best"] if decision["submit"] == "ensemble" else ens["best_single"]
    assert pred["submitted"] == decision["submit"] and pred["threshold"] == row["threshold"]
    assert pred["members"] == len(row["members"].split("+"))
    # the submission reproduces the chosen one's score on its test library exactly (a single
    # model as a one-member ensemble spec included)
    assert pred["test_dice"] == row["test_dice"]
    iv = pred["test_interval"]
    assert iv["low"] <= pred["test_dice"] <= iv["high"]
    assert iv["estimate"] == pytest.approx(pred["test_dice"], abs=1e-12)
    for info in state["stages"].values():
        assert info["val_thresholds"]["val_thr_widened"] in (0.0, 1.0)


def test_fake_pipeline_report_carries_intervals_and_the_rule(fake_baseline):
    root, state = fake_baseline
    report = (root / "results" / "pipeline" / "REPORT.md").read_text()
    assert "95% bootstrap interval" in report
    # every score cell of the comparisons holds an interval
    for heading in ("## Best single model per search stage", "## Plain BCE vs co-teaching"):
        table = report.split(heading, 1)[1].split("\n\n", 2)[1]
        assert table.count("[") >= 4, table
    assert "Δ co-teaching − plain (paired)" in report
    assert "| Δ ensemble − single (paired) |" in report
    assert "val Δ vs 0.5" in report
    d = state["ensemble"]["decision"]
    assert (
        f"**Submitted: the best {'ensemble' if d['submit'] == 'ensemble' else 'single model'}"
        in (report)
    )
    assert d["reason"] in report and "check half" in report
    assert "widened to [0.05, 0.95]" in report


def test_the_report_logged_to_mlflow_finds_its_plots(fake_baseline, tmp_path):
    # REPORT.md links report/<name>.png: the plots were logged at the artifact root, so the
    # report downloaded from (or shown by) MLflow had broken images.
    import mlflow

    root, state = fake_baseline
    uri = f"sqlite:///{root}/mlflow.db"
    local = Path(
        mlflow.artifacts.download_artifacts(
            run_id=state["pipeline_run_id"], dst_path=str(tmp_path), tracking_uri=uri
        )
    )
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (local / "REPORT.md").read_text())
    assert {"report/stages.png", "report/coteaching.png", "report/ensemble.png"} <= set(links)
    for link in links:
        assert (local / link).read_bytes() == (root / "results" / "pipeline" / link).read_bytes()
    assert not list(local.glob("*.png"))  # nothing left beside the report


def test_a_redone_ensemble_and_prediction_supersede_the_earlier_runs(
    small_world, two_models, tmp_path, monkeypatch
):
    # Another --k-max redoes the ensemble search and the prediction: the earlier child runs
    # stayed FINISHED under the same names, indistinguishable from the current ones.
    from dataclasses import replace

    from mlflow.tracking import MlflowClient

    from bldseg import pipeline

    monkeypatch.setattr(pipeline, "run_search", FakeSearches(two_models))
    cfg = _config(small_world, tmp_path)
    first = pipeline.run_pipeline(cfg)
    second = pipeline.run_pipeline(replace(cfg, k_max=3))
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    ids = {}
    for kind in ("ensemble", "predict"):
        old, new = first[kind]["mlflow_run_id"], second[kind]["mlflow_run_id"]
        assert old != new
        ids[kind] = new
        was = client.get_run(old)
        assert was.data.tags["bldseg.superseded_by"] == new
        assert new in was.data.tags["mlflow.note.content"]
        assert "bldseg.superseded_by" not in client.get_run(new).data.tags
    tags = client.get_run(second["pipeline_run_id"]).data.tags
    assert tags["bldseg.ensemble_run_id"] == ids["ensemble"]
    assert tags["bldseg.predict_run_id"] == ids["predict"]
    # the runs of a kind that are not superseded: the current one only
    children = client.search_runs(
        [second["experiment_id"]], f"tags.`mlflow.parentRunId` = '{second['pipeline_run_id']}'"
    )
    current = [r.info.run_id for r in children if "bldseg.superseded_by" not in r.data.tags]
    assert sorted(current) == sorted(ids.values())


def test_a_stage_that_finds_nothing_better_is_not_carried_forward(
    small_world, two_models, tmp_path, monkeypatch
):
    # The schedule search's best trial is below the augmentation search's on validation Dice,
    # the tau search's above it: the tau search must start from tune_aug's configuration
    # without tune_sched's values, and the report must compare co-teaching with tune_aug's.
    from bldseg import pipeline

    fake = FakeSearches(two_models, val_shift={"tune_sched": -0.1, "tune_tau": 0.05})
    monkeypatch.setattr(pipeline, "run_search", fake)
    state = pipeline.run_pipeline(_config(small_world, tmp_path))
    st = state["stages"]
    assert [st[s]["carried_forward"] for s in SEARCHED] == [True, False, True]
    assert [st[s]["started_from"] for s in SEARCHED] == [None, "tune_aug", "tune_aug"]
    aug, sched = st["tune_aug"]["best_config"], st["tune_sched"]["best_config"]
    assert set(aug) == {SEARCHED["tune_aug"]} and set(sched) == {SEARCHED["tune_sched"]}
    assert fake.bases["tune_sched"].items() >= aug.items()
    assert fake.bases["tune_tau"].items() >= aug.items()
    assert SEARCHED["tune_sched"] not in fake.bases["tune_tau"]
    report = _report(tmp_path)
    row = next(line for line in report.splitlines() if line.startswith("| tune_sched |"))
    assert row.endswith("| no: not above the best so far |"), row
    # test Δ: each search against the configuration it started from, named
    tau_row = next(line for line in report.splitlines() if line.startswith("| tune_tau |"))
    assert "(vs tune_aug) |" in row and "(vs tune_aug) |" in tau_row, tau_row
    # the tau search was carried on a validation Dice shifted up, but its tiles score exactly
    # as tune_aug's (the same model): the paired val Δ is 0 and the report says so
    cells = [c.strip() for c in tau_row.strip("|").split("|")]
    assert cells[6] == cells[8] == "+0.0000 [+0.0000, +0.0000] (vs tune_aug)", cells
    assert tau_row.endswith("| yes (the val Δ is within noise) |"), tau_row
    aug_row = next(line for line in report.splitlines() if line.startswith("| tune_aug |"))
    assert aug_row.endswith("| – | yes |"), aug_row
    assert "vs tune_sched" not in report
    assert "carried forward (from tune_aug, tune_tau): `" in report
    assert "| plain BCE (best tune_aug trial) |" in report and "tune_aug's, one seed" in report
    # a rerun recomputes the same decisions from the recorded stages and trains nothing
    fake.calls.clear()
    again = pipeline.run_pipeline(_config(small_world, tmp_path))
    assert fake.calls == [] and again["stages"] == st


def test_ctrl_c_in_every_stage_records_nothing_and_the_rerun_resumes(
    small_world, two_models, fake_baseline, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    from bldseg import pipeline, report
    from bldseg.ensemble import run as ensemble_run

    searches = FakeSearches(two_models)
    monkeypatch.setattr(pipeline, "run_search", searches)
    cfg = _config(small_world, tmp_path)
    client = MlflowClient(cfg.tracking_uri)

    def interrupted(patch: tuple | None, stage: str | None = None) -> dict:
        searches.interrupt = stage
        with monkeypatch.context() as m:
            if patch is not None:
                m.setattr(*patch)
            with pytest.raises(KeyboardInterrupt):
                pipeline.run_pipeline(cfg)
        state = _state(tmp_path)
        assert client.get_run(state["pipeline_run_id"]).info.status == "KILLED"
        return state

    # 1. in the second search, with a half-written trial folder left behind
    state = interrupted(None, "tune_sched")
    assert list(state["stages"]) == ["tune_aug"]
    half = tmp_path / "runs" / "pipeline" / "pipeline-tune_sched" / "trial_1" / "run"
    assert half.is_dir() and not (half / "history.json").exists()
    # 2. while writing the test library: the searches are done, nothing after them
    state = interrupted(
        (pipeline, "write_test_library", _raise_on_call(2, pipeline.write_test_library))
    )
    assert list(state["stages"]) == ["tune_aug", "tune_sched", "tune_tau"]
    assert ("tune_sched", True) in searches.calls  # the interrupted search was resumed
    assert "ensemble" not in state
    # 3. in the ensemble search, after its table was written
    state = interrupted((ensemble_run, "_plots", _raise_on_call(1, ensemble_run._plots)))
    assert "ensemble" not in state
    # 4. in the prediction, after the maps were computed
    state = interrupted(
        (pipeline, "write_submission", _raise_on_call(1, pipeline.write_submission))
    )
    assert "ensemble" in state and "predict" not in state
    # 5. while writing the report
    state = interrupted((report, "write_report", _raise_on_call(1, report.write_report)))
    assert "predict" in state and "report" not in state
    # then the same call finishes, with the uninterrupted run's report
    state = pipeline.run_pipeline(cfg)
    assert client.get_run(state["pipeline_run_id"]).info.status == "FINISHED"
    assert _report(tmp_path) == _report(fake_baseline[0])
    assert [s for s, _ in searches.calls] == ["tune_aug", "tune_sched", "tune_sched", "tune_tau"]


def test_a_recorded_but_unfinished_search_is_resumed_and_later_stages_redone(
    small_world, two_models, fake_baseline, tmp_path, monkeypatch, caplog
):
    """A state written by an older bldseg, which recorded a search stopped by Ctrl-C as done:
    its best trial's folder has no finished epoch (the rerun crashed on history.json)."""
    from bldseg import pipeline

    base_root, _ = fake_baseline
    shutil.copytree(base_root, tmp_path, dirs_exist_ok=True)
    state = _state(tmp_path)
    for key, value in list(state.items()):  # the state refers to the baseline's folders
        state[key] = json.loads(json.dumps(value).replace(str(base_root), str(tmp_path)))
    aug = state["stages"]["tune_aug"]
    run_dir = Path(aug["path"]) / "trial_1" / "run"
    for f in run_dir.iterdir():
        if f.is_file() and f.name != "augmentation.json":
            f.unlink()
    shutil.rmtree(run_dir / "plots", ignore_errors=True)
    aug["best"]["run_dir"] = str(run_dir)
    path = tmp_path / "results" / "pipeline" / "pipeline_state.json"
    path.write_text(json.dumps(state))

    searches = FakeSearches(two_models)
    monkeypatch.setattr(pipeline, "run_search", searches)
    state = pipeline.run_pipeline(_config(small_world, tmp_path))
    assert "did not finish" in caplog.text
    assert searches.calls == [("tune_aug", True), ("tune_sched", False), ("tune_tau", False)]
    stale = list((tmp_path / "runs" / "pipeline.stale").iterdir())
    assert sorted(p.name.rsplit("-", 2)[0] for p in stale) == [
        "pipeline-tune_sched",
        "pipeline-tune_tau",
    ]
    assert (run_dir / "history.json").is_file()
    assert _report(tmp_path) == _report(base_root)


def test_a_pipeline_recorded_before_a_bldseg_update_continues_on_the_same_content(
    small_world, two_models, fake_baseline, tmp_path, monkeypatch
):
    # The cache's fingerprint includes bldseg's decoding rules: after an update that decodes
    # the same files to the same pixels, the pipeline was refused ("start a new pipeline")
    # although the content digest, which resumed searches and runs go by, was equal.
    from bldseg import pipeline
    from bldseg.data import readers

    base_root, _ = fake_baseline
    shutil.copytree(base_root, tmp_path, dirs_exist_ok=True)
    state = _state(tmp_path)
    for key, value in list(state.items()):  # the state refers to the baseline's folders
        state[key] = json.loads(json.dumps(value).replace(str(base_root), str(tmp_path)))
    # as an older bldseg recorded the same data: another fingerprint, older rules
    state.update(data_fingerprint="0" * 32, decode_rules=readers.DECODE_RULES - 1)
    path = tmp_path / "results" / "pipeline" / "pipeline_state.json"
    path.write_text(json.dumps(state))
    searches = FakeSearches(two_models)
    monkeypatch.setattr(pipeline, "run_search", searches)
    again = pipeline.run_pipeline(_config(small_world, tmp_path))  # was refused
    assert searches.calls == []  # its finished stages are kept
    # the data it is on, as this bldseg fingerprints and decodes them
    assert again["data_fingerprint"] == small_world.train.fingerprint
    assert again["decode_rules"] == readers.DECODE_RULES
    assert again["data_content"] == small_world.train.content
    # other content is still refused, naming the decoding change
    state.update(data_content="1" * 32)
    path.write_text(json.dumps(state))
    with pytest.raises(pipeline.ContinuationError, match="decoding changed"):
        pipeline.run_pipeline(_config(small_world, tmp_path))


def test_a_search_that_returns_unfinished_is_not_recorded(
    small_world, two_models, tmp_path, monkeypatch
):
    """A search runner that swallowed Ctrl-C and returned partial results."""
    from bldseg import pipeline

    searches = FakeSearches(two_models)

    def partial(spec):
        result = searches(spec)
        run = Path(result.table["run_dir"][1])
        (run / "history.json").unlink()
        (run / "summary.json").unlink(missing_ok=True)
        (run / "status.json").unlink(missing_ok=True)
        return result

    monkeypatch.setattr(pipeline, "run_search", partial)
    with pytest.raises(RuntimeError, match=r"ended before it finished .*did not finish"):
        pipeline.run_pipeline(_config(small_world, tmp_path))
    assert _state(tmp_path)["stages"] == {}


def test_command_exits_130_on_ctrl_c(monkeypatch, capsys):
    from bldseg.commands import pipeline as command

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "run_pipeline", interrupted)
    assert command.main(["--trials", "1"], prog="bldseg pipeline") == 130
    assert "run the same command again" in capsys.readouterr().err


def test_folds_flag_reaches_every_trial(monkeypatch):
    from bldseg.commands import pipeline as command

    seen = {}

    def capture(cfg):
        seen["base"] = cfg.base
        raise KeyboardInterrupt  # stop before any work

    monkeypatch.setattr(command, "run_pipeline", capture)
    assert command.main(["--trials", "1", "--folds", "3"]) == 130
    assert seen["base"]["folds"] == 3
    with pytest.raises(SystemExit):  # K < 2 is refused by the parser
        command.main(["--folds", "1"])


def test_test_truth_reads_a_competition_format_file(small_world, tmp_path):
    # img_id,mask_rle only (no height/width): the masks take the test tiles' size
    from dataclasses import replace

    from bldseg.pipeline import test_truth

    full = test_truth(small_world)
    slim = tmp_path / "truth.csv"
    df = pd.read_csv(small_world.test_truth_csv, dtype=str, keep_default_na=False)
    df[["img_id", "mask_rle"]].iloc[::-1].to_csv(slim, index=False)  # other row order too
    got = test_truth(replace(small_world, test_truth_csv=slim))
    assert got.shape == full.shape and (got == full).all()


@pytest.mark.parametrize(
    "argv, message, status",
    [
        # flags out of range are usage errors (2), as --help and the README list them
        (["--trials", "0"], "--trials 0 is out of range", 2),
        (["--k-min", "4", "--k-max", "3"], "--k-min 4 is above --k-max 3", 2),
        (["--trials", "1", "--k-min", "4"], "--k-min 4 is more than the 3 models", 2),
        (["--data", "/nonexistent/bldseg-data"], "--data /nonexistent/bldseg-data: no such", 1),
    ],
)
def test_bad_settings_are_one_line_and_record_nothing(tmp_path, argv, message, status, capsys):
    # the state was saved before the settings were checked: a traceback, and the corrected
    # command was then refused as "started with other settings"
    from bldseg.commands import pipeline as pipeline_cmd

    base = ["--name", "p", "--out", str(tmp_path / "out"), "--storage", str(tmp_path / "runs")]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        got = pipeline_cmd.main([*base, "--tracking-uri", uri, *argv])
    except SystemExit as e:  # parser.error
        got = e.code
    assert got == status
    err = capsys.readouterr().err
    assert "error: " in err and message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "p" / "pipeline_state.json").exists()


@pytest.mark.parametrize(
    "item, message",
    [("nosuchkey=1", "unknown parameter(s) ['nosuchkey']"), ("aug.blur_p=2", "blur_p=2")],
)
def test_a_bad_set_item_is_a_usage_error(tmp_path, item, message, capsys):
    # exit 2, as the README's table and --help say, and as `bldseg tune` gives (it was 1)
    from bldseg.commands import pipeline as pipeline_cmd

    base = ["--name", "p", "--out", str(tmp_path / "out"), "--storage", str(tmp_path / "runs")]
    with pytest.raises(SystemExit) as e:
        pipeline_cmd.main([*base, "--set", item])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_crop_the_data_refuse_records_nothing_so_the_corrected_command_runs(
    small_world, tmp_path
):
    # The first search refused the crop only after pipeline_state.json had recorded it: the
    # corrected command was then refused as a pipeline "started with other settings".
    from dataclasses import replace

    from bldseg import pipeline

    cfg = _config(small_world, tmp_path)
    bad = replace(cfg, base={**cfg.base, "aug.crop_size": 4000, "aug.crop_fit": False})
    with pytest.raises(ValueError, match=r"aug.crop_size=4000 is larger than the cached images"):
        pipeline.run_pipeline(bad)
    assert not (tmp_path / "results" / "pipeline" / "pipeline_state.json").exists()


def _kfold_run(run: Path) -> dict:
    """A K-fold run folder: an out-of-fold library, ``history.json`` rows that are means over
    two folds (thresholds 0.30 and 0.70 -> 0.50) and ``folds.json`` with the library's scores."""
    from bldseg.train.folds import mean_row, oof_metrics

    rng = np.random.default_rng(0)
    truth = rng.random((6, 16, 16)) < 0.3
    probs = np.clip(truth * 60 + rng.integers(0, 200, truth.shape), 0, 255).astype(np.uint8)
    run.mkdir(parents=True)
    ids = np.array([f"i{i}" for i in range(6)])
    np.savez(
        run / "val_probs.npz",
        probs=probs,
        truth=truth.astype(np.uint8),
        tile_ids=np.array([f"t{i}" for i in range(6)]),
        image_ids=ids,
        group_ids=ids,
        tile_yx=np.zeros((6, 2), int),
    )
    fold = {"epoch": 1, "train_loss": 1.0, "lr": 1.0, "val_dice_05": 0.5, "val_dice_best": 0.6}
    fold |= {"val_dice_youden": 0.5, "val_thr_youden": 0.5}
    row = mean_row([{**fold, "val_thr_best": 0.3}, {**fold, "val_thr_best": 0.7}])
    (run / "history.json").write_text(json.dumps([row]))
    oof = oof_metrics(run)
    (run / "folds.json").write_text(json.dumps({"status": "completed", "oof": oof}))
    return oof


def test_kfold_report_thresholds_are_the_out_of_fold_ones(tmp_path):
    # the interval and Δ columns are computed on the out-of-fold library at its threshold: the
    # threshold and Dice printed beside them must be that library's too, not history's means
    from bldseg import pipeline
    from bldseg.report import write_report

    run = tmp_path / "run"
    oof = _kfold_run(run)
    assert abs(oof["val_thr_best"] - 0.5) > 0.05  # else the test could not tell them apart
    row = pipeline.best_epoch_row(run)
    for k in ("val_thr_best", "val_dice_best", "val_dice_05", "val_thr_youden"):
        assert row[k] == oof[k]
    best = {"run_dir": str(run), "val_dice_best": oof["val_dice_best"]}
    best["val_thr_best"] = oof["val_thr_best"]
    stage = {"best": best, "best_config": {}, "wall_s": 1, "overhead": 0.0, "path": "-"}
    stage["val_thresholds"] = {k: row.get(k, 0.0) for k in (*oof, "val_thr_widened")}
    config = {"name": "x", "data": None, "trials": 1, "epochs": 1, "cpus_per_trial": 1}
    config |= {"k_min": 1, "k_max": 1, "seed": 0, "base": {}}
    write_report({"config": config, "stages": {"tune_aug": stage}}, tmp_path, has_truth=False)
    report = (tmp_path / "REPORT.md").read_text()
    sweep = next(line for line in report.splitlines() if line.startswith("| best of sweep"))
    from bldseg.metrics import threshold_text

    assert sweep.startswith(f"| best of sweep | {threshold_text(oof['val_thr_best'])} | ")
    assert f"{oof['val_dice_best']:.4f} [" in sweep and "⚠" not in report


def test_test_maps_of_another_split_are_removed_when_there_is_no_truth(
    small_world, two_models, tmp_path
):
    # A new test.csv without truth: the maps of the old split stayed, and the redone ensemble
    # search scored them, and REPORT.md showed them, as this split's held-out Dice.
    from bldseg import pipeline

    run = tmp_path / "run"
    shutil.copytree(two_models[0], run)
    path = pipeline.write_test_library(run, small_world, pipeline.test_truth(small_world))
    pipeline.remove_stale_test_library(run, small_world)
    assert path.exists()  # made of this split: kept
    with np.load(path) as z:
        maps = {**z, "made_on": np.array("another split"), "made_of": np.array("its content")}
    np.savez(path, **maps)
    pipeline.remove_stale_test_library(run, small_world)
    assert not path.exists()
    pipeline.remove_stale_test_library(run, small_world)  # none there: nothing to do


def test_a_pipeline_without_truth_removes_the_test_maps_of_another_split(
    small_world, two_models, tmp_path, monkeypatch
):
    # The pipeline's own call, not only the function's: trained models whose test maps were
    # made of another test split, continued on a test split without truth. The ensemble search
    # then scored those maps as this split's (a test column in the summary and REPORT.md).
    from dataclasses import replace

    from bldseg import pipeline

    truth = pipeline.test_truth(small_world)
    models = []
    for m in two_models:
        run = tmp_path / "models" / m.name
        shutil.copytree(m, run)
        path = pipeline.write_test_library(run, small_world, truth)
        with np.load(path) as z:
            maps = {**z, "made_on": np.array("another split"), "made_of": np.array("its content")}
        np.savez(path, **maps)
        models.append(run)
    real_prepare = pipeline.prepare_data
    monkeypatch.setattr(
        pipeline,
        "prepare_data",
        lambda *a, **k: replace(real_prepare(*a, **k), test_truth_csv=None),
    )
    monkeypatch.setattr(pipeline, "run_search", FakeSearches(models))
    state = pipeline.run_pipeline(_config(small_world, tmp_path))
    storage = tmp_path / "runs" / "pipeline"
    assert len(list(storage.rglob("val_probs.npz"))) == 6  # the searches' trials are there
    assert not list(storage.rglob(pipeline.TEST_FILE))
    assert "test_dice" not in state["ensemble"]["best"], state["ensemble"]["best"]


def test_test_library_is_kept_without_loading_the_model_and_remade_after_a_newer_checkpoint(
    small_world, two_models, tmp_path, monkeypatch
):
    from bldseg import pipeline

    run = tmp_path / "run"
    shutil.copytree(two_models[0], run)
    truth = pipeline.test_truth(small_world)
    path = pipeline.write_test_library(run, small_world, truth)
    with np.load(path) as z:
        first = z["probs"].copy()
    assert first.shape[0] == len(small_world.test.ids)
    loads = []
    real_load = pipeline.load_member
    monkeypatch.setattr(
        pipeline, "load_member", lambda *a, **k: loads.append(a) or real_load(*a, **k)
    )
    made = path.stat().st_mtime_ns
    assert pipeline.write_test_library(run, small_world, truth) == path
    assert loads == [] and path.stat().st_mtime_ns == made  # current: no model built, no rewrite
    ckpt = run / "best.pt"
    os.utime(ckpt, ns=(made + 10**9, made + 10**9))  # a resumed trial saved a better epoch
    pipeline.write_test_library(run, small_world, truth)
    assert len(loads) == 1 and path.stat().st_mtime_ns > made
    with np.load(path) as z:
        np.testing.assert_array_equal(z["probs"], first)  # same weights: same maps


def test_a_damaged_search_record_in_a_stage_is_named(tmp_path):
    # The pipeline read a stage's bldseg_search.json raw: json's "Expecting value: line 1
    # column 1" named no file
    from bldseg.pipeline import _search_trials
    from bldseg.tune.runner import META_FILE

    (tmp_path / META_FILE).write_text('{"spec": {"trials": 6')
    with pytest.raises(ValueError, match=rf"{META_FILE} is damaged"):
        _search_trials(tmp_path, 4)
    (tmp_path / META_FILE).write_text('{"spec": {"trials": 6}}')
    assert _search_trials(tmp_path, 4) == 6
