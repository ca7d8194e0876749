// Row helpers shared by the CPU kernels of engram_gate and short_conv: rows of the input dtype
// read as the accumulation type, fixed-order vector reductions, and the token chunking that
// makes weight-gradient sums independent of the thread count.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace engram::cpu {

template <typename T>
using Vec = at::vec::Vectorized<T>;

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

template <typename scalar_t, typename acc_t>
inline void store_row(const acc_t* src, int64_t n, scalar_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

template <typename T>
inline T reduce_sum(const Vec<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, v);
}

// sum(a * b) in a fixed order.
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  Vec<T> acc0(T(0)), acc1(T(0));
  int64_t i = 0;
  constexpr int64_t W = Vec<T>::size();
  for (; i + 2 * W <= n; i += 2 * W) {
    acc0 = at::vec::fmadd(Vec<T>::loadu(a + i), Vec<T>::loadu(b + i), acc0);
    acc1 = at::vec::fmadd(Vec<T>::loadu(a + i + W), Vec<T>::loadu(b + i + W), acc1);
  }
  for (; i < n; i += W) {
    const int64_t c = std::min<int64_t>(W, n - i);  // loadu with a count zero-fills the rest
    acc0 = at::vec::fmadd(Vec<T>::loadu(a + i, c), Vec<T>::loadu(b + i, c), acc0);
  }
  return reduce_sum<T>(acc0 + acc1);
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
