"""experiments/bench_tiny_shapes.py: its shapes build, and they train as bench_train arms."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import bench_tiny_shapes  # noqa: E402

from bldseg.models import create_model  # noqa: E402
from tests.test_bench_train import WORLD  # noqa: E402


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_shapes_build_what_they_say():
    names = bench_tiny_shapes.register_shapes(list(bench_tiny_shapes.SHAPES))
    # registering twice in one process is harmless
    assert bench_tiny_shapes.register_shapes(["h16"]) == [names[0]]
    demo = create_model("upernet_internimage_tiny")
    models = {n.rsplit("tiny_", 1)[1]: create_model(n) for n in names}
    assert models["c32"].backbone.cfg.channels == 32
    assert models["d2242"].backbone.cfg.depths == (2, 2, 4, 2)
    assert models["h16"].decode_head.classifier.in_channels == 16  # the head's width
    assert _params(models["h16"]) < _params(demo) < _params(models["d2242"])
    assert _params(models["c32_h16"]) < _params(models["c32"])
    x = torch.randn(2, 3, 64, 64)
    for m in models.values():
        assert m.eval()(x).shape == (2, 1, 64, 64)
    with pytest.raises(SystemExit, match="unknown shape 'huge'"):
        bench_tiny_shapes.register_shapes(["huge"])


def test_a_shape_trains_as_an_arm(tmp_path):
    args = [
        sys.executable,
        str(REPO / "experiments" / "bench_tiny_shapes.py"),
        "--shapes", "h16",
        "--data-root", str(tmp_path / "data"),
        "--synthetic", json.dumps(WORLD),
        "--epochs", "1",
        "--set", "aug.crop_size=64",
        "--set", "samples_per_epoch=16",
        "--out", str(tmp_path / "runs"),
        "--json", str(tmp_path / "shapes.json"),
    ]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    arms = json.loads((tmp_path / "shapes.json").read_text())["arms"]
    assert {a: r["model"] for a, r in arms.items()} == {
        "ours": "upernet_internimage_tiny",
        "peer1": "upernet_internimage_tiny_h16",
    }
    assert arms["peer1"]["params"] < arms["ours"]["params"]
