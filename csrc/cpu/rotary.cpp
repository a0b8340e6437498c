// rotary on CPU: the rotary position embedding of q and k (transformers' rotate_half convention) and its
// backward. With x = (x1, x2) the halves of a head and c, s the halves of the table row of its position:
//   forward   y1 = x1 c1 - x2 s1,    y2 = x2 c2 + x1 s2
//   backward  dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1   (the transposed rotation)
// fp32 arithmetic, one rounding on the way out. Inputs are read in place through their strides (unit
// stride along D: views of a fused QKV projection); outputs are contiguous. Layouts: see csrc/ops.cpp.
#include <algorithm>
#include <vector>

#include "cpu/common.h"

namespace fastbert {
namespace cpu {
namespace {

constexpr const char* kRoFwd = "rotary_fwd";
constexpr const char* kRoBwd = "rotary_bwd";

// Where a token's table row is: row(b, s) = s (2-D table or [1|B, S, D]), pos[b, s], or s - cu[seq(s)]
// (packed: b = 0, s = the packed token index).
struct Table {
  int64_t stride_b = 0, stride_s = 0;
  const int64_t* pos = nullptr;
  const int32_t* cu = nullptr;
  int64_t n_seqs = 0;

  int64_t base(int64_t b, int64_t s, int64_t seq_len) const {
    if (cu != nullptr) {
      const int64_t i = std::upper_bound(cu, cu + n_seqs + 1, static_cast<int32_t>(s)) - cu - 1;
      return (s - cu[i]) * stride_s;
    }
    if (pos != nullptr) return pos[b * seq_len + s] * stride_s;
    return b * stride_b + s * stride_s;
  }
};

// Checks every argument (the message names it) and returns the table addressing. q/k: [B, S, H, D]
// (packed [total, H, D] when cu_seqlens is given), k may have another head count.
Table check_rotary(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                   const at::Tensor& sin, const c10::optional<at::Tensor>& position_ids,
                   const c10::optional<at::Tensor>& cu_seqlens) {
  const bool packed = has(cu_seqlens);
  const int64_t rank = packed ? 3 : 4;
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"q", q}, {"k", k}}) {
    check_cpu(op, name, t);
    check_kernel_dtype(op, name, t);
    check_dim(op, name, t, rank);
    FB_CHECK(t.stride(-1) == 1 || t.size(-1) <= 1, op, name, " must have unit stride along its last dim, got strides ",
             t.strides());
  }
  FB_CHECK(k.scalar_type() == q.scalar_type(), op, "k must have q's dtype ", q.scalar_type(), ", got ",
           k.scalar_type());
  const int64_t d = q.size(-1);
  FB_CHECK(d % 2 == 0, op, "q's head dim must be even, got ", d);
  FB_CHECK(k.size(-1) == d && k.sizes().slice(0, rank - 2) == q.sizes().slice(0, rank - 2), op,
           "k must have q's shape ", q.sizes(), " up to its head count, got ", k.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"cos", cos}, {"sin", sin}}) {
    check_cpu(op, name, t);
    check_contiguous(op, name, t);
    FB_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == q.scalar_type(), op, name,
             " must have dtype float32 or q's dtype ", q.scalar_type(), ", got ", t.scalar_type());
    FB_CHECK((t.dim() == 2 || t.dim() == 3) && t.size(-1) == d, op, name, " must be [R, ", d, "] or [B, S, ", d,
             "], got shape ", t.sizes());
  }
  FB_CHECK(sin.sizes() == cos.sizes() && sin.scalar_type() == cos.scalar_type(), op,
           "sin must have cos's shape and dtype ", cos.sizes(), " ", cos.scalar_type(), ", got ", sin.sizes(), " ",
           sin.scalar_type());
  Table tab;
  const int64_t rows = cos.size(0);
  if (packed) {
    const at::Tensor& cu = *cu_seqlens;
    FB_CHECK(!has(position_ids), op, "position_ids cannot be given with cu_seqlens");
    check_cpu(op, "cu_seqlens", cu);
    check_dim(op, "cu_seqlens", cu, 1);
    check_contiguous(op, "cu_seqlens", cu);
    FB_CHECK(cu.scalar_type() == at::kInt, op, "cu_seqlens must have dtype int32, got ", cu.scalar_type());
    FB_CHECK(cu.numel() >= 1, op, "cu_seqlens must hold at least one value");
    FB_CHECK(cos.dim() == 2, op, "cos must be a [max_pos, ", d, "] table with cu_seqlens, got ", cos.sizes());
    tab.cu = cu.data_ptr<int32_t>();
    tab.n_seqs = cu.numel() - 1;
    FB_CHECK(tab.cu[0] == 0 && tab.cu[tab.n_seqs] == q.size(0), op,
             "cu_seqlens must run from 0 to the number of packed tokens ", q.size(0));
    for (int64_t i = 0; i < tab.n_seqs; ++i) {
      const int64_t len = static_cast<int64_t>(tab.cu[i + 1]) - tab.cu[i];
      FB_CHECK(len >= 0, op, "cu_seqlens must be non-decreasing");
      FB_CHECK(len <= rows, op, "cos has ", rows, " rows but cu_seqlens holds a sequence of ", len, " tokens");
    }
    tab.stride_s = cos.stride(0);
  } else if (has(position_ids)) {
    const at::Tensor& p = *position_ids;
    check_cpu(op, "position_ids", p);
    check_contiguous(op, "position_ids", p);
    FB_CHECK(p.scalar_type() == at::kLong, op, "position_ids must have dtype int64, got ", p.scalar_type());
    FB_CHECK(p.dim() == 2 && p.size(0) == q.size(0) && p.size(1) == q.size(1), op, "position_ids must be [", q.size(0),
             ", ", q.size(1), "], got ", p.sizes());
    FB_CHECK(cos.dim() == 2, op, "cos must be a [max_pos, ", d, "] table with position_ids, got ", cos.sizes());
    tab.pos = p.data_ptr<int64_t>();
    for (int64_t i = 0; i < p.numel(); ++i)
      FB_CHECK(tab.pos[i] >= 0 && tab.pos[i] < rows, op, "position_ids must lie in [0, ", rows, "), got ", tab.pos[i]);
    tab.stride_s = cos.stride(0);
  } else if (cos.dim() == 2) {
    FB_CHECK(rows >= q.size(1), op, "cos has ", rows, " rows, fewer than the sequence length ", q.size(1));
    tab.stride_s = cos.stride(0);
  } else {
    FB_CHECK(cos.size(1) == q.size(1) && (cos.size(0) == 1 || cos.size(0) == q.size(0)), op, "cos must be [", q.size(0),
             " or 1, ", q.size(1), ", ", d, "], got ", cos.sizes());
    tab.stride_b = cos.size(0) == 1 ? 0 : cos.stride(0);
    tab.stride_s = cos.stride(1);
  }
  return tab;
}

template <typename T, typename CT>
void rotate(const at::Tensor& x, const CT* cos, const CT* sin, const Table& tab, bool packed, bool backward,
            at::Tensor& out) {
  const int64_t bsz = packed ? 1 : x.size(0), seq = packed ? x.size(0) : x.size(1);
  const int64_t heads = x.size(-2), d = x.size(-1), half = d / 2;
  const int64_t sb = packed ? 0 : x.stride(0), ss = x.stride(-3), sh = x.stride(-2);
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t tokens = bsz * seq;
  if (tokens == 0 || heads == 0) return;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, heads * d));
  at::parallel_for(0, tokens, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> c(d), s(d), xf(d), y(d);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / seq, i = t % seq;
      const int64_t base = tab.base(b, i, seq);
      to_f32(cos + base, c.data(), d);
      to_f32(sin + base, s.data(), d);
      for (int64_t h = 0; h < heads; ++h) {
        to_f32(xp + b * sb + i * ss + h * sh, xf.data(), d);
        const float* x1 = xf.data();
        const float* x2 = xf.data() + half;
        if (backward) {
          for (int64_t j = 0; j < half; ++j) {
            y[j] = x1[j] * c[j] + x2[j] * s[half + j];
            y[half + j] = x2[j] * c[half + j] - x1[j] * s[j];
          }
        } else {
          for (int64_t j = 0; j < half; ++j) {
            y[j] = x1[j] * c[j] - x2[j] * s[j];
            y[half + j] = x2[j] * c[half + j] + x1[j] * s[half + j];
          }
        }
        from_f32(y.data(), op + (t * heads + h) * d, d);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> run(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                       const at::Tensor& sin, const c10::optional<at::Tensor>& position_ids,
                                       const c10::optional<at::Tensor>& cu_seqlens, bool backward) {
  const Table tab = check_rotary(op, q, k, cos, sin, position_ids, cu_seqlens);
  const bool packed = has(cu_seqlens);
  at::Tensor q_out = new_output(q.sizes(), q.scalar_type());
  at::Tensor k_out = new_output(k.sizes(), k.scalar_type());
  FB_DISPATCH(q.scalar_type(), "rotary", [&] {
    if (cos.scalar_type() == at::kFloat) {
      const float* c = cos.data_ptr<float>();
      const float* s = sin.data_ptr<float>();
      rotate<scalar_t, float>(q, c, s, tab, packed, backward, q_out);
      rotate<scalar_t, float>(k, c, s, tab, packed, backward, k_out);
    } else {
      const scalar_t* c = cos.data_ptr<scalar_t>();
      const scalar_t* s = sin.data_ptr<scalar_t>();
      rotate<scalar_t, scalar_t>(q, c, s, tab, packed, backward, q_out);
      rotate<scalar_t, scalar_t>(k, c, s, tab, packed, backward, k_out);
    }
  });
  return {q_out, k_out};
}

std::tuple<at::Tensor, at::Tensor> rotary_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                              const at::Tensor& sin, const c10::optional<at::Tensor>& position_ids,
                                              const c10::optional<at::Tensor>& cu_seqlens) {
  return run(kRoFwd, q, k, cos, sin, position_ids, cu_seqlens, /*backward=*/false);
}

std::tuple<at::Tensor, at::Tensor> rotary_bwd(const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& cos,
                                              const at::Tensor& sin, const c10::optional<at::Tensor>& position_ids,
                                              const c10::optional<at::Tensor>& cu_seqlens) {
  return run(kRoBwd, grad_q, grad_k, cos, sin, position_ids, cu_seqlens, /*backward=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
  m.impl("rotary_fwd", &rotary_fwd);
  m.impl("rotary_bwd", &rotary_bwd);
}

}  // namespace cpu
}  // namespace fastbert
