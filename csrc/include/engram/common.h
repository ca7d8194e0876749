// Shared macros for torch-free kernel headers: the same inline maths compiles for the CPU
// kernels, the CUDA kernels and GoogleTest.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ENGRAM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ENGRAM_HOST_DEVICE inline
#endif
