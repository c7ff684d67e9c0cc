"""The fixed run config an entry script builds: CPU defaults, the pretrained recipe, --set."""

import json
import logging
import os

import pytest

from bldseg.train.config import PRETRAINED_RECIPE, RunConfig
from bldseg.tune import cli
from bldseg.tune.cli import CPU_DEMO, build_parser, fixed_config


def test_pretrained_recipe_goes_under_the_users_values(tmp_path, capsys):
    ckpt = tmp_path / "upernet_internimage_t_512_160k_ade20k.pth"
    base = fixed_config(
        "data",
        "upernet_internimage_t",
        ["optim.lr=1e-4"],
        gpu=True,
        pretrained=str(ckpt),
        announce=True,
    )
    assert base["optim.lr"] == 1e-4  # the user's --set wins
    for k, v in PRETRAINED_RECIPE.items():
        if k != "optim.lr":
            assert base[k] == v, k
    assert base["pretrained"] == str(ckpt) and os.path.isabs(base["pretrained"])
    assert "official recipe" in capsys.readouterr().out
    RunConfig.from_flat(base)  # a valid config
    # --set pretrained=PATH is the same as --pretrained PATH
    same = fixed_config(
        "data", "upernet_internimage_t", ["optim.lr=1e-4", f"pretrained={ckpt}"], gpu=True
    )
    assert same == base


def test_cpu_defaults_without_pretrained():
    base = fixed_config("data", None, [], gpu=False)
    assert base == CPU_DEMO and "pretrained" not in base
    gpu = fixed_config("data", None, [], gpu=True)
    assert gpu == {"model": "upernet_internimage_t"}


def test_search_parser_takes_pretrained():
    args = build_parser("augmentation", "").parse_args(["--pretrained", "w.pth", "--trials", "2"])
    assert args.pretrained == "w.pth" and args.trials == 2


def test_cpu_crop_fits_small_images_unless_asked_for():
    # The CPU defaults' crop shrinks to small images; a crop given by --set is checked instead.
    assert fixed_config(None)["aug.crop_fit"] is True
    asked = fixed_config("data", sets=["aug.crop_size=160"], gpu=False)
    assert asked["aug.crop_size"] == 160 and asked["aug.crop_fit"] is False
    both = fixed_config("data", sets=["aug.crop_size=160", "aug.crop_fit=true"], gpu=False)
    assert both["aug.crop_fit"] is True


def test_the_announced_cpu_settings_are_the_ones_the_trials_get(capsys):
    # --set aug.crop_size turns crop_fit off; the line printed CPU_DEMO's crop_fit true
    base = fixed_config("data", sets=["aug.crop_size=32"], gpu=False, announce=True)
    line = capsys.readouterr().out
    kept = json.loads(line.split("small settings ", 1)[1].split("; pass", 1)[0])
    assert kept["aug.crop_fit"] is False and "aug.crop_size" not in kept
    assert all(base[k] == v for k, v in kept.items())


def test_cpu_demo_takes_bf16_only_where_the_cpu_has_it(tmp_path, monkeypatch):
    # The demo's precision follows the CPU flags: emulated bf16 is slower than float32, and an
    # unreadable /proc/cpuinfo (macOS) must not turn it on.
    from bldseg.train import engine
    from bldseg.tune.cli import demo_precision

    assert CPU_DEMO["precision"] == ("bf16" if engine.cpu_has_native_bf16() else "auto")
    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(engine, "CPUINFO", info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert demo_precision() == "bf16"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert demo_precision() == "auto"
    info.unlink()
    assert demo_precision() == "auto"
    # Whatever this machine chose, the demo settings are a valid run config with schedule-free
    # AdamW, so its trials report anytime models to ASHA.
    cfg = RunConfig.from_flat(CPU_DEMO)
    assert cfg.sched.name == "schedulefree" and cfg.precision in ("bf16", "auto")


def test_a_set_value_the_space_searches_is_named(
    small_world, tmp_path, monkeypatch, caplog, capsys
):
    # The scheduler space searches optim.lr and sched.name. The CPU defaults set both: no
    # warning. A --set optim.lr is overridden by every trial: named before the search starts
    # (which then stops here: --folds 4 of the tiny world's 3 scenes).
    monkeypatch.chdir(tmp_path)
    argv = ["--data", str(small_world.root), "--data-root", str(small_world.root.parent)]
    argv += ["--storage", str(tmp_path / "runs"), "--split-group", r"TRAIN_\d\d(\d)"]
    argv += ["--folds", "4", "--set", "batch_size=4"]
    with caplog.at_level(logging.WARNING, logger="bldseg.tune.runner"):
        assert cli.main("scheduler", "test", argv) == 2
        assert "searches" not in caplog.text
        assert cli.main("scheduler", "test", [*argv, "--set", "optim.lr=1e-3"]) == 2
    assert "--folds 4: the data has only 3 split group(s)" in capsys.readouterr().err
    (said,) = [r.getMessage() for r in caplog.records if "searches" in r.getMessage()]
    assert "the scheduler space searches optim.lr: each trial uses the space's value" in said
    assert "centred" not in said
    # fine-tuning: the space's LR range is centred on the given value, and says so
    caplog.clear()
    tuned = [*argv, "--pretrained", str(tmp_path / "w.pth"), "--set", "optim.lr=1e-4"]
    with caplog.at_level(logging.WARNING, logger="bldseg.tune.runner"):
        assert cli.main("scheduler", "test", tuned) == 2
    (said,) = [r.getMessage() for r in caplog.records if "searches" in r.getMessage()]
    assert said.endswith("(its range is centred on the given optim.lr)")


@pytest.mark.parametrize("key", ["epochs", "data", "folds"])
@pytest.mark.parametrize("command", ["tune", "pipeline"])
def test_a_set_of_what_a_search_flag_sets_is_refused(key, command, capsys):
    # --set epochs=3 was overridden by --epochs' default for every trial, without a word;
    # --set folds=2 --folds 3 trained 3 folds
    if command == "tune":
        from bldseg.tune.cli import main

        def run(argv):
            return main("augmentation", "augmentation search", argv)

    else:
        from bldseg.commands.pipeline import main as run
    with pytest.raises(SystemExit) as e:
        run(["--set", f"{key}=3"])
    flag = {"epochs": "--epochs", "data": "--data", "folds": "--folds"}[key]
    assert e.value.code == 2 and f"a search sets {key} with {flag}" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["tune", "pipeline"])
def test_a_set_fold_is_refused_in_searches(command, capsys):
    # --set fold=1 --folds 2 trained every fold of every trial, fold 1 unused, without a word
    from bldseg.commands.pipeline import main as pipeline_main

    run = pipeline_main if command == "pipeline" else lambda a: cli.main("augmentation", "t", a)
    with pytest.raises(SystemExit) as e:
        run(["--set", "fold=1", "--folds", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "--set fold=...: a search trains every fold of --folds K in each trial" in err, err
    assert "--fold F trains one" in err


def test_run_search_refuses_a_fold(small_world, tmp_path):
    from bldseg.tune.runner import run_search
    from tests.tune.test_runner import BASE, spec_for

    spec = spec_for(small_world, tmp_path, base={**BASE, "folds": 2, "fold": 1})
    with pytest.raises(ValueError, match="fold=1: a search trains every fold of --folds K"):
        run_search(spec)
    assert not (tmp_path / "runs").exists()


def test_searches_without_gpus_per_trial_take_the_cpu_defaults_where_a_gpu_is_visible(
    monkeypatch, tmp_path
):
    # --gpus-per-trial 0 (the default) gives each trial no GPU: the T model's GPU settings
    # must not be chosen because the machine that starts the search has one.
    import torch

    from bldseg.commands import pipeline as pipeline_cmd
    from bldseg.tune import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    data = str(tmp_path)
    assert fixed_config(data, gpu=False)["model"] == CPU_DEMO["model"]
    assert fixed_config(data)["model"] == "upernet_internimage_t"  # gpu=None: the machine's
    seen = []

    def record(*a, **k):
        seen.append(k["gpu"])
        raise SystemExit(0)

    for module in (cli, pipeline_cmd):
        monkeypatch.setattr(module, "fixed_config", record)
    with pytest.raises(SystemExit):
        cli.main("augmentation", "", ["--data", data])
    with pytest.raises(SystemExit):
        pipeline_cmd.main(["--data", data])
    assert seen == [False, False]


def _earlier_search(folder, base, rows, spec=None, sessions=None):
    # what a finished search leaves: its record (with the base it ran with) and trials.csv;
    # rows None: one interrupted before it finished, which has no trials.csv yet
    import pandas as pd

    from bldseg.tune.runner import META_FILE

    folder.mkdir(parents=True)
    record = {"base": base, "spec": {"trials": len(rows or [1]), **(spec or {})}}
    if sessions is not None:
        record["sessions"] = sessions
    (folder / META_FILE).write_text(json.dumps(record))
    if rows is not None:
        pd.DataFrame(rows).to_csv(folder / "trials.csv", index=False)


def test_from_starts_a_search_from_an_earlier_searchs_best_configuration(
    tmp_path, monkeypatch, capsys
):
    # Run one by one, tune_sched trained on the default augmentation, not tune_aug's best: --from
    # carries that search's settings and best searched values, under this command's --set.
    storage = tmp_path / "runs"
    earlier = {**CPU_DEMO, "aug.crop_size": 32, "aug.crop_fit": False, "folds": 3}
    rows = [
        {"trial_id": t, "val_dice_best": d, "status": s, "config/aug.vflip_p": p}
        for t, d, s, p in (
            ("a", 0.61, "completed", 0.1),
            ("b", 0.70, "error", 0.2),
            ("c", 0.65, "early-stopped", 0.3),
        )
    ]
    _earlier_search(storage / "aug1", earlier, rows)
    seen = []

    def record(spec):
        seen.append(spec)
        raise ValueError("stop here")

    monkeypatch.setattr(cli, "run_search", record)
    argv = ["--storage", str(storage), "--from", "aug1", "--set", "batch_size=2"]
    assert cli.main("scheduler", "t", argv) == 2
    (spec,) = seen
    assert spec.base == {
        **CPU_DEMO,
        "aug.crop_size": 32,
        "aug.crop_fit": False,
        "aug.vflip_p": 0.3,  # the best trial that finished, not the errored one above it
        "batch_size": 2,  # this command's --set wins
    }  # "folds" is this command's flag (--folds), not inherited
    assert spec.parent_tags == {"bldseg.started_from": "aug1"}
    out = capsys.readouterr().out
    assert "best trial c (val_dice_best 0.6500)" in out and "CPU demo's small settings" not in out
    # a folder path works too; a crop asked for now is checked, not shrunk
    argv = ["--from", str(storage / "aug1"), "--set", "aug.crop_size=48", "--model", "m"]
    assert cli.main("scheduler", "t", argv) == 2
    assert seen[1].base["aug.crop_size"] == 48 and seen[1].base["model"] == "m"
    assert seen[1].base["aug.crop_fit"] is False


def test_from_refuses_what_it_cannot_start_from(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "run_search", lambda spec: pytest.fail("the search started"))
    storage = tmp_path / "runs"
    _earlier_search(
        storage / "failed",
        CPU_DEMO,
        [{"trial_id": "a", "val_dice_best": float("nan"), "status": "error"}],
    )
    for argv, says in (
        (["--from", "nowhere"], "is not a finished or interrupted search's results folder"),
        (["--from", "nowhere"], "it has no bldseg_search.json"),
        (["--from", "failed"], "--from failed: no trial of that search completed"),
        (["--from", "failed", "--pretrained", "w.pth"], "--from and --pretrained"),
    ):
        with pytest.raises(SystemExit) as e:
            cli.main("scheduler", "t", ["--storage", str(storage), *argv])
        assert e.value.code == 2 and says in capsys.readouterr().err


def _stop_at_run_search(monkeypatch) -> list:
    """Replaces the search by a recorder of its spec (the CLI then exits 2)."""
    seen = []

    def record(spec):
        seen.append(spec)
        raise ValueError("stop here")

    monkeypatch.setattr(cli, "run_search", record)
    return seen


#: A finished search on a user's folder, cut into 256-px tiles, read as its record keeps it.
_ON_TILES = {
    "data": "tiles",
    "data_options": {"tile_size": 256, "read": {"mask_threshold": 0.6, "stretch": [1, 99]}},
    "data_root": "/caches",
}


@pytest.fixture
def search_on_tiles(tmp_path):
    storage = tmp_path / "runs"
    data = str(tmp_path / "tiles")
    rows = [{"trial_id": "a", "val_dice_best": 0.6, "status": "completed"}]
    _earlier_search(storage / "aug1", {**CPU_DEMO, "data": data}, rows, _ON_TILES)
    return storage, data


def test_from_trains_on_the_earlier_searchs_data(search_on_tiles, monkeypatch, capsys):
    # `tune sched --from aug` without --data trained on the built-in synthetic world, with the
    # best values that search had found on the user's tiles
    storage, data = search_on_tiles
    seen = _stop_at_run_search(monkeypatch)
    assert cli.main("scheduler", "t", ["--storage", str(storage), "--from", "aug1"]) == 2
    (spec,) = seen
    assert spec.data == data and "data" not in spec.base
    assert spec.data_options.tile_size == 256 and spec.data_root == "/caches"
    assert spec.data_options.read.mask_threshold == 0.6
    assert spec.data_options.read.stretch == (1, 99)
    out, err = capsys.readouterr()
    assert (
        f"--from aug1: training on that search's data, {data} (tile_size=256, "
        "mask_threshold=0.6, stretch=(1, 99)) (--data-root /caches); give --data" in out
    )
    assert "warning" not in err


def test_a_data_flag_given_with_from_replaces_the_recorded_one(
    search_on_tiles, monkeypatch, capsys
):
    storage, data = search_on_tiles
    seen = _stop_at_run_search(monkeypatch)
    # --mask-threshold 0.5 is its default: given, it is still this command's value
    argv = ["--storage", str(storage), "--from", "aug1", "--tile-size", "128"]
    argv += ["--mask-threshold", "0.5", "--data-root", "here"]
    assert cli.main("scheduler", "t", argv) == 2
    (spec,) = seen
    assert spec.data == data and spec.data_root == "here"
    assert spec.data_options.tile_size == 128 and spec.data_options.read.mask_threshold == 0.5
    assert spec.data_options.read.stretch == (1, 99)  # not given: carried
    err = capsys.readouterr().err
    assert "--tile-size 128 replaces the --tile-size 256 that search read its data with" in err
    assert "--mask-threshold 0.5 replaces the --mask-threshold 0.6" in err
    assert "--stretch" not in err
    # a flag replaces its whole group, as suspects and predict read a record: --mask-values
    # over a recorded --mask-nonzero (it was refused as both given)
    storage2 = storage.parent / "runs2"
    _earlier_search(
        storage2 / "nz",
        {**CPU_DEMO, "data": str(storage.parent / "folders")},  # a folder layout reads them
        [{"trial_id": "a", "val_dice_best": 0.6, "status": "completed"}],
        {"data_options": {"read": {"mask_nonzero": True}}},
    )
    argv = ["--storage", str(storage2), "--from", "nz", "--mask-values", "1"]
    assert cli.main("scheduler", "t", argv) == 2
    assert seen[1].data_options.read.mask_values == (1,)
    assert seen[1].data_options.read.mask_nonzero is False
    assert "--mask-values 1 replaces the --mask-nonzero that search" in capsys.readouterr().err


def test_data_given_with_from_wins_and_says_the_best_values_came_from_other_data(
    search_on_tiles, tmp_path, monkeypatch, capsys
):
    storage, data = search_on_tiles
    seen = _stop_at_run_search(monkeypatch)
    monkeypatch.chdir(tmp_path)
    argv = ["--storage", str(storage), "--from", "aug1", "--data", "other"]
    assert cli.main("scheduler", "t", argv) == 2
    assert seen[0].data == "other" and seen[0].data_options.tile_size is None
    assert seen[0].data_root == "data"  # this command's (default) data root
    err = capsys.readouterr().err
    assert (
        f"warning: --from aug1: its best values were found on {data} (tile_size=256, "
        f"mask_threshold=0.6, stretch=(1, 99)); this search trains on {tmp_path / 'other'}"
    ) in err
    # the same data with the same flags: nothing to warn about
    argv = ["--storage", str(storage), "--from", "aug1", "--data", data, "--tile-size", "256"]
    argv += ["--mask-threshold", "0.6", "--stretch", "1", "99"]
    assert cli.main("scheduler", "t", argv) == 2
    assert seen[1].data == data and "warning" not in capsys.readouterr().err
    # the same data with one flag otherwise, or other data with the same flags: warned
    same_flags = ["--tile-size", "256", "--mask-threshold", "0.6", "--stretch", "1", "99"]
    for argv in (
        ["--data", data, "--tile-size", "128", "--mask-threshold", "0.6", "--stretch", "1", "99"],
        ["--data", "other", *same_flags],
    ):
        assert cli.main("scheduler", "t", ["--storage", str(storage), "--from", "aug1", *argv]) == 2
        assert "warning: --from aug1: its best values were found on" in capsys.readouterr().err


def test_folders_typed_relative_with_from_compare_with_the_recorded_absolute_ones(
    tmp_path, monkeypatch, capsys
):
    # a search on --images/--masks records them absolute: the same folders typed relative
    # from their parent warned that the best values were found on other data
    storage = tmp_path / "runs"
    (tmp_path / "imgs").mkdir()
    (tmp_path / "msks").mkdir()
    folders = {"images": str(tmp_path / "imgs"), "masks": str(tmp_path / "msks")}
    rows = [{"trial_id": "a", "val_dice_best": 0.6, "status": "completed"}]
    _earlier_search(storage / "aug1", CPU_DEMO, rows, {"data_options": folders})
    seen = _stop_at_run_search(monkeypatch)
    monkeypatch.chdir(tmp_path)
    argv = ["--storage", str(storage), "--from", "aug1", "--images", "imgs", "--masks", "msks"]
    assert cli.main("scheduler", "t", argv) == 2
    assert len(seen) == 1 and "warning" not in capsys.readouterr().err


def test_from_an_interrupted_search_says_how_to_finish_it(tmp_path, monkeypatch, capsys):
    # trials.csv is written when a search finishes: --from an interrupted one said the folder
    # was not "a finished or interrupted search's results folder"
    monkeypatch.setattr(cli, "run_search", lambda spec: pytest.fail("the search started"))
    storage = tmp_path / "my runs"
    sessions = [{"wall_s": 3.0, "end": "interrupted"}]
    _earlier_search(storage / "aug1", CPU_DEMO, None, {"space": "augmentation"}, sessions)
    _earlier_search(storage / "mine", CPU_DEMO, None, {"space": "custom"}, [])
    for argv, says in (
        (
            ["--storage", str(storage), "--from", "aug1"],
            f"--from aug1: the search aug1 was interrupted (Ctrl-C): it has no trial table "
            f"({storage / 'aug1' / 'trials.csv'}) yet, so no best trial; continue it with "
            f"`bldseg tune aug --resume --name aug1 --storage '{storage}'`, then run this "
            "command again",
        ),
        (
            ["--from", str(storage / "mine")],
            "the search mine has not finished (it is still running, or was killed): it has no",
        ),
        (
            ["--from", str(storage / "mine")],
            f"`bldseg tune aug --space custom --resume --name mine --storage '{storage}'`",
        ),
    ):
        with pytest.raises(SystemExit) as e:
            cli.main("scheduler", "t", argv)
        err = " ".join(capsys.readouterr().err.split())  # argparse wraps no lines; be sure
        assert e.value.code == 2 and " ".join(says.split()) in err, err


@pytest.mark.parametrize("command", ["tune", "pipeline"])
def test_a_set_of_a_whole_config_section_is_refused(command, capsys):
    # --set aug=0.5 failed with "'float' object does not support item assignment"
    from bldseg.commands.pipeline import main as pipeline_main

    run = pipeline_main if command == "pipeline" else lambda a: cli.main("augmentation", "t", a)
    with pytest.raises(SystemExit) as e:
        run(["--set", "aug=0.5"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "--set aug=...: 'aug' is a section of the run config, not a value" in err
    assert "aug.crop_size, aug.crop_fit," in err and "aug.hflip_p" in err


def test_run_search_refuses_a_fixed_config_section(small_world, tmp_path):
    from bldseg.tune.runner import run_search
    from tests.tune.test_runner import BASE, spec_for

    spec = spec_for(small_world, tmp_path, base={**BASE, "optim": 0.1})
    with pytest.raises(ValueError, match=r"--set optim=...\): 'optim' is a section.*optim\.lr"):
        run_search(spec)
    assert not (tmp_path / "runs").exists()


_ROWS = [{"trial_id": "a", "val_dice_best": 0.6, "status": "completed"}]


def test_from_takes_relative_recorded_folders_only_from_where_they_are(
    tmp_path, monkeypatch, capsys
):
    # Older searches recorded --images/--masks (and before 2026-12-06 --data) as typed: run
    # from another folder, --from read <that folder>/imgs, missing or other data, silently.
    storage = tmp_path / "runs"
    options = {"data_options": {"images": "imgs", "masks": "msk"}}
    _earlier_search(storage / "old", CPU_DEMO, _ROWS, options)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    seen = _stop_at_run_search(monkeypatch)
    with pytest.raises(SystemExit) as e:
        cli.main("scheduler", "t", ["--storage", str(storage), "--from", "old"])
    assert e.value.code == 2 and not seen
    err = capsys.readouterr().err
    assert "recorded --images as the relative path 'imgs'" in err
    assert f"{elsewhere / 'imgs'} does not exist" in err
    # where the search ran (its folders there): taken, made absolute
    (elsewhere / "imgs").mkdir()
    (elsewhere / "msk").mkdir()
    assert cli.main("scheduler", "t", ["--storage", str(storage), "--from", "old"]) == 2
    (spec,) = seen
    assert spec.data_options.images == str(elsewhere / "imgs")
    assert spec.data_options.masks == str(elsewhere / "msk")


def test_from_leaves_out_a_recorded_flag_its_data_never_read(tmp_path, monkeypatch, capsys):
    # A search started with --tile-size on the synthetic world (before such flags were refused)
    # recorded it; --from carried it raw and was refused ("--tile-size: ... Leave it out"),
    # although nobody had typed it here and no flag could unset it.
    storage = tmp_path / "runs"
    _earlier_search(storage / "aug1", CPU_DEMO, _ROWS, {"data_options": {"tile_size": 256}})
    seen = _stop_at_run_search(monkeypatch)
    with pytest.warns(UserWarning, match="--tile-size, which --data's kind .synthetic."):
        assert cli.main("scheduler", "t", ["--storage", str(storage), "--from", "aug1"]) == 2
    (spec,) = seen
    assert spec.data is None and spec.data_options.tile_size is None


def test_a_resume_started_from_an_earlier_search_says_nothing_of_its_data(
    search_on_tiles, monkeypatch, capsys
):
    # `--from aug1 --resume`: the resume goes on with the data this search recorded, yet the
    # command announced training on aug1's data (and the resume then warned of values
    # nobody typed)
    storage, _ = search_on_tiles
    seen = _stop_at_run_search(monkeypatch)
    argv = ["--storage", str(storage), "--from", "aug1", "--resume", "--name", "sched1"]
    assert cli.main("scheduler", "t", argv) == 2
    (spec,) = seen
    assert spec.data is None and spec.data_options.tile_size is None  # this command's own
    assert "training on that search's data" not in capsys.readouterr().out
