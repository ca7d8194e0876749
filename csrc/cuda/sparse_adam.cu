// CUDA kernel of sparse_adam_step: one warp per unique row, lanes striding over d_head so every
// load and store of a row is coalesced. Row values are checked on the device (no host sync).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <limits>

#include "engram/sparse_adam.h"
#include "engram/sparse_adam_check.h"

namespace engram {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;

template <typename table_t, typename mom_t, typename grad_t, typename index_t, typename acc_t>
__global__ void __launch_bounds__(kWarp* kRowsPerBlock)
    sparse_adam_kernel(table_t* __restrict__ w, mom_t* __restrict__ m, mom_t* __restrict__ v,
                       int32_t* __restrict__ step, const index_t* __restrict__ rows, const grad_t* __restrict__ g,
                       int64_t U, int64_t D, int64_t R, double lr, double beta1, double beta2,
                       AdamElemParams<acc_t> p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (i >= U) return;  // uniform across the warp: one warp is one row
  const int64_t r = rows[i];
  // Out-of-range or repeated rows would write out of bounds or race; torch's own index kernels
  // treat bad indices the same way (device assert) rather than syncing to check on the host.
  CUDA_KERNEL_ASSERT(r >= 0 && r < R && "sparse_adam_step: rows must lie in [0, num_rows)");
  CUDA_KERNEL_ASSERT((i == 0 || static_cast<int64_t>(rows[i - 1]) < r) &&
                     "sparse_adam_step: rows must be strictly increasing (unique and sorted)");
  double step_size = 0.0, bc2_sqrt = 0.0;
  if (threadIdx.x == 0) {
    const int32_t s = step[r] + 1;
    step[r] = s;
    const AdamRowCoeffs c = adam_row_coeffs(s, lr, beta1, beta2);
    step_size = c.step_size;
    bc2_sqrt = c.bias_corr2_sqrt;
  }
  step_size = __shfl_sync(0xffffffffu, step_size, 0);
  bc2_sqrt = __shfl_sync(0xffffffffu, bc2_sqrt, 0);
  const acc_t ss = static_cast<acc_t>(step_size);
  const acc_t bc = static_cast<acc_t>(bc2_sqrt);
  table_t* wr = w + r * D;
  mom_t* mr = m + r * D;
  mom_t* vr = v + r * D;
  const grad_t* gr = g + i * D;
  for (int64_t d = threadIdx.x; d < D; d += kWarp) {
    acc_t wi = static_cast<acc_t>(wr[d]);
    acc_t mi = static_cast<acc_t>(mr[d]);
    acc_t vi = static_cast<acc_t>(vr[d]);
    const acc_t gi = static_cast<acc_t>(gr[d]);
    if (p.one_minus_beta1 < acc_t(0.5)) {  // uniform across the grid: no divergence
      adam_elem<acc_t, true>(wi, mi, vi, gi, p, ss, bc);
    } else {
      adam_elem<acc_t, false>(wi, mi, vi, gi, p, ss, bc);
    }
    wr[d] = static_cast<table_t>(wi);
    mr[d] = static_cast<mom_t>(mi);
    vr[d] = static_cast<mom_t>(vi);
  }
}

void sparse_adam_step_cuda(const at::Tensor& table, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                           const at::Tensor& row_step, const at::Tensor& rows, const at::Tensor& grads, double lr,
                           double beta1, double beta2, double eps, double weight_decay) {
  check_sparse_adam_args(table, exp_avg, exp_avg_sq, row_step, rows, grads, lr, beta1, beta2, eps, weight_decay);
  const int64_t U = rows.size(0), D = table.size(1), R = table.size(0);
  if (U == 0) return;
  const c10::cuda::CUDAGuard device_guard(table.device());
  const auto rows_c = rows.contiguous();
  const auto grads_c = grads.contiguous();
  const bool mom_bf16 = exp_avg.scalar_type() == at::kBFloat16;
  const bool grad_f32 = grads.scalar_type() == at::kFloat;
  const dim3 block(kWarp, kRowsPerBlock);
  const int64_t blocks = (U + kRowsPerBlock - 1) / kRowsPerBlock;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "sparse_adam_step: at most ",
              int64_t{std::numeric_limits<int32_t>::max()} * kRowsPerBlock, " rows per call, got U=", U);
  const dim3 grid(static_cast<unsigned>(blocks));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(rows.scalar_type(), "sparse_adam_step_rows", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, table.scalar_type(), "sparse_adam_step", [&] {
      using table_t = scalar_t;
      using acc_t = at::opmath_type<table_t>;
      AdamElemParams<acc_t> p;
      p.one_minus_beta1 = static_cast<acc_t>(1.0 - beta1);
      p.beta1 = acc_t(1) - p.one_minus_beta1;
      p.beta2 = static_cast<acc_t>(beta2);
      p.one_minus_beta2 = static_cast<acc_t>(1.0 - beta2);
      p.eps = static_cast<acc_t>(eps);
      p.decay = static_cast<acc_t>(1.0 - lr * weight_decay);
      auto run = [&](auto mom_tag, auto grad_tag) {
        using mom_t = decltype(mom_tag);
        using grad_t = decltype(grad_tag);
        sparse_adam_kernel<table_t, mom_t, grad_t, index_t, acc_t><<<grid, block, 0, stream>>>(
            table.data_ptr<table_t>(), exp_avg.data_ptr<mom_t>(), exp_avg_sq.data_ptr<mom_t>(),
            row_step.data_ptr<int32_t>(), rows_c.data_ptr<index_t>(), grads_c.data_ptr<grad_t>(), U, D, R, lr,
            beta1, beta2, p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (mom_bf16) {
        grad_f32 ? run(c10::BFloat16{}, float{}) : run(c10::BFloat16{}, table_t{});
      } else {
        grad_f32 ? run(acc_t{}, float{}) : run(acc_t{}, table_t{});
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CUDA, m) { m.impl("sparse_adam_step", &sparse_adam_step_cuda); }

}  // namespace engram
