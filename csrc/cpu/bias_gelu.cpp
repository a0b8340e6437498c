// bias_gelu on CPU: out = gelu(x + bias), one pass over [rows, N]; backward grad_x = g * gelu'(x + bias).
// GELU and gelu' formulas: see common.h; the row passes are in gelu_epilogue.h. All arithmetic in fp32;
// one rounding on the way out. (linear_gelu.cpp uses the same passes as its GEMM epilogue.)
#include "cpu/gelu_epilogue.h"

namespace fastbert {
namespace cpu {
namespace {

using gelu_epilogue::run_gelu;
using gelu_epilogue::run_gelu_grad;

constexpr const char* kBgFwd = "bias_gelu_fwd";
constexpr const char* kBgBwd = "bias_gelu_bwd";

void check_activation(const char* op, const char* name, const at::Tensor& t) {
  check_cpu(op, name, t);
  check_kernel_dtype(op, name, t);
  FB_CHECK(t.dim() >= 1, op, name, " must have at least 1 dim, got a scalar");
  check_contiguous(op, name, t);
}

at::Tensor bias_gelu_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& bias, c10::string_view approximate) {
  check_activation(kBgFwd, "x", x);
  const bool tanh = parse_approximate(kBgFwd, approximate);
  const int64_t n = x.size(-1);
  if (has(bias)) check_vector(kBgFwd, "bias", *bias, n, x.scalar_type());
  at::Tensor out = new_output(x.sizes(), x.scalar_type());
  if (x.numel() == 0) return out;
  const int64_t rows = x.numel() / n;
  const std::vector<float> b = vector_f32(bias);
  FB_DISPATCH(x.scalar_type(), kBgFwd, [&] {
    run_gelu<scalar_t, scalar_t>(tanh, x.data_ptr<scalar_t>(), b.empty() ? nullptr : b.data(), rows, n,
                                 out.data_ptr<scalar_t>(), nullptr);
  });
  return out;
}

at::Tensor bias_gelu_bwd(const at::Tensor& grad_out, const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                         c10::string_view approximate) {
  check_activation(kBgBwd, "x", x);
  check_activation(kBgBwd, "grad_out", grad_out);
  FB_CHECK(grad_out.sizes() == x.sizes(), kBgBwd, "grad_out must have x's shape ", x.sizes(), ", got ",
           grad_out.sizes());
  FB_CHECK(grad_out.scalar_type() == x.scalar_type(), kBgBwd, "grad_out must have x's dtype ", x.scalar_type(),
           ", got ", grad_out.scalar_type());
  const bool tanh = parse_approximate(kBgBwd, approximate);
  const int64_t n = x.size(-1);
  if (has(bias)) check_vector(kBgBwd, "bias", *bias, n, x.scalar_type());
  at::Tensor grad_x = new_output(x.sizes(), x.scalar_type());
  if (x.numel() == 0) return grad_x;
  const int64_t rows = x.numel() / n;
  const std::vector<float> b = vector_f32(bias);
  FB_DISPATCH(x.scalar_type(), kBgBwd, [&] {
    run_gelu_grad<scalar_t, scalar_t>(tanh, grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                      b.empty() ? nullptr : b.data(), rows, n, grad_x.data_ptr<scalar_t>(), nullptr,
                                      reduce_block_rows(rows));
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
  m.impl("bias_gelu_fwd", &bias_gelu_fwd);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd);
}

}  // namespace cpu
}  // namespace fastbert
