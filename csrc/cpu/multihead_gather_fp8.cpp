// CPU kernel of multihead_gather_fp8: each looked-up row is decoded from E4M3 bytes through a
// 256-entry table and scaled by its blocks' E8M0 factors (engram/fp8.h), parallel over lookups.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <limits>

#include "check/multihead_gather_fp8.h"
#include "engram/fp8.h"
#include "engram/multihead_gather.h"

namespace engram {
namespace {

const std::array<float, 256>& e4m3_table() {
  static const std::array<float, 256> lut = [] {
    std::array<float, 256> t{};
    for (int b = 0; b < 256; ++b) t[b] = e4m3_to_float(static_cast<uint8_t>(b));
    return t;
  }();
  return lut;
}

template <typename out_t, typename index_t>
int64_t gather_fp8_rows(const uint8_t* table, const uint8_t* scale, int64_t num_rows, int64_t d_head,
                        const index_t* rows, int64_t num_lookups, out_t* out) {
  const auto& lut = e4m3_table();
  const int64_t blocks = d_head / kFp8Block;
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(d_head, 1));
  at::parallel_for(0, num_lookups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t r = static_cast<int64_t>(rows[n]);
      if (!row_in_range(r, num_rows)) {
        int64_t cur = bad.load();
        while (n < cur && !bad.compare_exchange_weak(cur, n)) {
        }
        return;  // later lookups of this chunk cannot have a smaller index
      }
      const uint8_t* src = table + r * d_head;
      const uint8_t* s = scale + r * blocks;
      out_t* dst = out + n * d_head;
      for (int64_t j = 0; j < blocks; ++j) {
        const float f = e8m0_to_float(s[j]);
        for (int64_t i = j * kFp8Block; i < (j + 1) * kFp8Block; ++i) dst[i] = static_cast<out_t>(lut[src[i]] * f);
      }
    }
  });
  const int64_t b = bad.load();
  return b == std::numeric_limits<int64_t>::max() ? -1 : b;
}

at::Tensor multihead_gather_fp8_cpu(const at::Tensor& table, const at::Tensor& scale, const at::Tensor& rows,
                                    at::ScalarType out_dtype) {
  const GatherFp8Args a = prepare_multihead_gather_fp8(table, scale, rows, out_dtype);
  const int64_t num_rows = a.table.size(0), d_head = a.table.size(1);
  const int64_t n = a.rows.numel();
  if (n == 0 || d_head == 0) return a.out;
  int64_t bad = -1;
  AT_DISPATCH_INDEX_TYPES(a.rows.scalar_type(), "multihead_gather_fp8_cpu", [&] {
    const index_t* r = a.rows.const_data_ptr<index_t>();
    const uint8_t* t = a.table.const_data_ptr<uint8_t>();
    const uint8_t* s = a.scale.const_data_ptr<uint8_t>();
    if (out_dtype == at::kFloat) {
      bad = gather_fp8_rows<float, index_t>(t, s, num_rows, d_head, r, n, a.out.mutable_data_ptr<float>());
    } else {
      bad = gather_fp8_rows<c10::BFloat16, index_t>(t, s, num_rows, d_head, r, n,
                                                    a.out.mutable_data_ptr<c10::BFloat16>());
    }
  });
  if (bad >= 0) {
    const int64_t value = a.rows.scalar_type() == at::kLong ? a.rows.const_data_ptr<int64_t>()[bad]
                                                            : a.rows.const_data_ptr<int32_t>()[bad];
    TORCH_CHECK(false, "multihead_gather_fp8: rows must lie in [0, ", num_rows, ") (table.size(0)), got ", value,
                " at rows", format_index(bad, a.rows.sizes()));
  }
  return a.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CPU, m) { m.impl("multihead_gather_fp8", &multihead_gather_fp8_cpu); }

}  // namespace engram
