// CUDA implementation of fastbert::rotary_{fwd,bwd}: checks, then the kernel of csrc/cuda/rotary.cu. The
// values of position_ids and cu_seqlens are not read here (that would be a host sync): the Python front end
// (fastbert/ops/rotary.py) bounds-checks them. Unverified on a GPU so far (compile-checked only).
#include "cuda_bindings/binding_utils.h"

namespace fastbert {
namespace cuda_bindings {
namespace {

constexpr const char* kRoFwd = "rotary_fwd";
constexpr const char* kRoBwd = "rotary_bwd";

void check_input(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref, int64_t rank) {
  check_cuda(op, name, t, ref);
  kernel_dtype(op, name, t);
  check_dim(op, name, t, rank);
  FB_CUDA_CHECK(t.stride(-1) == 1 || t.size(-1) <= 1, op, name,
                " must have unit stride along its last dim, got strides ", t.strides());
}

fastbert::cuda::RotaryInput input_of(const at::Tensor& t, bool packed) {
  if (packed) return {t.data_ptr(), t.size(1), 0, t.stride(0), t.stride(1)};
  return {t.data_ptr(), t.size(2), t.stride(0), t.stride(1), t.stride(2)};
}

std::tuple<at::Tensor, at::Tensor> run(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                       const at::Tensor& sin, const std::optional<at::Tensor>& position_ids,
                                       const std::optional<at::Tensor>& cu_seqlens, bool backward) {
  const bool packed = has(cu_seqlens);
  const int64_t rank = packed ? 3 : 4;
  check_input(op, "q", q, q, rank);
  check_input(op, "k", k, q, rank);
  FB_CUDA_CHECK(k.scalar_type() == q.scalar_type(), op, "k must have q's dtype ", q.scalar_type(), ", got ",
                k.scalar_type());
  const int64_t d = q.size(-1);
  FB_CUDA_CHECK(d % 2 == 0, op, "q's head dim must be even, got ", d);
  FB_CUDA_CHECK(k.size(-1) == d && k.sizes().slice(0, rank - 2) == q.sizes().slice(0, rank - 2), op,
                "k must have q's shape ", q.sizes(), " up to its head count, got ", k.sizes());
  check_cuda(op, "cos", cos, q);
  check_cuda(op, "sin", sin, q);
  check_contiguous(op, "cos", cos);
  check_contiguous(op, "sin", sin);
  FB_CUDA_CHECK(cos.scalar_type() == at::kFloat || cos.scalar_type() == q.scalar_type(), op,
                "cos must have dtype float32 or q's dtype ", q.scalar_type(), ", got ", cos.scalar_type());
  FB_CUDA_CHECK((cos.dim() == 2 || cos.dim() == 3) && cos.size(-1) == d, op, "cos must be [R, ", d, "] or [B, S, ", d,
                "], got shape ", cos.sizes());
  FB_CUDA_CHECK(sin.sizes() == cos.sizes() && sin.scalar_type() == cos.scalar_type(), op,
                "sin must have cos's shape and dtype ", cos.sizes(), " ", cos.scalar_type(), ", got ", sin.sizes(), " ",
                sin.scalar_type());

  fastbert::cuda::RotaryParams p{};
  p.dtype = kernel_dtype(op, "q", q);
  p.table_dtype = kernel_dtype(op, "cos", cos);
  p.batch = packed ? 1 : q.size(0);
  p.seqlen = packed ? q.size(0) : q.size(1);
  p.head_dim = d;
  p.cos = cos.data_ptr();
  p.sin = sin.data_ptr();
  p.backward = backward;
  if (packed) {
    const at::Tensor& cu = *cu_seqlens;
    FB_CUDA_CHECK(!has(position_ids), op, "position_ids cannot be given with cu_seqlens");
    check_cuda(op, "cu_seqlens", cu, q);
    check_dim(op, "cu_seqlens", cu, 1);
    check_contiguous(op, "cu_seqlens", cu);
    FB_CUDA_CHECK(cu.scalar_type() == at::kInt, op, "cu_seqlens must have dtype int32, got ", cu.scalar_type());
    FB_CUDA_CHECK(cu.numel() >= 1, op, "cu_seqlens must hold at least one value");
    FB_CUDA_CHECK(cos.dim() == 2, op, "cos must be a [max_pos, ", d, "] table with cu_seqlens, got ", cos.sizes());
    p.cu_seqlens = cu.data_ptr<int32_t>();
    p.n_seqs = cu.numel() - 1;
    p.table_stride_s = cos.stride(0);
  } else if (has(position_ids)) {
    const at::Tensor& pos = *position_ids;
    check_cuda(op, "position_ids", pos, q);
    check_contiguous(op, "position_ids", pos);
    FB_CUDA_CHECK(pos.scalar_type() == at::kLong, op, "position_ids must have dtype int64, got ", pos.scalar_type());
    FB_CUDA_CHECK(pos.dim() == 2 && pos.size(0) == q.size(0) && pos.size(1) == q.size(1), op, "position_ids must be [",
                  q.size(0), ", ", q.size(1), "], got ", pos.sizes());
    FB_CUDA_CHECK(cos.dim() == 2, op, "cos must be a [max_pos, ", d, "] table with position_ids, got ", cos.sizes());
    p.position_ids = pos.data_ptr<int64_t>();
    p.table_stride_s = cos.stride(0);
  } else if (cos.dim() == 2) {
    FB_CUDA_CHECK(cos.size(0) >= q.size(1), op, "cos has ", cos.size(0), " rows, fewer than the sequence length ",
                  q.size(1));
    p.table_stride_s = cos.stride(0);
  } else {
    FB_CUDA_CHECK(cos.size(1) == q.size(1) && (cos.size(0) == 1 || cos.size(0) == q.size(0)), op, "cos must be [",
                  q.size(0), " or 1, ", q.size(1), ", ", d, "], got ", cos.sizes());
    p.table_stride_b = cos.size(0) == 1 ? 0 : cos.stride(0);
    p.table_stride_s = cos.stride(1);
  }

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor q_out = new_output(q.sizes(), q.options());
  at::Tensor k_out = new_output(k.sizes(), k.options());
  if (q.numel() > 0) check_launch(op, fastbert::cuda::rotary(p, input_of(q, packed), q_out.data_ptr(), stream()));
  if (k.numel() > 0) check_launch(op, fastbert::cuda::rotary(p, input_of(k, packed), k_out.data_ptr(), stream()));
  return {q_out, k_out};
}

std::tuple<at::Tensor, at::Tensor> rotary_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                              const at::Tensor& sin, const std::optional<at::Tensor>& position_ids,
                                              const std::optional<at::Tensor>& cu_seqlens) {
  return run(kRoFwd, q, k, cos, sin, position_ids, cu_seqlens, /*backward=*/false);
}

std::tuple<at::Tensor, at::Tensor> rotary_bwd(const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& cos,
                                              const at::Tensor& sin, const std::optional<at::Tensor>& position_ids,
                                              const std::optional<at::Tensor>& cu_seqlens) {
  return run(kRoBwd, grad_q, grad_k, cos, sin, position_ids, cu_seqlens, /*backward=*/true);
}

}  // namespace
}  // namespace cuda_bindings
}  // namespace fastbert

TORCH_LIBRARY_IMPL(fastbert, CUDA, m) {
  m.impl("rotary_fwd", &fastbert::cuda_bindings::rotary_fwd);
  m.impl("rotary_bwd", &fastbert::cuda_bindings::rotary_bwd);
}
