// Argument checks and preparation of multihead_gather and its backward ops shared by the CPU and
// CUDA adapters
// (shapes, dtypes, devices; never tensor values, so the CUDA paths stay free of host syncs).
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace engram {

inline bool is_gather_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

inline void check_gather_rows(const at::Tensor& rows, const char* op) {
  TORCH_CHECK(rows.dim() >= 1, op, ": rows must be [..., H] (at least one dimension), got a 0-d tensor");
  TORCH_CHECK(rows.scalar_type() == at::kLong || rows.scalar_type() == at::kInt, op,
              ": rows must be int64 or int32, got ", rows.scalar_type());
  TORCH_CHECK(rows.size(-1) >= 1, op, ": rows must be [..., H] with H >= 1 heads, got shape ", rows.sizes());
}

// What every gather checks of its table [num_rows, d_head] and rows [..., H] (the dtypes are its own).
inline void check_gather_table_rows(const at::Tensor& table, const at::Tensor& rows, const char* op) {
  TORCH_CHECK(table.dim() == 2, op, ": table must be [num_rows, d_head], got shape ", table.sizes());
  check_gather_rows(rows, op);
  TORCH_CHECK(rows.device() == table.device(), op, ": rows must be on table's device ", table.device(), ", got ",
              rows.device());
}

// e [..., H * d_head] for rows [..., H].
inline at::Tensor empty_gather_output(const at::Tensor& rows, int64_t d_head, const at::TensorOptions& options) {
  std::vector<int64_t> out_shape = rows.sizes().vec();
  out_shape.back() = rows.size(-1) * d_head;
  return at::empty(out_shape, options);
}

inline void check_multihead_gather_args(const at::Tensor& table, const at::Tensor& rows) {
  check_gather_table_rows(table, rows, "multihead_gather");
  TORCH_CHECK(is_gather_dtype(table.scalar_type()),
              "multihead_gather: table must be float32, bfloat16, float16 or float64, got ", table.scalar_type());
}

// The forward's arguments prepared once for either backend: the table as it is when its rows are
// contiguous (a column slice of a wider table, row stride > d_head, is read in place rather than
// copied, which would cost a pass over the whole table), rows contiguous, e [..., H * d_head]
// allocated on the table's device. A CUDA adapter sets its device guard before preparing.
struct GatherArgs {
  at::Tensor table, rows, out;
};

inline GatherArgs prepare_multihead_gather(const at::Tensor& table, const at::Tensor& rows) {
  check_multihead_gather_args(table, rows);
  GatherArgs a;
  a.table = (table.stride(1) == 1 || table.size(1) <= 1) ? table : table.contiguous();
  a.rows = rows.contiguous();
  a.out = empty_gather_output(rows, table.size(1), table.options());
  return a;
}

// Checks grad_e [..., H * d_head] against rows [..., H] and returns d_head.
inline int64_t check_multihead_gather_backward_args(const at::Tensor& grad_e, const at::Tensor& rows, const char* op) {
  check_gather_rows(rows, op);
  TORCH_CHECK(is_gather_dtype(grad_e.scalar_type()), op, ": grad_e must be float32, bfloat16, float16 or float64, got ",
              grad_e.scalar_type());
  TORCH_CHECK(grad_e.device() == rows.device(), op, ": rows must be on grad_e's device ", grad_e.device(), ", got ",
              rows.device());
  const int64_t lead = rows.dim() - 1;
  TORCH_CHECK(grad_e.dim() == rows.dim() && grad_e.sizes().slice(0, lead) == rows.sizes().slice(0, lead), op,
              ": grad_e must be [..., H * d_head] with the leading shape of rows ", rows.sizes().slice(0, lead),
              ", got shape ", grad_e.sizes());
  const int64_t H = rows.size(-1);
  TORCH_CHECK(grad_e.size(-1) % H == 0, op, ": grad_e's last dimension must be H * d_head with H = ", H,
              " (rows.size(-1)), got ", grad_e.size(-1));
  return grad_e.size(-1) / H;
}

// "[i, j, k]": the multi-index of flat element `flat` of a contiguous tensor of shape `sizes`,
// for error messages that point at the offending lookup.
inline std::string format_index(int64_t flat, at::IntArrayRef sizes) {
  std::vector<int64_t> idx(sizes.size());
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    idx[d] = sizes[d] > 0 ? flat % sizes[d] : 0;
    flat = sizes[d] > 0 ? flat / sizes[d] : 0;
  }
  std::ostringstream s;
  s << at::IntArrayRef(idx);
  return s.str();
}

// The CPU gathers validate rows while they copy, in parallel: each thread reports its first bad
// lookup, and the smallest one wins, so the error names the same lookup whatever the schedule.
struct BadLookup {
  std::atomic<int64_t> first{std::numeric_limits<int64_t>::max()};
  void report(int64_t n) {
    int64_t cur = first.load();
    while (n < cur && !first.compare_exchange_weak(cur, n)) {
    }
  }
  int64_t get() const {
    const int64_t b = first.load();
    return b == std::numeric_limits<int64_t>::max() ? -1 : b;
  }
};

// "<op>: rows must lie in [0, num_rows) (table.size(0)), got <value> at rows[i, j]" for lookup
// `bad` of the contiguous int32/int64 rows.
[[noreturn]] inline void throw_row_out_of_range(const char* op, const at::Tensor& rows, int64_t bad, int64_t num_rows) {
  const int64_t value =
      rows.scalar_type() == at::kLong ? rows.const_data_ptr<int64_t>()[bad] : rows.const_data_ptr<int32_t>()[bad];
  TORCH_CHECK(false, op, ": rows must lie in [0, ", num_rows, ") (table.size(0)), got ", value, " at rows",
              format_index(bad, rows.sizes()));
}

}  // namespace engram
