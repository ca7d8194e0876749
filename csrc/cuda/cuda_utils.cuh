// Small helpers shared by the CUDA kernels: launch sizing, vector widths, device assertions.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "engram/gather_launch.h"

#ifndef CUDA_KERNEL_ASSERT_MSG
#define CUDA_KERNEL_ASSERT_MSG(cond, msg) CUDA_KERNEL_ASSERT(cond)
#endif

namespace engram::cuda {

constexpr int kBlock = 256;

// Streaming multiprocessors of the current device (cached per device; a driver query once).
inline int sm_count() {
  static int counts[64] = {0};
  const int dev = c10::cuda::current_device();
  if (dev < 64 && counts[dev] > 0) return counts[dev];
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  if (dev < 64) counts[dev] = n;
  return n;
}

// Blocks for a grid-stride loop over `work` items of `per_block` each, capped at a few waves.
inline unsigned grid_for(int64_t work, int64_t per_block, int waves = 8) {
  const int64_t need = (work + per_block - 1) / per_block;
  const int64_t cap = static_cast<int64_t>(sm_count()) * waves;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(need, cap)));
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// V elements of T moved as one aligned vector (16 bytes when V = 16 / sizeof(T)).
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

}  // namespace engram::cuda
