// DCNv3 forward and backward on the CPU.
//
// Sampling follows the official InternImage CUDA kernel (dcnv3_im2col_cuda.cuh): for output
// pixel (ho, wo), group g and kernel point (i along w, j along h; point index p = i*Kh + j):
//   loc_w = (half_w - pad_w + wo*stride_w) - half_w*s + (i*dilation_w + offset_x[g, p]) * s
//   loc_h = (half_h - pad_h + ho*stride_h) - half_h*s + (j*dilation_h + offset_y[g, p]) * s
// with half = (dilation*(kernel-1)) >> 1 and s = offset_scale, in unpadded input pixels.
// A point contributes only when -1 < loc < size (else all four corners are outside), and each
// bilinear corner outside the input reads zero. With mask_softmax the mask holds logits: each
// pixel's probabilities (softmax over the P points of a group) are computed before its plan,
// and the backward turns the gradient of the probabilities into that of the logits in place.
//
// Parallelism: the forward runs over output pixels (each writes its own output row). The
// backward runs over images, or (image, block of groups) when there are few images, which own
// disjoint slices of grad_input[n, :, :, block, :], so no two threads scatter into the same
// element; when there are fewer (n, g) pairs than threads the output rows are also split, each
// chunk scattering into a private buffer summed afterwards. With at least as many (n, g) pairs
// as threads, each element of grad_input gets its contributions in the same order (output
// pixels in row order) however the work is split. Work is handed out in blocks from a shared
// counter rather than split evenly up front: on a shared machine one thread is often
// descheduled, and the others then take over its blocks. Which thread runs a block never
// changes what the block computes, so those results do not depend on the thread count or the
// schedule. The row-chunk path's number of chunks follows the thread count, so there
// grad_input's float rounding (not its value) can differ between thread counts.
//
// Speed: the work per sampling point is small (4 corners x C channels), so the scalar index
// math matters as much as the vector part. What keeps both short:
//   - the points of one output pixel (all groups in the forward, one group in the backward)
//     are located together into a PointPlan before any channel work; on AVX2 that is
//     vectorised over the points (Avx2Planner), and the channel loops then only read the
//     corner index and the four weights of each point;
//   - group_channels 16 and 32 (all InternImage variants use 16) are compile-time constants
//     (template CF), so the channel loops unroll and the forward accumulates in registers;
//   - on x86-64 each kernel is also compiled for AVX2+FMA and picked at run time
//     (__builtin_cpu_supports), so one build folder serves old and new CPUs (no -march).
//     For CF 16 and 32 the AVX2 channel loops are written with intrinsics (Avx2Channels):
//     the compiler's own vectorisation of the backward summed the four per-corner dot
//     products one lane at a time and spilled registers. Elsewhere the `omp simd` loops of
//     ScalarChannels are compiled for whichever ISA the enclosing function targets;
//   - where the CPU has AVX-512 (F, VL, DQ, BW) a third build runs the channel loops on 512-bit
//     registers (Avx512Channels), a row of 16 float channels in one register; opt-in, see
//     cpu_isa().
//   - for points with some corners outside the input (a fifth of all at 7x7, an eighth at
//     14x14) the plan also keeps the (lo, lo) pixel index and a bit per inside corner, computed
//     with the rest of the plan, so the channel loops pick the rows (or the zero/sink rows)
//     without locating the point again: the forward at levels 3 and 4 takes 12% and 19% less;
//   - the backward's per-point arithmetic after the channel loops (the mask and offset
//     gradients from the four corner dot products) runs once per pixel over all its points,
//     from arrays in the plan (point_grads; vectorised in Avx2Planner), not point by point in
//     scalar code between the channel loops (the backward at level 2: 3.2 -> 2.4 ms);
//   - mask_softmax fuses the module's softmax over each group's P points into the plan step
//     (PyTorch's CPU softmax over a last dimension of 9 runs row by row and was a fifth of the
//     module at level 1); in float its exponentials are vectorised (Avx2Planner::softmax).
//     FMA and the reordered sums change rounding in the last bits only; results stay within
//     1e-10 of the reference in float64.

#include "dcnv3_cpu_kernel.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

namespace bldseg {
namespace dcnv3 {
namespace {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BLDSEG_X86_DISPATCH 1
#define BLDSEG_AVX2 __attribute__((target("avx2,fma")))
// A superset of the AVX2 target, so the AVX2 helpers inline into the AVX-512 kernels too.
#define BLDSEG_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")))
#else
#define BLDSEG_X86_DISPATCH 0
#define BLDSEG_AVX2
#define BLDSEG_AVX512
#endif
#if defined(__GNUC__) || defined(__clang__)
#define BLDSEG_ALWAYS_INLINE inline __attribute__((always_inline))
#define BLDSEG_LIKELY(x) __builtin_expect(!!(x), 1)
#else
#define BLDSEG_ALWAYS_INLINE inline
#define BLDSEG_LIKELY(x) (x)
#endif
// Helpers that use AVX2 (AVX-512) intrinsics: inlined into the kernels of that ISA only.
#define BLDSEG_AVX2_INLINE BLDSEG_ALWAYS_INLINE BLDSEG_AVX2
#define BLDSEG_AVX512_INLINE BLDSEG_ALWAYS_INLINE BLDSEG_AVX512
// The kernel bodies below are templates on their channel loops, without a target of their own;
// the wrappers that instantiate them (baseline and AVX2) are flattened, so that everything,
// the AVX2 channel loops included, is inlined into a function compiled for the right ISA.
// (always_inline on the bodies would not do: GCC inlines the AVX2 loops into the generic body
// first, and refuses.)
#if defined(__GNUC__) || defined(__clang__)
#define BLDSEG_FLATTEN __attribute__((flatten))
#else
#define BLDSEG_FLATTEN
#endif

#if BLDSEG_X86_DISPATCH
// Whether the switch $name is on: set to anything but "", "0", "false", "no" or "off" (in any
// case). Presence alone turned BLDSEG_CPU_AVX512=0 on, and BLDSEG_CPU_NO_AVX2=0 too.
bool env_switch(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || value[0] == '\0') return false;
  for (const char* off : {"0", "false", "no", "off"}) {
    int i = 0;
    for (; off[i] != '\0'; ++i) {
      const char c = value[i];
      if ((c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c) != off[i]) break;
    }
    if (off[i] == '\0' && value[i] == '\0') return false;
  }
  return true;
}
#endif

// The instruction set the kernels run with, chosen once at run time from what the CPU has:
// AVX2+FMA where present, else the baseline. $BLDSEG_CPU_NO_AVX2=1 forces the baseline kernels
// (the tests cover them on AVX2 machines that way). The AVX-512 kernels are opt-in,
// $BLDSEG_CPU_AVX512=1, on CPUs with AVX-512 F/VL/DQ/BW: on the AMD Zen 4 we measure on
// (512-bit operations issued as two 256-bit halves) they are no faster than the AVX2 ones
// (experiments/bench_dcnv3.py --isa), so they are not worth a default there; CPUs with full-width
// 512-bit units may differ, and the benchmark says which to use.
enum class Isa { kBaseline, kAvx2, kAvx512 };

Isa cpu_isa() {
#if BLDSEG_X86_DISPATCH
  static const Isa isa = [] {
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ||
        env_switch("BLDSEG_CPU_NO_AVX2")) {
      return Isa::kBaseline;
    }
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
        env_switch("BLDSEG_CPU_AVX512")) {
      return Isa::kAvx512;
    }
    return Isa::kAvx2;
  }();
  return isa;
#else
  return Isa::kBaseline;
#endif
}

// Runs fn(begin, end) over [0, total) in blocks of `grain` items, which the threads take from
// a shared counter: a descheduled thread holds up one block, not a fixed share of the work.
template <typename Fn>
void parallel_blocks(int64_t total, int64_t grain, const Fn& fn) {
  if (total <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t blocks = (total + grain - 1) / grain;
  std::atomic<int64_t> next{0};
  // One task per thread (fewer when there are fewer blocks); each drains the counter. Inside
  // another parallel region at::parallel_for runs the single task inline, which drains it all.
  at::parallel_for(0, std::min<int64_t>(blocks, at::get_num_threads()), 1,
                   [&](int64_t, int64_t) {
                     for (int64_t b = next.fetch_add(1); b < blocks; b = next.fetch_add(1)) {
                       fn(b * grain, std::min(total, (b + 1) * grain));
                     }
                   });
}

// The four bilinear corners of one sampling location.
template <typename T>
struct Bilinear {
  bool interior;     // all four corners inside: the common case
  int64_t base;      // h_low*W_in + w_low, the (lo,lo) corner (negative when h_low is -1)
  int corners;       // bit k set when corner k of (lo,lo) (lo,hi) (hi,lo) (hi,hi) is inside;
                     // filled only when !interior
  T weight[4];       // hh*hw, hh*lw, lh*hw, lh*lw
  T lh, lw, hh, hw;  // fractional parts and their complements
};

// Fills `b` for location (loc_h, loc_w); returns false when the location reads only zeros.
template <typename T>
BLDSEG_ALWAYS_INLINE bool locate(T loc_h, T loc_w, int64_t height, int64_t width, Bilinear<T>& b) {
  // Written so that NaN locations fail the test and never reach the integer conversion.
  if (!(loc_h > T(-1) && loc_w > T(-1) && loc_h < T(height) && loc_w < T(width))) {
    return false;
  }
  // Exact floor by truncation (no libm call on baseline x86-64); |loc| is small here.
  int64_t h_low = static_cast<int64_t>(loc_h);
  int64_t w_low = static_cast<int64_t>(loc_w);
  h_low -= T(h_low) > loc_h;
  w_low -= T(w_low) > loc_w;
  const int64_t h_high = h_low + 1;
  const int64_t w_high = w_low + 1;
  b.lh = loc_h - T(h_low);
  b.lw = loc_w - T(w_low);
  b.hh = T(1) - b.lh;
  b.hw = T(1) - b.lw;
  b.weight[0] = b.hh * b.hw;
  b.weight[1] = b.hh * b.lw;
  b.weight[2] = b.lh * b.hw;
  b.weight[3] = b.lh * b.lw;
  const bool h_low_in = h_low >= 0, h_high_in = h_high <= height - 1;
  const bool w_low_in = w_low >= 0, w_high_in = w_high <= width - 1;
  b.base = h_low * width + w_low;
  b.interior = h_low_in && h_high_in && w_low_in && w_high_in;
  if (b.interior) return true;
  b.corners = (h_low_in && w_low_in) | (h_low_in && w_high_in) << 1 |
              (h_high_in && w_low_in) << 2 | (h_high_in && w_high_in) << 3;
  return true;
}

// Start of the sampling grid of output pixel `out` along one axis, before the kernel offset:
// p0 - half*s in the official kernel.
template <typename T>
BLDSEG_ALWAYS_INLINE T grid_origin(int64_t out, int64_t stride, int64_t pad, int64_t half,
                                   T scale) {
  return T(half - pad + out * stride) - T(half) * scale;
}

// The four corner rows of a point whose corners are all inside, in `data` whose pixels are
// `stride` apart; `base` is the pixel index of the (lo, lo) corner.
template <typename P>
BLDSEG_ALWAYS_INLINE void interior_rows(P* data, int64_t base, int64_t stride, int64_t width,
                                        P* rows[4]) {
  rows[0] = data + base * stride;
  rows[1] = rows[0] + stride;
  rows[2] = rows[0] + width * stride;
  rows[3] = rows[2] + stride;
}

// Rows of the four corners of a point on the border: `base` is the pixel index of its (lo, lo)
// corner (which may itself be outside) and bit k of `corners` says whether corner k is inside.
// Outside corners get `outside + k*outside_step` instead: a zero row to read (its products
// vanish) or a private sink row per corner to scatter into, so the four rows never alias and
// the channel loops have no branch.
template <typename P>
BLDSEG_ALWAYS_INLINE void border_rows(int64_t base, int corners, P* data, int64_t stride,
                                      int64_t width, P* outside, int64_t outside_step,
                                      P* rows[4]) {
  const int64_t delta[4] = {0, 1, width, width + 1};
  for (int k = 0; k < 4; ++k) {
    rows[k] = (corners >> k & 1) ? data + (base + delta[k]) * stride : outside + k * outside_step;
  }
}

// ---------------------------------------------------------------------------------------------
// Sampling plans. The kernels first locate all the points of one output pixel (and group) at
// once, into a PointPlan, and then run the channel loops point by point from it. Locating is
// the scalar half of the work; done in bulk it vectorises (Avx2Planner), and the channel
// loops that follow keep few values live.

// Status of a point in PointPlan::base, besides the pixel index of an interior point.
constexpr int64_t kOutside = -1;  // all four corners outside: the point contributes nothing
constexpr int64_t kBorder = -2;   // some corners outside: see PointPlan::low and ::corners

// Structure of arrays over the points of one plan, padded to a whole number of registers.
template <typename T>
struct PointPlan {
  static constexpr int64_t kPad = 8;  // the widest register, in elements (8 floats)
  int64_t capacity;
  std::vector<T> storage;
  std::vector<int64_t> base;  // (capacity,) h_low*W_in + w_low when all four corners are
                              // inside, else kOutside or kBorder
  std::vector<int64_t> low;   // (capacity,) kBorder points: h_low*W_in + w_low
  std::vector<int32_t> corners;  // (capacity,) kBorder points: which corners are inside, as
                              // Bilinear::corners (the channel loops read these instead of
                              // locating the point again)
  T* a[4];      // (capacity,) mask * bilinear weight of each corner (lo,lo) (lo,hi) (hi,lo) (hi,hi)
  T *lh, *lw;   // (capacity,) fractional parts of loc_h, loc_w (backward only)
  T* dot[4];    // (capacity,) <grad_out, corner row> of each corner (backward only), filled by
                // the channel loops and read by the planner's point_grads()

  explicit PointPlan(int64_t points)
      : capacity((points + kPad - 1) / kPad * kPad),
        storage(static_cast<size_t>(10 * capacity), T(0)),
        base(static_cast<size_t>(capacity)),
        low(static_cast<size_t>(capacity)),
        corners(static_cast<size_t>(capacity)) {
    T* next = storage.data();
    auto take = [&] {
      T* p = next;
      next += capacity;
      return p;
    };
    for (int k = 0; k < 4; ++k) a[k] = take();
    lh = take(), lw = take();
    for (int k = 0; k < 4; ++k) dot[k] = take();
  }
};

// Where the points of one plan sample, before the per-pixel origin and the learned offsets:
// grid_w[k] = i*dilation_w and grid_h[k] = j*dilation_h for point k = g*P + i*Kh + j, over
// `groups` groups; padded like a PointPlan.
template <typename T>
struct KernelGrid {
  std::vector<T> w, h;
  KernelGrid(const Geometry& geo, int64_t groups) {
    const int64_t Kh = geo.kernel_h, Kw = geo.kernel_w, P = Kh * Kw;
    const int64_t padded = (groups * P + PointPlan<T>::kPad - 1) / PointPlan<T>::kPad *
                           PointPlan<T>::kPad;
    w.assign(static_cast<size_t>(padded), T(0));
    h.assign(static_cast<size_t>(padded), T(0));
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t i = 0; i < Kw; ++i) {
        for (int64_t j = 0; j < Kh; ++j) {
          w[g * P + i * Kh + j] = T(i * geo.dilation_w);
          h[g * P + i * Kh + j] = T(j * geo.dilation_h);
        }
      }
    }
  }
};

// What a planner gets: `count` points with offsets `off` (count, 2) as [x, y] and masks `mask`
// (count,), sampling at origin + (grid + offset) * scale in an input of height x width.
template <typename T>
struct PlanArgs {
  const T* off;
  const T* mask;
  const KernelGrid<T>& grid;
  int64_t count;
  T origin_h, origin_w, scale;
  int64_t height, width;
};

// mask_softmax: the logits of `groups` groups of P points, (groups, P), to probabilities,
// each group's softmax as torch.softmax computes it (max subtracted, then normalised), in
// three steps so the planners can vectorise the middle one.
template <typename T>
inline void subtract_group_max(const T* logit, T* shifted, int64_t groups, int64_t P) {
  for (int64_t g = 0; g < groups; ++g, logit += P, shifted += P) {
    T top = logit[0];
    for (int64_t p = 1; p < P; ++p) top = std::max(top, logit[p]);
    for (int64_t p = 0; p < P; ++p) shifted[p] = logit[p] - top;
  }
}

template <typename T>
inline void normalise_groups(T* prob, int64_t groups, int64_t P) {
  for (int64_t g = 0; g < groups; ++g, prob += P) {
    T sum = T(0);
    for (int64_t p = 0; p < P; ++p) sum += prob[p];
    for (int64_t p = 0; p < P; ++p) prob[p] /= sum;
  }
}

template <typename T>
inline void point_softmax(const T* logit, T* prob, int64_t groups, int64_t P) {
  subtract_group_max(logit, prob, groups, P);
  for (int64_t k = 0; k < groups * P; ++k) prob[k] = std::exp(prob[k]);
  normalise_groups(prob, groups, P);
}

// The backward of point_softmax in place: grad (groups, P) of the probabilities becomes the
// gradient of the logits, prob_p * (grad_p - sum_q prob_q * grad_q) per group.
template <typename T>
inline void point_softmax_backward(const T* prob, T* grad, int64_t groups, int64_t P) {
  for (int64_t g = 0; g < groups; ++g, prob += P, grad += P) {
    T dot = T(0);
    for (int64_t p = 0; p < P; ++p) dot += prob[p] * grad[p];
    for (int64_t p = 0; p < P; ++p) grad[p] = prob[p] * (grad[p] - dot);
  }
}

// One point's gradients from its corner dot products d0..d3 (corners (lo,lo) (lo,hi) (hi,lo)
// (hi,hi)), its fractional parts lh, lw and sm = offset_scale * mask; the planners' vector
// versions use the same expressions.
template <typename T>
BLDSEG_ALWAYS_INLINE void point_grad(T d0, T d1, T d2, T d3, T lh, T lw, T sm, T* grad_offset,
                                     T* grad_mask) {
  const T hh = T(1) - lh, hw = T(1) - lw;
  *grad_mask = hh * (hw * d0 + lw * d1) + lh * (hw * d2 + lw * d3);
  grad_offset[0] = sm * (hh * (d1 - d0) + lh * (d3 - d2));  // d / d offset_x (along w)
  grad_offset[1] = sm * (hw * (d2 - d0) + lw * (d3 - d1));  // d / d offset_y (along h)
}

// Portable planner: locate() point by point. kGrad also fills the backward-only fields.
// softmax() is point_softmax (the planners also own this per-pixel step: its exponentials
// are vectorised in the AVX2 one).
template <typename T, bool kGrad>
struct ScalarPlanner {
  static BLDSEG_ALWAYS_INLINE void softmax(const T* logit, T* prob, int64_t groups, int64_t P) {
    point_softmax(logit, prob, groups, P);
  }

  static BLDSEG_ALWAYS_INLINE void fill(const PlanArgs<T>& in, PointPlan<T>& plan) {
    for (int64_t k = 0; k < in.count; ++k) {
      const T loc_w = in.origin_w + (in.grid.w[k] + in.off[2 * k]) * in.scale;
      const T loc_h = in.origin_h + (in.grid.h[k] + in.off[2 * k + 1]) * in.scale;
      Bilinear<T> b;
      if (!locate(loc_h, loc_w, in.height, in.width, b)) {
        plan.base[k] = kOutside;
        continue;
      }
      plan.base[k] = b.interior ? b.base : kBorder;
      if (!b.interior) plan.low[k] = b.base, plan.corners[k] = b.corners;
      for (int c = 0; c < 4; ++c) plan.a[c][k] = in.mask[k] * b.weight[c];
      if constexpr (kGrad) plan.lh[k] = b.lh, plan.lw[k] = b.lw;
    }
  }

  // The gradients of the `count` points of a plan from their corner dot products (the
  // readable version of Avx2Planner::point_grads): d out / d mask is the bilinear value,
  // sum_c weight_c * dot_c; d out / d loc comes from the derivative of the weights, times
  // mask * offset_scale. Points with base kOutside must have dot 0; their gradients are set
  // to exactly 0 by the caller.
  static BLDSEG_ALWAYS_INLINE void point_grads(const PointPlan<T>& plan, const T* mask, T scale,
                                               int64_t count, T* grad_offset, T* grad_mask) {
    for (int64_t k = 0; k < count; ++k) {
      point_grad(plan.dot[0][k], plan.dot[1][k], plan.dot[2][k], plan.dot[3][k], plan.lh[k],
                 plan.lw[k], scale * mask[k], grad_offset + 2 * k, grad_mask + k);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Channel loops. A policy object holds the per-pixel state (forward accumulator, backward
// grad_output row) and does the work over the C channels of one sampling point:
//   begin(out) / add(a, v) / finish(out): out[c] = sum over points of sum_k a[k] * v[k][c];
//   set_top(top) / backprop(a, v, gi, d): gi[k][c] += a[k] * top[c] and d[k] = <top, v[k]>.

// Portable version: `omp simd` loops, vectorised for whatever ISA the enclosing function
// targets. CF > 0 is the compile-time group_channels (accumulator in registers), 0 = runtime.
template <typename T, int CF>
struct ScalarChannels {
  int64_t C;
  T* acc;
  const T* top;
  T acc_fixed[CF > 0 ? CF : 1];
  T top_fixed[CF > 0 ? CF : 1];

  explicit ScalarChannels(int64_t channels) : C(CF > 0 ? CF : channels) {}

  BLDSEG_ALWAYS_INLINE void begin(T* out) {
    acc = CF > 0 ? acc_fixed : out;
    for (int64_t c = 0; c < C; ++c) acc[c] = T(0);
  }
  BLDSEG_ALWAYS_INLINE void add(const T a[4], const T* const v[4]) {
    const T a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
    const T *v0 = v[0], *v1 = v[1], *v2 = v[2], *v3 = v[3];
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      acc[c] += a0 * v0[c] + a1 * v1[c] + a2 * v2[c] + a3 * v3[c];
    }
  }
  BLDSEG_ALWAYS_INLINE void finish(T* out) {
    if constexpr (CF > 0) {
      for (int64_t c = 0; c < C; ++c) out[c] = acc[c];
    }
  }

  BLDSEG_ALWAYS_INLINE void set_top(const T* t) {
    if constexpr (CF > 0) {
      for (int64_t c = 0; c < C; ++c) top_fixed[c] = t[c];
      top = top_fixed;
    } else {
      top = t;
    }
  }
  BLDSEG_ALWAYS_INLINE void backprop(const T a[4], const T* const v[4], T* const gi[4], T d[4]) {
    const T a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
    const T *v0 = v[0], *v1 = v[1], *v2 = v[2], *v3 = v[3];
    T *gi0 = gi[0], *gi1 = gi[1], *gi2 = gi[2], *gi3 = gi[3];
    T d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
    for (int64_t c = 0; c < C; ++c) {
      const T t = top[c];
      d0 += t * v0[c];
      d1 += t * v1[c];
      d2 += t * v2[c];
      d3 += t * v3[c];
      gi0[c] += a0 * t;
      gi1[c] += a1 * t;
      gi2[c] += a2 * t;
      gi3[c] += a3 * t;
    }
    d[0] = d0, d[1] = d1, d[2] = d2, d[3] = d3;
  }
};

#if BLDSEG_X86_DISPATCH
// One AVX2 register of T: 8 floats or 4 doubles.
template <typename T>
struct Simd;

template <>
struct Simd<float> {
  using V = __m256;
  static constexpr int L = 8;
  static BLDSEG_AVX2_INLINE V zero() { return _mm256_setzero_ps(); }
  static BLDSEG_AVX2_INLINE V set1(float a) { return _mm256_set1_ps(a); }
  static BLDSEG_AVX2_INLINE V load(const float* p) { return _mm256_loadu_ps(p); }
  static BLDSEG_AVX2_INLINE void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static BLDSEG_AVX2_INLINE V add(V a, V b) { return _mm256_add_ps(a, b); }
  static BLDSEG_AVX2_INLINE V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static BLDSEG_AVX2_INLINE V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static BLDSEG_AVX2_INLINE V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static BLDSEG_AVX2_INLINE V floor(V a) { return _mm256_floor_ps(a); }
  static BLDSEG_AVX2_INLINE V both(V a, V b) { return _mm256_and_ps(a, b); }
  // Ordered comparisons: false for NaN.
  static BLDSEG_AVX2_INLINE V gt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static BLDSEG_AVX2_INLINE V lt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static BLDSEG_AVX2_INLINE V ge(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
  static BLDSEG_AVX2_INLINE V le(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_LE_OQ); }
  // p[0:n] and zeros (n may be <= 0 or >= L); the masked load never touches p[n:].
  static BLDSEG_AVX2_INLINE V load_first(const float* p, int64_t n) {
    if (n >= L) return load(p);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const int n32 = static_cast<int>(std::max<int64_t>(n, 0));
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n32), lane));
  }
  // x and y of n <= L points stored as [x0 y0 x1 y1 ...].
  static BLDSEG_AVX2_INLINE void load_xy(const float* p, int64_t n, V& x, V& y) {
    const V a = load_first(p, 2 * n), b = load_first(p + L, 2 * n - L);
    // Per 128-bit half: x0 x1 x4 x5 | x2 x3 x6 x7; then swap the middle 64-bit quarters.
    const V xs = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
    const V ys = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
    x = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(xs), 0xD8));
    y = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ys), 0xD8));
  }
  // The inverse for L points: p[0:2L] = [x0 y0 x1 y1 ...].
  static BLDSEG_AVX2_INLINE void store_xy(float* p, V x, V y) {
    const V lo = _mm256_unpacklo_ps(x, y);  // x0 y0 x1 y1 | x4 y4 x5 y5
    const V hi = _mm256_unpackhi_ps(x, y);  // x2 y2 x3 y3 | x6 y6 x7 y7
    store(p, _mm256_permute2f128_ps(lo, hi, 0x20));
    store(p + L, _mm256_permute2f128_ps(lo, hi, 0x31));
  }
  // out[0:L] = interior ? fh*width + fw : (valid ? kBorder : kOutside), and low[0:L] =
  // fh*width + fw, in int64.
  static BLDSEG_AVX2_INLINE void store_base(V fh, V fw, V valid, V interior, int64_t width,
                                            int64_t* out, int64_t* low) {
    const __m256i h = _mm256_cvttps_epi32(fh), w = _mm256_cvttps_epi32(fw);
    const __m256i v = _mm256_castps_si256(valid), in = _mm256_castps_si256(interior);
    store_base4(_mm256_castsi256_si128(h), _mm256_castsi256_si128(w),
                _mm256_castsi256_si128(v), _mm256_castsi256_si128(in), width, out, low);
    store_base4(_mm256_extracti128_si256(h, 1), _mm256_extracti128_si256(w, 1),
                _mm256_extracti128_si256(v, 1), _mm256_extracti128_si256(in, 1), width, out + 4,
                low + 4);
  }
  static BLDSEG_AVX2_INLINE void store_base4(__m128i h, __m128i w, __m128i valid,
                                             __m128i interior, int64_t width, int64_t* out,
                                             int64_t* low) {
    // mul_epi32 multiplies the low (signed) 32 bits of each 64-bit lane: exact for int32 h, W.
    const __m256i base = _mm256_add_epi64(
        _mm256_mul_epi32(_mm256_cvtepi32_epi64(h), _mm256_set1_epi64x(width)),
        _mm256_cvtepi32_epi64(w));
    const __m256i status = _mm256_blendv_epi8(_mm256_set1_epi64x(kOutside),
                                              _mm256_set1_epi64x(kBorder),
                                              _mm256_cvtepi32_epi64(valid));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                        _mm256_blendv_epi8(status, base, _mm256_cvtepi32_epi64(interior)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(low), base);
  }
  // out[l] = sum over k of bit k of lane l of in[k] (all-ones or zero lanes), in int32.
  static BLDSEG_AVX2_INLINE void store_corners(const V in[4], int32_t* out) {
    __m256i bits = _mm256_setzero_si256();
    for (int k = 0; k < 4; ++k) {
      bits = _mm256_or_si256(bits, _mm256_and_si256(_mm256_castps_si256(in[k]),
                                                    _mm256_set1_epi32(1 << k)));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), bits);
  }
  // out[k] = sum of the lanes of d_k: three horizontal adds leave, in each 128-bit half, one
  // partial sum per k; adding the halves finishes all four at once.
  static BLDSEG_AVX2_INLINE void sum4(V d0, V d1, V d2, V d3, float out[4]) {
    const V h = _mm256_hadd_ps(_mm256_hadd_ps(d0, d1), _mm256_hadd_ps(d2, d3));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }
};

template <>
struct Simd<double> {
  using V = __m256d;
  static constexpr int L = 4;
  static BLDSEG_AVX2_INLINE V zero() { return _mm256_setzero_pd(); }
  static BLDSEG_AVX2_INLINE V set1(double a) { return _mm256_set1_pd(a); }
  static BLDSEG_AVX2_INLINE V load(const double* p) { return _mm256_loadu_pd(p); }
  static BLDSEG_AVX2_INLINE void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  static BLDSEG_AVX2_INLINE V add(V a, V b) { return _mm256_add_pd(a, b); }
  static BLDSEG_AVX2_INLINE V sub(V a, V b) { return _mm256_sub_pd(a, b); }
  static BLDSEG_AVX2_INLINE V mul(V a, V b) { return _mm256_mul_pd(a, b); }
  static BLDSEG_AVX2_INLINE V fmadd(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static BLDSEG_AVX2_INLINE V floor(V a) { return _mm256_floor_pd(a); }
  static BLDSEG_AVX2_INLINE V both(V a, V b) { return _mm256_and_pd(a, b); }
  static BLDSEG_AVX2_INLINE V gt(V a, V b) { return _mm256_cmp_pd(a, b, _CMP_GT_OQ); }
  static BLDSEG_AVX2_INLINE V lt(V a, V b) { return _mm256_cmp_pd(a, b, _CMP_LT_OQ); }
  static BLDSEG_AVX2_INLINE V ge(V a, V b) { return _mm256_cmp_pd(a, b, _CMP_GE_OQ); }
  static BLDSEG_AVX2_INLINE V le(V a, V b) { return _mm256_cmp_pd(a, b, _CMP_LE_OQ); }
  static BLDSEG_AVX2_INLINE V load_first(const double* p, int64_t n) {
    if (n >= L) return load(p);
    const __m256i lane = _mm256_setr_epi64x(0, 1, 2, 3);
    return _mm256_maskload_pd(p, _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), lane));
  }
  static BLDSEG_AVX2_INLINE void load_xy(const double* p, int64_t n, V& x, V& y) {
    const V a = load_first(p, 2 * n), b = load_first(p + L, 2 * n - L);
    // x0 x2 x1 x3 (and y likewise); then swap the middle lanes.
    x = _mm256_permute4x64_pd(_mm256_unpacklo_pd(a, b), 0xD8);
    y = _mm256_permute4x64_pd(_mm256_unpackhi_pd(a, b), 0xD8);
  }
  static BLDSEG_AVX2_INLINE void store_xy(double* p, V x, V y) {
    const V lo = _mm256_unpacklo_pd(x, y);  // x0 y0 | x2 y2
    const V hi = _mm256_unpackhi_pd(x, y);  // x1 y1 | x3 y3
    store(p, _mm256_permute2f128_pd(lo, hi, 0x20));
    store(p + L, _mm256_permute2f128_pd(lo, hi, 0x31));
  }
  static BLDSEG_AVX2_INLINE void store_base(V fh, V fw, V valid, V interior, int64_t width,
                                            int64_t* out, int64_t* low) {
    const __m256i base = _mm256_add_epi64(
        _mm256_mul_epi32(_mm256_cvtepi32_epi64(_mm256_cvttpd_epi32(fh)),
                         _mm256_set1_epi64x(width)),
        _mm256_cvtepi32_epi64(_mm256_cvttpd_epi32(fw)));
    const __m256i status =
        _mm256_blendv_epi8(_mm256_set1_epi64x(kOutside), _mm256_set1_epi64x(kBorder),
                           _mm256_castpd_si256(valid));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                        _mm256_blendv_epi8(status, base, _mm256_castpd_si256(interior)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(low), base);
  }
  // As for float, with the 4 lanes' bits narrowed to int32.
  static BLDSEG_AVX2_INLINE void store_corners(const V in[4], int32_t* out) {
    __m256i bits = _mm256_setzero_si256();
    for (int k = 0; k < 4; ++k) {
      bits = _mm256_or_si256(bits, _mm256_and_si256(_mm256_castpd_si256(in[k]),
                                                    _mm256_set1_epi64x(1 << k)));
    }
    // the low 32 bits of each 64-bit lane: elements 0, 2, 4, 6
    const __m256i packed =
        _mm256_permutevar8x32_epi32(bits, _mm256_setr_epi32(0, 2, 4, 6, 0, 0, 0, 0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(packed));
  }
  // hadd gives (d0, d1) and (d2, d3) pair sums per 128-bit half; the two halves hold the
  // low and high lane pairs, so one cross-half shuffle and an add finish all four.
  static BLDSEG_AVX2_INLINE void sum4(V d0, V d1, V d2, V d3, double out[4]) {
    const V h01 = _mm256_hadd_pd(d0, d1);  // d0[0:2] d1[0:2] | d0[2:4] d1[2:4]
    const V h23 = _mm256_hadd_pd(d2, d3);  // d2[0:2] d3[0:2] | d2[2:4] d3[2:4]
    const V lo = _mm256_permute2f128_pd(h01, h23, 0x20);
    const V hi = _mm256_permute2f128_pd(h01, h23, 0x31);
    _mm256_storeu_pd(out, _mm256_add_pd(lo, hi));
  }
};

// exp of 8 floats: x = n*ln2 + r with |r| <= ln2/2, exp(r) by the Cephes expf polynomial
// (about 1 ulp), times 2^n built in the exponent bits. x is clamped to [-87.3, 88.7], where
// 2^n stays a normal float (below, the true value is < 1.2e-38 and gives a near-zero
// probability either way). x is the second operand of max/min, which return it when it is
// NaN: a NaN logit stays NaN, as in std::exp and torch's softmax (clamped, it became a
// finite mask and hid a diverged mask branch).
BLDSEG_AVX2_INLINE __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.7f), _mm256_max_ps(_mm256_set1_ps(-87.3f), x));
  const __m256 n =
      _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n*ln2, ln2 split in two so n*ln2_hi is exact
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i pow2n = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(pow2n));
}

// Vectorised planner: the arithmetic of locate() (floor is exact either way), L points at a
// time.
template <typename T, bool kGrad>
struct Avx2Planner {
  using S = Simd<T>;
  using V = typename S::V;
  // point_softmax with the exponentials of all the pixel's points 8 at a time (float; a
  // scalar exp costs as much as sampling the point). Double keeps std::exp: its tests hold the
  // kernels to 1e-10 of the reference.
  static inline BLDSEG_AVX2 void softmax(const T* logit, T* prob, int64_t groups, int64_t P) {
    if constexpr (!std::is_same_v<T, float>) {
      point_softmax(logit, prob, groups, P);
    } else {
      const int64_t count = groups * P;
      subtract_group_max(logit, prob, groups, P);
      int64_t k = 0;
      for (; k + 8 <= count; k += 8) _mm256_storeu_ps(prob + k, exp_ps(_mm256_loadu_ps(prob + k)));
      if (k < count) {
        alignas(32) float tail[8];
        _mm256_store_ps(tail, exp_ps(S::load_first(prob + k, count - k)));
        std::memcpy(prob + k, tail, (count - k) * sizeof(float));
      }
      normalise_groups(prob, groups, P);
    }
  }
  // ScalarPlanner::point_grads, L points at a time: the per-point scalar arithmetic after
  // the channel loops was a quarter of the backward.
  static inline BLDSEG_AVX2 void point_grads(const PointPlan<T>& plan, const T* mask, T scale,
                                             int64_t count, T* grad_offset, T* grad_mask) {
    const V s = S::set1(scale), one = S::set1(T(1));
    for (int64_t k = 0; k < count; k += S::L) {
      const int64_t n = std::min<int64_t>(S::L, count - k);
      const V d0 = S::load(plan.dot[0] + k), d1 = S::load(plan.dot[1] + k);
      const V d2 = S::load(plan.dot[2] + k), d3 = S::load(plan.dot[3] + k);
      const V lh = S::load(plan.lh + k), lw = S::load(plan.lw + k);
      const V hh = S::sub(one, lh), hw = S::sub(one, lw);
      const V gm = S::add(S::mul(hh, S::fmadd(hw, d0, S::mul(lw, d1))),
                          S::mul(lh, S::fmadd(hw, d2, S::mul(lw, d3))));
      const V sm = S::mul(s, S::load_first(mask + k, n));  // never reads past the points
      const V gx = S::mul(sm, S::fmadd(hh, S::sub(d1, d0), S::mul(lh, S::sub(d3, d2))));
      const V gy = S::mul(sm, S::fmadd(hw, S::sub(d2, d0), S::mul(lw, S::sub(d3, d1))));
      if (n == S::L) {
        S::store(grad_mask + k, gm);
        S::store_xy(grad_offset + 2 * k, gx, gy);
      } else {
        alignas(32) T xy[2 * S::L], m[S::L];
        S::store(m, gm);
        S::store_xy(xy, gx, gy);
        std::memcpy(grad_mask + k, m, n * sizeof(T));
        std::memcpy(grad_offset + 2 * k, xy, 2 * n * sizeof(T));
      }
    }
  }

  static inline BLDSEG_AVX2 void fill(const PlanArgs<T>& in, PointPlan<T>& plan) {
    // Pixel indices are computed in int32 lanes.
    if (in.height > INT32_MAX / 2 || in.width > INT32_MAX / 2) {
      ScalarPlanner<T, kGrad>::fill(in, plan);
      return;
    }
    const V scale = S::set1(in.scale), origin_h = S::set1(in.origin_h);
    const V origin_w = S::set1(in.origin_w), one = S::set1(T(1)), zero = S::zero();
    const V height = S::set1(T(in.height)), width = S::set1(T(in.width));
    const V h_last_low = S::set1(T(in.height - 2)), w_last_low = S::set1(T(in.width - 2));
    for (int64_t k = 0; k < in.count; k += S::L) {
      const int64_t n = std::min<int64_t>(S::L, in.count - k);
      V off_x, off_y;
      S::load_xy(in.off + 2 * k, n, off_x, off_y);
      const V loc_w = S::add(origin_w, S::mul(S::add(S::load(in.grid.w.data() + k), off_x), scale));
      const V loc_h = S::add(origin_h, S::mul(S::add(S::load(in.grid.h.data() + k), off_y), scale));
      const V valid = S::both(S::both(S::gt(loc_h, S::set1(T(-1))), S::gt(loc_w, S::set1(T(-1)))),
                              S::both(S::lt(loc_h, height), S::lt(loc_w, width)));
      const V h_low = S::floor(loc_h), w_low = S::floor(loc_w);
      const V lh = S::sub(loc_h, h_low), lw = S::sub(loc_w, w_low);
      const V hh = S::sub(one, lh), hw = S::sub(one, lw);
      const V weight[4] = {S::mul(hh, hw), S::mul(hh, lw), S::mul(lh, hw), S::mul(lh, lw)};
      const V mask = S::load_first(in.mask + k, n);
      for (int c = 0; c < 4; ++c) S::store(plan.a[c] + k, S::mul(mask, weight[c]));
      if constexpr (kGrad) S::store(plan.lh + k, lh), S::store(plan.lw + k, lw);
      const V h_low_in = S::ge(h_low, zero), h_high_in = S::le(h_low, h_last_low);
      const V w_low_in = S::ge(w_low, zero), w_high_in = S::le(w_low, w_last_low);
      const V interior =
          S::both(S::both(valid, S::both(h_low_in, h_high_in)), S::both(w_low_in, w_high_in));
      S::store_base(h_low, w_low, valid, interior, in.width, plan.base.data() + k,
                    plan.low.data() + k);
      // Which corners of a border point are inside (written for every lane, read for kBorder).
      const V in_corner[4] = {S::both(h_low_in, w_low_in), S::both(h_low_in, w_high_in),
                              S::both(h_high_in, w_low_in), S::both(h_high_in, w_high_in)};
      S::store_corners(in_corner, plan.corners.data() + k);
    }
  }
};

// Intrinsics version for CF a multiple of the register width (16 and 32).
template <typename T, int CF>
struct Avx2Channels {
  using S = Simd<T>;
  using V = typename S::V;
  static constexpr int NV = CF / S::L;  // registers per row of C channels
  static_assert(CF > 0 && CF % S::L == 0, "Avx2Channels needs CF a multiple of the width");
  // The forward keeps K partial sums per register so that its FMA chains (one per corner and
  // register) are not latency-bound: K*NV = 8 chains in flight.
  static constexpr int K = NV >= 8 ? 1 : (NV >= 4 ? 2 : 4);

  V acc[K][NV];
  V top[NV];

  explicit Avx2Channels(int64_t) {}

  inline BLDSEG_AVX2 void begin(T*) {
    for (int k = 0; k < K; ++k)
      for (int r = 0; r < NV; ++r) acc[k][r] = S::zero();
  }
  inline BLDSEG_AVX2 void add(const T a[4], const T* const v[4]) {
    for (int corner = 0; corner < 4; ++corner) {
      const V w = S::set1(a[corner]);
      V* sum = acc[corner % K];
      for (int r = 0; r < NV; ++r) sum[r] = S::fmadd(w, S::load(v[corner] + r * S::L), sum[r]);
    }
  }
  inline BLDSEG_AVX2 void finish(T* out) {
    for (int r = 0; r < NV; ++r) {
      V sum = acc[0][r];
      for (int k = 1; k < K; ++k) sum = S::add(sum, acc[k][r]);
      S::store(out + r * S::L, sum);
    }
  }

  inline BLDSEG_AVX2 void set_top(const T* t) {
    for (int r = 0; r < NV; ++r) top[r] = S::load(t + r * S::L);
  }
  inline BLDSEG_AVX2 void backprop(const T a[4], const T* const v[4], T* const gi[4], T d[4]) {
    // All reads of the input rows come before the first store to grad_input: the compiler
    // cannot tell that they never alias, and would otherwise keep them in program order.
    V dot[4];
    for (int corner = 0; corner < 4; ++corner) {
      dot[corner] = S::zero();
      for (int r = 0; r < NV; ++r) {
        dot[corner] = S::fmadd(top[r], S::load(v[corner] + r * S::L), dot[corner]);
      }
    }
    for (int corner = 0; corner < 4; ++corner) {
      const V w = S::set1(a[corner]);
      for (int r = 0; r < NV; ++r) {
        T* row = gi[corner] + r * S::L;
        S::store(row, S::fmadd(w, top[r], S::load(row)));
      }
    }
    S::sum4(dot[0], dot[1], dot[2], dot[3], d);
  }
};

// One AVX-512 register of T (16 floats or 8 doubles): what the channel loops need. A row of
// 16 float channels (every InternImage variant) is then one register, so each corner costs
// one FMA in the forward and one load-FMA-store in the backward instead of two.
template <typename T>
struct Simd512;

template <>
struct Simd512<float> {
  using V = __m512;
  static constexpr int L = 16;
  static BLDSEG_AVX512_INLINE V zero() { return _mm512_setzero_ps(); }
  static BLDSEG_AVX512_INLINE V set1(float a) { return _mm512_set1_ps(a); }
  static BLDSEG_AVX512_INLINE V load(const float* p) { return _mm512_loadu_ps(p); }
  static BLDSEG_AVX512_INLINE void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static BLDSEG_AVX512_INLINE V add(V a, V b) { return _mm512_add_ps(a, b); }
  static BLDSEG_AVX512_INLINE V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  // Folds the two 256-bit halves, then the AVX2 reduction finishes all four sums at once.
  static BLDSEG_AVX512_INLINE __m256 fold(V d) {
    return _mm256_add_ps(_mm512_castps512_ps256(d), _mm512_extractf32x8_ps(d, 1));
  }
  static BLDSEG_AVX512_INLINE void sum4(V d0, V d1, V d2, V d3, float out[4]) {
    Simd<float>::sum4(fold(d0), fold(d1), fold(d2), fold(d3), out);
  }
};

template <>
struct Simd512<double> {
  using V = __m512d;
  static constexpr int L = 8;
  static BLDSEG_AVX512_INLINE V zero() { return _mm512_setzero_pd(); }
  static BLDSEG_AVX512_INLINE V set1(double a) { return _mm512_set1_pd(a); }
  static BLDSEG_AVX512_INLINE V load(const double* p) { return _mm512_loadu_pd(p); }
  static BLDSEG_AVX512_INLINE void store(double* p, V v) { _mm512_storeu_pd(p, v); }
  static BLDSEG_AVX512_INLINE V add(V a, V b) { return _mm512_add_pd(a, b); }
  static BLDSEG_AVX512_INLINE V fmadd(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static BLDSEG_AVX512_INLINE __m256d fold(V d) {
    return _mm256_add_pd(_mm512_castpd512_pd256(d), _mm512_extractf64x4_pd(d, 1));
  }
  static BLDSEG_AVX512_INLINE void sum4(V d0, V d1, V d2, V d3, double out[4]) {
    Simd<double>::sum4(fold(d0), fold(d1), fold(d2), fold(d3), out);
  }
};

// Avx2Channels with AVX-512 registers, for CF a multiple of 16 floats (8 doubles). A separate
// struct, not Avx2Channels templated on the register type: a function's target ISA cannot be a
// template parameter, and the always-inline helpers need a caller compiled for their ISA.
template <typename T, int CF>
struct Avx512Channels {
  using S = Simd512<T>;
  using V = typename S::V;
  static constexpr int NV = CF / S::L;
  static_assert(CF > 0 && CF % S::L == 0, "Avx512Channels needs CF a multiple of the width");
  static constexpr int K = NV >= 8 ? 1 : (NV >= 4 ? 2 : 4);

  V acc[K][NV];
  V top[NV];

  explicit Avx512Channels(int64_t) {}

  inline BLDSEG_AVX512 void begin(T*) {
    for (int k = 0; k < K; ++k)
      for (int r = 0; r < NV; ++r) acc[k][r] = S::zero();
  }
  inline BLDSEG_AVX512 void add(const T a[4], const T* const v[4]) {
    for (int corner = 0; corner < 4; ++corner) {
      const V w = S::set1(a[corner]);
      V* sum = acc[corner % K];
      for (int r = 0; r < NV; ++r) sum[r] = S::fmadd(w, S::load(v[corner] + r * S::L), sum[r]);
    }
  }
  inline BLDSEG_AVX512 void finish(T* out) {
    for (int r = 0; r < NV; ++r) {
      V sum = acc[0][r];
      for (int k = 1; k < K; ++k) sum = S::add(sum, acc[k][r]);
      S::store(out + r * S::L, sum);
    }
  }

  inline BLDSEG_AVX512 void set_top(const T* t) {
    for (int r = 0; r < NV; ++r) top[r] = S::load(t + r * S::L);
  }
  inline BLDSEG_AVX512 void backprop(const T a[4], const T* const v[4], T* const gi[4], T d[4]) {
    V dot[4];  // all reads before the first store, as in Avx2Channels
    for (int corner = 0; corner < 4; ++corner) {
      dot[corner] = S::zero();
      for (int r = 0; r < NV; ++r) {
        dot[corner] = S::fmadd(top[r], S::load(v[corner] + r * S::L), dot[corner]);
      }
    }
    for (int corner = 0; corner < 4; ++corner) {
      const V w = S::set1(a[corner]);
      for (int r = 0; r < NV; ++r) {
        T* row = gi[corner] + r * S::L;
        S::store(row, S::fmadd(w, top[r], S::load(row)));
      }
    }
    S::sum4(dot[0], dot[1], dot[2], dot[3], d);
  }
};
#endif  // BLDSEG_X86_DISPATCH

// ---------------------------------------------------------------------------------------------
// Kernel bodies, shared by the baseline and the AVX2 builds (Planner and Channels pick the
// implementations).

// Forward for output pixels [begin, end) (flat index over N*H_out*W_out).
template <typename T, int CF, typename Planner, typename Channels>
inline void forward_pixels(const T* input, const T* offset, const T* mask, T* output,
                           const Geometry& geo, int64_t begin, int64_t end) {
  const int64_t C = CF > 0 ? CF : geo.group_channels, G = geo.group, GC = G * C;
  const int64_t Kh = geo.kernel_h, Kw = geo.kernel_w, P = Kh * Kw;
  const int64_t Hi = geo.height_in, Wi = geo.width_in, Ho = geo.height_out, Wo = geo.width_out;
  const int64_t half_h = (geo.dilation_h * (Kh - 1)) >> 1;
  const int64_t half_w = (geo.dilation_w * (Kw - 1)) >> 1;
  const T s = static_cast<T>(geo.offset_scale);
  const std::vector<T> zeros(C, T(0));  // what corners outside the input read
  const KernelGrid<T> grid(geo, G);     // the points of all groups of a pixel
  PointPlan<T> plan(G * P);
  std::vector<T> prob(geo.mask_softmax ? G * P : 0);  // (G, P) of one pixel
  Channels ch(C);
  for (int64_t pix = begin; pix < end; ++pix) {
    const int64_t n = pix / (Ho * Wo);
    const int64_t ho = (pix / Wo) % Ho;
    const int64_t wo = pix % Wo;
    const T* mask_pix = mask + pix * G * P;  // (G, P)
    if (geo.mask_softmax) {
      Planner::softmax(mask_pix, prob.data(), G, P);
      mask_pix = prob.data();
    }
    // The offsets (G, P, 2) and masks (G, P) of one pixel are contiguous: one plan for all.
    Planner::fill({offset + pix * G * P * 2, mask_pix, grid, G * P,
                   grid_origin(ho, geo.stride_h, geo.pad_h, half_h, s),
                   grid_origin(wo, geo.stride_w, geo.pad_w, half_w, s), s, Hi, Wi},
                  plan);
    const T* in_n = input + n * Hi * Wi * GC;
    for (int64_t g = 0; g < G; ++g) {
      const T* in_g = in_n + g * C;        // (Hi, Wi) pixels, stride GC
      T* out = output + pix * GC + g * C;  // (C,)
      ch.begin(out);
      for (int64_t k = g * P; k < (g + 1) * P; ++k) {
        const int64_t base = plan.base[k];
        if (base == kOutside) continue;
        const T* v[4];
        if (BLDSEG_LIKELY(base >= 0)) {
          interior_rows(in_g, base, GC, Wi, v);
        } else {
          border_rows(plan.low[k], plan.corners[k], in_g, GC, Wi, zeros.data(), 0, v);
        }
        const T a[4] = {plan.a[0][k], plan.a[1][k], plan.a[2][k], plan.a[3][k]};
        ch.add(a, v);
      }
      ch.finish(out);
    }
  }
}

// Backward for the output rows [row_begin, row_end) of image n and groups [g_begin, g_end).
// grad_in points to pixel (0, 0) of group g_begin's grad_input slice, whose pixels are
// `grad_in_stride` apart (group g's slice starts (g - g_begin)*C further). `zeros` (C) is read
// for corners outside the input, `sink` (4*C) scattered into for them. As in the forward, the
// points of all the block's groups of a pixel are located in one plan: their offsets, masks,
// grad_output and gradients are contiguous, so memory is streamed once per image rather than
// once per group (at InternImage level 1 the per-group passes stalled on those loads).
template <typename T, int CF, typename Planner, typename Channels>
inline void backward_rows(const T* input, const T* offset, const T* mask, const T* grad_output,
                          T* grad_in, int64_t grad_in_stride, T* grad_offset, T* grad_mask,
                          const Geometry& geo, int64_t n, int64_t g_begin, int64_t g_end,
                          int64_t row_begin, int64_t row_end, const T* zeros, T* sink) {
  const int64_t C = CF > 0 ? CF : geo.group_channels, G = geo.group, GC = G * C;
  const int64_t Kh = geo.kernel_h, Kw = geo.kernel_w, P = Kh * Kw;
  const int64_t Hi = geo.height_in, Wi = geo.width_in, Ho = geo.height_out, Wo = geo.width_out;
  const int64_t half_h = (geo.dilation_h * (Kh - 1)) >> 1;
  const int64_t half_w = (geo.dilation_w * (Kw - 1)) >> 1;
  const T s = static_cast<T>(geo.offset_scale);
  const int64_t groups = g_end - g_begin, GP = groups * P;
  const T* in_n = input + n * Hi * Wi * GC;  // (Hi, Wi) pixels, stride GC
  const KernelGrid<T> grid(geo, groups);
  PointPlan<T> plan(GP);
  // mask_softmax: the block's probabilities of one pixel, recomputed from the logits (G*P exps
  // per pixel cost less than storing them in the forward and reading them back here).
  std::vector<T> prob(geo.mask_softmax ? GP : 0);  // (groups, P)
  Channels ch(C);

  for (int64_t ho = row_begin; ho < row_end; ++ho) {
    const T origin_h = grid_origin(ho, geo.stride_h, geo.pad_h, half_h, s);
    for (int64_t wo = 0; wo < Wo; ++wo) {
      const int64_t pix = (n * Ho + ho) * Wo + wo;
      const int64_t first = (pix * G + g_begin) * P;  // this block's first point of the pixel
      const T* mask_b = mask + first;                 // (groups, P)
      if (geo.mask_softmax) {
        Planner::softmax(mask_b, prob.data(), groups, P);
        mask_b = prob.data();
      }
      T* goff_b = grad_offset + first * 2;            // (groups, P, 2), every entry written
      T* gmask_b = grad_mask + first;                 // (groups, P), every entry written
      Planner::fill({offset + first * 2, mask_b, grid, GP, origin_h,
                     grid_origin(wo, geo.stride_w, geo.pad_w, half_w, s), s, Hi, Wi},
                    plan);
      bool outside = false;  // some point of the pixel samples only outside the input
      for (int64_t g = g_begin; g < g_end; ++g) {
        const T* in_g = in_n + g * C;
        T* grad_in_g = grad_in + (g - g_begin) * C;
        ch.set_top(grad_output + pix * GC + g * C);  // (C,)
        for (int64_t k = (g - g_begin) * P; k < (g - g_begin + 1) * P; ++k) {
          const int64_t base = plan.base[k];
          const T* v[4];
          T* gi[4];
          if (BLDSEG_LIKELY(base >= 0)) {
            interior_rows(in_g, base, GC, Wi, v);
            interior_rows(grad_in_g, base, grad_in_stride, Wi, gi);
          } else if (base == kOutside) {
            for (int c = 0; c < 4; ++c) plan.dot[c][k] = T(0);
            outside = true;
            continue;
          } else {
            border_rows(plan.low[k], plan.corners[k], in_g, GC, Wi, zeros, 0, v);
            border_rows(plan.low[k], plan.corners[k], grad_in_g, grad_in_stride, Wi, sink, C, gi);
          }
          const T a[4] = {plan.a[0][k], plan.a[1][k], plan.a[2][k], plan.a[3][k]};
          T d[4];  // <grad_out, corner value> per corner
          ch.backprop(a, v, gi, d);
          for (int c = 0; c < 4; ++c) plan.dot[c][k] = d[c];
        }
      }
      Planner::point_grads(plan, mask_b, s, GP, goff_b, gmask_b);
      if (outside) {
        // Their location may be anything (even NaN): the gradients are exactly 0, as the
        // points read only zeros.
        for (int64_t k = 0; k < GP; ++k) {
          if (plan.base[k] == kOutside) gmask_b[k] = goff_b[2 * k] = goff_b[2 * k + 1] = T(0);
        }
      }
      if (geo.mask_softmax) point_softmax_backward(mask_b, gmask_b, groups, P);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Baseline, AVX2 and AVX-512 builds of the bodies, and the run-time choice between them.

template <typename T, int CF>
BLDSEG_FLATTEN void forward_pixels_base(const T* input, const T* offset, const T* mask,
                                        T* output, const Geometry& geo, int64_t begin,
                                        int64_t end) {
  forward_pixels<T, CF, ScalarPlanner<T, false>, ScalarChannels<T, CF>>(input, offset, mask,
                                                                         output, geo, begin, end);
}

template <typename T, int CF>
BLDSEG_FLATTEN void backward_rows_base(const T* input, const T* offset, const T* mask,
                                       const T* grad_output, T* grad_in, int64_t grad_in_stride,
                                       T* grad_offset, T* grad_mask, const Geometry& geo,
                                       int64_t n, int64_t g_begin, int64_t g_end, int64_t row_begin, int64_t row_end,
                                       const T* zeros, T* sink) {
  backward_rows<T, CF, ScalarPlanner<T, true>, ScalarChannels<T, CF>>(
      input, offset, mask, grad_output, grad_in, grad_in_stride, grad_offset, grad_mask, geo, n,
      g_begin, g_end, row_begin, row_end, zeros, sink);
}

#if BLDSEG_X86_DISPATCH
// Channel loops of each vector build: intrinsics where a row of CF channels is whole
// registers, else the `omp simd` loops compiled for that build's ISA. The AVX-512 build keeps
// the AVX2 planner: a plan is 9 to 36 points, and its share of the time is small.
template <typename T, int CF>
using Avx2ChannelsFor =
    std::conditional_t<(CF > 0), Avx2Channels<T, CF>, ScalarChannels<T, CF>>;
template <typename T, int CF>
using Avx512ChannelsFor = std::conditional_t<(CF > 0 && CF % Simd512<T>::L == 0),
                                             Avx512Channels<T, CF>, Avx2ChannelsFor<T, CF>>;

template <typename T, int CF>
BLDSEG_AVX2 BLDSEG_FLATTEN void forward_pixels_avx2(const T* input, const T* offset,
                                                    const T* mask, T* output, const Geometry& geo,
                                                    int64_t begin, int64_t end) {
  forward_pixels<T, CF, Avx2Planner<T, false>, Avx2ChannelsFor<T, CF>>(input, offset, mask,
                                                                        output, geo, begin, end);
}

template <typename T, int CF>
BLDSEG_AVX512 BLDSEG_FLATTEN void forward_pixels_avx512(const T* input, const T* offset,
                                                        const T* mask, T* output,
                                                        const Geometry& geo, int64_t begin,
                                                        int64_t end) {
  forward_pixels<T, CF, Avx2Planner<T, false>, Avx512ChannelsFor<T, CF>>(input, offset, mask,
                                                                          output, geo, begin, end);
}

template <typename T, int CF>
BLDSEG_AVX2 BLDSEG_FLATTEN void backward_rows_avx2(const T* input, const T* offset,
                                                   const T* mask, const T* grad_output,
                                                   T* grad_in, int64_t grad_in_stride,
                                                   T* grad_offset, T* grad_mask,
                                                   const Geometry& geo, int64_t n, int64_t g_begin, int64_t g_end,
                                                   int64_t row_begin, int64_t row_end,
                                                   const T* zeros, T* sink) {
  backward_rows<T, CF, Avx2Planner<T, true>, Avx2ChannelsFor<T, CF>>(
      input, offset, mask, grad_output, grad_in, grad_in_stride, grad_offset, grad_mask, geo, n,
      g_begin, g_end, row_begin, row_end, zeros, sink);
}

template <typename T, int CF>
BLDSEG_AVX512 BLDSEG_FLATTEN void backward_rows_avx512(const T* input, const T* offset,
                                                       const T* mask, const T* grad_output,
                                                       T* grad_in, int64_t grad_in_stride,
                                                       T* grad_offset, T* grad_mask,
                                                       const Geometry& geo, int64_t n, int64_t g_begin, int64_t g_end,
                                                       int64_t row_begin, int64_t row_end,
                                                       const T* zeros, T* sink) {
  backward_rows<T, CF, Avx2Planner<T, true>, Avx512ChannelsFor<T, CF>>(
      input, offset, mask, grad_output, grad_in, grad_in_stride, grad_offset, grad_mask, geo, n,
      g_begin, g_end, row_begin, row_end, zeros, sink);
}
#endif  // BLDSEG_X86_DISPATCH

// forward_pixels / backward_rows built for `isa`.
template <typename T, int CF>
void forward_pixels_for(Isa isa, const T* input, const T* offset, const T* mask, T* output,
                        const Geometry& geo, int64_t begin, int64_t end) {
#if BLDSEG_X86_DISPATCH
  if (isa == Isa::kAvx512) {
    return forward_pixels_avx512<T, CF>(input, offset, mask, output, geo, begin, end);
  }
  if (isa == Isa::kAvx2) {
    return forward_pixels_avx2<T, CF>(input, offset, mask, output, geo, begin, end);
  }
#endif
  forward_pixels_base<T, CF>(input, offset, mask, output, geo, begin, end);
}

template <typename T, int CF>
void backward_rows_for(Isa isa, const T* input, const T* offset, const T* mask,
                       const T* grad_output, T* grad_in, int64_t grad_in_stride,
                       T* grad_offset, T* grad_mask, const Geometry& geo, int64_t n, int64_t g_begin, int64_t g_end,
                       int64_t row_begin, int64_t row_end, const T* zeros, T* sink) {
#if BLDSEG_X86_DISPATCH
  if (isa == Isa::kAvx512) {
    return backward_rows_avx512<T, CF>(input, offset, mask, grad_output, grad_in,
                                       grad_in_stride, grad_offset, grad_mask, geo, n, g_begin, g_end,
                                       row_begin, row_end, zeros, sink);
  }
  if (isa == Isa::kAvx2) {
    return backward_rows_avx2<T, CF>(input, offset, mask, grad_output, grad_in, grad_in_stride,
                                     grad_offset, grad_mask, geo, n, g_begin, g_end, row_begin, row_end, zeros,
                                     sink);
  }
#endif
  backward_rows_base<T, CF>(input, offset, mask, grad_output, grad_in, grad_in_stride,
                            grad_offset, grad_mask, geo, n, g_begin, g_end, row_begin, row_end, zeros, sink);
}

template <typename T, int CF>
void forward_impl(const T* input, const T* offset, const T* mask, T* output,
                  const Geometry& geo) {
  const int64_t pixels = geo.batch * geo.height_out * geo.width_out;
  const int64_t work = geo.group * geo.points() * geo.group_channels;
  // Enough work per block to amortise taking it (~32k multiply-adds).
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work));
  const Isa isa = cpu_isa();
  parallel_blocks(pixels, grain, [&](int64_t begin, int64_t end) {
    forward_pixels_for<T, CF>(isa, input, offset, mask, output, geo, begin, end);
  });
}

template <typename T, int CF>
void backward_impl(const T* input, const T* offset, const T* mask, const T* grad_output,
                   T* grad_input, T* grad_offset, T* grad_mask, const Geometry& geo) {
  const int64_t C = geo.group_channels, G = geo.group, GC = G * C;
  const int64_t Hi = geo.height_in, Wi = geo.width_in, Ho = geo.height_out;
  const int64_t pairs = geo.batch * G;
  if (pairs == 0) return;
  const int64_t threads = at::get_num_threads();
  const Isa isa = cpu_isa();
  auto rows = [&](T* grad_in, int64_t stride, int64_t n, int64_t g_begin, int64_t g_end,
                  int64_t row_begin, int64_t row_end, const T* zeros, T* sink) {
    backward_rows_for<T, CF>(isa, input, offset, mask, grad_output, grad_in, stride, grad_offset,
                             grad_mask, geo, n, g_begin, g_end, row_begin, row_end, zeros, sink);
  };

  if (pairs >= threads || Ho == 1) {
    // Tasks are (image, block of groups): a task owns grad_input[n, :, :, block, :], zeroes it
    // (grad_input is allocated uninitialised, so this is the only pass over it, and it leaves
    // the slice in this core's cache) and scatters straight into it. Whole images when there
    // are enough of them (two tasks per thread), else the groups are split into blocks.
    const int64_t N = geo.batch;
    const int64_t wanted = std::min<int64_t>(G, (2 * threads + N - 1) / N);
    const int64_t block = (G + wanted - 1) / wanted;  // groups per task
    const int64_t blocks = (G + block - 1) / block;   // tasks per image
    parallel_blocks(N * blocks, 1, [&](int64_t begin, int64_t end) {
      const std::vector<T> zeros(C, T(0));
      std::vector<T> sink(4 * C, T(0));
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / blocks;
        const int64_t g_begin = (task % blocks) * block, g_end = std::min(G, g_begin + block);
        T* grad_in = grad_input + n * Hi * Wi * GC + g_begin * C;
        if (g_end - g_begin == G) {
          std::memset(grad_in, 0, Hi * Wi * GC * sizeof(T));
        } else {
          for (int64_t pixel = 0; pixel < Hi * Wi; ++pixel) {
            std::memset(grad_in + pixel * GC, 0, (g_end - g_begin) * C * sizeof(T));
          }
        }
        rows(grad_in, GC, n, g_begin, g_end, 0, Ho, zeros.data(), sink.data());
      }
    });
    return;
  }

  // Few pairs (small batch and group): split the output rows into chunks too. Chunks of one
  // pair may scatter into the same input pixel, so each chunk gets a private (Hi, Wi, C)
  // buffer; buffers are summed in a fixed order into grad_input afterwards.
  const int64_t chunks = std::min<int64_t>(Ho, (2 * threads + pairs - 1) / pairs);
  const int64_t rows_per_chunk = (Ho + chunks - 1) / chunks;
  const int64_t slice = Hi * Wi * C;
  std::vector<T> buffers(static_cast<size_t>(pairs * chunks * slice), T(0));
  parallel_blocks(pairs * chunks, 1, [&](int64_t begin, int64_t end) {
    const std::vector<T> zeros(C, T(0));
    std::vector<T> sink(4 * C, T(0));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ng = task / chunks, chunk = task % chunks;
      const int64_t row_begin = std::min(Ho, chunk * rows_per_chunk);
      const int64_t row_end = std::min(Ho, row_begin + rows_per_chunk);
      rows(buffers.data() + task * slice, C, ng / G, ng % G, ng % G + 1, row_begin, row_end,
           zeros.data(), sink.data());
    }
  });
  parallel_blocks(pairs * Hi * Wi, 256, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t ng = idx / (Hi * Wi), pixel = idx % (Hi * Wi);
      const int64_t n = ng / G, g = ng % G;
      T* dst = grad_input + (n * Hi * Wi + pixel) * GC + g * C;
      const T* first = buffers.data() + ng * chunks * slice + pixel * C;
      for (int64_t c = 0; c < C; ++c) dst[c] = first[c];
      for (int64_t chunk = 1; chunk < chunks; ++chunk) {
        const T* src = first + chunk * slice;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) dst[c] += src[c];
      }
    }
  });
}

// Calls fn(std::integral_constant<int, CF>) with CF = group_channels where specialised, else 0.
template <typename Fn>
void dispatch_channels(int64_t group_channels, Fn&& fn) {
  switch (group_channels) {
    case 16:
      fn(std::integral_constant<int, 16>{});
      break;
    case 32:
      fn(std::integral_constant<int, 32>{});
      break;
    default:
      fn(std::integral_constant<int, 0>{});
  }
}

}  // namespace

at::Tensor dcnv3_forward_cpu_kernel(const at::Tensor& input, const at::Tensor& offset,
                                    const at::Tensor& mask, const Geometry& geo) {
  auto output =
      at::empty({geo.batch, geo.height_out, geo.width_out, geo.channels()}, input.options());
  if (output.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcnv3_forward_cpu", [&] {
    dispatch_channels(geo.group_channels, [&](auto cf) {
      forward_impl<scalar_t, decltype(cf)::value>(
          input.const_data_ptr<scalar_t>(), offset.const_data_ptr<scalar_t>(),
          mask.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), geo);
    });
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dcnv3_backward_cpu_kernel(
    const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
    const at::Tensor& grad_output, const Geometry& geo) {
  // The kernel writes every entry of the three gradients: grad_input is zeroed slice by slice
  // by the thread that then scatters into it, grad_offset and grad_mask are zero for points
  // that sample outside the input. With no output pixels nothing is scattered: zeros.
  if (grad_output.numel() == 0) {
    return {at::zeros_like(input), at::zeros_like(offset), at::zeros_like(mask)};
  }
  auto grad_input = at::empty_like(input);
  auto grad_offset = at::empty_like(offset);
  auto grad_mask = at::empty_like(mask);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcnv3_backward_cpu", [&] {
    dispatch_channels(geo.group_channels, [&](auto cf) {
      backward_impl<scalar_t, decltype(cf)::value>(
          input.const_data_ptr<scalar_t>(), offset.const_data_ptr<scalar_t>(),
          mask.const_data_ptr<scalar_t>(), grad_output.const_data_ptr<scalar_t>(),
          grad_input.mutable_data_ptr<scalar_t>(), grad_offset.mutable_data_ptr<scalar_t>(),
          grad_mask.mutable_data_ptr<scalar_t>(), geo);
    });
  });
  return {grad_input, grad_offset, grad_mask};
}

}  // namespace dcnv3
}  // namespace bldseg
