// CUDA implementation of fastbert::linear_gelu_{fwd,bwd}: cuBLAS GEMM through ATen + the fused bias+GELU
// kernel of csrc/cuda/bias_gelu.cu as its epilogue (one extra read and write of the [rows, n] activation).
#include "cuda_bindings/binding_utils.h"

namespace fastbert {
namespace cuda_bindings {
namespace {

constexpr const char* kLgFwd = "linear_gelu_fwd";
constexpr const char* kLgBwd = "linear_gelu_bwd";

// fp32 means IEEE fp32 in fastbert: while a GEMM of this file runs, cuBLAS may not use TF32 whatever
// torch.backends.cuda.matmul.allow_tf32 / set_float32_matmul_precision say. (Process-wide switch,
// restored on exit; the ops run on the calling thread.)
class NoTF32 {
 public:
  explicit NoTF32(bool active) : active_(active), prev_(active ? at::globalContext().allowTF32CuBLAS() : false) {
    if (active_ && prev_) at::globalContext().setAllowTF32CuBLAS(false);
  }
  ~NoTF32() {
    if (active_ && prev_) at::globalContext().setAllowTF32CuBLAS(true);
  }
  NoTF32(const NoTF32&) = delete;
  NoTF32& operator=(const NoTF32&) = delete;

 private:
  bool active_, prev_;
};

// x [m, k], weight [n, k] (x's dtype), bias [n] (x's dtype or fp32) -> fp32 bias copy or undefined.
at::Tensor check_linear(const char* op, const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias) {
  check_cuda(op, "x", x, x);
  kernel_dtype(op, "x", x);
  check_dim(op, "x", x, 2);
  check_cuda(op, "weight", weight, x);
  check_dim(op, "weight", weight, 2);
  FB_CUDA_CHECK(weight.scalar_type() == x.scalar_type(), op, "weight must have x's dtype ", x.scalar_type(), ", got ",
                weight.scalar_type());
  FB_CUDA_CHECK(weight.size(1) == x.size(1), op, "weight must have shape [n, ", x.size(1),
                "] to match x's last dim, got ", weight.sizes());
  return has(bias) ? vector_f32(op, "bias", *bias, weight.size(0), x.scalar_type(), x) : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor> linear_gelu_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias, c10::string_view approximate,
                                                   bool save_pre) {
  const at::Tensor b = check_linear(kLgFwd, x, weight, bias);
  const bool tanh = parse_approximate(kLgFwd, approximate);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), n = weight.size(0);
  at::Tensor out = new_output({m, n}, x.options());
  if (m == 0 || n == 0) return {out, save_pre ? new_output({m, n}, x.options()) : no_output(x.options())};
  const DType dt = kernel_dtype(kLgFwd, "x", x);
  const NoTF32 no_tf32(x.scalar_type() == at::kFloat);
  if (save_pre) {
    // pre = x W^T + b (the backward's input), then out = gelu(pre): the bias is added once, in the GEMM
    at::Tensor pre = b.defined() ? at::addmm(b.to(x.scalar_type()), x, weight.t()) : at::mm(x, weight.t());
    pre = pre.contiguous();
    check_launch(kLgFwd,
                 fastbert::cuda::bias_gelu_fwd(dt, pre.data_ptr(), nullptr, out.data_ptr(), m, n, tanh, stream()));
    return {out, pre};
  }
  // no pre to keep: GEMM without bias, bias + GELU fused in one pass (the bias stays fp32)
  const at::Tensor mm = at::mm(x, weight.t()).contiguous();
  check_launch(kLgFwd,
               fastbert::cuda::bias_gelu_fwd(dt, mm.data_ptr(), ptr_or_null(b), out.data_ptr(), m, n, tanh, stream()));
  return {out, no_output(x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_gelu_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                                                               const at::Tensor& weight,
                                                               const std::optional<at::Tensor>& bias,
                                                               const at::Tensor& pre, c10::string_view approximate) {
  const at::Tensor b = check_linear(kLgBwd, x, weight, bias);
  const bool tanh = parse_approximate(kLgBwd, approximate);
  const int64_t m = x.size(0), n = weight.size(0), k = x.size(1);
  check_cuda(kLgBwd, "grad_out", grad_out, x);
  FB_CUDA_CHECK(grad_out.dim() == 2 && grad_out.size(0) == m && grad_out.size(1) == n, kLgBwd,
                "grad_out must have shape [", m, ", ", n, "], got ", grad_out.sizes());
  FB_CUDA_CHECK(grad_out.scalar_type() == x.scalar_type(), kLgBwd, "grad_out must have x's dtype ", x.scalar_type(),
                ", got ", grad_out.scalar_type());
  check_cuda(kLgBwd, "pre", pre, x);
  // pre: x W^T + b as saved by the forward, or [0] (not saved): recomputed here then
  const bool saved = pre.numel() > 0;
  if (saved) {
    FB_CUDA_CHECK(pre.dim() == 2 && pre.size(0) == m && pre.size(1) == n, kLgBwd, "pre must have shape [", m, ", ", n,
                  "] or [0], got ", pre.sizes());
    FB_CUDA_CHECK(pre.scalar_type() == x.scalar_type(), kLgBwd, "pre must have x's dtype ", x.scalar_type(), ", got ",
                  pre.scalar_type());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const auto bias_opts = has(bias) ? bias->options() : x.options();
  if (m == 0 || n == 0) {
    at::Tensor gb = has(bias) ? at::zeros({n}, bias_opts) : no_output(x.options());
    return {at::zeros({m, k}, x.options()), at::zeros({n, k}, weight.options()), gb};
  }
  const DType dt = kernel_dtype(kLgBwd, "x", x);
  const NoTF32 no_tf32(x.scalar_type() == at::kFloat);
  const at::Tensor g = grad_out.contiguous();
  // grad_pre = grad_out * gelu'(pre); pre recomputed without bias, the bias then added in the kernel
  const at::Tensor pre_src = saved ? pre.contiguous() : at::mm(x, weight.t()).contiguous();
  at::Tensor grad_pre = at::empty({m, n}, x.options());
  check_launch(kLgBwd,
               fastbert::cuda::bias_gelu_bwd(dt, g.data_ptr(), pre_src.data_ptr(), saved ? nullptr : ptr_or_null(b),
                                             grad_pre.data_ptr(), m, n, tanh, stream()));
  at::Tensor grad_x = at::mm(grad_pre, weight);
  at::Tensor grad_w = at::mm(grad_pre.t(), x);
  // column sum in fp32 whatever the dtype, rounded once to the bias dtype
  at::Tensor grad_b =
      has(bias) ? grad_pre.sum(0, /*keepdim=*/false, at::kFloat).to(bias->scalar_type()) : no_output(x.options());
  return {grad_x, grad_w, grad_b};
}

}  // namespace
}  // namespace cuda_bindings
}  // namespace fastbert

TORCH_LIBRARY_IMPL(fastbert, CUDA, m) {
  m.impl("linear_gelu_fwd", &fastbert::cuda_bindings::linear_gelu_fwd);
  m.impl("linear_gelu_bwd", &fastbert::cuda_bindings::linear_gelu_bwd);
}
