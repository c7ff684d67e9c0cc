"""experiments/bench_train.py end to end on a tiny world: curves, table, JSON, plot, reuse."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bldseg import metrics
from bldseg.data.prepare import prepare_data
from bldseg.pipeline import test_truth as held_out_truth
from bldseg.predict import image_loader, load_checkpoint
from bldseg.train import RunConfig
from bldseg.train.engine import eval_autocast, predict_probs
from bldseg.tune.cli import CPU_DEMO

REPO = Path(__file__).resolve().parents[1]
WORLD = {
    "n_train": 6,
    "n_test": 8,
    "train_size": 96,
    "test_size": 64,
    "test_scene_size": 128,
    "noise_fraction": 0.3,
}


def _bench(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    # Our own tiny model as the "peer": the benchmark's logic without segmentation_models_pytorch.
    args = [
        sys.executable,
        str(REPO / "experiments" / "bench_train.py"),
        "--data-root", str(tmp_path / "data"),
        "--synthetic", json.dumps(WORLD),
        "--epochs", "2",
        "--peers", "upernet_internimage_tiny",
        "--set", "aug.crop_size=64",
        "--set", "samples_per_epoch=16",
        "--out", str(tmp_path / "runs"),
        "--json", str(tmp_path / "train.json"),
        *extra,
    ]  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=600)


def test_bench_train_writes_curves_and_reuses_finished_runs(tmp_path):
    done = _bench(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "train.json").read_text())
    assert set(record["arms"]) == {"ours", "peer1"}
    for arm in record["arms"].values():
        epochs = arm["epochs"]
        assert [e["epoch"] for e in epochs] == [1, 2]
        # Cumulative clocks rise; CPU seconds are counted (2 torch threads may exceed wall).
        assert 0 < epochs[0]["cpu_s"] < epochs[1]["cpu_s"]
        assert 0 < epochs[0]["wall_s"] < epochs[1]["wall_s"]
        assert all(0.0 <= e["test_dice"] <= 1.0 for e in epochs)
        curve = json.loads((Path(arm["run_dir"]) / "test_curve.json").read_text())
        assert [len(c["per_tile"]) for c in curve["epochs"]] == [8, 8]
        assert curve["scoring"] == arm["scoring"]
    budgets = record["budgets"]
    assert len(budgets) == 4 and budgets[-1]["cpu_s"] == max(
        a["epochs"][-1]["cpu_s"] for a in record["arms"].values()
    )
    last = budgets[-1]
    assert last["ours"]["done"] and last["peer1"]["done"]
    assert last["ours"]["low"] <= last["ours"]["estimate"] <= last["ours"]["high"]
    assert "ours-peer1" in last
    behind = record["behind_at_epoch_ends"]["peer1"]
    assert 1 <= behind["compared"] <= 4 and len(behind["behind"]) <= behind["compared"]
    assert all(b["diff"] < 0 for b in behind["behind"])
    assert " epoch ends" in done.stdout
    assert (tmp_path / "train.png").stat().st_size > 0
    assert "test Dice [95% CI over scenes]" in done.stdout
    for arm in record["arms"].values():  # both trained by this call
        origin = arm["origin"]
        assert (origin["status"], origin["epochs_trained_now"], origin["epochs_reused"]) == (
            "trained",
            2,
            0,
        )
    assert "(reused)" not in done.stdout

    # A rerun trains nothing: the finished runs and their per-epoch test scores are reused,
    # and the table and the JSON say so (their CPU seconds are of the earlier call).
    again = _bench(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "epoch 1/2" not in again.stderr
    rerun = json.loads((tmp_path / "train.json").read_text())
    assert rerun["arms"]["ours"]["epochs"] == record["arms"]["ours"]["epochs"]
    for name, arm in rerun["arms"].items():
        origin, first = arm["origin"], record["arms"][name]["origin"]
        assert (origin["status"], origin["epochs_trained_now"], origin["epochs_reused"]) == (
            "reused",
            0,
            2,
        )
        assert origin["last_epoch_finished"] == first["last_epoch_finished"]
    assert "ours (reused)" in again.stdout and "peer1 (reused)" in again.stdout
    assert "2 epochs trained by an earlier call, the last finished" in again.stdout

    # One arm trained again, the other reused: each is labelled as what it is.
    shutil.rmtree(record["arms"]["peer1"]["run_dir"])
    mixed = _bench(tmp_path)
    assert mixed.returncode == 0, mixed.stderr[-3000:]
    arms = json.loads((tmp_path / "train.json").read_text())["arms"]
    assert (arms["ours"]["origin"]["status"], arms["peer1"]["origin"]["status"]) == (
        "reused",
        "trained",
    )
    assert "ours (reused)" in mixed.stdout and "peer1 (reused)" not in mixed.stdout


def test_a_peer_that_cannot_be_built_stops_before_anything_is_prepared_or_trained(
    tmp_path, monkeypatch, capsys
):
    sys.path.insert(0, str(REPO / "experiments"))
    import bench_train

    import bldseg.models.smp

    # As on a machine without segmentation_models_pytorch (.venv), whatever this one has.
    monkeypatch.setattr(bldseg.models.smp, "smp_available", lambda: False)
    args = ["--data-root", str(tmp_path / "data"), "--synthetic", json.dumps(WORLD)]
    args += ["--epochs", "1", "--set", "aug.crop_size=64", "--set", "samples_per_epoch=16"]
    args += ["--out", str(tmp_path / "runs"), "--json", str(tmp_path / "train.json")]
    smp = "install the smp extra: pip install 'bldseg[smp]' (or make bench-train, which uses "
    for peers, says in (
        (["smp_unet_mobilenetv3_small"], "--peers smp_unet_mobilenetv3_small needs segmentation"),
        (["smp_unet_mobilenetv3_small"], smp + ".venv-peers)"),
        (["upernet_internimage_tiny", "no_such_model"], "--peers no_such_model is not a reg"),
    ):
        with pytest.raises(SystemExit) as e:
            bench_train.main([*args, "--peers", *peers])
        assert e.value.code == 2
        assert says in capsys.readouterr().err
        assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()

    # A config value refused: after the data, still before any arm trains.
    with pytest.raises(SystemExit) as e:
        bench_train.main([*args, "--peers", "upernet_internimage_tiny", "--set", "optim.lr=2"])
    assert e.value.code == 2 and "optim.lr=2" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_curves_are_scored_as_predict_and_again_when_scored_otherwise(tmp_path):
    sys.path.insert(0, str(REPO / "experiments"))
    import bench_train

    data = prepare_data(None, data_root=tmp_path / "data", synthetic=WORLD)
    truth = held_out_truth(data)
    # bf16 convolutions round differently in channels-last: the run's memory format matters
    flat = {**CPU_DEMO, "epochs": 1, "samples_per_epoch": 16, "aug.crop_size": 64}
    cfg = RunConfig.from_flat({**flat, "precision": "bf16", "channels_last": True})
    out = tmp_path / "runs"
    run_dir, _, curve = bench_train.train_curve("ours", cfg, out, data, truth)

    # Scored as bldseg predict scores the run (its one epoch is best.pt).
    cpu = torch.device("cpu")
    model, run_cfg, _ = load_checkpoint(run_dir / "best.pt", cpu)
    amp = eval_autocast(run_cfg.precision, cpu)
    probs = predict_probs(model, image_loader(data.test, 32), cpu, amp, run_cfg.tta)
    level = metrics.level_from_threshold(curve[0]["threshold"])
    per_tile = metrics.dice_per_image(probs >= level, truth)
    assert curve[0]["per_tile"] == [None if np.isnan(v) else float(v) for v in per_tile]
    path = run_dir / bench_train.CURVE_FILE
    recorded = json.loads(path.read_text())
    assert recorded["scoring"] == bench_train.scoring_spec(cfg, cpu)
    assert recorded["scoring"]["version"] == bench_train.SCORING_VERSION
    assert recorded["scoring"]["torch_threads"] == torch.get_num_threads()
    assert (recorded["scoring"]["autocast"], recorded["scoring"]["channels_last"]) == (
        "bfloat16",
        True,
    )

    # A finished run's curve scored by an older version (a bare list, without its scoring)
    # or another scoring version is scored again from the epoch's weights, not reused.
    old = [{"epoch": 1, "threshold": 0.5, "per_tile": [0.1] * len(truth)}]
    for stale in (old, {**recorded, "scoring": {**recorded["scoring"], "version": 1}}):
        path.write_text(json.dumps(stale))
        assert bench_train.train_curve("ours", cfg, out, data, truth)[2] == curve
        assert json.loads(path.read_text()) == recorded

    # Without the weights, such a curve is refused, never used.
    path.write_text(json.dumps(old))
    shutil.rmtree(run_dir / bench_train.EPOCH_WEIGHTS)
    with pytest.raises(RuntimeError, match=r"no weights .* delete the folder"):
        bench_train.train_curve("ours", cfg, out, data, truth)

    # CPU seconds measured with other torch threads go to another run folder.
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads != 1 else 2)
    try:
        other = bench_train.run_folder("ours", cfg, out, data.train.fingerprint)
    finally:
        torch.set_num_threads(threads)
    assert other != run_dir == bench_train.run_folder("ours", cfg, out, data.train.fingerprint)


def test_ours_epochs_lengthens_only_our_arm(tmp_path):
    # Equal CPU budget: our arm on its own, longer run; the peer keeps --epochs. The CPU
    # settings' schedule-free warm-up (a quarter of the steps here: 2 of the peer's 8) stays
    # 2 steps in our 12-step run, not 3, so both arms see the same learning rate at every step.
    import torch

    done = _bench(tmp_path, "--ours-epochs", "3", "--set", "sched.warmup_frac=0.25")
    assert done.returncode == 0, done.stderr[-3000:]
    arms = json.loads((tmp_path / "train.json").read_text())["arms"]
    assert [e["epoch"] for e in arms["ours"]["epochs"]] == [1, 2, 3]
    assert [e["epoch"] for e in arms["peer1"]["epochs"]] == [1, 2]
    status = json.loads((Path(arms["ours"]["run_dir"]) / "status.json").read_text())
    assert status == {"status": "completed", "message": "trained 3 epochs"}
    assert arms["ours"]["config_beyond_base"] == {"epochs": 3, "sched.warmup_steps": 2}
    assert arms["peer1"]["config_beyond_base"] == {"epochs": 2}
    for arm in arms.values():
        last = torch.load(Path(arm["run_dir"]) / "last.pt", map_location="cpu", weights_only=False)
        groups = last["optimizers"][0]["param_groups"]
        assert {g["warmup_steps"] for g in groups} == {2}, arm["model"]


def test_behind_moments_carry_paired_intervals():
    sys.path.insert(0, str(REPO / "experiments"))
    import bench_train

    from bldseg.curves import EpochPoint

    groups = [0, 0, 1, 1, 2, 2, 3, 3]  # 8 test tiles from 4 scenes
    base = np.linspace(0.5, 0.8, 8)
    ours = {
        # epoch 1 is clearly worse than the peer's; epoch 2 worse by a hair, mixed scene by scene
        "cpu": [EpochPoint(1, 10.0, 0.5, 0.0), EpochPoint(2, 20.0, 0.6, 0.0)],
        "tiles": {1: base - 0.1, 2: base + np.repeat([0.03, -0.04, 0.02, -0.03], 2)},
    }
    peer = {"cpu": [EpochPoint(1, 15.0, 0.5, 0.0)], "tiles": {1: base}}
    for arm in (ours, peer):  # the curves' test Dice is the tiles' mean, as arm_points makes it
        arm["cpu"] = [
            EpochPoint(p.epoch, p.seconds, p.val, float(arm["tiles"][p.epoch].mean()))
            for p in arm["cpu"]
        ]
    got = bench_train.behind_with_intervals(ours, peer, groups)
    assert got["compared"] == 2  # 15 s and 20 s: once both arms have an epoch
    rows = got["behind"]
    assert [(r["cpu_s"], r["ours_epoch"], r["peer_epoch"]) for r in rows] == [
        (15.0, 1, 1),
        (20.0, 2, 1),
    ]
    assert rows[0]["diff"] == pytest.approx(-0.1)
    assert rows[0]["high"] < 0  # every scene lower: the whole interval is below zero
    assert rows[1]["diff"] == pytest.approx(-0.005)
    assert rows[1]["low"] < 0 < rows[1]["high"]  # a shortfall the scenes cannot tell apart
    assert got["interval_below_zero"] == 1


@pytest.mark.parametrize("flag", ["--ours-epochs", "--epochs"])
def test_epochs_below_one_are_refused_before_the_data(tmp_path, monkeypatch, capsys, flag):
    # --ours-epochs 0 was read as "not given" (0 is false): our arm trained --epochs unseen
    sys.path.insert(0, str(REPO / "experiments"))
    import bench_train

    def no_world(args):
        raise AssertionError("the data was prepared before the flags were checked")

    monkeypatch.setattr(bench_train, "load_world", no_world)
    args = ["--peers", "upernet_internimage_tiny", "--out", str(tmp_path / "runs"), flag, "0"]
    with pytest.raises(SystemExit) as e:
        bench_train.main(args)
    assert e.value.code == 2
    assert f"{flag} must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
