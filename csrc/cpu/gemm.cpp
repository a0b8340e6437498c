// fastbert's own GEMM for CPU inference: out = epilogue(x @ W^T + bias) with W packed once, in fp32
// (16-bit x and W are multiplied in fp32: exact products, fp32 sums, one rounding at the end).
//
// Why: at BERT shapes on the AVX2 development machine MKL's sgemm ran at 92-125 GFLOP/s and oneDNN's at
// 108-131 but with 2-3x MKL's rounding error (docs/perf-notes.md); the packed-weight GEMM here keeps
// MKL's accumulation scheme (K in blocks of kKc, each block's dot products summed into C in fp32) and
// fuses the epilogue (bias, exact erf or tanh GELU) into the last block's store. fastbert/ops/cpu_gemm.py
// times it against ATen's GEMM per shape and uses whichever is faster on the machine.
//
// Layout: the weight W [N, K] (nn.Linear's) is packed into panels of kNr = 16 output columns,
// packed[p][k][j] = W[16 p + j][k] (zero past N), so the microkernel reads 16 consecutive floats per k.
// x's rows are packed per (row block, K block) into micro-panels of kMr = 6 rows, k-major. The 6 x 16
// microkernel keeps its tile in 12 AVX2 registers (the BLIS Haswell shape).
// Threads: tiles of kMc rows x kNc columns spread with at::parallel_for; each output element is
// computed by exactly one thread in a fixed order, so results do not depend on the thread count.
#include <ATen/ops/gelu.h>

#include "cpu/common.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FASTBERT_CPU_GEMM 1
#endif

namespace fastbert {
namespace cpu {
namespace {

constexpr const char* kPack = "cpu_pack_weight";
constexpr const char* kLinear = "cpu_packed_linear";

constexpr int64_t kMr = 6, kNr = 16;
constexpr int64_t kKc = 192;  // K block: the accumulation scheme of MKL's sgemm here (same rounding error)
constexpr int64_t kMc = 72;   // rows per tile, about: the packed x block (72 x 192 fp32) stays in L2
constexpr int64_t kNc = 768;  // columns per tile

enum class Epi { kNone, kGeluErf, kGeluTanh };

Epi parse_epilogue(c10::string_view s) {
  if (s == "none") return Epi::kNone;
  if (s == "gelu") return Epi::kGeluErf;
  if (s == "gelu_tanh") return Epi::kGeluTanh;
  FB_CHECK(false, kLinear, "epilogue must be \"none\", \"gelu\" or \"gelu_tanh\", got \"", std::string(s), "\"");
  return Epi::kNone;
}

at::Tensor cpu_pack_weight(const at::Tensor& weight) {
  check_cpu(kPack, "weight", weight);
  check_dim(kPack, "weight", weight, 2);
  check_kernel_dtype(kPack, "weight", weight);
  const int64_t n = weight.size(0), k = weight.size(1), panels = (n + kNr - 1) / kNr;
  at::Tensor packed = at::empty({panels, k, kNr}, weight.options().dtype(at::kFloat));
  // 16-bit weights are packed as fp32 (exact): the kernel multiplies in fp32 on every machine
  const at::Tensor w = weight.contiguous().to(at::kFloat);
  const float* src = w.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float* out = dst + p * k * kNr;
      for (int64_t j = 0; j < kNr; ++j) {
        const int64_t col = p * kNr + j;
        if (col < n) {
          const float* row = src + col * k;
          for (int64_t kk = 0; kk < k; ++kk) out[kk * kNr + j] = row[kk];
        } else {
          for (int64_t kk = 0; kk < k; ++kk) out[kk * kNr + j] = 0.f;
        }
      }
    }
  });
  return packed;
}

#ifdef FASTBERT_CPU_GEMM
// acc[2 i + h] (i < 6 rows, h < 2 halves of 16 columns) = sum over kc of a[k][i] * b[k][8 h ...]
inline void microkernel(int64_t kc, const float* a, const float* b, __m256* acc) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < kc; ++k, a += kMr, b += kNr) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    __m256 ai = _mm256_broadcast_ss(a);
    c00 = _mm256_fmadd_ps(ai, b0, c00);
    c01 = _mm256_fmadd_ps(ai, b1, c01);
    ai = _mm256_broadcast_ss(a + 1);
    c10 = _mm256_fmadd_ps(ai, b0, c10);
    c11 = _mm256_fmadd_ps(ai, b1, c11);
    ai = _mm256_broadcast_ss(a + 2);
    c20 = _mm256_fmadd_ps(ai, b0, c20);
    c21 = _mm256_fmadd_ps(ai, b1, c21);
    ai = _mm256_broadcast_ss(a + 3);
    c30 = _mm256_fmadd_ps(ai, b0, c30);
    c31 = _mm256_fmadd_ps(ai, b1, c31);
    ai = _mm256_broadcast_ss(a + 4);
    c40 = _mm256_fmadd_ps(ai, b0, c40);
    c41 = _mm256_fmadd_ps(ai, b1, c41);
    ai = _mm256_broadcast_ss(a + 5);
    c50 = _mm256_fmadd_ps(ai, b0, c50);
    c51 = _mm256_fmadd_ps(ai, b1, c51);
  }
  acc[0] = c00, acc[1] = c01, acc[2] = c10, acc[3] = c11, acc[4] = c20, acc[5] = c21;
  acc[6] = c30, acc[7] = c31, acc[8] = c40, acc[9] = c41, acc[10] = c50, acc[11] = c51;
}

// One 8-column half of a tile row: C = (first ? 0 : C) + acc, then on the last K block + bias and the
// activation. `c` has 8 valid floats (callers route partial tiles through a scratch row).
inline void update8(float* c, __m256 acc, bool first, bool last, const float* bias, Epi epi) {
  Vec v = first ? Vec(acc) : Vec::loadu(c) + Vec(acc);
  if (last) {
    if (bias != nullptr) v = v + Vec::loadu(bias);
    if (epi == Epi::kGeluErf) v = gelu_erf(v);
    if (epi == Epi::kGeluTanh) v = gelu_tanh(v);
  }
  v.store(c);
}

// Writes one microkernel tile of mr x nr valid elements at c (row stride ldc).
void store_tile(float* c, int64_t ldc, int64_t mr, int64_t nr, const __m256* acc, bool first, bool last,
                const float* bias, Epi epi) {
  if (nr == kNr) {
    for (int64_t i = 0; i < mr; ++i) {
      update8(c + i * ldc, acc[2 * i], first, last, bias, epi);
      update8(c + i * ldc + 8, acc[2 * i + 1], first, last, bias == nullptr ? nullptr : bias + 8, epi);
    }
    return;
  }
  alignas(32) float row[kNr], brow[kNr] = {0};
  if (bias != nullptr) std::memcpy(brow, bias, nr * sizeof(float));
  for (int64_t i = 0; i < mr; ++i) {
    float* ci = c + i * ldc;
    std::memcpy(row, ci, nr * sizeof(float));  // read only when !first; harmless otherwise
    update8(row, acc[2 * i], first, last, bias == nullptr ? nullptr : brow, epi);
    update8(row + 8, acc[2 * i + 1], first, last, bias == nullptr ? nullptr : brow + 8, epi);
    std::memcpy(ci, row, nr * sizeof(float));
  }
}

// x rows [r0, r0 + mc), columns [k0, k0 + kc) into kMr-row micro-panels (zero rows past mc), k-major,
// as fp32 (16-bit values convert exactly).
template <typename T>
void pack_rows(const T* x, int64_t ldx, int64_t mc, int64_t kc, float* dst) {
  for (int64_t i0 = 0; i0 < mc; i0 += kMr) {
    const int64_t mr = std::min(kMr, mc - i0);
    for (int64_t k = 0; k < kc; ++k) {
      for (int64_t i = 0; i < mr; ++i) dst[k * kMr + i] = static_cast<float>(x[(i0 + i) * ldx + k]);
      for (int64_t i = mr; i < kMr; ++i) dst[k * kMr + i] = 0.f;
    }
    dst += kc * kMr;
  }
}

template <typename T>
void gemm_packed(const T* x, int64_t m, int64_t k, const float* packed, int64_t n, const float* bias, Epi epi,
                 float* out) {
  // Row groups of whole kMr-row micro-panels, as even as can be, their count a multiple of the thread
  // count (each at most ~kMc rows), so every thread gets the same rows: with tiles of exactly kMc rows
  // M = 1024 made 15 tiles for 2 threads, one idle an eighth of the time. The partition does not
  // change any result (each element sums its K blocks in the same order whoever computes it).
  const int64_t panels = (m + kMr - 1) / kMr, threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t want = ((m + kMc - 1) / kMc + threads - 1) / threads * threads;
  const int64_t groups = std::min(panels, want), nt = (n + kNc - 1) / kNc;
  at::parallel_for(0, groups * nt, 1, [&](int64_t t0, int64_t t1) {
    std::unique_ptr<float[]> abuf = scratch_f32(((panels + groups - 1) / groups) * kMr * kKc);
    __m256 acc[12];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / nt, j0 = (t % nt) * kNc;
      const int64_t i0 = g * panels / groups * kMr, i1 = std::min(m, (g + 1) * panels / groups * kMr);
      const int64_t mc = i1 - i0, ncols = std::min(kNc, n - j0);
      for (int64_t p0 = 0; p0 < k; p0 += kKc) {
        const int64_t kc = std::min(kKc, k - p0);
        const bool first = p0 == 0, last = p0 + kc >= k;
        pack_rows(x + i0 * k + p0, k, mc, kc, abuf.get());
        for (int64_t jr = 0; jr < ncols; jr += kNr) {
          const int64_t col = j0 + jr, nr = std::min(kNr, n - col);
          const float* b = packed + (col / kNr) * k * kNr + p0 * kNr;
          const float* bias_j = bias == nullptr ? nullptr : bias + col;
          for (int64_t ir = 0; ir < mc; ir += kMr) {
            microkernel(kc, abuf.get() + ir * kc, b, acc);
            store_tile(out + (i0 + ir) * n + col, n, std::min(kMr, mc - ir), nr, acc, first, last, bias_j, epi);
          }
        }
      }
    }
  });
}

at::Tensor cpu_packed_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                             const c10::optional<at::Tensor>& bias, c10::string_view epilogue) {
  check_cpu(kLinear, "x", x);
  check_dim(kLinear, "x", x, 2);
  check_kernel_dtype(kLinear, "x", x);
  check_contiguous(kLinear, "x", x);
  check_cpu(kLinear, "packed", packed);
  check_dim(kLinear, "packed", packed, 3);
  check_contiguous(kLinear, "packed", packed);
  FB_CHECK(packed.scalar_type() == at::kFloat, kLinear, "packed must have dtype float32, got ", packed.scalar_type());
  const int64_t m = x.size(0), k = x.size(1);
  FB_CHECK(n > 0 && packed.size(0) == (n + kNr - 1) / kNr && packed.size(1) == k && packed.size(2) == kNr, kLinear,
           "packed must be cpu_pack_weight of an [n, ", k, "] weight with n = ", n, ", got shape ", packed.sizes());
  if (has(bias)) check_vector(kLinear, "bias", *bias, n, x.scalar_type());
  const Epi epi = parse_epilogue(epilogue);
  const auto st = x.scalar_type();
  at::Tensor out = new_output({m, n}, st);
  if (m == 0) return out;
  const std::vector<float> b = vector_f32(bias);
  // fp32 results go straight to `out`; 16-bit ones are summed in fp32 scratch and rounded once
  at::Tensor acc = st == at::kFloat ? out : at::empty({m, n}, x.options().dtype(at::kFloat));
  if (k == 0) {  // an empty sum: the epilogue of zeros
    acc.zero_();
    if (has(bias)) acc.add_(bias->to(at::kFloat));
    if (epi == Epi::kGeluErf) acc.copy_(at::gelu(acc));
    if (epi == Epi::kGeluTanh) acc.copy_(at::gelu(acc, "tanh"));
  } else {
    FB_DISPATCH(st, kLinear, [&] {
      gemm_packed<scalar_t>(x.data_ptr<scalar_t>(), m, k, packed.data_ptr<float>(), n, b.empty() ? nullptr : b.data(),
                            epi, acc.data_ptr<float>());
    });
  }
  if (st != at::kFloat) out.copy_(acc);
  return out;
}
#endif  // FASTBERT_CPU_GEMM

}  // namespace

// Registered only where the kernel exists (an AVX2 + FMA build): fastbert/ops/cpu_gemm.py asks the
// dispatcher whether fastbert::cpu_packed_linear has a CPU kernel and uses ATen's GEMM otherwise.
TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
#ifdef FASTBERT_CPU_GEMM
  m.impl("cpu_pack_weight", &cpu_pack_weight);
  m.impl("cpu_packed_linear", &cpu_packed_linear);
#else
  (void)m;
  (void)&cpu_pack_weight;
#endif
}

}  // namespace cpu
}  // namespace fastbert
