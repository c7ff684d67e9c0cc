"""experiments/bench_model.py: the training step under the run config's precision."""

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import bench_model  # noqa: E402


def test_step_runs_under_the_precision_it_reports(monkeypatch):
    seen: list[torch.dtype] = []
    create = bench_model.create_model

    def create_and_hook(*args, **kwargs):
        model = create(*args, **kwargs)
        model.decode_head.classifier.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        return model

    monkeypatch.setattr(bench_model, "create_model", create_and_hook)
    cpu = torch.device("cpu")
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        seen.clear()
        r = bench_model.train_step_stats(
            "upernet_internimage_tiny", "reference", 64, 2, 2, cpu, precision
        )
        assert r["precision"] == precision and r["impl"] == "reference"
        assert 0 < r["ms_min"] <= r["ms_median"]
        assert seen == [dtype] * 3  # the warm-up step and two timed ones
    with pytest.raises(ValueError, match="needs a CUDA device"):
        bench_model.train_step_stats("upernet_internimage_tiny", "reference", 64, 2, 1, cpu, "fp16")
