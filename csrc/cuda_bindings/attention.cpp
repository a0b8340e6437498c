// CUDA implementations of fastbert::attention_{fwd,bwd}: checks, outputs, strides, then the launchers of
// csrc/cuda/attention.cu. q/k/v are read in place through their strides (unit stride along D only);
// attn_bias is read through a broadcast (stride-0) view, never materialized.
#include "cuda_bindings/binding_utils.h"

namespace fastbert {
namespace cuda_bindings {
namespace {

using fastbert::cuda::AttentionParams;
using fastbert::cuda::AttnOutTensor;
using fastbert::cuda::AttnTensor;

constexpr const char* kFwd = "attention_fwd";
constexpr const char* kBwd = "attention_bwd";

struct Shapes {
  bool packed;
  int64_t B, Sq, Sk, H, D, total;
};

AttnTensor view(const at::Tensor& t, bool packed) {
  if (packed) return {t.data_ptr(), 0, t.stride(0), t.stride(1)};
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

AttnOutTensor out_view(at::Tensor& t, bool packed) {
  if (packed) return {t.data_ptr(), 0, t.stride(0), t.stride(1)};
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

void check_qkv_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q, bool packed) {
  check_cuda(op, name, t, q);
  FB_CUDA_CHECK(t.scalar_type() == q.scalar_type(), op, name, " must have q's dtype ", q.scalar_type(), ", got ",
                t.scalar_type());
  check_dim(op, name, t, packed ? 3 : 4);
  FB_CUDA_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, name,
                " must have unit stride along the head dim, got strides ", t.strides());
}

// Validates everything both directions share and fills the kernel parameters.
AttentionParams make_params(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& key_padding_mask,
                            const std::optional<at::Tensor>& attn_bias, const std::optional<at::Tensor>& cu_seqlens,
                            int64_t max_seqlen, bool causal, double scale, double dropout_p,
                            const std::optional<at::Tensor>& seed, int64_t window, Shapes& sh, at::Tensor& bias_view) {
  check_cuda(op, "q", q, q);
  const DType dtype = kernel_dtype(op, "q", q);
  sh.packed = has(cu_seqlens);
  check_qkv_like(op, "q", q, q, sh.packed);
  check_qkv_like(op, "k", k, q, sh.packed);
  check_qkv_like(op, "v", v, q, sh.packed);
  FB_CUDA_CHECK(k.sizes() == v.sizes(), op, "k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  sh.D = q.size(-1);
  sh.H = q.size(-2);
  FB_CUDA_CHECK(k.size(-1) == sh.D, op, "k must have q's head dim ", sh.D, ", got ", k.size(-1));
  FB_CUDA_CHECK(k.size(-2) == sh.H, op, "k must have q's number of heads ", sh.H, ", got ", k.size(-2));
  FB_CUDA_CHECK(fastbert::cuda::attention_supports_head_dim(static_cast<int>(sh.D)), op,
                "q's head dim must be in 1..128 for the CUDA kernels, got ", sh.D);
  FB_CUDA_CHECK(std::isfinite(scale), op, "scale must be finite, got ", scale);

  AttentionParams p{};
  p.dtype = dtype;
  p.heads = static_cast<int>(sh.H);
  p.head_dim = static_cast<int>(sh.D);
  p.causal = causal;
  p.scale = static_cast<float>(scale);
  p.dropout_p = dropout_p;
  p.seed = check_dropout(op, dropout_p, seed, q);
  p.kpm = nullptr;
  p.bias = nullptr;
  p.bias_dtype = DType::kFloat32;
  p.cu_seqlens = nullptr;

  if (sh.packed) {
    const at::Tensor& cu = *cu_seqlens;
    check_cuda(op, "cu_seqlens", cu, q);
    FB_CUDA_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.numel() >= 1, op,
                  "cu_seqlens must be an int32 tensor of shape [B + 1], got ", cu.scalar_type(), " ", cu.sizes());
    check_contiguous(op, "cu_seqlens", cu);
    FB_CUDA_CHECK(!has(key_padding_mask), op,
                  "key_padding_mask must be None with cu_seqlens (packed inputs have no padding)");
    FB_CUDA_CHECK(!has(attn_bias), op, "attn_bias must be None with cu_seqlens");
    FB_CUDA_CHECK(k.size(0) == q.size(0), op, "packed k must hold q's ", q.size(0), " tokens, got ", k.size(0));
    FB_CUDA_CHECK(max_seqlen >= 0 && max_seqlen <= std::numeric_limits<int>::max(), op,
                  "max_seqlen must be in [0, 2^31), got ", max_seqlen);
    sh.B = cu.numel() - 1;
    sh.Sq = sh.Sk = max_seqlen;  // the caller guarantees max_seqlen >= every sequence's length
    sh.total = q.size(0);
    p.cu_seqlens = cu.data_ptr<int>();
    p.lse_stride_b = 0;
    p.lse_stride_h = sh.total;
  } else {
    sh.B = q.size(0);
    sh.Sq = q.size(1);
    sh.Sk = k.size(1);
    sh.total = 0;
    FB_CUDA_CHECK(k.size(0) == sh.B, op, "k must have q's batch size ", sh.B, ", got ", k.size(0));
    FB_CUDA_CHECK(!causal || sh.Sq <= sh.Sk, op,
                  "causal needs Sq <= Sk (queries are the last Sq of Sk positions), got Sq=", sh.Sq, ", Sk=", sh.Sk);
    if (has(key_padding_mask)) {
      const at::Tensor& m = *key_padding_mask;
      check_cuda(op, "key_padding_mask", m, q);
      FB_CUDA_CHECK(m.scalar_type() == at::kBool, op, "key_padding_mask must be bool, got ", m.scalar_type());
      FB_CUDA_CHECK(m.dim() == 2 && m.size(0) == sh.B && m.size(1) == sh.Sk, op, "key_padding_mask must be [B, Sk] = [",
                    sh.B, ", ", sh.Sk, "], got ", m.sizes());
      p.kpm = m.data_ptr<bool>();
      p.kpm_stride_b = m.stride(0);
      p.kpm_stride_j = m.stride(1);
    }
    if (has(attn_bias)) {
      at::Tensor b = *attn_bias;
      check_cuda(op, "attn_bias", b, q);
      // a float64 bias is read as fp32 (the scores are fp32): converted at its own, unbroadcast size
      if (b.scalar_type() == at::kDouble) b = b.to(at::kFloat);
      p.bias_dtype = kernel_dtype(op, "attn_bias", b);
      FB_CUDA_CHECK(b.dim() <= 4, op, "attn_bias must broadcast to [B, H, Sq, Sk], got shape ", b.sizes());
      const int64_t want[4] = {sh.B, sh.H, sh.Sq, sh.Sk};
      for (int64_t i = 0; i < b.dim(); ++i) {
        const int64_t s = b.size(b.dim() - 1 - i), w = want[3 - i];
        FB_CUDA_CHECK(s == w || s == 1, op, "attn_bias of shape ", b.sizes(),
                      " does not broadcast to [B, H, Sq, Sk] = [", sh.B, ", ", sh.H, ", ", sh.Sq, ", ", sh.Sk, "]");
      }
      bias_view = b.expand({sh.B, sh.H, sh.Sq, sh.Sk});  // stride 0 along broadcast dims: read in place
      p.bias = bias_view.data_ptr();
      p.bias_stride_b = bias_view.stride(0);
      p.bias_stride_h = bias_view.stride(1);
      p.bias_stride_i = bias_view.stride(2);
      p.bias_stride_j = bias_view.stride(3);
    }
    p.lse_stride_b = sh.H * sh.Sq;
    p.lse_stride_h = sh.Sq;
  }
  FB_CUDA_CHECK(sh.B <= 65535 && sh.H <= 65535, op, "batch (", sh.B, ") and heads (", sh.H, ") must be <= 65535");
  FB_CUDA_CHECK(sh.Sq <= std::numeric_limits<int>::max() && sh.Sk <= std::numeric_limits<int>::max(), op,
                "sequence lengths must be < 2^31");
  p.batch = static_cast<int>(sh.B);
  p.seqlen_q = static_cast<int>(sh.Sq);
  p.seqlen_k = static_cast<int>(sh.Sk);
  FB_CUDA_CHECK(window >= -1, op, "window must be >= 0 (or -1: none), got ", window);
  // a window as long as the sequences hides nothing (and keeps position + window within int)
  p.windowed = window >= 0 && window < std::max(sh.Sq, sh.Sk);
  p.window = p.windowed ? static_cast<int>(window) : 0;
  p.window2 = 2u * static_cast<unsigned>(p.window);
  p.q_shift = sh.packed ? 0 : static_cast<int>(sh.Sk - sh.Sq);
  return p;
}

std::vector<int64_t> lse_shape(const Shapes& sh) {
  if (sh.packed) return {sh.H, sh.total};
  return {sh.B, sh.H, sh.Sq};
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const std::optional<at::Tensor>& key_padding_mask,
                                                 const std::optional<at::Tensor>& attn_bias,
                                                 const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
                                                 bool causal, double scale, double dropout_p,
                                                 const std::optional<at::Tensor>& seed, int64_t window) {
  Shapes sh;
  at::Tensor bias_view;
  const AttentionParams p = make_params(kFwd, q, k, v, key_padding_mask, attn_bias, cu_seqlens, max_seqlen, causal,
                                        scale, dropout_p, seed, window, sh, bias_view);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = new_output(q.sizes(), q.options());
  at::Tensor lse = new_output(lse_shape(sh), q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  if (k.numel() == 0 || p.seqlen_k == 0) {  // no key anywhere: every row sees none
    out.zero_();
    lse.fill_(std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  check_launch(kFwd, fastbert::cuda::attention_fwd(p, view(q, sh.packed), view(k, sh.packed), view(v, sh.packed),
                                                   out_view(out, sh.packed), lse.data_ptr<float>(), stream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_bias, const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
    bool causal, double scale, double dropout_p, const std::optional<at::Tensor>& seed, int64_t window) {
  Shapes sh;
  at::Tensor bias_view;
  const AttentionParams p = make_params(kBwd, q, k, v, key_padding_mask, attn_bias, cu_seqlens, max_seqlen, causal,
                                        scale, dropout_p, seed, window, sh, bias_view);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"grad_out", grad_out}, {"out", out}}) {
    check_cuda(kBwd, name, t, q);
    FB_CUDA_CHECK(t.sizes() == q.sizes(), kBwd, name, " must have q's shape ", q.sizes(), ", got ", t.sizes());
    FB_CUDA_CHECK(t.scalar_type() == q.scalar_type(), kBwd, name, " must have q's dtype ", q.scalar_type(), ", got ",
                  t.scalar_type());
    FB_CUDA_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, kBwd, name,
                  " must have unit stride along the head dim, got strides ", t.strides());
  }
  check_cuda(kBwd, "lse", lse, q);
  const std::vector<int64_t> ls = lse_shape(sh);
  FB_CUDA_CHECK(lse.scalar_type() == at::kFloat && lse.sizes() == at::IntArrayRef(ls) && lse.is_contiguous(), kBwd,
                "lse must be a contiguous float32 tensor of shape ", at::IntArrayRef(ls), ", got ", lse.scalar_type(),
                " ", lse.sizes());
  const c10::cuda::CUDAGuard guard(q.device());
  if (q.numel() == 0 || k.numel() == 0 || p.seqlen_q == 0 || p.seqlen_k == 0) {
    // no query or no key: no score exists, every gradient is 0
    return {at::zeros(q.sizes(), q.options()), at::zeros(k.sizes(), k.options()), at::zeros(v.sizes(), v.options())};
  }
  at::Tensor grad_q = new_output(q.sizes(), q.options());
  at::Tensor grad_k = new_output(k.sizes(), k.options());
  at::Tensor grad_v = new_output(v.sizes(), v.options());
  // delta = rowsum(grad_out * out), lse's layout. Zero-filled: in packed mode the kernels write only
  // rows that belong to a sequence, and every row the backward reads does.
  at::Tensor delta = at::zeros(ls, q.options().dtype(at::kFloat));
  check_launch(kBwd, fastbert::cuda::attention_bwd(p, view(grad_out, sh.packed), view(q, sh.packed), view(k, sh.packed),
                                                   view(v, sh.packed), view(out, sh.packed), lse.data_ptr<float>(),
                                                   delta.data_ptr<float>(), out_view(grad_q, sh.packed),
                                                   out_view(grad_k, sh.packed), out_view(grad_v, sh.packed), stream()));
  return {grad_q, grad_k, grad_v};
}

}  // namespace
}  // namespace cuda_bindings
}  // namespace fastbert

TORCH_LIBRARY_IMPL(fastbert, CUDA, m) {
  m.impl("attention_fwd", &fastbert::cuda_bindings::attention_fwd);
  m.impl("attention_bwd", &fastbert::cuda_bindings::attention_bwd);
}
