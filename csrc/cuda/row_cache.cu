// CUDA kernels of row_cache_fetch and row_cache_flush (docs/SPEC.md section 3): the row cache of
// a host-placed table in device memory, its records in pinned host memory read and written by
// the kernels directly over the bus. The same steps as the CPU kernel, without a host sync:
//   1. every lookup marks its row: a cached row touches its slot once per call (the stamp, set
//      by compare-and-swap), a missing row is claimed once (slot_of_row 0 -> -1) and listed;
//   2. the listed rows are sorted (so the fill is deterministic) and every slot gets its eviction
//      key (engram/row_cache.h: free slots first, pinned slots never), the slots sorted by key;
//   3. one warp per missing row j takes the j-th slot: writes its old row back to the record,
//      reads the new row's record (or initialises a never-written row), updates the maps;
//   4. the slot of every lookup.
// The number of missing rows stays on the device: kernels are launched for the lookup count and
// return early. A cache too small for the rows pinned by steps in flight is a device assert (as
// torch's index kernels treat bad indices): checking on the host would need a sync per step.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cub/device/device_radix_sort.cuh>
#include <limits>
#include <string_view>
#include <vector>

#include "check/row_cache.h"
#include "cuda_utils.cuh"
#include "engram/row_cache.h"

namespace engram {
namespace {

constexpr int kFetchBlock = 256;
constexpr int kMaxFields = 4;

struct CacheFields {
  char* cache[kMaxFields];
  int64_t bytes[kMaxFields];
  int64_t offset[kMaxFields];
  int count;
};

// n bytes from src to dst by the 32 lanes of a warp: 4-byte words when both ends allow it (every
// field of a record is 8-byte aligned; accesses to host memory cross the bus one by one).
__device__ __forceinline__ void warp_copy(char* dst, const char* src, int64_t n, int lane) {
  if (n % 4 == 0 && reinterpret_cast<uintptr_t>(dst) % 4 == 0 && reinterpret_cast<uintptr_t>(src) % 4 == 0) {
    auto* d = reinterpret_cast<uint32_t*>(dst);
    const auto* s = reinterpret_cast<const uint32_t*>(src);
    for (int64_t w = lane; w < n / 4; w += 32) d[w] = s[w];
  } else {
    for (int64_t b = lane; b < n; b += 32) dst[b] = src[b];
  }
}

template <typename index_t>
__global__ void mark_kernel(const index_t* __restrict__ rows, int64_t n, int64_t R, int32_t* slot_of_row,
                            unsigned long long* meta, int64_t stamp, int64_t* missing, int* num_missing,
                            unsigned long long* stats) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const int64_t r = rows[i];
  CUDA_KERNEL_ASSERT_MSG(r >= 0 && r < R, "row_cache_fetch: rows must lie in [0, num_rows)");
  const int32_t s1 = slot_of_row[r];
  if (s1 > 0) {
    unsigned long long* m = meta + 2 * (s1 - 1);
    const unsigned long long old = atomicExch(m, static_cast<unsigned long long>(stamp));
    if (old != static_cast<unsigned long long>(stamp)) {  // the first lookup of this row in this call
      atomicAdd(m + 1, 1ULL);
      atomicAdd(stats + 0, 1ULL);
    }
  } else if (s1 == 0 && atomicCAS(reinterpret_cast<int*>(slot_of_row + r), 0, -1) == 0) {
    missing[atomicAdd(num_missing, 1)] = r;
  }
}

__global__ void eviction_keys_kernel(const int64_t* __restrict__ slot_row, const int64_t* __restrict__ meta, int64_t S,
                                     int64_t keep_from, bool lfu, uint64_t* keys, int64_t* slots) {
  const int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (s >= S) return;
  keys[s] = eviction_key(slot_row[s], meta[2 * s], meta[2 * s + 1], keep_from, lfu);
  slots[s] = s;
}

// One warp per missing row: lanes copy the record's bytes.
template <typename scalar_t>
__global__ void fill_kernel(const int64_t* __restrict__ missing, const int* __restrict__ num_missing,
                            const uint64_t* __restrict__ victim_keys, const int64_t* __restrict__ victims,
                            int32_t* slot_of_row, int64_t* slot_row, int64_t* meta, char* store, int64_t record_stride,
                            CacheFields f, int64_t flag_offset, float init_std, uint64_t init_seed, int64_t cols,
                            int64_t stamp, unsigned long long* stats, int64_t bound) {
  const int64_t j = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (j == 0) {
    CUDA_KERNEL_ASSERT_MSG(*num_missing <= bound, "row_cache_fetch: a step needs more rows than the cache has slots");
  }
  if (j >= bound || j >= *num_missing) return;
  CUDA_KERNEL_ASSERT_MSG(victim_keys[j] != kPinnedKey,
                         "row_cache_fetch: the cache is too small for the rows pinned by steps in flight");
  const int64_t s = victims[j];
  const int64_t old = slot_row[s];
  const int64_t r = missing[j];
  int64_t record_bytes = 0;
  for (int k = 0; k < f.count; ++k) record_bytes += f.bytes[k];
  if (old >= 0) {
    char* rec = store + old * record_stride;
    for (int k = 0; k < f.count; ++k) warp_copy(rec + f.offset[k], f.cache[k] + s * f.bytes[k], f.bytes[k], lane);
    if (flag_offset >= 0 && lane == 0) rec[flag_offset] = 1;
  }
  __syncwarp();  // the write-back read the slot with another lane mapping than the fill writes it
  const char* rec = store + r * record_stride;
  if (flag_offset >= 0 && rec[flag_offset] == 0) {
    for (int k = 0; k < f.count; ++k) {
      for (int64_t b = lane; b < f.bytes[k]; b += 32) f.cache[k][s * f.bytes[k] + b] = 0;
    }
    __syncwarp();
    auto* w = reinterpret_cast<scalar_t*>(f.cache[0] + s * f.bytes[0]);
    for (int64_t c = 2 * lane; c < cols; c += 64) {
      float a, b;
      initial_pair(init_seed, r, c, init_std, &a, &b);
      w[c] = static_cast<scalar_t>(a);
      if (c + 1 < cols) w[c + 1] = static_cast<scalar_t>(b);
    }
  } else {
    for (int k = 0; k < f.count; ++k) warp_copy(f.cache[k] + s * f.bytes[k], rec + f.offset[k], f.bytes[k], lane);
  }
  if (lane == 0) {
    if (old >= 0) slot_of_row[old] = 0;
    slot_of_row[r] = static_cast<int32_t>(s + 1);
    slot_row[s] = r;
    meta[2 * s] = stamp;
    meta[2 * s + 1] = 1;
    atomicAdd(stats + 1, 1ULL);
    atomicAdd(stats + 2, old >= 0 ? 1ULL : 0ULL);
    atomicAdd(stats + 3, static_cast<unsigned long long>((old >= 0 ? 2 : 1) * record_bytes));
  }
}

template <typename index_t>
__global__ void slots_kernel(const index_t* __restrict__ rows, int64_t n, const int32_t* __restrict__ slot_of_row,
                             int64_t* out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) out[i] = static_cast<int64_t>(slot_of_row[rows[i]]) - 1;
}

CacheFields cache_fields(at::TensorList cache, at::IntArrayRef field_offsets, int64_t S) {
  TORCH_CHECK(cache.size() <= kMaxFields, "row_cache_fetch: at most ", kMaxFields, " cache fields, got ", cache.size());
  CacheFields f{};
  f.count = static_cast<int>(cache.size());
  for (size_t i = 0; i < cache.size(); ++i) {
    f.cache[i] = static_cast<char*>(cache[i].data_ptr());
    f.bytes[i] = cache[i].numel() / S * static_cast<int64_t>(cache[i].element_size());
    f.offset[i] = field_offsets[i];
  }
  return f;
}

// The device address of a pinned host tensor (the same pointer under unified addressing).
char* device_view(const at::Tensor& store) {
  char* base = static_cast<char*>(store.storage().mutable_data());
  void* dev = nullptr;
  C10_CUDA_CHECK(cudaHostGetDevicePointer(&dev, base, 0));
  return static_cast<char*>(dev) + (static_cast<char*>(store.data_ptr()) - base);
}

at::Tensor row_cache_fetch_cuda(const at::Tensor& rows, const at::Tensor& slot_of_row, const at::Tensor& slot_row,
                                const at::Tensor& slot_meta, const at::Tensor& lru_links, const at::Tensor& store,
                                at::TensorList cache, at::IntArrayRef field_offsets, int64_t stamp, int64_t keep_from,
                                c10::string_view policy, const at::Tensor& stats, int64_t flag_offset, double init_std,
                                int64_t init_seed) {
  check_row_cache_args(rows, slot_of_row, slot_row, slot_meta, store, cache, field_offsets, stats);
  (void)lru_links;  // the CUDA kernel orders victims by their keys (a sort of the slots per call)
  TORCH_CHECK(stamp >= keep_from, "row_cache_fetch: stamp must be >= keep_from");
  TORCH_CHECK(flag_offset < store.size(1), "row_cache_fetch: flag_offset must lie inside a record");
  TORCH_CHECK(init_seed >= 0 && std::isfinite(init_std) && init_std >= 0,
              "row_cache_fetch: init_seed must be >= 0 and init_std finite and >= 0");
  TORCH_CHECK(at::isFloatingType(cache[0].scalar_type()), "row_cache_fetch: the first cache field must be the weight");
  const bool lfu = parse_cache_policy(std::string_view(policy.data(), policy.size())) == CachePolicy::kLfu;
  const c10::cuda::CUDAGuard guard(slot_row.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = rows.numel(), S = slot_row.size(0), R = store.size(0);
  const at::Tensor rows_c = rows.contiguous();
  at::Tensor out = at::empty(rows.sizes(), rows.options().dtype(at::kLong));
  if (n == 0) return out;
  const auto opts = slot_row.options();
  // Unused entries of `missing` sort last.
  at::Tensor missing = at::full({n}, std::numeric_limits<int64_t>::max(), opts);
  at::Tensor missing_sorted = at::empty({n}, opts);
  at::Tensor num_missing = at::zeros({1}, opts.dtype(at::kInt));
  auto* stats_p = reinterpret_cast<unsigned long long*>(stats.data_ptr<int64_t>());
  // Everything that can fail on the host, before the first kernel changes the bookkeeping.
  const CacheFields f = cache_fields(cache, field_offsets, S);
  char* store_dev = device_view(store);
  const unsigned lookup_blocks = static_cast<unsigned>((n + kFetchBlock - 1) / kFetchBlock);
  AT_DISPATCH_INDEX_TYPES(rows_c.scalar_type(), "row_cache_fetch_cuda", [&] {
    mark_kernel<index_t><<<lookup_blocks, kFetchBlock, 0, stream>>>(
        rows_c.data_ptr<index_t>(), n, R, slot_of_row.data_ptr<int32_t>(),
        reinterpret_cast<unsigned long long*>(slot_meta.data_ptr<int64_t>()), stamp, missing.data_ptr<int64_t>(),
        num_missing.data_ptr<int>(), stats_p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  size_t bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortKeys(nullptr, bytes, missing.data_ptr<int64_t>(),
                                                missing_sorted.data_ptr<int64_t>(), static_cast<int>(n), 0, 64,
                                                stream));
  at::Tensor temp = at::empty({static_cast<int64_t>(bytes)}, opts.dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortKeys(temp.data_ptr(), bytes, missing.data_ptr<int64_t>(),
                                                missing_sorted.data_ptr<int64_t>(), static_cast<int>(n), 0, 64,
                                                stream));
  // Eviction order of every slot; the first num_missing slots of the order are the victims.
  at::Tensor keys = at::empty({S}, opts);
  at::Tensor keys_sorted = at::empty({S}, opts);
  at::Tensor order = at::empty({S}, opts);
  at::Tensor order_sorted = at::empty({S}, opts);
  const unsigned slot_blocks = static_cast<unsigned>((S + kFetchBlock - 1) / kFetchBlock);
  eviction_keys_kernel<<<slot_blocks, kFetchBlock, 0, stream>>>(
      slot_row.data_ptr<int64_t>(), slot_meta.data_ptr<int64_t>(), S, keep_from, lfu,
      reinterpret_cast<uint64_t*>(keys.data_ptr<int64_t>()), order.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto* k_in = reinterpret_cast<uint64_t*>(keys.data_ptr<int64_t>());
  auto* k_out = reinterpret_cast<uint64_t*>(keys_sorted.data_ptr<int64_t>());
  bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, k_in, k_out, order.data_ptr<int64_t>(),
                                                 order_sorted.data_ptr<int64_t>(), static_cast<int>(S), 0, 64, stream));
  at::Tensor temp2 = at::empty({static_cast<int64_t>(bytes)}, opts.dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp2.data_ptr(), bytes, k_in, k_out, order.data_ptr<int64_t>(),
                                                 order_sorted.data_ptr<int64_t>(), static_cast<int>(S), 0, 64, stream));
  const int64_t bound = std::min<int64_t>(n, S);  // more missing rows than slots trips the assert
  const unsigned fill_blocks = static_cast<unsigned>((bound * 32 + kFetchBlock - 1) / kFetchBlock);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, cache[0].scalar_type(), "row_cache_fill_cuda", [&] {
    fill_kernel<scalar_t><<<fill_blocks, kFetchBlock, 0, stream>>>(
        missing_sorted.data_ptr<int64_t>(), num_missing.data_ptr<int>(), k_out, order_sorted.data_ptr<int64_t>(),
        slot_of_row.data_ptr<int32_t>(), slot_row.data_ptr<int64_t>(), slot_meta.data_ptr<int64_t>(), store_dev,
        store.stride(0), f, flag_offset, static_cast<float>(init_std), static_cast<uint64_t>(init_seed),
        cache[0].numel() / S, stamp, stats_p, bound);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  AT_DISPATCH_INDEX_TYPES(rows_c.scalar_type(), "row_cache_slots_cuda", [&] {
    slots_kernel<index_t><<<lookup_blocks, kFetchBlock, 0, stream>>>(
        rows_c.data_ptr<index_t>(), n, slot_of_row.data_ptr<int32_t>(), out.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

__global__ void flush_kernel(const int64_t* __restrict__ slot_row, int64_t S, int64_t num_rows, char* store,
                             int64_t record_stride, CacheFields f, int64_t flag_offset) {
  const int64_t s = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (s >= S || slot_row[s] < 0) return;
  CUDA_KERNEL_ASSERT_MSG(slot_row[s] < num_rows, "row_cache_flush: a slot holds a row outside the store");
  char* rec = store + slot_row[s] * record_stride;
  for (int k = 0; k < f.count; ++k) warp_copy(rec + f.offset[k], f.cache[k] + s * f.bytes[k], f.bytes[k], lane);
  if (flag_offset >= 0 && lane == 0) rec[flag_offset] = 1;
}

void row_cache_flush_cuda(const at::Tensor& slot_row, const at::Tensor& store, at::TensorList cache,
                          at::IntArrayRef field_offsets, int64_t flag_offset) {
  TORCH_CHECK(slot_row.dim() == 1 && slot_row.scalar_type() == at::kLong && slot_row.is_contiguous(),
              "row_cache_flush: slot_row must be contiguous int64 [num_slots]");
  TORCH_CHECK(store.dim() == 2 && store.scalar_type() == at::kByte && store.stride(1) == 1 && store.is_pinned(),
              "row_cache_flush: store must be pinned uint8 [num_rows, record_bytes] with contiguous records");
  TORCH_CHECK(cache.size() == field_offsets.size(), "row_cache_flush: one record offset per cache field is needed");
  TORCH_CHECK(flag_offset < store.size(1), "row_cache_flush: flag_offset must lie inside a record");
  const int64_t S = slot_row.size(0);
  for (size_t i = 0; i < cache.size(); ++i) {
    const at::Tensor& c = cache[i];
    TORCH_CHECK(c.device() == slot_row.device() && c.is_contiguous() && c.dim() >= 1 && c.size(0) == S,
                "row_cache_flush: cache field ", i, " must be contiguous [num_slots, ...] on the cache's device");
    TORCH_CHECK(field_offsets[i] >= 0 &&
                    field_offsets[i] + c.numel() / std::max<int64_t>(S, 1) * c.element_size() <= store.size(1),
                "row_cache_flush: cache field ", i, " does not fit a record");
  }
  const c10::cuda::CUDAGuard guard(slot_row.device());
  if (S == 0) return;
  const unsigned blocks = static_cast<unsigned>((S * 32 + kFetchBlock - 1) / kFetchBlock);
  flush_kernel<<<blocks, kFetchBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
      slot_row.data_ptr<int64_t>(), S, store.size(0), device_view(store), store.stride(0),
      cache_fields(cache, field_offsets, S), flag_offset);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CUDA, m) {
  m.impl("_row_cache_fetch", &row_cache_fetch_cuda);
  m.impl("_row_cache_flush", &row_cache_flush_cuda);
}

}  // namespace engram
