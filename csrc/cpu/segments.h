// Lookups grouped by table row, the front half of every CPU table backward (dense and sparse
// gradients, fused optimizer updates): lookups are sorted by (row, position) with a parallel LSD
// radix sort on 64-bit keys (engram/multihead_gather.h), giving the touched rows and their
// segments; then each touched row's gradient is summed in position order. No atomics and no
// order-dependent sums: results are bitwise reproducible for any thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "check/multihead_gather.h"
#include "engram/multihead_gather.h"
#include "rows.h"

namespace engram::cpu {

// Fixed split of [0, n) into `count` pieces. Work is cut by this split rather than by
// at::parallel_for's own, so the radix sort's per-chunk histograms line up between its passes.
struct Chunks {
  int64_t n, count;
  int64_t begin(int64_t c) const { return n * c / count; }
  int64_t end(int64_t c) const { return n * (c + 1) / count; }
};

inline Chunks make_chunks(int64_t n, int64_t min_chunk) {
  const int64_t by_size = std::max<int64_t>(1, n / min_chunk);
  return {n, std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), by_size))};
}

template <typename F>
void for_each_chunk(const Chunks& ch, const F& f) {
  at::parallel_for(0, ch.count, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) f(c, ch.begin(c), ch.end(c));
  });
}

constexpr int64_t kMinChunk = int64_t{1} << 14;
constexpr int64_t kMinSumChunk = int64_t{1} << 10;
// Segments ahead of the sink whose targets are prefetched.
constexpr int64_t kSinkPrefetch = 8;
// Below this many lookups a comparison sort of the (unique) keys beats radix passes.
constexpr int64_t kRadixMinLookups = int64_t{1} << 12;
constexpr int kMaxDigitBits = 11;

// Sort keys by bits [lo_bit, hi_bit) with stable LSD radix passes. The keys start in position
// order, so stability keeps position order inside a row. Returns the buffer holding the result.
inline uint64_t* radix_sort(uint64_t* keys, uint64_t* tmp, int64_t n, int lo_bit, int hi_bit) {
  const int total_bits = hi_bit - lo_bit;
  if (total_bits <= 0) return keys;
  const int passes = (total_bits + kMaxDigitBits - 1) / kMaxDigitBits;
  const int width = (total_bits + passes - 1) / passes;
  const int64_t buckets = int64_t{1} << width;
  const Chunks ch = make_chunks(n, kMinChunk);
  std::vector<int64_t> hist(ch.count * buckets);
  uint64_t* src = keys;
  uint64_t* dst = tmp;
  for (int shift = lo_bit; shift < hi_bit; shift += width) {
    const uint64_t mask = static_cast<uint64_t>(buckets - 1);
    std::fill(hist.begin(), hist.end(), 0);
    for_each_chunk(ch, [&](int64_t c, int64_t b, int64_t e) {
      int64_t* h = hist.data() + c * buckets;
      for (int64_t i = b; i < e; ++i) ++h[(src[i] >> shift) & mask];
    });
    // Exclusive offsets, digit-major then chunk-minor: chunk c writes digit d after every
    // smaller digit and after chunks < c with digit d, which is what makes the pass stable.
    int64_t running = 0;
    bool one_digit = false;
    for (int64_t d = 0; d < buckets; ++d) {
      int64_t digit_total = 0;
      for (int64_t c = 0; c < ch.count; ++c) {
        const int64_t cnt = hist[c * buckets + d];
        hist[c * buckets + d] = running;
        running += cnt;
        digit_total += cnt;
      }
      one_digit |= digit_total == n;
    }
    if (one_digit) continue;  // every key has this digit: the pass would not move anything
    for_each_chunk(ch, [&](int64_t c, int64_t b, int64_t e) {
      int64_t* off = hist.data() + c * buckets;
      for (int64_t i = b; i < e; ++i) {
        const uint64_t k = src[i];
        dst[off[(k >> shift) & mask]++] = k;
      }
    });
    std::swap(src, dst);
  }
  return src;
}

// Lookups grouped by table row: the shared front half of both backward ops.
struct RowSegments {
  uint64_t* buffer = nullptr;      // 2 * num_lookups keys (the keys and the sort's), this thread's scratch
  const uint64_t* keys = nullptr;  // num_lookups sorted keys (row << pos_bits | position)
  int pos_bits = 0;
  at::Tensor unique_rows;      // [U] int64, ascending
  std::vector<int64_t> start;  // [U + 1]: keys[start[u]:start[u+1]] are row unique_rows[u]
};

// Builds the keys of rows [...] (contiguous), checking 0 <= row < num_rows (num_rows < 0: no
// upper bound but the key's). `op` names the caller in errors.
template <typename index_t>
RowSegments row_segments(const at::Tensor& rows, int64_t num_rows, const char* op) {
  const int64_t n = rows.numel();
  RowSegments seg;
  seg.pos_bits = segment_pos_bits(n);
  const uint64_t key_limit = segment_row_limit(seg.pos_bits);
  const uint64_t limit = num_rows >= 0 ? std::min<uint64_t>(key_limit, static_cast<uint64_t>(num_rows)) : key_limit;
  seg.buffer = scratch<uint64_t, 0>(std::max<int64_t>(2 * n, 1));
  uint64_t* keys = seg.buffer;
  const index_t* r = rows.const_data_ptr<index_t>();

  const Chunks ch = make_chunks(n, kMinChunk);
  std::vector<uint64_t> chunk_max(ch.count, 0);
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
  for_each_chunk(ch, [&](int64_t c, int64_t b, int64_t e) {
    uint64_t mx = 0;
    for (int64_t i = b; i < e; ++i) {
      const uint64_t row = static_cast<uint64_t>(static_cast<int64_t>(r[i]));  // negative -> huge
      if (row >= limit) {
        int64_t cur = bad.load();
        while (i < cur && !bad.compare_exchange_weak(cur, i)) {
        }
        return;
      }
      mx = std::max(mx, row);
      keys[i] = segment_key(static_cast<int64_t>(row), i, seg.pos_bits);
    }
    chunk_max[c] = mx;
  });
  if (const int64_t b = bad.load(); b != std::numeric_limits<int64_t>::max()) {
    const int64_t value = static_cast<int64_t>(r[b]);
    const std::string where = format_index(b, rows.sizes());
    TORCH_CHECK(num_rows < 0 || (value >= 0 && value < num_rows), op, ": rows must lie in [0, ", num_rows,
                ") (num_rows), got ", value, " at rows", where);
    TORCH_CHECK(value >= 0, op, ": rows must be non-negative, got ", value, " at rows", where);
    TORCH_CHECK(false, op, ": rows", where, " = ", value, " is too large to sort together with ", n,
                " lookups (needs row < 2^", 64 - seg.pos_bits, ")");
  }

  const uint64_t max_row = n > 0 ? *std::max_element(chunk_max.begin(), chunk_max.end()) : 0;
  const int hi_bit = seg.pos_bits + bit_width(max_row);
  if (n < kRadixMinLookups) {
    std::sort(keys, keys + n);  // keys are unique, so this equals the stable radix result
    seg.keys = keys;
  } else {
    seg.keys = radix_sort(keys, keys + n, n, seg.pos_bits, hi_bit);
  }

  // Segment starts: count row changes per chunk, then write them at prefix-summed offsets.
  const uint64_t* k = seg.keys;
  const int pb = seg.pos_bits;
  auto is_start = [&](int64_t i) { return i == 0 || (k[i] >> pb) != (k[i - 1] >> pb); };
  std::vector<int64_t> counts(ch.count + 1, 0);
  for_each_chunk(ch, [&](int64_t c, int64_t b, int64_t e) {
    int64_t cnt = 0;
    for (int64_t i = b; i < e; ++i) cnt += is_start(i);
    counts[c + 1] = cnt;
  });
  for (int64_t c = 0; c < ch.count; ++c) counts[c + 1] += counts[c];
  const int64_t U = counts[ch.count];
  seg.unique_rows = at::empty({U}, rows.options().dtype(at::kLong));
  seg.start.resize(U + 1);
  seg.start[U] = n;
  int64_t* ur = seg.unique_rows.mutable_data_ptr<int64_t>();
  for_each_chunk(ch, [&](int64_t c, int64_t b, int64_t e) {
    int64_t u = counts[c];
    for (int64_t i = b; i < e; ++i) {
      if (is_start(i)) {
        ur[u] = segment_key_row(k[i], pb);
        seg.start[u++] = i;
      }
    }
  });
  return seg;
}

inline RowSegments segments_of(const at::Tensor& rows_c, int64_t num_rows, const char* op) {
  return AT_DISPATCH_INDEX_TYPES(rows_c.scalar_type(), "multihead_gather_segments",
                                 [&] { return row_segments<index_t>(rows_c, num_rows, op); });
}

// Sums each touched row's gradient in position order (acc_t: float, double for float64) and
// hands the sums to sink(u, acc_row) for u = 0..U-1 (each u exactly once, from one thread; rows
// are unique, so sinks of different u may write their rows concurrently).
//
// Reading each segment's rows one after the other would read grad_e in random order, which is
// latency bound (2.8 GB/s here). Instead each thread owns a range of segments, balanced by
// lookup count, and walks grad_e in position order, adding only the lookups it owns into a
// buffer of its segments: reads are sequential, the per-row order is still position order, and
// the result is the same bit for bit whatever the thread count.
template <typename scalar_t, typename acc_t, typename rank_t, typename Sink, typename Prefetch>
void sum_segments_ranked(const RowSegments& seg, const scalar_t* grad, int64_t d_head, const Sink& sink,
                         const Prefetch& prefetch) {
  const int64_t U = static_cast<int64_t>(seg.start.size()) - 1;
  if (U == 0 || d_head == 0) return;
  const int64_t n = seg.start[U];
  const uint64_t* keys = seg.keys;
  const int pb = seg.pos_bits;
  // rank[p]: the segment of the lookup at position p.
  rank_t* rank = scratch<rank_t, 0>(n);
  at::parallel_for(0, U, 1024, [&](int64_t ub, int64_t ue) {
    for (int64_t u = ub; u < ue; ++u) {
      for (int64_t i = seg.start[u]; i < seg.start[u + 1]; ++i) {
        rank[segment_key_pos(keys[i], pb)] = static_cast<rank_t>(u);
      }
    }
  });
  // Every chunk reads all n ranks, a few bytes each, so chunks can be far smaller than the sort's:
  // a step's 16k lookups still split over the threads (the sinks' row updates are the heavy part).
  for_each_chunk(make_chunks(n, kMinSumChunk), [&](int64_t c, int64_t b, int64_t e) {
    // Segments starting in sorted lookups [b, e) belong to this chunk.
    const int64_t lo = std::lower_bound(seg.start.begin(), seg.start.end(), b) - seg.start.begin();
    const int64_t hi = std::lower_bound(seg.start.begin(), seg.start.end(), e) - seg.start.begin();
    if (lo >= hi) return;
    acc_t* acc = scratch<acc_t, 1>((hi - lo) * d_head);
    std::vector<uint8_t> seen(hi - lo, 0);
    for (int64_t p = 0; p < n; ++p) {
      const int64_t u = static_cast<int64_t>(rank[p]);
      if (u < lo || u >= hi) continue;
      acc_t* a = acc + (u - lo) * d_head;
      const scalar_t* g = grad + p * d_head;
      if (seen[u - lo]) {
        for (int64_t j = 0; j < d_head; ++j) a[j] += static_cast<acc_t>(g[j]);
      } else {
        seen[u - lo] = 1;
        for (int64_t j = 0; j < d_head; ++j) a[j] = static_cast<acc_t>(g[j]);
      }
    }
    for (int64_t u = lo; u < hi; ++u) {
      // The sink's targets (table rows far apart in a large table) are known ahead: ask for them
      // early, so several DRAM round trips overlap instead of one per row.
      if (u + kSinkPrefetch < hi) prefetch(u + kSinkPrefetch);
      sink(u, static_cast<const acc_t*>(acc + (u - lo) * d_head));
    }
  });
}

// prefetch(u): called a few segments before sink(u), to start loading what sink(u) will touch.
template <typename scalar_t, typename acc_t, typename Sink, typename Prefetch>
void sum_segments(const RowSegments& seg, const scalar_t* grad, int64_t d_head, const Sink& sink,
                  const Prefetch& prefetch) {
  if (seg.start.size() - 1 <= static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
    sum_segments_ranked<scalar_t, acc_t, int32_t>(seg, grad, d_head, sink, prefetch);
  } else {
    sum_segments_ranked<scalar_t, acc_t, int64_t>(seg, grad, d_head, sink, prefetch);
  }
}

template <typename scalar_t, typename acc_t, typename Sink>
void sum_segments(const RowSegments& seg, const scalar_t* grad, int64_t d_head, const Sink& sink) {
  sum_segments<scalar_t, acc_t>(seg, grad, d_head, sink, [](int64_t) {});
}

}  // namespace engram::cpu
