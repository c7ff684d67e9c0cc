"""Official InternImage weights into our models: ImageNet classifiers and mmseg UPerNets.

    model = create_model("upernet_internimage_t", pretrained="internimage_t_1k_224.pth")
    model.pretrained_report.summary()

Two layouts, told apart by their keys (never by the file name):

* classification, ``internimage_{t,s,b}_1k_224.pth`` = ``{"model": state_dict}``: our backbone's
  names. The ImageNet classifier (``conv_head.*``, ``head.*``; ``avgpool`` has no weights) is
  dropped; the rest loads strictly into the backbone and the decoder keeps its fresh init.
* segmentation, ``upernet_internimage_{t,s,b}_512_160k_ade20k.pth`` = ``{"state_dict": ...,
  "meta": ...}``: mmseg's names, ours but for three prefixes (:data:`MMSEG_TO_BLDSEG`). The
  classifiers are re-made when their class count differs from the model's (ADE20K's 150 vs our
  1); everything else loads strictly into the whole model. Our own ``best.pt`` reads the same.

Files are read with ``torch.load(weights_only=True)``: tensors, plain containers and numpy
numbers (mmseg's ``meta``) only, so a file can never run code here. Nothing is ever downloaded.

A file that does not fit raises :class:`CheckpointMismatchError` (a ``ValueError``: the command
line reports it in one line) naming the model and every bad key as the file names it; where the
file's backbone is that of another registered model (the T weights given to the CPU default
``upernet_internimage_tiny``), the message names that model.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from bldseg.models.backbones.internimage import INTERNIMAGE_VARIANTS, InternImage, internimage
from bldseg.models.registry import list_backbones, list_models
from bldseg.models.segmentor import SegmentationModel

#: mmseg key prefix -> ours. The other mmseg names already are ours: ``backbone.*`` and
#: ``decode_head.{psp_modules.i.1,bottleneck,lateral_convs.i,fpn_convs.i,fpn_bottleneck}`` with
#: their ``{conv,bn}`` (mmcv ConvModule).
MMSEG_TO_BLDSEG: tuple[tuple[str, str], ...] = (
    ("decode_head.conv_seg.", "decode_head.classifier."),
    ("auxiliary_head.convs.0.", "aux_head.conv."),
    ("auxiliary_head.conv_seg.", "aux_head.classifier."),
)

#: The ImageNet classifier of the official classification models (the backbone's own names).
CLASSIFIER_PREFIXES = ("conv_head.", "head.")

#: The per-pixel classifiers of a segmentation model, re-made when the class count differs.
SEGMENTATION_CLASSIFIERS = ("decode_head.classifier.", "aux_head.classifier.")

_GAMMAS = (".gamma1", ".gamma2")


class CheckpointMismatchError(ValueError, RuntimeError):
    """A checkpoint that does not fit the model: its message lists every bad key.

    A ``ValueError`` because the file is the user's input (the commands report it in one line,
    without a traceback); also a ``RuntimeError``, what :func:`load_pretrained` raised before.
    """


@dataclass
class Checkpoint:
    """A checkpoint read from disk, with our parameter names.

    Attributes:
        path: The file.
        layout: ``"classification"`` (backbone names) or ``"segmentation"`` (``backbone.*``,
            ``decode_head.*``, ...).
        state_dict: Tensors by our names.
        file_names: Our name -> the name in the file, where they differ (for messages).
        prefix: Removed from every key of the file (``"module."`` of a DistributedDataParallel
            wrapper, ``"model."`` of the Hugging Face port, or both), else ``""``.
        mmseg_names: The file names the classifiers and the auxiliary head as mmseg does
            (``conv_seg``, ``auxiliary_head``).
    """

    path: str
    layout: Literal["classification", "segmentation"]
    state_dict: dict[str, torch.Tensor]
    file_names: dict[str, str] = field(default_factory=dict)
    prefix: str = ""
    mmseg_names: bool = False

    def name_in_file(self, key: str) -> str:
        """The name our ``key`` has in the file, or would have there (a missing key)."""
        if key in self.file_names:
            return self.file_names[key]
        return self.prefix + (_to_mmseg(key) if self.mmseg_names else key)


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did (written to ``pretrained.json`` by a training run).

    Attributes:
        path: The checkpoint file.
        layout: ``"classification"`` or ``"segmentation"``.
        loaded: Model keys set from the checkpoint (the model's names).
        dropped: Why -> checkpoint keys not loaded (the file's names).
        initialised: Model keys that keep their fresh init (e.g. the decoder under a
            classification checkpoint, the re-made classifiers).
        overrides: Architecture settings :func:`~bldseg.models.create_model` took from the
            checkpoint (``{"layer_scale": 1.0}`` for a T segmentation checkpoint).
    """

    path: str
    layout: str
    loaded: list[str]
    dropped: dict[str, list[str]]
    initialised: list[str]
    overrides: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    def summary(self) -> str:
        """One line for logs."""
        dropped = "; ".join(f"dropped {len(v)} ({why})" for why, v in self.dropped.items())
        parts = [
            f"loaded {len(self.loaded)} tensors from {self.path} ({self.layout})",
            dropped,
            f"{len(self.initialised)} keep their init" if self.initialised else "",
            f"built with {self.overrides}" if self.overrides else "",
        ]
        return "; ".join(p for p in parts if p)


def _is_safetensors(path: Path) -> bool:
    """Whether ``path`` is a safetensors file: an 8-byte little-endian header length that fits
    the file, then the header's JSON. Decided by the bytes: torch.save writes a zip archive
    (``PK``) or a pickle (``\\x80``), whatever the file is named; the ``.safetensors`` suffix
    decides only for bytes that are neither (a damaged download is then named as one)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith((b"PK", b"\x80")):
        return False
    fits = len(head) == 9 and head[8:9] == b"{"
    fits = fits and 8 + int.from_bytes(head[:8], "little") <= path.stat().st_size
    return fits or path.suffix == ".safetensors"


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (no code runs: the format holds tensors only)."""
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError as e:  # a dependency; an environment without it says what to install
        raise ImportError(f"{path} is a safetensors file: pip install safetensors") from e
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None


def _torch_load(path: Path) -> Any:
    """``torch.load`` of a checkpoint, tensors and plain data only; its checksums checked."""
    check_archive(path)
    try:
        # an open file, not the path: torch.load reads a path named *.safetensors as one
        with open(path, "rb") as f, torch.serialization.safe_globals(_numpy_data()):
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(_refusal(path, e)) from None
    except (RuntimeError, KeyError, IndexError, EOFError) as e:  # non-checkpoint bytes
        # its first sentence: the rest advises weights_only=False, which would unpickle
        # whatever the bytes say (and for bytes that are no checkpoint, fail anyway)
        said = str(e).split(". ")[0].rstrip(".")
        if isinstance(e, (KeyError, IndexError)):  # the unpickler's state: "101", "pop from ..."
            said = "torch.load could not read it"
        else:
            said = f"{type(e).__name__}: {said}"
        raise ValueError(f"{path} is not a PyTorch checkpoint ({said})") from None


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Reads an official (or bldseg) checkpoint without running any code from it.

    Args:
        path: ``{"model": sd}``, ``{"state_dict": sd, ...}`` or a bare state dict, saved by
            ``torch.save``; or a ``.safetensors`` file (Hugging Face's format, a flat state
            dict, as its hub converts weights to). Never downloaded: it must be on disk.

    Raises:
        FileNotFoundError: No file at ``path``.
        ValueError: The file needs pickled Python objects (refused: unpickling could run code;
            the message says how to extract the weights), or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained checkpoint not found: {path} (bldseg never downloads weights: pass the "
            "path of a file on this machine)"
        )
    obj = _read_safetensors(path) if _is_safetensors(path) else _torch_load(path)
    sd = obj
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):  # mmseg, then the classification trainer
            if isinstance(obj.get(key), Mapping):
                sd = obj[key]
                break
    if not (
        isinstance(sd, Mapping) and sd and all(isinstance(v, torch.Tensor) for v in sd.values())
    ):
        found = sorted(map(str, obj))[:20] if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(
            f"{path} holds no state dict: expected {{'model': state_dict}} (classification), "
            f"{{'state_dict': state_dict}} (mmseg) or a bare state dict of tensors; found {found}"
        )
    sd = dict(sd)
    prefix = ""
    # "module.": saved from a DistributedDataParallel wrapper; "model.": OpenGVLab's Hugging
    # Face port (InternImageModel keeps the InternImage as .model); possibly both
    for wrapper in ("module.", "model."):
        if all(k.startswith(wrapper) for k in sd):
            prefix += wrapper
            sd = {k.removeprefix(wrapper): v for k, v in sd.items()}
    layout = "segmentation" if any(k.startswith("backbone.") for k in sd) else "classification"
    state, file_names = {}, {}
    for k, v in sd.items():
        ours = _to_ours(k) if layout == "segmentation" else k
        state[ours] = v
        if prefix + k != ours:
            file_names[ours] = prefix + k
    mmseg = layout == "segmentation" and any(_to_ours(k) != k for k in sd)
    return Checkpoint(str(path), layout, state, file_names, prefix, mmseg)


def check_archive(path: str | os.PathLike) -> None:
    """Raises ValueError when a zip-format checkpoint's stored checksums do not match its bytes.

    ``torch.load`` does not check them: a file damaged inside a tensor's bytes (a bad copy, a
    failing disk) loads "fully" and fine-tuning starts from garbage. Reading the whole file
    once costs about 0.1 s per 100 MB.
    """
    try:
        st = os.stat(path)
    except OSError:
        return  # torch.load says what is missing
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:  # each network and fold of a run reads the same pretrained file
        return
    if not zipfile.is_zipfile(path):
        return  # the legacy format (torch < 1.6) has no checksums; torch.load judges it
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"{path} is not a readable checkpoint archive ({e})") from None
    if bad is not None:
        raise ValueError(
            f"{path} is damaged: the checksum of its member {bad} does not match its bytes (a "
            "broken download or copy); copy or download the file again"
        )
    _VERIFIED.add(key)


#: Checkpoints whose checksums this process has verified, by (real path, size, mtime).
_VERIFIED: set[tuple[str, int, int]] = set()


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex digest}`` of a file: a run records which checkpoint it
    started from, so another file put behind the same path later shows."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


def _numpy_data() -> list:
    """numpy scalars and arrays as ``torch.load(weights_only=True)`` may rebuild them.

    mmseg keeps numbers such as ``meta["hook_msgs"]["best_score"]`` as numpy scalars; these
    constructors rebuild numbers and plain arrays only (an object array's items still pass the
    weights-only checks). Files written with numpy 1 name the module ``numpy.core``, numpy 2
    ``numpy._core``: both names are listed.
    """
    import numpy as np

    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    kinds = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32)
    kinds += (np.uint64, np.float16, np.float32, np.float64)
    allowed: list = [np.ndarray, np.dtype, *(type(np.dtype(k)) for k in kinds)]
    for fn in (core.scalar, core._reconstruct):
        allowed += [fn, (fn, f"numpy.core.multiarray.{fn.__name__}")]
        allowed.append((fn, f"numpy._core.multiarray.{fn.__name__}"))
    return allowed


def _to_ours(key: str) -> str:
    for theirs, ours in MMSEG_TO_BLDSEG:
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    return key


def _to_mmseg(key: str) -> str:
    for theirs, ours in MMSEG_TO_BLDSEG:
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    return key


def _refusal(path: Path, err: Exception) -> str:
    names = set(re.findall(r"GLOBAL ([\w.]+)", str(err)))
    find = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch>=2.5
    if find is not None:
        # ValueError: not the zip format; the names in torch's message must do
        with contextlib.suppress(ValueError):
            names.update(find(path))
    if not names:  # no object to name: the bytes are not a pickle at all
        return f"{path} is not a PyTorch checkpoint (torch.load could not unpickle it)"
    return (
        f"refusing {path}: besides tensors it holds pickled Python objects ({sorted(names)}), and "
        "unpickling them could run code from the file; bldseg reads weights with "
        "torch.load(weights_only=True) only. If you trust the file, extract its weights once "
        f"and pass the new file:\n  python -c \"import torch; c = torch.load('{path}', "
        "weights_only=False); torch.save({'model': c['model']}, 'weights.pth')\"\n"
        "(an mmseg checkpoint keeps them under 'state_dict' instead of 'model')"
    )


def overrides_for_checkpoint(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture settings a state dict implies, as model keyword arguments.

    ``{"layer_scale": 1.0}`` when it has layer-scale parameters (``gamma1``/``gamma2``): the
    official segmentation configs build every variant with ``layer_scale=1.0``, so the T
    segmentation checkpoints have 60 of them (4+4+18+4 layers x 2) where the T classification
    checkpoint has none. For S/B, which always have them, only the init value changes and the
    loaded values overwrite it. ``{"layer_scale": None}`` for a whole segmentation model's
    state dict without them (a T run trained before ``upernet_internimage_t`` had layer
    scale); a classification checkpoint without them implies nothing, so a segmentation T
    fine-tuned from it gets its scales at 1 (see :func:`load_pretrained`).

    Also rebuilds the model of a saved run: ``create_model(name,
    **overrides_for_checkpoint(best["model"]))``.
    """
    if any(k.endswith(_GAMMAS) for k in state_dict):
        return {"layer_scale": 1.0}
    if any(k.startswith("backbone.levels.") for k in state_dict):
        return {"layer_scale": None}
    return {}


def load_pretrained(model: nn.Module, checkpoint: str | os.PathLike | Checkpoint) -> LoadReport:
    """Loads official weights into a model, strictly, but for the classifiers it re-makes.

    Our own older run files (``best.pt`` with the decoder's former names, ``ppm.stages.*`` and
    numbered ``.0.``/``.1.`` sub-modules) load too: the model's own renaming hooks, which
    ``load_state_dict`` runs, are applied before the keys are compared.

    Args:
        model: A :class:`SegmentationModel` (classification checkpoints go into its backbone,
            segmentation ones into the whole model) or an :class:`InternImage` (a segmentation
            checkpoint gives its ``backbone.*`` part).
        checkpoint: A path, or what :func:`read_checkpoint` returned.

    Returns:
        What was loaded, dropped and left at init.

    Raises:
        FileNotFoundError: No file at the path.
        ValueError: An unsafe or unreadable file (see :func:`read_checkpoint`).
        CheckpointMismatchError: Every missing, unexpected and mis-shaped key, listed by the
            file's names and grouped, with what to do: the model by its registered name, and
            the registered model whose backbone the file fits, where there is one.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
    state = dict(ckpt.state_dict)
    # The target's keys are the checkpoint's after this prefix (an InternImage given a
    # segmentation checkpoint holds its backbone.* part).
    ckpt_prefix = ""
    in_file = {k: ckpt.name_in_file(k) for k in state}  # current key -> name in the file
    dropped: dict[str, list[str]] = {}

    def drop(why: str, keys: list[str]) -> None:
        if keys:
            dropped[why] = sorted(in_file[k] for k in keys)
            for k in keys:
                del state[k]

    if isinstance(model, SegmentationModel) and ckpt.layout == "classification":
        target, prefix = model.backbone, "backbone."
    elif isinstance(model, SegmentationModel):
        target, prefix = model, ""
    elif isinstance(model, InternImage):
        target, prefix = model, ""
        if ckpt.layout == "segmentation":
            drop(
                "decoder (not part of a backbone)",
                [k for k in state if not k.startswith("backbone.")],
            )
            ckpt_prefix = "backbone."
            state = {k.removeprefix(ckpt_prefix): v for k, v in state.items()}
            in_file = {k.removeprefix(ckpt_prefix): n for k, n in in_file.items()}
    else:
        raise TypeError(
            f"load_pretrained: expected a SegmentationModel or an InternImage, got "
            f"{type(model).__name__}"
        )
    state, in_file = _renamed_by_hooks(target, state, in_file)
    own = target.state_dict()
    if not any(k.startswith(CLASSIFIER_PREFIXES) for k in own):
        drop(
            "ImageNet classifier (conv_head, head; avgpool has no weights)",
            [k for k in state if k.startswith(CLASSIFIER_PREFIXES)],
        )
    remade: list[str] = []
    if target is model and isinstance(model, SegmentationModel):
        if model.aux_head is None:
            drop(
                "auxiliary head (the model has none)",
                [k for k in state if k.startswith("aux_head.")],
            )
        remade = [
            k
            for k in state
            if k.startswith(SEGMENTATION_CLASSIFIERS)
            and k in own
            and state[k].shape != own[k].shape
        ]
        if remade:
            n_file = state[remade[0]].shape[0]
            n_own = own[remade[0]].shape[0]
            drop(f"{n_file}-class classifiers, re-made for the model's {n_own}", remade)

    # The official segmentation fine-tuning of T: a classification checkpoint without layer
    # scale into a model built with layer_scale=1.0 (upernet_internimage_t's default). Scales
    # of exactly 1 leave every block as the checkpoint computed it, so they keep their init.
    if ckpt.layout == "classification" and not any(k.endswith(_GAMMAS) for k in state):
        backbone = target.backbone if isinstance(target, SegmentationModel) else target
        if isinstance(backbone, InternImage) and backbone.cfg.layer_scale == 1.0:
            remade += [k for k in own if k.endswith(_GAMMAS)]
    missing = sorted(set(own) - set(state) - set(remade))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        name = _registered_name(model)
        backbone_only = isinstance(model, InternImage)
        fitting = _fitting_models(ckpt, backbones=backbone_only)
        raise CheckpointMismatchError(
            _mismatch_message(
                ckpt.path,
                f"the backbone of {name}" if prefix else name,
                own,
                state,
                # missing keys have no name in the file: the one they would have there
                {**{k: ckpt.name_in_file(ckpt_prefix + k) for k in missing}, **in_file},
                missing,
                unexpected,
                shapes,
                [m for m in fitting if m != name],
                # a whole model whose backbone fits: only its decoder was built otherwise
                backbone_fits=name in fitting and not prefix and not backbone_only,
            )
        )
    # Strict: every key of the target is given, the re-made classifiers their own fresh values.
    target.load_state_dict({**own, **state}, strict=True)
    loaded = {prefix + k for k in state}
    return LoadReport(
        path=ckpt.path,
        layout=ckpt.layout,
        loaded=sorted(loaded),
        dropped=dropped,
        initialised=sorted(k for k in model.state_dict() if k not in loaded),
    )


def _renamed_by_hooks(
    target: nn.Module, state: dict[str, torch.Tensor], in_file: dict[str, str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``state`` with the keys renamed as ``target.load_state_dict`` would rename them, and
    ``in_file`` (key -> name in the file) following the renames.

    ``load_state_dict`` runs every module's load-state-dict pre-hooks on its part of the state
    dict, parents before children (the order of ``named_modules``), before it compares keys:
    the decoder's hooks move our older run files' names (``ppm.stages.*``, numbered ``.0.`` /
    ``.1.``) to today's. The comparison here must see the names ``load_state_dict`` will.
    """
    renamed = dict(state)
    for name, module in target.named_modules():
        for hook in module._load_state_dict_pre_hooks.values():
            # (state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs)
            hook(renamed, f"{name}." if name else "", {}, True, [], [], [])
    if renamed.keys() == state.keys():
        return state, in_file
    origin = {id(v): k for k, v in state.items()}  # a renamed key keeps its tensor
    names = {}
    for k, v in renamed.items():
        old = k if k in state and state[k] is v else origin.get(id(v), k)
        names[k] = in_file.get(old, old)
    return renamed, names


#: The settings that tell the InternImage variants apart (and give their tensors' shapes).
_ARCHITECTURE = ("channels", "depths", "groups")


def _registered_name(model: nn.Module) -> str:
    """The registered name of an InternImage model (``upernet_internimage_t``) or backbone
    (``internimage_t``), told by its architecture; else its class name."""
    backbone = model.backbone if isinstance(model, SegmentationModel) else model
    if isinstance(backbone, InternImage):
        cfg = backbone.cfg
        for variant, spec in INTERNIMAGE_VARIANTS.items():
            if all(_seq(getattr(cfg, k)) == _seq(spec[k]) for k in _ARCHITECTURE):
                name = f"internimage_{variant}"
                if isinstance(model, SegmentationModel):
                    name = "upernet_" + name
                if name in list_models() or name in list_backbones():
                    return name
    return type(model).__name__


def _seq(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _fitting_models(ckpt: Checkpoint, *, backbones: bool = False) -> list[str]:
    """Registered models whose InternImage backbone has exactly the checkpoint's backbone
    tensors (names and shapes): the models this file is for.

    Builds the backbone of every variant with the file's number of blocks per level (under a
    second each; only when a file did not fit).

    Args:
        ckpt: What :func:`read_checkpoint` returned.
        backbones: Name backbones (``internimage_t``) instead of segmentation models
            (``upernet_internimage_t``).
    """
    if ckpt.layout == "segmentation":
        part = {
            k.removeprefix("backbone."): v
            for k, v in ckpt.state_dict.items()
            if k.startswith("backbone.")
        }
    else:
        part = dict(ckpt.state_dict)
    part = {k: v for k, v in part.items() if not k.startswith(CLASSIFIER_PREFIXES)}
    registered = set(list_backbones() if backbones else list_models())
    overrides = overrides_for_checkpoint(ckpt.state_dict)
    blocks: dict[int, int] = {}  # level -> blocks, from the names levels.<i>.blocks.<j>.*
    for k in part:
        if found := re.match(r"levels\.(\d+)\.blocks\.(\d+)\.", k):
            level, block = int(found.group(1)), int(found.group(2))
            blocks[level] = max(blocks.get(level, 0), block + 1)
    depths = tuple(blocks.get(i, 0) for i in range(len(blocks)))
    found = []
    # Building draws the backbones' init from the global generator: leave the caller's as it was.
    with torch.random.fork_rng(devices=[]):
        for variant, spec in INTERNIMAGE_VARIANTS.items():
            name = f"internimage_{variant}" if backbones else f"upernet_internimage_{variant}"
            if name not in registered or tuple(spec["depths"]) != depths:
                continue  # not this variant: its names differ (no need to build it)
            own = internimage(variant, **overrides).state_dict()
            if own.keys() == part.keys() and all(own[k].shape == part[k].shape for k in own):
                found.append(name)
    return found


def _mismatch_message(
    path: str,
    target: str,
    own: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    in_file: Mapping[str, str],
    missing: list[str],
    unexpected: list[str],
    shapes: list[str],
    fits: list[str],
    backbone_fits: bool = False,
) -> str:
    hint = ""
    if fits and fits[0].startswith("upernet_"):  # a segmentation model: what --model takes
        hint = f"; it holds the backbone of {fits[0]} (--model {fits[0]})"
    elif fits:  # a backbone
        hint = f"; it holds {fits[0]} (create_backbone({fits[0]!r}))"
    lines = [
        f"{path} does not fit {target}: {len(missing)} missing, {len(unexpected)} unexpected, "
        f"{len(shapes)} of another shape (names as in the file){hint}"
    ]
    groups = [
        ("missing from the checkpoint", [in_file[k] for k in missing]),
        ("unexpected in the checkpoint", [in_file[k] for k in unexpected]),
        (
            "shape mismatch",
            [
                f"{in_file[k]}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                for k in shapes
            ],
        ),
    ]
    for title, keys in groups:
        if keys:
            lines.append(f"  {title} ({len(keys)}):")
            lines += [f"    {k}" for k in keys]
    own_gammas = any(k.endswith(_GAMMAS) for k in own)
    file_gammas = any(k.endswith(_GAMMAS) for k in state)
    if file_gammas and not own_gammas:
        lines.append(
            "The checkpoint has layer-scale parameters (gamma1/gamma2) and the model has none: "
            "build it with layer_scale=1.0, as the official segmentation configs do "
            "(create_model(name, pretrained=path) does this by itself)."
        )
    elif own_gammas and not file_gammas:
        lines.append(
            "The model has layer-scale parameters (gamma1/gamma2) and the checkpoint has none: "
            "T weights for an S/B model, or a model built with layer_scale it does not need (a "
            "T run saved before upernet_internimage_t had layer scale: build it with "
            "layer_scale=None, as create_model(name, pretrained=path) does by itself)."
        )
    if fits and fits[0].startswith("upernet_"):
        lines.append(
            f"The file is for {fits[0]}, not {target.removeprefix('the backbone of ')}: train "
            f"that model (--model {fits[0]}, or model={fits[0]} in a run config)."
        )
    elif fits:
        lines.append(f"The file is for {fits[0]}: build it with create_backbone({fits[0]!r}).")
    elif backbone_fits and own_gammas == file_gammas:  # a layer-scale mismatch is said above
        lines.append(
            f"The backbone fits {target}; its decoder differs (a head width or an auxiliary "
            "head built otherwise). In Python, build the model with the checkpoint's decoder "
            "settings (create_model(name, head_channels=..., aux_channels=...); the command "
            "line builds the registered widths), or load the backbone alone "
            "(load_pretrained(model.backbone, path))."
        )
    else:
        lines.append("Is it a checkpoint of the same variant (t, s or b) as the model?")
    return "\n".join(lines)
