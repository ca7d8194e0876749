// CUDA kernel of multihead_gather: a group of G threads (G = 1..32, a sub-warp for narrow rows)
// copies one looked-up table row with the widest aligned vector (16 bytes when possible). The
// copy is dtype-agnostic: rows are moved as raw bytes. Row ids outside [0, num_rows) trip a
// device-side assertion (no host synchronisation).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "check/multihead_gather.h"
#include "cuda_utils.cuh"
#include "engram/multihead_gather.h"

namespace engram {
namespace {

using cuda::kBlock;

// Lookups in flight per group: U independent row loads per thread hide DRAM latency.
constexpr int kUnroll = 4;

template <typename chunk_t, typename idx_t>
__global__ void __launch_bounds__(kBlock)
    gather_kernel(const char* __restrict__ table, int64_t pitch_bytes, int64_t num_rows, const idx_t* __restrict__ rows,
                  int64_t n, chunk_t* __restrict__ out, int chunks, int log2_group) {
  const int group = 1 << log2_group;
  const int lane = threadIdx.x & (group - 1);
  const int64_t groups_total = static_cast<int64_t>(gridDim.x) * (kBlock >> log2_group);
  const int64_t g0 = static_cast<int64_t>(blockIdx.x) * (kBlock >> log2_group) + (threadIdx.x >> log2_group);
  for (int64_t base = g0; base < n; base += groups_total * kUnroll) {
    const chunk_t* src[kUnroll];
    int64_t look[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      look[u] = base + u * groups_total;
      src[u] = nullptr;
      if (look[u] < n) {
        const int64_t r = static_cast<int64_t>(rows[look[u]]);
        CUDA_KERNEL_ASSERT_MSG(row_in_range(r, num_rows), "multihead_gather: rows must lie in [0, table.size(0))");
        src[u] = reinterpret_cast<const chunk_t*>(table + r * pitch_bytes);
      }
    }
    for (int c = lane; c < chunks; c += group) {
      chunk_t v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (src[u]) v[u] = __ldg(src[u] + c);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (src[u]) out[look[u] * chunks + c] = v[u];
    }
  }
}

template <typename chunk_t>
void launch_gather(const at::Tensor& table, const at::Tensor& rows, const at::Tensor& out) {
  const int64_t n = rows.numel();
  const int64_t row_bytes = table.size(1) * table.element_size();
  const int chunks = static_cast<int>(row_bytes / sizeof(chunk_t));
  const int group = row_group_size(chunks);
  const int log2_group = log2_pow2(group);
  const unsigned grid = cuda::grid_for(n, static_cast<int64_t>(kBlock / group) * kUnroll, 16);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const char* base = static_cast<const char*>(table.data_ptr());
  const int64_t pitch = table.stride(0) * table.element_size();
  AT_DISPATCH_INDEX_TYPES(rows.scalar_type(), "multihead_gather_cuda", [&] {
    gather_kernel<chunk_t, index_t><<<grid, kBlock, 0, stream>>>(base, pitch, table.size(0), rows.data_ptr<index_t>(),
                                                                 n, static_cast<chunk_t*>(out.data_ptr()), chunks,
                                                                 log2_group);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor multihead_gather_cuda(const at::Tensor& table, const at::Tensor& rows, bool sparse_grad) {
  const c10::cuda::CUDAGuard guard(table.device());
  const GatherArgs a = prepare_multihead_gather(table, rows);
  const at::Tensor& tab = a.table;
  const at::Tensor& rows_c = a.rows;
  const at::Tensor& out = a.out;
  const int64_t R = tab.size(0), d_head = tab.size(1);
  const int64_t n = rows_c.numel();
  if (n == 0 || d_head == 0) return out;
  TORCH_CHECK(R > 0, "multihead_gather: rows must lie in [0, table.size(0)=0), but the table is empty");
  const int width = vector_bytes(d_head * tab.element_size(), tab.stride(0) * tab.element_size(),
                                 reinterpret_cast<uintptr_t>(tab.data_ptr()));
  switch (width) {
    case 16:
      launch_gather<uint4>(tab, rows_c, out);
      break;
    case 8:
      launch_gather<uint2>(tab, rows_c, out);
      break;
    case 4:
      launch_gather<uint32_t>(tab, rows_c, out);
      break;
    default:
      launch_gather<unsigned short>(tab, rows_c, out);
      break;  // every gather dtype is >= 2 bytes
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CUDA, m) { m.impl("multihead_gather", &multihead_gather_cuda); }

}  // namespace engram
