// CUDA kernels of the DCNv3 operator: launcher declarations.
//
// This header is plain CUDA C++ (no torch/ATen), so the kernel file compiles with a bare
// `nvcc -c` on machines without a CUDA build of torch; the torch glue (dcnv3_cuda.cpp)
// includes it and passes raw pointers.
//
// Layout (channels-last, all tensors contiguous), with P = kernel_h * kernel_w:
//   input       (N, H_in,  W_in,  G * C)
//   offset      (N, H_out, W_out, G * P * 2)   ordered [group][point][x, y]
//   mask        (N, H_out, W_out, G * P)
//   output      (N, H_out, W_out, G * C)
// Kernel points are ordered w outer, h inner: point p = i * kernel_h + j samples column
// offset i and row offset j of the dilated grid.
//
// Sampling location of point (i, j) for output pixel (h_out, w_out), in input pixel
// coordinates (the official InternImage DCNv3 definition, offset_scale scaling both the
// dilation grid and the learned offsets):
//   half_w = (dilation_w * (kernel_w - 1)) / 2
//   x = w_out * stride_w - pad_w + half_w + (i * dilation_w - half_w + offset_x) * offset_scale
// (same for y with h, j). The value is bilinearly interpolated with zeros outside the input,
// and a location with x <= -1, y <= -1, x >= W_in or y >= H_in contributes nothing.
//   output[n, h_out, w_out, g, c] = sum_p mask[..., g, p] * bilinear(input[n, :, :, g, c], x, y)

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace bldseg {
namespace dcnv3 {

// Shapes and hyper-parameters of one call; plain ints so host and device share it.
struct Dcnv3Params {
  int batch;           // N (may be 0: launchers then do nothing)
  int height_in;       // H_in
  int width_in;        // W_in
  int height_out;      // H_out = (H_in + 2 pad_h - (dilation_h (kernel_h - 1) + 1)) / stride_h + 1
  int width_out;       // W_out, same with w
  int kernel_h;        // kernel rows
  int kernel_w;        // kernel columns
  int stride_h;        // output row stride on the input
  int stride_w;        // output column stride on the input
  int pad_h;           // virtual zero padding, rows
  int pad_w;           // virtual zero padding, columns
  int dilation_h;      // spacing of the kernel grid, rows
  int dilation_w;      // spacing of the kernel grid, columns
  int group;           // G
  int group_channels;  // C, channels per group (any value >= 1)
  double offset_scale; // scales the dilation grid and the offsets (cast to the accumulator type)
};

// Accumulator type of an element type: float for float/half/bfloat16, double for double.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

// Forward: writes every element of `output` (no zero-fill needed).
// T is one of float, double, __half, __nv_bfloat16.
template <typename T>
cudaError_t dcnv3_forward_cuda_launch(const T* input, const T* offset, const T* mask, T* output,
                                      const Dcnv3Params& params, cudaStream_t stream);

// Backward. `grad_input` must be zero-filled by the caller: the kernel adds into it with
// atomics (it is an acc_t<T> buffer so half types accumulate in float32; the caller casts it
// back). `grad_offset` and `grad_mask` are fully written (acc_t<T> too, no zero-fill needed).
template <typename T>
cudaError_t dcnv3_backward_cuda_launch(const T* input, const T* offset, const T* mask,
                                       const T* grad_output, acc_t<T>* grad_input,
                                       acc_t<T>* grad_offset, acc_t<T>* grad_mask,
                                       const Dcnv3Params& params, cudaStream_t stream);

// Channels each thread handles for these pointers: the widest vector (<= 16 bytes) that
// divides group_channels and to which every pointer is aligned. Exposed for tests/benchmarks.
int dcnv3_vector_width(int element_size, int group_channels, const void* const* pointers,
                       int num_pointers);

}  // namespace dcnv3
}  // namespace bldseg
