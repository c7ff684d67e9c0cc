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
    line, diff = table.splitlines()[-1].rsplit(maxsplit=1)
    assert line.startswith("cpu    tiny 6x6x32 G2")
    # last, the compiled variants' largest difference from the reference op module
    assert diff == bench_dcnv3.diff_cell([r["check"] for r in rows])
    assert [r["check"] is not None for r in rows] == [False, True, True, False]
    assert all(r["check"]["ok"] for r in rows[1:3])
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
    assert max(len(line) for line in lines) <= 120  # no wider than before by much
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
        # 3 module variants, a warm-up round and one timed round; the numerics check is the
        # warm-up call in float32, and under autocast one float32 call more per variant
        checks = [torch.float32] * 3 if autocast else []
        assert seen == checks + [want] * 6


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
    # the compiled rows, checked in their children against the reference, agree
    checks = {(r["impl"], r["mode"]): r["check"] for r in record["results"]}
    assert checks[("compiled", "fwd+bwd")]["ok"] and checks[("compiled", "fwd")]["ok"]
    assert set(checks[("compiled", "fwd+bwd")]["diffs"]) == {
        "out",
        "grad_input",
        "grad_offset",
        "grad_mask",
    }
    assert record["numerics"] == record["numerics"] | {"ok": True, "failures": []}
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


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--repeat", "0"], "--repeat must be at least 1, got 0"),
        (["--batch", "0"], "--batch must be at least 1, got 0"),
    ],
)
def test_a_count_below_one_is_refused_naming_the_flag(monkeypatch, capsys, argv, says):
    # --repeat 0 failed in statistics.median([]) in the first case's child, with a traceback
    def no_setup():
        raise AssertionError("the benchmark started before its flags were checked")

    monkeypatch.setattr(bench_dcnv3, "load_dcnv3_op", no_setup)
    monkeypatch.setattr(sys, "argv", ["bench_dcnv3", "--devices", "cpu", *argv])
    with pytest.raises(SystemExit) as e:
        bench_dcnv3.main()
    assert e.value.code == 2 and says in capsys.readouterr().err


TINY = (6, 32, 2)  # H = W, channels, groups: the tests' level shape


def _tiny(impl: str, mode: str, dtype: str) -> "bench_dcnv3.Case":
    return bench_dcnv3.Case("tiny", *TINY, 2, impl, mode, "cpu", dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_the_compiled_case_checks_output_and_gradients_against_the_reference(dtype):
    case = _tiny("compiled", "fwd+bwd", dtype)
    check = bench_dcnv3.check_case(case, *bench_dcnv3._inputs(case))
    assert set(check["diffs"]) == {"out", "grad_input", "grad_offset", "grad_mask"}
    assert check["ok"] and check["rtol"] == bench_dcnv3.CHECK_RTOL[dtype]
    assert 0 <= check["max_abs_diff"] == max(check["diffs"].values())
    assert check["ratio"] <= 1
    if dtype == "float64":  # PRODUCT.md: equal within 1e-10 in float64
        assert check["max_abs_diff"] < 1e-12
    fwd = _tiny("compiled", "fwd", dtype)
    assert set(bench_dcnv3.check_case(fwd, *bench_dcnv3._inputs(fwd))["diffs"]) == {"out"}


def test_offsets_within_rounding_of_the_pixel_grid_are_left_out_of_the_check():
    # Level 1 in float32 (1.8M offsets) has a few within float32 rounding of a whole number
    # once added to their coordinate: a kink, where the two ops' offset gradients may take
    # different sides (0.32 apart, 200x the tolerance: `make bench` exited 1).
    case = _tiny("compiled", "fwd+bwd", "float32")
    x, offset, mask = bench_dcnv3._inputs(case)
    with torch.no_grad():
        offset.view(-1)[:5] = torch.tensor([1e-9, -1e-9, 2.0 + 1e-7, 1e-3, 0.0])
    check = bench_dcnv3.check_case(case, x, offset, mask)
    assert check["ok"]
    assert check["kinks_left_out"] == 4  # 1e-3 is not within rounding of the grid


def test_compare_scales_by_magnitude_keeps_masks_and_fails_nan():
    ref = torch.tensor([100.0, 1.0])
    ok = bench_dcnv3.compare([ref + 5e-3], [ref], ["out"], 1e-4)  # 5e-3 <= 1e-4 x 100
    assert ok["ok"] and ok["ratio"] == pytest.approx(0.5)
    small = torch.tensor([0.1, 0.2])  # a magnitude under 1 counts as 1
    assert not bench_dcnv3.compare([small + 2e-4], [small], ["out"], 1e-4)["ok"]
    keep = {"out": torch.tensor([True, False])}
    assert bench_dcnv3.compare([ref + torch.tensor([0.0, 9.0])], [ref], ["out"], 1e-4, keep)["ok"]
    bad = bench_dcnv3.compare([ref, ref * float("nan")], [ref, ref], ["out", "grad_x"], 1e-4)
    assert not bad["ok"] and bad["worst"] == "grad_x"


def _off_gradient(real, by: float = 1e-6):
    """``real`` with a wrong offset gradient (``by`` x the offset's mean per point) for the
    compiled op, and its output unchanged."""

    def op(x, offset, mask, *args, impl=None, **kwargs):
        out = real(x, offset, mask, *args, impl=impl, **kwargs)
        if impl == "compiled":
            drift = by * offset.mean(-1, keepdim=True)
            out = out + (drift - drift.detach())  # the same value, another gradient
        return out

    return op


def test_a_wrong_compiled_op_exits_1_after_the_json_naming_each_case(tmp_path, monkeypatch, capsys):
    # The compiled op's offset gradient off by ~1e-7: far beyond float64's 1e-10, within
    # float32's 1e-4. Before, the benchmark showed its speed-up and exited 0.
    monkeypatch.setattr(bench_dcnv3, "dcnv3", _off_gradient(bench_dcnv3.dcnv3))
    # the op cases in this process (their children would not see the wrong op)
    monkeypatch.setattr(
        bench_dcnv3,
        "run_in_subprocess",
        lambda case, repeat, env=None: bench_dcnv3.run_case(case, repeat),
    )
    monkeypatch.setitem(bench_dcnv3.LEVELS, "tiny", [TINY])
    out = tmp_path / "dcnv3.json"
    argv = ["bench_dcnv3", "--levels", "tiny", "--batch", "2", "--repeat", "1", "--devices", "cpu"]
    argv += ["--no-modules", "--json", str(out)]
    for dtype, fails in (("float32", False), ("float64", True)):
        monkeypatch.setattr(sys, "argv", [*argv, "--dtype", dtype])
        if not fails:
            bench_dcnv3.main()
        else:
            with pytest.raises(SystemExit) as e:
                bench_dcnv3.main()
            said = str(e.value.code)
            assert said.startswith("bench_dcnv3: compiled and reference disagree beyond")
            assert "cpu tiny 6x6x32 G2 fwd+bwd float64: grad_offset differs by" in said
            assert "fwd float64" not in said  # the output is right
        record = json.loads(out.read_text())
        assert record["numerics"]["ok"] is not fails
        rows = {(r["impl"], r["mode"]): r["check"] for r in record["results"]}
        assert rows[("reference", "fwd")] is None and rows[("reference", "fwd+bwd")] is None
        assert rows[("compiled", "fwd")]["ok"]
        assert rows[("compiled", "fwd+bwd")]["ok"] is not fails
        assert 1e-9 < rows[("compiled", "fwd+bwd")]["diffs"]["grad_offset"] < 1e-5
        table = capsys.readouterr().out
        row = next(line for line in table.splitlines() if "(2,6,6,32) 2 fwd+bwd" in line)
        assert row.split()[-1] == bench_dcnv3.diff_cell([rows[("compiled", "fwd+bwd")]])
        assert row.endswith("!") is fails


def test_a_wrong_compiled_module_is_named(monkeypatch):
    dcnv3_module = importlib.import_module("bldseg.ops.dcnv3")
    # beyond float32's tolerance (1e-4): the offset projection's gradient ~1e-2 off
    monkeypatch.setattr(dcnv3_module, "dcnv3", _off_gradient(dcnv3_module.dcnv3, 1e-2))
    monkeypatch.setitem(bench_dcnv3.LEVELS, "tiny", [TINY])
    rows = bench_dcnv3.time_modules("tiny", 2, 1, "cpu")
    failures = bench_dcnv3.numerics_failures([], rows, [])
    assert [f.split(":")[0] for f in failures] == [
        "module cpu tiny 6x6x32 G2 compiled, torch softmax",
        "module cpu tiny 6x6x32 G2 compiled op",
    ]
    for r in rows[1:3]:  # the output is right; a gradient (offset's, and what feeds it) not
        assert r["check"]["diffs"]["out"] < 1e-4 < r["check"]["diffs"]["grad_offset.weight"]
        assert r["check"]["worst"].startswith("grad_")
