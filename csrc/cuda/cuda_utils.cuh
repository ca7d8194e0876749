// Small helpers shared by the CUDA kernels: launch sizing, vector widths, device assertions.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

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

// Typed data pointer of a tensor (usable in generic lambdas, where t.data_ptr<T>() is not).
template <typename T>
T* ptr(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// V elements of T moved as one aligned vector (16 bytes when V = 16 / sizeof(T)).
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// Sums N values over the block; every thread gets the totals. Deterministic: a fixed shuffle tree
// inside each warp, then the warp partials added in warp order. scratch: >= 32 * N values of
// shared memory; the block size must be a multiple of 32.
template <typename T, int N>
__device__ __forceinline__ void block_sum(T (&v)[N], T* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] += __shfl_xor_sync(0xffffffffu, v[i], off);
  }
  const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if ((threadIdx.x & 31) == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) scratch[warp * N + i] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    T total = T(0);
    for (int w = 0; w < warps; ++w) total += scratch[w * N + i];
    v[i] = total;
  }
  __syncthreads();  // scratch may be reused right away
}

// Loads V elements of a row as acc_t (one vector load when V > 1).
template <typename acc_t, typename scalar_t, int V>
__device__ __forceinline__ void load_vec(const scalar_t* p, acc_t (&out)[V]) {
  const Vec<scalar_t, V> v = *reinterpret_cast<const Vec<scalar_t, V>*>(p);
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = static_cast<acc_t>(v.v[j]);
}

template <typename acc_t, typename scalar_t, int V>
__device__ __forceinline__ void store_vec(scalar_t* p, const acc_t (&in)[V]) {
  Vec<scalar_t, V> v;
#pragma unroll
  for (int j = 0; j < V; ++j) v.v[j] = static_cast<scalar_t>(in[j]);
  *reinterpret_cast<Vec<scalar_t, V>*>(p) = v;
}

// Largest dynamic shared memory a block may opt in to on the current device.
inline size_t max_shared_optin() {
  int bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, c10::cuda::current_device()));
  return static_cast<size_t>(bytes);
}

// Dynamic shared memory `kernel` may use: the opt-in maximum less the kernel's own static shared
// memory (block-reduction scratch and the like), which counts against the same budget.
template <typename Kernel>
size_t dynamic_shared_limit(Kernel kernel) {
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const size_t optin = max_shared_optin();
  return optin > attr.sharedSizeBytes ? optin - attr.sharedSizeBytes : 0;
}

// Lets `kernel` use `bytes` of dynamic shared memory. The 48 KiB default budget covers static and
// dynamic shared memory together, so the attribute is set for any dynamic size: comparing only
// the dynamic bytes with 48 KiB let launches whose static part pushed the sum past it fail.
template <typename Kernel>
void allow_shared(Kernel kernel, size_t bytes) {
  if (bytes > 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

// Vector width (elements) for rows of n elements of scalar_t starting at the given pointers:
// 16 bytes when n and every pointer allow it, else 1.
template <typename scalar_t>
int row_vec(int64_t n, std::initializer_list<const void*> ptrs) {
  constexpr int V = 16 / sizeof(scalar_t);
  if (n % V != 0) return 1;
  for (const void* p : ptrs) {
    if (!aligned16(p)) return 1;
  }
  return V;
}

// Calls f(std::integral_constant<int, V>) with the widest vector (16 bytes, else 1 element) that
// rows of n elements at the given pointers allow, so kernels compile for both widths.
template <typename scalar_t, typename F>
void with_vec(int64_t n, std::initializer_list<const void*> ptrs, const F& f) {
  if (row_vec<scalar_t>(n, ptrs) > 1) {
    f(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// Threads per block of a kernel that gives one block a row of `vecs` vectors: a warp multiple,
// at most 256.
inline int row_threads(int64_t vecs) {
  int t = 32;
  while (t < 256 && t < vecs) t *= 2;
  return t;
}

// out[j] = sum over chunks, in chunk order, of partials[chunk][j]: the fixed-order reduction of
// per-block weight-gradient partials (no atomics, so bitwise reproducible run to run).
template <typename acc_t>
__global__ void reduce_chunks_kernel(const acc_t* __restrict__ partials, int64_t chunks, int64_t n,
                                     acc_t* __restrict__ out) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t sum = acc_t(0);
    for (int64_t c = 0; c < chunks; ++c) sum += partials[c * n + j];
    out[j] = sum;
  }
}

}  // namespace engram::cuda
