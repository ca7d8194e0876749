// CPU kernel of row_cache_fetch: the per-step work of the row cache of a host- or file-placed
// table (docs/SPEC.md section 3). A table's rows live in `store` (host memory or a memory-mapped
// file), one record per row holding the weight and its optimizer state side by side; the step
// computes on `cache`, a fixed number of slots on the fast tier. For the rows of one step this op
//   1. finds the unique rows of the lookup and which of them are cached (a hit touches the slot),
//   2. picks as many victims as there are misses among the slots not pinned (a slot is pinned
//      while a step that uses it may still read or update it: its last stamp >= keep_from),
//      LRU (oldest stamp, then fewest uses) or LFU (fewest uses, then oldest stamp), ties by slot,
//   3. writes each victim's fields back to its row's record, then reads each missing row's record
//      into its slot, and
//   4. returns the slot of every lookup.
// The cache is the source of truth for the rows it holds, so a row is read from the store only
// when it is not cached, and it was written back when it was evicted: never a stale value.
// Metadata work is serial (it is O(lookups) plus O(slots) when there are misses); the record
// copies, which carry the bytes, run in parallel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "check/row_cache.h"
#include "engram/row_cache.h"

namespace engram {
namespace {

struct Field {
  char* cache;     // slot 0 of this field
  int64_t bytes;   // per slot
  int64_t offset;  // within a record
};

// First-fetch initialisation of never-written records: the weight field (cache[0], `dtype`)
// init_std * N(0, 1), every other field zero, then the flag byte set.
struct LazyInit {
  int64_t flag_offset;  // < 0: records are always valid
  double std;
  uint64_t seed;
  at::ScalarType dtype;
  int64_t cols;  // weight elements per row
};

// A never-written row straight into its slot: the record stays untouched (a sparse file keeps no
// block for it) until the row is written back.
void init_slot(int64_t slot, int64_t row, const std::vector<Field>& fields, const LazyInit& init) {
  for (const Field& f : fields) std::memset(f.cache + slot * f.bytes, 0, f.bytes);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, init.dtype, "row_cache_init", [&] {
    auto* w = reinterpret_cast<scalar_t*>(fields[0].cache + slot * fields[0].bytes);
    for (int64_t j = 0; j < init.cols; j += 2) {
      float a, b;
      initial_pair(init.seed, row, j, static_cast<float>(init.std), &a, &b);
      w[j] = static_cast<scalar_t>(a);
      if (j + 1 < init.cols) w[j + 1] = static_cast<scalar_t>(b);
    }
  });
}

// The LRU order of the used slots: a circular doubly linked list through links [S + 1, 2]
// (prev, next) with its sentinel at index S, least recently touched first. Fetches come in stamp
// order, so the list is also sorted by stamp, and the pinned slots (the newest stamps) are its
// tail: victims are taken from the head in O(victims).
struct LruList {
  int64_t* links;
  int64_t S;
  int64_t& prev(int64_t s) const { return links[2 * s]; }
  int64_t& next(int64_t s) const { return links[2 * s + 1]; }
  void unlink(int64_t s) const {
    next(prev(s)) = next(s);
    prev(next(s)) = prev(s);
  }
  void push_back(int64_t s) const {
    const int64_t tail = prev(S);
    next(tail) = s;
    prev(s) = tail;
    next(s) = S;
    prev(S) = s;
  }
  int64_t head() const { return next(S); }
};

// Slots fill from 0 upwards and are freed only all together (invalidate), so the free ones are
// a suffix: the first free slot, by binary search.
int64_t first_free_slot(const int64_t* slot_row, int64_t S) {
  int64_t lo = 0, hi = S;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (slot_row[mid] >= 0) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

template <typename index_t>
at::Tensor fetch_impl(const index_t* rows, int64_t n, int32_t* slot_of_row, int64_t* slot_row, int64_t* meta,
                      const LruList& lru, char* store, int64_t record_stride, int64_t R, int64_t S,
                      const std::vector<Field>& fields, int64_t stamp, int64_t keep_from, CachePolicy policy,
                      int64_t* stats, const LazyInit& init, at::TensorOptions options) {
  // 1. Hits touch their slot once per call; misses are collected in order of first appearance.
  std::vector<int64_t> missing;
  int64_t hits = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = rows[i];
    TORCH_CHECK(r >= 0 && r < R, "row_cache_fetch: rows must lie in [0, num_rows=", R, "), got ", r, " at index ", i);
    const int32_t s1 = slot_of_row[r];
    if (s1 > 0) {
      int64_t* m = meta + 2 * (s1 - 1);
      if (m[0] != stamp) {
        m[0] = stamp;
        m[1] += 1;
        ++hits;
        if (policy == CachePolicy::kLru) {
          lru.unlink(s1 - 1);
          lru.push_back(s1 - 1);
        }
      }
    } else if (s1 == 0) {
      slot_of_row[r] = -1;  // seen missing in this call: counted once
      missing.push_back(r);
    }
  }
  const int64_t k = static_cast<int64_t>(missing.size());
  int64_t evictions = 0;
  if (k > 0) {
    // 2. Victims: free slots first, then the best evictable ones: the LRU list's head, or for
    // LFU the fewest uses (then the oldest stamp, then the slot) over a scan of the used slots.
    std::vector<int64_t> victims;
    victims.reserve(k);
    const int64_t used = first_free_slot(slot_row, S);
    for (int64_t s = used; s < S && static_cast<int64_t>(victims.size()) < k; ++s) victims.push_back(s);
    const int64_t need = k - static_cast<int64_t>(victims.size());
    int64_t evictable = 0;
    if (need > 0 && policy == CachePolicy::kLru) {
      for (int64_t s = lru.head(); s != S && evictable < need && meta[2 * s] < keep_from; s = lru.next(s)) {
        victims.push_back(s);
        ++evictable;
      }
    } else if (need > 0) {
      std::vector<int64_t> candidates;
      for (int64_t s = 0; s < used; ++s) {
        if (meta[2 * s] < keep_from) candidates.push_back(s);
      }
      auto key_less = [&](int64_t a, int64_t b) {  // the CUDA kernel's order (engram/row_cache.h)
        const uint64_t ka = eviction_key(slot_row[a], meta[2 * a], meta[2 * a + 1], keep_from, true);
        const uint64_t kb = eviction_key(slot_row[b], meta[2 * b], meta[2 * b + 1], keep_from, true);
        return ka != kb ? ka < kb : a < b;
      };
      evictable = static_cast<int64_t>(candidates.size());
      if (evictable > need) {
        std::nth_element(candidates.begin(), candidates.begin() + need, candidates.end(), key_less);
        candidates.resize(need);
      }
      std::sort(candidates.begin(), candidates.end(), key_less);
      victims.insert(victims.end(), candidates.begin(), candidates.end());
    }
    if (static_cast<int64_t>(victims.size()) < k) {
      for (int64_t r : missing) slot_of_row[r] = 0;  // leave the cache as it was (touches aside)
      TORCH_CHECK(false, "row_cache_fetch: the cache of ", S, " rows is too small for this step: ", k,
                  " rows are not cached and only ", victims.size(),
                  " slots may be evicted (the others hold rows of steps still in flight); raise cache_rows");
    }
    // 3. Write-back of the victims' rows, then the fill; victims and missing rows are distinct.
    std::vector<int64_t> old_row(k);
    for (int64_t j = 0; j < k; ++j) {
      old_row[j] = slot_row[victims[j]];
      evictions += old_row[j] >= 0;
    }
    at::parallel_for(0, k, 64, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const int64_t s = victims[j];
        if (old_row[j] >= 0) {
          char* rec = store + old_row[j] * record_stride;
          for (const Field& f : fields) std::memcpy(rec + f.offset, f.cache + s * f.bytes, f.bytes);
          if (init.flag_offset >= 0) rec[init.flag_offset] = 1;
        }
        const char* rec = store + missing[j] * record_stride;
        if (init.flag_offset >= 0 && rec[init.flag_offset] == 0) {
          init_slot(s, missing[j], fields, init);
        } else {
          for (const Field& f : fields) std::memcpy(f.cache + s * f.bytes, rec + f.offset, f.bytes);
        }
      }
    });
    for (int64_t j = 0; j < k; ++j) {
      const int64_t s = victims[j];
      if (old_row[j] >= 0) slot_of_row[old_row[j]] = 0;
      slot_of_row[missing[j]] = static_cast<int32_t>(s + 1);
      slot_row[s] = missing[j];
      meta[2 * s] = stamp;
      meta[2 * s + 1] = 1;
      if (policy == CachePolicy::kLru) {
        if (old_row[j] >= 0) lru.unlink(s);
        lru.push_back(s);
      }
    }
  }
  // 4. The slot of every lookup.
  at::Tensor slots = at::empty({n}, options);
  int64_t* out = slots.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) out[i] = slot_of_row[rows[i]] - 1;
  int64_t record_bytes = 0;
  for (const Field& f : fields) record_bytes += f.bytes;
  stats[0] += hits;
  stats[1] += k;
  stats[2] += evictions;
  stats[3] += (k + evictions) * record_bytes;
  return slots;
}

at::Tensor row_cache_fetch_cpu(const at::Tensor& rows, const at::Tensor& slot_of_row, const at::Tensor& slot_row,
                               const at::Tensor& slot_meta, const at::Tensor& lru_links, const at::Tensor& store,
                               at::TensorList cache, at::IntArrayRef field_offsets, int64_t stamp, int64_t keep_from,
                               c10::string_view policy, const at::Tensor& stats, int64_t flag_offset, double init_std,
                               int64_t init_seed) {
  check_row_cache_args(rows, slot_of_row, slot_row, slot_meta, store, cache, field_offsets, stats);
  TORCH_CHECK(lru_links.sizes() == at::IntArrayRef({slot_row.size(0) + 1, 2}) && lru_links.scalar_type() == at::kLong &&
                  lru_links.is_contiguous(),
              "row_cache_fetch: lru_links must be contiguous int64 [num_slots + 1, 2], got ", lru_links.sizes());
  TORCH_CHECK(flag_offset < store.size(1), "row_cache_fetch: flag_offset (", flag_offset,
              ") must lie inside a record of ", store.size(1), " bytes");
  TORCH_CHECK(std::isfinite(init_std) && init_std >= 0, "row_cache_fetch: init_std must be finite and >= 0, got ",
              init_std);
  TORCH_CHECK(init_seed >= 0, "row_cache_fetch: init_seed must be >= 0, got ", init_seed);
  const LazyInit init{flag_offset, init_std, static_cast<uint64_t>(init_seed), cache[0].scalar_type(),
                      cache[0].numel() / slot_row.size(0)};
  TORCH_CHECK(stamp >= keep_from, "row_cache_fetch: stamp (", stamp, ") must be >= keep_from (", keep_from,
              "): the rows of this call are pinned");
  const CachePolicy pol = parse_cache_policy(std::string_view(policy.data(), policy.size()));
  const int64_t S = slot_row.size(0);
  std::vector<Field> fields;
  for (size_t i = 0; i < cache.size(); ++i) {
    fields.push_back({static_cast<char*>(cache[i].data_ptr()),
                      cache[i].numel() / S * static_cast<int64_t>(cache[i].element_size()), field_offsets[i]});
  }
  const at::Tensor rows_c = rows.contiguous();
  at::Tensor slots;
  AT_DISPATCH_INDEX_TYPES(rows_c.scalar_type(), "row_cache_fetch", [&] {
    slots = fetch_impl<index_t>(rows_c.const_data_ptr<index_t>(), rows_c.numel(), slot_of_row.data_ptr<int32_t>(),
                                slot_row.data_ptr<int64_t>(), slot_meta.data_ptr<int64_t>(),
                                LruList{lru_links.data_ptr<int64_t>(), S}, static_cast<char*>(store.data_ptr()),
                                store.stride(0), store.size(0), S, fields, stamp, keep_from, pol,
                                stats.data_ptr<int64_t>(), init, rows.options().dtype(at::kLong));
  });
  return slots.view(rows.sizes());
}

// Writes every cached row back to its record (a checkpoint, or the end of training); the cache
// keeps its rows.
void row_cache_flush_cpu(const at::Tensor& slot_row, const at::Tensor& store, at::TensorList cache,
                         at::IntArrayRef field_offsets, int64_t flag_offset) {
  TORCH_CHECK(slot_row.device().is_cpu() && store.device().is_cpu(), "row_cache_flush: runs on the CPU for now");
  TORCH_CHECK(slot_row.dim() == 1 && slot_row.scalar_type() == at::kLong && slot_row.is_contiguous(),
              "row_cache_flush: slot_row must be contiguous int64 [num_slots]");
  TORCH_CHECK(store.dim() == 2 && store.scalar_type() == at::kByte && store.stride(1) == 1,
              "row_cache_flush: store must be uint8 [num_rows, record_bytes] with contiguous records");
  TORCH_CHECK(cache.size() == field_offsets.size(), "row_cache_flush: one record offset per cache field is needed");
  TORCH_CHECK(flag_offset < store.size(1), "row_cache_flush: flag_offset must lie inside a record");
  const int64_t S = slot_row.size(0), R = store.size(0);
  const int64_t* held = slot_row.const_data_ptr<int64_t>();
  char* base = static_cast<char*>(store.data_ptr());
  at::parallel_for(0, S, 256, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      if (held[s] < 0) continue;
      TORCH_CHECK(held[s] < R, "row_cache_flush: slot ", s, " holds row ", held[s], " outside the store");
      char* rec = base + held[s] * store.stride(0);
      for (size_t i = 0; i < cache.size(); ++i) {
        const int64_t bytes = cache[i].numel() / S * static_cast<int64_t>(cache[i].element_size());
        std::memcpy(rec + field_offsets[i], static_cast<const char*>(cache[i].const_data_ptr()) + s * bytes, bytes);
      }
      if (flag_offset >= 0) rec[flag_offset] = 1;
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CPU, m) {
  m.impl("_row_cache_fetch", &row_cache_fetch_cpu);
  m.impl("_row_cache_flush", &row_cache_flush_cpu);
}

}  // namespace engram
