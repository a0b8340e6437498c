// linear_gelu on CPU. The GEMM is ATen's (at::mm_out into the output buffer, so MKL/oneDNN does the
// matmul), then ONE pass over that buffer adds the bias and applies GELU in place (writing `pre` as well
// when asked) -- the fused epilogue (gelu_epilogue.h, shared with bias_gelu.cpp). Backward: one pass
// computes grad_pre = g * gelu'(pre) and the bias gradient's fp32 column partials together, then two
// ATen GEMMs: grad_x = grad_pre @ W, grad_weight = grad_pre^T @ x. All arithmetic in fp32; one rounding
// on the way out.
#include <ATen/ops/mm.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include "cpu/gelu_epilogue.h"

namespace fastbert {
namespace cpu {
namespace {

using gelu_epilogue::run_gelu;
using gelu_epilogue::run_gelu_grad;

constexpr const char* kLgFwd = "linear_gelu_fwd";
constexpr const char* kLgBwd = "linear_gelu_bwd";

// Whether this CPU multiplies 16-bit matrices natively (AVX512-BF16 / AVX512-FP16, which AMX machines
// also have). Without it ATen's 16-bit GEMM is a slow fallback (on an AVX2 machine ~8x slower than
// sgemm at BERT shapes), so linear_gelu converts the operands to fp32, multiplies with sgemm and
// rounds once in the epilogue: faster, and more exact (one rounding instead of two).
bool native_16bit_gemm(at::ScalarType st) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool bf16 = __builtin_cpu_supports("avx512bf16");
  static const bool fp16 = __builtin_cpu_supports("avx512fp16");
  if (st == at::kBFloat16) return bf16;
  if (st == at::kHalf) return fp16;
#endif
  (void)st;
  return true;
}

inline bool gemm_in_f32(at::ScalarType st) { return st != at::kFloat && !native_16bit_gemm(st); }

void check_linear(const char* op, const at::Tensor& x, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& bias) {
  check_cpu(op, "x", x);
  check_kernel_dtype(op, "x", x);
  check_dim(op, "x", x, 2);
  check_cpu(op, "weight", weight);
  check_dim(op, "weight", weight, 2);
  FB_CHECK(weight.scalar_type() == x.scalar_type(), op, "weight must have x's dtype ", x.scalar_type(), ", got ",
           weight.scalar_type());
  FB_CHECK(weight.size(1) == x.size(1), op, "weight must have shape [N, ", x.size(1), "] to match x's last dim, got ",
           weight.sizes());
  if (has(bias)) check_vector(op, "bias", *bias, weight.size(0), x.scalar_type());
}

// out = x @ W^T in column chunks of about kGemmCols outputs, each GEMM writing its slice of `out` in
// place (BLAS leading dimension n: no copies): faster than one GEMM with MKL's sgemm, bit-identical
// (each output element is the same dot product over K); docs/perf-notes.md.
constexpr int64_t kGemmCols = 768;

void mm_in_column_chunks(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight) {
  const int64_t n = weight.size(0);
  const int64_t chunks = (n + kGemmCols - 1) / kGemmCols;
  const int64_t step = ((n + chunks - 1) / chunks + 63) / 64 * 64;
  for (int64_t c0 = 0; c0 < n; c0 += step) {
    const int64_t w = std::min(step, n - c0);
    at::Tensor slice = out.narrow(1, c0, w);
    at::mm_out(slice, x, weight.narrow(0, c0, w).t());
  }
}

std::tuple<at::Tensor, at::Tensor> linear_gelu_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                   const c10::optional<at::Tensor>& bias, c10::string_view approximate,
                                                   bool save_pre) {
  check_linear(kLgFwd, x, weight, bias);
  const bool tanh = parse_approximate(kLgFwd, approximate);
  // The GEMMs below are ATen calls: under torch.autocast they would be re-cast (to bf16 on CPU) behind
  // this kernel's back. The kernel owns its precision, so autocast is switched off inside it.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t m = x.size(0), n = weight.size(0);
  at::Tensor out = new_output({m, n}, x.scalar_type());
  at::Tensor pre = save_pre ? new_output({m, n}, x.scalar_type()) : no_output(x.scalar_type());
  if (m == 0 || n == 0) return {out, pre};
  const std::vector<float> b = vector_f32(bias);
  if (gemm_in_f32(x.scalar_type())) {
    const at::Tensor acc = at::mm(x.to(at::kFloat), weight.to(at::kFloat).t());  // sgemm, fp32 result
    FB_DISPATCH(x.scalar_type(), kLgFwd, [&] {
      run_gelu<float, scalar_t>(tanh, acc.data_ptr<float>(), b.empty() ? nullptr : b.data(), m, n,
                                out.data_ptr<scalar_t>(), save_pre ? pre.data_ptr<scalar_t>() : nullptr);
    });
    return {out, pre};
  }
  if (x.scalar_type() == at::kFloat) {
    mm_in_column_chunks(out, x, weight);
  } else {
    at::mm_out(out, x, weight.t());  // x @ W^T, in x's dtype (fp32 accumulation inside the GEMM)
  }
  FB_DISPATCH(x.scalar_type(), kLgFwd, [&] {
    run_gelu<scalar_t, scalar_t>(tanh, out.data_ptr<scalar_t>(), b.empty() ? nullptr : b.data(), m, n,
                                 out.data_ptr<scalar_t>(), save_pre ? pre.data_ptr<scalar_t>() : nullptr);
  });
  return {out, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_gelu_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                                                               const at::Tensor& weight,
                                                               const c10::optional<at::Tensor>& bias,
                                                               const at::Tensor& pre, c10::string_view approximate) {
  check_linear(kLgBwd, x, weight, bias);
  const bool tanh = parse_approximate(kLgBwd, approximate);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // see linear_gelu_fwd
  const int64_t m = x.size(0), n = weight.size(0), k = x.size(1);
  check_cpu(kLgBwd, "grad_out", grad_out);
  FB_CHECK(grad_out.dim() == 2 && grad_out.size(0) == m && grad_out.size(1) == n, kLgBwd, "grad_out must have shape [",
           m, ", ", n, "], got ", grad_out.sizes());
  FB_CHECK(grad_out.scalar_type() == x.scalar_type(), kLgBwd, "grad_out must have x's dtype ", x.scalar_type(),
           ", got ", grad_out.scalar_type());
  check_cpu(kLgBwd, "pre", pre);
  // pre: x @ W^T + b as saved by the forward, or [0] (not saved): recomputed here then
  const bool saved = pre.numel() > 0;
  if (saved) {
    FB_CHECK(pre.dim() == 2 && pre.size(0) == m && pre.size(1) == n, kLgBwd, "pre must have shape [", m, ", ", n,
             "] or [0], got ", pre.sizes());
    FB_CHECK(pre.scalar_type() == x.scalar_type(), kLgBwd, "pre must have x's dtype ", x.scalar_type(), ", got ",
             pre.scalar_type());
  }
  at::Tensor grad_x = new_output({m, k}, x.scalar_type());
  at::Tensor grad_w = new_output({n, k}, weight.scalar_type());
  const auto bias_dtype = has(bias) ? bias->scalar_type() : x.scalar_type();
  if (m == 0 || n == 0) {
    if (grad_x.numel() > 0) grad_x.zero_();
    if (grad_w.numel() > 0) grad_w.zero_();
    at::Tensor gb =
        has(bias) ? tensor_from_f32(std::vector<float>(n, 0.f), {n}, bias_dtype) : no_output(x.scalar_type());
    return {grad_x, grad_w, gb};
  }
  // pre-activation: saved (bias included), or x @ W^T with the bias added inside the gelu' pass
  const bool f32 = gemm_in_f32(x.scalar_type());
  const at::Tensor x32 = f32 ? x.to(at::kFloat) : x, w32 = f32 ? weight.to(at::kFloat) : weight;
  at::Tensor pre_src = saved ? pre.contiguous() : at::mm(x32, w32.t()).to(x.scalar_type());
  const std::vector<float> b = saved ? std::vector<float>() : vector_f32(bias);
  const at::Tensor g = grad_out.contiguous();
  // grad_pre in the GEMM's dtype (fp32 when the GEMMs run in fp32)
  at::Tensor grad_pre = at::empty({m, n}, x.options().dtype(f32 ? at::kFloat : x.scalar_type()));
  const int64_t block = reduce_block_rows(m);
  const int64_t nblk = (m + block - 1) / block;
  auto part = has(bias) ? scratch_f32(nblk * n) : nullptr;
  FB_DISPATCH(x.scalar_type(), kLgBwd, [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* pp = pre_src.data_ptr<scalar_t>();
    const float* bp = b.empty() ? nullptr : b.data();
    float* partp = part.get();
    if (f32)
      run_gelu_grad<scalar_t, float>(tanh, gp, pp, bp, m, n, grad_pre.data_ptr<float>(), partp, block);
    else
      run_gelu_grad<scalar_t, scalar_t>(tanh, gp, pp, bp, m, n, grad_pre.data_ptr<scalar_t>(), partp, block);
  });
  if (f32) {
    grad_x.copy_(at::mm(grad_pre, w32));
    grad_w.copy_(at::mm(grad_pre.t(), x32));
  } else {
    at::mm_out(grad_x, grad_pre, weight);
    at::mm_out(grad_w, grad_pre.t(), x);
  }
  at::Tensor grad_b = no_output(x.scalar_type());
  if (has(bias)) {
    std::vector<float> gb(n);
    sum_partials(part.get(), nblk, n, gb.data());
    grad_b = tensor_from_f32(gb, {n}, bias_dtype);
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
  m.impl("linear_gelu_fwd", &linear_gelu_fwd);
  m.impl("linear_gelu_bwd", &linear_gelu_bwd);
}

}  // namespace cpu
}  // namespace fastbert
