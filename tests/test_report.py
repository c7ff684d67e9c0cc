"""Per-tile scores and the seed-repeated arm comparison behind REPORT.md and compare_noisy."""

from pathlib import Path

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
    # ... but a saved model (best.pt) from that first epoch is two plain networks
    by_best = coteaching_dropped_nothing(cfg, early, best_epoch=1)
    assert by_best.startswith(f"{what} by its best epoch 1, the epoch its saved model is from")
    assert coteaching_dropped_nothing(cfg, early, best_epoch=2) is None
    # a resumed older run: rows without the record judged by the formula, the others as measured
    mixed = [old[0], *rows[1:3], {"epoch": 4, "dropped_share": 0.0}]
    assert coteaching_dropped_nothing(cfg, mixed) == f"{what} in its 4 epochs ({formula})"


CONFIG = {"name": "x", "data": None, "trials": 1, "epochs": 3, "cpus_per_trial": 1}
CONFIG |= {"k_min": 1, "k_max": 2, "seed": 0, "base": {}}


def _stage(root, name: str, flat: dict, history: list[dict], trials: list[dict] = ()) -> dict:
    """A finished search stage as the pipeline state records it: its best trial's best.pt
    holds ``flat`` and its history.json ``history``; ``trials``: more rows of trials.csv."""
    import json

    import pandas as pd
    import torch

    from bldseg.train.config import RunConfig

    run = root / name / "run"
    run.mkdir(parents=True, exist_ok=True)
    torch.save({"config": RunConfig.from_flat(flat).to_flat()}, run / "best.pt")
    (run / "history.json").write_text(json.dumps(history))
    best = {"run_dir": str(run), "val_dice_best": 0.7, "val_thr_best": 0.5}
    pd.DataFrame([{"trial_id": "t0", **best}, *trials]).to_csv(root / name / "trials.csv")
    return {"best": best, "best_config": {}, "wall_s": 1, "overhead": 0.0, "path": str(root / name)}


def _coteaching_section(root, tau_flat: dict, rows: list[dict], trials: list[dict] = ()) -> str:
    from bldseg.report import write_report

    stages = {
        "tune_sched": _stage(root, "tune_sched", {"epochs": 3}, [{"epoch": 1}]),
        "tune_tau": _stage(root, "tune_tau", {"epochs": 3, **tau_flat}, rows, trials),
    }
    write_report({"config": CONFIG, "stages": stages}, root, has_truth=False)
    report = (root / "REPORT.md").read_text()
    return report[report.index("## Plain BCE vs co-teaching") :]


@pytest.mark.parametrize(
    "shares, says",
    [
        ([0.0, 0.0, 0.0], "**The best tune_tau trial applied no co-teaching**"),
        ([0.0, 0.0, 0.25], "**The best tune_tau trial applied co-teaching late**"),
        ([0.0, 0.25, 0.25], None),
    ],
)
def test_report_says_when_the_best_tau_trial_dropped_nothing(tmp_path, shares, says):
    ct = {"coteach.enabled": True, "coteach.tau": 0.3, "coteach.t_k": 2, "batch_size": 4}
    # the last epoch is the best: its best.pt saw every epoch's dropping
    rows = [
        {"epoch": e + 1, "dropped_share": d, "val_dice_best": 0.5 + 0.1 * e}
        for e, d in enumerate(shares)
    ]
    section = _coteaching_section(tmp_path, ct, rows)
    for marker in ("applied no co-teaching", "applied co-teaching late"):
        assert (marker in section) == (says is not None and marker in says)
    if says is None:
        return
    assert says in section
    until = "until epoch 3 of 3" if shares[-1] else "in its 3 epochs"
    assert f"t_k 2 and batch_size 4 dropped nothing {until}" in section
    # a row that trained two plain networks throughout is not called co-teaching
    assert ("two networks, nothing dropped (best tune_tau trial)" in section) == (not any(shares))


@pytest.mark.parametrize("kfold", [False, True])
def test_a_tau_model_saved_before_its_run_dropped_anything_is_not_called_coteaching(
    tmp_path, kfold
):
    # The tau trial's model is its best.pt: here epoch 1, which keeps every pixel (R(0) = 1);
    # epochs 2 and 3 dropped pixels but scored lower. The row said "co-teaching" and the Δ
    # compared two plain networks without a word.
    import json

    ct = {"coteach.enabled": True, "coteach.tau": 0.2, "coteach.granularity": "pixel"}
    ct["coteach.t_k"] = 3
    rows = [
        {"epoch": 1, "dropped_share": 0.0, "val_dice_best": 0.70},
        {"epoch": 2, "dropped_share": 0.07, "val_dice_best": 0.60},
        {"epoch": 3, "dropped_share": 0.20, "val_dice_best": 0.55},
    ]
    if kfold:
        # a K-fold trial: the best epoch is the best of history.json's means over folds (as
        # bldseg.pipeline reads it); folds.json's out-of-fold scores name no epoch
        run = tmp_path / "tune_tau" / "run"
        run.mkdir(parents=True)
        oof = {"val_dice_best": 0.9, "val_thr_best": 0.45, "val_thr_widened": 0.0}
        (run / "folds.json").write_text(json.dumps({"status": "completed", "oof": oof}))
    section = _coteaching_section(tmp_path, ct, rows)
    name = "two networks, nothing dropped by its best epoch 1"
    assert f"| {name} (best tune_tau trial) |" in section
    assert f"| Δ {name} − plain (paired) |" in section
    assert "**The best tune_tau trial's saved model applied no co-teaching**" in section
    assert "dropped nothing by its best epoch 1" in section
    assert "it dropped from epoch 2 of 3 on" in section
    assert "| co-teaching (best tune_tau trial)" not in section

    # best.pt from epoch 3, after the dropping began: co-teaching, no caveat
    rows[2]["val_dice_best"] = 0.8
    section = _coteaching_section(tmp_path, ct, rows)
    assert "| co-teaching (best tune_tau trial) |" in section
    assert "applied no co-teaching" not in section and "by its best epoch" not in section


def test_report_says_the_coteaching_model_is_network_f_and_what_g_scored(tmp_path):
    # The table gave the tau trial's Dice without saying whose: f's, while g (validated beside
    # it every epoch) may have scored higher; a reader could take it for the better of the two.
    import json

    ct = {"coteach.enabled": True, "coteach.tau": 0.25, "coteach.t_k": 1, "batch_size": 4}
    rows = [
        {"epoch": 1, "dropped_share": 0.0, "val_dice_best": 0.60, "val_dice_best_peer": 0.61},
        {"epoch": 2, "dropped_share": 0.25, "val_dice_best": 0.70, "val_dice_best_peer": 0.74},
        {"epoch": 3, "dropped_share": 0.25, "val_dice_best": 0.65, "val_dice_best_peer": 0.72},
    ]
    section = _coteaching_section(tmp_path, ct, rows)
    table_end = section.index("| Δ co-teaching − plain (paired) |")
    line = (
        "co-teaching's model is its network f (never the better of f and g); g's best "
        "validation Dice: 0.7400 (epoch 2)"
    )
    assert line in section[table_end : section.index("![co-teaching]")]  # under the table

    # a K-fold trial's rows are means over its folds
    (tmp_path / "tune_tau" / "run" / "folds.json").write_text(json.dumps({"oof": {}}))
    assert "g's best validation Dice: 0.7400 (epoch 2, mean over its folds)" in (
        _coteaching_section(tmp_path, ct, rows)
    )
    (tmp_path / "tune_tau" / "run" / "folds.json").unlink()

    # a trial of an older bldseg kept the better network each epoch: not f throughout
    old = [{**r, "val_net": net} for r, net in zip(rows, "fgf", strict=True)]
    section = _coteaching_section(tmp_path, ct, old)
    assert "kept the better of its networks f and g each epoch (its epochs' models: f, g)" in (
        section
    )
    assert "co-teaching's model is its network f" not in section

    # no peer score recorded: said, not left out
    section = _coteaching_section(tmp_path, ct, [{k: r[k] for k in list(r)[:3]} for r in rows])
    assert "g's best validation Dice: not recorded" in section


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


def test_widened_trials_count_a_kfold_trial_by_its_out_of_fold_sweep(tmp_path):
    # A K-fold trial's history.json holds means over its folds (one fold's widened sweep makes
    # val_thr_widened 0.5); it predicts at its out-of-fold threshold (folds.json "oof"), whose
    # sweep decides, as bldseg.pipeline reads the trial.
    import json

    import pandas as pd

    from bldseg.report import _widened_trials

    def trial(stage: str, name: str, history: list[dict], oof: dict | None = None) -> str:
        run = tmp_path / stage / name
        run.mkdir(parents=True)
        if history:
            (run / "history.json").write_text(json.dumps(history))
        if oof is not None:
            oof = {"val_dice_best": 0.6, "val_thr_best": 0.5, **oof}
            (run / "folds.json").write_text(json.dumps({"status": "completed", "oof": oof}))
        return str(run)

    def stage(name: str, runs: list[str]) -> dict:
        pd.DataFrame({"run_dir": runs}).to_csv(tmp_path / name / "trials.csv", index=False)
        return {"path": str(tmp_path / name)}

    def epoch(e: int, dice: float, widened: float) -> dict:
        return {"epoch": e, "val_dice_best": dice, "val_thr_widened": widened}

    runs = [
        trial("a", "kfold", [epoch(1, 0.6, 0.5)], oof={"val_thr_widened": 0.0}),
        # a single run: its best epoch's sweep, not a later one's
        trial("a", "single", [epoch(1, 0.6, 0.0), epoch(2, 0.5, 1.0)]),
        trial("a", "failed", []),  # no epoch: not counted
    ]
    assert _widened_trials({"a": stage("a", runs)}) == (0, 2)
    runs = [trial("b", "kfold", [epoch(1, 0.6, 0.0)], oof={"val_thr_widened": 1.0})]
    assert _widened_trials({"b": stage("b", runs)}) == (1, 1)


def test_tau_plot_tells_tile_and_pixel_trials_apart(tmp_path, monkeypatch):
    # A tile tau (share of tiles dropped) and a pixel tau (share of pixels) were drawn as one
    # unmarked series: each granularity gets its own marker and legend entry.
    from pathlib import Path

    import bldseg.report as report

    drawn = {}
    real = report.save_figure

    def keep(fig, path, dpi=110):
        ax = fig.axes[-1]
        drawn[Path(path).name] = (
            {c.get_label(): c for c in ax.collections},
            [t.get_text() for t in ax.get_legend().get_texts()],
            ax.get_xlabel(),
        )
        return real(fig, path, dpi)

    monkeypatch.setattr(report, "save_figure", keep)
    ct = {"coteach.enabled": True, "coteach.tau": 0.2, "coteach.granularity": "pixel"}
    rows = [{"epoch": 1, "dropped_share": 0.0, "val_dice_best": 0.7}]
    trials = [
        {"trial_id": t, "run_dir": str(tmp_path / t), "val_dice_best": d, "val_thr_best": 0.5}
        for t, d in (("t1", 0.6), ("t2", 0.65))
    ]
    searched = [
        {**trials[0], "config/coteach.tau": 0.25, "config/coteach.granularity": "tile"},
        {**trials[1], "config/coteach.tau": 0.1, "config/coteach.granularity": "pixel"},
    ]
    _coteaching_section(tmp_path, ct, rows, searched)
    series, legend, xlabel = drawn["coteaching.png"]
    for split in ("validation", "held-out test"):
        assert {f"{split}, tile tau", f"{split}, pixel tau"} <= set(legend)
    tile, pixel = series["validation, tile tau"], series["validation, pixel tau"]
    assert tile.get_offsets()[:, 0].tolist() == [0.25]
    assert pixel.get_offsets()[:, 0].tolist() == [0.1]
    assert not np.array_equal(tile.get_paths()[0].vertices, pixel.get_paths()[0].vertices)
    # a search that fixed the granularity: the axis names it
    fixed = [{**t, "config/coteach.tau": tau} for t, tau in zip(trials, (0.25, 0.1), strict=True)]
    _coteaching_section(tmp_path / "fixed", ct, rows, fixed)
    series, legend, xlabel = drawn["coteaching.png"]
    assert legend == ["validation", "held-out test"]
    assert xlabel == "tau (forget rate, pixel granularity)"


def test_a_vote_ensemble_is_reported_by_its_votes(tmp_path):
    # The vote rule has no ensemble threshold (each member's mask at its own, then a count):
    # the ensemble search records none, and the report names the votes instead.
    from bldseg.report import write_report

    one = {"members": "a", "threshold": 0.45, "k": 1, "selection_dice": 0.7, "check_dice": 0.6}
    vote = {**one, "members": "a+b+c", "k": 3, "rule": "vote", "cut": 2, "votes": 2}
    vote["threshold"] = None
    decision = {"submit": "ensemble", "members": "a+b+c", "threshold": None, "votes": 2}
    decision |= {"rule": "the check half decides", "reason": "its gain lies above 0"}
    ens = {"best": vote, "best_single": one, "gain": {}, "decision": decision}
    pred = {"submission": "sub.csv", "members": 3, "threshold": None, "votes": 2}
    pred |= {"test_dice": 0.8, "test_interval": {}}
    best = {"run_dir": str(tmp_path / "no-run"), "val_dice_best": 0.7, "val_thr_best": 0.5}
    stages = {"tune_aug": {"best": best, "best_config": {}, "wall_s": 1, "overhead": 0.0}}
    state = {"config": CONFIG, "stages": stages, "ensemble": ens, "predict": pred}
    write_report(state, tmp_path, has_truth=False)
    report = (tmp_path / "REPORT.md").read_text()
    assert "| best ensemble | a+b+c | >= 2 of 3 votes |" in report
    assert "| best single | a | 0.4500 |" in report
    assert "**Submitted: the best ensemble** (a+b+c, >= 2 votes)." in report
    assert "`sub.csv`: 3 model(s), >= 2 votes; official score" in report
    # a state of older bldseg recorded votes / k as the vote row's threshold
    older = {k: v for k, v in vote.items() if k != "votes"} | {"threshold": 2 / 3}
    write_report(state | {"ensemble": ens | {"best": older}}, tmp_path, has_truth=False)
    assert "| best ensemble | a+b+c | >= 2 of 3 votes |" in (tmp_path / "REPORT.md").read_text()


def test_a_kfold_tau_trial_that_dropped_nothing_is_named(tmp_path):
    # A K-fold trial has no best.pt of its own (its folds' fold0/best.pt ...): the report read
    # no config for it and called a tau trial that dropped nothing "co-teaching", no caveat
    import json
    import shutil

    from bldseg.report import write_report
    from bldseg.train.config import RunConfig
    from bldseg.train.folds import fold_dir

    ct = {"coteach.enabled": True, "coteach.tau": 0.3, "coteach.t_k": 2, "batch_size": 4}
    rows = [{"epoch": e, "dropped_share": 0.0, "val_dice_best": 0.4 + 0.1 * e} for e in (1, 2, 3)]
    stages = {
        "tune_sched": _stage(tmp_path, "tune_sched", {"epochs": 3}, [{"epoch": 1}]),
        "tune_tau": _stage(tmp_path, "tune_tau", {"epochs": 3, **ct}, rows),
    }
    run = Path(stages["tune_tau"]["best"]["run_dir"])
    for f in range(2):
        fold_dir(run, f).mkdir(parents=True)
        shutil.copy(run / "best.pt", fold_dir(run, f) / "best.pt")
    (run / "best.pt").unlink()
    oof = {"val_dice_best": 0.7, "val_thr_best": 0.5, "val_thr_widened": 0.0}
    config = RunConfig.from_flat({"epochs": 3, "folds": 2, **ct}).to_flat()
    manifest = {"folds": 2, "config": config, "status": "completed", "oof": oof}
    (run / "folds.json").write_text(json.dumps(manifest))
    write_report({"config": CONFIG, "stages": stages}, tmp_path, has_truth=False)
    report = (tmp_path / "REPORT.md").read_text()
    section = report[report.index("## Plain BCE vs co-teaching") :]
    assert "**The best tune_tau trial applied no co-teaching**" in section
    assert "two networks, nothing dropped (best tune_tau trial)" in section


def test_thresholds_in_the_report_type_back_to_their_level(tmp_path):
    # 105/255 = 0.411765 was written "0.412" (3 decimals, rounded), which predict --threshold
    # reads as level 106: another mask than the trial's and the ensemble search's own
    from bldseg.report import write_report

    thr = 105 / 255
    one = {"members": "a", "threshold": thr, "k": 1, "selection_dice": 0.7, "check_dice": 0.6}
    decision = {"submit": "single", "members": "a", "threshold": thr}
    decision |= {"rule": "the check half decides", "reason": "no gain"}
    ens = {"best": one | {"members": "a+b", "k": 2}, "best_single": one, "gain": {}}
    best = {"run_dir": str(tmp_path / "no-run"), "val_dice_best": 0.7, "val_thr_best": thr}
    stages = {"tune_aug": {"best": best, "best_config": {}, "wall_s": 1, "overhead": 0.0}}
    state = {"config": CONFIG, "stages": stages, "ensemble": ens | {"decision": decision}}
    write_report(state, tmp_path, has_truth=False)
    report = (tmp_path / "REPORT.md").read_text()
    assert "| best single | a | 0.4117 |" in report
    stage_row = next(line for line in report.splitlines() if line.startswith("| tune_aug |"))
    assert "| 0.4117 |" in stage_row, stage_row
    assert "0.412 " not in report and "0.412|" not in report
