// Argument checks and preparation of engram_gate and its internal ops, shared by the CPU and
// CUDA adapters (shapes, dtypes, devices; never tensor values, so the CUDA path stays free of
// host syncs).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "engram/gate.h"

namespace engram {

// Accumulation (and saved-statistics) dtype: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType gate_acc_dtype(at::ScalarType input) { return input == at::kDouble ? at::kDouble : at::kFloat; }

// Statistics shape [..., M] of a hidden [..., M, D].
inline std::vector<int64_t> gate_stat_shape(const at::Tensor& hidden) {
  auto s = hidden.sizes().vec();
  s.pop_back();
  return s;
}

// The leading shape [...] of hidden [..., M, D] with kv's width (M + 1) * D appended.
inline std::vector<int64_t> gate_kv_shape(const at::Tensor& hidden) {
  auto s = hidden.sizes().vec();
  const int64_t D = s.back();
  s.pop_back();
  const int64_t M = s.back();
  s.back() = (M + 1) * D;
  return s;
}

inline void check_engram_gate_args(const char* op, const at::Tensor& hidden, const at::Tensor& kv,
                                   const at::Tensor& weight) {
  TORCH_CHECK(hidden.dim() >= 2, op, ": hidden must be [..., M, D], got shape ", hidden.sizes());
  const auto dt = hidden.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble, op,
              ": hidden must be float32, bfloat16, float16 or float64, got ", dt);
  const int64_t M = hidden.size(-2), D = hidden.size(-1);
  TORCH_CHECK(M >= 1 && D >= 1, op, ": hidden must have M >= 1 branches and D >= 1 channels, got shape ",
              hidden.sizes());
  const auto kv_shape = gate_kv_shape(hidden);
  TORCH_CHECK(kv.sizes() == at::IntArrayRef(kv_shape), op, ": kv must be [..., (M + 1) * D] = ", kv_shape,
              " (the M keys, then the value), got ", kv.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == M && weight.size(1) == D, op, ": weight must be [M=", M, ", D=", D,
              "], got shape ", weight.sizes());
  TORCH_CHECK(kv.scalar_type() == dt, op, ": kv must have hidden's dtype ", dt, ", got ", kv.scalar_type());
  // fp32 gains are the norm (TileKernels folds them in fp32); gains in hidden's own dtype are
  // accepted too (a model cast with .to(dtype)), maths in the accumulation dtype either way.
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == dt, op,
              ": weight (folded RMSNorm gains) must be float32 or hidden's dtype ", dt, ", got ", weight.scalar_type());
  for (const auto* t : {&kv, &weight}) {
    TORCH_CHECK(t->device() == hidden.device(), op, ": kv and weight must be on hidden's device ", hidden.device(),
                ", got ", t->device());
  }
}

inline void check_gate_eps(const char* op, double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
}

inline void check_engram_gate_backward_args(const at::Tensor& grad_out, const at::Tensor& hidden, const at::Tensor& kv,
                                            const at::Tensor& weight, const at::Tensor& alpha, const at::Tensor& r_x,
                                            const at::Tensor& r_k, const at::Tensor& raw) {
  constexpr const char* op = "engram_gate_backward";
  check_engram_gate_args(op, hidden, kv, weight);
  TORCH_CHECK(grad_out.sizes() == hidden.sizes(), op, ": grad_out must have the shape of hidden ", hidden.sizes(),
              ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == hidden.scalar_type(), op, ": grad_out must have hidden's dtype ",
              hidden.scalar_type(), ", got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == hidden.device(), op, ": grad_out must be on hidden's device ", hidden.device(),
              ", got ", grad_out.device());
  const auto stat_shape = gate_stat_shape(hidden);
  const auto acc = gate_acc_dtype(hidden.scalar_type());
  const char* names[] = {"alpha", "r_x", "r_k", "raw"};
  const at::Tensor* stats[] = {&alpha, &r_x, &r_k, &raw};
  for (int i = 0; i < 4; ++i) {
    TORCH_CHECK(stats[i]->sizes() == at::IntArrayRef(stat_shape), op, ": ", names[i],
                " must be [..., M] = ", stat_shape, ", got ", stats[i]->sizes());
    TORCH_CHECK(stats[i]->scalar_type() == acc, op, ": ", names[i], " must be ", acc, ", got ",
                stats[i]->scalar_type());
    TORCH_CHECK(stats[i]->device() == hidden.device(), op, ": ", names[i], " must be on hidden's device ",
                hidden.device(), ", got ", stats[i]->device());
  }
}

// The arguments of one call, prepared once for either backend: checked, contiguous (the fused
// K/V GEMM output already is: no copy), the gains in the accumulation dtype, outputs allocated
// on hidden's device. A CUDA adapter sets its device guard before preparing.
struct GateForwardArgs {
  at::Tensor hidden, kv, weight, out, alpha, r_x, r_k, raw;
  int64_t N, M, D;
  double eps;

  template <typename scalar_t, typename acc_t>
  GateForwardParams<scalar_t, acc_t> params() const {
    return {hidden.const_data_ptr<scalar_t>(),
            kv.const_data_ptr<scalar_t>(),
            weight.const_data_ptr<acc_t>(),
            out.mutable_data_ptr<scalar_t>(),
            alpha.mutable_data_ptr<acc_t>(),
            r_x.mutable_data_ptr<acc_t>(),
            r_k.mutable_data_ptr<acc_t>(),
            raw.mutable_data_ptr<acc_t>(),
            N,
            M,
            D,
            static_cast<acc_t>(eps),
            acc_t(1) / std::sqrt(static_cast<acc_t>(D))};
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {out, alpha, r_x, r_k, raw};
  }
};

inline GateForwardArgs prepare_gate_forward(const at::Tensor& hidden, const at::Tensor& kv, const at::Tensor& weight,
                                            double eps) {
  constexpr const char* op = "engram_gate_forward";
  check_engram_gate_args(op, hidden, kv, weight);
  check_gate_eps(op, eps);
  const int64_t M = hidden.size(-2), D = hidden.size(-1);
  GateForwardArgs a;
  a.hidden = hidden.contiguous();
  a.kv = kv.contiguous();
  a.weight = weight.to(gate_acc_dtype(hidden.scalar_type())).contiguous();
  a.out = at::empty(hidden.sizes(), a.hidden.options());
  a.alpha = at::empty(gate_stat_shape(hidden), a.hidden.options().dtype(a.weight.scalar_type()));
  a.r_x = at::empty_like(a.alpha);
  a.r_k = at::empty_like(a.alpha);
  a.raw = at::empty_like(a.alpha);
  a.N = hidden.numel() / (M * D);
  a.M = M;
  a.D = D;
  a.eps = eps;
  return a;
}

struct GateBackwardArgs {
  at::Tensor grad_out, hidden, kv, weight, alpha, r_x, r_k, raw, grad_hidden, grad_kv, grad_weight;
  at::ScalarType weight_dtype;
  int64_t N, M, D;

  template <typename scalar_t, typename acc_t>
  GateBackwardParams<scalar_t, acc_t> params() const {
    return {grad_out.const_data_ptr<scalar_t>(),
            hidden.const_data_ptr<scalar_t>(),
            kv.const_data_ptr<scalar_t>(),
            weight.const_data_ptr<acc_t>(),
            alpha.const_data_ptr<acc_t>(),
            r_x.const_data_ptr<acc_t>(),
            r_k.const_data_ptr<acc_t>(),
            raw.const_data_ptr<acc_t>(),
            grad_hidden.mutable_data_ptr<scalar_t>(),
            grad_kv.mutable_data_ptr<scalar_t>(),
            grad_weight.mutable_data_ptr<acc_t>(),
            N,
            M,
            D,
            acc_t(1) / std::sqrt(static_cast<acc_t>(D))};
  }
  // The weight gradient in the weight's own dtype.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {grad_hidden, grad_kv, grad_weight.to(weight_dtype)};
  }
};

inline GateBackwardArgs prepare_gate_backward(const at::Tensor& grad_out, const at::Tensor& hidden,
                                              const at::Tensor& kv, const at::Tensor& weight, const at::Tensor& alpha,
                                              const at::Tensor& r_x, const at::Tensor& r_k, const at::Tensor& raw) {
  check_engram_gate_backward_args(grad_out, hidden, kv, weight, alpha, r_x, r_k, raw);
  const auto acc = gate_acc_dtype(hidden.scalar_type());
  const int64_t M = hidden.size(-2), D = hidden.size(-1);
  GateBackwardArgs a;
  a.grad_out = grad_out.contiguous();
  a.hidden = hidden.contiguous();
  a.kv = kv.contiguous();
  a.weight = weight.to(acc).contiguous();
  a.alpha = alpha.contiguous();
  a.r_x = r_x.contiguous();
  a.r_k = r_k.contiguous();
  a.raw = raw.contiguous();
  a.grad_hidden = at::empty(hidden.sizes(), a.hidden.options());
  a.grad_kv = at::empty(kv.sizes(), a.hidden.options());
  a.grad_weight = at::zeros({M, D}, a.hidden.options().dtype(acc));
  a.weight_dtype = weight.scalar_type();
  a.N = hidden.numel() / (M * D);
  a.M = M;
  a.D = D;
  return a;
}

}  // namespace engram
