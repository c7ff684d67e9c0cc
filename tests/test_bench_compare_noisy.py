"""experiments/compare_noisy.py: its run folders belong to one world and one config; its arms
differ in the co-teaching flags only."""

import sys
from pathlib import Path

import pytest

from bldseg.data.prepare import prepare_data
from bldseg.train import RunConfig
from bldseg.tune.cli import fixed_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import compare_noisy  # noqa: E402

SMALL = {"n_train": 6, "train_size": 64, "n_test": 4, "test_size": 32, "test_scene_size": 64}


def test_another_world_gets_its_own_run_folders(tmp_path):
    # two --data-root worlds: clean masks, and 60% noisy ones from another seed
    a = prepare_data(None, data_root=tmp_path / "a", synthetic={**SMALL, "noise_fraction": 0.0})
    b = prepare_data(
        None, data_root=tmp_path / "b", synthetic={**SMALL, "noise_fraction": 0.6, "seed": 2}
    )
    assert a.train.fingerprint != b.train.fingerprint
    flat = RunConfig.from_flat({**fixed_config(None, sets=["epochs=1"]), "seed": 0}).to_flat()
    out = tmp_path / "runs"
    in_a = compare_noisy.run_folder(out, "bce", flat, a.train.fingerprint)
    # the first world's folder is not the second's: fit() would have resumed, or (finished)
    # reused, world a's model for world b
    assert compare_noisy.run_folder(out, "bce", flat, b.train.fingerprint) != in_a
    # the same world and config find their run again (a re-run continues it) ...
    assert compare_noisy.run_folder(out, "bce", dict(flat), a.train.fingerprint) == in_a
    assert in_a.parent == out / "bce" and in_a.name.startswith("seed0-")
    # ... and another config (here a seed) has its own
    other = compare_noisy.run_folder(out, "bce", {**flat, "seed": 1}, a.train.fingerprint)
    assert other != in_a and other.name.startswith("seed1-")


@pytest.mark.parametrize(
    "item",
    ["coteach.enabled=true", "coteach.tau=0.2", "coteach.t_k=2", "coteach.granularity=pixel"],
)
def test_coteach_set_is_refused_naming_the_flags(item, capsys):
    # --set goes to both arms: coteach.enabled=true made the plain BCE arm co-teaching, and the
    # co-teaching arm's tau and t_k went over a --set of them, both silently
    with pytest.raises(SystemExit) as e:
        compare_noisy.parse_args(["--set", "epochs=4", "--set", item])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--set {item}: the co-teaching arm's settings are --tau, --t-k and --granularity" in err


def test_arms_take_the_coteaching_flags_and_print_them():
    args = compare_noisy.parse_args(["--tau", "0.25", "--t-k", "2", "--set", "epochs=8"])
    base = fixed_config(None, sets=args.set)
    arms = compare_noisy.build_arms(base, args.tau, args.t_k, args.granularity)
    plain, cot = (RunConfig.from_flat(arms[a]) for a in ("bce", "coteaching"))
    assert not plain.coteach.enabled and plain.epochs == cot.epochs == 8
    assert (cot.coteach.enabled, cot.coteach.tau, cot.coteach.t_k) == (True, 0.25, 2)
    assert compare_noisy.arm_header("bce", arms["bce"]).startswith("== arm bce: no co-teaching")
    assert compare_noisy.arm_header("coteaching", arms["coteaching"]).startswith(
        "== arm coteaching: co-teaching tau=0.25 t_k=2 granularity=tile (batch_size 4, 8 epochs"
    )
    # without --t-k: a quarter of the epochs
    default = compare_noisy.build_arms(base, 0.3, None, "pixel")["coteaching"]
    assert (default["coteach.t_k"], default["coteach.granularity"]) == (2, "pixel")
    # ... at tile granularity no longer than drops a tile of each batch of 4 from epoch 2:
    # floor(4 * 0.3 * 1 / t_k) >= 1 only for t_k = 1 (t_k 2 dropped nothing until epoch 3)
    tile = compare_noisy.build_arms(base, 0.3, None, "tile")["coteaching"]
    assert tile["coteach.t_k"] == 1
    long = fixed_config(None, sets=["epochs=40", "batch_size=16"])
    assert compare_noisy.build_arms(long, 0.3, None, "tile")["coteaching"]["coteach.t_k"] == 4
    with pytest.raises(SystemExit):
        compare_noisy.parse_args(["--t-k", "0"])


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        # pixel granularity built no config of the co-teaching arm before its header: the whole
        # plain arm trained first, then a traceback (status 1)
        (["--granularity", "pixel", "--tau", "1.5"], "--tau: arm coteaching: run config: "),
        (["--tau", "-0.1"], "--tau: arm coteaching: run config: coteach.tau=-0.1 must be in"),
        (["--set", "optim.lr=2"], "--set optim.lr=2: arm bce: run config: optim.lr=2"),
        (["--seeds", "-1", "0", "1"], "--seeds: arm bce: run config: seed=-1"),
        # tile selection at batch 4 drops floor(4 * 0.2) = 0 tiles: two plain networks, which
        # were titled "co-teaching tau=0.2" and printed as "co-teaching - bce (paired)"
        (
            ["--tau", "0.2"],
            "--tau: arm coteaching: run config: coteach.tau=0.2 with tile granularity and "
            "batch_size 4 drops floor(4 * 0.2) = 0 tiles per batch in every epoch: the arm would "
            "be two plain networks, not co-teaching; use --granularity pixel, a batch of at least "
            "5 tiles (--set batch_size=N) or --tau 0.25 or more",
        ),
        (["--granularity", "pixel", "--tau", "0"], "--tau: arm coteaching: run config: coteach."),
        # a ramp longer than the run: its first drop would come after the last epoch
        (
            ["--tau", "0.25", "--t-k", "12", "--set", "epochs=8"],
            "--t-k: arm coteaching: run config: coteach.t_k=12 with tau 0.25 drops its first "
            "tile in epoch 13, after the run's 8 epochs",
        ),
    ],
)
def test_a_refused_run_config_stops_before_the_data_or_any_training(
    argv, says, tmp_path, monkeypatch, capsys
):
    def no_data(*args, **kwargs):
        raise AssertionError("the data was prepared before the run configs were checked")

    monkeypatch.setattr(compare_noisy, "prepare_data", no_data)
    monkeypatch.setattr(compare_noisy, "fit", no_data)
    with pytest.raises(SystemExit) as e:
        compare_noisy.main([*argv, "--out", str(tmp_path / "runs")])
    assert e.value.code == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_the_checked_configs_are_the_ones_that_run():
    args = compare_noisy.parse_args(["--granularity", "pixel", "--tau", "0.2", "--set", "epochs=8"])
    assert args.base["epochs"] == 8 and args.base["samples_per_epoch"] == 384
    assert args.arms == compare_noisy.build_arms(args.base, 0.2, None, "pixel")


@pytest.mark.parametrize(
    "argv",
    [
        ["--granularity", "pixel", "--tau", "0.2"],  # pixels have no floor
        ["--tau", "0.2", "--set", "batch_size=5"],  # floor(5 * 0.2) = 1 tile
        ["--tau", "0.25", "--t-k", "7", "--set", "epochs=8"],  # first drop in epoch 8 of 8
    ],
)
def test_a_coteaching_arm_that_drops_is_accepted(argv):
    args = compare_noisy.parse_args(argv)
    assert args.arms["coteaching"]["coteach.enabled"]


def test_each_run_records_whether_it_dropped_anything_by_its_best_epoch():
    cot = RunConfig.from_flat(
        {
            **fixed_config(None, sets=["epochs=3"]),
            "coteach.enabled": True,
            "coteach.tau": 0.25,
            "coteach.t_k": 2,
        }
    )
    rows = [
        {"epoch": 1, "dropped_share": 0.0, "val_dice_best": 0.7},
        {"epoch": 2, "dropped_share": 0.0, "val_dice_best": 0.6},
        {"epoch": 3, "dropped_share": 0.25, "val_dice_best": 0.65},
    ]
    # the model is from epoch 1: nothing dropped by then, whatever epoch 3 did
    early = compare_noisy.dropping_record(cot, rows, best_epoch=1)
    assert early["dropped_by_best_epoch"] is False
    assert "dropped nothing by its best epoch 1" in early["dropped_nothing"]
    late = compare_noisy.dropping_record(cot, rows, best_epoch=3)
    assert late["dropped_by_best_epoch"] is True
    plain = RunConfig.from_flat(fixed_config(None, sets=["epochs=3"]))
    assert compare_noisy.dropping_record(plain, [{"epoch": 1}], 1) == {
        "dropped_by_best_epoch": None,
        "dropped_nothing": None,
    }
