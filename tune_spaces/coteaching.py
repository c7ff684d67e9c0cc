"""Co-teaching search for noisy masks: the forget rate tau, its ramp and granularity."""

import optuna


def space(trial: optuna.Trial) -> dict:
    """tau in [0, 0.4] (0 = plain training of two networks), T_k, tile vs pixel selection."""
    trial.suggest_float("coteach.tau", 0.0, 0.4)
    trial.suggest_int("coteach.t_k", 1, 5)
    trial.suggest_categorical("coteach.granularity", ["tile", "pixel"])
    return {"coteach.enabled": True}
