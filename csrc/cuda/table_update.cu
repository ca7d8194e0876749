// CUDA kernels of the table optimizer ops. table_update: one warp per listed row. The fused
// backward multihead_gather_fused_update: the sorted row sums of row_segments.cuh into a
// caching-allocator fp32 buffer (fp64 for float64), then the same row-update kernel over the U
// unique rows, U read on the device: no host synchronisation, no gradient tensor outside the op.
// Per-row maths: engram/table_optim.h. Results are deterministic on the GPU (fixed orders, no
// atomics) but not bitwise equal to the CPU: row-wise optimizers reduce mean(g^2) with a fixed
// butterfly over the warp where the CPU sums sequentially, and nvcc contracts multiply-adds
// into FMAs where the CPU build may not.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <limits>
#include <string_view>
#include <type_traits>

#include "check/table_update.h"
#include "engram/table_optim.h"
#include "row_segments.cuh"

namespace engram {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;

template <typename table_t, typename mom_t>
struct UpdatePtrs {
  using acc_t = at::opmath_type<table_t>;
  table_t* w;
  mom_t* m1;
  mom_t* m2;
  acc_t* row_state;
  int32_t* row_step;
  const int64_t* step;
  int64_t D, R;
  TableOptimParams p;
  bool sr;
  uint64_t seed;
  const int64_t* row_ids;  // the table row each weight row holds (a cache), or nullptr
};

// Row i of the list: table row rows[i] with gradient g[i * D .. (i + 1) * D). U on the host
// (u_host >= 0) or on the device (*u_dev). check_sorted: the rows come from the caller and must
// be strictly increasing (the fused path's unique rows are sorted by construction).
template <TableOptimizer O, typename table_t, typename mom_t, typename grad_t, typename index_t>
__global__ void __launch_bounds__(kWarp* kRowsPerBlock)
    table_update_kernel(UpdatePtrs<table_t, mom_t> a, const index_t* __restrict__ rows, const grad_t* __restrict__ g,
                        int64_t u_host, const int32_t* __restrict__ u_dev, bool check_sorted) {
  using acc_t = at::opmath_type<table_t>;
  const int64_t U = u_host >= 0 ? u_host : static_cast<int64_t>(*u_dev);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (i >= U) return;  // uniform across the warp: one warp is one row
  const int64_t r = rows[i];
  // Out-of-range or repeated rows would write out of bounds or race; torch's own index kernels
  // treat bad indices the same way (device assert) rather than syncing to check on the host.
  CUDA_KERNEL_ASSERT(r >= 0 && r < a.R && "table_update: rows must lie in [0, num_rows)");
  CUDA_KERNEL_ASSERT((!check_sorted || i == 0 || static_cast<int64_t>(rows[i - 1]) < r) &&
                     "table_update: rows must be strictly increasing (unique and sorted)");
  const grad_t* gr = g + i * a.D;
  acc_t sq = acc_t(0);
  if constexpr (O == TableOptimizer::kPartialRowwiseAdam || O == TableOptimizer::kRowwiseAdagrad) {
    for (int64_t d = threadIdx.x; d < a.D; d += kWarp) {
      const acc_t gi = static_cast<acc_t>(gr[d]);
      sq += gi * gi;
    }
#pragma unroll
    for (int o = kWarp / 2; o > 0; o /= 2) sq += __shfl_xor_sync(0xffffffffu, sq, o);
    sq /= static_cast<acc_t>(a.D);
  }
  TableRowCoeffs<acc_t> c{};
  if (threadIdx.x == 0) {
    c = table_row_coeffs<acc_t>(O, a.p, a.row_step ? a.row_step + r : nullptr, a.row_state ? a.row_state + r : nullptr,
                                sq);
  }
  c.step_size = __shfl_sync(0xffffffffu, c.step_size, 0);
  c.denom = __shfl_sync(0xffffffffu, c.denom, 0);
  c.bc2_sqrt = __shfl_sync(0xffffffffu, c.bc2_sqrt, 0);
  c.one_minus_beta1 = __shfl_sync(0xffffffffu, c.one_minus_beta1, 0);
  c.beta1 = __shfl_sync(0xffffffffu, c.beta1, 0);
  c.beta2 = __shfl_sync(0xffffffffu, c.beta2, 0);
  c.one_minus_beta2 = __shfl_sync(0xffffffffu, c.one_minus_beta2, 0);
  c.eps = __shfl_sync(0xffffffffu, c.eps, 0);
  c.decay = __shfl_sync(0xffffffffu, c.decay, 0);
  const int64_t step = *a.step;
  table_t* wr = a.w + r * a.D;
  for (int64_t d = threadIdx.x; d < a.D; d += kWarp) {
    acc_t wi = static_cast<acc_t>(wr[d]);
    acc_t mi = acc_t(0), vi = acc_t(0);
    if constexpr (O == TableOptimizer::kAdam || O == TableOptimizer::kPartialRowwiseAdam)
      mi = static_cast<acc_t>(a.m1[r * a.D + d]);
    if constexpr (O == TableOptimizer::kAdam) vi = static_cast<acc_t>(a.m2[r * a.D + d]);
    table_elem<acc_t>(O, c, wi, mi, vi, static_cast<acc_t>(gr[d]));
    if constexpr (std::is_same_v<table_t, c10::BFloat16>) {
      wr[d] =
          a.sr ? c10::BFloat16(bf16_bits_stochastic(wi, rounding_bits(a.seed, step, a.row_ids ? a.row_ids[r] : r, d)),
                               c10::BFloat16::from_bits())
               : static_cast<table_t>(wi);
    } else {
      wr[d] = static_cast<table_t>(wi);
    }
    if constexpr (O == TableOptimizer::kAdam || O == TableOptimizer::kPartialRowwiseAdam)
      a.m1[r * a.D + d] = static_cast<mom_t>(mi);
    if constexpr (O == TableOptimizer::kAdam) a.m2[r * a.D + d] = static_cast<mom_t>(vi);
  }
}

__global__ void increment_kernel(int64_t* step) { *step += 1; }

// Launches table_update_kernel with every template argument resolved, then counts the update.
template <typename index_t>
void launch_update(const TableUpdateArgs& args, const at::Tensor& weight, const at::Tensor& momentum1,
                   const at::Tensor& momentum2, const at::Tensor& row_step, const at::Tensor& step, int64_t seed,
                   const index_t* rows, const void* grads, at::ScalarType grad_dtype, int64_t u_host,
                   const int32_t* u_dev, int64_t u_bound, bool check_sorted, const int64_t* row_ids = nullptr) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = (u_bound + kRowsPerBlock - 1) / kRowsPerBlock;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "table_update: at most ",
              int64_t{std::numeric_limits<int32_t>::max()} * kRowsPerBlock, " rows per call, got ", u_bound);
  if (blocks > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "table_update", [&] {
      using table_t = scalar_t;
      using acc_t = at::opmath_type<table_t>;
      auto run = [&](auto opt_tag, auto mom_tag) {
        constexpr TableOptimizer O = decltype(opt_tag)::value;
        using mom_t = decltype(mom_tag);
        UpdatePtrs<table_t, mom_t> a{};
        a.w = weight.data_ptr<table_t>();
        if constexpr (O == TableOptimizer::kAdam || O == TableOptimizer::kPartialRowwiseAdam) {
          a.m1 = cuda::ptr<mom_t>(momentum1);
          a.row_step = row_step.data_ptr<int32_t>();
        }
        if constexpr (O == TableOptimizer::kAdam) a.m2 = cuda::ptr<mom_t>(momentum2);
        if constexpr (O == TableOptimizer::kPartialRowwiseAdam) a.row_state = cuda::ptr<acc_t>(momentum2);
        if constexpr (O == TableOptimizer::kRowwiseAdagrad) a.row_state = cuda::ptr<acc_t>(momentum1);
        a.step = step.data_ptr<int64_t>();
        a.D = weight.size(1);
        a.R = weight.size(0);
        a.p = args.params;
        a.sr = args.stochastic_rounding;
        a.seed = static_cast<uint64_t>(seed);
        a.row_ids = row_ids;
        const dim3 block(kWarp, kRowsPerBlock);
        const dim3 grid(static_cast<unsigned>(blocks));
        auto with_grad = [&](auto grad_tag) {
          using grad_t = decltype(grad_tag);
          table_update_kernel<O, table_t, mom_t, grad_t, index_t>
              <<<grid, block, 0, stream>>>(a, rows, static_cast<const grad_t*>(grads), u_host, u_dev, check_sorted);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        if (grad_dtype == at::kFloat) {
          with_grad(float{});
        } else if (grad_dtype == at::kDouble) {
          with_grad(double{});
        } else {
          with_grad(table_t{});
        }
      };
      dispatch_table_optimizer<acc_t>(args, run);
    });
  }
  increment_kernel<<<1, 1, 0, stream>>>(step.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void table_update_cuda(const at::Tensor& weight, const at::Tensor& momentum1, const at::Tensor& momentum2,
                       const at::Tensor& row_step, const at::Tensor& step, const at::Tensor& rows,
                       const at::Tensor& grads, const at::Tensor& hparams, c10::string_view optimizer, int64_t seed,
                       const std::optional<at::Tensor>& row_ids) {
  constexpr const char* op = "table_update";
  const int64_t* ids = check_row_ids(op, weight, row_ids);
  const TableUpdateArgs a = check_table_state(op, weight, momentum1, momentum2, row_step, step, hparams,
                                              std::string_view(optimizer.data(), optimizer.size()), seed);
  check_table_update_rows(op, weight, rows, grads);
  const int64_t U = rows.size(0), D = weight.size(1);
  const c10::cuda::CUDAGuard guard(weight.device());
  const auto rows_c = rows.contiguous();
  const auto grads_c = grads.contiguous();
  AT_DISPATCH_INDEX_TYPES(rows.scalar_type(), "table_update_rows", [&] {
    launch_update<index_t>(a, weight, momentum1, momentum2, row_step, step, seed, rows_c.data_ptr<index_t>(),
                           grads_c.data_ptr(), grads_c.scalar_type(), D == 0 ? 0 : U, nullptr, D == 0 ? 0 : U, true,
                           ids);
  });
}

void multihead_gather_fused_update_cuda(const at::Tensor& grad_e, const at::Tensor& rows, const at::Tensor& weight,
                                        const at::Tensor& momentum1, const at::Tensor& momentum2,
                                        const at::Tensor& row_step, const at::Tensor& step, const at::Tensor& hparams,
                                        c10::string_view optimizer, int64_t seed,
                                        const std::optional<at::Tensor>& row_ids) {
  constexpr const char* op = "multihead_gather_fused_update";
  const int64_t* ids = check_row_ids(op, weight, row_ids);
  const TableUpdateArgs a = check_table_state(op, weight, momentum1, momentum2, row_step, step, hparams,
                                              std::string_view(optimizer.data(), optimizer.size()), seed);
  GradArgs g = check_grad_args(op, grad_e, rows);
  TORCH_CHECK(g.d_head == weight.size(1), op,
              ": grad_e's last dimension must be H * d_head with d_head=", weight.size(1),
              " (the weight's), got d_head ", g.d_head);
  TORCH_CHECK(grad_e.scalar_type() == weight.scalar_type(), op, ": grad_e must have the weight's dtype ",
              weight.scalar_type(), ", got ", grad_e.scalar_type());
  TORCH_CHECK(grad_e.device() == weight.device() && rows.device() == weight.device(), op,
              ": grad_e and rows must be on the weight's device ", weight.device(), ", got ", grad_e.device(), " and ",
              rows.device());
  const c10::cuda::CUDAGuard guard(weight.device());
  if (g.n == 0 || g.d_head == 0) {
    launch_update<int64_t>(a, weight, momentum1, momentum2, row_step, step, seed, nullptr, nullptr,
                           weight.scalar_type(), 0, nullptr, 0, false);
    return;
  }
  Segments sg = AT_DISPATCH_INDEX_TYPES(g.rows.scalar_type(), "multihead_gather_fused_update_sort",
                                        [&] { return build_segments<index_t>(g, weight.size(0)); });
  const auto acc_dt = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto sums = at::empty({g.n, g.d_head}, g.grad.options().dtype(acc_dt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.grad.scalar_type(), op, [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    acc_t* out = cuda::ptr<acc_t>(sums);
    if (vec_width<scalar_t>(g.d_head, g.grad.data_ptr()) > 1) {
      launch_row_sums<scalar_t, 16 / sizeof(scalar_t), acc_t>(g, sg, out, nullptr);
    } else {
      launch_row_sums<scalar_t, 1, acc_t>(g, sg, out, nullptr);
    }
  });
  launch_update<int64_t>(a, weight, momentum1, momentum2, row_step, step, seed, sg.unique.data_ptr<int64_t>(),
                         sums.data_ptr(), acc_dt, -1, sg.num_runs.data_ptr<int32_t>(), g.n, false, ids);
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CUDA, m) {
  m.impl("table_update", &table_update_cuda);
  m.impl("_multihead_gather_fused_update", &multihead_gather_fused_update_cuda);
}

}  // namespace engram
