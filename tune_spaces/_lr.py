"""The peak-LR range a space searches: from scratch, or around a fine-tuning recipe's LR."""

from typing import Any

import optuna

#: From-scratch AdamW peak LRs for the small CPU models and the GPU-sized ones alike.
SCRATCH_RANGE = (3e-4, 1e-2)

#: Fine-tuning: the base LR (the official recipe's 6e-5, or the user's ``--set optim.lr``)
#: divided and multiplied by this. From-scratch rates would be 5-170x the recipe's and wash
#: out the pretrained features in the first steps.
PRETRAINED_SPAN = 5.0


def suggest_lr(trial: optuna.Trial, base: dict[str, Any]) -> float:
    """Suggests ``optim.lr`` (log-uniform) for a search whose fixed config is ``base``."""
    if base.get("pretrained"):
        lr = float(base.get("optim.lr", 6e-5))
        low, high = lr / PRETRAINED_SPAN, lr * PRETRAINED_SPAN
    else:
        low, high = SCRATCH_RANGE
    return trial.suggest_float("optim.lr", low, high, log=True)
