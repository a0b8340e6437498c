// Host-side entry points of the raw CUDA kernels in csrc/cuda/*.cu. Plain C++ (no torch, no CUDA
// device code): the bindings in csrc/cuda_bindings/*.cpp include this, validate tensors with
// TORCH_CHECK, and pass raw pointers, sizes, strides (in elements) and the current stream.
//
// Every launcher returns the cudaError_t of its last launch (cudaSuccess when there was nothing to
// do), so the binding can report it with the op's name.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastbert {
namespace cuda {

// Element type of an activation tensor. Parameters of add_layer_norm are always passed as fp32 (the
// binding converts them: they are [N] vectors, the conversion costs nothing next to the rows).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ------------------------------------------------------------------------------------------------
// bias_gelu (csrc/cuda/bias_gelu.cu). x, out, grad_*: [rows, n] contiguous; bias: fp32 [n] or nullptr.
// approximate_tanh: false = exact erf GELU, true = tanh approximation.
// ------------------------------------------------------------------------------------------------
cudaError_t bias_gelu_fwd(DType dtype, const void* x, const float* bias, void* out, int64_t rows, int64_t n,
                          bool approximate_tanh, cudaStream_t stream);
// grad_in = grad_out * gelu'(x + bias)
cudaError_t bias_gelu_bwd(DType dtype, const void* grad_out, const void* x, const float* bias, void* grad_in,
                          int64_t rows, int64_t n, bool approximate_tanh, cudaStream_t stream);

// ------------------------------------------------------------------------------------------------
// add_layer_norm (csrc/cuda/add_layer_norm.cu): out = LayerNorm(dropout(x + x_bias) + residual).
// x, residual, out, pre, grad_*: [rows, n] contiguous, dtype `dtype`. weight, bias, x_bias: fp32 [n]
// (bias, x_bias, residual may be nullptr; a missing LayerNorm weight is passed as ones). mean, rstd: fp32
// [rows]. seed: device int64 [1] (read in-kernel), nullptr when dropout_p == 0. n <= 8192.
// ------------------------------------------------------------------------------------------------
constexpr int64_t kMaxLayerNormHidden = 8192;

// pre (nullptr: not wanted) receives the pre-norm sum h = dropout(x + x_bias) + residual, rounded once.
cudaError_t add_layer_norm_fwd(DType dtype, const void* x, const void* residual, const float* x_bias,
                               const float* weight, const float* bias, void* out, void* pre, float* mean, float* rstd,
                               int64_t rows, int64_t n, float eps, double dropout_p, const int64_t* seed,
                               cudaStream_t stream);

// Bytes of fp32 workspace add_layer_norm_bwd needs (column partial sums); the binding allocates it.
int64_t add_layer_norm_bwd_workspace_bytes(int64_t rows, int64_t n, int device_sm_count);

// grad_pre = d loss / d (pre-norm sum) [rows, n] dtype, including grad_pre_in (the gradient of the
// forward's pre output; nullptr: none) added in fp32; grad_x = grad_pre * keep / (1 - p) when
// dropout_p > 0 (else nullptr); grad_weight, grad_bias (nullable), grad_x_bias (nullable): fp32 [n].
cudaError_t add_layer_norm_bwd(DType dtype, const void* grad_out, const void* grad_pre_in, const void* x,
                               const void* residual, const float* x_bias, const float* weight, const float* mean,
                               const float* rstd, void* grad_pre, void* grad_x, float* grad_weight, float* grad_bias,
                               float* grad_x_bias, int64_t rows, int64_t n, double dropout_p, const int64_t* seed,
                               float* workspace, int device_sm_count, cudaStream_t stream);

// ------------------------------------------------------------------------------------------------
// attention (csrc/cuda/attention.cu): FlashAttention-2, fp16/bf16 on tensor cores (WMMA, fp32
// accumulation), fp32 with plain FMA (no TF32).
//
// Layout, per tensor: element (b, s, h, d) lives at ptr + b*stride_b + s*stride_s + h*stride_h + d
// (unit stride along d). Padded mode: s in [0, S). Packed mode (cu_seqlens != nullptr): stride_b = 0
// and s = cu_seqlens[b] + local index. lse/delta element (b, h, i): ptr + b*lse_stride_b +
// h*lse_stride_h + row, row = i (padded) or cu_seqlens[b] + i (packed).
// ------------------------------------------------------------------------------------------------
struct AttnTensor {
  const void* ptr;
  int64_t stride_b, stride_s, stride_h;
};
struct AttnOutTensor {
  void* ptr;
  int64_t stride_b, stride_s, stride_h;
};

struct AttentionParams {
  DType dtype;
  int batch, heads, head_dim;
  int seqlen_q, seqlen_k;  // padded: Sq, Sk. packed: max_seqlen (both)
  const int* cu_seqlens;   // int32 [batch + 1] on the device, or nullptr (padded)
  // key padding mask: bool [B, Sk], element (b, j) at ptr + b*stride_b + j*stride_j; nullptr = none
  const bool* kpm;
  int64_t kpm_stride_b, kpm_stride_j;
  // additive bias, element (b, h, i, j) at ptr + b*sb + h*sh + i*si + j*sj (stride 0 = broadcast)
  const void* bias;
  DType bias_dtype;
  int64_t bias_stride_b, bias_stride_h, bias_stride_i, bias_stride_j;
  bool causal;
  // queries are the last seqlen_q of seqlen_k positions: key j is visible to query i iff, with
  // rel = j - i - q_shift, rel <= 0 (causal) and |rel| <= window (when windowed; false in a
  // zero-initialized struct: no window). q_shift = seqlen_k - seqlen_q (padded), 0 (packed).
  int q_shift;
  bool windowed;
  int window;
  unsigned window2;  // 2 * window
  float scale;
  double dropout_p;
  const int64_t* seed;  // device int64 [1], nullptr when dropout_p == 0
  int64_t lse_stride_b, lse_stride_h;
};

// Head dims with compiled kernels (the binding rejects others, the Python dispatcher routes them away).
bool attention_supports_head_dim(int head_dim);

// out: q's layout; lse fp32.
cudaError_t attention_fwd(const AttentionParams& p, AttnTensor q, AttnTensor k, AttnTensor v, AttnOutTensor out,
                          float* lse, cudaStream_t stream);

// delta: fp32 workspace with lse's layout (rowsum(grad_out * out)). grad_q/k/v: layouts of q/k/v.
cudaError_t attention_bwd(const AttentionParams& p, AttnTensor grad_out, AttnTensor q, AttnTensor k, AttnTensor v,
                          AttnTensor out, const float* lse, float* delta, AttnOutTensor grad_q, AttnOutTensor grad_k,
                          AttnOutTensor grad_v, cudaStream_t stream);

// ------------------------------------------------------------------------------------------------
// rotary (csrc/cuda/rotary.cu): out = x * cos + rotate_half(x) * sin (backward: the transposed rotation).
// x element (b, s, h, d) at ptr + b*stride_b + s*stride_s + h*stride_h + d; packed: batch 1, seqlen =
// total tokens. out: contiguous [batch * seqlen, heads, head_dim], x's dtype. Table row of token (b, s):
// s - cu_seqlens[seq(s)] (cu_seqlens != nullptr), position_ids[b * seqlen + s] (!= nullptr), else
// b * table_stride_b + s (in rows of table_stride_s elements); cos/sin have unit stride along D and dtype
// table_dtype (fp32 or x's dtype). head_dim even.
// ------------------------------------------------------------------------------------------------
struct RotaryInput {
  const void* ptr;
  int64_t heads;
  int64_t stride_b, stride_s, stride_h;
};

struct RotaryParams {
  DType dtype, table_dtype;
  int64_t batch, seqlen, head_dim;
  const void* cos;
  const void* sin;
  int64_t table_stride_b, table_stride_s;
  const int64_t* position_ids;  // device int64 [batch, seqlen] or nullptr
  const int32_t* cu_seqlens;    // device int32 [n_seqs + 1] or nullptr
  int64_t n_seqs;
  bool backward;
};

cudaError_t rotary(const RotaryParams& p, const RotaryInput& x, void* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastbert
