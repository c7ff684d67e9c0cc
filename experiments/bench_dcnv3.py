"""Benchmark the DCNv3 op: compiled vs the pure-PyTorch reference, forward and forward+backward.

Shapes are those of the four InternImage levels at a 224 input (kernel 3, stride 1, pad 1,
group_channels 16): T = channels 64/128/256/512, groups 4/8/16/32 at 56/28/14/7; B = channels
112/224/448/896, groups 7/14/28/56.

Memory: on the CPU each (level, impl, mode) runs in a fresh subprocess, and peak memory is
the growth of its resident set during the first call: VmHWM is reset through
/proc/self/clear_refs, then peak = VmHWM - VmRSS(before the call), so the imports, the inputs
and any allocator cache from earlier calls are left out. On CUDA it is
torch.cuda.max_memory_allocated() minus the memory allocated before the call.
Time: best, median and slowest of --repeat calls after one warm-up call; the tables show the
best, which is the least disturbed by other work on a shared machine, and beside it how much
slower the slowest call was (``+N%``), so a noisy case shows (the JSON has all three).

    python experiments/bench_dcnv3.py                      # T and B levels, CPU (+ CUDA)
    python experiments/bench_dcnv3.py --levels T --json out.json
    python experiments/bench_dcnv3.py --levels T --dtype bfloat16   # as bf16 training runs it

Numerics: every compiled case is checked against the reference on the same inputs, once,
outside the timed calls (in the compiled case's child): the output and, for fwd+bwd, the three
gradients, each within ``CHECK_RTOL`` of the dtype (float64 1e-10, float32 1e-4, bfloat16
2e-2) times the reference tensor's largest magnitude (at least 1); the compiled module rows
likewise against the reference op module, in float32. The tables show the largest difference
(``max|diff|``, ``!`` beyond tolerance), the JSON each tensor's (``check``); a case beyond
tolerance makes the script exit with status 1 naming it, after writing the JSON.

--dtype bfloat16 gives both ops bf16 tensors (what they get in a module under bf16 autocast;
both convert to float32 around their sampling and back: the reference's grid_sample sampled
in bf16 gave wrong values and NaN), and
runs the module cases under torch.autocast, weights in float32, as `precision=bf16` trains.

Kernels: the compiled op picks its CPU instruction set once per process from the CPU and the
BLDSEG_CPU_* variables (AVX2 by default; BLDSEG_CPU_NO_AVX2, BLDSEG_CPU_AVX512). The op cases
run in children without this process's BLDSEG_CPU_* variables (the CPU's default kernels, or
--isa's), the module cases in this process (with them): every row of the JSON says which
instruction set its compiled op ran (``isa``; None where no compiled CPU kernel ran), and the
tables say so where the two differ. --devices naming a device this machine lacks, or a run in
which no case ran, exits with an error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bldseg.io import write_json
from bldseg.ops import dcnv3, load_dcnv3_op

# level name -> list of (height = width, channels, group) at a 224 input.
LEVELS: dict[str, list[tuple[int, int, int]]] = {
    "T": [(56, 64, 4), (28, 128, 8), (14, 256, 16), (7, 512, 32)],
    "B": [(56, 112, 7), (28, 224, 14), (14, 448, 28), (7, 896, 56)],
}
MODES = ("fwd", "fwd+bwd")
IMPLS = ("compiled", "reference")


@dataclass
class Case:
    level: str  # "T" or "B"
    size: int  # H = W of the feature map
    channels: int  # group * group_channels
    group: int  # DCNv3 groups
    batch: int  # N
    impl: str  # "compiled" or "reference"
    mode: str  # "fwd" or "fwd+bwd"
    device: str  # "cpu" or "cuda"
    dtype: str  # "float32", "float64", ...


@dataclass
class Result:
    case: Case
    ms: float  # median time of one call
    ms_min: float  # best time of one call (the table uses it: robust to a busy machine)
    ms_max: float  # slowest call: its distance from the best is the spread the tables show
    peak_mb: float  # peak memory growth during one call, MiB
    isa: str | None = None  # the compiled op's CPU instruction set (op_isa); None: none ran
    check: dict[str, Any] | None = None  # compiled vs reference (compare); compiled cases only


def _inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, case.dtype)
    # bf16 (and fp16) inputs are the float32 ones rounded: the same values as far as they go
    draw = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    n, s, c, g = case.batch, case.size, case.channels, case.group
    grad = case.mode == "fwd+bwd"
    x = torch.randn(n, s, s, c, generator=gen, dtype=draw)
    offset = torch.randn(n, s, s, g * 9 * 2, generator=gen, dtype=draw)
    mask = torch.softmax(torch.randn(n, s, s, g, 9, generator=gen, dtype=draw), -1)
    tensors = [t.to(case.device, dtype) for t in (x, offset, mask.reshape(n, s, s, g * 9))]
    return tuple(t.requires_grad_(grad) for t in tensors)  # type: ignore[return-value]


def _op(case: Case, impl: str, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor):
    c = case.channels // case.group
    return dcnv3(x, offset, mask, 3, 3, 1, 1, 1, 1, 1, 1, case.group, c, 1.0, 256, impl=impl)


def _call(case: Case, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> None:
    out = _op(case, case.impl, x, offset, mask)
    if case.mode == "fwd+bwd":
        out.backward(torch.ones_like(out))
        for t in (x, offset, mask):
            t.grad = None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


#: What the numerics check allows, compiled vs reference, as a share of the reference tensor's
#: largest magnitude (at least 1), by dtype: float64 as tests/ops/test_dcnv3.py compares them
#: (1e-10, PRODUCT.md's target), float32 as its float32 kernel tests (1e-4), bfloat16 a few of
#: its roundings (8 bits: ~4e-3 each; ours rounds once at the end, the reference inside
#: grid_sample).
CHECK_RTOL = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 2e-2}


def compare(
    got: Sequence[torch.Tensor],
    want: Sequence[torch.Tensor],
    names: Sequence[str],
    rtol: float,
    keep: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Compiled (``got``) vs reference (``want``) tensors, each against ``rtol`` x the reference
    tensor's largest magnitude (at least 1); a NaN anywhere fails.

    Args:
        keep: By name, a boolean mask of the elements compared (default: all).

    Returns:
        ``max_abs_diff`` (the largest over the tensors), ``worst`` (the tensor nearest its
        tolerance or furthest past it) and its ``ratio`` (difference / tolerance), ``ok``,
        ``rtol`` and ``diffs`` (per tensor, the largest difference).
    """
    keep = keep or {}
    diffs: dict[str, float] = {}
    ratios: dict[str, float] = {}
    for name, a, b in zip(names, got, want, strict=True):
        a, b = a.detach().double(), b.detach().double()
        if name in keep:
            a, b = a[keep[name]], b[keep[name]]
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
        diffs[name] = diff
        ratios[name] = diff / (rtol * scale)  # NaN stays NaN
    worst = max(ratios, key=lambda n: math.inf if math.isnan(ratios[n]) else ratios[n])
    return {
        "max_abs_diff": max(diffs.values(), key=lambda d: math.inf if math.isnan(d) else d),
        "worst": worst,
        "ratio": ratios[worst],
        "ok": all(r <= 1 for r in ratios.values()),
        "rtol": rtol,
        "diffs": diffs,
    }


def check_case(
    case: Case, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor
) -> dict[str, Any]:
    """The compiled op against the reference on the inputs both are timed on, once each,
    outside the timed calls: the output and, for fwd+bwd, the three gradients under one seeded
    random output gradient (:func:`compare`, :data:`CHECK_RTOL` of the case's dtype)."""
    grad = case.mode == "fwd+bwd"
    tensors = {}
    for impl in IMPLS:
        leaves = [t.detach().clone().requires_grad_(grad) for t in (x, offset, mask)]
        out = _op(case, impl, *leaves)
        got = [out.detach()]
        if grad:
            g = torch.Generator().manual_seed(1)
            grad_out = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
            got += torch.autograd.grad(out, leaves, grad_out)
        tensors[impl] = got
    names = ("out", "grad_input", "grad_offset", "grad_mask")[: len(tensors["compiled"])]
    # Bilinear sampling has a kink where a sample falls on the pixel grid: here (kernel 3,
    # stride, pad and dilation 1, offset_scale 1: an integer base grid) where an offset is a
    # whole number once added to its coordinate. Either one-sided derivative is right there,
    # and the two ops may take different sides (or round the sum to the grid differently).
    # bfloat16 offsets are whole numbers about 1 in 200; float32 ones from randn are within
    # float32 rounding of the coordinate (ulp ~4e-6 at 56) a few times in the 1.8M offsets of
    # level 1, which gave 200x the tolerance. Those elements of the offset gradient are left
    # out: within 8 float32 ulps of the largest coordinate of a whole number.
    off = offset.detach().double()
    near = 8 * torch.finfo(torch.float32).eps * (case.size + 2)
    keep = {"grad_offset": (off - off.round()).abs() > near} if grad else {}
    check = compare(tensors["compiled"], tensors["reference"], names, CHECK_RTOL[case.dtype], keep)
    return check | {"kinks_left_out": int((~keep["grad_offset"]).sum()) if grad else 0}


def proc_status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS, VmHWM, ...)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_case(case: Case, repeat: int) -> Result:
    """Measures one case in this process (a fresh one on the CPU, for the memory figure)."""
    if case.impl == "compiled":
        load_dcnv3_op()
    x, offset, mask = _inputs(case)
    # 1. Peak memory of the first call.
    if case.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _call(case, x, offset, mask)
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
        before_kb = proc_status_kb("VmRSS")
        _call(case, x, offset, mask)
        peak_mb = (proc_status_kb("VmHWM") - before_kb) / 1024
    # 2. Time.
    times = []
    for _ in range(repeat):
        _sync(case.device)
        start = time.perf_counter()
        _call(case, x, offset, mask)
        _sync(case.device)
        times.append(time.perf_counter() - start)
    isa = op_isa(os.environ) if case.impl == "compiled" and case.device == "cpu" else None
    ms = [1000 * t for t in times]
    # 3. Numerics, after the timed calls: in the compiled case's process, running the
    # reference once beside it.
    check = check_case(case, x, offset, mask) if case.impl == "compiled" else None
    return Result(case, statistics.median(ms), min(ms), max(ms), peak_mb, isa, check)


#: CPU instruction sets of the compiled op, and the environment that selects each (read once
#: per process by the op, so each runs in its own subprocess).
ISA_ENV = {
    "baseline": {"BLDSEG_CPU_NO_AVX2": "1"},
    "avx2": {},
    "avx512": {"BLDSEG_CPU_AVX512": "1"},
}


#: The CPU features each of the compiled op's instruction sets needs.
ISA_FEATURES = {
    "avx2": {"avx2", "fma"},
    "avx512": {"avx512f", "avx512vl", "avx512dq", "avx512bw"},
}


def _cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The CPU's feature flags (Linux); None where they cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def op_isa(
    env: Mapping[str, str], flags: set[str] | None = None, machine: str | None = None
) -> str:
    """The instruction set the compiled op's CPU kernels run with in a process whose
    environment is ``env``, decided as ``cpu_isa()`` in csrc/dcnv3/cpu/dcnv3_cpu_kernel.cpp
    decides it (a variable counts when it is set at all, whatever its value).

    Args:
        env: The process's environment.
        flags: The CPU's feature flags; default: this machine's (/proc/cpuinfo).
        machine: ``platform.machine()``; default: this machine's.

    Returns:
        ``baseline``, ``avx2`` or ``avx512``; ``unknown`` on an x86 CPU whose flags cannot be
        read.
    """
    machine = platform.machine() if machine is None else machine
    if machine.lower() not in ("x86_64", "amd64"):
        return "baseline"  # the kernels dispatch on x86-64 only
    flags = _cpu_flags() if flags is None else flags
    if flags is None:
        return "unknown"
    if not ISA_FEATURES["avx2"] <= flags or switch_on(env, "BLDSEG_CPU_NO_AVX2"):
        return "baseline"
    if ISA_FEATURES["avx512"] <= flags and switch_on(env, "BLDSEG_CPU_AVX512"):
        return "avx512"
    return "avx2"


def switch_on(env: Mapping[str, str], name: str) -> bool:
    """Whether a BLDSEG_CPU_* switch is on, as the kernels read it: set to anything but "", 0,
    false, no or off (any case, no spaces trimmed: "0 " is on there too)."""
    return env.get(name, "").lower() not in ("", "0", "false", "no", "off")


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of an op case's child: this one without BLDSEG_CPU_* (the op's default
    kernels, whatever this shell asks for), then ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BLDSEG_CPU_")}
    return clean | dict(env or {})


#: glibc tunables that keep freed memory in the process's heap (no munmap, no trimming), for
#: --malloc-retain. With glibc's defaults a large tensor freed and allocated again comes back
#: either as the same heap memory or as fresh pages that fault on first touch, depending on the
#: heap's state, which differs from process to process: the T level-1 backward then runs at
#: about 5 or about 11 ms (2 threads) by process. Retaining memory costs resident memory
#: (UPerNet-InternImage-T training step: peak 4,337 instead of 3,763 MiB, 12% faster).
MALLOC_RETAIN = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 32)}


def run_in_subprocess(case: Case, repeat: int, env: dict[str, str] | None = None) -> Result:
    cmd = [
        sys.executable,
        __file__,
        "--one-case",
        json.dumps(asdict(case)),
        "--repeat",
        str(repeat),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=child_env(env))
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-4000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    return Result(
        Case(**data["case"]),
        data["ms"],
        data["ms_min"],
        data["ms_max"],
        data["peak_mb"],
        data.get("isa"),
        data.get("check"),
    )


def spread(best: float, worst: float) -> str:
    """How much slower the slowest repeat was than the best, for a table cell: ``+12%``."""
    if not (best > 0 and math.isfinite(worst)):
        return "-"  # no case (nan), or a time too short to measure
    return f"+{100 * (worst / best - 1):.0f}%"


def diff_cell(checks: Sequence[dict[str, Any] | None]) -> str:
    """The largest compiled-vs-reference difference among ``checks`` for a table cell, ``!``
    after it when any is beyond its tolerance; ``-`` where none was checked."""
    done = [c for c in checks if c]
    if not done:
        return "-"
    diff = max((c["max_abs_diff"] for c in done), key=lambda d: math.inf if math.isnan(d) else d)
    return f"{diff:.1e}" + ("" if all(c["ok"] for c in done) else "!")


def _table(results: list[Result]) -> str:
    # One row per (device, level, shape, mode): compiled vs reference and the ratios; each
    # best time with the slowest call's excess over it (+max), so a noisy row is seen as such;
    # last the numerics check's largest difference.
    rows = {}
    for r in results:
        c = r.case
        key = (c.device, c.level, c.size, c.channels, c.group, c.mode)
        rows.setdefault(key, {})[c.impl] = r
    head = (
        f"{'dev':4} {'lvl':3} {'shape (N,H,W,C) G':>22} {'mode':8} "
        f"{'comp ms':>9} {'+max':>5} {'ref ms':>9} {'+max':>5} {'speedup':>8} "
        f"{'comp MiB':>9} {'ref MiB':>9} {'mem x':>6} {'max|diff|':>9}"
    )
    lines = [head, "-" * len(head)]
    totals: dict[tuple[str, str, str], list[float]] = {}
    checks: dict[tuple[str, str, str], list[dict[str, Any] | None]] = {}
    nan = float("nan")
    for key, by_impl in rows.items():
        device, level, size, channels, group, mode = key
        comp, ref = by_impl.get("compiled"), by_impl.get("reference")
        batch = (comp or ref).case.batch  # type: ignore[union-attr]
        shape = f"({batch},{size},{size},{channels}) {group}"
        speed = ref.ms_min / comp.ms_min if comp and ref else nan
        mem = ref.peak_mb / comp.peak_mb if comp and ref and comp.peak_mb > 0 else nan
        times = [(r.ms_min, r.ms_max) if r else (nan, nan) for r in (comp, ref)]
        lines.append(
            f"{device:4} {level:3} {shape:>22} {mode:8} "
            + "".join(f"{best:9.2f} {spread(best, worst):>5} " for best, worst in times)
            + f"{speed:8.2f} {comp.peak_mb if comp else nan:9.1f} "
            f"{ref.peak_mb if ref else nan:9.1f} {mem:6.2f} "
            f"{diff_cell([comp.check if comp else None]):>9}"
        )
        if comp:
            checks.setdefault((device, level, mode), []).append(comp.check)
        if comp and ref:
            tot = totals.setdefault((device, level, mode), [0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
            tot[0] += comp.ms_min
            tot[1] += comp.ms_max
            tot[2] += ref.ms_min
            tot[3] += ref.ms_max
            tot[4] = max(tot[4], comp.peak_mb)
            tot[5] = max(tot[5], ref.peak_mb)
    lines.append("-" * len(head))
    lines.append("ms: the best call; +max: how much slower the slowest call was")
    lines.append(
        "max|diff|: compiled vs reference on the same inputs, output (fwd+bwd: and gradients); "
        "! = beyond tolerance"
    )
    lines.append("level totals (time: sum over the 4 shapes; memory and max|diff|: max over them)")
    for (device, level, mode), (ct, cx, rt, rx, cm, rm) in totals.items():
        lines.append(
            f"{device:4} {level:3} {'all 4 shapes':>22} {mode:8} {ct:9.2f} {spread(ct, cx):>5} "
            f"{rt:9.2f} {spread(rt, rx):>5} {rt / ct:8.2f} {cm:9.1f} {rm:9.1f} "
            f"{rm / cm if cm > 0 else nan:6.2f} {diff_cell(checks[device, level, mode]):>9}"
        )
    return "\n".join(lines)


def time_isas(
    levels: list[str], batch: int, dtype: str, repeat: int, isas: list[str]
) -> list[dict]:
    """The compiled op on the CPU with each instruction set, fwd+bwd per level shape."""
    rows = []
    for level in levels:
        for size, channels, group in LEVELS[level]:
            case = Case(level, size, channels, group, batch, "compiled", "fwd+bwd", "cpu", dtype)
            for isa in isas:
                result = run_in_subprocess(case, repeat, ISA_ENV[isa])
                rows.append(
                    {
                        "level": level,
                        "size": size,
                        "channels": channels,
                        "group": group,
                        "isa": isa,
                        # what ran: a CPU without AVX-512 runs its AVX2 kernels for "avx512"
                        "isa_used": result.isa,
                        "ms_min": result.ms_min,
                        "ms_median": result.ms,
                        "ms_max": result.ms_max,
                        "check": result.check,  # these kernels vs the reference
                    }
                )
    return rows


def _isa_table(rows: list[dict], isas: list[str]) -> str:
    by_shape: dict[tuple, dict[str, tuple[float, float]]] = {}
    for r in rows:
        key = (r["level"], r["size"], r["channels"], r["group"])
        by_shape.setdefault(key, {})[r["isa"]] = (r["ms_min"], r["ms_max"])
    lines = [
        "compiled op fwd+bwd on the CPU by instruction set (best ms, +max: the slowest call's "
        f"excess over it; x = vs {isas[0]})"
    ]
    lines.append(f"{'shape':<22}" + "".join(f"{isa:>24}" for isa in isas))
    for (level, size, channels, group), ms in by_shape.items():
        base = ms[isas[0]][0]
        cells = "".join(
            f"{best:>10.2f} {spread(best, worst):>5} ({base / best:4.2f}x)"
            for best, worst in (ms[isa] for isa in isas)
        )
        lines.append(f"{f'{level} {size}x{size}x{channels} G{group}':<22}{cells}")
    lines.append(
        "max|diff| vs the reference (! = beyond tolerance): "
        + ", ".join(
            f"{isa} {diff_cell([r.get('check') for r in rows if r['isa'] == isa])}" for isa in isas
        )
    )
    ran = {(r["isa"], r.get("isa_used")) for r in rows if r.get("isa_used") not in (None, r["isa"])}
    for asked, used in sorted(ran):
        lines.append(f"{asked}: this CPU ran the {used} kernels (it lacks the {asked} features)")
    return "\n".join(lines)


#: DCNv3 module variants: (label, op implementation, softmax fused into the op): the official
#: module's path with the reference op, then with ours, then ours with the mask softmax inside
#: the kernel (default).
MODULE_VARIANTS = (
    ("reference op", "reference", False),
    ("compiled, torch softmax", "compiled", False),
    ("compiled op", "compiled", True),
)
#: Timed beside the variants: the module's four projections alone (input_proj, offset, mask,
#: output_proj; fwd+bwd on inputs of the module's shape), the floor that no work on the op,
#: the depthwise conv or the norms can go under.
PROJECTIONS = "projections alone"


def _projections(module: torch.nn.Module, x: torch.Tensor) -> None:
    """The four Linear layers of a DCNv3 module, forward and backward, on (N, H, W, C) ``x``."""
    # offset/mask see the depthwise conv's output and output_proj the op's: same shape as x.
    outs = [
        layer(x) for layer in (module.input_proj, module.offset, module.mask, module.output_proj)
    ]
    sum(out.sum() for out in outs).backward()


def _module_pass(
    module: torch.nn.Module, x: torch.Tensor, impl: str, fused: bool
) -> list[torch.Tensor]:
    """One fwd+bwd of ``module`` with the op ``impl`` from zeroed gradients, under one seeded
    random output gradient: the output, the input's gradient, then every parameter's."""
    module.impl, module.fused_softmax = impl, fused
    module.zero_grad(set_to_none=True)
    x.grad = None
    out = module(x)
    g = torch.Generator().manual_seed(1)
    out.backward(torch.randn(out.shape, generator=g).to(out.device, out.dtype))
    return [out.detach().float(), x.grad.clone(), *(p.grad.clone() for p in module.parameters())]


def time_modules(
    level: str, batch: int, repeat: int, device: str, autocast: torch.dtype | None = None
) -> list[dict]:
    """The whole DCNv3 module (projections, depthwise conv, offsets, softmax, op) fwd+bwd.

    In this process (times only), median, best and slowest of ``repeat`` after a warm-up, per level
    shape and variant (:data:`MODULE_VARIANTS`); offsets and masks randomised so the op
    samples off the grid as in a trained model. ``autocast``: run every variant's forward
    under ``torch.autocast(device, autocast)`` (float32 weights and input, as mixed-precision
    training runs the module); None: float32 throughout.

    Each compiled variant's row has ``check``: its output and gradients (input and every
    parameter) against the reference op module's in float32 (:func:`compare`,
    ``CHECK_RTOL["float32"]``), from the warm-up call. Under autocast that check is one more
    float32 call per variant: bf16 offsets fall on the pixel grid, where the two ops take
    different one-sided derivatives (:func:`check_case`), and the parameters' gradients sum
    those in where no mask can leave them out.
    """
    from bldseg.ops.dcnv3 import DCNv3

    rows = []
    for size, channels, group in LEVELS[level]:
        torch.manual_seed(0)
        module = DCNv3(channels, group=group).to(device)
        with torch.no_grad():
            for p in (module.offset.weight, module.mask.weight):
                p.normal_(0, 0.1)
        x = torch.randn(batch, size, size, channels, device=device, requires_grad=True)
        labels = [label for label, _, _ in MODULE_VARIANTS] + [PROJECTIONS]
        times: dict[str, list[float]] = {label: [] for label in labels}
        passes: dict[str, list[torch.Tensor]] = {}
        if autocast:
            for label, impl, fused in MODULE_VARIANTS:
                passes[label] = _module_pass(module, x, impl, fused)
        # Variants alternate call by call, so a busy spell of the machine hits all of them.
        for i in range(repeat + 1):
            for label, impl, fused in [*MODULE_VARIANTS, (PROJECTIONS, None, None)]:
                t0 = time.perf_counter()
                mixed = torch.autocast(device, autocast) if autocast else contextlib.nullcontext()
                with mixed:
                    if label == PROJECTIONS:
                        _projections(module, x)
                    elif not i and not autocast:  # the warm-up call gives the numerics check
                        passes[label] = _module_pass(module, x, impl, fused)
                    else:
                        module.impl, module.fused_softmax = impl, fused
                        module(x).float().sum().backward()
                if device == "cuda":
                    torch.cuda.synchronize()
                if i:  # the first round warms up
                    times[label].append(time.perf_counter() - t0)
        impls = {label: impl for label, impl, _ in MODULE_VARIANTS}
        names = ["out", "grad_input", *(f"grad_{n}" for n, _ in module.named_parameters())]
        want = passes[MODULE_VARIANTS[0][0]]  # the reference op module
        for label in labels:
            compiled_cpu = impls.get(label) == "compiled" and device == "cpu"
            check = None
            if impls.get(label) == "compiled":
                check = compare(passes[label], want, names, CHECK_RTOL["float32"])
            rows.append(
                {
                    "level": level,
                    "size": size,
                    "channels": channels,
                    "group": group,
                    "batch": batch,
                    "variant": label,
                    "device": device,
                    # this process's kernels: its BLDSEG_CPU_* variables are not cleared
                    "isa": op_isa(os.environ) if compiled_cpu else None,
                    "autocast": str(autocast).removeprefix("torch.") if autocast else None,
                    "ms_median": 1e3 * statistics.median(times[label]),
                    "ms_min": 1e3 * min(times[label]),
                    "ms_max": 1e3 * max(times[label]),
                    "check": check,  # vs the reference op module; None: not a compiled variant
                }
            )
            print(
                f"  module {device} {level} {size}x{size}x{channels} G{group} {label:23} "
                f"best {rows[-1]['ms_min']:8.2f} ms, median {rows[-1]['ms_median']:8.2f} ms, "
                f"max {rows[-1]['ms_max']:8.2f} ms"
                + (f", max|diff| {diff_cell([check])}" if check else ""),
                flush=True,
            )
    return rows


def _module_table(rows: list[dict]) -> str:
    """Module fwd+bwd per shape: each variant's best time, the slowest call's excess over it
    and the speed-up over the first, the projections alone with their share of the default
    module, and the compiled variants' largest difference from the reference op module."""
    labels = [v[0] for v in MODULE_VARIANTS]
    lines = [
        "DCNv3 module fwd+bwd (best ms, +max: the slowest call's excess over it; x = speed-up "
        "over the reference op module; "
        f"{PROJECTIONS}: their share of the {labels[-1]} module; max|diff|: the compiled "
        "variants' outputs and gradients vs the reference op module's, ! = beyond tolerance)",
        f"{'device':<6} {'shape':<18}"
        + "".join(f"{lab:>26}" for lab in labels)
        + f"{PROJECTIONS:>26}{'max|diff|':>10}",
    ]
    keys = sorted({(r["device"], r["level"], r["size"], r["channels"], r["group"]) for r in rows})
    for dev, level, size, ch, g in sorted(keys, key=lambda k: (k[0], k[1], -k[2])):
        mine = [r for r in rows if (r["device"], r["size"], r["channels"]) == (dev, size, ch)]
        cell = {r["variant"]: (r["ms_min"], r["ms_max"]) for r in mine}
        base = cell[labels[0]][0]
        shape = f"{level} {size}x{size}x{ch} G{g}"
        floor, floor_max = cell[PROJECTIONS]
        lines.append(
            f"{dev:<6} {shape:<18}"
            + "".join(
                f"{best:>11.2f} {spread(best, worst):>5} ({base / best:4.1f}x)"
                for best, worst in (cell[lab] for lab in labels)
            )
            + f"{floor:>11.2f} {spread(floor, floor_max):>5} ({floor / cell[labels[-1]][0]:4.0%})"
            + f"{diff_cell([r.get('check') for r in mine]):>10}"
        )
    return "\n".join(lines)


def _beyond(check: dict[str, Any]) -> str:
    worst = check["worst"]
    return (
        f"{worst} differs by {check['diffs'][worst]:.3g}, {check['ratio']:.3g}x its tolerance "
        f"({check['rtol']:g} x the reference's largest magnitude, at least 1)"
    )


def numerics_failures(
    results: list[Result], modules: list[dict], isa_rows: list[dict]
) -> list[str]:
    """Every case whose compiled op (or module) is beyond its tolerance of the reference, named
    as the tables name it, with the tensor furthest off."""
    failures = []
    for r in results:
        c = r.case
        if r.check is not None and not r.check["ok"]:
            shape = f"{c.level} {c.size}x{c.size}x{c.channels} G{c.group}"
            failures.append(f"{c.device} {shape} {c.mode} {c.dtype}: {_beyond(r.check)}")
    for r in isa_rows:
        if r.get("check") is not None and not r["check"]["ok"]:
            shape = f"{r['level']} {r['size']}x{r['size']}x{r['channels']} G{r['group']}"
            failures.append(f"cpu {shape} fwd+bwd, {r['isa']} kernels: {_beyond(r['check'])}")
    for r in modules:
        if r.get("check") is not None and not r["check"]["ok"]:
            shape = f"{r['level']} {r['size']}x{r['size']}x{r['channels']} G{r['group']}"
            failures.append(f"module {r['device']} {shape} {r['variant']}: {_beyond(r['check'])}")
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="T,B", help="comma-separated: T, B")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float64", "bfloat16"],
        help="the ops' tensors; bfloat16 also runs the module cases under bf16 autocast "
        "(float64: the op cases only, the modules stay float32)",
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per case")
    parser.add_argument("--devices", default="auto", help="cpu, cuda or auto (cpu + cuda if any)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--modules",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the whole DCNv3 module per level (default: on)",
    )
    parser.add_argument(
        "--isa",
        default=None,
        help="also time the compiled CPU op with each of these instruction sets, e.g. "
        "avx2,avx512 (baseline, avx2, avx512); default: only what the op picks",
    )
    parser.add_argument(
        "--malloc-retain",
        action="store_true",
        help="run the op cases with glibc keeping freed memory (MALLOC_RETAIN): times without "
        "the per-process page-fault lottery of large allocations, for comparing kernels",
    )
    parser.add_argument("--one-case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    # no timed call: statistics.median([]) failed in the first child, with a traceback
    for flag in ("repeat", "batch"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")

    if args.isa and sorted(set(args.isa.split(",")) - set(ISA_ENV)):
        parser.error(f"--isa: choose from {', '.join(ISA_ENV)}, comma-separated")

    if args.one_case is not None:  # child process: one CPU case, JSON on the last line
        result = run_case(Case(**json.loads(args.one_case)), args.repeat)
        print(json.dumps(asdict(result)))
        return

    levels = args.levels.split(",")
    if unknown := [lvl for lvl in levels if lvl not in LEVELS]:
        parser.error(
            f"--levels: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(LEVELS)}"
        )
    devices = ["cpu", "cuda"] if args.devices == "auto" else args.devices.split(",")
    if unknown := [d for d in devices if d not in ("cpu", "cuda")]:
        parser.error(f"--devices: unknown {', '.join(map(repr, unknown))}; cpu, cuda or auto")
    if "cuda" in devices and not torch.cuda.is_available():
        if args.devices != "auto":
            # an empty table with exit status 0 read as a benchmark that ran
            parser.error(
                f"--devices {args.devices}: CUDA is not available on this machine (torch "
                f"{torch.__version__}); leave cuda out, or run on a machine with a GPU"
            )
        devices.remove("cuda")

    info = load_dcnv3_op()  # build once up front, so no child pays for it
    results: list[Result] = []
    for device in devices:
        for level in levels:
            for size, channels, group in LEVELS[level]:
                for mode in MODES:
                    for impl in IMPLS:
                        case = Case(
                            level, size, channels, group, args.batch, impl, mode, device, args.dtype
                        )
                        if device == "cpu":
                            env = MALLOC_RETAIN if args.malloc_retain else None
                            result = run_in_subprocess(case, args.repeat, env)
                        else:
                            result = run_case(case, args.repeat)
                        results.append(result)
                        print(
                            f"  {device} {level} {size}x{size}x{channels} G{group} {mode:8} "
                            f"{impl:9} best {result.ms_min:9.2f} ms, median {result.ms:9.2f} ms, "
                            f"max {result.ms_max:9.2f} ms, peak {result.peak_mb:8.1f} MiB"
                            + (f", max|diff| {diff_cell([result.check])}" if result.check else ""),
                            flush=True,
                        )
    if not results:
        sys.exit(f"bench_dcnv3: no case ran (--devices {args.devices}, --levels {args.levels})")
    print()
    print(
        f"DCNv3 benchmark: torch {torch.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads, {args.dtype}, batch {args.batch}, op built in "
        f"{info.folder}"
    )
    print(_table(results))
    op_isas = sorted({str(r.isa) for r in results if r.isa})
    if op_isas:
        print(f"compiled op cases: {', '.join(op_isas)} kernels (children, BLDSEG_CPU_* cleared)")
    modules: list[dict] = []
    if args.modules:
        for device in devices:
            for level in levels:
                modules += time_modules(
                    level,
                    args.batch,
                    args.repeat,
                    device,
                    torch.bfloat16 if args.dtype == "bfloat16" else None,
                )
        print()
        if args.dtype == "bfloat16":
            print("modules under bf16 autocast (float32 weights and input)")
        print(_module_table(modules))
        module_isas = sorted({str(r["isa"]) for r in modules if r["isa"]})
        if module_isas:
            differ = " (not the op cases' kernels)" if module_isas != op_isas else ""
            print(
                f"compiled module rows: {', '.join(module_isas)} kernels (this process's "
                f"environment){differ}"
            )
    isa_rows: list[dict] = []
    if args.isa and "cpu" in devices:
        isas = args.isa.split(",")
        isa_rows = time_isas(levels, args.batch, args.dtype, args.repeat, isas)
        print()
        print(_isa_table(isa_rows, isas))
    failures = numerics_failures(results, modules, isa_rows)
    if args.json is not None:
        payload = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "malloc_retain": MALLOC_RETAIN if args.malloc_retain else None,
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "memory_method": {
                "cpu": "VmHWM - VmRSS growth during the first call in a fresh subprocess",
                "cuda": "torch.cuda.max_memory_allocated growth during the first call",
            },
            "results": [
                asdict(r.case)
                | {
                    "ms_median": r.ms,
                    "ms_min": r.ms_min,
                    "ms_max": r.ms_max,
                    "peak_mb": r.peak_mb,
                    "isa": r.isa,
                    "check": r.check,  # compiled rows: vs the reference on the same inputs
                }
                for r in results
            ],
            "modules": modules,
            "isa": isa_rows,
            "numerics": {
                "method": "compiled vs reference on the same inputs, once outside the timed "
                "calls: output and (fwd+bwd) gradients under a seeded random output gradient; "
                "each tensor's largest difference against rtol x the reference's largest "
                "magnitude (at least 1); the offset gradient without samples on the pixel grid",
                "rtol": CHECK_RTOL,
                "ok": not failures,
                "failures": failures,
            },
        }
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    if failures:
        # a faster op that computes something else is not a speed-up
        sys.exit(
            "bench_dcnv3: compiled and reference disagree beyond tolerance in "
            f"{len(failures)} case(s):\n  " + "\n  ".join(failures)
        )


if __name__ == "__main__":
    main()
