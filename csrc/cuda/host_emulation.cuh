// Host emulation of the small part of CUDA that csrc/cuda/*.cu uses, so the kernels' logic (indexing,
// masking, barriers, reductions, the Philox stream, WMMA tiling) can be executed and checked on a
// machine without a GPU. Not part of any build: tests/ops/test_cuda_backend.py::test_kernels_under_host_emulation
// copies the kernel sources, swaps `kernel<<<grid, block, smem, stream>>>(...)` for emu_launch(...)(...),
// `extern __shared__` arrays for emu_dyn_smem(), <mma.h> for the WMMA emulation below, and compiles them
// with g++ against this header.
//
// Model: one OS thread per CUDA thread; the blocks of a grid run one after another; __syncthreads is a
// std::barrier over the block, __shfl_xor_sync an exchange through a per-warp buffer between two warp
// barriers (so a shuffle that not all 32 lanes reach deadlocks, as it would misbehave on the GPU);
// threads that exit drop out of both barriers, as exited threads do on the GPU. Dynamic shared memory
// starts as 0xFF bytes (NaN for floats), so a read of an unwritten element shows up in the results.
// WMMA: every lane holds the whole 16x16 fragment and computes it redundantly with fp32 accumulation
// of exactly rounded 16-bit inputs; lane 0 stores. What it cannot show: timing, occupancy, register
// spills, bank conflicts, and races the barrier structure hides (compute-sanitizer racecheck on a GPU).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>
using std::max;
using std::min;

#undef __global__
#undef __device__
#undef __forceinline__
#undef __launch_bounds__
#undef __align__
#undef __shared__
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local int emu_tid;
inline dim3 gridDim, blockDim;

struct EmuBlock {
  std::unique_ptr<std::barrier<>> block;
  std::vector<std::unique_ptr<std::barrier<>>> warp;
  std::vector<float> wbuf;
  std::vector<unsigned char> smem;
};
inline EmuBlock* emu_blk = nullptr;
inline unsigned char* emu_dyn_smem() { return emu_blk->smem.data(); }

inline void __syncthreads() { emu_blk->block->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int o) {
  const int t = emu_tid, w = t / 32, l = t % 32;
  emu_blk->wbuf[t] = v;
  emu_blk->warp[w]->arrive_and_wait();
  const float r = emu_blk->wbuf[w * 32 + (l ^ o)];
  emu_blk->warp[w]->arrive_and_wait();
  return r;
}

inline dim3 emu_dim3(dim3 d) { return d; }
inline dim3 emu_dim3(unsigned x) { return dim3(x, 1, 1); }
inline dim3 emu_dim3(int x) { return dim3((unsigned)x, 1, 1); }
inline dim3 emu_dim3(long x) { return dim3((unsigned)x, 1, 1); }

template <typename K>
struct EmuLaunch {
  K kernel;
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A... args) {
    gridDim = grid;
    blockDim = block;
    const int nt = block.x * block.y * block.z;
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          EmuBlock blk;
          blk.block = std::make_unique<std::barrier<>>(nt);
          for (int w = 0; w < (nt + 31) / 32; ++w)
            blk.warp.push_back(std::make_unique<std::barrier<>>(std::min(32, nt - 32 * w)));
          blk.wbuf.assign(nt, 0.f);
          blk.smem.assign(smem + 16, 0xFF);  // garbage (NaN pattern for floats): unwritten reads show up
          emu_blk = &blk;
          std::vector<std::thread> ts;
          for (int t = 0; t < nt; ++t)
            ts.emplace_back([&, t] {
              threadIdx = make_uint3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
              emu_tid = t;
              blockIdx = make_uint3(bx, by, bz);
              kernel(args...);
              emu_blk->block->arrive_and_drop();
              emu_blk->warp[t / 32]->arrive_and_drop();
            });
          for (auto& th : ts) th.join();
          emu_blk = nullptr;
        }
  }
};
template <typename K, typename G, typename B>
EmuLaunch<K> emu_launch(K k, G g, B b, size_t smem = 0, cudaStream_t = nullptr) {
  return EmuLaunch<K>{k, emu_dim3(g), emu_dim3(b), smem};
}
#define cudaGetLastError() cudaSuccess
#define cudaFuncSetAttribute(...) cudaSuccess

// ---- WMMA (nvcuda::wmma) ----
namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  float v[16][16];
};
template <typename F>
inline void fill_fragment(F& f, float x) {
  for (auto& r : f.v)
    for (auto& e : r) e = x;
}
template <typename T>
inline float emu_f(T x) {
  return static_cast<float>(x);
}
inline float emu_f(__half x) { return __half2float(x); }
inline float emu_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ld) {
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j)
      f.v[i][j] = std::is_same<Layout, row_major>::value ? emu_f(p[i * ld + j]) : emu_f(p[j * ld + i]);
}
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float, void>& f, const float* p, unsigned ld, layout_t) {
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.v[i][j] = p[i * ld + j];
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float, void>& f, unsigned ld,
                              layout_t) {
  // all lanes of the warp hold the same values; one writes (a real race would be between warps)
  const int lane = emu_tid % 32;
  __shfl_xor_sync(0xffffffffu, 0.f, 1);  // lanes meet: every lane has read smem before lane 0 writes
  if (lane == 0)
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) p[i * ld + j] = f.v[i][j];
  __shfl_xor_sync(0xffffffffu, 0.f, 1);
}
template <typename TA, typename LA, typename TB, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float, void>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, TB, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float, void>& c) {
  float r[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.v[i][j];
      for (int k = 0; k < 16; ++k) s += a.v[i][k] * b.v[k][j];
      r[i][j] = s;
    }
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) d.v[i][j] = r[i][j];
}
}  // namespace wmma
}  // namespace nvcuda
