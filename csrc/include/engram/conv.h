// Per-element maths of the short causal convolution Y = U + SiLU(Conv1D(RMSNorm(U)))
// (docs/SPEC.md section 5), torch-free so the CPU kernel, the CUDA kernel and GoogleTest share it.
#pragma once

#include <cstdint>

#include "engram/common.h"
#include "engram/gate.h"  // rms_reciprocal, sigmoid

namespace engram {

// SiLU(x) = x * sigmoid(x).
template <typename T>
ENGRAM_HOST_DEVICE T silu(T x) {
  return x * sigmoid(x);
}

// d SiLU / dx = sigmoid(x) * (1 + x * (1 - sigmoid(x))).
template <typename T>
ENGRAM_HOST_DEVICE T silu_grad(T x) {
  const T s = sigmoid(x);
  return s * (T(1) + x * (T(1) - s));
}

// Tap i of a kernel of size K reads position t - conv_tap_shift(i, K, dilation): nn.Conv1d's
// layout with left padding (K - 1) * dilation, so tap K - 1 is the current position.
ENGRAM_HOST_DEVICE int64_t conv_tap_shift(int64_t i, int64_t kernel_size, int64_t dilation) {
  return (kernel_size - 1 - i) * dilation;
}

// Receptive field of the causal conv in positions (t and the (K - 1) * dilation before it).
ENGRAM_HOST_DEVICE int64_t conv_receptive_field(int64_t kernel_size, int64_t dilation) {
  return (kernel_size - 1) * dilation + 1;
}

// RMSNorm backward for n = u * r * w with a = dL/dn * w:
//   dL/du = r * a - u * rmsnorm_grad_term(sum(a * u), r, D).
template <typename T>
ENGRAM_HOST_DEVICE T rmsnorm_grad_term(T dot_au, T r, int64_t D) {
  return dot_au * r * r * r / static_cast<T>(D);
}

// Sizes of one call: u is [B, T, M, D], C = M * D channels per token, K taps.
struct ConvShape {
  int64_t B, T, M, D, C, K, dilation;
};

// One call of the conv, contiguous; the conv weight is transposed to [K, C] so each tap's
// weights are contiguous in the channel. One struct per direction, filled once by the argument
// preparation both adapters share (check/conv.h).
template <typename scalar_t, typename acc_t>
struct ConvForwardParams {
  const scalar_t* u;         // [B, T, M, D]
  const acc_t* norm_weight;  // [M, D] = [C]
  const acc_t* weight_t;     // [K, C]
  scalar_t* out;             // [B, T, M, D]
  acc_t* rstd;               // [B, T, M], saved for the backward
  ConvShape shape;
  acc_t eps;
  bool activation;
};

template <typename scalar_t, typename acc_t>
struct ConvBackwardParams {
  const scalar_t* grad_out;  // [B, T, M, D]
  const scalar_t* u;         // [B, T, M, D]
  const acc_t* norm_weight;  // [C]
  const acc_t* weight_t;     // [K, C]
  const acc_t* rstd;         // [B, T, M]
  scalar_t* grad_u;          // [B, T, M, D]
  acc_t* grad_norm_weight;   // [C], zeroed
  acc_t* grad_weight_t;      // [K, C], zeroed
  ConvShape shape;
  bool activation;
};

}  // namespace engram
