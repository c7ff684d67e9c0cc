import logging
import pickle
import warnings
from pathlib import Path

import numpy as np
import optuna
import pytest

from bldseg.models.smp import smp_available
from bldseg.train.augment import AugConfig, build_train_transform
from bldseg.train.config import recipe_defaults
from bldseg.tune import tracking
from bldseg.tune.cli import CPU_DEMO
from bldseg.tune.runner import SearchSpec, get_space, resumed_spec, validate_space
from bldseg.tune_spaces import SPACES


@pytest.mark.parametrize("name", sorted(SPACES))
def test_every_space_builds_valid_configs(name):
    if name == "models" and not smp_available():
        with pytest.raises(ValueError, match=r"models failed.*pip install 'bldseg\[smp\]'"):
            validate_space(get_space(name), CPU_DEMO, samples=1)
        pytest.skip("segmentation_models_pytorch is not installed")
    validate_space(get_space(name), CPU_DEMO, samples=32)


def test_scheduler_space_is_conditional():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        t = study.ask()
        fixed = get_space("scheduler")(t) or {}
        name = t.params["sched.name"]
        # a searched warm-up share must not be overridden by a fixed length (the pretrained
        # recipe's 1500 steps), for every schedule whose warm-up reads one
        assert fixed.get("sched.warmup_steps") == 0
        seen.add(name)
        assert ("sched.pct_start" in t.params) == (name == "onecycle")
        assert ("sched.cycles" in t.params) == (name == "cosine_restarts")
        assert ("sched.power" in t.params) == (name == "poly")
        study.tell(t, 0.0)
        assert ("sched.warmup_frac" in t.params) == (
            name in ("cosine_restarts", "poly", "schedulefree")
        )
    assert seen == {"onecycle", "cosine_restarts", "poly", "schedulefree"}


def _sampled_lrs(space, n=64):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    lrs = []
    for _ in range(n):
        t = study.ask()
        space(t)
        lrs.append(t.params["optim.lr"])
        study.tell(t, 0.0)
    return lrs


def test_fine_tuning_searches_lrs_around_the_recipes(tmp_path):
    # From scratch: 3e-4 to 1e-2. With --pretrained the base holds the recipe's 6e-5 (or the
    # user's --set optim.lr): the search stays within /5 and x5 of it, not 5-170x above it.
    scratch = _sampled_lrs(get_space("scheduler", CPU_DEMO))
    assert min(scratch) >= 3e-4 and max(scratch) <= 1e-2
    base = {**CPU_DEMO, **recipe_defaults(tmp_path / "w.pth")}
    tuned = _sampled_lrs(get_space("scheduler", base))
    assert 1.2e-5 <= min(tuned) < 3e-5 and 1e-4 < max(tuned) <= 3e-4
    users = _sampled_lrs(get_space("scheduler", {**base, "optim.lr": 1e-4}))
    assert min(users) >= 2e-5 and max(users) <= 5e-4 and max(users) > 3e-4
    # the bound space is what Tune's searcher pickles with its state
    assert pickle.loads(pickle.dumps(get_space("scheduler", base))).keywords["base"] == base
    validate_space(get_space("scheduler", base), base, samples=8)


@pytest.mark.parametrize("name", sorted(SPACES))
def test_a_searcher_saved_with_the_bare_space_still_suggests(name, tmp_path):
    # Tune pickles its searcher's space by reference: a search saved before spaces took the
    # base config calls the space with the trial alone when it is resumed.
    from ray.tune.search.optuna import OptunaSearch

    from bldseg.tune.runner import SEARCHER_METRIC

    if name == "models" and not smp_available():
        pytest.skip("segmentation_models_pytorch is not installed")
    saved = OptunaSearch(space=SPACES[name], metric=SEARCHER_METRIC, mode="max")
    saved.save(str(tmp_path / "searcher.pkl"))
    restored = OptunaSearch(metric=SEARCHER_METRIC, mode="max")
    restored.restore(str(tmp_path / "searcher.pkl"))
    config = restored.suggest("t1")
    if "optim.lr" in config:
        assert 3e-4 <= config["optim.lr"] <= 1e-2  # the from-scratch range it started with


def test_models_space_refuses_pretrained_weights(tmp_path):
    base = {**CPU_DEMO, **recipe_defaults(tmp_path / "w.pth")}
    with pytest.raises(ValueError, match=r"models failed.*trains each family from scratch"):
        validate_space(get_space("models", base), base, samples=1)


def test_coteaching_space_enables_coteaching():
    study = optuna.create_study()
    t = study.ask()
    assert SPACES["coteaching"](t) == {"coteach.enabled": True}
    assert 0.0 <= t.params["coteach.tau"] <= 0.4


@pytest.mark.parametrize("batch, tile", [(4, True), (8, True), (6, True), (2, False), (None, True)])
def test_tile_coteaching_is_searched_only_where_it_drops_a_tile(batch, tile):
    # REPORT.md's best tune_tau trial was tile co-teaching with tau 0.22 at batch 4: floor(0.88)
    # = 0 tiles dropped, plain training of two networks presented as co-teaching. A ramp longer
    # than floor(tau * batch) epochs drops none before its end either: at batch 4, t_k >= 2
    # trials trained as plain networks through ASHA's first cut (grace period 2), identical.
    from bldseg.report import coteaching_dropped_nothing
    from bldseg.train.config import RunConfig
    from bldseg.train.coteaching import n_kept

    # None: the run config's default batch size (8)
    base = {k: v for k, v in CPU_DEMO.items() if k != "batch_size"}
    base |= {} if batch is None else {"batch_size": batch}
    space = get_space("coteaching", base)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen, t_ks, drops = set(), {"tile": set(), "pixel": set()}, set()
    for _ in range(60):
        t = study.ask()
        with warnings.catch_warnings():
            # Optuna shrinks a stepped range it finds uneven in decimal (1/6 steps): an error
            warnings.simplefilter("error")
            constants = space(t)
        cfg = RunConfig.from_flat({**base, **t.params, **constants, "epochs": 10})
        seen.add(cfg.coteach.granularity)
        t_ks[cfg.coteach.granularity].add(cfg.coteach.t_k)
        if cfg.coteach.granularity == "tile":
            # drops a tile per batch from the second epoch (T = 1) on
            assert coteaching_dropped_nothing(cfg) is None, t.params
            assert cfg.coteach.t_k <= max(1, int(cfg.coteach.tau * cfg.batch_size)), t.params
            history = [{"epoch": e + 1} for e in range(2)]
            assert cfg.batch_size * (1 - cfg.coteach.keep_ratio(1)) >= 1 - 1e-9, t.params
            assert coteaching_dropped_nothing(cfg, history) is None, t.params
            # tau is the share of each batch dropped, k / batch: a tau between two of those
            # drops what the lower one drops, and its trial would train as that one's
            k = cfg.batch_size - n_kept(1 - cfg.coteach.tau, cfg.batch_size)
            assert cfg.coteach.tau == pytest.approx(k / cfg.batch_size, abs=1e-5), t.params
            drops.add(k)
        assert t.params["coteach.tau"] <= 0.4
        study.tell(t, 0.5)
    assert seen == ({"tile", "pixel"} if tile else {"pixel"})
    # batch 4 (tau <= 0.4): floor(4 tau) = 1; batch 8: up to floor(3.2) = 3; pixels: 1 to 5
    assert max(t_ks["tile"], default=None) == {4: 1, 8: 3, 6: 2, 2: None, None: 3}[batch]
    # every whole number of tiles up to 0.4 of the batch is searched
    assert drops == {4: {1}, 8: {1, 2, 3}, 6: {1, 2}, 2: set(), None: {1, 2, 3}}[batch]
    assert max(t_ks["pixel"]) == 5
    # a search saved before spaces took a base goes on as it was started
    legacy = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    taus, legacy_t_ks = [], {"tile": set(), "pixel": set()}
    for _ in range(30):
        t = legacy.ask()
        SPACES["coteaching"](t)
        taus.append(t.params["coteach.tau"])
        legacy_t_ks[t.params["coteach.granularity"]].add(t.params["coteach.t_k"])
        legacy.tell(t, 0.5)
    assert min(taus) < 0.25
    assert max(legacy_t_ks["tile"]) == max(legacy_t_ks["pixel"]) == 5


def test_typo_in_space_is_named():
    def typo(trial):
        trial.suggest_float("aug.scale_limt", 0.0, 0.3)

    with pytest.raises(ValueError, match=r"unknown augmentation parameter.*scale_limt"):
        validate_space(typo, CPU_DEMO)


def test_impossible_value_is_named():
    def impossible(trial):
        trial.suggest_float("aug.vflip_p", 0.5, 2.0)

    with pytest.raises(ValueError, match=r"aug.*vflip_p=1\.\d+: a probability in \[0, 1\]"):
        validate_space(impossible, CPU_DEMO)


@pytest.mark.parametrize("suggest", [True, False])
def test_a_space_may_not_set_a_whole_config_section(suggest):
    # suggest_float("aug", 0, 1) was accepted: RunConfig.from_flat({"aug": 0.5}) gives aug=0.5
    def section(trial):
        if suggest:
            trial.suggest_float("aug", 0.0, 1.0)
            return None
        return {"optim": {"lr": 1e-3}}

    key, leaf = ("aug", "aug.hflip_p") if suggest else ("optim", "optim.lr")
    says = rf"sets '{key}': '{key}' is a section of the run config, not a value.*{leaf}"
    with pytest.raises(ValueError, match=says):
        validate_space(section, {**CPU_DEMO, "epochs": 2, "data": None})


@pytest.mark.parametrize("key", ["epochs", "folds", "data"])
def test_space_may_not_set_what_the_search_fixes(key):
    # Every trial's status is judged against the search's epoch budget (ASHA's max_t), and
    # folds/data are checked once for all trials: a space that varies them is refused.
    def owns(trial):
        if key == "epochs":
            trial.suggest_int("epochs", 3, 30)
        else:
            return {key: 2 if key == "folds" else "elsewhere"}
        return None

    with pytest.raises(ValueError, match=rf"sets {key}, which the search fixes for all trials"):
        validate_space(owns, CPU_DEMO)


@pytest.mark.parametrize(
    ("suggest", "base", "says"),
    [
        (lambda t: t.suggest_float("val_fraction", 0.1, 0.3), {}, "searches val_fraction"),
        (lambda t: t.suggest_int("split_seed", 0, 3), {}, "searches split_seed"),
        (lambda t: t.suggest_categorical("val_tile", [32, 64]), {}, "searches val_tile"),
        (
            lambda t: t.suggest_categorical("aug.crop_size", [32, 48]),
            {"val_tile": 0},
            r"searches aug.crop_size while val_tile is 0 .*\(--set val_tile=N, e.g. the smallest",
        ),
    ],
)
def test_space_may_not_search_what_decides_the_validation_tiles(suggest, base, says):
    # ASHA and the best trial compared trials scored on different validation tiles
    def space(trial):
        suggest(trial)

    with pytest.raises(ValueError, match=says):
        validate_space(space, {**CPU_DEMO, **base})


def test_space_may_fix_the_split_and_search_the_crop_with_fixed_validation_tiles():
    def space(trial):
        trial.suggest_categorical("aug.crop_size", [32, 48])
        return {"split_seed": 3, "val_fraction": 0.2}  # the same for every trial

    keys = validate_space(space, {**CPU_DEMO, "val_tile": 64})
    assert {"aug.crop_size", "split_seed", "val_fraction"} <= keys


def test_resume_takes_the_recorded_search_settings(caplog):
    started = SearchSpec(scheduler="fifo", epochs=3, trials=2, seed=7, grace_period=1)
    meta = {"base": {"epochs": 3}, "spec": {**started.__dict__, "data_options": None}}
    today = SearchSpec(resume=True, name="s", cpus_per_trial=2.0)  # default flags otherwise
    with caplog.at_level(logging.WARNING, logger="bldseg.tune.runner"):
        spec = resumed_spec(today, meta)
    assert (spec.scheduler, spec.epochs, spec.trials, spec.seed, spec.grace_period) == (
        "fifo",
        3,
        2,
        7,
        1,
    )
    # the flag itself is kept; the trials go on with the resources they were started with
    # (a default --cpus-per-trial silently changed their torch threads), and that is named
    assert spec.resume and spec.cpus_per_trial == 1.0 and spec.name == "s"
    assert "scheduler='fifo' (not 'asha')" in caplog.text and "epochs=3 (not 8)" in caplog.text
    assert "cpus_per_trial=1.0 (not 2.0)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bldseg.tune.runner"):
        assert resumed_spec(spec, meta) == spec
    assert caplog.text == ""  # the same flags again: nothing to say


def test_relative_tracking_uris_become_absolute(tmp_path):
    # trials run in their own folders: a relative store would be a new one in each
    assert (
        tracking.absolute_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    )
    assert tracking.absolute_uri("sqlite:///a/../m.db", tmp_path) == f"sqlite:///{tmp_path}/m.db"
    assert tracking.absolute_uri("mlruns", tmp_path) == str(tmp_path / "mlruns")
    assert tracking.absolute_uri("file:./mlruns", tmp_path) == (tmp_path / "mlruns").as_uri()
    for fixed in (
        f"sqlite:///{tmp_path}/x.db",
        "http://127.0.0.1:5000",
        "postgresql://u@h/db",
        "databricks",
        str(Path("/abs/mlruns")),
        "file:///abs/mlruns",
    ):
        assert tracking.absolute_uri(fixed, tmp_path) == fixed


def test_unknown_space_name():
    with pytest.raises(ValueError, match="unknown search space 'augmentations'"):
        get_space("augmentations")


def test_ideal_wall_packs_trials_on_free_slots():
    import pandas as pd

    from bldseg.tune.runner import ideal_wall

    t = pd.DataFrame({"started": [0.0, 1.0, 2.0, 3.0], "train_s": [10.0, 4.0, 4.0, 5.0]})
    # slot A: 10; slot B: 4 + 4 + 5 = 13 (each trial goes to the first free slot)
    assert ideal_wall(t, 2) == 13.0
    assert ideal_wall(t, 1) == 23.0
    assert ideal_wall(t, 4) == 10.0


def test_augmentation_blur_off_below_threshold():
    # a blur probability too small to search its strength is off: the trial does not blur
    # with an unsearched default sigma
    for p, sigma in [(0.03, None), (0.3, 0.8)]:
        params = {"aug.blur_p": p} | ({"aug.blur_sigma": sigma} if sigma else {})
        trial = optuna.trial.FixedTrial(
            {
                "aug.scale_limit": 0.1,
                "aug.scale_p": 0.5,
                "aug.vflip_p": 0.1,
                "aug.hflip_p": 0.1,
                "aug.rotate90_p": 0.1,
                "aug.transpose_p": 0.1,
                "aug.brightness_contrast_p": 0.1,
                "aug.hsv_p": 0.1,
                "aug.noise_p": 0.1,
                **params,
            }
        )
        fixed = SPACES["augmentation"](trial) or {}
        assert fixed == ({} if sigma else {"aug.blur_p": 0.0})


def test_augmentation_searches_only_blurs_that_blur():
    # aug.blur_sigma ranged over [0.3, 1.5] and each blur drew sigma from [0.1, blur_sigma]:
    # with blur_p=1, the range's low end left 186 tiles of 200 unchanged
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial({"aug.blur_p": 0.3})  # blur on: its strength is searched
    trial = study.ask()
    assert SPACES["augmentation"](trial) is None
    searched = trial.distributions["aug.blur_sigma"]
    rng = np.random.default_rng(0)
    for sigma in (searched.low, searched.high):
        cfg = AugConfig(
            crop_size=64, scale_p=0.0, vflip_p=0.0, hflip_p=0.0, blur_p=1.0, blur_sigma=sigma
        )
        blur = build_train_transform(cfg, normalize=False)
        for seed in range(50):
            # sharp-edged "roofs" of random colours on a flat ground
            image = np.full((64, 64, 3), 90, np.uint8)
            for y, x, h, w in rng.integers(4, 40, (6, 4)):
                image[y : y + h, x : x + w] = rng.integers(0, 256, 3)
            blur.set_random_seed(seed)
            assert not np.array_equal(blur(image=image)["image"], image), (sigma, seed)


def test_a_range_whose_end_is_invalid_is_refused_before_any_trial():
    # tau must be below 1: no random sample of [0, 1] lands on 1.0, a trial of a TPE search
    # near the edge would fail later
    def reaching(trial):
        trial.suggest_float("coteach.tau", 0.0, 1.0)
        trial.suggest_int("coteach.t_k", 1, 5)
        return {"coteach.enabled": True}

    with pytest.raises(ValueError) as e:
        validate_space(reaching, dict(CPU_DEMO))
    msg = str(e.value)
    assert "parameter 'coteach.tau' ranges over [0.0, 1.0], and its end 1.0 is invalid" in msg
    assert "coteach.tau=1.0" in msg

    def inside(trial):
        trial.suggest_float("coteach.tau", 0.0, 0.9)
        trial.suggest_int("coteach.t_k", 1, 5)
        return {"coteach.enabled": True}

    assert validate_space(inside, dict(CPU_DEMO)) == {
        "coteach.tau",
        "coteach.t_k",
        "coteach.enabled",
    }
