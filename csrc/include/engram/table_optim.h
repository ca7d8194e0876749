// Row updates of the table optimizers (docs/SPEC.md section 7), torch-free so the CPU
// kernels, the CUDA kernels and GoogleTest share one definition. A row r with summed gradient
// g[0..d) (accumulation type acc_t: float, double for float64 tables) is updated in two steps:
// table_row_coeffs() once per row (it advances the row's own state: step count, row-wise second
// moment or accumulator), then table_elem() for each element. Only looked-up rows are updated.
//
//   sgd                   w = w * decay - lr * g
//   adam                  s = ++row_step[r]; m = lerp(m, g, 1 - b1); v = b2 v + (1 - b2) g^2;
//                         w = w * decay - lr / (1 - b1^s) * m / (sqrt(v) / sqrt(1 - b2^s) + eps)
//   partial_rowwise_adam  as adam, with one v per row fed by mean(g^2) over the row
//   rowwise_adagrad       G[r] += mean(g^2); w = w * decay - lr * g / (sqrt(G[r]) + eps)
//
// decay = 1 - lr * weight_decay (decoupled, as AdamW). Bias correction uses each row's own update
// count: Engram rows are Zipfian, and a global count would give a row first seen at step 10^4 a
// first step about 3x lr instead of lr (FBGEMM's row-wise bias correction makes the same choice).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "engram/common.h"

namespace engram {

enum class TableOptimizer : int { kSgd = 0, kAdam = 1, kPartialRowwiseAdam = 2, kRowwiseAdagrad = 3 };

// Whether the optimizer needs mean(g^2) over the row before it can update any element.
ENGRAM_HOST_DEVICE bool table_optim_rowwise(TableOptimizer o) {
  return o == TableOptimizer::kPartialRowwiseAdam || o == TableOptimizer::kRowwiseAdagrad;
}

// Hyper-parameters as the kernels read them (hparams tensor order: lr, beta1, beta2, eps,
// weight_decay).
struct TableOptimParams {
  double lr, beta1, beta2, eps, weight_decay;
};

// Per-row scalars of one update, in acc_t.
template <typename acc_t>
struct TableRowCoeffs {
  acc_t step_size;  // sgd: lr; adam kinds: lr / (1 - b1^s); adagrad: lr / (sqrt(G) + eps)
  acc_t denom;      // partial_rowwise_adam: sqrt(v_row) / sqrt(1 - b2^s) + eps
  acc_t bc2_sqrt;   // adam: sqrt(1 - b2^s)
  acc_t one_minus_beta1, beta1, beta2, one_minus_beta2, eps, decay;
};

// Advances the row's state and returns its coefficients. row_step / row_state point at the row's
// entries (nullptr where the optimizer keeps none); grad_sq_mean = mean(g^2) over the row (only
// read by the row-wise optimizers). The bias corrections are computed in double: 1 - beta^s loses
// most of its digits in float for beta2 = 0.999 and small s.
template <typename acc_t>
ENGRAM_HOST_DEVICE TableRowCoeffs<acc_t> table_row_coeffs(TableOptimizer o, const TableOptimParams& p,
                                                          int32_t* row_step, acc_t* row_state, acc_t grad_sq_mean) {
  TableRowCoeffs<acc_t> c{};
  c.one_minus_beta1 = static_cast<acc_t>(1.0 - p.beta1);
  c.beta1 = acc_t(1) - c.one_minus_beta1;  // torch's lerp uses 1 - weight in acc_t
  c.beta2 = static_cast<acc_t>(p.beta2);
  c.one_minus_beta2 = static_cast<acc_t>(1.0 - p.beta2);
  c.eps = static_cast<acc_t>(p.eps);
  c.decay = static_cast<acc_t>(1.0 - p.lr * p.weight_decay);
  switch (o) {
    case TableOptimizer::kSgd:
      c.step_size = static_cast<acc_t>(p.lr);
      break;
    case TableOptimizer::kAdam:
    case TableOptimizer::kPartialRowwiseAdam: {
      const int32_t s = ++*row_step;
      const double bc1 = 1.0 - std::pow(p.beta1, static_cast<double>(s));
      const double bc2 = 1.0 - std::pow(p.beta2, static_cast<double>(s));
      c.step_size = static_cast<acc_t>(p.lr / bc1);
      c.bc2_sqrt = static_cast<acc_t>(std::sqrt(bc2));
      if (o == TableOptimizer::kPartialRowwiseAdam) {
        const acc_t v = c.beta2 * *row_state + c.one_minus_beta2 * grad_sq_mean;
        *row_state = v;
        c.denom = std::sqrt(v) / c.bc2_sqrt + c.eps;
      }
      break;
    }
    case TableOptimizer::kRowwiseAdagrad: {
      const acc_t G = *row_state + grad_sq_mean;
      *row_state = G;
      c.step_size = static_cast<acc_t>(p.lr) / (std::sqrt(G) + c.eps);
      break;
    }
  }
  return c;
}

// One element: w, m (adam kinds' first moment), v (adam's second moment) in acc_t, in place.
template <typename acc_t>
ENGRAM_HOST_DEVICE void table_elem(TableOptimizer o, const TableRowCoeffs<acc_t>& c, acc_t& w, acc_t& m, acc_t& v,
                                   acc_t g) {
  w = w * c.decay;
  switch (o) {
    case TableOptimizer::kSgd:
    case TableOptimizer::kRowwiseAdagrad:
      w = w - c.step_size * g;
      break;
    case TableOptimizer::kAdam:
    case TableOptimizer::kPartialRowwiseAdam: {
      // torch's two-branch lerp, so a row updated every step follows torch.optim.AdamW.
      m = c.one_minus_beta1 < acc_t(0.5) ? m + c.one_minus_beta1 * (g - m) : g - (g - m) * c.beta1;
      acc_t denom = c.denom;
      if (o == TableOptimizer::kAdam) {
        v = c.beta2 * v + c.one_minus_beta2 * g * g;
        denom = std::sqrt(v) / c.bc2_sqrt + c.eps;
      }
      w = w - c.step_size * m / denom;
      break;
    }
  }
}

// ---- stochastic rounding to bfloat16 -------------------------------------------------------
// bfloat16 keeps the top 16 bits of a float32. Adding 16 uniform random bits to the low half
// and truncating rounds up with probability (dropped bits) / 2^16, so the rounding is unbiased
// and updates smaller than half an ulp still move the weight on average. The bits come from a
// counter-based hash of (seed, step, row, column): the result depends on the seed only, not on
// thread count, launch shape or device.

ENGRAM_HOST_DEVICE uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

ENGRAM_HOST_DEVICE uint32_t rounding_bits(uint64_t seed, int64_t step, int64_t row, int64_t col) {
  const uint64_t h = splitmix64(
      seed ^ splitmix64(static_cast<uint64_t>(step) ^
                        splitmix64(static_cast<uint64_t>(row) * 0x100000001B3ull + static_cast<uint64_t>(col))));
  return static_cast<uint32_t>(h >> 48);  // 16 bits
}

ENGRAM_HOST_DEVICE uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

// The bfloat16 bit pattern of x rounded stochastically with 16 random bits. NaN and +-inf keep
// their value (adding to their low bits could turn inf into NaN); a finite value that rounds up
// past the largest bfloat16 becomes inf, as round-to-nearest does.
ENGRAM_HOST_DEVICE uint16_t bf16_bits_stochastic(float x, uint32_t random16) {
  const uint32_t u = float_bits(x);
  if ((u & 0x7F800000u) == 0x7F800000u) {
    return static_cast<uint16_t>((u >> 16) | ((u & 0xFFFFu) ? 0x40u : 0u));  // quiet NaN stays NaN
  }
  return static_cast<uint16_t>((u + random16) >> 16);
}

}  // namespace engram
