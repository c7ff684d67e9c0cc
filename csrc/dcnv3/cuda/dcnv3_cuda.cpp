// DCNv3 operator: CUDA implementations of the `bldseg::dcnv3_forward` / `dcnv3_backward` ops
// (schema in ../dcnv3.cpp). This is the torch glue: it checks the arguments, allocates the
// outputs, and calls the raw-pointer launchers of dcnv3_cuda_kernel.cu on the current stream.
// Compiled only where CUDA torch and a CUDA toolkit exist (bldseg/ops/_build.py).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <tuple>

#include "../dcnv3_checks.h"
#include "dcnv3_cuda_kernel.h"

namespace bldseg {
namespace dcnv3 {
namespace {

// The CUDA element type of an ATen scalar type (same bits, the kernels' own half types).
template <typename scalar_t>
struct CudaType {
  using type = scalar_t;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename scalar_t>
const typename CudaType<scalar_t>::type* cuda_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename CudaType<scalar_t>::type*>(t.data_ptr<scalar_t>());
}

template <typename scalar_t>
typename CudaType<scalar_t>::type* cuda_mutable_ptr(at::Tensor& t) {
  return reinterpret_cast<typename CudaType<scalar_t>::type*>(t.data_ptr<scalar_t>());
}

void check_on_cuda(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.is_cuda(), op, ": the CUDA kernel got tensors on ", input.device(),
              "; move input, offset and mask to the same CUDA device");
}

// The kernels index one sample with 32-bit ints (batches are split into launches that fit).
void check_sample_size(const char* op, const char* what, int64_t elements) {
  TORCH_CHECK(elements <= INT_MAX, op, ": one sample of ", what, " has ", elements,
              " elements, but the CUDA kernels index a sample with 32-bit integers (at most ",
              INT_MAX, "); use smaller images or fewer channels per call");
}

Dcnv3Params to_params(const char* op, const Geometry& geo) {
  const int64_t P = geo.points();
  check_sample_size(op, "input", geo.height_in * geo.width_in * geo.channels());
  check_sample_size(op, "the output", geo.height_out * geo.width_out * geo.channels());
  check_sample_size(op, "offset", geo.height_out * geo.width_out * geo.group * P * 2);
  TORCH_CHECK(geo.batch <= INT_MAX && geo.kernel_h * geo.kernel_w <= INT_MAX &&
                  geo.stride_h <= INT_MAX && geo.stride_w <= INT_MAX && geo.pad_h <= INT_MAX &&
                  geo.pad_w <= INT_MAX && geo.dilation_h * geo.kernel_h <= INT_MAX &&
                  geo.dilation_w * geo.kernel_w <= INT_MAX,
              op, ": batch, kernel, stride, pad and dilation must fit in 32-bit integers");
  Dcnv3Params p{};
  p.batch = static_cast<int>(geo.batch);
  p.height_in = static_cast<int>(geo.height_in);
  p.width_in = static_cast<int>(geo.width_in);
  p.height_out = static_cast<int>(geo.height_out);
  p.width_out = static_cast<int>(geo.width_out);
  p.kernel_h = static_cast<int>(geo.kernel_h);
  p.kernel_w = static_cast<int>(geo.kernel_w);
  p.stride_h = static_cast<int>(geo.stride_h);
  p.stride_w = static_cast<int>(geo.stride_w);
  p.pad_h = static_cast<int>(geo.pad_h);
  p.pad_w = static_cast<int>(geo.pad_w);
  p.dilation_h = static_cast<int>(geo.dilation_h);
  p.dilation_w = static_cast<int>(geo.dilation_w);
  p.group = static_cast<int>(geo.group);
  p.group_channels = static_cast<int>(geo.group_channels);
  p.offset_scale = geo.offset_scale;
  return p;
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel failed: ", cudaGetErrorString(err));
}

// (N, H, W, G*P) logits -> probabilities, softmax over the P points of each group.
at::Tensor point_softmax(const at::Tensor& mask, int64_t group) {
  TORCH_CHECK(mask.dim() == 4 && group > 0 && mask.size(3) % group == 0,
              "bldseg::dcnv3: mask of shape ", shape_str(mask), " does not split into ", group,
              " groups");
  return at::softmax(mask.reshape({-1, mask.size(3) / group}), -1).view(mask.sizes());
}

at::Tensor dcnv3_forward_cuda(const at::Tensor& input, const at::Tensor& offset,
                              const at::Tensor& mask, int64_t kernel_h, int64_t kernel_w,
                              int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                              int64_t dilation_h, int64_t dilation_w, int64_t group,
                              int64_t group_channels, double offset_scale, int64_t im2col_step,
                              bool mask_softmax) {
  const char* op = "bldseg::dcnv3_forward";
  // Checked before the softmax below, which splits the mask by group (group 0 divided by 0).
  const Geometry geo = check_dcnv3_inputs(op, input, offset, mask, kernel_h, kernel_w, stride_h,
                                          stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
                                          group_channels, offset_scale, im2col_step);
  if (mask_softmax) {
    // The CUDA kernels read probabilities; the softmax over the P points runs as ATen's own
    // (fast on a GPU, unlike the CPU's over a short last dim, which the CPU kernel fuses).
    return dcnv3_forward_cuda(input, offset, point_softmax(mask, group), kernel_h, kernel_w,
                              stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
                              group_channels, offset_scale, im2col_step, false);
  }
  check_on_cuda(op, input);
  // im2col_step sized the official op's column buffer; these kernels write the output
  // directly, one launch for the whole batch, so it is only validated.
  const c10::cuda::CUDAGuard device_guard(input.device());
  // (N, H_out, W_out, G*C); every element is written by the kernel.
  at::Tensor output =
      at::empty({geo.batch, geo.height_out, geo.width_out, geo.channels()}, input.options());
  if (output.numel() == 0) return output;
  const Dcnv3Params params = to_params(op, geo);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "dcnv3_forward_cuda", [&] {
                                    err = dcnv3_forward_cuda_launch(
                                        cuda_ptr<scalar_t>(input), cuda_ptr<scalar_t>(offset),
                                        cuda_ptr<scalar_t>(mask),
                                        cuda_mutable_ptr<scalar_t>(output), params, stream);
                                  });
  check_launch(op, err);
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dcnv3_backward_cuda(
    const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
    const at::Tensor& grad_output, int64_t kernel_h, int64_t kernel_w, int64_t stride_h,
    int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w,
    int64_t group, int64_t group_channels, double offset_scale, int64_t im2col_step,
    bool mask_softmax) {
  const char* op = "bldseg::dcnv3_backward";
  // Checked before the softmax below, which splits the mask by group (group 0 divided by 0).
  const Geometry geo = check_dcnv3_inputs(op, input, offset, mask, kernel_h, kernel_w, stride_h,
                                          stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
                                          group_channels, offset_scale, im2col_step);
  if (mask_softmax) {
    // Gradient of the probabilities from the kernels, then through ATen's softmax backward.
    const at::Tensor prob = point_softmax(mask, group);
    auto grads = dcnv3_backward_cuda(input, offset, prob, grad_output, kernel_h, kernel_w,
                                     stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
                                     group, group_channels, offset_scale, im2col_step, false);
    const int64_t points = mask.size(3) / group;
    const at::Tensor grad_logit =
        at::_softmax_backward_data(std::get<2>(grads).reshape({-1, points}),
                                   prob.reshape({-1, points}), -1, prob.scalar_type());
    return {std::get<0>(grads), std::get<1>(grads), grad_logit.view(mask.sizes())};
  }
  check_dcnv3_grad_output(op, grad_output, input, geo);
  check_on_cuda(op, input);
  const c10::cuda::CUDAGuard device_guard(input.device());

  // Gradients accumulate in float32 for half types (grad_input by atomics, so a half buffer
  // would lose most of its bits) and are cast back at the end; in the input dtype otherwise.
  const auto dtype = input.scalar_type();
  const bool reduced = dtype == at::kHalf || dtype == at::kBFloat16;
  const auto acc_options = input.options().dtype(reduced ? at::kFloat : dtype);
  at::Tensor grad_input = at::zeros(input.sizes(), acc_options);  // atomics add into it
  at::Tensor grad_offset = at::empty(offset.sizes(), acc_options);  // fully written
  at::Tensor grad_mask = at::empty(mask.sizes(), acc_options);      // fully written

  if (offset.numel() > 0) {
    const Dcnv3Params params = to_params(op, geo);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    cudaError_t err = cudaSuccess;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, dtype, "dcnv3_backward_cuda", [&] {
          using T = typename CudaType<scalar_t>::type;
          using A = acc_t<T>;
          err = dcnv3_backward_cuda_launch<T>(
              cuda_ptr<scalar_t>(input), cuda_ptr<scalar_t>(offset), cuda_ptr<scalar_t>(mask),
              cuda_ptr<scalar_t>(grad_output), grad_input.data_ptr<A>(),
              grad_offset.data_ptr<A>(), grad_mask.data_ptr<A>(), params, stream);
        });
    check_launch(op, err);
  }
  if (reduced) {
    return {grad_input.to(dtype), grad_offset.to(dtype), grad_mask.to(dtype)};
  }
  return {grad_input, grad_offset, grad_mask};
}

}  // namespace
}  // namespace dcnv3
}  // namespace bldseg

TORCH_LIBRARY_IMPL(bldseg, CUDA, m) {
  m.impl("dcnv3_forward", &bldseg::dcnv3::dcnv3_forward_cuda);
  m.impl("dcnv3_backward", &bldseg::dcnv3::dcnv3_backward_cuda);
}
