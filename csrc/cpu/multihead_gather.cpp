// CPU kernel of multihead_gather: one memcpy of d_head contiguous values per lookup, parallel over
// lookups. (Software prefetch of rows ahead measured no gain over the hardware's on a 10M-row
// table, so there is none.)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "check/multihead_gather.h"
#include "engram/multihead_gather.h"

namespace engram {
namespace {

// Smallest flat lookup index whose row is out of range, or -1. The smallest (not the first
// found by some thread) so the error message does not depend on scheduling.
template <typename index_t>
int64_t gather_rows(const char* table, int64_t row_stride_bytes, int64_t num_rows, const index_t* rows,
                    int64_t num_lookups, int64_t row_bytes, char* out) {
  BadLookup bad;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, num_lookups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t r = static_cast<int64_t>(rows[n]);
      if (!row_in_range(r, num_rows)) {
        bad.report(n);
        return;  // later lookups of this chunk cannot have a smaller index
      }
      std::memcpy(out + n * row_bytes, table + r * row_stride_bytes, row_bytes);
    }
  });
  return bad.get();
}

at::Tensor multihead_gather_cpu(const at::Tensor& table, const at::Tensor& rows, bool sparse_grad) {
  const GatherArgs a = prepare_multihead_gather(table, rows);
  const at::Tensor& tab = a.table;
  const at::Tensor& rows_c = a.rows;
  const at::Tensor& e = a.out;
  const int64_t num_rows = tab.size(0), d_head = tab.size(1);
  const int64_t num_lookups = rows_c.numel();
  if (num_lookups == 0) return e;

  const int64_t elem = tab.element_size();
  const int64_t row_bytes = d_head * elem;
  const int64_t row_stride_bytes = tab.stride(0) * elem;  // 0 for an expanded table: every row aliases row 0
  const char* table_ptr = static_cast<const char*>(tab.const_data_ptr());
  char* out_ptr = static_cast<char*>(e.mutable_data_ptr());
  int64_t bad = -1;
  AT_DISPATCH_INDEX_TYPES(rows_c.scalar_type(), "multihead_gather_cpu", [&] {
    bad = gather_rows<index_t>(table_ptr, row_stride_bytes, num_rows, rows_c.const_data_ptr<index_t>(), num_lookups,
                               row_bytes, out_ptr);
  });
  if (bad >= 0) throw_row_out_of_range("multihead_gather", rows_c, bad, num_rows);
  return e;
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CPU, m) { m.impl("multihead_gather", &multihead_gather_cpu); }

}  // namespace engram
