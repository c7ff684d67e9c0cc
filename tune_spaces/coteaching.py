"""Co-teaching search for noisy masks: the forget rate tau, its ramp and granularity."""

import optuna


def space(trial: optuna.Trial) -> dict:
    """tau in [0, 0.4] (0 = plain training of two networks), T_k, tile vs pixel selection.

    Tile selection drops floor(tau * batch_size) tiles per batch (Algorithm 1 keeps at least
    R(T)|D| of them): with the CPU demo's small batches only tau >= 1 / batch_size drops any,
    and lower values train as tau = 0 (fit warns). Pixel selection has no such floor.
    """
    trial.suggest_float("coteach.tau", 0.0, 0.4)
    trial.suggest_int("coteach.t_k", 1, 5)
    trial.suggest_categorical("coteach.granularity", ["tile", "pixel"])
    return {"coteach.enabled": True}
