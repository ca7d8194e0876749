// CPU kernels of engram_gate_forward and engram_gate_backward: one task per run of tokens, all M
// branches of a token together (they share the value row). Token n's keys and value are read
// in place from the fused K/V row kv[n] = [k_0 .. k_{M-1}, v] (S = (M + 1) * D wide), and the
// backward writes grad_kv in the same layout. Maths in engram/gate.h.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "check/gate.h"
#include "engram/gate.h"
#include "rows.h"

namespace engram {
namespace {

template <typename scalar_t, typename acc_t>
void gate_forward_kernel(const scalar_t* hidden, const scalar_t* kv, const acc_t* weight, int64_t N, int64_t M,
                         int64_t D, acc_t eps, scalar_t* out, acc_t* alpha, acc_t* r_x, acc_t* r_k, acc_t* raw) {
  const int64_t S = (M + 1) * D;
  const acc_t inv_sqrt_d = acc_t(1) / std::sqrt(static_cast<acc_t>(D));
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / (M * D)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(4 * D);
    acc_t* sx = scratch.data();
    acc_t* sk = sx + D;
    acc_t* sv = sk + D;
    acc_t* so = sv + D;
    for (int64_t n = begin; n < end; ++n) {
      const acc_t* v = cpu::row_as_acc(kv + n * S + M * D, D, sv);
      for (int64_t m = 0; m < M; ++m) {
        const int64_t row = n * M + m;
        const acc_t* x = cpu::row_as_acc(hidden + row * D, D, sx);
        const acc_t* k = cpu::row_as_acc(kv + n * S + m * D, D, sk);
        acc_t sums[3];  // sum(x^2), sum(k^2), raw = sum(x * w * k)
        cpu::gate_sums(x, k, weight + m * D, D, sums);
        const acc_t rx = rms_reciprocal(sums[0], D, eps);
        const acc_t rk = rms_reciprocal(sums[1], D, eps);
        const acc_t a = gate_alpha(sums[2], rx, rk, inv_sqrt_d);
        alpha[row] = a;
        r_x[row] = rx;
        r_k[row] = rk;
        raw[row] = sums[2];
        acc_t* o = cpu::row_target(out + row * D, so);
        for (int64_t d = 0; d < D; ++d) o[d] = a * v[d];
        cpu::store_row(o, D, out + row * D);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void gate_backward_kernel(const scalar_t* grad_out, const scalar_t* hidden, const scalar_t* kv, const acc_t* weight,
                          const acc_t* alpha, const acc_t* r_x, const acc_t* r_k, const acc_t* raw, int64_t N,
                          int64_t M, int64_t D, scalar_t* grad_hidden, scalar_t* grad_kv, acc_t* grad_weight) {
  const int64_t S = (M + 1) * D;
  const acc_t inv_sqrt_d = acc_t(1) / std::sqrt(static_cast<acc_t>(D));
  const auto chunking = cpu::make_chunking(N);
  // grad_w partial sums of each chunk, reduced in chunk order below (no atomics).
  std::vector<acc_t> partials(chunking.count * M * D, acc_t(0));
  at::parallel_for(0, chunking.count, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<acc_t> scratch(7 * D);
    acc_t* sx = scratch.data();
    acc_t* sk = sx + D;
    acc_t* sv = sk + D;
    acc_t* sg = sv + D;
    acc_t* gv = sg + D;
    acc_t* sgx = gv + D;
    acc_t* sgk = sgx + D;
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      acc_t* gw_part = partials.data() + chunk * M * D;
      const int64_t n_end = std::min(N, (chunk + 1) * chunking.size);
      for (int64_t n = chunk * chunking.size; n < n_end; ++n) {
        const acc_t* v = cpu::row_as_acc(kv + n * S + M * D, D, sv);
        scalar_t* grad_value = grad_kv + n * S + M * D;
        std::fill(gv, gv + D, acc_t(0));
        for (int64_t m = 0; m < M; ++m) {
          const int64_t row = n * M + m;
          const acc_t* g = cpu::row_as_acc(grad_out + row * D, D, sg);
          const acc_t* x = cpu::row_as_acc(hidden + row * D, D, sx);
          const acc_t* k = cpu::row_as_acc(kv + n * S + m * D, D, sk);
          scalar_t* grad_key = grad_kv + n * S + m * D;
          const acc_t a = alpha[row];
          const acc_t coef = gate_backward_coef(cpu::dot(g, v, D), a, raw[row], r_x[row], r_k[row], inv_sqrt_d);
          acc_t* gx = cpu::row_target(grad_hidden + row * D, sgx);
          acc_t* gk = cpu::row_target(grad_key, sgk);
          cpu::gate_backward_row(x, k, weight + m * D, g, D, a, coef, gate_norm_term(raw[row], r_x[row], D),
                                 gate_norm_term(raw[row], r_k[row], D), gv, gw_part + m * D, gx, gk);
          cpu::store_row(gx, D, grad_hidden + row * D);
          cpu::store_row(gk, D, grad_key);
        }
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          std::copy(gv, gv + D, grad_value);
        } else {
          cpu::store_row(gv, D, grad_value);
        }
      }
    }
  });
  cpu::reduce_chunks(partials.data(), chunking.count, M * D, grad_weight);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> engram_gate_forward_cpu(const at::Tensor& hidden,
                                                                                               const at::Tensor& kv,
                                                                                               const at::Tensor& weight,
                                                                                               double eps) {
  check_engram_gate_args("engram_gate_forward", hidden, kv, weight);
  check_gate_eps("engram_gate_forward", eps);
  const auto acc = gate_acc_dtype(hidden.scalar_type());
  const int64_t M = hidden.size(-2), D = hidden.size(-1);
  const int64_t N = hidden.numel() / (M * D);
  auto x = hidden.contiguous();
  auto k = kv.contiguous();  // the GEMM's output is: no copy
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
    gate_forward_kernel<scalar_t, acc_t>(
        x.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(), N, M, D,
        static_cast<acc_t>(eps), out.mutable_data_ptr<scalar_t>(), alpha.mutable_data_ptr<acc_t>(),
        r_x.mutable_data_ptr<acc_t>(), r_k.mutable_data_ptr<acc_t>(), raw.mutable_data_ptr<acc_t>());
  });
  return {out, alpha, r_x, r_k, raw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> engram_gate_backward_cpu(const at::Tensor& grad_out,
                                                                        const at::Tensor& hidden, const at::Tensor& kv,
                                                                        const at::Tensor& weight,
                                                                        const at::Tensor& alpha, const at::Tensor& r_x,
                                                                        const at::Tensor& r_k, const at::Tensor& raw) {
  check_engram_gate_backward_args(grad_out, hidden, kv, weight, alpha, r_x, r_k, raw);
  const auto acc = gate_acc_dtype(hidden.scalar_type());
  const int64_t M = hidden.size(-2), D = hidden.size(-1);
  const int64_t N = hidden.numel() / (M * D);
  auto g = grad_out.contiguous();
  auto x = hidden.contiguous();
  auto k = kv.contiguous();
  auto w = weight.to(acc).contiguous();
  auto a = alpha.contiguous();
  auto rx = r_x.contiguous();
  auto rk = r_k.contiguous();
  auto rw = raw.contiguous();
  auto grad_hidden = at::empty(hidden.sizes(), x.options());
  auto grad_kv = at::empty(kv.sizes(), x.options());
  auto grad_weight = at::zeros({M, D}, x.options().dtype(acc));
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "engram_gate_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      gate_backward_kernel<scalar_t, acc_t>(
          g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
          w.const_data_ptr<acc_t>(), a.const_data_ptr<acc_t>(), rx.const_data_ptr<acc_t>(), rk.const_data_ptr<acc_t>(),
          rw.const_data_ptr<acc_t>(), N, M, D, grad_hidden.mutable_data_ptr<scalar_t>(),
          grad_kv.mutable_data_ptr<scalar_t>(), grad_weight.mutable_data_ptr<acc_t>());
    });
  }
  return {grad_hidden, grad_kv, grad_weight.to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CPU, m) {
  m.impl("_engram_gate_forward", &engram_gate_forward_cpu);
  m.impl("_engram_gate_backward", &engram_gate_backward_cpu);
}

}  // namespace engram
