"""Benchmark: parameter counts of every model variant, and the CPU (or GPU) training step
(forward, backward, AdamW) of UPerNet-InternImage with the compiled DCNv3 op vs the
pure-PyTorch reference: time and peak memory, each variant in a fresh process.

    python experiments/bench_model.py --json bench/model.json
    python experiments/bench_model.py --model upernet_internimage_t --size 224 --batch 8
    python experiments/bench_model.py --skip-params --precision bf16   # CPU or GPU autocast

Prints a table and writes JSON. Published sizes (ImageNet classifiers / UPerNet with 150
classes): T 30M / 59M, S 50M / 80M, B 97M / 128M.
"""

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bldseg.io import write_json
from bldseg.models import create_backbone, create_model
from bldseg.ops import load_dcnv3_op

from bench_dcnv3 import proc_status_kb  # isort: skip  (this folder is on sys.path)

PUBLISHED = {
    "internimage_t": 30e6,
    "internimage_s": 50e6,
    "internimage_b": 97e6,
    "upernet_internimage_t": 59e6,
    "upernet_internimage_s": 80e6,
    "upernet_internimage_b": 128e6,
}


def n_params(m: torch.nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in m.parameters())


def train_step_stats(
    model_name: str,
    impl: str,
    size: int,
    batch: int,
    iters: int,
    device: torch.device,
    precision: str = "fp32",
) -> dict:
    """One training step after another (forward under ``precision``'s autocast as ``fit`` runs
    it, BCE loss on float32 logits and aux logits, backward, the AdamW step of
    ``build_optimizer``), as in ``fit``; returns times and peak memory.

    Time: best, median and slowest of ``iters`` steps after one warm-up step (the slowest
    shows how noisy the others are). Peak memory: on the CPU the growth of the resident set
    from before the first step to its high-water mark over all steps (run each variant in a
    fresh process: ``--one-impl``), which includes the optimizer state; on CUDA
    ``max_memory_allocated`` growth over the same span.
    """
    from bldseg.train.config import RunConfig
    from bldseg.train.engine import autocast_dtype, build_optimizer

    torch.manual_seed(0)
    model = create_model(model_name, impl=impl).to(device).train()
    opt = build_optimizer(model, RunConfig())
    amp = autocast_dtype(precision, device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = (torch.rand(batch, 1, size, size, device=device) > 0.5).float()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = proc_status_kb("VmRSS") * 1024
    times = []
    for _ in range(iters + 1):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
            out = model(x)
        logits, aux = out["logits"].float(), out["aux_logits"].float()
        loss = F.binary_cross_entropy_with_logits(logits, y)
        loss = loss + 0.4 * F.binary_cross_entropy_with_logits(aux, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = proc_status_kb("VmHWM") * 1024 - before
    steady = times[1:]  # the first step warms up allocators and the op
    return {
        "impl": impl,
        "precision": precision,
        "ms_min": 1000 * min(steady),
        "ms_median": 1000 * statistics.median(steady),
        "ms_max": 1000 * max(steady),
        "images_per_s": batch / min(steady),
        "peak_mib": peak / 2**20,
    }


def _in_subprocess(args: argparse.Namespace, impl: str) -> dict:
    cmd = [sys.executable, __file__, "--one-impl", impl, "--model", args.model]
    cmd += ["--size", str(args.size), "--batch", str(args.batch), "--iters", str(args.iters)]
    cmd += ["--precision", args.precision]
    proc = subprocess.run([*cmd, "--device", args.device], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} step failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def step_table(steps: dict[str, dict]) -> list[str]:
    """The training-step table: per DCNv3 op, best, median and slowest step (the spread of the
    repeats), throughput of the best and peak memory; then the speed-ups."""
    lines = [
        f"  {'DCNv3 op':<10}{'best ms':>10}{'median ms':>11}{'max ms':>9}{'images/s':>10}"
        f"{'peak MiB':>10}"
    ]
    for impl, r in steps.items():
        lines.append(
            f"  {impl:<10}{r['ms_min']:10.0f}{r['ms_median']:11.0f}{r['ms_max']:9.0f}"
            f"{r['images_per_s']:10.2f}{r['peak_mib']:10.0f}"
        )
    c, r = steps["compiled"], steps["reference"]
    lines.append(
        f"  speed-up {r['ms_min'] / c['ms_min']:.2f}x (best), "
        f"{r['ms_median'] / c['ms_median']:.2f}x (median); "
        f"peak memory {c['peak_mib'] / r['peak_mib']:.2f}x the reference's"
    )
    return lines


def param_counts() -> dict:
    """Parameter counts of every variant next to the published ones (printed as a table)."""
    counts = {}
    print(f"{'model':<28}{'params':>14}{'published':>12}{'diff':>8}")
    for name, pub in PUBLISHED.items():
        kw = {"num_classes": 1000} if name.startswith("internimage") else {"num_classes": 150}
        build = create_backbone if name.startswith("internimage") else create_model
        n = n_params(build(name, **kw))
        n1 = None if name.startswith("internimage") else n_params(create_model(name))
        counts[name] = {"params": n, "published": pub, "params_one_class": n1}
        print(f"{name:<28}{n / 1e6:>13.2f}M{pub / 1e6:>11.0f}M{100 * (n - pub) / pub:>7.2f}%")
    tiny = n_params(create_model("upernet_internimage_tiny"))
    counts["upernet_internimage_tiny"] = {"params": tiny}
    print(f"{'upernet_internimage_tiny':<28}{tiny / 1e6:>13.2f}M")
    print(
        "(internimage_*: with the ImageNet head; upernet_*: with 150 classes as published; our"
        " one-class models are smaller by the two classifiers)"
    )
    return counts


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="upernet_internimage_t")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="the training step's autocast, as the run config's precision (fp16: CUDA only)",
    )
    p.add_argument("--json", default=None)
    p.add_argument("--skip-params", action="store_true", help="only the training step")
    p.add_argument("--one-impl", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    # no timed step: statistics.median([]) failed in the child, after the parameter counts
    for flag in ("size", "batch", "iters"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    device = torch.device(args.device)
    if args.one_impl is not None:  # child: one variant's steps, JSON on the last line
        if args.one_impl == "compiled":
            load_dcnv3_op()
        stats = train_step_stats(
            args.model, args.one_impl, args.size, args.batch, args.iters, device, args.precision
        )
        print(json.dumps(stats))
        return
    load_dcnv3_op()  # built once here, not timed in a child

    counts = {} if args.skip_params else param_counts()

    steps = {impl: _in_subprocess(args, impl) for impl in ("compiled", "reference")}
    print(
        f"\n{args.model} training step (fwd + bwd + AdamW), batch {args.batch} at "
        f"{args.size}px on {device} ({torch.get_num_threads()} threads, {args.precision}), "
        f"best / median / max of {args.iters}:"
    )
    print("\n".join(step_table(steps)))
    if args.json:
        record = {
            "params": counts,
            "train_step": {
                "model": args.model,
                "size": args.size,
                "batch": args.batch,
                "device": str(device),
                "precision": args.precision,
                "threads": torch.get_num_threads(),
                "memory_method": "CPU: VmHWM - VmRSS before the first step, in a fresh"
                " process; CUDA: max_memory_allocated growth",
                "steps": steps,
            },
        }
        # through a temporary name: a full disk or a kill leaves the previous file whole
        write_json(args.json, record)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
