"""The optimizer's part of a CPU training step: the schedulefree package's step and torch's
``clip_grad_norm_`` against bldseg's compiled ones, on one model's gradients.

The model is built as the CPU demo builds it (``CPU_DEMO``: channels-last, so its gradients
and the optimizer state are channels-last too) and back-propagates one batch; each timed call
then runs on those gradients (copied back before every clipping call, so it clips the same
values). CPU ms per call: the median and the slowest of ``--calls`` after ``--warmup`` (the
slowest shows how noisy the median's calls were), process CPU time (all torch threads), at
each ``--threads``. A check beside the times: the two clipped gradients
and norms, and the parameters after the same steps, agree to rounding; beyond the tolerances
below (or with a non-finite value) the script writes its JSON and exits with status 1:

* clipped norm: relative difference <= ``NORM_RTOL`` (1e-5: float32 sums of a million terms);
* clipped gradient: largest difference <= ``CLIP_RTOL`` x the clipped gradients' norm
  (``--max-norm``, or the norm where it is below that);
* parameters after 5 steps: largest difference <= ``STEP_ATOL`` (1e-5; float32 rounding of
  parameters of order 1 is ~1e-7 a step).

    python experiments/bench_optim.py                         # the demo model
    python experiments/bench_optim.py --model upernet_internimage_t --size 224 --batch 2

Prints a table and writes JSON (``--json``). Run it on a quiet machine: the times are the point.
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import schedulefree
import torch
import torch.nn.functional as F

from bldseg.io import write_json
from bldseg.models import create_model
from bldseg.train.optim import AdamWScheduleFree, clip_grad_norm_, load_step_op

NORM_RTOL = 1e-5  # clipped norm, relative to torch's
CLIP_RTOL = 1e-5  # clipped gradient, relative to the clipped gradients' norm
STEP_ATOL = 1e-5  # parameters after 5 steps, absolute


def numerics_problems(record: dict[str, Any], max_norm: float) -> list[str]:
    """What of the numerics check exceeds its tolerance or is not finite; [] when all pass."""
    problems = []
    values = ("norm_torch", "norm_bldseg", "clip_max_abs_diff", "step_max_abs_diff")
    bad = [k for k in values if not math.isfinite(record[k])]
    if bad:
        problems.append(f"non-finite {', '.join(f'{k}={record[k]}' for k in bad)}")
    norm_diff = abs(record["norm_bldseg"] - record["norm_torch"])
    if norm_diff > NORM_RTOL * abs(record["norm_torch"]):
        problems.append(
            f"clipped norm ours {record['norm_bldseg']:.8g} vs torch {record['norm_torch']:.8g} "
            f"(relative tolerance {NORM_RTOL:g})"
        )
    clipped_norm = min(max_norm, abs(record["norm_torch"]))  # what clipping leaves
    if record["clip_max_abs_diff"] > CLIP_RTOL * clipped_norm:
        problems.append(
            f"clipped gradient differs by {record['clip_max_abs_diff']:.3g} "
            f"(tolerance {CLIP_RTOL:g} x the clipped norm {clipped_norm:.6g})"
        )
    if record["step_max_abs_diff"] > STEP_ATOL:
        problems.append(
            f"a parameter after 5 steps differs by {record['step_max_abs_diff']:.3g} "
            f"(tolerance {STEP_ATOL:g})"
        )
    return problems


def cpu_ms(fn: Callable[[], object], warmup: int, calls: int) -> tuple[float, float]:
    """Median and slowest process CPU milliseconds of ``fn()`` over ``calls`` after ``warmup``."""
    times = []
    for i in range(warmup + calls):
        c0 = time.process_time()
        fn()
        if i >= warmup:
            times.append(time.process_time() - c0)
    return 1e3 * statistics.median(times), 1e3 * max(times)


#: Table columns: (heading, row key); each key has its median (``key``) and slowest call
#: (``key_max``) in the row.
COLUMNS = (
    ("step pkg", "step_package_ms"),
    ("step ours", "step_bldseg_ms"),
    ("clip torch", "clip_torch_ms"),
    ("clip ours", "clip_bldseg_ms"),
)


def table(rows: list[dict[str, float | int]]) -> list[str]:
    """The times per thread count: each column's median / slowest call, in CPU ms."""
    lines = [f"{'threads':>7}" + "".join(f"{head:>18}" for head, _ in COLUMNS)]
    for r in rows:
        cells = "".join(f"{r[k]:>8.3f} / {r[k + '_max']:>7.3f}" for _, k in COLUMNS)
        lines.append(f"{r['threads']:>7}{cells}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="upernet_internimage_tiny")
    ap.add_argument("--size", type=int, default=192, help="crop size of the one batch (px)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--max-norm", type=float, default=1e-3, help="small, so every call scales")
    ap.add_argument("--json", type=Path, default=Path("results/bench_optim.json"))
    args = ap.parse_args()
    # no timed call (statistics.median([])) or no batch failed with a traceback after the setup
    for flag in ("size", "batch", "calls"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        ap.error(f"--warmup must be 0 or more, got {args.warmup}")
    if bad := [t for t in args.threads if t < 1]:
        ap.error(f"--threads must each be at least 1, got {bad[0]}")
    load_step_op()

    torch.manual_seed(0)
    model = create_model(args.model).to(memory_format=torch.channels_last).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g)  # (B, 3, S, S)
    y = (torch.rand(args.batch, 1, args.size, args.size, generator=g) > 0.7).float()
    out = model(x.contiguous(memory_format=torch.channels_last))
    loss = F.binary_cross_entropy_with_logits(out["logits"], y)
    if out.get("aux_logits") is not None:  # as fit() trains: every tensor gets a gradient
        loss = loss + model.aux_weight * F.binary_cross_entropy_with_logits(out["aux_logits"], y)
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad.clone() for p in params]
    n_elem = sum(p.numel() for p in params)

    def restore() -> None:
        for p, gr in zip(params, grads, strict=True):
            p.grad.copy_(gr)

    # numerics beside the times: the same clipping and 5 steps from the same point
    restore()
    norm_torch = torch.nn.utils.clip_grad_norm_(params, args.max_norm)
    clipped = [p.grad.clone() for p in params]
    restore()
    norm_ours = clip_grad_norm_(params, args.max_norm, fused=True)
    clip_diff = max(float((p.grad - c).abs().max()) for p, c in zip(params, clipped, strict=True))
    restore()
    twins = {}
    for name, cls, kw in (
        ("package", schedulefree.AdamWScheduleFree, {}),
        ("bldseg", AdamWScheduleFree, {"fused": True}),
    ):
        twin = copy.deepcopy(params)
        opt = cls(twin, lr=3e-3, warmup_steps=2, **kw)
        opt.train()
        for _ in range(5):
            # the package leaves its normalised gradient in .grad: every step gets the original
            for t, gr in zip(twin, grads, strict=True):
                t.grad = gr.clone()
            opt.step()
        twins[name] = (twin, opt)
    step_diff = max(
        float((a - b).detach().abs().max())
        for a, b in zip(twins["package"][0], twins["bldseg"][0], strict=True)
    )

    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        row: dict[str, float | int] = {"threads": threads}
        for name, (_, opt) in twins.items():
            row[f"step_{name}_ms"], row[f"step_{name}_ms_max"] = cpu_ms(
                opt.step, args.warmup, args.calls
            )

        def clip_torch() -> None:
            restore()
            torch.nn.utils.clip_grad_norm_(params, args.max_norm)

        def clip_ours() -> None:
            restore()
            clip_grad_norm_(params, args.max_norm)

        row["restore_ms"], row["restore_ms_max"] = cpu_ms(restore, args.warmup, args.calls)
        # the copy back is timed alone and its median taken off both clipping times (the
        # slowest clipping call's too: what is left is the clipping's own spread)
        for name, clip in (("torch", clip_torch), ("bldseg", clip_ours)):
            median, slowest = cpu_ms(clip, args.warmup, args.calls)
            row[f"clip_{name}_ms"] = median - row["restore_ms"]
            row[f"clip_{name}_ms_max"] = slowest - row["restore_ms"]
        rows.append(row)

    print(
        f"{args.model}: {len(params)} tensors, {n_elem:,} parameters; CPU ms per call, "
        f"median / slowest of {args.calls}"
    )
    print("\n".join(table(rows)))
    print(
        f"clipped norm torch {float(norm_torch):.6g} / ours {float(norm_ours):.6g}; largest "
        f"difference of a clipped gradient {clip_diff:.2e}, of a parameter after 5 steps "
        f"{step_diff:.2e}"
    )
    record = {
        "model": args.model,
        "tensors": len(params),
        "parameters": n_elem,
        "size": args.size,
        "batch": args.batch,
        "calls": args.calls,
        "rows": rows,
        "norm_torch": float(norm_torch),
        "norm_bldseg": float(norm_ours),
        "clip_max_abs_diff": clip_diff,
        "step_max_abs_diff": step_diff,
        "machine": platform.processor() or platform.machine(),
    }
    problems = numerics_problems(record, args.max_norm)
    record["tolerances"] = {"norm_rtol": NORM_RTOL, "clip_rtol": CLIP_RTOL, "step_atol": STEP_ATOL}
    record["numerics_ok"] = not problems
    path = write_json(args.json, record)
    print(f"wrote {path}")
    if problems:
        # the times of two paths that compute different things compare nothing
        sys.exit(f"bench_optim: ours and the reference disagree: {'; '.join(problems)} ({path})")


if __name__ == "__main__":
    main()
