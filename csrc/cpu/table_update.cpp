// CPU kernels of the table optimizer ops: table_update (rows and their summed gradients given)
// and multihead_gather_fused_update (the fused backward: sort the lookups, sum each row's
// gradient in position order, update the row and its state; no gradient tensor is formed, only a
// per-thread buffer of the rows that thread owns). Per-row maths: engram/table_optim.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string_view>
#include <type_traits>
#include <vector>

#include "check/table_update.h"
#include "engram/table_optim.h"
#include "segments.h"

namespace engram {
namespace {

// Rows are scattered over a table far larger than the caches (and than the TLB's reach), so each
// row costs a few DRAM round trips; their addresses are known in advance, so fetch them early.
constexpr int64_t kPrefetchRows = 8;

inline void prefetch_bytes(const void* p, int64_t bytes) {
#if defined(__GNUC__)
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(static_cast<const char*>(p) + o, 1, 3);
#endif
}

// Pointers and constants of one update call. mom_t: the dtype of the full [R, d] moments
// (acc_t or bfloat16); per-row state (row-wise second moment, adagrad accumulator) is acc_t.
template <TableOptimizer O, typename table_t, typename mom_t>
struct RowUpdate {
  using acc_t = at::opmath_type<table_t>;
  table_t* w;
  mom_t* m1;         // adam kinds: [R, d]
  mom_t* m2;         // adam: [R, d]
  acc_t* row_state;  // partial_rowwise_adam: momentum2 [R]; rowwise_adagrad: momentum1 [R]
  int32_t* row_step;
  int64_t D;
  TableOptimParams p;
  bool sr;
  uint64_t seed;
  int64_t step;
  const int64_t* row_ids;  // the table row each weight row holds (a cache), or nullptr

  void prefetch(int64_t r) const {
    prefetch_bytes(w + r * D, D * static_cast<int64_t>(sizeof(table_t)));
    if (m1) prefetch_bytes(m1 + r * D, D * static_cast<int64_t>(sizeof(mom_t)));
    if (m2) prefetch_bytes(m2 + r * D, D * static_cast<int64_t>(sizeof(mom_t)));
  }

  // Row r with its summed gradient g [D] in acc_t.
  void operator()(int64_t r, const acc_t* __restrict__ g) const {
    acc_t sq_mean = acc_t(0);
    if constexpr (O == TableOptimizer::kPartialRowwiseAdam || O == TableOptimizer::kRowwiseAdagrad) {
      for (int64_t j = 0; j < D; ++j) sq_mean += g[j] * g[j];
      sq_mean /= static_cast<acc_t>(D);
    }
    const auto c =
        table_row_coeffs<acc_t>(O, p, row_step ? row_step + r : nullptr, row_state ? row_state + r : nullptr, sq_mean);
    table_t* __restrict__ wr = w + r * D;
    mom_t* __restrict__ mr = m1 ? m1 + r * D : nullptr;
    mom_t* __restrict__ vr = m2 ? m2 + r * D : nullptr;
    for (int64_t j = 0; j < D; ++j) {
      acc_t wi = static_cast<acc_t>(wr[j]);
      acc_t mi = acc_t(0), vi = acc_t(0);
      if constexpr (O == TableOptimizer::kAdam || O == TableOptimizer::kPartialRowwiseAdam)
        mi = static_cast<acc_t>(mr[j]);
      if constexpr (O == TableOptimizer::kAdam) vi = static_cast<acc_t>(vr[j]);
      table_elem<acc_t>(O, c, wi, mi, vi, g[j]);
      if constexpr (std::is_same_v<table_t, c10::BFloat16>) {
        wr[j] = sr ? c10::BFloat16(bf16_bits_stochastic(wi, rounding_bits(seed, step, row_ids ? row_ids[r] : r, j)),
                                   c10::BFloat16::from_bits())
                   : static_cast<table_t>(wi);
      } else {
        wr[j] = static_cast<table_t>(wi);
      }
      if constexpr (O == TableOptimizer::kAdam || O == TableOptimizer::kPartialRowwiseAdam)
        mr[j] = static_cast<mom_t>(mi);
      if constexpr (O == TableOptimizer::kAdam) vr[j] = static_cast<mom_t>(vi);
    }
  }
};

// Calls f(RowUpdate<O, table_t, mom_t>{...}) with every template argument resolved.
template <typename F>
void dispatch_update(const TableUpdateArgs& a, const at::Tensor& weight, const at::Tensor& momentum1,
                     const at::Tensor& momentum2, const at::Tensor& row_step, const at::Tensor& step, int64_t seed,
                     const int64_t* row_ids, const F& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "table_update", [&] {
    using table_t = scalar_t;
    using acc_t = at::opmath_type<table_t>;
    auto run = [&](auto opt_tag, auto mom_tag) {
      constexpr TableOptimizer O = decltype(opt_tag)::value;
      using mom_t = decltype(mom_tag);
      RowUpdate<O, table_t, mom_t> u{};
      u.w = weight.data_ptr<table_t>();
      if constexpr (O == TableOptimizer::kAdam || O == TableOptimizer::kPartialRowwiseAdam) {
        u.m1 = momentum1.data_ptr<mom_t>();
        u.row_step = row_step.data_ptr<int32_t>();
      }
      if constexpr (O == TableOptimizer::kAdam) u.m2 = momentum2.data_ptr<mom_t>();
      if constexpr (O == TableOptimizer::kPartialRowwiseAdam) u.row_state = momentum2.data_ptr<acc_t>();
      if constexpr (O == TableOptimizer::kRowwiseAdagrad) u.row_state = momentum1.data_ptr<acc_t>();
      u.D = weight.size(1);
      u.p = a.params;
      u.sr = a.stochastic_rounding;
      u.seed = static_cast<uint64_t>(seed);
      u.step = step.data_ptr<int64_t>()[0];
      u.row_ids = row_ids;
      f(u);
    };
    dispatch_table_optimizer<acc_t>(a, run);
  });
  step.data_ptr<int64_t>()[0] += 1;
}

// The values check the CUDA kernel does with device asserts; here it is one cheap pass, done
// before anything is written so a bad call leaves weight and state untouched.
template <typename index_t>
void check_rows_cpu(const index_t* rows, int64_t U, int64_t num_rows) {
  for (int64_t i = 0; i < U; ++i) {
    const int64_t r = rows[i];
    TORCH_CHECK(r >= 0 && r < num_rows, "table_update: rows must lie in [0, num_rows=", num_rows, "), got ", r,
                " at index ", i);
    TORCH_CHECK(i == 0 || static_cast<int64_t>(rows[i - 1]) < r,
                "table_update: rows must be strictly increasing (unique and sorted, as from "
                "multihead_gather_backward_sparse or a coalesced sparse gradient), got ",
                static_cast<int64_t>(rows[i - 1]), " then ", r, " at index ", i);
  }
}

void table_update_cpu(const at::Tensor& weight, const at::Tensor& momentum1, const at::Tensor& momentum2,
                      const at::Tensor& row_step, const at::Tensor& step, const at::Tensor& rows,
                      const at::Tensor& grads, const at::Tensor& hparams, c10::string_view optimizer, int64_t seed,
                      const std::optional<at::Tensor>& row_ids) {
  constexpr const char* op = "table_update";
  const TableUpdateArgs a = check_table_state(op, weight, momentum1, momentum2, row_step, step, hparams,
                                              std::string_view(optimizer.data(), optimizer.size()), seed);
  check_table_update_rows(op, weight, rows, grads);
  const int64_t U = rows.size(0), D = weight.size(1), R = weight.size(0);
  const auto rows_c = rows.contiguous();
  AT_DISPATCH_INDEX_TYPES(rows.scalar_type(), "table_update_rows",
                          [&] { check_rows_cpu(rows_c.const_data_ptr<index_t>(), U, R); });
  if (U == 0 || D == 0) {
    step.data_ptr<int64_t>()[0] += 1;
    return;
  }
  const auto rows64 = rows_c.to(at::kLong);
  const int64_t* r = rows64.const_data_ptr<int64_t>();
  // Gradients as acc_t rows: float32 stays as it is, 16-bit and float64 are read as their own
  // maths type (a float64 table's acc_t is double).
  dispatch_update(a, weight, momentum1, momentum2, row_step, step, seed, check_row_ids(op, weight, row_ids),
                  [&](const auto& u) {
                    using acc_t = typename std::decay_t<decltype(u)>::acc_t;
                    const at::Tensor g = grads.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
                    const acc_t* gp = g.const_data_ptr<acc_t>();
                    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(D, 1));
                    at::parallel_for(0, U, grain, [&](int64_t begin, int64_t end) {
                      for (int64_t i = begin; i < end; ++i) {
                        if (i + kPrefetchRows < end) u.prefetch(r[i + kPrefetchRows]);
                        u(r[i], gp + i * D);
                      }
                    });
                  });
}

void multihead_gather_fused_update_cpu(const at::Tensor& grad_e, const at::Tensor& rows, const at::Tensor& weight,
                                       const at::Tensor& momentum1, const at::Tensor& momentum2,
                                       const at::Tensor& row_step, const at::Tensor& step, const at::Tensor& hparams,
                                       c10::string_view optimizer, int64_t seed,
                                       const std::optional<at::Tensor>& row_ids) {
  constexpr const char* op = "multihead_gather_fused_update";
  const TableUpdateArgs a = check_table_state(op, weight, momentum1, momentum2, row_step, step, hparams,
                                              std::string_view(optimizer.data(), optimizer.size()), seed);
  const int64_t d_head = check_multihead_gather_backward_args(grad_e, rows, op);
  TORCH_CHECK(d_head == weight.size(1), op, ": grad_e's last dimension must be H * d_head with d_head=", weight.size(1),
              " (the weight's), got d_head ", d_head);
  TORCH_CHECK(grad_e.device() == weight.device() && rows.device() == weight.device(), op,
              ": grad_e and rows must be on the weight's device ", weight.device(), ", got ", grad_e.device(), " and ",
              rows.device());
  TORCH_CHECK(grad_e.scalar_type() == weight.scalar_type(), op, ": grad_e must have the weight's dtype ",
              weight.scalar_type(), ", got ", grad_e.scalar_type());
  const int64_t* ids = check_row_ids(op, weight, row_ids);
  const at::Tensor rows_c = rows.contiguous();
  const cpu::RowSegments seg = cpu::segments_of(rows_c, weight.size(0), op);
  const int64_t* unique = seg.unique_rows.const_data_ptr<int64_t>();
  if (seg.unique_rows.numel() == 0 || d_head == 0) {
    step.data_ptr<int64_t>()[0] += 1;
    return;
  }
  const at::Tensor grad_c = grad_e.contiguous();
  dispatch_update(a, weight, momentum1, momentum2, row_step, step, seed, ids, [&](const auto& u) {
    using acc_t = typename std::decay_t<decltype(u)>::acc_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_c.scalar_type(), op, [&] {
      cpu::sum_segments<scalar_t, acc_t>(
          seg, grad_c.const_data_ptr<scalar_t>(), d_head, [&](int64_t s, const acc_t* g) { u(unique[s], g); },
          [&](int64_t s) { u.prefetch(unique[s]); });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CPU, m) {
  m.impl("table_update", &table_update_cpu);
  m.impl("_multihead_gather_fused_update", &multihead_gather_fused_update_cpu);
}

}  // namespace engram
