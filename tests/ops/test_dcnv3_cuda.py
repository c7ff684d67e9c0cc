"""DCNv3 CUDA kernels: nvcc build, glue syntax, kernels emulated on the CPU, GPU numerics.

The CUDA kernels (csrc/dcnv3/cuda/dcnv3_cuda_kernel.cu) are checked at three levels:

1. the kernel file compiles with nvcc for several GPU architectures, warnings as errors, and
   the torch glue (dcnv3_cuda.cpp) parses against the installed torch headers;
2. the launchers and kernels run on the CPU through a small host emulation (every CUDA thread
   a std::thread, warp shuffles through barriers, atomics under a mutex) and match the float64
   reference. This checks the indexing, the sampling grid, channel chunks, vector widths and
   the per-segment shuffle reductions on machines without a GPU; it cannot check what only
   the hardware does (sm_90 vector atomics, the memory model, speed);
3. on a GPU (marked `gpu`): the compiled op against the reference and the CPU op.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from bldseg.ops import dcnv3, dcnv3_reference
from tests.ops.cases import Case

REPO = Path(__file__).resolve().parents[2]
CUDA_DIR = REPO / "csrc" / "dcnv3" / "cuda"
KERNEL_CU = CUDA_DIR / "dcnv3_cuda_kernel.cu"
GLUE_CPP = CUDA_DIR / "dcnv3_cuda.cpp"
F64 = torch.float64

# The flags torch.utils.cpp_extension gives nvcc: the kernels must build under them.
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]
STRICT_FLAGS = ["-Werror", "all-warnings", "-Xcompiler", "-Wall", "-Xcompiler", "-Wextra"]

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ---------------------------------------------------------------------------------------------
# Cases


# Chosen to reach every path of the kernels: group_channels 1 (one lane per unit), 3 (a
# segment with an idle lane), 16 (InternImage), 30 (not a power of two), 64 (16-lane
# segments), 200 (several channel chunks per lane); kernels 3 and 5 and non-square; stride,
# dilation, no padding; offsets far outside the image; batch 0.
CASES = {
    "c16_g2": Case(2, 7, 6, 2, 16),
    "c30_k5_s2_d2": Case(1, 9, 8, 1, 30, (5, 5), (2, 2), (2, 2), (2, 2), 0.7, 2.0),
    "c64": Case(1, 6, 5, 1, 64),
    "c200_chunks": Case(1, 5, 4, 1, 200),
    "c3_g3_nopad": Case(3, 5, 5, 3, 3, pad=(0, 0), offset_scale=1.3),
    "c1_k3x2": Case(1, 5, 6, 2, 1, (3, 2), (2, 1), (1, 0), (1, 2)),
    "far_outside": Case(1, 5, 5, 2, 8, offset_std=50.0),
    "batch0": Case(0, 5, 5, 2, 8),
}


def make_inputs(
    case: Case, seed: int = 0, quarter_offsets: bool = False
) -> tuple[torch.Tensor, ...]:
    """(input, offset, mask, grad_output) in float64.

    With ``quarter_offsets`` the offsets are odd multiples of 1/4 (exact in float16, and in
    bfloat16 below 64), so with offset_scale 1 no sample lands exactly on a pixel row or
    column. There the bilinear gradient has a kink, and at exactly -1 the official op (and
    these kernels) drop the sample while grid_sample, inside the reference, still gives it a
    gradient; coarse random half-precision offsets hit such points.
    """
    gen = torch.Generator().manual_seed(seed)
    ho, wo = case.out_size()
    p = case.kernel[0] * case.kernel[1]
    x = torch.randn(case.n, case.h, case.w, case.group * case.gc, generator=gen, dtype=F64)
    offset = case.offset_std * torch.randn(
        case.n, ho, wo, case.group * p * 2, generator=gen, dtype=F64
    )
    if quarter_offsets:
        offset = torch.floor(offset * 2) / 2 + 0.25
    mask = torch.rand(case.n, ho, wo, case.group * p, generator=gen, dtype=F64)
    grad_out = torch.randn(case.n, ho, wo, case.group * case.gc, generator=gen, dtype=F64)
    return x, offset, mask, grad_out


def reference_grads(
    case: Case, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, grad_out: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """(output, grad_input, grad_offset, grad_mask) of the float64 reference on the CPU."""
    leaves = [t.detach().cpu().to(F64).requires_grad_() for t in (x, offset, mask)]
    out = dcnv3_reference(*leaves, *case.params())
    out.backward(grad_out.detach().cpu().to(F64))
    return (out.detach(), *(t.grad for t in leaves))


# Tolerances per dtype (vs the float64 reference on the same, already rounded, inputs).
TOLERANCE = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    torch.float16: {"rtol": 3e-3, "atol": 3e-3},
    torch.bfloat16: {"rtol": 1.5e-2, "atol": 1.5e-2},
}


def assert_matches(
    got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...], dtype: torch.dtype
) -> None:
    """Compares (output, grad_input, grad_offset, grad_mask) within the dtype's tolerance."""
    names = ("output", "grad_input", "grad_offset", "grad_mask")
    for name, g, w in zip(names, got, want, strict=True):
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        torch.testing.assert_close(
            g.cpu().to(F64), w, **TOLERANCE[dtype], msg=lambda m, name=name: f"{name}: {m}"
        )


# ---------------------------------------------------------------------------------------------
# 1. Build checks (nvcc, g++)


def _nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    return nvcc


def _cuda_include_dirs(nvcc: str) -> list[str]:
    """The include folders nvcc itself uses (from its --dryrun), e.g. for cuda_runtime.h."""
    out = subprocess.run(
        [nvcc, "--dryrun", "-c", "-x", "cu", "/dev/null", "-o", "/dev/null"],
        capture_output=True,
        text=True,
        check=False,
    )
    dirs = re.findall(r'(?:INCLUDES|SYSTEM_INCLUDES)="?(?:-I|-isystem)"? *"?([^"\s]+)', out.stderr)
    dirs = [d for d in dirs if (Path(d) / "cuda_runtime.h").is_file()]
    if not dirs:
        pytest.skip("no cuda_runtime.h next to nvcc")
    return dirs


def _gpu_archs(nvcc: str, wanted: tuple[str, ...]) -> list[str]:
    listed = subprocess.run(
        [nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True
    ).stdout.split()
    archs = [a for a in wanted if f"compute_{a}" in listed]
    assert archs, f"nvcc supports none of sm_{wanted}: {listed}"
    return archs


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"


def test_kernel_compiles_with_nvcc(tmp_path: Path) -> None:
    """Plain `nvcc -c -std=c++17`, no torch: sm_80 and sm_90, every warning an error."""
    nvcc = _nvcc()
    gencode = []
    for arch in _gpu_archs(nvcc, ("80", "90")):
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    _run(
        [
            nvcc,
            "-c",
            "-std=c++17",
            *STRICT_FLAGS,
            *gencode,
            "-o",
            str(tmp_path / "k.o"),
            str(KERNEL_CU),
        ]
    )


def test_kernel_compiles_with_torch_nvcc_flags(tmp_path: Path) -> None:
    """The flags of a torch JIT build (C++20, no implicit half conversions), and the sm_90
    build really uses vector loads, vector atomics and warp shuffles."""
    nvcc = _nvcc()
    (arch,) = _gpu_archs(nvcc, ("90",))
    ptx = tmp_path / "k.ptx"
    flags = ["-std=c++20", "-O3", *TORCH_NVCC_FLAGS, *STRICT_FLAGS]
    _run([nvcc, "-ptx", *flags, f"-arch=compute_{arch}", "-o", str(ptx), str(KERNEL_CU)])
    text = ptx.read_text()
    for instruction in ("ld.global.nc.v4", "atom.global.add.v4.f32", "shfl.sync.bfly"):
        assert instruction in text, f"{instruction} missing from the sm_{arch} PTX"


def test_glue_parses_against_torch_headers(tmp_path: Path) -> None:
    """g++ -fsyntax-only of dcnv3_cuda.cpp with torch's and CUDA's headers."""
    from torch.utils.cpp_extension import include_paths

    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found")
    cuda_includes = _cuda_include_dirs(_nvcc())
    torch_includes = include_paths()
    stub = tmp_path / "stub"
    if not any(Path(d, "c10/cuda/impl/cuda_cmake_macros.h").is_file() for d in torch_includes):
        # CPU wheels ship the c10/cuda headers without this generated one (empty in CUDA
        # builds apart from a shared-library define), so stand it in for the parse.
        (stub / "c10/cuda/impl").mkdir(parents=True)
        (stub / "c10/cuda/impl/cuda_cmake_macros.h").write_text("#pragma once\n")
    includes = [f for d in (*torch_includes, *cuda_includes, stub) for f in ("-isystem", str(d))]
    _run(
        [
            gxx,
            "-fsyntax-only",
            "-std=c++20",
            "-Wall",
            "-Wextra",
            "-Werror",
            *includes,
            str(GLUE_CPP),
        ]
    )


# ---------------------------------------------------------------------------------------------
# 2. The kernels emulated on the CPU

# Host stand-ins for the CUDA built-ins the kernel file uses; the file itself is included
# unchanged apart from its `kernel<<<grid, block, 0, stream>>>(args)` launches, which become
# `emu::launch(grid, block, 0, stream, kernel, args)`. Each warp runs as 32 std::threads, so
# a shuffle whose lanes do not all arrive deadlocks (the test times out) and one that reads a
# lane outside its mask aborts.
EMULATION_CPP = r"""
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <barrier>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace emu {
struct Warp {
  std::mutex m;
  std::map<unsigned, std::unique_ptr<std::barrier<>>> bars;  // one per shuffle mask
  double slots[32];
};
thread_local uint3 tid_;
thread_local uint3 bid_;
thread_local dim3 bdim_;
thread_local Warp* warp_ = nullptr;
std::mutex atomic_mutex;

inline std::barrier<>& bar(unsigned mask) {
  std::lock_guard<std::mutex> lock(warp_->m);
  auto& p = warp_->bars[mask];
  if (!p) p = std::make_unique<std::barrier<>>(std::popcount(mask));
  return *p;
}

template <typename A>
A shfl_xor(unsigned mask, A v, int s) {
  const unsigned lane = tid_.x & 31u;
  const unsigned src = lane ^ static_cast<unsigned>(s);
  if (src >= 32 || !((mask >> lane) & 1u) || !((mask >> src) & 1u)) std::abort();
  auto& b = bar(mask);
  warp_->slots[lane] = static_cast<double>(v);  // float and double both fit exactly
  b.arrive_and_wait();
  const A r = static_cast<A>(warp_->slots[src]);
  b.arrive_and_wait();
  return r;
}

template <typename A>
A atomic_add(A* p, A v) {
  std::lock_guard<std::mutex> lock(atomic_mutex);
  const A old = *p;
  *p = old + v;
  return old;
}

template <typename Kernel, typename... Args>
void launch(unsigned blocks, int threads, int, cudaStream_t, Kernel kernel, Args... args) {
  if (threads % 32 != 0) std::abort();
  for (unsigned b = 0; b < blocks; ++b) {
    for (int w = 0; w < threads / 32; ++w) {
      Warp warp;
      std::vector<std::thread> lanes;
      for (int l = 0; l < 32; ++l) {
        lanes.emplace_back([&, b, w, l] {
          tid_ = make_uint3(static_cast<unsigned>(w * 32 + l), 0, 0);
          bid_ = make_uint3(b, 0, 0);
          bdim_ = dim3(static_cast<unsigned>(threads));
          warp_ = &warp;
          kernel(args...);
        });
      }
      for (auto& t : lanes) t.join();
    }
  }
}
}  // namespace emu

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __launch_bounds__
#define __launch_bounds__(...)
#define threadIdx emu::tid_
#define blockIdx emu::bid_
#define blockDim emu::bdim_
#define __shfl_xor_sync(mask, v, s) emu::shfl_xor(mask, v, s)
#define __ldg(p) (*(p))
#define atomicAdd(p, v) emu::atomic_add(p, v)
#define cudaGetLastError() cudaSuccess

#include "kernel_emulated.inc"

using namespace bldseg::dcnv3;

static Dcnv3Params make_params(const int* ip, double offset_scale) {
  Dcnv3Params p{};
  p.batch = ip[0]; p.height_in = ip[1]; p.width_in = ip[2]; p.height_out = ip[3];
  p.width_out = ip[4]; p.kernel_h = ip[5]; p.kernel_w = ip[6]; p.stride_h = ip[7];
  p.stride_w = ip[8]; p.pad_h = ip[9]; p.pad_w = ip[10]; p.dilation_h = ip[11];
  p.dilation_w = ip[12]; p.group = ip[13]; p.group_channels = ip[14];
  p.offset_scale = offset_scale;
  return p;
}

#define EMU_EXPORT(NAME, T)                                                                 \
  extern "C" int emu_forward_##NAME(const void* in, const void* off, const void* mask,    \
                                    void* out, const int* ip, double os) {                \
    return static_cast<int>(dcnv3_forward_cuda_launch<T>(                                 \
        static_cast<const T*>(in), static_cast<const T*>(off),                            \
        static_cast<const T*>(mask), static_cast<T*>(out), make_params(ip, os), nullptr));\
  }                                                                                       \
  extern "C" int emu_backward_##NAME(const void* in, const void* off, const void* mask,   \
                                     const void* top, void* gi, void* go, void* gm,       \
                                     const int* ip, double os) {                          \
    return static_cast<int>(dcnv3_backward_cuda_launch<T>(                                \
        static_cast<const T*>(in), static_cast<const T*>(off),                            \
        static_cast<const T*>(mask), static_cast<const T*>(top),                          \
        static_cast<acc_t<T>*>(gi), static_cast<acc_t<T>*>(go),                           \
        static_cast<acc_t<T>*>(gm), make_params(ip, os), nullptr));                       \
  }

EMU_EXPORT(float32, float)
EMU_EXPORT(float64, double)
EMU_EXPORT(float16, __half)
EMU_EXPORT(bfloat16, __nv_bfloat16)
"""

ACC_DTYPE = {
    torch.float64: torch.float64,
    torch.float32: torch.float32,
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
}


@pytest.fixture(scope="module")
def emulated(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """The kernel file built for the host with the emulation above, loaded with ctypes."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found")
    cuda_includes = _cuda_include_dirs(_nvcc())
    folder = tmp_path_factory.mktemp("dcnv3_cuda_emulated")
    source, launches = re.subn(
        r"(\w+<T, V>)<<<([^>]*?)>>>\(", r"emu::launch(\2, \1, ", KERNEL_CU.read_text()
    )
    assert launches == 2, f"expected the forward and backward launches, found {launches}"
    (folder / "kernel_emulated.inc").write_text(source)
    (folder / "emulation.cpp").write_text(EMULATION_CPP)
    library = folder / "libdcnv3_emulated.so"
    includes = [f"-I{d}" for d in (*cuda_includes, CUDA_DIR)]
    _run([gxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w", *includes,
          "-o", str(library), str(folder / "emulation.cpp")])  # fmt: skip
    return ctypes.CDLL(str(library))


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _misaligned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty contiguous tensor whose data starts one element past an aligned address."""
    numel = 1
    for s in shape:
        numel *= s
    return torch.empty(numel + 1, dtype=dtype)[1:].view(shape)


def _misaligned_copy(t: torch.Tensor) -> torch.Tensor:
    out = _misaligned_empty(tuple(t.shape), t.dtype)
    out.copy_(t)
    return out


def run_emulated(
    lib: ctypes.CDLL,
    case: Case,
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    grad_out: torch.Tensor,
    misaligned_grad_input: bool = False,
) -> tuple[torch.Tensor, ...]:
    """(output, grad_input, grad_offset, grad_mask) from the emulated launchers."""
    ho, wo = case.out_size()
    params = (ctypes.c_int * 15)(
        case.n, case.h, case.w, ho, wo, *case.kernel, *case.stride, *case.pad, *case.dilation,
        case.group, case.gc,
    )  # fmt: skip
    scale = ctypes.c_double(case.offset_scale)
    name = str(x.dtype).removeprefix("torch.")
    out = torch.full((case.n, ho, wo, case.group * case.gc), float("nan"), dtype=x.dtype)
    err = getattr(lib, f"emu_forward_{name}")(
        _ptr(x), _ptr(offset), _ptr(mask), _ptr(out), params, scale
    )
    assert err == 0, f"forward launcher returned cudaError {err}"
    acc = ACC_DTYPE[x.dtype]
    if misaligned_grad_input:
        grad_input = _misaligned_empty(tuple(x.shape), acc).zero_()
    else:
        grad_input = torch.zeros(x.shape, dtype=acc)
    # NaN-filled: the kernel must write every element of these two.
    grad_offset = torch.full(offset.shape, float("nan"), dtype=acc)
    grad_mask = torch.full(mask.shape, float("nan"), dtype=acc)
    err = getattr(lib, f"emu_backward_{name}")(
        _ptr(x), _ptr(offset), _ptr(mask), _ptr(grad_out), _ptr(grad_input),
        _ptr(grad_offset), _ptr(grad_mask), params, scale,
    )  # fmt: skip
    assert err == 0, f"backward launcher returned cudaError {err}"
    return out, grad_input.to(x.dtype), grad_offset.to(x.dtype), grad_mask.to(x.dtype)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(CASES))
def test_emulated_kernels_match_reference_float64(emulated: ctypes.CDLL, name: str) -> None:
    case = CASES[name]
    tensors = make_inputs(case)
    assert_matches(run_emulated(emulated, case, *tensors), reference_grads(case, *tensors), F64)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["c16_g2", "c30_k5_s2_d2", "c3_g3_nopad"])
def test_emulated_kernels_match_reference_low_precision(
    emulated: ctypes.CDLL, name: str, dtype: torch.dtype
) -> None:
    """Vector widths 2/4/8 of each element type; reference on the same rounded inputs."""
    case = CASES[name]
    tensors = [t.to(dtype) for t in make_inputs(case, quarter_offsets=True)]
    assert_matches(run_emulated(emulated, case, *tensors), reference_grads(case, *tensors), dtype)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("where", ["input", "grad_input"])
def test_emulated_kernels_misaligned_pointers(
    emulated: ctypes.CDLL, dtype: torch.dtype, where: str
) -> None:
    """Pointers not aligned for vector access fall back to narrower widths, same result."""
    case = CASES["c16_g2"]
    x, offset, mask, grad_out = (t.to(dtype) for t in make_inputs(case))
    want = reference_grads(case, x, offset, mask, grad_out)
    if where == "input":
        got = run_emulated(emulated, case, _misaligned_copy(x), offset, mask, grad_out)
    else:
        got = run_emulated(emulated, case, x, offset, mask, grad_out, misaligned_grad_input=True)
    assert_matches(got, want, dtype)


# ---------------------------------------------------------------------------------------------
# 3. On a GPU


def _cuda_op_grads(
    case: Case,
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    grad_out: torch.Tensor,
    mask_softmax: bool = False,
) -> tuple[torch.Tensor, ...]:
    leaves = [t.detach().cuda().requires_grad_() for t in (x, offset, mask)]
    out = dcnv3(*leaves, *case.params(), impl="compiled", mask_softmax=mask_softmax)
    out.backward(grad_out.cuda())
    return (out.detach(), *(t.grad for t in leaves))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_matches_reference(dcnv3_op, name: str, dtype: torch.dtype) -> None:
    case = CASES[name]
    tensors = [t.to(dtype) for t in make_inputs(case, quarter_offsets=dtype != F64)]
    got = _cuda_op_grads(case, *tensors)
    assert all(g.device.type == "cuda" and g.dtype == dtype for g in got)
    assert_matches(got, reference_grads(case, *tensors), dtype)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("mask_softmax", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_cpu_op(dcnv3_op, dtype: torch.dtype, mask_softmax: bool) -> None:
    # mask_softmax: on CUDA ATen's softmax runs around the kernels, on the CPU inside them.
    case = Case(3, 14, 14, 4, 16, offset_std=3.0)
    x, offset, mask, grad_out = (t.to(dtype) for t in make_inputs(case, seed=1))
    leaves = [t.clone().requires_grad_() for t in (x, offset, mask)]
    out = dcnv3(*leaves, *case.params(), impl="compiled", mask_softmax=mask_softmax)
    out.backward(grad_out)
    want = (out.detach().to(F64), *(t.grad.to(F64) for t in leaves))
    got = _cuda_op_grads(case, x, offset, mask, grad_out, mask_softmax=mask_softmax)
    assert_matches(got, want, dtype)


@pytest.mark.gpu
@requires_gpu
def test_cuda_gradcheck(dcnv3_op) -> None:
    case = Case(2, 4, 5, 2, 3, offset_std=0.7)
    x, offset, mask, _ = make_inputs(case)
    leaves = [t.cuda().requires_grad_() for t in (x, offset, mask)]
    assert torch.autograd.gradcheck(
        lambda a, b, c: dcnv3(a, b, c, *case.params(), impl="compiled"), leaves
    )


@pytest.mark.gpu
@requires_gpu
def test_cuda_internimage_level_shape(dcnv3_op) -> None:
    """A full InternImage-T level-1 shape (56x56, 4 groups of 16) in float32."""
    case = Case(2, 56, 56, 4, 16, offset_std=2.0)
    tensors = [t.float() for t in make_inputs(case, seed=2)]
    assert_matches(_cuda_op_grads(case, *tensors), reference_grads(case, *tensors), torch.float32)


@pytest.mark.gpu
@requires_gpu
def test_cuda_op_rejects_bad_input(dcnv3_op) -> None:
    case = CASES["c16_g2"]
    x, offset, mask, _ = (t.float().cuda() for t in make_inputs(case))
    params = (*case.params(), 64)
    forward = torch.ops.bldseg.dcnv3_forward
    with pytest.raises(RuntimeError, match="same device"):
        forward(x, offset.cpu(), mask, *params)
    with pytest.raises(RuntimeError, match="same dtype"):
        forward(x, offset.double(), mask, *params)
    with pytest.raises(RuntimeError, match="contiguous"):
        forward(x.transpose(1, 2).contiguous().transpose(1, 2), offset, mask, *params)
    with pytest.raises(RuntimeError, match="offset of shape"):
        forward(x, offset[..., :-2].contiguous(), mask, *params)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("mask_softmax", [False, True])
def test_cuda_op_rejects_group_zero_before_the_softmax(dcnv3_op, mask_softmax: bool) -> None:
    # The softmax splits the mask by group; it ran before the checks (an integer division by
    # zero for group 0).
    case = CASES["c16_g2"]
    x, offset, mask, _ = (t.float().cuda() for t in make_inputs(case))
    p = case.params()
    bad = (*p[:8], 0, *p[9:], 64, mask_softmax)
    with pytest.raises(RuntimeError, match="group and group_channels must be > 0, got 0"):
        torch.ops.bldseg.dcnv3_forward(x, offset, mask, *bad)
    with pytest.raises(RuntimeError, match="group and group_channels must be > 0, got 0"):
        torch.ops.bldseg.dcnv3_backward(x, offset, mask, x, *bad)
