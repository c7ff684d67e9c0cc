"""The whole competition week as one resumable run.

    data -> cache -> tune_aug -> tune_sched -> tune_tau -> ensemble search -> predict -> score
                                                                                  -> REPORT.md

Each search starts from the best configuration found so far: a stage's best configuration is
carried forward only when its best trial beats the best so far on validation Dice (the same
validation tiles in every stage), so a stage whose search found nothing better leaves the
configuration as it was instead of making it worse. Every stage records its output in
``<out>/<name>/pipeline_state.json`` once it has finished, and only then; a stage whose output
exists is skipped, and an interrupted search is resumed, so re-running the same command continues
instead of redoing work. Ctrl-C (``KeyboardInterrupt``) in any stage leaves that stage
unrecorded, marks the pipeline's MLflow run KILLED and propagates; one that came after a
search's last trial had ended records that search's stage (it finished), then does the same.
A search recorded by an older bldseg although it never finished (a trial folder without a
finished epoch) is resumed, and the stages after it redone. Continuing with other result
settings, training data, storage or tracking URI is refused (:func:`check_continuation`), and
so is a stage's search whose saved files are damaged (:func:`check_stage_search`); the same
data read from another folder continue, redoing nothing; other ensemble sizes or another test
split redo only what depends on them (:func:`refresh_state`).
MLflow: a pipeline experiment with a parent run; each search's parent run carries tags linking
it to the pipeline run and to the previous stage's run; the ensemble search and the prediction
are child runs of the pipeline run, which names the current ones (tags
``bldseg.ensemble_run_id``, ``bldseg.predict_run_id``); those a continued pipeline redid carry
``bldseg.superseded_by``.

What is submitted: the ensemble search's ``submit.json``, i.e. the best ensemble only when its
gain over the best single model on the check half is beyond its 95% bootstrap interval, else
that single model (:func:`bldseg.ensemble.run.submission_decision`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bldseg import metrics
from bldseg.data import readers
from bldseg.data.prepare import (
    DEFAULT_DATA_ROOT,
    DataOptions,
    PreparedData,
    prepare_data,
    without_unread_options,
)
from bldseg.ensemble.library import FOLDS_FILE, VAL_FILE, find_runs
from bldseg.io import finite_json, write_json
from bldseg.predict import (
    EnsembleSpec,
    fold_checkpoints,
    image_loader,
    load_member,
    member_config,
    predict_cache,
    score_submission,
    write_submission,
)
from bldseg.train.config import RunConfig
from bldseg.train.engine import eval_autocast, predict_probs, resolve_device
from bldseg.train.resume_checks import data_record
from bldseg.tune import tracking
from bldseg.tune.runner import (
    CODE_DIR,
    METRIC,
    SearchInterrupted,
    SearchSpec,
    check_resumed_state,
    check_trials_on_data,
    get_space,
    read_search_record,
    read_trial_table,
    run_search,
)
from bldseg.tune.runner import META_FILE as SEARCH_META

log = logging.getLogger(__name__)

STAGES = (("tune_aug", "augmentation"), ("tune_sched", "scheduler"), ("tune_tau", "coteaching"))
TEST_FILE = "test_probs.npz"
#: The folder beside REPORT.md that holds its plots, and their MLflow artifact folder: the
#: report links them as ``report/<name>.png`` (:func:`bldseg.report.write_report`).
REPORT_ASSETS = "report"
# Batch size of every prediction of the test split: the test library and the submission use
# the same one, so a one-member submission reproduces its model's library score exactly.
PREDICT_BATCH = 16


@dataclass
class PipelineConfig:
    """One pipeline run; defaults fit a 2-core CPU and the built-in synthetic world."""

    name: str = "pipeline"  # names the MLflow experiment, the results folders
    out: str = "results"  # state, ensemble outputs, submission, report go to <out>/<name>
    storage: str = "runs"  # search results go to <storage>/<name>/<stage>
    data: str | None = None  # dataset folder or cache; None: the built-in synthetic world
    data_options: DataOptions = field(default_factory=DataOptions)  # folder layout, decoding
    data_root: str = str(DEFAULT_DATA_ROOT)  # caches and the synthetic world
    base: dict[str, Any] = field(default_factory=dict)  # fixed run-config values
    trials: int = 6  # trials per search stage
    epochs: int = 8  # epochs per trial
    cpus_per_trial: float = 1.0  # CPUs per trial
    gpus_per_trial: float = 0.0  # GPUs per trial
    address: str | None = None  # Ray cluster address
    tracking_uri: str | None = None  # MLflow URI; default sqlite in the working directory
    k_min: int = 2  # smallest ensemble size searched
    k_max: int = 6  # largest ensemble size searched (the reference workflow used 6)
    ensemble_workers: int = 0  # Ray tasks for the ensemble search (0: in-process)
    seed: int = 0  # searcher seed
    # base keys the user fixed by name (--set, --model, --split-group), not defaults: each
    # search warns about those its space searches, as the space's value then wins
    user_keys: tuple[str, ...] = ()


#: Models the pipeline trains per --trials: one per trial of each search stage.
MODELS_PER_TRIAL = len(STAGES)


#: Settings that change a pipeline's results: continuing a pipeline with others would reuse
#: its finished stages, ensemble and test maps as if they belonged to the new settings.
RESULT_SETTINGS = ("data", "data_options", "base", "trials", "epochs", "seed")
#: Settings only the ensemble search reads: a continued pipeline with others keeps its trained
#: models and redoes the ensemble search and the prediction (:func:`refresh_state`).
ENSEMBLE_SETTINGS = ("k_min", "k_max")


class ContinuationError(ValueError):
    """A recorded pipeline continued with other result settings or data, or in another
    storage folder or MLflow tracking store, or with a stage's search damaged."""


def storage_root(storage: str) -> str:
    """``--storage`` as an absolute folder: what a pipeline records and compares."""
    return str(Path(storage).resolve())


def tracking_uri(uri: str | None) -> str:
    """``--tracking-uri`` (None: sqlite in the working folder) with a relative path made
    absolute: the searches' trials and the ensemble's workers run in other folders."""
    return tracking.absolute_uri(uri or tracking.default_tracking_uri("."))


def _content_of_stages(state: dict) -> str | None:
    """The training data's content digest as a finished stage's search recorded it, or None.

    A state written before pipelines recorded the digest has only the fingerprint, which
    changes with bldseg's decoding rules: after such an update the pipeline was refused even
    where the files decode to the same pixels. Its searches recorded the digest (since the
    search records hold one) with the fingerprint they started on; a search that started on
    the state's fingerprint read the same cache, so its digest is the state's data too.
    """
    started_on = state.get("data_fingerprint")
    if not started_on:
        return None
    for info in (state.get("stages") or {}).values():
        meta = Path(str(info.get("path", ""))) / SEARCH_META
        try:
            record = read_search_record(meta)
        except (OSError, ValueError):
            continue  # moved, or damaged: the stage check names it later
        if record.get("data_fingerprint") == started_on and record.get("data_content"):
            return str(record["data_content"])
    return None


def check_continuation(
    cfg: PipelineConfig, state: dict, fingerprint: str, content: str | None = None
) -> None:
    """Raises ContinuationError naming what differs when a recorded pipeline is continued with other
    result settings, other training data, or another storage folder or MLflow tracking URI.

    The storage and the tracking URI are compared as absolute paths: the pipeline's finished
    searches are in the recorded ones, so another would leave their models out of the ensemble
    search, or find no pipeline run to continue. A state without the absolute record (older
    bldseg) is compared by its recorded values made absolute against the working folder.

    The training data are compared as a resumed search or run compares them
    (:func:`~bldseg.train.resume_checks.check_same_data`): by the cache's content digest where
    the state records one too (a state of an older bldseg: as one of its finished searches
    recorded it, :func:`_content_of_stages`), else by its fingerprint. The
    fingerprint also changes when bldseg's decoding rules do
    (:data:`bldseg.data.readers.DECODE_RULES`), so after a bldseg update that decodes the same
    files to the same pixels only the digest tells that nothing changed.

    Args:
        cfg: The settings of this call.
        state: The recorded pipeline state (``pipeline_state.json``).
        fingerprint: The training cache's fingerprint now.
        content: The training cache's content digest now (None: compared by fingerprint).
    """
    # both as JSON has them (tuples become lists)
    recorded = json.loads(json.dumps(state.get("config") or {}, default=str))
    now = json.loads(json.dumps(asdict(cfg), default=str))
    # `mydata/`, `./mydata` and its absolute path are one folder (the fingerprint below
    # compares what is in it)
    for c in (recorded, now):
        if c.get("data") is not None:
            c["data"] = str(Path(c["data"]).resolve())
    if "data_options" in recorded:
        # layout flags the data's kind does not read were ignored by older bldseg (now refused)
        options = DataOptions.from_dict(recorded["data_options"])
        kept = without_unread_options(cfg.data, options, f"the pipeline {_state_path(cfg)}")
        recorded["data_options"] = json.loads(json.dumps(asdict(kept), default=str))
    was_content = state.get("data_content") or _content_of_stages(state)
    # The same pixels, ids and groups read from another folder (a share mounted elsewhere, a
    # copy): as a stopped run or a resumed search, the pipeline continues on them. The built-in
    # synthetic world (no --data) and `--data` of its folder are one such case, either way round.
    data_moved = (
        content is not None
        and content == was_content
        and "data" in recorded
        and recorded["data"] != now.get("data")
    )
    differ = [
        f"{k}: {_setting_text(k, recorded[k])} -> {_setting_text(k, now[k])}"
        for k in RESULT_SETTINGS
        if k in recorded and recorded[k] != now[k] and not (k == "data" and data_moved)
    ]
    started_on = state.get("data_fingerprint")
    rules = state.get("decode_rules")
    rules_changed = rules is not None and rules != readers.DECODE_RULES
    if content and was_content:
        # as a resumed search or run (resume_checks.check_same_data): the digest decides where
        # both have one; the fingerprint changes with bldseg's decoding rules, paths and times
        other_data = (
            None if was_content == content else f"training data content: {was_content} -> {content}"
        )
    elif started_on and started_on != fingerprint:
        since = " (or bldseg's image or mask decoding changed since)" if rules is None else ""
        other_data = f"training data fingerprint{since}: {started_on} -> {fingerprint}"
    else:
        other_data = None
    if data_moved:
        log.warning(
            "%s: the training data are read from %s now, not %s as when this pipeline started; "
            "they are the same (the same content digest): continuing",
            _state_path(cfg),
            _data_text(now["data"]),
            _data_text(recorded["data"]),
        )
    if other_data is not None:
        if rules_changed:
            # the same files, decoded by another bldseg: nothing the user changed
            raise ContinuationError(
                f"{_state_path(cfg)} records a pipeline started before bldseg's image or mask "
                f"decoding changed (rules {rules} -> {readers.DECODE_RULES}: see "
                "bldseg.data.readers.DECODE_RULES); the cache is rebuilt and decoded "
                "differently, so its finished stages cannot be reused: start a new pipeline "
                "(another --name)"
            )
        differ.append(other_data)
    moved = []
    for key, flag, resolve in (
        ("storage", "--storage", storage_root),
        ("tracking_uri", "--tracking-uri", tracking_uri),
    ):
        was = state.get(key) or (resolve(recorded[key]) if key in recorded else None)
        given = resolve(getattr(cfg, key))
        if was is not None and was != given:
            moved.append(f"{flag}: {was!r} -> {given!r}")
    if differ or moved:
        why = (
            "its finished stages would be reused as if they were this one's"
            if differ
            else "its finished searches and its MLflow runs are in the recorded ones"
        )
        raise ContinuationError(
            f"{_state_path(cfg)} records a pipeline started with other settings ("
            + "; ".join(differ + moved)
            + f"): {why}. Pass the original settings to continue it, or another --name for a "
            "new pipeline"
        )
    if rules_changed:  # and the content digests are equal (other data are refused above)
        log.info(
            "%s: bldseg's image or mask decoding changed since this pipeline started (rules "
            "%s -> %s), but the training data decode the same (the same content digest): "
            "continuing",
            _state_path(cfg),
            rules,
            readers.DECODE_RULES,
        )


def _data_text(data: str | None) -> str:
    """A recorded ``data`` setting as a message names it (None: the synthetic world)."""
    return "the built-in synthetic world (no --data)" if data is None else data


def _setting_text(key: str, value: Any) -> str:
    """A recorded setting's value in a refusal: the data's None says what it stands for, the
    rest as Python writes them (a setting typed otherwise shows its type)."""
    return _data_text(value) if key == "data" and value is None else repr(value)


def check_config(cfg: PipelineConfig) -> None:
    """Raises ValueError naming the first setting a pipeline cannot run with.

    Checked before anything is written: a state file records its settings, and a corrected
    command would be refused as "started with other settings".
    """
    for name, ok in (
        ("trials", cfg.trials >= 1),
        ("epochs", cfg.epochs >= 1),
        ("k_min", cfg.k_min >= 1),
        ("cpus_per_trial", cfg.cpus_per_trial > 0),
        ("gpus_per_trial", cfg.gpus_per_trial >= 0),
    ):
        if not ok:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} {getattr(cfg, name)} is out of range")
    if cfg.k_min > cfg.k_max:
        raise ValueError(
            f"--k-min {cfg.k_min} is above --k-max {cfg.k_max}: the ensemble sizes searched are "
            "k-min..k-max"
        )
    n_models = MODELS_PER_TRIAL * cfg.trials
    if cfg.k_min > n_models:
        # else the ensemble search fails only after every search has trained
        raise ValueError(
            f"--k-min {cfg.k_min} is more than the {n_models} models the pipeline trains "
            f"({MODELS_PER_TRIAL} searches of --trials {cfg.trials}): pass --k-min {n_models} "
            "or less, or more --trials"
        )
    RunConfig.from_flat({**cfg.base, "epochs": cfg.epochs})  # names an unknown or bad --set
    if cfg.data is not None and not Path(cfg.data).exists():
        raise FileNotFoundError(f"--data {cfg.data}: no such file or folder")


def _state_path(cfg: PipelineConfig) -> Path:
    return Path(cfg.out) / cfg.name / "pipeline_state.json"


def _load_state(cfg: PipelineConfig) -> dict:
    p = _state_path(cfg)
    return json.loads(p.read_text()) if p.exists() else {}


def _save_state(cfg: PipelineConfig, state: dict) -> None:
    # Strict JSON (a NaN is written as null, which jq and the MLflow UI read), through a
    # temporary name; numpy scalars as numbers, paths and other objects as text.
    write_json(_state_path(cfg), state, default=_state_value)


def _state_value(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return finite_json(obj.item())
    return str(obj)


def best_config(table: pd.DataFrame) -> dict[str, Any]:
    """The searched values of the best non-failed trial (``config/`` columns)."""
    ok = table[table["status"].isin(["completed", "early-stopped"])]
    if not len(ok):
        raise RuntimeError("no trial of the stage finished; see its trials.csv")
    row = ok.sort_values(METRIC, ascending=False, kind="stable").iloc[0]
    return {
        k.removeprefix("config/"): (v.item() if hasattr(v, "item") else v)
        for k, v in row.items()
        if k.startswith("config/") and not (isinstance(v, float) and np.isnan(v))
    }


def carries_forward(stage: dict, best_val: float) -> bool:
    """Whether a finished stage's best configuration goes into the next stages' base: its best
    trial's validation Dice is above ``best_val``, the best of the stages carried so far (a tie
    keeps the earlier configuration, which needs no new setting)."""
    return float(stage["best"][METRIC]) > best_val


def test_truth(data: PreparedData) -> np.ndarray:
    """Held-out test masks in test-cache order: (N, S, S) bool."""
    # the test tiles' own size where the CSV has no height/width (the competition's format)
    return metrics.truth_masks(data.test_truth_csv, data.test.ids, data.test.image_size)


def fingerprint_test_split(data: PreparedData) -> str | None:
    """Fingerprint of the test split and its held-out truth CSV (None: no test split).

    What the test maps, the ensemble's test column and the submission were made from: a
    continued pipeline whose fingerprint differs redoes them (:func:`refresh_state`).
    """
    if data.test is None:
        return None
    return _with_truth(data, data.test.fingerprint)


def test_split_content(data: PreparedData) -> str | None:
    """Content digest of the test split and its held-out truth CSV (None: no test split).

    As :func:`fingerprint_test_split`, but of the decoded test images, ids and groups
    (:attr:`~bldseg.data.cache.DatasetCache.content`), not of their paths and file times: the
    same test split read from another folder (data moved, the synthetic world given as
    ``--data``) has the same digest, and its test maps, ensemble and submission are kept.
    """
    if data.test is None:
        return None
    return _with_truth(data, data.test.content)


def _with_truth(data: PreparedData, test_key: str) -> str:
    """``test_key`` (what the test cache is) hashed with the truth CSV's bytes."""
    h = hashlib.blake2b(test_key.encode(), digest_size=16)
    if data.test_truth_csv:
        with open(data.test_truth_csv, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def refresh_state(
    cfg: PipelineConfig,
    state: dict,
    test_fp: str | None,
    has_truth: bool,
    test_content: str | None = None,
) -> list[str]:
    """Forgets the recorded entries that a continued pipeline must redo; returns what it forgot.

    Two changes leave the trained models valid, so they are not refused as other settings are
    (:func:`check_continuation`), and only what depends on them is redone:

    - other ensemble sizes (``--k-min``/``--k-max``): the ensemble search and the prediction;
    - another test split or truth CSV (:func:`fingerprint_test_split`): the submission, the
      stages' test scores, and the ensemble search where it recorded a test column or one can
      be made now (it chooses on validation maps only). The test maps check themselves
      (:func:`write_test_library`). The same test split read from another folder (its
      fingerprint holds paths) is not another one: where the state records its content digest
      (:func:`test_split_content`) and it is this call's, nothing is redone.

    The state records the new values; the caller saves it. A state without a recorded test
    fingerprint or content digest (older bldseg) records the current ones.

    Args:
        cfg: The settings of this call.
        state: The recorded pipeline state, changed in place.
        test_fp: :func:`fingerprint_test_split` of this call's data.
        has_truth: Whether this call's test split has held-out truth.
        test_content: :func:`test_split_content` of this call's data (None: the test split
            is compared by its fingerprint only).
    """
    notes = []
    config = state.setdefault("config", {})
    sizes = [
        f"{k}: {config[k]} -> {getattr(cfg, k)}"
        for k in ENSEMBLE_SETTINGS
        if k in config and config[k] != getattr(cfg, k)
    ]
    if sizes:
        redone = [k for k in ("ensemble", "predict") if state.pop(k, None) is not None]
        notes.append(f"other ensemble sizes ({'; '.join(sizes)}): redoing {_listed(redone)}")
    for k in ENSEMBLE_SETTINGS:
        config[k] = getattr(cfg, k)
    same_content = test_content is not None and state.get("test_content") == test_content
    if same_content and state.get("test_fingerprint") not in (None, test_fp):
        notes.append(
            "the test split is read from another folder (fingerprint "
            f"{state['test_fingerprint']} -> {test_fp}) but is the same (the same content "
            "digest): its test maps, ensemble and submission are kept"
        )
    elif "test_fingerprint" in state and state["test_fingerprint"] != test_fp:
        redone = []
        ens = state.get("ensemble")
        if ens is not None and (has_truth or "test_dice" in ens.get("best", {})):
            del state["ensemble"]
            redone.append("ensemble")
        if state.pop("predict", None) is not None:
            redone.append("predict")
        for info in state.get("stages", {}).values():
            if info.pop("test", None) is not None and "stage test scores" not in redone:
                redone.append("stage test scores")
        maps = "redoing the test maps" if has_truth else "removing the stale test maps"
        notes.append(
            f"the test split or its truth changed (fingerprint {state['test_fingerprint']} -> "
            f"{test_fp}): {maps} and {_listed(redone)}"
        )
    # what the entries kept or redone are of from now on
    state["test_fingerprint"], state["test_content"] = test_fp, test_content
    return notes


def _listed(entries: list[str]) -> str:
    return ", ".join(entries) if entries else "nothing else (none was recorded)"


def _member_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoint files behind a library entry: ``best.pt``, or a K-fold run's folds'."""
    folds = run_dir / FOLDS_FILE
    return fold_checkpoints(folds)[0] if folds.is_file() else [run_dir / "best.pt"]


def write_test_library(run_dir: Path, data: PreparedData, truth: np.ndarray) -> Path:
    """``test_probs.npz`` next to a model's ``val_probs.npz``: its held-out test maps.

    A K-fold run is one model, its folds' mean (as its out-of-fold ``val_probs.npz`` is one
    library entry). Kept while it is newer than every checkpoint behind it (a resumed trial may
    have saved a better epoch), was made as the run's config says (TTA, autocast), and was made
    of this test split: the same test cache (:func:`_made_of_this_split`; a file that does not
    record it, from an older bldseg, is remade), the same tile ids in the same order, and the
    same truth.
    """
    path = run_dir / TEST_FILE
    # Where the submission is predicted (predict_cache's "auto").
    dev = resolve_device("auto")
    # The config alone says how the maps must be made: the weights are read only to remake them.
    # Its precision is the one the run validated in (recorded; trials forced onto the CPU of a
    # GPU machine validated in float32, which "auto" on the GPU would have made bf16).
    cfg, _ = member_config(run_dir)
    amp = eval_autocast(cfg.precision, dev)
    # as the validation maps beside it were made, and as bldseg predict makes them; the device
    # is named off the CPU (maps of older bldseg versions, all made on the CPU, stay valid)
    made_as = f"tta={cfg.tta} autocast={amp}" + ("" if dev.type == "cpu" else f" on={dev.type}")
    ids = np.array(data.test.ids)
    truth = truth.astype(np.uint8)
    stamps = [c.stat().st_mtime_ns for c in _member_checkpoints(run_dir)]
    if path.exists() and path.stat().st_mtime_ns >= max(stamps):
        with np.load(path) as z:
            if (
                "made_as" in z.files
                and str(z["made_as"]) == made_as
                # maps of another test split would be scored against this one's truth
                and _made_of_this_split(z, data)
                and np.array_equal(z["tile_ids"], ids)
                and np.array_equal(z["truth"], truth)
            ):
                return path
    models, _, _ = load_member(run_dir, dev)  # one model, or a K-fold run's K
    loader = image_loader(data.test, PREDICT_BATCH)
    probs = predict_probs(models, loader, dev, amp, cfg.tta)
    tmp = path.with_name("test_probs.tmp.npz")
    np.savez(
        tmp,
        probs=probs,
        truth=truth,
        tile_ids=ids,
        # the source scene of each test image: the unit the report's intervals resample
        image_ids=np.array(data.test.groups),
        tile_yx=np.zeros((len(ids), 2), np.int64),
        made_as=np.array(made_as),
        made_on=np.array(data.test.fingerprint),  # the test cache the maps were made of
        made_of=np.array(data.test.content),  # and what it holds, wherever it is read from
    )
    os.replace(tmp, path)
    return path


def remove_stale_test_library(run_dir: Path, data: PreparedData) -> None:
    """Removes a model's ``test_probs.npz`` unless it was made of this test split
    (:func:`_made_of_this_split`; none recorded, or no test split now: stale)."""
    path = run_dir / TEST_FILE
    if not path.exists():
        return
    with np.load(path) as z:
        current = data.test is not None and _made_of_this_split(z, data)
    if not current:
        log.info("%s: made of another test split, removed (no truth to remake it)", path)
        path.unlink()


def _made_of_this_split(maps: Any, data: PreparedData) -> bool:
    """Whether test maps (an open ``test_probs.npz``) were made of ``data``'s test cache: the
    same fingerprint, or the same content digest (the same images read from another folder,
    whose fingerprint holds other paths; maps of older bldseg record the fingerprint only)."""
    if "made_on" in maps.files and str(maps["made_on"]) == data.test.fingerprint:
        return True
    return "made_of" in maps.files and str(maps["made_of"]) == data.test.content


def _single_test_scores(run_dir: Path, truth: np.ndarray, thresholds: dict[str, float]) -> dict:
    """Held-out test Dice of one model at several thresholds, from its test library."""
    z = np.load(run_dir / TEST_FILE)
    return {
        f"test_dice_{name}": metrics.competition_score(
            z["probs"] >= metrics.level_from_threshold(t), truth
        )
        for name, t in thresholds.items()
    }


def unfinished_trials(table: pd.DataFrame, trials: int) -> str | None:
    """Why a search's trial table is not that of a finished search, or None if it is.

    A finished search has all its trials, and every trial either failed (status ``error``) or
    was closed by the search's driver: its ``status.json`` says ``"final": true`` (written
    however the trial ended, ASHA stop included). A search stopped by Ctrl-C leaves trials that
    never started, or that were still running.

    Args:
        table: The search's trial table (``trials.csv``; ``status`` and ``run_dir`` columns).
        trials: The number of trials the search was asked for.
    """
    if len(table) < trials:
        return f"{len(table)} of {trials} trials exist"
    for _, row in table.iterrows():
        run = Path(str(row["run_dir"]))
        if row["status"] == "error":
            continue
        status = run / "status.json"
        try:
            final = json.loads(status.read_text()).get("final", False)
        except (FileNotFoundError, json.JSONDecodeError):
            final = False
        if not final:
            return f"trial {row['trial_id']} did not finish ({status} is missing or not final)"
    return None


def _search_trials(search_dir: Path, default: int) -> int:
    """The trial count a search was started with (a resumed search keeps it)."""
    meta = search_dir / SEARCH_META
    if not meta.is_file():
        return default
    # a damaged record is named (json's error gave only a line and column)
    return int(read_search_record(meta).get("spec", {}).get("trials", default))


def check_stage_search(cfg: PipelineConfig, stage: str, folder: Path, resumed: bool) -> None:
    """Refuses a stage's search folder that the pipeline cannot read or resume, saying what a
    pipeline user can do (the search's own refusal names ``bldseg tune``'s --name and --from).

    Its record (``bldseg_search.json``) cut short or missing, or, for a search to be resumed,
    Ray Tune's saved state damaged (:func:`~bldseg.tune.runner.check_resumed_state`: Tune would
    start it again from nothing). Moved out of ``<storage>/<name>`` (where the ensemble search
    would still find its trials), the stage's search runs again from its start on the next
    call, and the stages after it are redone (:func:`_repair_state`).

    Args:
        cfg: The pipeline's settings.
        stage: The stage whose search it is.
        folder: The search's results folder (``<storage>/<name>/<name>-<stage>``).
        resumed: Whether the search is to be resumed (else only its record, where it has
            one, is read: the stage finished, and its Tune state is not read again).

    Raises:
        ContinuationError: The folder cannot be read or resumed, naming it and what to do.
    """
    record = folder / SEARCH_META
    why = None
    if not record.is_file():
        # a finished stage's record is read for its trial count only (the pipeline's is taken
        # without it); a search resumed without it is no search to Tune ("pass --resume")
        if resumed:
            why = f"it has no {SEARCH_META} (the search's record)"
    else:
        try:
            read_search_record(record)
        except ValueError:  # its message names bldseg tune's remedies
            why = f"{record} is damaged ({_json_error(record)})"
    if why is None and resumed:
        try:
            check_resumed_state(folder)
        except ValueError:
            why = (
                "Ray Tune's saved state there (tuner.pkl, experiment_state-*.json, the "
                "searcher's state) is damaged or missing, so Tune would start the search again "
                "from nothing"
            )
    if why is None:
        return
    stale = Path(cfg.storage) / f"{cfg.name}.stale"
    raise ContinuationError(
        f"stage {stage}: its search {folder} cannot be continued: {why} (a full disk, a copy "
        f"cut short?). Move that folder out of {folder.parent} (e.g. mkdir -p "
        f"{shlex.quote(str(stale))} && mv {shlex.quote(str(folder))} "
        f"{shlex.quote(str(stale))}/) and run the same command again: the stage's search runs "
        "again from its start and the stages after it are redone; or start a new pipeline "
        "(another --name)"
    )


def _json_error(path: Path) -> str:
    """Why ``path`` is not a JSON object, in json's words (a line and column)."""
    try:
        value = json.loads(path.read_text())
    except ValueError as e:
        return str(e)
    return f"a JSON {type(value).__name__}, not an object"


def _recorded_stage_problem(info: dict, trials: int) -> str | None:
    """Why a stage recorded in the state did not really finish (state files of older runs)."""
    best_run = Path(str(info.get("best", {}).get("run_dir", "")))
    if not (best_run / "history.json").is_file():
        return f"its best trial's folder {best_run} holds no finished epoch"
    csv = Path(info["path"]) / "trials.csv"
    if not csv.is_file():
        return f"{csv} does not exist"
    return unfinished_trials(read_trial_table(csv), _search_trials(Path(info["path"]), trials))


def _repair_state(cfg: PipelineConfig, state: dict, storage: Path) -> None:
    """Forgets a recorded search that never finished, and everything after it.

    The unfinished search is resumed by the stage loop. The later searches started from its
    partial best configuration: their folders move to ``<storage>/<name>.stale/`` (outside
    the folder the ensemble search reads), so they are searched again from the right start.
    """
    stages = state.get("stages", {})
    names = [stage for stage, _ in STAGES]
    for i, stage in enumerate(names):
        if stage not in stages:
            continue
        folder = stages[stage].get("path")
        if folder and Path(folder).is_dir():  # a folder moved away: the stage is redone (below)
            check_stage_search(cfg, stage, Path(folder), resumed=False)
        why = _recorded_stage_problem(stages[stage], cfg.trials)
        if why is None:
            continue
        log.warning(
            "stage %s was recorded as done but did not finish (%s): resuming it and redoing "
            "the stages after it",
            stage,
            why,
        )
        del stages[stage]
        stale = Path(cfg.storage) / f"{cfg.name}.stale"
        for later in names[i + 1 :]:
            stages.pop(later, None)
            folder = storage / f"{cfg.name}-{later}"
            if folder.exists():
                dest = stale / f"{folder.name}-{time.strftime('%Y%m%d-%H%M%S')}"
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(folder), str(dest))
                log.warning("moved %s (started from the unfinished stage) to %s", folder, dest)
        for key in ("ensemble", "predict", "report"):
            state.pop(key, None)
        _save_state(cfg, state)
        return


def _is_run_of(kind: str, tags: dict[str, str], name: str) -> bool:
    """Whether a child run of the pipeline run is one of its ``kind`` runs."""
    job = tags.get("bldseg.job")
    if kind == "ensemble":
        return job == "ensemble_search"
    # the predict runs of older bldseg carry no bldseg.job tag
    return name == "predict" and job in (None, "predict")


def supersede_runs(client, state: dict, kind: str, run_id: str) -> list[str]:
    """Marks ``run_id`` as the pipeline's current ``kind`` run (``"ensemble"`` search or
    ``"predict"``) and the earlier ones as superseded by it; returns the superseded run ids.

    A continued pipeline that redoes its ensemble search or prediction (other ``--k-max``,
    another test split, a search redone) makes new child runs; the earlier ones stay FINISHED
    under the same names. They get the tag ``bldseg.superseded_by`` and a note saying so, and
    the pipeline run the tag ``bldseg.<kind>_run_id`` naming the current one. A run superseded
    before keeps the run that superseded it.
    """
    pipeline_run = state["pipeline_run_id"]
    tracking.set_tags(client, pipeline_run, {f"bldseg.{kind}_run_id": run_id})
    what = {"ensemble": "ensemble search", "predict": "prediction"}[kind]
    earlier = [
        r.info.run_id
        for r in client.search_runs(
            [state["experiment_id"]],
            filter_string=f"tags.`{tracking.PARENT_TAG}` = '{pipeline_run}'",
            max_results=1000,
        )
        if r.info.run_id != run_id
        and "bldseg.superseded_by" not in r.data.tags
        and _is_run_of(kind, r.data.tags, r.info.run_name)
    ]
    for old in earlier:
        tracking.set_tags(
            client,
            old,
            {
                "bldseg.superseded_by": run_id,
                "mlflow.note.content": (
                    f"Superseded: the pipeline redid its {what} in run {run_id} (a continued "
                    "pipeline with other ensemble sizes, another test split or a search "
                    "redone); this run's results are no longer the pipeline's."
                ),
            },
        )
    return earlier


def _terminate(client, run_id: str, status: str) -> None:
    """Ends an MLflow run; a tracking failure is logged, never raised over the real error."""
    try:
        client.set_terminated(run_id, status=status)
    except Exception as e:  # the exception being handled matters more than the tracking
        log.warning("could not mark MLflow run %s %s: %s", run_id, status, e)


@contextmanager
def _stage(client, run_id: str, name: str) -> Iterator[None]:
    """Runs one stage: on Ctrl-C or an error the pipeline run ends KILLED or FAILED.

    The state is written only after a stage's body has finished, so an interrupted stage is
    never recorded as done; the exception propagates.
    """
    try:
        yield
    except KeyboardInterrupt:
        log.warning(
            "interrupted during %s: it is not recorded as done; run the same command again to "
            "resume",
            name,
        )
        _terminate(client, run_id, "KILLED")
        raise
    except Exception:
        _terminate(client, run_id, "FAILED")
        raise


def best_epoch_row(run_dir: Path) -> dict:
    """The best epoch's row of a trial's ``history.json`` (by validation Dice; the first of
    equal epochs, as fit keeps ``best.pt``).

    For a K-fold run the validation scores and thresholds are the out-of-fold library's
    (``folds.json`` ``oof``): ``history.json`` holds means over folds (a mean threshold no
    fold predicts at), while the run predicts, and the report's intervals are computed, at
    the out-of-fold threshold. ``epoch`` stays the best mean epoch's. The report reads trials
    through this function too, so its counts and captions describe the same epoch.

    Raises:
        RuntimeError: The trial never finished an epoch (no ``history.json``).
    """
    path = run_dir / "history.json"
    if not path.is_file():
        raise RuntimeError(
            f"{path} does not exist: the trial never finished an epoch; run the same command "
            "again to resume its search"
        )
    row = max(json.loads(path.read_text()), key=lambda h: h["val_dice_best"])
    folds = run_dir / FOLDS_FILE
    if folds.is_file():
        row.update(json.loads(folds.read_text()).get("oof") or {})
    return row


def ensemble_sizes(cfg: PipelineConfig, n_models: int, storage: Path) -> list[int]:
    """The ensemble sizes searched: ``--k-min`` to ``--k-max``, at most ``n_models``.

    Raises:
        RuntimeError: Fewer models than ``--k-min`` trained (trials failed, or were stopped
            early without a model); a changed ``--k-min`` continues the pipeline.
    """
    if n_models < cfg.k_min:
        raise RuntimeError(
            f"--k-min {cfg.k_min} is more than the {n_models} trained models in {storage}: "
            f"run the same command with --k-min {max(n_models, 1)} or less"
        )
    return list(range(cfg.k_min, min(cfg.k_max, n_models) + 1))


def stage_spec(
    cfg: PipelineConfig,
    stage: str,
    space: str,
    base: dict[str, Any],
    uri: str,
    parent_tags: dict[str, str] | None = None,
) -> SearchSpec:
    """The search of one stage, resumed where its folder exists.

    Args:
        cfg: The pipeline's settings.
        stage: The stage's name (its search is ``<name>-<stage>`` under ``<storage>/<name>``).
        space: The search space the stage searches.
        base: The fixed run config: the pipeline's ``base`` and the best configuration so far.
        uri: The absolute MLflow tracking URI.
        parent_tags: Tags of the search's parent run (links to the pipeline's runs).
    """
    storage = Path(cfg.storage) / cfg.name
    name = f"{cfg.name}-{stage}"
    return SearchSpec(
        space=space,
        name=name,
        experiment=cfg.name,
        base=base,
        trials=cfg.trials,
        epochs=cfg.epochs,
        cpus_per_trial=cfg.cpus_per_trial,
        gpus_per_trial=cfg.gpus_per_trial,
        storage=str(storage),
        tracking_uri=uri,
        address=cfg.address,
        resume=(storage / name / SEARCH_META).exists(),
        seed=cfg.seed,
        data=cfg.data,
        data_options=cfg.data_options,
        data_root=cfg.data_root,
        parent_tags=dict(parent_tags or {}),
        # the runner warns about those the space searches (a value of an earlier stage's best
        # configuration in ``base`` is not the user's: its key is not among them)
        user_keys=tuple(cfg.user_keys),
    )


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Runs (or continues) every stage; returns the pipeline state (also written as JSON).

    Raises:
        KeyboardInterrupt: Ctrl-C; the interrupted stage is not recorded (a search that had
            finished when it came is), the pipeline's MLflow run is KILLED, and the same call
            resumes.
        RuntimeError: A search in which no trial completed, or that did not finish; fewer
            trained models than ``--k-min``.
        ContinuationError: A recorded pipeline continued with other settings
            (:func:`check_continuation`).
    """
    from bldseg.ensemble.run import SearchConfig as EnsembleConfig
    from bldseg.ensemble.run import run_search as run_ensemble
    from bldseg.report import write_report

    t_start = time.perf_counter()
    check_config(cfg)  # before a state file records the settings as this pipeline's
    state = _load_state(cfg)
    out = Path(cfg.out) / cfg.name
    storage = Path(cfg.storage) / cfg.name
    # absolute: the searches' trials and the ensemble's workers run in other folders
    uri = tracking_uri(cfg.tracking_uri)

    # 0. data + cache (idempotent: an up-to-date cache is only opened)
    data = prepare_data(
        cfg.data,
        options=cfg.data_options,
        data_root=cfg.data_root,
        verbose=True,
        split_group=cfg.base.get("split_group"),
    )
    # before the tracking store is opened: another --tracking-uri is refused, not created
    check_continuation(cfg, state, data.train.fingerprint, data.train.content)
    client = tracking.check_tracking(uri, experiment=cfg.name)
    truth = test_truth(data) if data.test is not None and data.test_truth_csv else None
    if "pipeline_run_id" not in state:
        # The first search's start-up check, before the state records these settings: a crop
        # the data refuse would otherwise be recorded, and the corrected command refused as a
        # pipeline "started with other settings"
        first = {**cfg.base, "epochs": cfg.epochs}
        check_trials_on_data(get_space(STAGES[0][1], first), first, data.train)
        exp_id = tracking.ensure_experiment(client, cfg.name, uri, ".", other="--name NAME")
        run = client.create_run(
            exp_id,
            run_name=f"pipeline:{cfg.name}",
            tags={
                "bldseg.kind": "pipeline",
                # the commit of the code that runs (bldseg's checkout) and its version, as a
                # search's run: git in the current folder named the user's own project's commit
                **tracking.source_tags(CODE_DIR),
                "data_fingerprint": data.train.fingerprint,
            },
        )
        tracking.log_params(
            client, run.info.run_id, {k: v for k, v in asdict(cfg).items() if k != "base"}
        )
        state.update(
            {
                "pipeline_run_id": run.info.run_id,
                "experiment_id": exp_id,
                "config": asdict(cfg),
                # the training data (data_fingerprint, data_content: what decides on
                # continuation) and the decoding rules that fingerprint was made with
                **data_record(data.train.fingerprint, data.train.content),
                "test_fingerprint": fingerprint_test_split(data),
                # the same by content: what a continuation from another folder compares
                "test_content": test_split_content(data),
                # where its searches and MLflow runs are, compared on continuation
                "storage": storage_root(cfg.storage),
                "tracking_uri": uri,
                "stages": {},
            }
        )
        _save_state(cfg, state)
    else:
        # a continued pipeline: its run was KILLED (Ctrl-C), FAILED or FINISHED before
        client.update_run(state["pipeline_run_id"], status="RUNNING")
        test_fp, test_content = fingerprint_test_split(data), test_split_content(data)
        for note in refresh_state(cfg, state, test_fp, truth is not None, test_content):
            log.warning("%s", note)
        # a state of an older bldseg: record where it is (check_continuation found it here)
        state.setdefault("storage", storage_root(cfg.storage))
        state.setdefault("tracking_uri", uri)
        # the same data (check_continuation): their fingerprint and decoding rules now, and
        # the content digest a state of an older bldseg lacks, so that a later bldseg update
        # that decodes them the same is told apart from other data
        state.update(data_record(data.train.fingerprint, data.train.content))
        # where the same data are read from now (check_continuation let another folder of the
        # same content through): the report and a later continuation name this one
        state.setdefault("config", {})["data"] = cfg.data
        _save_state(cfg, state)
    pipeline_run = state["pipeline_run_id"]
    # a damaged stage search is refused here: the pipeline run is FAILED, not left RUNNING
    with _stage(client, pipeline_run, "the check of the recorded stages"):
        _repair_state(cfg, state, storage)

    # 1-3. the three searches, each starting from the best config so far
    base = dict(cfg.base)
    previous_run = pipeline_run
    incumbent: str | None = None  # the stage whose best configuration is the best so far
    best_val = float("-inf")
    for stage, space in STAGES:
        done = state["stages"].get(stage)
        if done is None:
            tags = {"bldseg.pipeline_run_id": pipeline_run, "bldseg.previous_run_id": previous_run}
            spec = stage_spec(cfg, stage, space, base, uri, tags)
            stopped: SearchInterrupted | None = None  # Ctrl-C after the search had finished
            with _stage(client, pipeline_run, f"search {stage}"):
                folder = storage / spec.name
                if folder.exists():  # resumed: refused in the pipeline's words where damaged
                    check_stage_search(cfg, stage, folder, resumed=True)
                try:
                    result = run_search(spec)
                except SearchInterrupted as e:
                    if e.result is None:  # trials left unfinished: the stage is not done
                        raise
                    # Every trial had ended: the stage is done and recorded as any other, and
                    # the pipeline stops before the next one, as the user asked.
                    result, stopped = e.result, e
                if not result.n_completed:
                    raise RuntimeError(
                        f"stage {stage}: no trial of {result.name} completed; "
                        f"{result.first_failure}"
                    )
                unfinished = unfinished_trials(
                    result.table, _search_trials(result.path, cfg.trials)
                )
                if unfinished is not None:
                    raise RuntimeError(
                        f"stage {stage}: the search {result.name} ended before it finished "
                        f"({unfinished}), e.g. interrupted; run the same command again to "
                        "resume it"
                    )
            done = {
                "name": result.name,
                "path": str(result.path),
                "parent_run_id": result.parent_run_id,
                "wall_s": result.wall_s,
                "overhead": result.overhead,
                "best_config": best_config(result.table),
                "best": {k: v for k, v in result.best.items() if not k.startswith("config/")},
                "started_from": incumbent,
            }
            state["stages"][stage] = done
            _save_state(cfg, state)
            if stopped is not None:
                log.warning(
                    "interrupted after search %s had finished: it is recorded as done; run the "
                    "same command again to continue with the next stage",
                    stage,
                )
                _terminate(client, pipeline_run, "KILLED")
                raise stopped
        carried = carries_forward(done, best_val)
        if done.get("carried_forward") != carried:
            done["carried_forward"] = carried  # derived: recorded for the report
            _save_state(cfg, state)
        if carried:
            base.update(done["best_config"])
            best_val, incumbent = float(done["best"][METRIC]), stage
        else:
            log.warning(
                "%s: its best validation Dice %.4f is not above %s's %.4f, so its "
                "configuration is not carried forward: the best so far stays %s's",
                stage,
                float(done["best"][METRIC]),
                incumbent,
                best_val,
                incumbent,
            )
        previous_run = done["parent_run_id"]

    # 4. held-out test maps of every trained model (the synthetic world has test truth)
    # the ensemble library's entries: a K-fold run is one (its folds are not models of their own)
    runs = find_runs(storage) if any(storage.rglob(VAL_FILE)) else []
    if truth is not None:
        with _stage(client, pipeline_run, "test library"):
            for r in runs:
                write_test_library(r, data, truth)
    else:
        # No truth to make them with: maps of another test split (a test.csv replaced since)
        # would be scored by the ensemble search, and reported, as this split's.
        for r in runs:
            remove_stale_test_library(r, data)

    # 5. ensemble search over every trial's saved model
    if "ensemble" not in state:
        with _stage(client, pipeline_run, "ensemble search"):
            sizes = ensemble_sizes(cfg, len(runs), storage)
            ens = run_ensemble(
                EnsembleConfig(
                    runs=str(storage),
                    k=sizes,
                    out=str(out / "ensemble"),
                    tracking_uri=uri,
                    experiment=cfg.name,
                    parent_run_id=pipeline_run,
                    workers=cfg.ensemble_workers,
                    seed=cfg.seed,
                )
            )
        state["ensemble"] = {
            "best": ens.best,
            "best_single": ens.best_single,
            "gain": ens.gain,
            "decision": ens.decision,
            "threshold_range": list(ens.threshold_range),
            "widened": ens.widened,
            "files": ens.files,
            "mlflow_run_id": ens.mlflow_run_id,
            "seconds": ens.seconds,
            # why the models' test maps were not scored (None: scored, or none were made)
            "test_left_out": ens.test_left_out,
        }
        _save_state(cfg, state)

    # 6. submission (ensemble or best single model, see the decision), scored where truth exists
    if "predict" not in state and data.test is not None:
        files = state["ensemble"]["files"]
        with _stage(client, pipeline_run, "prediction"):
            spec = EnsembleSpec.load(files.get("submit", files["spec"]))
            pred = predict_cache(spec, data.test, batch_size=PREDICT_BATCH, progress=False)
            sub = out / "submission.csv"
            write_submission(data.test.ids, pred, sub)
            score, interval = (
                score_submission(data.test_truth_csv, sub, data.test)
                if data.test_truth_csv
                else (None, {})
            )
            run = client.create_run(
                state["experiment_id"],
                run_name="predict",
                tags={
                    tracking.PARENT_TAG: pipeline_run,
                    "bldseg.job": "predict",
                    "bldseg.previous_run_id": state["ensemble"]["mlflow_run_id"] or "",
                },
            )
            try:
                if score is not None:
                    tracking.log_metrics(client, run.info.run_id, {"test_dice": score}, step=0)
                tracking.log_artifacts(client, run.info.run_id, [sub])
            except BaseException as e:  # Ctrl-C included: the run must not stay RUNNING
                status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
                _terminate(client, run.info.run_id, status)
                raise
            client.set_terminated(run.info.run_id)
        state["predict"] = {
            "submission": str(sub),
            "test_dice": score,
            "test_interval": interval,
            "submitted": state["ensemble"].get("decision", {}).get("submit", "ensemble"),
            "members": len(spec.checkpoints),
            # the vote rule decides by its members' own thresholds: no ensemble threshold
            # (as bldseg predict's scores.json records it)
            "threshold": None if spec.rule == "vote" else spec.threshold,
            **({"votes": spec.votes} if spec.rule == "vote" else {}),
            "mlflow_run_id": run.info.run_id,
        }
        _save_state(cfg, state)

    # 7. per-stage best single models on held-out data, then the report
    with _stage(client, pipeline_run, "report"):
        # MLflow: the pipeline run names its current ensemble and predict runs, and those a
        # redo replaced say so (each call: a call that failed before here leaves none untold)
        for kind in ("ensemble", "predict"):
            current = (state.get(kind) or {}).get("mlflow_run_id")
            if current:
                supersede_runs(client, state, kind, current)
        if truth is not None:
            for info in state["stages"].values():
                run_dir = Path(info["best"]["run_dir"])
                b = info["best"]
                best_row = best_epoch_row(run_dir)
                info["test"] = _single_test_scores(
                    run_dir,
                    truth,
                    {"05": 0.5, "sweep": b["val_thr_best"], "youden": best_row["val_thr_youden"]},
                )
                info["val_thresholds"] = {
                    k: best_row.get(k, 0.0)  # val_thr_widened: absent in older runs' rows
                    for k in (
                        "val_dice_05",
                        "val_dice_best",
                        "val_dice_youden",
                        "val_thr_best",
                        "val_thr_youden",
                        "val_thr_widened",
                    )
                }
        state["wall_s_last_call"] = time.perf_counter() - t_start
        report = write_report(state, out, truth is not None)
        # REPORT.md links its plots as report/<name>.png: they go to that artifact folder, so
        # the report the MLflow UI (or a download) shows finds them
        tracking.log_artifacts(client, pipeline_run, [report])
        tracking.log_artifacts(
            client, pipeline_run, sorted((out / REPORT_ASSETS).glob("*.png")), REPORT_ASSETS
        )
    state["report"] = str(report)
    _save_state(cfg, state)
    client.set_terminated(pipeline_run)
    return state
