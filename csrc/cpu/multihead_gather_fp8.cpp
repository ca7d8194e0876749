// CPU kernel of multihead_gather_fp8: each looked-up row is decoded from E4M3 bytes and scaled by
// its blocks' E8M0 factors with branch-free bit arithmetic (engram/fp8.h) that the compiler
// vectorises (a 256-entry decode table measured 10x slower: its loads do not vectorise), parallel
// over lookups.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "check/multihead_gather_fp8.h"
#include "engram/fp8.h"
#include "engram/multihead_gather.h"
#include "rows.h"

namespace engram {
namespace {

// One row: d_head values, kFp8Block per scale, as float or bfloat16 bits. Branch-free, and
// compiled per instruction set, so the inner loop vectorises (AVX-512 packs the bfloat16 halves
// natively; baseline x86-64 measured 2x slower).
template <typename out_bits_t>
inline void decode_row_impl(const uint8_t* src, const uint8_t* scale, int64_t blocks, out_bits_t* dst) {
  for (int64_t j = 0; j < blocks; ++j) {
    const float f = e8m0_to_float(scale[j]);
    const uint8_t* in = src + j * kFp8Block;
    out_bits_t* out = dst + j * kFp8Block;
    for (int64_t i = 0; i < kFp8Block; ++i) {
      const uint32_t bits = e4m3_scaled_bits(in[i], f);
      if constexpr (sizeof(out_bits_t) == 4) {
        out[i] = bits;
      } else {
        out[i] = bfloat16_bits_rne(bits);
      }
    }
  }
}

ENGRAM_CPU_CLONES void decode_row(const uint8_t* src, const uint8_t* scale, int64_t blocks, uint32_t* dst) {
  decode_row_impl(src, scale, blocks, dst);
}

ENGRAM_CPU_CLONES void decode_row(const uint8_t* src, const uint8_t* scale, int64_t blocks, uint16_t* dst) {
  decode_row_impl(src, scale, blocks, dst);
}

constexpr int64_t kAhead = 8;  // lookups prefetched ahead

template <typename out_bits_t, typename index_t>
int64_t gather_fp8_rows(const uint8_t* table, const uint8_t* scale, int64_t num_rows, int64_t d_head,
                        const index_t* rows, int64_t num_lookups, out_bits_t* out) {
  const int64_t blocks = d_head / kFp8Block;
  BadLookup bad;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(d_head, 1));
  at::parallel_for(0, num_lookups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t r = static_cast<int64_t>(rows[n]);
      if (!row_in_range(r, num_rows)) {
        bad.report(n);
        return;  // later lookups of this chunk cannot have a smaller index
      }
      // The decode keeps the core busy, so the next rows' cache misses would not overlap it the
      // way a plain copy's do: they are requested ahead.
      if (n + kAhead < end) {
        const int64_t ahead = static_cast<int64_t>(rows[n + kAhead]);
        if (row_in_range(ahead, num_rows)) {
          for (int64_t c = 0; c < d_head; c += 64) __builtin_prefetch(table + ahead * d_head + c);
          __builtin_prefetch(scale + ahead * blocks);
        }
      }
      decode_row(table + r * d_head, scale + r * blocks, blocks, out + n * d_head);
    }
  });
  return bad.get();
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
    void* out = a.out.mutable_data_ptr();
    bad = out_dtype == at::kFloat ? gather_fp8_rows(t, s, num_rows, d_head, r, n, static_cast<uint32_t*>(out))
                                  : gather_fp8_rows(t, s, num_rows, d_head, r, n, static_cast<uint16_t*>(out));
  });
  if (bad >= 0) throw_row_out_of_range("multihead_gather_fp8", a.rows, bad, num_rows);
  return a.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CPU, m) { m.impl("multihead_gather_fp8", &multihead_gather_fp8_cpu); }

}  // namespace engram
