// Autograd for the C++ backends (cpu and cuda): the ops fastbert::add_layer_norm(_pre), bias_gelu, linear_gelu,
// attention and rotary, each a torch::autograd::Function over the op's forward and backward kernels
// (fastbert::<op>_fwd / _bwd, reached through the dispatcher, so one registration serves CPU and CUDA).
//
// Why in C++: the Python autograd.Function of fastbert/ops/*.py (apply, ctx, saved tensors, the Python
// backward) costs a tenth or more of an add_layer_norm forward + backward (docs/perf-notes.md). Here the
// graph node is a C++ node, as for PyTorch's own ops; torch.compile traces these ops too (opcheck's
// aot_dispatch test and the patched-model aot_eager test). The Python Functions stay for triton.
//
// Registered for the Autograd key (builds the graph) and for CompositeExplicitAutograd (the forward
// alone, e.g. below autograd or under fake tensors). Gradients are those of the Python path: the same
// backward kernels on the same saved tensors.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <string>
#include <tuple>

namespace fastbert {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;

at::Tensor or_undefined(const OptTensor& t) { return t.has_value() ? *t : at::Tensor(); }
OptTensor or_none(const at::Tensor& t) { return t.defined() ? OptTensor(t) : c10::nullopt; }

template <typename Sig>
c10::TypedOperatorHandle<Sig> kernel_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// accessor(): the typed handle of kernel `name`, looked up once
#define FB_KERNEL_OP(accessor, Sig, name)           \
  const c10::TypedOperatorHandle<Sig>& accessor() { \
    static const auto op = kernel_op<Sig>(name);    \
    return op;                                      \
  }

// ---------------------------------------------------------------------------------------------
// add_layer_norm
// ---------------------------------------------------------------------------------------------
using AlnFwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const OptTensor&, const OptTensor&,
                                                                 const OptTensor&, const OptTensor&, double, double,
                                                                 const OptTensor&);
using AlnBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    const at::Tensor&, const at::Tensor&, double, const OptTensor&, const OptTensor&);

using AlnFwdPreSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const OptTensor&,
                                                                                const OptTensor&, const OptTensor&,
                                                                                const OptTensor&, double, double,
                                                                                const OptTensor&);

FB_KERNEL_OP(aln_fwd, AlnFwdSig, "fastbert::add_layer_norm_fwd")
FB_KERNEL_OP(aln_fwd_pre, AlnFwdPreSig, "fastbert::add_layer_norm_fwd_pre")
FB_KERNEL_OP(aln_bwd, AlnBwdSig, "fastbert::add_layer_norm_bwd")

// Whether the forward saves the pre-norm sum h for the backward: CPU, fp32, no dropout. The backward
// then reads grad_out and h where recomputing h reads grad_out, x and residual -- the traffic of
// F.layer_norm's own backward -- and the forward writes h once more. Gradients are bit-identical either
// way (the saved fp32 h is the h the backward would recompute). Not for fp16/bf16 (h rounded to 16 bits
// would cost gradient accuracy), nor with dropout (the backward needs x's dropout mask anyway), nor on
// CUDA (never measured there; its backward recomputes h from x and residual).
bool saves_pre(const at::Tensor& x, double dropout_p) {
  return dropout_p == 0.0 && x.scalar_type() == at::kFloat && x.device().is_cpu();
}

// The forward of both differentiable ops: out (and, when want_pre or saves_pre, the pre-norm sum h), with
// what the backward needs saved in ctx. Returns {out, pre} (pre undefined when not computed).
std::pair<at::Tensor, at::Tensor> aln_forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& weight,
                                              const OptTensor& bias, const OptTensor& residual, const OptTensor& x_bias,
                                              double eps, double dropout_p, const OptTensor& seed, bool want_pre) {
  at::AutoDispatchBelowADInplaceOrView below;
  at::Tensor out, mean, rstd, pre;
  const bool save_h = saves_pre(x, dropout_p);
  if (save_h || want_pre) {
    std::tie(out, mean, rstd, pre) = aln_fwd_pre().call(x, weight, bias, residual, x_bias, eps, dropout_p, seed);
  } else {
    std::tie(out, mean, rstd) = aln_fwd().call(x, weight, bias, residual, x_bias, eps, dropout_p, seed);
  }
  if (save_h) {
    // the backward sees h as its x, with no residual; a zero x_bias keeps x_bias's gradient (the column
    // sum of grad_pre) in the same pass
    const at::Tensor zero_xb = x_bias.has_value() ? at::zeros_like(*x_bias) : at::Tensor();
    ctx->save_for_backward(
        {pre, or_undefined(weight), or_undefined(bias), at::Tensor(), zero_xb, mean, rstd, at::Tensor()});
  } else {
    ctx->save_for_backward({x, or_undefined(weight), or_undefined(bias), or_undefined(residual), or_undefined(x_bias),
                            mean, rstd, or_undefined(seed)});
  }
  ctx->saved_data["dropout_p"] = dropout_p;
  ctx->saved_data["has_residual"] = residual.has_value() && residual->defined();
  return {out, pre};
}

// grad_out: the gradient of out (undefined: out was not used); grad_pre_out: of pre (undefined: none)
variable_list aln_backward(AutogradContext* ctx, at::Tensor grad_out, const at::Tensor& grad_pre_out) {
  const variable_list s = ctx->get_saved_variables();
  const double p = ctx->saved_data["dropout_p"].toDouble();
  const bool has_residual = ctx->saved_data["has_residual"].toBool();
  if (!grad_out.defined()) grad_out = at::zeros_like(s[0]);
  const OptTensor g_in = grad_pre_out.defined() ? OptTensor(grad_pre_out.contiguous()) : c10::nullopt;
  auto [g_pre, g_x, g_w, g_b, g_xb] = aln_bwd().call(grad_out.contiguous(), s[0], or_none(s[1]), or_none(s[2]),
                                                     or_none(s[3]), or_none(s[4]), s[5], s[6], p, or_none(s[7]), g_in);
  if (p == 0.0) g_x = g_pre;  // no dropout: d/dx = d/d(pre-norm sum)
  const at::Tensor none;
  return {g_x,
          s[1].defined() ? g_w : none,
          s[2].defined() ? g_b : none,
          has_residual ? g_pre : none,
          s[4].defined() ? g_xb : none,
          none,
          none,
          none};
}

struct AddLayerNormFn : public torch::autograd::Function<AddLayerNormFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                            const OptTensor& residual, const OptTensor& x_bias, double eps, double dropout_p,
                            const OptTensor& seed) {
    return aln_forward(ctx, x, weight, bias, residual, x_bias, eps, dropout_p, seed, /*want_pre=*/false).first;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return aln_backward(ctx, grads[0], at::Tensor());
  }
};

// add_layer_norm_pre: (out, pre), both differentiable; pre's gradient joins the backward kernel's gradient of
// the pre-norm sum (add_layer_norm_bwd's grad_pre_out). An unused output's gradient stays undefined.
struct AddLayerNormPreFn : public torch::autograd::Function<AddLayerNormPreFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& residual, const OptTensor& x_bias, double eps,
                               double dropout_p, const OptTensor& seed) {
    ctx->set_materialize_grads(false);
    auto [out, pre] = aln_forward(ctx, x, weight, bias, residual, x_bias, eps, dropout_p, seed, /*want_pre=*/true);
    return {out, pre};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return aln_backward(ctx, grads[0], grads[1]);
  }
};

at::Tensor add_layer_norm_autograd(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                   const OptTensor& residual, const OptTensor& x_bias, double eps, double dropout_p,
                                   const OptTensor& seed) {
  return AddLayerNormFn::apply(x, weight, bias, residual, x_bias, eps, dropout_p, seed);
}

at::Tensor add_layer_norm_forward_only(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                       const OptTensor& residual, const OptTensor& x_bias, double eps, double dropout_p,
                                       const OptTensor& seed) {
  return std::get<0>(aln_fwd().call(x, weight, bias, residual, x_bias, eps, dropout_p, seed));
}

std::tuple<at::Tensor, at::Tensor> add_layer_norm_pre_autograd(const at::Tensor& x, const OptTensor& weight,
                                                               const OptTensor& bias, const OptTensor& residual,
                                                               const OptTensor& x_bias, double eps, double dropout_p,
                                                               const OptTensor& seed) {
  const variable_list r = AddLayerNormPreFn::apply(x, weight, bias, residual, x_bias, eps, dropout_p, seed);
  return {r[0], r[1]};
}

std::tuple<at::Tensor, at::Tensor> add_layer_norm_pre_forward_only(const at::Tensor& x, const OptTensor& weight,
                                                                   const OptTensor& bias, const OptTensor& residual,
                                                                   const OptTensor& x_bias, double eps,
                                                                   double dropout_p, const OptTensor& seed) {
  auto [out, mean, rstd, pre] = aln_fwd_pre().call(x, weight, bias, residual, x_bias, eps, dropout_p, seed);
  return {out, pre};
}

// ---------------------------------------------------------------------------------------------
// bias_gelu
// ---------------------------------------------------------------------------------------------
using BgFwdSig = at::Tensor(const at::Tensor&, const OptTensor&, c10::string_view);
using BgBwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, c10::string_view);

FB_KERNEL_OP(bg_fwd, BgFwdSig, "fastbert::bias_gelu_fwd")
FB_KERNEL_OP(bg_bwd, BgBwdSig, "fastbert::bias_gelu_bwd")

struct BiasGeluFn : public torch::autograd::Function<BiasGeluFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& bias,
                            c10::string_view approximate) {
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor out = bg_fwd().call(x, bias, approximate);
    ctx->save_for_backward({x, or_undefined(bias)});
    ctx->saved_data["approximate"] = std::string(approximate);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const std::string approximate = ctx->saved_data["approximate"].toStringRef();
    at::Tensor g_x = bg_bwd().call(grads[0].contiguous(), s[0], or_none(s[1]), approximate);
    const at::Tensor none;
    at::Tensor g_b = s[1].defined() && ctx->needs_input_grad(1) ? g_x.sum(0) : none;
    return {g_x, g_b, none};
  }
};

at::Tensor bias_gelu_autograd(const at::Tensor& x, const OptTensor& bias, c10::string_view approximate) {
  return BiasGeluFn::apply(x, bias, approximate);
}

at::Tensor bias_gelu_forward_only(const at::Tensor& x, const OptTensor& bias, c10::string_view approximate) {
  return bg_fwd().call(x, bias, approximate);
}

// ---------------------------------------------------------------------------------------------
// linear_gelu
// ---------------------------------------------------------------------------------------------
using LgFwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                                    c10::string_view, bool);
using LgBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                                const OptTensor&, const at::Tensor&, c10::string_view);

FB_KERNEL_OP(lg_fwd, LgFwdSig, "fastbert::linear_gelu_fwd")
FB_KERNEL_OP(lg_bwd, LgBwdSig, "fastbert::linear_gelu_bwd")

struct LinearGeluFn : public torch::autograd::Function<LinearGeluFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                            c10::string_view approximate) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, pre] = lg_fwd().call(x, weight, bias, approximate, /*save_pre=*/true);
    ctx->save_for_backward({x, weight, or_undefined(bias), pre});
    ctx->saved_data["approximate"] = std::string(approximate);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const std::string approximate = ctx->saved_data["approximate"].toStringRef();
    auto [g_x, g_w, g_b] = lg_bwd().call(grads[0].contiguous(), s[0], s[1], or_none(s[2]), s[3], approximate);
    const at::Tensor none;
    return {g_x, g_w, s[2].defined() ? g_b : none, none};
  }
};

at::Tensor linear_gelu_autograd(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                                c10::string_view approximate) {
  return LinearGeluFn::apply(x, weight, bias, approximate);
}

at::Tensor linear_gelu_forward_only(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                                    c10::string_view approximate) {
  return std::get<0>(lg_fwd().call(x, weight, bias, approximate, /*save_pre=*/false));
}

// ---------------------------------------------------------------------------------------------
// attention (q, k, v get gradients; the front end sends an attn_bias that wants one to the torch backend)
// ---------------------------------------------------------------------------------------------
using AttnFwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      const OptTensor&, const OptTensor&, const OptTensor&, int64_t,
                                                      bool, double, double, const OptTensor&, int64_t);
using AttnBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const OptTensor&, const OptTensor&, const OptTensor&, int64_t, bool, double, double, const OptTensor&, int64_t);

FB_KERNEL_OP(attn_fwd, AttnFwdSig, "fastbert::attention_fwd")
FB_KERNEL_OP(attn_bwd, AttnBwdSig, "fastbert::attention_bwd")

struct AttentionFn : public torch::autograd::Function<AttentionFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const OptTensor& key_padding_mask, const OptTensor& attn_bias, const OptTensor& cu_seqlens,
                            int64_t max_seqlen, bool causal, double scale, double dropout_p, const OptTensor& seed,
                            int64_t window) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, lse] = attn_fwd().call(q, k, v, key_padding_mask, attn_bias, cu_seqlens, max_seqlen, causal, scale,
                                      dropout_p, seed, window);
    ctx->save_for_backward({q, k, v, out, lse, or_undefined(key_padding_mask), or_undefined(attn_bias),
                            or_undefined(cu_seqlens), or_undefined(seed)});
    ctx->saved_data["max_seqlen"] = max_seqlen;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["window"] = window;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    auto [dq, dk, dv] = attn_bwd().call(
        grads[0].contiguous(), s[0], s[1], s[2], s[3], s[4], or_none(s[5]), or_none(s[6]), or_none(s[7]),
        ctx->saved_data["max_seqlen"].toInt(), ctx->saved_data["causal"].toBool(), ctx->saved_data["scale"].toDouble(),
        ctx->saved_data["dropout_p"].toDouble(), or_none(s[8]), ctx->saved_data["window"].toInt());
    const at::Tensor none;
    return {dq, dk, dv, none, none, none, none, none, none, none, none, none};
  }
};

at::Tensor attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const OptTensor& key_padding_mask, const OptTensor& attn_bias,
                              const OptTensor& cu_seqlens, int64_t max_seqlen, bool causal, double scale,
                              double dropout_p, const OptTensor& seed, int64_t window) {
  return AttentionFn::apply(q, k, v, key_padding_mask, attn_bias, cu_seqlens, max_seqlen, causal, scale, dropout_p,
                            seed, window);
}

at::Tensor attention_forward_only(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const OptTensor& key_padding_mask, const OptTensor& attn_bias,
                                  const OptTensor& cu_seqlens, int64_t max_seqlen, bool causal, double scale,
                                  double dropout_p, const OptTensor& seed, int64_t window) {
  return std::get<0>(attn_fwd().call(q, k, v, key_padding_mask, attn_bias, cu_seqlens, max_seqlen, causal, scale,
                                     dropout_p, seed, window));
}

// ---------------------------------------------------------------------------------------------
// rotary (q and k get gradients; cos/sin are constants, position_ids/cu_seqlens integers)
// ---------------------------------------------------------------------------------------------
using RoSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, const OptTensor&, const OptTensor&);

FB_KERNEL_OP(ro_fwd, RoSig, "fastbert::rotary_fwd")
FB_KERNEL_OP(ro_bwd, RoSig, "fastbert::rotary_bwd")

struct RotaryFn : public torch::autograd::Function<RotaryFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                               const at::Tensor& sin, const OptTensor& position_ids, const OptTensor& cu_seqlens) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [q_out, k_out] = ro_fwd().call(q, k, cos, sin, position_ids, cu_seqlens);
    ctx->save_for_backward({cos, sin, or_undefined(position_ids), or_undefined(cu_seqlens)});
    return {q_out, k_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    auto [dq, dk] =
        ro_bwd().call(grads[0].contiguous(), grads[1].contiguous(), s[0], s[1], or_none(s[2]), or_none(s[3]));
    const at::Tensor none;
    return {dq, dk, none, none, none, none};
  }
};

std::tuple<at::Tensor, at::Tensor> rotary_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                   const at::Tensor& sin, const OptTensor& position_ids,
                                                   const OptTensor& cu_seqlens) {
  variable_list out = RotaryFn::apply(q, k, cos, sin, position_ids, cu_seqlens);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> rotary_forward_only(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                       const at::Tensor& sin, const OptTensor& position_ids,
                                                       const OptTensor& cu_seqlens) {
  return ro_fwd().call(q, k, cos, sin, position_ids, cu_seqlens);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbert, Autograd, m) {
  m.impl("attention", &attention_autograd);
  m.impl("add_layer_norm", &add_layer_norm_autograd);
  m.impl("add_layer_norm_pre", &add_layer_norm_pre_autograd);
  m.impl("bias_gelu", &bias_gelu_autograd);
  m.impl("linear_gelu", &linear_gelu_autograd);
  m.impl("rotary", &rotary_autograd);
}

TORCH_LIBRARY_IMPL(fastbert, CompositeExplicitAutograd, m) {
  m.impl("attention", &attention_forward_only);
  m.impl("add_layer_norm", &add_layer_norm_forward_only);
  m.impl("add_layer_norm_pre", &add_layer_norm_pre_forward_only);
  m.impl("bias_gelu", &bias_gelu_forward_only);
  m.impl("linear_gelu", &linear_gelu_forward_only);
  m.impl("rotary", &rotary_forward_only);
}

}  // namespace fastbert
