// Schedule-free AdamW's step (Defazio et al. 2024, the `schedulefree` package's
// AdamWScheduleFree.step) on the CPU: one pass over each parameter instead of the package's
// eleven foreach ops. On the CPU a foreach op is a loop of per-tensor ATen calls, so for a model
// of many small tensors (the CPU demo's 0.58M parameters are 168 tensors) the step cost about
// 1,800 small calls: 3.6 ms of a 54 ms training step, with the second thread idle.
//
// Per element, with the step's scalars computed once per parameter group in Python
// (bldseg/train/optim.py), in the package's order of operations:
//   v  = v * beta2 + (1 - beta2) * g * g               exp_avg_sq
//   gn = g / (sqrt(v / bias_correction2) + eps) [+ weight_decay * y]
//   y  = lerp(y, z, ckp1) + lr * (beta1 * (1 - ckp1) - 1) * gn
//   z  = z - lr * gn
// where y is the parameter (the point gradients are taken at) and z the base sequence. The
// package also leaves gn in the gradient; this op leaves the gradient unchanged (training
// zeroes it before the next backward either way).
//
// The four tensors of a parameter must have the same shape, dtype (float32 or float64) and
// memory layout (dense, the same strides: true for state made with preserve_format and for
// the gradients autograd makes), so they are walked as flat arrays in memory order.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "flat_parts.h"

namespace bldseg {
namespace optim {
namespace {

template <typename T>
struct Coeffs {
  T beta2, one_minus_beta2, bias_correction2, eps, decay, ckp1, one_minus_ckp1, y_step, lr;
};

// Elements [begin, end) of one parameter. No FMA contraction is possible here (the library is
// built for baseline x86-64), so each line rounds as the package's separate ops do, except
// where ATen's own vector kernels fuse a multiply-add (lerp): the two agree to an ulp or so.
// kDecay and kSmall (ATen's lerp switches formula at weight 1/2) are template parameters so
// that the loop has no branch and vectorises (with -fno-math-errno for the square root).
template <typename T, bool kDecay, bool kSmall>
void update(T* __restrict y, const T* __restrict g, T* __restrict z, T* __restrict v,
            int64_t begin, int64_t end, const Coeffs<T>& c) {
  for (int64_t i = begin; i < end; ++i) {
    const T gi = g[i];
    const T vi = v[i] * c.beta2 + c.one_minus_beta2 * gi * gi;
    v[i] = vi;
    T gn = gi / (std::sqrt(vi / c.bias_correction2) + c.eps);
    if constexpr (kDecay) gn = gn + c.decay * y[i];
    const T yi = y[i], zi = z[i];
    const T lerped = kSmall ? yi + c.ckp1 * (zi - yi) : zi - (zi - yi) * c.one_minus_ckp1;
    y[i] = lerped + c.y_step * gn;
    z[i] = zi - c.lr * gn;
  }
}

template <typename T>
void update_any(T* y, const T* g, T* z, T* v, int64_t begin, int64_t end, const Coeffs<T>& c) {
  const bool decay = c.decay != T(0), small = std::abs(c.ckp1) < T(0.5);
  if (decay && small) return update<T, true, true>(y, g, z, v, begin, end, c);
  if (decay) return update<T, true, false>(y, g, z, v, begin, end, c);
  if (small) return update<T, false, true>(y, g, z, v, begin, end, c);
  update<T, false, false>(y, g, z, v, begin, end, c);
}

void check_lists(const at::TensorList& params, const at::TensorList& grads,
                 const at::TensorList& z, const at::TensorList& exp_avg_sq) {
  constexpr const char* op = "bldseg::schedulefree_adamw_step_";
  TORCH_CHECK(grads.size() == params.size() && z.size() == params.size() &&
                  exp_avg_sq.size() == params.size(),
              op, ": the four lists need one entry per parameter, got ", params.size(), ", ",
              grads.size(), ", ", z.size(), ", ", exp_avg_sq.size());
  for (const auto i : c10::irange(params.size())) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu(), op, ": parameter ", i, " is on ", p.device());
    TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble, op,
                ": parameter ", i, " is ", p.scalar_type(), " (float32 or float64 only)");
    TORCH_CHECK(p.is_non_overlapping_and_dense(), op, ": parameter ", i,
                " is not dense in memory");
    for (const at::Tensor* t : {&grads[i], &z[i], &exp_avg_sq[i]}) {
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == p.scalar_type() &&
                      t->sizes() == p.sizes() && t->strides() == p.strides(),
                  op, ": parameter ", i, " ", p.sizes(), p.strides(), " ", p.scalar_type(),
                  ": its gradient or state differs in device, dtype, shape or layout (",
                  t->device(), " ", t->scalar_type(), " ", t->sizes(), t->strides(), ")");
    }
  }
}

void schedulefree_adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList z,
                                 at::TensorList exp_avg_sq, double lr, double beta1,
                                 double beta2, double eps, double weight_decay, double ckp1,
                                 double bias_correction2) {
  check_lists(params, grads, z, exp_avg_sq);
  if (params.empty()) return;
  // Elements of all the parameters as one index space, so that small tensors share a task
  // and large ones are split.
  const std::vector<int64_t> start = flat_starts(params);
  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "schedulefree_adamw_step_cpu", [&] {
    using T = scalar_t;
    const Coeffs<T> c{T(beta2),       T(1 - beta2), T(bias_correction2),
                      T(eps),         T(weight_decay), T(ckp1),
                      T(1 - ckp1),    T(lr * (beta1 * (1 - ckp1) - 1)), T(lr)};
    for (const auto i : c10::irange(params.size())) {
      TORCH_CHECK(params[i].scalar_type() == params[0].scalar_type(),
                  "bldseg::schedulefree_adamw_step_: parameters of one call share a dtype");
    }
    // ~32k elements per task: about 0.1 ms of work, enough to amortise taking it.
    at::parallel_for(0, start.back(), 32768, [&](int64_t begin, int64_t end) {
      for_each_part(start, begin, end, [&](int64_t i, int64_t lo, int64_t hi) {
        update_any<T>(params[i].data_ptr<T>(), grads[i].const_data_ptr<T>(), z[i].data_ptr<T>(),
                      exp_avg_sq[i].data_ptr<T>(), lo, hi, c);
      });
    });
  });
}

}  // namespace
}  // namespace optim
}  // namespace bldseg

// A fragment: the DCNv3 library owns TORCH_LIBRARY(bldseg, ...).
TORCH_LIBRARY_FRAGMENT(bldseg, m) {
  m.def(
      "schedulefree_adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] z, "
      "Tensor(c!)[] exp_avg_sq, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, float ckp1, float bias_correction2) -> ()");
}

TORCH_LIBRARY_IMPL(bldseg, CPU, m) {
  m.impl("schedulefree_adamw_step_", &bldseg::optim::schedulefree_adamw_step_cpu);
}
