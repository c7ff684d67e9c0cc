"""A search refused or failed before any trial started: named flags, and no leftovers that
keep the corrected command from taking the search's name."""

import json
import logging
import re
import shutil
from dataclasses import replace

import pytest
from mlflow.tracking import MlflowClient

from bldseg.tune import cli, runner
from bldseg.tune.runner import META_FILE, SearchSpec, resumed_spec, run_search, validate_space
from tests.tune.test_runner import BASE, spec_for


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One MLflow store for the module (a new sqlite store takes seconds to set up); each test
    has its own experiment in it."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    MlflowClient(uri).search_experiments()  # creates the database
    return uri


def _runs(uri: str, experiment: str) -> list[tuple[str, str]]:
    """``(run name, status)`` of the runs of an experiment (none: no such experiment)."""
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs([found.experiment_id])
    return sorted((r.info.run_name, r.info.status) for r in runs)


@pytest.mark.parametrize(
    "flag, value, says",
    [
        ("--seed", "-1", "-1 is not from 0 to 2**32 - 1"),
        ("--seed", str(2**32), f"{2**32} is not from 0 to 2**32 - 1"),
        ("--max-concurrent", "-1", "-1 is below 0: pass 1 or more, or 0 for as many"),
    ],
)
def test_seed_and_max_concurrent_are_checked_when_parsed(flag, value, says, capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser("augmentation", "test").parse_args([flag, value])
    assert e.value.code == 2
    assert f"argument {flag}: {says}" in capsys.readouterr().err


def test_the_limits_of_seed_and_max_concurrent_are_accepted():
    # 0 is the documented "as many trials as the resources allow"
    args = cli.build_parser("augmentation", "test").parse_args(
        ["--seed", str(2**32 - 1), "--max-concurrent", "0"]
    )
    assert (args.seed, args.max_concurrent) == (2**32 - 1, 0)


@pytest.mark.parametrize(
    "change, says",
    [
        ({"seed": -1}, r"seed=-1: .* from 0 to 2\*\*32 - 1 \(--seed"),
        ({"seed": 2**32}, rf"seed={2**32}: .* \(--seed"),
        ({"seed": 1.5}, r"seed=1.5: .* whole number .* \(--seed"),
        ({"max_concurrent": -1}, r"max_concurrent=-1: .* 0 for as many .* \(--max-concurrent\)"),
    ],
    ids=["seed-negative", "seed-too-big", "seed-fraction", "max-concurrent-negative"],
)
def test_run_search_checks_seed_and_max_concurrent_first(small_world, tmp_path, change, says):
    # A SearchSpec made in Python skips the parser: refused before MLflow, data or Ray
    with pytest.raises(ValueError, match=says):
        run_search(spec_for(small_world, tmp_path, name="bad", **change))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_an_unknown_fixed_key_is_refused_before_the_tracking_store_is_made(
    tmp_path, monkeypatch, capsys
):
    # `bldseg tune aug --set nosuchkey=1` made mlflow.db (and its .lock) in the current folder
    # before refusing the key
    monkeypatch.chdir(tmp_path)
    assert cli.main("augmentation", "t", ["--set", "nosuchkey=1", "--trials", "1"]) == 2
    assert "unknown parameter(s) ['nosuchkey']" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "change, says",
    [
        ({"search": "grid"}, r"--search 'grid': use optuna or random"),
        ({"scheduler": "pbt"}, r"--scheduler 'pbt': use asha or fifo"),
    ],
)
def test_a_bad_searcher_or_scheduler_leaves_no_folder(small_world, tmp_path, store, change, says):
    spec = spec_for(small_world, tmp_path, name="bad", tracking_uri=store, experiment="bad")
    with pytest.raises(ValueError, match=says):
        run_search(replace(spec, **change))
    assert not (tmp_path / "runs" / "bad").exists()
    assert _runs(store, "bad") == []


def test_a_search_the_cluster_cannot_place_can_be_rerun_by_name(
    small_world, ray_session, tmp_path, store, capsys
):
    # Refused before its folder and record exist: the same name is free for the corrected
    # command (it said "exists", and --resume restored the refused 64 CPUs).
    argv = ["--data", str(small_world.root), "--data-root", str(small_world.root.parent)]
    argv += ["--trials", "1", "--epochs", "1", "--name", "cpu64"]
    argv += ["--storage", str(tmp_path / "runs"), "--cpus-per-trial", "64"]
    argv += ["--tracking-uri", store, "--experiment", "cpu64"]
    for _ in range(2):
        assert cli.main("augmentation", "test", argv) == 2
        err = capsys.readouterr().err
        assert re.search(r"error: --cpus-per-trial 64: the Ray cluster has \d+ CPU", err), err
        assert "exists" not in err, err
        assert not (tmp_path / "runs" / "cpu64").exists()
    assert _runs(store, "cpu64") == []  # no MLflow run was started for it


def _fail_after_the_folder(monkeypatch, trial_dir=None):
    """Makes the search fail once its folder and record are written, before Tune starts; with
    ``trial_dir``, as if a trial had started there first."""

    def fail(parent_run_id, max_failures=1):
        if trial_dir is not None:
            (trial_dir / "run").mkdir(parents=True)
        raise RuntimeError("injected: Tune could not start")

    monkeypatch.setattr(runner, "_search_callback", fail)


def test_a_new_search_that_fails_before_its_trials_removes_its_folder(
    small_world, ray_session, tmp_path, store, monkeypatch
):
    _fail_after_the_folder(monkeypatch)
    spec = spec_for(small_world, tmp_path, name="late", tracking_uri=store, experiment="late")
    for attempt in (1, 2):  # the second is not refused with "exists"
        with pytest.raises(RuntimeError, match="injected"):
            run_search(spec)
        assert not (tmp_path / "runs" / "late").exists()
        assert (tmp_path / "runs").is_dir()  # only the search's own folder goes
        # the attempts' MLflow runs are ended, not left RUNNING
        assert _runs(store, "late") == [("late", "FAILED")] * attempt


def test_a_failed_search_keeps_a_folder_it_did_not_make_or_a_trial_started_in(
    small_world, ray_session, tmp_path, store, monkeypatch
):
    exp = tmp_path / "runs" / "kept"
    _fail_after_the_folder(monkeypatch, trial_dir=exp / "trial_x")
    spec = spec_for(small_world, tmp_path, name="kept", tracking_uri=store, experiment="kept")
    with pytest.raises(RuntimeError, match="injected"):
        run_search(spec)
    assert (exp / "trial_x" / "run").is_dir() and (exp / META_FILE).is_file()
    # a resume of it that fails before a trial starts keeps it too: this session did not make it
    shutil.rmtree(exp / "trial_x")
    _fail_after_the_folder(monkeypatch)
    with pytest.raises(RuntimeError, match="injected"):
        run_search(replace(spec, resume=True))
    sessions = json.loads((exp / META_FILE).read_text())["sessions"]
    assert [s["end"] for s in sessions] == ["failed", "failed"]
    assert _runs(store, "kept") == [("kept", "FAILED")]


def _returns_a_value(trial):
    return trial.suggest_float("aug.vflip_p", 0.0, 0.5)


def _returns_zero(trial):
    trial.suggest_float("aug.vflip_p", 0.0, 0.5)
    return 0.0  # was taken for "no constants"


@pytest.mark.parametrize("space", [_returns_a_value, _returns_zero])
def test_a_space_that_returns_no_dict_is_refused(space):
    # validate_space runs before the search makes anything (MLflow run, folder, Ray)
    with pytest.raises(ValueError) as e:
        validate_space(space, dict(BASE))
    assert str(e.value).startswith(
        f"search space {__name__} returned float, expected a dict or None"
    ), e.value


def _low_above_high(trial):
    trial.suggest_float("optim.lr", 1e-2, 1e-3, log=True)


def _no_choices(trial):
    trial.suggest_categorical("loss", [])


@pytest.mark.parametrize(
    "space, says",
    [
        (_low_above_high, "parameter 'optim.lr': `low <= high` must hold"),
        (_no_choices, "parameter 'loss': The `choices` must contain one or more"),
    ],
)
def test_a_bad_range_names_its_parameter(space, says):
    with pytest.raises(ValueError, match="failed while sampling") as e:
        validate_space(space, dict(BASE))
    assert says in str(e.value), e.value


def test_resume_keeps_and_names_the_recorded_max_concurrent(caplog):
    # Tune restores the experiment with the limit it started with: a new one has no effect
    meta = {"base": {"epochs": 8, "data": None}, "spec": {"max_concurrent": 1}}
    spec = SearchSpec(max_concurrent=3, resume=True)
    with caplog.at_level(logging.WARNING, logger="bldseg.tune.runner"):
        resumed = resumed_spec(spec, meta)
    assert resumed.max_concurrent == 1
    (said,) = [r.getMessage() for r in caplog.records]
    assert said == "--resume continues the search as it was started: max_concurrent=1 (not 3)"


@pytest.mark.parametrize("via", ["--address", "RAY_ADDRESS"])
def test_an_unreachable_ray_head_is_refused_at_once(via, monkeypatch):
    # `bldseg tune --address host:port` waited in ray.init for minutes on a head that is not
    # there; checked before Ray is touched (a search's ValueError is its rc 2)
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    if via == "RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(ValueError, match=f"{via} {address}: no Ray head answers there"):
        runner.init_ray(address if via == "--address" else None)


@pytest.mark.parametrize(
    "setting, says",
    [
        ("aug.crop_size=160", "aug.crop_size=160 is larger than the cached images (96x96)"),
        ("val_tile=160", "run config: val_tile=160 is larger than the images (96x96)"),
    ],
)
def test_a_crop_or_val_tile_larger_than_the_images_is_refused_before_the_search(
    small_world, tmp_path, store, setting, says, capsys
):
    # Each trial refused it (retried once) after the search's MLflow run and folder existed:
    # the corrected command was then refused its name, and --resume brought the value back.
    # Now refused with the usage errors, before the MLflow run, the folder or Ray.
    experiment = setting.split("=")[0]
    argv = ["--data", str(small_world.root), "--data-root", str(small_world.root.parent)]
    argv += ["--trials", "2", "--epochs", "1", "--name", "big", "--scheduler", "fifo"]
    argv += ["--storage", str(tmp_path / "runs"), "--set", setting]
    argv += ["--tracking-uri", store, "--experiment", experiment]
    for k, v in BASE.items():
        if k != setting.split("=")[0]:
            argv += ["--set", f"{k}={json.dumps(v)}"]
    for _ in range(2):  # the same name again: not "exists: pass --resume"
        assert cli.main("augmentation", "test", argv) == 2
        err = capsys.readouterr().err
        assert f"error: {says}" in err, err
        assert not (tmp_path / "runs" / "big").exists()
    assert _runs(store, experiment) == []


def crop_range_space(trial):
    """A crop range reaching past the 96-px images of the small world (validation tiles fixed:
    a searched crop with val_tile 0 is refused, its trials validated on other tiles)."""
    trial.suggest_int("aug.crop_size", 32, 160)
    return {"val_tile": 32}


def crop_choice_space(trial):
    # each numeric choice is checked, drawn by the few samples or not
    trial.suggest_categorical("aug.crop_size", [32, 48, 64, 128])
    return {"val_tile": 32}


@pytest.mark.parametrize(
    "space, says",
    [
        (
            crop_range_space,
            r"parameter 'aug.crop_size' ranges over \[32, 160\], and the data refuse its end "
            r"160: aug.crop_size=160 is larger than the cached images \(96x96\).*\. Narrow the "
            r"range in the space",
        ),
        (
            crop_choice_space,
            r"the data refuse its (sample \{'aug.crop_size': 128.*\}|choice 128): .*"
            r"aug.crop_size=128 is larger than the cached images \(96x96\)",
        ),
    ],
    ids=["crop-range", "crop-choice"],
)
def test_a_space_reaching_past_the_images_is_refused_before_the_search(
    small_world, tmp_path, store, monkeypatch, space, says
):
    from bldseg import tune_spaces

    monkeypatch.setitem(tune_spaces.SPACES, "augmentation", space)
    spec = spec_for(small_world, tmp_path, name="far", tracking_uri=store, experiment="far")
    with pytest.raises(ValueError, match=says):
        run_search(spec)
    assert not (tmp_path / "runs").exists()
    assert _runs(store, "far") == []


def small_crop_space(trial):
    trial.suggest_int("aug.crop_size", 32, 64)
    return {"val_tile": 32}


def test_a_fixed_crop_that_the_space_replaces_is_not_refused(small_world):
    from bldseg.tune.runner import check_trials_on_data

    # every trial trains the space's crop: the fixed one is never used
    check_trials_on_data(small_crop_space, {**BASE, "aug.crop_size": 160}, small_world.train)


def test_k_fold_trials_are_checked_on_the_data_too(small_world):
    from bldseg.tune.runner import check_trials_on_data

    base = {**BASE, "folds": 3, "aug.crop_size": 160}
    with pytest.raises(ValueError, match=r"^aug.crop_size=160 is larger than the cached images"):
        check_trials_on_data(lambda trial: None, base, small_world.train)
