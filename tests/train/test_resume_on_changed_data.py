"""A run resumed (or re-run once finished) on training data changed since it started is refused.

Masks fixed between an interruption and the same command again rebuilt the cache, and the run
went on without a word: its first epochs scored against the old masks, the rest against the
new ones, its best epoch picked across both (a K-fold run's out-of-fold library held both
versions). ``last.pt`` and ``folds.json`` record the training data's fingerprint now, as a
search's record does (``bldseg tune --resume``).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bldseg.data.prepare import PreparedData, prepare_data
from bldseg.data.readers import DECODE_RULES
from bldseg.data.synthetic import generate_scene
from bldseg.train.config import RunConfig
from bldseg.train.engine import fit
from bldseg.train.folds import FOLDS_FILE, fit_folds
from bldseg.train.resume_checks import check_same_data

BASE = {
    "aug.crop_size": 32,
    "batch_size": 8,
    "samples_per_epoch": 16,
    "val_fraction": 0.25,
    "impl": "compiled",
}
N_IMAGES = 8


def config(**kw) -> RunConfig:
    return RunConfig.from_flat({**BASE, **kw})


def write_folder(root: Path) -> Path:
    """An image/mask folder of 8 synthetic 64-px scenes (grey 0/255 PNG masks)."""
    for i in range(N_IMAGES):
        s = generate_scene(i, 64, 64, min_buildings=2)
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(s.image).save(root / "images" / f"t{i}.png")
        Image.fromarray((s.mask > 0).astype(np.uint8) * 255).save(root / "masks" / f"t{i}.png")
    return root


def flip_masks(root: Path) -> None:
    """The fix-the-ground-truth step: every mask edited in place (flipped vertically)."""
    for path in sorted((root / "masks").glob("*.png")):
        mask = np.asarray(Image.open(path))
        Image.fromarray(np.ascontiguousarray(mask[::-1])).save(path)


def prepare(root: Path) -> PreparedData:
    return prepare_data(str(root), data_root=root.parent / "cache", progress=False)


def files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}


def strip_record(path: Path) -> None:
    """``path`` (last.pt or folds.json) as an older bldseg wrote it: no data fingerprint."""
    if path.suffix == ".json":
        manifest = json.loads(path.read_text())
        for key in ("data_fingerprint", "data_content", "decode_rules"):
            manifest.pop(key)
        path.write_text(json.dumps(manifest))
        return
    state = torch.load(path, weights_only=True)
    for key in ("data_fingerprint", "data_content", "decode_rules"):
        state.pop(key)
    torch.save(state, path)


def test_a_single_run_resumed_on_edited_masks_is_refused(tmp_path):
    root = write_folder(tmp_path / "data")
    before = prepare(root)
    started_on = before.train.fingerprint
    assert fit(config(epochs=1), tmp_path / "done", data=before).status == "completed"
    cut = fit(config(epochs=2), tmp_path / "cut", data=before, stop_after=1)
    assert cut.status == "stopped"  # as a run killed after its first epoch
    last = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert (last["data_fingerprint"], last["decode_rules"]) == (started_on, DECODE_RULES)
    assert last["data_content"] == before.train.content
    stamps = {p: p.stat().st_mtime_ns for p in (root / "masks").glob("*.png")}
    originals = {p: p.read_bytes() for p in stamps}
    old = shutil.copytree(tmp_path / "cut", tmp_path / "old")
    strip_record(old / "last.pt")

    flip_masks(root)
    edited = prepare(root)
    now = edited.train.fingerprint
    assert now != started_on
    kept = {run: files(tmp_path / run) for run in ("cut", "done")}
    # the interrupted run: its next epoch would score against the flipped masks
    with pytest.raises(ValueError) as e:
        fit(config(epochs=2), tmp_path / "cut", data=edited)
    assert str(e.value) == (
        f"{tmp_path / 'cut' / 'last.pt'}: the training data differ from those the run started "
        f"on (content {edited.train.content}, recorded {before.train.content}; data {root}); "
        "its 1 epoch(s) so far were trained and scored on those, the rest would be on these, "
        "and its best epoch chosen across both: train into a new --out (or put back the images "
        "and masks it started on)"
    )
    # the finished run: the same command printed its old result as if of these data
    with pytest.raises(ValueError, match=r"done.last\.pt: the training data differ") as e:
        fit(config(epochs=1), tmp_path / "done", data=edited)
    assert "the finished run's result (best.pt, val_probs.npz, its Dice) is of those" in str(
        e.value
    )
    assert edited.train.content in str(e.value) and before.train.content in str(e.value)
    # refused before anything was written
    assert {run: files(tmp_path / run) for run in ("cut", "done")} == kept

    # A last.pt of an older bldseg records no fingerprint: resumed as before, with a warning,
    # and its next last.pt records the data it trained on.
    with pytest.warns(UserWarning, match=r"old.last\.pt was written by an older bldseg.*cannot"):
        assert fit(config(epochs=2), old, data=edited).status == "completed"
    assert torch.load(old / "last.pt", weights_only=True)["data_fingerprint"] == now

    # The original files put back (new modification times, so another fingerprint: the
    # content decides) and read from another folder: the same data, and the run continues.
    for path in stamps:
        path.write_bytes(originals[path])
    moved = shutil.copytree(root, tmp_path / "elsewhere" / "data", copy_function=shutil.copy)
    restored = prepare(moved)
    assert restored.train.fingerprint != started_on
    assert restored.train.content == before.train.content
    resumed = fit(config(epochs=2), tmp_path / "cut", data=restored)
    assert resumed.status == "completed" and [h["epoch"] for h in resumed.history] == [1, 2]


def kfold(**kw) -> RunConfig:
    return config(folds=2, epochs=1, **kw)


def test_a_kfold_run_resumed_on_edited_masks_is_refused(tmp_path):
    root = write_folder(tmp_path / "data")
    before = prepare(root)
    started_on = before.train.fingerprint
    done = tmp_path / "done"
    assert fit_folds(kfold(), done, data=before).status == "completed"
    # fold 0 trained, fold 1 not yet (the run was killed in fold 1's first epoch): a resume
    # skips fold 0, whose last.pt is never read again
    cut = tmp_path / "cut"
    assert fit_folds(kfold(), cut, data=before, only=0).status == "stopped"
    manifest = json.loads((cut / FOLDS_FILE).read_text())
    assert (manifest["data_fingerprint"], manifest["decode_rules"]) == (started_on, DECODE_RULES)
    old = shutil.copytree(cut, tmp_path / "old")
    strip_record(old / FOLDS_FILE)

    flip_masks(root)
    edited = prepare(root)
    now = edited.train.fingerprint
    kept = {run: files(run) for run in (cut, done)}
    with pytest.raises(ValueError) as e:
        fit_folds(kfold(), cut, data=edited)
    assert str(e.value) == (
        f"{cut / FOLDS_FILE}: the training data differ from those the run started on "
        f"(content {edited.train.content}, recorded {before.train.content}; data {root}); the "
        "folds trained so far were scored on those, the rest would be on these, and the "
        "out-of-fold val_probs.npz would hold the ground truth of both: train into a new --out "
        "(or put back the images and masks it started on)"
    )
    with pytest.raises(ValueError, match=r"done.folds\.json: the training data differ") as e:
        fit_folds(kfold(), done, data=edited)
    assert "the finished run's out-of-fold result (val_probs.npz, its Dice)" in str(e.value)
    assert {run: files(run) for run in (cut, done)} == kept
    assert not (cut / "fold1").exists()

    # folds.json of an older bldseg: the run goes on as before, with a warning, and the
    # manifest records the data from here on
    with pytest.warns(UserWarning, match=r"old.folds\.json was written by an older bldseg"):
        assert fit_folds(kfold(), old, data=edited).status == "completed"
    assert json.loads((old / FOLDS_FILE).read_text())["data_fingerprint"] == now


def test_a_change_of_bldseg_decoding_is_told_apart_from_the_data():
    # The cache's fingerprint holds the decoding rules too: a bldseg update that decodes masks
    # otherwise refuses the resume, blaming bldseg, not the user's data.
    now, then = "a" * 32, "b" * 32
    said = dict(consequence="it would mix both", remedy="train into a new --out")
    record = {"data_fingerprint": then, "decode_rules": DECODE_RULES - 1}
    with pytest.raises(ValueError) as e:
        check_same_data("runs/a/last.pt", "run", record, now, "/data/x", **said)
    assert str(e.value) == (
        "runs/a/last.pt: bldseg's image or mask decoding changed since this run started (rules "
        f"{DECODE_RULES - 1} -> {DECODE_RULES}: see bldseg.data.readers.DECODE_RULES); the cache "
        "is rebuilt and decoded differently, so the run cannot continue on it: train into a new "
        "--out"
    )
    # a record without the rules cannot tell: it names both causes
    with pytest.raises(ValueError, match=r"started on \(or bldseg's image or mask decoding"):
        check_same_data("runs/a/last.pt", "run", {"data_fingerprint": then}, now, None, **said)
    # the same fingerprint, or none recorded: let go
    check_same_data("runs/a/last.pt", "run", record, then, None, **said)
    check_same_data("runs/a/last.pt", "run", {}, now, None, **said)
    # Where both have a content digest it decides: the same pixels under another fingerprint
    # (another folder, a regenerated world, new file times) continue; other pixels do not, and
    # the older record's fingerprint wording about file times does not apply.
    with_content = {**record, "decode_rules": DECODE_RULES, "data_content": "c" * 32}
    check_same_data("runs/a/last.pt", "run", with_content, now, None, **said, content="c" * 32)
    with pytest.raises(ValueError) as e:
        check_same_data("runs/a/last.pt", "run", with_content, then, None, **said, content="d" * 32)
    assert str(e.value) == (
        "runs/a/last.pt: the training data differ from those the run started on (content "
        f"{'d' * 32}, recorded {'c' * 32}; data built-in synthetic); it would mix both: train "
        "into a new --out (or put back the images and masks it started on)"
    )


@pytest.mark.parametrize("kfold_run", [False, True], ids=["run", "kfold"])
def test_the_same_data_in_another_folder_continues_a_run_that_names_it(tmp_path, capsys, kfold_run):
    # The README: "the same data read from another folder ... continue". A run started with
    # --data DIR was refused when DIR moved ("written by a different config (data: ...)"), before
    # the content digest could say the data were the same.
    root = write_folder(tmp_path / "data")
    before = prepare(root)
    cfg = config(epochs=2, data=str(root), **({"folds": 2} if kfold_run else {}))
    out = tmp_path / "run"
    if kfold_run:
        assert fit_folds(cfg, out, data=before, only=0).status == "stopped"
    else:
        assert fit(cfg, out, data=before, stop_after=1).status == "stopped"
    moved = shutil.copytree(root, tmp_path / "disk2" / "data", copy_function=shutil.copy)
    restored = prepare(moved)
    assert restored.train.content == before.train.content
    again = RunConfig.from_flat({**cfg.to_flat(), "data": str(moved)})
    capsys.readouterr()
    resumed = (fit_folds if kfold_run else fit)(again, out, data=restored)
    assert resumed.status == "completed"
    assert f"continuing on {moved}, which holds the data the run started on" in (
        capsys.readouterr().out
    )
    # other data in the other folder: still refused, by the content digest
    flip_masks(moved)
    with pytest.raises(ValueError, match=r"the training data differ from those the run started"):
        (fit_folds if kfold_run else fit)(again, out, data=prepare(moved))
