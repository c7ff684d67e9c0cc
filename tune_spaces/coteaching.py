"""Co-teaching search for noisy masks: the forget rate tau, its ramp and granularity."""

from typing import Any

import optuna

#: Largest forget rate searched (the slides' noisy share was about 30%).
TAU_MAX = 0.4


def space(trial: optuna.Trial, base: dict[str, Any] | None = None) -> dict:
    """Tile vs pixel selection, tau up to 0.4, T_k.

    Tile selection drops floor(tau * batch_size) tiles per batch (Algorithm 1 keeps at least
    R(T)|D| of them): with the CPU demo's batches of 4 a tau below 0.25 drops none, and such a
    trial trains two networks as plain training while its row says co-teaching. So at tile
    granularity tau starts at 1 / batch_size (tile selection is offered only where that is at
    most 0.4); pixel selection has no such floor and searches tau from 0 (0: plain training of
    two networks). ``base`` None (a search saved before spaces took a base): tau from 0 for
    both, as it was started.
    """
    batch = None if base is None else int(base.get("batch_size", 8))  # RunConfig's default
    tile_ok = batch is None or TAU_MAX * batch >= 1
    granularity = trial.suggest_categorical(
        "coteach.granularity", ["tile", "pixel"] if tile_ok else ["pixel"]
    )
    low = 1.0 / batch if granularity == "tile" and batch is not None else 0.0
    trial.suggest_float("coteach.tau", low, TAU_MAX)
    trial.suggest_int("coteach.t_k", 1, 5)
    return {"coteach.enabled": True}
