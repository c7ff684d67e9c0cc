"""The whole competition week as one resumable run.

    data -> cache -> tune_aug -> tune_sched -> tune_tau -> ensemble search -> predict -> score
                                                                                  -> REPORT.md

Each search starts from the best configuration found so far. Every stage records its output in
``<out>/pipeline_state.json``; a stage whose output exists is skipped, and an interrupted search
is resumed, so re-running the same command continues instead of redoing work. MLflow: a
pipeline experiment with a parent run; each search's parent run carries tags linking it to the
pipeline run and to the previous stage's run; the ensemble search and the prediction are child
runs of the pipeline run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bldseg import metrics
from bldseg.data.prepare import DEFAULT_DATA_ROOT, DataOptions, PreparedData, prepare_data
from bldseg.data.rle import rle_decode
from bldseg.predict import (
    EnsembleSpec,
    image_loader,
    load_checkpoint,
    predict_cache,
    write_submission,
)
from bldseg.train.engine import predict_probs
from bldseg.tune import tracking
from bldseg.tune.runner import METRIC, SearchSpec, run_search

log = logging.getLogger(__name__)

STAGES = (("tune_aug", "augmentation"), ("tune_sched", "scheduler"), ("tune_tau", "coteaching"))
TEST_FILE = "test_probs.npz"


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


def _state_path(cfg: PipelineConfig) -> Path:
    return Path(cfg.out) / cfg.name / "pipeline_state.json"


def _load_state(cfg: PipelineConfig) -> dict:
    p = _state_path(cfg)
    return json.loads(p.read_text()) if p.exists() else {}


def _save_state(cfg: PipelineConfig, state: dict) -> None:
    p = _state_path(cfg)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str))
    os.replace(tmp, p)


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


def test_truth(data: PreparedData) -> np.ndarray:
    """Held-out test masks in test-cache order: (N, S, S) bool."""
    df = pd.read_csv(data.test_truth_csv, dtype={"mask_rle": str}).set_index("img_id")
    return np.stack(
        [
            rle_decode(df.loc[i, "mask_rle"], (int(df.loc[i, "height"]), int(df.loc[i, "width"])))
            for i in data.test.ids
        ]
    ).astype(bool)


def write_test_library(run_dir: Path, data: PreparedData, truth: np.ndarray) -> Path:
    """``test_probs.npz`` next to a model's ``val_probs.npz``: its held-out test maps."""
    path = run_dir / TEST_FILE
    if path.exists():
        return path
    model, _, _ = load_checkpoint(run_dir / "best.pt")
    probs = predict_probs(model, image_loader(data.test, 32), next(model.parameters()).device)
    tmp = path.with_name("test_probs.tmp.npz")
    ids = np.array(data.test.ids)
    np.savez(
        tmp,
        probs=probs,
        truth=truth.astype(np.uint8),
        tile_ids=ids,
        image_ids=ids,
        tile_yx=np.zeros((len(ids), 2), np.int64),
    )
    os.replace(tmp, path)
    return path


def _single_test_scores(run_dir: Path, truth: np.ndarray, thresholds: dict[str, float]) -> dict:
    """Held-out test Dice of one model at several thresholds, from its test library."""
    z = np.load(run_dir / TEST_FILE)
    return {
        f"test_dice_{name}": metrics.competition_score(
            z["probs"] >= metrics.level_from_threshold(t), truth
        )
        for name, t in thresholds.items()
    }


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Runs (or continues) every stage; returns the pipeline state (also written as JSON)."""
    from bldseg.ensemble.run import SearchConfig as EnsembleConfig
    from bldseg.ensemble.run import run_search as run_ensemble
    from bldseg.report import write_report

    t_start = time.perf_counter()
    state = _load_state(cfg)
    out = Path(cfg.out) / cfg.name
    storage = Path(cfg.storage) / cfg.name
    uri = cfg.tracking_uri or tracking.default_tracking_uri(".")
    client = tracking.check_tracking(uri)

    # 0. data + cache (idempotent: an up-to-date cache is only opened)
    data = prepare_data(cfg.data, options=cfg.data_options, data_root=cfg.data_root, verbose=True)
    if "pipeline_run_id" not in state:
        exp_id = tracking.ensure_experiment(client, cfg.name, uri, ".")
        run = client.create_run(
            exp_id,
            run_name=f"pipeline:{cfg.name}",
            tags={
                "bldseg.kind": "pipeline",
                "git_commit": tracking.git_commit("."),
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
                "stages": {},
            }
        )
        _save_state(cfg, state)
    pipeline_run = state["pipeline_run_id"]

    # 1-3. the three searches, each starting from the best config so far
    base = dict(cfg.base)
    previous_run = pipeline_run
    for stage, space in STAGES:
        done = state["stages"].get(stage)
        if done is None:
            name = f"{cfg.name}-{stage}"
            spec = SearchSpec(
                space=space,
                name=name,
                base=base,
                trials=cfg.trials,
                epochs=cfg.epochs,
                cpus_per_trial=cfg.cpus_per_trial,
                gpus_per_trial=cfg.gpus_per_trial,
                storage=str(storage),
                tracking_uri=uri,
                address=cfg.address,
                resume=(storage / name / "bldseg_search.json").exists(),
                seed=cfg.seed,
                data=cfg.data,
                data_options=cfg.data_options,
                data_root=cfg.data_root,
                parent_tags={
                    "bldseg.pipeline_run_id": pipeline_run,
                    "bldseg.previous_run_id": previous_run,
                },
            )
            result = run_search(spec)
            done = {
                "name": result.name,
                "path": str(result.path),
                "parent_run_id": result.parent_run_id,
                "wall_s": result.wall_s,
                "overhead": result.overhead,
                "best_config": best_config(result.table),
                "best": {k: v for k, v in result.best.items() if not k.startswith("config/")},
            }
            state["stages"][stage] = done
            _save_state(cfg, state)
        base.update(done["best_config"])
        previous_run = done["parent_run_id"]

    # 4. held-out test maps of every trained model (the synthetic world has test truth)
    truth = test_truth(data) if data.test is not None and data.test_truth_csv else None
    runs = sorted(p.parent for p in storage.rglob("best.pt"))
    if truth is not None:
        for r in runs:
            write_test_library(r, data, truth)

    # 5. ensemble search over every trial's saved model
    if "ensemble" not in state:
        ens = run_ensemble(
            EnsembleConfig(
                runs=str(storage),
                k=list(range(cfg.k_min, min(cfg.k_max, len(runs)) + 1)),
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
            "files": ens.files,
            "mlflow_run_id": ens.mlflow_run_id,
            "seconds": ens.seconds,
        }
        _save_state(cfg, state)

    # 6. submission from the chosen ensemble, scored where ground truth exists
    if "predict" not in state and data.test is not None:
        spec = EnsembleSpec.load(state["ensemble"]["files"]["spec"])
        pred = predict_cache(spec, data.test, progress=False)
        sub = out / "submission.csv"
        write_submission(data.test.ids, pred, sub)
        score = metrics.score_csv(data.test_truth_csv, sub) if data.test_truth_csv else None
        run = client.create_run(
            state["experiment_id"],
            run_name="predict",
            tags={
                tracking.PARENT_TAG: pipeline_run,
                "bldseg.previous_run_id": state["ensemble"]["mlflow_run_id"] or "",
            },
        )
        if score is not None:
            tracking.log_metrics(client, run.info.run_id, {"test_dice": score}, step=0)
        tracking.log_artifacts(client, run.info.run_id, [sub])
        client.set_terminated(run.info.run_id)
        state["predict"] = {
            "submission": str(sub),
            "test_dice": score,
            "members": len(spec.checkpoints),
            "threshold": spec.threshold,
        }
        _save_state(cfg, state)

    # 7. per-stage best single models on held-out data, then the report
    if truth is not None:
        for info in state["stages"].values():
            run_dir = Path(info["best"]["run_dir"])
            b = info["best"]
            hist = json.loads((run_dir / "history.json").read_text())
            best_row = max(hist, key=lambda h: h["val_dice_best"])
            info["test"] = _single_test_scores(
                run_dir,
                truth,
                {"05": 0.5, "sweep": b["val_thr_best"], "youden": best_row["val_thr_youden"]},
            )
            info["val_thresholds"] = {
                k: best_row[k]
                for k in (
                    "val_dice_05",
                    "val_dice_best",
                    "val_dice_youden",
                    "val_thr_best",
                    "val_thr_youden",
                )
            }
    state["wall_s_last_call"] = time.perf_counter() - t_start
    _save_state(cfg, state)
    report = write_report(state, out, truth is not None)
    tracking.log_artifacts(client, pipeline_run, [report, *sorted((out / "report").glob("*.png"))])
    client.set_terminated(pipeline_run)
    state["report"] = str(report)
    _save_state(cfg, state)
    return state
