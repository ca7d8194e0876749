// The gate and short-conv per-element maths (engram/gate.h, engram/conv.h) against closed forms
// and central finite differences in double.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "engram/conv.h"
#include "engram/gate.h"

namespace {

double central_diff(const std::function<double(double)>& f, double x, double h = 1e-6) {
  return (f(x + h) - f(x - h)) / (2 * h);
}

TEST(GateMath, RmsReciprocal) {
  // x = (3, 4): mean of squares 12.5.
  EXPECT_DOUBLE_EQ(engram::rms_reciprocal(25.0, 2, 0.0), 1.0 / std::sqrt(12.5));
  EXPECT_DOUBLE_EQ(engram::rms_reciprocal(25.0, 2, 0.5), 1.0 / std::sqrt(13.0));
  EXPECT_FLOAT_EQ(engram::rms_reciprocal(4.0f, 4, 0.0f), 1.0f);
  // All-zero row: 1 / sqrt(eps), and inf (not NaN) with eps = 0.
  EXPECT_DOUBLE_EQ(engram::rms_reciprocal(0.0, 8, 1e-6), 1e3);
  EXPECT_TRUE(std::isinf(engram::rms_reciprocal(0.0, 8, 0.0)));
}

TEST(GateMath, SignedSqrt) {
  EXPECT_DOUBLE_EQ(engram::signed_sqrt(4.0), 2.0);
  EXPECT_DOUBLE_EQ(engram::signed_sqrt(-0.25), -0.5);
  EXPECT_DOUBLE_EQ(engram::signed_sqrt(0.0), 0.0);
  // Clamped: |s| < 1e-6 gives sign(s) * 1e-3.
  EXPECT_DOUBLE_EQ(engram::signed_sqrt(1e-9), std::sqrt(1e-6));
  EXPECT_DOUBLE_EQ(engram::signed_sqrt(-1e-9), -std::sqrt(1e-6));
  EXPECT_FLOAT_EQ(engram::signed_sqrt(-3e-7f), -1e-3f);
  EXPECT_FLOAT_EQ(engram::signed_sqrt(9.0f), 3.0f);
}

TEST(GateMath, SignedSqrtGrad) {
  for (double s : {-3.0, -0.01, -2e-6, 2e-6, 1e-4, 0.5, 7.0}) {
    const double h = std::abs(s) * 1e-4;
    EXPECT_NEAR(engram::signed_sqrt_grad(s), central_diff([](double x) { return engram::signed_sqrt(x); }, s, h),
                1e-6 * engram::signed_sqrt_grad(s))
        << s;
  }
  // Inside the clamp the value is constant: zero slope, on both sides of 0 and at 0.
  for (double s : {-9e-7, -1e-12, 0.0, 1e-12, 9e-7}) EXPECT_EQ(engram::signed_sqrt_grad(s), 0.0) << s;
  EXPECT_FLOAT_EQ(engram::signed_sqrt_grad(0.25f), 1.0f);
}

TEST(GateMath, Sigmoid) {
  EXPECT_DOUBLE_EQ(engram::sigmoid(0.0), 0.5);
  EXPECT_NEAR(engram::sigmoid(2.0) + engram::sigmoid(-2.0), 1.0, 1e-15);
  EXPECT_NEAR(engram::sigmoid(1.0), 1.0 / (1.0 + std::exp(-1.0)), 1e-15);
  // Saturation without NaN in both precisions.
  EXPECT_EQ(engram::sigmoid(-1000.0), 0.0);
  EXPECT_EQ(engram::sigmoid(1000.0), 1.0);
  EXPECT_EQ(engram::sigmoid(-200.0f), 0.0f);
  EXPECT_EQ(engram::sigmoid(200.0f), 1.0f);
}

TEST(GateMath, SiluAndGrad) {
  EXPECT_DOUBLE_EQ(engram::silu(0.0), 0.0);
  EXPECT_NEAR(engram::silu(1.5), 1.5 / (1.0 + std::exp(-1.5)), 1e-15);
  EXPECT_EQ(engram::silu(-1000.0), -0.0);
  EXPECT_DOUBLE_EQ(engram::silu_grad(0.0), 0.5);
  for (double x : {-8.0, -1.3, -0.2, 0.7, 3.0, 12.0}) {
    EXPECT_NEAR(engram::silu_grad(x), central_diff([](double v) { return engram::silu(v); }, x), 1e-8) << x;
  }
  EXPECT_NEAR(engram::silu_grad(2.0f), static_cast<float>(engram::silu_grad(2.0)), 1e-6f);
}

TEST(GateMath, AlphaFromRaw) {
  const double inv_sqrt_d = 1.0 / std::sqrt(16.0);
  const double s = 0.8 * inv_sqrt_d * 1.1 * 0.9;
  EXPECT_DOUBLE_EQ(engram::gate_score(0.8, 1.1, 0.9, inv_sqrt_d), s);
  EXPECT_NEAR(engram::gate_alpha(0.8, 1.1, 0.9, inv_sqrt_d), 1.0 / (1.0 + std::exp(-std::sqrt(s))), 1e-15);
  EXPECT_DOUBLE_EQ(engram::gate_alpha(0.0, 1.1, 0.9, inv_sqrt_d), 0.5);
}

// alpha of one branch as a function of its D-wide x and k (double, as the kernels compute it).
double alpha_of(const std::vector<double>& x, const std::vector<double>& k, const std::vector<double>& w, double eps) {
  const int64_t D = static_cast<int64_t>(x.size());
  double xx = 0, kk = 0, raw = 0;
  for (int64_t d = 0; d < D; ++d) {
    xx += x[d] * x[d];
    kk += k[d] * k[d];
    raw += x[d] * w[d] * k[d];
  }
  return engram::gate_alpha(raw, engram::rms_reciprocal(xx, D, eps), engram::rms_reciprocal(kk, D, eps),
                            1.0 / std::sqrt(static_cast<double>(D)));
}

TEST(GateMath, BackwardCoefficientGivesGradients) {
  // grad_x = r * (k w - x raw r_x^2 / D), grad_k = r * (x w - k raw r_k^2 / D), grad_w = r x k
  // against finite differences of dL/dalpha * alpha.
  const std::vector<double> x = {0.3, -1.2, 0.8, 2.0, -0.4};
  const std::vector<double> k = {1.1, 0.5, -0.7, 0.9, 0.2};
  const std::vector<double> w = {0.9, 1.3, 0.6, 1.0, 1.7};
  const double eps = 1e-5, dl_dalpha = -0.37;
  const int64_t D = 5;
  double xx = 0, kk = 0, raw = 0;
  for (int64_t d = 0; d < D; ++d) {
    xx += x[d] * x[d];
    kk += k[d] * k[d];
    raw += x[d] * w[d] * k[d];
  }
  const double rx = engram::rms_reciprocal(xx, D, eps), rk = engram::rms_reciprocal(kk, D, eps);
  const double inv_sqrt_d = 1.0 / std::sqrt(5.0);
  const double alpha = engram::gate_alpha(raw, rx, rk, inv_sqrt_d);
  const double r = engram::gate_backward_coef(dl_dalpha, alpha, raw, rx, rk, inv_sqrt_d);
  ASSERT_NE(r, 0.0);
  for (int64_t d = 0; d < D; ++d) {
    auto along = [&](std::vector<double> xs, std::vector<double> ks, std::vector<double> ws, int which) {
      return [=](double t) mutable {
        (which == 0 ? xs : which == 1 ? ks : ws)[d] = t;
        return dl_dalpha * alpha_of(xs, ks, ws, eps);
      };
    };
    const double gx = r * (k[d] * w[d] - x[d] * engram::gate_norm_term(raw, rx, D));
    const double gk = r * (x[d] * w[d] - k[d] * engram::gate_norm_term(raw, rk, D));
    const double gw = r * x[d] * k[d];
    EXPECT_NEAR(gx, central_diff(along(x, k, w, 0), x[d]), 1e-8) << d;
    EXPECT_NEAR(gk, central_diff(along(x, k, w, 1), k[d]), 1e-8) << d;
    EXPECT_NEAR(gw, central_diff(along(x, k, w, 2), w[d]), 1e-8) << d;
  }
}

TEST(GateMath, BackwardCoefficientZeroInsideClamp) {
  // |s| = raw * r_x * r_k / sqrt(D) below 1e-6: no gradient flows through s.
  EXPECT_EQ(engram::gate_backward_coef(1.0, 0.5, 1e-7, 1.0, 1.0, 0.25), 0.0);
  EXPECT_EQ(engram::gate_backward_coef(1.0, 0.5, 0.0, 1.0, 1.0, 0.25), 0.0);
  EXPECT_NE(engram::gate_backward_coef(1.0, 0.5, 1e-5, 1.0, 1.0, 0.25), 0.0);
}

TEST(ConvMath, TapShiftMatchesConv1dLayout) {
  // Kernel 4, dilation 3: taps 0..3 read t-9, t-6, t-3, t.
  EXPECT_EQ(engram::conv_tap_shift(0, 4, 3), 9);
  EXPECT_EQ(engram::conv_tap_shift(1, 4, 3), 6);
  EXPECT_EQ(engram::conv_tap_shift(3, 4, 3), 0);
  EXPECT_EQ(engram::conv_tap_shift(0, 1, 5), 0);
  EXPECT_EQ(engram::conv_receptive_field(4, 3), 10);
  EXPECT_EQ(engram::conv_receptive_field(1, 7), 1);
}

TEST(ConvMath, RmsNormGradTerm) {
  // d/du_j of L = sum_d a_d * u_d * r(u) (w folded into a) equals r a_j - u_j * term.
  const std::vector<double> u = {0.5, -1.5, 2.0, 0.1};
  const std::vector<double> a = {0.3, 0.8, -0.6, 1.2};
  const double eps = 1e-5;
  const int64_t D = 4;
  auto loss = [&](const std::vector<double>& v) {
    double ss = 0, dot = 0;
    for (int64_t d = 0; d < D; ++d) ss += v[d] * v[d];
    const double r = engram::rms_reciprocal(ss, D, eps);
    for (int64_t d = 0; d < D; ++d) dot += a[d] * v[d] * r;
    return dot;
  };
  double ss = 0, au = 0;
  for (int64_t d = 0; d < D; ++d) {
    ss += u[d] * u[d];
    au += a[d] * u[d];
  }
  const double r = engram::rms_reciprocal(ss, D, eps);
  const double term = engram::rmsnorm_grad_term(au, r, D);
  for (int64_t j = 0; j < D; ++j) {
    auto f = [&](double t) {
      auto v = u;
      v[j] = t;
      return loss(v);
    };
    EXPECT_NEAR(r * a[j] - u[j] * term, central_diff(f, u[j]), 1e-8) << j;
  }
}

}  // namespace
