"""A model library: N trained models' quantised probabilities on the same validation tiles.

Each trained model is a run folder holding ``val_probs.npz`` (written by
``bldseg.train.engine.save_val_probs``: ``probs`` uint8 (T, S, S), ``truth`` uint8 (T, S, S),
``tile_ids`` (T,), ``image_ids`` (T,) = source image of each tile, ``tile_yx`` (T, 2)) and
``best.pt``. A library is built from the run folders of a search (found recursively) or from
explicit paths, and every model must hold exactly the same tiles with the same ground truth;
tiles stored in another order are put in the first model's order.

A K-fold run (``--folds K``, :mod:`bldseg.train.folds`) is one model of a library: its folder
holds ``folds.json`` and the out-of-fold ``val_probs.npz`` (every training image, each
predicted by the fold model that did not train on it), its folds ``fold<f>/`` their own
run folders, which are part of it and never models of their own. Its checkpoint is
``folds.json``: predicting with it averages the K fold models (:func:`bldseg.predict.load_member`).
Every K-fold configuration trained on the same data and split covers the same tiles, so their
libraries combine unchanged.

A run folder's ``status.json`` (written by ``bldseg train`` and by a search's trials) says how
it ended. A search's results folder also holds the models of trials that failed, diverged or
never finished: they keep the ``best.pt`` and ``val_probs.npz`` of the epochs they trained.
:func:`find_runs` leaves those out, unless asked (``include_failed``); a run folder without a
``status.json`` (an older version's, a model copied by hand) is kept.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "FOLDS_FILE",
    "STATUS_FILE",
    "USABLE_STATUSES",
    "VAL_FILE",
    "ModelLibrary",
    "ended_unusable",
    "find_runs",
    "load_library",
    "member_checkpoint",
    "run_status",
    "split_by_image",
    "unusable_runs",
]

VAL_FILE = "val_probs.npz"
"""The file of a run folder holding its validation probabilities."""

CHECKPOINT_FILE = "best.pt"

FOLDS_FILE = "folds.json"
"""The manifest of a K-fold run folder (``bldseg.train.folds.FOLDS_FILE``)."""

STATUS_FILE = "status.json"
"""How a run ended: ``{"status": ..., "message": ...}`` (``bldseg.tune.runner.STATUS_FILE``)."""

# What a model of the library may have ended as: trained every epoch, or stopped early by the
# search's scheduler (ASHA). Others: "error", "diverged", "running" (a trial of a search still
# running or killed), "stopped" (a K-fold run whose other folds are still to train). The same
# as bldseg.tune.runner.USABLE, kept here so the library does not import the tuner.
USABLE_STATUSES = ("completed", "early-stopped")


def member_checkpoint(run_dir: str | os.PathLike) -> Path:
    """What predicts for a run folder: ``folds.json`` of a K-fold run, else ``best.pt``."""
    run_dir = Path(run_dir)
    folds = run_dir / FOLDS_FILE
    return folds if folds.is_file() else run_dir / CHECKPOINT_FILE


@dataclass
class ModelLibrary:
    """N models' uint8 probability maps on T shared tiles, with the ground truth."""

    names: list[str]  # (N,) model names (run folder paths relative to the search root)
    sources: list[Path]  # (N,) the npz file each model was read from
    # (N,) best.pt (folds.json of a K-fold run) next to each npz (may not exist for fakes)
    checkpoints: list[Path]
    probs: np.ndarray  # (N, T, S, S) uint8, q = round(255 p)
    truth: np.ndarray  # (T, S, S) bool ground truth
    tile_ids: np.ndarray  # (T,) str
    image_ids: np.ndarray  # (T,) str: the source image of each tile (splits are by image)

    @property
    def n_models(self) -> int:
        return int(self.probs.shape[0])

    @property
    def n_tiles(self) -> int:
        return int(self.probs.shape[1])

    def subset(self, tiles: np.ndarray) -> ModelLibrary:
        """The library restricted to some tiles (indices or a boolean mask), same models."""
        tiles = np.asarray(tiles)
        if tiles.dtype == np.bool_:
            tiles = np.flatnonzero(tiles)
        if tiles.size == 0:
            raise ValueError("a library subset needs at least one tile")
        return ModelLibrary(
            names=list(self.names),
            sources=list(self.sources),
            checkpoints=list(self.checkpoints),
            probs=np.ascontiguousarray(self.probs[:, tiles]),
            truth=np.ascontiguousarray(self.truth[tiles]),
            tile_ids=self.tile_ids[tiles],
            image_ids=self.image_ids[tiles],
        )


_UNREADABLE = (OSError, EOFError, ValueError, zipfile.BadZipFile)  # truncated or garbage files


def _cannot_read(name: str, f: Path, err: BaseException, file_name: str) -> ValueError:
    # a validation library is remade by training; other files (test maps) by what wrote them
    fix = (
        "retrain the run or remove it from the search folder"
        if file_name == VAL_FILE
        else "remake it or delete it"
    )
    return ValueError(f"model {name!r} ({f}): cannot read it ({type(err).__name__}: {err}); {fix}")


def run_status(path: str | os.PathLike) -> str | None:
    """How a run ended, as its ``status.json`` says; None when it has none.

    Args:
        path: A run folder, or a file in it (its ``val_probs.npz``).

    Returns:
        The recorded status (``"completed"``, ``"early-stopped"``, ``"error"``, ...);
        ``"unreadable"`` when the file is there but holds no status (a damaged file says nothing
        about how the run ended, so it is not taken for a finished one); None without the file.
    """
    path = Path(path)
    if not path.exists():  # a mistyped model: loading it says so
        return None
    f = (path if path.is_dir() else path.parent) / STATUS_FILE
    try:
        record = json.loads(f.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # ValueError: bad JSON or bad UTF-8
        return "unreadable"
    status = record.get("status") if isinstance(record, dict) else None
    return status if isinstance(status, str) and status else "unreadable"


def unusable_runs(paths: Sequence[str | os.PathLike]) -> list[tuple[Path, str]]:
    """The run folders (or files in them) whose ``status.json`` says they are no usable model.

    Returns:
        ``(path, status)`` in the order given, for every status other than
        :data:`USABLE_STATUSES`; paths without a ``status.json`` are not listed.
    """
    out = []
    for p in paths:
        status = run_status(p)
        if status is not None and status not in USABLE_STATUSES:
            out.append((Path(p), status))
    return out


def find_runs(
    root: str | os.PathLike, file_name: str = VAL_FILE, *, include_failed: bool = False
) -> list[Path]:
    """Every run folder under ``root`` (recursively) holding ``file_name``, sorted by path.

    The folds of a K-fold run (folders inside one holding ``folds.json``) are not listed: the
    K-fold run is, by its out-of-fold file. Run folders whose ``status.json`` says anything but
    completed or early-stopped (a trial that failed, diverged or never finished) are left out
    with one warning naming each, unless ``include_failed``.

    Args:
        root: The search results folder (or a folder of several).
        file_name: The npz a run folder must hold.
        include_failed: Also list the run folders whose status says they failed.

    Raises:
        FileNotFoundError: if ``root`` does not exist or holds no such run folder (naming, with
            their reasons, the runs that ended without one: :func:`ended_unusable`), or no
            usable one (each says it failed, and why).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"search results folder not found: {root}")
    runs = sorted(
        p.parent for p in root.rglob(file_name) if p.is_file() and not _inside_kfold(p.parent, root)
    )
    if not runs:
        ended = ended_unusable(root)
        if ended:
            # a search whose trials all failed before their first validation: say why they did
            listing = "; ".join(_why(r, status, message, root) for r, status, message in ended)
            raise FileNotFoundError(
                f"no run folder under {root} holds {file_name}: the {STATUS_FILE} of "
                f"{len(ended)} run folder(s) there says the run ended without a usable model: "
                f"{listing}. Fix what made them fail and rerun the search, or point --runs at "
                "another search's results folder"
            )
        raise FileNotFoundError(
            f"no run folder under {root} holds {file_name}; point --runs at a search's results "
            "folder (trials write it after their first validation) or pass --models"
        )
    failed = [] if include_failed else unusable_runs(runs)
    if not failed:
        return runs
    listing = ", ".join(f"{_relative(r, root)} ({status})" for r, status in failed)
    left = {r for r, _ in failed}
    kept = [r for r in runs if r not in left]
    if not kept:
        listing = "; ".join(_why(r, status, _status_message(r), root) for r, status in failed)
        raise FileNotFoundError(
            f"no usable model under {root}: the {STATUS_FILE} of each of its {len(runs)} run "
            f"folder(s) holding {file_name} says it did not complete: {listing}; retrain them "
            "(rerun or resume the search), or take them anyway with bldseg ensemble "
            "--include-failed (e.g. to inspect them)"
        )
    # Located here (stacklevel 1), not at the caller: the pipeline looks for the runs twice
    # (for its test maps, then in the ensemble search), and Python's default filter prints a
    # warning of the same text from the same line once.
    warnings.warn(
        f"left out {len(failed)} of the {len(runs)} run folders under {root}: their "
        f"{STATUS_FILE} says the run failed, diverged or never finished: {listing}; "
        "bldseg ensemble --include-failed takes them",
        stacklevel=1,
    )
    return kept


#: Statuses that end a run whatever ``status.json``'s ``"final"`` says: ``bldseg train`` writes
#: none, and a trial that failed or diverged trains no further.
_ENDING_STATUSES = ("error", "diverged")


def _status_record(run: Path) -> dict | None:
    """A run folder's ``status.json`` as a dict; None without one, or when it is unreadable."""
    try:
        record = json.loads((run / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _status_message(run: Path) -> str:
    """Why a run stands where it does, as its ``status.json`` says (first line, shortened)."""
    message = (_status_record(run) or {}).get("message")
    if not isinstance(message, str) or not message.strip():
        return ""
    line = message.strip().splitlines()[0]
    return line if len(line) <= 200 else line[:199] + "…"


def _why(run: Path, status: str, message: str, root: Path) -> str:
    """``"trial_x/run (error): what went wrong"``: one run of a listing of failed runs."""
    return f"{_relative(run, root)} ({status})" + (f": {message}" if message else "")


def ended_unusable(root: str | os.PathLike) -> list[tuple[Path, str, str]]:
    """The run folders under ``root`` whose ``status.json`` says the run ended without a usable
    model: a trial the search closed (``"final": true``) as anything but completed or
    early-stopped, or any run that failed or diverged. Runs still going are not listed; nor are
    the folds of a K-fold run (the run's own status speaks for them).

    Returns:
        ``(run folder, status, message)`` sorted by path; the message is the first line of the
        record's ``message`` ("" without one).
    """
    root = Path(root)
    out = []
    for f in sorted(root.rglob(STATUS_FILE)):
        run = f.parent
        if _inside_kfold(run, root):
            continue
        record = _status_record(run)
        status = None if record is None else record.get("status")
        if not isinstance(status, str) or status in USABLE_STATUSES:
            continue
        if record.get("final") is True or status in _ENDING_STATUSES:
            out.append((run, status, _status_message(run)))
    return out


def _relative(path: Path, root: Path) -> str:
    """A run folder's name in a library found under ``root``."""
    return str(path.relative_to(root)) if path != root else path.name


def _inside_kfold(run: Path, root: Path) -> bool:
    """Whether ``run`` is a fold of a K-fold run folder at or below ``root``."""
    for parent in run.parents:
        if (parent / FOLDS_FILE).is_file():
            return True
        if parent == root:
            return False
    return False


def _npz_path(path: Path, file_name: str) -> Path:
    return path / file_name if path.is_dir() else path


def _names(paths: Sequence[Path], root: Path | None) -> list[str]:
    """Short unique names: paths relative to the common root, else the folder names."""
    if root is not None:
        names = [_relative(p, root) for p in paths]
    else:
        names = [p.name if p.is_dir() else p.stem for p in paths]
    if len(set(names)) < len(names):
        common = Path(os.path.commonpath([str(p.resolve()) for p in paths]))
        names = [str(p.resolve().relative_to(common)) or p.name for p in paths]
    return names


def load_library(
    paths: Sequence[str | os.PathLike],
    *,
    file_name: str = VAL_FILE,
    root: str | os.PathLike | None = None,
) -> ModelLibrary:
    """Loads N models' probabilities and checks that their tiles align.

    Args:
        paths: run folders (holding ``file_name``) or npz files.
        file_name: the npz inside a run folder (``val_probs.npz``; e.g. ``test_probs.npz`` for
            a held-out test library of the same models); also says how an unreadable file is
            remade (training remakes a ``val_probs.npz``).
        root: the search results folder the run folders were found in (for short names).

    Returns:
        The library, tiles in the first model's order.

    Raises:
        FileNotFoundError: a run folder has no ``file_name``.
        ValueError: naming the model and the tile, when models hold different tiles, a tile's
            ground truth or source image differs, arrays have the wrong dtype or shape, a
            model is given twice, or two models' npz files lie in one folder (they would share
            its checkpoint).
    """
    if not paths:
        raise ValueError("a model library needs at least one model")
    run_paths = [Path(p) for p in paths]
    npz = [_npz_path(p, file_name) for p in run_paths]
    for p, f in zip(run_paths, npz, strict=True):
        if not f.is_file():
            raise FileNotFoundError(f"model {p}: {f} not found")
    resolved = [f.resolve() for f in npz]
    dup = {str(f) for f in resolved if resolved.count(f) > 1}
    if dup:
        raise ValueError(f"model(s) given more than once: {sorted(dup)}")
    checkpoints = [member_checkpoint(f.parent) for f in npz]
    _refuse_shared_checkpoints(npz, checkpoints)
    names = _names(run_paths, Path(root) if root is not None else None)

    probs = None
    truth = tile_ids = image_ids = None
    for m, (name, f) in enumerate(zip(names, npz, strict=True)):
        try:
            z = np.load(f, allow_pickle=False)
        except _UNREADABLE as e:
            raise _cannot_read(name, f, e, file_name) from None
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise _cannot_read(name, f, ValueError("an .npy array, not an .npz archive"), file_name)
        with z:
            missing = [a for a in ("probs", "truth", "tile_ids", "image_ids") if a not in z]
            if missing:
                raise ValueError(f"model {name!r} ({f}) lacks array(s) {missing}")
            # Source scenes when recorded (tiles of one scene must stay on one side of the
            # selection/check split), else the sample ids of older libraries.
            ids_key = "group_ids" if "group_ids" in z else "image_ids"
            try:  # the arrays are read here, lazily: a truncated archive fails now
                p, t = z["probs"], z["truth"]
                tid, iid = z["tile_ids"].astype(str), z[ids_key].astype(str)
            except _UNREADABLE as e:
                raise _cannot_read(name, f, e, file_name) from None
        if p.dtype != np.uint8 or p.ndim != 3:
            raise ValueError(
                f"model {name!r} ({f}): probs must be uint8 (T, S, S) quantised maps, got "
                f"{p.dtype} {p.shape}"
            )
        if t.shape != p.shape or tid.shape != (p.shape[0],) or iid.shape != tid.shape:
            raise ValueError(
                f"model {name!r} ({f}): truth {t.shape}, tile_ids {tid.shape} and image_ids "
                f"{iid.shape} do not match probs {p.shape}"
            )
        if len(set(tid.tolist())) != len(tid):
            raise ValueError(f"model {name!r} ({f}) holds a tile id more than once")
        if probs is None:
            probs = np.empty((len(npz), *p.shape), dtype=np.uint8)  # (N, T, S, S)
            truth, tile_ids, image_ids = t.astype(bool), tid, iid
            probs[0] = p
            continue
        if p.shape[1:] != probs.shape[2:]:
            raise ValueError(
                f"model {name!r} ({f}) has {p.shape[1]}x{p.shape[2]} tiles, but model "
                f"{names[0]!r} has {probs.shape[2]}x{probs.shape[3]}"
            )
        order = _align(tid, tile_ids, name, names[0])
        if order is not None:
            p, t, iid = p[order], t[order], iid[order]
        bad = np.flatnonzero(iid != image_ids)
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"model {name!r}: tile {str(tile_ids[i])!r} comes from image {str(iid[i])!r}, but "
                f"from {str(image_ids[i])!r} in model {names[0]!r}"
            )
        diff = np.flatnonzero((t.astype(bool) != truth).any(axis=(1, 2)))
        if diff.size:
            raise ValueError(
                f"model {name!r}: the ground truth of tile {str(tile_ids[int(diff[0])])!r} differs "
                f"from model {names[0]!r} ({diff.size} tile(s) differ); the models were "
                "validated on different data"
            )
        probs[m] = p
    assert probs is not None and truth is not None
    return ModelLibrary(
        names=names,
        sources=npz,
        checkpoints=checkpoints,
        probs=probs,
        truth=truth,
        tile_ids=tile_ids,
        image_ids=image_ids,
    )


def _refuse_shared_checkpoints(npz: Sequence[Path], checkpoints: Sequence[Path]) -> None:
    """Refuses two models whose npz files lie in one folder, so share its checkpoint.

    A model predicts with the ``best.pt`` (``folds.json``) next to its npz: the search would
    score the distinct maps, but the spec would name that one checkpoint for each of them and
    ``bldseg predict`` would run one model k times.
    """
    first: dict[Path, Path] = {}  # resolved checkpoint -> the first npz that uses it
    for f, c in zip(npz, checkpoints, strict=True):
        key = c.resolve()
        if key in first:
            raise ValueError(
                f"models {first[key]} and {f} lie in one folder, so both would predict with its "
                f"checkpoint {c}; pass each model's own run folder (holding its {VAL_FILE} and "
                f"{CHECKPOINT_FILE}), one per model"
            )
        first[key] = f


def _align(tid: np.ndarray, ref: np.ndarray, name: str, ref_name: str) -> np.ndarray | None:
    """Index putting ``tid`` in the order of ``ref``; None if already aligned."""
    if tid.shape == ref.shape and np.array_equal(tid, ref):
        return None
    pos = {t: i for i, t in enumerate(tid.tolist())}
    missing = [t for t in ref.tolist() if t not in pos]
    if missing:
        raise ValueError(
            f"model {name!r} has no tile {missing[0]!r} (which model {ref_name!r} has; "
            f"{len(missing)} tile(s) missing); all models must be validated on the same tiles"
        )
    if len(tid) != len(ref):
        extra = sorted(set(tid.tolist()) - set(ref.tolist()))
        raise ValueError(
            f"model {name!r} has tile {extra[0]!r} that model {ref_name!r} does not have "
            f"({len(extra)} extra tile(s)); all models must be validated on the same tiles"
        )
    return np.array([pos[t] for t in ref.tolist()], dtype=np.int64)


def split_by_image(
    image_ids: np.ndarray, fraction: float = 0.5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Splits tiles by source image into a selection part and a check part.

    Every tile of an image lands on the same side, so neighbouring tiles of one scene never
    leak between the part an ensemble is chosen on and the part it is reported on.

    Args:
        image_ids: (T,) source image of each tile.
        fraction: share of the images in the selection part.
        seed: seed of the image shuffle.

    Returns:
        ``(selection, check)`` sorted tile indices.

    Raises:
        ValueError: if there are fewer than two source images or ``fraction`` is not in (0, 1).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    images = np.unique(np.asarray(image_ids).astype(str))
    if images.size < 2:
        raise ValueError(
            f"an honest split needs tiles from at least two source images, got {images.size}"
        )
    perm = np.random.default_rng(seed).permutation(images.size)
    n_sel = min(max(1, round(fraction * images.size)), images.size - 1)
    selected = np.isin(np.asarray(image_ids).astype(str), images[perm[:n_sel]])
    return np.flatnonzero(selected), np.flatnonzero(~selected)
