// Table optimizer maths (engram/table_optim.h), the part the CPU and CUDA kernels share, against
// textbook formulas of each optimizer, and the stochastic rounding to bfloat16.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "engram/table_optim.h"

namespace {

using engram::TableOptimizer;

engram::TableOptimParams params(double lr, double b1, double b2, double eps, double wd) {
  return {lr, b1, b2, eps, wd};
}

// One row update of `w` (and state) with gradient g, as the kernels do it.
void update_row(TableOptimizer o, const engram::TableOptimParams& p, std::vector<double>& w, std::vector<double>& m,
                std::vector<double>& v, double& row_state, int32_t& row_step, const std::vector<double>& g) {
  double sq = 0.0;
  for (double x : g) sq += x * x;
  sq /= static_cast<double>(g.size());
  const auto c = engram::table_row_coeffs<double>(o, p, &row_step, &row_state, sq);
  for (size_t j = 0; j < w.size(); ++j) engram::table_elem<double>(o, c, w[j], m[j], v[j], g[j]);
}

TEST(TableOptim, AdamMatchesTextbookAdamW) {
  const double lr = 0.003, b1 = 0.8, b2 = 0.99, eps = 1e-6, wd = 0.2;
  std::vector<double> w{0.7}, m{0.0}, v{0.0};
  double unused = 0.0;
  int32_t s = 0;
  double tw = 0.7, tm = 0.0, tv = 0.0;
  const double grads[] = {0.5, -1.5, 2.0, 0.0, -0.1, 3.0};
  int t = 0;
  for (double g : grads) {
    ++t;
    update_row(TableOptimizer::kAdam, params(lr, b1, b2, eps, wd), w, m, v, unused, s, {g});
    tw *= 1.0 - lr * wd;
    tm = b1 * tm + (1.0 - b1) * g;
    tv = b2 * tv + (1.0 - b2) * g * g;
    const double mhat = tm / (1.0 - std::pow(b1, t)), vhat = tv / (1.0 - std::pow(b2, t));
    tw -= lr * mhat / (std::sqrt(vhat) + eps);
    EXPECT_EQ(s, t);
    EXPECT_NEAR(m[0], tm, 1e-15);
    EXPECT_NEAR(v[0], tv, 1e-15);
    EXPECT_NEAR(w[0], tw, 1e-14) << "step " << t;
  }
}

TEST(TableOptim, AdamFirstUpdateIsLrTimesSign) {
  for (double g : {3.0, -0.25, 1e-3}) {
    std::vector<double> w{1.0}, m{0.0}, v{0.0};
    double unused = 0.0;
    int32_t s = 0;
    update_row(TableOptimizer::kAdam, params(0.01, 0.9, 0.999, 1e-12, 0.0), w, m, v, unused, s, {g});
    EXPECT_NEAR(1.0 - w[0], 0.01 * (g > 0 ? 1.0 : -1.0), 1e-9) << g;
  }
}

TEST(TableOptim, PartialRowwiseAdamUsesOneSecondMomentPerRow) {
  const double lr = 0.01, b1 = 0.9, b2 = 0.99, eps = 1e-8;
  std::vector<double> w{1.0, -1.0, 0.5}, m(3, 0.0), v(3, 0.0);
  double v_row = 0.0;
  int32_t s = 0;
  std::vector<double> tw = w, tm(3, 0.0);
  double tv = 0.0;
  for (int t = 1; t <= 4; ++t) {
    const std::vector<double> g{0.1 * t, -2.0, 0.3};
    update_row(TableOptimizer::kPartialRowwiseAdam, params(lr, b1, b2, eps, 0.0), w, m, v, v_row, s, g);
    const double mean_sq = (g[0] * g[0] + g[1] * g[1] + g[2] * g[2]) / 3.0;
    tv = b2 * tv + (1 - b2) * mean_sq;
    for (int j = 0; j < 3; ++j) {
      tm[j] = b1 * tm[j] + (1 - b1) * g[j];
      tw[j] -= lr * (tm[j] / (1 - std::pow(b1, t))) / (std::sqrt(tv / (1 - std::pow(b2, t))) + eps);
      EXPECT_NEAR(w[j], tw[j], 1e-13) << t << " " << j;
    }
    EXPECT_NEAR(v_row, tv, 1e-15);
    EXPECT_EQ(v, std::vector<double>(3, 0.0));  // the element-wise second moment is not used
  }
}

TEST(TableOptim, RowwiseAdagradAccumulatesMeanSquare) {
  const double lr = 0.1, eps = 1e-10;
  std::vector<double> w{0.0, 0.0}, m(2, 0.0), v(2, 0.0);
  double G = 0.0;
  int32_t s = 0;
  double tG = 0.0, tw0 = 0.0;
  for (int t = 1; t <= 3; ++t) {
    const std::vector<double> g{1.0 * t, -3.0};
    update_row(TableOptimizer::kRowwiseAdagrad, params(lr, 0.9, 0.999, eps, 0.0), w, m, v, G, s, g);
    tG += (g[0] * g[0] + g[1] * g[1]) / 2.0;
    tw0 -= lr * g[0] / (std::sqrt(tG) + eps);
    EXPECT_NEAR(G, tG, 1e-15);
    EXPECT_NEAR(w[0], tw0, 1e-15);
  }
  EXPECT_EQ(s, 0);  // adagrad keeps no step count
}

TEST(TableOptim, SgdWithDecoupledDecay) {
  std::vector<double> w{2.0}, m{0.0}, v{0.0};
  double unused = 0.0;
  int32_t s = 0;
  update_row(TableOptimizer::kSgd, params(0.5, 0.9, 0.999, 1e-8, 0.1), w, m, v, unused, s, {4.0});
  EXPECT_DOUBLE_EQ(w[0], 2.0 * (1 - 0.05) - 0.5 * 4.0);
}

TEST(TableOptim, LerpBranchForSmallBeta1) {
  std::vector<double> w{0.0}, m{2.0}, v{1.0};
  double unused = 0.0;
  int32_t s = 2;
  update_row(TableOptimizer::kAdam, params(0.1, 0.3, 0.9, 1e-8, 0.0), w, m, v, unused, s, {5.0});
  EXPECT_NEAR(m[0], 2.0 + 0.7 * 3.0, 1e-15);
}

float from_bf16(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

TEST(StochasticRounding, UnbiasedBetweenNeighbours) {
  // x lies a quarter of the way from bf16(1.0) to the next bfloat16: rounds up 1/4 of the time.
  const float lo = 1.0f, hi = from_bf16(0x3F81);
  const float x = lo + 0.25f * (hi - lo);
  int up = 0;
  const int n = 1 << 16;
  for (int i = 0; i < n; ++i) {
    const uint16_t b = engram::bf16_bits_stochastic(x, engram::rounding_bits(7, 3, i, 11));
    ASSERT_TRUE(b == 0x3F80 || b == 0x3F81);
    up += b == 0x3F81;
  }
  EXPECT_NEAR(static_cast<double>(up) / n, 0.25, 0.01);
}

TEST(StochasticRounding, ExactValuesAndSpecials) {
  for (uint32_t r : {0u, 1u, 0xFFFFu}) {
    EXPECT_EQ(engram::bf16_bits_stochastic(1.0f, r), 0x3F80);
    EXPECT_EQ(engram::bf16_bits_stochastic(-2.0f, r), 0xC000);
    EXPECT_EQ(engram::bf16_bits_stochastic(INFINITY, r), 0x7F80);
    EXPECT_TRUE(std::isnan(from_bf16(engram::bf16_bits_stochastic(NAN, r))));
  }
  // Negative values round in magnitude, symmetric with positive ones.
  EXPECT_EQ(engram::bf16_bits_stochastic(-from_bf16(0x3F80) - 1e-6f, 0xFFFF), 0xBF81);
}

TEST(StochasticRounding, BitsDependOnEveryCoordinate) {
  const uint32_t base = engram::rounding_bits(1, 2, 3, 4);
  EXPECT_EQ(base, engram::rounding_bits(1, 2, 3, 4));
  EXPECT_LT(base, 1u << 16);
  int differ = 0;
  differ += engram::rounding_bits(2, 2, 3, 4) != base;
  differ += engram::rounding_bits(1, 3, 3, 4) != base;
  differ += engram::rounding_bits(1, 2, 4, 4) != base;
  differ += engram::rounding_bits(1, 2, 3, 5) != base;
  EXPECT_EQ(differ, 4);
}

}  // namespace
