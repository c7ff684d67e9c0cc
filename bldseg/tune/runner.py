"""One runner for every search: Ray Tune trials of :func:`bldseg.train.fit`, logged to MLflow.

    result = run_search(SearchSpec(space="augmentation", trials=8, epochs=8))

* Searcher: ``OptunaSearch`` over a define-by-run space from ``tune_spaces`` (TPE, or
  Optuna's random sampler for ``search="random"``); scheduler: ASHA (early stopping) or FIFO.
* The dataset cache is built once on the driver; trials open the same memory-mapped files.
* Each trial reports per-epoch metrics and a checkpoint (``last.pt`` + the best model and its
  validation maps); a failed trial is retried from its checkpoint; ``resume=True`` continues an
  interrupted search (``Tuner.restore``) without re-running finished trials.
* MLflow: one experiment per search, a parent run for the search, one child run per trial
  (found again on retry/resume, never duplicated). A driver-side callback closes the child
  runs of trials that ASHA stopped or that errored.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from bldseg.data.cache import DatasetCache
from bldseg.data.prepare import DEFAULT_DATA_ROOT, DataOptions, PreparedData, prepare_data
from bldseg.train.config import RunConfig
from bldseg.tune import tracking

log = logging.getLogger(__name__)

METRIC = "val_dice_best"  # what the searcher and ASHA optimise (validation Dice, best threshold)
CHECKPOINT_FILES = ("last.pt", "best.pt", "val_probs.npz", "history.json")
# Names inside Tune checkpoints: prefixed, so that a checkpoint folder never looks like a run
# folder to the ensemble search (which collects every folder holding val_probs.npz).
CKPT_PREFIX = "ckpt_"
META_FILE = "bldseg_search.json"


@dataclass
class SearchSpec:
    """A search: what to vary, how long, where results and logs go."""

    space: str = "augmentation"  # a name from tune_spaces.SPACES
    name: str | None = None  # experiment name; default "<space>-<timestamp>"
    base: dict[str, Any] = field(default_factory=dict)  # flat RunConfig values fixed for all trials
    trials: int = 8  # number of trials
    epochs: int = 8  # epochs per trial (ASHA's max_t)
    cpus_per_trial: float = 1.0  # CPUs reserved per trial
    gpus_per_trial: float = 0.0  # GPUs per trial (fractions share a GPU)
    search: str = "optuna"  # "optuna" (TPE) or "random"
    scheduler: str = "asha"  # "asha" (early stopping) or "fifo"
    grace_period: int = 2  # ASHA: epochs every trial runs before it can be stopped
    storage: str = "runs"  # results folder (shared storage on a cluster)
    tracking_uri: str | None = None  # MLflow URI; default sqlite:////<project>/mlflow.db
    address: str | None = None  # Ray cluster address; None: start or join a local Ray
    resume: bool = False  # continue the named (or latest) interrupted search
    seed: int = 0  # searcher seed
    data: str | None = None  # dataset folder or cache; None: the built-in synthetic world
    data_options: DataOptions = field(default_factory=DataOptions)  # folder layout, decoding
    data_root: str = str(DEFAULT_DATA_ROOT)  # caches and the synthetic world
    max_failures: int = 1  # retries of a failed trial from its checkpoint
    max_concurrent: int = 0  # 0: as many as resources allow
    project_dir: str = "."  # where mlflow.db / mlartifacts go by default
    parent_tags: dict[str, str] = field(default_factory=dict)  # extra tags of the parent run


@dataclass
class SearchResult:
    """What a search produced."""

    name: str
    path: Path  # the experiment folder under storage
    table: pd.DataFrame  # one row per trial
    best: dict[str, Any]  # the best trial's row
    parent_run_id: str
    tracking_uri: str
    wall_s: float
    train_s: float  # sum over trials of their epochs' wall time
    slots: int  # trials that could run at once
    ray_address: str  # the Ray cluster the trials ran on
    ideal_s: float  # the same trials' epochs scheduled with no orchestration cost

    @property
    def orchestration_overhead(self) -> float:
        """Share of the wall time added by Ray, MLflow and start-up (see ideal_wall)."""
        return max(0.0, 1.0 - self.ideal_s / self.wall_s)

    @property
    def overhead(self) -> float:
        """Share of the slots' wall time not spent in trial epochs (see overhead_fraction)."""
        return overhead_fraction(self.wall_s, self.train_s, self.slots)


def get_space(name: str):
    """The define-by-run function registered as ``name`` in ``tune_spaces``."""
    from tune_spaces import SPACES

    if name not in SPACES:
        raise ValueError(f"unknown search space {name!r}; known: {sorted(SPACES)}")
    return SPACES[name]


def validate_space(space, base: dict[str, Any], samples: int = 16, seed: int = 0) -> None:
    """Samples a space and builds a RunConfig from each sample, before any trial starts.

    Raises:
        ValueError: A suggested key is not a config key, or a value is invalid; the message
            names the parameter and the space.
    """
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    name = getattr(space, "__module__", str(space))
    for _ in range(samples):
        trial = study.ask()
        try:
            constants = space(trial) or {}
        except Exception as e:
            raise ValueError(f"search space {name} failed while sampling: {e}") from e
        sample = {**trial.params, **constants}
        try:
            RunConfig.from_flat({**base, **sample})
        except (TypeError, ValueError) as e:
            raise ValueError(f"search space {name} is invalid: {e} (sample: {sample})") from e
        study.tell(trial, 0.0)


def _make_searcher(spec: SearchSpec):
    from ray.tune.search.optuna import OptunaSearch

    if spec.search == "optuna":
        sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=min(4, spec.trials))
    elif spec.search == "random":
        sampler = optuna.samplers.RandomSampler(seed=spec.seed)
    else:
        raise ValueError(f"--search {spec.search!r}: use optuna or random")
    return OptunaSearch(space=get_space(spec.space), metric=METRIC, mode="max", sampler=sampler)


def _make_scheduler(spec: SearchSpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if spec.scheduler == "asha":
        return ASHAScheduler(
            metric=METRIC,
            mode="max",
            time_attr="training_iteration",
            max_t=spec.epochs,
            grace_period=min(spec.grace_period, spec.epochs),
            reduction_factor=2,
        )
    if spec.scheduler == "fifo":
        return FIFOScheduler()
    raise ValueError(f"--scheduler {spec.scheduler!r}: use asha or fifo")


def _data_paths(data: PreparedData) -> dict[str, str | None]:
    return {
        "root": str(data.root),
        "train": str(data.train.root),
        "test": str(data.test.root) if data.test else None,
        "truth": str(data.test_truth_csv) if data.test_truth_csv else None,
        "clean": str(data.clean_train_csv) if data.clean_train_csv else None,
    }


def _open_data(paths: dict[str, str | None]) -> PreparedData:
    # O(1): the driver built the caches; trials only map the files.
    return PreparedData(
        root=Path(paths["root"]),
        train=DatasetCache(paths["train"]),
        test=DatasetCache(paths["test"]) if paths["test"] else None,
        test_truth_csv=Path(paths["truth"]) if paths["truth"] else None,
        clean_train_csv=Path(paths["clean"]) if paths["clean"] else None,
    )


def log_run_artifacts(client, run_id: str, run_dir: Path) -> None:
    """Logs a trial folder's plots (under ``plots/``), records, best model and val maps."""
    tracking.log_artifacts(client, run_id, sorted((run_dir / "plots").glob("*.png")), "plots")
    tracking.log_artifacts(
        client,
        run_id,
        [
            run_dir / n
            for n in (
                "augmentation.json",
                "history.json",
                "summary.json",
                "status.json",
                "val_probs.npz",
                "best.pt",
            )
        ],
    )


def trial_run_dir(exp_dir: str | os.PathLike, trial_id: str) -> Path:
    """Where a trial's run folder lives: in the search's results folder (shared storage on a
    cluster), not in Ray's per-session scratch space, so the ensemble search finds it later."""
    return Path(exp_dir) / f"trial_{trial_id}" / "run"


def trial_fn(
    config: dict[str, Any],
    *,
    base: dict[str, Any],
    data_paths: dict,
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str,
    tags: dict[str, str],
    threads: int,
    exp_dir: str,
) -> None:
    """The Ray Tune trainable: one :func:`fit` whose epochs are reported to Tune and MLflow."""
    import torch
    from ray import tune
    from ray.tune import Checkpoint

    from bldseg.train.engine import fit

    torch.set_num_threads(max(1, threads))
    ctx = tune.get_context()
    trial_id, trial_name = ctx.get_trial_id(), ctx.get_trial_name()
    cfg = RunConfig.from_flat({**base, **config})
    run_dir = trial_run_dir(exp_dir, trial_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = tune.get_checkpoint()
    if ckpt is not None:  # retried or resumed: continue from the last reported epoch
        with ckpt.as_directory() as d:
            for name in CHECKPOINT_FILES:
                if (Path(d) / (CKPT_PREFIX + name)).exists():
                    shutil.copy2(Path(d) / (CKPT_PREFIX + name), run_dir / name)

    client = tracking.MlflowClient(tracking_uri=tracking_uri)
    run_id, created = tracking.get_or_create_child_run(
        client,
        experiment_id,
        parent_run_id,
        trial_id,
        trial_name,
        {**tags, "bldseg.trial_dir": str(run_dir.parent), "model": cfg.model},
    )
    if created:
        tracking.log_params(client, run_id, cfg.to_flat())

    def on_epoch_end(row: dict[str, Any], out: Path) -> None:
        tracking.log_metrics(client, run_id, row, step=row["epoch"])
        with tempfile.TemporaryDirectory() as tmp:
            for name in CHECKPOINT_FILES:
                if (out / name).exists():
                    # a hard link, no copy: Tune persists the folder itself
                    os.link(out / name, Path(tmp) / (CKPT_PREFIX + name))
            tune.report({**row, "diverged": 0}, checkpoint=Checkpoint.from_directory(tmp))

    data = _open_data(data_paths)
    result = fit(cfg, run_dir, data=data, on_epoch_end=on_epoch_end, resume=True)
    summary = {
        "trial_id": trial_id,
        "status": result.status,
        "message": result.message,
        "epochs_run": len(result.history),
        "best": result.best,
        "run_dir": str(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    tracking.set_tags(
        client, run_id, {"bldseg.status": result.status, "bldseg.message": result.message[:500]}
    )
    log_run_artifacts(client, run_id, run_dir)
    if result.status == "diverged":
        client.set_terminated(run_id, status="FAILED")
        # a final report so the searcher learns this region is bad; Dice 0 is the honest floor
        tune.report({METRIC: 0.0, "diverged": 1, "epoch": len(result.history)})
    else:
        client.set_terminated(run_id, status="FINISHED")


def _closing_callback(tracking_uri: str, experiment_id: str, parent_run_id: str, exp_dir: str):
    """A Tune callback that closes the MLflow runs of trials stopped early or errored."""
    from ray.tune import Callback

    class CloseRuns(Callback):
        def _close(self, trial, status: str, reason: str) -> None:
            client = tracking.MlflowClient(tracking_uri=tracking_uri)
            run = tracking.find_child_run(client, experiment_id, parent_run_id, trial.trial_id)
            if run is None or run.info.status != "RUNNING":
                return  # finished by the trial itself (completed or diverged)
            run_dir = trial_run_dir(exp_dir, trial.trial_id)
            if run_dir.is_dir():
                from bldseg.train.plots import write_run_plots

                try:
                    write_run_plots(run_dir)
                except (OSError, ValueError) as e:  # partial files of a killed trial
                    log.warning("plots of %s: %s", trial.trial_id, e)
                log_run_artifacts(client, run.info.run_id, run_dir)
            tracking.set_tags(client, run.info.run_id, {"bldseg.status": reason})
            client.set_terminated(run.info.run_id, status=status)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._close(trial, "FINISHED", "early-stopped")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._close(trial, "FAILED", "error")

    return CloseRuns()


def _latest(storage: Path, space: str) -> Path:
    candidates = sorted(storage.glob(f"{space}-*/{META_FILE}"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"--resume: no {space} search under {storage}; pass --name")
    return candidates[-1].parent


def run_search(spec: SearchSpec) -> SearchResult:
    """Runs (or resumes) a search; returns its trial table and the best trial.

    Raises:
        RuntimeError: The MLflow tracking store is unreachable (before any trial starts).
        ValueError: An invalid space, base config or option (named).
    """
    import ray
    from ray import tune

    t0 = time.perf_counter()
    project = Path(spec.project_dir).resolve()
    storage = Path(spec.storage).resolve()
    uri = spec.tracking_uri or tracking.default_tracking_uri(project)
    client = tracking.check_tracking(uri)  # fail fast, before Ray or data

    if spec.resume:
        exp_dir = storage / spec.name if spec.name else _latest(storage, spec.space)
        meta = json.loads((exp_dir / META_FILE).read_text())
        name = exp_dir.name
        base = meta["base"]
        data_options = DataOptions.from_dict(meta["spec"].get("data_options") or {})
    else:
        name = spec.name or f"{spec.space}-{time.strftime('%Y%m%d-%H%M%S')}"
        exp_dir = storage / name
        if exp_dir.exists():
            raise ValueError(f"{exp_dir} exists: pass --resume to continue it, or a new --name")
        base = {**spec.base, "epochs": spec.epochs, "data": spec.data}
        data_options = spec.data_options
        RunConfig.from_flat(base)  # a bad fixed value fails here, naming it
    space = get_space(spec.space)
    validate_space(space, base)

    data = prepare_data(
        base.get("data"), options=data_options, data_root=spec.data_root, verbose=True
    )
    experiment_id = tracking.ensure_experiment(client, name, uri, project)
    if spec.resume:
        parent_run_id = meta["parent_run_id"]
        client.update_run(parent_run_id, status="RUNNING")
    else:
        parent = client.create_run(
            experiment_id,
            run_name=f"search:{name}",
            tags={
                "bldseg.kind": "search",
                "bldseg.space": spec.space,
                "git_commit": tracking.git_commit(project),
                "model": base.get("model", "default"),
                "data_fingerprint": data.train.fingerprint,
                **spec.parent_tags,
            },
        )
        parent_run_id = parent.info.run_id
        tracking.log_params(
            client,
            parent_run_id,
            {
                **{f"search.{k}": v for k, v in asdict(spec).items() if k != "base"},
                **{f"base.{k}": v for k, v in base.items()},
            },
        )
        exp_dir.mkdir(parents=True, exist_ok=True)
        (exp_dir / META_FILE).write_text(
            json.dumps(
                {
                    "parent_run_id": parent_run_id,
                    "experiment_id": experiment_id,
                    "base": base,
                    "tracking_uri": uri,
                    "spec": asdict(spec),
                },
                indent=2,
                default=str,
            )
        )

    if not ray.is_initialized():
        address = spec.address or os.environ.get("RAY_ADDRESS")
        ray.init(address=address, include_dashboard=False, log_to_driver=False)

    tags = {
        "git_commit": tracking.git_commit(project),
        "data_fingerprint": data.train.fingerprint,
        "bldseg.space": spec.space,
    }
    trainable = tune.with_resources(
        tune.with_parameters(
            trial_fn,
            base=base,
            data_paths=_data_paths(data),
            tracking_uri=uri,
            experiment_id=experiment_id,
            parent_run_id=parent_run_id,
            tags=tags,
            threads=max(1, int(spec.cpus_per_trial)),
            exp_dir=str(exp_dir),
        ),
        {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial},
    )
    callbacks = [_closing_callback(uri, experiment_id, parent_run_id, str(exp_dir))]
    if spec.resume and tune.Tuner.can_restore(str(exp_dir)):
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=_make_searcher(spec),
                scheduler=_make_scheduler(spec),
                num_samples=spec.trials,
                max_concurrent_trials=spec.max_concurrent or None,
                # one worker process serves several trials: torch import, op load and model
                # build happen once per slot instead of once per trial
                reuse_actors=True,
                trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
                trial_name_creator=lambda t: f"trial_{t.trial_id}",
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(storage),
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                # two, not one: each trial keeps its latest checkpoint even while the next is
                # being written, and Tune snapshots its state half as often
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                callbacks=callbacks,
                verbose=1,
            ),
        )
    # trial slots the cluster offers: the denominator of the overhead figure
    slots = int(ray.cluster_resources().get("CPU", 1) // max(spec.cpus_per_trial, 1e-9))
    if spec.max_concurrent:
        slots = min(slots, spec.max_concurrent)
    grid = tuner.fit()
    wall = time.perf_counter() - t0
    table = trial_table(grid, spec.epochs)
    train_s = float(table["train_s"].sum()) if len(table) else 0.0
    best = table.iloc[0].to_dict() if len(table) else {}
    slots = max(1, min(slots, len(table)))
    _finish_parent(client, parent_run_id, exp_dir, table, wall, train_s, slots)
    address = ray.get_runtime_context().gcs_address
    ideal = ideal_wall(table, slots) if len(table) else 0.0
    return SearchResult(
        name, exp_dir, table, best, parent_run_id, uri, wall, train_s, slots, address, ideal
    )


def trial_table(grid, max_epochs: int) -> pd.DataFrame:
    """One row per trial: searched config, best Dice and threshold, epochs run, status."""
    rows = []
    for r in grid:
        df = r.metrics_dataframe if r.metrics_dataframe is not None else pd.DataFrame()
        cfg = {k: v for k, v in (r.config or {}).items()}
        trial_id = (r.metrics or {}).get("trial_id") or Path(r.path).name.removeprefix("trial_")
        row: dict[str, Any] = {"trial_id": trial_id}
        diverged = bool(len(df) and "diverged" in df and df["diverged"].fillna(0).max() > 0)
        good = df[df.get("diverged", 0) == 0] if len(df) and "diverged" in df else df
        if len(good) and METRIC in good:
            i = good[METRIC].idxmax()
            row.update(
                {
                    METRIC: good.loc[i, METRIC],
                    "val_thr_best": good.loc[i, "val_thr_best"],
                    "val_dice_05": good.loc[i, "val_dice_05"],
                    "best_epoch": int(good.loc[i, "epoch"]),
                }
            )
        else:
            row.update(
                {
                    METRIC: 0.0,
                    "val_thr_best": float("nan"),
                    "val_dice_05": float("nan"),
                    "best_epoch": 0,
                }
            )
        epochs = int(good["epoch"].max()) if len(good) and "epoch" in good else 0
        row["epochs_run"] = epochs
        row["train_s"] = float(good["epoch_s"].sum()) if len(good) and "epoch_s" in good else 0.0
        # the trial's own clock (Ray): train_s plus reporting, checkpointing and MLflow logging
        row["trial_s"] = float(df["time_total_s"].max()) if "time_total_s" in df else 0.0
        first = df.iloc[0] if len(df) else None
        row["started"] = (
            float(first["timestamp"] - first["time_this_iter_s"]) if first is not None else 0.0
        )
        if r.error is not None:
            status = "error"
        elif diverged:
            status = "diverged"
        elif epochs < max_epochs:
            status = "early-stopped"
        else:
            status = "completed"
        row["status"] = status
        row["run_dir"] = str(trial_run_dir(Path(r.path).parent, trial_id))
        row.update({f"config/{k}": v for k, v in cfg.items()})
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values(METRIC, ascending=False, kind="stable").reset_index(drop=True)
    return df


def overhead_fraction(wall_s: float, train_s: float, slots: int) -> float:
    """Share of the trial slots' wall time not spent in trial epochs (orchestration, start-up,
    and slots left idle while the last trials finish)."""
    return max(0.0, 1.0 - train_s / (wall_s * max(1, slots)))


def ideal_wall(table: pd.DataFrame, slots: int) -> float:
    """Wall time of the same trials with zero orchestration cost: each trial's epochs only,
    started in the order Tune started them, each on the first free slot.

    ``wall - ideal_wall`` is what Ray, MLflow and process start-up added; slots idle because
    ASHA's last promoted trial runs alone are part of the ideal schedule, not of the overhead.
    """
    free = [0.0] * max(1, slots)
    for train_s in table.sort_values("started", kind="stable")["train_s"]:
        i = free.index(min(free))
        free[i] += float(train_s)
    return max(free)


def _finish_parent(
    client,
    parent_run_id: str,
    exp_dir: Path,
    table: pd.DataFrame,
    wall: float,
    train_s: float,
    slots: int,
) -> None:
    """Trial table, summary plot and overhead figures on the parent run."""
    from bldseg.tune.report import plot_trials

    csv = exp_dir / "trials.csv"
    tmp = exp_dir / "trials.tmp.csv"
    table.to_csv(tmp, index=False)
    os.replace(tmp, csv)
    files = [csv]
    if len(table):
        files.append(plot_trials(table, exp_dir / "trials.png", METRIC))
    tracking.log_metrics(
        client,
        parent_run_id,
        {
            "wall_s": wall,
            "train_s": train_s,
            "slots": slots,
            "overhead_frac": overhead_fraction(wall, train_s, slots),
            f"best_{METRIC}": float(table[METRIC].max()) if len(table) else 0.0,
            "trials": len(table),
        },
        step=0,
    )
    tracking.log_artifacts(client, parent_run_id, files)
    client.set_terminated(parent_run_id, status="FINISHED")
