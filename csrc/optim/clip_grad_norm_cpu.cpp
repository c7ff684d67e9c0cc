// torch.nn.utils.clip_grad_norm_ (2-norm, error_if_nonfinite=False) on the CPU as two passes
// over all gradients instead of per-tensor calls. On the CPU torch's foreach norm and multiply
// are loops of one ATen call per tensor: for the CPU demo's 168 gradient tensors that was 0.67
// CPU ms per step, most of it dispatch (experiments/bench_optim.py: 0.14 ms this way).
//
//   total = sqrt(sum over every element of every gradient of g * g)
//   coef  = max_norm / (total + 1e-6), clamped to at most 1 (NaN stays NaN, as torch.clamp)
//   g     = g * coef                     (skipped when coef == 1: multiplying by one is exact)
//
// The sum runs in double over fixed blocks of the flat index space, added in block order, so
// the result does not depend on the number of threads. Gradients must be dense in memory
// (any layout: each is walked as a flat array) and float32 or float64; one call may mix them.
//
// Overflow follows torch, so that switching between the two trains the same: torch squares
// and sums a float32 gradient's elements in float32 (a one-element tensor's norm is its
// absolute value, nothing squared), then the per-tensor norms in the dtype they promote to
// (float32 when every gradient is; a single norm is again not squared). Where such a float32
// sum passes FLT_MAX torch's norm is inf, and coef = 0 zeroes every gradient; the float64 sums
// here would give a finite norm instead, so they are compared with FLT_MAX (to rounding: the
// boundary is where torch's float32 sum crosses it). The norm is returned in the dtype torch
// returns it in: float64 when any gradient is float64, else float32.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "flat_parts.h"

namespace bldseg {
namespace optim {
namespace {

constexpr int64_t kBlock = 32768;  // elements per task: ~0.02-0.05 ms, enough to amortise it

template <typename T>
double sum_squares(const T* __restrict g, int64_t begin, int64_t end) {
  // four partial sums: the compiler may not reorder one double sum, so this lets it pipeline
  double s[4] = {0, 0, 0, 0};
  int64_t i = begin;
  for (; i + 4 <= end; i += 4) {
    for (int k = 0; k < 4; ++k) s[k] += double(g[i + k]) * double(g[i + k]);
  }
  for (; i < end; ++i) s[0] += double(g[i]) * double(g[i]);
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// Whether torch's float32 arithmetic for this norm overflows (see the top of the file), given
// the float64 sum of all squares; rare, so the per-tensor sums are only taken when it may.
bool float32_norm_overflows(at::TensorList grads, double sum) {
  if (!(sum > std::numeric_limits<float>::max())) return false;  // every partial sum is <= sum
  const bool all_float = std::all_of(grads.begin(), grads.end(), [](const at::Tensor& g) {
    return g.scalar_type() == at::kFloat;
  });
  if (all_float && grads.size() > 1) return true;  // the norm of the norms overflows
  for (const at::Tensor& g : grads) {
    if (g.scalar_type() != at::kFloat || g.numel() < 2) continue;
    if (sum_squares<float>(g.const_data_ptr<float>(), 0, g.numel()) >
        std::numeric_limits<float>::max()) {
      return true;
    }
  }
  return false;
}

at::Tensor clip_grad_norm_cpu(at::TensorList grads, double max_norm) {
  constexpr const char* op = "bldseg::clip_grad_norm_";
  for (const auto i : c10::irange(grads.size())) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.device().is_cpu(), op, ": gradient ", i, " is on ", g.device());
    TORCH_CHECK(g.scalar_type() == at::kFloat || g.scalar_type() == at::kDouble, op,
                ": gradient ", i, " is ", g.scalar_type(), " (float32 or float64 only)");
    TORCH_CHECK(g.is_non_overlapping_and_dense(), op, ": gradient ", i, " ", g.sizes(),
                g.strides(), " is not dense in memory");
  }
  // torch returns the norm as a 0-d tensor of the per-tensor norms' promoted dtype: float64
  // if any gradient is float64, float32 otherwise (and with no gradients)
  const bool any_double = std::any_of(grads.begin(), grads.end(), [](const at::Tensor& g) {
    return g.scalar_type() == at::kDouble;
  });
  const auto dtype = any_double ? at::kDouble : at::kFloat;
  const std::vector<int64_t> start = flat_starts(grads);
  const int64_t n = start.back();
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(blocks, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for_each_part(start, b * kBlock, std::min(n, (b + 1) * kBlock),
                    [&](int64_t i, int64_t lo, int64_t hi) {
                      AT_DISPATCH_FLOATING_TYPES(grads[i].scalar_type(), "clip_grad_norm_", [&] {
                        partial[b] += sum_squares<scalar_t>(grads[i].const_data_ptr<scalar_t>(),
                                                            lo, hi);
                      });
                    });
    }
  });
  double sum = 0;
  for (const double p : partial) sum += p;
  const double total =
      float32_norm_overflows(grads, sum) ? std::numeric_limits<double>::infinity() : std::sqrt(sum);
  const double coef = max_norm / (total + 1e-6);
  if (!(coef >= 1.0)) {  // coef < 1, or NaN (torch.clamp keeps NaN and scales by it)
    at::parallel_for(0, n, kBlock, [&](int64_t begin, int64_t end) {
      for_each_part(start, begin, end, [&](int64_t i, int64_t lo, int64_t hi) {
        AT_DISPATCH_FLOATING_TYPES(grads[i].scalar_type(), "clip_grad_norm_", [&] {
          // torch multiplies by the coefficient cast to the gradient's dtype
          const scalar_t c = static_cast<scalar_t>(coef);
          scalar_t* __restrict g = grads[i].data_ptr<scalar_t>();
          for (int64_t k = lo; k < hi; ++k) g[k] *= c;
        });
      });
    });
  }
  return at::scalar_tensor(total, at::TensorOptions().dtype(dtype));
}

}  // namespace
}  // namespace optim
}  // namespace bldseg

TORCH_LIBRARY_FRAGMENT(bldseg, m) {
  m.def("clip_grad_norm_(Tensor(a!)[] grads, float max_norm) -> Tensor");
}

TORCH_LIBRARY_IMPL(bldseg, CPU, m) {
  m.impl("clip_grad_norm_", &bldseg::optim::clip_grad_norm_cpu);
}
