// add_layer_norm: out = LayerNorm(dropout(x + x_bias) + residual) over rows of length n <= 8192.
//
// Work split: a "group" of G threads (G a power of two, 32..1024) owns one row at a time; each thread
// holds at most MAXV vectors of VEC elements of the row in registers (VEC = 16 bytes / sizeof(T) when
// n and every pointer allow 128-bit accesses, else 1). G is the smallest power of two that covers the
// row, so small rows get a warp each (G = 32, several rows per block) and large rows a whole block.
// Every group of a block runs the same number of row iterations (inactive groups compute nothing but
// still reach the barriers), so the block-wide barriers of a G > 32 reduction are never divergent.
//
// Forward, per row (statistics in fp32, two passes over the registers, biased variance as torch):
//   h = keep(x + x_bias) / (1 - p) + residual;  mean = sum(h) / n;  var = sum((h - mean)^2) / n
//   rstd = 1 / sqrt(var + eps);  out = (h - mean) * rstd * w + b
// Backward, with xhat = (h - mean) * rstd and dy = grad_out * w (h recomputed, mean/rstd saved):
//   d out_j / d h_k = rstd * w_j * (delta_jk - 1/n - xhat_j xhat_k / n), hence
//   grad_pre = rstd * (dy - mean(dy) - xhat * mean(dy * xhat))
//   grad_x = grad_pre * keep / (1 - p);  grad_x_bias = sum_rows grad_x (grad_pre when p == 0)
//   grad_weight = sum_rows grad_out * xhat;  grad_bias = sum_rows grad_out
// The column sums are deterministic: each block sums its rows into a workspace row, then one small
// kernel adds the workspace rows in a fixed order.
// Pre-norm models (return_residual=True): the forward also stores h (pre_out, rounded once to T), and the
// backward adds h's incoming gradient (grad_pre_in) to grad_pre in fp32, before the dropout mask and the
// x_bias column sum. Both pointers may be nullptr; a missing LayerNorm weight arrives as ones (binding).
#include <initializer_list>
#include <type_traits>

#include "cuda/common.cuh"

namespace fastbert {
namespace cuda {
namespace {

constexpr int kMinBlock = 128;
constexpr int kMaxThreadsPerSM = 2048;

// Sum of v over the G threads of this thread's group. red: >= blockDim / 32 floats of shared memory.
template <int G>
__device__ __forceinline__ float group_sum(float v, float* red) {
  v = warp_sum(v);
  if (G == 32) return v;
  constexpr int kWarps = G / 32;
  const int warp = threadIdx.x / 32;
  const int first = (threadIdx.x / G) * kWarps;  // first warp of this group
  if ((threadIdx.x & 31) == 0) red[warp] = v;
  __syncthreads();
  float t = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) t += red[first + w];
  __syncthreads();  // red is reused by the next call
  return t;
}

template <int VEC>
__device__ __forceinline__ void load_params(const float* p, int64_t col, float (&out)[VEC]) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = p[col + j];
}

// Load x (+ x_bias), apply dropout, add residual: the pre-norm sum h of VEC elements at (row, col).
template <typename T, int VEC>
__device__ __forceinline__ void load_pre(const T* x, const T* residual, const float* x_bias, int64_t row, int64_t col,
                                         int64_t n, bool dropout, uint64_t seed, uint32_t threshold, float inv_keep,
                                         float (&h)[VEC], bool (&keep)[VEC]) {
  load_vec<T, VEC>(x + row * n + col, h);
  if (x_bias != nullptr) {
    float b[VEC];
    load_params<VEC>(x_bias, col, b);
#pragma unroll
    for (int j = 0; j < VEC; ++j) h[j] += b[j];
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    keep[j] = true;
    if (dropout) {
      keep[j] = dropout_keep(seed, static_cast<uint64_t>(row * n + col + j), threshold);
      h[j] = keep[j] ? h[j] * inv_keep : 0.f;
    }
  }
  if (residual != nullptr) {
    float r[VEC];
    load_vec<T, VEC>(residual + row * n + col, r);
#pragma unroll
    for (int j = 0; j < VEC; ++j) h[j] += r[j];
  }
}

template <typename T, int VEC, int MAXV, int G>
__global__ void __launch_bounds__(G < kMinBlock ? kMinBlock : G)
    add_layer_norm_fwd_kernel(const T* __restrict__ x,           // [rows, n]
                              const T* __restrict__ residual,    // [rows, n] or nullptr
                              const float* __restrict__ x_bias,  // [n] or nullptr
                              const float* __restrict__ weight,  // [n]
                              const float* __restrict__ bias,    // [n] or nullptr
                              T* __restrict__ out,               // [rows, n]
                              T* __restrict__ pre_out,           // [rows, n] the pre-norm sum h, or nullptr
                              float* __restrict__ mean_out,      // [rows]
                              float* __restrict__ rstd_out,      // [rows]
                              int64_t rows, int64_t n, float eps, float inv_keep, uint32_t threshold,
                              const int64_t* __restrict__ seed_ptr) {
  constexpr int GPB = (G < kMinBlock ? kMinBlock : G) / G;  // row groups per block
  __shared__ float red[(G < kMinBlock ? kMinBlock : G) / 32];
  const int group = threadIdx.x / G, lane = threadIdx.x % G;
  const int64_t nvec = n / VEC;
  const bool dropout = seed_ptr != nullptr;
  const uint64_t seed = dropout ? static_cast<uint64_t>(*seed_ptr) : 0ull;
  const float inv_n = 1.0f / static_cast<float>(n);

  for (int64_t base = static_cast<int64_t>(blockIdx.x) * GPB; base < rows;
       base += static_cast<int64_t>(gridDim.x) * GPB) {
    const int64_t row = base + group;
    const bool active = row < rows;
    float h[MAXV][VEC];
    bool keep[MAXV][VEC];
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < MAXV; ++k) {
      const int64_t v = lane + static_cast<int64_t>(k) * G;
      if (active && v < nvec) {
        load_pre<T, VEC>(x, residual, x_bias, row, v * VEC, n, dropout, seed, threshold, inv_keep, h[k], keep[k]);
        if (pre_out != nullptr) store_vec<T, VEC>(pre_out + row * n + v * VEC, h[k]);
#pragma unroll
        for (int j = 0; j < VEC; ++j) s += h[k][j];
      }
    }
    const float mean = group_sum<G>(s, red) * inv_n;
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < MAXV; ++k) {
      const int64_t v = lane + static_cast<int64_t>(k) * G;
      if (active && v < nvec) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = h[k][j] - mean;
          ss += d * d;
        }
      }
    }
    const float var = group_sum<G>(ss, red) * inv_n;
    const float rstd = 1.0f / sqrtf(var + eps);
    if (!active) continue;  // uniform per group; no barrier follows in this iteration
#pragma unroll
    for (int k = 0; k < MAXV; ++k) {
      const int64_t v = lane + static_cast<int64_t>(k) * G;
      if (v < nvec) {
        const int64_t col = v * VEC;
        float w[VEC], y[VEC];
        load_params<VEC>(weight, col, w);
#pragma unroll
        for (int j = 0; j < VEC; ++j) y[j] = (h[k][j] - mean) * rstd * w[j];
        if (bias != nullptr) {
          float b[VEC];
          load_params<VEC>(bias, col, b);
#pragma unroll
          for (int j = 0; j < VEC; ++j) y[j] += b[j];
        }
        store_vec<T, VEC>(out + row * n + col, y);
      }
    }
    if (lane == 0) {
      mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
  }
}

// Writes grad_pre (and grad_x), and per-block column partial sums to workspace[blockIdx.x][3][n]
// (0: grad_weight, 1: grad_bias, 2: grad_x_bias). The partials accumulate in dynamic shared memory,
// acc[group][3][n] (bwd_smem_bytes): each column of a group's slice is owned by one thread of the
// group, so the row loop needs no barrier for them; registers stay free for the row itself.
template <typename T, int VEC, int MAXV, int G>
__global__ void __launch_bounds__(G < kMinBlock ? kMinBlock : G)
    add_layer_norm_bwd_kernel(const T* __restrict__ grad_out,     // [rows, n]
                              const T* __restrict__ x,            // [rows, n]
                              const T* __restrict__ residual,     // [rows, n] or nullptr
                              const float* __restrict__ x_bias,   // [n] or nullptr
                              const float* __restrict__ weight,   // [n]
                              const float* __restrict__ mean_in,  // [rows]
                              const float* __restrict__ rstd_in,  // [rows]
                              const T* __restrict__ grad_pre_in,  // [rows, n] gradient of h's own output, or nullptr
                              T* __restrict__ grad_pre,           // [rows, n]
                              T* __restrict__ grad_x,             // [rows, n] or nullptr (no dropout)
                              float* __restrict__ workspace,      // [gridDim.x, 3, n]
                              int64_t rows, int64_t n, float inv_keep, uint32_t threshold,
                              const int64_t* __restrict__ seed_ptr) {
  constexpr int BLOCK = G < kMinBlock ? kMinBlock : G;
  constexpr int GPB = BLOCK / G;
  __shared__ float red[BLOCK / 32];
  extern __shared__ float acc[];  // [GPB][3][n]
  const int group = threadIdx.x / G, lane = threadIdx.x % G;
  const int64_t nvec = n / VEC;
  const bool dropout = seed_ptr != nullptr;
  const uint64_t seed = dropout ? static_cast<uint64_t>(*seed_ptr) : 0ull;
  const float inv_n = 1.0f / static_cast<float>(n);
  float* my_acc = acc + static_cast<int64_t>(group) * 3 * n;

  for (int64_t c = threadIdx.x; c < GPB * 3 * n; c += BLOCK) acc[c] = 0.f;
  __syncthreads();

  for (int64_t base = static_cast<int64_t>(blockIdx.x) * GPB; base < rows;
       base += static_cast<int64_t>(gridDim.x) * GPB) {
    const int64_t row = base + group;
    const bool active = row < rows;
    const float mean = active ? mean_in[row] : 0.f;
    const float rstd = active ? rstd_in[row] : 0.f;
    float xhat[MAXV][VEC], dy[MAXV][VEC];
    bool keep[MAXV][VEC];
    float s_dy = 0.f, s_dyx = 0.f;
#pragma unroll
    for (int k = 0; k < MAXV; ++k) {
      const int64_t v = lane + static_cast<int64_t>(k) * G;
      if (active && v < nvec) {
        const int64_t col = v * VEC;
        float h[VEC], w[VEC], g[VEC];
        load_pre<T, VEC>(x, residual, x_bias, row, col, n, dropout, seed, threshold, inv_keep, h, keep[k]);
        load_vec<T, VEC>(grad_out + row * n + col, g);
        load_params<VEC>(weight, col, w);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          xhat[k][j] = (h[j] - mean) * rstd;
          dy[k][j] = g[j] * w[j];
          s_dy += dy[k][j];
          s_dyx += dy[k][j] * xhat[k][j];
          my_acc[col + j] += g[j] * xhat[k][j];
          my_acc[n + col + j] += g[j];
        }
      }
    }
    const float mean_dy = group_sum<G>(s_dy, red) * inv_n;
    const float mean_dyx = group_sum<G>(s_dyx, red) * inv_n;
    if (!active) continue;  // no barrier follows in this iteration
#pragma unroll
    for (int k = 0; k < MAXV; ++k) {
      const int64_t v = lane + static_cast<int64_t>(k) * G;
      if (v < nvec) {
        const int64_t col = v * VEC;
        float dpre[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) dpre[j] = rstd * (dy[k][j] - mean_dy - xhat[k][j] * mean_dyx);
        if (grad_pre_in != nullptr) {
          float gin[VEC];
          load_vec<T, VEC>(grad_pre_in + row * n + col, gin);
#pragma unroll
          for (int j = 0; j < VEC; ++j) dpre[j] += gin[j];
        }
        store_vec<T, VEC>(grad_pre + row * n + col, dpre);
        if (dropout) {
          float dx[VEC];
#pragma unroll
          for (int j = 0; j < VEC; ++j) dx[j] = keep[k][j] ? dpre[j] * inv_keep : 0.f;
          store_vec<T, VEC>(grad_x + row * n + col, dx);
#pragma unroll
          for (int j = 0; j < VEC; ++j) my_acc[2 * n + col + j] += dx[j];
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j) my_acc[2 * n + col + j] += dpre[j];
        }
      }
    }
  }

  // Groups' partials (fixed group order: deterministic) -> workspace row blockIdx.x.
  __syncthreads();
  float* ws = workspace + static_cast<int64_t>(blockIdx.x) * 3 * n;
  for (int64_t c = threadIdx.x; c < 3 * n; c += BLOCK) {
    float t = 0.f;
#pragma unroll
    for (int q = 0; q < GPB; ++q) t += acc[q * 3 * n + c];
    ws[c] = t;
  }
}

// Column sums of the workspace rows: out_a[c] = sum_b workspace[b][a][c]. Block (32, 8): threadIdx.x picks
// a column, threadIdx.y a slice of the workspace rows (b = y, y + 8, ...); the 8 slice sums are then
// added in slice order, so the result does not depend on scheduling.
constexpr int kSumCols = 32, kSumSlices = 8;
__global__ void __launch_bounds__(kSumCols* kSumSlices)
    column_sum_kernel(const float* __restrict__ workspace,  // [nblocks, 3, n]
                      int nblocks, int64_t n,
                      float* __restrict__ grad_weight,    // [n]
                      float* __restrict__ grad_bias,      // [n] or nullptr
                      float* __restrict__ grad_x_bias) {  // [n] or nullptr
  __shared__ float part[3][kSumSlices][kSumCols];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kSumCols + threadIdx.x;
  float s0 = 0.f, s1 = 0.f, s2 = 0.f;
  if (c < n) {
    for (int b = threadIdx.y; b < nblocks; b += kSumSlices) {
      const float* r = workspace + static_cast<int64_t>(b) * 3 * n;
      s0 += r[c];
      s1 += r[n + c];
      s2 += r[2 * n + c];
    }
  }
  part[0][threadIdx.y][threadIdx.x] = s0;
  part[1][threadIdx.y][threadIdx.x] = s1;
  part[2][threadIdx.y][threadIdx.x] = s2;
  __syncthreads();
  if (threadIdx.y == 0 && c < n) {
    float t0 = 0.f, t1 = 0.f, t2 = 0.f;
#pragma unroll
    for (int y = 0; y < kSumSlices; ++y) {
      t0 += part[0][y][threadIdx.x];
      t1 += part[1][y][threadIdx.x];
      t2 += part[2][y][threadIdx.x];
    }
    grad_weight[c] = t0;
    if (grad_bias != nullptr) grad_bias[c] = t1;
    if (grad_x_bias != nullptr) grad_x_bias[c] = t2;
  }
}

// ------------------------------------------------------------------------------------------------
// launch configuration
// ------------------------------------------------------------------------------------------------
// MAXV: vectors per thread. 128-bit path: 2 (<= 16 values); scalar path: 8. Then G covers the row.
template <int VEC>
constexpr int maxv_for() {
  return VEC > 1 ? 2 : 8;
}

inline int group_size(int64_t nvec, int maxv) {
  int g = 32;
  while (g < 1024 && static_cast<int64_t>(g) * maxv < nvec) g *= 2;
  return g;
}

inline size_t bwd_smem_bytes(int g, int64_t n) {
  const int gpb = (g < kMinBlock ? kMinBlock : g) / g;
  return static_cast<size_t>(gpb) * 3 * static_cast<size_t>(n) * sizeof(float);
}

// Upper bound of the backward grid for any configuration: rows, and the resident-block limit of the
// smallest block (128 threads). The workspace is sized from it.
inline int64_t bwd_grid_bound(int64_t rows, int sm_count) {
  const int64_t cap = static_cast<int64_t>(sm_count > 0 ? sm_count : 1) * (kMaxThreadsPerSM / kMinBlock);
  return rows < cap ? rows : cap;
}

struct Common {
  const void *x, *residual;
  const float *x_bias, *weight;
  int64_t rows, n;
  float inv_keep;
  uint32_t threshold;
  const int64_t* seed;
};

template <typename T, int VEC, int G>
cudaError_t fwd_launch(const Common& c, const float* bias, void* out, void* pre, float* mean, float* rstd, float eps,
                       cudaStream_t stream) {
  constexpr int MAXV = maxv_for<VEC>();
  constexpr int BLOCK = G < kMinBlock ? kMinBlock : G;
  constexpr int GPB = BLOCK / G;
  int64_t grid = (c.rows + GPB - 1) / GPB;
  if (grid > (1 << 24)) grid = 1 << 24;  // the row loop strides over the rest
  add_layer_norm_fwd_kernel<T, VEC, MAXV, G><<<static_cast<unsigned>(grid), BLOCK, 0, stream>>>(
      static_cast<const T*>(c.x), static_cast<const T*>(c.residual), c.x_bias, c.weight, bias, static_cast<T*>(out),
      static_cast<T*>(pre), mean, rstd, c.rows, c.n, eps, c.inv_keep, c.threshold, c.seed);
  return cudaGetLastError();
}

template <typename T, int VEC, int G>
cudaError_t bwd_launch(const Common& c, const void* grad_out, const void* grad_pre_in, const float* mean,
                       const float* rstd, void* grad_pre, void* grad_x, float* grad_weight, float* grad_bias,
                       float* grad_x_bias, float* workspace, int sm_count, cudaStream_t stream) {
  constexpr int MAXV = maxv_for<VEC>();
  constexpr int BLOCK = G < kMinBlock ? kMinBlock : G;
  constexpr int GPB = BLOCK / G;
  int64_t grid = (c.rows + GPB - 1) / GPB;
  const int64_t resident = static_cast<int64_t>(sm_count > 0 ? sm_count : 1) * (kMaxThreadsPerSM / BLOCK);
  if (grid > resident) grid = resident;  // <= bwd_grid_bound: the workspace has room
  if (grid > 0) {
    // GPB * 3 * n floats: <= 24 KiB when GPB > 1 (n <= 64 * MAXV * VEC <= 1024 there), up to 96 KiB for
    // n = 8192 with one row per block. The 48 KiB default limit counts the static `red` array too
    // (BLOCK / 32 floats), so n = 4096 (exactly 48 KiB dynamic) already needs the opt-in: found on an
    // H100, where the launch failed with cudaErrorInvalidValue.
    const size_t smem = bwd_smem_bytes(G, c.n);
    auto kernel = add_layer_norm_bwd_kernel<T, VEC, MAXV, G>;
    if (smem + (BLOCK / 32) * sizeof(float) > 48 * 1024) {
      cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (e != cudaSuccess) return e;
    }
    kernel<<<static_cast<unsigned>(grid), BLOCK, smem, stream>>>(
        static_cast<const T*>(grad_out), static_cast<const T*>(c.x), static_cast<const T*>(c.residual), c.x_bias,
        c.weight, mean, rstd, static_cast<const T*>(grad_pre_in), static_cast<T*>(grad_pre), static_cast<T*>(grad_x),
        workspace, c.rows, c.n, c.inv_keep, c.threshold, c.seed);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  // grid == 0 (no rows): the column sums are zeros
  const int64_t cblocks = (c.n + kSumCols - 1) / kSumCols;
  column_sum_kernel<<<static_cast<unsigned>(cblocks), dim3(kSumCols, kSumSlices), 0, stream>>>(
      workspace, static_cast<int>(grid), c.n, grad_weight, grad_bias, grad_x_bias);
  return cudaGetLastError();
}

// Run f(G) for the group size g (a power of two in [32, MAXG]). MAXG bounds the instantiations to the
// group sizes n <= 8192 can ask for (16-bit types on the 128-bit path never need more than 512).
template <int MAXG, typename F>
cudaError_t with_group(int g, F&& f) {
  switch (g) {
    case 32:
      return f(std::integral_constant<int, 32>{});
    case 64:
      return f(std::integral_constant<int, 64>{});
    case 128:
      return f(std::integral_constant<int, 128>{});
    case 256:
      return f(std::integral_constant<int, 256>{});
    case 512:
      return f(std::integral_constant<int, 512>{});
    default:
      return f(std::integral_constant<int, MAXG>{});
  }
}

// Largest group the 128-bit path needs for n <= kMaxLayerNormHidden.
template <int VEC>
constexpr int max_group_vec() {
  return kMaxLayerNormHidden / VEC / maxv_for<VEC>() <= 512 ? 512 : 1024;
}

template <typename T>
bool can_vectorize(int64_t n, std::initializer_list<const void*> act, std::initializer_list<const float*> params) {
  constexpr int kVec = 16 / sizeof(T);
  if (n % kVec != 0) return false;
  for (const void* p : act)
    if (p != nullptr && !aligned16(p)) return false;
  (void)params;  // parameters are read element by element (they stay in L1/L2), no alignment needed
  return true;
}

template <typename T>
cudaError_t fwd_typed(const Common& c, const float* bias, void* out, void* pre, float* mean, float* rstd, float eps,
                      cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  if (can_vectorize<T>(c.n, {c.x, c.residual, out, pre}, {})) {
    const int g = group_size(c.n / kVec, maxv_for<kVec>());
    return with_group<max_group_vec<kVec>()>(
        g, [&](auto G) { return fwd_launch<T, kVec, decltype(G)::value>(c, bias, out, pre, mean, rstd, eps, stream); });
  }
  const int g = group_size(c.n, maxv_for<1>());
  return with_group<1024>(
      g, [&](auto G) { return fwd_launch<T, 1, decltype(G)::value>(c, bias, out, pre, mean, rstd, eps, stream); });
}

template <typename T>
cudaError_t bwd_typed(const Common& c, const void* grad_out, const void* grad_pre_in, const float* mean,
                      const float* rstd, void* grad_pre, void* grad_x, float* grad_weight, float* grad_bias,
                      float* grad_x_bias, float* workspace, int sm_count, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  if (can_vectorize<T>(c.n, {c.x, c.residual, grad_out, grad_pre_in, grad_pre, grad_x}, {})) {
    const int g = group_size(c.n / kVec, maxv_for<kVec>());
    return with_group<max_group_vec<kVec>()>(g, [&](auto G) {
      return bwd_launch<T, kVec, decltype(G)::value>(c, grad_out, grad_pre_in, mean, rstd, grad_pre, grad_x,
                                                     grad_weight, grad_bias, grad_x_bias, workspace, sm_count, stream);
    });
  }
  const int g = group_size(c.n, maxv_for<1>());
  return with_group<1024>(g, [&](auto G) {
    return bwd_launch<T, 1, decltype(G)::value>(c, grad_out, grad_pre_in, mean, rstd, grad_pre, grad_x, grad_weight,
                                                grad_bias, grad_x_bias, workspace, sm_count, stream);
  });
}

Common make_common(const void* x, const void* residual, const float* x_bias, const float* weight, int64_t rows,
                   int64_t n, double dropout_p, const int64_t* seed) {
  Common c;
  c.x = x;
  c.residual = residual;
  c.x_bias = x_bias;
  c.weight = weight;
  c.rows = rows;
  c.n = n;
  const bool dropout = dropout_p > 0.0;
  c.inv_keep = dropout ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 1.0f;
  c.threshold = dropout ? dropout_threshold(dropout_p) : 0u;
  c.seed = dropout ? seed : nullptr;  // nullptr tells the kernels: no dropout
  return c;
}

}  // namespace

cudaError_t add_layer_norm_fwd(DType dtype, const void* x, const void* residual, const float* x_bias,
                               const float* weight, const float* bias, void* out, void* pre, float* mean, float* rstd,
                               int64_t rows, int64_t n, float eps, double dropout_p, const int64_t* seed,
                               cudaStream_t stream) {
  if (rows <= 0 || n <= 0) return cudaSuccess;
  if (n > kMaxLayerNormHidden) return cudaErrorInvalidValue;
  const Common c = make_common(x, residual, x_bias, weight, rows, n, dropout_p, seed);
  switch (dtype) {
    case DType::kFloat16:
      return fwd_typed<__half>(c, bias, out, pre, mean, rstd, eps, stream);
    case DType::kBFloat16:
      return fwd_typed<__nv_bfloat16>(c, bias, out, pre, mean, rstd, eps, stream);
    default:
      return fwd_typed<float>(c, bias, out, pre, mean, rstd, eps, stream);
  }
}

int64_t add_layer_norm_bwd_workspace_bytes(int64_t rows, int64_t n, int device_sm_count) {
  return bwd_grid_bound(rows, device_sm_count) * 3 * n * static_cast<int64_t>(sizeof(float));
}

cudaError_t add_layer_norm_bwd(DType dtype, const void* grad_out, const void* grad_pre_in, const void* x,
                               const void* residual, const float* x_bias, const float* weight, const float* mean,
                               const float* rstd, void* grad_pre, void* grad_x, float* grad_weight, float* grad_bias,
                               float* grad_x_bias, int64_t rows, int64_t n, double dropout_p, const int64_t* seed,
                               float* workspace, int device_sm_count, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (n > kMaxLayerNormHidden) return cudaErrorInvalidValue;
  if (rows < 0) return cudaErrorInvalidValue;
  const Common c = make_common(x, residual, x_bias, weight, rows, n, dropout_p, seed);
  if (c.seed != nullptr && grad_x == nullptr) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat16:
      return bwd_typed<__half>(c, grad_out, grad_pre_in, mean, rstd, grad_pre, grad_x, grad_weight, grad_bias,
                               grad_x_bias, workspace, device_sm_count, stream);
    case DType::kBFloat16:
      return bwd_typed<__nv_bfloat16>(c, grad_out, grad_pre_in, mean, rstd, grad_pre, grad_x, grad_weight, grad_bias,
                                      grad_x_bias, workspace, device_sm_count, stream);
    default:
      return bwd_typed<float>(c, grad_out, grad_pre_in, mean, rstd, grad_pre, grad_x, grad_weight, grad_bias,
                              grad_x_bias, workspace, device_sm_count, stream);
  }
}

}  // namespace cuda
}  // namespace fastbert
