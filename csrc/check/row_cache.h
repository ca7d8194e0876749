// Argument checks of the row cache of host- and file-placed tables (docs/SPEC.md section 3),
// shared by the adapters: shapes, dtypes, devices, never tensor values.
#pragma once

#include <ATen/ATen.h>

#include <string_view>

namespace engram {

enum class CachePolicy { kLru, kLfu };

inline CachePolicy parse_cache_policy(std::string_view policy) {
  if (policy == "lru") return CachePolicy::kLru;
  if (policy == "lfu") return CachePolicy::kLfu;
  TORCH_CHECK(false, "row_cache_fetch: policy must be 'lru' or 'lfu', got '", std::string(policy), "'");
}

// rows [..., H] int64/int32; slot_of_row [R] int32 (slot + 1, 0 = not cached); slot_row [S] int64
// (-1 = free); slot_meta [S, 2] int64 (stamp of last use, uses); store [R, record_bytes] uint8 with
// contiguous records; cache fields [S, ...] contiguous, each a slice of a record at its offset;
// stats [4] int64.
inline void check_row_cache_args(const at::Tensor& rows, const at::Tensor& slot_of_row, const at::Tensor& slot_row,
                                 const at::Tensor& slot_meta, const at::Tensor& store, at::TensorList cache,
                                 at::IntArrayRef field_offsets, const at::Tensor& stats) {
  constexpr const char* op = "row_cache_fetch";
  TORCH_CHECK(rows.scalar_type() == at::kLong || rows.scalar_type() == at::kInt, op,
              ": rows must be int64 or int32, got ", rows.scalar_type());
  TORCH_CHECK(store.dim() == 2 && store.scalar_type() == at::kByte && store.stride(1) == 1, op,
              ": store must be uint8 [num_rows, record_bytes] with contiguous records, got ", store.scalar_type(), " ",
              store.sizes(), " strides ", store.strides());
  const int64_t R = store.size(0);
  TORCH_CHECK(slot_of_row.dim() == 1 && slot_of_row.size(0) == R && slot_of_row.scalar_type() == at::kInt &&
                  slot_of_row.is_contiguous(),
              op, ": slot_of_row must be contiguous int32 [num_rows=", R, "], got ", slot_of_row.scalar_type(), " ",
              slot_of_row.sizes());
  TORCH_CHECK(slot_row.dim() == 1 && slot_row.scalar_type() == at::kLong && slot_row.is_contiguous(), op,
              ": slot_row must be contiguous int64 [num_slots], got ", slot_row.scalar_type(), " ", slot_row.sizes());
  const int64_t S = slot_row.size(0);
  TORCH_CHECK(S >= 1, op, ": the cache needs at least one slot");
  TORCH_CHECK(
      slot_meta.sizes() == at::IntArrayRef({S, 2}) && slot_meta.scalar_type() == at::kLong && slot_meta.is_contiguous(),
      op, ": slot_meta must be contiguous int64 [num_slots=", S, ", 2], got ", slot_meta.scalar_type(), " ",
      slot_meta.sizes());
  TORCH_CHECK(stats.numel() == 4 && stats.scalar_type() == at::kLong && stats.is_contiguous(), op,
              ": stats must be contiguous int64 [4], got ", stats.scalar_type(), " ", stats.sizes());
  TORCH_CHECK(cache.size() == field_offsets.size() && !cache.empty(), op,
              ": one record offset per cache field is needed, got ", cache.size(), " fields and ", field_offsets.size(),
              " offsets");
  for (size_t i = 0; i < cache.size(); ++i) {
    const at::Tensor& f = cache[i];
    TORCH_CHECK(f.dim() >= 1 && f.size(0) == S && f.is_contiguous(), op, ": cache field ", i,
                " must be contiguous [num_slots=", S, ", ...], got ", f.sizes());
    const int64_t bytes = f.numel() / S * static_cast<int64_t>(f.element_size());
    TORCH_CHECK(field_offsets[i] >= 0 && field_offsets[i] + bytes <= store.size(1), op, ": cache field ", i, " (",
                bytes, " bytes per row at record offset ", field_offsets[i], ") does not fit a record of ",
                store.size(1), " bytes");
  }
  // The cache and its bookkeeping live on one device; the records in host memory (pinned, so a
  // CUDA cache reads and writes them directly over the bus).
  const auto dev = slot_row.device();
  for (const at::Tensor* t : {&rows, &slot_of_row, &slot_meta, &stats}) {
    TORCH_CHECK(t->device() == dev, op, ": rows, slot_of_row, slot_meta and stats must be on the cache's device ", dev,
                ", got ", t->device());
  }
  for (const at::Tensor& f : cache) {
    TORCH_CHECK(f.device() == dev, op, ": every cache field must be on the cache's device ", dev, ", got ", f.device());
  }
  TORCH_CHECK(store.device().is_cpu(), op, ": store must be in host memory, got ", store.device());
  TORCH_CHECK(dev.is_cpu() || store.is_pinned(), op, ": a ", dev, " cache needs its store in pinned host memory");
}

}  // namespace engram
