"""One runner for every search: Ray Tune trials of :func:`bldseg.train.fit`, logged to MLflow.

    result = run_search(SearchSpec(space="augmentation", trials=8, epochs=8))

* Searcher: ``OptunaSearch`` over a define-by-run space from ``tune_spaces`` (TPE, or
  Optuna's random sampler for ``search="random"``); scheduler: ASHA (early stopping) or FIFO.
  Tune's console table shows :data:`METRIC` and the best trial so far.
* The dataset cache is built once on the driver; trials open the same memory-mapped files.
* Each trial trains in its run folder ``<storage>/<name>/trial_<id>/run`` (``best.pt``,
  ``last.pt``, ``val_probs.npz``, ...), the only copy of its weights. Each epoch it reports its
  metrics and a Tune checkpoint that holds no weights, only the epoch it stands for
  (:data:`CKPT_FILE`): ``last.pt`` is the state to continue from. A trial that fails after
  its first checkpoint is retried from it (one that fails before is not: its start-up error
  would recur; those that depend on the data are checked before the search starts,
  :func:`check_trials_on_data`); ``resume=True`` continues an interrupted search
  (``Tuner.restore``) without re-running finished trials; either way the trial first
  re-reports the epochs its run folder holds beyond its Tune checkpoint. The results folder
  must therefore be one folder every node sees (shared storage on a cluster), as the ensemble
  search needs anyway, at one path: Tune's saved state holds it, so a resume refuses a folder
  moved since (:func:`check_resumed_folder`).
* A trial may end inside any ``tune.report``: ASHA stops it there, at a rung or at its last
  epoch, and the trial's code after that report never runs. So a trial writes everything that
  must survive *before* each report (``status.json``, ``summary.json``, its MLflow metrics
  with the ``best_*`` summary, flushed), and the driver finalises each trial when Tune ends it
  (:class:`_SearchDriver`): the truthful status (completed = trained every epoch, also when
  ASHA stopped it after its last one; early-stopped; diverged; error), the plots, and the MLflow
  run's status, tags and artifacts.
* Local Ray (no ``address``, no ``RAY_ADDRESS``) is started by bldseg and listens on
  127.0.0.1 only (:func:`init_ray`); joining a cluster is always explicit.
* MLflow: one experiment per project (:attr:`SearchSpec.experiment`), a parent run per search
  named after it (found again by ``--resume``) with the constant config as params, one child run
  per trial with only the searched params (found again on retry/resume, never duplicated). Calls
  go through :class:`bldseg.tune.tracking.Tracker`: a tracking server that dies mid-search is
  reported (once per trial) and the search goes on without it.
* K-fold trials (``base["folds"] = K``, ``--folds K``): a trial trains its configuration's K
  folds in lockstep inside its run folder (:func:`bldseg.train.folds.fit_folds`: ``fold<f>/``
  each, ``folds.json``), epoch e of every fold before epoch e + 1 of any, and reports per epoch
  the mean over folds of each metric: ASHA compares trials on the configuration's cross-
  validated score at equal epochs, as it compares holdout trials. Before each report the
  trial's out-of-fold ``val_probs.npz`` (each fold's best epoch so far) is rewritten and its
  Dice and threshold recorded in ``folds.json`` (``oof``), so a trial that ASHA stops leaves a
  whole library, covering every training image, and the threshold it predicts at. The trial
  table shows those out-of-fold scores for K-fold trials.
* Ctrl-C: Tune saves the experiment and returns; :func:`run_search` then marks the MLflow runs
  KILLED and raises :class:`SearchInterrupted` (a ``KeyboardInterrupt``), so a partial search is
  never taken for a finished one. ``resume=True`` continues it. A Ctrl-C after the last trial
  ended finishes the search as usual, then raises :class:`SearchInterrupted` with the result,
  so that the caller stops too (a pipeline before its next stage). Each session's wall time is
  added to the search's record (:data:`META_FILE`), so a resumed search's wall time and
  overhead figures are over all its sessions, as its trials' epochs are.
* A lost cluster (its head's GCS port stops accepting connections for
  :data:`CLUSTER_LOST_AFTER_S`): Ray would end the driver process itself after 60 s, exit 1,
  leaving the MLflow runs RUNNING. :class:`ClusterWatch` acts first: it marks the runs KILLED,
  records the session and ends the process with :data:`EXIT_CLUSTER_LOST`, saying how to resume.
* A search in which no trial completed says so: :attr:`SearchResult.n_completed` is 0,
  :attr:`SearchResult.best` is empty and :attr:`SearchResult.first_failure` says why.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import numbers
import os
import pickle
import re
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import optuna
import pandas as pd
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from bldseg.commands import EXIT_INTERRUPTED
from bldseg.data import readers
from bldseg.data.cache import DatasetCache
from bldseg.data.prepare import (
    DEFAULT_DATA_ROOT,
    DataOptions,
    PreparedData,
    absolute_folders,
    detect_data,
    folder_layout,
    prepare_data,
    without_unread_options,
)
from bldseg.io import file_lock, write_json
from bldseg.train.config import RunConfig, config_sections
from bldseg.train.folds import FOLDS_FILE
from bldseg.train.resume_checks import check_same_data
from bldseg.tune import tracking

log = logging.getLogger(__name__)

METRIC = "val_dice_best"  # what ASHA compares at its rungs (validation Dice, best threshold)
# What the searcher (Optuna) is told a trial scored: the best epoch so far, as the table, the
# trial's best.pt and the ensemble rank trials (Tune hands the searcher the last report).
SEARCHER_METRIC = "val_dice_max"
# Reported first: Tune's console table shows the first four metrics a trial reports. The best
# epoch so far first, the value bldseg's own table ranks trials by.
CONSOLE_METRICS = (SEARCHER_METRIC, METRIC, "epoch", "train_loss")
# The one file of a trial's Tune checkpoint: {"epoch": n, "trial_id": ...}. The weights stay in
# the run folder; copying them into every checkpoint kept each trial's weights three times.
CKPT_FILE = "bldseg_checkpoint.json"
META_FILE = "bldseg_search.json"
# A trial's state in its run folder: {"status", "message", "final", "epochs_run", ...}; written
# by the trial before each report, made final by the driver when Tune ends the trial.
STATUS_FILE = "status.json"
# status.json plus the best epoch's metrics.
SUMMARY_FILE = "summary.json"
# Written in a trial's run folder when its MLflow logging failed (the driver reports it).
TRACKING_ERROR_FILE = "mlflow_error.txt"
# Trial statuses of trials that ran to their end or were stopped early by ASHA: usable models.
USABLE = ("completed", "early-stopped")
DEFAULT_EXPERIMENT = "bldseg"  # the MLflow experiment of a project's searches
#: A search's name: its results folder, and a value in MLflow filter strings (a quote in it
#: broke ``--resume``), so letters, digits, ``.``, ``_`` and ``-`` only.
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")
CODE_DIR = Path(__file__).resolve().parents[2]  # bldseg's checkout (or site-packages)


def read_trial_table(csv: str | os.PathLike) -> pd.DataFrame:
    """A search's ``trials.csv``, its trial ids read as the text they are: Ray's 8 hex digits
    may be all digits (``00012345`` read as the number 12345) or look like a float
    (``1234e567``, read as inf), about one trial in 40."""
    return pd.read_csv(csv, dtype={"trial_id": str})


#: Exit status of a search process whose Ray cluster stopped answering (:class:`ClusterWatch`).
EXIT_CLUSTER_LOST = 3
#: Seconds the cluster's head may refuse connections before a search gives up on it: under
#: Ray's own 60 s, after which Ray ends the driver process itself (exit 1, nothing closed).
CLUSTER_LOST_AFTER_S = 30.0


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``host:port`` (an IPv6 host in brackets, ``[::1]:6379``); None when
    ``address`` names no port."""
    host, sep, port = address.rpartition(":")
    return (host.strip("[]"), int(port)) if sep and port.isdigit() else None


class ClusterWatch:
    """Watches the Ray head while Tune runs, and calls ``on_lost`` once when it is gone.

    Every ``period`` seconds a thread opens a TCP connection to the head's GCS port (the
    kernel accepts it while the GCS process lives, however busy it is). When none has
    succeeded for ``after`` seconds, it calls ``on_lost`` (from the thread) and stops.

    Args:
        gcs_address: ``host:port`` of the cluster's GCS (``ray.get_runtime_context()``).
        on_lost: Called with the seconds since the last answer.
        after: Seconds without an answer that mean the cluster is gone.
        period: Seconds between checks.
    """

    def __init__(
        self,
        gcs_address: str,
        on_lost: Callable[[float], None],
        after: float = CLUSTER_LOST_AFTER_S,
        period: float = 2.0,
    ) -> None:
        import threading

        where = _host_port(gcs_address)
        if where is None:
            raise ValueError(f"not a host:port address: {gcs_address!r}")
        self._where = where
        self._on_lost, self._after, self._period = on_lost, after, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bldseg-cluster-watch", daemon=True)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(self._where, timeout=self._period):
                return True
        except OSError:
            return False

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self._period):
            if self._answers():
                last = time.monotonic()
            elif time.monotonic() - last >= self._after:
                self._on_lost(time.monotonic() - last)
                return

    def __enter__(self) -> ClusterWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self._period + 1)


class SearchInterrupted(KeyboardInterrupt):
    """The search was interrupted (Ctrl-C); its state is saved and ``resume=True`` continues it.

    A ``KeyboardInterrupt``: code that does not know it still stops, as on any Ctrl-C.

    Attributes:
        result: The search's result when Ctrl-C came after its last trial had ended: the search
            is finished and recorded as such (``resume=True`` returns the same result, training
            again only the trials that ended in an error, as Ray Tune's ``resume_errored``
            does), only what was to follow it is stopped. None when trials were left
            unfinished.
    """

    def __init__(self, message: str, result: SearchResult | None = None):
        super().__init__(message)
        self.result = result


class _TuneSigint:
    """Tells whether Tune's SIGINT handler caught a Ctrl-C while ``tuner.fit()`` ran.

    Tune installs its own handler at the start of ``fit()``: on Ctrl-C it ends the tuning loop,
    saves the experiment, puts back the handler from before and returns normally; its flag is
    local to ``fit()``. A Ctrl-C after the last trial has ended leaves no unfinished trial to
    tell it by, so the search's callback wraps Tune's handler from ``setup()`` (called once
    Tune's handler is in place) to note the signal, then lets Tune's handler act as before.
    """

    def __init__(self) -> None:
        self.caught = False  # Tune's handler got a SIGINT (or SIGUSR1) during fit()
        self._before: Any = None  # the SIGINT handler before fit(); None: not the main thread
        self._before_usr1: Any = None  # the SIGUSR1 handler before fit()

    @contextmanager
    def around_fit(self) -> Iterator[None]:
        """Puts back the SIGINT and SIGUSR1 handlers from before ``fit()`` once it returns: Tune
        leaves its own in place after a ``fit()`` that got no signal, and it would swallow a
        later Ctrl-C (what follows the search: another search, the ensemble search, the
        prediction)."""
        # handlers are set from the main thread only (Tune sets none when fit() runs elsewhere)
        main = threading.current_thread() is threading.main_thread()
        self._before = signal.getsignal(signal.SIGINT) if main else None
        if main and _SIGUSR1 is not None:
            self._before_usr1 = signal.getsignal(_SIGUSR1)
        try:
            yield
        finally:
            if self._before is not None:  # None also for a handler not set from Python
                signal.signal(signal.SIGINT, self._before)
            if self._before_usr1 is not None:
                signal.signal(_SIGUSR1, self._before_usr1)

    def wrap_tunes_handler(self) -> None:
        """Notes a SIGINT or SIGUSR1 that reaches Tune's handlers, installed at the start of
        ``fit()``: Tune stops a search on either (Slurm's ``--signal=USR1@...``, ``kill -USR1``),
        and a search stopped so is interrupted, to be resumed, as after Ctrl-C."""
        if self._before is None:  # fit() outside around_fit, or not in the main thread
            return
        if _SIGUSR1 is not None:
            if _tunes_stop_event_is_set(signal.getsignal(_SIGUSR1)):
                # a stop signal came while Tune restored the search, before this callback's
                # setup() (Tune ends the loop as after any). Tune keeps its SIGUSR1 handler
                # after it fired, and with TUNE_DISABLE_SIGINT_HANDLER=1 the SIGINT handler
                # below is the one from before all along: only Tune's flag tells.
                self.caught = True
            self._wrap(_SIGUSR1, self._before_usr1)
        # Tune installs no SIGINT handler with TUNE_DISABLE_SIGINT_HANDLER=1: Ctrl-C then
        # raises as usual
        if int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0")):
            return
        if signal.getsignal(signal.SIGINT) is self._before:
            # Tune's handler put the one from before back: a stop signal came while Tune
            # restored the search, before this callback's setup() (Tune ends the loop as
            # after any)
            self.caught = True
            return
        self._wrap(signal.SIGINT, self._before)

    def _wrap(self, signum: int, before: Any) -> None:
        tunes = signal.getsignal(signum)
        if tunes is before or not callable(tunes):
            return

        def caught(signum, frame):
            self.caught = True
            tunes(signum, frame)  # Tune's: ends the loop, puts the SIGINT handler back

        signal.signal(signum, caught)


_SIGUSR1 = getattr(signal, "SIGUSR1", None)  # not on Windows


def _tunes_stop_event_is_set(handler: Any) -> bool:
    """Whether Tune's stop-signal handler has fired: the flag that ends its tuning loop is a
    ``threading.Event`` the handler holds (``ray.tune.tune._setup_signal_catching``). False for
    another handler, or one holding no such flag."""
    cells = getattr(handler, "__closure__", None) or ()
    for cell in cells:
        try:
            held = cell.cell_contents
        except ValueError:  # a cell not yet filled
            continue
        if isinstance(held, threading.Event) and held.is_set():
            return True
    return False


@dataclass
class SearchSpec:
    """A search: what to vary, how long, where results and logs go."""

    space: str = "augmentation"  # a name from tune_spaces.SPACES
    name: str | None = None  # search name (results folder, parent run); default "<space>-<time>"
    base: dict[str, Any] = field(default_factory=dict)  # flat RunConfig values fixed for all trials
    trials: int = 8  # number of trials
    epochs: int = 8  # epochs per trial (ASHA's max_t)
    cpus_per_trial: float = 1.0  # CPUs reserved per trial
    gpus_per_trial: float = 0.0  # GPUs per trial (fractions share a GPU)
    search: str = "optuna"  # "optuna" (TPE) or "random"
    scheduler: str = "asha"  # "asha" (early stopping) or "fifo"
    grace_period: int = 2  # ASHA: epochs every trial runs before it can be stopped
    reduction_factor: int = 4  # ASHA: a rung keeps the best 1/reduction_factor (Ray's default)
    storage: str = "runs"  # results folder (shared storage on a cluster)
    tracking_uri: str | None = None  # MLflow URI; default sqlite:////<project>/mlflow.db
    # seconds a silent tracking server is waited for before the search goes on without MLflow
    tracking_timeout_s: float = tracking.DEAD_AFTER_S
    experiment: str = DEFAULT_EXPERIMENT  # MLflow experiment; each search is a parent run in it
    address: str | None = None  # Ray cluster address; None: $RAY_ADDRESS, else a new local Ray
    resume: bool = False  # continue the named (or latest) interrupted search
    seed: int = 0  # searcher seed
    data: str | None = None  # dataset folder or cache; None: the built-in synthetic world
    data_options: DataOptions = field(default_factory=DataOptions)  # folder layout, decoding
    data_root: str = str(DEFAULT_DATA_ROOT)  # caches and the synthetic world
    # retries of a failed trial from its checkpoint (one failing before its first is not
    # retried: its error, a config or a file, would recur)
    max_failures: int = 1
    max_concurrent: int = 0  # 0: as many as resources allow
    project_dir: str = "."  # where mlflow.db / mlartifacts go by default
    parent_tags: dict[str, str] = field(default_factory=dict)  # extra tags of the parent run
    # base keys the user fixed by name (--set, --model), not defaults: a warning names those the
    # space searches, as the space's value then wins
    user_keys: tuple[str, ...] = ()


@dataclass
class SearchResult:
    """What a search produced."""

    name: str
    path: Path  # the experiment folder under storage
    table: pd.DataFrame  # one row per trial
    best: dict[str, Any]  # the best completed/early-stopped trial's row; {} when there is none
    parent_run_id: str
    tracking_uri: str
    wall_s: float  # the search's wall time, summed over its sessions (a resume adds one)
    train_s: float  # sum over trials of their epochs' wall time (every session's)
    slots: int  # trials that could run at once
    ray_address: str  # the Ray cluster the trials ran on
    ideal_s: float  # the same trials' epochs scheduled with no orchestration cost
    n_completed: int = 0  # trials with a usable model (status completed or early-stopped)
    first_failure: str = ""  # why the first failed trial failed (error or divergence); "" if none
    tracking_errors: dict[str, str] = field(default_factory=dict)  # trial id/"search": MLflow error
    experiment: str = DEFAULT_EXPERIMENT  # the MLflow experiment holding the parent run
    experiment_id: str = ""  # its id
    # the best trial's own searched values (its Tune config), without the other trials' keys
    best_config: dict[str, Any] = field(default_factory=dict)
    sessions: int = 1  # the runs of the search that wall_s adds up (1 + the resumes that trained)

    @property
    def mlflow_url(self) -> str:
        """Where the MLflow UI shows the search: its experiment's runs (``mlflow ui``'s default
        address for a local store)."""
        return tracking.experiment_url(self.tracking_uri, self.experiment_id)

    @property
    def orchestration_overhead(self) -> float:
        """Share of the wall time added by Ray, MLflow and start-up (see ideal_wall)."""
        return max(0.0, 1.0 - self.ideal_s / self.wall_s)

    @property
    def overhead(self) -> float:
        """Share of the slots' wall time not spent in trial epochs (see overhead_fraction)."""
        return overhead_fraction(self.wall_s, self.train_s, self.slots)


def name_problem(name: str) -> str | None:
    """What is wrong with a search name (None: nothing), for a message after ``--name NAME``."""
    if not NAME_PATTERN.fullmatch(name):
        return "may hold only letters, digits, '.', '_' and '-' (it names a folder and a run)"
    if set(name) == {"."}:
        return "is not a folder name"
    return None


def get_space(name: str, base: dict[str, Any] | None = None):
    """The define-by-run function registered as ``name`` in ``tune_spaces``, as ``space(trial)``.

    A space that also takes ``base`` (``space(trial, base)``) gets a copy of the search's fixed
    flat run config: a fine-tuning search (``--pretrained``) centres its LR range on the
    recipe's instead of the from-scratch one. Bound with ``functools.partial`` (picklable, as
    Tune saves its searcher).
    """
    from bldseg.tune_spaces import SPACES

    if name not in SPACES:
        raise ValueError(f"unknown search space {name!r}; known: {sorted(SPACES)}")
    space = SPACES[name]
    if "base" in inspect.signature(space).parameters:
        return functools.partial(space, base=dict(base or {}))
    return space


#: Config keys a space may not set: the search owns them (the epoch budget is ASHA's max_t and
#: each trial's status is judged against it; folds and data are checked once for all trials).
RUNNER_KEYS = frozenset({"epochs", "folds", "fold", "data"})

#: Settings that decide which tiles validate a trial: a space may fix them, not search them,
#: or ASHA and the best trial would compare trials scored on different tiles.
SPLIT_KEYS = frozenset({"val_fraction", "split_group", "split_seed", "val_tile"})

#: A search's settings that a resume takes from its record (``bldseg_search.json``), not from
#: the command line: a resumed search runs on as it was started.
RESUMED_SETTINGS = (
    "space",
    "trials",
    "epochs",
    "search",
    "scheduler",
    "grace_period",
    "reduction_factor",
    "seed",
    # the resources the trials were started with (absent from records of older searches)
    "cpus_per_trial",
    "gpus_per_trial",
    # Tune restores the experiment with the concurrency limit it was started with
    "max_concurrent",
)

_UNSET = object()  # a base key one side does not set


def section_key_problem(key: str) -> str | None:
    """What is wrong with ``key`` as a config value to fix or search when it names a whole
    section of the run config (``aug``), or None.

    ``RunConfig.from_flat`` refuses it too; said here in the words of a search's ``--set``
    and space, before the trials are built. Values are set and searched leaf by leaf.
    """
    leaves = config_sections().get(key)
    if leaves is None:
        return None
    return (
        f"{key!r} is a section of the run config, not a value: set or search its leaves by "
        f"their dotted names ({', '.join(f'{key}.{leaf}' for leaf in leaves)})"
    )


def _shown(value: Any) -> str:
    return "unset" if value is _UNSET else repr(value)


def resumed_spec(spec: SearchSpec, meta: dict[str, Any]) -> SearchSpec:
    """``spec`` with the search settings recorded when the search was started.

    Flags given with ``--resume`` that differ from the record are named in a warning, as
    they have no effect: the settings, the fixed run config (``--set``, ``--model``,
    ``--folds``, ``--pretrained``, ``--split-group``: ``spec.base``), the data and its options.
    """
    recorded = meta.get("spec") or {}
    kept = {k: recorded[k] for k in RESUMED_SETTINGS if recorded.get(k) is not None}
    if "epochs" in meta.get("base", {}):
        kept["epochs"] = meta["base"]["epochs"]
    kept = {k: type(getattr(spec, k))(v) for k, v in kept.items()}
    differ = {k: (getattr(spec, k), v) for k, v in kept.items() if getattr(spec, k) != v}
    # The trials go on with the recorded base config (their data included): the values of this
    # command that differ from it are named too. The epochs are a setting, named above.
    base = {**spec.base, "data": str(Path(spec.data).resolve()) if spec.data else None}
    was = {"data": None, **meta.get("base", {})}  # no data recorded: the synthetic world
    for k in sorted((set(base) | set(was)) - {"epochs"}):
        given, value = base.get(k, _UNSET), was.get(k, _UNSET)
        if given != value:
            differ[k] = (given, value)
    # folders compared absolute: recorded so since 2026-12-07, typed as given before
    given_options = asdict(absolute_folders(spec.data_options))
    options = asdict(absolute_folders(DataOptions.from_dict(recorded.get("data_options") or {})))
    for k, value in options.items():
        if given_options[k] != value:
            differ[f"data_options.{k}"] = (given_options[k], value)
    if differ:
        log.warning(
            "--resume continues the search as it was started: %s",
            ", ".join(f"{k}={_shown(v)} (not {_shown(given)})" for k, (given, v) in differ.items()),
        )
    return replace(spec, **kept)


class _NamingTrial:
    """An Optuna trial whose ``suggest_*`` errors name the parameter: Optuna's own (``low``
    above ``high``, an empty list of choices) do not say which one of a space is wrong."""

    def __init__(self, trial: optuna.Trial):
        self._trial = trial

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._trial, attr)
        if not attr.startswith("suggest_") or not callable(value):
            return value

        @functools.wraps(value)
        def suggest(name: str, *args: Any, **kwargs: Any) -> Any:
            try:
                return value(name, *args, **kwargs)
            except ValueError as e:
                raise ValueError(f"parameter {name!r}: {e}") from e

        return suggest


def validate_space(
    space,
    base: dict[str, Any],
    samples: int = 16,
    seed: int = 0,
    check: Callable[[RunConfig], Any] | None = None,
) -> set[str]:
    """Samples a space and builds a RunConfig from each sample, before any trial starts.

    Args:
        space: The define-by-run space (:func:`get_space`).
        base: The flat run config fixed for every trial.
        samples: Samples drawn (each also with every numeric parameter at both range ends).
        seed: Seed of the random sampler.
        check: Also called with each sample's config (and each range end's): what a trial
            checks against the data before it trains (:func:`check_trials_on_data`).

    Returns:
        The config keys the space sets in any sample (suggested or returned as constants):
        what the trials' MLflow runs carry as params.

    Raises:
        ValueError: A suggested key is not a config key or names a whole section (``aug``
            instead of ``aug.hflip_p``), a value or a range is invalid, a config ``check``
            refuses, or the space returns something else than a dict or None; the message
            names the parameter and the space.
    """
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    # a space bound to the base config (get_space) is a partial: name its function's module
    name = getattr(getattr(space, "func", space), "__module__", str(space))
    keys: set[str] = set()
    for _ in range(samples):
        trial = study.ask()
        try:
            constants = space(_NamingTrial(trial))
        except Exception as e:
            raise ValueError(f"search space {name} failed while sampling: {e}") from e
        if constants is None:
            constants = {}
        elif not isinstance(constants, dict):
            # e.g. `return trial.suggest_float(...)`: the trial's values are its suggestions
            raise ValueError(
                f"search space {name} returned {type(constants).__name__}, expected a dict or "
                "None (the suggested values are the trial's; return only constants, by key)"
            )
        sample = {**trial.params, **constants}
        for key in sample:
            if (problem := section_key_problem(key)) is not None:
                raise ValueError(f"search space {name} sets {key!r}: {problem}")
        owned = sorted(RUNNER_KEYS.intersection(sample))
        if owned:
            raise ValueError(
                f"search space {name} sets {', '.join(owned)}, which the search fixes for all "
                "trials (--epochs, --folds, --data); remove it from the space"
            )
        try:
            cfg = RunConfig.from_flat({**base, **sample})
        except (TypeError, ValueError) as e:
            raise ValueError(f"search space {name} is invalid: {e} (sample: {sample})") from e
        _refuse_searched_validation(name, set(trial.params), cfg)
        # the ends first: a sample the check refuses inside a range is named by its range
        _check_range_ends(name, trial, base, sample, check)
        if check is not None:
            try:
                check(cfg)
            except ValueError as e:
                raise ValueError(
                    f"search space {name}: the data refuse its sample {sample}: {e}. Change the "
                    "space (a --set of a key it searches does not reach the trials)"
                ) from e
        keys.update(sample)
        study.tell(trial, 0.0)
    return keys


def _refuse_searched_validation(name: str, searched: set[str], cfg: RunConfig) -> None:
    """Raises ValueError where a space's suggested keys would give trials other validation
    tiles: the split's keys (:data:`SPLIT_KEYS`), or the crop size while validation tiles are
    the crop's size (``val_tile`` 0). Constants a space returns are the same for every trial.
    """
    split = sorted(SPLIT_KEYS & searched)
    if split:
        raise ValueError(
            f"search space {name} searches {', '.join(split)}, which decide the validation "
            "tiles: its trials would be compared on different tiles. Fix them (--set), not "
            "search them"
        )
    if "aug.crop_size" in searched and cfg.val_tile == 0:
        raise ValueError(
            f"search space {name} searches aug.crop_size while val_tile is 0 (validation tiles "
            "of the crop's size): its trials would be compared on different tiles. Fix the "
            "validation tiles (--set val_tile=N, e.g. the smallest crop the space searches)"
        )


def _check_range_ends(
    name: str,
    trial: optuna.Trial,
    base: dict,
    sample: dict,
    check: Callable[[RunConfig], Any] | None = None,
) -> None:
    """Builds a RunConfig with each numeric parameter at both ends of its range, the others as
    sampled (and ``check``s it): a range reaching past a limit (``coteach.tau`` up to 1.05, an
    ``aug.crop_size`` up to more than the images' side) fails some trials later, or never in
    these few samples when the bad end is narrow.

    Raises:
        ValueError: naming the space, the parameter and its range.
    """
    for key, dist in trial.distributions.items():
        if isinstance(dist, FloatDistribution | IntDistribution):
            ends, where, what = (
                (dist.low, dist.high),
                f"ranges over [{dist.low}, {dist.high}]",
                "end",
            )
        elif isinstance(dist, CategoricalDistribution):
            # numeric choices (a crop of 256 ... 640) are each checked, as a range's two ends:
            # 4 samples need not draw the one the data refuse
            ends = [
                c for c in dist.choices if isinstance(c, int | float) and not isinstance(c, bool)
            ]
            where, what = f"chooses from {list(dist.choices)}", "choice"
        else:
            continue
        for end in ends:
            try:
                cfg = RunConfig.from_flat({**base, **sample, key: end})
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"search space {name}: parameter {key!r} {where}, and its {what} {end} is "
                    f"invalid: {e}"
                ) from e
            if check is None:
                continue
            try:
                check(cfg)
            except ValueError as e:
                raise ValueError(
                    f"search space {name}: parameter {key!r} {where}, and the data refuse its "
                    f"{what} {end}: {e}. Narrow the range in the space (a --set of a key it "
                    "searches does not reach the trials)"
                ) from e


def _make_searcher(spec: SearchSpec, space: Callable):
    from ray.tune.search.optuna import OptunaSearch

    if spec.search == "optuna":
        sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=min(4, spec.trials))
    elif spec.search == "random":
        sampler = optuna.samplers.RandomSampler(seed=spec.seed)
    else:
        raise ValueError(f"--search {spec.search!r}: use optuna or random")
    return OptunaSearch(space=space, metric=SEARCHER_METRIC, mode="max", sampler=sampler)


def _make_scheduler(spec: SearchSpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if spec.scheduler == "asha":
        # ASHA compares the epoch's Dice at its rungs; the TuneConfig names no metric (Tune
        # refuses one there beside the scheduler's), so Tune's console names no "best trial"
        # by another rule than bldseg's table (best epoch, SEARCHER_METRIC)
        return ASHAScheduler(
            metric=METRIC,
            mode="max",
            time_attr="training_iteration",
            max_t=spec.epochs,
            grace_period=min(spec.grace_period, spec.epochs),
            reduction_factor=spec.reduction_factor,
        )
    if spec.scheduler == "fifo":
        return FIFOScheduler()
    raise ValueError(f"--scheduler {spec.scheduler!r}: use asha or fifo")


def _legacy_reporter():
    """Tune's old console table (``RAY_AIR_NEW_OUTPUT=0``) with the optimised metric first;
    None with the new output engine, which ignores a reporter (with a warning) and takes its
    columns from the first metrics a trial reports (:data:`CONSOLE_METRICS`)."""
    if os.environ.get("RAY_AIR_NEW_OUTPUT", "1") != "0":
        return None
    from ray.tune import CLIReporter

    return CLIReporter(
        metric_columns=list(CONSOLE_METRICS),
        metric=SEARCHER_METRIC,
        mode="max",
        sort_by_metric=True,
    )


@contextmanager
def _quiet_libraries():
    """Optuna's per-study INFO lines and Ray's deprecation warnings off while a search runs.

    Optuna's warnings and errors, and every other warning, still show; the user's settings
    come back afterwards.
    """
    from ray.util.annotations import RayDeprecationWarning

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Tune's advice to change CheckpointConfig(num_to_keep) or a TUNE_WARN_* variable, which
    # no bldseg flag sets: our per-epoch checkpoints are a few bytes (CKPT_FILE) and fast to
    # snapshot, yet it came every few epochs. Tune's other warnings (a slow sync) still show.
    state_log = logging.getLogger("ray.tune.execution.experiment_state")
    state_log.addFilter(_no_snapshot_advice)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=RayDeprecationWarning)
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)
        state_log.removeFilter(_no_snapshot_advice)


def _no_snapshot_advice(record: logging.LogRecord) -> bool:
    return "snapshotting has been triggered multiple times" not in record.getMessage()


def _data_paths(data: PreparedData) -> dict[str, Any]:
    return {
        "root": str(data.root),
        "train": str(data.train.root),
        "test": str(data.test.root) if data.test else None,
        "truth": str(data.test_truth_csv) if data.test_truth_csv else None,
        "clean": str(data.clean_train_csv) if data.clean_train_csv else None,
        "fingerprint": data.train.fingerprint,
        # how the images were read, for the trials' checkpoints to record (None: not known)
        "options": None if data.options is None else asdict(data.options),
        # what --data named (the synthetic world or the user's kind of data): recorded too, as
        # prediction without --data must not take the synthetic world for image folders
        "kind": data.kind,
    }


def _open_data(paths: dict[str, str | None]) -> PreparedData:
    # O(1): the driver built the caches; trials only map the files.
    if not Path(str(paths["train"])).is_dir():
        # The driver built it on its own disk: on a cluster every node maps the same folder.
        # DatasetCache's "not a complete cache ... build it" sent users to a cache that was
        # complete, on the driver's node.
        import socket

        raise FileNotFoundError(
            f"the training cache {paths['train']} that the search's driver built is not on "
            f"this node ({socket.gethostname()}): on a cluster, --data-root must be shared "
            "storage every node mounts at the same path (e.g. --data-root /shared/data); "
            "or it was removed since the search started"
        )
    train = DatasetCache(paths["train"])
    recorded = paths.get("fingerprint")
    if recorded and train.fingerprint != recorded:
        # another job rebuilt the cache from changed sources while this search ran
        raise ValueError(
            f"the training cache {paths['train']} was rebuilt from other data since the search "
            f"started (fingerprint {train.fingerprint}, search {recorded}); this trial would "
            "not be comparable with the others: start a new search on the current data"
        )
    return PreparedData(
        root=Path(paths["root"]),
        train=train,
        test=DatasetCache(paths["test"]) if paths["test"] else None,
        test_truth_csv=Path(paths["truth"]) if paths["truth"] else None,
        clean_train_csv=Path(paths["clean"]) if paths["clean"] else None,
        options=DataOptions.from_dict(paths["options"]) if paths.get("options") else None,
        kind=paths["kind"],
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
                "folds.json",  # a K-fold trial: its folds' weights stay in the run folder
                # which weights it started from (--pretrained): loaded, re-made and dropped keys
                "pretrained.json",
            )
        ],
    )
    # a K-fold trial's folds each load them: the first fold's report stands for all
    if not (run_dir / "pretrained.json").is_file():
        tracking.log_artifacts(client, run_id, [run_dir / "fold0" / "pretrained.json"])


def trial_run_dir(exp_dir: str | os.PathLike, trial_id: str) -> Path:
    """Where a trial's run folder lives: in the search's results folder (shared storage on a
    cluster), not in Ray's per-session scratch space, so the ensemble search finds it later."""
    return Path(exp_dir) / f"trial_{trial_id}" / "run"


def _checkpoint_epoch(ckpt, trial_id: str) -> int:
    """The epoch a trial's Tune checkpoint stands for (0 without one)."""
    if ckpt is None:
        return 0
    with ckpt.as_directory() as d:
        meta = Path(d) / CKPT_FILE
        if not meta.is_file():
            raise RuntimeError(
                f"trial {trial_id}: its Tune checkpoint {d} has no {CKPT_FILE}: it was written "
                "by an older bldseg (weights copied into the checkpoint, pickled RNG state) and "
                "cannot be continued safely; start a new search (another --name)"
            )
        return int(json.loads(meta.read_text())["epoch"])


def _trained_history(run_dir: Path, cfg: RunConfig) -> list[dict[str, Any]]:
    """The epochs a trial's run folder has trained: its ``last.pt``'s (mapped, not read: only
    the history is needed), or a K-fold trial's mean rows over the epochs all folds trained."""
    from bldseg.train.folds import trained_history

    return trained_history(run_dir, cfg)


def _metric_steps(client, run_id: str, key: str) -> set[int]:
    return {m.step for m in client.get_metric_history(run_id, key)}


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


def read_search_record(path: Path) -> dict[str, Any]:
    """A search's record (:data:`META_FILE`), read for ``--resume`` or ``--from``.

    Raises:
        ValueError: The file is not a JSON object (truncated by a full disk, or a copy cut
            short): the message names it; json's own error gave only a line and column.
        FileNotFoundError: There is no such file.
    """
    try:
        record = json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        record = e
    if not isinstance(record, dict):
        why = f" ({record})" if isinstance(record, ValueError) else ""
        raise ValueError(
            f"{path} is damaged{why}: it is the search's record (its settings, data and MLflow "
            "run), written whole, so it was cut short or overwritten since (a full disk, a copy "
            "cut short?); put back a copy of it: without it the search can be neither resumed "
            "nor started from (--from), though its trials' run folders are kept"
        )
    return record


def best_epoch(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The row of the best epoch by :data:`METRIC` (the first of equals, as :func:`fit` keeps
    ``best.pt``), or {} before the first epoch."""
    best: dict[str, Any] = {}
    for row in history:
        if not best or row[METRIC] > best[METRIC]:
            best = row
    return best


def best_metrics(
    history: list[dict[str, Any]], oof: dict[str, float] | None = None
) -> dict[str, float]:
    """The ``best_*`` summary MLflow shows for a run: its best epoch so far, not its last.

    A K-fold trial's scores are those of its out-of-fold library as it stands (``oof`` of
    ``folds.json``), as the trial table shows them: the threshold it predicts at is chosen
    there, not the mean of its folds' thresholds.
    """
    best = best_epoch(history)
    if not best:
        return {}
    scores = oof or best
    return {
        "best_val_dice": scores[METRIC],
        "best_threshold": scores["val_thr_best"],
        "best_epoch": best["epoch"],
        "best_val_dice_05": scores["val_dice_05"],
        "best_val_dice_youden": scores["val_dice_youden"],
    }


def write_trial_record(
    run_dir: Path,
    *,
    trial_id: str,
    status: str,
    message: str,
    history: list[dict[str, Any]],
    max_epochs: int,
    final: bool = False,
    oof: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Writes a trial's ``status.json`` and ``summary.json``; returns the summary.

    Args:
        run_dir: The trial's run folder.
        trial_id: Tune's trial id.
        status: "running", "completed", "early-stopped", "diverged" or "error".
        message: Why it stands there, in words.
        history: The epochs trained so far (rows of :func:`fit`'s history).
        max_epochs: The epochs the trial was given.
        final: Whether the trial has ended (written by the driver, which knows).
        oof: A K-fold trial's out-of-fold scores (``folds.json``), what it predicts with.
    """
    best = best_epoch(history)
    state = {
        "status": status,
        "message": message,
        "final": final,
        "epochs_run": history[-1]["epoch"] if history else 0,
        "max_epochs": max_epochs,
    }
    summary = {
        "trial_id": trial_id,
        **state,
        "best_epoch": best.get("epoch", 0),
        "best": best,
        "run_dir": str(run_dir),
        **({"oof": oof} if oof else {}),
    }
    write_json(run_dir / STATUS_FILE, state)
    write_json(run_dir / SUMMARY_FILE, summary)
    return summary


def _report_row(row: dict[str, Any], best_so_far: float) -> dict[str, Any]:
    """A history row as reported to Tune, with the best epoch's Dice so far
    (:data:`SEARCHER_METRIC`): :data:`CONSOLE_METRICS` first, for the console."""
    full = {**row, SEARCHER_METRIC: best_so_far, "diverged": 0}
    return {**{k: full[k] for k in CONSOLE_METRICS if k in full}, **full}


def trial_device(device: str, gpu_ids: list) -> str:
    """The device a trial trains on: ``auto`` is the CPU when Ray gave the trial no GPU.

    Ray (2.x, recent) leaves ``CUDA_VISIBLE_DEVICES`` as it is for a trial that asked for no
    GPU, so ``auto`` would put every such trial on GPU 0, unaccounted by Ray's scheduler.
    """
    return "cpu" if device == "auto" and not gpu_ids else device


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
    tracking_timeout_s: float = tracking.DEAD_AFTER_S,
) -> None:
    """The Ray Tune trainable: one :func:`fit` whose epochs are reported to Tune and MLflow.

    ASHA may end the trial inside any report, so what must survive is written before each
    one: the run folder's status and summary, and the epoch's MLflow metrics (flushed). The
    driver finalises the trial (:class:`_SearchDriver`).
    """
    import ray
    import torch
    from ray import tune
    from ray.tune import Checkpoint

    from bldseg.train.engine import fit, fitted_crop
    from bldseg.train.folds import fit_folds

    torch.set_num_threads(max(1, threads))
    ctx = tune.get_context()
    trial_id, trial_name = ctx.get_trial_id(), ctx.get_trial_name()
    cfg = RunConfig.from_flat({**base, **config})
    device = trial_device(cfg.device, ray.get_gpu_ids())
    if device != cfg.device:
        cfg = cfg.with_updates({"device": device})
    run_dir = trial_run_dir(exp_dir, trial_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    error_file = run_dir / TRACKING_ERROR_FILE
    error_file.unlink(missing_ok=True)  # a new attempt; a failure is recorded again if it recurs
    tracker = tracking.Tracker(
        tracking_uri,
        f"trial {trial_id}",
        on_error=lambda m: error_file.write_text(m + "\n"),
        dead_after_s=tracking_timeout_s,
    )
    seen: list[dict[str, Any]] = []  # the epochs reported so far, in order

    def record(status: str, message: str) -> None:
        write_trial_record(
            run_dir,
            trial_id=trial_id,
            status=status,
            message=message,
            history=seen,
            max_epochs=cfg.epochs,
        )

    try:
        # Retried or resumed: the run folder may hold epochs Tune never heard of (the trial or
        # the driver stopped between writing last.pt and reporting); they are re-reported below.
        reported = _checkpoint_epoch(tune.get_checkpoint(), trial_id)
        history = _trained_history(run_dir, cfg)
        trained = history[-1]["epoch"] if history else 0
        if reported > trained:
            where = f"is at epoch {trained}" if history else "has trained none"
            raise RuntimeError(
                f"trial {trial_id}: its Tune checkpoint is at epoch {reported} but its run "
                f"folder {run_dir} {where}. The results folder (--storage) must be one "
                "folder that every Ray node sees (shared storage), and must not change during a "
                "search"
            )
        seen.extend(r for r in history if r["epoch"] <= reported)
        child = tracker.call(
            tracking.get_or_create_child_run,
            experiment_id,
            parent_run_id,
            trial_id,
            trial_name,
            {
                **tags,
                "bldseg.trial_dir": str(run_dir.parent),
                "bldseg.status": "running",
                "model": cfg.model,
            },
        )
        run_id, created = child if child is not None else (None, False)
        data = _open_data(data_paths)
        if created:  # only what the searcher chose: the constants are the parent run's params
            params = dict(config)
            if cfg.aug.crop_fit:
                # the crop fit trains with (a searched crop above the images' side is shrunk)
                used = fitted_crop(cfg, data.train.image_size).aug.crop_size
                params["aug.crop_size_used"] = used
            tracker.submit(tracking.log_params, run_id, params)
        # epochs that reached MLflow before an interruption are not logged twice
        logged = tracker.call(_metric_steps, run_id, METRIC) if history and not created else None

        def on_epoch_end(row: dict[str, Any], out: Path) -> None:
            seen[:] = [r for r in seen if r["epoch"] < row["epoch"]] + [row]
            last = row["epoch"] >= cfg.epochs
            record(
                "completed" if last else "running",
                f"trained {cfg.epochs} epochs" if last else f"epoch {row['epoch']} of {cfg.epochs}",
            )
            if run_id is not None and row["epoch"] not in (logged or ()):
                # Awaited (one small batch): after the report the trial may be gone.
                tracker.wait(
                    tracker.submit(
                        tracking.log_metrics,
                        run_id,
                        # best_* first: MLflow's compare view plots a run's first metric
                        {**best_metrics(seen, _read_json(out / FOLDS_FILE, {}).get("oof")), **row},
                        step=row["epoch"],
                    )
                )
            # A checkpoint without weights: nothing to copy, link or keep per epoch (last.pt in
            # the run folder is the state), so any filesystem works for --storage.
            with tempfile.TemporaryDirectory() as tmp:
                meta = {"epoch": row["epoch"], "trial_id": trial_id}
                (Path(tmp) / CKPT_FILE).write_text(json.dumps(meta))
                best_so_far = max(r[METRIC] for r in seen)
                tune.report(
                    _report_row(row, best_so_far),
                    checkpoint=Checkpoint.from_directory(tmp),
                )

        before = _read_json(run_dir / STATUS_FILE, {})  # the last attempt's, if any
        for row in history:
            if row["epoch"] > reported:
                on_epoch_end(row, run_dir)
        if trained >= cfg.epochs:  # it had trained every epoch before the interruption
            status, message = "completed", f"trained {cfg.epochs} epochs"
        elif before.get("status") == "diverged":  # it had diverged before the interruption
            status, message = "diverged", before.get("message", "a loss became non-finite")
        else:
            if cfg.folds >= 2:
                result = fit_folds(
                    cfg,
                    run_dir,
                    data=data,
                    on_epoch_end=on_epoch_end,
                    resume=True,
                    lockstep=True,
                )
            else:
                result = fit(
                    cfg,
                    run_dir,
                    data=data,
                    on_epoch_end=on_epoch_end,
                    resume=True,
                )
            status, message = result.status, result.message
        record(status if status in ("completed", "diverged") else "running", message)
        if status == "diverged":
            tracker.close()  # its metrics are in MLflow before the last report
            # a final report so the searcher learns this region is bad; Dice 0 is the honest floor
            epoch = seen[-1]["epoch"] if seen else 0
            tune.report({METRIC: 0.0, SEARCHER_METRIC: 0.0, "diverged": 1, "epoch": epoch})
    except Exception as e:
        # Recorded for the driver, which finalises the trial once Tune gives up on it.
        record("error", f"{type(e).__name__}: {str(e).strip()[:1000]}")
        raise
    finally:
        # ASHA stops a trial inside tune.report: end the logging thread of a reused worker
        tracker.close(wait=False)


def _error_line(trial) -> str:
    """The last line of a Tune trial's error (its exception), or a generic message."""
    try:
        error = trial.get_error()
    except (OSError, ValueError) as e:
        return f"the trial failed (its error could not be read: {e})"
    lines = [ln.strip() for ln in str(error or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "the trial failed"


def _plots_stale(run_dir: Path) -> bool:
    """Whether a run folder's plots are missing or older than the files they are drawn from."""
    sources = [run_dir / n for n in ("history.json", "val_probs.npz") if (run_dir / n).exists()]
    if not sources:
        return False
    newest = max(p.stat().st_mtime_ns for p in sources)
    wanted = ["curves.png"]
    if (run_dir / "val_probs.npz").exists():
        wanted += ["threshold_curve.png", "worst_tiles.png"]
    plots = [run_dir / "plots" / n for n in wanted]
    return any(not p.exists() or p.stat().st_mtime_ns < newest for p in plots)


def _finish_manifest(run_dir: Path, status: str) -> None:
    """A K-fold trial's ``folds.json`` takes the trial's final status: Tune ends the trial
    inside its last report, before fit_folds marks the manifest completed, and it said
    "running" forever (a resumed trial on edited masks was then told of folds still to train)."""
    from bldseg.train.folds import LOCK_FILE

    path = run_dir / FOLDS_FILE
    if not path.is_file():
        return
    with file_lock(run_dir / LOCK_FILE):
        manifest = _read_json(path, None)
        if isinstance(manifest, dict) and manifest.get("status") != status:
            write_json(path, {**manifest, "status": status})


def finalise_trial(
    run_dir: Path,
    trial_id: str,
    max_epochs: int,
    error: str | None = None,
    images_for_tiles: Callable | None = None,
    lo: float = 0.3,
    hi: float = 0.7,
) -> dict[str, Any]:
    """A trial's final status, summary and plots, from what its run folder holds; returns the
    summary.

    The status is the truth whatever ended the trial: ``completed`` when it trained every
    epoch (also when ASHA stopped it at its last report), ``early-stopped`` when the scheduler
    stopped it before, ``diverged`` when a loss became non-finite, ``error`` when it failed.

    Args:
        run_dir: The trial's run folder.
        trial_id: Tune's trial id.
        max_epochs: The epochs the trial was given.
        error: Why it failed, when Tune says it did.
        images_for_tiles: Tile reader for ``worst_tiles.png`` (see :func:`write_run_plots`).
        lo: Low end of the trial's threshold sweep (shaded in the plots).
        hi: High end of the threshold sweep.
    """
    from bldseg.train.plots import write_run_plots

    history = _read_json(run_dir / "history.json", [])
    before = _read_json(run_dir / STATUS_FILE, {})
    epochs = history[-1]["epoch"] if history else 0
    if error is not None:
        status = "error"
        message = before["message"] if before.get("status") == "error" else error
    elif before.get("status") == "diverged":
        status, message = "diverged", before.get("message", "a loss became non-finite")
    elif epochs >= max_epochs:
        status, message = "completed", f"trained {max_epochs} epochs"
    elif epochs == 0:
        status, message = "error", "the trial ended before it trained an epoch"
    else:
        status = "early-stopped"
        message = f"stopped by the scheduler after {epochs} of {max_epochs} epochs"
    summary = write_trial_record(
        run_dir,
        trial_id=trial_id,
        status=status,
        message=message,
        history=history,
        max_epochs=max_epochs,
        final=True,
        oof=_read_json(run_dir / FOLDS_FILE, {}).get("oof"),
    )
    _finish_manifest(run_dir, status)
    if _plots_stale(run_dir):
        if summary["best"].get("val_thr_widened"):
            # as fit draws them: shaded, the range the best epoch's threshold was chosen in
            from bldseg.metrics import widened_range

            lo, hi = widened_range(lo, hi)
        try:
            write_run_plots(run_dir, images_for_tiles, lo=lo, hi=hi)
        except Exception as e:  # a plot is a by-product: its failure must not end the search
            log.warning("plots of trial %s: %s: %s", trial_id, type(e).__name__, e)
    return summary


def _close_child_run(
    client,
    experiment_id: str,
    parent_run_id: str,
    trial_id: str,
    run_dir: Path,
    status: str,
    message: str,
) -> None:
    """The final MLflow record of a trial: missing epochs, status tags, artifacts, end."""
    run = tracking.find_child_run(client, experiment_id, parent_run_id, trial_id)
    if run is None:
        return  # its MLflow logging failed from the start (reported by the trial)
    run_id = run.info.run_id
    # epochs trained but never reported (a trial that failed right after one) are logged here
    history = _read_json(run_dir / "history.json", [])
    logged = _metric_steps(client, run_id, METRIC)
    oof = _read_json(run_dir / FOLDS_FILE, {}).get("oof")  # a K-fold trial's, as it ended
    for i, row in enumerate(history):
        if row["epoch"] not in logged:
            last = i == len(history) - 1
            metrics = {**best_metrics(history[: i + 1], oof if last else None), **row}
            tracking.log_metrics(client, run_id, metrics, step=row["epoch"])
    tracking.set_tags(client, run_id, {"bldseg.status": status, "bldseg.message": message[:500]})
    log_run_artifacts(client, run_id, run_dir)
    client.set_terminated(run_id, status="FINISHED" if status in USABLE else "FAILED")


def _stop_runs(client, experiment_id: str, parent_run_id: str, status: str) -> None:
    """Ends the parent run and its children that are still running: ``KILLED`` for an
    interrupted search (it can be resumed), ``FAILED`` for one that cannot go on."""
    running = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{tracking.PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'"
        ),
    )
    for run in running:
        reason = "interrupted" if status == "KILLED" else "error"
        tracking.set_tags(client, run.info.run_id, {"bldseg.status": reason})
        client.set_terminated(run.info.run_id, status=status)
    client.set_terminated(parent_run_id, status=status)


class _SearchDriver:
    """The driver's side of a running search: finalises each trial as Tune ends it.

    Tune's callbacks (:func:`_search_callback`) run in the driver's tuning loop, so they only
    queue work: one thread writes a trial's final status, summary and plots
    (:func:`finalise_trial`), then queues its MLflow record on the search's
    :class:`~bldseg.tune.tracking.Tracker`. It also remembers which trials were unfinished at
    the end of Tune's last step: an interrupted search has some; and whether Tune caught a
    Ctrl-C, which may come after the last trial ended (:class:`_TuneSigint`).

    Args:
        tracking_uri: The MLflow tracking URI.
        experiment_id: The MLflow experiment.
        parent_run_id: The search's parent run.
        exp_dir: The search's results folder.
        max_epochs: The epochs each trial is given.
        base: The constant run config (with a trial's config: its threshold sweep range).
        images_for_tiles: Tile reader for ``worst_tiles.png``.
        tracking_timeout_s: How long a silent tracking server is waited for.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        exp_dir: Path,
        max_epochs: int,
        base: dict[str, Any],
        images_for_tiles: Callable | None,
        tracking_timeout_s: float = tracking.DEAD_AFTER_S,
    ):
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.exp_dir = exp_dir
        self.max_epochs = max_epochs
        self.base = base
        self.images_for_tiles = images_for_tiles
        self.tracker = tracking.Tracker(
            tracking_uri, f"search {parent_run_id}", dead_after_s=tracking_timeout_s
        )
        self.unfinished: list[str] | None = None  # at the end of Tune's last step; None: no step
        self.sigint = _TuneSigint()  # whether Tune caught a Ctrl-C (after the last trial, too)
        self.n_trials = 0  # trials Tune had created by then
        # why each trial Tune ended with an error failed: Tune's Result of such a trial has no
        # error when its error file is unreadable (e.g. its storage could not be set up)
        self.errors: dict[str, str] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bldseg-finalise")
        self._pending: list[Future] = []

    def observe(self, trials) -> None:
        """Records which trials are not finished (called at the end of each Tune step)."""
        self.n_trials = len(trials)
        self.unfinished = [t.trial_id for t in trials if t.status not in ("TERMINATED", "ERROR")]

    def finalise(self, trial_id: str, config: dict[str, Any], error: str | None = None) -> None:
        """Queues the finalisation of a trial that Tune ended (``error``: why it failed)."""
        if error is not None:
            self.errors[trial_id] = error
        self._pending.append(self._pool.submit(self._finalise, trial_id, config, error))

    def _finalise(self, trial_id: str, config: dict[str, Any], error: str | None) -> None:
        run_dir = trial_run_dir(self.exp_dir, trial_id)
        if not run_dir.is_dir():  # it failed before its first line ran; nothing to record
            return
        cfg = RunConfig.from_flat({**self.base, **config})
        try:
            summary = finalise_trial(
                run_dir,
                trial_id,
                self.max_epochs,
                error,
                self.images_for_tiles,
                cfg.threshold_lo,
                cfg.threshold_hi,
            )
        except (OSError, ValueError) as e:  # unreadable records of a killed trial
            log.warning("could not finalise trial %s: %s", trial_id, e)
            return
        self.tracker.submit(
            _close_child_run,
            self.experiment_id,
            self.parent_run_id,
            trial_id,
            run_dir,
            summary["status"],
            summary["message"],
        )

    def drain(self) -> None:
        """Waits until every queued finalisation has written its files."""
        while self._pending:
            self._pending.pop(0).result()

    def close(self) -> None:
        """Drains, then ends the MLflow queue once it is sent (bounded, see Tracker.close)."""
        self.drain()
        self._pool.shutdown()
        self.tracker.close()


# Driver-side state of running searches, by parent run id: Tune restores callbacks from its own
# pickle on resume, so the callback finds its driver here instead of holding it.
_DRIVERS: dict[str, _SearchDriver] = {}


def _driver_of(parent_run_id: str) -> _SearchDriver | None:
    driver = _DRIVERS.get(parent_run_id)
    if driver is None:
        log.warning("no driver for search run %s: its trials are not finalised", parent_run_id)
    return driver


def _search_callback(parent_run_id: str, max_failures: int = 1):
    """The Tune callback of a search: hands each ended trial to its :class:`_SearchDriver`,
    and lets Tune retry (up to ``max_failures`` times) only trials that have a checkpoint.

    A trial that fails before its first checkpoint failed in its start-up (a config the data
    refuse, a missing file): a retry from scratch fails alike and doubles a failing search's
    time. Retries are for trials lost mid-run (a worker or node gone), which continue from
    their checkpoint.
    """
    from ray.tune import Callback

    # Tune pickles its callbacks with the experiment: this class holds only the run id and the
    # retry limit, and reaches the driver through module-level functions (pickled by
    # reference, not by value).
    class FinaliseTrials(Callback):
        def setup(self, **info):
            # called once Tune's SIGINT handler is in place, before the first step
            if (driver := _driver_of(parent_run_id)) is not None:
                driver.sigint.wrap_tunes_handler()

        def on_step_end(self, iteration, trials, **info):
            if (driver := _driver_of(parent_run_id)) is not None:
                driver.observe(trials)

        def on_trial_start(self, iteration, trials, trial, **info):
            # Tune decides on a retry with the trial's own max_failures (Trial.should_recover)
            trial.max_failures = max_failures if trial.has_checkpoint() else 0

        def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
            trial.max_failures = max_failures

        def on_trial_complete(self, iteration, trials, trial, **info):
            if (driver := _driver_of(parent_run_id)) is not None:
                driver.finalise(trial.trial_id, trial.config)

        def on_trial_error(self, iteration, trials, trial, **info):
            if (driver := _driver_of(parent_run_id)) is not None:
                driver.finalise(trial.trial_id, trial.config, _error_line(trial))

    return FinaliseTrials()


@contextmanager
def _loopback_node():
    # Ray replaces a loopback node address by the host's network address (so that other nodes
    # could join) unless its cluster switch is off; the switch is read once, at import, from
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER. It is turned off for this ray.init only, rather than
    # by setting that variable in the user's environment.
    from ray._private import ray_constants

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):  # a Ray without the switch
        yield
        return
    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def check_ray_address(address: str | None, flag: str, timeout_s: float = 5.0) -> None:
    """Refuses a Ray head that does not accept a TCP connection within ``timeout_s``.

    ``ray.init`` retries an unreachable head for minutes before it fails. ``host:port`` and
    ``ray://host:port`` (a Ray Client server) are probed; other forms (``auto``, ``local``,
    none) name no port to probe and are left to Ray.

    Raises:
        ValueError: naming ``flag``, the address and the connection error.
    """
    if not address or ("://" in address and not address.startswith("ray://")):
        return
    where = _host_port(address.removeprefix("ray://"))
    if where is None:
        return
    try:
        with socket.create_connection(where, timeout=timeout_s):
            pass
    except OSError as e:
        raise ValueError(
            f"{flag} {address}: no Ray head answers there ({e.strerror or e}); start the "
            "cluster (ray start --head) or pass the address its head printed, or drop "
            f"{flag} to run on a local Ray"
        ) from None


def _refused_token(err: BaseException) -> bool:
    """Whether ``err`` or an exception it was raised from is Ray's missing/wrong token."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if "InvalidAuthToken" in str(err) or type(err).__name__ == "AuthenticationError":
            return True
        err = err.__cause__ or err.__context__
    return False


def init_ray(address: str | None = None, **kwargs: Any) -> str:
    """Connects this process to Ray; returns the cluster's (GCS) address.

    With ``address`` (or ``$RAY_ADDRESS``): joins that cluster. Without: starts a new local
    instance whose servers (GCS, raylet, workers, agents) listen on 127.0.0.1 only, so nothing
    on the network can submit work to it. It never joins a Ray that merely happens to run on
    this machine (plain ``ray.init()`` would join the latest ``ray start`` instance): a cluster
    is always named explicitly.

    Args:
        address: ``host:port`` of a Ray cluster's head, or None.
        **kwargs: More ``ray.init`` arguments (e.g. ``num_cpus``).

    Raises:
        ValueError: The head at ``host:port`` does not answer (:func:`check_ray_address`), or
            refuses this client's authentication token.
    """
    import ray

    flag = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS")
    opts = {"include_dashboard": False, "log_to_driver": False, **kwargs}
    with _sigterm_handler_kept():
        _init(ray, address, flag, opts)
    return ray.get_runtime_context().gcs_address


@contextmanager
def _sigterm_handler_kept() -> Iterator[None]:
    """A Python SIGTERM handler set before ``ray.init`` (a command's, which stops it as Ctrl-C
    does: :func:`bldseg.commands.sigterm_as_ctrl_c`) is set again after it.

    ``ray.init`` puts its own in its place (and its core worker a native crash handler): a job
    scheduler's SIGTERM then aborted a search or a pipeline with exit 134, its MLflow runs left
    RUNNING, without the line saying how to continue. Setting the handler again gives the
    signal back to Python, and to it. Where none was set (the default action), Ray's stays.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if before not in (None, signal.SIG_DFL):  # a handler, or SIG_IGN (nohup-like)
            signal.signal(signal.SIGTERM, before)


#: Whether this process's Ray is a local instance it started (:func:`init_ray` without an
#: address): its servers share the command's process group, so a job scheduler's stop signal
#: ends them too. Read by every search in the process (a pipeline's later stages find Ray up).
_RAY_STARTED_HERE = {"local": False}


def _init(ray: Any, address: str | None, flag: str, opts: dict[str, Any]) -> None:
    """``ray.init`` on ``address`` (joined, its token refusal named) or a local instance."""
    _RAY_STARTED_HERE["local"] = not address
    if address:
        check_ray_address(address, flag)
        try:
            ray.init(address=address, **opts)
        except ConnectionError as e:
            if not _refused_token(e):
                raise
            # Ray says only "Failed to connect to Ray cluster at ..."; the reason (a head
            # started with `ray start` wants its token) is two causes down its chain
            raise ValueError(
                f"{flag} {address}: the Ray head refused this client's authentication token "
                f"(RAY_AUTH_MODE={os.environ.get('RAY_AUTH_MODE', 'unset')}); set "
                "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH to a file holding the token "
                "`ray get-auth-token` prints on the head"
            ) from None
    else:
        with _loopback_node():
            ray.init(address="local", _node_ip_address="127.0.0.1", **opts)


def _latest(storage: Path, space: str) -> Path:
    """The most recently recorded search of ``space`` under ``storage`` (``--resume`` without
    ``--name``): by each record's space, so a search given its own ``--name`` is found too,
    not only the default ``<space>-<timestamp>`` names."""

    damaged: list[tuple[Path, str]] = []  # (record, why it cannot be read)

    def of_space(record: Path) -> bool:
        try:
            recorded = read_search_record(record).get("spec", {}).get("space")
        except ValueError as e:  # which space it holds cannot be told: decided below
            damaged.append((record, str(e)))
            return False
        # a record without its spec (older versions): the default name says the space
        return recorded == space if recorded else record.parent.name.startswith(f"{space}-")

    candidates = sorted(
        (p for p in storage.glob(f"*/{META_FILE}") if of_space(p)), key=lambda p: p.stat().st_mtime
    )
    newest = candidates[-1].stat().st_mtime if candidates else -math.inf
    newer = [why for p, why in damaged if p.stat().st_mtime > newest]
    if newer:
        # it may be the latest search of this space: resuming an older one would be a guess
        raise ValueError(
            f"--resume without --name looks for the latest {space} search under {storage}, "
            f"and the record of a newer search cannot be read: {newer[-1]} Pass --name to "
            "resume a search by its name"
        )
    if not candidates:
        raise FileNotFoundError(f"--resume: no {space} search under {storage}; pass --name")
    return candidates[-1].parent


def _resumed_folder(storage: Path, name: str, shown: int = 5) -> Path:
    """The folder of the search ``--resume --name NAME`` continues.

    Raises:
        FileNotFoundError: ``storage`` holds no search of that name; the message names the
            searches it does hold (the newest first), as a mistyped name or ``--storage`` is
            the usual cause.
    """
    exp_dir = storage / name
    if (exp_dir / META_FILE).is_file():
        return exp_dir
    records = sorted(
        storage.glob(f"*/{META_FILE}"), key=lambda p: (-p.stat().st_mtime, p.parent.name)
    )
    names = [p.parent.name for p in records]
    if names:
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        there = f"; searches there: {', '.join(names[:shown])}{more}"
    else:
        there = "; it holds no search" if storage.is_dir() else f"; {storage} does not exist"
    # a folder of that name without the record: a search refused before it started, or
    # something else than a search
    not_one = f"; {exp_dir} is no search (it has no {META_FILE})" if exp_dir.exists() else ""
    raise FileNotFoundError(
        f"no search {name} under {storage} to resume (check --storage and --name){not_one}{there}"
    )


def _open_parent(
    client,
    experiment_id: str,
    name: str,
    meta: dict[str, Any] | None,
) -> tuple[str, str] | None:
    """``(run_id, experiment_id)`` of the parent run of an existing search, found by its name
    tag (or, for a search started before the tag existed, by the id in its results folder)."""
    run = tracking.find_search_run(client, experiment_id, name)
    if run is None and meta and meta.get("parent_run_id"):
        try:
            run = client.get_run(meta["parent_run_id"])
        except Exception as e:  # MLflow raises several types for a run it does not hold
            log.warning("--resume: parent run %s not found (%s)", meta["parent_run_id"], e)
    if run is None:
        return None
    client.update_run(run.info.run_id, status="RUNNING")
    return run.info.run_id, run.info.experiment_id


def _tracking_uri(spec: SearchSpec, project: Path, meta: dict[str, Any] | None) -> str:
    """The absolute MLflow URI of a search: a resumed one's is its record's (``meta``), so its
    runs stay in one store wherever the resume starts (a default URI is the current folder's).

    A recorded sqlite file that no longer exists (moved or deleted) is not opened again (that
    would make a new, empty database there, and its folder): ``--tracking-uri`` must say where
    the search logs now.

    Raises:
        ValueError: ``--tracking-uri`` names another store than the resumed search's, or it is
            not given and the resumed search's sqlite file is gone.
    """
    recorded = (meta or {}).get("tracking_uri")
    if recorded:
        recorded = tracking.absolute_uri(recorded)
    db = _gone_database(meta)
    gone = db is not None
    if spec.tracking_uri:
        uri = tracking.absolute_uri(spec.tracking_uri)
        if gone and uri != recorded:
            log.warning(
                "--resume: search %s logged to %s, which no longer exists; it logs to "
                "--tracking-uri %s from now on",
                spec.name or spec.space,
                recorded,
                uri,
            )
            return uri
        if recorded and uri != recorded:
            raise ValueError(
                f"--resume: search {spec.name or spec.space} logs to MLflow at {recorded}, not "
                f"at --tracking-uri {uri}; leave --tracking-uri out (or pass the recorded one) so "
                "that its runs stay in one store"
            )
        return uri
    if gone:
        raise ValueError(
            f"--resume: search {spec.name or spec.space} logs to MLflow at {recorded}, but {db} "
            "no longer exists (moved or deleted); pass --tracking-uri with its new place "
            "(--tracking-uri sqlite:////new/place/mlflow.db), or a new store for the rest of "
            "the search"
        )
    return recorded or tracking.default_tracking_uri(project)


def _gone_database(meta: dict[str, Any] | None) -> Path | None:
    """The sqlite file a resumed search's record logs to, when it no longer exists."""
    recorded = (meta or {}).get("tracking_uri")
    db = tracking.sqlite_path(tracking.absolute_uri(recorded)) if recorded else None
    return db if db is not None and not db.exists() else None


def _warn_artifacts_left_behind(client, experiment_id: str, gone: Path, uri: str) -> None:
    """Warns when an MLflow experiment keeps its artifacts beside a database that was moved
    (``gone``, now ``uri``): MLflow records an experiment's artifact folder once, absolute, so
    the search's artifacts still go to the old place (and make it again)."""
    location = client.get_experiment(experiment_id).artifact_location or ""
    if location.startswith("file:"):
        folder = Path(url2pathname(urlparse(location).path))
    elif "://" not in location and Path(location).is_absolute():
        folder = Path(location)
    else:
        return  # a server's or an object store's: not tied to the database's folder
    if not folder.is_relative_to(gone.parent):
        return
    db = tracking.sqlite_path(uri)
    if db is not None and not gone.parent.exists():
        how = f"link the old folder to the new one ({_link_command(db.parent, gone.parent)})"
    else:
        how = "keep that folder where it is, or log the rest of the search to a new store"
    log.warning(
        "MLflow keeps the artifacts of experiment %s in %s, beside the database's old place: "
        "this search's artifacts (plots, trials.csv) are written there, not beside %s; %s",
        experiment_id,
        folder,
        uri,
        how,
    )


def _link_command(target: Path, link: Path) -> str:
    """A shell command that makes ``link`` point to ``target``: at the highest folder of
    ``link`` that is missing, when both paths end alike (a whole ``--storage`` folder moved)."""
    while (
        not link.parent.exists()
        and link.name == target.name
        and link.parent != link
        and target.parent != target
    ):
        link, target = link.parent, target.parent
    make = "" if link.parent.exists() else f"mkdir -p {shlex.quote(str(link.parent))} && "
    return f"{make}ln -s {shlex.quote(str(target))} {shlex.quote(str(link))}"


def check_resumed_folder(exp_dir: Path, meta: dict[str, Any]) -> None:
    """Refuses to resume a search from another folder than the one it started in.

    Ray Tune's saved state holds the folder the search started in: a search moved (or a shared
    drive mounted elsewhere) is restored, but its new trials set up their storage at the old
    path and fail, every one. The old path leading to the new folder (a link) is accepted. A
    record from before the folder was kept (no ``path``) is not checked.

    Args:
        exp_dir: The search's results folder now (absolute).
        meta: Its record (``bldseg_search.json``).

    Raises:
        ValueError: The recorded folder is not this one, naming both and how to go on.
    """
    started_in = meta.get("path")
    if not started_in or Path(started_in) == exp_dir:
        return
    try:
        if os.path.samefile(started_in, exp_dir):
            return  # the old path is a link to the new folder (or the new one to the old)
    except OSError:  # nothing at the old path any more
        pass
    name = exp_dir.name
    if Path(started_in).exists():
        how = (
            f"the search is still there: resume it there (--storage "
            f"{shlex.quote(str(Path(started_in).parent))}), or remove that copy and link it to "
            f"this folder ({_link_command(exp_dir, Path(started_in))})"
        )
    else:
        how = (
            "move the folder back, or link the old path to the new place "
            f"({_link_command(exp_dir, Path(started_in))}), then resume again"
        )
    raise ValueError(
        f"--resume {name}: the search started in {started_in}, not in {exp_dir}; Ray Tune's "
        f"saved state holds that path, so its new trials would fail: {how}"
    )


#: Ray Tune's saved state of a search, as ``Tuner.restore`` and ``fit()`` read it back: the
#: Tuner (``tuner.pkl``), then the newest file of each session-stamped kind (experiment state,
#: searcher wrapper, searcher), with the loader Tune uses for it.
_TUNE_STATE = (
    ("tuner.pkl", "pickle"),
    ("experiment_state-*.json", "json"),
    ("search_gen_state-*.json", "pickle"),  # a pickle, whatever its name says
    ("searcher-state-*.pkl", "pickle"),
)


def _unreadable(path: Path, loader: str) -> str | None:
    """Why Tune could not read ``path`` back (None: it can)."""
    try:
        with open(path, "rb") as f:
            if loader == "json":
                json.loads(f.read())
            else:
                pickle.load(f)
    except Exception as e:  # unpickling raises many types; each means Tune's read fails too
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return None


def check_resumed_state(exp_dir: Path) -> None:
    """Refuses to resume a search whose Ray Tune state cannot be read back.

    A truncated file there (a full disk, a process killed while copying the folder) was not
    refused: Tune, failing to read its experiment or searcher state, logs "Failed to restore
    the run state" and starts the search again from nothing, so the finished trials dropped
    out of it, new ones trained beside them, and the saved state was replaced by the new
    one's; an unreadable ``tuner.pkl`` ended in a traceback once the search's MLflow run had
    been reopened. A search whose trials have started also needs ``tuner.pkl`` and an
    experiment state: without them Tune starts it again just the same.

    Args:
        exp_dir: The search's results folder.

    Raises:
        ValueError: A file is missing or cannot be read, naming it and what is left.
    """
    trials = sorted(exp_dir.glob("trial_*"))
    problems = []
    for pattern, loader in _TUNE_STATE:
        found = sorted(exp_dir.glob(pattern))
        if not found:
            if trials and pattern in ("tuner.pkl", "experiment_state-*.json"):
                problems.append(f"{exp_dir / pattern} is missing")
            continue
        # Tune reads the newest by name (they are stamped with their session's start)
        if (why := _unreadable(found[-1], loader)) is not None:
            problems.append(f"{found[-1]} cannot be read ({why})")
    if not problems:
        return
    table = exp_dir / "trials.csv"
    start_from = (
        f", e.g. one from this search's best trial (--from {shlex.quote(str(exp_dir))})"
        if table.is_file()
        else ""
    )
    raise ValueError(
        f"--resume {exp_dir.name}: Ray Tune's saved state of the search is damaged (a full disk, "
        f"a copy cut short?): {'; '.join(problems)}. Tune would start the search again from "
        f"nothing, without its {len(trials)} trial(s), so it cannot be continued. Its trials' "
        f"run folders are kept ({exp_dir / 'trial_*' / 'run'}): start a new search (another "
        f"--name){start_from}"
    )


def check_resumed_data(
    name: str,
    meta: dict[str, Any],
    fingerprint: str,
    data: str | None,
    content: str | None = None,
) -> None:
    """Refuses to resume a search on training data other than those it started on.

    Its trials are compared with each other: resumed on other data, the table would mix
    models of two datasets. The cache's fingerprint also changes when bldseg decodes masks
    differently (:data:`bldseg.data.readers.DECODE_RULES`), through no change of the user's:
    the record's ``decode_rules`` tells the two apart (a record from before it was kept
    cannot, and says both).

    Args:
        name: The search.
        meta: Its record (``bldseg_search.json``).
        fingerprint: The training cache's fingerprint now.
        data: The recorded data source (None: the built-in synthetic world).
        content: The training cache's content digest now; it decides where the record has
            one too (:func:`~bldseg.train.resume_checks.check_same_data`).

    Raises:
        ValueError: The data differ.
    """
    check_same_data(
        f"--resume {name}",
        "search",
        meta,
        fingerprint,
        data,
        consequence="its trials would compare models trained on different data",
        remedy="start a new search (another --name)",
        content=content,
    )


def _sessions(meta: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The sessions a search's record lists (none in a new search's, or an older bldseg's)."""
    return list((meta or {}).get("sessions") or [])


def _record_session(
    exp_dir: Path, parent_run_id: str, wall_s: float, end: str, slots: int | None = None
) -> None:
    """Adds a session of the search (its wall time, how it ended) to the search's record
    (:data:`META_FILE`, rewritten atomically), so that a resume counts the time spent before.

    Only into the record of this search's parent run: a folder another search made meanwhile
    (see the exclusive mkdir in :func:`_run_search`) is left alone.

    Args:
        exp_dir: The search's results folder.
        parent_run_id: The search's parent run.
        wall_s: This session's wall time.
        end: ``"finished"``, ``"interrupted"``, ``"failed"`` or ``"cluster lost"``.
        slots: The trial slots the session had (what its overhead figure divides by).
    """
    path = exp_dir / META_FILE
    session: dict[str, Any] = {"wall_s": wall_s, "end": end}
    if slots is not None:
        session["slots"] = slots
    try:
        meta = _read_json(path, None)
        if meta is None or meta.get("parent_run_id") != parent_run_id:
            return
        meta["sessions"] = [*_sessions(meta), session]
        write_json(path, meta, default=str)
    except (OSError, ValueError) as e:  # ValueError: a damaged record (JSON)
        # a by-product: it must not take the place of the search's result or error
        log.warning("could not record the wall time of this session in %s: %s", path, e)


def check_pretrained(cfg: RunConfig, searched: set[str]) -> None:
    """Refuses a ``--pretrained`` file that does not fit the model every trial builds, before
    any trial starts (each would fail the same way, after Ray and the data had started).

    The model is built once here, on the CPU, as a trial builds it; the global random state is
    left as it was. A space that searches the model is not checked (the ``models`` space refuses
    ``--pretrained`` itself).

    Raises:
        CheckpointMismatchError: (a ValueError) The file does not fit ``cfg.model``; its message
            lists the bad keys and names the model the file is for.
        FileNotFoundError: No file at ``cfg.pretrained``.
        ValueError: An unsafe or unreadable file.
    """
    if cfg.pretrained is None or "model" in searched:
        return
    import torch

    from bldseg.models import create_model

    with torch.random.fork_rng(devices=[]):
        create_model(cfg.model, pretrained=cfg.pretrained, **cfg.model_kwargs())


def check_trials_on_data(space, base: dict[str, Any], cache: DatasetCache) -> None:
    """Makes the checks of a config against the data that each trial makes before it trains,
    once, before the search starts: :func:`~bldseg.train.engine.checked_config` (for every fold
    of a K-fold trial, as :func:`~bldseg.train.folds.fit_folds` makes them).

    Left to the trials, a crop or a ``val_tile`` larger than the images failed every trial
    (each retried), after the search's MLflow run and results folder existed: the corrected
    command was then refused its name, and ``--resume`` brought the bad value back. Checked
    are the fixed config and the space's samples, each numeric parameter also at both ends of
    its range (a searched ``aug.crop_size`` up to more than the images' side).

    Args:
        space: The define-by-run space (:func:`get_space`).
        base: The flat run config fixed for every trial.
        cache: The training data's cache.

    Raises:
        ValueError: A fixed value the data refuse (the message of the check, naming the
            setting), or a space whose samples or range ends they refuse (naming the space,
            the parameter and its range).
    """
    from bldseg.train.augment import blur_problem
    from bldseg.train.engine import checked_config
    from bldseg.train.folds import fold_config

    def check(cfg: RunConfig) -> None:
        # warnings (a split far from val_fraction) are each trial's to give, in its own log
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if (why := blur_problem(cfg.aug)) is not None:
                raise ValueError(why)
            for fold in range(cfg.folds) if cfg.folds >= 2 else [None]:
                checked_config(cfg if fold is None else fold_config(cfg, fold), cache)

    try:
        check(RunConfig.from_flat(base))
    except ValueError as e:
        fixed: ValueError | None = e
    else:
        fixed = None
    try:
        # 4 samples: each with its range ends is some 20 configs, and a check splits the data
        validate_space(space, base, samples=4, check=check)
    except ValueError as e:
        if fixed is not None and str(e.__cause__) == str(fixed):
            # the trials fail on the fixed value (the space leaves it as it is): name only it
            raise fixed from None
        raise
    # passed with a refused fixed value: the space replaces it in every trial, none trains it


def _refuse_data_early(data: str | None, options: DataOptions, data_root: str) -> None:
    """Refuses a new search's data that :func:`prepare_data` refuses without reading a file: a
    ``--data`` that does not exist or is no layout bldseg knows, an image folder without
    labels. Called before the tracking store is opened: it made mlflow.db (and its lock) in
    the current folder for a command it then refused."""
    kind = detect_data(data, options)
    if kind == "folders" and folder_layout(data, options)[1:] == (None, None):
        # refused there, naming the folder and the flags to pass, before any file is read
        prepare_data(data, options=options, data_root=data_root, progress=False, test_split=False)


def _trials_started(exp_dir: Path) -> bool:
    """Whether Tune made a trial folder in a search's folder (a trial started, or was to)."""
    return any(exp_dir.glob("trial_*"))


def _remove_unstarted(exp_dir: Path) -> None:
    """Removes the folder of a new search that failed before any trial started."""
    try:
        shutil.rmtree(exp_dir)
    except OSError as e:  # the search's own error is the one to show
        log.warning("could not remove %s, left by the failed search: %s; remove it", exp_dir, e)


def _ended_short(driver: _SearchDriver, grid, n_trials: int) -> bool:
    """Whether Tune returned before every trial of the ``n_trials`` had ended."""
    if driver.unfinished is None:  # no step ran (a restored search that had ended): its states
        ended = grid.num_terminated + grid.num_errors
        return len(grid) < n_trials or ended < len(grid)
    # Not the trials' states after fit(): Tune marks the trials it stops on the way out as
    # terminated, so only the last step's view tells an interruption from an end.
    return bool(driver.unfinished) or driver.n_trials < n_trials


def _interrupted(driver: _SearchDriver, grid, n_trials: int) -> bool:
    """Whether Ctrl-C (or SIGTERM, raised as one) ended Tune's loop before every trial ended:
    Tune's SIGINT handler ends the tuning loop, saves the experiment and returns normally.

    Only a signal Tune's handler caught counts (:class:`_TuneSigint`): a search that Tune
    ended short without one (Ray restarted it from nothing, its saved state unreadable) was
    called interrupted, and every --resume of it exited 130 again, training nothing.
    """
    return driver.sigint.caught and _ended_short(driver, grid, n_trials)


def run_search(spec: SearchSpec) -> SearchResult:
    """Runs (or resumes) a search; returns its trial table and the best trial.

    A search in which no trial completed returns normally: its result has ``n_completed == 0``,
    an empty ``best`` and the reason in ``first_failure`` (the caller decides; the CLI exits
    non-zero).

    Raises:
        SearchInterrupted: Ctrl-C; the experiment state is saved, the MLflow runs are marked
            KILLED, and ``resume=True`` with the same ``name`` continues the search. A Ctrl-C
            that came after every trial had ended leaves the search recorded as finished
            (its MLflow runs too), and the exception holds its result (``result``).
        RuntimeError: The MLflow tracking store is unreachable (before any trial starts).
        ValueError: An invalid space, base config or option (named), or one the data refuse
            (:func:`check_trials_on_data`); a resume whose record or Ray Tune state is
            damaged (:func:`read_search_record`, :func:`check_resumed_state`), before anything
            is opened or rewritten. A new search refused or failed before any trial
            started leaves no results folder (its MLflow run, if it had one, is FAILED):
            the corrected command can reuse its name.
    """
    if spec.trials < 1:
        raise ValueError(f"trials={spec.trials}: a search needs at least 1 trial (--trials)")
    if spec.epochs < 1:
        raise ValueError(f"epochs={spec.epochs}: a trial needs at least 1 epoch (--epochs)")
    if spec.scheduler == "asha" and (spec.grace_period < 1 or spec.reduction_factor < 2):
        raise ValueError(
            f"grace_period={spec.grace_period}, reduction_factor={spec.reduction_factor}: ASHA "
            "needs a grace period of at least 1 epoch and a factor of at least 2 "
            "(--grace-period, --reduction-factor)"
        )
    if spec.name is not None and (problem := name_problem(spec.name)) is not None:
        raise ValueError(f"--name {spec.name!r} {problem}")
    # NaN fails both: Ray would leave such trials PENDING forever, or fail far from the flag
    if not spec.cpus_per_trial > 0:
        raise ValueError(
            f"cpus_per_trial={spec.cpus_per_trial}: each trial needs a positive number of CPUs "
            "(--cpus-per-trial, e.g. 1)"
        )
    if not (spec.gpus_per_trial >= 0 and math.isfinite(spec.gpus_per_trial)):
        raise ValueError(
            f"gpus_per_trial={spec.gpus_per_trial}: GPUs per trial must be 0 (none) or more, "
            "fractions sharing a GPU (--gpus-per-trial, e.g. 0.5)"
        )
    if spec.base.get("fold", 0) != 0:
        # a K-fold trial trains all its folds; the value would be ignored by every trial
        raise ValueError(
            f"fold={spec.base['fold']}: a search trains every fold of --folds K in each trial; "
            "remove fold (bldseg train --folds K --fold F trains one fold)"
        )
    for key in spec.base:
        if (problem := section_key_problem(key)) is not None:
            raise ValueError(f"the search's fixed config (--set {key}=...): {problem}")
    if not spec.tracking_timeout_s > 0:
        raise ValueError(
            f"tracking_timeout_s={spec.tracking_timeout_s}: the wait on a silent tracking server "
            "must be positive (--tracking-timeout)"
        )
    # Optuna's samplers seed numpy (0 to 2**32 - 1); Ray's and numpy's own refusals came once
    # Ray had started, without naming the flag
    if not (isinstance(spec.seed, numbers.Integral) and 0 <= spec.seed < 2**32):
        raise ValueError(
            f"seed={spec.seed!r}: the searcher seed must be a whole number from 0 to 2**32 - 1 "
            "(--seed, e.g. 0)"
        )
    if not (isinstance(spec.max_concurrent, numbers.Integral) and spec.max_concurrent >= 0):
        raise ValueError(
            f"max_concurrent={spec.max_concurrent!r}: the most trials at once must be 1 or more, "
            "or 0 for as many as the resources allow (--max-concurrent)"
        )
    if not spec.resume:
        # an unknown key or a bad value, named before the tracking store is opened (it made
        # mlflow.db in the current folder for a command it then refused)
        RunConfig.from_flat({**spec.base, "epochs": spec.epochs})
    with _quiet_libraries():
        return _run_search(spec)


def _recorded_experiment(meta: dict[str, Any] | None) -> str | None:
    """The MLflow experiment a recorded search logged to (None: a new search): the one its
    parent run was made in, else the one its settings named (records before the first)."""
    if meta is None:
        return None
    return meta.get("experiment") or (meta.get("spec") or {}).get("experiment")


def _run_search(spec: SearchSpec) -> SearchResult:
    import ray
    from ray import tune

    from bldseg.train.plots import tiles_from_cache

    t0 = time.perf_counter()
    project = Path(spec.project_dir).resolve()
    storage = Path(spec.storage).resolve()
    meta: dict[str, Any] | None = None
    if spec.resume:
        exp_dir = _resumed_folder(storage, spec.name) if spec.name else _latest(storage, spec.space)
        meta = read_search_record(exp_dir / META_FILE)
        spec = replace(spec, name=exp_dir.name)
        # before Ray, the tracking store or the data
        check_resumed_folder(exp_dir, meta)
        check_resumed_state(exp_dir)
    else:  # a resume's data is the recorded one, checked against the record once prepared
        _refuse_data_early(spec.data, spec.data_options, spec.data_root)
    uri = _tracking_uri(spec, project, meta)
    # fail fast, before Ray or data; the experiment its runs log to (a resume's recorded one)
    experiment = _recorded_experiment(meta) or spec.experiment
    client = tracking.check_tracking(uri, experiment=experiment)
    gone_db = _gone_database(meta)  # a resume given the new place of its moved database

    if meta is not None:
        # the search goes on as it was started, whatever today's defaults and flags say
        spec = resumed_spec(spec, meta)
        name = exp_dir.name
        base = meta["base"]
        data_options = without_unread_options(
            base.get("data"),
            DataOptions.from_dict(meta["spec"].get("data_options") or {}),
            f"the search {name}",
        )
        experiment = _recorded_experiment(meta) or spec.experiment
        n_trials = int(meta["spec"].get("trials", spec.trials))
    else:
        name = spec.name or f"{spec.space}-{time.strftime('%Y%m%d-%H%M%S')}"
        exp_dir = storage / name
        if exp_dir.exists():
            raise ValueError(f"{exp_dir} exists: pass --resume to continue it, or a new --name")
        # absolute: a resume may start in another folder
        data_path = str(Path(spec.data).resolve()) if spec.data else None
        base = {**spec.base, "epochs": spec.epochs, "data": data_path}
        # its folders too (--images, --masks): --from and --resume may run in another folder
        spec = replace(spec, data_options=absolute_folders(spec.data_options))
        data_options = spec.data_options
        RunConfig.from_flat(base)  # a bad fixed value fails here, naming it
        experiment = spec.experiment
        n_trials = spec.trials
    max_epochs = int(base["epochs"])
    space = get_space(spec.space, base)
    searched = validate_space(space, base)
    overridden = sorted(searched.intersection(spec.user_keys))
    if overridden:
        # {**base, **config}: a trial's sampled value goes over the fixed one
        # a space bound to the base (get_space) may centre its range on the given value
        centred = " (its range is centred on the given optim.lr)" * (
            "optim.lr" in overridden and bool(base.get("pretrained")) and hasattr(space, "func")
        )
        log.warning(
            "the %s space searches %s: each trial uses the space's value, not the one given "
            "with --set/--model%s",
            spec.space,
            ", ".join(overridden),
            centred,
        )
    # Whatever can refuse the search is checked before its MLflow run, folder and record exist
    # (here, and the cluster's resources below): a refused search leaves nothing behind, so the
    # corrected command can take its name again (a --resume would restore the refused setting).
    # A restored Tuner keeps its own searcher and scheduler; these check the recorded settings.
    searcher, scheduler = _make_searcher(spec, space), _make_scheduler(spec)

    data = prepare_data(
        base.get("data"),
        options=data_options,
        data_root=spec.data_root,
        verbose=True,
        split_group=base.get("split_group"),
        test_split=False,  # no trial reads the test split: not cached for them
    )
    started_on = (meta or {}).get("data_fingerprint")
    if meta is not None:
        check_resumed_data(name, meta, data.train.fingerprint, base.get("data"), data.train.content)
    fixed = RunConfig.from_flat(base)
    if fixed.folds >= 2:  # more folds than source scenes: refused before any trial starts
        from bldseg.data.dataset import fold_assignment, split_groups

        groups = split_groups(data.train, fixed.split_group)
        fold_assignment(len(data.train), fixed.folds, fixed.split_seed, groups)
    try:
        check_trials_on_data(space, base, data.train)
    except ValueError as e:
        if meta is None:
            raise
        # its trials would only fail again: the corrected value needs a new search
        raise ValueError(
            f"--resume {name}: {e}. The search was started with this setting, so its trials "
            "cannot train: start a new search (another --name) with it corrected"
        ) from None
    if meta is None:
        # a resume's trials continue from last.pt and may never read the file again
        check_pretrained(fixed, searched)
    if not ray.is_initialized():
        init_ray(spec.address)
    # a local instance this process started (for this search, or a pipeline's earlier stage)
    local_ray = _RAY_STARTED_HERE["local"]
    # A trial the cluster can never place waits forever (Ray only logs every minute).
    total = ray.cluster_resources()
    for flag, key, want in (
        ("--cpus-per-trial", "CPU", spec.cpus_per_trial),
        ("--gpus-per-trial", "GPU", spec.gpus_per_trial),
    ):
        if want > total.get(key, 0.0):
            raise ValueError(
                f"{flag} {want:g}: the Ray cluster has {total.get(key, 0.0):g} {key}(s) in "
                "all, so no trial could start; ask for fewer or add nodes"
            )
    # trial slots the cluster offers: the denominator of the overhead figure
    slots = int(total.get("CPU", 1) // max(spec.cpus_per_trial, 1e-9))
    if spec.max_concurrent:
        slots = min(slots, spec.max_concurrent)
    experiment_id = tracking.ensure_experiment(client, experiment, uri, project)
    # the commit of the code that runs (bldseg's checkout), not of the folder it runs in
    source = tracking.source_tags(CODE_DIR)
    found = _open_parent(client, experiment_id, name, meta) if spec.resume else None
    if found is not None:
        parent_run_id, experiment_id = found
    else:
        if spec.resume:
            log.warning("--resume: no MLflow run of search %s; starting a new one", name)
        parent = client.create_run(
            experiment_id,
            run_name=name,
            tags={
                "bldseg.kind": "search",
                tracking.SEARCH_TAG: name,
                "bldseg.space": spec.space,
                "model": base.get("model", "default"),
                "data_fingerprint": data.train.fingerprint,
                **source,
                **spec.parent_tags,
            },
        )
        parent_run_id = parent.info.run_id

    resume_hint = (
        f"search {name!r} was interrupted; its state is saved: continue it with --resume "
        f"--name {name} (MLflow experiment {experiment!r}, run {parent_run_id})"
    )
    driver = _SearchDriver(
        uri,
        experiment_id,
        parent_run_id,
        exp_dir,
        max_epochs,
        base,
        tiles_from_cache(data.train),
        spec.tracking_timeout_s,
    )
    _DRIVERS[parent_run_id] = driver
    created = False  # whether this session made the search's folder (a new search)
    # From here the parent run is RUNNING: whatever fails ends it (and its children) below.
    try:
        if gone_db is not None:
            _warn_artifacts_left_behind(client, experiment_id, gone_db, uri)
        if found is None:
            # The constants of every trial once, here; children carry only the searched values.
            constants = {
                k: v for k, v in RunConfig.from_flat(base).to_flat().items() if k not in searched
            }
            settings = (
                "space",
                "trials",
                "search",
                "scheduler",
                "grace_period",
                "reduction_factor",
                "seed",
            )
            tracking.log_params(
                client,
                parent_run_id,
                {**constants, **{f"search.{k}": getattr(spec, k) for k in settings}},
            )
        # rewritten for a new parent run, or a store that replaced a recorded one now gone
        recorded_uri = (meta or {}).get("tracking_uri")
        if (
            meta is None
            or meta.get("parent_run_id") != parent_run_id
            or (recorded_uri and tracking.absolute_uri(recorded_uri) != uri)
        ):
            try:
                # A new search's folder is made here, exclusively: another search started with
                # the same name since the check above (or in the same second, with the default
                # name) is refused rather than sharing it (atomic on NFS too).
                exp_dir.mkdir(parents=True, exist_ok=meta is not None)
            except FileExistsError:
                raise ValueError(
                    f"{exp_dir} was created by another search while this one prepared its data: "
                    "pass a new --name (or --resume to continue that one once it ends)"
                ) from None
            created = meta is None
            # atomically: a resume needs this file whole, and rewrites it for a new parent run
            write_json(
                exp_dir / META_FILE,
                {
                    "parent_run_id": parent_run_id,
                    "experiment_id": experiment_id,
                    "experiment": experiment,
                    "base": base,
                    "tracking_uri": uri,
                    # where Tune's saved state says the search is (check_resumed_folder); a
                    # record without it (an older search) is not given one that may be wrong
                    "path": str(exp_dir) if meta is None else meta.get("path"),
                    "data_fingerprint": started_on or data.train.fingerprint,
                    # what decides a resume where both have it (check_resumed_data): the same
                    # data read from another folder or regenerated keep it
                    "data_content": (meta or {}).get("data_content") or data.train.content,
                    # the fingerprint holds it too, but cannot tell it apart from the data
                    # (check_resumed_data); equal fingerprints mean the current rules
                    "decode_rules": readers.DECODE_RULES,
                    "spec": (meta or {}).get("spec") or asdict(spec),
                    # the wall time of the sessions before this one (see _record_session)
                    "sessions": _sessions(meta),
                },
                default=str,
            )
        db = tracking.sqlite_path(uri)
        on_network = tracking.network_filesystem(db.parent) if db is not None else None
        if on_network:
            # every trial process writes to it: sqlite's locks over a network filesystem can
            # hang the search or corrupt the database (one machine or many)
            log.warning(
                "the MLflow database %s is on a network filesystem (%s), where sqlite can lock "
                "up or corrupt: keep it on a local disk (--tracking-uri sqlite:////local/"
                "mlflow.db) or use an MLflow server (--tracking-uri http://...)",
                db,
                on_network,
            )
        elif uri.startswith("sqlite:") and sum(n.get("Alive", False) for n in ray.nodes()) > 1:
            log.warning(
                "trials on %d Ray nodes log to the sqlite file %s: every node must see it at "
                "that path, and sqlite on a network folder can lock up; an MLflow server "
                "(--tracking-uri http://...) is the safer store for a cluster",
                sum(n.get("Alive", False) for n in ray.nodes()),
                uri,
            )
        tags = {
            "data_fingerprint": data.train.fingerprint,
            "bldseg.space": spec.space,
            **source,
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
                tracking_timeout_s=spec.tracking_timeout_s,
            ),
            {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial},
        )
        if spec.resume and tune.Tuner.can_restore(str(exp_dir)):
            # A resume retries the trials that ended in an error (a lost node, a full disk, a
            # file fixed since), as Ray's resume_errored does: said, since a resume of a
            # finished search trains nothing else.
            tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_errored=True)
            retried = _errored_trials(tuner, exp_dir)
            if retried:
                print(
                    f"--resume: retrying {len(retried)} trial(s) of search {name} that ended in "
                    "an error: " + "; ".join(f"trial {t} ({why})" for t, why in retried.items()),
                    flush=True,
                )
        else:
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=searcher,
                    scheduler=scheduler,
                    num_samples=n_trials,
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
                    # two, not one: each trial keeps its latest checkpoint even while the next
                    # is being written (checkpoints are a few bytes: the weights stay in the run
                    # folder)
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                    callbacks=[_search_callback(parent_run_id, spec.max_failures)],
                    progress_reporter=_legacy_reporter(),
                    verbose=1,
                ),
            )
        gcs = ray.get_runtime_context().gcs_address

        pipeline_run = spec.parent_tags.get("bldseg.pipeline_run_id")
        # the process ends in cluster_lost, before a pipeline could say how it goes on
        lost_hint = (
            f"search {name!r} of a pipeline was interrupted; its state is saved: run the same "
            "bldseg pipeline command again to continue it"
            if pipeline_run
            else resume_hint
        )

        def cluster_lost(silent_s: float) -> None:
            # From the watch's thread while Tune's loop waits on the dead cluster: close what
            # the resume needs (the runs KILLED as after Ctrl-C, this session's wall time),
            # then end the process before Ray does so halfway through something.
            try:
                driver.tracker.submit(_stop_runs, experiment_id, parent_run_id, "KILLED")
                # a pipeline's stage: the process ends here, before the pipeline's own handler
                # could end its run, which stayed RUNNING
                if pipeline_run:
                    driver.tracker.submit(
                        lambda client: client.set_terminated(pipeline_run, status="KILLED")
                    )
                driver.tracker.close()
                _record_session(
                    exp_dir, parent_run_id, time.perf_counter() - t0, "cluster lost", slots
                )
            finally:
                if local_ray and driver.sigint.caught:
                    # A job scheduler's stop (Slurm, `timeout`) signals the whole process
                    # group, this search's local Ray servers with it: an interrupt, not a lost
                    # cluster to restart.
                    print(
                        "\ninterrupted: the stop signal also ended this search's local Ray "
                        "instance (a job scheduler signals the whole process group); the "
                        f"search's MLflow runs are marked KILLED. {lost_hint}",
                        file=sys.stderr,
                        flush=True,
                    )
                    os._exit(EXIT_INTERRUPTED)
                print(
                    f"\nerror: the Ray cluster at {gcs} has not answered for {silent_s:.0f} s "
                    "(its head node or processes are gone); the search's MLflow runs are marked "
                    f"KILLED. Restart the cluster, then: {lost_hint}",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(EXIT_CLUSTER_LOST)

        with ClusterWatch(gcs, cluster_lost), driver.sigint.around_fit():
            grid = tuner.fit()
        driver.drain()
        if _interrupted(driver, grid, n_trials):
            driver.tracker.submit(_stop_runs, experiment_id, parent_run_id, "KILLED")
            driver.close()
            _record_session(exp_dir, parent_run_id, time.perf_counter() - t0, "interrupted", slots)
            raise SearchInterrupted(resume_hint)
        if not driver.sigint.caught and _ended_short(driver, grid, n_trials):
            # nobody asked it to stop: a resume would end alike, so the search ends here
            log.warning(
                "Ray Tune ended search %s when %d of its %d trials had ended, though it was not "
                "interrupted (Tune's log above says why, e.g. 'Failed to restore the run "
                "state'): its results are those of these trials, and --resume would train no "
                "other; start a new search (another --name) for more",
                name,
                grid.num_terminated + grid.num_errors,
                n_trials,
            )
        # Trials Tune ended without a callback reaching the driver (a driver killed between
        # the two) are finalised now, from their run folders.
        for r in grid:
            trial_id = Path(r.path).name.removeprefix("trial_")
            record = _read_json(trial_run_dir(exp_dir, trial_id) / STATUS_FILE, {})
            if not record.get("final"):
                error = str(r.error).strip().splitlines()[-1] if r.error is not None else None
                driver.finalise(trial_id, r.config or {}, error or driver.errors.get(trial_id))
        driver.drain()
        # the run folders under exp_dir, not under Tune's paths: a restored search's trials
        # keep the paths Tune saved
        table = trial_table(grid, max_epochs, exp_dir, driver.errors)
        train_s = float(table["train_s"].sum()) if len(table) else 0.0
        usable = table[table["status"].isin(USABLE)] if len(table) else table
        best = usable.iloc[0].to_dict() if len(usable) else {}
        # The trial's own config, not the table's config/ columns: those widen to every
        # trial's keys (NaN where a trial has none, whole numbers as floats).
        best_config = next(
            (
                dict(r.config or {})
                for r in grid
                if best and Path(r.path).name.removeprefix("trial_") == best["trial_id"]
            ),
            {},
        )
        failed = table[~table["status"].isin(USABLE)] if len(table) else table
        first_failure = ""
        if len(failed):
            f = failed.sort_values("started", kind="stable").iloc[0]
            first_failure = f"trial {f['trial_id']} {f['status']}: {f['message']}"
        slots = max(1, min(slots, len(table)))
        # The figures are the whole search's: train_s holds the epochs of every session, so
        # the wall time does too (the sessions' own; the pauses between them are nobody's).
        # A resume of a search that had finished with no errored trial trains nothing (Tune
        # runs no step): it adds no session and keeps the recorded figures. One that retries
        # errored trials (resume_errored above) trains, and adds its session.
        earlier = _sessions(meta)
        if driver.unfinished is None and earlier and earlier[-1].get("end") == "finished":
            slots = int(earlier[-1].get("slots", slots))
        else:
            this = {"wall_s": time.perf_counter() - t0, "end": "finished", "slots": slots}
            _record_session(exp_dir, parent_run_id, this["wall_s"], "finished", slots)
            earlier.append(this)
        wall = sum(float(s["wall_s"]) for s in earlier)
        sessions = len(earlier)
        _finish_parent(
            driver.tracker, parent_run_id, exp_dir, table, wall, train_s, slots, sessions
        )
        driver.close()  # bounded: a dead tracking server is given up on, not waited for
    except SearchInterrupted:
        raise
    except Exception:
        # the search cannot go on: its runs must not stay RUNNING in the UI
        driver.tracker.submit(_stop_runs, experiment_id, parent_run_id, "FAILED")
        driver.tracker.close()
        if created and not _trials_started(exp_dir):
            # Nothing to resume: the folder would only keep the corrected command from taking
            # the name again. Its FAILED MLflow run stays, the record of the attempt.
            _remove_unstarted(exp_dir)
        else:
            _record_session(exp_dir, parent_run_id, time.perf_counter() - t0, "failed")
        raise
    except KeyboardInterrupt as e:
        # Ctrl-C outside Tune's loop (a second Ctrl-C, or before it started): the search is as
        # resumable as Tune's last saved state; its runs are marked KILLED, without waiting long.
        driver.tracker.submit(_stop_runs, experiment_id, parent_run_id, "KILLED")
        driver.tracker.close()
        _record_session(exp_dir, parent_run_id, time.perf_counter() - t0, "interrupted")
        raise SearchInterrupted(resume_hint) from e
    finally:
        _DRIVERS.pop(parent_run_id, None)
    tracking_errors = {
        t: (trial_run_dir(exp_dir, t) / TRACKING_ERROR_FILE).read_text().strip()
        for t in table.get("trial_id", [])
        if (trial_run_dir(exp_dir, t) / TRACKING_ERROR_FILE).is_file()
    }
    for t, message in tracking_errors.items():  # once per trial, here where the user sees it
        log.warning("MLflow logging of trial %s failed: %s", t, message)
    if driver.tracker.error is not None:
        tracking_errors["search"] = driver.tracker.error
    address = ray.get_runtime_context().gcs_address
    ideal = ideal_wall(table, slots) if len(table) else 0.0
    result = SearchResult(
        name,
        exp_dir,
        table,
        best,
        parent_run_id,
        uri,
        wall,
        train_s,
        slots,
        address,
        ideal,
        n_completed=len(usable),
        first_failure=first_failure,
        tracking_errors=tracking_errors,
        experiment=experiment,
        experiment_id=experiment_id,
        best_config=best_config,
        sessions=sessions,
    )
    if driver.sigint.caught:
        # Ctrl-C after the last trial ended: Tune returned as after any Ctrl-C, with nothing
        # left to stop. The search is finished (recorded above, its results complete), but the
        # user asked to stop: what was to follow it (the pipeline's next stage) must not start.
        raise SearchInterrupted(
            f"Ctrl-C came after every trial of search {name!r} had ended: the search is "
            f"recorded as finished (results in {exp_dir}; MLflow experiment {experiment!r}, "
            f"run {parent_run_id}); --resume --name {name} shows its trial table, training "
            "again only the trials that ended in an error",
            result,
        )
    return result


def _errored_trials(tuner, exp_dir: Path) -> dict[str, str]:
    """The trials of a restored search that ended in an error (which ``resume_errored``
    runs again), by id, with why each failed in one line."""
    try:
        grid = tuner.get_results()  # the restored experiment's state, before fit()
    except RuntimeError:  # Tune could not read it: fit() says why
        return {}
    errored = {}
    for r in grid:
        trial_id = Path(r.path).name.removeprefix("trial_")
        record = _read_json(trial_run_dir(exp_dir, trial_id) / STATUS_FILE, {})
        # A trial interrupted during a retry has an error from its attempt before: it goes on
        # as any interrupted trial. One that failed before its run folder existed has no record.
        if r.error is None or record.get("status", "error") != "error":
            continue
        why = record.get("message") or (str(r.error).strip().splitlines() or ["an error"])[-1]
        errored[trial_id] = " ".join(str(why).split())[:200]
    return errored


def _failure_message(result, run_dir: Path, status: str) -> str:
    """Why a trial did not complete, in one line ("" when it did)."""
    if status == "error" and result.error is not None:
        # Ray wraps the trial's exception with its traceback: its last line is the exception
        lines = [ln.strip() for ln in str(result.error).splitlines() if ln.strip()]
        return lines[-1] if lines else type(result.error).__name__
    if status == "diverged":
        return _read_json(run_dir / STATUS_FILE, {}).get("message", "a loss became non-finite")
    return ""


def trial_table(
    grid,
    max_epochs: int,
    exp_dir: Path | None = None,
    errors: dict[str, str] | None = None,
) -> pd.DataFrame:
    """One row per trial: searched config, best Dice and threshold, epochs run, status.

    The status and its message are the trial's final record in its run folder
    (:func:`finalise_trial`); without one (an older search, or a trial that failed before its
    first line ran), they are derived from Tune's results the same way: a trial that Tune
    ended with an error, or that trained no epoch, is an ``error``, never ``early-stopped``.
    A K-fold trial's Dice and threshold are its out-of-fold scores (``folds.json``), those it
    predicts with, not its best epoch's mean over folds.

    The per-epoch figures (best Dice, its epoch, epochs run, train_s) are the run folder's
    ``history.json``, as its summary and MLflow have them; Tune's results, which lose the
    rows of a trial whose worker was killed and retried, stand in only for a trial without
    one. ``trial_s`` and ``started`` are Tune's clock.

    Args:
        grid: Tune's results (one per trial).
        max_epochs: The epochs each trial was given.
        exp_dir: The search's results folder, where the run folders are read (default: the
            folder above each result's path, which Tune keeps as it was saved).
        errors: Why trials failed, by trial id, as the driver heard it from Tune (a result's
            own error is empty when Tune could not read it back).
    """
    errors = errors or {}

    rows = []
    for r in grid:
        df = r.metrics_dataframe if r.metrics_dataframe is not None else pd.DataFrame()
        cfg = {k: v for k, v in (r.config or {}).items()}
        trial_id = (r.metrics or {}).get("trial_id") or Path(r.path).name.removeprefix("trial_")
        row: dict[str, Any] = {"trial_id": trial_id}
        run_dir = trial_run_dir(exp_dir or Path(r.path).parent, trial_id)
        record = _read_json(run_dir / STATUS_FILE, {})
        history = _read_json(run_dir / "history.json", None)
        # A diverged trial's last report to Tune is a "diverged" row (Dice 0.0, not an epoch);
        # its run folder says so in its status (the history holds only the epochs it trained).
        diverged = record.get("status") == "diverged" or bool(
            len(df) and "diverged" in df and df["diverged"].fillna(0).max() > 0
        )
        if history is not None:
            # The run folder's epochs, as finalise_trial, summary.json and MLflow have them:
            # Tune's result.json loses rows when a worker is killed and the trial retried.
            good = pd.DataFrame(history)
        else:  # an older search, or a trial that never wrote its history: Tune's reports
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
                    # NaN, not 0.0: no epoch means no score (it would read as the worst one,
                    # and stretch the trials plot's scale); sorted last, skipped by max()
                    METRIC: float("nan"),
                    "val_thr_best": float("nan"),
                    "val_dice_05": float("nan"),
                    "best_epoch": 0,
                }
            )
        epochs = int(good["epoch"].max()) if len(good) and "epoch" in good else 0
        row["epochs_run"] = epochs
        row["train_s"] = float(good["epoch_s"].sum()) if len(good) and "epoch_s" in good else 0.0
        # The trial's own clock (Ray): train_s plus reporting, checkpointing and MLflow logging.
        # Never less than train_s: the epochs Tune lost still ran inside the trial.
        trial_s = float(df["time_total_s"].max()) if "time_total_s" in df else 0.0
        row["trial_s"] = max(trial_s, row["train_s"])
        first = df.iloc[0] if len(df) else None
        row["started"] = (
            float(first["timestamp"] - first["time_this_iter_s"]) if first is not None else 0.0
        )
        oof = _read_json(run_dir / FOLDS_FILE, {}).get("oof")
        if oof:
            row.update({k: oof[k] for k in (METRIC, "val_thr_best", "val_dice_05")})
        if record.get("final"):
            status, message = record["status"], record["message"]
        else:
            if r.error is not None or trial_id in errors:
                status = "error"
            elif diverged:
                status = "diverged"
            elif epochs == 0:  # as finalise_trial: no epoch trained is no model
                status = "error"
            elif epochs < max_epochs:
                status = "early-stopped"
            else:
                status = "completed"
            message = _failure_message(r, run_dir, status) or errors.get(trial_id, "")
            if status == "error" and not message:
                message = "the trial ended before it trained an epoch"
        row["status"] = status
        row["run_dir"] = str(run_dir)
        row["message"] = message
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
    tracker: tracking.Tracker,
    parent_run_id: str,
    exp_dir: Path,
    table: pd.DataFrame,
    wall: float,
    train_s: float,
    slots: int,
    sessions: int = 1,
) -> None:
    """Trial table, summary plot and overhead figures on the parent run (queued on ``tracker``);
    the parent run FAILED when no trial completed. ``wall`` is over the search's ``sessions``."""
    from bldseg.tune.report import plot_trials

    csv = exp_dir / "trials.csv"
    tmp = exp_dir / "trials.tmp.csv"
    table.to_csv(tmp, index=False)
    os.replace(tmp, csv)
    files = [csv]
    usable = table[table["status"].isin(USABLE)] if len(table) else table
    if len(table):
        files.append(plot_trials(table, exp_dir / "trials.png", METRIC))
    # Without a usable trial there is no best score: the metric is left out, as MLflow shows
    # a missing value (0.0 would sort as a real, if poor, score among other searches).
    best = float(usable[METRIC].max()) if len(usable) else float("nan")
    tracker.submit(
        tracking.log_metrics,
        parent_run_id,
        {
            "wall_s": wall,
            "sessions": sessions,
            "train_s": train_s,
            "slots": slots,
            "overhead_frac": overhead_fraction(wall, train_s, slots),
            **({"best_val_dice": best} if math.isfinite(best) else {}),
            "trials": len(table),
            "trials_usable": len(usable),
            **{
                f"trials_{status.replace('-', '_')}": int((table["status"] == status).sum())
                for status in ("completed", "early-stopped", "diverged", "error")
                if len(table)
            },
        },
        step=0,
    )
    tracker.submit(tracking.log_artifacts, parent_run_id, files)
    status = "FINISHED" if len(usable) else "FAILED"
    tracker.submit(tracking.MlflowClient.set_terminated, parent_run_id, status=status)
