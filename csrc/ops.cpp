// Every C++ op's schema, in one place. Kernels are registered per device elsewhere:
//   csrc/cpu/<op>.cpp             TORCH_LIBRARY_IMPL(fastbert, CPU, m)    (one block per file)
//   csrc/cuda_bindings/*.cpp      TORCH_LIBRARY_IMPL(fastbert, CUDA, m)   (CUDA builds only)
//   csrc/autograd.cpp             TORCH_LIBRARY_IMPL(fastbert, Autograd / CompositeExplicitAutograd, m):
//                                 the training ops add_layer_norm(_pre), bias_gelu, linear_gelu, attention, rotary (C++
//                                 graph nodes over the _fwd/_bwd kernels of whichever device the inputs are on)
// Fake (meta) kernels, and the autograd wiring of the triton backend, live on the Python side, in
// fastbert/ops/<op>.py.
//
// Conventions shared by every backend (the Triton ops registered from Python use the same ones):
// - 2-D activations are [rows, N] with unit stride along N; the Python front end flattens.
// - dropout: a counter-based Philox4x32-10 stream keyed by the int64 `seed` tensor (shape [1], on the
//   input's device); element with linear index `offset` is kept iff (philox(seed, offset) >> 1) >=
//   floor(p * 2^31). fastbert/reference.py defines it bit for bit (`philox_uint32`).
// - an output that does not apply is returned as an empty tensor of shape [0].
#include <torch/library.h>

TORCH_LIBRARY(fastbert, m) {
  // LayerNorm(dropout(x + x_bias) + residual) over the last dim; mean/rstd are fp32 [rows]. weight None: no
  // scale (as ones); bias None: no shift. bias has weight's dtype; without weight, x's dtype or float32.
  m.def(
      "add_layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, Tensor? x_bias, "
      "float eps, float dropout_p, Tensor? seed) -> (Tensor out, Tensor mean, Tensor rstd)");
  // The same, also returning the pre-norm sum h = dropout(x + x_bias) + residual in x's dtype (rounded once
  // from fp32): the `pre` of add_layer_norm(..., return_residual=True) on every backend, and what the cpu
  // backend's training forward saves at fp32 and dropout_p == 0, so that its backward reads h instead of
  // x and residual (see csrc/autograd.cpp).
  m.def(
      "add_layer_norm_fwd_pre(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, Tensor? x_bias, "
      "float eps, float dropout_p, Tensor? seed) -> (Tensor out, Tensor mean, Tensor rstd, Tensor pre)");
  // grad_pre: gradient w.r.t. the pre-norm sum (= grad of residual; = grad of x when dropout_p == 0),
  // including grad_pre_out, the gradient of add_layer_norm_fwd_pre's `pre` output when given (added in fp32).
  // grad_x: [0] when dropout_p == 0. grad_weight: [0] when weight is None. grad_bias: [0] when bias is None.
  // grad_x_bias: [0] when x_bias is None.
  m.def(
      "add_layer_norm_bwd(Tensor grad_out, Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, "
      "Tensor? x_bias, Tensor mean, Tensor rstd, float dropout_p, Tensor? seed, Tensor? grad_pre_out=None) -> "
      "(Tensor grad_pre, Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_x_bias)");

  // The differentiable ops the cpu/cuda backends run when a gradient is wanted: forward kernel, C++ graph
  // node, backward kernel (csrc/autograd.cpp). Same arguments as the _fwd kernels; return only the output
  // (add_layer_norm_pre: the output and the pre-norm sum, both differentiable).
  m.def(
      "add_layer_norm(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, Tensor? x_bias, float eps, "
      "float dropout_p, Tensor? seed) -> Tensor");
  m.def(
      "add_layer_norm_pre(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, Tensor? x_bias, float eps, "
      "float dropout_p, Tensor? seed) -> (Tensor out, Tensor pre)");
  m.def("bias_gelu(Tensor x, Tensor? bias, str approximate) -> Tensor");
  m.def("linear_gelu(Tensor x, Tensor weight, Tensor? bias, str approximate) -> Tensor");
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? attn_bias, Tensor? cu_seqlens, "
      "int max_seqlen, bool causal, float scale, float dropout_p, Tensor? seed, int window=-1) -> Tensor");
  m.def(
      "rotary(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? position_ids, Tensor? cu_seqlens) -> "
      "(Tensor q_out, Tensor k_out)");

  // gelu(x + bias); approximate is "none" (erf) or "tanh".
  m.def("bias_gelu_fwd(Tensor x, Tensor? bias, str approximate) -> Tensor");
  // Gradient w.r.t. x (and, summed over rows, w.r.t. bias).
  m.def("bias_gelu_bwd(Tensor grad_out, Tensor x, Tensor? bias, str approximate) -> Tensor");

  // gelu(x @ weight^T + bias); pre = x @ weight^T + bias when save_pre, else [0].
  m.def(
      "linear_gelu_fwd(Tensor x, Tensor weight, Tensor? bias, str approximate, bool save_pre) -> "
      "(Tensor out, Tensor pre)");
  m.def(
      "linear_gelu_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor pre, "
      "str approximate) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");

  // linear_act (CPU only): dropout(act(h)) or, gated, dropout(act(h[:, :N]) * h[:, N:]), h = x @ W^T + b
  // (weight [F, K]) or x @ W + b (weight_kn: weight [K, F]); activation "none" (erf GELU), "tanh", "relu",
  // "silu"; dropout over the [M, N] output's row-major indices. The backward recomputes h from x.
  m.def(
      "linear_act_fwd(Tensor x, Tensor weight, Tensor? bias, str activation, bool weight_kn, bool gated, "
      "float dropout_p, Tensor? seed) -> Tensor");
  m.def(
      "linear_act_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, str activation, bool weight_kn, "
      "bool gated, float dropout_p, Tensor? seed) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");

  // Rotary position embedding (rotate_half convention): q_out = q * cos + rotate_half(q) * sin, the same for k,
  // in fp32, rounded once; outputs contiguous. Padded: q [B, S, H, D], k [B, S, Hk, D] (strided, unit stride
  // along D); cos/sin contiguous, fp32 or q's dtype: [R, D] (row s, R >= S), [1 or B, S, D], or with
  // position_ids (int64 [B, S], contiguous, values in [0, R)) a [R, D] table. Packed (cu_seqlens int32
  // [n + 1]): q/k [total, H, D], table [R, D] indexed by t - cu_seqlens[seq(t)].
  m.def(
      "rotary_fwd(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? position_ids, Tensor? cu_seqlens) -> "
      "(Tensor q_out, Tensor k_out)");
  // The gradients w.r.t. q and k (the transposed rotation) of the gradients of q_out and k_out.
  m.def(
      "rotary_bwd(Tensor grad_q, Tensor grad_k, Tensor cos, Tensor sin, Tensor? position_ids, "
      "Tensor? cu_seqlens) -> (Tensor grad_q_in, Tensor grad_k_in)");

  // CPU inference GEMM on a weight packed once (csrc/cpu/gemm.cpp; AVX2 + FMA builds only): packed =
  // cpu_pack_weight(W) for an nn.Linear weight W [n, K] (packed as fp32); out = epilogue(x @ W^T + bias) with
  // epilogue "none", "gelu" (exact erf) or "gelu_tanh"; x fp32/bf16/fp16 (out in its dtype), summed in fp32.
  m.def("cpu_pack_weight(Tensor weight) -> Tensor");
  m.def("cpu_packed_linear(Tensor x, Tensor packed, int n, Tensor? bias, str epilogue) -> Tensor");

  // softmax(q k^T * scale + mask) v. Padded: q [B, Sq, H, D], k/v [B, Sk, H, D] (strided views, unit
  // stride along D), lse fp32 [B, H, Sq]. Packed (cu_seqlens int32 [B+1]): q/k/v [total, H, D],
  // lse fp32 [H, total]. key_padding_mask: bool [B, Sk], True = real token. attn_bias: float,
  // broadcast (stride-0) view of shape [B, H, Sq, Sk]. A query row with no valid key gets out = 0 and
  // lse = +inf. Dropout offset of score (b, h, i, j): ((b * H + h) * Sq + i) * Sk + j (Sq = Sk =
  // max_seqlen when packed).
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? attn_bias, "
      "Tensor? cu_seqlens, int max_seqlen, bool causal, float scale, float dropout_p, Tensor? seed, "
      "int window=-1) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? key_padding_mask, Tensor? attn_bias, Tensor? cu_seqlens, int max_seqlen, bool causal, "
      "float scale, float dropout_p, Tensor? seed, int window=-1) -> (Tensor grad_q, Tensor grad_k, "
      "Tensor grad_v)");
}
