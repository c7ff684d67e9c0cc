"""RunConfig: flat-dict round trip, validation messages, co-teaching rate, schedule kwargs,
model arguments and the pretrained recipe."""

import json
import os

import pytest
import torch

from bldseg.models import create_model
from bldseg.models.backbones.internimage import INTERNIMAGE_VARIANTS
from bldseg.train.augment import AugConfig
from bldseg.train.config import (
    PRETRAINED_RECIPE,
    CoTeachConfig,
    OptimConfig,
    RunConfig,
    SchedConfig,
    recipe_defaults,
)
from bldseg.train.schedulers import SCHEDULERS, build_scheduler


def test_flat_round_trip_default():
    cfg = RunConfig()
    flat = cfg.to_flat()
    assert flat["aug.crop_size"] == 224
    assert flat["optim.lr"] == 1e-3
    assert flat["coteach.granularity"] == "tile"
    assert not any(isinstance(v, dict) for v in flat.values())
    back = RunConfig.from_flat(flat)
    assert back == cfg
    assert isinstance(back.aug, AugConfig) and isinstance(back.optim, OptimConfig)


def test_flat_round_trip_non_default_through_json():
    cfg = RunConfig(
        loss="lovasz",
        epochs=3,
        drop_path_rate=0.1,
        pretrained="/weights/internimage_t_1k_224.pth",
        with_cp=True,
        aug=AugConfig(crop_size=64, hsv_p=0.3),
        sched=SchedConfig(name="poly", power=0.9, warmup_steps=1500),
        coteach=CoTeachConfig(enabled=True, granularity="pixel"),
    )
    back = RunConfig.from_flat(json.loads(cfg.to_json()))
    assert back == cfg
    assert back != RunConfig()


def test_from_flat_accepts_nested_dicts():
    cfg = RunConfig.from_flat({"aug": {"crop_size": 64}, "optim.lr": 3e-4, "epochs": 2})
    assert cfg.aug.crop_size == 64 and cfg.optim.lr == 3e-4 and cfg.epochs == 2
    assert cfg.aug.scale_p == AugConfig().scale_p  # the rest stays default


def test_with_updates_returns_a_modified_copy():
    cfg = RunConfig()
    new = cfg.with_updates({"aug.crop_size": 96, "sched.name": "cosine_restarts", "seed": 3})
    assert (new.aug.crop_size, new.sched.name, new.seed) == (96, "cosine_restarts", 3)
    assert (cfg.aug.crop_size, cfg.sched.name, cfg.seed) == (224, "onecycle", 0)
    assert new.with_updates({}) == new


@pytest.mark.parametrize(
    "key, named",
    [
        ("aug.crop_sise", "crop_sise"),
        ("optim.learning_rate", "learning_rate"),
        ("sched.warmup", "warmup"),
        ("coteach.rate", "rate"),
        ("epoch", "epoch"),
        ("optimizer.lr", "optimizer"),
    ],
)
def test_unknown_flat_key_is_named(key, named):
    with pytest.raises(ValueError, match=rf"\['{named}'\]"):
        RunConfig.from_flat({key: 1})
    with pytest.raises(ValueError, match=rf"\['{named}'\]"):
        RunConfig().with_updates({key: 1})


@pytest.mark.parametrize("section", ["aug", "optim", "sched", "coteach"])
def test_a_section_given_a_value_is_named_with_its_leaves(section):
    # train --set aug=1 built a config whose aug was 1 and ended in an AttributeError
    with pytest.raises(
        ValueError, match=rf"'{section}' is a section of the run config.*{section}\."
    ):
        RunConfig.from_flat({section: 1})
    with pytest.raises(ValueError, match=rf"'{section}' is a section"):
        RunConfig().with_updates({section: 0.5})
    assert RunConfig.from_flat({section: {}}) == RunConfig()  # a nested dict is still a section


@pytest.mark.parametrize(
    "flat", [{"model.head_channels": 64}, {"seed": 3, "seed.x": 1}, {"seed.x": 1, "seed": 3}]
)
def test_a_dotted_key_under_a_value_is_named(flat):
    # a TypeError ("'str' object does not support item assignment"), or seed.x dropped
    key = next(k for k in flat if "." in k)
    with pytest.raises(ValueError, match=rf"'{key}': '{key.split('.')[0]}' is a value of the"):
        RunConfig.from_flat(flat)


@pytest.mark.parametrize(
    "update, named",
    [
        ({"model": "resnet50"}, "model='resnet50'"),
        ({"model": "internimage_t"}, "model='internimage_t' is a backbone, not a segmentation"),
        ({"pretrained": ""}, "pretrained=''"),
        ({"drop_path_rate": 1.5}, "drop_path_rate=1.5"),
        ({"sched.warmup_steps": -1}, "sched.warmup_steps=-1"),
        ({"loss": "focal"}, "loss='focal'"),
        ({"epochs": 0}, "epochs=0"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"val_fraction": 1.0}, "val_fraction=1.0"),
        ({"optim.lr": 2}, "optim.lr=2"),
        ({"optim.layer_decay": 0.0}, "optim.layer_decay=0.0"),
        ({"coteach.granularity": "image"}, "coteach.granularity='image'"),
        ({"coteach.tau": 1.0}, "coteach.tau=1.0"),
        ({"coteach.t_k": 0}, "coteach.t_k=0"),
        ({"sched.name": "step"}, "sched.name='step'"),
        ({"precision": "fp8"}, "precision='fp8'"),
        ({"impl": "foo"}, "impl='foo' must be auto, compiled or reference"),
        ({"device": "gpu"}, "device='gpu' is not a torch device"),
        ({"sched.name": "poly", "sched.min_lr": 1.0}, "sched.min_lr=1.0"),
        ({"threshold_lo": 0.8}, "threshold_lo=0.8"),
        ({"aux_weight": -1.0}, "aux_weight=-1.0"),
        ({"aug.vflip_p": 2.0}, "vflip_p=2.0"),
    ],
)
def test_invalid_value_names_parameter(update, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        RunConfig().with_updates(update)


def test_backbone_name_is_refused_with_the_model_to_use():
    with pytest.raises(ValueError, match="a backbone, not a segmentation model; use 'upernet_inte"):
        RunConfig(model="internimage_s")


def test_valid_models_accepted():
    from bldseg.models import list_models

    for name in list_models():
        assert RunConfig(model=name).model == name


@pytest.mark.parametrize("tau, t_k", [(0.1, 5), (0.3, 2), (0.0, 4)])
def test_keep_ratio_follows_formula(tau, t_k):
    c = CoTeachConfig(tau=tau, t_k=t_k)
    for epoch in range(3 * t_k):
        assert c.keep_ratio(epoch) == pytest.approx(1 - min(epoch / t_k * tau, tau))


def test_keep_ratio_by_hand():
    c = CoTeachConfig(tau=0.2, t_k=4)
    got = [c.keep_ratio(e) for e in range(6)]
    assert got == pytest.approx([1.0, 0.95, 0.9, 0.85, 0.8, 0.8])


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_kwargs_build_valid_schedulers(name):
    sc = SchedConfig(name=name)
    total = 40
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    s = build_scheduler(name, opt, total, **sc.scheduler_kwargs(total))
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    assert all(0 <= lr <= 1e-3 * (1 + 1e-9) for lr in lrs)
    # poly (mmcv's) peaks where its warm-up (5% of the run) meets the line decaying from step 0
    assert max(lrs) == pytest.approx(1e-3 * (0.95 if name == "poly" else 1), rel=1e-3)


def test_scheduler_kwargs_values():
    cos = SchedConfig(
        name="cosine_restarts", cycles=4, cycle_mult=2.0, gamma=0.5, warmup_frac=0.1, min_lr=1e-5
    )
    # 4 growing cycles 72 + 137 + 267 + 527 = 1003 steps cover the run's 1000
    assert cos.scheduler_kwargs(1000) == dict(
        first_cycle_steps=72, cycle_mult=2.0, gamma=0.5, min_lr=1e-5, warmup_steps=7
    )
    equal = SchedConfig(name="cosine_restarts", cycles=4, warmup_frac=0.1)
    assert equal.scheduler_kwargs(100)["first_cycle_steps"] == 25
    # Tiny runs still give a valid cycle (warm-up shorter than the cycle).
    tiny = SchedConfig(name="cosine_restarts", warmup_frac=0.9).scheduler_kwargs(1)
    assert tiny["first_cycle_steps"] == 2 and tiny["warmup_steps"] == 1
    poly = SchedConfig(name="poly", warmup_frac=0.05, power=0.9).scheduler_kwargs(200)
    assert poly == dict(warmup_steps=10, power=0.9, min_lr=1e-6)
    one = SchedConfig(pct_start=0.2).scheduler_kwargs(10)
    assert one == dict(pct_start=0.2, div_factor=25.0, final_div_factor=1e4, cycle_momentum=True)
    assert SchedConfig(name="constant").scheduler_kwargs(10) == {}
    poly_fixed = SchedConfig(name="poly", warmup_frac=0.05, warmup_steps=1500)
    assert poly_fixed.scheduler_kwargs(160_000)["warmup_steps"] == 1500
    # a run shorter than the warm-up warms up over all of it but its last step
    assert poly_fixed.scheduler_kwargs(100)["warmup_steps"] == 99


def test_model_kwargs_reach_the_model():
    cfg = RunConfig.from_flat({"with_cp": True, "drop_path_rate": 0.25, "impl": "reference"})
    assert cfg.model_kwargs() == {"impl": "reference", "with_cp": True, "drop_path_rate": 0.25}
    model = create_model(cfg.model, **cfg.model_kwargs())
    assert model.backbone.cfg.with_cp and model.backbone.levels[-1].blocks[-1].with_cp
    assert model.backbone.levels[-1].blocks[-1].drop_path.p == pytest.approx(0.25)
    # unset: the variant's own stochastic depth
    assert "drop_path_rate" not in RunConfig().model_kwargs()


def test_recipe_defaults_apply_under_explicit_user_values():
    recipe = recipe_defaults("weights/upernet_internimage_t_512_160k_ade20k.pth")
    assert recipe["pretrained"] == os.path.abspath(
        "weights/upernet_internimage_t_512_160k_ade20k.pth"
    )
    # what an entry script does: its defaults < the recipe < the user's --set < a search space
    script = {"model": "upernet_internimage_t", "optim.lr": 3e-3, "aug.crop_size": 64}
    user = {"optim.weight_decay": 0.01, "sched.warmup_steps": 200}
    cfg = RunConfig.from_flat({**script, **recipe, **user})
    assert (cfg.optim.lr, cfg.optim.layer_decay, cfg.optim.weight_decay) == (6e-5, 1.0, 0.01)
    assert (cfg.sched.name, cfg.sched.power, cfg.sched.min_lr) == ("poly", 1.0, 0.0)
    assert cfg.sched.warmup_steps == 200 and cfg.aug.crop_size == 64
    assert cfg.pretrained == recipe["pretrained"]
    trial = RunConfig.from_flat({**script, **recipe, **user, "optim.lr": 1e-4})
    assert trial.optim.lr == 1e-4
    # every recipe key is a run-config key
    assert set(recipe) <= set(RunConfig().to_flat())
    assert RunConfig.from_flat(recipe).sched.warmup_steps == PRETRAINED_RECIPE["sched.warmup_steps"]


def test_official_drop_path_rates_are_the_variant_defaults():
    # the recipe leaves drop_path_rate unset because T/S/B already default to the official values
    assert "drop_path_rate" not in PRETRAINED_RECIPE
    official = {"t": 0.2, "s": 0.3, "b": 0.4}
    assert {v: INTERNIMAGE_VARIANTS[v]["drop_path_rate"] for v in official} == official


@pytest.mark.parametrize(
    "update, named",
    [
        ({"folds": 1}, r"folds=1 must be 0 .* or at least 2 \(--folds K\)"),
        ({"folds": -2}, r"folds=-2"),
        ({"folds": 3, "fold": 3}, r"fold=3 is not one of the folds 0\.\.2 of folds=3"),
        ({"fold": 1}, r"fold=1 selects a fold of K-fold training: set folds \(--folds K\)"),
    ],
)
def test_fold_settings_are_checked(update, named):
    with pytest.raises(ValueError, match=named):
        RunConfig.from_flat(update)
    assert RunConfig.from_flat({"folds": 3, "fold": 2}).fold == 2


@pytest.mark.parametrize(
    "update, named",
    [
        # --set tta=False reaches the config as the string 'False', which is true
        ({"tta": "False"}, "tta='False'"),
        ({"channels_last": "false"}, "channels_last='false'"),
        ({"optim.lr": ".001"}, "optim.lr='.001'"),
        ({"epochs": 2.5}, "epochs=2.5"),
        ({"batch_size": "abc"}, "batch_size='abc'"),
        ({"coteach.tau": "0.1"}, "coteach.tau='0.1'"),
        ({"sched.cycle_momentum": 1}, "sched.cycle_momentum=1"),
        ({"pretrained": 3}, "pretrained=3"),
    ],
)
def test_wrong_type_names_parameter(update, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.") + " must be of type"):
        RunConfig.from_flat(update)


def test_whole_floats_become_ints():
    # a trials table (pandas) holds a conditional int parameter as 3.0
    c = RunConfig.from_flat({"sched.cycles": 3.0, "epochs": 4.0, "aug.crop_size": 64.0})
    assert (c.sched.cycles, c.epochs, c.aug.crop_size) == (3, 4, 64)
    assert all(type(v) is int for v in (c.sched.cycles, c.epochs, c.aug.crop_size))
    assert type(RunConfig.from_flat({"optim.lr": 1e-3}).optim.lr) is float


def test_min_lr_is_checked_only_where_a_schedule_reads_it():
    # OneCycle's floor is lr / (div_factor * final_div_factor): a low optim.lr was refused for
    # a min_lr it never reads
    assert RunConfig.from_flat({"sched.name": "onecycle", "optim.lr": 1e-6}).optim.lr == 1e-6
    with pytest.raises(ValueError, match=r"sched\.min_lr=1e-06 must be in \[0, optim\.lr\)"):
        RunConfig.from_flat({"sched.name": "cosine_restarts", "optim.lr": 1e-6})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_a_cuda_device_this_machine_lacks_is_named():
    from bldseg.train.engine import resolve_device

    # torch's own error was an AssertionError traceback from the first .to()
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=f"device='{name}': no CUDA device here"):
            resolve_device(name)
    assert resolve_device("cpu") == torch.device("cpu")


def test_replace_keeps_each_configs_schedule_bound_to_its_own_optimizer():
    # poly's warm-up warning reads the floor as a share of optim.lr through sched._optim:
    # dataclasses.replace handed the new config the original's sched object, and re-bound it
    import dataclasses

    from bldseg.train.config import OptimConfig

    c = RunConfig.from_flat({"optim.lr": 0.01})
    d = dataclasses.replace(c, optim=OptimConfig(lr=0.5))
    assert c.sched._optim.lr == 0.01 and d.sched._optim.lr == 0.5
    assert c.sched == d.sched  # the same settings, each bound to its own optimizer
