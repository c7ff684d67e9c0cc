"""LR-schedule search: the schedule type decides which of its parameters exist."""

from typing import Any

import optuna

from ._lr import suggest_lr


def space(trial: optuna.Trial, base: dict[str, Any] | None = None) -> dict | None:
    """OneCycleLR vs CosineAnnealingWarmupRestarts vs poly vs schedule-free AdamW, with the
    peak LR: 3e-4 to 1e-2 from scratch, the base LR /5 to x5 when fine-tuning (``--pretrained``:
    1.2e-5 to 3e-4 around the official recipe's 6e-5). ``base`` None: from scratch (a search
    saved before spaces took a base calls its space with the trial alone, and goes on so)."""
    suggest_lr(trial, base or {})
    name = trial.suggest_categorical(
        "sched.name", ["onecycle", "cosine_restarts", "poly", "schedulefree"]
    )
    if name == "onecycle":
        trial.suggest_float("sched.pct_start", 0.1, 0.5)
        trial.suggest_float("sched.div_factor", 5.0, 50.0, log=True)
    elif name == "cosine_restarts":
        trial.suggest_int("sched.cycles", 1, 4)
        trial.suggest_float("sched.gamma", 0.5, 1.0)
        trial.suggest_float("sched.warmup_frac", 0.0, 0.3)
    else:
        if name == "poly":
            trial.suggest_float("sched.power", 0.5, 2.0)
        trial.suggest_float("sched.warmup_frac", 0.0, 0.2)
    # A fixed warm-up length (the pretrained recipe's 1500 steps) would override the searched
    # share (OneCycle's rise is pct_start): the searched value must be the one that applies, and
    # the trial's recorded config must not name a warm-up it did not run.
    return {"sched.warmup_steps": 0}
