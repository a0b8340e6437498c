// CUDA implementations of fastbert::add_layer_norm_{fwd,fwd_pre,bwd}: checks, outputs, then the launchers of
// csrc/cuda/add_layer_norm.cu. LayerNorm parameters reach the kernels as fp32 copies ([n] vectors; a
// missing weight as ones, exact); parameter gradients come back in fp32 and are rounded once to each
// parameter's dtype. The logic mirrors csrc/cpu/add_layer_norm.cpp.
#include "cuda_bindings/binding_utils.h"

namespace fastbert {
namespace cuda_bindings {
namespace {

constexpr const char* kFwd = "add_layer_norm_fwd";
constexpr const char* kFwdPre = "add_layer_norm_fwd_pre";
constexpr const char* kBwd = "add_layer_norm_bwd";

struct LnInputs {
  DType dtype;
  int64_t rows, n;
  at::Tensor weight, bias, x_bias;  // fp32 contiguous (weight: ones when absent; bias/x_bias undefined when absent)
  at::ScalarType param_dtype;       // of the parameter gradients: weight's, else bias's, else x's
  const void* residual;
};

LnInputs check_inputs(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                      const std::optional<at::Tensor>& x_bias) {
  check_cuda(op, "x", x, x);
  LnInputs in;
  in.dtype = kernel_dtype(op, "x", x);
  check_dim(op, "x", x, 2);
  check_contiguous(op, "x", x);
  in.rows = x.size(0);
  in.n = x.size(1);
  FB_CUDA_CHECK(in.n <= fastbert::cuda::kMaxLayerNormHidden, op,
                "x's last dim (hidden size) must be <= ", fastbert::cuda::kMaxLayerNormHidden, ", got ", in.n);
  if (has(weight)) {
    in.weight = vector_f32(op, "weight", *weight, in.n, x.scalar_type(), x);
  } else {
    in.weight = at::ones({in.n}, x.options().dtype(at::kFloat));
  }
  if (has(bias)) {
    FB_CUDA_CHECK(!has(weight) || bias->scalar_type() == weight->scalar_type(), op, "bias must have weight's dtype ",
                  weight->scalar_type(), ", got ", bias->scalar_type());
    in.bias = vector_f32(op, "bias", *bias, in.n, x.scalar_type(), x);
  }
  in.param_dtype = has(weight) ? weight->scalar_type() : has(bias) ? bias->scalar_type() : x.scalar_type();
  if (has(x_bias)) in.x_bias = vector_f32(op, "x_bias", *x_bias, in.n, x.scalar_type(), x);
  in.residual = nullptr;
  if (has(residual)) {
    check_cuda(op, "residual", *residual, x);
    FB_CUDA_CHECK(residual->sizes() == x.sizes(), op, "residual must have x's shape ", x.sizes(), ", got ",
                  residual->sizes());
    FB_CUDA_CHECK(residual->scalar_type() == x.scalar_type(), op, "residual must have x's dtype ", x.scalar_type(),
                  ", got ", residual->scalar_type());
    check_contiguous(op, "residual", *residual);
    in.residual = residual->data_ptr();
  }
  return in;
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }
float* mut_ptr_or_null(at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// The forward, with the pre-norm sum h written to `pre` when it is not nullptr.
void fwd_into(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
              const std::optional<at::Tensor>& x_bias, double eps, double dropout_p,
              const std::optional<at::Tensor>& seed, at::Tensor& out, at::Tensor& mean, at::Tensor& rstd,
              at::Tensor* pre) {
  const LnInputs in = check_inputs(op, x, weight, bias, residual, x_bias);
  FB_CUDA_CHECK(eps > 0.0, op, "eps must be > 0, got ", eps);
  const int64_t* seed_ptr = check_dropout(op, dropout_p, seed, x);
  const c10::cuda::CUDAGuard guard(x.device());
  out = new_output(x.sizes(), x.options());
  const auto f32 = x.options().dtype(at::kFloat);
  mean = new_output({in.rows}, f32);
  rstd = new_output({in.rows}, f32);
  if (pre != nullptr) *pre = new_output(x.sizes(), x.options());
  if (x.numel() == 0) return;
  check_launch(op, fastbert::cuda::add_layer_norm_fwd(in.dtype, x.data_ptr(), in.residual, ptr_or_null(in.x_bias),
                                                      in.weight.data_ptr<float>(), ptr_or_null(in.bias), out.data_ptr(),
                                                      pre != nullptr ? pre->data_ptr() : nullptr,
                                                      mean.data_ptr<float>(), rstd.data_ptr<float>(), in.rows, in.n,
                                                      static_cast<float>(eps), dropout_p, seed_ptr, stream()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& x_bias, double eps, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  at::Tensor out, mean, rstd;
  fwd_into(kFwd, x, weight, bias, residual, x_bias, eps, dropout_p, seed, out, mean, rstd, nullptr);
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd_pre(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& x_bias, double eps, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  at::Tensor out, mean, rstd, pre;
  fwd_into(kFwdPre, x, weight, bias, residual, x_bias, eps, dropout_p, seed, out, mean, rstd, &pre);
  return {out, mean, rstd, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& x_bias, const at::Tensor& mean, const at::Tensor& rstd, double dropout_p,
    const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& grad_pre_out) {
  const LnInputs in = check_inputs(kBwd, x, weight, bias, residual, x_bias);
  const bool gin = has(grad_pre_out);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"grad_out", &grad_out},
                                {"grad_pre_out", gin ? &*grad_pre_out : nullptr}}) {
    if (t == nullptr) continue;
    check_cuda(kBwd, name, *t, x);
    FB_CUDA_CHECK(t->sizes() == x.sizes(), kBwd, name, " must have x's shape ", x.sizes(), ", got ", t->sizes());
    FB_CUDA_CHECK(t->scalar_type() == x.scalar_type(), kBwd, name, " must have x's dtype ", x.scalar_type(), ", got ",
                  t->scalar_type());
    check_contiguous(kBwd, name, *t);
  }
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"mean", mean}, {"rstd", rstd}}) {
    check_cuda(kBwd, name, t, x);
    FB_CUDA_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == in.rows && t.is_contiguous(), kBwd,
                  name, " must be a contiguous float32 tensor of shape [", in.rows, "], got ", t.scalar_type(), " ",
                  t.sizes());
  }
  const int64_t* seed_ptr = check_dropout(kBwd, dropout_p, seed, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor grad_pre = new_output(x.sizes(), x.options());
  at::Tensor grad_x = dropout_p > 0.0 ? new_output(x.sizes(), x.options()) : no_output(x.options());
  at::Tensor gw = at::empty({in.n}, f32);
  at::Tensor gb = in.bias.defined() ? at::empty({in.n}, f32) : at::Tensor();
  at::Tensor gxb = in.x_bias.defined() ? at::empty({in.n}, f32) : at::Tensor();
  if (in.n > 0) {
    const int sms = sm_count(x);
    const int64_t ws_bytes = fastbert::cuda::add_layer_norm_bwd_workspace_bytes(in.rows, in.n, sms);
    at::Tensor ws = at::empty({ws_bytes / static_cast<int64_t>(sizeof(float))}, f32);
    check_launch(kBwd, fastbert::cuda::add_layer_norm_bwd(
                           in.dtype, grad_out.data_ptr(), gin ? grad_pre_out->data_ptr() : nullptr, x.data_ptr(),
                           in.residual, ptr_or_null(in.x_bias), in.weight.data_ptr<float>(), mean.data_ptr<float>(),
                           rstd.data_ptr<float>(), grad_pre.data_ptr(), dropout_p > 0.0 ? grad_x.data_ptr() : nullptr,
                           gw.data_ptr<float>(), mut_ptr_or_null(gb), mut_ptr_or_null(gxb), in.rows, in.n, dropout_p,
                           seed_ptr, ws.numel() > 0 ? ws.data_ptr<float>() : nullptr, sms, stream()));
  }
  const auto p_opts = x.options().dtype(in.param_dtype);
  at::Tensor grad_weight = has(weight) ? gw.to(in.param_dtype) : no_output(p_opts);
  at::Tensor grad_bias = has(bias) ? gb.to(bias->scalar_type()) : no_output(p_opts);
  at::Tensor grad_x_bias = has(x_bias) ? gxb.to(x_bias->scalar_type()) : no_output(x.options());
  return {grad_pre, grad_x, grad_weight, grad_bias, grad_x_bias};
}

}  // namespace
}  // namespace cuda_bindings
}  // namespace fastbert

TORCH_LIBRARY_IMPL(fastbert, CUDA, m) {
  m.impl("add_layer_norm_fwd", &fastbert::cuda_bindings::add_layer_norm_fwd);
  m.impl("add_layer_norm_fwd_pre", &fastbert::cuda_bindings::add_layer_norm_fwd_pre);
  m.impl("add_layer_norm_bwd", &fastbert::cuda_bindings::add_layer_norm_bwd);
}
