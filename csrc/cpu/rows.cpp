// Row primitives of the CPU gate and short-conv kernels (see rows.h). Plain loops over lanes that
// the compiler vectorises; on x86-64 the float versions are cloned for AVX-512 and AVX2 and the
// best one is picked at load time (torch's at::vec only reaches those instruction sets inside
// torch's own per-capability builds, an extension gets its scalar fallback).
#include "rows.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "engram/conv.h"

#define ENGRAM_ROW_INLINE inline __attribute__((always_inline))

namespace engram::cpu {
namespace {

// Lanes of the partial sums: a multiple of every vector width, fixed so that the summation order
// does not depend on the instruction set the clone was built for.
template <typename T>
constexpr int kLanes = 64 / sizeof(T);

template <typename T>
ENGRAM_ROW_INLINE T combine(const T* lanes) {
  T s = T(0);
  for (int j = 0; j < kLanes<T>; ++j) s += lanes[j];
  return s;
}

template <typename T>
ENGRAM_ROW_INLINE T dot_impl(const T* a, const T* b, int64_t n) {
  constexpr int L = kLanes<T>;
  T acc[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int j = 0; j < L; ++j) acc[j] += a[i + j] * b[i + j];
  }
  for (int j = 0; i + j < n; ++j) acc[j] += a[i + j] * b[i + j];
  return combine(acc);
}

template <typename T>
ENGRAM_ROW_INLINE void gate_sums_impl(const T* x, const T* k, const T* w, int64_t n, T* out) {
  constexpr int L = kLanes<T>;
  T xx[L] = {}, kk[L] = {}, xwk[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int j = 0; j < L; ++j) {
      const T xv = x[i + j], kv = k[i + j];
      xx[j] += xv * xv;
      kk[j] += kv * kv;
      xwk[j] += xv * w[i + j] * kv;
    }
  }
  for (int j = 0; i + j < n; ++j) {
    const T xv = x[i + j], kv = k[i + j];
    xx[j] += xv * xv;
    kk[j] += kv * kv;
    xwk[j] += xv * w[i + j] * kv;
  }
  out[0] = combine(xx);
  out[1] = combine(kk);
  out[2] = combine(xwk);
}

template <typename T>
ENGRAM_ROW_INLINE void gate_backward_row_impl(const T* __restrict__ x, const T* __restrict__ k, const T* __restrict__ w,
                                              const T* __restrict__ g, int64_t n, T alpha, T r, T term_x, T term_k,
                                              T* __restrict__ grad_v, T* __restrict__ grad_w, T* __restrict__ grad_x,
                                              T* __restrict__ grad_k) {
  for (int64_t i = 0; i < n; ++i) {
    const T xv = x[i], kv = k[i], wv = w[i];
    grad_v[i] += g[i] * alpha;
    grad_w[i] += r * xv * kv;
    grad_x[i] = r * (kv * wv - xv * term_x);
    grad_k[i] = r * (xv * wv - kv * term_k);
  }
}

// exp for float as plain arithmetic the vectoriser handles: 2^n * p(r) with x = n ln2 + r,
// |r| <= ln2 / 2, a degree-6 polynomial (Cephes expf coefficients), max relative error ~1.5e-7.
// Arguments are clamped to [-87, 88], where float exp neither overflows nor goes subnormal; NaN
// propagates.
ENGRAM_ROW_INLINE float exp_poly(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  // Adding 1.5 * 2^23 rounds x / ln2 to an integer held in the low mantissa bits.
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  uint32_t shifted_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof(float));
  const float n = shifted - 12582912.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t scale_bits = (shifted_bits - 0x4B400000u + 127u) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(float));
  return p * scale;
}

ENGRAM_ROW_INLINE float sigmoid_fast(float x) { return 1.0f / (1.0f + exp_poly(-x)); }
ENGRAM_ROW_INLINE double sigmoid_fast(double x) { return engram::sigmoid(x); }

template <typename T>
ENGRAM_ROW_INLINE void add_silu_impl(const T* __restrict__ x, const T* __restrict__ pre, T* __restrict__ out,
                                     int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] + pre[i] * sigmoid_fast(pre[i]);
}

template <typename T>
ENGRAM_ROW_INLINE void mul_silu_grad_impl(const T* __restrict__ g, const T* __restrict__ pre, T* __restrict__ out,
                                          int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T s = sigmoid_fast(pre[i]);
    out[i] = g[i] * (s * (T(1) + pre[i] * (T(1) - s)));
  }
}

template <typename T>
ENGRAM_ROW_INLINE void multiply_add_impl(T* __restrict__ acc, const T* __restrict__ a, const T* __restrict__ b,
                                         int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += a[i] * b[i];
}

template <typename T>
ENGRAM_ROW_INLINE void multiply_add_scaled_impl(T* __restrict__ acc, const T* __restrict__ a, const T* __restrict__ b,
                                                T scale, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += a[i] * b[i] * scale;
}

}  // namespace

ENGRAM_CPU_CLONES float sum_sq(const float* a, int64_t n) { return dot_impl(a, a, n); }
double sum_sq(const double* a, int64_t n) { return dot_impl(a, a, n); }
ENGRAM_CPU_CLONES float dot(const float* a, const float* b, int64_t n) { return dot_impl(a, b, n); }
double dot(const double* a, const double* b, int64_t n) { return dot_impl(a, b, n); }

ENGRAM_CPU_CLONES void gate_sums(const float* x, const float* k, const float* w, int64_t n, float* out) {
  gate_sums_impl(x, k, w, n, out);
}
void gate_sums(const double* x, const double* k, const double* w, int64_t n, double* out) {
  gate_sums_impl(x, k, w, n, out);
}

ENGRAM_CPU_CLONES void gate_backward_row(const float* x, const float* k, const float* w, const float* g, int64_t n,
                                         float alpha, float r, float term_x, float term_k, float* grad_v, float* grad_w,
                                         float* grad_x, float* grad_k) {
  gate_backward_row_impl(x, k, w, g, n, alpha, r, term_x, term_k, grad_v, grad_w, grad_x, grad_k);
}
void gate_backward_row(const double* x, const double* k, const double* w, const double* g, int64_t n, double alpha,
                       double r, double term_x, double term_k, double* grad_v, double* grad_w, double* grad_x,
                       double* grad_k) {
  gate_backward_row_impl(x, k, w, g, n, alpha, r, term_x, term_k, grad_v, grad_w, grad_x, grad_k);
}

ENGRAM_CPU_CLONES void multiply_add(float* acc, const float* a, const float* b, int64_t n) {
  multiply_add_impl(acc, a, b, n);
}
void multiply_add(double* acc, const double* a, const double* b, int64_t n) { multiply_add_impl(acc, a, b, n); }

ENGRAM_CPU_CLONES void multiply_add_scaled(float* acc, const float* a, const float* b, float scale, int64_t n) {
  multiply_add_scaled_impl(acc, a, b, scale, n);
}
void multiply_add_scaled(double* acc, const double* a, const double* b, double scale, int64_t n) {
  multiply_add_scaled_impl(acc, a, b, scale, n);
}

ENGRAM_CPU_CLONES void add_silu(const float* x, const float* pre, float* out, int64_t n) {
  add_silu_impl(x, pre, out, n);
}
void add_silu(const double* x, const double* pre, double* out, int64_t n) { add_silu_impl(x, pre, out, n); }

ENGRAM_CPU_CLONES void mul_silu_grad(const float* g, const float* pre, float* out, int64_t n) {
  mul_silu_grad_impl(g, pre, out, n);
}
void mul_silu_grad(const double* g, const double* pre, double* out, int64_t n) { mul_silu_grad_impl(g, pre, out, n); }

}  // namespace engram::cpu
