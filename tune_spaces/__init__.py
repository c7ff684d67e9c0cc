"""Search spaces: Optuna define-by-run functions over flat ``RunConfig`` keys, and nothing else.

A space is ``space(trial: optuna.Trial) -> dict | None``: it suggests values named by the flat
config keys they set (``"aug.scale_limit"``, ``"sched.name"``, ...) and may return constants.
A space may take a second argument, ``space(trial, base=None)``: the search's fixed flat run
config (read, not changed), e.g. to centre the LR range on a fine-tuning recipe's LR. Its default
must keep ``space(trial)`` working: a search saved by Tune before may call it so on a resume.
Conditional parameters are plain ``if``s: the scheduler type decides which of its parameters
exist. ``bldseg.tune.runner.validate_space`` samples a space before any trial starts and rejects an
unknown key or an impossible value, naming it.
"""

from .augmentation import space as augmentation
from .coteaching import space as coteaching
from .models import space as models
from .scheduler import space as scheduler

SPACES = {
    "augmentation": augmentation,
    "scheduler": scheduler,
    "coteaching": coteaching,
    "models": models,  # needs bldseg[smp]: UPerNet-InternImage vs smp UNet/UPerNet/FPN
}

__all__ = ["SPACES", "augmentation", "coteaching", "models", "scheduler"]
