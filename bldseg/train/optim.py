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


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` is a strided tensor whose elements fill its memory without gaps or
    overlaps (some order of its dimensions is contiguous): what the ops walk as a flat array.

    ``Tensor.is_non_overlapping_and_dense`` is C++ only; torch's Python one costs ~40 us, so
    the two layouts torch keeps a flag for are asked first.
    """
    if t.layout != torch.strided:
        return False
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return True
    # size-1 dimensions take any stride; the others, by increasing stride, must be contiguous
    expected = 1
    for stride, size in sorted(
        (st, n) for st, n in zip(t.stride(), t.shape, strict=True) if n != 1
    ):
        if stride != expected:
            return False
        expected *= size
    return True


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
            per-tensor norms in the gradients' dtype: the two agree to rounding, overflow
            included (float32 gradients whose squares sum past the float32 range, a norm of
            about 1.8e19: inf, and every gradient zeroed, as torch), and return the norm in
            the same dtype (float64 if any gradient is).
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
            g.device.type == "cpu" and g.dtype in (torch.float32, torch.float64) and _dense(g)
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
        """One step: the package's bookkeeping per group, one compiled call per dtype in it."""
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
            # weight ckp1 from lr_max ** weight_lr_power); written to the group only once its
            # parameters are updated, so a step that raises leaves the group as it was.
            warmup = group["warmup_steps"]
            lr = group["lr"] * ((k + 1) / warmup if k < warmup else 1.0)
            lr_max = max(lr, group["lr_max"])
            weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
            weight_sum = group["weight_sum"] + weight
            ckp1 = weight / weight_sum if weight_sum else 0.0
            bias_correction2 = 1 - beta2 ** (k + 1)
            scalars = (
                lr,
                beta1,
                beta2,
                group["eps"],
                group["weight_decay"],
                ckp1,
                bias_correction2,
            )
            # The compiled pass walks a parameter, its gradient and its state as flat arrays:
            # they need one dense layout (autograd's gradients of dense parameters and state
            # made here have it), and one call takes one dtype.
            flat, others = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "z" not in state:
                    state["z"] = torch.clone(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                (flat if p.grad.stride() == p.stride() else others).append(p)
            try:
                self._compiled_update(flat, scalars)
            except RuntimeError:
                # The op checks every tensor before it changes any, so nothing moved. It takes
                # neither parameters of two dtypes in one call nor state of another layout than
                # its parameter's (a checkpoint of the model in another memory format): one
                # call per dtype, the rest to the reference. Sorted only here, after a refusal:
                # the checks cost ~2 us a parameter, about as much as the compiled update.
                by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
                for p in flat:
                    state = self.state[p]
                    if _flat(p, p.grad, state["z"], state["exp_avg_sq"]):
                        by_dtype.setdefault(p.dtype, []).append(p)
                    else:
                        others.append(p)
                if len(by_dtype) == 1 and len(next(iter(by_dtype.values()))) == len(flat):
                    raise  # refused for a reason of its own: its message says which
                for params in by_dtype.values():
                    self._compiled_update(params, scalars)
            for p in others:
                state = self.state[p]
                update_reference(p, p.grad, state["z"], state["exp_avg_sq"], *scalars)
            group["scheduled_lr"] = lr
            group["lr_max"] = lr_max
            group["weight_sum"] = weight_sum
            group["k"] = k + 1
        return loss

    def _compiled_update(self, params: list[torch.Tensor], scalars: tuple[float, ...]) -> None:
        """The compiled update of ``params`` (one dtype and layout each) with the group's
        ``scalars`` (lr, beta1, beta2, eps, weight_decay, ckp1, bias_correction2)."""
        if params:
            torch.ops.bldseg.schedulefree_adamw_step_(
                params,
                [p.grad for p in params],
                [self.state[p]["z"] for p in params],
                [self.state[p]["exp_avg_sq"] for p in params],
                *scalars,
            )


def _flat(p: torch.Tensor, grad: torch.Tensor, z: torch.Tensor, exp_avg_sq: torch.Tensor) -> bool:
    """Whether the compiled op takes this parameter: the four tensors share a dtype and the
    strides of a dense layout (the op's own checks, short of device and shape)."""
    stride = p.stride()
    return (
        grad.layout == torch.strided
        and grad.dtype == z.dtype == exp_avg_sq.dtype == p.dtype
        and grad.stride() == z.stride() == exp_avg_sq.stride() == stride
        and _dense(p)
    )


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
