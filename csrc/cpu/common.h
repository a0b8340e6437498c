// Shared pieces of the CPU backend (csrc/cpu/*.cpp): argument checks, output allocation, the Philox
// dropout stream, dtype conversion of rows to fp32 scratch, and vectorized GELU.
//
// Every kernel computes in fp32 whatever the storage dtype (fp32, fp16, bf16): rows are converted to
// fp32 scratch once, worked on with at::vec::Vectorized<float>, and rounded once on the way out.
// Reductions over rows (column sums for weight/bias gradients) are taken over fixed row blocks whose
// size depends only on the problem shape, then summed in block order, so results are bit-identical
// for any number of threads.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>

#include "message.h"

namespace fastbert {
namespace cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();

// ---------------------------------------------------------------------------------------------
// argument checks: every message names the argument, so a failing call says what to fix
// ---------------------------------------------------------------------------------------------
// The kernel dtypes only (no double: the kernels are not instantiated for it).
#define FB_DISPATCH(st, name, ...)                                                                      \
  AT_DISPATCH_SWITCH(st, name,                                                                          \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// the message is built by fastbert::msg::cat (csrc/message.h), never by TORCH_CHECK's ostream
#define FB_CHECK(cond, op, ...) TORCH_CHECK(cond, ::fastbert::msg::cat("fastbert::", op, ": ", __VA_ARGS__))

inline void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  FB_CHECK(t.device().is_cpu(), op, name, " must be a CPU tensor, got device ", t.device());
}

inline void check_kernel_dtype(const char* op, const char* name, const at::Tensor& t) {
  auto st = t.scalar_type();
  FB_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op, name,
           " must have dtype float32, float16 or bfloat16, got ", st);
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  FB_CHECK(t.dim() == dim, op, name, " must have rank ", dim, ", got shape ", t.sizes());
}

inline void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  FB_CHECK(t.is_contiguous(), op, name, " must be contiguous, got strides ", t.strides());
}

// A 1-D per-feature vector (LayerNorm weight/bias, GELU bias): [n], fp32 or `dtype`.
inline void check_vector(const char* op, const char* name, const at::Tensor& t, int64_t n, at::ScalarType dtype) {
  check_cpu(op, name, t);
  check_dim(op, name, t, 1);
  FB_CHECK(t.size(0) == n, op, name, " must have shape [", n, "], got ", t.sizes());
  FB_CHECK(t.scalar_type() == dtype || t.scalar_type() == at::kFloat, op, name, " must have dtype ", dtype,
           " or float32, got ", t.scalar_type());
}

// dropout_p in [0, 1); when > 0 the seed must be an int64 [1] CPU tensor. Returns the seed value.
inline uint64_t check_dropout(const char* op, double p, const c10::optional<at::Tensor>& seed) {
  FB_CHECK(p >= 0.0 && p < 1.0, op, "dropout_p must be in [0, 1), got ", p);
  if (p == 0.0) return 0;
  FB_CHECK(seed.has_value() && seed->defined(), op, "seed must be given when dropout_p > 0");
  check_cpu(op, "seed", *seed);
  FB_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1, op,
           "seed must be an int64 tensor of shape [1], got dtype ", seed->scalar_type(), " shape ", seed->sizes());
  return static_cast<uint64_t>(seed->data_ptr<int64_t>()[0]);
}

inline bool has(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// ---------------------------------------------------------------------------------------------
// outputs: at::empty, NaN-filled under FASTBERT_POISON_OUTPUTS=1 so tests catch unwritten elements
// ---------------------------------------------------------------------------------------------
// read once, at the first kernel call (a getenv per output allocation was ~0.3 us each)
inline bool poison_outputs() {
  static const bool on = [] {
    const char* e = std::getenv("FASTBERT_POISON_OUTPUTS");
    return e != nullptr && std::strcmp(e, "1") == 0;
  }();
  return on;
}

inline at::Tensor new_output(at::IntArrayRef sizes, at::ScalarType dtype) {
  at::Tensor t = at::empty(sizes, at::TensorOptions().dtype(dtype).device(at::kCPU));
  if (poison_outputs() && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// "an output that does not apply is returned as an empty tensor of shape [0]"
inline at::Tensor no_output(at::ScalarType dtype) {
  return at::empty({0}, at::TensorOptions().dtype(dtype).device(at::kCPU));
}

// ---------------------------------------------------------------------------------------------
// Philox4x32-10, first output word, counter (offset_lo, offset_hi, 0, 0), key (seed_lo, seed_hi).
// Bit for bit fastbert.reference.philox_uint32 (and triton.language.randint): each round maps
// (c0, c1, c2, c3) -> (hi(B*c2) ^ c1 ^ k0, lo(B*c2), hi(A*c0) ^ c3 ^ k1, lo(A*c0)), then bumps the key
// by the Weyl constants. Plain integer code, so GCC vectorizes loops over offsets.
// ---------------------------------------------------------------------------------------------
inline uint32_t philox_first(uint64_t seed, uint64_t offset) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0, c3 = 0;
  for (int r = 0; r < 10; ++r) {
    const uint64_t pb = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint64_t pa = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Kept iff the 31-bit draw is >= floor(p * 2^31); kept values are scaled by 1 / (1 - p).
struct Dropout {
  bool on = false;
  uint64_t seed = 0;
  uint32_t threshold = 0;
  float scale = 1.f;
  Dropout() = default;
  Dropout(double p, uint64_t s) : on(p > 0.0), seed(s) {
    threshold = static_cast<uint32_t>(std::floor(p * 2147483648.0));
    scale = static_cast<float>(1.0 / (1.0 - p));
  }
  // z[j] = keep(offset0 + j) ? scale : 0 for j < n
  inline void factors(uint64_t offset0, int64_t n, float* z) const {
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t r = philox_first(seed, offset0 + static_cast<uint64_t>(j)) >> 1;
      z[j] = r >= threshold ? scale : 0.f;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// fp32 scratch <-> storage dtype
// ---------------------------------------------------------------------------------------------
template <typename T>
inline void to_f32(const T* src, float* dst, int64_t n) {
  at::vec::convert(src, dst, n);
}

template <typename T>
inline void from_f32(const float* src, T* dst, int64_t n) {
  at::vec::convert(src, dst, n);
}

// A per-feature vector (fp32 or the activation dtype) as fp32; empty when absent.
inline std::vector<float> vector_f32(const c10::optional<at::Tensor>& t) {
  std::vector<float> out;
  if (!has(t)) return out;
  at::Tensor c = t->contiguous();
  out.resize(c.numel());
  FB_DISPATCH(c.scalar_type(), "vector_f32", [&] { to_f32(c.data_ptr<scalar_t>(), out.data(), c.numel()); });
  return out;
}

// fp32 accumulators -> a tensor of `dtype` (the dtype of the parameter the gradient belongs to)
inline at::Tensor tensor_from_f32(const std::vector<float>& v, at::IntArrayRef sizes, at::ScalarType dtype) {
  at::Tensor t = new_output(sizes, dtype);
  FB_DISPATCH(dtype, "tensor_from_f32",
              [&] { from_f32(v.data(), t.data_ptr<scalar_t>(), static_cast<int64_t>(v.size())); });
  return t;
}

// Sum of the vectors f(j, c) for j = 0, kVec, 2 kVec, ... < n, c = min(kVec, n - j) the valid lanes (f
// must return zeros past c; Vec::loadu(p, c) zero-fills). Lanes accumulate kBlockVecs vectors in fp32,
// then each block's lanes are added into double lanes. One fp32 accumulator per lane over a whole row
// (n / kVec sequential adds) lost up to 3x PyTorch's accuracy on real checkpoints, whose rows hold
// outliers of |h| ~ 200 next to values ~ 1 (measured on all-MiniLM-L6-v2); the blocked sum costs two
// conversions and two double adds per block. In the full-vector loop c is the constant kVec, so after
// inlining loadu(p, c) is a plain load.
constexpr int64_t kBlockVecs = 8;

// K such sums at once: f(j, c, acc) adds its vectors into acc[0..K); out[k] receives sum k.
template <int K, typename F>
inline void blocked_vsums(int64_t n, double* out, F&& f) {
#if defined(CPU_CAPABILITY_AVX2)
  __m256d d[K];
  for (int k = 0; k < K; ++k) d[k] = _mm256_setzero_pd();
  auto flush = [&](const Vec* acc) {
    for (int k = 0; k < K; ++k) {
      const __m256 a = acc[k];
      d[k] = _mm256_add_pd(d[k], _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(a)),
                                               _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1))));
    }
  };
#else
  double d[K] = {};
  auto flush = [&](const Vec* acc) {
    for (int k = 0; k < K; ++k) {
      float lanes[kVec];
      acc[k].store(lanes);
      for (int64_t i = 0; i < kVec; ++i) d[k] += lanes[i];
    }
  };
#endif
  constexpr int64_t kSpan = kBlockVecs * kVec;
  Vec acc[K];
  int64_t j = 0;
  for (; j + kSpan <= n; j += kSpan) {
    for (int k = 0; k < K; ++k) acc[k] = Vec(0.f);
    for (int64_t v = 0; v < kBlockVecs; ++v) f(j + v * kVec, kVec, acc);
    flush(acc);
  }
  for (int k = 0; k < K; ++k) acc[k] = Vec(0.f);
  for (; j + kVec <= n; j += kVec) f(j, kVec, acc);
  if (j < n) f(j, n - j, acc);
  flush(acc);
  for (int k = 0; k < K; ++k) {
#if defined(CPU_CAPABILITY_AVX2)
    double lanes[4];
    _mm256_storeu_pd(lanes, d[k]);
    out[k] = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
#else
    out[k] = d[k];
#endif
  }
}

template <typename F>
inline double blocked_vsum(int64_t n, F&& f) {
  double out;
  blocked_vsums<1>(n, &out, [&](int64_t j, int64_t c, Vec* acc) { acc[0] = acc[0] + f(j, c); });
  return out;
}

// Calls f(j, c) for the same j and c as blocked_vsum (c == kVec, a compile-time constant, but on the tail).
template <typename F>
inline void for_vecs(int64_t n, F&& f) {
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) f(j, kVec);
  if (j < n) f(j, n - j);
}

// Row blocks for column reductions: a fixed 32 rows per block (independent of the thread count, so
// results are bit-identical for any number of threads). The partials ([rows / 32, n] fp32) are 1/32
// of the activation: at BERT-base shapes 98 KB for n = 768, which malloc serves from its heap; with
// 8-row blocks they were 4x that, came from fresh mmap'ed pages on every call, and the page faults
// cost more than the backward kernel's arithmetic.
inline int64_t reduce_block_rows(int64_t /*rows*/) { return 32; }

// Uninitialized fp32 scratch (std::vector would zero-fill it first).
inline std::unique_ptr<float[]> scratch_f32(int64_t n) { return std::unique_ptr<float[]>(new float[n > 0 ? n : 1]); }

// Sum `nblk` partial rows of length n (row-major [nblk, n]) into out[n], in block order.
inline void sum_partials(const float* partials, int64_t nblk, int64_t n, float* out) {
  at::parallel_for(0, n, 256, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) out[c] = 0.f;
    for (int64_t b = 0; b < nblk; ++b) {
      const float* p = partials + b * n;
      for (int64_t c = c0; c < c1; ++c) out[c] += p[c];
    }
  });
}

// ---------------------------------------------------------------------------------------------
// GELU and its derivative, exact (erf) and tanh forms, on 8 (AVX2) floats at a time.
//   erf:  gelu(v) = v Phi(v),            Phi(v) = (1 + erf(v / sqrt 2)) / 2
//         gelu'(v) = Phi(v) + v phi(v),   phi(v) = exp(-v^2 / 2) / sqrt(2 pi)
//   tanh: u = sqrt(2/pi) (v + 0.044715 v^3), t = tanh(u), gelu(v) = v (1 + t) / 2
//         gelu'(v) = (1 + t) / 2 + v (1 - t^2) / 2 * sqrt(2/pi) (1 + 3 * 0.044715 v^2)
// ---------------------------------------------------------------------------------------------
constexpr float kSqrtHalf = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;
constexpr float kSqrt2OverPi = 0.79788456080286535588f;
constexpr float kTanhCoef = 0.044715f;

inline Vec gelu_tanh(Vec v) {
  Vec u = Vec(kSqrt2OverPi) * (v + Vec(kTanhCoef) * v * v * v);
  return Vec(0.5f) * v * (Vec(1.f) + u.tanh());
}
// exp on 8 lanes, inlined (the Sleef call behind Vec::exp is an out-of-line call through a
// dispatcher, which dominates a GELU pass and a good part of the attention softmax). Cody-Waite
// reduction x = n ln2 + r, |r| <= ln2 / 2, with ln2 split in a short high part (n * hi is exact) and
// a correction; exp(r) = 1 + r + r^2 P(r), P the classic Cephes expf minimax polynomial (~1 ulp);
// 2^n built in the exponent bits. Below the normal range (x < -87.3, -inf included) the result is
// exactly 0, so a masked score gives probability 0, not a denormal; NaN stays NaN. The callers'
// arguments are <= 0 (scores minus their running max, -v^2 / 2); past x ~ 88 the result is inf.
#if defined(CPU_CAPABILITY_AVX2)
inline Vec exp_fast(Vec xv) {
  const __m256 x0 = xv;
  const __m256 underflow = _mm256_cmp_ps(x0, _mm256_set1_ps(-87.33654f), _CMP_LT_OQ);
  const __m256 isnan = _mm256_cmp_ps(x0, x0, _CMP_UNORD_Q);
  __m256 x = _mm256_min_ps(_mm256_max_ps(x0, _mm256_set1_ps(-87.33654f)), _mm256_set1_ps(88.72283f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 y = _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
  return Vec(_mm256_blendv_ps(y, x0, isnan));
}
#else
inline Vec exp_fast(Vec x) { return x.exp(); }
#endif

// Phi(v) = (1 + erf(v / sqrt 2)) / 2 and e = exp(-v^2 / 2) from one exponential: with
// x = |v| / sqrt 2, erf(x) = 1 - t * poly(t) * exp(-x^2), t = 1 / (1 + 0.3275911 x) (Abramowitz &
// Stegun 7.1.26, |error| < 1.5e-7 -- the approximation at::vec's erf, hence PyTorch's CPU GELU,
// uses), and exp(-x^2) = exp(-v^2 / 2) = sqrt(2 pi) phi(v).
inline Vec gelu_cdf(Vec v, Vec* e_out) {
  const Vec one(1.f);
  const Vec ax = v.abs() * Vec(kSqrtHalf);
  const Vec t = one / at::vec::fmadd(Vec(0.3275911f), ax, one);
  Vec poly = at::vec::fmadd(Vec(1.061405429f), t, Vec(-1.453152027f));
  poly = at::vec::fmadd(poly, t, Vec(1.421413741f));
  poly = at::vec::fmadd(poly, t, Vec(-0.284496736f));
  poly = at::vec::fmadd(poly, t, Vec(0.254829592f));
  const Vec e = exp_fast(Vec(-0.5f) * v * v);  // exp(-x^2)
  const Vec erf_abs = one - poly * t * e;      // erf(|v| / sqrt 2)
  const Vec erf = Vec::blendv(erf_abs, Vec(0.f) - erf_abs, v < Vec(0.f));
  *e_out = e;
  return Vec(0.5f) * (one + erf);
}

inline Vec gelu_erf(Vec v) {
  Vec e;
  return v * gelu_cdf(v, &e);
}

// gelu'(v) = Phi(v) + v phi(v): both from the same exponential.
inline Vec gelu_erf_grad(Vec v) {
  Vec e;
  const Vec cdf = gelu_cdf(v, &e);
  return at::vec::fmadd(v * Vec(kInvSqrt2Pi), e, cdf);
}

inline Vec gelu_tanh_grad(Vec v) {
  Vec v2 = v * v;
  Vec t = (Vec(kSqrt2OverPi) * (v + Vec(kTanhCoef) * v2 * v)).tanh();
  Vec du = Vec(kSqrt2OverPi) * (Vec(1.f) + Vec(3.f * kTanhCoef) * v2);
  return Vec(0.5f) * (Vec(1.f) + t) + Vec(0.5f) * v * (Vec(1.f) - t * t) * du;
}

inline bool parse_approximate(const char* op, c10::string_view approximate) {
  FB_CHECK(approximate == "none" || approximate == "tanh", op, "approximate must be 'none' or 'tanh', got '",
           std::string(approximate), "'");
  return approximate == "tanh";
}

}  // namespace cpu
}  // namespace fastbert
