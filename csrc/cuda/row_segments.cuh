// The sorted half of every CUDA table backward (dense and sparse gradients, fused optimizer
// updates): CUB radix sort of (row, lookup index) pairs over only the bits a row id needs,
// run-length encoding into unique rows and reader counts, then one sum per unique row in
// lookup-index order, accumulated in acc_t (float; double for float64) from the first reader's
// gradient on, exactly like the CPU kernel: CPU and CUDA agree bit for bit and reruns are bitwise
// identical. Rows read by many lookups (frequent n-grams) are summed by a whole block that
// streams the reader rows through shared memory; the others by a sub-warp group each. Every
// buffer is sized by the bound U <= n, and U stays on the device (no host synchronisation).
#pragma once

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <c10/cuda/CUDAStream.h>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_run_length_encode.cuh>
#include <cub/device/device_scan.cuh>

#include "check/multihead_gather.h"
#include "cuda_utils.cuh"
#include "engram/gather_launch.h"
#include "engram/multihead_gather.h"

namespace engram {
namespace {

using cuda::kBlock;
using cuda::Vec;

constexpr int kUnroll = 4;

// ---- shared argument handling ---------------------------------------------------------------

struct GradArgs {
  at::Tensor grad;  // [n, d_head] contiguous
  at::Tensor rows;  // [n] contiguous
  int64_t n, d_head;
};

GradArgs check_grad_args(const char* op, const at::Tensor& grad_e, const at::Tensor& rows) {
  const int64_t d_head = check_multihead_gather_backward_args(grad_e, rows, op);
  const int64_t n = rows.numel();
  TORCH_CHECK(n < (int64_t{1} << 31), op, ": at most 2^31 - 1 lookups per call on CUDA, got ", n);
  return {grad_e.contiguous().view({n, d_head}), rows.contiguous().view({n}), n, d_head};
}

// Vector width for gradient rows: 16 bytes when every row starts 16-byte aligned.
template <typename scalar_t>
int vec_width(int64_t d_head, const void* ptr) {
  constexpr int V = 16 / sizeof(scalar_t);
  return (d_head % V == 0 && cuda::aligned16(ptr)) ? V : 1;
}

// ---- sorted (deterministic) mode -------------------------------------------------------------

// Positions 0..n-1 (the stable sort then orders each row's readers by lookup index), and the
// row-id checks that the sort cannot make (it only looks at the low end_bit bits).
template <typename idx_t>
__global__ void iota_check_kernel(const idx_t* __restrict__ rows, int64_t n, int64_t num_rows,
                                  int32_t* __restrict__ pos) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = static_cast<int64_t>(rows[i]);
    CUDA_KERNEL_ASSERT_MSG(r >= 0 && (num_rows < 0 || r < num_rows),
                           "multihead_gather_backward: rows must lie in [0, num_rows)");
    pos[i] = static_cast<int32_t>(i);
  }
}

// Hot rows (is_hot_row) into a list for the block kernel. The list order depends on scheduling,
// the results do not: each hot row is summed by exactly one block.
__global__ void hot_rows_kernel(const int32_t* __restrict__ counts, const int32_t* __restrict__ num_runs,
                                int32_t* __restrict__ hot, int32_t* __restrict__ num_hot) {
  const int64_t U = *num_runs;
  for (int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; s < U;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (is_hot_row(counts[s])) hot[atomicAdd(num_hot, 1)] = static_cast<int32_t>(s);
  }
}

struct SegmentInfo {
  const int32_t* pos;        // [n] lookup indices sorted by (row, lookup index)
  const int64_t* unique;     // [U] sorted unique rows
  const int32_t* counts;     // [U] readers per unique row
  const int32_t* seg_start;  // [U] exclusive prefix sum of counts
  const int32_t* num_runs;   // U, on the device
  const int32_t* hot;        // [num_hot] unique-row indices of the hot rows
  const int32_t* num_hot;    // on the device
};

template <typename scalar_t, typename acc_t, int V>
__device__ __forceinline__ void load_acc(const Vec<scalar_t, V>& v, acc_t (&acc)[V], bool first) {
#pragma unroll
  for (int k = 0; k < V; ++k) acc[k] = first ? static_cast<acc_t>(v.v[k]) : acc[k] + static_cast<acc_t>(v.v[k]);
}

template <typename out_t, typename acc_t, int V>
__device__ __forceinline__ void store_acc(out_t* dst, const acc_t (&acc)[V]) {
  Vec<out_t, V> v;
#pragma unroll
  for (int k = 0; k < V; ++k) v.v[k] = static_cast<out_t>(acc[k]);
  *reinterpret_cast<Vec<out_t, V>*>(dst) = v;
}

// One sub-warp group per (non-hot) unique row: its readers' gradient rows summed in order, kUnroll
// loads in flight per thread; written to out_vals[seg] (sparse) or out_dense[unique[seg]] (dense).
template <typename scalar_t, typename acc_t, int V, typename out_t = scalar_t>
__global__ void __launch_bounds__(kBlock)
    row_sum_kernel(const scalar_t* __restrict__ grad, SegmentInfo s, int64_t d_head, out_t* __restrict__ out_vals,
                   out_t* __restrict__ out_dense, int log2_group) {
  using vec_t = Vec<scalar_t, V>;
  const int64_t U = *s.num_runs;
  const int group = 1 << log2_group;
  const int lane = threadIdx.x & (group - 1);
  const int64_t vecs = d_head / V;
  const int64_t groups_total = static_cast<int64_t>(gridDim.x) * (kBlock >> log2_group);
  for (int64_t seg = static_cast<int64_t>(blockIdx.x) * (kBlock >> log2_group) + (threadIdx.x >> log2_group); seg < U;
       seg += groups_total) {
    const int64_t count = s.counts[seg];
    if (is_hot_row(count)) continue;
    const int64_t begin = s.seg_start[seg], end = begin + count;
    out_t* dst = out_dense ? out_dense + s.unique[seg] * d_head : out_vals + seg * d_head;
    for (int64_t c = lane; c < vecs; c += group) {
      acc_t acc[V];
      for (int64_t i = begin; i < end; i += kUnroll) {
        vec_t v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          if (i + u < end) v[u] = reinterpret_cast<const vec_t*>(grad + static_cast<int64_t>(s.pos[i + u]) * d_head)[c];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          if (i + u < end) load_acc<scalar_t, acc_t, V>(v[u], acc, i + u == begin);
      }
      store_acc<out_t, acc_t, V>(dst + c * V, acc);
    }
  }
}

// Hot rows, one block each: the block stages tiles of reader rows in shared memory (kHotLoads
// vectors per thread, the next tile's loads issued before the current tile is summed), and the
// thread owning a column vector adds the tile's rows in order. Columns beyond kBlock vectors are
// done in further passes over the readers.
constexpr int kHotLoads = 8;

template <typename scalar_t, typename acc_t, int V, typename out_t = scalar_t>
__global__ void __launch_bounds__(kBlock)
    hot_row_sum_kernel(const scalar_t* __restrict__ grad, SegmentInfo s, int64_t d_head, out_t* __restrict__ out_vals,
                       out_t* __restrict__ out_dense) {
  using vec_t = Vec<scalar_t, V>;
  __shared__ vec_t tile[kBlock * kHotLoads];
  const int num_hot = *s.num_hot;
  const int64_t vecs = d_head / V;
  const int pass_vecs = static_cast<int>(vecs < kBlock ? vecs : kBlock);
  const int tile_rows = hot_tile_rows(pass_vecs, kBlock, kHotLoads);
  for (int h = blockIdx.x; h < num_hot; h += gridDim.x) {
    const int64_t seg = s.hot[h];
    const int64_t begin = s.seg_start[seg], count = s.counts[seg];
    out_t* dst = out_dense ? out_dense + s.unique[seg] * d_head : out_vals + seg * d_head;
    for (int64_t pass = 0; pass < vecs; pass += pass_vecs) {
      const int width = static_cast<int>(vecs - pass < pass_vecs ? vecs - pass : pass_vecs);
      vec_t staged[kHotLoads];
      auto load_tile = [&](int64_t first_row) {
#pragma unroll
        for (int k = 0; k < kHotLoads; ++k) {
          const int e = threadIdx.x + k * kBlock, r = e / pass_vecs, c = e - r * pass_vecs;
          if (r < tile_rows && c < width && first_row + r < count) {
            const int64_t p = s.pos[begin + first_row + r];
            staged[k] = reinterpret_cast<const vec_t*>(grad + p * d_head)[pass + c];
          }
        }
      };
      acc_t acc[V];
      load_tile(0);
      for (int64_t t0 = 0; t0 < count; t0 += tile_rows) {
        __syncthreads();  // the previous tile has been summed
#pragma unroll
        for (int k = 0; k < kHotLoads; ++k) tile[threadIdx.x + k * kBlock] = staged[k];
        __syncthreads();
        if (t0 + tile_rows < count) load_tile(t0 + tile_rows);
        if (threadIdx.x < width) {
          const int64_t rows_here = count - t0 < tile_rows ? count - t0 : tile_rows;
          for (int64_t r = 0; r < rows_here; ++r) {
            load_acc<scalar_t, acc_t, V>(tile[r * pass_vecs + threadIdx.x], acc, t0 == 0 && r == 0);
          }
        }
      }
      if (threadIdx.x < width) store_acc<out_t, acc_t, V>(dst + (pass + threadIdx.x) * V, acc);
    }
  }
}

// Bytes of CUB temporary storage, from the caching allocator.
at::Tensor cub_temp(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))}, like.options().dtype(at::kByte));
}

struct Segments {
  at::Tensor pos, unique, counts, seg_start, num_runs, hot, num_hot;
  SegmentInfo info() const {
    return {pos.data_ptr<int32_t>(),       unique.data_ptr<int64_t>(),   counts.data_ptr<int32_t>(),
            seg_start.data_ptr<int32_t>(), num_runs.data_ptr<int32_t>(), hot.data_ptr<int32_t>(),
            num_hot.data_ptr<int32_t>()};
  }
};

// Sort, run-length encode, scan and list the hot rows: every buffer is sized by the bound n and U
// stays on the device. num_rows < 0 means unknown (the sparse op): the sort uses every key bit.
template <typename idx_t>
Segments build_segments(const GradArgs& a, int64_t num_rows) {
  using key_t = std::make_unsigned_t<idx_t>;
  const int64_t n = a.n;
  const int n32 = static_cast<int>(n);
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto i32 = a.rows.options().dtype(at::kInt);
  Segments sg;
  auto pos_in = at::empty({n}, i32);
  iota_check_kernel<idx_t><<<cuda::grid_for(n, kBlock), kBlock, 0, stream>>>(a.rows.data_ptr<idx_t>(), n, num_rows,
                                                                             pos_in.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Row ids are checked non-negative, so sorting them as unsigned keys is the same order.
  const key_t* keys_in = reinterpret_cast<const key_t*>(a.rows.data_ptr<idx_t>());
  auto keys_sorted = at::empty({n}, a.rows.options());
  key_t* keys_out = reinterpret_cast<key_t*>(keys_sorted.data_ptr<idx_t>());
  sg.pos = at::empty({n}, i32);
  const int key_bits = static_cast<int>(sizeof(key_t) * 8);
  const int end_bit = num_rows >= 0 ? radix_end_bit(num_rows, key_bits) : key_bits;
  size_t bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys_in, keys_out, pos_in.data_ptr<int32_t>(),
                                                 sg.pos.data_ptr<int32_t>(), n32, 0, end_bit, stream));
  auto temp = cub_temp(bytes, a.rows);
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.data_ptr(), bytes, keys_in, keys_out, pos_in.data_ptr<int32_t>(),
                                                 sg.pos.data_ptr<int32_t>(), n32, 0, end_bit, stream));

  sg.unique = at::empty({n}, a.rows.options().dtype(at::kLong));
  sg.counts = at::zeros({n}, i32);  // entries past U stay 0, so the scan below sums no garbage
  sg.num_runs = at::empty({1}, i32);
  bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRunLengthEncode::Encode(nullptr, bytes, keys_out, sg.unique.data_ptr<int64_t>(),
                                                    sg.counts.data_ptr<int32_t>(), sg.num_runs.data_ptr<int32_t>(), n32,
                                                    stream));
  temp = cub_temp(bytes, a.rows);
  C10_CUDA_CHECK(cub::DeviceRunLengthEncode::Encode(temp.data_ptr(), bytes, keys_out, sg.unique.data_ptr<int64_t>(),
                                                    sg.counts.data_ptr<int32_t>(), sg.num_runs.data_ptr<int32_t>(), n32,
                                                    stream));

  // The scan runs over the bound n (U is on the device); entries past U are never read.
  sg.seg_start = at::empty({n}, i32);
  bytes = 0;
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, bytes, sg.counts.data_ptr<int32_t>(),
                                               sg.seg_start.data_ptr<int32_t>(), n32, stream));
  temp = cub_temp(bytes, a.rows);
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(temp.data_ptr(), bytes, sg.counts.data_ptr<int32_t>(),
                                               sg.seg_start.data_ptr<int32_t>(), n32, stream));

  sg.hot = at::empty({n / (kHotRowReaders + 1) + 1}, i32);
  sg.num_hot = at::zeros({1}, i32);
  hot_rows_kernel<<<cuda::grid_for(n, kBlock), kBlock, 0, stream>>>(
      sg.counts.data_ptr<int32_t>(), sg.num_runs.data_ptr<int32_t>(), sg.hot.data_ptr<int32_t>(),
      sg.num_hot.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return sg;
}

template <typename scalar_t, int V, typename out_t = scalar_t>
void launch_row_sums(const GradArgs& a, const Segments& sg, out_t* out_vals, out_t* out_dense) {
  using acc_t = at::acc_type<scalar_t, true>;
  const int group = row_group_size(a.d_head / V);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const SegmentInfo info = sg.info();
  row_sum_kernel<scalar_t, acc_t, V, out_t><<<cuda::grid_for(a.n, kBlock / group), kBlock, 0, stream>>>(
      a.grad.data_ptr<scalar_t>(), info, a.d_head, out_vals, out_dense, log2_pow2(group));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // At most n / (kHotRowReaders + 1) hot rows; a few blocks per SM cover them.
  hot_row_sum_kernel<scalar_t, acc_t, V, out_t><<<cuda::grid_for(sg.hot.numel(), 1, 4), kBlock, 0, stream>>>(
      a.grad.data_ptr<scalar_t>(), info, a.d_head, out_vals, out_dense);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Deterministic row sums into out_vals [n, d_head] (sparse, rows sg.unique) or out_dense.
Segments backward_sorted(const GradArgs& a, int64_t num_rows, at::Tensor* out_vals, at::Tensor* out_dense) {
  Segments sg = AT_DISPATCH_INDEX_TYPES(a.rows.scalar_type(), "multihead_gather_backward_sort",
                                        [&] { return build_segments<index_t>(a, num_rows); });
  if (a.d_head == 0) return sg;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.grad.scalar_type(), "multihead_gather_backward_sum", [&] {
    scalar_t* vals = out_vals ? out_vals->data_ptr<scalar_t>() : nullptr;
    scalar_t* dense = out_dense ? out_dense->data_ptr<scalar_t>() : nullptr;
    if (vec_width<scalar_t>(a.d_head, a.grad.data_ptr()) > 1) {
      launch_row_sums<scalar_t, 16 / sizeof(scalar_t)>(a, sg, vals, dense);
    } else {
      launch_row_sums<scalar_t, 1>(a, sg, vals, dense);
    }
  });
  return sg;
}

}  // namespace
}  // namespace engram
