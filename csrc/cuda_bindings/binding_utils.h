// Shared host code of the CUDA bindings (csrc/cuda_bindings/*.cpp): argument checks whose messages name
// the argument, output allocation (NaN-poisoned under FASTBERT_POISON_OUTPUTS=1), the device guard and
// stream, and the launcher error check. The kernels themselves are in csrc/cuda/*.cu (no torch there).
#pragma once

// c10's stream/guard headers rather than ATen/cuda/CUDAContext.h: the latter pulls in cuBLAS/cuSPARSE/
// cuSOLVER headers that nothing here needs.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cuda/launchers.h"
#include "message.h"

namespace fastbert {
namespace cuda_bindings {

using fastbert::cuda::DType;

// the message is built by fastbert::msg::cat (csrc/message.h), never by TORCH_CHECK's ostream
#define FB_CUDA_CHECK(cond, op, ...) TORCH_CHECK(cond, ::fastbert::msg::cat("fastbert::", op, " (cuda): ", __VA_ARGS__))

inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline void check_cuda(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  FB_CUDA_CHECK(t.is_cuda(), op, name, " must be a CUDA tensor, got device ", t.device());
  FB_CUDA_CHECK(t.device() == ref.device(), op, name, " is on ", t.device(), " but the first input is on ",
                ref.device());
}

inline DType kernel_dtype(const char* op, const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      FB_CUDA_CHECK(false, op, name, " must have dtype float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return DType::kFloat32;  // unreachable
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  FB_CUDA_CHECK(t.dim() == dim, op, name, " must have rank ", dim, ", got shape ", t.sizes());
}

inline void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  FB_CUDA_CHECK(t.is_contiguous(), op, name, " must be contiguous, got strides ", t.strides());
}

// A per-feature vector [n] of dtype `dtype` or float32; returned as a contiguous fp32 copy (or the tensor
// itself when it already is one): the kernels read fp32 parameters.
inline at::Tensor vector_f32(const char* op, const char* name, const at::Tensor& t, int64_t n, at::ScalarType dtype,
                             const at::Tensor& ref) {
  check_cuda(op, name, t, ref);
  check_dim(op, name, t, 1);
  FB_CUDA_CHECK(t.size(0) == n, op, name, " must have shape [", n, "], got ", t.sizes());
  FB_CUDA_CHECK(t.scalar_type() == dtype || t.scalar_type() == at::kFloat, op, name, " must have dtype ", dtype,
                " or float32, got ", t.scalar_type());
  return t.to(at::kFloat).contiguous();
}

// dropout_p in [0, 1); with p > 0 the seed is an int64 [1] tensor on the inputs' device, read by the
// kernels (no host sync). Returns the device pointer, or nullptr when there is no dropout.
inline const int64_t* check_dropout(const char* op, double p, const std::optional<at::Tensor>& seed,
                                    const at::Tensor& ref) {
  FB_CUDA_CHECK(p >= 0.0 && p < 1.0, op, "dropout_p must be in [0, 1), got ", p);
  if (p == 0.0) return nullptr;
  FB_CUDA_CHECK(has(seed), op, "seed must be given when dropout_p > 0");
  check_cuda(op, "seed", *seed, ref);
  FB_CUDA_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1, op,
                "seed must be an int64 tensor of shape [1], got dtype ", seed->scalar_type(), " shape ", seed->sizes());
  return seed->data_ptr<int64_t>();
}

inline bool poison_outputs() {
  const char* e = std::getenv("FASTBERT_POISON_OUTPUTS");
  return e != nullptr && std::string(e) == "1";
}

// Every kernel output: NaN-filled first under FASTBERT_POISON_OUTPUTS=1, so an element a kernel forgot to
// write fails the tests.
inline at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(shape, opts);
  if (poison_outputs() && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// "An output that does not apply is returned as an empty tensor of shape [0]."
inline at::Tensor no_output(const at::TensorOptions& opts) { return at::empty({0}, opts); }

inline void check_launch(const char* op, cudaError_t err) {
  FB_CUDA_CHECK(err == cudaSuccess, op, "kernel launch failed: ", cudaGetErrorString(err));
}

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Streaming multiprocessors of the tensor's device (sizes grids and workspaces); cached per device.
inline int sm_count(const at::Tensor& t) {
  static int cache[64] = {0};
  const int dev = t.get_device();
  if (dev >= 0 && dev < 64 && cache[dev] > 0) return cache[dev];
  int n = 0;
  const cudaError_t e = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
  TORCH_CHECK(e == cudaSuccess,
              ::fastbert::msg::cat("fastbert (cuda): cudaDeviceGetAttribute failed: ", cudaGetErrorString(e)));
  if (dev >= 0 && dev < 64) cache[dev] = n;
  return n;
}

inline bool parse_approximate(const char* op, c10::string_view approximate) {
  if (approximate == "none") return false;
  if (approximate == "tanh") return true;
  FB_CUDA_CHECK(false, op, "approximate must be 'none' (exact erf GELU) or 'tanh', got '",
                std::string(approximate.data(), approximate.size()), "'");
  return false;
}

// a float tensor's data, or nullptr for an undefined one (an absent optional argument)
inline const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

}  // namespace cuda_bindings
}  // namespace fastbert
