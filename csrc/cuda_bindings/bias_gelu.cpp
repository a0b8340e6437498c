// CUDA implementation of fastbert::bias_gelu_{fwd,bwd}: checks, then the kernels of csrc/cuda/bias_gelu.cu.
#include "cuda_bindings/binding_utils.h"

namespace fastbert {
namespace cuda_bindings {
namespace {

constexpr const char* kBgFwd = "bias_gelu_fwd";
constexpr const char* kBgBwd = "bias_gelu_bwd";

// x: [rows, n] contiguous kernel dtype; bias [n] (x's dtype or fp32) -> fp32 copy, or undefined.
at::Tensor check_bias_gelu(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  check_cuda(op, "x", x, x);
  kernel_dtype(op, "x", x);
  check_dim(op, "x", x, 2);
  check_contiguous(op, "x", x);
  return has(bias) ? vector_f32(op, "bias", *bias, x.size(1), x.scalar_type(), x) : at::Tensor();
}

at::Tensor bias_gelu_fwd(const at::Tensor& x, const std::optional<at::Tensor>& bias, c10::string_view approximate) {
  const at::Tensor b = check_bias_gelu(kBgFwd, x, bias);
  const bool tanh = parse_approximate(kBgFwd, approximate);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = new_output(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  check_launch(kBgFwd, fastbert::cuda::bias_gelu_fwd(kernel_dtype(kBgFwd, "x", x), x.data_ptr(), ptr_or_null(b),
                                                     out.data_ptr(), x.size(0), x.size(1), tanh, stream()));
  return out;
}

at::Tensor bias_gelu_bwd(const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                         c10::string_view approximate) {
  const at::Tensor b = check_bias_gelu(kBgBwd, x, bias);
  const bool tanh = parse_approximate(kBgBwd, approximate);
  check_cuda(kBgBwd, "grad_out", grad_out, x);
  FB_CUDA_CHECK(grad_out.sizes() == x.sizes(), kBgBwd, "grad_out must have x's shape ", x.sizes(), ", got ",
                grad_out.sizes());
  FB_CUDA_CHECK(grad_out.scalar_type() == x.scalar_type(), kBgBwd, "grad_out must have x's dtype ", x.scalar_type(),
                ", got ", grad_out.scalar_type());
  check_contiguous(kBgBwd, "grad_out", grad_out);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_x = new_output(x.sizes(), x.options());
  if (x.numel() == 0) return grad_x;
  check_launch(kBgBwd,
               fastbert::cuda::bias_gelu_bwd(kernel_dtype(kBgBwd, "x", x), grad_out.data_ptr(), x.data_ptr(),
                                             ptr_or_null(b), grad_x.data_ptr(), x.size(0), x.size(1), tanh, stream()));
  return grad_x;
}

}  // namespace
}  // namespace cuda_bindings
}  // namespace fastbert

TORCH_LIBRARY_IMPL(fastbert, CUDA, m) {
  m.impl("bias_gelu_fwd", &fastbert::cuda_bindings::bias_gelu_fwd);
  m.impl("bias_gelu_bwd", &fastbert::cuda_bindings::bias_gelu_bwd);
}
