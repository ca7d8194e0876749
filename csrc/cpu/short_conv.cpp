// CPU kernels of short_conv_forward and short_conv_backward: RMSNorm per (token, branch), then a
// depthwise causal dilated conv along T over the M * D channels of each token. Maths in
// engram/conv.h.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "engram/conv.h"
#include "engram/conv_check.h"
#include "rows.h"

namespace engram {
namespace {

struct ConvShape {
  int64_t B, T, M, D, C, K, dilation;
};

// Uninitialised scratch of n acc_t values from the caching allocator.
template <typename acc_t>
at::Tensor scratch_buffer(int64_t n) {
  return at::empty({n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

// normed[b, t, m, :] = u * rstd * norm_weight[m]. The forward computes rstd into rstd_out; the
// backward passes the forward's as rstd_in.
template <typename scalar_t, typename acc_t>
void normalise(const scalar_t* u, const acc_t* norm_weight, const ConvShape& s, acc_t eps, acc_t* rstd_out,
               const acc_t* rstd_in, acc_t* normed) {
  const int64_t rows = s.B * s.T * s.M, D = s.D;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / D), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(D);
    for (int64_t row = begin; row < end; ++row) {
      const acc_t* x = cpu::row_as_acc(u + row * D, D, scratch.data());
      acc_t r;
      if (rstd_out) {
        r = rms_reciprocal(cpu::sum_sq(x, D), D, eps);
        rstd_out[row] = r;
      } else {
        r = rstd_in[row];
      }
      const acc_t* w = norm_weight + (row % s.M) * D;
      acc_t* n = normed + row * D;
      for (int64_t d = 0; d < D; ++d) n[d] = x[d] * r * w[d];
    }
  });
}

// Pre-activation conv output of token (b, t) into pre[C]: sum over taps i of
// weight_t[i] * normed[b, t - shift_i] (positions before 0 read zero).
template <typename acc_t>
inline void conv_token(const acc_t* normed, const acc_t* weight_t, const ConvShape& s, int64_t b, int64_t t,
                       acc_t* pre) {
  std::fill(pre, pre + s.C, acc_t(0));
  for (int64_t i = 0; i < s.K; ++i) {
    const int64_t src = t - conv_tap_shift(i, s.K, s.dilation);
    if (src < 0) continue;
    cpu::multiply_add(pre, weight_t + i * s.C, normed + (b * s.T + src) * s.C, s.C);
  }
}

template <typename scalar_t, typename acc_t>
void short_conv_forward_kernel(const scalar_t* u, const acc_t* norm_weight, const acc_t* weight_t, const ConvShape& s,
                               acc_t eps, bool activation, scalar_t* out, acc_t* rstd) {
  auto normed_buf = scratch_buffer<acc_t>(s.B * s.T * s.C);
  acc_t* normed = normed_buf.template mutable_data_ptr<acc_t>();
  normalise(u, norm_weight, s, eps, rstd, static_cast<const acc_t*>(nullptr), normed);
  at::parallel_for(0, s.B * s.T, std::max<int64_t>(1, 16384 / s.C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(3 * s.C);
    acc_t* pre = scratch.data();
    acc_t* su = pre + s.C;
    acc_t* so = su + s.C;
    for (int64_t token = begin; token < end; ++token) {
      conv_token(normed, weight_t, s, token / s.T, token % s.T, pre);
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
void short_conv_backward_kernel(const scalar_t* grad_out, const scalar_t* u, const acc_t* norm_weight,
                                const acc_t* weight_t, const acc_t* rstd, const ConvShape& s, bool activation,
                                scalar_t* grad_u, acc_t* grad_norm_weight, acc_t* grad_weight_t) {
  const int64_t tokens = s.B * s.T, C = s.C, D = s.D;
  auto normed_buf = scratch_buffer<acc_t>(tokens * C);
  acc_t* normed = normed_buf.template mutable_data_ptr<acc_t>();
  normalise(u, norm_weight, s, acc_t(0), static_cast<acc_t*>(nullptr), rstd, normed);
  // grad_pre = dL/d(conv output) = grad_out * SiLU'(pre), the pre-activation recomputed.
  auto grad_pre_buf = scratch_buffer<acc_t>(tokens * C);
  acc_t* grad_pre = grad_pre_buf.template mutable_data_ptr<acc_t>();
  at::parallel_for(0, tokens, std::max<int64_t>(1, 16384 / C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(2 * C);
    acc_t* pre = scratch.data();
    acc_t* sg = pre + C;
    for (int64_t token = begin; token < end; ++token) {
      const acc_t* g = cpu::row_as_acc(grad_out + token * C, C, sg);
      acc_t* gp = grad_pre + token * C;
      if (activation) {
        conv_token(normed, weight_t, s, token / s.T, token % s.T, pre);
        cpu::mul_silu_grad(g, pre, gp, C);
      } else {
        for (int64_t c = 0; c < C; ++c) gp[c] = g[c];
      }
    }
  });
  // Per token: the conv's transpose gives dL/d(normed), then the RMSNorm backward; weight
  // gradients go to per-chunk partials (norm_weight [C] then conv weight [K, C]).
  const auto chunking = cpu::make_chunking(tokens);
  const int64_t part = C + s.K * C;
  std::vector<acc_t> partials(chunking.count * part, acc_t(0));
  at::parallel_for(0, chunking.count, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<acc_t> scratch(4 * C);
    acc_t* gn = scratch.data();
    acc_t* su = gn + C;
    acc_t* sg = su + C;
    acc_t* sa = sg + C;
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      acc_t* gnw = partials.data() + chunk * part;
      acc_t* gw = gnw + C;
      const int64_t token_end = std::min(tokens, (chunk + 1) * chunking.size);
      for (int64_t token = chunk * chunking.size; token < token_end; ++token) {
        const int64_t t = token % s.T;
        const acc_t* gp = grad_pre + token * C;
        std::fill(gn, gn + C, acc_t(0));
        for (int64_t i = 0; i < s.K; ++i) {
          const int64_t shift = conv_tap_shift(i, s.K, s.dilation);
          if (t + shift < s.T) {  // output t + shift read this token through tap i
            cpu::multiply_add(gn, weight_t + i * C, grad_pre + (token + shift) * C, C);
          }
          if (t - shift >= 0) {  // this token's output read position t - shift through tap i
            cpu::multiply_add(gw + i * C, gp, normed + (token - shift) * C, C);
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
  cpu::reduce_chunks(partials.data(), chunking.count, part, total.data());
  std::copy(total.begin(), total.begin() + C, grad_norm_weight);
  std::copy(total.begin() + C, total.end(), grad_weight_t);
}

ConvShape conv_shape(const at::Tensor& u, const at::Tensor& conv_weight, int64_t dilation) {
  return {u.size(0), u.size(1), u.size(2), u.size(3), u.size(2) * u.size(3), conv_weight.size(1), dilation};
}

std::tuple<at::Tensor, at::Tensor> short_conv_forward_cpu(const at::Tensor& u, const at::Tensor& norm_weight,
                                                          const at::Tensor& conv_weight, int64_t dilation, double eps,
                                                          bool activation) {
  check_short_conv_args("short_conv_forward", u, norm_weight, conv_weight, dilation);
  check_short_conv_eps("short_conv_forward", eps);
  const auto acc = u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto s = conv_shape(u, conv_weight, dilation);
  auto x = u.contiguous();
  auto nw = norm_weight.to(acc).contiguous();
  auto wt = conv_weight.to(acc).t().contiguous();  // [K, C]: each tap's weights contiguous in c
  auto out = at::empty(u.sizes(), x.options());
  auto rstd = at::empty({s.B, s.T, s.M}, x.options().dtype(acc));
  if (out.numel() == 0) return {out, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "short_conv_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    short_conv_forward_kernel<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), nw.const_data_ptr<acc_t>(),
                                               wt.const_data_ptr<acc_t>(), s, static_cast<acc_t>(eps), activation,
                                               out.mutable_data_ptr<scalar_t>(), rstd.mutable_data_ptr<acc_t>());
  });
  return {out, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> short_conv_backward_cpu(const at::Tensor& grad_out, const at::Tensor& u,
                                                                       const at::Tensor& norm_weight,
                                                                       const at::Tensor& conv_weight,
                                                                       const at::Tensor& rstd, int64_t dilation,
                                                                       bool activation) {
  check_short_conv_backward_args(grad_out, u, norm_weight, conv_weight, rstd, dilation);
  const auto acc = u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto s = conv_shape(u, conv_weight, dilation);
  auto g = grad_out.contiguous();
  auto x = u.contiguous();
  auto nw = norm_weight.to(acc).contiguous();
  auto wt = conv_weight.to(acc).t().contiguous();
  auto r = rstd.contiguous();
  auto grad_u = at::empty(u.sizes(), x.options());
  auto grad_nw = at::zeros({s.M, s.D}, x.options().dtype(acc));
  auto grad_wt = at::zeros({s.K, s.C}, x.options().dtype(acc));
  if (u.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "short_conv_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      short_conv_backward_kernel<scalar_t, acc_t>(
          g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), nw.const_data_ptr<acc_t>(),
          wt.const_data_ptr<acc_t>(), r.const_data_ptr<acc_t>(), s, activation, grad_u.mutable_data_ptr<scalar_t>(),
          grad_nw.mutable_data_ptr<acc_t>(), grad_wt.mutable_data_ptr<acc_t>());
    });
  }
  return {grad_u, grad_nw.to(norm_weight.scalar_type()),
          grad_wt.t().contiguous().to(conv_weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CPU, m) {
  m.impl("short_conv_forward", &short_conv_forward_cpu);
  m.impl("short_conv_backward", &short_conv_backward_cpu);
}

}  // namespace engram
