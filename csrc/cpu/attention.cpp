// attention on CPU: FlashAttention-2 style, tiled, online softmax, no S x S matrix in memory.
//
// One task per (sequence b, head h), tasks spread over threads with at::parallel_for; a task owns
// every output row of its (b, h), so there are no races and the result does not depend on the
// thread count. Within a task everything is fp32: K and V are converted once (K transposed, so the
// score tile is a GEMM whose inner loop runs along keys), keys hidden by key_padding_mask are dropped
// while converting (padding costs no flops; `kidx` maps gathered keys back to their positions for the
// causal test, attn_bias and the dropout counters), and tiles of BQ queries x up to BK keys go through
// a small register-blocked GEMM on at::vec::Vectorized<float> (gemm_f32 below). Up to BK keys are one
// tile, so at BERT lengths the online softmax never rescales. Rows of one head lie H * D elements apart;
// every loop over them prefetches kAhead rows ahead (the row loads were a quarter of the time:
// docs/perf-notes.md).
//
// Forward, per query row i, over key tiles (m = running max, l = running sum, o = running output):
//   s_j = scale * q_i . k_j + bias_ij          (-inf where masked: padding, causal j > i + Sk - Sq, outside
//                                               the window |i + Sk - Sq - j| > w; key tiles outside skipped)
//   m' = max(m, max_j s_j);  p_j = exp(s_j - m');  c = exp(m - m')
//   l' = c * l + sum_j p_j;  o' = c * o + sum_j z_ij p_j v_j    (z: dropout factor, 0 or 1/(1-p))
// and at the end out_i = o / l, lse_i = m + log l. The softmax denominator l sums the undropped p,
// as the reference does (dropout acts on the normalized probabilities). A row with no visible key
// keeps m = -inf: out_i = 0, lse_i = +inf. An attn_bias value below -1e20 masks its key (see
// kBiasMasked).
//
// Backward, per block of query rows against all of the (visible) keys at once, recomputes the exact
// softmax from the scores (row max, exponentials, row sum: the probabilities PyTorch's own softmax
// backward uses, without lse's rounding) and, with dO the output gradient,
//   dV_j = sum_i z_ij P_ij dO_i
//   dP_ij = z_ij dO_i . v_j
//   dS_ij = P_ij (dP_ij - Delta_i),  Delta_i = sum_j P_ij dP_ij   (= dO_i . out_i, formed as PyTorch does)
//   dQ_i = scale * sum_j dS_ij k_j,   dK_j = scale * sum_i dS_ij q_i
// Five GEMMs, as in PyTorch's math backward. lse and out are accepted and checked (the shared schema)
// but not read.
#include <algorithm>

#include "cpu/common.h"

namespace fastbert {
namespace cpu {
namespace {

constexpr const char* kFwd = "attention_fwd";
constexpr const char* kBwd = "attention_bwd";

constexpr int64_t kCol = 2 * kVec;  // GEMM column step: every padded width is a multiple of it
constexpr int64_t BQ = 64;          // query rows per tile
constexpr int64_t BK = 512;         // at most this many keys per tile (multiple of kCol)
static_assert(BK % kCol == 0 && BQ > 0, "BK must be a multiple of the GEMM column step");
static_assert(kCol % 8 == 0, "load_keys transposes whole blocks of 8 keys");

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// C[MR x N] (+)= alpha * op(A)[MR x K] B[K x N], row-major, unit column stride, N % kCol == 0; op(A) is
// A (element (r, k) at A[r * lda + k]) or, with TransA, A^T (element (r, k) at A[k * lda + r]): the
// kernel only broadcasts single elements of A, so reading it transposed costs nothing.
// MR rows x 2 vectors of accumulators stay in registers over the whole K loop.
template <int MR, bool TransA>
inline void gemm_rows(int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                      int64_t ldc, float alpha, bool accumulate) {
  for (int64_t j = 0; j < N; j += kCol) {
    Vec c0[MR], c1[MR];
    for (int r = 0; r < MR; ++r) c0[r] = c1[r] = Vec(0.f);
    const float* b = B + j;
    for (int64_t k = 0; k < K; ++k, b += ldb) {
      const Vec b0 = Vec::loadu(b), b1 = Vec::loadu(b + kVec);
      for (int r = 0; r < MR; ++r) {
        const Vec a(TransA ? A[k * lda + r] : A[r * lda + k]);
        c0[r] = at::vec::fmadd(a, b0, c0[r]);
        c1[r] = at::vec::fmadd(a, b1, c1[r]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      float* c = C + r * ldc + j;
      Vec v0 = c0[r], v1 = c1[r];
      if (alpha != 1.f) {
        v0 = v0 * Vec(alpha);
        v1 = v1 * Vec(alpha);
      }
      if (accumulate) {
        v0 = v0 + Vec::loadu(c);
        v1 = v1 + Vec::loadu(c + kVec);
      }
      v0.store(c);
      v1.store(c + kVec);
    }
  }
}

template <bool TransA>
void gemm_f32_impl(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                   int64_t ldc, float alpha, bool accumulate) {
  // 6 rows x 2 vectors: 12 accumulators + 2 B vectors + 1 broadcast of the 16 AVX2 registers
  auto a_rows = [&](int64_t i) { return TransA ? A + i : A + i * lda; };
  int64_t i = 0;
  for (; i + 6 <= M; i += 6) gemm_rows<6, TransA>(N, K, a_rows(i), lda, B, ldb, C + i * ldc, ldc, alpha, accumulate);
  switch (M - i) {
    case 5:
      gemm_rows<5, TransA>(N, K, a_rows(i), lda, B, ldb, C + i * ldc, ldc, alpha, accumulate);
      break;
    case 4:
      gemm_rows<4, TransA>(N, K, a_rows(i), lda, B, ldb, C + i * ldc, ldc, alpha, accumulate);
      break;
    case 3:
      gemm_rows<3, TransA>(N, K, a_rows(i), lda, B, ldb, C + i * ldc, ldc, alpha, accumulate);
      break;
    case 2:
      gemm_rows<2, TransA>(N, K, a_rows(i), lda, B, ldb, C + i * ldc, ldc, alpha, accumulate);
      break;
    case 1:
      gemm_rows<1, TransA>(N, K, a_rows(i), lda, B, ldb, C + i * ldc, ldc, alpha, accumulate);
      break;
    default:
      break;
  }
}

// C = alpha * A B (+ C)
void gemm_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
              int64_t ldc, float alpha, bool accumulate) {
  gemm_f32_impl<false>(M, N, K, A, lda, B, ldb, C, ldc, alpha, accumulate);
}

// C = alpha * A^T B (+ C), A stored [K][M] with row stride lda
void gemm_f32_at(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                 int64_t ldc, float alpha, bool accumulate) {
  gemm_f32_impl<true>(M, N, K, A, lda, B, ldb, C, ldc, alpha, accumulate);
}

// A bias value below this masks its key exactly like padding (HF's finfo.min additive masks, -inf):
// probability 0, and a row left with no key gives 0 -- the convention of the Triton kernels. Adding
// ~-3.4e38 instead would absorb q.k and log(l), and the backward could not recompute P from lse.
constexpr float kBiasMasked = -1.0e20f;

// dst[c] += bias[kidx[c]] (element stride `stride`) for c < n; the dtype switch is per row, not per element.
template <typename B>
inline void add_bias_typed(const B* p, int64_t stride, const int32_t* kidx, int64_t n, float* dst) {
  for (int64_t c = 0; c < n; ++c) {
    const float bv = static_cast<float>(p[kidx[c] * stride]);
    dst[c] = bv < kBiasMasked ? -std::numeric_limits<float>::infinity() : dst[c] + bv;
  }
}

void add_bias_row(const at::Tensor& bias, const char* row, int64_t stride, const int32_t* kidx, int64_t n, float* dst) {
  switch (bias.scalar_type()) {
    case at::kFloat:
      add_bias_typed(reinterpret_cast<const float*>(row), stride, kidx, n, dst);
      break;
    case at::kDouble:
      add_bias_typed(reinterpret_cast<const double*>(row), stride, kidx, n, dst);
      break;
    case at::kHalf:
      add_bias_typed(reinterpret_cast<const at::Half*>(row), stride, kidx, n, dst);
      break;
    case at::kBFloat16:
      add_bias_typed(reinterpret_cast<const at::BFloat16*>(row), stride, kidx, n, dst);
      break;
    default:
      TORCH_CHECK(false, ::fastbert::msg::cat("fastbert::attention: attn_bias dtype ", bias.scalar_type(),
                                              " is not supported"));
  }
}

inline float hmax(const float* a, int64_t n) {  // n % kVec == 0, n > 0
  Vec m = Vec::loadu(a);
  for (int64_t j = kVec; j < n; j += kVec) m = at::vec::maximum(m, Vec::loadu(a + j));
  float lanes[kVec];
  m.store(lanes);
  float r = lanes[0];
  for (int64_t i = 1; i < kVec; ++i) r = std::max(r, lanes[i]);
  return r;
}

// Everything a task needs to find its rows, whatever the layout.
struct Problem {
  bool packed = false;
  int64_t B = 0, H = 0, D = 0, Sq = 0, Sk = 0;
  int64_t sq_total = 0, sk_total = 0;  // dropout counter strides (Sq, Sk; max_seqlen when packed)
  const int32_t* cu = nullptr;
  at::Tensor mask, bias;  // mask bool [B, Sk]; bias expanded to [B, H, Sq, Sk]
  bool causal = false;
  // queries are the last Sq of Sk positions: query i sits at key position i + off (off = Sk - Sq; 0 when
  // packed). Key j is visible iff rel = j - i - off satisfies rel <= 0 (causal) and |rel| <= win (win >= 0).
  int64_t off = 0;
  int64_t win = -1;
  float scale = 1.f;
  Dropout drop;

  // [first, last) gathered keys that can be visible to query rows [i0, i1]: a band (causal, window) bounds
  // the range, first rounded down to a multiple of kCol so the GEMM operands stay aligned (kidx is sorted)
  inline void key_span(const std::vector<int32_t>& kidx, int64_t i0, int64_t i1, int64_t* first, int64_t* last) const {
    const int64_t nk = static_cast<int64_t>(kidx.size());
    auto clamp32 = [](int64_t x) {
      return static_cast<int32_t>(std::min<int64_t>(std::max<int64_t>(x, -1), std::numeric_limits<int32_t>::max()));
    };
    *first = 0;
    *last = nk;
    if (causal || win >= 0) {
      const int64_t hi = i1 + off + (causal ? 0 : win);  // the last key position row i1 can see
      *last = std::upper_bound(kidx.begin(), kidx.end(), clamp32(hi)) - kidx.begin();
    }
    if (win >= 0) {
      const int64_t lo = i0 + off - win;  // the first key position row i0 can see
      *first = (std::lower_bound(kidx.begin(), kidx.end(), clamp32(lo)) - kidx.begin()) / kCol * kCol;
    }
  }

  // (first row, number of query rows, number of key rows) of sequence b
  inline void seq(int64_t b, int64_t* start, int64_t* nq, int64_t* nk) const {
    if (packed) {
      *start = cu[b];
      *nq = *nk = cu[b + 1] - cu[b];
    } else {
      *start = 0;
      *nq = Sq;
      *nk = Sk;
    }
  }
  // element offset of row `i` of (b, h) in a [B, S, H, D] or [total, H, D] tensor
  inline int64_t row(const at::Tensor& t, int64_t b, int64_t start, int64_t h, int64_t i) const {
    if (packed) return (start + i) * t.stride(0) + h * t.stride(1);
    return b * t.stride(0) + i * t.stride(1) + h * t.stride(2);
  }
  inline float* lse_row(float* lse, int64_t b, int64_t start, int64_t h) const {
    if (packed) return lse + h * lse_total + start;
    return lse + (b * H + h) * Sq;
  }
  int64_t lse_total = 0;  // packed: total tokens (lse is [H, total])

  // gathered key positions of sequence b (all of them, or the unmasked ones)
  void keys(int64_t b, int64_t nk, std::vector<int32_t>& kidx) const {
    kidx.clear();
    if (mask.defined()) {
      const bool* m = mask.data_ptr<bool>() + b * mask.stride(0);
      for (int64_t j = 0; j < nk; ++j)
        if (m[j * mask.stride(1)]) kidx.push_back(static_cast<int32_t>(j));
    } else {
      for (int64_t j = 0; j < nk; ++j) kidx.push_back(static_cast<int32_t>(j));
    }
  }

  // scores tile epilogue: add bias, mask (causal, padded columns) for row i; n_valid real columns
  inline void mask_row(int64_t b, int64_t h, int64_t i, const int32_t* kidx, int64_t n_valid, int64_t width,
                       float* s) const {
    if (bias.defined()) {
      const char* row = static_cast<const char*>(bias.data_ptr()) +
                        (b * bias.stride(0) + h * bias.stride(1) + i * bias.stride(2)) * bias.element_size();
      add_bias_row(bias, row, bias.stride(3), kidx, n_valid, s);
    }
    const float ninf = -std::numeric_limits<float>::infinity();
    const int64_t pos = i + off;  // the query's key position
    if (causal) {
      for (int64_t c = 0; c < n_valid; ++c)
        if (kidx[c] > pos) s[c] = ninf;
    }
    if (win >= 0) {
      for (int64_t c = 0; c < n_valid; ++c)
        if (kidx[c] > pos + win || kidx[c] < pos - win) s[c] = ninf;
    }
    for (int64_t c = n_valid; c < width; ++c) s[c] = ninf;
  }

  // dropout factors z[c] of row i against gathered keys kidx[0..n)
  inline void dropout_row(int64_t b, int64_t h, int64_t i, const int32_t* kidx, int64_t n, float* z) const {
    const uint64_t base = (static_cast<uint64_t>(b * H + h) * sq_total + i) * sk_total;
    for (int64_t c = 0; c < n; ++c) {
      const uint32_t r = philox_first(drop.seed, base + static_cast<uint64_t>(kidx[c])) >> 1;
      z[c] = r >= drop.threshold ? drop.scale : 0.f;
    }
  }
};

// Rows of one head sit H * D elements apart in q, k, v and out, a stride no hardware prefetcher follows:
// loops over rows ask for the row kAhead rows on while they work on the current one.
constexpr int64_t kAhead = 8;

template <bool Write = false>
inline void prefetch_row(const void* row, int64_t bytes) {
#if defined(__GNUC__)
  const char* p = static_cast<const char*>(row);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, Write ? 1 : 0, 3);
  __builtin_prefetch(p + bytes - 1, Write ? 1 : 0, 3);  // the row's last line, when it is not 64-byte aligned
#else
  (void)row;
  (void)bytes;
#endif
}

// dst[d * ldd + c] = src[c][d] for c < 8, d < D, where src[c] points at row c (8 rows of D floats).
// Whole 8 x 8 blocks go through registers (AVX2: unpack, shuffle, permute); a D % 8 tail is scalar.
inline void transpose_8rows(const float* const* src, int64_t D, float* dst, int64_t ldd) {
  int64_t d = 0;
#if defined(CPU_CAPABILITY_AVX2)
  for (; d + 8 <= D; d += 8) {
    __m256 r[8], t[8];
    for (int c = 0; c < 8; ++c) r[c] = _mm256_loadu_ps(src[c] + d);
    for (int c = 0; c < 8; c += 2) {
      t[c] = _mm256_unpacklo_ps(r[c], r[c + 1]);      // rows c, c+1 interleaved, lanes 0,1 | 4,5
      t[c + 1] = _mm256_unpackhi_ps(r[c], r[c + 1]);  // lanes 2,3 | 6,7
    }
    for (int c = 0; c < 8; c += 4) {
      r[c] = _mm256_shuffle_ps(t[c], t[c + 2], _MM_SHUFFLE(1, 0, 1, 0));
      r[c + 1] = _mm256_shuffle_ps(t[c], t[c + 2], _MM_SHUFFLE(3, 2, 3, 2));
      r[c + 2] = _mm256_shuffle_ps(t[c + 1], t[c + 3], _MM_SHUFFLE(1, 0, 1, 0));
      r[c + 3] = _mm256_shuffle_ps(t[c + 1], t[c + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int e = 0; e < 4; ++e) {
      _mm256_storeu_ps(dst + (d + e) * ldd, _mm256_permute2f128_ps(r[e], r[e + 4], 0x20));
      _mm256_storeu_ps(dst + (d + e + 4) * ldd, _mm256_permute2f128_ps(r[e], r[e + 4], 0x31));
    }
  }
#endif
  for (; d < D; ++d)
    for (int c = 0; c < 8; ++c) dst[d * ldd + c] = src[c][d];
}

// Rows of the gathered keys of one (sequence, head) from K or V, as fp32 rows [nkp][Dp] (zero padded:
// rows nk..nkp and columns D..Dp) and, when `transposed` is given, also as Kt [D][nkp] (the B operand of
// the score GEMM, whose inner loop runs along keys).
template <typename T>
void load_keys(const Problem& P, const at::Tensor& t, int64_t b, int64_t start, int64_t h,
               const std::vector<int32_t>& kidx, int64_t nkp, int64_t Dp, float* rows, float* transposed) {
  const int64_t D = P.D, nk = static_cast<int64_t>(kidx.size());
  const T* base = t.data_ptr<T>();
  for (int64_t c = 0; c < nk; ++c) {
    if (c + kAhead < nk) prefetch_row(base + P.row(t, b, start, h, kidx[c + kAhead]), D * sizeof(T));
    float* r = rows + c * Dp;
    to_f32(base + P.row(t, b, start, h, kidx[c]), r, D);
    std::fill(r + D, r + Dp, 0.f);
  }
  std::fill(rows + nk * Dp, rows + nkp * Dp, 0.f);
  if (transposed == nullptr) return;
  for (int64_t c = 0; c < nkp; c += 8) {  // nkp is a multiple of kCol, hence of 8
    const float* src[8];
    for (int e = 0; e < 8; ++e) src[e] = rows + (c + e) * Dp;
    transpose_8rows(src, D, transposed + c, nkp);
  }
}

template <typename T>
void fwd_task(const Problem& P, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
              float* lse, int64_t b, int64_t h) {
  int64_t start, nq, nk_all;
  P.seq(b, &start, &nq, &nk_all);
  const int64_t D = P.D, Dp = round_up(D, kCol);
  std::vector<int32_t> kidx;
  P.keys(b, nk_all, kidx);
  const int64_t nk = static_cast<int64_t>(kidx.size()), nkp = round_up(nk, kCol);
  // load_keys writes every element (padding included): no zero-filled allocation needed
  auto Kt = scratch_f32(D * nkp), V = scratch_f32(nkp * Dp);
  load_keys<T>(P, k, b, start, h, kidx, nkp, Dp, V.get(), Kt.get());  // V's buffer holds K's rows meanwhile
  load_keys<T>(P, v, b, start, h, kidx, nkp, Dp, V.get(), nullptr);
  // one key tile when the keys fit (no rescaling of o): a BQ x bk score tile stays in L2
  const int64_t bk = std::min(BK, nkp);
  std::vector<float> Q(BQ * D), S(BQ * bk), O(BQ * Dp), m(BQ), l(BQ), z(bk);
  const T* qb = q.data_ptr<T>();
  T* ob = out.data_ptr<T>();
  float* lrow = P.lse_row(lse, b, start, h);
  const float ninf = -std::numeric_limits<float>::infinity();

  for (int64_t q0 = 0; q0 < nq; q0 += BQ) {
    const int64_t qn = std::min(BQ, nq - q0);
    for (int64_t r = 0; r < qn; ++r) {
      if (r + kAhead < qn) prefetch_row(qb + P.row(q, b, start, h, q0 + r + kAhead), D * sizeof(T));
      to_f32(qb + P.row(q, b, start, h, q0 + r), Q.data() + r * D, D);
    }
    std::fill(O.begin(), O.end(), 0.f);
    std::fill(m.begin(), m.end(), ninf);
    std::fill(l.begin(), l.end(), 0.f);
    // causal / window: keys outside the tile's band are invisible to all of it, their tiles skipped
    int64_t kbeg, kend;
    P.key_span(kidx, q0, q0 + qn - 1, &kbeg, &kend);
    for (int64_t kb = kbeg; kb < kend; kb += bk) {
      // kb is a multiple of kCol, so width <= nkp - kb; columns past kend are masked (-inf, p = 0)
      const int64_t width = std::min(bk, round_up(kend - kb, kCol)), nv = std::min(bk, kend - kb);
      gemm_f32(qn, width, D, Q.data(), D, Kt.get() + kb, nkp, S.data(), bk, P.scale, false);
      for (int64_t r = 0; r < qn; ++r) {
        const int64_t i = q0 + r;
        float* s = S.data() + r * bk;
        P.mask_row(b, h, i, kidx.data() + kb, nv, width, s);
        const float mnew = std::max(m[r], hmax(s, width));
        if (mnew == ninf) {  // nothing visible to this row yet
          std::fill(s, s + width, 0.f);
          continue;
        }
        Vec vm(mnew), sum(0.f);
        for (int64_t c = 0; c < width; c += kVec) {
          Vec p = exp_fast(Vec::loadu(s + c) - vm);
          p.store(s + c);
          sum = sum + p;
        }
        float lanes[kVec];
        sum.store(lanes);
        float ps = 0.f;
        for (int64_t t = 0; t < kVec; ++t) ps += lanes[t];
        const float corr = std::exp(m[r] - mnew);  // exp(-inf) = 0 on the first visible tile
        l[r] = l[r] * corr + ps;
        m[r] = mnew;
        if (corr != 1.f) {
          float* o = O.data() + r * Dp;
          for (int64_t d = 0; d < Dp; d += kVec) (Vec::loadu(o + d) * Vec(corr)).store(o + d);
        }
        if (P.drop.on) {
          P.dropout_row(b, h, i, kidx.data() + kb, nv, z.data());
          for (int64_t c = 0; c < nv; ++c) s[c] *= z[c];
        }
      }
      gemm_f32(qn, Dp, width, S.data(), bk, V.get() + kb * Dp, Dp, O.data(), Dp, 1.f, true);
    }
    for (int64_t r = 0; r < qn; ++r) {
      if (r + kAhead < qn) prefetch_row<true>(ob + P.row(out, b, start, h, q0 + r + kAhead), D * sizeof(T));
      float* o = O.data() + r * Dp;
      if (l[r] > 0.f) {
        const float inv = 1.f / l[r];
        for (int64_t d = 0; d < D; ++d) o[d] *= inv;
        lrow[q0 + r] = m[r] + std::log(l[r]);
      } else {
        std::fill(o, o + D, 0.f);
        lrow[q0 + r] = std::numeric_limits<float>::infinity();
      }
      from_f32(o, ob + P.row(out, b, start, h, q0 + r), D);
    }
  }
}

// Backward query blocks hold their scores against every key at once: bq x nkp floats per matrix
// (two: scores/P and dP/dS), at most this many, so they stay in L2.
constexpr int64_t kBwdScoreFloats = 32768;

template <typename T>
void bwd_task(const Problem& P, const at::Tensor& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              at::Tensor& gq, at::Tensor& gk, at::Tensor& gv, int64_t b, int64_t h) {
  int64_t start, nq, nk_all;
  P.seq(b, &start, &nq, &nk_all);
  const int64_t D = P.D, Dp = round_up(D, kCol);
  std::vector<int32_t> kidx;
  P.keys(b, nk_all, kidx);
  const int64_t nk = static_cast<int64_t>(kidx.size()), nkp = round_up(nk, kCol);
  // load_keys writes every element (padding included): no zero-filled allocation needed. V's rows are only
  // staged for the transpose, in dV's buffer, which is zeroed afterwards.
  auto Kt = scratch_f32(D * nkp), Krow = scratch_f32(nkp * Dp), Vt = scratch_f32(D * nkp);
  auto dK = scratch_f32(nkp * Dp), dV = scratch_f32(nkp * Dp);
  load_keys<T>(P, k, b, start, h, kidx, nkp, Dp, Krow.get(), Kt.get());
  load_keys<T>(P, v, b, start, h, kidx, nkp, Dp, dV.get(), Vt.get());
  std::fill(dK.get(), dK.get() + nkp * Dp, 0.f);
  std::fill(dV.get(), dV.get() + nkp * Dp, 0.f);
  // queries and output gradient, zero padded to Dp
  std::vector<float> Q(nq * Dp, 0.f), dO(nq * Dp, 0.f), dQ(nq * Dp, 0.f);
  const T *qb = q.data_ptr<T>(), *gb = g.data_ptr<T>();
  for (int64_t i = 0; i < nq; ++i) {
    if (i + kAhead < nq) {
      prefetch_row(qb + P.row(q, b, start, h, i + kAhead), D * sizeof(T));
      prefetch_row(gb + P.row(g, b, start, h, i + kAhead), D * sizeof(T));
    }
    to_f32(qb + P.row(q, b, start, h, i), Q.data() + i * Dp, D);
    to_f32(gb + P.row(g, b, start, h, i), dO.data() + i * Dp, D);
  }
  const int64_t bq = std::max<int64_t>(1, std::min<int64_t>(64, kBwdScoreFloats / std::max<int64_t>(nkp, 1)));
  std::vector<float> S(bq * nkp), dP(bq * nkp), z(nkp);
  const float ninf = -std::numeric_limits<float>::infinity();

  for (int64_t q0 = 0; q0 < nq; q0 += bq) {
    const int64_t qn = std::min(bq, nq - q0);
    // causal / window: only the gathered keys [kbeg, kend) can be visible to this block (kbeg % kCol == 0)
    int64_t kbeg, kend;
    P.key_span(kidx, q0, q0 + qn - 1, &kbeg, &kend);
    if (kend <= kbeg) continue;                                       // no visible key: these rows' gradients are 0
    const int64_t w = round_up(kend - kbeg, kCol), nv = kend - kbeg;  // kbeg + w <= nkp
    gemm_f32(qn, w, D, Q.data() + q0 * Dp, Dp, Kt.get() + kbeg, nkp, S.data(), nkp, P.scale, false);
    gemm_f32(qn, w, D, dO.data() + q0 * Dp, Dp, Vt.get() + kbeg, nkp, dP.data(), nkp, 1.f, false);
    for (int64_t r = 0; r < qn; ++r) {
      const int64_t i = q0 + r;
      float* p = S.data() + r * nkp;
      float* dp = dP.data() + r * nkp;
      P.mask_row(b, h, i, kidx.data() + kbeg, nv, w, p);
      const float mx = hmax(p, w);
      if (mx == ninf) {  // no visible key (lse = +inf): P = 0, dS = 0
        std::fill(p, p + w, 0.f);
        std::fill(dp, dp + w, 0.f);
      } else {
        const Vec vm(mx);
        const double l = blocked_vsum(w, [&](int64_t c, int64_t) {
          const Vec e = exp_fast(Vec::loadu(p + c) - vm);
          e.store(p + c);
          return e;
        });
        const Vec inv(static_cast<float>(1.0 / l));
        if (P.drop.on) {
          P.dropout_row(b, h, i, kidx.data() + kbeg, nv, z.data());
          std::fill(z.begin() + nv, z.begin() + w, 0.f);
        }
        const float* zr = P.drop.on ? z.data() : nullptr;
        // P = e / l; dP <- z * dP (dropout); Delta = sum_j P dP
        const double delta = blocked_vsum(w, [&](int64_t c, int64_t) {
          const Vec pv = Vec::loadu(p + c) * inv;
          pv.store(p + c);
          Vec d = Vec::loadu(dp + c);
          if (zr != nullptr) {
            d = d * Vec::loadu(zr + c);
            d.store(dp + c);
          }
          return pv * d;
        });
        const Vec vd(static_cast<float>(delta));
        for (int64_t c = 0; c < w; c += kVec) {
          const Vec pv = Vec::loadu(p + c);
          (pv * (Vec::loadu(dp + c) - vd)).store(dp + c);             // dp now holds dS
          if (zr != nullptr) (pv * Vec::loadu(zr + c)).store(p + c);  // p now holds z * P (for dV)
        }
      }
    }
    // dV += (zP)^T dO ; dK += scale dS^T Q ; dQ = scale dS K
    gemm_f32_at(w, Dp, qn, S.data(), nkp, dO.data() + q0 * Dp, Dp, dV.get() + kbeg * Dp, Dp, 1.f, true);
    gemm_f32_at(w, Dp, qn, dP.data(), nkp, Q.data() + q0 * Dp, Dp, dK.get() + kbeg * Dp, Dp, P.scale, true);
    gemm_f32(qn, Dp, w, dP.data(), nkp, Krow.get() + kbeg * Dp, Dp, dQ.data() + q0 * Dp, Dp, P.scale, false);
  }
  T *gqb = gq.data_ptr<T>(), *gkb = gk.data_ptr<T>(), *gvb = gv.data_ptr<T>();
  for (int64_t i = 0; i < nq; ++i) {
    if (i + kAhead < nq) prefetch_row<true>(gqb + P.row(gq, b, start, h, i + kAhead), D * sizeof(T));
    from_f32(dQ.data() + i * Dp, gqb + P.row(gq, b, start, h, i), D);
  }
  // every key row is written: gathered keys get their gradient, masked-out keys 0
  std::vector<float> zeros(D, 0.f);
  int64_t c = 0;
  for (int64_t j = 0; j < nk_all; ++j) {
    if (j + kAhead < nk_all) {
      prefetch_row<true>(gkb + P.row(gk, b, start, h, j + kAhead), D * sizeof(T));
      prefetch_row<true>(gvb + P.row(gv, b, start, h, j + kAhead), D * sizeof(T));
    }
    const bool kept = c < nk && kidx[c] == j;
    from_f32(kept ? dK.get() + c * Dp : zeros.data(), gkb + P.row(gk, b, start, h, j), D);
    from_f32(kept ? dV.get() + c * Dp : zeros.data(), gvb + P.row(gv, b, start, h, j), D);
    if (kept) ++c;
  }
}

// ----------------------------------------------------------------------------------------------
// host side: checks, then one task per (b, h)
// ----------------------------------------------------------------------------------------------
Problem make_problem(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& key_padding_mask, const c10::optional<at::Tensor>& attn_bias,
                     const c10::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, bool causal, double scale,
                     double dropout_p, const c10::optional<at::Tensor>& seed, int64_t window) {
  Problem P;
  P.packed = has(cu_seqlens);
  const int64_t rank = P.packed ? 3 : 4;
  for (const auto& pr : {std::make_pair("q", &q), std::make_pair("k", &k), std::make_pair("v", &v)}) {
    const at::Tensor& t = *pr.second;
    check_cpu(op, pr.first, t);
    check_kernel_dtype(op, pr.first, t);
    FB_CHECK(t.dim() == rank, op, pr.first, " must have rank ", rank,
             P.packed ? " ([total, H, D], packed with cu_seqlens)" : " ([B, S, H, D])", ", got shape ", t.sizes());
    FB_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, pr.first, " must have unit stride along D, got strides ",
             t.strides());
  }
  FB_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
           "q, k and v must share a dtype, got q ", q.scalar_type(), ", k ", k.scalar_type(), ", v ", v.scalar_type());
  FB_CHECK(k.sizes() == v.sizes(), op, "k and v must have the same shape, got k ", k.sizes(), ", v ", v.sizes());
  P.D = q.size(-1);
  P.H = q.size(-2);
  FB_CHECK(P.D >= 1 && P.D <= 256, op, "head dim (q's last dim) must be in [1, 256], got ", P.D);
  FB_CHECK(k.size(-1) == P.D, op, "k must have q's head dim ", P.D, ", got shape ", k.sizes());
  FB_CHECK(k.size(-2) == P.H, op, "k must have q's number of heads ", P.H, ", got shape ", k.sizes());
  if (P.packed) {
    const at::Tensor& cu = *cu_seqlens;
    check_cpu(op, "cu_seqlens", cu);
    FB_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.numel() >= 1 && cu.is_contiguous(), op,
             "cu_seqlens must be a contiguous int32 tensor of shape [B + 1], got ", cu.scalar_type(), " ", cu.sizes());
    FB_CHECK(k.size(0) == q.size(0), op, "k must have q's number of packed tokens ", q.size(0), ", got ", k.size(0));
    FB_CHECK(!has(key_padding_mask), op,
             "key_padding_mask is not accepted with cu_seqlens (packed inputs have no padding)");
    FB_CHECK(!has(attn_bias), op, "attn_bias is not accepted with cu_seqlens");
    P.B = cu.numel() - 1;
    P.cu = cu.data_ptr<int32_t>();
    const int64_t total = q.size(0);
    FB_CHECK(P.cu[0] == 0 && P.cu[P.B] == total, op,
             "cu_seqlens must start at 0 and end at the number of packed tokens ", total, ", got ", P.cu[0], " ... ",
             P.cu[P.B]);
    int64_t longest = 0;
    for (int64_t b = 0; b < P.B; ++b) {
      FB_CHECK(P.cu[b + 1] >= P.cu[b], op, "cu_seqlens must be non-decreasing");
      longest = std::max<int64_t>(longest, P.cu[b + 1] - P.cu[b]);
    }
    FB_CHECK(max_seqlen >= longest, op, "max_seqlen ", max_seqlen, " is shorter than the longest sequence ", longest);
    P.Sq = P.Sk = max_seqlen;
    P.sq_total = P.sk_total = max_seqlen;
    P.lse_total = total;
  } else {
    P.B = q.size(0);
    P.Sq = q.size(1);
    P.Sk = k.size(1);
    FB_CHECK(k.size(0) == P.B, op, "k must have q's batch size ", P.B, ", got shape ", k.sizes());
    P.sq_total = P.Sq;
    P.sk_total = P.Sk;
    if (has(key_padding_mask)) {
      const at::Tensor& m = *key_padding_mask;
      check_cpu(op, "key_padding_mask", m);
      FB_CHECK(m.scalar_type() == at::kBool, op, "key_padding_mask must be bool (True = real token), got ",
               m.scalar_type());
      FB_CHECK(m.dim() == 2 && m.size(0) == P.B && m.size(1) == P.Sk, op, "key_padding_mask must have shape [", P.B,
               ", ", P.Sk, "], got ", m.sizes());
      P.mask = m;
    }
    if (has(attn_bias)) {
      const at::Tensor& a = *attn_bias;
      check_cpu(op, "attn_bias", a);
      FB_CHECK(a.is_floating_point(), op, "attn_bias must be a float tensor, got ", a.scalar_type());
      FB_CHECK(a.dim() <= 4, op, "attn_bias must broadcast to [B, H, Sq, Sk], got shape ", a.sizes());
      std::vector<int64_t> full{P.B, P.H, P.Sq, P.Sk};
      for (int64_t d = 0; d < a.dim(); ++d) {
        const int64_t s = a.size(a.dim() - 1 - d), want = full[3 - d];
        FB_CHECK(s == want || s == 1, op, "attn_bias of shape ", a.sizes(),
                 " does not broadcast to [B, H, Sq, Sk] = ", at::IntArrayRef(full));
      }
      P.bias = a.expand(full);  // a stride-0 view where broadcast: nothing is materialized
    }
  }
  P.causal = causal;
  FB_CHECK(window >= -1, op, "window must be >= 0 (or -1: none), got ", window);
  P.win = window;
  P.off = P.packed ? 0 : P.Sk - P.Sq;
  FB_CHECK(!causal || P.off >= 0, op, "causal needs Sq <= Sk (queries are the last Sq of Sk positions), got Sq ", P.Sq,
           ", Sk ", P.Sk);
  P.scale = static_cast<float>(scale);
  P.drop = Dropout(dropout_p, check_dropout(op, dropout_p, seed));
  return P;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const c10::optional<at::Tensor>& key_padding_mask,
                                                 const c10::optional<at::Tensor>& attn_bias,
                                                 const c10::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
                                                 bool causal, double scale, double dropout_p,
                                                 const c10::optional<at::Tensor>& seed, int64_t window) {
  Problem P = make_problem(kFwd, q, k, v, key_padding_mask, attn_bias, cu_seqlens, max_seqlen, causal, scale, dropout_p,
                           seed, window);
  at::Tensor out = new_output(q.sizes(), q.scalar_type());
  at::Tensor lse = P.packed ? new_output({P.H, q.size(0)}, at::kFloat) : new_output({P.B, P.H, P.Sq}, at::kFloat);
  if (q.numel() == 0) return {out, lse};
  float* lp = lse.data_ptr<float>();
  FB_DISPATCH(q.scalar_type(), kFwd, [&] {
    at::parallel_for(0, P.B * P.H, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) fwd_task<scalar_t>(P, q, k, v, out, lp, t / P.H, t % P.H);
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& key_padding_mask,
    const c10::optional<at::Tensor>& attn_bias, const c10::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
    bool causal, double scale, double dropout_p, const c10::optional<at::Tensor>& seed, int64_t window) {
  Problem P = make_problem(kBwd, q, k, v, key_padding_mask, attn_bias, cu_seqlens, max_seqlen, causal, scale, dropout_p,
                           seed, window);
  for (const auto& pr : {std::make_pair("grad_out", &grad_out), std::make_pair("out", &out)}) {
    const at::Tensor& t = *pr.second;
    check_cpu(kBwd, pr.first, t);
    FB_CHECK(t.sizes() == q.sizes(), kBwd, pr.first, " must have q's shape ", q.sizes(), ", got ", t.sizes());
    FB_CHECK(t.scalar_type() == q.scalar_type(), kBwd, pr.first, " must have q's dtype ", q.scalar_type(), ", got ",
             t.scalar_type());
    FB_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, kBwd, pr.first, " must have unit stride along D, got strides ",
             t.strides());
  }
  check_cpu(kBwd, "lse", lse);
  const std::vector<int64_t> lse_shape =
      P.packed ? std::vector<int64_t>{P.H, q.size(0)} : std::vector<int64_t>{P.B, P.H, P.Sq};
  FB_CHECK(lse.scalar_type() == at::kFloat && lse.sizes() == at::IntArrayRef(lse_shape) && lse.is_contiguous(), kBwd,
           "lse must be a contiguous float32 tensor of shape ", at::IntArrayRef(lse_shape), ", got ", lse.scalar_type(),
           " ", lse.sizes());
  at::Tensor gq = new_output(q.sizes(), q.scalar_type());
  at::Tensor gk = new_output(k.sizes(), k.scalar_type());
  at::Tensor gv = new_output(v.sizes(), v.scalar_type());
  if (q.numel() == 0 && k.numel() == 0) return {gq, gk, gv};
  FB_DISPATCH(q.scalar_type(), kBwd, [&] {
    at::parallel_for(0, P.B * P.H, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) bwd_task<scalar_t>(P, grad_out, q, k, v, gq, gk, gv, t / P.H, t % P.H);
    });
  });
  return {gq, gk, gv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}

}  // namespace cpu
}  // namespace fastbert
