// The GELU epilogue shared by bias_gelu.cpp and linear_gelu.cpp: gelu / gelu' row passes in fp32
// (formulas: see common.h), one rounding on the way out. Templates and inline functions only.
#pragma once

#include <type_traits>

#include "cpu/common.h"

namespace fastbert {
namespace cpu {
namespace gelu_epilogue {

// Two vectors per step: their exp/division chains are independent, so the core overlaps them.
constexpr int64_t kStep = 2 * kVec;

template <bool kTanh>
inline Vec gelu(Vec a) {
  return kTanh ? gelu_tanh(a) : gelu_erf(a);
}
template <bool kTanh>
inline Vec gelu_grad(Vec a) {
  return kTanh ? gelu_tanh_grad(a) : gelu_erf_grad(a);
}

// out = gelu(in + bias) row by row; pre (optional) = in + bias. `out` may alias `in`.
// fp32 rows are read and written in place; others go through fp32 scratch rows. TI/TO: the input
// and output storage types (an fp32 GEMM result feeding 16-bit outputs has TI = float).
template <typename TI, typename TO, bool kTanh>
inline void gelu_rows(const TI* in, const float* bias, int64_t rows, int64_t n, TO* out, TO* pre) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1));
  constexpr bool kF32 = std::is_same<TI, float>::value && std::is_same<TO, float>::value;
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> vbuf(kF32 ? 0 : n), ybuf(kF32 ? 0 : n), pbuf(kF32 || pre == nullptr ? 0 : n);
    for (int64_t r = r0; r < r1; ++r) {
      const float* v;
      float *y, *pr;
      if constexpr (kF32) {
        v = reinterpret_cast<const float*>(in + r * n);
        y = reinterpret_cast<float*>(out + r * n);
        pr = pre != nullptr ? reinterpret_cast<float*>(pre + r * n) : nullptr;
      } else {
        to_f32(in + r * n, vbuf.data(), n);
        v = vbuf.data();
        y = ybuf.data();
        pr = pre != nullptr ? pbuf.data() : nullptr;
      }
      int64_t j = 0;
      for (; j + kStep <= n; j += kStep) {
        Vec a0 = Vec::loadu(v + j), a1 = Vec::loadu(v + j + kVec);
        if (bias != nullptr) {
          a0 = a0 + Vec::loadu(bias + j);
          a1 = a1 + Vec::loadu(bias + j + kVec);
        }
        if (pr != nullptr) {
          a0.store(pr + j);
          a1.store(pr + j + kVec);
        }
        gelu<kTanh>(a0).store(y + j);
        gelu<kTanh>(a1).store(y + j + kVec);
      }
      for (; j < n; j += kVec) {
        const int64_t c = std::min<int64_t>(kVec, n - j);
        Vec a = Vec::loadu(v + j, c);
        if (bias != nullptr) a = a + Vec::loadu(bias + j, c);
        if (pr != nullptr) a.store(pr + j, c);
        gelu<kTanh>(a).store(y + j, c);
      }
      if constexpr (!kF32) {
        if (pre != nullptr) from_f32(pr, pre + r * n, n);
        from_f32(y, out + r * n, n);
      }
    }
  });
}

// grad_in = g * gelu'(in + bias); part (optional) receives fp32 column sums of grad_in per row block.
template <typename TI, typename TO, bool kTanh>
inline void gelu_grad_rows(const TI* g, const TI* in, const float* bias, int64_t rows, int64_t n, TO* grad_in,
                           float* part, int64_t block) {
  const int64_t nblk = (rows + block - 1) / block;
  constexpr bool kF32 = std::is_same<TI, float>::value && std::is_same<TO, float>::value;
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> vbuf(kF32 ? 0 : n), gbuf(kF32 ? 0 : n), dbuf(kF32 ? 0 : n);
    for (int64_t blk = b0; blk < b1; ++blk) {
      float* p = part != nullptr ? part + blk * n : nullptr;
      if (p != nullptr) std::fill(p, p + n, 0.f);
      const int64_t rend = std::min(rows, (blk + 1) * block);
      for (int64_t r = blk * block; r < rend; ++r) {
        const float *v, *gv;
        float* d;
        if constexpr (kF32) {
          v = reinterpret_cast<const float*>(in + r * n);
          gv = reinterpret_cast<const float*>(g + r * n);
          d = reinterpret_cast<float*>(grad_in + r * n);
        } else {
          to_f32(in + r * n, vbuf.data(), n);
          to_f32(g + r * n, gbuf.data(), n);
          v = vbuf.data();
          gv = gbuf.data();
          d = dbuf.data();
        }
        int64_t j = 0;
        for (; j + kStep <= n; j += kStep) {
          Vec a0 = Vec::loadu(v + j), a1 = Vec::loadu(v + j + kVec);
          if (bias != nullptr) {
            a0 = a0 + Vec::loadu(bias + j);
            a1 = a1 + Vec::loadu(bias + j + kVec);
          }
          const Vec d0 = Vec::loadu(gv + j) * gelu_grad<kTanh>(a0);
          const Vec d1 = Vec::loadu(gv + j + kVec) * gelu_grad<kTanh>(a1);
          d0.store(d + j);
          d1.store(d + j + kVec);
          if (p != nullptr) {
            (Vec::loadu(p + j) + d0).store(p + j);
            (Vec::loadu(p + j + kVec) + d1).store(p + j + kVec);
          }
        }
        for (; j < n; j += kVec) {
          const int64_t c = std::min<int64_t>(kVec, n - j);
          Vec a = Vec::loadu(v + j, c);
          if (bias != nullptr) a = a + Vec::loadu(bias + j, c);
          const Vec dv = Vec::loadu(gv + j, c) * gelu_grad<kTanh>(a);
          dv.store(d + j, c);
          if (p != nullptr) (Vec::loadu(p + j, c) + dv).store(p + j, c);
        }
        if constexpr (!kF32) from_f32(d, grad_in + r * n, n);
      }
    }
  });
}

template <typename TI, typename TO>
inline void run_gelu(bool tanh, const TI* in, const float* bias, int64_t rows, int64_t n, TO* out, TO* pre) {
  if (tanh)
    gelu_rows<TI, TO, true>(in, bias, rows, n, out, pre);
  else
    gelu_rows<TI, TO, false>(in, bias, rows, n, out, pre);
}

template <typename TI, typename TO>
inline void run_gelu_grad(bool tanh, const TI* g, const TI* in, const float* bias, int64_t rows, int64_t n, TO* grad_in,
                          float* part, int64_t block) {
  if (tanh)
    gelu_grad_rows<TI, TO, true>(g, in, bias, rows, n, grad_in, part, block);
  else
    gelu_grad_rows<TI, TO, false>(g, in, bias, rows, n, grad_in, part, block);
}

}  // namespace gelu_epilogue
}  // namespace cpu
}  // namespace fastbert
