// DCNv3 operator: schema of the two ops in the `bldseg` namespace and their CPU
// implementations. The CUDA implementations of the same ops live in cuda/dcnv3_cuda.cpp and
// are compiled in only where CUDA is available. Autograd and fake (meta) implementations are
// registered from Python (bldseg/ops/dcnv3.py) with torch.library.
//
// Shapes (channels-last): input (N, H_in, W_in, G*C), offset (N, H_out, W_out, G*P*2),
// mask (N, H_out, W_out, G*P), output (N, H_out, W_out, G*C); P = kernel_h*kernel_w.
// mask_softmax=True: mask holds logits and the op takes the softmax over the P points of each
// group (InternImage's DCNv3 module does it before the op); the backward then returns the
// gradient of the logits.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/dcnv3_cpu_kernel.h"
#include "dcnv3_checks.h"

namespace bldseg {
namespace dcnv3 {
namespace {

// float16 / bfloat16 run through the float32 kernel: the CPU has no fast half arithmetic and
// float32 accumulation is what the official CUDA kernel does (opmath) anyway.
bool is_reduced(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

at::Tensor dcnv3_forward_cpu(const at::Tensor& input, const at::Tensor& offset,
                             const at::Tensor& mask, int64_t kernel_h, int64_t kernel_w,
                             int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                             int64_t dilation_h, int64_t dilation_w, int64_t group,
                             int64_t group_channels, double offset_scale, int64_t im2col_step,
                             bool mask_softmax) {
  const char* op = "bldseg::dcnv3_forward";
  Geometry geo = check_dcnv3_inputs(op, input, offset, mask, kernel_h, kernel_w, stride_h,
                                    stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
                                    group_channels, offset_scale, im2col_step);
  geo.mask_softmax = mask_softmax;
  TORCH_CHECK(input.device().is_cpu(), op, ": the CPU kernel got tensors on ", input.device());
  // im2col_step batches the column buffer of the CUDA kernel; the CPU kernel has no column
  // buffer, so it is only validated here.
  if (is_reduced(input)) {
    return dcnv3_forward_cpu_kernel(input.to(at::kFloat), offset.to(at::kFloat),
                                    mask.to(at::kFloat), geo)
        .to(input.scalar_type());
  }
  return dcnv3_forward_cpu_kernel(input, offset, mask, geo);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dcnv3_backward_cpu(
    const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
    const at::Tensor& grad_output, int64_t kernel_h, int64_t kernel_w, int64_t stride_h,
    int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w,
    int64_t group, int64_t group_channels, double offset_scale, int64_t im2col_step,
    bool mask_softmax) {
  const char* op = "bldseg::dcnv3_backward";
  Geometry geo = check_dcnv3_inputs(op, input, offset, mask, kernel_h, kernel_w, stride_h,
                                    stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
                                    group_channels, offset_scale, im2col_step);
  geo.mask_softmax = mask_softmax;
  check_dcnv3_grad_output(op, grad_output, input, geo);
  TORCH_CHECK(input.device().is_cpu(), op, ": the CPU kernel got tensors on ", input.device());
  if (is_reduced(input)) {
    const auto dtype = input.scalar_type();
    auto grads = dcnv3_backward_cpu_kernel(input.to(at::kFloat), offset.to(at::kFloat),
                                           mask.to(at::kFloat), grad_output.to(at::kFloat), geo);
    return {std::get<0>(grads).to(dtype), std::get<1>(grads).to(dtype),
            std::get<2>(grads).to(dtype)};
  }
  return dcnv3_backward_cpu_kernel(input, offset, mask, grad_output, geo);
}

}  // namespace
}  // namespace dcnv3
}  // namespace bldseg

TORCH_LIBRARY(bldseg, m) {
  m.def(
      "dcnv3_forward(Tensor input, Tensor offset, Tensor mask, int kernel_h, int kernel_w, "
      "int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, "
      "int group, int group_channels, float offset_scale, int im2col_step, "
      "bool mask_softmax=False) -> Tensor");
  m.def(
      "dcnv3_backward(Tensor input, Tensor offset, Tensor mask, Tensor grad_output, "
      "int kernel_h, int kernel_w, int stride_h, int stride_w, int pad_h, int pad_w, "
      "int dilation_h, int dilation_w, int group, int group_channels, float offset_scale, "
      "int im2col_step, bool mask_softmax=False) -> (Tensor grad_input, Tensor grad_offset, "
      "Tensor grad_mask)");
}

TORCH_LIBRARY_IMPL(bldseg, CPU, m) {
  m.impl("dcnv3_forward", &bldseg::dcnv3::dcnv3_forward_cpu);
  m.impl("dcnv3_backward", &bldseg::dcnv3::dcnv3_backward_cpu);
}
