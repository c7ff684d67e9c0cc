"""Does ``torch.compile`` pay on a CPU? One training step, eager vs compiled, side by side.

A step is what ``fit()`` does per batch, with the run config's settings (default the CPU
demo's: channels-last, bf16 autocast where the CPU computes bf16 natively, schedule-free AdamW
with its compiled step, gradient clipping): forward through ``fit``'s own loss code, backward,
clipping, optimizer step. The compiled model is ``torch.compile(model)`` (inductor, default
mode), as ``--set compile=inductor`` runs it; the DCNv3 op is a ``torch.library`` custom op, so
it stays one call in the graph. The first compiled calls include compilation (reported as
``compile s``: the first step's time minus a steady step's); steady steps are the median of
``--steps`` after ``--warmup``, with the slowest of them beside it (``max ms``: how noisy the
median's steps were). Numerics: the loss of the first step, eager vs compiled, from
the same weights and batch, must agree within ``LOSS_RTOL`` (relative: 1e-4 in float32, where
only the order of the sums differs; 2e-2 under bf16/fp16 autocast, whose 8-bit mantissa the
compiled graph may round at other places) and be finite; otherwise the script writes its
JSON and exits with status 1.

    python experiments/bench_compile.py                       # the demo's settings
    python experiments/bench_compile.py --set precision=fp32 --set sched.name=onecycle
    python experiments/bench_compile.py --set model=upernet_internimage_t --set aug.crop_size=224

Prints a table and writes JSON (``--json``). Run it on a quiet machine: the times are the point.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from bldseg.io import write_json
from bldseg.models import create_model
from bldseg.train import engine
from bldseg.train.config import RunConfig
from bldseg.train.losses import build_loss
from bldseg.train.optim import clip_grad_norm_
from bldseg.tune.cli import CPU_DEMO, parse_set

#: Relative tolerance of the first step's loss, compiled vs eager, by autocast dtype (None:
#: float32, no autocast).
LOSS_RTOL = {None: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def loss_problem(eager: float, compiled: float, amp: torch.dtype | None) -> str | None:
    """Why the first step's losses disagree (or are not finite), in words; None if they agree."""
    if not (math.isfinite(eager) and math.isfinite(compiled)):
        return f"a first-step loss is not finite (eager {eager}, compiled {compiled})"
    rtol = LOSS_RTOL[amp]
    if abs(compiled - eager) > rtol * abs(eager):
        return (
            f"first-step loss compiled {compiled:.8g} vs eager {eager:.8g} (relative "
            f"difference {abs(compiled - eager) / abs(eager):.2g} > tolerance {rtol:g})"
        )
    return None


def step_fn(model: torch.nn.Module, stepper: torch.nn.Module, cfg: RunConfig, total: int):
    """One of ``fit``'s training steps on a batch; returns the loss as a float. ``stepper``
    runs the forward pass (the model itself, or its compiled wrapper sharing its weights)."""
    device = torch.device("cpu")
    amp = engine.autocast_dtype(cfg.precision, device)
    opt = engine.build_optimizer(model, cfg, total_steps=total)
    engine.set_optimizer_mode([opt], train=True)
    loss_fn = build_loss(cfg.loss)

    def step(batch: dict[str, torch.Tensor]) -> float:
        (loss,) = engine._step_losses([stepper], batch, cfg, loss_fn, 1.0, device, amp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        return float(loss.detach())

    return step


def measure(cfg: RunConfig, compiled: bool, warmup: int, steps: int) -> dict[str, float]:
    """Times of the first step, the median and slowest steady step, and the first step's loss."""
    torch.manual_seed(0)
    model = create_model(cfg.model, **cfg.model_kwargs()).train()
    model = engine.to_run_memory_format(model, cfg, torch.device("cpu"))
    stepper = torch.compile(model) if compiled else model
    g = torch.Generator().manual_seed(0)
    b, s = cfg.batch_size, cfg.aug.crop_size
    batch = {
        "image": torch.randn(b, 3, s, s, generator=g),  # (B, 3, S, S)
        "mask": (torch.rand(b, 1, s, s, generator=g) > 0.7).float(),  # (B, 1, S, S)
    }
    step = step_fn(model, stepper, cfg, total=1 + warmup + steps)
    t0 = time.perf_counter()
    first_loss = step(batch)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        step(batch)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - t0)
    steady = statistics.median(times)
    return {
        "first_s": first,
        "step_s": steady,
        "step_max_s": max(times),
        "compile_s": first - steady,
        "loss": first_loss,
    }


def table(rows: dict[str, dict[str, float]]) -> list[str]:
    """Eager vs compiled: the median steady step and the slowest, the first step, compilation
    (compiled only) and the first step's loss."""
    lines = [
        f"{'mode':<10}{'step ms':>9}{'max ms':>9}{'first step s':>14}{'compile s':>11}{'loss':>12}"
    ]
    for mode, r in rows.items():
        lines.append(
            f"{mode:<10}{r['step_s'] * 1e3:>9.1f}{r['step_max_s'] * 1e3:>9.1f}"
            f"{r['first_s']:>14.2f}{r['compile_s'] if mode == 'compiled' else 0:>11.1f}"
            f"{r['loss']:>12.6f}"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run-config values over the CPU demo's (repeatable)",
    )
    p.add_argument("--warmup", type=int, default=3, help="steps after the first (default 3)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--json", default="bench/compile.json")
    args = p.parse_args()
    # no timed step: statistics.median([]) failed after compiling, with a traceback
    if args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    if args.warmup < 0:
        p.error(f"--warmup must be 0 or more, got {args.warmup}")
    cfg = RunConfig.from_flat({**CPU_DEMO, **parse_set(args.set)})
    amp = engine.autocast_dtype(cfg.precision, torch.device("cpu"))
    settings = (
        f"{cfg.model}, batch {cfg.batch_size} at {cfg.aug.crop_size} px, "
        f"{'channels-last' if cfg.channels_last else 'NCHW'}, "
        f"{str(amp).replace('torch.', '') if amp else 'float32'}, {cfg.sched.name}, "
        f"grad clip {cfg.optim.grad_clip:g}"
    )

    rows = {}
    for mode in ("eager", "compiled"):
        print(f"== {mode} ...", flush=True)
        rows[mode] = measure(cfg, mode == "compiled", args.warmup, args.steps)
    e, c = rows["eager"], rows["compiled"]
    print(f"\n{settings}: one training step on the CPU ({torch.get_num_threads()} threads)")
    print("\n".join(table(rows)))
    speedup = e["step_s"] / c["step_s"]
    # Steps before compiling pays for itself (never when compiled is not faster).
    saved = e["step_s"] - c["step_s"]
    breakeven = c["compile_s"] / saved if saved > 0 else float("inf")
    print(f"speed-up {speedup:.2f}x; compilation repaid after {breakeven:.0f} steps")
    problem = loss_problem(e["loss"], c["loss"], amp)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "settings": settings,
        "config": cfg.to_flat(),
        "torch": torch.__version__,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} threads",
        "rows": rows,
        "speedup": speedup,
        "breakeven_steps": breakeven,
        "loss_rtol": LOSS_RTOL[amp],
        "loss_ok": problem is None,
    }
    write_json(path, record, indent=2)
    print(f"wrote {path}")
    if problem is not None:
        # a compiled step that computes another loss is not a faster version of the same step
        sys.exit(f"bench_compile: eager and compiled disagree: {problem} ({path})")


if __name__ == "__main__":
    main()
