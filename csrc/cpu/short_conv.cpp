// CPU kernels of short_conv_forward and short_conv_backward: RMSNorm per (token, branch), then a
// depthwise causal dilated conv along T over the M * D channels of each token. Maths in
// engram/conv.h.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "check/conv.h"
#include "engram/conv.h"
#include "rows.h"

namespace engram {
namespace {

// rstd[b, t, m] = 1 / sqrt(mean(u[b, t, m, :]^2) + eps).
template <typename scalar_t, typename acc_t>
void compute_rstd(const scalar_t* u, const ConvShape& s, acc_t eps, acc_t* rstd) {
  const int64_t D = s.D;
  at::parallel_for(0, s.B * s.T * s.M, std::max<int64_t>(1, 16384 / D), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(D);
    for (int64_t row = begin; row < end; ++row) {
      rstd[row] = rms_reciprocal(cpu::sum_sq(cpu::row_as_acc(u + row * D, D, scratch.data()), D), D, eps);
    }
  });
}

// Pre-activation conv output of token (b, t) into pre[C]:
//   pre = sum over taps i of weight_t[i] * RMSNorm(u[b, t - shift_i]) (positions before 0 read 0),
// with the normalised rows formed on the fly as (weight_t[i] * norm_weight) * u * rstd, so no
// normalised copy of u is ever stored. tap_norm = weight_t[i] * norm_weight, [K, C].
template <typename scalar_t, typename acc_t>
void conv_token(const scalar_t* u, const acc_t* rstd, const acc_t* tap_norm, const ConvShape& s, int64_t token,
                acc_t* pre, acc_t* scratch) {
  const int64_t t = token % s.T;
  std::fill(pre, pre + s.C, acc_t(0));
  for (int64_t i = 0; i < s.K; ++i) {
    const int64_t shift = conv_tap_shift(i, s.K, s.dilation);
    if (t - shift < 0) continue;
    const int64_t src = token - shift;
    const acc_t* x = cpu::row_as_acc(u + src * s.C, s.C, scratch);
    for (int64_t m = 0; m < s.M; ++m) {
      cpu::multiply_add_scaled(pre + m * s.D, tap_norm + i * s.C + m * s.D, x + m * s.D, rstd[src * s.M + m], s.D);
    }
  }
}

// weight_t[i] * norm_weight for every tap, [K, C].
template <typename acc_t>
std::vector<acc_t> tap_norm_weights(const acc_t* norm_weight, const acc_t* weight_t, const ConvShape& s) {
  std::vector<acc_t> tap_norm(s.K * s.C);
  for (int64_t i = 0; i < s.K; ++i) {
    for (int64_t c = 0; c < s.C; ++c) tap_norm[i * s.C + c] = weight_t[i * s.C + c] * norm_weight[c];
  }
  return tap_norm;
}

template <typename scalar_t, typename acc_t>
void short_conv_forward_kernel(const ConvForwardParams<scalar_t, acc_t>& p) {
  const ConvShape& s = p.shape;
  const scalar_t* u = p.u;
  const acc_t* rstd = p.rstd;
  scalar_t* out = p.out;
  const bool activation = p.activation;
  compute_rstd(u, s, p.eps, p.rstd);
  const auto tap_norm = tap_norm_weights(p.norm_weight, p.weight_t, s);
  at::parallel_for(0, s.B * s.T, std::max<int64_t>(1, 16384 / s.C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(4 * s.C);
    acc_t* pre = scratch.data();
    acc_t* su = pre + s.C;
    acc_t* so = su + s.C;
    acc_t* tap = so + s.C;
    for (int64_t token = begin; token < end; ++token) {
      conv_token(u, rstd, tap_norm.data(), s, token, pre, tap);
      const acc_t* x = cpu::row_as_acc(u + token * s.C, s.C, su);
      acc_t* o = cpu::row_target(out + token * s.C, so);
      if (activation) {
        cpu::add_silu(x, pre, o, s.C);
      } else {
        for (int64_t c = 0; c < s.C; ++c) o[c] = x[c] + pre[c];
      }
      cpu::store_row(o, s.C, out + token * s.C);
    }
  });
}

template <typename scalar_t, typename acc_t>
void short_conv_backward_kernel(const ConvBackwardParams<scalar_t, acc_t>& p) {
  const ConvShape& s = p.shape;
  const scalar_t* grad_out = p.grad_out;
  const scalar_t* u = p.u;
  const acc_t* norm_weight = p.norm_weight;
  const acc_t* weight_t = p.weight_t;
  const acc_t* rstd = p.rstd;
  const bool activation = p.activation;
  scalar_t* grad_u = p.grad_u;
  const int64_t tokens = s.B * s.T, C = s.C, D = s.D;
  const auto tap_norm = tap_norm_weights(norm_weight, weight_t, s);
  // Per token: the conv's transpose gives dL/dnormed, then the RMSNorm backward. Weight
  // gradients go to per-chunk partials: norm_weight [C], then conv weight [K, C] without its
  // norm_weight factor (applied once after the reduction).
  const auto chunking = cpu::make_chunking(tokens);
  const int64_t part = C + s.K * C;
  acc_t* partials = cpu::scratch<acc_t, 2>(chunking.count * part);
  std::fill(partials, partials + chunking.count * part, acc_t(0));
  // grad_pre = dL/d(conv output) = grad_out * SiLU'(pre), the pre-activation recomputed. Token n
  // reads it at n + shift for every tap, never before n, so each thread keeps only a ring of the
  // next `window` rows (L2-resident) instead of a [tokens, C] buffer written and read back; the
  // rows at the start of each thread's range are computed by its neighbour too (window - 1 rows
  // per thread). The same function computes every row, so results do not depend on threads.
  const int64_t window = conv_receptive_field(s.K, s.dilation);
  at::parallel_for(0, chunking.count, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    acc_t* ring = cpu::scratch<acc_t, 3>((window + 6) * C);
    acc_t* gn = ring + window * C;
    acc_t* su = gn + C;
    acc_t* sg = su + C;
    acc_t* sa = sg + C;
    acc_t* tap = sa + C;
    acc_t* pre = tap + C;
    auto fill = [&](int64_t token) {
      const acc_t* g = cpu::row_as_acc(grad_out + token * C, C, sg);
      acc_t* gp = ring + (token % window) * C;
      if (activation) {
        conv_token(u, rstd, tap_norm.data(), s, token, pre, tap);
        cpu::mul_silu_grad(g, pre, gp, C);
      } else {
        std::copy(g, g + C, gp);
      }
    };
    const int64_t first = chunk_begin * chunking.size;
    for (int64_t token = first; token < std::min(tokens, first + window - 1); ++token) fill(token);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      acc_t* gnw = partials + chunk * part;
      acc_t* gw = gnw + C;
      const int64_t token_end = std::min(tokens, (chunk + 1) * chunking.size);
      for (int64_t token = chunk * chunking.size; token < token_end; ++token) {
        if (token + window - 1 < tokens) fill(token + window - 1);
        const int64_t t = token % s.T;
        const acc_t* gp = ring + (token % window) * C;
        std::fill(gn, gn + C, acc_t(0));
        for (int64_t i = 0; i < s.K; ++i) {
          const int64_t shift = conv_tap_shift(i, s.K, s.dilation);
          if (t + shift < s.T) {  // output t + shift read this token through tap i
            cpu::multiply_add(gn, weight_t + i * C, ring + ((token + shift) % window) * C, C);
          }
          if (t - shift >= 0) {  // this token's output read position t - shift through tap i
            const int64_t src = token - shift;
            const acc_t* x = cpu::row_as_acc(u + src * C, C, tap);
            for (int64_t m = 0; m < s.M; ++m) {
              cpu::multiply_add_scaled(gw + i * C + m * D, gp + m * D, x + m * D, rstd[src * s.M + m], D);
            }
          }
        }
        const acc_t* x = cpu::row_as_acc(u + token * C, C, su);
        const acc_t* g = cpu::row_as_acc(grad_out + token * C, C, sg);
        acc_t* a = cpu::row_target(grad_u + token * C, sa);
        // dL/du = grad_out + r * a - u * r^3 * sum(a * u) / D, a = dL/dnormed * norm_weight.
        for (int64_t m = 0; m < s.M; ++m) {
          const acc_t r = rstd[token * s.M + m];
          const acc_t* nw = norm_weight + m * D;
          const acc_t* xm = x + m * D;
          const acc_t* gnm = gn + m * D;
          acc_t* am = a + m * D;
          acc_t* gnwm = gnw + m * D;
          for (int64_t d = 0; d < D; ++d) {
            am[d] = gnm[d] * nw[d];
            gnwm[d] += gnm[d] * xm[d] * r;
          }
          const acc_t term = rmsnorm_grad_term(cpu::dot(am, xm, D), r, D);
          const acc_t* gm = g + m * D;
          for (int64_t d = 0; d < D; ++d) am[d] = gm[d] + r * am[d] - xm[d] * term;
        }
        cpu::store_row(a, C, grad_u + token * C);
      }
    }
  });
  std::vector<acc_t> total(part);
  cpu::reduce_chunks(partials, chunking.count, part, total.data());
  std::copy(total.begin(), total.begin() + C, p.grad_norm_weight);
  for (int64_t i = 0; i < s.K; ++i) {
    for (int64_t c = 0; c < C; ++c) p.grad_weight_t[i * C + c] = total[C + i * C + c] * norm_weight[c];
  }
}

std::tuple<at::Tensor, at::Tensor> short_conv_forward_cpu(const at::Tensor& u, const at::Tensor& norm_weight,
                                                          const at::Tensor& conv_weight, int64_t dilation, double eps,
                                                          bool activation) {
  const auto a = prepare_short_conv_forward(u, norm_weight, conv_weight, dilation, eps, activation);
  if (a.out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.u.scalar_type(), "short_conv_forward", [&] {
      short_conv_forward_kernel(a.params<scalar_t, at::opmath_type<scalar_t>>());
    });
  }
  return a.outputs();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> short_conv_backward_cpu(const at::Tensor& grad_out, const at::Tensor& u,
                                                                       const at::Tensor& norm_weight,
                                                                       const at::Tensor& conv_weight,
                                                                       const at::Tensor& rstd, int64_t dilation,
                                                                       bool activation) {
  const auto a = prepare_short_conv_backward(grad_out, u, norm_weight, conv_weight, rstd, dilation, activation);
  if (a.u.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.u.scalar_type(), "short_conv_backward", [&] {
      short_conv_backward_kernel(a.params<scalar_t, at::opmath_type<scalar_t>>());
    });
  }
  return a.outputs();
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CPU, m) {
  m.impl("_short_conv_forward", &short_conv_forward_cpu);
  m.impl("_short_conv_backward", &short_conv_backward_cpu);
}

}  // namespace engram
