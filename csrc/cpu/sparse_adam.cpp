// CPU kernel of sparse_adam_step: lazy row-wise Adam over unique sorted rows, parallel over rows,
// maths in the table's opmath type (float32, float64 for float64 tables).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "engram/sparse_adam.h"
#include "engram/sparse_adam_check.h"

namespace engram {
namespace {

// The values check the CUDA kernel does with device asserts; here it is one cheap pass, done
// before anything is written so a bad call leaves table and state untouched.
template <typename index_t>
void check_rows_cpu(const index_t* rows, int64_t U, int64_t num_rows) {
  for (int64_t i = 0; i < U; ++i) {
    const int64_t r = rows[i];
    TORCH_CHECK(r >= 0 && r < num_rows, "sparse_adam_step: rows must lie in [0, num_rows=", num_rows, "), got ", r,
                " at index ", i);
    TORCH_CHECK(i == 0 || static_cast<int64_t>(rows[i - 1]) < r,
                "sparse_adam_step: rows must be strictly increasing (unique and sorted, as from "
                "multihead_gather_backward_sparse or a coalesced sparse gradient), got ",
                static_cast<int64_t>(rows[i - 1]), " then ", r, " at index ", i);
  }
}

// Rows are scattered over a table far larger than the caches (and than the TLB's reach), so each
// row costs a few DRAM round trips; their addresses are known in advance, so fetch them early.
constexpr int64_t kPrefetchRows = 8;

inline void prefetch_bytes(const void* p, int64_t bytes) {
#if defined(__GNUC__)
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(static_cast<const char*>(p) + o, 1, 3);
#endif
}

template <bool kSmallWeight, typename table_t, typename mom_t, typename grad_t, typename index_t>
void sparse_adam_rows(table_t* w, mom_t* m, mom_t* v, int32_t* step, const index_t* rows, const grad_t* g, int64_t U,
                      int64_t D, double lr, double beta1, double beta2, const AdamElemParams<at::opmath_type<table_t>>& p) {
  using acc_t = at::opmath_type<table_t>;
  // About 32k element updates per task: rows are short (d_head 64..256), so a grain of one row
  // would spend more time scheduling than updating.
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(D, 1));
  at::parallel_for(0, U, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (i + kPrefetchRows < end) {
        const int64_t ahead = rows[i + kPrefetchRows];
        prefetch_bytes(w + ahead * D, D * static_cast<int64_t>(sizeof(table_t)));
        prefetch_bytes(m + ahead * D, D * static_cast<int64_t>(sizeof(mom_t)));
        prefetch_bytes(v + ahead * D, D * static_cast<int64_t>(sizeof(mom_t)));
      }
      const int64_t r = rows[i];
      const int32_t s = ++step[r];
      const AdamRowCoeffs c = adam_row_coeffs(s, lr, beta1, beta2);
      const acc_t step_size = static_cast<acc_t>(c.step_size);
      const acc_t bc2_sqrt = static_cast<acc_t>(c.bias_corr2_sqrt);
      table_t* __restrict__ wr = w + r * D;
      mom_t* __restrict__ mr = m + r * D;
      mom_t* __restrict__ vr = v + r * D;
      const grad_t* __restrict__ gr = g + i * D;
      for (int64_t d = 0; d < D; ++d) {
        acc_t wi = static_cast<acc_t>(wr[d]);
        acc_t mi = static_cast<acc_t>(mr[d]);
        acc_t vi = static_cast<acc_t>(vr[d]);
        adam_elem<acc_t, kSmallWeight>(wi, mi, vi, static_cast<acc_t>(gr[d]), p, step_size, bc2_sqrt);
        wr[d] = static_cast<table_t>(wi);
        mr[d] = static_cast<mom_t>(mi);
        vr[d] = static_cast<mom_t>(vi);
      }
    }
  });
}

template <typename table_t, typename mom_t, typename grad_t, typename index_t>
void sparse_adam_kernel(table_t* w, mom_t* m, mom_t* v, int32_t* step, const index_t* rows, const grad_t* g,
                        int64_t U, int64_t D, double lr, double beta1, double beta2, double eps,
                        double weight_decay) {
  using acc_t = at::opmath_type<table_t>;
  AdamElemParams<acc_t> p;
  p.one_minus_beta1 = static_cast<acc_t>(1.0 - beta1);
  p.beta1 = acc_t(1) - p.one_minus_beta1;  // torch's lerp uses 1 - weight in acc_t
  p.beta2 = static_cast<acc_t>(beta2);
  p.one_minus_beta2 = static_cast<acc_t>(1.0 - beta2);
  p.eps = static_cast<acc_t>(eps);
  p.decay = static_cast<acc_t>(1.0 - lr * weight_decay);
  if (p.one_minus_beta1 < acc_t(0.5)) {
    sparse_adam_rows<true>(w, m, v, step, rows, g, U, D, lr, beta1, beta2, p);
  } else {
    sparse_adam_rows<false>(w, m, v, step, rows, g, U, D, lr, beta1, beta2, p);
  }
}

void sparse_adam_step_cpu(const at::Tensor& table, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                          const at::Tensor& row_step, const at::Tensor& rows, const at::Tensor& grads, double lr,
                          double beta1, double beta2, double eps, double weight_decay) {
  check_sparse_adam_args(table, exp_avg, exp_avg_sq, row_step, rows, grads, lr, beta1, beta2, eps, weight_decay);
  const int64_t U = rows.size(0), D = table.size(1), R = table.size(0);
  if (U == 0) return;
  const auto rows_c = rows.contiguous();
  const auto grads_c = grads.contiguous();
  const bool mom_bf16 = exp_avg.scalar_type() == at::kBFloat16;
  const bool grad_f32 = grads.scalar_type() == at::kFloat;
  AT_DISPATCH_INDEX_TYPES(rows.scalar_type(), "sparse_adam_step_rows", [&] {
    const index_t* r = rows_c.data_ptr<index_t>();
    check_rows_cpu(r, U, R);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, table.scalar_type(), "sparse_adam_step", [&] {
      using table_t = scalar_t;
      using acc_t = at::opmath_type<table_t>;
      auto run = [&](auto mom_tag, auto grad_tag) {
        using mom_t = decltype(mom_tag);
        using grad_t = decltype(grad_tag);
        sparse_adam_kernel<table_t, mom_t, grad_t, index_t>(
            table.data_ptr<table_t>(), exp_avg.data_ptr<mom_t>(), exp_avg_sq.data_ptr<mom_t>(),
            row_step.data_ptr<int32_t>(), r, grads_c.data_ptr<grad_t>(), U, D, lr, beta1, beta2, eps, weight_decay);
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

TORCH_LIBRARY_IMPL(engram, CPU, m) { m.impl("sparse_adam_step", &sparse_adam_step_cpu); }

}  // namespace engram
