// CUDA kernels of the DCNv3 operator (forward and backward).
//
// Plain CUDA C++, no torch headers: `nvcc -c -std=c++17 dcnv3_cuda_kernel.cu` compiles it
// anywhere. Semantics are documented in dcnv3_cuda_kernel.h and match the official
// InternImage DCNv3 op (same sampling grid, bilinear weights, boundary rules and gradients).
//
// Thread layout (DCNv4-style): a "unit" is one (sample, output pixel, group); its
// group_channels C are split over a segment of `tpg` consecutive lanes (a power of two <= 32,
// so a segment never straddles a warp), and each lane owns V consecutive channels that it
// reads with one vector load per bilinear corner. When C > 32 * V a lane loops over channel
// chunks. Offsets and mask are read once per kernel point by every lane of the segment (the
// same address, so a broadcast). The backward pass sums the offset/mask gradients of a point
// over the segment with warp shuffles: no atomics and no shared memory for them; grad_input
// is scattered with atomics (vector atomics on sm_90+).

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "dcnv3_cuda_kernel.h"

namespace bldseg {
namespace dcnv3 {
namespace {

constexpr int kBlockThreads = 256;

// ---------------------------------------------------------------------------------------------
// Element conversions and vector loads/stores.

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ double from_acc<double>(double x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ int floor_to_int(float x) { return static_cast<int>(floorf(x)); }
__device__ __forceinline__ int floor_to_int(double x) { return static_cast<int>(floor(x)); }

// An unsigned type of exactly `Bytes` bytes, so V elements move with one memory instruction.
template <int Bytes>
struct RawBytes;
template <>
struct RawBytes<2> {
  using type = unsigned short;
};
template <>
struct RawBytes<4> {
  using type = unsigned int;
};
template <>
struct RawBytes<8> {
  using type = uint2;
};
template <>
struct RawBytes<16> {
  using type = uint4;
};

// Loads V consecutive elements at `ptr` (aligned to V * sizeof(T)) as accumulator values.
template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* __restrict__ ptr, acc_t<T> (&out)[V]) {
  using Raw = typename RawBytes<sizeof(T) * V>::type;
  const Raw raw = __ldg(reinterpret_cast<const Raw*>(ptr));
  T vals[V];
  memcpy(vals, &raw, sizeof(Raw));
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = to_acc(vals[k]);
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* __restrict__ ptr, const acc_t<T> (&in)[V]) {
  using Raw = typename RawBytes<sizeof(T) * V>::type;
  T vals[V];
#pragma unroll
  for (int k = 0; k < V; ++k) vals[k] = from_acc<T>(in[k]);
  Raw raw;
  memcpy(&raw, vals, sizeof(Raw));
  *reinterpret_cast<Raw*>(ptr) = raw;
}

// grad_input[ptr .. ptr + V) += vals. `ptr` is aligned to min(16, V * sizeof(A)) bytes
// (checked by the launcher), which is what the sm_90 float2/float4 atomics need.
template <int V>
__device__ __forceinline__ void atomic_add_vec(float* ptr, const float (&vals)[V]) {
// float2/float4 atomicAdd exist on sm_90 from CUDA 12.1; older toolkits take the scalar loop.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && \
    (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 1))
  constexpr bool kVectorAtomics = true;
#else
  constexpr bool kVectorAtomics = false;
#endif
  if constexpr (kVectorAtomics && V % 4 == 0) {
#pragma unroll
    for (int k = 0; k < V; k += 4) {
      atomicAdd(reinterpret_cast<float4*>(ptr + k),
                make_float4(vals[k], vals[k + 1], vals[k + 2], vals[k + 3]));
    }
  } else if constexpr (kVectorAtomics && V == 2) {
    atomicAdd(reinterpret_cast<float2*>(ptr), make_float2(vals[0], vals[1]));
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) atomicAdd(ptr + k, vals[k]);
  }
}

template <int V>
__device__ __forceinline__ void atomic_add_vec(double* ptr, const double (&vals)[V]) {
#pragma unroll
  for (int k = 0; k < V; ++k) atomicAdd(ptr + k, vals[k]);
}

// Sum over the `tpg` lanes of a segment (tpg a power of two <= 32, segments aligned in the
// warp), so xor partners never leave the segment and only its lanes are named in `mask`.
template <typename A>
__device__ __forceinline__ A segment_sum(A v, unsigned mask, int tpg) {
  for (int s = tpg >> 1; s > 0; s >>= 1) v += __shfl_xor_sync(mask, v, s);
  return v;
}

// ---------------------------------------------------------------------------------------------
// Bilinear sampling of V channels at (y, x), zeros outside the input.

// Where one sample lands: the four corners and their weights.
template <typename A>
struct Bilinear {
  int h_low, w_low;
  A lh, lw, hh, hw;  // fractional parts and their complements
  bool ok1, ok2, ok3, ok4;  // (h_low, w_low), (h_low, w_high), (h_high, w_low), (h_high, w_high)
  int off1, off2, off3, off4;  // element offsets of the corners from the sample's first pixel

  __device__ __forceinline__ Bilinear(A y, A x, int height, int width, int row_stride,
                                      int col_stride) {
    h_low = floor_to_int(y);
    w_low = floor_to_int(x);
    const int h_high = h_low + 1;
    const int w_high = w_low + 1;
    lh = y - h_low;
    lw = x - w_low;
    hh = A(1) - lh;
    hw = A(1) - lw;
    ok1 = h_low >= 0 && w_low >= 0;
    ok2 = h_low >= 0 && w_high <= width - 1;
    ok3 = h_high <= height - 1 && w_low >= 0;
    ok4 = h_high <= height - 1 && w_high <= width - 1;
    off1 = h_low * row_stride + w_low * col_stride;
    off2 = off1 + col_stride;
    off3 = off1 + row_stride;
    off4 = off3 + col_stride;
  }
};

// val[k] = bilinear value of channel k at the sample (same summation order as the official
// op: w1 v1 + w2 v2 + w3 v3 + w4 v4).
template <typename T, int V>
__device__ __forceinline__ void bilinear_sample(const T* __restrict__ im,
                                                const Bilinear<acc_t<T>>& b, acc_t<T> (&val)[V]) {
  using A = acc_t<T>;
  const A w1 = b.hh * b.hw, w2 = b.hh * b.lw, w3 = b.lh * b.hw, w4 = b.lh * b.lw;
#pragma unroll
  for (int k = 0; k < V; ++k) val[k] = A(0);
  A v[V];
  if (b.ok1) {
    load_vec<T, V>(im + b.off1, v);
#pragma unroll
    for (int k = 0; k < V; ++k) val[k] += w1 * v[k];
  }
  if (b.ok2) {
    load_vec<T, V>(im + b.off2, v);
#pragma unroll
    for (int k = 0; k < V; ++k) val[k] += w2 * v[k];
  }
  if (b.ok3) {
    load_vec<T, V>(im + b.off3, v);
#pragma unroll
    for (int k = 0; k < V; ++k) val[k] += w3 * v[k];
  }
  if (b.ok4) {
    load_vec<T, V>(im + b.off4, v);
#pragma unroll
    for (int k = 0; k < V; ++k) val[k] += w4 * v[k];
  }
}

// Backward of one sample for V channels: scatters top_grad * mask * w_corner into grad_im
// and returns this lane's partial sums of d(out)/d(x), d(out)/d(y) (before offset_scale)
// and d(out)/d(mask) over its channels.
template <typename T, int V>
__device__ __forceinline__ void bilinear_backward(const T* __restrict__ im, acc_t<T>* grad_im,
                                                  const Bilinear<acc_t<T>>& b, acc_t<T> m,
                                                  const acc_t<T> (&top)[V], acc_t<T>& grad_x,
                                                  acc_t<T>& grad_y, acc_t<T>& grad_m) {
  using A = acc_t<T>;
  const A w1 = b.hh * b.hw, w2 = b.hh * b.lw, w3 = b.lh * b.hw, w4 = b.lh * b.lw;
  A top_m[V], dx[V], dy[V], val[V], v[V], scatter[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    top_m[k] = top[k] * m;  // d(loss)/d(bilinear value)
    dx[k] = A(0);
    dy[k] = A(0);
    val[k] = A(0);
  }
  if (b.ok1) {
    load_vec<T, V>(im + b.off1, v);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      dy[k] -= b.hw * v[k];
      dx[k] -= b.hh * v[k];
      val[k] += w1 * v[k];
      scatter[k] = w1 * top_m[k];
    }
    atomic_add_vec<V>(grad_im + b.off1, scatter);
  }
  if (b.ok2) {
    load_vec<T, V>(im + b.off2, v);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      dy[k] -= b.lw * v[k];
      dx[k] += b.hh * v[k];
      val[k] += w2 * v[k];
      scatter[k] = w2 * top_m[k];
    }
    atomic_add_vec<V>(grad_im + b.off2, scatter);
  }
  if (b.ok3) {
    load_vec<T, V>(im + b.off3, v);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      dy[k] += b.hw * v[k];
      dx[k] -= b.lh * v[k];
      val[k] += w3 * v[k];
      scatter[k] = w3 * top_m[k];
    }
    atomic_add_vec<V>(grad_im + b.off3, scatter);
  }
  if (b.ok4) {
    load_vec<T, V>(im + b.off4, v);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      dy[k] += b.lw * v[k];
      dx[k] += b.lh * v[k];
      val[k] += w4 * v[k];
      scatter[k] = w4 * top_m[k];
    }
    atomic_add_vec<V>(grad_im + b.off4, scatter);
  }
#pragma unroll
  for (int k = 0; k < V; ++k) {
    grad_x += dx[k] * top_m[k];
    grad_y += dy[k] * top_m[k];
    grad_m += top[k] * val[k];
  }
}

// Where a unit (sample, output pixel, group) sits, and the start of its sampling grid.
template <typename A>
struct Unit {
  int n;       // sample
  int g;       // group
  A base_x;    // x of kernel column 0 without offset, before adding i * dilation_w
  A base_y;    // y of kernel row 0, likewise

  __device__ __forceinline__ Unit(int unit, const Dcnv3Params& p, A offset_scale) {
    g = unit % p.group;
    int q = unit / p.group;  // output pixel index n * H_out * W_out + h_out * W_out + w_out
    const int w_out = q % p.width_out;
    q /= p.width_out;
    const int h_out = q % p.height_out;
    n = q / p.height_out;
    // Centre of the dilated kernel in (unpadded) input coordinates, then the grid start
    // with the grid scaled by offset_scale about that centre (official definition).
    const int half_w = (p.dilation_w * (p.kernel_w - 1)) >> 1;
    const int half_h = (p.dilation_h * (p.kernel_h - 1)) >> 1;
    const int centre_x = half_w - p.pad_w + w_out * p.stride_w;
    const int centre_y = half_h - p.pad_h + h_out * p.stride_h;
    base_x = centre_x - half_w * offset_scale;
    base_y = centre_y - half_h * offset_scale;
  }
};

// ---------------------------------------------------------------------------------------------
// Kernels. One thread = V channels of one unit; `tpg` = 1 << log_tpg lanes per unit.

template <typename T, int V>
__global__ void __launch_bounds__(kBlockThreads)
    dcnv3_forward_kernel(const T* __restrict__ input, const T* __restrict__ offset,
                         const T* __restrict__ mask, T* __restrict__ output, const Dcnv3Params p,
                         const int num_units, const int log_tpg, const int num_chunks) {
  using A = acc_t<T>;
  const long long tid = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if ((tid >> log_tpg) >= num_units) return;
  const int unit = static_cast<int>(tid >> log_tpg);
  const int lane = static_cast<int>(tid & ((1 << log_tpg) - 1));

  const int C = p.group_channels;
  const int P = p.kernel_h * p.kernel_w;
  const int col_stride = p.group * C;               // one input pixel
  const int row_stride = p.width_in * col_stride;   // one input row
  const A offset_scale = static_cast<A>(p.offset_scale);
  const Unit<A> u(unit, p, offset_scale);

  const T* __restrict__ im = input + u.n * p.height_in * row_stride + u.g * C;
  const T* __restrict__ offset_u = offset + unit * P * 2;  // (P, 2) of this unit
  const T* __restrict__ mask_u = mask + unit * P;          // (P,)
  T* __restrict__ out = output + unit * C;                 // (C,): unit == pixel * G + g

  for (int chunk = 0; chunk < num_chunks; ++chunk) {
    const int c0 = ((chunk << log_tpg) + lane) * V;
    if (c0 >= C) break;  // idle lane (C not a multiple of tpg * V); no shuffles below
    A acc[V];
#pragma unroll
    for (int k = 0; k < V; ++k) acc[k] = A(0);
    int pt = 0;
    for (int i = 0; i < p.kernel_w; ++i) {  // points: w outer, h inner
      for (int j = 0; j < p.kernel_h; ++j, ++pt) {
        const A off_x = to_acc(offset_u[2 * pt]);
        const A off_y = to_acc(offset_u[2 * pt + 1]);
        const A m = to_acc(mask_u[pt]);
        const A x = u.base_x + (i * p.dilation_w + off_x) * offset_scale;
        const A y = u.base_y + (j * p.dilation_h + off_y) * offset_scale;
        if (y > A(-1) && x > A(-1) && y < A(p.height_in) && x < A(p.width_in)) {
          const Bilinear<A> b(y, x, p.height_in, p.width_in, row_stride, col_stride);
          A val[V];
          bilinear_sample<T, V>(im + c0, b, val);
#pragma unroll
          for (int k = 0; k < V; ++k) acc[k] += m * val[k];
        }
      }
    }
    store_vec<T, V>(out + c0, acc);
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kBlockThreads)
    dcnv3_backward_kernel(const T* __restrict__ input, const T* __restrict__ offset,
                          const T* __restrict__ mask, const T* __restrict__ grad_output,
                          acc_t<T>* grad_input, acc_t<T>* __restrict__ grad_offset,
                          acc_t<T>* __restrict__ grad_mask, const Dcnv3Params p,
                          const int num_units, const int log_tpg, const int num_chunks) {
  using A = acc_t<T>;
  const long long tid = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  // A segment lies inside one unit, so it returns as a whole and the shuffles below only
  // name lanes that are still running.
  if ((tid >> log_tpg) >= num_units) return;
  const int unit = static_cast<int>(tid >> log_tpg);
  const int tpg = 1 << log_tpg;
  const int lane = static_cast<int>(tid & (tpg - 1));
  const unsigned warp_lane = threadIdx.x & 31u;
  const unsigned seg_first = warp_lane & ~static_cast<unsigned>(tpg - 1);  // segment's lane 0
  const unsigned seg_mask = tpg == 32 ? 0xffffffffu : (((1u << tpg) - 1u) << seg_first);

  const int C = p.group_channels;
  const int P = p.kernel_h * p.kernel_w;
  const int col_stride = p.group * C;
  const int row_stride = p.width_in * col_stride;
  const A offset_scale = static_cast<A>(p.offset_scale);
  const Unit<A> u(unit, p, offset_scale);

  const int im_base = u.n * p.height_in * row_stride + u.g * C;
  const T* __restrict__ im = input + im_base;
  A* grad_im = grad_input + im_base;
  const T* __restrict__ offset_u = offset + unit * P * 2;
  const T* __restrict__ mask_u = mask + unit * P;
  A* __restrict__ grad_offset_u = grad_offset + unit * P * 2;
  A* __restrict__ grad_mask_u = grad_mask + unit * P;
  const T* __restrict__ top_u = grad_output + unit * C;

  for (int chunk = 0; chunk < num_chunks; ++chunk) {
    const int c0 = ((chunk << log_tpg) + lane) * V;
    const bool active = c0 < C;  // idle lanes still join the shuffles with zeros
    A top[V];
    if (active) {
      load_vec<T, V>(top_u + c0, top);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) top[k] = A(0);
    }
    int pt = 0;
    for (int i = 0; i < p.kernel_w; ++i) {
      for (int j = 0; j < p.kernel_h; ++j, ++pt) {
        const A off_x = to_acc(offset_u[2 * pt]);
        const A off_y = to_acc(offset_u[2 * pt + 1]);
        const A m = to_acc(mask_u[pt]);
        const A x = u.base_x + (i * p.dilation_w + off_x) * offset_scale;
        const A y = u.base_y + (j * p.dilation_h + off_y) * offset_scale;
        // The same for every lane of the segment, so the branch is segment-uniform.
        const bool inside = y > A(-1) && x > A(-1) && y < A(p.height_in) && x < A(p.width_in);
        A grad_x = A(0), grad_y = A(0), grad_m = A(0);
        if (inside) {
          if (active) {
            const Bilinear<A> b(y, x, p.height_in, p.width_in, row_stride, col_stride);
            bilinear_backward<T, V>(im + c0, grad_im + c0, b, m, top, grad_x, grad_y, grad_m);
          }
          grad_x = segment_sum(grad_x, seg_mask, tpg);
          grad_y = segment_sum(grad_y, seg_mask, tpg);
          grad_m = segment_sum(grad_m, seg_mask, tpg);
        }
        if (lane == 0) {
          // Chunks run in order in this same lane, so no atomics: store, then accumulate.
          if (chunk == 0) {
            grad_offset_u[2 * pt] = offset_scale * grad_x;
            grad_offset_u[2 * pt + 1] = offset_scale * grad_y;
            grad_mask_u[pt] = grad_m;
          } else {
            grad_offset_u[2 * pt] += offset_scale * grad_x;
            grad_offset_u[2 * pt + 1] += offset_scale * grad_y;
            grad_mask_u[pt] += grad_m;
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launch helpers.

// The thread layout for one call.
struct Layout {
  int log_tpg;     // lanes per unit = 1 << log_tpg (<= 32)
  int num_chunks;  // channel chunks each lane walks through
};

Layout make_layout(int group_channels, int vec) {
  const int lanes_needed = (group_channels + vec - 1) / vec;
  Layout layout{0, 1};
  while ((1 << layout.log_tpg) < lanes_needed && layout.log_tpg < 5) ++layout.log_tpg;
  const int per_pass = (1 << layout.log_tpg) * vec;
  layout.num_chunks = (group_channels + per_pass - 1) / per_pass;
  return layout;
}

bool aligned(const void* ptr, int bytes) {
  return reinterpret_cast<std::uintptr_t>(ptr) % static_cast<std::uintptr_t>(bytes) == 0;
}

bool valid_params(const Dcnv3Params& p) {
  return p.batch >= 0 && p.height_in >= 0 && p.width_in >= 0 && p.height_out > 0 &&
         p.width_out > 0 && p.kernel_h > 0 && p.kernel_w > 0 && p.stride_h > 0 &&
         p.stride_w > 0 && p.pad_h >= 0 && p.pad_w >= 0 && p.dilation_h > 0 &&
         p.dilation_w > 0 && p.group > 0 && p.group_channels > 0;
}

// The kernels index with 32-bit ints; the batch is processed in chunks of samples whose
// tensors each hold fewer than 2^31 elements. Returns 0 when one sample is already too big.
int samples_per_launch(const Dcnv3Params& p) {
  const long long pixel_in = static_cast<long long>(p.group) * p.group_channels;
  const long long pixel_out = static_cast<long long>(p.group) *
                              (p.group_channels > 2 * p.kernel_h * p.kernel_w
                                   ? p.group_channels
                                   : 2 * p.kernel_h * p.kernel_w);  // output or offset
  const long long in_sample = static_cast<long long>(p.height_in) * p.width_in * pixel_in;
  const long long out_sample = static_cast<long long>(p.height_out) * p.width_out * pixel_out;
  const long long biggest = in_sample > out_sample ? in_sample : out_sample;
  if (biggest <= 0 || biggest > INT_MAX) return 0;
  const long long samples = INT_MAX / biggest;
  return samples < p.batch ? static_cast<int>(samples) : p.batch;
}

// Calls f(std::integral_constant<int, V>) with V = vec, instantiating only the widths that fit
// in 16 bytes for T.
template <typename T, typename F>
cudaError_t dispatch_vec(int vec, F&& f) {
  switch (vec) {
    case 8:
      if constexpr (sizeof(T) * 8 <= 16) return f(std::integral_constant<int, 8>{});
      break;
    case 4:
      if constexpr (sizeof(T) * 4 <= 16) return f(std::integral_constant<int, 4>{});
      break;
    case 2:
      return f(std::integral_constant<int, 2>{});
    default:
      break;
  }
  return f(std::integral_constant<int, 1>{});
}

}  // namespace

int dcnv3_vector_width(int element_size, int group_channels, const void* const* pointers,
                       int num_pointers) {
  for (int vec = 8; vec > 1; vec /= 2) {
    if (vec * element_size > 16 || group_channels % vec != 0) continue;
    bool ok = true;
    for (int k = 0; k < num_pointers; ++k) ok = ok && aligned(pointers[k], vec * element_size);
    if (ok) return vec;
  }
  return 1;
}

template <typename T>
cudaError_t dcnv3_forward_cuda_launch(const T* input, const T* offset, const T* mask, T* output,
                                      const Dcnv3Params& params, cudaStream_t stream) {
  if (!valid_params(params)) return cudaErrorInvalidValue;
  if (params.batch == 0) return cudaSuccess;
  const int chunk_samples = samples_per_launch(params);
  if (chunk_samples == 0) return cudaErrorInvalidValue;

  const void* vec_pointers[2] = {input, output};
  const int vec = dcnv3_vector_width(static_cast<int>(sizeof(T)), params.group_channels,
                                     vec_pointers, 2);
  const Layout layout = make_layout(params.group_channels, vec);
  const int P = params.kernel_h * params.kernel_w;
  const long long in_sample = static_cast<long long>(params.height_in) * params.width_in *
                              params.group * params.group_channels;
  const long long units_sample =
      static_cast<long long>(params.height_out) * params.width_out * params.group;

  for (int n0 = 0; n0 < params.batch; n0 += chunk_samples) {
    Dcnv3Params p = params;
    p.batch = params.batch - n0 < chunk_samples ? params.batch - n0 : chunk_samples;
    const int num_units = static_cast<int>(units_sample * p.batch);
    const long long threads = static_cast<long long>(num_units) << layout.log_tpg;
    const unsigned blocks = static_cast<unsigned>((threads + kBlockThreads - 1) / kBlockThreads);
    const T* in_n = input + n0 * in_sample;
    const T* off_n = offset + n0 * units_sample * P * 2;
    const T* mask_n = mask + n0 * units_sample * P;
    T* out_n = output + n0 * units_sample * params.group_channels;
    const cudaError_t err = dispatch_vec<T>(vec, [&](auto vec_constant) {
      constexpr int V = decltype(vec_constant)::value;
      dcnv3_forward_kernel<T, V><<<blocks, kBlockThreads, 0, stream>>>(
          in_n, off_n, mask_n, out_n, p, num_units, layout.log_tpg, layout.num_chunks);
      return cudaGetLastError();
    });
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t dcnv3_backward_cuda_launch(const T* input, const T* offset, const T* mask,
                                       const T* grad_output, acc_t<T>* grad_input,
                                       acc_t<T>* grad_offset, acc_t<T>* grad_mask,
                                       const Dcnv3Params& params, cudaStream_t stream) {
  using A = acc_t<T>;
  if (!valid_params(params)) return cudaErrorInvalidValue;
  if (params.batch == 0) return cudaSuccess;
  const int chunk_samples = samples_per_launch(params);
  if (chunk_samples == 0) return cudaErrorInvalidValue;

  const void* vec_pointers[2] = {input, grad_output};
  int vec = dcnv3_vector_width(static_cast<int>(sizeof(T)), params.group_channels,
                               vec_pointers, 2);
  // The vector atomics into grad_input need it aligned too (always true for fresh buffers).
  while (vec > 1) {
    const int bytes = vec * static_cast<int>(sizeof(A));
    if (aligned(grad_input, bytes < 16 ? bytes : 16)) break;
    vec /= 2;
  }
  const Layout layout = make_layout(params.group_channels, vec);
  const int P = params.kernel_h * params.kernel_w;
  const long long in_sample = static_cast<long long>(params.height_in) * params.width_in *
                              params.group * params.group_channels;
  const long long units_sample =
      static_cast<long long>(params.height_out) * params.width_out * params.group;

  for (int n0 = 0; n0 < params.batch; n0 += chunk_samples) {
    Dcnv3Params p = params;
    p.batch = params.batch - n0 < chunk_samples ? params.batch - n0 : chunk_samples;
    const int num_units = static_cast<int>(units_sample * p.batch);
    const long long threads = static_cast<long long>(num_units) << layout.log_tpg;
    const unsigned blocks = static_cast<unsigned>((threads + kBlockThreads - 1) / kBlockThreads);
    const long long off_start = n0 * units_sample * P * 2;
    const long long mask_start = n0 * units_sample * P;
    const T* in_n = input + n0 * in_sample;
    const T* off_n = offset + off_start;
    const T* mask_n = mask + mask_start;
    const T* top_n = grad_output + n0 * units_sample * params.group_channels;
    A* grad_in_n = grad_input + n0 * in_sample;
    A* grad_off_n = grad_offset + off_start;
    A* grad_mask_n = grad_mask + mask_start;
    const cudaError_t err = dispatch_vec<T>(vec, [&](auto vec_constant) {
      constexpr int V = decltype(vec_constant)::value;
      dcnv3_backward_kernel<T, V><<<blocks, kBlockThreads, 0, stream>>>(
          in_n, off_n, mask_n, top_n, grad_in_n, grad_off_n, grad_mask_n, p, num_units,
          layout.log_tpg, layout.num_chunks);
      return cudaGetLastError();
    });
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// Explicit instantiations: the element types the glue dispatches to.
#define BLDSEG_DCNV3_INSTANTIATE(T)                                                          \
  template cudaError_t dcnv3_forward_cuda_launch<T>(const T*, const T*, const T*, T*,      \
                                                    const Dcnv3Params&, cudaStream_t);     \
  template cudaError_t dcnv3_backward_cuda_launch<T>(                                      \
      const T*, const T*, const T*, const T*, acc_t<T>*, acc_t<T>*, acc_t<T>*,             \
      const Dcnv3Params&, cudaStream_t);

BLDSEG_DCNV3_INSTANTIATE(float)
BLDSEG_DCNV3_INSTANTIATE(double)
BLDSEG_DCNV3_INSTANTIATE(__half)
BLDSEG_DCNV3_INSTANTIATE(__nv_bfloat16)

#undef BLDSEG_DCNV3_INSTANTIATE

}  // namespace dcnv3
}  // namespace bldseg
