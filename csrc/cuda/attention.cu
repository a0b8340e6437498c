// attention: FlashAttention-2 forward and backward. fp16/bf16: matrix products on tensor cores through
// WMMA (16x16x16 fragments, fp32 accumulation); fp32: plain FMA on CUDA cores (IEEE fp32, no TF32).
//
// Math (one (batch, head) pair; rows i are queries, columns j keys; c = scale):
//   s_ij = c * q_i . k_j + bias_ij   (masked, i.e. -inf: padding key, causal j > i + Sk - Sq, j >= Sk,
//   bias < -1e20, outside the window |i + Sk - Sq - j| > w; key/query tiles outside the band are skipped)
//   P_ij = exp(s_ij - lse_i),  lse_i = log sum_j exp(s_ij)
//   Z_ij = keep_ij / (1 - p)   (dropout; Z = 1 when p = 0)
//   o_i  = sum_j Z_ij P_ij v_j
// Forward (online softmax): key tiles are visited in order; per query row we carry the running max m,
// l = sum_j exp(s_ij - m) and acc = sum_j Z_ij exp(s_ij - m) v_j. When a tile raises the max from m to
// m', l and acc are rescaled by exp(m - m'). At the end o = acc / l, lse = m + log l. A row with no
// visible key keeps m = -inf and l = 0: it writes o = 0 and lse = +inf. While m = -inf the exponentials
// use 0 in its place (exp(-inf - -inf) would be NaN).
// Backward, with dPt_ij = dO_i . v_j (the gradient w.r.t. Z_ij P_ij):
//   dV_j = sum_i Z_ij P_ij dO_i;   dP_ij = Z_ij dPt_ij
//   dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik) = P_ij (dP_ij - D_i),   D_i = dO_i . o_i
//   dQ_i = c * sum_j dS_ij k_j;   dK_j = c * sum_i dS_ij q_i      (no gradient for the bias)
// D is a row-wise dot product (delta kernel). P is recomputed from lse, with the exponent clamped at 0
// so rounding in the saved lse can never make P > 1; lse = +inf gives P = 0. dK/dV are accumulated
// per key tile over the query tiles, dQ per query tile over the key tiles, in two kernels: no atomics,
// deterministic gradients.
//
// Dropout: score (b, h, i, j), i/j local to the sequence, has Philox offset ((b*H + h)*Sq + i)*Sk + j
// (Sq = Sk = max_seqlen when packed); kept iff (r >> 1) >= floor(p * 2^31): fastbert.reference's
// stream bit for bit. The backward regenerates it.
//
// Tiling: a block of 4 warps owns one (query or key tile, head, batch). All tiles live in shared memory;
// head dims are padded to DP in {32, 64, 128} (zeros beyond the real D, which adds nothing to any dot
// product), so every D in 1..128 runs. Phases are separated by __syncthreads(); inside a phase every
// shared element is written by exactly one thread (elementwise phases: element e belongs to thread
// e mod 128; WMMA phases: a 16x16 output tile belongs to one warp), and no phase reads what it writes
// except the owner itself.
#include <mma.h>

#include <type_traits>

#include "cuda/common.cuh"

namespace fastbert {
namespace cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr float kBiasMasked = -1.0e20f;  // an additive bias below this masks its key (as the Triton op)
constexpr int kMaxSmem = 160 * 1024;     // under the opt-in limit of sm_80 (163 KiB) and sm_90 (227 KiB)

template <typename T>
constexpr bool kTensorCores = !std::is_same<T, float>::value;

// Leading dims (elements) of the shared tiles. 16-bit tiles: +8 elements keeps rows 16-byte aligned (WMMA
// ldm % 8 == 0, 128-bit stores) and staggers banks. fp32 (CUDA-core path): +1 makes the column walks of
// the dot products conflict-free. fp32 accumulators of the WMMA path: +4 (ldm % 4 == 0).
template <typename T>
constexpr int pad_in() {
  return kTensorCores<T> ? 8 : 1;
}
template <typename T>
constexpr int pad_acc() {
  return kTensorCores<T> ? 4 : 1;
}

constexpr int align128(int bytes) { return (bytes + 127) / 128 * 128; }

// ------------------------------------------------------------------------------------------------
// per-sequence bounds
// ------------------------------------------------------------------------------------------------
struct Seq {
  int start;  // first row of the sequence in the packed layout (0 when padded)
  int len_q;  // queries of this sequence
  int len_k;  // keys of this sequence
};

__device__ __forceinline__ Seq seq_bounds(const AttentionParams& p, int b) {
  if (p.cu_seqlens != nullptr) {
    const int s = p.cu_seqlens[b], e = p.cu_seqlens[b + 1];
    return {s, e - s, e - s};
  }
  return {0, p.seqlen_q, p.seqlen_k};
}

// Element (b, row, h, 0) of a [B, S, H, D] / [total, H, D] tensor (row already includes seq.start).
template <typename T>
__device__ __forceinline__ const T* row_ptr(const AttnTensor& t, int b, int64_t row, int h) {
  return static_cast<const T*>(t.ptr) + b * t.stride_b + row * t.stride_s + h * t.stride_h;
}
template <typename T>
__device__ __forceinline__ T* row_ptr(const AttnOutTensor& t, int b, int64_t row, int h) {
  return static_cast<T*>(t.ptr) + b * t.stride_b + row * t.stride_s + h * t.stride_h;
}

// ------------------------------------------------------------------------------------------------
// global -> shared: ROWS rows of D (<= DP) elements, rows >= valid and columns >= d zero-filled
// ------------------------------------------------------------------------------------------------
template <typename T, int DP, int LD, int ROWS>
__device__ __forceinline__ void load_rows(T* __restrict__ sm, const T* __restrict__ g, int64_t stride, int valid, int d,
                                          bool vec) {
  constexpr int VEC = 16 / sizeof(T);
  const T zero = from_float<T>(0.f);
  if (vec) {  // d % VEC == 0, g and stride 16-byte aligned (checked by the launcher)
    constexpr int CH = DP / VEC;
    for (int e = threadIdx.x; e < ROWS * CH; e += kThreads) {
      const int r = e / CH, c = (e % CH) * VEC;
      Vec<T, VEC> val;
      if (r < valid && c < d) {
        val = *reinterpret_cast<const Vec<T, VEC>*>(g + r * stride + c);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) val.v[i] = zero;
      }
      if ((LD * sizeof(T)) % 16 == 0) {
        *reinterpret_cast<Vec<T, VEC>*>(sm + r * LD + c) = val;
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) sm[r * LD + c + i] = val.v[i];
      }
    }
  } else {
    for (int e = threadIdx.x; e < ROWS * DP; e += kThreads) {
      const int r = e / DP, c = e % DP;
      sm[r * LD + c] = (r < valid && c < d) ? g[r * stride + c] : zero;
    }
  }
}

template <int N, int LD>
__device__ __forceinline__ void zero_acc(float* __restrict__ sm, int rows) {
  for (int e = threadIdx.x; e < rows * N; e += kThreads) sm[(e / N) * LD + e % N] = 0.f;
}

// ------------------------------------------------------------------------------------------------
// block-level matrix products on shared tiles. C is fp32. Three shapes:
//   abT:     C  = A[M][K] . B[N][K]^T      (S = Q K^T, dPt = dO V^T)
//   ab_acc:  C += A[M][K] . B[K][N]        (O += P V, dQ += dS K)
//   aTb_acc: C += A[K][M]^T . B[K][N]      (dV += (ZP)^T dO, dK += dS^T Q)
// Tensor-core versions: one warp per 16x16 tile of C (tile t -> warp t mod 4). WMMA pointers are
// 32-byte aligned: buffers start at 128-byte offsets, tile origins are multiples of 16 rows/columns and
// the leading dims are multiples of 8 (16-bit) / 4 (fp32) elements.
// CUDA-core versions: element e of C belongs to thread e mod 128; consecutive threads take consecutive
// columns, so B's columns (or rows) are walked by a warp without bank conflicts.
// ------------------------------------------------------------------------------------------------
template <typename T, int M, int N, int K>
__device__ __forceinline__ void mm_abT(const T* __restrict__ A, int lda, const T* __restrict__ B, int ldb,
                                       float* __restrict__ C, int ldc) {
  if constexpr (kTensorCores<T>) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    for (int t = warp; t < (M / 16) * (N / 16); t += kWarps) {
      const int tm = (t / (N / 16)) * 16, tn = (t % (N / 16)) * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
      wmma::fill_fragment(c, 0.f);
#pragma unroll 2
      for (int k = 0; k < K; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;  // (k, n) at B[n][k]
        wmma::load_matrix_sync(a, A + tm * lda + k, lda);
        wmma::load_matrix_sync(b, B + tn * ldb + k, ldb);
        wmma::mma_sync(c, a, b, c);
      }
      wmma::store_matrix_sync(C + tm * ldc + tn, c, ldc, wmma::mem_row_major);
    }
  } else {
    for (int e = threadIdx.x; e < M * N; e += kThreads) {
      const int m = e / N, n = e % N;
      const float* a = reinterpret_cast<const float*>(A) + m * lda;
      const float* b = reinterpret_cast<const float*>(B) + n * ldb;
      float s = 0.f;
#pragma unroll 8
      for (int k = 0; k < K; ++k) s = fmaf(a[k], b[k], s);
      C[m * ldc + n] = s;
    }
  }
}

template <typename T, int M, int N, int K>
__device__ __forceinline__ void mm_ab_acc(const T* __restrict__ A, int lda, const T* __restrict__ B, int ldb,
                                          float* __restrict__ C, int ldc) {
  if constexpr (kTensorCores<T>) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    for (int t = warp; t < (M / 16) * (N / 16); t += kWarps) {
      const int tm = (t / (N / 16)) * 16, tn = (t % (N / 16)) * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
      wmma::load_matrix_sync(c, C + tm * ldc + tn, ldc, wmma::mem_row_major);
#pragma unroll 2
      for (int k = 0; k < K; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;  // (k, n) at B[k][n]
        wmma::load_matrix_sync(a, A + tm * lda + k, lda);
        wmma::load_matrix_sync(b, B + k * ldb + tn, ldb);
        wmma::mma_sync(c, a, b, c);
      }
      wmma::store_matrix_sync(C + tm * ldc + tn, c, ldc, wmma::mem_row_major);
    }
  } else {
    for (int e = threadIdx.x; e < M * N; e += kThreads) {
      const int m = e / N, n = e % N;
      const float* a = reinterpret_cast<const float*>(A) + m * lda;
      const float* b = reinterpret_cast<const float*>(B) + n;
      float s = C[m * ldc + n];
#pragma unroll 8
      for (int k = 0; k < K; ++k) s = fmaf(a[k], b[k * ldb], s);
      C[m * ldc + n] = s;
    }
  }
}

template <typename T, int M, int N, int K>
__device__ __forceinline__ void mm_aTb_acc(const T* __restrict__ A, int lda, const T* __restrict__ B, int ldb,
                                           float* __restrict__ C, int ldc) {
  if constexpr (kTensorCores<T>) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    for (int t = warp; t < (M / 16) * (N / 16); t += kWarps) {
      const int tm = (t / (N / 16)) * 16, tn = (t % (N / 16)) * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
      wmma::load_matrix_sync(c, C + tm * ldc + tn, ldc, wmma::mem_row_major);
#pragma unroll 2
      for (int k = 0; k < K; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a;  // (m, k) at A[k][m]
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;  // (k, n) at B[k][n]
        wmma::load_matrix_sync(a, A + k * lda + tm, lda);
        wmma::load_matrix_sync(b, B + k * ldb + tn, ldb);
        wmma::mma_sync(c, a, b, c);
      }
      wmma::store_matrix_sync(C + tm * ldc + tn, c, ldc, wmma::mem_row_major);
    }
  } else {
    for (int e = threadIdx.x; e < M * N; e += kThreads) {
      const int m = e / N, n = e % N;
      const float* a = reinterpret_cast<const float*>(A) + m;
      const float* b = reinterpret_cast<const float*>(B) + n;
      float s = C[m * ldc + n];
#pragma unroll 8
      for (int k = 0; k < K; ++k) s = fmaf(a[k * lda], b[k * ldb], s);
      C[m * ldc + n] = s;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// shared pieces of the score computation
// ------------------------------------------------------------------------------------------------
struct Dropout {
  bool on;
  uint64_t seed;
  uint32_t threshold;
  float inv_keep;  // 1 / (1 - p)
};

__device__ __forceinline__ Dropout make_dropout(const AttentionParams& p, uint32_t threshold, float inv_keep) {
  Dropout d;
  d.on = p.seed != nullptr;
  d.seed = d.on ? static_cast<uint64_t>(*p.seed) : 0ull;
  d.threshold = threshold;
  d.inv_keep = inv_keep;
  return d;
}

__device__ __forceinline__ bool keep_score(const Dropout& dr, const AttentionParams& p, int b, int h, int i, int j) {
  if (!dr.on) return true;
  const uint64_t off = ((static_cast<uint64_t>(b) * p.heads + h) * static_cast<uint64_t>(p.seqlen_q) + i) *
                           static_cast<uint64_t>(p.seqlen_k) +
                       j;
  return dropout_keep(dr.seed, off, dr.threshold);
}

// Scaled, biased score of (i, j) given the raw dot product, or -inf when the key is not visible.
// kvalid: j < len_k and not padding. i < len_q is the caller's business.
// Query i sits at key position i + q_shift (bottom-right aligned: Sk - Sq, 0 when packed).
__device__ __forceinline__ float score(const AttentionParams& p, float dot, int b, int h, int i, int j, bool kvalid) {
  const int rel = j - i - p.q_shift;  // key position - query position
  if (!kvalid || (p.causal && rel > 0)) return -INFINITY;
  // |rel| > window in one unsigned compare (the binding keeps window below the sequence length)
  if (p.windowed && static_cast<unsigned>(rel + p.window) > p.window2) return -INFINITY;
  float s = dot * p.scale;
  if (p.bias != nullptr) {
    const float bv = load_as_float(
        p.bias, p.bias_dtype, b * p.bias_stride_b + h * p.bias_stride_h + i * p.bias_stride_i + j * p.bias_stride_j);
    if (!(bv >= kBiasMasked)) return -INFINITY;  // below -1e20 or -inf (a NaN bias masks too)
    s += bv;
  }
  return s;
}

// The key tiles [n_begin, n_end) that query rows [m0, m1) can see (causal, window); n_begin a multiple of BN.
template <int BN>
__device__ __forceinline__ void key_band(const AttentionParams& p, int m0, int m1, int len_k, int* n_begin,
                                         int* n_end) {
  const int shift = p.q_shift;
  *n_begin = 0;
  *n_end = len_k;
  if (p.causal) *n_end = min(*n_end, m1 + shift);
  if (p.windowed) {
    if (!p.causal) *n_end = min(*n_end, m1 + shift + p.window);
    *n_begin = max(0, m0 + shift - p.window) / BN * BN;
  }
}

// The query tiles [m_begin, m_end) that can see a key of [n0, n1) (causal, window); m_begin a multiple of BM.
template <int BM>
__device__ __forceinline__ void query_band(const AttentionParams& p, int n0, int n1, int len_q, int* m_begin,
                                           int* m_end) {
  const int shift = p.q_shift;
  int lo = 0;
  *m_end = len_q;
  if (p.causal) lo = max(0, n0 - shift);
  if (p.windowed) {
    if (!p.causal) lo = max(0, n0 - shift - p.window);
    *m_end = min(*m_end, n1 - shift + p.window);
  }
  *m_begin = lo / BM * BM;
}

// Key validity for the key tile starting at n0: kv[c] = n0 + c < len_k and the key is not padding.
template <int BN>
__device__ __forceinline__ void load_key_valid(bool* __restrict__ kv, const AttentionParams& p, int b, int n0,
                                               int len_k) {
  for (int c = threadIdx.x; c < BN; c += kThreads) {
    const int j = n0 + c;
    bool ok = j < len_k;
    if (ok && p.kpm != nullptr) ok = p.kpm[b * p.kpm_stride_b + static_cast<int64_t>(j) * p.kpm_stride_j];
    kv[c] = ok;
  }
}

// ------------------------------------------------------------------------------------------------
// tile configurations: query tile BM x key tile BN per kernel, chosen to fit shared memory
// ------------------------------------------------------------------------------------------------
template <typename T, int DP>
struct Cfg {
  static constexpr bool TC = kTensorCores<T>;
  static constexpr int FWD_BM = 64, FWD_BN = TC ? 64 : 32;
  static constexpr int DKDV_BM = 32, DKDV_BN = (TC && DP <= 64) ? 64 : 32;
  static constexpr int DQ_BM = (!TC && DP > 64) ? 32 : 64, DQ_BN = 32;
};

// Shared-memory layouts (byte offsets). P_T: the element type P/dS are handed to the matrix products in
// (T on tensor cores; fp32 on CUDA cores, where P and dS overwrite S and dPt in place).
template <typename T, int DP, int BM, int BN>
struct FwdLayout {
  static constexpr int LDT = DP + pad_in<T>(), LDS = BN + pad_acc<T>(), LDP = BN + pad_in<T>(), LDA = DP + pad_acc<T>();
  static constexpr int Q = 0;
  static constexpr int K = Q + align128(BM * LDT * sizeof(T));
  static constexpr int V = K + align128(BN * LDT * sizeof(T));
  static constexpr int S = V + align128(BN * LDT * sizeof(T));
  static constexpr int P = S + align128(BM * LDS * sizeof(float));
  static constexpr int O = P + (kTensorCores<T> ? align128(BM * LDP * sizeof(T)) : 0);
  static constexpr int KV = O + align128(BM * LDA * sizeof(float));
  static constexpr int BYTES = KV + align128(BN);
};

template <typename T, int DP, int BM, int BN>
struct BwdLayout {
  static constexpr int LDT = DP + pad_in<T>(), LDS = BN + pad_acc<T>(), LDP = BN + pad_in<T>(), LDA = DP + pad_acc<T>();
  static constexpr int Q = 0;
  static constexpr int DO = Q + align128(BM * LDT * sizeof(T));
  static constexpr int K = DO + align128(BM * LDT * sizeof(T));
  static constexpr int V = K + align128(BN * LDT * sizeof(T));
  static constexpr int S = V + align128(BN * LDT * sizeof(T));
  static constexpr int DP_ = S + align128(BM * LDS * sizeof(float));
  static constexpr int P = DP_ + align128(BM * LDS * sizeof(float));
  static constexpr int DS = P + (kTensorCores<T> ? align128(BM * LDP * sizeof(T)) : 0);
  static constexpr int ACC1 = DS + (kTensorCores<T> ? align128(BM * LDP * sizeof(T)) : 0);
  // dkdv: dK and dV [BN][LDA]; dq: dQ [BM][LDA] (ACC2 unused)
  static constexpr int ACC2 = ACC1 + align128((BM > BN ? BM : BN) * LDA * sizeof(float));
  static constexpr int ROWS = ACC2 + align128(BN * LDA * sizeof(float));  // lse, delta: 2 x BM floats
  static constexpr int KV = ROWS + align128(2 * BM * sizeof(float));
  static constexpr int BYTES = KV + align128(BN);
};

// ------------------------------------------------------------------------------------------------
// forward
// ------------------------------------------------------------------------------------------------
template <typename T, int DP, int BM, int BN>
__global__ void __launch_bounds__(kThreads)
    attention_fwd_kernel(const AttentionParams p, const AttnTensor q, const AttnTensor k,
                         const AttnTensor v,       // [B,S,H,D] / [total,H,D]
                         const AttnOutTensor out,  // q's layout
                         float* __restrict__ lse,  // [B,H,Sq] / [H,total]
                         bool vec, uint32_t threshold, float inv_keep) {
  using L = FwdLayout<T, DP, BM, BN>;
  using PT = typename std::conditional<kTensorCores<T>, T, float>::type;
  constexpr int RPW = BM / kWarps;  // softmax rows per warp
  constexpr int CPL = BN / 32;      // softmax columns per lane
  static_assert(BM % 16 == 0 && BN % 32 == 0 && DP % 16 == 0, "tile shape");
  static_assert(L::BYTES <= kMaxSmem, "shared memory");
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem + L::Q);
  T* Ks = reinterpret_cast<T*>(smem + L::K);
  T* Vs = reinterpret_cast<T*>(smem + L::V);
  float* Ss = reinterpret_cast<float*>(smem + L::S);
  PT* Ps = reinterpret_cast<PT*>(smem + (kTensorCores<T> ? L::P : L::S));  // fp32: P overwrites S
  constexpr int LDPP = kTensorCores<T> ? L::LDP : L::LDS;
  float* Os = reinterpret_cast<float*>(smem + L::O);
  bool* kv = reinterpret_cast<bool*>(smem + L::KV);

  const int b = blockIdx.z, h = blockIdx.y, m0 = blockIdx.x * BM;
  const Seq sq = seq_bounds(p, b);
  if (m0 >= sq.len_q) return;  // whole block: no barrier has been reached
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int d = p.head_dim;
  const Dropout dr = make_dropout(p, threshold, inv_keep);

  load_rows<T, DP, L::LDT, BM>(Qs, row_ptr<T>(q, b, sq.start + m0, h), q.stride_s, min(BM, sq.len_q - m0), d, vec);
  zero_acc<DP, L::LDA>(Os, BM);

  float m_i[RPW], l_i[RPW];
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    m_i[r] = -INFINITY;
    l_i[r] = 0.f;
  }
  // keys a row of this tile can see: all, or those of its band (causal, window): other tiles are skipped
  int n_begin, n_end;
  key_band<BN>(p, m0, min(m0 + BM, sq.len_q), sq.len_k, &n_begin, &n_end);

  for (int n0 = n_begin; n0 < n_end; n0 += BN) {
    __syncthreads();  // the previous tile's P.V is done with Ks, Vs, Ps (and Q/O init is visible)
    const int nvalid = min(BN, sq.len_k - n0);
    load_rows<T, DP, L::LDT, BN>(Ks, row_ptr<T>(k, b, sq.start + n0, h), k.stride_s, nvalid, d, vec);
    load_rows<T, DP, L::LDT, BN>(Vs, row_ptr<T>(v, b, sq.start + n0, h), v.stride_s, nvalid, d, vec);
    load_key_valid<BN>(kv, p, b, n0, sq.len_k);
    __syncthreads();
    mm_abT<T, BM, BN, DP>(Qs, L::LDT, Ks, L::LDT, Ss, L::LDS);
    __syncthreads();
    // online softmax: warp w owns rows w*RPW .. w*RPW+RPW-1, lane owns columns lane + 32 c
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr) {
      const int r = warp * RPW + rr, i = m0 + r;
      const bool row_ok = i < sq.len_q;
      float sv[CPL];
      float mt = -INFINITY;
#pragma unroll
      for (int cc = 0; cc < CPL; ++cc) {
        const int c = lane + 32 * cc;
        sv[cc] = row_ok ? score(p, Ss[r * L::LDS + c], b, h, i, n0 + c, kv[c]) : -INFINITY;
        mt = fmaxf(mt, sv[cc]);
      }
      mt = warp_max(mt);
      const float m_new = fmaxf(m_i[rr], mt);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = expf(m_i[rr] - m_use);  // 0 while m_i = -inf (acc and l are 0 then anyway)
      float ls = 0.f;
#pragma unroll
      for (int cc = 0; cc < CPL; ++cc) {
        const int c = lane + 32 * cc;
        const float pe = expf(sv[cc] - m_use);  // 0 for masked scores
        ls += pe;
        const float pz = (pe != 0.f && keep_score(dr, p, b, h, i, n0 + c)) ? pe * dr.inv_keep : 0.f;
        Ps[r * LDPP + c] = static_cast<PT>(from_float<PT>(pz));
      }
      l_i[rr] = l_i[rr] * alpha + warp_sum(ls);
      m_i[rr] = m_new;
      for (int c = lane; c < DP; c += 32) Os[r * L::LDA + c] *= alpha;
    }
    __syncthreads();
    mm_ab_acc<PT, BM, DP, BN>(Ps, LDPP, reinterpret_cast<const PT*>(Vs), L::LDT, Os, L::LDA);
  }
  __syncthreads();
  // epilogue: o = acc / l, lse = m + log l (row w*RPW + rr is read by the warp that wrote its m, l)
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    const int r = warp * RPW + rr, i = m0 + r;
    if (i >= sq.len_q) continue;
    const float inv_l = l_i[rr] > 0.f ? 1.0f / l_i[rr] : 0.f;
    T* o = row_ptr<T>(out, b, sq.start + i, h);
    for (int c = lane; c < d; c += 32) o[c] = from_float<T>(Os[r * L::LDA + c] * inv_l);
    if (lane == 0)
      lse[b * p.lse_stride_b + h * p.lse_stride_h + sq.start + i] = l_i[rr] > 0.f ? m_i[rr] + logf(l_i[rr]) : INFINITY;
  }
}

// ------------------------------------------------------------------------------------------------
// backward: delta = rowsum(dO * O), one warp per row
// ------------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads)
    attention_delta_kernel(const AttentionParams p, const AttnTensor grad_out, const AttnTensor out,
                           float* __restrict__ delta) {  // lse's layout
  const int b = blockIdx.z, h = blockIdx.y;
  const Seq sq = seq_bounds(p, b);
  const int i = blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (i >= sq.len_q) return;  // no barrier in this kernel
  const T* g = row_ptr<T>(grad_out, b, sq.start + i, h);
  const T* o = row_ptr<T>(out, b, sq.start + i, h);
  float s = 0.f;
  for (int c = lane; c < p.head_dim; c += 32) s += to_float(g[c]) * to_float(o[c]);
  s = warp_sum(s);
  if (lane == 0) delta[b * p.lse_stride_b + h * p.lse_stride_h + sq.start + i] = s;
}

// Recomputed P, dropout and dS for one (BM x BN) tile, elementwise (element e -> thread e mod 128).
// In: Ss (raw q.k), dPs (raw dO.v), lse/delta per row, key validity. Out: ZP (Z*P) and dS in the P_T
// buffers (on CUDA cores they overwrite Ss / dPs: the same thread reads then writes each element).
template <typename PT, int BM, int BN, int LDS, int LDP>
__device__ __forceinline__ void bwd_scores(const AttentionParams& p, const Dropout& dr, float* Ss, float* dPs, PT* ZPs,
                                           PT* dSs, const float* lse_s, const float* delta_s, const bool* kv, int b,
                                           int h, int m0, int n0, int len_q) {
  for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
    const int r = e / BN, c = e % BN, i = m0 + r, j = n0 + c;
    const float s = i < len_q ? score(p, Ss[r * LDS + c], b, h, i, j, kv[c]) : -INFINITY;
    // exponent clamped at 0: P <= 1 whatever the rounding of lse; lse = +inf or s = -inf give P = 0
    const float pe = s == -INFINITY ? 0.f : expf(fminf(s - lse_s[r], 0.f));
    const bool keep = pe != 0.f && keep_score(dr, p, b, h, i, j);
    const float z = keep ? dr.inv_keep : 0.f;
    const float ds = pe * (dPs[r * LDS + c] * z - delta_s[r]);
    ZPs[r * LDP + c] = from_float<PT>(pe * z);
    dSs[r * LDP + c] = from_float<PT>(ds);
  }
}

// Per-row lse and delta of the query tile at m0 into shared memory (+inf / 0 beyond the sequence).
template <int BM>
__device__ __forceinline__ void load_row_stats(float* lse_s, float* delta_s, const AttentionParams& p, const float* lse,
                                               const float* delta, int b, int h, int m0, const Seq& sq) {
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    const int i = m0 + r;
    const int64_t at = b * p.lse_stride_b + h * p.lse_stride_h + sq.start + i;
    lse_s[r] = i < sq.len_q ? lse[at] : INFINITY;
    delta_s[r] = i < sq.len_q ? delta[at] : 0.f;
  }
}

// dK, dV for one key tile: loop over the query tiles that can see it.
template <typename T, int DP, int BM, int BN>
__global__ void __launch_bounds__(kThreads)
    attention_bwd_dkdv_kernel(const AttentionParams p, const AttnTensor grad_out, const AttnTensor q,
                              const AttnTensor k, const AttnTensor v, const float* __restrict__ lse,
                              const float* __restrict__ delta, const AttnOutTensor grad_k, const AttnOutTensor grad_v,
                              bool vec, uint32_t threshold, float inv_keep) {
  using L = BwdLayout<T, DP, BM, BN>;
  using PT = typename std::conditional<kTensorCores<T>, T, float>::type;
  constexpr int LDPP = kTensorCores<T> ? L::LDP : L::LDS;
  static_assert(BM % 16 == 0 && BN % 16 == 0 && DP % 16 == 0, "tile shape");
  static_assert(L::BYTES <= kMaxSmem, "shared memory");
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem + L::Q);
  T* dOs = reinterpret_cast<T*>(smem + L::DO);
  T* Ks = reinterpret_cast<T*>(smem + L::K);
  T* Vs = reinterpret_cast<T*>(smem + L::V);
  float* Ss = reinterpret_cast<float*>(smem + L::S);
  float* dPs = reinterpret_cast<float*>(smem + L::DP_);
  PT* ZPs = reinterpret_cast<PT*>(smem + (kTensorCores<T> ? L::P : L::S));
  PT* dSs = reinterpret_cast<PT*>(smem + (kTensorCores<T> ? L::DS : L::DP_));
  float* dKs = reinterpret_cast<float*>(smem + L::ACC1);
  float* dVs = reinterpret_cast<float*>(smem + L::ACC2);
  float* lse_s = reinterpret_cast<float*>(smem + L::ROWS);
  float* delta_s = lse_s + BM;
  bool* kv = reinterpret_cast<bool*>(smem + L::KV);

  const int b = blockIdx.z, h = blockIdx.y, n0 = blockIdx.x * BN;
  const Seq sq = seq_bounds(p, b);
  if (n0 >= sq.len_k) return;
  const int d = p.head_dim;
  const Dropout dr = make_dropout(p, threshold, inv_keep);
  const int nvalid = min(BN, sq.len_k - n0);
  load_rows<T, DP, L::LDT, BN>(Ks, row_ptr<T>(k, b, sq.start + n0, h), k.stride_s, nvalid, d, vec);
  load_rows<T, DP, L::LDT, BN>(Vs, row_ptr<T>(v, b, sq.start + n0, h), v.stride_s, nvalid, d, vec);
  load_key_valid<BN>(kv, p, b, n0, sq.len_k);
  zero_acc<DP, L::LDA>(dKs, BN);
  zero_acc<DP, L::LDA>(dVs, BN);
  // causal / window: query tiles outside this key tile's band contribute nothing and are skipped
  int m_begin, m_end;
  query_band<BM>(p, n0, min(n0 + BN, sq.len_k), sq.len_q, &m_begin, &m_end);

  for (int m0 = m_begin; m0 < m_end; m0 += BM) {
    __syncthreads();  // previous tile's products are done with Qs, dOs, ZPs, dSs (and K/V init is visible)
    const int mvalid = min(BM, sq.len_q - m0);
    load_rows<T, DP, L::LDT, BM>(Qs, row_ptr<T>(q, b, sq.start + m0, h), q.stride_s, mvalid, d, vec);
    load_rows<T, DP, L::LDT, BM>(dOs, row_ptr<T>(grad_out, b, sq.start + m0, h), grad_out.stride_s, mvalid, d, vec);
    load_row_stats<BM>(lse_s, delta_s, p, lse, delta, b, h, m0, sq);
    __syncthreads();
    mm_abT<T, BM, BN, DP>(Qs, L::LDT, Ks, L::LDT, Ss, L::LDS);    // S   = Q K^T
    mm_abT<T, BM, BN, DP>(dOs, L::LDT, Vs, L::LDT, dPs, L::LDS);  // dPt = dO V^T
    __syncthreads();
    bwd_scores<PT, BM, BN, L::LDS, LDPP>(p, dr, Ss, dPs, ZPs, dSs, lse_s, delta_s, kv, b, h, m0, n0, sq.len_q);
    __syncthreads();
    mm_aTb_acc<PT, BN, DP, BM>(ZPs, LDPP, reinterpret_cast<const PT*>(dOs), L::LDT, dVs, L::LDA);  // dV += (ZP)^T dO
    mm_aTb_acc<PT, BN, DP, BM>(dSs, LDPP, reinterpret_cast<const PT*>(Qs), L::LDT, dKs, L::LDA);   // dK += dS^T Q
  }
  __syncthreads();
  for (int e = threadIdx.x; e < nvalid * DP; e += kThreads) {
    const int r = e / DP, c = e % DP;
    if (c >= d) continue;
    row_ptr<T>(grad_k, b, sq.start + n0 + r, h)[c] = from_float<T>(dKs[r * L::LDA + c] * p.scale);
    row_ptr<T>(grad_v, b, sq.start + n0 + r, h)[c] = from_float<T>(dVs[r * L::LDA + c]);
  }
}

// dQ for one query tile: loop over the key tiles it can see.
template <typename T, int DP, int BM, int BN>
__global__ void __launch_bounds__(kThreads)
    attention_bwd_dq_kernel(const AttentionParams p, const AttnTensor grad_out, const AttnTensor q, const AttnTensor k,
                            const AttnTensor v, const float* __restrict__ lse, const float* __restrict__ delta,
                            const AttnOutTensor grad_q, bool vec, uint32_t threshold, float inv_keep) {
  using L = BwdLayout<T, DP, BM, BN>;
  using PT = typename std::conditional<kTensorCores<T>, T, float>::type;
  constexpr int LDPP = kTensorCores<T> ? L::LDP : L::LDS;
  static_assert(BM % 16 == 0 && BN % 16 == 0 && DP % 16 == 0, "tile shape");
  static_assert(L::BYTES <= kMaxSmem, "shared memory");
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem + L::Q);
  T* dOs = reinterpret_cast<T*>(smem + L::DO);
  T* Ks = reinterpret_cast<T*>(smem + L::K);
  T* Vs = reinterpret_cast<T*>(smem + L::V);
  float* Ss = reinterpret_cast<float*>(smem + L::S);
  float* dPs = reinterpret_cast<float*>(smem + L::DP_);
  PT* ZPs = reinterpret_cast<PT*>(smem + (kTensorCores<T> ? L::P : L::S));
  PT* dSs = reinterpret_cast<PT*>(smem + (kTensorCores<T> ? L::DS : L::DP_));
  float* dQs = reinterpret_cast<float*>(smem + L::ACC1);
  float* lse_s = reinterpret_cast<float*>(smem + L::ROWS);
  float* delta_s = lse_s + BM;
  bool* kv = reinterpret_cast<bool*>(smem + L::KV);

  const int b = blockIdx.z, h = blockIdx.y, m0 = blockIdx.x * BM;
  const Seq sq = seq_bounds(p, b);
  if (m0 >= sq.len_q) return;
  const int d = p.head_dim;
  const Dropout dr = make_dropout(p, threshold, inv_keep);
  const int mvalid = min(BM, sq.len_q - m0);
  load_rows<T, DP, L::LDT, BM>(Qs, row_ptr<T>(q, b, sq.start + m0, h), q.stride_s, mvalid, d, vec);
  load_rows<T, DP, L::LDT, BM>(dOs, row_ptr<T>(grad_out, b, sq.start + m0, h), grad_out.stride_s, mvalid, d, vec);
  load_row_stats<BM>(lse_s, delta_s, p, lse, delta, b, h, m0, sq);
  zero_acc<DP, L::LDA>(dQs, BM);
  int n_begin, n_end;
  key_band<BN>(p, m0, min(m0 + BM, sq.len_q), sq.len_k, &n_begin, &n_end);

  for (int n0 = n_begin; n0 < n_end; n0 += BN) {
    __syncthreads();  // previous tile's dQ product is done with Ks, dSs (and Q/dO/stats init is visible)
    const int nvalid = min(BN, sq.len_k - n0);
    load_rows<T, DP, L::LDT, BN>(Ks, row_ptr<T>(k, b, sq.start + n0, h), k.stride_s, nvalid, d, vec);
    load_rows<T, DP, L::LDT, BN>(Vs, row_ptr<T>(v, b, sq.start + n0, h), v.stride_s, nvalid, d, vec);
    load_key_valid<BN>(kv, p, b, n0, sq.len_k);
    __syncthreads();
    mm_abT<T, BM, BN, DP>(Qs, L::LDT, Ks, L::LDT, Ss, L::LDS);    // S   = Q K^T
    mm_abT<T, BM, BN, DP>(dOs, L::LDT, Vs, L::LDT, dPs, L::LDS);  // dPt = dO V^T
    __syncthreads();
    bwd_scores<PT, BM, BN, L::LDS, LDPP>(p, dr, Ss, dPs, ZPs, dSs, lse_s, delta_s, kv, b, h, m0, n0, sq.len_q);
    __syncthreads();
    mm_ab_acc<PT, BM, DP, BN>(dSs, LDPP, reinterpret_cast<const PT*>(Ks), L::LDT, dQs, L::LDA);  // dQ += dS K
  }
  __syncthreads();
  for (int e = threadIdx.x; e < mvalid * DP; e += kThreads) {
    const int r = e / DP, c = e % DP;
    if (c >= d) continue;
    row_ptr<T>(grad_q, b, sq.start + m0 + r, h)[c] = from_float<T>(dQs[r * L::LDA + c] * p.scale);
  }
}

// ------------------------------------------------------------------------------------------------
// launchers
// ------------------------------------------------------------------------------------------------
template <typename K>
cudaError_t set_smem(K kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <typename T>
bool tensor_vec_ok(const void* ptr, int64_t sb, int64_t ss, int64_t sh) {
  constexpr int VEC = 16 / sizeof(T);
  return aligned16(ptr) && sb % VEC == 0 && ss % VEC == 0 && sh % VEC == 0;
}

inline unsigned cdiv(int a, int b) { return static_cast<unsigned>((a + b - 1) / b); }

struct DropoutHost {
  uint32_t threshold;
  float inv_keep;
};

DropoutHost dropout_host(const AttentionParams& p) {
  if (p.seed == nullptr || !(p.dropout_p > 0.0)) return {0u, 1.0f};
  return {dropout_threshold(p.dropout_p), static_cast<float>(1.0 / (1.0 - p.dropout_p))};
}

// seed == nullptr is how the kernels learn there is no dropout
AttentionParams normalize(AttentionParams p) {
  if (!(p.dropout_p > 0.0)) p.seed = nullptr;
  return p;
}

template <typename T, int DP>
cudaError_t fwd_typed(const AttentionParams& p, AttnTensor q, AttnTensor k, AttnTensor v, AttnOutTensor out, float* lse,
                      cudaStream_t stream) {
  using C = Cfg<T, DP>;
  using L = FwdLayout<T, DP, C::FWD_BM, C::FWD_BN>;
  constexpr int VEC = 16 / sizeof(T);
  const bool vec = p.head_dim % VEC == 0 && tensor_vec_ok<T>(q.ptr, q.stride_b, q.stride_s, q.stride_h) &&
                   tensor_vec_ok<T>(k.ptr, k.stride_b, k.stride_s, k.stride_h) &&
                   tensor_vec_ok<T>(v.ptr, v.stride_b, v.stride_s, v.stride_h);
  const DropoutHost dh = dropout_host(p);
  auto kernel = attention_fwd_kernel<T, DP, C::FWD_BM, C::FWD_BN>;
  cudaError_t e = set_smem(kernel, L::BYTES);
  if (e != cudaSuccess) return e;
  const dim3 grid(cdiv(p.seqlen_q, C::FWD_BM), p.heads, p.batch);
  kernel<<<grid, kThreads, L::BYTES, stream>>>(p, q, k, v, out, lse, vec, dh.threshold, dh.inv_keep);
  return cudaGetLastError();
}

template <typename T, int DP>
cudaError_t bwd_typed(const AttentionParams& p, AttnTensor grad_out, AttnTensor q, AttnTensor k, AttnTensor v,
                      AttnTensor out, const float* lse, float* delta, AttnOutTensor grad_q, AttnOutTensor grad_k,
                      AttnOutTensor grad_v, cudaStream_t stream) {
  using C = Cfg<T, DP>;
  using LKV = BwdLayout<T, DP, C::DKDV_BM, C::DKDV_BN>;
  using LQ = BwdLayout<T, DP, C::DQ_BM, C::DQ_BN>;
  constexpr int VEC = 16 / sizeof(T);
  const bool vec = p.head_dim % VEC == 0 && tensor_vec_ok<T>(q.ptr, q.stride_b, q.stride_s, q.stride_h) &&
                   tensor_vec_ok<T>(k.ptr, k.stride_b, k.stride_s, k.stride_h) &&
                   tensor_vec_ok<T>(v.ptr, v.stride_b, v.stride_s, v.stride_h) &&
                   tensor_vec_ok<T>(grad_out.ptr, grad_out.stride_b, grad_out.stride_s, grad_out.stride_h);
  const DropoutHost dh = dropout_host(p);

  attention_delta_kernel<T>
      <<<dim3(cdiv(p.seqlen_q, kWarps), p.heads, p.batch), kThreads, 0, stream>>>(p, grad_out, out, delta);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;

  if (p.seqlen_k > 0) {
    auto dkdv = attention_bwd_dkdv_kernel<T, DP, C::DKDV_BM, C::DKDV_BN>;
    if ((e = set_smem(dkdv, LKV::BYTES)) != cudaSuccess) return e;
    dkdv<<<dim3(cdiv(p.seqlen_k, C::DKDV_BN), p.heads, p.batch), kThreads, LKV::BYTES, stream>>>(
        p, grad_out, q, k, v, lse, delta, grad_k, grad_v, vec, dh.threshold, dh.inv_keep);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
  }
  if (p.seqlen_q > 0) {
    auto dq = attention_bwd_dq_kernel<T, DP, C::DQ_BM, C::DQ_BN>;
    if ((e = set_smem(dq, LQ::BYTES)) != cudaSuccess) return e;
    dq<<<dim3(cdiv(p.seqlen_q, C::DQ_BM), p.heads, p.batch), kThreads, LQ::BYTES, stream>>>(
        p, grad_out, q, k, v, lse, delta, grad_q, vec, dh.threshold, dh.inv_keep);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
  }
  return cudaSuccess;
}

int padded_head_dim(int d) { return d <= 32 ? 32 : (d <= 64 ? 64 : 128); }

template <typename F>
cudaError_t dispatch(const AttentionParams& p, F&& f) {
  if (!attention_supports_head_dim(p.head_dim)) return cudaErrorInvalidValue;
  if (p.batch <= 0 || p.heads <= 0 || p.seqlen_q <= 0) return cudaSuccess;  // nothing to compute
  if (p.batch > 65535 || p.heads > 65535) return cudaErrorInvalidValue;     // grid.z / grid.y limits
  const int dp = padded_head_dim(p.head_dim);
  switch (p.dtype) {
    case DType::kFloat16:
      return dp == 32 ? f(__half{}, std::integral_constant<int, 32>{})
                      : (dp == 64 ? f(__half{}, std::integral_constant<int, 64>{})
                                  : f(__half{}, std::integral_constant<int, 128>{}));
    case DType::kBFloat16:
      return dp == 32 ? f(__nv_bfloat16{}, std::integral_constant<int, 32>{})
                      : (dp == 64 ? f(__nv_bfloat16{}, std::integral_constant<int, 64>{})
                                  : f(__nv_bfloat16{}, std::integral_constant<int, 128>{}));
    default:
      return dp == 32 ? f(float{}, std::integral_constant<int, 32>{})
                      : (dp == 64 ? f(float{}, std::integral_constant<int, 64>{})
                                  : f(float{}, std::integral_constant<int, 128>{}));
  }
}

}  // namespace

bool attention_supports_head_dim(int head_dim) { return head_dim >= 1 && head_dim <= 128; }

cudaError_t attention_fwd(const AttentionParams& params, AttnTensor q, AttnTensor k, AttnTensor v, AttnOutTensor out,
                          float* lse, cudaStream_t stream) {
  const AttentionParams p = normalize(params);
  return dispatch(
      p, [&](auto t, auto dp) { return fwd_typed<decltype(t), decltype(dp)::value>(p, q, k, v, out, lse, stream); });
}

cudaError_t attention_bwd(const AttentionParams& params, AttnTensor grad_out, AttnTensor q, AttnTensor k, AttnTensor v,
                          AttnTensor out, const float* lse, float* delta, AttnOutTensor grad_q, AttnOutTensor grad_k,
                          AttnOutTensor grad_v, cudaStream_t stream) {
  const AttentionParams p = normalize(params);
  if (p.seqlen_q <= 0 && p.seqlen_k > 0 && p.batch > 0 && p.heads > 0) {
    // no queries: dK = dV = 0 is the binding's business (it zero-fills); nothing to launch
    return cudaSuccess;
  }
  return dispatch(p, [&](auto t, auto dp) {
    return bwd_typed<decltype(t), decltype(dp)::value>(p, grad_out, q, k, v, out, lse, delta, grad_q, grad_k, grad_v,
                                                       stream);
  });
}

}  // namespace cuda
}  // namespace fastbert
