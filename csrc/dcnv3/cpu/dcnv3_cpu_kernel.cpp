// DCNv3 forward and backward on the CPU.
//
// Sampling follows the official InternImage CUDA kernel (dcnv3_im2col_cuda.cuh): for output
// pixel (ho, wo), group g and kernel point (i along w, j along h; point index p = i*Kh + j):
//   loc_w = (half_w - pad_w + wo*stride_w) - half_w*s + (i*dilation_w + offset_x[g, p]) * s
//   loc_h = (half_h - pad_h + ho*stride_h) - half_h*s + (j*dilation_h + offset_y[g, p]) * s
// with half = (dilation*(kernel-1)) >> 1 and s = offset_scale, in unpadded input pixels.
// A point contributes only when -1 < loc < size (else all four corners are outside), and each
// bilinear corner outside the input reads zero.
//
// Parallelism: the forward runs over output pixels (each writes its own output row). The
// backward runs over (n, g) pairs, which own disjoint slices of grad_input[n, :, :, g, :], so
// no two threads scatter into the same element; when there are fewer pairs than threads the
// output rows are also split, each chunk scattering into a private buffer summed afterwards.
// Results do not depend on the thread count within a code path.
//
// Inner loops run over the group channels, contiguous in memory, as `omp simd` loops (the
// dot-product reductions of the backward may be reordered there, which is fine numerically
// and keeps results deterministic).
//
// Speed: the work per sampling point is small (4 corners x C channels), so the scalar index
// math matters as much as the vector part. Two things keep both short:
//   - group_channels 16 and 32 (all InternImage variants use 16) are compile-time constants
//     (template CF), so the channel loops unroll and the forward accumulates in registers;
//   - on x86-64 each kernel is also compiled for AVX2+FMA and picked at run time
//     (__builtin_cpu_supports), so one build folder serves old and new CPUs (no -march).
//     FMA changes rounding in the last bit only; results stay within 1e-10 of the reference.

#include "dcnv3_cpu_kernel.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <type_traits>
#include <vector>

namespace bldseg {
namespace dcnv3 {
namespace {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BLDSEG_X86_DISPATCH 1
#define BLDSEG_AVX2 __attribute__((target("avx2,fma")))
#else
#define BLDSEG_X86_DISPATCH 0
#define BLDSEG_AVX2
#endif
#if defined(__GNUC__) || defined(__clang__)
#define BLDSEG_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define BLDSEG_ALWAYS_INLINE inline
#endif

// AVX2+FMA kernels where the CPU has them, unless $BLDSEG_CPU_NO_AVX2 is set (read once; the
// tests use it to cover the baseline kernels on AVX2 machines).
bool cpu_has_avx2() {
#if BLDSEG_X86_DISPATCH
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          std::getenv("BLDSEG_CPU_NO_AVX2") == nullptr;
  return has;
#else
  return false;
#endif
}

// The four bilinear corners of one sampling location.
template <typename T>
struct Bilinear {
  bool interior;     // all four corners inside: the common case, handled without pixel[]
  int64_t base;      // h_low*W_in + w_low, the (lo,lo) corner
  int64_t pixel[4];  // h*W_in + w of corners (lo,lo) (lo,hi) (hi,lo) (hi,hi); -1 when outside;
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
  b.pixel[0] = (h_low_in && w_low_in) ? h_low * width + w_low : -1;
  b.pixel[1] = (h_low_in && w_high_in) ? h_low * width + w_high : -1;
  b.pixel[2] = (h_high_in && w_low_in) ? h_high * width + w_low : -1;
  b.pixel[3] = (h_high_in && w_high_in) ? h_high * width + w_high : -1;
  return true;
}

// Start of the sampling grid of output pixel `out` along one axis, before the kernel offset:
// p0 - half*s in the official kernel.
template <typename T>
BLDSEG_ALWAYS_INLINE T grid_origin(int64_t out, int64_t stride, int64_t pad, int64_t half, T scale) {
  return T(half - pad + out * stride) - T(half) * scale;
}

// Forward for output pixels [begin, end) (flat index over N*H_out*W_out). CF > 0 is the
// compile-time group_channels, 0 means "read it from geo".
template <typename T, int CF>
BLDSEG_ALWAYS_INLINE void forward_pixels(const T* input, const T* offset, const T* mask,
                                         T* output, const Geometry& geo, int64_t begin,
                                         int64_t end) {
  const int64_t C = CF > 0 ? CF : geo.group_channels, G = geo.group, GC = G * C;
  const int64_t Kh = geo.kernel_h, Kw = geo.kernel_w, P = Kh * Kw;
  const int64_t Hi = geo.height_in, Wi = geo.width_in, Ho = geo.height_out, Wo = geo.width_out;
  const int64_t half_h = (geo.dilation_h * (Kh - 1)) >> 1;
  const int64_t half_w = (geo.dilation_w * (Kw - 1)) >> 1;
  const T s = static_cast<T>(geo.offset_scale);
  // Corners outside the input read from this zero row, so the channel loop has no branch.
  const std::vector<T> zeros(C, T(0));
  T acc_fixed[CF > 0 ? CF : 1];  // register accumulator when C is a compile-time constant
  for (int64_t pix = begin; pix < end; ++pix) {
    const int64_t n = pix / (Ho * Wo);
    const int64_t ho = (pix / Wo) % Ho;
    const int64_t wo = pix % Wo;
    const T origin_h = grid_origin(ho, geo.stride_h, geo.pad_h, half_h, s);
    const T origin_w = grid_origin(wo, geo.stride_w, geo.pad_w, half_w, s);
    const T* in_n = input + n * Hi * Wi * GC;
    for (int64_t g = 0; g < G; ++g) {
      const T* in_g = in_n + g * C;                     // (Hi, Wi) pixels, stride GC
      const T* off_g = offset + (pix * G + g) * P * 2;  // (P, 2) as [x, y]
      const T* mask_g = mask + (pix * G + g) * P;       // (P,)
      T* out = output + pix * GC + g * C;               // (C,)
      T* acc = CF > 0 ? acc_fixed : out;
      for (int64_t c = 0; c < C; ++c) acc[c] = T(0);
      for (int64_t i = 0; i < Kw; ++i) {
        for (int64_t j = 0; j < Kh; ++j) {
          const int64_t p = i * Kh + j;
          const T loc_w = origin_w + (T(i * geo.dilation_w) + off_g[2 * p]) * s;
          const T loc_h = origin_h + (T(j * geo.dilation_h) + off_g[2 * p + 1]) * s;
          Bilinear<T> b;
          if (!locate(loc_h, loc_w, Hi, Wi, b)) continue;
          const T m = mask_g[p];
          const T *v0, *v1, *v2, *v3;
          T a0, a1, a2, a3;
          if (b.interior) {
            v0 = in_g + b.base * GC;
            v1 = v0 + GC;
            v2 = v0 + Wi * GC;
            v3 = v2 + GC;
            a0 = m * b.weight[0], a1 = m * b.weight[1];
            a2 = m * b.weight[2], a3 = m * b.weight[3];
          } else {
            const T* v[4];
            T a[4];
            for (int k = 0; k < 4; ++k) {
              const bool inside = b.pixel[k] >= 0;
              v[k] = inside ? in_g + b.pixel[k] * GC : zeros.data();
              a[k] = inside ? m * b.weight[k] : T(0);
            }
            v0 = v[0], v1 = v[1], v2 = v[2], v3 = v[3];
            a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
          }
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            acc[c] += a0 * v0[c] + a1 * v1[c] + a2 * v2[c] + a3 * v3[c];
          }
        }
      }
      if constexpr (CF > 0) {
        for (int64_t c = 0; c < C; ++c) out[c] = acc[c];
      }
    }
  }
}

template <typename T, int CF>
void forward_pixels_base(const T* input, const T* offset, const T* mask, T* output,
                         const Geometry& geo, int64_t begin, int64_t end) {
  forward_pixels<T, CF>(input, offset, mask, output, geo, begin, end);
}

template <typename T, int CF>
BLDSEG_AVX2 void forward_pixels_avx2(const T* input, const T* offset, const T* mask, T* output,
                                     const Geometry& geo, int64_t begin, int64_t end) {
  forward_pixels<T, CF>(input, offset, mask, output, geo, begin, end);
}

template <typename T, int CF>
void forward_impl(const T* input, const T* offset, const T* mask, T* output,
                  const Geometry& geo) {
  const int64_t pixels = geo.batch * geo.height_out * geo.width_out;
  const int64_t work = geo.group * geo.points() * geo.group_channels;
  // Enough work per task to amortise the scheduling (~32k multiply-adds).
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work));
  const bool avx2 = cpu_has_avx2();
  at::parallel_for(0, pixels, grain, [&](int64_t begin, int64_t end) {
    if (avx2) {
      forward_pixels_avx2<T, CF>(input, offset, mask, output, geo, begin, end);
    } else {
      forward_pixels_base<T, CF>(input, offset, mask, output, geo, begin, end);
    }
  });
}

// Backward for the output rows [row_begin, row_end) of one (n, g) pair. grad_in_g points to
// pixel (0, 0) of this pair's grad_input slice, whose pixels are `grad_in_stride` apart.
template <typename T, int CF>
BLDSEG_ALWAYS_INLINE void backward_rows(const T* input, const T* offset, const T* mask,
                                        const T* grad_output, T* grad_in_g,
                                        int64_t grad_in_stride, T* grad_offset, T* grad_mask,
                                        const Geometry& geo, int64_t n, int64_t g,
                                        int64_t row_begin, int64_t row_end, const T* zeros,
                                        T* sink) {
  const int64_t C = CF > 0 ? CF : geo.group_channels, G = geo.group, GC = G * C;
  const int64_t Kh = geo.kernel_h, Kw = geo.kernel_w, P = Kh * Kw;
  const int64_t Hi = geo.height_in, Wi = geo.width_in, Ho = geo.height_out, Wo = geo.width_out;
  const int64_t half_h = (geo.dilation_h * (Kh - 1)) >> 1;
  const int64_t half_w = (geo.dilation_w * (Kw - 1)) >> 1;
  const T s = static_cast<T>(geo.offset_scale);
  const T* in_g = input + n * Hi * Wi * GC + g * C;  // (Hi, Wi) pixels, stride GC
  T top_fixed[CF > 0 ? CF : 1];                      // grad_output row kept in registers

  for (int64_t ho = row_begin; ho < row_end; ++ho) {
    const T origin_h = grid_origin(ho, geo.stride_h, geo.pad_h, half_h, s);
    for (int64_t wo = 0; wo < Wo; ++wo) {
      const T origin_w = grid_origin(wo, geo.stride_w, geo.pad_w, half_w, s);
      const int64_t pix = (n * Ho + ho) * Wo + wo;
      const T* top = grad_output + pix * GC + g * C;  // (C,)
      if constexpr (CF > 0) {
        for (int64_t c = 0; c < C; ++c) top_fixed[c] = top[c];
        top = top_fixed;
      }
      const T* off_g = offset + (pix * G + g) * P * 2;  // (P, 2)
      const T* mask_g = mask + (pix * G + g) * P;       // (P,)
      T* goff_g = grad_offset + (pix * G + g) * P * 2;  // (P, 2), every entry written
      T* gmask_g = grad_mask + (pix * G + g) * P;       // (P,), every entry written
      for (int64_t i = 0; i < Kw; ++i) {
        for (int64_t j = 0; j < Kh; ++j) {
          const int64_t p = i * Kh + j;
          const T loc_w = origin_w + (T(i * geo.dilation_w) + off_g[2 * p]) * s;
          const T loc_h = origin_h + (T(j * geo.dilation_h) + off_g[2 * p + 1]) * s;
          Bilinear<T> b;
          if (!locate(loc_h, loc_w, Hi, Wi, b)) {
            gmask_g[p] = goff_g[2 * p] = goff_g[2 * p + 1] = T(0);
            continue;
          }
          const T m = mask_g[p];
          // Outside corners read zeros (their dot product is 0) and scatter into a private
          // sink row per corner, so the four grad rows never alias and the loop stays flat.
          const T *v0, *v1, *v2, *v3;
          T *gi0, *gi1, *gi2, *gi3;
          if (b.interior) {
            v0 = in_g + b.base * GC;
            v1 = v0 + GC;
            v2 = v0 + Wi * GC;
            v3 = v2 + GC;
            gi0 = grad_in_g + b.base * grad_in_stride;
            gi1 = gi0 + grad_in_stride;
            gi2 = gi0 + Wi * grad_in_stride;
            gi3 = gi2 + grad_in_stride;
          } else {
            const T* v[4];
            T* gi[4];
            for (int k = 0; k < 4; ++k) {
              const bool inside = b.pixel[k] >= 0;
              v[k] = inside ? in_g + b.pixel[k] * GC : zeros;
              gi[k] = inside ? grad_in_g + b.pixel[k] * grad_in_stride : sink + k * C;
            }
            v0 = v[0], v1 = v[1], v2 = v[2], v3 = v[3];
            gi0 = gi[0], gi1 = gi[1], gi2 = gi[2], gi3 = gi[3];
          }
          const T a0 = m * b.weight[0], a1 = m * b.weight[1];
          const T a2 = m * b.weight[2], a3 = m * b.weight[3];
          T d0 = 0, d1 = 0, d2 = 0, d3 = 0;  // <grad_out, corner value> per corner
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
          // d out / d mask = bilinear value; d out / d loc from the derivative of the weights.
          gmask_g[p] = b.weight[0] * d0 + b.weight[1] * d1 + b.weight[2] * d2 + b.weight[3] * d3;
          const T sm = s * m;
          goff_g[2 * p] = sm * (-b.hh * d0 + b.hh * d1 - b.lh * d2 + b.lh * d3);
          goff_g[2 * p + 1] = sm * (-b.hw * d0 - b.lw * d1 + b.hw * d2 + b.lw * d3);
        }
      }
    }
  }
}

template <typename T, int CF>
void backward_rows_base(const T* input, const T* offset, const T* mask, const T* grad_output,
                        T* grad_in_g, int64_t grad_in_stride, T* grad_offset, T* grad_mask,
                        const Geometry& geo, int64_t n, int64_t g, int64_t row_begin,
                        int64_t row_end, const T* zeros, T* sink) {
  backward_rows<T, CF>(input, offset, mask, grad_output, grad_in_g, grad_in_stride, grad_offset,
                       grad_mask, geo, n, g, row_begin, row_end, zeros, sink);
}

template <typename T, int CF>
BLDSEG_AVX2 void backward_rows_avx2(const T* input, const T* offset, const T* mask,
                                    const T* grad_output, T* grad_in_g, int64_t grad_in_stride,
                                    T* grad_offset, T* grad_mask, const Geometry& geo, int64_t n,
                                    int64_t g, int64_t row_begin, int64_t row_end,
                                    const T* zeros, T* sink) {
  backward_rows<T, CF>(input, offset, mask, grad_output, grad_in_g, grad_in_stride, grad_offset,
                       grad_mask, geo, n, g, row_begin, row_end, zeros, sink);
}

template <typename T, int CF>
void backward_impl(const T* input, const T* offset, const T* mask, const T* grad_output,
                   T* grad_input, T* grad_offset, T* grad_mask, const Geometry& geo) {
  const int64_t C = geo.group_channels, G = geo.group, GC = G * C;
  const int64_t Hi = geo.height_in, Wi = geo.width_in, Ho = geo.height_out;
  const int64_t pairs = geo.batch * G;
  if (pairs == 0) return;
  const int64_t threads = at::get_num_threads();
  const bool avx2 = cpu_has_avx2();
  auto rows = [&](T* grad_in_g, int64_t stride, int64_t n, int64_t g, int64_t row_begin,
                  int64_t row_end, const T* zeros, T* sink) {
    if (avx2) {
      backward_rows_avx2<T, CF>(input, offset, mask, grad_output, grad_in_g, stride, grad_offset,
                                grad_mask, geo, n, g, row_begin, row_end, zeros, sink);
    } else {
      backward_rows_base<T, CF>(input, offset, mask, grad_output, grad_in_g, stride, grad_offset,
                                grad_mask, geo, n, g, row_begin, row_end, zeros, sink);
    }
  };

  if (pairs >= threads || Ho == 1) {
    // Each (n, g) pair owns grad_input[n, :, :, g, :]: scatter straight into it.
    at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
      const std::vector<T> zeros(C, T(0));
      std::vector<T> sink(4 * C, T(0));
      for (int64_t ng = begin; ng < end; ++ng) {
        const int64_t n = ng / G, g = ng % G;
        rows(grad_input + n * Hi * Wi * GC + g * C, GC, n, g, 0, Ho, zeros.data(), sink.data());
      }
    });
    return;
  }

  // Few pairs (small batch and group): split the output rows into chunks too. Chunks of one
  // pair may scatter into the same input pixel, so each chunk gets a private (Hi, Wi, C)
  // buffer; buffers are summed in a fixed order afterwards.
  const int64_t chunks = std::min<int64_t>(Ho, (2 * threads + pairs - 1) / pairs);
  const int64_t rows_per_chunk = (Ho + chunks - 1) / chunks;
  const int64_t slice = Hi * Wi * C;
  std::vector<T> buffers(static_cast<size_t>(pairs * chunks * slice), T(0));
  at::parallel_for(0, pairs * chunks, 1, [&](int64_t begin, int64_t end) {
    const std::vector<T> zeros(C, T(0));
    std::vector<T> sink(4 * C, T(0));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ng = task / chunks, chunk = task % chunks;
      const int64_t row_begin = std::min(Ho, chunk * rows_per_chunk);
      const int64_t row_end = std::min(Ho, row_begin + rows_per_chunk);
      rows(buffers.data() + task * slice, C, ng / G, ng % G, row_begin, row_end, zeros.data(),
           sink.data());
    }
  });
  at::parallel_for(0, pairs * Hi * Wi, 256, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t ng = idx / (Hi * Wi), pixel = idx % (Hi * Wi);
      const int64_t n = ng / G, g = ng % G;
      T* dst = grad_input + (n * Hi * Wi + pixel) * GC + g * C;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const T* src = buffers.data() + (ng * chunks + chunk) * slice + pixel * C;
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
  // grad_input is scattered into, so it starts at zero; the kernel writes every entry of
  // grad_offset and grad_mask (zero for points that sample outside the input).
  auto grad_input = at::zeros_like(input);
  auto grad_offset = at::empty_like(offset);
  auto grad_mask = at::empty_like(mask);
  if (grad_output.numel() == 0) return {grad_input, grad_offset, grad_mask};
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
