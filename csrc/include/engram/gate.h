// Per-element maths of the context-aware gate (docs/SPEC.md section 4), torch-free so the CPU
// kernel, the CUDA kernel and GoogleTest share one definition. Instantiate with float (fp32
// accumulation for float32/bfloat16/float16 inputs) or double (float64 inputs).
#pragma once

#include <cmath>
#include <cstdint>

#include "engram/common.h"

namespace engram {

// Every official implementation clamps |s| at 1e-6 before the square root, so alpha never sits
// on the infinite slope of sqrt at 0.
constexpr double kSignedSqrtFloor = 1e-6;

ENGRAM_HOST_DEVICE float engram_sqrt(float x) { return ::sqrtf(x); }
ENGRAM_HOST_DEVICE double engram_sqrt(double x) { return ::sqrt(x); }
ENGRAM_HOST_DEVICE float engram_exp(float x) { return ::expf(x); }
ENGRAM_HOST_DEVICE double engram_exp(double x) { return ::exp(x); }

// RMSNorm reciprocal 1 / sqrt(mean(x^2) + eps) from the sum of squares over D elements.
template <typename T>
ENGRAM_HOST_DEVICE T rms_reciprocal(T sum_sq, int64_t D, T eps) {
  return T(1) / engram_sqrt(sum_sq / static_cast<T>(D) + eps);
}

// s' = sign(s) * sqrt(max(|s|, 1e-6)); sign(0) = 0, as torch.sign. NaN stays NaN, as in the
// official formulation (NaN in hidden or key, inf in hidden, or an all-zero row with eps = 0 all
// make s NaN): a finite alpha there would hide the bad input and pair a finite output with NaN
// gradients.
template <typename T>
ENGRAM_HOST_DEVICE T signed_sqrt(T s) {
  if (s != s) return s;
  const T floor = static_cast<T>(kSignedSqrtFloor);
  const T a = s < T(0) ? -s : s;
  const T root = engram_sqrt(a > floor ? a : floor);
  return s > T(0) ? root : (s < T(0) ? -root : T(0));
}

// ds'/ds = 0.5 / sqrt(|s|), and 0 where the clamp holds (|s| < 1e-6): the clamped value is a
// constant, as autograd of clamp_min sees it.
template <typename T>
ENGRAM_HOST_DEVICE T signed_sqrt_grad(T s) {
  const T a = s < T(0) ? -s : s;
  return a < static_cast<T>(kSignedSqrtFloor) ? T(0) : T(0.5) / engram_sqrt(a);
}

// 1 / (1 + exp(-x)); exp overflow for very negative x gives inf and a clean 0, never NaN.
template <typename T>
ENGRAM_HOST_DEVICE T sigmoid(T x) {
  return T(1) / (T(1) + engram_exp(-x));
}

// s = dot(x * r_x, k * r_k * w) / sqrt(D) from raw = sum(x * w * k).
template <typename T>
ENGRAM_HOST_DEVICE T gate_score(T raw, T r_x, T r_k, T inv_sqrt_d) {
  return raw * inv_sqrt_d * r_x * r_k;
}

// alpha = sigmoid(s') of one token and branch.
template <typename T>
ENGRAM_HOST_DEVICE T gate_alpha(T raw, T r_x, T r_k, T inv_sqrt_d) {
  return sigmoid(signed_sqrt(gate_score(raw, r_x, r_k, inv_sqrt_d)));
}

// Per-token backward coefficient r = dL/ds * r_x * r_k / sqrt(D), with dL/dalpha = sum(g * v).
// The D-wide gradients then follow from it alone:
//   grad_x = r * (k * w - x * raw * r_x^2 / D)
//   grad_k = r * (x * w - k * raw * r_k^2 / D)
//   grad_w = sum over tokens of r * x * k
// (docs/SPEC.md section 4, plain form u = alpha * v: no identity term in grad_x).
template <typename T>
ENGRAM_HOST_DEVICE T gate_backward_coef(T dl_dalpha, T alpha, T raw, T r_x, T r_k, T inv_sqrt_d) {
  const T scale = inv_sqrt_d * r_x * r_k;
  return dl_dalpha * alpha * (T(1) - alpha) * signed_sqrt_grad(raw * scale) * scale;
}

// The RMSNorm term of grad_x and grad_k: raw * r^2 / D, multiplied by x (or k) and subtracted.
template <typename T>
ENGRAM_HOST_DEVICE T gate_norm_term(T raw, T r, int64_t D) {
  return raw * r * r / static_cast<T>(D);
}

// One call of the gate: N tokens of M branches of D channels, contiguous. Token n's keys and value
// are read in place from its fused K/V row kv[n] = [k_0 .. k_{M-1}, v], (M + 1) * D wide. One
// struct per direction, filled once by the argument preparation both adapters share
// (check/gate.h), so the CPU and CUDA kernels see the same pointers and sizes.
template <typename scalar_t, typename acc_t>
struct GateForwardParams {
  const scalar_t* hidden;  // [N, M, D]
  const scalar_t* kv;      // [N, (M + 1) * D]
  const acc_t* weight;     // [M, D], folded RMSNorm gains in acc_t
  scalar_t* out;           // [N, M, D]: alpha * v
  acc_t* alpha;            // [N, M], and the statistics the backward reads:
  acc_t* r_x;              //   RMSNorm reciprocals of hidden and key,
  acc_t* r_k;
  acc_t* raw;  //   raw = sum(x * w * k)
  int64_t N, M, D;
  acc_t eps, inv_sqrt_d;
};

template <typename scalar_t, typename acc_t>
struct GateBackwardParams {
  const scalar_t* grad_out;  // [N, M, D]
  const scalar_t* hidden;    // [N, M, D]
  const scalar_t* kv;        // [N, (M + 1) * D]
  const acc_t* weight;       // [M, D]
  const acc_t* alpha;        // [N, M] each: the forward's statistics
  const acc_t* r_x;
  const acc_t* r_k;
  const acc_t* raw;
  scalar_t* grad_hidden;  // [N, M, D]
  scalar_t* grad_kv;      // [N, (M + 1) * D], kv's layout
  acc_t* grad_weight;     // [M, D], zeroed
  int64_t N, M, D;
  acc_t inv_sqrt_d;
};

}  // namespace engram
