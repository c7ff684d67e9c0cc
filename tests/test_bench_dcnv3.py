"""experiments/bench_dcnv3.py: the module timing, with the projections-alone floor beside it."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import bench_dcnv3  # noqa: E402

from bldseg.ops.dcnv3 import DCNv3  # noqa: E402


def test_projections_run_the_four_linear_layers_forward_and_backward():
    torch.manual_seed(0)
    module = DCNv3(16, group=2)
    x = torch.randn(2, 5, 5, 16, requires_grad=True)
    bench_dcnv3._projections(module, x)
    layers = (module.input_proj, module.offset, module.mask, module.output_proj)
    for layer in layers:
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    # d/dx of sum(x @ W.T + b) over the four layers: the column sums of their weights
    want = sum(layer.weight.sum(0) for layer in layers).expand_as(x)
    torch.testing.assert_close(x.grad, want)
    # the rest of the module (depthwise conv, norm) is not part of the floor
    assert all(p.grad is None for p in module.dw_conv.parameters())


def test_module_timing_has_every_variant_and_the_floor(monkeypatch):
    monkeypatch.setitem(bench_dcnv3.LEVELS, "tiny", [(6, 32, 2)])
    rows = bench_dcnv3.time_modules("tiny", batch=2, repeat=2, device="cpu")
    labels = [v[0] for v in bench_dcnv3.MODULE_VARIANTS] + [bench_dcnv3.PROJECTIONS]
    assert [r["variant"] for r in rows] == labels
    assert all(0 < r["ms_min"] <= r["ms_median"] <= r["ms_max"] for r in rows)
    table = bench_dcnv3._module_table(rows)
    line = table.splitlines()[-1]
    assert line.startswith("cpu    tiny 6x6x32 G2")
    # a speed-up per variant, the first over itself, then the floor's share of the module in %
    cells = line.split("(")[1:]
    assert [c.split(")")[0].strip()[-1] for c in cells] == ["x", "x", "x", "%"]
    assert cells[0].startswith(" 1.0x)")
    floor, module = rows[-1]["ms_min"], rows[-2]["ms_min"]
    assert cells[-1].strip() == f"{floor / module:4.0%})".strip()
    # each best time with the slowest call's excess over it beside it
    spreads = [bench_dcnv3.spread(r["ms_min"], r["ms_max"]) for r in rows]
    shown = [c.split()[-1] for c in line.removeprefix("cpu    tiny 6x6x32 G2").split("(")[:-1]]
    assert shown == spreads and all(s.startswith("+") and s.endswith("%") for s in spreads)


def _result(impl: str, mode: str, best: float, worst: float) -> "bench_dcnv3.Result":
    case = bench_dcnv3.Case("T", 7, 512, 32, 8, impl, mode, "cpu", "float32")
    return bench_dcnv3.Result(case, (best + worst) / 2, best, worst, 10.0)


def test_op_table_shows_the_slowest_call_beside_the_best():
    # A noisy case (the reference's slowest call 3x its best) must be visible in the table.
    results = [
        _result("compiled", "fwd", 2.0, 2.2),
        _result("reference", "fwd", 4.0, 12.0),
    ]
    lines = bench_dcnv3._table(results).splitlines()
    assert lines[0].split()[6:13] == ["comp", "ms", "+max", "ref", "ms", "+max", "speedup"]
    row = lines[2].split()
    assert row[5:9] == ["2.00", "+10%", "4.00", "+200%"]
    assert row[9] == "2.00"  # the speed-up is still of the best times
    assert lines[-1].split()[6:10] == ["2.00", "+10%", "4.00", "+200%"]  # the level total
    assert max(len(line) for line in lines) <= 110  # no wider than before by much
    # a side without a case shows no spread, not "nan%"
    alone = bench_dcnv3._table(results[:1]).splitlines()[2].split()
    assert alone[5:9] == ["2.00", "+10%", "nan", "-"]


def test_isa_table_shows_the_slowest_call_beside_the_best():
    rows = [
        {"level": "T", "size": 7, "channels": 512, "group": 32, "isa": isa, "isa_used": isa}
        | {"ms_min": best, "ms_median": best, "ms_max": worst}
        for isa, best, worst in (("avx2", 2.0, 2.5), ("baseline", 4.0, 4.0))
    ]
    line = bench_dcnv3._isa_table(rows, ["avx2", "baseline"]).splitlines()[2]
    assert line.split()[-6:] == ["2.00", "+25%", "(1.00x)", "4.00", "+0%", "(0.50x)"]


def test_an_op_case_runs_in_a_child_with_the_retaining_allocator():
    case = bench_dcnv3.Case("T", 6, 32, 2, 2, "compiled", "fwd+bwd", "cpu", "float32")
    result = bench_dcnv3.run_in_subprocess(case, repeat=2, env=bench_dcnv3.MALLOC_RETAIN)
    assert result.case == case
    assert 0 < result.ms_min <= result.ms <= result.ms_max
    assert set(bench_dcnv3.MALLOC_RETAIN) == {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"}


def test_bfloat16_gives_the_ops_bf16_tensors_and_runs_the_modules_under_autocast(monkeypatch):
    # the submodule (bldseg.ops.dcnv3, the attribute, is the op function)
    dcnv3_module = importlib.import_module("bldseg.ops.dcnv3")

    # the op cases: the float32 inputs rounded to bf16, still leaves of the autograd graph
    f32 = bench_dcnv3.Case("T", 6, 32, 2, 2, "compiled", "fwd+bwd", "cpu", "float32")
    bf16 = bench_dcnv3.Case("T", 6, 32, 2, 2, "compiled", "fwd+bwd", "cpu", "bfloat16")
    for a, b in zip(bench_dcnv3._inputs(f32), bench_dcnv3._inputs(bf16), strict=True):
        assert b.dtype == torch.bfloat16 and b.requires_grad and b.is_leaf
        assert torch.equal(b.detach(), a.detach().to(torch.bfloat16))
    result = bench_dcnv3.run_in_subprocess(bf16, repeat=2)
    assert result.case == bf16 and 0 < result.ms_min <= result.ms

    # the module cases: under autocast the op sees bf16 (the projections' output) and the
    # rows say so; without it, float32
    seen = []
    real = dcnv3_module.dcnv3

    def recording(x, *args, **kwargs):
        seen.append(x.dtype)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(dcnv3_module, "dcnv3", recording)
    monkeypatch.setitem(bench_dcnv3.LEVELS, "tiny", [(6, 32, 2)])
    for autocast, want in ((torch.bfloat16, torch.bfloat16), (None, torch.float32)):
        seen.clear()
        rows = bench_dcnv3.time_modules("tiny", 2, 1, "cpu", autocast)
        assert {r["autocast"] for r in rows} == {"bfloat16" if autocast else None}
        # 3 module variants, a warm-up round and one timed round
        assert seen == [want] * 6


def test_op_isa_follows_the_kernels_choice(tmp_path):
    x86 = {"machine": "x86_64"}
    avx2 = {"sse2", "avx2", "fma"}
    avx512 = avx2 | {"avx512f", "avx512vl", "avx512dq", "avx512bw"}
    assert bench_dcnv3.op_isa({}, avx2, **x86) == "avx2"
    assert bench_dcnv3.op_isa({"BLDSEG_CPU_NO_AVX2": "1"}, avx512, **x86) == "baseline"
    # an off value is off, as the kernels read it
    for off in ("", "0", "False", "no", "OFF"):
        assert bench_dcnv3.op_isa({"BLDSEG_CPU_NO_AVX2": off}, avx512, **x86) == "avx2"
        assert bench_dcnv3.op_isa({"BLDSEG_CPU_AVX512": off}, avx512, **x86) == "avx2"
    # the kernels trim nothing: a value with a space is on
    assert bench_dcnv3.op_isa({"BLDSEG_CPU_NO_AVX2": "0 "}, avx512, **x86) == "baseline"
    assert bench_dcnv3.op_isa({"BLDSEG_CPU_AVX512": "1"}, avx512, **x86) == "avx512"
    # asked for on a CPU without it: the AVX2 kernels run
    assert bench_dcnv3.op_isa({"BLDSEG_CPU_AVX512": "1"}, avx2, **x86) == "avx2"
    assert bench_dcnv3.op_isa({}, {"sse2"}, **x86) == "baseline"
    assert bench_dcnv3._cpu_flags(tmp_path / "no_cpuinfo") is None  # e.g. macOS
    assert bench_dcnv3.op_isa({}, avx512, machine="aarch64") == "baseline"
    # an op case's child never sees this process's choice
    assert "BLDSEG_CPU_AVX512" not in bench_dcnv3.child_env(None)


def test_every_row_says_which_kernels_it_ran(tmp_path):
    # This process asks for the baseline kernels: the module rows (run here) get them, the op
    # cases (children without BLDSEG_CPU_*) the CPU's default; the JSON says which is which.
    out = tmp_path / "dcnv3.json"
    code = (
        "import sys; sys.argv = ['bench_dcnv3', '--levels', 'tiny', '--batch', '2', "
        f"'--repeat', '1', '--devices', 'cpu', '--json', {str(out)!r}]; "
        "import bench_dcnv3; bench_dcnv3.LEVELS['tiny'] = [(6, 32, 2)]; bench_dcnv3.main()"
    )
    env = {**os.environ, "BLDSEG_CPU_NO_AVX2": "1", "PYTHONPATH": str(REPO / "experiments")}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    default = bench_dcnv3.op_isa({})  # this CPU's kernels without any variable
    ops = {(r["impl"], r["mode"]): r["isa"] for r in record["results"]}
    assert ops == {
        ("compiled", "fwd"): default,
        ("compiled", "fwd+bwd"): default,
        ("reference", "fwd"): None,
        ("reference", "fwd+bwd"): None,
    }
    # every timed row has its best, median and slowest call
    for r in record["results"] + record["modules"]:
        assert 0 < r["ms_min"] <= r["ms_median"] <= r["ms_max"], r
    modules = {r["variant"]: r["isa"] for r in record["modules"]}
    assert modules == {
        "reference op": None,
        "compiled, torch softmax": "baseline",
        "compiled op": "baseline",
        bench_dcnv3.PROJECTIONS: None,
    }
    if default != "baseline":
        assert "(not the op cases' kernels)" in done.stdout


def test_a_device_or_level_that_cannot_run_is_an_error(monkeypatch, capsys):
    # an empty table with exit status 0 read as a benchmark that ran
    cases = [(["--levels", "Q"], "--levels: unknown 'Q'")]
    if not torch.cuda.is_available():
        cases.append((["--devices", "cuda"], "--devices cuda: CUDA is not available"))
    for args, says in cases:
        monkeypatch.setattr(sys, "argv", ["bench_dcnv3", *args])
        with pytest.raises(SystemExit) as e:
            bench_dcnv3.main()
        assert e.value.code != 0 and says in capsys.readouterr().err
