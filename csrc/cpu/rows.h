// Row primitives of the CPU kernels of engram_gate and short_conv: fixed-order reductions and
// fused element-wise loops over one row (output rows must not overlap input rows), for float
// (the accumulation type of float32, bfloat16 and float16 inputs) and double. Defined in
// rows.cpp, where the float versions are compiled for several x86-64 instruction sets and
// picked at load time.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>
#include <type_traits>
#include <vector>

// A function compiled for AVX-512 (x86-64-v4), AVX2 + FMA (v3) and baseline x86-64, the best
// picked at load time: plain loops vectorise wherever possible, and the library loads anywhere.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ENGRAM_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ENGRAM_CPU_CLONES
#endif

namespace engram::cpu {

// sum(a * a), sum(a * b): lane-wise partial sums combined in a fixed order (no dependence on
// the instruction set or the thread count).
float sum_sq(const float* a, int64_t n);
double sum_sq(const double* a, int64_t n);
float dot(const float* a, const float* b, int64_t n);
double dot(const double* a, const double* b, int64_t n);

// The gate's three sums in one pass: out = {sum(x*x), sum(k*k), sum(x*w*k)}.
void gate_sums(const float* x, const float* k, const float* w, int64_t n, float* out);
void gate_sums(const double* x, const double* k, const double* w, int64_t n, double* out);

// The gate backward of one branch row, given its coefficient r (engram/gate.h):
//   grad_v += g * alpha;  grad_w += r * x * k;
//   grad_x = r * (k * w - x * term_x);  grad_k = r * (x * w - k * term_k).
void gate_backward_row(const float* x, const float* k, const float* w, const float* g, int64_t n, float alpha, float r,
                       float term_x, float term_k, float* grad_v, float* grad_w, float* grad_x, float* grad_k);
void gate_backward_row(const double* x, const double* k, const double* w, const double* g, int64_t n, double alpha,
                       double r, double term_x, double term_k, double* grad_v, double* grad_w, double* grad_x,
                       double* grad_k);

// acc += a * b.
void multiply_add(float* acc, const float* a, const float* b, int64_t n);
void multiply_add(double* acc, const double* a, const double* b, int64_t n);

// acc += a * b * scale.
void multiply_add_scaled(float* acc, const float* a, const float* b, float scale, int64_t n);
void multiply_add_scaled(double* acc, const double* a, const double* b, double scale, int64_t n);

// out = x + SiLU(pre).
void add_silu(const float* x, const float* pre, float* out, int64_t n);
void add_silu(const double* x, const double* pre, double* out, int64_t n);

// out = g * SiLU'(pre).
void mul_silu_grad(const float* g, const float* pre, float* out, int64_t n);
void mul_silu_grad(const double* g, const double* pre, double* out, int64_t n);

// A row of scalar_t as acc_t: the data itself when the types agree, else a converted copy.
template <typename scalar_t, typename acc_t>
inline const acc_t* row_as_acc(const scalar_t* p, int64_t n, acc_t* scratch) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return p;
  } else {
    for (int64_t i = 0; i < n; ++i) scratch[i] = static_cast<acc_t>(p[i]);
    return scratch;
  }
}

// Where a row of acc_t results is written: straight into the output when the types agree,
// else into scratch, then converted by store_row.
template <typename scalar_t, typename acc_t>
inline acc_t* row_target(scalar_t* out, acc_t* scratch) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return out;
  } else {
    return scratch;
  }
}

template <typename scalar_t, typename acc_t>
inline void store_row(const acc_t* src, int64_t n, scalar_t* dst) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }
}

// A per-thread buffer of at least n elements that lives as long as the thread (Slot tells apart
// buffers used at the same time: 0 and 1 by the table backward, 2 and 3 by gate and conv). A fresh allocation of tens
// of MB per call costs one page fault per 4 KiB on first write, as much as the sums themselves; the threads of torch's
// pool persist, so after the first step these buffers are already mapped. Contents are not preserved.
template <typename T, int Slot>
T* scratch(int64_t n) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(static_cast<size_t>(n));
  return buffer.data();
}

// Tokens are cut into at most kMaxChunks chunks whose size depends on the token count only;
// each chunk sums its tokens in order and the chunk partials are then added in chunk order, so
// weight gradients are bitwise reproducible whatever the number of threads.
constexpr int64_t kMaxChunks = 64;

struct Chunking {
  int64_t size;   // tokens per chunk
  int64_t count;  // number of chunks
};

inline Chunking make_chunking(int64_t tokens) {
  if (tokens <= 0) return {1, 0};
  const int64_t size = (tokens + kMaxChunks - 1) / kMaxChunks;
  return {size, (tokens + size - 1) / size};
}

// out[j] = sum over chunks c (in order) of partials[c * n + j], parallel over j.
template <typename T>
inline void reduce_chunks(const T* partials, int64_t chunks, int64_t n, T* out) {
  at::parallel_for(0, n, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) out[j] = T(0);
    for (int64_t c = 0; c < chunks; ++c) {
      const T* p = partials + c * n;
      for (int64_t j = begin; j < end; ++j) out[j] += p[j];
    }
  });
}

}  // namespace engram::cpu
