// add_layer_norm on CPU: LayerNorm(dropout(x + x_bias) + residual) over rows of [rows, N].
//
// Forward, one read of the inputs per row: the pre-norm sum h is built in an fp32 scratch row (it
// stays in L1), then mean and variance are taken from it (two sweeps over the cached row, so the
// variance is sum((h - mean)^2), not the cancellation-prone E[h^2] - mean^2), then the output.
//
// Backward. With xhat = (h - mean) * rstd, y = xhat * w + b and g = dL/dy:
//   dL/dxhat = g * w =: wg
//   dL/dh    = rstd * (wg - mean(wg) - xhat * mean(wg * xhat))        (the LayerNorm Jacobian)
// dL/dh is grad_pre (= grad of residual). Dropout h = z * (x + x_bias) with z in {0, 1/(1-p)}
// regenerated from the same Philox counters, so grad_x = z * grad_pre; grad_x_bias sums grad_x over
// rows; grad_weight = sum over rows of g * xhat, grad_bias = sum of g.
//
// Pre-norm models (return_residual=True) also take h itself from add_layer_norm_fwd_pre, and give its
// incoming gradient grad_pre_out to the backward, which adds it to dL/dh in fp32 before anything is
// rounded or masked. A missing weight (LayerNorm without a scale) is a row of ones: w * 1 = w exactly.
#include <type_traits>
#include <utility>

#include "cpu/common.h"

namespace fastbert {
namespace cpu {
namespace {

constexpr const char* kFwd = "add_layer_norm_fwd";
constexpr const char* kFwdPre = "add_layer_norm_fwd_pre";
constexpr const char* kBwd = "add_layer_norm_bwd";

struct RowInputs {
  int64_t n;
  const float* xb;  // x_bias as fp32 or nullptr
  Dropout drop;
};

// One row's inputs as fp32 pointers: x and residual point into the tensors (fp32) or into scratch rows
// converted from 16-bit storage; z holds the row's dropout factors or is nullptr.
struct Row {
  const float* x;
  const float* res;  // nullptr: no residual
  const float* xb;   // nullptr: no x_bias
  const float* z;    // nullptr: no dropout
};

// h = dropout(x + x_bias) + residual, lanes j..j+c
inline Vec pre_norm(const Row& r, int64_t j, int64_t c) {
  Vec a = Vec::loadu(r.x + j, c);
  if (r.xb != nullptr) a = a + Vec::loadu(r.xb + j, c);
  if (r.z != nullptr) a = a * Vec::loadu(r.z + j, c);
  if (r.res != nullptr) a = a + Vec::loadu(r.res + j, c);
  return a;
}

// Forward of one row: h into scratch (it stays in L1), mean and variance from it (the variance as
// sum((h - mean)^2), not the cancellation-prone E[h^2] - mean^2), then y. Returns {mean, rstd}.
inline std::pair<float, float> fwd_row(const Row& r, int64_t n, const float* __restrict w, const float* __restrict b,
                                       float eps, float* __restrict h, float* __restrict y) {
  const float mean = static_cast<float>(blocked_vsum(n,
                                                     [&](int64_t j, int64_t c) {
                                                       const Vec a = pre_norm(r, j, c);
                                                       a.store(h + j, c);
                                                       return a;  // zero past c
                                                     }) /
                                        n);
  const Vec vm(mean), zero(0.f);
  const double var_sum = blocked_vsum(n, [&](int64_t j, int64_t c) {
    const Vec d = Vec::loadu(h + j) - vm;  // h has room for whole vectors (see scratch_len)
    return Vec::set(zero, d * d, c);
  });
  const float rstd = 1.f / std::sqrt(static_cast<float>(var_sum / n) + eps);
  const Vec vr(rstd);
  for_vecs(n, [&](int64_t j, int64_t c) {
    Vec o = (Vec::loadu(h + j) - vm) * vr * Vec::loadu(w + j, c);
    if (b != nullptr) o = o + Vec::loadu(b + j, c);
    o.store(y + j, c);
  });
  return {mean, rstd};
}

// Row i's inputs: fp32 rows are read in place, 16-bit ones converted into xbuf/rbuf; z receives the
// row's dropout factors when dropout is on.
template <typename T>
inline Row load_row(const RowInputs& in, const T* x, const T* res, int64_t i, float* xbuf, float* rbuf, float* z) {
  const int64_t n = in.n;
  Row row{nullptr, nullptr, in.xb, in.drop.on ? z : nullptr};
  if constexpr (std::is_same<T, float>::value) {
    row.x = x + i * n;
    if (res != nullptr) row.res = res + i * n;
  } else {
    to_f32(x + i * n, xbuf, n);
    row.x = xbuf;
    if (res != nullptr) {
      to_f32(res + i * n, rbuf, n);
      row.res = rbuf;
    }
  }
  if (in.drop.on) in.drop.factors(static_cast<uint64_t>(i) * n, n, z);
  return row;
}

// fp32 scratch rows are padded to whole vectors, so passes over scratch may load whole vectors
inline int64_t scratch_len(int64_t n) { return (n + kVec - 1) / kVec * kVec; }

// pre_out (nullptr: not wanted) receives each row's pre-norm sum h, rounded to T
template <typename T>
void fwd_kernel(const RowInputs& in, int64_t rows, const T* x, const T* res, const float* w, const float* b, double eps,
                T* out, float* mean_out, float* rstd_out, T* pre_out) {
  const int64_t n = in.n;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    constexpr bool kF32 = std::is_same<T, float>::value;
    const int64_t len = scratch_len(n);
    std::vector<float> h(len, 0.f), z(in.drop.on ? n : 0), y(kF32 ? 0 : n), xbuf(kF32 ? 0 : n), rbuf(kF32 ? 0 : n);
    for (int64_t i = r0; i < r1; ++i) {
      const Row row = load_row(in, x, res, i, xbuf.data(), rbuf.data(), z.data());
      float* yr;
      if constexpr (kF32) {
        yr = out + i * n;  // fp32 output is written directly
      } else {
        yr = y.data();
      }
      const auto stats = fwd_row(row, n, w, b, static_cast<float>(eps), h.data(), yr);
      if constexpr (!kF32) from_f32(y.data(), out + i * n, n);
      if (pre_out != nullptr) from_f32(h.data(), pre_out + i * n, n);  // h is still in L1
      mean_out[i] = stats.first;
      rstd_out[i] = stats.second;
    }
  });
}

// Backward of one row. Pass 1 rebuilds h, forms xhat and wg (kept in scratch), the two row means and
// the weight/bias column partials; pass 2 writes dL/dh (plus gin, h's own incoming gradient, when kGin)
// and its dropout-masked copy. kGin is a template flag so that the usual backward has no extra test.
template <bool kGin>
inline void bwd_row(const Row& r, const float* __restrict g, const float* __restrict gin, int64_t n,
                    const float* __restrict w, float mu, float rs, float* __restrict xh, float* __restrict wgs,
                    float* __restrict gpre, float* __restrict gx, float* __restrict pw, float* __restrict pb,
                    float* __restrict pxb) {
  const Vec vmu(mu), vrs(rs);
  double sums[2];
  blocked_vsums<2>(n, sums, [&](int64_t j, int64_t c, Vec* acc) {
    const Vec xhat = (pre_norm(r, j, c) - vmu) * vrs;
    const Vec gv = Vec::loadu(g + j, c);  // zero past c, so wg and the partials get nothing there
    const Vec wg = gv * Vec::loadu(w + j, c);
    xhat.store(xh + j);  // scratch: whole vectors
    wg.store(wgs + j);
    acc[0] = acc[0] + wg;
    acc[1] = at::vec::fmadd(wg, xhat, acc[1]);
    at::vec::fmadd(gv, xhat, Vec::loadu(pw + j, c)).store(pw + j, c);
    (Vec::loadu(pb + j, c) + gv).store(pb + j, c);
  });
  const Vec c1(static_cast<float>(sums[0] / n)), c2(static_cast<float>(sums[1] / n));
  for_vecs(n, [&](int64_t j, int64_t c) {
    Vec d = vrs * (Vec::loadu(wgs + j) - c1 - Vec::loadu(xh + j) * c2);
    if constexpr (kGin) d = d + Vec::loadu(gin + j, c);
    d.store(gpre + j, c);
    if (r.z != nullptr) {
      d = d * Vec::loadu(r.z + j, c);
      d.store(gx + j, c);
    }
    if (pxb != nullptr) (Vec::loadu(pxb + j, c) + d).store(pxb + j, c);
  });
}

// gin (nullptr: none): the incoming gradient of the pre-norm sum h, added to grad_pre
template <typename T, bool kGin>
void bwd_kernel(const RowInputs& in, int64_t rows, const T* g, const T* gin, const T* x, const T* res, const float* w,
                const float* mean, const float* rstd, T* grad_pre, T* grad_x, float* part_w, float* part_b,
                float* part_xb, int64_t block) {
  const int64_t n = in.n;
  const int64_t nblk = (rows + block - 1) / block;
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    constexpr bool kF32 = std::is_same<T, float>::value;
    const int64_t len = scratch_len(n);
    std::vector<float> xh(len), wgs(len), z(in.drop.on ? n : 0);
    std::vector<float> xbuf(kF32 ? 0 : n), rbuf(kF32 ? 0 : n), gbuf(kF32 ? 0 : n), pre(kF32 ? 0 : n),
        gxb(kF32 || !in.drop.on ? 0 : n), ginbuf(kF32 || !kGin ? 0 : n);
    for (int64_t blk = b0; blk < b1; ++blk) {
      float* pw = part_w + blk * n;
      float* pb = part_b + blk * n;
      float* pxb = part_xb != nullptr ? part_xb + blk * n : nullptr;
      std::fill(pw, pw + n, 0.f);
      std::fill(pb, pb + n, 0.f);
      if (pxb != nullptr) std::fill(pxb, pxb + n, 0.f);
      const int64_t rend = std::min(rows, (blk + 1) * block);
      for (int64_t i = blk * block; i < rend; ++i) {
        const Row row = load_row(in, x, res, i, xbuf.data(), rbuf.data(), z.data());
        const float *gr, *gir = nullptr;
        float *gp, *gxr = nullptr;
        if constexpr (kF32) {
          gr = g + i * n;
          if constexpr (kGin) gir = gin + i * n;
          gp = grad_pre + i * n;
          if (in.drop.on) gxr = grad_x + i * n;
        } else {
          to_f32(g + i * n, gbuf.data(), n);
          gr = gbuf.data();
          if constexpr (kGin) {
            to_f32(gin + i * n, ginbuf.data(), n);
            gir = ginbuf.data();
          }
          gp = pre.data();
          if (in.drop.on) gxr = gxb.data();
        }
        bwd_row<kGin>(row, gr, gir, n, w, mean[i], rstd[i], xh.data(), wgs.data(), gp, gxr, pw, pb, pxb);
        if constexpr (!kF32) {
          from_f32(pre.data(), grad_pre + i * n, n);
          if (in.drop.on) from_f32(gxb.data(), grad_x + i * n, n);
        }
      }
    }
  });
}

void check_common(const char* op, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                  const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
                  const c10::optional<at::Tensor>& x_bias) {
  check_cpu(op, "x", x);
  check_dim(op, "x", x, 2);
  check_kernel_dtype(op, "x", x);
  check_contiguous(op, "x", x);
  const int64_t n = x.size(1);
  if (has(weight)) check_vector(op, "weight", *weight, n, x.scalar_type());
  if (has(bias)) {
    check_vector(op, "bias", *bias, n, x.scalar_type());
    FB_CHECK(!has(weight) || bias->scalar_type() == weight->scalar_type(), op, "bias must have weight's dtype ",
             weight->scalar_type(), ", got ", bias->scalar_type());
  }
  if (has(x_bias)) check_vector(op, "x_bias", *x_bias, n, x.scalar_type());
  if (has(residual)) {
    check_cpu(op, "residual", *residual);
    FB_CHECK(residual->sizes() == x.sizes(), op, "residual must have x's shape ", x.sizes(), ", got ",
             residual->sizes());
    FB_CHECK(residual->scalar_type() == x.scalar_type(), op, "residual must have x's dtype ", x.scalar_type(), ", got ",
             residual->scalar_type());
    check_contiguous(op, "residual", *residual);
  }
}

// weight as fp32, ones when there is none
std::vector<float> weight_f32(const c10::optional<at::Tensor>& weight, int64_t n) {
  return has(weight) ? vector_f32(weight) : std::vector<float>(n, 1.f);
}

// dtype of the parameter gradients: weight's, else bias's, else x's
at::ScalarType param_dtype(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                           const c10::optional<at::Tensor>& bias) {
  return has(weight) ? weight->scalar_type() : has(bias) ? bias->scalar_type() : x.scalar_type();
}

// The forward, with the pre-norm sum h written to `pre` when it is defined.
void fwd_into(const char* op, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
              const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
              const c10::optional<at::Tensor>& x_bias, double eps, double dropout_p,
              const c10::optional<at::Tensor>& seed, at::Tensor& out, at::Tensor& mean, at::Tensor& rstd,
              at::Tensor* pre) {
  check_common(op, x, weight, bias, residual, x_bias);
  FB_CHECK(eps > 0.0, op, "eps must be > 0, got ", eps);
  const uint64_t s = check_dropout(op, dropout_p, seed);
  const int64_t rows = x.size(0), n = x.size(1);
  out = new_output(x.sizes(), x.scalar_type());
  mean = new_output({rows}, at::kFloat);
  rstd = new_output({rows}, at::kFloat);
  if (pre != nullptr) *pre = new_output(x.sizes(), x.scalar_type());
  if (rows == 0) return;
  FB_CHECK(n > 0, op, "x must have a non-empty last dim, got shape ", x.sizes());
  const std::vector<float> w = weight_f32(weight, n), b = vector_f32(bias), xb = vector_f32(x_bias);
  RowInputs in{n, xb.empty() ? nullptr : xb.data(), Dropout(dropout_p, s)};
  FB_DISPATCH(x.scalar_type(), kFwd, [&] {
    fwd_kernel<scalar_t>(in, rows, x.data_ptr<scalar_t>(), has(residual) ? residual->data_ptr<scalar_t>() : nullptr,
                         w.data(), b.empty() ? nullptr : b.data(), eps, out.data_ptr<scalar_t>(),
                         mean.data_ptr<float>(), rstd.data_ptr<float>(),
                         pre != nullptr ? pre->data_ptr<scalar_t>() : nullptr);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& x_bias, double eps, double dropout_p,
    const c10::optional<at::Tensor>& seed) {
  at::Tensor out, mean, rstd;
  fwd_into(kFwd, x, weight, bias, residual, x_bias, eps, dropout_p, seed, out, mean, rstd, nullptr);
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd_pre(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& x_bias, double eps, double dropout_p,
    const c10::optional<at::Tensor>& seed) {
  at::Tensor out, mean, rstd, pre;
  fwd_into(kFwdPre, x, weight, bias, residual, x_bias, eps, dropout_p, seed, out, mean, rstd, &pre);
  return {out, mean, rstd, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
    const c10::optional<at::Tensor>& x_bias, const at::Tensor& mean, const at::Tensor& rstd, double dropout_p,
    const c10::optional<at::Tensor>& seed, const c10::optional<at::Tensor>& grad_pre_out) {
  check_common(kBwd, x, weight, bias, residual, x_bias);
  const bool gin = has(grad_pre_out);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"grad_out", &grad_out},
                                {"grad_pre_out", gin ? &*grad_pre_out : nullptr}}) {
    if (t == nullptr) continue;
    check_cpu(kBwd, name, *t);
    FB_CHECK(t->sizes() == x.sizes(), kBwd, name, " must have x's shape ", x.sizes(), ", got ", t->sizes());
    FB_CHECK(t->scalar_type() == x.scalar_type(), kBwd, name, " must have x's dtype ", x.scalar_type(), ", got ",
             t->scalar_type());
    check_contiguous(kBwd, name, *t);
  }
  const int64_t rows = x.size(0), n = x.size(1);
  for (auto* p : {&mean, &rstd}) {
    const char* name = p == &mean ? "mean" : "rstd";
    check_cpu(kBwd, name, *p);
    FB_CHECK(p->scalar_type() == at::kFloat && p->dim() == 1 && p->size(0) == rows && p->is_contiguous(), kBwd, name,
             " must be a contiguous float32 tensor of shape [", rows, "], got ", p->scalar_type(), " ", p->sizes());
  }
  const uint64_t s = check_dropout(kBwd, dropout_p, seed);
  const bool drop = dropout_p > 0.0;
  at::Tensor grad_pre = new_output(x.sizes(), x.scalar_type());
  at::Tensor grad_x = drop ? new_output(x.sizes(), x.scalar_type()) : no_output(x.scalar_type());
  const auto xb_dtype = has(x_bias) ? x_bias->scalar_type() : x.scalar_type();

  const int64_t block = reduce_block_rows(rows);
  const int64_t nblk = (rows + block - 1) / block;
  auto part_w = scratch_f32(nblk * n), part_b = scratch_f32(nblk * n);
  auto part_xb = has(x_bias) ? scratch_f32(nblk * n) : nullptr;
  if (rows > 0) {
    const std::vector<float> w = weight_f32(weight, n), xb = vector_f32(x_bias);
    RowInputs in{n, xb.empty() ? nullptr : xb.data(), Dropout(dropout_p, s)};
    FB_DISPATCH(x.scalar_type(), kBwd, [&] {
      const auto run = [&](auto kGin) {
        bwd_kernel<scalar_t, decltype(kGin)::value>(
            in, rows, grad_out.data_ptr<scalar_t>(), gin ? grad_pre_out->data_ptr<scalar_t>() : nullptr,
            x.data_ptr<scalar_t>(), has(residual) ? residual->data_ptr<scalar_t>() : nullptr, w.data(),
            mean.data_ptr<float>(), rstd.data_ptr<float>(), grad_pre.data_ptr<scalar_t>(),
            drop ? grad_x.data_ptr<scalar_t>() : nullptr, part_w.get(), part_b.get(), part_xb.get(), block);
      };
      if (gin) {
        run(std::true_type{});
      } else {
        run(std::false_type{});
      }
    });
  }
  std::vector<float> gw(n), gb(n), gxb(has(x_bias) ? n : 0);
  if (has(weight)) sum_partials(part_w.get(), rows > 0 ? nblk : 0, n, gw.data());
  sum_partials(part_b.get(), rows > 0 ? nblk : 0, n, gb.data());
  if (has(x_bias)) sum_partials(part_xb.get(), rows > 0 ? nblk : 0, n, gxb.data());
  const at::ScalarType p_dtype = param_dtype(x, weight, bias);
  at::Tensor grad_w = has(weight) ? tensor_from_f32(gw, {n}, p_dtype) : no_output(p_dtype);
  at::Tensor grad_b = has(bias) ? tensor_from_f32(gb, {n}, bias->scalar_type()) : no_output(p_dtype);
  at::Tensor grad_xb = has(x_bias) ? tensor_from_f32(gxb, {n}, xb_dtype) : no_output(x.scalar_type());
  return {grad_pre, grad_x, grad_w, grad_b, grad_xb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
  m.impl("add_layer_norm_fwd", &add_layer_norm_fwd);
  m.impl("add_layer_norm_fwd_pre", &add_layer_norm_fwd_pre);
  m.impl("add_layer_norm_bwd", &add_layer_norm_bwd);
}

}  // namespace cpu
}  // namespace fastbert
