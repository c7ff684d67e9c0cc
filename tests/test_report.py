"""Per-tile scores and the seed-repeated arm comparison behind REPORT.md and compare_noisy."""

import numpy as np
import pytest

from bldseg import stats
from bldseg.report import TileScores, compare_arms, tile_scores

IDS = np.array([f"t{i}" for i in range(12)])
GROUPS = np.array([f"img{i // 3}" for i in range(12)])  # 4 source images of 3 tiles


def _arm(rng, mean: float, seeds: int = 3) -> list[TileScores]:
    return [
        TileScores(np.clip(rng.normal(mean, 0.05, 12), 0, 1), IDS, GROUPS) for _ in range(seeds)
    ]


def test_tile_scores_of_a_library(tmp_path):
    probs = np.zeros((3, 4, 4), np.uint8)
    probs[0, :2] = 200  # half the tile predicted
    truth = np.zeros((3, 4, 4), np.uint8)
    truth[0] = 1
    truth[1, 0, 0] = 1  # missed entirely
    np.savez(
        tmp_path / "val_probs.npz",
        probs=probs,
        truth=truth,
        tile_ids=np.array(["a", "b", "c"]),
        image_ids=np.array(["x", "x", "y"]),
    )
    s = tile_scores(tmp_path / "val_probs.npz", 0.5)
    assert s.dice[0] == pytest.approx(2 * 8 / (8 + 16))
    assert s.dice[1] == pytest.approx(0.0, abs=1e-6) and np.isnan(s.dice[2])  # empty/empty
    assert list(s.image_ids) == ["x", "x", "y"]
    assert s.interval().clusters == 1  # y's one tile is empty/empty: nothing scored there
    assert tile_scores(tmp_path / "missing.npz", 0.5) is None


def test_paired_difference_needs_the_same_tiles():
    a = TileScores(np.linspace(0, 1, 12), IDS, GROUPS)
    b = TileScores(np.linspace(0, 1, 12)[::-1], IDS, GROUPS)
    assert a.minus(b).to_dict() == stats.paired_difference(a.dice, b.dice, GROUPS).to_dict()
    other = TileScores(b.dice, IDS[::-1], GROUPS)
    assert a.minus(other) is None


def test_compare_arms_pools_seeds_and_pairs_them():
    rng = np.random.default_rng(0)
    arms = {"bce": _arm(rng, 0.5), "coteaching": _arm(rng, 0.7)}
    out = compare_arms(arms, "bce", seeds=[0, 1, 2])
    assert out["seeds"] == [0, 1, 2] and out["baseline"] == "bce"
    for name, runs in arms.items():
        a = out["arms"][name]
        assert a["per_seed"] == pytest.approx([r.dice.mean() for r in runs])
        iv = a["interval"]
        assert iv["estimate"] == pytest.approx(np.mean(a["per_seed"]))  # same tiles per seed
        assert iv["low"] <= iv["estimate"] <= iv["high"]
        assert iv["clusters"] == 4 and iv["n"] == 36  # 4 images; 3 seeds x 12 tiles
    d = out["differences"]["coteaching"]
    assert d["interval"]["low"] > 0  # a 0.2 gain on every tile is beyond noise
    assert d["seed_interval"]["low"] > 0 and d["beyond_noise"]
    for name in arms:
        iv = out["arms"][name]["seed_interval"]
        assert iv["n"] == 3 and iv["low"] <= out["arms"][name]["mean_of_seeds"] <= iv["high"]
    cot, bce = out["arms"]["coteaching"]["per_seed"], out["arms"]["bce"]["per_seed"]
    assert d["per_seed"] == pytest.approx([c - b for c, b in zip(cot, bce, strict=True)])
    assert "bce" not in out["differences"]


def test_compare_arms_without_a_difference_includes_zero():
    rng = np.random.default_rng(1)
    same = _arm(rng, 0.6)
    out = compare_arms({"bce": same, "coteaching": list(same)}, "bce")
    d = out["differences"]["coteaching"]
    assert d["interval"]["estimate"] == 0 and d["interval"]["low"] <= 0 <= d["interval"]["high"]
    assert not d["beyond_noise"]


def test_seeds_that_disagree_are_not_beyond_noise():
    """One lucky seed: the pooled tiles favour the arm, the seeds do not agree."""
    rng = np.random.default_rng(3)
    bce = _arm(rng, 0.5)
    cot = [
        TileScores(np.clip(r.dice + shift, 0, 1), IDS, GROUPS)
        for r, shift in zip(bce, (0.3, -0.02, -0.02), strict=True)
    ]
    d = compare_arms({"bce": bce, "coteaching": cot}, "bce")["differences"]["coteaching"]
    assert d["interval"]["low"] > 0  # over test images alone it looks like a gain
    assert d["seed_interval"]["low"] < 0 and not d["beyond_noise"]


@pytest.mark.parametrize(
    ("arms", "match"),
    [
        ({"x": []}, "baseline"),
        ({"bce": [], "coteaching": []}, "same .*number of seeds"),
        # 3 seeds against 2: pairing seed i with seed i would silently drop one
        (
            {
                "bce": _arm(np.random.default_rng(4), 0.5, seeds=3),
                "coteaching": _arm(np.random.default_rng(5), 0.6, seeds=2),
            },
            r"same \(non-zero\) number of seeds, got \{2, 3\}",
        ),
    ],
)
def test_compare_arms_rejects(arms, match):
    with pytest.raises(ValueError, match=match):
        compare_arms(arms, "bce")


def test_compare_arms_rejects_other_tiles():
    rng = np.random.default_rng(2)
    a = _arm(rng, 0.5, seeds=1)
    b = [TileScores(a[0].dice, IDS[::-1], GROUPS)]
    with pytest.raises(ValueError, match="other tiles"):
        compare_arms({"bce": a, "coteaching": b}, "bce")


def test_a_value_outside_its_interval_is_flagged():
    from bldseg.report import _iv

    iv = {"estimate": 0.54, "low": 0.517, "high": 0.564}
    assert _iv(iv, 0.55) == "0.5500 [0.5170, 0.5640]"
    # a score of another threshold or library beside this interval: visibly not its own
    cell = _iv(iv, 0.60)
    assert cell.startswith("0.6000 [0.5170, 0.5640]") and "⚠" in cell and "0.5400" in cell


def test_coteaching_that_drops_nothing_is_named():
    # REPORT.md presented a tune_tau trial with tau 0.22, tile granularity and batch 4 as
    # co-teaching: floor(0.88) = 0 tiles dropped per batch, so it never ran
    from bldseg.report import coteaching_dropped_nothing
    from bldseg.train.config import RunConfig

    def run(**flat):
        return RunConfig.from_flat({"coteach.enabled": True, "batch_size": 4, **flat})

    idle = coteaching_dropped_nothing(run(**{"coteach.tau": 0.2195}))
    assert idle == (
        "tile co-teaching with tau 0.22 and batch_size 4 drops floor(0.88) = 0 tiles per batch: "
        "it dropped nothing"
    )
    assert coteaching_dropped_nothing(run(**{"coteach.tau": 0.0})).startswith("tau 0")
    assert coteaching_dropped_nothing(run(**{"coteach.tau": 0.25, "coteach.t_k": 1})) is None
    pixel = {"coteach.tau": 0.1, "coteach.granularity": "pixel"}
    assert coteaching_dropped_nothing(run(**pixel)) is None  # pixels have no such floor
    assert coteaching_dropped_nothing(RunConfig()) is None  # not co-teaching at all
    assert coteaching_dropped_nothing(None) is None


def test_coteaching_that_drops_nothing_during_its_ramp_is_named():
    # ceil(R(T) * 4) keeps every tile while floor(4 * tau * min(T / t_k, 1)) < 1: with t_k 5
    # and tau 0.25 (keep_ratio 0.95 .. 0.80) the first five epochs train two plain networks
    from bldseg.report import coteaching_dropped_nothing
    from bldseg.train.config import RunConfig

    cfg = RunConfig.from_flat(
        {"coteach.enabled": True, "batch_size": 4, "coteach.tau": 0.25, "epochs": 10}
    )
    what = "tile co-teaching with tau 0.25, t_k 5 and batch_size 4 dropped nothing"
    formula = "floor(4 * 0.25 * min(T / 5, 1)) = 0 in 0-based epoch T < 5"
    # no history: the formula over the configured epochs
    assert coteaching_dropped_nothing(cfg) == f"{what} until epoch 6 of 10 ({formula})"
    # an older run's history (the better network's val_net, no dropped_share): the formula
    # over the epochs it trained
    old = [{"epoch": e, "val_net": "fg"[e % 2], "val_dice_best_other": 0.5} for e in (1, 2, 3)]
    assert coteaching_dropped_nothing(cfg, old) == f"{what} in its 3 epochs ({formula})"
    # what the run recorded decides where it has it
    measured = "(the dropped_share its history records)"
    shares = [0.0, 0.0, 0.0, 0.25]
    rows = [{"epoch": e + 1, "dropped_share": d} for e, d in enumerate(shares)]
    assert coteaching_dropped_nothing(cfg, rows) == f"{what} until epoch 4 of 4 {measured}"
    assert coteaching_dropped_nothing(cfg, rows[:3]) == f"{what} in its 3 epochs {measured}"
    # the first epoch keeps everything by design (R(0) = 1)
    early = [{"epoch": 1, "dropped_share": 0.0}, {"epoch": 2, "dropped_share": 0.25}]
    assert coteaching_dropped_nothing(cfg, early) is None
    # a resumed older run: rows without the record judged by the formula, the others as measured
    mixed = [old[0], *rows[1:3], {"epoch": 4, "dropped_share": 0.0}]
    assert coteaching_dropped_nothing(cfg, mixed) == f"{what} in its 4 epochs ({formula})"


@pytest.mark.parametrize(
    "shares, says",
    [
        ([0.0, 0.0, 0.0], "**The best tune_tau trial applied no co-teaching**"),
        ([0.0, 0.0, 0.25], "**The best tune_tau trial applied co-teaching late**"),
        ([0.0, 0.25, 0.25], None),
    ],
)
def test_report_says_when_the_best_tau_trial_dropped_nothing(tmp_path, shares, says):
    import json

    import torch

    from bldseg.report import write_report
    from bldseg.train.config import RunConfig

    def stage(name, flat, history):
        run = tmp_path / name / "run"
        run.mkdir(parents=True)
        torch.save({"config": RunConfig.from_flat(flat).to_flat()}, run / "best.pt")
        (run / "history.json").write_text(json.dumps(history))
        (tmp_path / name / "trials.csv").write_text(
            f"trial_id,run_dir,val_thr_best,val_dice_best\nt0,{run},0.5,0.7\n"
        )
        best = {"run_dir": str(run), "val_dice_best": 0.7, "val_thr_best": 0.5}
        return {
            "best": best,
            "best_config": {},
            "wall_s": 1,
            "overhead": 0.0,
            "path": str(tmp_path / name),
        }

    ct = {"coteach.enabled": True, "coteach.tau": 0.3, "coteach.t_k": 2, "batch_size": 4}
    rows = [{"epoch": e + 1, "dropped_share": d} for e, d in enumerate(shares)]
    stages = {
        "tune_sched": stage("tune_sched", {"epochs": 3}, [{"epoch": 1}]),
        "tune_tau": stage("tune_tau", {"epochs": 3, **ct}, rows),
    }
    config = {"name": "x", "data": None, "trials": 1, "epochs": 3, "cpus_per_trial": 1}
    config |= {"k_min": 1, "k_max": 2, "seed": 0, "base": {}}
    write_report({"config": config, "stages": stages}, tmp_path, has_truth=False)
    report = (tmp_path / "REPORT.md").read_text()
    section = report[report.index("## Plain BCE vs co-teaching") :]
    for marker in ("applied no co-teaching", "applied co-teaching late"):
        assert (marker in section) == (says is not None and marker in says)
    if says is None:
        return
    assert says in section
    until = "until epoch 3 of 3" if shares[-1] else "in its 3 epochs"
    assert f"t_k 2 and batch_size 4 dropped nothing {until}" in section
    # a row that trained two plain networks throughout is not called co-teaching
    assert ("two networks, nothing dropped (best tune_tau trial)" in section) == (not any(shares))


def test_a_test_column_the_ensemble_search_left_out_is_said_in_the_report(tmp_path):
    from bldseg.report import write_report

    config = {"name": "x", "data": None, "trials": 1, "epochs": 1, "cpus_per_trial": 1}
    config |= {"k_min": 1, "k_max": 2, "seed": 0, "base": {}}
    one = {"members": "a", "threshold": 0.5, "k": 1, "selection_dice": 0.7, "check_dice": 0.6}
    two = {**one, "members": "a+b", "k": 2}
    why = "runs/b/test_probs.npz is older than runs/b/best.pt (stale maps)"
    ens = {"best": two, "best_single": one, "gain": {}, "test_left_out": why}
    best = {"run_dir": str(tmp_path / "no-run"), "val_dice_best": 0.7, "val_thr_best": 0.5}
    stages = {"tune_aug": {"best": best, "best_config": {}, "wall_s": 1, "overhead": 0.0}}
    write_report({"config": config, "stages": stages, "ensemble": ens}, tmp_path, has_truth=False)
    report = (tmp_path / "REPORT.md").read_text()
    assert f"**No test column**: the models' test maps were left out: {why}." in report
    write_report(
        {"config": config, "stages": stages, "ensemble": {**ens, "test_left_out": None}},
        tmp_path,
        has_truth=False,
    )
    assert "No test column" not in (tmp_path / "REPORT.md").read_text()
