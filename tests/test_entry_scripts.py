"""Every entry script takes the same data flags, and a user's folder of tiles and masks works
from the command line: prepare, train, find suspects, a search, predict."""

import contextlib
import io
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from tests.data.formats import scene

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = [
    "prepare_data",
    "train",
    "tune_aug",
    "tune_sched",
    "tune_tau",
    "pipeline",
    "find_suspects",
    "predict",
]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_the_data_flags(script, monkeypatch):
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        runpy.run_path(str(REPO / "experiments" / f"{script}.py"), run_name="__main__")
    assert e.value.code == 0
    text = out.getvalue()
    for flag in ("--data ", "--images", "--tile-size", "--alpha", "--bands"):
        assert flag in text, f"{script} lacks {flag}"
    if script != "predict":
        for flag in ("--masks", "--mask-pattern", "--mask-values", "--footprints"):
            assert flag in text, f"{script} lacks {flag}"


def _user_folder(root: Path) -> Path:
    """An unusual layout: scenes/<city>/<name>.png with labels/<city>/<name>_label.png."""
    for i in range(6):
        city = "austin" if i < 3 else "chicago"
        rgb, m = scene(64 if i % 2 else 96, 10 + i)
        img = root / "scenes" / city / f"tile{i}.png"
        lab = root / "labels" / city / f"tile{i}_label.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        lab.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(img), rgb[..., ::-1])
        cv2.imwrite(str(lab), m * 255)
    return root


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_folder_data_from_the_command_line(tmp_path):
    root = _user_folder(tmp_path / "mydata")
    data_flags = [
        "--images",
        str(root / "scenes"),
        "--masks",
        str(root / "labels"),
        "--mask-pattern",
        "{stem}_label.png",
        "--tile-size",
        "64",
        "--data-root",
        str(tmp_path / "work"),
    ]
    small = ["--set", "aug.crop_size=32", "--set", "samples_per_epoch=16", "--set", "epochs=1"]
    r = _run(
        [str(REPO / "experiments/train.py"), *data_flags, *small, "--out", str(tmp_path / "run")],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # 3 scenes of 96 px (4 tiles of 64 each) + 3 of 64 px: 15 tiles from 6 scenes
    assert "data (folders): image/mask folders" in r.stdout
    assert "15 samples of 64x64 from 6 source scene(s)" in r.stdout
    assert "CPU demo's small settings" in r.stdout
    assert (tmp_path / "run" / "best.pt").is_file()
    # the headline is labelled as chosen on the tiles it is measured on
    assert "the epoch and threshold were chosen on these validation tiles" in r.stdout

    r = _run(
        [
            str(REPO / "experiments/find_suspects.py"),
            *data_flags,
            "--checkpoint",
            str(tmp_path / "run" / "best.pt"),
            "--out",
            str(tmp_path / "suspects"),
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "suspects" / "suspects.csv").is_file()

    # A search on the same folder (one trial, one epoch) through the real Ray + MLflow path.
    r = _run(
        [
            str(REPO / "experiments/tune_aug.py"),
            *data_flags,
            *small[:4],
            "--trials",
            "1",
            "--epochs",
            "1",
            "--scheduler",
            "fifo",
            "--storage",
            str(tmp_path / "runs"),
            "--tracking-uri",
            f"sqlite:///{tmp_path}/mlflow.db",
            "--name",
            "folder",
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "15 samples of 64x64" in r.stdout
    meta = json.loads((tmp_path / "runs" / "folder" / "bldseg_search.json").read_text())
    assert meta["spec"]["data_options"]["mask_pattern"] == "{stem}_label.png"


def test_bad_data_is_a_clear_error(tmp_path):
    root = _user_folder(tmp_path / "mydata")
    r = _run(
        [
            str(REPO / "experiments/prepare_data.py"),
            "--images",
            str(root / "scenes"),
            "--masks",
            str(root / "labels"),
            "--data-root",
            str(tmp_path / "work"),
        ],
        tmp_path,
    )
    assert r.returncode != 0
    assert "no mask found" in r.stderr and "tile0_label.png" not in r.stderr.split("tried")[0]
    assert "--mask-pattern" in r.stderr and "Traceback" not in r.stderr
    r = _run([str(REPO / "experiments/train.py"), "--data", str(root), "--out", "x"], tmp_path)
    assert r.returncode != 0 and "not a dataset bldseg knows" in r.stderr


def test_compare_noisy_refuses_a_repeated_seed(monkeypatch, capsys):
    # a seed given twice is one run counted twice: it narrowed the interval over seeds
    monkeypatch.setattr(sys, "argv", ["compare_noisy", "--seeds", "0", "1", "2", "2"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(REPO / "experiments" / "compare_noisy.py"), run_name="__main__")
    assert e.value.code == 2 and "--seeds: each seed once" in capsys.readouterr().err
