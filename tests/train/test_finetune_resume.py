"""Fine-tuning runs: the recipe's warm-up on a short run, a checkpoint that does not fit, and
resuming without the pretrained file (last.pt holds every weight)."""

import hashlib
import json
import shutil
import warnings

import pytest
import torch

from bldseg.models import create_model
from bldseg.models.pretrained import CheckpointMismatchError
from bldseg.train import engine
from bldseg.train.config import RunConfig, SchedConfig, recipe_defaults
from bldseg.train.schedulers import build_scheduler
from tests.models.test_pretrained import to_mmseg
from tests.train.test_schedulers import _lrs


def mmseg_file(path, seed: int):
    """A tiny mmseg-layout UPerNet checkpoint with layer scale (as the official T one has)."""
    torch.manual_seed(seed)
    sd = create_model("upernet_internimage_tiny", layer_scale=1.0, num_classes=150).state_dict()
    torch.save({"state_dict": to_mmseg(sd), "meta": {}}, path)
    return path


def lrs(cfg: RunConfig, total: int) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=cfg.optim.lr)
    sch = build_scheduler(cfg.sched.name, opt, total, **cfg.sched.scheduler_kwargs(total))
    return _lrs(opt, sch, total)


def test_the_recipes_warm_up_is_a_share_of_a_short_run():
    cfg = RunConfig.from_flat({**recipe_defaults("w.pth"), "model": "upernet_internimage_t"})
    with pytest.warns(UserWarning, match=r"warmup_steps=1500 is 150% .* warming up over 50 "):
        curve = lrs(cfg, 1000)
    # mmcv's poly: the peak at the warm-up's end lies on the line (1 - step / total) * lr
    assert curve.index(max(curve)) == 50 and max(curve) == pytest.approx(6e-5 * 0.95)
    assert curve[-1] < 1e-6  # it decays, to about 0 at the end
    # the official run's length keeps the official 1500 steps, without a word
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cfg.sched.scheduler_kwargs(160_000)["warmup_steps"] == 1500
        assert cfg.sched.scheduler_kwargs(30_000)["warmup_steps"] == 1500
    # schedule-free under the recipe's cap too
    sf = cfg.with_updates({"sched.name": "schedulefree"})
    with pytest.warns(UserWarning, match="warming up over 100 "):
        opt = engine.build_optimizer(torch.nn.Linear(2, 2), sf, total_steps=2000)
    assert {g["warmup_steps"] for g in opt.param_groups} == {100}


def test_a_warm_up_set_in_steps_is_kept_and_warned_about_when_long():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (
            SchedConfig(name="poly", warmup_steps=150).scheduler_kwargs(1000)["warmup_steps"] == 150
        )
    with pytest.warns(UserWarning, match=r"warmup_steps=300 is 30% of this run's 1000 steps"):
        assert (
            SchedConfig(name="poly", warmup_steps=300).scheduler_kwargs(1000)["warmup_steps"] == 300
        )
    # mmcv's poly: the warm-up scales a line decaying from step 0, so a long one keeps the LR
    # far below optim.lr; the warning says how far (it said "peaks late")
    with pytest.warns(UserWarning, match=r"the LR peaks at 0\.25 x optim.lr, at step 50\b"):
        assert (
            SchedConfig(name="poly", warmup_steps=1500).scheduler_kwargs(100)["warmup_steps"] == 99
        )
    cfg = RunConfig.from_flat({"sched.name": "poly", "sched.warmup_steps": 1500})
    # (the min_lr floor lifts the peak a little and moves it a step later: the warning says so)
    with pytest.warns(UserWarning, match=r"peaks at 0\.33 x optim.lr, at step 1001\b"):
        curve = lrs(cfg, 2000)
    assert max(curve) == pytest.approx(cfg.optim.lr / 3, rel=2e-3)
    assert curve.index(max(curve)) == 1001
    # schedule-free has no decay: a long warm-up keeps its LR below optim.lr, a late one
    # reaches it late (the warnings said "never decays" and "decays over the rest")
    with pytest.warns(UserWarning, match=r"whole of the run and reaches only 0\.07 x optim\.lr"):
        SchedConfig(name="schedulefree", warmup_steps=1500).warmup_iterations(100)
    with pytest.warns(UserWarning, match=r"reaches optim\.lr only at step 30 \(schedule-free"):
        SchedConfig(name="schedulefree", warmup_steps=30).warmup_iterations(100)
    # as long as the run: it gets there at the last step (it said "reaches only 1.00 x")
    with pytest.warns(UserWarning, match=r"reaches optim\.lr only at step 100 \(schedule-free"):
        SchedConfig(name="schedulefree", warmup_steps=100).warmup_iterations(100)
    with pytest.raises(ValueError, match=r"sched.warmup_max_frac=0 must be in \(0, 1\]"):
        RunConfig.from_flat({"sched.warmup_max_frac": 0})


def _cfg(pretrained, **kw) -> RunConfig:
    flat = {
        "pretrained": str(pretrained),
        "epochs": 3,
        "aug.crop_size": 64,
        "batch_size": 4,
        "samples_per_epoch": 8,
        "val_fraction": 0.25,
    }
    return RunConfig.from_flat({**flat, **kw})


def test_a_checkpoint_that_does_not_fit_leaves_the_run_folder_untouched(small_world, tmp_path):
    sd = create_model("upernet_internimage_tiny").state_dict()
    sd.pop("decode_head.fpn_bottleneck.bn.running_mean")
    torch.save(sd, tmp_path / "bad.pt")
    out = tmp_path / "run"
    with pytest.raises(CheckpointMismatchError, match="does not fit upernet_internimage_tiny"):
        engine.fit(_cfg(tmp_path / "bad.pt"), out, data=small_world)
    assert not out.exists()


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_resume_reads_last_pt_not_the_pretrained_file(small_world, tmp_path, capsys):
    weights = mmseg_file(tmp_path / "upernet_internimage_tiny_ade20k.pth", seed=0)
    original = {"size": weights.stat().st_size, "sha256": _sha256(weights)}
    cfg = _cfg(weights)
    # two of the three epochs, uninterrupted (stopped runs skip the plots: faster)
    whole = engine.fit(cfg, tmp_path / "whole", data=small_world, stop_after=2)
    assert whole.status == "stopped"
    # what the fine-tune started from is printed (the CLI configures no logging)
    assert "pretrained: loaded " in capsys.readouterr().out

    run = tmp_path / "run"
    assert engine.fit(cfg, run, data=small_world, stop_after=1).status == "stopped"
    record = json.loads((run / "pretrained.json").read_text())
    assert {k: record[k] for k in original} == original
    assert record["overrides"] == {"layer_scale": 1.0}
    # another file behind the same path: not read, and the record stays that of the start
    replaced = mmseg_file(tmp_path / "other.pth", seed=1)
    shutil.copyfile(replaced, weights)
    assert _sha256(weights) != original["sha256"]
    capsys.readouterr()
    assert engine.fit(cfg, run, data=small_world, stop_after=1).status == "stopped"
    assert json.loads((run / "pretrained.json").read_text()) == record
    out = capsys.readouterr().out
    assert f"resumed {run} at epoch 1" in out and "pretrained: loaded" not in out
    # the file gone: the run still trains on (with layer scale, as it was built)
    weights.unlink()
    assert engine.fit(cfg, run, data=small_world, stop_after=2).status == "stopped"
    assert json.loads((run / "pretrained.json").read_text()) == record
    # and it is the uninterrupted run (its second epoch trained after the file was gone)
    a = engine.load_state(tmp_path / "whole" / "last.pt")["models"][0]
    b = engine.load_state(run / "last.pt")["models"][0]
    assert a.keys() == b.keys() and any(k.endswith(".gamma1") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_kfold_run_checks_the_checkpoint_before_writing_its_manifest(small_world, tmp_path):
    from bldseg.train.folds import fit_folds

    sd = create_model("upernet_internimage_tiny").state_dict()
    sd.pop("decode_head.fpn_bottleneck.bn.running_mean")
    torch.save(sd, tmp_path / "bad.pt")
    out = tmp_path / "kfold"
    cfg = _cfg(tmp_path / "bad.pt").with_updates({"folds": 2})
    with pytest.raises(CheckpointMismatchError, match="does not fit upernet_internimage_tiny"):
        fit_folds(cfg, out, data=small_world)
    assert not out.exists()  # no folds.json of a run that never started


def test_a_resume_refuses_optimizer_state_of_other_parameter_groups(small_world, tmp_path):
    # An optimizer's state is keyed by position: loaded into groups laid out otherwise (an
    # older bldseg put level norms with the level before, with layer decay) it would give one
    # parameter another's moments. last.pt records each group's parameter names; older files
    # only the sizes.
    cfg = RunConfig.from_flat({k: v for k, v in _cfg("x").to_flat().items() if k != "pretrained"})
    run = tmp_path / "run"
    assert engine.fit(cfg, run, data=small_world, stop_after=1).status == "stopped"
    last = run / "last.pt"
    state = engine.load_state(last)
    layout = state["optimizer_groups"]
    names = [n for g in layout for n in g]
    assert (
        len(names)
        == len(set(names))
        == len(state["models"][0])
        - sum("running_" in k or "num_batches" in k for k in state["models"][0])
    )
    assert any(n.endswith("norm1.0.weight") for n in layout[0])  # the no-decay group

    def resume_with(saved) -> str:
        torch.save(saved, last)
        before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
        with pytest.raises(ValueError, match="optimizer state was written for other") as err:
            engine.fit(cfg, run, data=small_world, stop_after=2)
        assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
        return str(err.value)

    moved = layout[0][-1]
    renamed = {**state, "optimizer_groups": [layout[0][:-1], [moved, *layout[1]], *layout[2:]]}
    assert f"1 parameter(s) in another group, e.g. {moved}" in resume_with(renamed)
    # an older file: no names, and one parameter's state in the other group
    old = {k: v for k, v in state.items() if k != "optimizer_groups"}
    old["optimizers"] = list(state["optimizers"])
    opt = old["optimizers"][0]
    groups = opt["param_groups"]
    old["optimizers"][0] = {
        **opt,
        "param_groups": [
            {**groups[0], "params": groups[0]["params"][:-1]},
            {**groups[1], "params": [groups[0]["params"][-1], *groups[1]["params"]]},
            *groups[2:],
        ],
    }
    sizes = [len(g) for g in layout]
    assert f"group sizes {[sizes[0] - 1, sizes[1] + 1, *sizes[2:]]} there" in resume_with(old)
    # an older file laid out as today: it resumes
    torch.save({k: v for k, v in state.items() if k != "optimizer_groups"}, last)
    assert engine.fit(cfg, run, data=small_world, stop_after=2).status == "stopped"


def test_cosine_restarts_warms_up_over_warmup_steps_when_set():
    # It used to take warmup_frac and ignore warmup_steps without a word (the recipe's 1500
    # stood in a cosine trial's recorded config, unused).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kw = SchedConfig(name="cosine_restarts", warmup_steps=40).scheduler_kwargs(1000)
    assert (kw["first_cycle_steps"], kw["warmup_steps"]) == (1000, 40)
    cfg = RunConfig.from_flat({"sched.name": "cosine_restarts", "sched.warmup_steps": 40})
    curve = lrs(cfg, 1000)
    assert curve.index(max(curve)) == 40 and curve[39] < curve[40]
    # every cycle warms up as long, from its own first step
    two = SchedConfig(name="cosine_restarts", cycles=2, warmup_steps=30).scheduler_kwargs(1000)
    assert two["warmup_steps"] == 30 and two["first_cycle_steps"] < 1000
    # cut to warmup_max_frac of the first cycle, with a warning naming both
    with pytest.warns(UserWarning, match=r"warmup_steps=1500 is 150% of the first cosine cycle"):
        capped = SchedConfig(
            name="cosine_restarts", warmup_steps=1500, warmup_max_frac=0.05
        ).scheduler_kwargs(1000)
    assert capped["warmup_steps"] == 50
    # longer than the cycle: one step less, warned
    with pytest.warns(UserWarning, match="warming up over 99, one step less than the cycle"):
        assert (
            SchedConfig(name="cosine_restarts", warmup_steps=500).scheduler_kwargs(100)[
                "warmup_steps"
            ]
            == 99
        )
    with pytest.warns(UserWarning, match=r"is 30% of the first cosine cycle's 1000 steps"):
        SchedConfig(name="cosine_restarts", warmup_steps=300).scheduler_kwargs(1000)


@pytest.mark.parametrize("name", ["onecycle", "constant"])
def test_a_warm_up_in_steps_a_schedule_does_not_read_is_warned_about(name):
    with pytest.warns(UserWarning, match=rf"warmup_steps=1500 is not used by sched.name={name}"):
        SchedConfig(name=name, warmup_steps=1500).scheduler_kwargs(1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SchedConfig(name=name).scheduler_kwargs(1000)


def test_a_new_run_whose_blur_blurs_nothing_is_refused_and_a_recorded_one_continues(
    small_world, tmp_path, monkeypatch
):
    # blur_sigma below MIN_BLUR_SIGMA with blur on: every drawn blur leaves the tile as it is.
    # A new run is refused before it writes anything; one recorded before the limit (made here
    # by lifting the check) resumes as it trained, with a warning.
    flat = {"epochs": 2, "aug.crop_size": 64, "batch_size": 4, "samples_per_epoch": 8}
    cfg = RunConfig.from_flat(
        {**flat, "val_fraction": 0.25, "aug.blur_p": 0.5, "aug.blur_sigma": 0.2}
    )
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"blur_sigma=0\.2 is below 0\.4"):
        engine.fit(cfg, out, data=small_world)
    assert not out.exists()
    monkeypatch.setattr(engine, "blur_problem", lambda aug: None)
    assert engine.fit(cfg, out, data=small_world, stop_after=1).status == "stopped"
    monkeypatch.undo()
    with pytest.warns(UserWarning, match=r"last\.pt: .*blur_sigma=0\.2.*continues as recorded"):
        assert engine.fit(cfg, out, data=small_world).status == "completed"
