// Argument checks shared by every DCNv3 backend (CPU glue in dcnv3.cpp, CUDA glue in
// cuda/dcnv3_cuda.cpp). They run before any kernel, so bad input raises a RuntimeError in
// Python with a message that says what was expected, and never reaches a raw pointer.
//
// Layout (channels-last, as the official InternImage op):
//   input  (N, H_in,  W_in,  G*C)
//   offset (N, H_out, W_out, G*P*2)   ordered [group][point][x, y], P = kernel_h*kernel_w
//   mask   (N, H_out, W_out, G*P)
//   output (N, H_out, W_out, G*C)
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <sstream>
#include <string>

namespace bldseg {
namespace dcnv3 {

// Every size a kernel needs, computed once from the checked arguments.
struct Geometry {
  int64_t batch;           // N
  int64_t height_in;       // H_in (unpadded)
  int64_t width_in;        // W_in (unpadded)
  int64_t height_out;      // H_out
  int64_t width_out;       // W_out
  int64_t kernel_h;        // sampling points along h
  int64_t kernel_w;        // sampling points along w
  int64_t stride_h;        // output stride along h
  int64_t stride_w;        // output stride along w
  int64_t pad_h;           // virtual zero padding along h
  int64_t pad_w;           // virtual zero padding along w
  int64_t dilation_h;      // spacing of the base grid along h
  int64_t dilation_w;      // spacing of the base grid along w
  int64_t group;           // G
  int64_t group_channels;  // C, channels per group
  double offset_scale;     // scales both the base grid and the learned offsets
  // mask holds logits: the kernel takes the softmax over the P points of each group itself
  // (forward), and the backward returns the gradient of the logits.
  bool mask_softmax = false;
  int64_t points() const { return kernel_h * kernel_w; }        // P
  int64_t channels() const { return group * group_channels; }  // G*C
};

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

inline std::string shape_str(std::initializer_list<int64_t> sizes) {
  std::ostringstream os;
  os << at::IntArrayRef(sizes);
  return os.str();
}

// Output size of a convolution-like sliding window; may be <= 0 for too small inputs.
inline int64_t dcnv3_out_size(int64_t in, int64_t pad, int64_t dilation, int64_t kernel,
                              int64_t stride) {
  return (in + 2 * pad - (dilation * (kernel - 1) + 1)) / stride + 1;
}

// Checks the integer parameters and the three input tensors; returns the geometry.
// `op` names the operator in the messages ("bldseg::dcnv3_forward", ...).
inline Geometry check_dcnv3_inputs(const char* op, const at::Tensor& input,
                                   const at::Tensor& offset, const at::Tensor& mask,
                                   int64_t kernel_h, int64_t kernel_w, int64_t stride_h,
                                   int64_t stride_w, int64_t pad_h, int64_t pad_w,
                                   int64_t dilation_h, int64_t dilation_w, int64_t group,
                                   int64_t group_channels, double offset_scale,
                                   int64_t im2col_step) {
  TORCH_CHECK(kernel_h > 0 && kernel_w > 0, op, ": kernel_h and kernel_w must be > 0, got ",
              kernel_h, " and ", kernel_w);
  TORCH_CHECK(stride_h > 0 && stride_w > 0, op, ": stride_h and stride_w must be > 0, got ",
              stride_h, " and ", stride_w);
  TORCH_CHECK(pad_h >= 0 && pad_w >= 0, op, ": pad_h and pad_w must be >= 0, got ", pad_h,
              " and ", pad_w);
  TORCH_CHECK(dilation_h > 0 && dilation_w > 0,
              op, ": dilation_h and dilation_w must be > 0, got ", dilation_h, " and ",
              dilation_w);
  TORCH_CHECK(group > 0 && group_channels > 0, op,
              ": group and group_channels must be > 0, got ", group, " and ", group_channels);
  TORCH_CHECK(im2col_step > 0, op, ": im2col_step must be > 0, got ", im2col_step);

  TORCH_CHECK(input.dim() == 4, op,
              ": expected input of rank 4 (N, H_in, W_in, group*group_channels) channels-last, "
              "got rank ", input.dim(), " with shape ", shape_str(input));
  TORCH_CHECK(offset.dim() == 4, op,
              ": expected offset of rank 4 (N, H_out, W_out, group*kernel_h*kernel_w*2), got rank ",
              offset.dim(), " with shape ", shape_str(offset));
  TORCH_CHECK(mask.dim() == 4, op,
              ": expected mask of rank 4 (N, H_out, W_out, group*kernel_h*kernel_w), got rank ",
              mask.dim(), " with shape ", shape_str(mask));

  TORCH_CHECK(input.device() == offset.device() && input.device() == mask.device(), op,
              ": input, offset and mask must be on the same device, got ", input.device(), ", ",
              offset.device(), " and ", mask.device());
  const auto dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              op, ": expected a floating dtype (float32, float64, float16 or bfloat16), got ",
              dtype);
  TORCH_CHECK(offset.scalar_type() == dtype && mask.scalar_type() == dtype, op,
              ": input, offset and mask must have the same dtype, got ", dtype, ", ",
              offset.scalar_type(), " and ", mask.scalar_type(),
              " (cast them, e.g. offset.to(input.dtype))");

  Geometry geo{};
  geo.batch = input.size(0);
  geo.height_in = input.size(1);
  geo.width_in = input.size(2);
  geo.kernel_h = kernel_h;
  geo.kernel_w = kernel_w;
  geo.stride_h = stride_h;
  geo.stride_w = stride_w;
  geo.pad_h = pad_h;
  geo.pad_w = pad_w;
  geo.dilation_h = dilation_h;
  geo.dilation_w = dilation_w;
  geo.group = group;
  geo.group_channels = group_channels;
  geo.offset_scale = offset_scale;

  TORCH_CHECK(input.size(3) == group * group_channels, op, ": input has ", input.size(3),
              " channels but group * group_channels = ", group, " * ", group_channels, " = ",
              group * group_channels, "; input must be (N, H_in, W_in, group*group_channels)");

  geo.height_out = dcnv3_out_size(geo.height_in, pad_h, dilation_h, kernel_h, stride_h);
  geo.width_out = dcnv3_out_size(geo.width_in, pad_w, dilation_w, kernel_w, stride_w);
  TORCH_CHECK(geo.height_out > 0 && geo.width_out > 0, op, ": input ", geo.height_in, "x",
              geo.width_in, " with pad (", pad_h, ", ", pad_w, "), dilation (", dilation_h, ", ",
              dilation_w, ") and kernel (", kernel_h, ", ", kernel_w,
              ") gives an empty output; use a larger input or more padding");

  const int64_t P = geo.points();
  TORCH_CHECK(offset.size(0) == geo.batch && offset.size(1) == geo.height_out &&
                  offset.size(2) == geo.width_out && offset.size(3) == group * P * 2,
              op, ": expected offset of shape ",
              shape_str({geo.batch, geo.height_out, geo.width_out, group * P * 2}),
              " = (N, H_out, W_out, group*kernel_h*kernel_w*2), got ", shape_str(offset));
  TORCH_CHECK(mask.size(0) == geo.batch && mask.size(1) == geo.height_out &&
                  mask.size(2) == geo.width_out && mask.size(3) == group * P,
              op, ": expected mask of shape ",
              shape_str({geo.batch, geo.height_out, geo.width_out, group * P}),
              " = (N, H_out, W_out, group*kernel_h*kernel_w), got ", shape_str(mask));

  TORCH_CHECK(input.is_contiguous() && offset.is_contiguous() && mask.is_contiguous(), op,
              ": input, offset and mask must be contiguous (call .contiguous(); the Python "
              "functional bldseg.ops.dcnv3 does it for you)");
  return geo;
}

// Checks grad_output of the backward against the geometry of the forward.
inline void check_dcnv3_grad_output(const char* op, const at::Tensor& grad_output,
                                    const at::Tensor& input, const Geometry& geo) {
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == geo.batch &&
                  grad_output.size(1) == geo.height_out && grad_output.size(2) == geo.width_out &&
                  grad_output.size(3) == geo.channels(),
              op, ": expected grad_output of shape ",
              shape_str({geo.batch, geo.height_out, geo.width_out, geo.channels()}),
              " = (N, H_out, W_out, group*group_channels), got ", shape_str(grad_output));
  TORCH_CHECK(grad_output.device() == input.device(), op,
              ": grad_output must be on the same device as input, got ", grad_output.device(),
              " and ", input.device());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), op,
              ": grad_output must have the dtype of input, got ", grad_output.scalar_type(),
              " and ", input.scalar_type());
  TORCH_CHECK(grad_output.is_contiguous(), op,
              ": grad_output must be contiguous (call .contiguous())");
}

}  // namespace dcnv3
}  // namespace bldseg
