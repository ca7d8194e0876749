// CPU kernels of engram_gate_forward and engram_gate_backward: one task per run of tokens, all M
// branches of a token together (they share the value row). Maths in engram/gate.h.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "cpu_rows.h"
#include "engram/gate.h"
#include "engram/gate_check.h"

namespace engram {
namespace {

using cpu::Vec;

template <typename scalar_t, typename acc_t>
void gate_forward_kernel(const scalar_t* hidden, const scalar_t* key, const scalar_t* value, const acc_t* weight,
                         int64_t N, int64_t M, int64_t D, acc_t eps, scalar_t* out, acc_t* alpha, acc_t* r_x,
                         acc_t* r_k, acc_t* raw) {
  const acc_t inv_sqrt_d = acc_t(1) / std::sqrt(static_cast<acc_t>(D));
  constexpr int64_t W = Vec<acc_t>::size();
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / (M * D)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(3 * D);
    acc_t* sx = scratch.data();
    acc_t* sk = sx + D;
    acc_t* sv = sk + D;
    for (int64_t n = begin; n < end; ++n) {
      const acc_t* v = cpu::row_as_acc(value + n * D, D, sv);
      for (int64_t m = 0; m < M; ++m) {
        const int64_t row = n * M + m;
        const acc_t* x = cpu::row_as_acc(hidden + row * D, D, sx);
        const acc_t* k = cpu::row_as_acc(key + row * D, D, sk);
        const acc_t* w = weight + m * D;
        // One pass for the three sums.
        Vec<acc_t> xx(acc_t(0)), kk(acc_t(0)), xwk(acc_t(0));
        for (int64_t d = 0; d < D; d += W) {
          const int64_t c = std::min<int64_t>(W, D - d);
          const auto xv = Vec<acc_t>::loadu(x + d, c), kv = Vec<acc_t>::loadu(k + d, c);
          xx = at::vec::fmadd(xv, xv, xx);
          kk = at::vec::fmadd(kv, kv, kk);
          xwk = at::vec::fmadd(xv * Vec<acc_t>::loadu(w + d, c), kv, xwk);
        }
        const acc_t rx = rms_reciprocal(cpu::reduce_sum(xx), D, eps);
        const acc_t rk = rms_reciprocal(cpu::reduce_sum(kk), D, eps);
        const acc_t dot = cpu::reduce_sum(xwk);
        const acc_t a = gate_alpha(dot, rx, rk, inv_sqrt_d);
        alpha[row] = a;
        r_x[row] = rx;
        r_k[row] = rk;
        raw[row] = dot;
        scalar_t* o = out + row * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(a * v[d]);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void gate_backward_kernel(const scalar_t* grad_out, const scalar_t* hidden, const scalar_t* key,
                          const scalar_t* value, const acc_t* weight, const acc_t* alpha, const acc_t* r_x,
                          const acc_t* r_k, const acc_t* raw, int64_t N, int64_t M, int64_t D, scalar_t* grad_hidden,
                          scalar_t* grad_key, scalar_t* grad_value, acc_t* grad_weight) {
  const acc_t inv_sqrt_d = acc_t(1) / std::sqrt(static_cast<acc_t>(D));
  const auto chunking = cpu::make_chunking(N);
  // grad_w partial sums of each chunk, reduced in chunk order below (no atomics).
  std::vector<acc_t> partials(chunking.count * M * D, acc_t(0));
  at::parallel_for(0, chunking.count, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<acc_t> scratch(6 * D);
    acc_t* sx = scratch.data();
    acc_t* sk = sx + D;
    acc_t* sv = sk + D;
    acc_t* sg = sv + D;
    acc_t* gv = sg + D;
    acc_t* tmp = gv + D;
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      acc_t* gw_part = partials.data() + chunk * M * D;
      const int64_t n_end = std::min(N, (chunk + 1) * chunking.size);
      for (int64_t n = chunk * chunking.size; n < n_end; ++n) {
        const acc_t* v = cpu::row_as_acc(value + n * D, D, sv);
        std::fill(gv, gv + D, acc_t(0));
        for (int64_t m = 0; m < M; ++m) {
          const int64_t row = n * M + m;
          const acc_t* g = cpu::row_as_acc(grad_out + row * D, D, sg);
          const acc_t* x = cpu::row_as_acc(hidden + row * D, D, sx);
          const acc_t* k = cpu::row_as_acc(key + row * D, D, sk);
          const acc_t* w = weight + m * D;
          const acc_t a = alpha[row];
          const acc_t coef = gate_backward_coef(cpu::dot(g, v, D), a, raw[row], r_x[row], r_k[row], inv_sqrt_d);
          const acc_t tx = gate_norm_term(raw[row], r_x[row], D);
          const acc_t tk = gate_norm_term(raw[row], r_k[row], D);
          acc_t* gw = gw_part + m * D;
          for (int64_t d = 0; d < D; ++d) {
            gv[d] += g[d] * a;
            gw[d] += coef * x[d] * k[d];
          }
          for (int64_t d = 0; d < D; ++d) tmp[d] = coef * (k[d] * w[d] - x[d] * tx);
          cpu::store_row(tmp, D, grad_hidden + row * D);
          for (int64_t d = 0; d < D; ++d) tmp[d] = coef * (x[d] * w[d] - k[d] * tk);
          cpu::store_row(tmp, D, grad_key + row * D);
        }
        cpu::store_row(gv, D, grad_value + n * D);
      }
    }
  });
  cpu::reduce_chunks(partials.data(), chunking.count, M * D, grad_weight);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> engram_gate_forward_cpu(
    const at::Tensor& hidden, const at::Tensor& key, const at::Tensor& value, const at::Tensor& weight, double eps) {
  check_engram_gate_args("engram_gate_forward", hidden, key, value, weight);
  check_gate_eps("engram_gate_forward", eps);
  const auto acc = gate_acc_dtype(hidden.scalar_type());
  const int64_t M = hidden.size(-2), D = hidden.size(-1);
  const int64_t N = hidden.numel() / (M * D);
  auto x = hidden.contiguous();
  auto k = key.contiguous();
  auto v = value.contiguous();
  auto w = weight.to(acc).contiguous();
  auto out = at::empty(hidden.sizes(), x.options());
  const auto stat_shape = gate_stat_shape(hidden);
  auto alpha = at::empty(stat_shape, x.options().dtype(acc));
  auto r_x = at::empty_like(alpha);
  auto r_k = at::empty_like(alpha);
  auto raw = at::empty_like(alpha);
  if (N == 0) return {out, alpha, r_x, r_k, raw};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "engram_gate_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gate_forward_kernel<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                         v.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(), N, M, D,
                                         static_cast<acc_t>(eps), out.mutable_data_ptr<scalar_t>(),
                                         alpha.mutable_data_ptr<acc_t>(), r_x.mutable_data_ptr<acc_t>(),
                                         r_k.mutable_data_ptr<acc_t>(), raw.mutable_data_ptr<acc_t>());
  });
  return {out, alpha, r_x, r_k, raw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> engram_gate_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& hidden, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& weight, const at::Tensor& alpha, const at::Tensor& r_x, const at::Tensor& r_k,
    const at::Tensor& raw) {
  check_engram_gate_backward_args(grad_out, hidden, key, value, weight, alpha, r_x, r_k, raw);
  const auto acc = gate_acc_dtype(hidden.scalar_type());
  const int64_t M = hidden.size(-2), D = hidden.size(-1);
  const int64_t N = hidden.numel() / (M * D);
  auto g = grad_out.contiguous();
  auto x = hidden.contiguous();
  auto k = key.contiguous();
  auto v = value.contiguous();
  auto w = weight.to(acc).contiguous();
  auto a = alpha.contiguous();
  auto rx = r_x.contiguous();
  auto rk = r_k.contiguous();
  auto rw = raw.contiguous();
  auto grad_hidden = at::empty(hidden.sizes(), x.options());
  auto grad_key = at::empty(key.sizes(), x.options());
  auto grad_value = at::empty(value.sizes(), x.options());
  auto grad_weight = at::zeros({M, D}, x.options().dtype(acc));
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "engram_gate_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      gate_backward_kernel<scalar_t, acc_t>(
          g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
          v.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(), a.const_data_ptr<acc_t>(),
          rx.const_data_ptr<acc_t>(), rk.const_data_ptr<acc_t>(), rw.const_data_ptr<acc_t>(), N, M, D,
          grad_hidden.mutable_data_ptr<scalar_t>(), grad_key.mutable_data_ptr<scalar_t>(),
          grad_value.mutable_data_ptr<scalar_t>(), grad_weight.mutable_data_ptr<acc_t>());
    });
  }
  return {grad_hidden, grad_key, grad_value, grad_weight.to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CPU, m) {
  m.impl("engram_gate_forward", &engram_gate_forward_cpu);
  m.impl("engram_gate_backward", &engram_gate_backward_cpu);
}

}  // namespace engram
