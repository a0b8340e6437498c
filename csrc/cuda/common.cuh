// Device helpers shared by the csrc/cuda kernels: element conversion, 128-bit vectors, the Philox
// dropout stream, warp reductions. No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/launchers.h"

namespace fastbert {
namespace cuda {

// ------------------------------------------------------------------------------------------------
// element conversion (round to nearest even, as torch does)
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Read one element of a tensor whose dtype is known only at run time (attn_bias may differ from q).
__device__ __forceinline__ float load_as_float(const void* p, DType dt, int64_t idx) {
  switch (dt) {
    case DType::kFloat16:
      return __half2float(static_cast<const __half*>(p)[idx]);
    case DType::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[idx]);
    default:
      return static_cast<const float*>(p)[idx];
  }
}

// ------------------------------------------------------------------------------------------------
// 128-bit vectors of VEC elements of T (VEC * sizeof(T) == 16) or single elements (VEC == 1)
// ------------------------------------------------------------------------------------------------
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[VEC]) {
  Vec<T, VEC> t = *reinterpret_cast<const Vec<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float(t.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[VEC]) {
  Vec<T, VEC> t;
#pragma unroll
  for (int i = 0; i < VEC; ++i) t.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Vec<T, VEC>*>(p) = t;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ------------------------------------------------------------------------------------------------
// Philox4x32-10, bit-identical to fastbert.reference.philox_uint32 (and tl.randint): key = the
// 64-bit seed, counter = (offset_lo, offset_hi, 0, 0); returns the first output word.
// ------------------------------------------------------------------------------------------------
__host__ __device__ __forceinline__ uint32_t mulhi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// __host__ too, so a host-only program can check it against the Python reference without a GPU.
__host__ __device__ __forceinline__ uint32_t philox_uint32(uint64_t seed, uint64_t offset) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0u, c3 = 0u;
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi_b = mulhi32(0xCD9E8D57u, c2), lo_b = 0xCD9E8D57u * c2;
    const uint32_t hi_a = mulhi32(0xD2511F53u, c0), lo_a = 0xD2511F53u * c0;
    const uint32_t n0 = hi_b ^ c1 ^ k0, n2 = hi_a ^ c3 ^ k1;
    c0 = n0;
    c1 = lo_b;
    c2 = n2;
    c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Element `offset` survives dropout iff its 31-bit random value is >= floor(p * 2^31) (the threshold is
// computed on the host in double, exactly as reference.dropout_threshold does).
__host__ __device__ __forceinline__ bool dropout_keep(uint64_t seed, uint64_t offset, uint32_t threshold) {
  return (philox_uint32(seed, offset) >> 1) >= threshold;
}

inline uint32_t dropout_threshold(double p) {
  // floor(p * 2^31) from the double p the op was given (like reference.dropout_threshold); the
  // product by a power of two is exact. p < 1 so t < 2^31 fits.
  double t = p * 2147483648.0;
  return static_cast<uint32_t>(t);  // truncation == floor for t >= 0
}

// ------------------------------------------------------------------------------------------------
// reductions
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

}  // namespace cuda
}  // namespace fastbert
