"""Schedule-free AdamW with its CPU step as one compiled pass per parameter; gradient clipping
as two compiled passes.

:class:`AdamWScheduleFree` is the ``schedulefree`` package's optimizer (same hyper-parameters,
state, modes and checkpoints) whose ``step()`` on the CPU calls ``bldseg::
schedulefree_adamw_step_`` (``csrc/optim``, built by the one JIT loader) instead of the
package's eleven foreach ops: on the CPU those are loops of per-tensor calls, 3.6 of the CPU
demo's 54 ms per training step. The package's own ``step()`` is the readable reference; it runs
wherever the compiled one cannot (CUDA, whose foreach kernels are already fused; other dtypes;
no compiler, with a warning) and the two agree to rounding (tests/train/test_optim.py).

:func:`clip_grad_norm_` is ``torch.nn.utils.clip_grad_norm_`` (2-norm) the same way: torch's CPU
foreach norm and multiply are one call per gradient tensor, 0.67 CPU ms per training step for
the CPU demo's 168; ``bldseg::clip_grad_norm_`` is one pass for the norm and one for the scaling,
0.14 ms (``experiments/bench_optim.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import schedulefree
import torch

from bldseg.ops._build import CSRC_DIR, BuildInfo, NativeExtension

__all__ = [
    "AdamWScheduleFree",
    "clip_grad_norm_",
    "load_step_op",
    "native_step_available",
    "update_reference",
]

# -fno-math-errno: sqrt never sets errno, so the loop vectorises (IEEE sqrt is exact either way)
_EXT = NativeExtension(
    "bldseg_optim",
    [
        CSRC_DIR / "optim" / "schedulefree_adamw_cpu.cpp",
        CSRC_DIR / "optim" / "clip_grad_norm_cpu.cpp",
    ],
    extra_cflags=("-fno-math-errno",),
)


def load_step_op(verbose: bool = False) -> BuildInfo:
    """Builds (once per machine) and loads (once per process) the compiled step and clipping.

    Raises:
        BuildError: The op cannot be built; the message carries the compiler output.
    """
    return _EXT.load(verbose=verbose)


def native_step_available() -> bool:
    """True when the compiled step loads; warns once with the reason when it does not."""
    return _EXT.try_load()


@torch.no_grad()
def clip_grad_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor], max_norm: float, fused: bool | None = None
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` with the 2-norm: scales every gradient by
    ``min(1, max_norm / (total_norm + 1e-6))`` and returns ``total_norm``.

    Args:
        parameters: Tensors (or one) whose ``.grad`` are clipped together; None grads skipped.
        max_norm: The largest global 2-norm kept.
        fused: True: the compiled passes (raises where they cannot run); False: torch's; None
            (default): the compiled ones when every gradient is a dense float32 or float64 CPU
            tensor and the op builds. The op sums all squares in float64, torch takes the norm of
            per-tensor norms: the two agree to rounding.
    """
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    if fused and grads:
        _EXT.load()
    elif (
        fused is False
        or not grads
        or grads[0].device.type != "cpu"  # CUDA: torch's foreach kernels are fused already
        or not (_EXT.ready or native_step_available())
    ):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    try:
        # the op checks device, dtype and layout of every gradient before it changes any
        return torch.ops.bldseg.clip_grad_norm_(grads, float(max_norm))
    except RuntimeError:
        # checked here only when the op refused (a check per gradient costs as much as the op)
        eligible = all(
            g.device.type == "cpu"
            and g.dtype in (torch.float32, torch.float64)
            and g.is_non_overlapping_and_dense()
            for g in grads
        )
        if fused or eligible:
            raise
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


class AdamWScheduleFree(schedulefree.AdamWScheduleFree):
    """``schedulefree.AdamWScheduleFree`` with the compiled CPU step.

    Args:
        params: Parameters or parameter groups, as for the package's class.
        fused: True: always the compiled step (raises where it cannot run); False: the
            package's step; None (default): the compiled one when every parameter is a float32
            or float64 CPU tensor and the op builds.
        **kwargs: The package's hyper-parameters (``lr``, ``betas``, ``warmup_steps``, ...).
    """

    def __init__(self, params, *, fused: bool | None = None, **kwargs) -> None:
        # decided at the first step; add_param_group and assigning `fused` decide again
        self._fused_ok: bool | None = None
        self._fused = fused
        super().__init__(params, **kwargs)
        self.fused = fused

    @property
    def fused(self) -> bool | None:
        """True, False or None as in the constructor; assigning it takes effect at the next step."""
        return self._fused

    @fused.setter
    def fused(self, value: bool | None) -> None:
        self._fused = value
        self._fused_ok = None

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._fused_ok = None

    def _use_fused(self) -> bool:
        """Whether ``step()`` runs the compiled op; decided once, not on every step."""
        if self.fused is False:
            return False
        if self._fused_ok is None:
            eligible = all(
                p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64)
                for g in self.param_groups
                for p in g["params"]
            )
            if self.fused:
                if not eligible:
                    raise ValueError("fused=True needs float32 or float64 CPU parameters")
                _EXT.load()
            self._fused_ok = eligible and (bool(self.fused) or native_step_available())
        return self._fused_ok

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One step; the package's bookkeeping per group, then one compiled call per group."""
        if not self._use_fused():
            return super().step(closure)
        if not self.param_groups[0]["train_mode"]:
            # the package's own check and message
            raise Exception(
                "Optimizer was not in train mode when step is called. Please insert .train() "
                "and .eval() calls on the optimizer. See documentation for details."
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            k = group["k"]
            # The package's scalars, in its order (warm-up, bias correction, the average's
            # weight ckp1 from lr_max ** weight_lr_power).
            warmup = group["warmup_steps"]
            lr = group["lr"] * ((k + 1) / warmup if k < warmup else 1.0)
            group["scheduled_lr"] = lr
            lr_max = group["lr_max"] = max(lr, group["lr_max"])
            weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
            weight_sum = group["weight_sum"] = group["weight_sum"] + weight
            ckp1 = weight / weight_sum if weight_sum else 0.0
            active = [p for p in group["params"] if p.grad is not None]
            for p in active:
                state = self.state[p]
                if "z" not in state:
                    state["z"] = torch.clone(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            # The compiled pass walks a parameter, its gradient and its state as flat arrays:
            # they need one layout (autograd's gradients of dense parameters have it).
            flat = [p for p in active if p.grad.stride() == p.stride()]
            scalars = (lr, beta1, beta2, group["eps"], group["weight_decay"], ckp1)
            bias_correction2 = 1 - beta2 ** (k + 1)
            if flat:
                torch.ops.bldseg.schedulefree_adamw_step_(
                    flat,
                    [p.grad for p in flat],
                    [self.state[p]["z"] for p in flat],
                    [self.state[p]["exp_avg_sq"] for p in flat],
                    *scalars,
                    bias_correction2,
                )
            if len(flat) < len(active):
                for p in active:
                    if p.grad.stride() != p.stride():
                        state = self.state[p]
                        update_reference(
                            p, p.grad, state["z"], state["exp_avg_sq"], *scalars, bias_correction2
                        )
            group["k"] = k + 1
        return loss


@torch.no_grad()
def update_reference(
    y: torch.Tensor,
    grad: torch.Tensor,
    z: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    ckp1: float,
    bias_correction2: float,
) -> None:
    """The compiled op's update of one parameter in torch ops (the package's per-tensor path).

    ``y`` (the parameter), ``z`` and ``exp_avg_sq`` are updated in place; ``grad`` is left as
    it is (the package overwrites it with the normalised gradient).
    """
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    normalised = grad / exp_avg_sq.div(bias_correction2).sqrt_().add_(eps)
    if weight_decay != 0:
        normalised.add_(y, alpha=weight_decay)
    y.lerp_(z, weight=ckp1)
    y.add_(normalised, alpha=lr * (beta1 * (1 - ckp1) - 1))
    z.sub_(normalised, alpha=lr)
