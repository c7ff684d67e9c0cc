"""Co-teaching search for noisy masks: the forget rate tau, its ramp and granularity."""

import math
from typing import Any

import optuna

from bldseg.train.config import CoTeachConfig
from bldseg.train.coteaching import longest_dropping_ramp

#: Largest forget rate searched (the built-in world corrupts 30% of its training masks).
TAU_MAX = 0.4

#: Longest ramp T_k searched, in epochs.
T_K_MAX = 5


def space(trial: optuna.Trial, base: dict[str, Any] | None = None) -> dict:
    """Tile vs pixel selection, tau up to 0.4, T_k.

    Tile selection keeps ceil(R(T) * batch_size) tiles per batch (Algorithm 1 keeps at least
    R(T)|D|), so it drops floor(batch_size * tau * min(T / T_k, 1)) in 0-based epoch T. With
    the CPU demo's batches of 4 a tau below 0.25 drops none, and a ramp longer than
    floor(tau * batch_size) epochs drops none before its end: such a trial trains two plain
    networks, for good or for its first epochs, while its row says co-teaching (and ASHA's
    first cut compares such trials as if they differed). So at tile granularity tau is searched
    over k / batch_size, k = 1 .. floor(0.4 * batch_size) (tile selection is offered only where
    k = 1 is at most 0.4; a tau between two of them drops what the lower one drops, so trials
    differing only there would train identically) and T_k goes up to max(1, k): every tile
    trial drops a tile per batch from its second epoch (T = 1) on. Pixel selection has no such
    floor and searches tau from 0 (0: plain training of two networks) and T_k from 1 to 5.
    ``base`` None (a search saved before spaces took a base): tau from 0 and T_k from 1 to 5
    for both, as it was started.
    """
    batch = None if base is None else int(base.get("batch_size", 8))  # RunConfig's default
    tile_ok = batch is None or TAU_MAX * batch >= 1
    granularity = trial.suggest_categorical(
        "coteach.granularity", ["tile", "pixel"] if tile_ok else ["pixel"]
    )
    tile = granularity == "tile" and batch is not None
    if tile:
        # the selection drops whole tiles: taus between k / batch and (k + 1) / batch drop the
        # same k per batch and train identically, so tile tau is searched in steps of 1 / batch
        # (at batch 4 only 0.25 is left) and each row's tau is the share it drops
        most = math.floor(TAU_MAX * batch + 1e-9)
        # in millionths, rounded up: Optuna checks the range is a whole number of steps in
        # decimal (1/6 fails it), and a tau a hair below k / batch would drop k - 1 tiles
        step = math.ceil(1e6 / batch) / 1e6
        tau = trial.suggest_float("coteach.tau", step, round(most * step, 6), step=step)
    else:
        tau = trial.suggest_float("coteach.tau", 0.0, TAU_MAX)
    # the selection's own rounding (bldseg.train.coteaching.n_kept) decides, not floor() here
    t_k_max = longest_dropping_ramp(CoTeachConfig(tau=tau), batch, T_K_MAX) if tile else T_K_MAX
    trial.suggest_int("coteach.t_k", 1, t_k_max)
    return {"coteach.enabled": True}
