"""Search results on another filesystem (an NFS-like mount), and one copy of the weights."""

import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from bldseg.tune.runner import CKPT_FILE, run_search
from tests.tune.test_runner import spec_for


@pytest.fixture
def other_filesystem(tmp_path):
    """A tmpfs mounted for this test: not the filesystem of the temp folder."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mnt)],
            check=True,
            capture_output=True,
            text=True,
        )
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {detail.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_search_on_another_filesystem_keeps_one_copy_of_the_weights(
    small_world, ray_session, tmp_path, other_filesystem
):
    assert os.stat(other_filesystem).st_dev != os.stat(tempfile.gettempdir()).st_dev
    result = run_search(
        spec_for(
            small_world,
            tmp_path,
            name="nfs",
            trials=1,
            epochs=1,
            storage=str(other_filesystem / "runs"),
        )
    )
    assert list(result.table["status"]) == ["completed"], result.table.to_dict("records")
    assert result.n_completed == 1 and result.best
    trial_dir = Path(result.best["run_dir"]).parent
    run = trial_dir / "run"
    assert run.parent.parent == result.path and result.path.is_relative_to(other_filesystem)

    # Every weight file under the experiment folder is the run folder's best.pt or last.pt:
    # the Tune checkpoints hold only the epoch they stand for.
    weights = {p: p.stat().st_size for p in result.path.rglob("*") if p.suffix in (".pt", ".npz")}
    assert set(weights) == {run / "best.pt", run / "last.pt", run / "val_probs.npz"}, weights
    assert len({_md5(p) for p in weights}) == len(weights)  # no two files with the same bytes
    checkpoints = sorted(trial_dir.glob("checkpoint_*"))
    assert checkpoints
    for c in checkpoints:
        assert [p.name for p in c.iterdir()] == [CKPT_FILE]
        assert json.loads((c / CKPT_FILE).read_text())["epoch"] == 1
    trial_bytes = sum(p.stat().st_size for p in trial_dir.rglob("*") if p.is_file())
    other = trial_bytes - sum(weights.values())
    print(
        f"\ntrial folder {trial_bytes} B: best.pt {weights[run / 'best.pt']} B, "
        f"last.pt {weights[run / 'last.pt']} B, val_probs.npz {weights[run / 'val_probs.npz']} B, "
        f"everything else (plots, json, Tune records) {other} B"
    )
    # the rest is plots, JSON records and Tune's own files: far less than one more weight file
    assert other < weights[run / "best.pt"]
