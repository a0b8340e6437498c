// linear_act on CPU: out = dropout(act(h)) or, gated, dropout(act(h[:, :N]) * h[:, N:]), h = x W^T + b
// (weight [F, K], "nk") or h = x W + b (weight [K, F], "kn", multiplied in place: W itself or W^T as a view
// goes to the GEMM, never a transposed copy). Blocked over rows: each block of kRows rows runs one fp32
// GEMM into an [kRows, F] scratch, then one pass applies bias, activation, gate and dropout and rounds once
// into the output -- the full [M, F] product ([M, 2N] gated) never exists. 16-bit operands are converted
// to fp32 for the GEMM (one rounding, on the way out). The backward recomputes each block's h the same way
// (nothing is saved but the inputs and the seed), forms grad_h in fp32, and accumulates grad_weight and
// grad_bias in fp32 over the blocks; grad_x is rounded per block. Dropout: the Philox stream of
// fastbert.reference.dropout_keep over the output's row-major indices (row * N + j), regenerated in the
// backward. Activations (fp32, libm): exact GELU, tanh GELU, ReLU, SiLU.
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <cmath>

#include "cpu/common.h"

namespace fastbert {
namespace cpu {
namespace {

constexpr const char* kFwd = "linear_act_fwd";
constexpr const char* kBwd = "linear_act_bwd";
constexpr int64_t kRows = 256;  // rows per block: the fp32 scratch is kRows x F

enum class Act { kGeluErf, kGeluTanh, kRelu, kSilu };

Act parse_activation(const char* op, c10::string_view a) {
  if (a == "none") return Act::kGeluErf;
  if (a == "tanh") return Act::kGeluTanh;
  if (a == "relu") return Act::kRelu;
  if (a == "silu") return Act::kSilu;
  FB_CHECK(false, op, "activation must be 'none', 'tanh', 'relu' or 'silu', got '", std::string(a), "'");
  return Act::kGeluErf;
}

// act(v); *d = act'(v) when d is given
inline float act_eval(Act a, float v, float* d) {
  switch (a) {
    case Act::kGeluErf: {
      const float cdf = 0.5f * (1.f + std::erf(v * 0.70710678118654752f));
      if (d) *d = cdf + v * 0.39894228040143268f * std::exp(-0.5f * v * v);
      return v * cdf;
    }
    case Act::kGeluTanh: {
      const float c = 0.79788456080286536f, k = 0.044715f;
      const float t = std::tanh(c * (v + k * v * v * v));
      if (d) *d = 0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * c * (1.f + 3.f * k * v * v);
      return 0.5f * v * (1.f + t);
    }
    case Act::kRelu:
      if (d) *d = v > 0.f ? 1.f : 0.f;
      return v > 0.f ? v : 0.f;
    case Act::kSilu: {
      const float s = 1.f / (1.f + std::exp(-v));
      if (d) *d = s * (1.f + v * (1.f - s));
      return v * s;
    }
  }
  return v;
}

struct Shape {
  int64_t m, k, f, n;  // rows, in features, weight's out features (2N gated), out features
};

Shape check_args(const char* op, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                 bool weight_kn, bool gated) {
  check_cpu(op, "x", x);
  check_kernel_dtype(op, "x", x);
  check_dim(op, "x", x, 2);
  check_cpu(op, "weight", weight);
  check_dim(op, "weight", weight, 2);
  FB_CHECK(weight.scalar_type() == x.scalar_type(), op, "weight must have x's dtype ", x.scalar_type(), ", got ",
           weight.scalar_type());
  const int64_t k = x.size(1);
  const int64_t wk = weight_kn ? weight.size(0) : weight.size(1);
  const int64_t f = weight_kn ? weight.size(1) : weight.size(0);
  FB_CHECK(wk == k, op, "weight must have shape ", weight_kn ? "[K, F]" : "[F, K]", " with K = ", k,
           " (x's last dim), got ", weight.sizes());
  FB_CHECK(!gated || f % 2 == 0, op, "gated needs an even number of weight output features (2N), got ", f);
  if (has(bias)) check_vector(op, "bias", *bias, f, x.scalar_type());
  return {x.size(0), k, f, gated ? f / 2 : f};
}

// h (fp32 [rows, F]) = x[r0:r0+rows] @ W^T (nk) or @ W (kn), no bias
at::Tensor block_gemm(const at::Tensor& x32, const at::Tensor& w32, bool weight_kn, int64_t r0, int64_t rows) {
  const at::Tensor xb = x32.narrow(0, r0, rows);
  return at::mm(xb, weight_kn ? w32 : w32.t());
}

at::Tensor linear_act_fwd(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          c10::string_view activation, bool weight_kn, bool gated, double dropout_p,
                          const c10::optional<at::Tensor>& seed) {
  const Shape s = check_args(kFwd, x, weight, bias, weight_kn, gated);
  const Act act = parse_activation(kFwd, activation);
  const uint64_t seed_v = check_dropout(kFwd, dropout_p, seed);
  const Dropout drop(dropout_p, seed_v);
  // ATen GEMMs inside: autocast would re-cast them behind the kernel's back (see linear_gelu.cpp)
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  at::Tensor out = new_output({s.m, s.n}, x.scalar_type());
  if (s.m == 0 || s.n == 0) return out;
  const at::Tensor x32 = x.to(at::kFloat), w32 = weight.to(at::kFloat);  // no copy at fp32
  const std::vector<float> b = vector_f32(bias);
  const float* bp = b.empty() ? nullptr : b.data();
  FB_DISPATCH(x.scalar_type(), kFwd, [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    for (int64_t r0 = 0; r0 < s.m; r0 += kRows) {
      const int64_t rows = std::min(kRows, s.m - r0);
      const at::Tensor h = block_gemm(x32, w32, weight_kn, r0, rows);
      const float* hp = h.data_ptr<float>();
      at::parallel_for(0, rows, 1, [&](int64_t i0, int64_t i1) {
        std::vector<float> y(s.n), z(drop.on ? s.n : 0);
        for (int64_t i = i0; i < i1; ++i) {
          const float* hr = hp + i * s.f;
          for (int64_t j = 0; j < s.n; ++j) {
            float v = act_eval(act, hr[j] + (bp ? bp[j] : 0.f), nullptr);
            if (gated) v *= hr[s.n + j] + (bp ? bp[s.n + j] : 0.f);
            y[j] = v;
          }
          if (drop.on) {
            drop.factors(static_cast<uint64_t>((r0 + i) * s.n), s.n, z.data());
            for (int64_t j = 0; j < s.n; ++j) y[j] *= z[j];
          }
          from_f32(y.data(), op + (r0 + i) * s.n, s.n);
        }
      });
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                                                              const at::Tensor& weight,
                                                              const c10::optional<at::Tensor>& bias,
                                                              c10::string_view activation, bool weight_kn, bool gated,
                                                              double dropout_p, const c10::optional<at::Tensor>& seed) {
  const Shape s = check_args(kBwd, x, weight, bias, weight_kn, gated);
  const Act act = parse_activation(kBwd, activation);
  const uint64_t seed_v = check_dropout(kBwd, dropout_p, seed);
  const Dropout drop(dropout_p, seed_v);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_cpu(kBwd, "grad_out", grad_out);
  FB_CHECK(grad_out.dim() == 2 && grad_out.size(0) == s.m && grad_out.size(1) == s.n, kBwd,
           "grad_out must have shape [", s.m, ", ", s.n, "], got ", grad_out.sizes());
  FB_CHECK(grad_out.scalar_type() == x.scalar_type(), kBwd, "grad_out must have x's dtype ", x.scalar_type(), ", got ",
           grad_out.scalar_type());
  at::Tensor grad_x = new_output({s.m, s.k}, x.scalar_type());
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor gw32 = at::zeros(weight.sizes(), f32);
  at::Tensor gb32 = at::zeros({s.f}, f32);
  if (s.m > 0 && s.f > 0) {
    const at::Tensor x32 = x.to(at::kFloat), w32 = weight.to(at::kFloat);
    const at::Tensor g32 = grad_out.to(at::kFloat).contiguous();
    const std::vector<float> b = vector_f32(bias);
    const float* bp = b.empty() ? nullptr : b.data();
    const float* gp = g32.data_ptr<float>();
    for (int64_t r0 = 0; r0 < s.m; r0 += kRows) {
      const int64_t rows = std::min(kRows, s.m - r0);
      at::Tensor h = block_gemm(x32, w32, weight_kn, r0, rows);  // overwritten in place by grad_h
      float* hp = h.data_ptr<float>();
      at::parallel_for(0, rows, 1, [&](int64_t i0, int64_t i1) {
        std::vector<float> z(drop.on ? s.n : 0);
        for (int64_t i = i0; i < i1; ++i) {
          float* hr = hp + i * s.f;
          const float* gr = gp + (r0 + i) * s.n;
          if (drop.on) drop.factors(static_cast<uint64_t>((r0 + i) * s.n), s.n, z.data());
          for (int64_t j = 0; j < s.n; ++j) {
            const float g = drop.on ? gr[j] * z[j] : gr[j];
            float d;
            const float a = act_eval(act, hr[j] + (bp ? bp[j] : 0.f), &d);
            if (gated) {
              const float lin = hr[s.n + j] + (bp ? bp[s.n + j] : 0.f);
              hr[j] = g * lin * d;
              hr[s.n + j] = g * a;
            } else {
              hr[j] = g * d;
            }
          }
        }
      });
      const at::Tensor xb = x32.narrow(0, r0, rows);
      grad_x.narrow(0, r0, rows).copy_(at::mm(h, weight_kn ? w32.t() : w32));
      if (weight_kn)
        gw32.addmm_(xb.t(), h);
      else
        gw32.addmm_(h.t(), xb);
      if (has(bias)) gb32.add_(h.sum(0));
    }
  } else if (grad_x.numel() > 0) {
    grad_x.zero_();
  }
  at::Tensor grad_b = has(bias) ? gb32.to(bias->scalar_type()) : no_output(x.scalar_type());
  return {grad_x, gw32.to(weight.scalar_type()), grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
  m.impl("linear_act_fwd", &linear_act_fwd);
  m.impl("linear_act_bwd", &linear_act_bwd);
}

}  // namespace cpu
}  // namespace fastbert
