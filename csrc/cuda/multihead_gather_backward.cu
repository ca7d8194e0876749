// CUDA kernels of the table gradient of multihead_gather, in two modes.
//
// Sorted (the default, and always for the sparse op, for float64 and under
// torch.use_deterministic_algorithms(True)): row_segments.cuh, deterministic and bitwise equal
// to the CPU kernel.
// Atomic (the dense op with ENGRAM_GATHER_BACKWARD=atomic, float32/bfloat16/float16): float
// atomicAdd of every looked-up gradient row into a zeroed float [num_rows, d_head] buffer, then
// a cast to the table dtype; run-to-run differences in the last bits.
//
// Synchronisation: the dense op never synchronises (the unique count U stays on the device and
// every kernel after the sort loops up to it). The sparse op must return [U]-sized tensors, so it
// copies U to the host once, after every kernel is enqueued (the host waits only for this op's
// own work), and returns views narrowed to U of buffers sized for the bound U <= rows.numel().
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <string_view>

#include "row_segments.cuh"

namespace engram {
namespace {

// ---- atomic dense mode ----------------------------------------------------------------------

template <typename scalar_t, typename acc_t, int V, typename idx_t>
__global__ void __launch_bounds__(kBlock)
    scatter_add_kernel(const scalar_t* __restrict__ grad, const idx_t* __restrict__ rows, int64_t n, int64_t num_rows,
                       int64_t d_head, acc_t* __restrict__ out, int log2_group) {
  using vec_t = Vec<scalar_t, V>;
  const int group = 1 << log2_group;
  const int lane = threadIdx.x & (group - 1);
  const int64_t chunks = d_head / V;
  const int64_t groups_total = static_cast<int64_t>(gridDim.x) * (kBlock >> log2_group);
  for (int64_t l = static_cast<int64_t>(blockIdx.x) * (kBlock >> log2_group) + (threadIdx.x >> log2_group); l < n;
       l += groups_total) {
    const int64_t r = static_cast<int64_t>(rows[l]);
    CUDA_KERNEL_ASSERT_MSG(row_in_range(r, num_rows), "multihead_gather_backward: rows must lie in [0, num_rows)");
    const vec_t* src = reinterpret_cast<const vec_t*>(grad + l * d_head);
    acc_t* dst = out + r * d_head;
    for (int64_t c = lane; c < chunks; c += group) {
      const vec_t v = src[c];
#pragma unroll
      for (int k = 0; k < V; ++k) atomicAdd(dst + c * V + k, static_cast<acc_t>(v.v[k]));
    }
  }
}

template <typename scalar_t, int V>
void launch_scatter_add(const GradArgs& a, int64_t num_rows, at::Tensor& acc) {
  using acc_t = at::acc_type<scalar_t, true>;
  const int group = row_group_size(a.d_head / V);
  const int log2_group = log2_pow2(group);
  const unsigned grid = cuda::grid_for(a.n, kBlock / group, 16);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(a.rows.scalar_type(), "multihead_gather_backward_atomic", [&] {
    scatter_add_kernel<scalar_t, acc_t, V, index_t>
        <<<grid, kBlock, 0, stream>>>(a.grad.data_ptr<scalar_t>(), a.rows.data_ptr<index_t>(), a.n, num_rows, a.d_head,
                                      cuda::ptr<acc_t>(acc), log2_group);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor backward_atomic(const GradArgs& a, int64_t num_rows) {
  const auto dt = a.grad.scalar_type();
  const auto acc_dt = dt == at::kDouble ? at::kDouble : at::kFloat;
  auto acc = at::zeros({num_rows, a.d_head}, a.grad.options().dtype(acc_dt));
  if (a.n == 0 || a.d_head == 0) return acc.to(dt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "multihead_gather_backward_atomic", [&] {
    if (vec_width<scalar_t>(a.d_head, a.grad.data_ptr()) > 1) {
      launch_scatter_add<scalar_t, 16 / sizeof(scalar_t)>(a, num_rows, acc);
    } else {
      launch_scatter_add<scalar_t, 1>(a, num_rows, acc);
    }
  });
  return acc.scalar_type() == dt ? acc : acc.to(dt);
}

bool atomic_requested() {
  const char* v = std::getenv("ENGRAM_GATHER_BACKWARD");
  if (v == nullptr || std::string_view(v) == "sorted" || *v == '\0') return false;
  TORCH_CHECK(std::string_view(v) == "atomic", "ENGRAM_GATHER_BACKWARD must be 'sorted' (default) or 'atomic', got '",
              v, "'");
  return true;
}

at::Tensor multihead_gather_backward_cuda(const at::Tensor& grad_e, const at::Tensor& rows, int64_t num_rows) {
  const char* op = "multihead_gather_backward";
  GradArgs a = check_grad_args(op, grad_e, rows);
  TORCH_CHECK(num_rows >= 0, op, ": num_rows must be non-negative, got ", num_rows);
  const c10::cuda::CUDAGuard guard(grad_e.device());
  TORCH_CHECK(a.n == 0 || num_rows > 0, op, ": rows must lie in [0, num_rows=0), but there are ", a.n, " lookups");
  // Deterministic by default, as the schema promises: the sorted path. The atomic path (faster for
  // a dense gradient, order-dependent in its fp32 sums) only on request, with
  // ENGRAM_GATHER_BACKWARD=atomic, never under torch.use_deterministic_algorithms(True) and never
  // for float64, the dtype of exact checks (gradcheck, references).
  if (atomic_requested() && !at::globalContext().deterministicAlgorithms() && a.grad.scalar_type() != at::kDouble) {
    return backward_atomic(a, num_rows);
  }
  auto out = at::zeros({num_rows, a.d_head}, a.grad.options());
  if (a.n == 0 || a.d_head == 0) return out;
  backward_sorted(a, num_rows, nullptr, &out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> multihead_gather_backward_sparse_cuda(const at::Tensor& grad_e,
                                                                         const at::Tensor& rows) {
  const char* op = "multihead_gather_backward_sparse";
  GradArgs a = check_grad_args(op, grad_e, rows);
  const c10::cuda::CUDAGuard guard(grad_e.device());
  if (a.n == 0) {
    return {at::empty({0}, a.rows.options().dtype(at::kLong)), at::empty({0, a.d_head}, a.grad.options())};
  }
  auto vals = at::empty({a.n, a.d_head}, a.grad.options());
  Segments sg = backward_sorted(a, -1, &vals, nullptr);
  // The one host synchronisation: the output size U is data-dependent.
  const int64_t U = sg.num_runs.item<int32_t>();
  return {sg.unique.narrow(0, 0, U), vals.narrow(0, 0, U)};
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CUDA, m) {
  m.impl("_multihead_gather_backward", &multihead_gather_backward_cuda);
  m.impl("_multihead_gather_backward_sparse", &multihead_gather_backward_sparse_cuda);
}

}  // namespace engram
