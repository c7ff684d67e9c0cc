"""experiments/bench_quality.py: the verdict needs the seeds to agree, and a search's best
trial is labelled as what it is."""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bldseg.models import create_model
from bldseg.train import RunConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import bench_quality  # noqa: E402

GROUPS = [f"s{i // 4}" for i in range(64)]  # 16 scenes x 4 tiles


def _rows(shifts: list[float]) -> list[dict]:
    """ours and peer per seed; ours = peer + the seed's shift on every tile (little tile noise)."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.6, 0.9, len(GROUPS))
    rows = []
    for seed, shift in enumerate(shifts):
        for arm, d in (("ours", shift), ("peer", 0.0)):
            tiles = base + d + rng.normal(0, 0.002, len(GROUPS))
            rows.append(
                {
                    "arm": arm,
                    "seed": seed,
                    "test_dice": {"estimate": float(tiles.mean())},
                    "per_tile": list(tiles),
                }
            )
    return rows


def test_a_sign_flip_between_seeds_is_within_noise():
    # ours ahead with seed 0, behind with seed 1: pooled, the scenes alone call it an effect
    summary = bench_quality.summarise(_rows([0.05, -0.03]), GROUPS)
    d = summary["ours_minus_peer"]
    assert d["interval"]["low"] > 0  # over test images: above 0
    assert d["seed_interval"]["low"] < 0 < d["seed_interval"]["high"]
    assert d["beyond_noise"] is False
    assert d["per_seed"][0] > 0 > d["per_seed"][1]
    # Seeds that agree are beyond noise on both counts.
    agree = bench_quality.summarise(_rows([0.03, 0.032, 0.028]), GROUPS)["ours_minus_peer"]
    assert agree["beyond_noise"] is True and agree["seeds"] == [0, 1, 2]
    assert agree["seed_interval"]["low"] > 0


def test_a_searchs_best_trial_is_labelled_best_of_n(tmp_path, capsys):
    search = tmp_path / "search"
    runs = []
    for i in range(3):
        run = search / f"trial_{i}" / "run"
        cfg = RunConfig.from_flat({"model": "upernet_internimage_tiny", "seed": 0})
        torch.manual_seed(i)
        model = create_model(cfg.model, **cfg.model_kwargs())
        run.mkdir(parents=True)
        torch.save({"model": model.state_dict(), "config": cfg.to_flat()}, run / "best.pt")
        runs.append({"run_dir": str(run), "status": "completed", "val_dice_best": 0.5 + i / 10})
    pd.DataFrame(runs).to_csv(search / "trials.csv", index=False)
    (search / "bldseg_search.json").write_text(json.dumps({"spec": {"cpus_per_trial": 2.0}}))
    run_dir, flat, selection = bench_quality.best_trial(search)
    assert run_dir == search / "trial_2" / "run" and flat["model"] == "upernet_internimage_tiny"
    assert selection == {
        "trials": 3,
        "cpus_per_trial": 2.0,
        "label": "best of 3 trials, cpus_per_trial=2",
    }
    # In the table and the summary, that run is labelled, not shown as a like-for-like arm.
    rows = _rows([0.01])
    rows[0]["selection"] = selection
    for r in rows:
        r.update(model=r["arm"], status="completed", params=1e6, best_epoch=1, epoch_s=[1.0])
        r.update(val_dice_best=0.7, val_thr_best=0.5, test_dice_05=0.7, train_s=1.0, cpu_s=1.0)
        r["test_dice"] = {"estimate": r["test_dice"]["estimate"], "low": 0.0, "high": 1.0}
    summary = bench_quality.summarise(rows, GROUPS)
    assert summary["ours_selection"] == {"0": "best of 3 trials, cpus_per_trial=2"}
    bench_quality.print_table(rows, summary)
    out = capsys.readouterr().out
    assert "(best of 3 trials, cpus_per_trial=2)" in out
    assert "ours seed 0 is the search's best of 3 trials" in out
    assert "within noise" in out  # one seed: its interval over seeds is unbounded


def test_a_peer_that_cannot_be_built_stops_before_the_data_or_any_training(
    tmp_path, monkeypatch, capsys
):
    import bldseg.models.smp

    # As on a machine without segmentation_models_pytorch (.venv), whatever this one has.
    monkeypatch.setattr(bldseg.models.smp, "smp_available", lambda: False)
    world = {"n_train": 6, "n_test": 8, "train_size": 96, "test_size": 64}
    args = ["--data-root", str(tmp_path / "data"), "--synthetic", json.dumps(world)]
    args += ["--epochs", "1", "--seeds", "0", "--out", str(tmp_path / "runs")]
    for extra, says in (
        ([], "--peer smp_unet_resnet18 needs segmentation_models_pytorch"),
        ([], "pip install 'bldseg[smp]' (or make bench-quality, which uses .venv-peers)"),
        (["--peer", "no_such_model"], "--peer no_such_model is not a registered model"),
        (["--peer", "upernet_internimage_tiny", "--peer-epochs", "-1"], "--peer-epochs must be"),
        (["--peer", "upernet_internimage_tiny", "--peer-epochs", "0"], "--peer-epochs must be"),
        (["--peer", "upernet_internimage_tiny", "--epochs", "0"], "--epochs must be at least 1"),
    ):
        with pytest.raises(SystemExit) as e:
            bench_quality.main([*args, *extra])
        assert e.value.code == 2
        assert says in capsys.readouterr().err
        assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


def test_a_repeated_seed_is_refused_before_anything_runs(tmp_path, capsys):
    # --seeds 0 0 counted one run twice: a zero-width interval "over seeds"
    args = ["--data-root", str(tmp_path / "data"), "--seeds", "0", "0"]
    with pytest.raises(SystemExit) as e:
        bench_quality.main([*args, "--out", str(tmp_path / "runs")])
    assert e.value.code == 2 and "--seeds: each seed once, got [0, 0]" in capsys.readouterr().err
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


class _Stop(Exception):
    """Raised where the data would be prepared: the configs are built by then."""


def _configs(monkeypatch, argv: list[str]) -> dict[str, RunConfig]:
    """The run configs main() builds from ``argv``, stopping before the data."""
    built = {}
    real = bench_quality.build_arms

    def build_arms(parser, flats):
        cfgs, params = real(parser, flats)
        built.update(cfgs)
        return cfgs, params

    def stop(args):
        raise _Stop

    monkeypatch.setattr(bench_quality, "build_arms", build_arms)
    monkeypatch.setattr(bench_quality, "load_world", stop)
    with pytest.raises(_Stop):
        bench_quality.main(argv)
    return built


def test_epochs_given_go_over_the_search_trials(tmp_path, monkeypatch, capsys):
    # A search whose best trial trained 3 epochs.
    run = tmp_path / "search" / "trial_0" / "run"
    cfg = RunConfig.from_flat({"model": "upernet_internimage_tiny", "seed": 0, "epochs": 3})
    run.mkdir(parents=True)
    model = create_model(cfg.model, **cfg.model_kwargs())
    torch.save({"model": model.state_dict(), "config": cfg.to_flat()}, run / "best.pt")
    row = {"run_dir": str(run), "status": "completed", "val_dice_best": 0.5}
    pd.DataFrame([row]).to_csv(tmp_path / "search" / "trials.csv", index=False)
    args = ["--search", str(tmp_path / "search"), "--peer", "upernet_internimage_tiny"]
    args += ["--seeds", "0", "1", "--out", str(tmp_path / "runs")]

    def epochs(cfgs: dict[str, RunConfig]) -> dict[str, int]:
        return {label: c.epochs for label, c in cfgs.items()}

    # Without --epochs every arm takes the trial's, and ours seed 0 is the trial read as it is.
    assert set(epochs(_configs(monkeypatch, args)).values()) == {3}
    assert "trained again" not in capsys.readouterr().out
    # --epochs 2 was silently replaced by the trial's 3: it now sets every arm's budget, and
    # the script says that the trial's run is not the one this config trains.
    got = epochs(_configs(monkeypatch, [*args, "--epochs", "2"]))
    assert set(got.values()) == {2}
    out = capsys.readouterr().out
    assert "ours seed 0 is trained again, not read from the search's trial" in out
    assert "epochs=2 (trial: 3)" in out
    # --peer-epochs goes over both for the peer only
    got = epochs(_configs(monkeypatch, [*args, "--epochs", "2", "--peer-epochs", "1"]))
    assert got == {"ours seed 0": 2, "peer seed 0": 1, "ours seed 1": 2, "peer seed 1": 1}
    # --set still goes over everything
    got = epochs(_configs(monkeypatch, [*args, "--epochs", "2", "--set", "epochs=4"]))
    assert set(got.values()) == {4}
