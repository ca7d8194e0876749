// Lazy row-wise Adam maths (ENGRAM.md section 7), torch-free so the CPU kernel, the CUDA kernel
// and GoogleTest share one definition. Only rows present in a step's gradient are updated; each
// row carries its own step count, so bias correction matches the number of updates that row has
// actually received (see sparse_adam_step in csrc/library.cpp for the full semantics).
#pragma once

#include <cmath>
#include <cstdint>

#include "engram/common.h"

namespace engram {

// Per-row constants for a row's `step`-th update (step >= 1). Computed in double once per row:
// 1 - beta^step loses most of its digits in float for beta2 = 0.999 and small steps.
struct AdamRowCoeffs {
  double step_size;        // lr / (1 - beta1^step)
  double bias_corr2_sqrt;  // sqrt(1 - beta2^step)
};

ENGRAM_HOST_DEVICE AdamRowCoeffs adam_row_coeffs(int64_t step, double lr, double beta1, double beta2) {
  const double s = static_cast<double>(step);
  const double bc1 = 1.0 - std::pow(beta1, s);
  const double bc2 = 1.0 - std::pow(beta2, s);
  return AdamRowCoeffs{lr / bc1, std::sqrt(bc2)};
}

// One element of a row, in the accumulation type acc_t (float, or double for float64 tables).
// Same operation order as torch.optim.AdamW's single-tensor path, so a row updated every step
// follows torch's own Adam to within rounding:
//   w *= 1 - lr * weight_decay                     (decoupled decay, only on touched rows)
//   m  = lerp(m, g, 1 - beta1)                     (torch's two-branch lerp)
//   v  = beta2 * v + (1 - beta2) * g * g
//   w -= step_size * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)
template <typename acc_t>
struct AdamElemParams {
  acc_t beta1;
  acc_t one_minus_beta1;
  acc_t beta2;
  acc_t one_minus_beta2;
  acc_t eps;
  acc_t decay;  // 1 - lr * weight_decay
};

// kSmallWeight: 1 - beta1 < 0.5 (the usual case), which picks torch's lerp branch; callers choose
// it once per call so the element loop has no branch and vectorises.
template <typename acc_t, bool kSmallWeight>
ENGRAM_HOST_DEVICE void adam_elem(acc_t& w, acc_t& m, acc_t& v, acc_t g, const AdamElemParams<acc_t>& p,
                                  acc_t step_size, acc_t bias_corr2_sqrt) {
  w = w * p.decay;
  if constexpr (kSmallWeight) {
    m = m + p.one_minus_beta1 * (g - m);
  } else {
    m = g - (g - m) * p.beta1;
  }
  v = p.beta2 * v + p.one_minus_beta2 * g * g;
  const acc_t denom = std::sqrt(v) / bias_corr2_sqrt + p.eps;
  w = w - step_size * m / denom;
}

}  // namespace engram
