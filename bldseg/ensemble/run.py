"""The ensemble search job: library -> honest split -> search -> report, CSV, plots, MLflow, spec.

Honest evaluation: the validation tiles are split by source image into a *selection* half and
a *check* half. Ensembles and thresholds are chosen on the selection half only and reported on
both, next to the best single model (chosen the same way). A held-out test library of the same
models (``test_probs.npz`` next to each ``val_probs.npz``, e.g. on the synthetic world) is
scored too when present. The gap between the selection and the check Dice is the optimism of
the choice; the reference workflow reported only the former.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from bldseg import metrics
from bldseg.ensemble.library import ModelLibrary, find_runs, load_library, split_by_image
from bldseg.ensemble.search import (
    Ensemble,
    exhaustive_search,
    greedy_search,
    score_members,
)
from bldseg.predict import EnsembleSpec

__all__ = ["SearchConfig", "SearchSummary", "evaluate", "run_search"]


@dataclass
class SearchConfig:
    """Everything the ensemble search job needs; the CLI fills it from its arguments."""

    runs: str | None = None  # search results folder; run folders are found recursively
    models: list[str] = field(default_factory=list)  # or explicit run folders / npz files
    k: list[int] = field(default_factory=lambda: [6])  # ensemble sizes (exhaustive)
    lo: float = 0.30  # lowest threshold considered
    hi: float = 0.70  # highest threshold considered
    method: Literal["exhaustive", "greedy"] = "exhaustive"
    greedy_size: int = 10  # greedy: stop at this many members (with repetition)
    greedy_init: int = 0  # greedy: start from this many best single models
    kernel: Literal["native", "numpy"] = "native"  # exhaustive: compiled or reference kernel
    workers: int = 0  # concurrent Ray tasks; 0: in this process
    top: int = 20  # rows of the result table
    out: str = "ensemble_out"  # output folder
    selection_fraction: float = 0.5  # share of source images in the selection half
    seed: int = 0  # seed of the split by source image
    test_file: str = "test_probs.npz"  # held-out test library file next to val_probs.npz
    tracking_uri: str | None = None  # MLflow tracking URI; None: no MLflow run
    experiment: str = "ensemble_search"  # MLflow experiment name
    parent_run_id: str | None = None  # MLflow parent run (tag mlflow.parentRunId)
    progress: bool = True  # tqdm bars


@dataclass
class SearchSummary:
    """What the job found and where it wrote it."""

    best: dict  # the chosen ensemble: members, threshold, Dice on selection/check/test
    best_single: dict  # the best single model, reported the same way
    table: pd.DataFrame  # top rows
    files: dict[str, str]  # name -> path of every output file
    mlflow_run_id: str | None
    seconds: float


def evaluate(lib: ModelLibrary, members: tuple[int, ...], level: int) -> float:
    """The official score of an ensemble at a fixed level on a library's tiles."""
    total = np.zeros(lib.probs.shape[1:], dtype=np.uint16)
    for m in members:
        total += lib.probs[m]
    return metrics.competition_score(total >= level, lib.truth)


def _load(cfg: SearchConfig, file_name: str | None = None) -> ModelLibrary:
    kw = {"file_name": file_name} if file_name else {}
    if cfg.runs and cfg.models:
        raise ValueError("give either --runs or --models, not both")
    if cfg.runs:
        return load_library(find_runs(cfg.runs, **kw), root=cfg.runs, **kw)
    if cfg.models:
        return load_library(cfg.models, **kw)
    raise ValueError("no models: pass --runs <search results folder> or --models <paths>")


def _test_library(cfg: SearchConfig, lib: ModelLibrary) -> ModelLibrary | None:
    """The held-out test library of the same models, when every model has one."""
    files = [Path(s).parent / cfg.test_file for s in lib.sources]
    if not cfg.test_file or not all(f.is_file() for f in files):
        return None
    test = load_library(files)
    test.names = list(lib.names)
    return test


def _write_atomic(path: Path, write) -> Path:
    tmp = path.with_name(path.name + ".tmp" + path.suffix)
    write(tmp)
    os.replace(tmp, path)
    return path


def _row(e: Ensemble, lib, sel, chk, test) -> dict:
    row = {
        "k": e.k,
        "rank": e.rank,
        "members": "+".join(lib.names[m] for m in e.members),
        "member_ids": " ".join(str(m) for m in e.members),
        "level": e.level,
        "threshold": e.threshold,
        "selection_dice": e.score,
        "check_dice": evaluate(chk, e.members, e.level),
    }
    if test is not None:
        row["test_dice"] = evaluate(test, e.members, e.level)
    return row


def _plots(out: Path, per_k: dict, sel, chk, best: Ensemble, cfg: SearchConfig) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    ks = sorted(per_k)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ks, [per_k[k]["selection_dice"] for k in ks], "o-", label="selection (chosen on)")
    ax.plot(ks, [per_k[k]["check_dice"] for k in ks], "s--", label="check (held out)")
    ax.set_xlabel("ensemble size k")
    ax.set_ylabel("mean Dice (best ensemble of size k)")
    ax.set_xticks(ks)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    files["score_vs_k"] = str(
        _write_atomic(out / "score_vs_k.png", lambda p: fig.savefig(p, format="png", dpi=100))
    )
    plt.close(fig)

    mv = metrics.QUANT_MAX * best.k
    t = np.arange(mv + 1) / mv
    s_sel = score_members(sel.probs, sel.truth, best.members, cfg.lo, cfg.hi)[0]
    s_chk = score_members(chk.probs, chk.truth, best.members, cfg.lo, cfg.hi)[0]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(t, s_sel, label="selection")
    ax.plot(t, s_chk, label="check")
    ax.axvspan(cfg.lo, cfg.hi, color="grey", alpha=0.1, label="searched range")
    ax.axvline(best.threshold, color="k", ls=":", label=f"chosen {best.threshold:.4f}")
    ax.set_xlabel("threshold on the mean probability")
    ax.set_ylabel("mean Dice")
    ax.set_title(f"chosen ensemble (k={best.k})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    files["threshold_curve"] = str(
        _write_atomic(out / "threshold_curve.png", lambda p: fig.savefig(p, format="png", dpi=100))
    )
    plt.close(fig)
    return files


def _log_mlflow(cfg: SearchConfig, params: dict, scalars: dict, files: dict) -> str:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        location = None
        if not cfg.tracking_uri.startswith(("http://", "https://", "databricks")):
            # A database store has no artifact root of its own: an absolute file URI.
            location = (Path(cfg.out).resolve() / "mlartifacts").as_uri()
        exp_id = client.create_experiment(cfg.experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    tags = {"bldseg.job": "ensemble_search"}
    if cfg.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.parent_run_id
    run = client.create_run(exp_id, run_name=f"ensemble_{cfg.method}", tags=tags)
    rid = run.info.run_id
    try:
        ts = int(time.time() * 1000)
        client.log_batch(
            rid,
            params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())],
            metrics=[Metric(k, float(v), ts, 0) for k, v in sorted(scalars.items())],
            tags=[RunTag("bldseg.best_members", str(params.get("best_members", "")))],
        )
        for path in files.values():
            client.log_artifact(rid, path)
    except Exception:
        client.set_terminated(rid, status="FAILED")
        raise
    client.set_terminated(rid)
    return rid


def run_search(cfg: SearchConfig) -> SearchSummary:
    """Runs the whole job (see the module docstring) and writes its outputs to ``cfg.out``.

    Returns:
        The summary; ``files`` lists the CSV, plots, spec JSON and summary JSON.
    """
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    lib = _load(cfg)
    sel_idx, chk_idx = split_by_image(lib.image_ids, cfg.selection_fraction, cfg.seed)
    sel, chk = lib.subset(sel_idx), lib.subset(chk_idx)
    test = _test_library(cfg, lib)

    # Best single model, chosen on the selection half like the ensembles.
    singles, _ = exhaustive_search(sel, 1, cfg.lo, cfg.hi, top=1, method=cfg.kernel, progress=False)
    single = singles[0]
    if cfg.method == "exhaustive":
        top, per_k = exhaustive_search(
            sel,
            cfg.k,
            cfg.lo,
            cfg.hi,
            top=cfg.top,
            workers=cfg.workers,
            method=cfg.kernel,
            progress=cfg.progress,
        )
    elif cfg.method == "greedy":
        best_g, history = greedy_search(
            sel, cfg.greedy_size, cfg.lo, cfg.hi, init=cfg.greedy_init, progress=cfg.progress
        )
        top = sorted(history, key=lambda e: (-e.score, e.k))[: cfg.top]
        assert top[0] is best_g
        per_k = {e.k: e for e in history}
    else:
        raise ValueError(f"method must be 'exhaustive' or 'greedy', got {cfg.method!r}")
    per_k.setdefault(1, single)
    best = top[0]

    rows = [_row(e, lib, sel, chk, test) for e in top]
    table = pd.DataFrame(rows)
    table.insert(0, "position", np.arange(1, len(table) + 1))
    files = {
        "table": str(
            _write_atomic(out / "top_ensembles.csv", lambda p: table.to_csv(p, index=False))
        )
    }
    per_k_rows = {k: _row(e, lib, sel, chk, test) for k, e in per_k.items()}
    files.update(_plots(out, per_k_rows, sel, chk, best, cfg))

    spec = EnsembleSpec(
        checkpoints=[str(lib.checkpoints[m].resolve()) for m in best.members],
        weights=[],
        threshold=best.threshold,
    )
    spec_path = out / "best_ensemble.json"
    spec.save(spec_path)
    files["spec"] = str(spec_path)

    best_d = rows[0]
    single_d = _row(single, lib, sel, chk, test)
    summary = {
        "config": asdict(cfg),
        "n_models": lib.n_models,
        "n_tiles": {"selection": sel.n_tiles, "check": chk.n_tiles},
        "test_library": test is not None,
        "best": best_d,
        "best_single": single_d,
        "best_per_k": {str(k): v for k, v in sorted(per_k_rows.items())},
    }
    files["summary"] = str(
        _write_atomic(
            out / "summary.json",
            lambda p: p.write_text(json.dumps(summary, indent=2, default=str)),
        )
    )
    run_id = None
    if cfg.tracking_uri:
        params = {
            "method": cfg.method,
            "k": ",".join(map(str, cfg.k)),
            "lo": cfg.lo,
            "hi": cfg.hi,
            "n_models": lib.n_models,
            "n_tiles_selection": sel.n_tiles,
            "n_tiles_check": chk.n_tiles,
            "seed": cfg.seed,
            "best_members": best_d["members"],
            "best_threshold": best_d["threshold"],
            "best_single": single_d["members"],
        }
        scalars = {
            f"{who}_{split}_dice": d[f"{split}_dice"]
            for who, d in (("ensemble", best_d), ("single", single_d))
            for split in ("selection", "check", "test")
            if f"{split}_dice" in d
        }
        run_id = _log_mlflow(cfg, params, scalars, files)
    return SearchSummary(
        best=best_d,
        best_single=single_d,
        table=table,
        files=files,
        mlflow_run_id=run_id,
        seconds=time.perf_counter() - t0,
    )
