// CUDA kernel of multihead_gather_fp8: one warp per lookup, each lane decoding 8 E4M3 bytes at a
// time (one 8-byte load; d_head is a multiple of 32, so 8-value chunks never straddle a scale
// block) and scaling them by their block's E8M0 factor (engram/fp8.h). Row ids outside
// [0, num_rows) trip a device-side assertion (no host synchronisation).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "check/multihead_gather_fp8.h"
#include "cuda_utils.cuh"
#include "engram/fp8.h"
#include "engram/multihead_gather.h"

namespace engram {
namespace {

using cuda::kBlock;
constexpr int kChunk = 8;  // values per lane per load

template <typename out_t, typename idx_t>
__global__ void __launch_bounds__(kBlock)
    gather_fp8_kernel(const uint8_t* __restrict__ table, const uint8_t* __restrict__ scale, int64_t num_rows,
                      int64_t d_head, const idx_t* __restrict__ rows, int64_t n, out_t* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kBlock / 32);
  const int64_t chunks = d_head / kChunk, blocks = d_head / kFp8Block;
  for (int64_t look = static_cast<int64_t>(blockIdx.x) * (kBlock / 32) + (threadIdx.x >> 5); look < n; look += warps) {
    const int64_t r = static_cast<int64_t>(rows[look]);
    CUDA_KERNEL_ASSERT_MSG(row_in_range(r, num_rows), "multihead_gather_fp8: rows must lie in [0, table.size(0))");
    const uint2* src = reinterpret_cast<const uint2*>(table + r * d_head);
    const uint8_t* s = scale + r * blocks;
    out_t* dst = out + look * d_head;
    for (int64_t c = lane; c < chunks; c += 32) {
      const uint2 v = __ldg(src + c);
      const float f = e8m0_to_float(__ldg(s + c * kChunk / kFp8Block));
      const uint32_t words[2] = {v.x, v.y};
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        const uint8_t b = static_cast<uint8_t>(words[i >> 2] >> (8 * (i & 3)));
        dst[c * kChunk + i] = static_cast<out_t>(e4m3_to_float(b) * f);
      }
    }
  }
}

at::Tensor multihead_gather_fp8_cuda(const at::Tensor& table, const at::Tensor& scale, const at::Tensor& rows,
                                     at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(table.device());
  GatherFp8Args a = prepare_multihead_gather_fp8(table, scale, rows, out_dtype);
  // Rows are read 8 bytes at a time: a view at an odd offset is copied to an aligned tensor.
  if (reinterpret_cast<uintptr_t>(a.table.const_data_ptr()) % alignof(uint2) != 0) a.table = a.table.clone();
  const int64_t R = a.table.size(0), d_head = a.table.size(1);
  const int64_t n = a.rows.numel();
  if (n == 0 || d_head == 0) return a.out;
  TORCH_CHECK(R > 0, "multihead_gather_fp8: rows must lie in [0, table.size(0)=0), but the table is empty");
  const unsigned grid = cuda::grid_for(n, kBlock / 32, 16);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(a.rows.scalar_type(), "multihead_gather_fp8_cuda", [&] {
    const index_t* r = a.rows.const_data_ptr<index_t>();
    const uint8_t* t = a.table.const_data_ptr<uint8_t>();
    const uint8_t* s = a.scale.const_data_ptr<uint8_t>();
    if (out_dtype == at::kFloat) {
      gather_fp8_kernel<float, index_t>
          <<<grid, kBlock, 0, stream>>>(t, s, R, d_head, r, n, a.out.mutable_data_ptr<float>());
    } else {
      gather_fp8_kernel<c10::BFloat16, index_t>
          <<<grid, kBlock, 0, stream>>>(t, s, R, d_head, r, n, a.out.mutable_data_ptr<c10::BFloat16>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return a.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CUDA, m) { m.impl("multihead_gather_fp8", &multihead_gather_fp8_cuda); }

}  // namespace engram
