"""Does ``torch.compile`` pay on a CPU? One training step, eager vs compiled, side by side.

A step is what ``fit()`` does per batch: forward, BCE on the main and auxiliary logits,
backward, AdamW step. The compiled model is ``torch.compile(model)`` (inductor, default
mode); the DCNv3 op is a ``torch.library`` custom op, so it stays one call in the graph. The
first compiled calls include compilation (reported as ``compile s``: the first step's time
minus a steady step's); steady steps are the median of ``--steps`` after ``--warmup``.
Numerics: the loss of the first step, eager vs compiled, from the same weights and batch.

    python experiments/bench_compile.py                       # the demo's model, 192 px, batch 4
    python experiments/bench_compile.py --model upernet_internimage_t --size 224 --batch 8

Prints a table and writes JSON (``--json``). Run it on a quiet machine: the times are the point.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bldseg.io import write_json
from bldseg.models import create_model
from bldseg.tune.cli import CPU_DEMO


def step_fn(model: torch.nn.Module, opt: torch.optim.Optimizer):
    """One training step on (x, y); returns the loss as a float."""

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        out = model(x)
        logits = out["logits"] if isinstance(out, dict) else out  # (B, 1, H, W)
        loss = F.binary_cross_entropy_with_logits(logits, y)
        if isinstance(out, dict) and out.get("aux_logits") is not None:
            loss = loss + 0.4 * F.binary_cross_entropy_with_logits(out["aux_logits"], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss)

    return step


def measure(
    name: str, compiled: bool, size: int, batch: int, warmup: int, steps: int
) -> dict[str, float]:
    """Times of the first step and the median steady step, and the first step's loss."""
    torch.manual_seed(0)
    model = create_model(name).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if compiled:
        model = torch.compile(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)  # (B, 3, S, S)
    y = (torch.rand(batch, 1, size, size, generator=g) > 0.7).float()  # (B, 1, S, S)
    step = step_fn(model, opt)
    t0 = time.perf_counter()
    first_loss = step(x, y)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        step(x, y)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - t0)
    steady = statistics.median(times)
    return {"first_s": first, "step_s": steady, "compile_s": first - steady, "loss": first_loss}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=CPU_DEMO["model"])
    p.add_argument("--size", type=int, default=CPU_DEMO["aug.crop_size"])
    p.add_argument("--batch", type=int, default=CPU_DEMO["batch_size"])
    p.add_argument("--warmup", type=int, default=3, help="steps after the first (default 3)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--json", default="bench/compile.json")
    args = p.parse_args()

    rows = {}
    for mode in ("eager", "compiled"):
        print(f"== {mode} ...", flush=True)
        rows[mode] = measure(
            args.model, mode == "compiled", args.size, args.batch, args.warmup, args.steps
        )
    e, c = rows["eager"], rows["compiled"]
    print(
        f"\n{args.model}, batch {args.batch} at {args.size} px, one training step on the CPU "
        f"({torch.get_num_threads()} threads)"
    )
    print(f"{'mode':<10}{'step ms':>9}{'first step s':>14}{'compile s':>11}{'loss':>12}")
    for mode, r in rows.items():
        print(
            f"{mode:<10}{r['step_s'] * 1e3:>9.1f}{r['first_s']:>14.2f}"
            f"{r['compile_s'] if mode == 'compiled' else 0:>11.1f}{r['loss']:>12.6f}"
        )
    speedup = e["step_s"] / c["step_s"]
    # Steps before compiling pays for itself (never when compiled is not faster).
    saved = e["step_s"] - c["step_s"]
    breakeven = c["compile_s"] / saved if saved > 0 else float("inf")
    print(f"speed-up {speedup:.2f}x; compilation repaid after {breakeven:.0f} steps")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "model": args.model,
        "size": args.size,
        "batch": args.batch,
        "torch": torch.__version__,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} threads",
        "rows": rows,
        "speedup": speedup,
        "breakeven_steps": breakeven,
    }
    write_json(path, record, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
