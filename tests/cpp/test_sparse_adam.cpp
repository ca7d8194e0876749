// Lazy row-wise Adam maths (engram/sparse_adam.h), the part CPU and CUDA kernels share, against
// the textbook Adam formulas.
#include <gtest/gtest.h>

#include <cmath>

#include "engram/sparse_adam.h"

namespace {

engram::AdamElemParams<double> params(double beta1, double beta2, double eps, double lr, double wd) {
  engram::AdamElemParams<double> p;
  p.one_minus_beta1 = 1.0 - beta1;
  p.beta1 = 1.0 - p.one_minus_beta1;
  p.beta2 = beta2;
  p.one_minus_beta2 = 1.0 - beta2;
  p.eps = eps;
  p.decay = 1.0 - lr * wd;
  return p;
}

TEST(SparseAdam, RowCoefficients) {
  const auto c1 = engram::adam_row_coeffs(1, 0.01, 0.9, 0.999);
  EXPECT_NEAR(c1.step_size, 0.01 / 0.1, 1e-15);
  EXPECT_NEAR(c1.bias_corr2_sqrt, std::sqrt(0.001), 1e-15);
  const auto big = engram::adam_row_coeffs(100000, 0.01, 0.9, 0.999);
  EXPECT_DOUBLE_EQ(big.step_size, 0.01);
  EXPECT_DOUBLE_EQ(big.bias_corr2_sqrt, 1.0);
}

TEST(SparseAdam, FirstUpdateIsLrTimesSign) {
  // From zero moments, Adam's first step is lr * g / (|g| + eps'): sign(g) * lr for |g| >> eps.
  for (double g : {3.0, -0.25, 1e-3}) {
    double w = 1.0, m = 0.0, v = 0.0;
    const auto c = engram::adam_row_coeffs(1, 0.01, 0.9, 0.999);
    engram::adam_elem<double, true>(w, m, v, g, params(0.9, 0.999, 1e-12, 0.01, 0.0), c.step_size, c.bias_corr2_sqrt);
    EXPECT_NEAR(1.0 - w, 0.01 * (g > 0 ? 1.0 : -1.0), 1e-9) << g;
  }
}

TEST(SparseAdam, MatchesTextbookAdamW) {
  const double lr = 0.003, b1 = 0.8, b2 = 0.99, eps = 1e-6, wd = 0.2;
  double w = 0.7, m = 0.0, v = 0.0;
  double tw = 0.7, tm = 0.0, tv = 0.0;
  const double grads[] = {0.5, -1.5, 2.0, 0.0, -0.1, 3.0};
  int t = 0;
  for (double g : grads) {
    ++t;
    const auto c = engram::adam_row_coeffs(t, lr, b1, b2);
    engram::adam_elem<double, true>(w, m, v, g, params(b1, b2, eps, lr, wd), c.step_size, c.bias_corr2_sqrt);
    tw *= 1.0 - lr * wd;
    tm = b1 * tm + (1.0 - b1) * g;
    tv = b2 * tv + (1.0 - b2) * g * g;
    const double mhat = tm / (1.0 - std::pow(b1, t)), vhat = tv / (1.0 - std::pow(b2, t));
    tw -= lr * mhat / (std::sqrt(vhat) + eps);
    EXPECT_NEAR(m, tm, 1e-15);
    EXPECT_NEAR(v, tv, 1e-15);
    EXPECT_NEAR(w, tw, 1e-14) << "step " << t;
  }
}

TEST(SparseAdam, LerpBranchForSmallBeta1) {
  // beta1 < 0.5 takes torch's other lerp branch; both are m + (1 - beta1) * (g - m).
  double w = 0.0, m = 2.0, v = 1.0;
  const auto c = engram::adam_row_coeffs(3, 0.1, 0.3, 0.9);
  engram::adam_elem<double, false>(w, m, v, 5.0, params(0.3, 0.9, 1e-8, 0.1, 0.0), c.step_size, c.bias_corr2_sqrt);
  EXPECT_NEAR(m, 2.0 + 0.7 * 3.0, 1e-15);
}

}  // namespace
