"""K-fold training: K models of one configuration, each validated on its own fold.

    result = fit_folds(RunConfig(folds=5, epochs=10), "runs/kfold")

The training images are dealt into K folds by split group (source scene, or the
``split_group`` pattern; :func:`bldseg.data.dataset.fold_assignment`, seeded by
``split_seed``): fold ``f`` validates on the f-th partition and trains on the other K-1, so
tiles of one scene are never on both sides. A K-fold run folder holds::

    folds.json       the manifest: K, the config the folds train (the crop fitted to the
                     images, as in their checkpoints), the folds' folders, out-of-fold metrics
                     (``oof``: Dice and threshold of the out-of-fold library as it stands),
                     ``split``: a fingerprint of which image each fold holds out,
                     ``data_fingerprint``: of the training data (a resume on other data,
                     e.g. edited masks, is refused)
    fold<f>/         fold f's own run folder (fit): best.pt, last.pt, val_probs.npz, plots/
    val_probs.npz    the out-of-fold (OOF) library: the K folds' held-out maps, each at its
                     fold's best epoch, so every training image appears exactly once
    history.json     per epoch, the mean over the folds (times summed, per-fold Dice)
    status.json, plots/

The OOF ``val_probs.npz`` has the layout of a single run's (plus ``fold``: the fold of each
tile), so the ensemble search takes a K-fold run as one model; K-fold runs of different
configurations on the same data and split cover the same tiles. Predicting with one
(``folds.json`` as a checkpoint) averages its K fold models' probabilities
(:func:`bldseg.predict.load_member`).

Folds train one after the other (``bldseg train --folds K``), or in lockstep, epoch by epoch
(a search: each epoch's mean over folds is what Tune and ASHA see). Lockstep resumes each fold
from its ``last.pt``, which continues exactly, so both orders train the same models.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bldseg import metrics
from bldseg.data.dataset import fold_assignment, split_groups, split_record
from bldseg.data.prepare import PreparedData, prepare_data
from bldseg.io import atomic_path, file_lock, write_json
from bldseg.models import create_model
from bldseg.train import resume_checks
from bldseg.train.config import RunConfig
from bldseg.train.engine import (
    RUN_LOCK_FILE,
    EpochCallback,
    FitResult,
    check_same_config,
    checked_config,
    fit,
    fitted_crop,
    load_state,
    resolve_device,
    threshold_metrics,
    validated_precision,
)
from bldseg.train.plots import tiles_from_cache, write_run_plots

#: The manifest of a K-fold run folder (``bldseg.ensemble.library`` knows it by this name).
FOLDS_FILE = "folds.json"
#: A run folder's validation library (written by ``bldseg.train.engine.save_val_probs``).
VAL_FILE = "val_probs.npz"

#: Held while the out-of-fold library and the run's manifest are written: folds trained by
#: several processes (``--fold f``, one per GPU) may finish together, and each writes them.
LOCK_FILE = ".folds.lock"

#: Arrays of a validation library, concatenated over the folds.
_LIBRARY_ARRAYS = ("probs", "truth", "tile_ids", "image_ids", "group_ids", "tile_yx")


def fold_dir(out_dir: str | os.PathLike, fold: int) -> Path:
    """The run folder of fold ``fold`` inside a K-fold run folder."""
    return Path(out_dir) / f"fold{fold}"


def fold_config(cfg: RunConfig, fold: int) -> RunConfig:
    """The config of one fold: ``cfg`` with ``fold`` set."""
    return cfg.with_updates({"fold": fold})


def run_history(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The epochs a single run folder has trained (its ``last.pt``, mapped), or []."""
    last = Path(run_dir) / "last.pt"
    if not last.exists():
        return []
    return load_state(last, mmap=True)["history"]


def mean_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One epoch of K folds as one row: the mean of each number over the folds.

    ``epoch_s``, ``data_s`` and ``cpu_s`` are summed (the time the configuration spent on the
    epoch) and ``val_thr_widened`` is the maximum (1 when any fold widened); text fields are
    left out. ``fold<f>_val_dice_best`` keeps each fold's own Dice.
    """
    out: dict[str, Any] = {}
    for key in rows[0]:
        values = [r.get(key) for r in rows]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            continue
        if key == "epoch":
            out[key] = int(values[0])
        elif key in ("epoch_s", "data_s", "cpu_s"):
            out[key] = float(sum(values))
        elif key == "val_thr_widened":
            out[key] = float(max(values))
        else:
            out[key] = float(np.mean(values))
    for f, r in enumerate(rows):
        out[f"fold{f}_val_dice_best"] = r["val_dice_best"]
    return out


def mean_history(histories: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Mean rows (:func:`mean_row`) of the epochs every fold has trained."""
    complete = min(len(h) for h in histories)
    return [mean_row([h[e] for h in histories]) for e in range(complete)]


def trained_history(run_dir: str | os.PathLike, cfg: RunConfig) -> list[dict[str, Any]]:
    """The epochs a run folder has trained: a single run's rows, or a K-fold run's mean rows
    of the epochs all its folds have trained."""
    if cfg.folds < 2:
        return run_history(run_dir)
    return mean_history([run_history(fold_dir(run_dir, f)) for f in range(cfg.folds)])


def write_oof(out_dir: str | os.PathLike, folds: int) -> Path:
    """Writes the out-of-fold library ``<out_dir>/val_probs.npz`` (atomically) from the K folds'
    ``val_probs.npz`` (each at its fold's best epoch so far), in fold order.

    Raises:
        FileNotFoundError: A fold has no validation library yet.
        ValueError: A tile appears in two folds (the folds were not split by one assignment).
    """
    out = Path(out_dir)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in (*_LIBRARY_ARRAYS, "fold")}
    for f in range(folds):
        path = fold_dir(out, f) / VAL_FILE
        if not path.is_file():
            raise FileNotFoundError(f"fold {f} of {out} has no {VAL_FILE} yet: train it first")
        with np.load(path, allow_pickle=False) as z:
            for k in _LIBRARY_ARRAYS:
                parts[k].append(z[k])
            parts["fold"].append(np.full(len(z["tile_ids"]), f, dtype=np.int64))
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    tiles, counts = np.unique(arrays["tile_ids"], return_counts=True)
    if (counts > 1).any():
        tile = tiles[counts > 1][0]
        twice = sorted(set(arrays["fold"][arrays["tile_ids"] == tile].tolist()))
        raise ValueError(
            f"{out}: tile {tile} is validated in folds {twice}: the folds were dealt from "
            "different split groups (another --group-column or --split-group) or data. Delete "
            "the folds trained with the other split (fold<f>/) and train them again with the "
            "flags of the rest"
        )
    path = out / VAL_FILE
    # Unique to the call: folds trained on several machines (--fold f) may each write the
    # library when they finish. ".npz" last: np.savez appends it to any other name.
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)
    return path


def held_out_folds(run_dir: str | os.PathLike, folds: int, ids: Sequence[str]) -> np.ndarray:
    """The fold that held out each of ``ids`` in a K-fold run, as the run recorded it.

    Read from the out-of-fold library's ``fold`` column or, before it is written (folds
    trained by ``--fold f`` of which some are still running), from the folds' own
    ``val_probs.npz``. Never dealt again from the data: ``--group-column`` is a data option the
    run's config does not record, so dealing again without it would hand images to the fold
    models that trained on them.

    Args:
        run_dir: The K-fold run folder.
        folds: K.
        ids: The id of every training image (the cache's, in cache order).

    Returns:
        (N,) int, the fold whose validation set held each image.

    Raises:
        FileNotFoundError: A fold has no ``val_probs.npz`` (and there is no out-of-fold one).
        ValueError: The run's images are not the data's (the message names both counts), or
            an image is held out by two folds.
    """
    run = Path(run_dir)
    oof = run / VAL_FILE
    pairs: list[tuple[np.ndarray, np.ndarray]] = []  # (image ids, their folds) per library
    if oof.is_file():
        with np.load(oof, allow_pickle=False) as z:
            pairs.append((z["image_ids"], z["fold"]))
        where = f"its out-of-fold library {oof}"
    else:
        for f in range(folds):
            path = fold_dir(run, f) / VAL_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{run}: fold {f} has no {path}; finish training it first")
            with np.load(path, allow_pickle=False) as z:
                pairs.append((z["image_ids"], np.full(len(z["image_ids"]), f)))
        where = f"its folds' {VAL_FILE}"
    fold_of: dict[str, int] = {}
    for image_ids, image_folds in pairs:
        for i, f in zip(image_ids.tolist(), image_folds.tolist(), strict=True):
            if fold_of.setdefault(i, int(f)) != f:
                raise ValueError(
                    f"{run}: {where} has {i} in folds {fold_of[i]} and {f}; the folds were "
                    "dealt from different splits: retrain them as one run"
                )
    known = set(ids)
    extra = set(fold_of) - known
    missing = known - set(fold_of)
    if extra or missing:
        raise ValueError(
            f"{run}: {where} covers {len(fold_of)} images, {len(extra)} of them not in this "
            f"data ({len(ids)} images, {len(missing)} of them in no fold); pass the --data the "
            "run was trained on"
        )
    return np.array([fold_of[i] for i in ids], dtype=np.int64)


def oof_metrics(out_dir: str | os.PathLike, lo: float = 0.3, hi: float = 0.7) -> dict[str, float]:
    """Dice at 0.5, at the best threshold of ``[lo, hi]`` and at Youden's threshold of the
    out-of-fold library ``<out_dir>/val_probs.npz``, as ``val_*`` keys (``val_thr_best``: the
    threshold a K-fold run predicts at)."""
    with np.load(Path(out_dir) / VAL_FILE, allow_pickle=False) as z:
        scores = threshold_metrics(z["probs"], z["truth"].astype(bool), lo, hi)
    return {f"val_{key}": v for key, v in scores.items()}


def check_kfold_folder(out: Path) -> None:
    """Refuses to train K folds into a single run's folder, before anything is written.

    ``folds.json`` beside a single run's ``best.pt`` and ``last.pt`` would make prediction
    read the folds while the single run's files stay (and ``last.pt`` is resumed by ``fit``).

    Raises:
        ValueError: ``out`` holds a single run's ``last.pt`` or ``best.pt``.
    """
    for name in ("last.pt", "best.pt"):
        if (out / name).is_file():
            raise ValueError(
                f"{out / name}: {out} holds a single run (trained without --folds); K folds "
                "there would mix their files with it. Use another --out"
            )


#: What a resumed K-fold run with another fold assignment is told.
_OTHER_SPLIT = (
    "the folds would mix two splits and images would be validated by models that trained on "
    "them. Pass the --group-column / --split-group the run was started with (or the --data it "
    "was trained on), or use another --out"
)


def check_same_split(
    out: Path, recorded: dict[str, Any], ids: Sequence[str], assigned: np.ndarray
) -> None:
    """Refuses to resume a K-fold run whose images would be dealt into other folds now.

    ``--group-column`` is a data option, not part of the run config, so the config check
    misses it: compared here are the ``split`` fingerprint ``folds.json`` records
    (:func:`split_record`) or, for a manifest from before it was recorded, the validation
    images of the folds trained so far (their ``val_probs.npz``).

    Raises:
        ValueError: Other images, or the same images in other folds (naming the flags).
    """
    where = out / FOLDS_FILE
    was = recorded.get("split")
    if was is not None:
        now = split_record(ids, assigned)
        if was.get("ids_sha256") != now["ids_sha256"]:
            raise ValueError(
                f"{where}: the run's folds were dealt from {was.get('images')} training images, "
                f"the data now has {now['images']} images with other ids (the data changed); "
                + _OTHER_SPLIT
            )
        if was.get("folds_sha256") != now["folds_sha256"]:
            raise ValueError(
                f"{where}: the data's {now['images']} images are dealt into other folds than "
                "the run's (other split groups: --group-column or --split-group differ); "
                + _OTHER_SPLIT
            )
        return
    index = {str(i): int(f) for i, f in zip(ids, assigned, strict=True)}
    for f in range(int(recorded.get("folds", 0))):
        path = fold_dir(out, f) / VAL_FILE
        if not path.is_file():
            continue
        with np.load(path, allow_pickle=False) as z:
            held = set(z["image_ids"].tolist())
        dealt = {i for i, g in index.items() if g == f}
        if held != dealt:
            image = min(held ^ dealt)
            if image in held:
                now = index.get(image)
                said = "is not in the data" if now is None else f"is now dealt to fold {now}"
                what = f"fold {f} validated {image}, which {said}"
            else:
                what = f"fold {f} did not validate {image}, which is now dealt to it"
            raise ValueError(
                f"{path}: {what} ({len(held ^ dealt)} image(s) moved: other split groups or "
                "data); " + _OTHER_SPLIT
            )


def _as_trained(recorded: dict[str, Any], image_size: tuple[int, int]) -> dict[str, Any]:
    """A manifest's flat config as its folds trained it on images of ``image_size``.

    ``folds.json`` records the fitted crop (:func:`~bldseg.train.engine.fitted_crop`); one
    written before held the crop asked for (``aug.crop_size=192`` with ``aug.crop_fit`` on
    128-px images, whose folds trained on 128), and must resume as the same config.
    """
    cfg = RunConfig.from_flat(recorded)
    if cfg.aug.crop_fit:
        return fitted_crop(cfg, image_size).to_flat()
    # without crop_fit a crop larger than the images trained nothing: compared as written
    return recorded


def _trained_folds(out: Path) -> list[Path]:
    """The ``last.pt`` and ``best.pt`` of the fold folders of ``out`` (any K): what a fold
    leaves once it has trained an epoch."""
    if not out.is_dir():
        return []
    return sorted(
        d / name
        for d in out.iterdir()
        if re.fullmatch(r"fold\d+", d.name) and d.is_dir()
        for name in ("last.pt", "best.pt")
        if (d / name).is_file()
    )


def _folds_in_training(out: Path) -> list[Path]:
    """The fold folders of ``out`` that a ``fit`` trains into now (it holds their
    :data:`~bldseg.train.engine.RUN_LOCK_FILE`; its first epoch has written no checkpoint)."""
    from filelock import Timeout

    busy = []
    for lock in sorted(out.glob(f"fold*/{RUN_LOCK_FILE}")):
        if not re.fullmatch(r"fold\d+", lock.parent.name):
            continue
        try:
            with file_lock(lock, timeout=0):
                pass
        except Timeout:
            busy.append(lock.parent)
    return busy


def check_same_data(out: Path, recorded: dict[str, Any], data: PreparedData) -> None:
    """Refuses to continue a K-fold run whose training data changed since it started, e.g.
    masks fixed after an interruption (:func:`bldseg.train.resume_checks.check_same_data`).

    Finished folds are skipped, not resumed, so their ``last.pt`` is never compared: the
    out-of-fold library would hold their folds' ground truth of before beside the new one of
    the folds still to train. A ``folds.json`` from before bldseg recorded the data is let go,
    with a warning.

    Raises:
        ValueError: The cache's fingerprint is not the one ``folds.json`` records.
    """
    where = out / FOLDS_FILE
    if not recorded.get("data_fingerprint"):
        warnings.warn(
            f"{where} was written by an older bldseg, which did not record the training data's "
            "fingerprint: whether the data changed since the run started cannot be checked "
            "(the manifest written now records it)",
            stacklevel=4,  # fit_folds's caller (through check_resumable)
        )
        return
    if recorded.get("status") == "completed":
        consequence = (
            f"the finished run's out-of-fold result ({VAL_FILE}, its Dice) is of those data, "
            "not of these"
        )
    else:
        consequence = (
            f"the folds trained so far were scored on those, the rest would be on these, and "
            f"the out-of-fold {VAL_FILE} would hold the ground truth of both"
        )
    resume_checks.check_same_data(
        str(where),
        "run",
        recorded,
        data.train.fingerprint,
        resume_checks.data_source(data),
        consequence=consequence,
        remedy="train into a new --out",
        content=data.train.content,
    )


def _kept_precision(out: Path, now: str) -> str:
    """The precision a continued K-fold run records: the one its trained folds validated in
    (the manifest's ``amp``), not this call's device's (``now``): ``auto`` continued on a CPU
    after a GPU recorded float32 over bf16 maps, and the member was predicted in float32.
    Warns where this call validates in another one: the out-of-fold maps then mix both."""
    recorded = json.loads((out / FOLDS_FILE).read_text()).get("amp")
    if recorded is None or not _trained_folds(out):
        return now
    if recorded != now:
        warnings.warn(
            f"{out / FOLDS_FILE}: its folds validated in {recorded}, this device validates in "
            f"{now} (precision=auto resolves by device): the folds trained now validate in "
            f"{now}, and the run is predicted in {recorded}, as recorded (continue it on a "
            "device of the first kind to keep its maps alike)",
            stacklevel=3,
        )
    return recorded


def check_resumable(out: Path, cfg: RunConfig, data: PreparedData, assigned: np.ndarray) -> None:
    """Refuses to continue the K-fold run in ``out`` (its ``folds.json``) with another config,
    split or training data, before anything is written; a manifest whose folds never trained
    is let go.

    Args:
        out: The K-fold run folder; it holds ``folds.json``.
        cfg: The config to train, as the folds train it (:func:`checked_config`).
        data: The prepared data to train on.
        assigned: The fold of each image now.

    Raises:
        ValueError: A fold has trained (or trains now) with another config
            (:func:`~bldseg.train.engine.check_same_config`), with another split
            (:func:`check_same_split`) or on other data (:func:`check_same_data`).
    """
    where = out / FOLDS_FILE
    recorded = json.loads(where.read_text())
    was = _as_trained(recorded["config"], data.train.image_size)
    if _trained_folds(out):
        # before the manifest is rewritten: finished folds were skipped unchecked, and another
        # config "completed" with the folds of the first while folds.json recorded the second
        same = data.train.content and recorded.get("data_content") == data.train.content
        check_same_config(was, cfg, where, data.train.content if same else None)
        # --group-column is a data option, not in the config: the folds trained so far were
        # dealt by the recorded assignment, the rest would be dealt by today's
        check_same_split(out, recorded, data.train.ids, assigned)
        # after the split: other split groups change the fingerprint too, and that message
        # names the flags
        check_same_data(out, recorded, data)
        return
    # No fold has a checkpoint: the command that wrote folds.json failed in its first epoch
    # (out of memory, a setting the data refused), and its corrected command must not be
    # refused for its correction; fit starts such fold folders afresh. Unless a fold of the
    # other config is training now (--fold F processes started together), whose checkpoints
    # would join this config's folds.
    try:
        check_same_config(was, cfg, where)
    except ValueError:
        if _folds_in_training(out):  # looked at only here: the look holds the lock an instant
            raise
        print(f"{where}: no fold has trained yet; replaced by this config's manifest")


def unfinished_folds_problem(manifest_path: Path, manifest: dict[str, Any]) -> str | None:
    """Why a K-fold run cannot be predicted with yet, or None: its manifest says "running" and
    records no out-of-fold result (the threshold it predicts at, chosen on maps of every
    fold), as while ``--fold`` runs of its folds are still training or one was stopped.
    Predicted anyway, it took the threshold 0.5 and a half-trained fold without a word."""
    if "oof" in manifest or manifest.get("status") != "running":
        return None  # finished (or a manifest written by hand, without a status)
    k, epochs = int(manifest["folds"]), manifest.get("config", {}).get("epochs")
    left = [
        f
        for f in range(k)
        if epochs is None or len(_fold_history(manifest_path.parent, f)) < epochs
    ]
    which = f"fold(s) {', '.join(map(str, left))} not trained to the end" if left else "its end"
    return (
        f"{manifest_path}: the K-fold run is not finished ({which}; no out-of-fold result, the "
        f"threshold it predicts at, is recorded): finish it (bldseg train --folds {k} "
        f"{'--fold F ' if left else ''}--out {manifest_path.parent}, with its other flags) first"
    )


def _fold_history(out: Path, fold: int) -> list[dict[str, Any]]:
    """The epochs another process has trained fold ``fold`` for, once its library is in place
    (``last.pt`` is written just before the best epoch's ``val_probs.npz`` is renamed in)."""
    d = fold_dir(out, fold)
    return run_history(d) if (d / VAL_FILE).is_file() else []


def _best(history: list[dict[str, Any]]) -> dict[str, Any]:
    best: dict[str, Any] = {}
    for row in history:  # the first of equals, as fit keeps best.pt
        if not best or row["val_dice_best"] > best["val_dice_best"]:
            best = row
    return dict(best)


def fit_folds(
    cfg: RunConfig,
    out_dir: str | os.PathLike,
    *,
    data: PreparedData | None = None,
    on_epoch_end: EpochCallback | None = None,
    resume: bool = True,
    progress: bool = False,
    lockstep: bool = False,
    only: int | None = None,
) -> FitResult:
    """Trains the K folds of ``cfg`` (``cfg.folds >= 2``) and writes the out-of-fold library.

    Args:
        cfg: The run config; its ``fold`` is ignored (every fold is trained).
        out_dir: The K-fold run folder (see the module docstring).
        data: Prepared caches; default ``prepare_data(cfg.data)``.
        on_epoch_end: Called with the mean row of each epoch once every fold has trained it,
            after ``history.json`` and the out-of-fold ``val_probs.npz`` are written (e.g. to
            report to Ray Tune). Folds trained one after the other reach that point only
            during the last fold.
        resume: Continue each fold from its ``last.pt``.
        progress: Show per-epoch progress bars.
        lockstep: Train epoch e of every fold before epoch e + 1 of any (a search), instead
            of fold after fold.
        only: Train this fold only (e.g. folds on several machines, started together); the
            process that finds every fold trained when its own fold ends (the other folds'
            histories are read again then) writes the out-of-fold library and completes the
            run, under a lock (:data:`LOCK_FILE`).

    Returns:
        A :class:`FitResult` over the mean rows; ``best`` is the best mean epoch, the message
        gives the out-of-fold Dice. ``status == "diverged"`` when a fold diverged.

    Raises:
        ValueError: ``cfg.folds`` below 2, more folds than split groups (naming ``--folds``),
            a config the data refuses (:func:`~bldseg.train.engine.checked_config`; nothing
            is written), a single run's folder as ``out_dir`` (:func:`check_kfold_folder`), or
            a resumed run whose folds trained with another config or on other training
            data, or whose images would now be dealt into other folds
            (:func:`check_resumable`).
    """
    k = cfg.folds
    if k < 2:
        raise ValueError(f"folds={k}: fit_folds trains K >= 2 folds (--folds K); use fit")
    if only is not None and not 0 <= only < k:
        raise ValueError(f"--fold {only}: the folds of --folds {k} are 0..{k - 1}")
    out = Path(out_dir)
    check_kfold_folder(out)
    data = data or prepare_data(cfg.data, progress=progress, test_split=False)
    cache = data.train
    # Checked before any fold trains: more folds than groups fails here, naming --folds.
    assigned = fold_assignment(len(cache), k, cfg.split_seed, split_groups(cache, cfg.split_group))
    # What fit checks before it writes, for every fold before the manifest is written: a
    # config error left a folds.json of the failed config that refused the corrected command.
    # The manifest records the config the folds train (the fitted crop), as their best.pt do:
    # prediction slides a K-fold member's windows at the manifest's crop.
    used = [checked_config(fold_config(cfg, f), cache) for f in range(k)]  # the splits differ
    if used[0].aug.crop_size != cfg.aug.crop_size:
        h, w = cache.image_size
        print(f"aug.crop_size={cfg.aug.crop_size} > images {h}x{w}: crops of {min(h, w)} px")
    cfg = used[0]
    amp = validated_precision(cfg.precision, resolve_device(cfg.device))
    if resume and (out / FOLDS_FILE).is_file():
        check_resumable(out, cfg, data, assigned)
        amp = _kept_precision(out, amp)
    manifest: dict[str, Any] = {
        "folds": k,
        "runs": [fold_dir(out, f).name for f in range(k)],
        "val_images": [int((assigned == f).sum()) for f in range(k)],
        "split": split_record(cache.ids, assigned),
        "config": cfg.to_flat(),
        # the precision the folds validated in (each fold's best.pt records it too)
        "amp": amp,
        # which data (masks edited since are refused on a resume: check_same_data); a resumed
        # run got here with the same fingerprint or none recorded
        **resume_checks.data_record(cache.fingerprint, cache.content),
        "status": "running",
    }
    if resume and (out / VAL_FILE).is_file():
        # the library of the epochs trained before keeps its scores while the folds go on
        manifest["oof"] = oof_metrics(out, cfg.threshold_lo, cfg.threshold_hi)
    elif cfg.pretrained is not None and not (resume and _trained_folds(out)):
        # A file that does not fit the model fails here, naming it, before anything is written
        # (as fit checks it before writing into its folder).
        create_model(cfg.model, pretrained=cfg.pretrained, **cfg.model_kwargs())
    write_json(out / FOLDS_FILE, manifest)

    histories = [run_history(fold_dir(out, f)) if resume else [] for f in range(k)]
    emitted = min(len(h) for h in histories)  # epochs the caller already knows of
    todo = range(k) if only is None else [only]
    if lockstep:
        schedule = [(f, e) for e in range(1, cfg.epochs + 1) for f in todo]
    else:
        schedule = [(f, cfg.epochs) for f in todo]
    started: set[int] = set()
    for f, until in schedule:
        if len(histories[f]) >= until:
            continue  # trained before (a resumed run)
        if progress and f not in started:
            print(f"fold {f + 1}/{k}: {fold_dir(out, f)}", flush=True)
        result = fit(
            fold_config(cfg, f),
            fold_dir(out, f),
            data=data,
            resume=resume or f in started,
            progress=progress,
            stop_after=until,
        )
        started.add(f)
        histories[f] = result.history
        if result.status == "diverged":
            message = f"fold {f}: {result.message}"
            write_json(out / "status.json", {"status": "diverged", "message": message})
            history = mean_history(histories)
            return FitResult("diverged", message, history, _best(history), out)
        if only is not None:
            # The other folds may have trained meanwhile (--fold g in other processes, started
            # together): what they hold now, not at our start, says whether the run is done.
            histories = [h if g == only else _fold_history(out, g) for g, h in enumerate(histories)]
        complete = min(len(h) for h in histories)
        if complete > emitted:
            history = mean_history(histories)
            with file_lock(out / LOCK_FILE):
                write_oof(out, k)
                # Scored with the library, before the caller hears of the epoch: a search trial
                # may end inside on_epoch_end (ASHA); prediction takes its threshold from here.
                manifest["oof"] = oof_metrics(out, cfg.threshold_lo, cfg.threshold_hi)
                write_json(out / FOLDS_FILE, manifest)
                write_json(out / "history.json", history)
            for row in history[emitted:complete]:
                if on_epoch_end is not None:
                    on_epoch_end(row, out)
            emitted = complete

    history = mean_history(histories)
    left = [g for g, h in enumerate(histories) if len(h) < cfg.epochs]
    if left:  # `only`: other folds are still to train
        message = (
            f"fold {only} trained; {len(left)} other fold(s) of {out} still to train "
            f"(--fold {', '.join(map(str, left))})"
        )
        return FitResult("stopped", message, history, _best(history), out)
    # Two --fold processes ending together both get here, one after the other: each writes the
    # same library from the same fold files, and the later one has its own fold's in place.
    with file_lock(out / LOCK_FILE):
        write_oof(out, k)
        oof = oof_metrics(out, cfg.threshold_lo, cfg.threshold_hi)
        manifest.update(status="completed", oof=oof)
        write_json(out / FOLDS_FILE, manifest)
        write_json(out / "history.json", history)
        message = (
            f"trained {k} folds of {cfg.epochs} epochs; out-of-fold Dice "
            f"{oof['val_dice_best']:.4f} at threshold "
            f"{metrics.threshold_text(oof['val_thr_best'])} over "
            f"{int(sum(manifest['val_images']))} images"
        )
        write_json(out / "status.json", {"status": "completed", "message": message})
        # The plot shades the range the out-of-fold threshold was chosen in (and marks it).
        lo, hi = cfg.threshold_lo, cfg.threshold_hi
        if oof.get("val_thr_widened"):
            lo, hi = metrics.widened_range(lo, hi)
        write_run_plots(out, tiles_from_cache(cache), lo=lo, hi=hi)
    return FitResult("completed", message, history, _best(history), out)
