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
void gate_forward_kernel(const GateForwardParams<scalar_t, acc_t>& p) {
  const int64_t M = p.M, D = p.D, S = (M + 1) * D;
  at::parallel_for(0, p.N, std::max<int64_t>(1, 16384 / (M * D)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(4 * D);
    acc_t* sx = scratch.data();
    acc_t* sk = sx + D;
    acc_t* sv = sk + D;
    acc_t* so = sv + D;
    for (int64_t n = begin; n < end; ++n) {
      const acc_t* v = cpu::row_as_acc(p.kv + n * S + M * D, D, sv);
      for (int64_t m = 0; m < M; ++m) {
        const int64_t row = n * M + m;
        const acc_t* x = cpu::row_as_acc(p.hidden + row * D, D, sx);
        const acc_t* k = cpu::row_as_acc(p.kv + n * S + m * D, D, sk);
        acc_t sums[3];  // sum(x^2), sum(k^2), raw = sum(x * w * k)
        cpu::gate_sums(x, k, p.weight + m * D, D, sums);
        const acc_t rx = rms_reciprocal(sums[0], D, p.eps);
        const acc_t rk = rms_reciprocal(sums[1], D, p.eps);
        const acc_t a = gate_alpha(sums[2], rx, rk, p.inv_sqrt_d);
        p.alpha[row] = a;
        p.r_x[row] = rx;
        p.r_k[row] = rk;
        p.raw[row] = sums[2];
        acc_t* o = cpu::row_target(p.out + row * D, so);
        for (int64_t d = 0; d < D; ++d) o[d] = a * v[d];
        cpu::store_row(o, D, p.out + row * D);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void gate_backward_kernel(const GateBackwardParams<scalar_t, acc_t>& p) {
  const int64_t N = p.N, M = p.M, D = p.D, S = (M + 1) * D;
  const auto chunking = cpu::make_chunking(N);
  // grad_w partial sums of each chunk, reduced in chunk order below (no atomics).
  acc_t* partials = cpu::scratch<acc_t, 2>(chunking.count * M * D);
  std::fill(partials, partials + chunking.count * M * D, acc_t(0));
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
      acc_t* gw_part = partials + chunk * M * D;
      const int64_t n_end = std::min(N, (chunk + 1) * chunking.size);
      for (int64_t n = chunk * chunking.size; n < n_end; ++n) {
        const acc_t* v = cpu::row_as_acc(p.kv + n * S + M * D, D, sv);
        scalar_t* grad_value = p.grad_kv + n * S + M * D;
        std::fill(gv, gv + D, acc_t(0));
        for (int64_t m = 0; m < M; ++m) {
          const int64_t row = n * M + m;
          const acc_t* g = cpu::row_as_acc(p.grad_out + row * D, D, sg);
          const acc_t* x = cpu::row_as_acc(p.hidden + row * D, D, sx);
          const acc_t* k = cpu::row_as_acc(p.kv + n * S + m * D, D, sk);
          scalar_t* grad_key = p.grad_kv + n * S + m * D;
          const acc_t a = p.alpha[row], raw = p.raw[row], rx = p.r_x[row], rk = p.r_k[row];
          const acc_t coef = gate_backward_coef(cpu::dot(g, v, D), a, raw, rx, rk, p.inv_sqrt_d);
          acc_t* gx = cpu::row_target(p.grad_hidden + row * D, sgx);
          acc_t* gk = cpu::row_target(grad_key, sgk);
          cpu::gate_backward_row(x, k, p.weight + m * D, g, D, a, coef, gate_norm_term(raw, rx, D),
                                 gate_norm_term(raw, rk, D), gv, gw_part + m * D, gx, gk);
          cpu::store_row(gx, D, p.grad_hidden + row * D);
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
  cpu::reduce_chunks(partials, chunking.count, M * D, p.grad_weight);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> engram_gate_forward_cpu(const at::Tensor& hidden,
                                                                                               const at::Tensor& kv,
                                                                                               const at::Tensor& weight,
                                                                                               double eps) {
  const auto a = prepare_gate_forward(hidden, kv, weight, eps);
  if (a.N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.hidden.scalar_type(), "engram_gate_forward",
                                    [&] { gate_forward_kernel(a.params<scalar_t, at::opmath_type<scalar_t>>()); });
  }
  return a.outputs();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> engram_gate_backward_cpu(const at::Tensor& grad_out,
                                                                        const at::Tensor& hidden, const at::Tensor& kv,
                                                                        const at::Tensor& weight,
                                                                        const at::Tensor& alpha, const at::Tensor& r_x,
                                                                        const at::Tensor& r_k, const at::Tensor& raw) {
  const auto a = prepare_gate_backward(grad_out, hidden, kv, weight, alpha, r_x, r_k, raw);
  if (a.N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.hidden.scalar_type(), "engram_gate_backward",
                                    [&] { gate_backward_kernel(a.params<scalar_t, at::opmath_type<scalar_t>>()); });
  }
  return a.outputs();
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CPU, m) {
  m.impl("_engram_gate_forward", &engram_gate_forward_cpu);
  m.impl("_engram_gate_backward", &engram_gate_backward_cpu);
}

}  // namespace engram
