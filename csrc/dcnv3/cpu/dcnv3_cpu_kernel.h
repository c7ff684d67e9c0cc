// DCNv3 CPU kernels. Inputs are checked by check_dcnv3_inputs (dcnv3_checks.h) before these
// run: contiguous channels-last tensors of one dtype, float32 or float64.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "../dcnv3_checks.h"

namespace bldseg {
namespace dcnv3 {

// output (N, H_out, W_out, G*C) = sum over the P points of mask * bilinear(input, location);
// with geo.mask_softmax, mask holds logits and the softmax over each group's P points is used.
at::Tensor dcnv3_forward_cpu_kernel(const at::Tensor& input, const at::Tensor& offset,
                                    const at::Tensor& mask, const Geometry& geo);

// Returns (grad_input, grad_offset, grad_mask) with the shapes of (input, offset, mask);
// with geo.mask_softmax, grad_mask is the gradient of the logits.
std::tuple<at::Tensor, at::Tensor, at::Tensor> dcnv3_backward_cpu_kernel(
    const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
    const at::Tensor& grad_output, const Geometry& geo);

}  // namespace dcnv3
}  // namespace bldseg
