"""Prediction: a model or an ensemble -> probability maps -> a submission CSV or mask files.

An ensemble spec is JSON (written by the ensemble search, or by hand)::

    {"members": [{"checkpoint": "../runs/a/best.pt", "weight": 1.0, "threshold": 0.47,
                  "tta": true}, ...],
     "rule": "mean", "threshold": 0.43, "votes": 0, "empty_votes": 0, "empty_area": 0,
     "min_area": 0, "tta": false}

Member paths are relative to the spec's folder (absolute paths of older specs still load), so
a folder holding the spec and the runs can be moved. A member is a ``best.pt``, the
``folds.json`` of a K-fold run (:mod:`bldseg.train.folds`), or a run folder (either of them, as
``--checkpoint`` takes it). Thresholds are probabilities in [0, 1]. A K-fold member's map is
the mean of its K fold models' probabilities (and flips, with TTA), quantised once, exactly as
one model's map is; the ensemble search scored the run's out-of-fold maps, each tile by the
one fold model that did not train on it, so on new images a K-fold member is an average the
search did not score.
Each member predicts with flip test-time augmentation (TTA) as its member entry's ``"tta"``
says: the ensemble search writes it as the member's run validated (its maps were then
flip-averaged), so members validated differently each predict as they were scored. A member
without one (specs written before the per-member record) takes the spec's ``"tta"``.
Members' probabilities are quantised to uint8 exactly as in validation and combined by the
spec's ``rule`` (:func:`combine_members`), with the same integers the ensemble search scored,
so a submission of single-model members reproduces the searched ensemble bit for bit:

- ``"mean"`` / ``"weighted"``: the (weighted) sum of the maps against the chosen level;
- ``"vote"``: each member's own mask (its map at its own ``threshold``), positive where at
  least ``votes`` members agree;
- empty-tile rule (any rule, off when ``empty_votes`` is 0): an image where at least
  ``empty_votes`` members' own masks have fewer than ``empty_area`` pixels is predicted empty;
- then an image whose predicted area is below ``min_area`` pixels is predicted empty.

An empty image is ``-1`` in a submission.

Two ways in:

- :func:`predict_cache`: every image of a cache (the competition's test tiles) as one tile,
  for :func:`write_submission`.
- :func:`predict_folder`: every image under a folder, of any size, to one mask PNG per image
  (and a GeoTIFF mask for a georeferenced GeoTIFF), optionally scored against mask files.

Large scenes (:func:`predict_image`)
    A scene is cut into square windows of ``window`` px (default: the size the model was
    validated on, ``val_tile`` or else ``aug.crop_size``) on a grid whose step is
    ``window * (1 - overlap)`` (``overlap`` 0.25 by default); the last row and column of
    windows are shifted inwards so that every window lies inside the scene. Each window is
    predicted like a validation tile (quantised to uint8), and each pixel gets the weighted
    mean of the windows covering it. The weight of a window's pixel is the product of two
    triangular ramps, 1 at the window's centre falling linearly towards its edges, floored at
    :data:`EDGE_WEIGHT`: pixels near a window's edge see less context (and the model's own
    zero padding to a multiple of 32), so the window in which a pixel lies most centrally
    dominates, while the floor keeps pixels that only edge windows cover (the scene's border)
    defined. A scene smaller than the window is padded to it by reflection, and the padding
    is cropped off the result. A scene of exactly one window gets that window's map
    unchanged, so :func:`predict_folder` on a tile-sized image equals :func:`predict_cache`.
"""

from __future__ import annotations

import json
import math
import os
import uuid
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args

import cv2
import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from bldseg import metrics
from bldseg.data import geo
from bldseg.data.cache import DatasetCache
from bldseg.data.dataset import TileDataset, validation_tiles
from bldseg.data.prepare import (
    DataOptions,
    describe_options,
    flat_options,
    recorded_flags_left_out,
    recorded_folders,
)
from bldseg.data.readers import (
    ReadOptions,
    check_mask_grid,
    image_size,
    read_folder_dataset,
    read_image,
    read_mask_image,
)
from bldseg.data.rle import rle_encode
from bldseg.io import write_json
from bldseg.models import create_model
from bldseg.models.pretrained import overrides_for_checkpoint
from bldseg.train.augment import build_eval_transform
from bldseg.train.config import RunConfig
from bldseg.train.engine import (
    IMAGE_READ_FIELDS,
    eval_autocast,
    load_state,
    predict_probs,
    resolve_device,
    to_run_memory_format,
)
from bldseg.train.folds import FOLDS_FILE, fold_dir, unfinished_folds_problem

#: Default fraction of a window that neighbouring windows share.
DEFAULT_OVERLAP = 0.25
#: Largest overlap accepted: beyond it each pixel is predicted ten or more times.
MAX_OVERLAP = 0.9
#: Smallest window: the models downsample by 32, so a smaller input has no deepest feature map.
MIN_WINDOW = 32
#: Blending weight of a window's edge pixels relative to its centre (see the module docstring).
EDGE_WEIGHT = 0.05
#: Pixels of a scene's blended map quantised at a time (:func:`predict_image`): quantising
#: takes float64 temporaries of 8 bytes a pixel, 128 MB each for a 4000 x 4000 scene at once.
QUANTISE_BLOCK_PIXELS = 1 << 16


Rule = Literal["mean", "weighted", "vote"]
RULES: tuple[str, ...] = get_args(Rule)


@dataclass
class EnsembleSpec:
    """Members, weights and decision rule of a submission (see the module docstring)."""

    checkpoints: list[str]  # best.pt files of the members (folds.json of K-fold runs)
    weights: list[float] = field(default_factory=list)  # per member; empty: equal weights
    threshold: float = 0.5  # mean/weighted: positive iff (weighted) mean probability >= this
    min_area: int = 0  # images with fewer predicted pixels are predicted empty
    tta: bool = False  # flip test-time augmentation of every member without its own (member_tta)
    rule: Rule = "mean"  # how the members' maps are combined
    member_thresholds: list[float] = field(default_factory=list)  # per member: its own mask's
    # threshold (the vote and empty-tile rules); empty when neither is used
    votes: int = 0  # vote rule: positive where at least this many members' masks are
    empty_votes: int = 0  # empty-tile rule: this many members' masks nearly empty -> empty; 0 off
    empty_area: int = 0  # empty-tile rule: a member's mask is "nearly empty" below this many px
    # per member: flip TTA, as its validation maps (what the search scored) were made; empty:
    # ``tta`` for every member (specs written before the per-member record)
    member_tta: list[bool] = field(default_factory=list)

    def check(self) -> None:
        """Raises ValueError, naming the field, when the rule's parameters do not fit."""
        k = len(self.checkpoints)
        if k == 0:
            raise ValueError("an ensemble spec needs at least one member")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        if self.weights and len(self.weights) != k:
            raise ValueError(f"{len(self.weights)} weights for {k} member(s)")
        if any(not (w > 0 and math.isfinite(w)) for w in self.member_weights()):
            # an infinite weight makes every weighted mean NaN: an empty submission, silently
            raise ValueError(f"weights must be positive and finite, got {self.member_weights()}")
        own = self.rule == "vote" or self.empty_votes > 0
        if own and len(self.member_thresholds) != k:
            raise ValueError(
                f"the {self.rule!r} rule{' with the empty-tile rule' * (self.empty_votes > 0)} "
                f"needs one member threshold per member ({k}), got {len(self.member_thresholds)}"
            )
        if self.rule == "vote" and not 1 <= self.votes <= k:
            raise ValueError(f"votes must lie in 1..{k} (the members), got {self.votes}")
        if not 0 <= self.empty_votes <= k:
            raise ValueError(f"empty_votes must lie in 0..{k} (0: off), got {self.empty_votes}")
        if self.empty_votes > 0 and self.empty_area < 1:
            raise ValueError(f"empty_area must be at least 1 pixel, got {self.empty_area}")
        if self.min_area < 0:
            raise ValueError(f"min_area must be at least 0 pixels (0: off), got {self.min_area}")
        # A probability threshold outside [0, 1] (or NaN) gives an all-empty or all-building
        # submission without any error further down.
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {self.threshold}")
        for i, t in enumerate(self.member_thresholds):
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"member {i}'s threshold must lie in [0, 1], got {t}")
        if self.member_tta and len(self.member_tta) != k:
            raise ValueError(f"{len(self.member_tta)} member TTA flags for {k} member(s)")

    @classmethod
    def load(cls, path: str | os.PathLike) -> EnsembleSpec:
        """Reads a spec JSON; relative member paths are relative to the JSON's folder.

        A member names a ``best.pt``, a K-fold run's ``folds.json``, or a run folder (resolved
        as ``--checkpoint`` resolves it, :func:`resolve_member`).

        Raises:
            ValueError: Not JSON, no members, a member without a ``checkpoint`` entry, a field
                that is not a number, or rule parameters that do not fit (:meth:`check`); the
                message names the spec and the field. A folder (``bldseg ensemble``'s --out):
                the message names the spec files in it.
            FileNotFoundError: The spec, a member's checkpoint or a K-fold member's fold
                checkpoint does not exist (the message names the spec and the file), checked
                here rather than after the first members have already been run over the whole
                test set.
        """
        path = Path(path)
        if path.is_dir():
            raise ValueError(_spec_folder_message(path))
        if not path.is_file():
            raise FileNotFoundError(f"ensemble spec not found: {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a valid JSON ensemble spec: {e}") from None
        if not isinstance(d, dict) or not d.get("members"):
            raise ValueError(f"{path}: an ensemble spec needs a non-empty 'members' list")

        def number(convert, value, field_name: str):
            try:
                out = convert(value)
                # a count read as int must be whole: int(2.7) would vote with 2, silently
                if convert is int and (isinstance(value, bool) or out != float(value)):
                    raise ValueError
                return out
            except (TypeError, ValueError, OverflowError):
                kind = "a whole number" if convert is int else "a number"
                raise ValueError(f"{path}: {field_name} must be {kind}, got {value!r}") from None

        ckpts, weights, own, own_tta = [], [], [], []
        for i, m in enumerate(d["members"]):
            if not isinstance(m, dict) or "checkpoint" not in m:
                raise ValueError(f"{path}: member {i} has no 'checkpoint' entry: {m!r}")
            if not isinstance(m["checkpoint"], str) or not m["checkpoint"].strip():
                raise ValueError(
                    f"{path}: member {i}'s 'checkpoint' must be a path, got {m['checkpoint']!r}"
                )
            # An absolute path (older specs) is kept as it is by the join.
            ckpt = resolve_member((path.parent / m["checkpoint"]).resolve())
            if not ckpt.is_file():
                raise FileNotFoundError(
                    f"{path}: member {i} checkpoint {ckpt} does not exist; fix its path in the "
                    "spec (relative paths are relative to the spec's folder) or re-run the "
                    "ensemble search"
                )
            try:
                check_member(ckpt)  # a K-fold member's fold checkpoints
            except FileNotFoundError as e:
                raise FileNotFoundError(f"{path}: member {i}: {e}") from None
            except ValueError as e:
                raise ValueError(f"{path}: member {i}: {e}") from None
            ckpts.append(str(ckpt))
            weights.append(number(float, m.get("weight", 1.0), f"member {i}'s 'weight'"))
            t = m.get("threshold")
            own.append(None if t is None else number(float, t, f"member {i}'s 'threshold'"))
            flag = m.get("tta")
            if flag is not None and not isinstance(flag, bool):
                raise ValueError(f"{path}: member {i}'s 'tta' must be true or false, got {flag!r}")
            own_tta.append(flag)
        tta = d.get("tta", False)
        if not isinstance(tta, bool):
            raise ValueError(f"{path}: 'tta' must be true or false, got {tta!r}")
        spec = cls(
            ckpts,
            weights,
            number(float, d.get("threshold", 0.5), "'threshold'"),
            number(int, d.get("min_area", 0), "'min_area'"),
            tta,
            rule=d.get("rule", "mean"),
            member_thresholds=own if None not in own else [],
            votes=number(int, d.get("votes", 0), "'votes'"),
            empty_votes=number(int, d.get("empty_votes", 0), "'empty_votes'"),
            empty_area=number(int, d.get("empty_area", 0), "'empty_area'"),
            # a member without its own flag takes the spec's
            member_tta=(
                [tta if f is None else f for f in own_tta]
                if any(f is not None for f in own_tta)
                else []
            ),
        )
        try:
            spec.check()
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return spec

    def save(self, path: str | os.PathLike, home: str | os.PathLike | None = None) -> None:
        """Writes the spec JSON atomically, member paths relative to its folder.

        Relative paths keep a folder holding the spec and the runs movable; a member on
        another drive (Windows), which has no relative path, is written absolute. ``home``:
        the folder the file will be moved to, when it is written elsewhere first (the paths are
        relative to where it will be read).

        Raises:
            ValueError: Rule parameters that do not fit (:meth:`check`).
            OSError: The file cannot be written (names it); an earlier spec there is kept.
        """
        self.check()
        path = Path(path)
        folder = Path(home if home is not None else path.parent).resolve()
        members = []
        for i, (c, w) in enumerate(zip(self.checkpoints, self.member_weights(), strict=True)):
            try:
                rel = os.path.relpath(Path(c).resolve(), folder)
            except ValueError:
                rel = str(Path(c).resolve())
            m: dict[str, Any] = {"checkpoint": Path(rel).as_posix(), "weight": w}
            if self.member_thresholds:
                m["threshold"] = self.member_thresholds[i]
            if self.member_tta:
                m["tta"] = self.member_tta[i]
            members.append(m)
        d = {
            "members": members,
            "rule": self.rule,
            "threshold": self.threshold,
            "votes": self.votes,
            "empty_votes": self.empty_votes,
            "empty_area": self.empty_area,
            "min_area": self.min_area,
            "tta": self.tta,
        }
        # a failed write (a full disk) leaves the earlier spec and no temporary file
        write_json(path, d)

    def decision(self) -> dict[str, Any]:
        """The parameters that decide the masks under this spec's rule, as plain data.

        ``threshold`` and ``weights`` for the mean rules, ``votes`` and ``member_thresholds``
        for the vote rule (whose decision no ensemble threshold enters), the empty-tile rule's
        parameters when it is on, then ``min_area`` and ``tta``: what a score was made with
        (``tta`` one flag when every member predicts alike, else one per member).
        """
        out: dict[str, Any] = {"rule": self.rule}
        if self.rule == "vote":
            out |= {"votes": self.votes, "member_thresholds": list(self.member_thresholds)}
        else:
            out |= {"threshold": self.threshold, "weights": self.member_weights()}
        if self.empty_votes > 0:
            out |= {
                "member_thresholds": list(self.member_thresholds),
                "empty_votes": self.empty_votes,
                "empty_area": self.empty_area,
            }
        flags = self.member_ttas()
        tta = flags[0] if len(set(flags)) == 1 else flags
        return out | {"min_area": self.min_area, "tta": tta}

    def member_ttas(self) -> list[bool]:
        """Each member's flip TTA: its own (``member_tta``), else the spec's ``tta``."""
        return list(self.member_tta) if self.member_tta else [self.tta] * len(self.checkpoints)

    def member_weights(self) -> list[float]:
        """One weight per member (equal weights when none are given)."""
        return self.weights or [1.0] * len(self.checkpoints)

    def member_levels(self) -> list[int]:
        """Each member's own mask level on the 0..255 scale (``q >= level``)."""
        return [int(metrics.level_from_threshold(t)) for t in self.member_thresholds]


#: The specs ``bldseg ensemble`` writes in its --out, in the order a folder's are named:
#: the one it decided to submit, the best ensemble, the best single model.
ENSEMBLE_SPEC_FILES = ("submit.json", "best_ensemble.json", "best_single.json")


def _spec_folder_message(folder: Path) -> str:
    """Why a folder is no ensemble spec, naming the spec files in it to pass instead (the
    folder is most likely ``bldseg ensemble``'s --out)."""
    named = [folder / n for n in ENSEMBLE_SPEC_FILES if (folder / n).is_file()]
    # the best spec of each rule (best_ensemble_<rule>.json), or specs written by hand
    others = sorted(p for p in folder.glob("*.json") if p.is_file() and p not in named)
    named += [p for p in others if _looks_like_spec(p)]
    if not named:
        return (
            f"ensemble spec {folder} is a folder, and holds no spec JSON; pass the spec file "
            f"(bldseg ensemble writes {', '.join(ENSEMBLE_SPEC_FILES)} in its --out)"
        )
    hint = " (what bldseg ensemble decided to submit)" if named[0].name == "submit.json" else ""
    more = f"; or {', '.join(p.name for p in named[1:])}" if len(named) > 1 else ""
    return f"ensemble spec {folder} is a folder; pass the spec file in it: {named[0]}{hint}{more}"


def _looks_like_spec(path: Path) -> bool:
    """Whether a JSON file has the ``members`` list of an ensemble spec."""
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(d, dict) and isinstance(d.get("members"), list)


def _checkpoint_state(path: Path, *, mmap: bool = False) -> dict[str, Any]:
    """A ``best.pt``'s saved dict, checked to be a bldseg checkpoint (:func:`load_checkpoint`)."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: the file is empty")
    if mmap and not zipfile.is_zipfile(path):
        # torch maps only the zip archives torch.save writes (bldseg's checkpoints are); its
        # refusal of other bytes advises re-saving them with _use_new_zipfile_serialization,
        # meaningless for a text file. Read whole, a file of an older torch format still loads,
        # and other bytes are named for what they are (load_state: a Git LFS pointer, a web page).
        mmap = False
    # refuses pickled objects: a checkpoint may come from anywhere
    state = load_state(path, mmap=mmap)
    if isinstance(state, dict) and "models" in state and "optimizers" in state:
        # a run folder's other file: the last epoch's networks, optimizers and random state
        best = path.parent / "best.pt"
        use = (
            f"predict with {best}, the run's best epoch"
            if best.is_file()
            else f"predict with the run's best.pt, which {path.parent} does not hold (bldseg "
            "train writes it with each new best validation epoch)"
        )
        raise ValueError(
            f"{path} is bldseg's resumable training state (what running the same bldseg train "
            "command again continues from), not "
            f"a model checkpoint; {use}"
        )
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{path} is not a bldseg checkpoint (no 'model'/'config' entries)")
    return state


def as_validated(cfg: RunConfig, record: dict) -> RunConfig:
    """``cfg`` of a checkpoint or K-fold manifest, its ``precision`` the one its validation ran
    in where ``record`` says (``amp``, :func:`~bldseg.train.engine.validated_precision`), so
    that :func:`~bldseg.train.engine.eval_autocast` predicts as it validated on any device.
    Records of older bldseg have none: ``auto`` is then resolved on the predicting device."""
    amp = record.get("amp")
    return cfg if amp in (None, cfg.precision) else replace(cfg, precision=amp)


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """A trained model from ``best.pt``: ``(model in eval mode, RunConfig, metrics dict)``.

    Raises:
        FileNotFoundError: No such file.
        ValueError: The file is not a bldseg checkpoint, or it holds pickled objects beyond
            tensors and plain data, which are refused rather than unpickled
            (:func:`bldseg.train.engine.load_state`).
    """
    state = _checkpoint_state(Path(path))
    cfg = as_validated(RunConfig.from_flat(state["config"]), state)
    # Built as fit() built it (with_cp, drop path), with layer scale when the weights carry
    # gammas (a run fine-tuned from the official T segmentor); never re-reads `pretrained`.
    kwargs = {**cfg.model_kwargs(), **overrides_for_checkpoint(state["model"])}
    model = create_model(cfg.model, **kwargs)
    model.load_state_dict(state["model"])
    device = torch.device(device)
    model = to_run_memory_format(model.to(device), cfg, device)  # as it was validated in fit()
    return model.eval(), cfg, state.get("metrics", {})


def resolve_member(path: str | os.PathLike) -> Path:
    """A member's file: a run folder gives its ``folds.json`` (a K-fold run) or ``best.pt``;
    a file is itself."""
    path = Path(path)
    if path.is_dir():
        folds = path / FOLDS_FILE
        return folds if folds.is_file() else path / "best.pt"
    return path


def check_member(path: str | os.PathLike) -> Path:
    """A member's file (:func:`resolve_member`), checked to exist without loading it, so that
    a typo in the last of several members is refused before the first is run over a test set.

    Raises:
        FileNotFoundError: The file, or a fold's ``best.pt`` of a K-fold run, is missing.
    """
    path = resolve_member(path)
    if not path.is_file():
        what = "K-fold manifest" if path.name == FOLDS_FILE else "checkpoint"
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.name == FOLDS_FILE:
        fold_checkpoints(path)
    return path


def fold_checkpoints(manifest_path: Path) -> tuple[list[Path], dict]:
    """The fold checkpoints of a K-fold manifest (``folds.json``), each checked to exist, and
    the manifest.

    Raises:
        FileNotFoundError: A fold's ``best.pt`` is missing (the message says how to train it).
        ValueError: Not a K-fold run manifest.
    """
    manifest = json.loads(manifest_path.read_text())
    if "folds" not in manifest or "config" not in manifest:
        raise ValueError(
            f"{manifest_path} is not a K-fold run manifest (no 'folds'/'config' entries)"
        )
    ckpts = [fold_dir(manifest_path.parent, f) / "best.pt" for f in range(int(manifest["folds"]))]
    for f, ckpt in enumerate(ckpts):
        if not ckpt.is_file():
            raise FileNotFoundError(
                f"{manifest_path}: fold {f} has no {ckpt}; train it (bldseg train --folds "
                f"{manifest['folds']} --out {manifest_path.parent}) before predicting"
            )
    if (problem := unfinished_folds_problem(manifest_path, manifest)) is not None:
        raise ValueError(problem)
    return ckpts, manifest


def load_member(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """The model(s) of one ensemble member: ``(model or models, RunConfig, metrics dict)``.

    ``best.pt`` gives one model and its best epoch's metrics. A K-fold run (its ``folds.json``
    or its folder) gives the list of its K fold models (:func:`predict_probs` averages them),
    its config and its out-of-fold metrics (``val_thr_best``: the threshold chosen on the
    out-of-fold maps).

    Raises:
        FileNotFoundError: No such file, or a fold's ``best.pt`` is missing.
        ValueError: Not a bldseg checkpoint or K-fold manifest.
    """
    path = resolve_member(path)
    if path.name != FOLDS_FILE:
        return load_checkpoint(path, device)
    if not path.is_file():
        raise FileNotFoundError(f"K-fold manifest not found: {path}")
    ckpts, manifest = fold_checkpoints(path)
    models = [load_checkpoint(ckpt, device)[0] for ckpt in ckpts]
    return (
        models,
        as_validated(RunConfig.from_flat(manifest["config"]), manifest),
        manifest.get("oof", {}),
    )


def member_config(path: str | os.PathLike) -> tuple[RunConfig, dict]:
    """One member's run config and metrics, without building its model(s).

    What prediction needs to choose the threshold and TTA before it runs anything: the
    metrics of ``best.pt`` (memory-mapped, so the weights are not read) or a K-fold run's
    out-of-fold metrics, as :func:`load_member` gives them.

    Raises:
        FileNotFoundError: No such file, or a fold's ``best.pt`` is missing.
        ValueError: Not a bldseg checkpoint or K-fold manifest.
    """
    path = resolve_member(path)
    if path.name == FOLDS_FILE:
        if not path.is_file():
            raise FileNotFoundError(f"K-fold manifest not found: {path}")
        _, manifest = fold_checkpoints(path)
        return as_validated(RunConfig.from_flat(manifest["config"]), manifest), manifest.get(
            "oof", {}
        )
    state = _checkpoint_state(path, mmap=True)
    return as_validated(RunConfig.from_flat(state["config"]), state), state.get("metrics", {})


def _image_read_of(path: Path) -> dict[str, Any] | None:
    """How a ``best.pt``'s training images were decoded, as ReadOptions keyword arguments
    (``alpha``, ``bands``, ``stretch``); None when the checkpoint predates the record.

    Raises:
        ValueError: The record is not one :func:`bldseg.train.engine.fit` writes (names the file).
    """
    record = _checkpoint_state(path, mmap=True).get("image_read")
    if record is None:
        return None
    try:
        if not isinstance(record, dict) or set(record) != set(IMAGE_READ_FIELDS):
            raise TypeError
        bands, stretch = record["bands"], record["stretch"]
        options = {
            "alpha": record["alpha"],
            "bands": None if bands is None else tuple(int(b) for b in bands),
            "stretch": tuple(float(v) for v in stretch),
        }
        ReadOptions(**options)  # checks the values
    except (TypeError, ValueError):
        raise ValueError(
            f"{path}: its record of how the training images were decoded ('image_read': "
            f"{record!r}) is not one bldseg writes; pass --bands, --stretch and --alpha as the "
            "model was trained"
        ) from None
    return options


def image_read_flag(name: str, value: Any) -> str:
    """One image read option (``alpha``, ``bands`` or ``stretch``) as the flag that sets it."""
    if name == "bands":
        if value is None:
            return "no --bands (the default)"
        return "--bands " + ",".join(map(str, value))
    if name == "stretch":
        return f"--stretch {value[0]:g} {value[1]:g}"
    return f"--{name} {value}"


def describe_image_read(options: dict[str, Any]) -> str:
    """Image read options (:func:`recorded_image_read`) as the flags that set them (no
    ``--bands`` when the default bands were read)."""
    return " ".join(
        image_read_flag(name, options[name])
        for name in ("bands", "stretch", "alpha")
        if not (name == "bands" and options[name] is None)
    )


def recorded_image_read(checkpoints: Sequence[str | os.PathLike]) -> tuple[dict | None, list[str]]:
    """How the members' training images were decoded, as their checkpoints record it.

    A model has learnt images decoded one way (which bands, how stretched to 8 bits, what
    transparent pixels became): new images must be read the same way. ``fit`` records it in
    ``best.pt`` (``image_read``); a K-fold member's folds are read one by one.

    Args:
        checkpoints: The members (``best.pt``, ``folds.json`` or run folders).

    Returns:
        ``(options, unrecorded)``: the ReadOptions keyword arguments (``alpha``, ``bands``,
        ``stretch``) every member that records them shares, or None when none does; and the
        members whose checkpoints record none (written before bldseg recorded it).

    Raises:
        ValueError: Two members (or two folds of one) record different options: one set of test
            images cannot be read as both were trained; the message names them and their flags.
        FileNotFoundError: A checkpoint is missing.
    """
    found: list[tuple[str, dict]] = []
    unrecorded = []
    for member in checkpoints:
        path = resolve_member(member)
        files = fold_checkpoints(path)[0] if path.name == FOLDS_FILE else [path]
        records = [(str(f), _image_read_of(f)) for f in files]
        if all(r is None for _, r in records):
            unrecorded.append(str(member))
        found += [(f, r) for f, r in records if r is not None]
    for f, r in found[1:]:
        if r != found[0][1]:
            raise ValueError(
                f"the members were trained on images read differently: {found[0][0]} with "
                f"{describe_image_read(found[0][1])}, {f} with {describe_image_read(r)}; one set "
                "of images cannot be read as both expect. Predict with each separately, or "
                "ensemble models trained on images read alike"
            )
    return (found[0][1] if found else None), unrecorded


def _data_options_of(path: Path) -> DataOptions | None:
    """How a ``best.pt``'s training data was found and read (``data_options``,
    :func:`bldseg.train.engine.data_options_record`); None when the checkpoint predates the
    record.

    Raises:
        ValueError: The record is not one :func:`bldseg.train.engine.fit` writes (names the file).
    """
    record = _checkpoint_state(path, mmap=True).get("data_options")
    if record is None:
        return None
    try:
        if not isinstance(record, dict) or not isinstance(record.get("read"), dict):
            raise TypeError
        # Fields a newer bldseg may add are left out: those read here are known.
        layout = {f.name for f in fields(DataOptions)}
        read = {f.name for f in fields(ReadOptions)}
        return DataOptions.from_dict(
            {
                **{k: v for k, v in record.items() if k in layout},
                "read": {k: v for k, v in record["read"].items() if k in read},
            }
        )
    except (TypeError, ValueError):
        raise ValueError(
            f"{path}: its record of how the training data was read ('data_options': "
            f"{record!r}) is not one bldseg writes; pass the data flags (--mask-values, "
            "--tile-size, ...) as the model was trained"
        ) from None


def recorded_data_options(member: str | os.PathLike) -> DataOptions | None:
    """How a member's training data was found and decoded (folders, tiles, mask values...), as
    its ``best.pt`` records it; a K-fold member's folds must agree. None for checkpoints from
    before the record (and for data made by hand, which records nothing).

    Raises:
        ValueError: The folds of a K-fold member record different options, or a record is
            not one bldseg writes.
        FileNotFoundError: The checkpoint, or a fold's of a K-fold member, is missing.
    """
    path = resolve_member(member)
    files = fold_checkpoints(path)[0] if path.name == FOLDS_FILE else [path]
    found = [(f, r) for f in files if (r := _data_options_of(Path(f))) is not None]
    for f, r in found[1:]:
        if r != found[0][1]:
            raise ValueError(
                f"{member}: its folds were trained on data read differently: {found[0][0]} "
                f"with {describe_options(flat_options(found[0][1]))}, {f} with "
                f"{describe_options(flat_options(r))}; pass the data flags as it was trained"
            )
    return found[0][1] if found else None


@dataclass(frozen=True)
class DataUse:
    """What a command does with a dataset, in the words of its messages about the data the
    members recorded (:func:`choose_recorded_data`)."""

    verb: str  # "predict": "pass --data to predict another"
    doing: str  # "predicting": "predicting the test split of ..."
    part: str  # the part of the dataset it reads: "test split"
    forms: str  # what --data may then name: "a competition folder, its test CSV or ..."
    folders_hint: str = ""  # how to read image folders instead, after "pass --data ..."
    # Whether the data is read with the training's data flags (masks, tiles): then data that
    # has moved is refused naming them, as the record is not applied to the new place.
    data_flags: bool = False


def dataset_of(data: str | os.PathLike) -> Path:
    """The dataset a --data names, as a resolved folder: a CSV stands for the folder holding it
    (``train.csv`` and the ``test.csv`` beside it are one dataset), so that two spellings of one
    dataset compare equal."""
    path = Path(data).expanduser().resolve()
    return path.parent if path.suffix.lower() == ".csv" else path


def member_data_kind(member: str | os.PathLike) -> str | None:
    """What kind of data a member was trained on, as its ``best.pt`` records it (``data_kind``:
    ``"synthetic"``, ``"competition"``, ``"folders"``, ``"cache"``, ...; a K-fold member's
    first fold's); None for checkpoints from before that record.

    Raises:
        FileNotFoundError: The checkpoint, or a fold's of a K-fold member, is missing.
        ValueError: Not a bldseg checkpoint or K-fold manifest.
    """
    path = resolve_member(member)
    first = fold_checkpoints(path)[0][0] if path.name == FOLDS_FILE else path
    return _checkpoint_state(Path(first), mmap=True).get("data_kind")


def _unnamed_user_data(member: str) -> bool:
    """Whether a member records no ``--data`` yet was not trained on the synthetic world: image
    folders given by --images/--masks (``best.pt``'s ``data_kind``; checkpoints from before
    that record: False, as they were read before)."""
    kind = member_data_kind(member)
    return kind is not None and kind != "synthetic"


def recorded_data(members: Sequence[str]) -> dict[str, str | None]:
    """The data each member was trained on, as its run config records it (``data``: the
    absolute ``--data`` of bldseg train or a search; None for the built-in synthetic world, and
    for image folders given by --images); a K-fold member's from its ``folds.json``.

    Raises:
        FileNotFoundError: A member, or a fold's ``best.pt`` of a K-fold member, is missing.
        ValueError: Not a bldseg checkpoint or K-fold manifest.
    """
    return {m: member_config(m)[0].data for m in members}


def trained_on(recorded: dict[str, str | None]) -> str:
    """``"a.pt, b.pt trained on /data/x; c.pt trained on no recorded --data (...)"``: members
    grouped by the dataset they recorded (:func:`recorded_data`)."""
    groups: dict[Path | None, list[str]] = {}
    for member, data in recorded.items():
        groups.setdefault(None if data is None else dataset_of(data), []).append(member)
    # None: fit records it for the synthetic world and for image folders given by --images
    return "; ".join(
        f"{', '.join(members)} trained on "
        + (
            "no recorded --data (the built-in synthetic world, or --images folders)"
            if d is None
            else str(recorded[members[0]])
        )
        for d, members in groups.items()
    )


def choose_recorded_data(
    given: str | None, members: Sequence[str], use: DataUse
) -> tuple[str | None, str | None, str | None]:
    """The data a command run with these members reads: ``(the data, a line saying it was taken
    from the record, a warning that the given --data is not what the members trained on)``.

    Without --data (``given`` None) the members' recorded data (:func:`recorded_data`) is read;
    None (the synthetic world, as before the record was read) leaves the data None and says
    nothing. A --data given wins, as another dataset is a legitimate thing to read; it is
    warned about, as a command line copied from another project looks the same.

    Args:
        given: The --data given, or None.
        members: The members (``best.pt``, ``folds.json`` or run folders), as the messages name
            them.
        use: What the command does with the data, for the messages.

    Raises:
        ValueError: Members recorded different data, and no --data chooses.
        FileNotFoundError: The recorded data is no longer there, or a member is missing.
    """
    recorded = recorded_data(members)
    if given is not None:
        # None is not compared: it does not tell the synthetic world from --images folders
        others = {
            m: d
            for m, d in recorded.items()
            if d is not None and dataset_of(d) != dataset_of(given)
        }
        if not others:
            return given, None, None
        warning = (
            f"warning: {use.doing} the {use.part} of --data {given}, but {trained_on(others)} "
            f"(recorded in the checkpoint); leave --data out to {use.verb} that data's "
            f"{use.part}"
        )
        return given, None, warning
    if len({None if d is None else dataset_of(d) for d in recorded.values()}) > 1:
        raise ValueError(
            f"the members were trained on different data ({trained_on(recorded)}); pass --data "
            f"with the dataset whose {use.part} to {use.verb}"
        )
    data = recorded[members[0]]
    if data is None:
        folders = [m for m in members if _unnamed_user_data(m)]
        if folders:
            # Image folders given by --images/--masks are no --data: the synthetic world would
            # be read in their place, as it was, without a word.
            raise ValueError(
                f"{_folders_trained_on(folders)}; pass --data with the dataset whose "
                f"{use.part} to {use.verb}{use.folders_hint}"
            )
        return None, None, None
    who = f"{members[0]} was" if len(members) == 1 else f"its {len(members)} members were"
    if not Path(data).exists():
        flags = _training_flags(members) if use.data_flags else None
        raise FileNotFoundError(
            f"{data}, the data {who} trained on (recorded in the checkpoint), no longer exists; "
            f"pass --data with the dataset's {use.part} ({use.forms})"
            # the record is applied to the recorded data only: the new place needs them typed
            + (
                f", and the flags it was read with, {flags}, if it is read alike there"
                if flags
                else ""
            )
        )
    info = (
        f"no --data given: {use.doing} the {use.part} of {data}, the data {who} trained on "
        f"(recorded in the checkpoint); pass --data to {use.verb} another"
    )
    return data, info, None


def _folders_trained_on(members: Sequence[str]) -> str:
    """``"a.pt was trained on the image folders --images A --masks B (recorded in the
    checkpoint)"``: members trained on folders given by --images/--masks, each with its folders
    where its checkpoint records them (older checkpoints do not)."""
    named = {
        m: f for m in members if (f := recorded_folders(recorded_data_options(m) or DataOptions()))
    }
    said = [
        f"{m} was trained on the image folders {describe_options(f)} (recorded in the "
        "checkpoint), not on a dataset --data names"
        for m, f in named.items()
    ]
    unnamed = [m for m in members if m not in named]
    if unnamed:
        said.append(
            f"{', '.join(unnamed)} {'was' if len(unnamed) == 1 else 'were'} trained on image "
            "folders given by --images/--masks, which the checkpoint does not name"
        )
    return "; ".join(said)


def _training_flags(members: Sequence[str]) -> str | None:
    """The data flags (other than the folders) the members were trained with, as typed:
    ``--tile-size 32 --mask-values 0``; None when none are recorded at other than their
    defaults, or the members disagree. Only those their kind of data reads (a cache's record
    holds how it was built, flags a cache refuses)."""
    said = set()
    for member in members:
        recorded = recorded_data_options(member)
        said.add(
            None
            if recorded is None
            else recorded_flags_left_out(recorded, kind=member_data_kind(member))
        )
    return said.pop() if len(said) == 1 else None


def combine_members(maps: Iterable[np.ndarray], spec: EnsembleSpec) -> np.ndarray:
    """The ensemble's decision from its members' quantised maps, as the ensemble search makes it.

    Mean rule, equal or whole-number weights ``w_i``: the integer sum ``S = sum(w_i q_i)`` of
    the uint8 maps is compared with the level ``L(t)`` on the ``0..255 W`` scale (``W =
    sum(w_i)``, :func:`bldseg.metrics.level_from_threshold`), so the decision is the searched
    one bit for bit. Other weights: the weighted mean probability ``sum(w_i q_i) / (255 W)``
    is compared with ``t`` in float64. Vote rule: member ``i``'s mask is ``q_i >= L_i`` (its
    own threshold's level on 0..255), and a pixel is positive where at least ``spec.votes``
    masks are. Then the empty-tile rule (every image where at least ``spec.empty_votes`` of
    the masks ``q_i >= L_i`` hold fewer than ``spec.empty_area`` pixels is predicted empty),
    then every image with fewer than ``spec.min_area`` predicted pixels is predicted empty.

    Args:
        maps: One uint8 map per member, in the order of ``spec.checkpoints``, all of one shape:
            (N, H, W) for N images, or (H, W) for one image. A generator lets the caller load
            one member at a time.
        spec: Rule, weights, thresholds and area rules.

    Returns:
        bool array of the maps' shape.

    Raises:
        ValueError: The number of maps differs from the number of members, or the spec's
            rule parameters do not fit (:meth:`EnsembleSpec.check`).
    """
    spec.check()
    weights = spec.member_weights()
    k = len(weights)
    if len(set(weights)) == 1:
        weights = [1.0] * k  # equal weights: the plain sum of the maps, as the search scores it
    whole = all(float(w).is_integer() for w in weights)
    own = spec.member_levels()  # (k,) levels of the members' own masks, or []
    # The running sum, added to in place (a big test set's maps are gigabytes): a vote count,
    # an integer weighted sum in the narrowest type that holds 255 * sum(w), or float64.
    if spec.rule == "vote":
        dtype = np.dtype(np.uint16)
    elif whole:
        dtype = np.dtype(np.uint16 if metrics.QUANT_MAX * sum(weights) < 2**16 else np.uint32)
    else:
        dtype = np.dtype(np.float64)
    total = None  # (..., H, W) of dtype
    small = None  # (N,) images where so many members' own masks are nearly empty
    n = 0
    for q in maps:
        if n == k:
            raise ValueError(f"more maps than the {k} member(s) of the ensemble")
        if total is None:
            total = np.zeros(q.shape, dtype)
        elif q.shape != total.shape:
            raise ValueError(f"member {n}'s map is {q.shape}, the first member's {total.shape}")
        if spec.rule == "vote":
            np.add(total, q >= own[n], out=total, casting="unsafe")
        elif weights[n] == 1:
            np.add(total, q, out=total, casting="unsafe")
        else:
            # w * q in the sum's type, one member-sized temporary
            np.add(total, np.multiply(q, dtype.type(weights[n]), dtype=dtype), out=total)
        if spec.empty_votes > 0:
            area = (q >= own[n]).reshape(-1, q.shape[-2] * q.shape[-1]).sum(1)  # (N,)
            nearly_empty = (area < spec.empty_area).astype(np.int64)
            small = nearly_empty if small is None else small + nearly_empty
        n += 1
    if n != k:
        raise ValueError(f"{n} map(s) for an ensemble of {k} member(s)")
    if spec.rule == "vote":
        pred = total >= spec.votes
    elif whole:
        # the same integer rule as the ensemble search: sum >= L(t) on the 0..255 W scale
        mv = metrics.QUANT_MAX * int(sum(weights))
        pred = total >= metrics.level_from_threshold(spec.threshold, mv)
    else:
        pred = total / (metrics.QUANT_MAX * sum(weights)) >= spec.threshold
    images = pred.reshape(-1, *pred.shape[-2:])  # (N, H, W), a view of pred
    if spec.empty_votes > 0:
        images[small >= spec.empty_votes] = False
    if spec.min_area > 0:
        images[images.reshape(len(images), -1).sum(1) < spec.min_area] = False
    return pred


def image_loader(
    cache: DatasetCache, batch_size: int = 16, indices: Sequence[int] | None = None
) -> DataLoader:
    """Every (square) image of a cache (or those at ``indices``) as one normalised tile, in
    cache order."""
    h, w = cache.image_size
    if h != w:
        raise ValueError(f"{cache.root}: prediction expects square tiles, got {h}x{w}")
    tiles = validation_tiles(cache, range(len(cache)) if indices is None else indices, h)
    return DataLoader(TileDataset(cache, tiles, build_eval_transform()), batch_size=batch_size)


#: Images predicted per chunk by :func:`predict_cache`: each member's uint8 map of a chunk of
#: 224-px tiles is 100 MB, and only the combined bool masks are kept.
PREDICT_CHUNK = 2048


def predict_cache(
    spec: EnsembleSpec,
    cache: DatasetCache,
    *,
    batch_size: int = 16,
    device: str = "auto",
    progress: bool = True,
    chunk: int | None = None,
) -> np.ndarray:
    """Binary predictions (N, H, W) bool for every image of a cache (whole images as tiles).

    The images go in chunks of ``chunk`` (None: :data:`PREDICT_CHUNK`): every member predicts
    a chunk, the ensemble rule combines their maps (its rules are per pixel or per image, so
    chunks decide exactly as one pass would), and only the chunk's bool masks are kept. Memory
    is then the masks (1 byte per pixel) plus one chunk's maps, not every member's map of the
    whole test set (the competition's 60,640 tiles of 224 px are 3 GB per member map). The
    members are loaded once, all of them; each predicts with its own flip TTA
    (:meth:`EnsembleSpec.member_ttas`), as its validation maps were made.
    """
    dev = resolve_device(device)
    chunk = PREDICT_CHUNK if chunk is None else chunk
    if chunk < 1:
        raise ValueError(f"chunk={chunk}: predict at least one image at a time")
    image_loader(cache, batch_size, indices=[])  # a cache of non-square images fails here
    h, w = cache.image_size
    members = []
    several = len(spec.checkpoints) > 1
    for ckpt, tta in zip(
        tqdm(spec.checkpoints, desc="members", disable=not (progress and several)),
        spec.member_ttas(),
        strict=True,
    ):
        models, cfg, _ = load_member(ckpt, dev)
        members.append((models, eval_autocast(cfg.precision, dev), tta))  # as validated
    n = len(cache)
    pred = np.zeros((n, h, w), bool)  # (N, H, W)
    bar = tqdm(total=n * len(members), desc="predicting", unit="img", disable=not progress)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        loader = image_loader(cache, batch_size, indices=range(start, stop))

        def chunk_maps(loader: DataLoader) -> Iterator[np.ndarray]:
            for models, amp, tta in members:
                # the bar moves per batch: a chunk is an hour of InternImage-T on a CPU
                yield predict_probs(models, loader, dev, amp, tta=tta, on_batch=bar.update)

        pred[start:stop] = combine_members(chunk_maps(loader), spec)
    bar.close()
    return pred


def score_submission(
    truth_csv: str | os.PathLike,
    submission: str | os.PathLike,
    cache: DatasetCache,
) -> tuple[float, dict[str, Any]]:
    """A submission's official score (:func:`bldseg.metrics.score_csv`) and its bootstrap
    interval over the test images' source scenes (the cache's split groups: ``test.csv``'s
    ``group`` column, else each image its own), as :meth:`bldseg.stats.Interval.to_dict`, {}
    where no image is scored (every one empty in both). ``n`` counts the images scored,
    ``clusters`` the scenes resampled. Both from one reading of the two CSVs.
    """
    from bldseg import stats

    per_image = metrics.score_csv_per_image(truth_csv, submission, cache.image_size)
    dice = per_image["dice"].to_numpy()  # (N,) NaN where both masks are empty
    score = metrics.official_score(dice)
    if not np.isfinite(dice).any():
        return score, {}
    group = dict(zip(cache.ids, cache.groups, strict=True))
    groups = [group.get(str(i), str(i)) for i in per_image["img_id"]]
    return score, stats.bootstrap_mean(dice, groups).to_dict()


def write_submission(ids: Sequence[str], pred: np.ndarray, path: str | os.PathLike) -> pd.DataFrame:
    """Writes ``img_id,mask_rle`` (``-1`` for empty) atomically; every id exactly once.

    Raises:
        OSError: The file cannot be written (e.g. ``path`` is a folder); no temporary file is
            left behind.
    """
    if len(ids) != len(pred):
        raise ValueError(f"{len(ids)} ids but {len(pred)} predictions")
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate img_id in the test set")
    df = pd.DataFrame({"img_id": list(ids), "mask_rle": [rle_encode(p) for p in pred]})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A hidden, unique name in the same folder: os.replace stays atomic, and two runs writing
    # the same submission never share a temporary file.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        df.to_csv(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return df


# --------------------------------------------------------------------------------------------
# Sliding-window prediction of images of any size
# --------------------------------------------------------------------------------------------


def check_window(window: int, what: str = "--window") -> int:
    """``window`` as an int, or ValueError naming ``what`` if it is below :data:`MIN_WINDOW`."""
    if int(window) != window or window < MIN_WINDOW:
        raise ValueError(
            f"{what} = {window}: a window must be a whole number of at least {MIN_WINDOW} px "
            "(the models downsample by 32); pass a larger --window, e.g. the training crop size"
        )
    return int(window)


def check_overlap(overlap: float) -> float:
    """``overlap`` as a float, or ValueError naming ``--overlap`` if outside [0, 0.9]."""
    if not 0.0 <= overlap <= MAX_OVERLAP:  # also refuses NaN
        raise ValueError(
            f"--overlap {overlap}: the overlap is a fraction of the window in [0, {MAX_OVERLAP}] "
            f"(default {DEFAULT_OVERLAP})"
        )
    return float(overlap)


def default_window(cfg: RunConfig) -> int:
    """The window a model is best run on: its validation tile (``val_tile``, else the crop)."""
    return cfg.val_tile or cfg.aug.crop_size


def _starts(length: int, window: int, step: int) -> list[int]:
    """Window offsets covering ``[0, length)``, ``length >= window``; the last one shifted in."""
    starts = list(range(0, length - window + 1, step))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def sliding_windows(
    height: int, width: int, window: int, overlap: float = DEFAULT_OVERLAP
) -> list[tuple[int, int]]:
    """Top-left corners ``(y, x)`` of the windows that cover an image (see the module docstring).

    The grid step is ``window - round(overlap * window)`` (at least 1); the last row and column
    are shifted inwards so every window lies inside the image, which therefore needs
    ``height, width >= window`` (pad smaller images first).

    Raises:
        ValueError: The image is smaller than the window, or a bad window or overlap.
    """
    check_window(window)
    check_overlap(overlap)
    if height < window or width < window:
        raise ValueError(f"a {height}x{width} image is smaller than the {window} px window; pad it")
    step = max(1, window - round(overlap * window))
    return [(y, x) for y in _starts(height, window, step) for x in _starts(width, window, step)]


def blend_weights(window: int) -> np.ndarray:
    """Blending weights of a window's pixels: float32 (window, window), ~1 at the centre.

    The outer product of two triangular ramps ``max(1 - |2 (i + 0.5) / window - 1|,
    EDGE_WEIGHT)`` over pixel centres ``i + 0.5``: symmetric, positive everywhere, falling
    linearly from the centre to :data:`EDGE_WEIGHT` at the edges.
    """
    centres = (np.arange(window, dtype=np.float64) + 0.5) / window  # (S,) in (0, 1)
    ramp = np.maximum(1.0 - np.abs(2.0 * centres - 1.0), EDGE_WEIGHT)  # (S,)
    return np.outer(ramp, ramp).astype(np.float32)  # (S, S)


def _model_device(model: nn.Module | Sequence[nn.Module]) -> torch.device:
    if not isinstance(model, nn.Module):
        model = model[0]
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def predict_image(
    model: nn.Module | Sequence[nn.Module],
    image: np.ndarray,
    *,
    window: int,
    overlap: float = DEFAULT_OVERLAP,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    tta: bool = False,
    amp: torch.dtype | None = None,
) -> np.ndarray:
    """One model's probability map of an image of any size, by blended sliding windows.

    Each window is normalised and predicted exactly like a validation tile
    (:func:`bldseg.train.engine.predict_probs`: sigmoid, optional flip TTA, quantised to
    uint8); the maps of overlapping windows are blended with :func:`blend_weights` and
    quantised again. See the module docstring for the window grid and the padding.

    Args:
        model: Maps (B, 3, S, S) normalised images to (B, 1, S, S) logits; several models
            (a K-fold run's) are averaged per window as :func:`predict_probs` does.
        image: uint8 (H, W, 3) RGB.
        window: Window side in px (at least :data:`MIN_WINDOW`).
        overlap: Fraction of the window that neighbouring windows share, in [0, 0.9].
        batch_size: Windows per forward pass.
        device: Where to run; default: where the model's parameters are.
        tta: Flip test-time augmentation (mean of identity, horizontal and vertical flips).

    Returns:
        uint8 (H, W): the quantised probability map (``q / 255`` is the probability).

    Raises:
        ValueError: ``image`` is not (H, W, 3) uint8, or a bad window or overlap.
    """
    window = check_window(window)
    overlap = check_overlap(overlap)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    dev = torch.device(device) if device is not None else _model_device(model)
    h, w = image.shape[:2]
    if h < window or w < window:
        # Reflection (not zeros) keeps the padding looking like ground, not like a black border.
        padded = np.pad(
            image, ((0, max(0, window - h)), (0, max(0, window - w)), (0, 0)), mode="reflect"
        )  # (Hp, Wp, 3)
    else:
        padded = image  # windows are cut from the scene itself: no copy of a large scene
    hp, wp = padded.shape[:2]
    corners = sliding_windows(hp, wp, window, overlap)
    normalise = build_eval_transform()
    weight = blend_weights(window)  # (S, S)
    acc = np.zeros((hp, wp), np.float32)  # sum of weight * probability
    norm = np.zeros((hp, wp), np.float32)  # sum of weights
    for start in range(0, len(corners), batch_size):
        batch = corners[start : start + batch_size]
        tiles = [normalise(image=padded[y : y + window, x : x + window])["image"] for y, x in batch]
        # (B, 3, S, S) float32, channel-first as TileDataset gives it to validation
        xb = torch.from_numpy(np.ascontiguousarray(np.stack(tiles).transpose(0, 3, 1, 2)))
        q = predict_probs(model, [{"image": xb}], dev, amp, tta=tta)  # uint8 (B, S, S)
        for (y, x), qi in zip(batch, q, strict=True):
            p = qi.astype(np.float32) / metrics.QUANT_MAX  # (S, S)
            acc[y : y + window, x : x + window] += weight * p
            norm[y : y + window, x : x + window] += weight
    # Where one window covers a pixel, (w * q/255) / w is q/255 to within an ulp, far inside
    # the half-level rounding margin, so quantising gives back q exactly. Divided and clipped
    # in acc's own memory, and quantised in blocks: a large scene's peak is acc, norm and the
    # output (9 bytes a pixel), not new float32 maps and a float64 map of the whole scene.
    probs = acc[:h, :w]  # (H, W) view
    np.divide(probs, norm[:h, :w], out=probs)
    del norm
    np.clip(probs, 0.0, 1.0, out=probs)
    out = np.empty((h, w), np.uint8)
    rows = max(1, QUANTISE_BLOCK_PIXELS // w)
    for y in range(0, h, rows):  # quantise is per pixel: blocks give the whole map's levels
        out[y : y + rows] = metrics.quantise(probs[y : y + rows])
    return out


# --------------------------------------------------------------------------------------------
# Folders of images -> mask files
# --------------------------------------------------------------------------------------------


@dataclass
class FolderResult:
    """Outcome of :func:`predict_folder`.

    Attributes:
        out_dir: The output folder.
        images: The input images, sorted.
        masks: The mask PNG written for each image, in the order of ``images``.
        geotiffs: The GeoTIFF masks written (one per georeferenced GeoTIFF input).
        empty: How many images were predicted without any building.
        nodata_pixels: Pixels of GeoTIFF scenes without data (nodata, mask, alpha), predicted
            as no building and marked no-data in the GeoTIFF masks.
        scores: With ground truth: ``official_score`` (mean per-image Dice, competition rules),
            ``pixel_iou``, ``pixel_f1``, counts, ``per_image`` rows, ``decision`` (the
            rule and its parameters, :meth:`EnsembleSpec.decision`) and ``threshold`` (the
            ensemble threshold; None for the vote rule); else None.
    """

    out_dir: Path
    images: list[Path] = field(default_factory=list)
    masks: list[Path] = field(default_factory=list)
    geotiffs: list[Path] = field(default_factory=list)
    empty: int = 0
    nodata_pixels: int = 0
    scores: dict[str, Any] | None = None


class FolderPredictionInterrupted(KeyboardInterrupt):
    """Ctrl-C while :func:`predict_folder` wrote its masks: how far it got.

    A ``KeyboardInterrupt``: code that does not know it still stops, as on any Ctrl-C.

    Attributes:
        result: What was written before it (``result.masks``: this run's masks so far).
        total: The masks the run was to write.
    """

    def __init__(self, result: FolderResult, total: int):
        super().__init__(f"{len(result.masks)} of {total} mask(s) written to {result.out_dir}")
        self.result = result
        self.total = total


def write_mask_png(mask: np.ndarray, path: str | os.PathLike) -> Path:
    """Writes a binary (H, W) mask as a single-channel 0/255 PNG, atomically.

    Returns:
        The path written.
    """
    path = Path(path)
    ok, buf = cv2.imencode(".png", np.where(mask, np.uint8(255), np.uint8(0)))
    if not ok:
        raise ValueError(f"{path}: OpenCV could not encode the mask as PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    # A hidden name in the same folder: never listed as an image, and os.replace stays atomic.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(buf.tobytes())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


#: A folder prediction's record (in its output folder) of the files it wrote there, per image
#: folder: a rerun of the same image folder removes those it does not write again (masks of
#: images gone since, the scores.json of an earlier run with --masks); the outputs of other image
#: folders (a big job predicted in parts into one folder) are kept, and a file the record does not
#: list is never touched (a run that would overwrite one is refused).
OUTPUTS_FILE = ".bldseg_outputs.json"


@dataclass
class _RecordedRun:
    """One image folder's outputs, as :data:`OUTPUTS_FILE` lists them."""

    images: str | None  # the resolved image folder; None in records older than this field
    recursive: bool | None  # whether its sub-folders were predicted too (None: not recorded)
    files: set[Path]  # absolute paths of the files written, all inside the output folder
    # False from the claim until the run ends: a run stopped midway (Ctrl-C, a kill, an error)
    # leaves some masks new, others an earlier run's or missing. Records older than it: True.
    complete: bool = True


def _recorded_runs(out_dir: Path) -> list[_RecordedRun]:
    """The earlier folder predictions recorded in ``out_dir``, one per image folder.

    Raises:
        ValueError: The record is not this tool's (names the file).
    """
    record = out_dir / OUTPUTS_FILE
    if not record.is_file():
        return []
    try:
        data = json.loads(record.read_text())
        if "runs" in data:
            entries = data["runs"]
        else:  # written before the image folder was recorded: a run of an unknown folder
            entries = [{"images": None, "recursive": None, "files": data["files"]}]
        runs = []
        for entry in entries:
            images, recursive = entry["images"], entry["recursive"]
            complete = entry.get("complete", True)
            if (
                not isinstance(images, str | None)
                or not isinstance(recursive, bool | None)
                or not isinstance(complete, bool)
            ):
                raise TypeError(f"bad entry {entry!r}")
            paths = {(out_dir / f).resolve() for f in entry["files"]}
            inside = {f for f in paths if f.is_relative_to(out_dir)}
            runs.append(_RecordedRun(images, recursive, inside, complete))
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(
            f"{record} is not a list of this tool's outputs; delete it (the files it listed "
            "are then left in place)"
        ) from None
    return runs


def _record_runs(out_dir: Path, runs: Iterable[_RecordedRun]) -> None:
    """Writes :data:`OUTPUTS_FILE` (runs that own no file are left out), atomically."""
    entries = [
        {
            "images": run.images,
            "recursive": run.recursive,
            "files": sorted({f.relative_to(out_dir).as_posix() for f in run.files}),
            "complete": run.complete,
        }
        for run in runs
        if run.files
    ]
    # a failed write (a full disk) keeps the earlier record and leaves no temporary file
    write_json(out_dir / OUTPUTS_FILE, {"runs": entries})


def _claim_outputs(
    out_dir: Path, images_dir: Path, recursive: bool, planned: set[Path], masks: set[Path]
) -> tuple[list[_RecordedRun], set[Path], bool]:
    """Claims this run's outputs in the record and removes the files it makes stale.

    Stale: this image folder's earlier outputs that this run does not write again (masks of
    images gone since, a scores.json that described them), except the masks of sub-folders when
    this run does not look into sub-folders; and another run's files that this run rewrites
    other than masks (a scores.json of other masks). They are removed only after the record
    claims this run's files, so a run that fails midway still owns what it wrote and leaves no
    file that tells another run's story. Other image folders' outputs are kept. The claim marks
    this run incomplete until :func:`predict_folder` records its end; the runs the record marks
    incomplete (stopped midway: some of their masks an earlier run's, or missing) are warned
    about.

    Args:
        out_dir: The output folder (resolved).
        images_dir: This run's image folder (resolved): the key of its entry in the record.
        recursive: Whether this run predicts the sub-folders of ``images_dir``.
        planned: Every file this run may write (masks, GeoTIFFs, scores.json).
        masks: The mask PNGs among them (replaced one by one, never removed first).

    Returns:
        The other image folders' runs, without the files this run now owns; this folder's
        earlier sub-folder outputs that a run without sub-folders keeps; and whether those are
        whole (False: the run that wrote them did not finish).

    Raises:
        ValueError: A file this run would write exists and was written for another image
            folder (two parts of a job holding images of the same name), or exists and the
            record does not list it (the user's own file); nothing is removed or written then.
            Or the record is unreadable.
    """
    runs = _recorded_runs(out_dir)
    here = str(images_dir)
    earlier = set().union(*(r.files for r in runs if r.images == here))
    others = [r for r in runs if r.images != here]
    clashes = sorted(
        (f, r.images)
        for r in others
        if r.images is not None
        for f in r.files & planned
        if f != out_dir / "scores.json" and f.is_file()
    )
    if clashes:
        names = ", ".join(f.relative_to(out_dir).as_posix() for f, _ in clashes[:3])
        more = f" and {len(clashes) - 3} more" if len(clashes) > 3 else ""
        raise ValueError(
            f"--out {out_dir} already holds {names}{more}, predicted from the image folder "
            f"{clashes[0][1]}; predicting {images_dir} would overwrite them with the masks of "
            "other images of the same name. Predict into another --out, or delete those files "
            "first"
        )
    # A file of this name that no prediction here wrote is the user's (ground truth copied in,
    # another tool's masks): never overwritten. lexists: a dangling link would be replaced too.
    recorded = set().union(*(r.files for r in runs))
    foreign = sorted(f for f in planned - recorded if os.path.lexists(f))
    if foreign:
        names = ", ".join(f.relative_to(out_dir).as_posix() for f in foreign[:3])
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise ValueError(
            f"--out {out_dir} holds {len(foreign)} file(s) that predicting {images_dir} would "
            f"overwrite and that no prediction into it wrote (its {OUTPUTS_FILE} does not list "
            f"them): {names}{more}. Predict into another --out, or delete those files first"
        )
    # Without sub-folders this run says nothing about the images below them: their masks stay.
    kept = set() if recursive else {f for f in earlier if f.parent != out_dir}
    kept_whole = not kept or all(r.complete for r in runs if r.images == here)
    _warn_unfinished(out_dir, here, [r for r in runs if not r.complete], kept_whole)
    taken = set().union(*(r.files & planned for r in others))
    for r in others:
        r.files -= planned
    _record_runs(out_dir, [*others, _RecordedRun(here, recursive, earlier | planned, False)])
    for stale in ((earlier - kept) | taken) - masks:  # the masks are replaced one by one
        stale.unlink(missing_ok=True)
    return others, kept, kept_whole


def _warn_unfinished(
    out_dir: Path, here: str, unfinished: list[_RecordedRun], kept_whole: bool
) -> None:
    """Warns of the predictions into ``out_dir`` that did not finish (the record marks them
    incomplete): this image folder's (``here``), which this run writes again, and others'."""
    for run in unfinished:
        folder = run.images or "an image folder"
        said = f"{out_dir}: a prediction of {folder} into it did not finish ({OUTPUTS_FILE} marks "
        said += "it incomplete)"
        if run.images != here:
            said += f": some of its masks are missing or from a run before it; predict {folder} "
            said += "into it again"
        elif kept_whole:
            said += "; this run writes its masks again"
        else:
            said += (
                "; this run writes its masks again but keeps those of its sub-folders "
                "(--no-recursive), some of which are missing or from a run before it: predict "
                "it without --no-recursive to redo them"
            )
        warnings.warn(said, stacklevel=4)


def _image_shape(path: Path, options: ReadOptions) -> tuple[int, int]:
    """An image's (H, W) from its header; decoded when the header reader cannot open it (a
    TIFF that only rasterio reads, whose error then says what to install)."""
    try:
        return image_size(path)
    except ValueError:
        return read_image(path, options).shape[:2]


def _check_mask_size(
    mask_path: Path, mask_shape: tuple[int, ...], image_path: Path, image_shape: tuple[int, ...]
) -> None:
    """Raises ValueError, naming both files and sizes, when a mask is not its image's size, or
    (both GeoTIFFs) is georeferenced to another place than its image (naming both grids)."""
    if tuple(mask_shape) != tuple(image_shape):
        raise ValueError(
            f"mask {mask_path} is {mask_shape[0]}x{mask_shape[1]} but the image {image_path} is "
            f"{image_shape[0]}x{image_shape[1]}; a mask must have its image's size: check that "
            "it belongs to this image (--mask-pattern) or fix the file"
        )
    check_mask_grid(image_path, mask_path)


def _check_out_dir(images_dir: Path, out_dir: Path, recursive: bool) -> None:
    if out_dir == images_dir or (recursive and out_dir.is_relative_to(images_dir)):
        raise ValueError(
            f"--out {out_dir} is inside the image folder {images_dir}: the masks would be read "
            "as images next time (and a .tif mask could replace its scene); write them elsewhere"
        )


def _scores(rows: list[dict[str, Any]], spec: EnsembleSpec) -> dict[str, Any]:
    """Official score and pixel IoU/F1 from per-image counts (sizes may differ per image),
    with the decision the masks were made by (:meth:`EnsembleSpec.decision`)."""
    tp = np.array([r["intersection"] for r in rows], np.int64)[:, None]  # (N, 1)
    pp = np.array([r["pred_pixels"] for r in rows], np.int64)[:, None]
    gt = np.array([r["truth_pixels"] for r in rows], np.int64)  # (N,)
    # Counts at one level, so the metric module applies the competition's rules exactly.
    official = float(metrics.scores_from_counts(tp, pp, gt)[0])
    dice = metrics.dice_from_counts(tp, pp, gt)[:, 0]  # (N,), NaN for empty/empty
    inter, pred_sum, truth_sum = int(tp.sum()), int(pp.sum()), int(gt.sum())
    union = pred_sum + truth_sum - inter
    for r, d in zip(rows, dice, strict=True):
        r["dice"] = None if math.isnan(d) else float(d)
    return {
        "official_score": official,
        # Over all pixels of all images; 1.0 when nothing is predicted and nothing is there,
        # as the official score does for all-empty sets.
        "pixel_iou": inter / union if union else 1.0,
        "pixel_f1": 2 * inter / (pred_sum + truth_sum) if pred_sum + truth_sum else 1.0,
        "n_images": len(rows),
        "n_scored": int((~np.isnan(dice)).sum()),
        # the vote rule decides by its members' own thresholds: no ensemble threshold
        "threshold": None if spec.rule == "vote" else spec.threshold,
        "decision": spec.decision(),
        "per_image": rows,
    }


def predict_folder(
    spec: EnsembleSpec,
    images_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    options: ReadOptions | None = None,
    window: int | None = None,
    overlap: float = DEFAULT_OVERLAP,
    recursive: bool = True,
    masks_dir: str | os.PathLike | None = None,
    mask_pattern: str | None = None,
    batch_size: int = 16,
    device: str = "auto",
    progress: bool = True,
) -> FolderResult:
    """Predicts every image under a folder and writes one mask per image.

    For ``images_dir/sub/name.ext`` it writes ``out_dir/sub/name.png`` (single channel, 0/255)
    and, when the image is a georeferenced GeoTIFF, ``out_dir/sub/name.tif`` with its
    georeference (CRS and transform, or ground control points, or RPCs:
    :func:`bldseg.data.geo.write_geotiff_mask`); each file atomically. Each member predicts
    each image with :func:`predict_image` (with its own flip TTA,
    :meth:`EnsembleSpec.member_ttas`), and the members' maps are combined by
    :func:`combine_members`, the rule of :func:`predict_cache`.

    The files written are listed in ``out_dir`` / :data:`OUTPUTS_FILE` under the resolved
    ``images_dir``, marked incomplete from the start until the run ends: a run stopped midway
    leaves some masks new and the others an earlier run's (or missing), and the next run into
    ``out_dir`` warns of it. A rerun of the same image folder into the same ``out_dir`` first
    removes the files listed for that folder that it will not write again (masks of images no
    longer there, an earlier ``scores.json``; without ``recursive``, the masks of its
    sub-folders are kept). Predicting another image folder into the same ``out_dir`` (a big job
    split into parts) keeps the earlier folders' files and adds its own to the record; it is
    refused, before anything is written, when it would overwrite an existing file of another
    folder (images of the same name in two parts). ``scores.json`` describes the last run with
    ``masks_dir``. Files that the record does not list are never touched: a run that would write
    one (a mask named like a file the user put there) is refused before anything is written.

    Args:
        spec: The model(s) and the decision rule.
        images_dir: Folder of images (suffixes of :data:`bldseg.data.readers.IMAGE_SUFFIXES`).
        out_dir: Folder for the masks (created; not inside ``images_dir``).
        options: How images (and masks) are decoded; None: images as the members' training
            images were (:func:`recorded_image_read`; the defaults for checkpoints that do not
            record it), masks by the defaults.
        window: Sliding-window side in px; None: each member's validation tile
            (:func:`default_window`).
        overlap: Fraction of the window shared by neighbouring windows, in [0, 0.9].
        recursive: Include sub-folders of ``images_dir`` (mirrored in ``out_dir``).
        masks_dir: Ground-truth masks, matched to images as the folder reader does (same
            relative path; ``mask_pattern`` or the default names); the scores are returned
            and written to ``out_dir/scores.json``.
        mask_pattern: Mask file name for an image stem (see
            :func:`bldseg.data.readers.mask_name`).
        batch_size: Windows per forward pass.
        device: ``auto``, ``cpu``, ``cuda``...
        progress: Show a progress bar over the images.

    Returns:
        A :class:`FolderResult`.

    Raises:
        FileNotFoundError: A folder, checkpoint or an image's mask is missing (the message
            names the image and the mask names tried).
        ValueError: Members whose checkpoints record different image read options (with
            ``options`` None), unreadable image or mask, or a mask of another size than its image
            (naming the files; the masks are all read and their sizes checked before any
            prediction is written), a bad window or overlap, ``out_dir`` inside
            ``images_dir``, an unreadable :data:`OUTPUTS_FILE` there, a mask name already
            written there for another image folder, or an output name taken there by a file
            the record does not list.
        OSError: A mask, the record or ``scores.json`` cannot be written (names the file; no
            temporary file is left).
        FolderPredictionInterrupted: Ctrl-C once the outputs were claimed: the record marks
            the run incomplete, and the exception says how many masks were written.
    """
    overlap = check_overlap(overlap)
    if window is not None:
        window = check_window(window)
    if options is None:
        options = ReadOptions(**(recorded_image_read(spec.checkpoints)[0] or {}))
    images_dir = Path(images_dir).resolve()
    out_dir = Path(out_dir).resolve()
    _check_out_dir(images_dir, out_dir, recursive)
    # The folder reader lists the images and, with masks_dir, matches every image to its mask
    # (or says which names it tried); images whose stems collide are refused there too.
    records = read_folder_dataset(
        images_dir, masks_dir, mask_pattern=mask_pattern, recursive=recursive, options=options
    )
    # Every mask is decoded once before anything is written: a mask these options cannot read
    # (a label mask that needs mask_values) stops the run here, not after some masks and the
    # record were written. Read again when scored: holding them all could take a lot of memory.
    # A mask of another size than its image is refused here too (the image's size from its
    # header), not after the images before it were predicted and written.
    scored = [r for r in records if r.mask_path is not None]
    for rec in tqdm(scored, desc="checking masks", unit="mask", disable=not progress or not scored):
        truth = read_mask_image(rec.mask_path, options).mask  # (H, W)
        shape = _image_shape(rec.image_path, options)
        _check_mask_size(rec.mask_path, truth.shape, rec.image_path, shape)
    dev = resolve_device(device)
    members = []
    for ckpt, tta in zip(spec.checkpoints, spec.member_ttas(), strict=True):
        models, cfg, _ = load_member(ckpt, dev)
        what = f"the validation tile of {ckpt}"
        members.append(
            (
                models,
                window or check_window(default_window(cfg), what),
                eval_autocast(cfg.precision, dev),  # as its validation maps were made
                tta,
            )
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    # The folder must tell one story per image folder: this folder's earlier outputs that this
    # run does not overwrite (masks of images gone since, its GeoTIFFs and scores.json, which
    # describe its masks) go first; other image folders' outputs stay. The record claims this
    # run's files before anything is removed or written, so a run that fails midway still owns
    # what it wrote.
    masks = {out_dir / r.image_path.relative_to(images_dir).with_suffix(".png") for r in records}
    scores_path = out_dir / "scores.json"
    planned = masks | {
        out_dir / r.image_path.relative_to(images_dir).with_suffix(".tif")
        for r in records
        if r.image_path.suffix.lower() in geo.GEO_SUFFIXES
    }
    if masks_dir is not None:
        planned.add(scores_path)
    others, kept, kept_whole = _claim_outputs(out_dir, images_dir, recursive, planned, masks)
    result = FolderResult(out_dir)
    rows: list[dict[str, Any]] = []
    warned_geo = False
    try:
        for rec in tqdm(records, desc="images", unit="img", disable=not progress):
            image = read_image(rec.image_path, options)  # (H, W, 3) uint8
            maps = (
                predict_image(
                    m,
                    image,
                    window=s,
                    overlap=overlap,
                    batch_size=batch_size,
                    device=dev,
                    tta=tta,
                    amp=amp,
                )
                for m, s, amp, tta in members
            )
            pred = combine_members(maps, spec)  # (H, W) bool
            valid = None  # (H, W) bool where a GeoTIFF scene has data; None: everywhere
            if rec.image_path.suffix.lower() in geo.GEO_SUFFIXES and geo.geo_available():
                valid = geo.valid_pixels(rec.image_path, bands=options.bands)
            if valid is not None:
                # No building where the scene has no data (its nodata value, mask or alpha): the
                # network saw zeros there, and edges of such areas look like roofs to it.
                pred &= valid
                result.nodata_pixels += int((~valid).sum())
                if 0 < pred.sum() < spec.min_area:  # counted on what is written, as elsewhere
                    pred[:] = False
            # only the last suffix goes: "scene.2019.png" and "scene.2020.png" are two masks
            rel = rec.image_path.relative_to(images_dir)
            result.images.append(rec.image_path)
            result.masks.append(write_mask_png(pred, out_dir / rel.with_suffix(".png")))
            result.empty += int(not pred.any())
            if rec.image_path.suffix.lower() in geo.GEO_SUFFIXES:
                if geo.geo_available():
                    if geo.has_georeference(rec.image_path):
                        tif = out_dir / rel.with_suffix(".tif")
                        geo.write_geotiff_mask(
                            pred.astype(np.uint8), tif, like=rec.image_path, valid=valid
                        )
                        result.geotiffs.append(tif)
                elif not warned_geo:
                    warned_geo = True
                    warnings.warn(
                        f"{rec.image_path}: without the geo extra (pip install 'bldseg[geo]') "
                        "GeoTIFF inputs get PNG masks only, without their georeference",
                        stacklevel=2,
                    )
            if rec.mask_path is not None:
                truth = read_mask_image(rec.mask_path, options).mask.astype(bool)  # (H, W)
                # checked before predicting; again here, where a file replaced since would fail
                _check_mask_size(rec.mask_path, truth.shape, rec.image_path, pred.shape)
                rows.append(
                    {
                        "image": str(rec.image_path.relative_to(images_dir)),
                        "mask": str(rec.mask_path),
                        "intersection": int((pred & truth).sum()),
                        "pred_pixels": int(pred.sum()),
                        "truth_pixels": int(truth.sum()),
                    }
                )
    except KeyboardInterrupt as err:
        # The record marks this run incomplete: a rerun, or another part's run, warns of it.
        raise FolderPredictionInterrupted(result, len(records)) from err
    written = [*result.masks, *result.geotiffs]
    if masks_dir is not None:
        result.scores = _scores(rows, spec)
        write_json(scores_path, result.scores)  # a failed write leaves no temporary file
        written.append(scores_path)
    # complete, unless it keeps sub-folder masks of a run that did not finish (kept_whole)
    done = _RecordedRun(str(images_dir), recursive, {*written, *kept}, kept_whole)
    _record_runs(out_dir, [*others, done])
    return result
