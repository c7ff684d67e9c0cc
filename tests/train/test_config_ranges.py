"""Run-config values that would train silently wrong: the cosine restarts' layout over a run,
out-of-range optimizer and loop values, and the train command's fold flags."""

import math
import re
import warnings

import pytest
import torch

from bldseg.commands import train as train_cmd
from bldseg.metrics import threshold_text
from bldseg.train.config import RunConfig, recipe_defaults
from bldseg.train.engine import load_state
from bldseg.train.schedulers import build_scheduler
from bldseg.tune.cli import CPU_DEMO

PEAK, FLOOR = 1e-2, 1e-6


def _cosine_lrs(total: int, **sched) -> list[float]:
    """The LR of each of a run's ``total`` steps, built as fit builds its scheduler."""
    flat = {f"sched.{k}": v for k, v in sched.items()}
    cfg = RunConfig.from_flat({"sched.name": "cosine_restarts", "optim.lr": PEAK, **flat})
    cfg = cfg.with_updates({"sched.min_lr": FLOOR})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    s = build_scheduler("cosine_restarts", opt, total, **cfg.sched.scheduler_kwargs(total))
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    return lrs


def _restarts(lrs: list[float]) -> list[int]:
    """Steps where the LR turns from falling (or resting at the floor) to rising: a restart,
    either the jump to the peak (no warm-up) or the first step of a warm-up."""
    return [i for i in range(2, len(lrs)) if lrs[i] > lrs[i - 1] <= lrs[i - 2]]


@pytest.mark.parametrize(
    "total, cycles, warmup_frac, cycle_mult, gamma",
    [
        (640, 3, 0.0, 1.0, 1.0),  # the reported run: its last step went back to the peak
        (643, 4, 0.1, 1.0, 1.0),  # used to end 3 steps into a fifth cycle's warm-up
        (1280, 3, 0.3, 1.0, 0.5),
        (999, 4, 0.3, 1.0, 1.0),
        (1000, 4, 0.1, 2.0, 0.5),  # growing cycles: the run used to end early in the third
        (700, 3, 0.05, 1.5, 1.0),
        (500, 2, 0.0, 1.0, 1.0),
        (300, 1, 0.05, 1.0, 1.0),
    ],
)
def test_cosine_restarts_end_at_the_end_of_the_last_cycle(
    total, cycles, warmup_frac, cycle_mult, gamma
):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # these runs hold their cycles: nothing to warn about
        lrs = _cosine_lrs(
            total, cycles=cycles, warmup_frac=warmup_frac, cycle_mult=cycle_mult, gamma=gamma
        )
    restarts = _restarts(lrs)
    assert len(restarts) == cycles - 1, restarts
    last_cycle = lrs[restarts[-1] :] if restarts else lrs
    top = max(last_cycle)
    after_peak = last_cycle[last_cycle.index(top) :]
    # the run ends on the lowest LR of its last cycle's decay, near that cycle's floor
    assert lrs[-1] == min(after_peak)
    assert lrs[-1] - FLOOR <= 0.01 * (top - FLOOR), (lrs[-1], top)
    assert top == pytest.approx(PEAK * gamma ** (cycles - 1))


@pytest.mark.parametrize("total, cycles, held", [(10, 3, 2), (6, 4, 1), (2, 3, 1)])
def test_cosine_restarts_in_a_run_too_short_for_its_cycles(total, cycles, held):
    with pytest.warns(UserWarning, match=rf"sched.cycles={cycles}: .* running {held}"):
        lrs = _cosine_lrs(total, cycles=cycles, warmup_frac=0.0)
    assert len(_restarts(lrs)) == held - 1
    last_cycle = lrs[_restarts(lrs)[-1] :] if held > 1 else lrs
    assert lrs[-1] == min(last_cycle) < max(last_cycle)  # still decaying at the end


@pytest.mark.parametrize(
    "key, value",
    [
        ("optim.weight_decay", -0.5),
        ("optim.weight_decay", math.nan),
        ("optim.weight_decay", math.inf),
        ("optim.beta1", 1.5),
        ("optim.beta1", -0.1),
        ("optim.beta2", 1.0),
        ("optim.beta2", math.nan),
        ("optim.grad_clip", -1.0),
        ("val_tile", -8),
        ("val_tile", 4),
        ("samples_per_epoch", -5),
        ("num_workers", -1),
        ("seed", -1),
        ("split_seed", -2),
        ("batch_size", 1),  # UPerNet's pyramid pooling: BatchNorm on 1x1 maps of one image
    ],
)
def test_out_of_range_values_are_refused_by_name(key, value):
    with pytest.raises(ValueError, match=rf"^run config: {re.escape(key)}="):
        RunConfig.from_flat({key: value})


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize(
    "key",
    [
        "sched.cycle_mult",  # inf passed ">= 1": OverflowError in the cycles' lengths
        "sched.power",
        "sched.div_factor",
        "sched.final_div_factor",
        "sched.min_lr",
        "aux_weight",
        "optim.grad_clip",
    ],
)
def test_non_finite_floats_are_refused_by_name(key, value):
    with pytest.raises(
        ValueError, match=rf"^run config: {re.escape(key)}={value!r} must be a finite number"
    ):
        RunConfig.from_flat({"sched.name": "cosine_restarts", "sched.cycles": 2, key: value})


def test_schedule_free_refuses_beta1_zero_naming_it():
    # its validated and saved weights are y + (1 - 1/beta1) (z - y): the CPU demo's run with
    # optim.beta1=0 trained its first epoch and died at validation with ZeroDivisionError
    with pytest.raises(
        ValueError,
        match=r"^run config: optim\.beta1=0\.0 must be > 0 with sched\.name=schedulefree.*"
        r"set optim\.beta1 in \(0, 1\)",
    ):
        RunConfig.from_flat({**CPU_DEMO, "optim.beta1": 0.0})
    # AdamW under a schedule takes beta1=0 (no momentum), and schedule-free any beta1 > 0
    assert RunConfig.from_flat({"sched.cycle_momentum": False, "optim.beta1": 0.0}).optim.beta1 == 0
    assert RunConfig.from_flat({**CPU_DEMO, "optim.beta1": 0.01}).optim.beta1 == 0.01


@pytest.mark.parametrize(
    "lr, min_lr, power, warmup, total",
    [
        (3e-3, 1e-3, 2.0, 2, 9),  # the report: the warning said 0.60x, the LR peaked at 0.737x
        (1e-3, 5e-4, 1.0, 30, 100),
        (6e-5, 0.0, 1.0, 1500, 2000),  # no floor: the numbers were right
        (1e-2, 1e-6, 0.9, 80, 120),
    ],
)
def test_poly_warm_up_warning_states_the_schedulers_peak(lr, min_lr, power, warmup, total):
    cfg = RunConfig.from_flat(
        {
            "sched.name": "poly",
            "optim.lr": lr,
            "sched.min_lr": min_lr,
            "sched.power": power,
            "sched.warmup_steps": warmup,
        }
    )
    with pytest.warns(UserWarning, match="the LR peaks at") as caught:
        kwargs = cfg.sched.scheduler_kwargs(total)
    said = re.search(r"peaks at ([\d.]+) x optim.lr, at step (\d+)", str(caught[0].message))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    sched = build_scheduler("poly", opt, total, **kwargs)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"] / lr)
        opt.step()
        sched.step()
    assert float(said[1]) == pytest.approx(max(lrs), abs=0.005)
    assert int(said[2]) == lrs.index(max(lrs))


def test_edge_values_stay_valid():
    cfg = RunConfig.from_flat(
        {
            "optim.weight_decay": 0.0,
            "optim.beta1": 0.0,
            "optim.beta2": 0.0,
            "optim.grad_clip": 0.0,  # off
            "val_tile": 8,
            "samples_per_epoch": 0,  # one crop per image
            "num_workers": 0,
        }
    )
    assert cfg.optim.grad_clip == 0 and cfg.val_tile == 8
    # the shipped defaults: the CPU demo, and the fine-tuning recipe over it
    RunConfig.from_flat(CPU_DEMO)
    RunConfig.from_flat({**CPU_DEMO, **recipe_defaults("/models/upernet_t.pth")})


def _train(world, out, *extra: str) -> int:
    argv = ["--data", str(world.root), "--data-root", str(world.root.parent), "--out", str(out)]
    for s in ("aug.crop_size=32", "batch_size=8", "samples_per_epoch=16", "epochs=1"):
        argv += ["--set", s]
    return train_cmd.main([*argv, "--set", "impl=compiled", *extra])


def test_one_fold_reports_its_own_result(small_world, tmp_path, capsys):
    assert _train(small_world, tmp_path, "--folds", "2", "--fold", "1") == 0
    out = capsys.readouterr().out
    best = load_state(tmp_path / "fold1" / "last.pt")["best"]
    said = (
        f"fold 1: best epoch {best['epoch']} val Dice {best['val_dice_best']:.4f} "
        f"at threshold {threshold_text(best['val_thr_best'])}"
    )
    assert said in out and "nan" not in out
    assert '{"epoch": 1, ' in out  # its epoch's row
    assert "fold 1 trained; 1 other fold(s)" in out
    # the fold that finishes the run reports itself, then the run over its folds
    assert _train(small_world, tmp_path, "--folds", "2", "--fold", "0") == 0
    out = capsys.readouterr().out
    assert "fold 0: best epoch 1 val Dice " in out and "completed: trained 2 folds" in out
    assert "(mean over folds) val Dice " in out and "nan" not in out


def test_set_fold_is_refused_naming_the_flag(small_world, tmp_path, capsys):
    # fit_folds trains every fold: a --set fold=1 was ignored and both folds trained
    with pytest.raises(SystemExit) as e:
        _train(small_world, tmp_path / "run", "--folds", "2", "--set", "fold=1")
    assert e.value.code == 2
    assert "--set fold=...: train one fold with --fold F" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_same_data_from_another_folder_continues_the_run(small_world, tmp_path, monkeypatch):
    # `--data synthetic` from the data root, then the same command from elsewhere with an
    # absolute path: refused as "a different config (data: 'synthetic' -> '/abs/synthetic')"
    from bldseg.train.engine import check_same_config

    monkeypatch.chdir(small_world.root.parent)
    rel = small_world.root.name
    argv = ["--data", rel, "--data-root", ".", "--out", str(tmp_path / "run")]
    for s in ("aug.crop_size=32", "batch_size=8", "samples_per_epoch=16", "epochs=1"):
        argv += ["--set", s]
    assert train_cmd.main([*argv, "--set", "impl=compiled"]) == 0
    recorded = load_state(tmp_path / "run" / "last.pt")["config"]
    assert recorded["data"] == str(small_world.root)  # recorded absolute
    monkeypatch.chdir(tmp_path)
    argv[1], argv[3] = str(small_world.root), str(small_world.root.parent)
    assert train_cmd.main([*argv, "--set", "impl=compiled"]) == 0
    # a run recorded by older bldseg (as typed) continues from its folder, spelled otherwise
    monkeypatch.chdir(small_world.root.parent)
    old = {**recorded, "data": rel}
    check_same_config(old, RunConfig.from_flat({**recorded, "data": f"./{rel}/"}), "last.pt")
    with pytest.raises(ValueError, match=r"data: 'synthetic' -> '/elsewhere'"):
        check_same_config(old, RunConfig.from_flat({**recorded, "data": "/elsewhere"}), "last.pt")


def test_a_validation_tile_larger_than_the_images_names_val_tile(small_world, tmp_path, capsys):
    # the message named validation_tiles' "tile_size", a word the user never typed
    assert _train(small_world, tmp_path / "run", "--set", "val_tile=200") == 1
    err = capsys.readouterr().err
    assert "val_tile=200 is larger than the images (96x96); use val_tile <= 96" in err
    assert not (tmp_path / "run" / "last.pt").exists()
