// bias_gelu: out = gelu(x + bias) and its gradient, elementwise over [rows, n], 128-bit vectorized.
//
// GELU, exact:  g(v) = v * Phi(v) = 0.5 v (1 + erf(v / sqrt2))
//               g'(v) = Phi(v) + v * phi(v),  phi(v) = exp(-v^2 / 2) / sqrt(2 pi)
// GELU, tanh:   u = c (v + a v^3), c = sqrt(2 / pi), a = 0.044715,  g(v) = 0.5 v (1 + tanh u)
//               g'(v) = 0.5 (1 + tanh u) + 0.5 v (1 - tanh^2 u) c (1 + 3 a v^2)
// All arithmetic in fp32 with erff/expf/tanhf (full precision; the build never uses fast math), one
// rounding to the output dtype at the end. x + bias is not rounded to the input dtype first (torch
// rounds it): the result is closer to the float64 reference, never farther. The bias arrives as fp32
// (the binding converts the [n] vector, exactly for 16-bit biases) and is read element by element: it
// stays in L1/L2, and needs no alignment.
#include "cuda/common.cuh"

namespace fastbert {
namespace cuda {
namespace {

constexpr float kSqrt1_2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;
constexpr float kSqrt2OverPi = 0.79788456080286535588f;
constexpr float kTanhA = 0.044715f;

template <bool TANH>
__device__ __forceinline__ float gelu(float v) {
  if (TANH) {
    const float u = kSqrt2OverPi * (v + kTanhA * v * v * v);
    return 0.5f * v * (1.0f + tanhf(u));
  }
  return 0.5f * v * (1.0f + erff(v * kSqrt1_2));
}

template <bool TANH>
__device__ __forceinline__ float gelu_grad(float v) {
  if (TANH) {
    const float u = kSqrt2OverPi * (v + kTanhA * v * v * v);
    const float t = tanhf(u);
    return 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kTanhA * v * v);
  }
  return 0.5f * (1.0f + erff(v * kSqrt1_2)) + v * kInvSqrt2Pi * expf(-0.5f * v * v);
}

// One thread handles VEC consecutive elements of a row per grid-stride step (n % VEC == 0 when VEC > 1,
// so a vector never straddles two rows and its bias slice is contiguous).
template <typename T, int VEC, bool TANH>
__global__ void bias_gelu_fwd_kernel(const T* __restrict__ x,         // [rows, n]
                                     const float* __restrict__ bias,  // [n] fp32 or nullptr
                                     T* __restrict__ out,             // [rows, n]
                                     int64_t nvec,                    // rows * n / VEC
                                     int64_t n) {                     // row length
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < nvec;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i * VEC;
    float v[VEC];
    load_vec<T, VEC>(x + e, v);
    if (bias != nullptr) {
      const float* b = bias + e % n;
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] += b[j];
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = gelu<TANH>(v[j]);
    store_vec<T, VEC>(out + e, v);
  }
}

template <typename T, int VEC, bool TANH>
__global__ void bias_gelu_bwd_kernel(const T* __restrict__ grad_out,  // [rows, n]
                                     const T* __restrict__ x,         // [rows, n]
                                     const float* __restrict__ bias,  // [n] fp32 or nullptr
                                     T* __restrict__ grad_in,         // [rows, n]
                                     int64_t nvec, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < nvec;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i * VEC;
    float v[VEC], g[VEC];
    load_vec<T, VEC>(x + e, v);
    load_vec<T, VEC>(grad_out + e, g);
    if (bias != nullptr) {
      const float* b = bias + e % n;
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] += b[j];
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) g[j] *= gelu_grad<TANH>(v[j]);
    store_vec<T, VEC>(grad_in + e, g);
  }
}

constexpr int kThreads = 256;

int grid_for(int64_t nvec) {
  // Enough blocks to fill any current GPU several times over; the grid-stride loop covers the rest.
  const int64_t blocks = (nvec + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65536 ? blocks : 65536);
}

template <typename T, int VEC>
cudaError_t launch_typed(bool bwd, const void* grad_out, const void* x, const float* bias, void* y, int64_t rows,
                         int64_t n, bool tanh_approx, cudaStream_t stream) {
  const int64_t nvec = rows * n / VEC;
  const int grid = grid_for(nvec);
  const T* xp = static_cast<const T*>(x);
  const float* bp = bias;
  T* yp = static_cast<T*>(y);
  if (!bwd) {
    if (tanh_approx)
      bias_gelu_fwd_kernel<T, VEC, true><<<grid, kThreads, 0, stream>>>(xp, bp, yp, nvec, n);
    else
      bias_gelu_fwd_kernel<T, VEC, false><<<grid, kThreads, 0, stream>>>(xp, bp, yp, nvec, n);
  } else {
    const T* gp = static_cast<const T*>(grad_out);
    if (tanh_approx)
      bias_gelu_bwd_kernel<T, VEC, true><<<grid, kThreads, 0, stream>>>(gp, xp, bp, yp, nvec, n);
    else
      bias_gelu_bwd_kernel<T, VEC, false><<<grid, kThreads, 0, stream>>>(gp, xp, bp, yp, nvec, n);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch(bool bwd, const void* grad_out, const void* x, const float* bias, void* y, int64_t rows, int64_t n,
                   bool tanh_approx, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec_ok = n % kVec == 0 && aligned16(x) && aligned16(y) && (!bwd || aligned16(grad_out));
  if (vec_ok) return launch_typed<T, kVec>(bwd, grad_out, x, bias, y, rows, n, tanh_approx, stream);
  return launch_typed<T, 1>(bwd, grad_out, x, bias, y, rows, n, tanh_approx, stream);
}

cudaError_t dispatch(DType dtype, bool bwd, const void* grad_out, const void* x, const float* bias, void* y,
                     int64_t rows, int64_t n, bool tanh_approx, cudaStream_t stream) {
  if (rows <= 0 || n <= 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat16:
      return launch<__half>(bwd, grad_out, x, bias, y, rows, n, tanh_approx, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(bwd, grad_out, x, bias, y, rows, n, tanh_approx, stream);
    default:
      return launch<float>(bwd, grad_out, x, bias, y, rows, n, tanh_approx, stream);
  }
}

}  // namespace

cudaError_t bias_gelu_fwd(DType dtype, const void* x, const float* bias, void* out, int64_t rows, int64_t n,
                          bool approximate_tanh, cudaStream_t stream) {
  return dispatch(dtype, false, nullptr, x, bias, out, rows, n, approximate_tanh, stream);
}

cudaError_t bias_gelu_bwd(DType dtype, const void* grad_out, const void* x, const float* bias, void* grad_in,
                          int64_t rows, int64_t n, bool approximate_tanh, cudaStream_t stream) {
  return dispatch(dtype, true, grad_out, x, bias, grad_in, rows, n, approximate_tanh, stream);
}

}  // namespace cuda
}  // namespace fastbert
