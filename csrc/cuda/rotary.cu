// rotary: the rotary position embedding (transformers' rotate_half convention) and its backward. With
// x = (x1, x2) the halves of a head and c, s the halves of the cos/sin row of the token's position:
//   forward   y1 = x1 c1 - x2 s1,    y2 = x2 c2 + x1 s2
//   backward  dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1   (the transposed rotation)
// One thread per (token, head, pair j < D/2), grid-stride; fp32 arithmetic, one rounding at the store,
// as csrc/cpu/rotary.cpp. Packed tokens find their sequence by binary search over cu_seqlens (log2 B
// cached loads). Inputs are read through their strides (views of a fused QKV projection); out is
// contiguous [tokens, H, D]. Unverified on a GPU so far: compile-checked only (tests/test_cuda_compile.py).
#include "cuda/common.cuh"

namespace fastbert {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, typename CT>
__global__ void rotary_kernel(const T* __restrict__ x,          // [B, S, H, D], strides below, unit along D
                              const CT* __restrict__ cos,       // table rows, unit stride along D
                              const CT* __restrict__ sin,       // cos's layout
                              const int64_t* __restrict__ pos,  // [B, S] positions or nullptr
                              const int32_t* __restrict__ cu,   // [n_seqs + 1] or nullptr (packed: B == 1)
                              T* __restrict__ out,              // [B * S, H, D] contiguous
                              int64_t seqlen, int64_t heads, int64_t half, int64_t sxb, int64_t sxs, int64_t sxh,
                              int64_t scb, int64_t scs, int64_t n_seqs, int64_t total, bool backward) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = i % half;
    const int64_t th = i / half;  // token * heads + head
    const int64_t h = th % heads;
    const int64_t t = th / heads;
    const int64_t b = t / seqlen, s = t % seqlen;
    int64_t base;
    if (cu != nullptr) {
      // largest q < n_seqs with cu[q] <= t (empty sequences repeat a start: the last of them)
      int64_t lo = 0, hi = n_seqs;
      while (hi - lo > 1) {
        const int64_t mid = (lo + hi) / 2;
        if (cu[mid] <= t)
          lo = mid;
        else
          hi = mid;
      }
      base = (t - cu[lo]) * scs;
    } else if (pos != nullptr) {
      base = pos[t] * scs;
    } else {
      base = b * scb + s * scs;
    }
    const float c1 = to_float(cos[base + j]), c2 = to_float(cos[base + half + j]);
    const float s1 = to_float(sin[base + j]), s2 = to_float(sin[base + half + j]);
    const T* xp = x + b * sxb + s * sxs + h * sxh;
    const float x1 = to_float(xp[j]), x2 = to_float(xp[half + j]);
    float y1, y2;
    if (backward) {
      y1 = x1 * c1 + x2 * s2;
      y2 = x2 * c2 - x1 * s1;
    } else {
      y1 = x1 * c1 - x2 * s1;
      y2 = x2 * c2 + x1 * s2;
    }
    T* op = out + th * 2 * half;
    op[j] = from_float<T>(y1);
    op[half + j] = from_float<T>(y2);
  }
}

template <typename T, typename CT>
cudaError_t launch(const RotaryParams& p, const RotaryInput& x, void* out, cudaStream_t stream) {
  const int64_t half = p.head_dim / 2;
  const int64_t total = p.batch * p.seqlen * x.heads * half;
  if (total <= 0) return cudaSuccess;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  const int grid = static_cast<int>(blocks < 65536 ? blocks : 65536);
  rotary_kernel<T, CT><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(x.ptr), static_cast<const CT*>(p.cos), static_cast<const CT*>(p.sin), p.position_ids,
      p.cu_seqlens, static_cast<T*>(out), p.seqlen, x.heads, half, x.stride_b, x.stride_s, x.stride_h, p.table_stride_b,
      p.table_stride_s, p.n_seqs, total, p.backward);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_table(const RotaryParams& p, const RotaryInput& x, void* out, cudaStream_t stream) {
  if (p.table_dtype == DType::kFloat32) return launch<T, float>(p, x, out, stream);
  return launch<T, T>(p, x, out, stream);  // the binding allows only fp32 or x's dtype
}

}  // namespace

cudaError_t rotary(const RotaryParams& p, const RotaryInput& x, void* out, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat16:
      return launch_table<__half>(p, x, out, stream);
    case DType::kBFloat16:
      return launch_table<__nv_bfloat16>(p, x, out, stream);
    default:
      return launch<float, float>(p, x, out, stream);
  }
}

}  // namespace cuda
}  // namespace fastbert
