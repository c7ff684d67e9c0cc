"""Exponential moving average of a model's weights (as timm's ``ModelEmaV2``/``V3`` and mmengine's
``EMAHook`` keep one).

After every optimizer step the average moves towards the trained weights::

    d = min(decay, (1 + n) / (10 + n))      # n: updates so far; TensorFlow's num_updates warm-up
    avg = d * avg + (1 - d) * weights       # parameters and floating-point buffers (BN stats)

Validation, ``best.pt`` and predictions then use the average: with a high learning rate the
trained weights jump from step to step, and their average over the last ~1/(1 - decay) steps
scores higher and more steadily than any single step's weights. The warm-up keeps the first
epochs' average from dragging the random initialisation along.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightEMA:
    """The averaged copy of ``model`` (same class, same device and memory format).

    Args:
        model: The trained model; copied now, updated by :meth:`update`.
        decay: Weight of the old average per update, in (0, 1).
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        """The decay of the next update (lower during the warm-up)."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Moves the average towards ``model``'s current weights."""
        d = self.current_decay()
        avg_f, new_f = [], []
        for a, b in zip(_tensors(self.module), _tensors(model), strict=True):
            if a.is_floating_point():
                avg_f.append(a)
                new_f.append(b.detach())
            else:  # counters such as BatchNorm's num_batches_tracked follow the model
                a.copy_(b)
        if avg_f:
            # avg += (1 - d) * (new - avg), one fused pass per device and dtype
            torch._foreach_lerp_(avg_f, new_f, 1.0 - d)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights (the model's own keys) and the update count."""
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    # Parameters then buffers, in registration order: the same order in a model and its copy.
    return [*model.parameters(), *model.buffers()]
