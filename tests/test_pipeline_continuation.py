"""Continuing a recorded pipeline: what is refused (another storage or tracking store, an
ensemble size no model count can give), what is redone (the test maps, the ensemble and the
submission after the test split changed; the ensemble after other ensemble sizes), and what
reaches the searches (the keys the user fixed) and the report (the incumbent's thresholds).
Each is checked on the function that decides it, with hand-made states and tiny data."""

import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bldseg import pipeline
from bldseg.pipeline import ContinuationError, PipelineConfig

TRAIN = {
    "aug.crop_size": 64,
    "batch_size": 8,
    "val_fraction": 0.25,
    "samples_per_epoch": 16,
    "epochs": 1,
    "impl": "compiled",
}


def _recorded(cfg: PipelineConfig, **extra) -> dict:
    """A state as a pipeline started with ``cfg`` records it."""
    return {"config": json.loads(json.dumps(asdict(cfg), default=str)), **extra}


# ------------------------------------------------------------------------------------------
# 1. the test split changed
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(small_world, tmp_path_factory) -> Path:
    """A run folder of a one-epoch tiny model."""
    from bldseg.train import RunConfig, fit

    run = tmp_path_factory.mktemp("model") / "run"
    fit(RunConfig.from_flat(TRAIN), run, data=small_world)
    return run


@pytest.fixture(scope="module")
def other_world(tmp_path_factory):
    """Another synthetic world: its test split has other (and fewer) tiles, of the same size."""
    from bldseg.data.prepare import prepare_data

    return prepare_data(
        None,
        data_root=tmp_path_factory.mktemp("other_world"),
        synthetic=dict(
            n_train=8,
            train_size=64,
            n_test=6,
            test_size=32,
            test_scene_size=64,
            noise_fraction=0.3,
            seed=5,
        ),
        progress=False,
    )


def _library(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k].copy() for k in z.files}


def test_test_maps_of_another_test_split_are_remade(small_world, other_world, model):
    # the maps were kept while newer than the checkpoint: a rerun on a new test split scored
    # the old split's maps against the new truth (or failed on their shapes)
    assert list(other_world.test.ids) != list(small_world.test.ids)
    path = pipeline.write_test_library(model, small_world, pipeline.test_truth(small_world))
    old = _library(path)
    data = replace(small_world, test=other_world.test, test_truth_csv=other_world.test_truth_csv)
    truth = pipeline.test_truth(data)
    pipeline.write_test_library(model, data, truth)
    new = _library(path)
    assert list(new["tile_ids"]) == list(other_world.test.ids)
    assert new["probs"].shape == truth.shape and (new["truth"] == truth).all()
    assert str(new["made_on"]) == other_world.test.fingerprint != str(old["made_on"])
    pipeline._single_test_scores(model, truth, {"05": 0.5})  # scores the new split


def test_test_maps_with_other_truth_or_of_another_cache_are_remade(small_world, model, tmp_path):
    truth = pipeline.test_truth(small_world)
    path = pipeline.write_test_library(model, small_world, truth)
    made = path.stat().st_mtime_ns
    assert pipeline.write_test_library(model, small_world, truth) == path
    assert path.stat().st_mtime_ns == made  # current: kept
    # the same tiles with another truth CSV (here: one tile's buildings removed)
    df = pd.read_csv(small_world.test_truth_csv, dtype=str, keep_default_na=False)
    df.loc[(df["mask_rle"] != "-1").idxmax(), "mask_rle"] = "-1"
    csv = tmp_path / "truth.csv"
    df.to_csv(csv, index=False)
    relabelled = replace(small_world, test_truth_csv=csv)
    other_truth = pipeline.test_truth(relabelled)
    assert not (other_truth == truth).all()
    pipeline.write_test_library(model, relabelled, other_truth)
    assert (_library(path)["truth"] == other_truth).all()
    # maps recorded as made of another test cache (same ids and truth), or not recording it
    for made_on in ("0" * 32, None):
        fields = _library(path)
        fields["truth"] = other_truth.astype(np.uint8)
        del fields["made_of"]  # the content digest: as maps of older bldseg, or below
        if made_on is None:
            del fields["made_on"]
        else:
            fields["made_on"] = np.array(made_on)
        np.savez(path, **fields)
        pipeline.write_test_library(model, relabelled, other_truth)
        assert str(_library(path)["made_on"]) == small_world.test.fingerprint
    # made of another cache whose content is other: remade; of the same content read from
    # another folder (another fingerprint): kept
    for made_of, kept in (("0" * 32, False), (small_world.test.content, True)):
        fields = _library(path)
        fields.update(made_on=np.array("0" * 32), made_of=np.array(made_of))
        np.savez(path, **fields)
        made = path.stat().st_mtime_ns
        pipeline.write_test_library(model, relabelled, other_truth)
        assert (path.stat().st_mtime_ns == made) == kept


def test_test_split_fingerprint_covers_the_truth_csv(small_world, other_world, tmp_path):
    fp = pipeline.fingerprint_test_split(small_world)
    assert fp == pipeline.fingerprint_test_split(small_world)
    moved = replace(small_world, test=other_world.test, test_truth_csv=other_world.test_truth_csv)
    assert pipeline.fingerprint_test_split(moved) != fp
    csv = tmp_path / "truth.csv"
    csv.write_bytes(small_world.test_truth_csv.read_bytes() + b"\n")
    assert pipeline.fingerprint_test_split(replace(small_world, test_truth_csv=csv)) != fp
    assert pipeline.fingerprint_test_split(replace(small_world, test=None)) is None


def _finished_state(cfg: PipelineConfig, test_fp: str | None, with_test: bool = True) -> dict:
    """The state of a finished pipeline: three stages, an ensemble search, a submission."""
    test = {"test_dice": 0.7} if with_test else {}
    stages = {s: {"best": {"val_dice_best": 0.8}} for s, _ in pipeline.STAGES}
    for info in stages.values():
        info.update({"test": test} if test else {})
    return _recorded(
        cfg,
        test_fingerprint=test_fp,
        stages=stages,
        ensemble={"best": {"check_dice": 0.8, **test}, "best_single": {}},
        predict={"submission": "submission.csv", "test_dice": 0.7},
    )


def test_a_changed_test_split_redoes_what_depends_on_it():
    # "predict" was in the state: the old submission.csv stayed, scored on the old split
    cfg = PipelineConfig()
    state = _finished_state(cfg, "aaaa")
    notes = pipeline.refresh_state(cfg, state, "bbbb", has_truth=True)
    assert "ensemble" not in state and "predict" not in state
    assert not any("test" in info for info in state["stages"].values())
    assert state["test_fingerprint"] == "bbbb" and state["stages"]["tune_aug"]["best"]
    assert len(notes) == 1 and "aaaa -> bbbb" in notes[0] and "ensemble, predict" in notes[0]
    # the same fingerprint: nothing is redone
    state = _finished_state(cfg, "bbbb")
    assert pipeline.refresh_state(cfg, state, "bbbb", has_truth=True) == []
    assert "ensemble" in state and "predict" in state
    # no truth before or now: the ensemble has no test column and is kept; the submission is not
    state = _finished_state(cfg, "aaaa", with_test=False)
    pipeline.refresh_state(cfg, state, "bbbb", has_truth=False)
    assert "ensemble" in state and "predict" not in state
    # a state of an older bldseg records the current fingerprint, redoing nothing
    state = _finished_state(cfg, None)
    del state["test_fingerprint"]
    assert pipeline.refresh_state(cfg, state, "bbbb", has_truth=True) == []
    assert state["test_fingerprint"] == "bbbb" and "predict" in state


# ------------------------------------------------------------------------------------------
# 2. the keys the user fixed reach every stage's search
# ------------------------------------------------------------------------------------------


def test_set_and_model_keys_reach_every_stage_search(monkeypatch):
    # the pipeline built its SearchSpecs without user_keys: a --set of a searched key was
    # overridden by the space without the runner's warning
    from bldseg.commands import pipeline as command

    seen = {}

    def capture(cfg):
        seen["cfg"] = cfg
        raise KeyboardInterrupt  # stop before any work

    monkeypatch.setattr(command, "run_pipeline", capture)
    argv = ["--trials", "1", "--set", "aug.hflip_p=0.0", "--set", "batch_size=4"]
    argv += ["--model", "upernet_internimage_t", "--split-group", "^(.*)_"]
    assert command.main(argv) == 130
    cfg = seen["cfg"]
    keys = ("aug.hflip_p", "batch_size", "model", "split_group")
    assert cfg.user_keys == keys
    assert command.main(["--trials", "1"]) == 130
    assert seen["cfg"].user_keys == ()  # the CPU defaults under them are not the user's
    for stage, space in pipeline.STAGES:
        spec = pipeline.stage_spec(cfg, stage, space, dict(cfg.base), "sqlite:////x.db")
        assert spec.user_keys == keys and spec.space == space
        assert spec.name == f"pipeline-{stage}"
    # a state recorded before the field existed continues
    old = _recorded(PipelineConfig())
    del old["config"]["user_keys"]
    pipeline.check_continuation(replace(PipelineConfig(), user_keys=("model",)), old, "fp")


def test_a_set_value_the_first_space_searches_is_named_by_its_search(
    small_world, tmp_path, monkeypatch, caplog, capsys
):
    # the real command and search: the augmentation search names the overridden --set before
    # it starts (and then stops: --folds 4 of the tiny world's 3 scenes)
    from bldseg.commands import pipeline as command

    monkeypatch.chdir(tmp_path)
    # the pipeline's own start-up check of the first search would refuse --folds 4 before
    # the search: left to the search here, whose warning this is about
    monkeypatch.setattr(pipeline, "check_trials_on_data", lambda *a: None)
    argv = ["--data", str(small_world.root), "--data-root", str(small_world.root.parent)]
    argv += ["--storage", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    argv += ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--trials", "1"]
    argv += ["--split-group", r"TRAIN_\d\d(\d)", "--folds", "4", "--set", "aug.hflip_p=0.0"]
    with caplog.at_level(logging.WARNING, logger="bldseg.tune.runner"):
        assert command.main(argv) == 1
    assert "--folds 4: the data has only 3 split group(s)" in capsys.readouterr().err
    (said,) = [r.getMessage() for r in caplog.records if "space searches" in r.getMessage()]
    assert "the augmentation space searches aug.hflip_p: each trial uses the space's" in said


# ------------------------------------------------------------------------------------------
# 3. ensemble sizes
# ------------------------------------------------------------------------------------------


def test_k_min_above_the_models_trained_is_refused_up_front(tmp_path, capsys):
    # it failed after every search with "give at least one ensemble size k"
    from bldseg.commands import pipeline as command

    with pytest.raises(ValueError, match=r"--k-min 4 is more than the 3 models"):
        pipeline.check_config(PipelineConfig(trials=1, k_min=4, k_max=6))
    pipeline.check_config(PipelineConfig(trials=1, k_min=3, k_max=6))
    base = ["--name", "p", "--out", str(tmp_path / "out"), "--storage", str(tmp_path / "runs")]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = [*base, "--tracking-uri", uri, "--trials", "1", "--k-min", "4", "--k-max", "6"]
    with pytest.raises(SystemExit) as e:  # a flag out of range: a usage error
        command.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--k-min 4" in err and "3 models" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "p" / "pipeline_state.json").exists()


def test_fewer_trained_models_than_k_min_is_one_line_naming_k_min(tmp_path):
    cfg = PipelineConfig(trials=2, k_min=3, k_max=6)
    with pytest.raises(RuntimeError, match=r"--k-min 3 is more than the 2 trained models"):
        pipeline.ensemble_sizes(cfg, 2, tmp_path)
    assert pipeline.ensemble_sizes(cfg, 4, tmp_path) == [3, 4]
    assert pipeline.ensemble_sizes(cfg, 6, tmp_path) == [3, 4, 5, 6]


def test_other_ensemble_sizes_continue_and_redo_only_the_ensemble():
    # k_min was a result setting: a corrected --k-min was refused as "other settings"
    cfg = PipelineConfig(trials=1, k_min=3, k_max=6)
    state = _finished_state(cfg, "aaaa")
    smaller = replace(cfg, k_min=2, k_max=4)
    pipeline.check_continuation(smaller, state, "fp")  # not refused
    notes = pipeline.refresh_state(smaller, state, "aaaa", has_truth=True)
    assert "ensemble" not in state and "predict" not in state
    assert all("test" in info for info in state["stages"].values())  # the stages are kept
    assert state["config"]["k_min"] == 2 and state["config"]["k_max"] == 4  # for the report
    assert len(notes) == 1 and "k_min: 3 -> 2; k_max: 6 -> 4" in notes[0]
    assert pipeline.refresh_state(smaller, state, "aaaa", has_truth=True) == []


# ------------------------------------------------------------------------------------------
# 4. the report's thresholds are the incumbent's
# ------------------------------------------------------------------------------------------


def _stage(
    search: Path, val: float, thr: float, youden: float, started: str | None, carried: bool
) -> dict:
    """A recorded stage whose best trial's folder is gone (the report shows no intervals)."""
    search.mkdir(parents=True)
    header = "trial_id,run_dir,val_thr_best,val_dice_best,config/coteach.tau"
    (search / "trials.csv").write_text(f"{header}\n0,/nonexistent,0.5,0.7,0.1\n")
    return {
        "best": {"run_dir": f"/nonexistent/{val}", "val_dice_best": val, "val_thr_best": thr},
        "best_config": {},
        "wall_s": 1,
        "overhead": 0.0,
        "path": str(search),
        "started_from": started,
        "carried_forward": carried,
        "val_thresholds": {
            "val_dice_05": val - 0.01,
            "val_dice_best": val,
            "val_dice_youden": val - 0.05,
            "val_thr_best": thr,
            "val_thr_youden": youden,
            "val_thr_widened": 0.0,
        },
    }


def test_report_thresholds_are_the_incumbents_and_named(tmp_path):
    # the section showed the last stage's best trial, here tune_tau's, below the incumbent
    from bldseg.report import write_report

    config = {"name": "x", "data": None, "trials": 1, "epochs": 1, "cpus_per_trial": 1}
    config |= {"k_min": 1, "k_max": 1, "seed": 0, "base": {}}
    stages = {
        "tune_aug": _stage(tmp_path / "aug", 0.80, 0.40, 0.20, None, True),
        "tune_sched": _stage(tmp_path / "sched", 0.70, 0.55, 0.30, "tune_aug", False),
        "tune_tau": _stage(tmp_path / "tau", 0.75, 0.65, 0.10, "tune_aug", False),
    }
    write_report({"config": config, "stages": stages}, tmp_path, has_truth=False)
    section = (tmp_path / "REPORT.md").read_text().split("## Thresholds")[1]
    heading = section.splitlines()[0]
    assert "tune_aug" in heading and "tune_tau" not in heading
    rows = {line.split(" | ")[0]: line for line in section.splitlines() if line.startswith("| ")}
    assert rows["| best of sweep"].startswith("| best of sweep | 0.4000 | 0.8000")
    assert rows["| Youden's index"].startswith("| Youden's index | 0.2000 | 0.7500")


# ------------------------------------------------------------------------------------------
# 5. another storage or tracking store
# ------------------------------------------------------------------------------------------


def test_another_storage_or_tracking_uri_is_refused_naming_both(tmp_path, monkeypatch):
    # accepted, then a traceback (no pipeline run in the other MLflow store) or an ensemble
    # without the earlier stages' models (find_runs of the other storage)
    monkeypatch.chdir(tmp_path)
    cfg = PipelineConfig(storage="runs", tracking_uri="sqlite:///mlflow.db")
    state = _recorded(cfg, data_fingerprint="fp")  # an older state: relative values only
    pipeline.check_continuation(cfg, state, "fp")
    # the same places, spelled absolute
    same = replace(
        cfg, storage=str(tmp_path / "runs"), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"
    )
    pipeline.check_continuation(same, state, "fp")
    with pytest.raises(ContinuationError) as e:
        pipeline.check_continuation(replace(cfg, storage="runsB"), state, "fp")
    assert f"--storage: '{tmp_path / 'runs'}' -> '{tmp_path / 'runsB'}'" in str(e.value)
    with pytest.raises(ContinuationError) as e:
        pipeline.check_continuation(replace(cfg, tracking_uri="sqlite:////else/m.db"), state, "fp")
    assert f"--tracking-uri: 'sqlite:///{tmp_path}/mlflow.db' -> 'sqlite:////else/m.db'" in str(
        e.value
    )
    # a state recording the absolute places is compared by them, from any working folder
    recorded = _recorded(cfg, storage=str(tmp_path / "runs"), tracking_uri="sqlite:////a/m.db")
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    with pytest.raises(ContinuationError, match=r"--storage: .* --tracking-uri: "):
        pipeline.check_continuation(cfg, recorded, "fp")
    pipeline.check_continuation(replace(same, tracking_uri="sqlite:////a/m.db"), recorded, "fp")


def test_the_same_data_folder_spelled_otherwise_continues(tmp_path, monkeypatch):
    # `--data mydata/` after `--data ./mydata` was refused as "data: './mydata' -> 'mydata/'"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mydata").mkdir()
    state = _recorded(PipelineConfig(data="./mydata"), data_fingerprint="fp")
    for spelled in ("mydata/", "mydata", str(tmp_path / "mydata")):
        pipeline.check_continuation(PipelineConfig(data=spelled), state, "fp")
    with pytest.raises(ContinuationError, match=r"data: '.*mydata' -> '.*other'"):
        pipeline.check_continuation(PipelineConfig(data="other"), state, "fp")


def test_the_same_data_in_another_folder_continues(tmp_path, monkeypatch, caplog):
    # a share mounted elsewhere, a copy: the same content digest continues, as a stopped run
    # and a resumed search do (it was refused as "data: '.../a' -> '.../b'")
    monkeypatch.chdir(tmp_path)
    state = _recorded(PipelineConfig(data="a"), data_fingerprint="fp", data_content="c1")
    with caplog.at_level(logging.WARNING, logger="bldseg.pipeline"):
        pipeline.check_continuation(PipelineConfig(data="b"), state, "fp2", "c1")
    assert f"read from {tmp_path / 'b'} now, not {tmp_path / 'a'}" in caplog.text
    with pytest.raises(ContinuationError, match=r"data: '.*a' -> '.*b'; training data content"):
        pipeline.check_continuation(PipelineConfig(data="b"), state, "fp2", "c2")
    # other settings are still refused beside it
    with pytest.raises(ContinuationError, match=r"\(trials: 6 -> 7\)"):
        pipeline.check_continuation(PipelineConfig(data="b", trials=7), state, "fp2", "c1")
    # without a digest (an older state), another folder is still refused
    older = _recorded(PipelineConfig(data="a"), data_fingerprint="fp")
    with pytest.raises(ContinuationError, match=r"data: '.*a' -> '.*b'"):
        pipeline.check_continuation(PipelineConfig(data="b"), older, "fp", "c1")


def test_a_pipeline_recorded_with_a_flag_its_data_did_not_read_continues(tmp_path, monkeypatch):
    # older bldseg ignored --tile-size on the synthetic world (now refused): without the flag the
    # state's data_options differed, with it prepare_data refused, so it could never continue
    from bldseg.data.prepare import DataOptions

    monkeypatch.chdir(tmp_path)
    state = _recorded(PipelineConfig(data_options=DataOptions(tile_size=64)), data_fingerprint="fp")
    with pytest.warns(UserWarning, match=r"started with --tile-size, which .* \(synthetic\)"):
        pipeline.check_continuation(PipelineConfig(), state, "fp")
    (tmp_path / "imgs" / "images").mkdir(parents=True)  # a folder layout reads --tile-size
    folders = _recorded(
        PipelineConfig(data="imgs", data_options=DataOptions(tile_size=64)), data_fingerprint="fp"
    )
    with pytest.raises(ContinuationError, match="data_options"):
        pipeline.check_continuation(PipelineConfig(data="imgs"), folders, "fp")


def test_a_deleted_experiment_names_the_pipelines_own_flag(small_world, tmp_path, monkeypatch):
    # the message said "pass --experiment NAME", a flag the pipeline does not have
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    client.delete_experiment(client.create_experiment("pipeline"))
    cfg = PipelineConfig(
        data=str(small_world.root),
        data_root=str(small_world.root.parent),
        tracking_uri=uri,
        base=dict(TRAIN),
    )
    with pytest.raises(ValueError, match="is deleted") as e:
        pipeline.run_pipeline(cfg)
    assert "pass --name NAME to log into another experiment" in str(e.value)
    assert "--experiment NAME" not in str(e.value)
    assert not (tmp_path / "runs").exists()


def test_the_state_is_strict_json(tmp_path):
    # a NaN was written as a bare NaN (strict readers refuse the whole file)
    cfg = PipelineConfig(out=str(tmp_path / "results"))
    state = {"gain": float("nan"), "dice": np.float32(0.5), "n": np.int64(3)}
    pipeline._save_state(cfg, {**state, "where": tmp_path})

    def refuse(word):
        raise ValueError(f"not strict JSON: {word}")

    text = (tmp_path / "results" / "pipeline" / "pipeline_state.json").read_text()
    got = json.loads(text, parse_constant=refuse)
    assert got == {"gain": None, "dice": 0.5, "n": 3, "where": str(tmp_path)}
    assert pipeline._load_state(cfg) == got


def test_a_change_of_bldsegs_mask_decoding_is_named_not_blamed_on_the_data(tmp_path, monkeypatch):
    # the cache's fingerprint includes readers.DECODE_RULES: after a bldseg update the same
    # files fingerprint differently, and the pipeline said the training data differ
    from bldseg.data import readers

    monkeypatch.chdir(tmp_path)
    cfg = PipelineConfig()
    now = readers.DECODE_RULES
    state = _recorded(cfg, data_fingerprint="fp", decode_rules=now - 1)
    with pytest.raises(
        ContinuationError, match=rf"image or mask decoding changed \(rules {now - 1} -> {now}"
    ):
        pipeline.check_continuation(cfg, state, "fp2")
    pipeline.check_continuation(cfg, state, "fp")  # same fingerprint: goes on
    same_rules = _recorded(cfg, data_fingerprint="fp", decode_rules=now)
    with pytest.raises(ContinuationError, match=r"training data fingerprint: fp -> fp2"):
        pipeline.check_continuation(cfg, same_rules, "fp2")
    older = _recorded(cfg, data_fingerprint="fp")  # a state from before decode_rules
    with pytest.raises(ContinuationError, match=r"fingerprint \(or bldseg's image or mask"):
        pipeline.check_continuation(cfg, older, "fp2")


def test_a_bldseg_update_that_decodes_the_data_the_same_continues(tmp_path, monkeypatch, caplog):
    # the fingerprint includes readers.DECODE_RULES, so after a bldseg update it differs for the
    # same files; a state that records the content digest is decided by it, as a resumed search
    # or run is (resume_checks.check_same_data): the same pixels continue, other ones do not
    from bldseg.data import readers

    monkeypatch.chdir(tmp_path)
    cfg = PipelineConfig()
    now = readers.DECODE_RULES
    state = _recorded(cfg, data_fingerprint="fp", data_content="c1", decode_rules=now - 1)
    with caplog.at_level(logging.INFO, logger="bldseg.pipeline"):
        pipeline.check_continuation(cfg, state, "fp2", "c1")  # not refused
    assert f"decoding changed since this pipeline started (rules {now - 1} -> {now})" in (
        caplog.text
    )
    assert "decode the same" in caplog.text
    # other pixels after the update: refused, naming the decoding change
    with pytest.raises(ContinuationError, match=r"image or mask decoding changed \(rules"):
        pipeline.check_continuation(cfg, state, "fp2", "c2")
    # the same rules: the same content continues whatever the fingerprint (another folder,
    # new file times), other content is refused naming both digests
    same_rules = _recorded(cfg, data_fingerprint="fp", data_content="c1", decode_rules=now)
    pipeline.check_continuation(cfg, same_rules, "fp2", "c1")
    with pytest.raises(ContinuationError, match=r"training data content: c1 -> c2"):
        pipeline.check_continuation(cfg, same_rules, "fp", "c2")
    # a state without a digest (an older bldseg's) is compared by its fingerprint, as before
    older = _recorded(cfg, data_fingerprint="fp", decode_rules=now - 1)
    with pytest.raises(ContinuationError, match=r"image or mask decoding changed \(rules"):
        pipeline.check_continuation(cfg, older, "fp2", "c1")
    pipeline.check_continuation(cfg, older, "fp", "c1")
    # other settings are still named with the same data
    with pytest.raises(ContinuationError, match=r"trials: 6 -> 7\)"):
        pipeline.check_continuation(replace(cfg, trials=7), state, "fp2", "c1")


def test_a_state_without_a_digest_takes_its_finished_searchs_digest(tmp_path, monkeypatch):
    # A state written before pipelines recorded the content digest was refused after any
    # decoding-rule bump, whatever the pixels; its searches recorded the digest beside the
    # fingerprint they started on, which is the state's data where the fingerprints agree.
    from bldseg.data import readers
    from bldseg.tune.runner import META_FILE

    monkeypatch.chdir(tmp_path)
    cfg = PipelineConfig()
    now = readers.DECODE_RULES
    search = tmp_path / "storage" / "pipeline-aug"
    search.mkdir(parents=True)
    stages = {"aug": {"path": str(search)}, "sched": {"path": str(tmp_path / "gone")}}
    state = _recorded(cfg, data_fingerprint="fp", decode_rules=now - 1, stages=stages)
    record = {"data_fingerprint": "fp", "data_content": "c1"}
    (search / META_FILE).write_text(json.dumps(record))
    pipeline.check_continuation(cfg, state, "fp2", "c1")  # the same pixels: continues
    with pytest.raises(ContinuationError, match=r"image or mask decoding changed \(rules"):
        pipeline.check_continuation(cfg, state, "fp2", "c2")
    # a search that started on other data (its fingerprint differs) says nothing of the state's
    (search / META_FILE).write_text(json.dumps({**record, "data_fingerprint": "fp0"}))
    with pytest.raises(ContinuationError, match=r"image or mask decoding changed \(rules"):
        pipeline.check_continuation(cfg, state, "fp2", "c1")
    # a damaged record is not read as a digest (the stage check names it later)
    (search / META_FILE).write_text("{")
    with pytest.raises(ContinuationError, match=r"image or mask decoding changed \(rules"):
        pipeline.check_continuation(cfg, state, "fp2", "c1")


@pytest.mark.parametrize("to", ["REPORT.md", "docs/", "docs", "new/deeper/R.md"])
def test_report_to_takes_a_file_or_a_folder(tmp_path, to):
    # --report-to docs/ replaced the folder docs with a file named docs (os.replace onto it),
    # and a path in a folder that did not exist yet failed after the whole pipeline had run
    from bldseg.commands.pipeline import copy_report

    out = tmp_path / "out"
    (out / "report").mkdir(parents=True)
    (out / "REPORT.md").write_text("# report\n![](report/curves.png)\n")
    (out / "report" / "curves.png").write_bytes(b"png")
    work = tmp_path / "work"
    (work / "docs").mkdir(parents=True)
    (work / "docs" / "keep.md").write_text("kept")
    dest = copy_report(out / "REPORT.md", str(work / to))
    expected = {
        "REPORT.md": work / "REPORT.md",
        "docs/": work / "docs" / "REPORT.md",
        "docs": work / "docs" / "REPORT.md",  # an existing folder
        "new/deeper/R.md": work / "new" / "deeper" / "R.md",
    }[to]
    assert dest == expected
    assert dest.read_text() == (out / "REPORT.md").read_text()
    # the plots lie where the report's links point, and nothing beside it was lost
    assert (dest.parent / "report" / "curves.png").read_bytes() == b"png"
    assert (work / "docs" / "keep.md").read_text() == "kept"
    assert not list(dest.parent.glob("*.tmp"))


def test_report_to_replaces_each_plot_by_rename(tmp_path):
    # The plots were copied straight into place (copytree): a reader of the old plot (a docs
    # server, an open viewer) saw it rewritten under it, half a file on a failed copy. Each is
    # now written under a temporary name and renamed, the plots before the report.
    import os

    from bldseg.commands.pipeline import copy_report

    out = tmp_path / "out"
    (out / "report").mkdir(parents=True)
    (out / "REPORT.md").write_text("# new\n![](report/stages.png)\n")
    (out / "report" / "stages.png").write_bytes(b"new png")
    docs = tmp_path / "docs"
    (docs / "report").mkdir(parents=True)
    (docs / "report" / "stages.png").write_bytes(b"old png")
    (docs / "report" / "mine.png").write_bytes(b"the user's")
    # a reader holding the old plot: a second name of the same file
    os.link(docs / "report" / "stages.png", tmp_path / "held.png")
    dest = copy_report(out / "REPORT.md", str(docs) + "/")
    assert dest == docs / "REPORT.md" and dest.read_text() == "# new\n![](report/stages.png)\n"
    assert (docs / "report" / "stages.png").read_bytes() == b"new png"
    assert (tmp_path / "held.png").read_bytes() == b"old png"  # replaced, not rewritten
    assert (docs / "report" / "mine.png").read_bytes() == b"the user's"
    assert sorted(p.name for p in (docs / "report").iterdir()) == ["mine.png", "stages.png"]
    assert sorted(p.name for p in docs.iterdir()) == ["REPORT.md", "report"]


# ------------------------------------------------------------------------------------------
# 6. the same data from another folder; a damaged stage search
# ------------------------------------------------------------------------------------------


def _fake_run(small_world, model, root: Path, monkeypatch, **changes):
    """The pipeline with its searches replaced by copies of ``model`` (tests/test_pipeline.py):
    (its settings, the stand-in searches)."""
    from tests.test_pipeline import FakeSearches, _config

    searches = FakeSearches([model, model])
    monkeypatch.setattr(pipeline, "run_search", searches)
    return replace(_config(small_world, root), **changes), searches


def test_the_same_data_in_another_folder_reuses_the_finished_stages(
    small_world, model, tmp_path, monkeypatch, caplog
):
    # The test split's fingerprint holds its files' paths: a pipeline continued on its data
    # moved to another folder remade every test map, the ensemble search and the submission
    # ("the test split or its truth changed") although it was told the data are the same.
    import shutil

    world = tmp_path / "a"
    shutil.copytree(small_world.root, world)
    cfg, searches = _fake_run(
        small_world, model, tmp_path, monkeypatch, data=str(world), data_root=str(tmp_path / "c")
    )
    first = pipeline.run_pipeline(cfg)
    res = tmp_path / "results" / "pipeline"
    made = [res / "submission.csv", res / "ensemble" / "submit.json"]
    made += sorted((tmp_path / "runs").rglob(pipeline.TEST_FILE))
    assert len(made) == 2 + 2 * len(pipeline.STAGES)
    stamps = [p.stat().st_mtime_ns for p in made]
    shutil.move(world, tmp_path / "b")
    searches.calls.clear()
    with caplog.at_level(logging.WARNING, logger="bldseg.pipeline"):
        again = pipeline.run_pipeline(replace(cfg, data=str(tmp_path / "b")))
    assert searches.calls == []  # the searches were skipped before too
    assert [p.stat().st_mtime_ns for p in made] == stamps  # nothing remade
    for kind in ("ensemble", "predict"):
        assert again[kind]["mlflow_run_id"] == first[kind]["mlflow_run_id"]
    assert "is the same (the same content digest): its test maps, ensemble and submission are" in (
        caplog.text
    )
    assert "the test split or its truth changed" not in caplog.text
    assert again["config"]["data"] == str(tmp_path / "b")
    # other test content is still another split (refresh_state): everything after it redone
    state = {**again, "test_content": "0" * 32, "test_fingerprint": "1" * 32}
    notes = pipeline.refresh_state(cfg, state, again["test_fingerprint"], True, "2" * 32)
    assert "ensemble" not in state and "predict" not in state
    assert len(notes) == 1 and "the test split or its truth changed" in notes[0]


def test_the_synthetic_world_continues_with_its_folder_as_data_and_back(
    small_world, tmp_path, monkeypatch, caplog
):
    # Started without --data (the built-in world), the pipeline was refused with --data of that
    # world's folder ("data: None -> '.../synthetic'"), the same files; the reverse continued.
    from bldseg.data.prepare import prepare_data

    monkeypatch.chdir(tmp_path)
    world = str(small_world.root)
    read = prepare_data(world, data_root=small_world.root.parent, progress=False)
    train = read.train
    assert pipeline.fingerprint_test_split(read) == pipeline.fingerprint_test_split(small_world)
    synthetic = PipelineConfig(data_root=str(small_world.root.parent))
    recorded = _recorded(
        synthetic,
        data_fingerprint=small_world.train.fingerprint,
        data_content=small_world.train.content,
    )
    with caplog.at_level(logging.WARNING, logger="bldseg.pipeline"):
        pipeline.check_continuation(
            replace(synthetic, data=world), recorded, train.fingerprint, train.content
        )
    assert f"read from {world} now, not the built-in synthetic world (no --data)" in caplog.text
    # and back: started with --data, continued without (it continued before too)
    caplog.clear()
    with_data = _recorded(
        replace(synthetic, data=world),
        data_fingerprint=train.fingerprint,
        data_content=train.content,
    )
    with caplog.at_level(logging.WARNING, logger="bldseg.pipeline"):
        pipeline.check_continuation(
            synthetic, with_data, small_world.train.fingerprint, small_world.train.content
        )
    assert f"from the built-in synthetic world (no --data) now, not {world}" in caplog.text
    # other data in its place are refused, saying what the recorded setting was
    with pytest.raises(
        ContinuationError,
        match=r"\(data: the built-in synthetic world \(no --data\) -> '.*'; training data content",
    ):
        pipeline.check_continuation(
            replace(synthetic, data=world), recorded, train.fingerprint, "0" * 32
        )


def test_a_damaged_stage_search_names_the_pipelines_remedy(
    small_world, model, tmp_path, monkeypatch, capsys
):
    # The pipeline passed on bldseg tune's refusal: "start a new search (another --name)",
    # "--from", flags the pipeline does not have (its --name names a new pipeline), and nothing
    # said how to redo the stage. The command exits 1, as any pipeline it cannot continue.
    import pickle

    from bldseg.commands import pipeline as command
    from bldseg.tune.runner import META_FILE

    cfg, searches = _fake_run(small_world, model, tmp_path, monkeypatch)
    searches.interrupt = "tune_sched"  # tune_aug recorded, tune_sched left to resume
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(cfg)
    storage = tmp_path / "runs" / "pipeline"
    sched, aug = storage / "pipeline-tune_sched", storage / "pipeline-tune_aug"
    stale = tmp_path / "runs" / "pipeline.stale"

    def refused(stage: Path, what: str) -> str:
        with pytest.raises(ContinuationError) as e:
            pipeline.run_pipeline(cfg)
        said = str(e.value)
        assert f"stage {stage.name.split('-')[1]}: its search {stage} cannot be continued" in said
        assert what in said
        assert f"mkdir -p {stale} && mv {stage} {stale}/" in said
        assert "start a new pipeline (another --name)" in said
        assert "--from" not in said and "start a new search" not in said
        return said

    def damaged(path: Path) -> bytes:
        kept = path.read_bytes()
        path.write_bytes(kept[: len(kept) // 2])
        return kept

    searches.calls.clear()
    kept = damaged(sched / "tuner.pkl")
    refused(sched, "Ray Tune's saved state there")
    (sched / "tuner.pkl").write_bytes(kept)
    kept = damaged(sched / META_FILE)
    refused(sched, f"{sched / META_FILE} is damaged (")
    (sched / META_FILE).unlink()
    refused(sched, f"it has no {META_FILE}")
    (sched / META_FILE).write_bytes(kept)
    kept = damaged(aug / META_FILE)  # a finished stage's record: read for its trial count
    refused(aug, f"{aug / META_FILE} is damaged (")
    assert searches.calls == []  # refused before any search
    # the command: one line, exit status 1 (a pipeline it cannot continue)
    monkeypatch.setattr(command, "run_pipeline", lambda _: pipeline.run_pipeline(cfg))
    assert command.main(["--trials", "1"], prog="bldseg pipeline") == 1
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert line.startswith("bldseg pipeline: error: stage tune_aug: its search")
    assert "Traceback" not in err
    (aug / META_FILE).write_bytes(kept)
    # a finished stage's Tune state is not read again: damaged, it is no reason to refuse
    (aug / "tuner.pkl").write_bytes(pickle.dumps({})[:3])
    # what the message says works: the moved search runs again from its start
    stale.mkdir(parents=True)
    (sched).rename(stale / sched.name)
    state = pipeline.run_pipeline(cfg)
    assert searches.calls == [("tune_sched", False), ("tune_tau", False)]
    assert list(state["stages"]) == [s for s, _ in pipeline.STAGES] and "predict" in state
