// Argument checks and preparation of short_conv and its internal ops, shared by the CPU and
// CUDA adapters (shapes, dtypes, devices; never tensor values).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <tuple>

#include "engram/conv.h"

namespace engram {

// Accumulation (and saved rstd) dtype: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType conv_acc_dtype(at::ScalarType input) { return input == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_short_conv_args(const char* op, const at::Tensor& u, const at::Tensor& norm_weight,
                                  const at::Tensor& conv_weight, int64_t dilation) {
  TORCH_CHECK(u.dim() == 4, op, ": u must be [B, T, M, D], got shape ", u.sizes());
  const auto dt = u.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble, op,
              ": u must be float32, bfloat16, float16 or float64, got ", dt);
  const int64_t M = u.size(2), D = u.size(3);
  TORCH_CHECK(M >= 1 && D >= 1, op, ": u must have M >= 1 branches and D >= 1 channels, got shape ", u.sizes());
  TORCH_CHECK(norm_weight.dim() == 2 && norm_weight.size(0) == M && norm_weight.size(1) == D, op,
              ": norm_weight must be [M=", M, ", D=", D, "], got shape ", norm_weight.sizes());
  TORCH_CHECK(conv_weight.dim() == 2 && conv_weight.size(0) == M * D && conv_weight.size(1) >= 1, op,
              ": conv_weight must be [M*D=", M * D,
              ", kernel_size >= 1] (nn.Conv1d's weight without its middle "
              "dimension), got shape ",
              conv_weight.sizes());
  TORCH_CHECK(dilation >= 1, op, ": dilation must be >= 1, got ", dilation);
  const char* names[] = {"norm_weight", "conv_weight"};
  const at::Tensor* weights[] = {&norm_weight, &conv_weight};
  for (int i = 0; i < 2; ++i) {
    const auto wt = weights[i]->scalar_type();
    TORCH_CHECK(wt == at::kFloat || wt == dt, op, ": ", names[i], " must be float32 or u's dtype ", dt, ", got ", wt);
    TORCH_CHECK(weights[i]->device() == u.device(), op, ": ", names[i], " must be on u's device ", u.device(), ", got ",
                weights[i]->device());
  }
}

inline void check_short_conv_eps(const char* op, double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
}

inline void check_short_conv_backward_args(const at::Tensor& grad_out, const at::Tensor& u,
                                           const at::Tensor& norm_weight, const at::Tensor& conv_weight,
                                           const at::Tensor& rstd, int64_t dilation) {
  constexpr const char* op = "short_conv_backward";
  check_short_conv_args(op, u, norm_weight, conv_weight, dilation);
  TORCH_CHECK(grad_out.sizes() == u.sizes(), op, ": grad_out must have the shape of u ", u.sizes(), ", got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == u.scalar_type(), op, ": grad_out must have u's dtype ", u.scalar_type(),
              ", got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == u.device(), op, ": grad_out must be on u's device ", u.device(), ", got ",
              grad_out.device());
  const auto acc = conv_acc_dtype(u.scalar_type());
  TORCH_CHECK(rstd.dim() == 3 && rstd.size(0) == u.size(0) && rstd.size(1) == u.size(1) && rstd.size(2) == u.size(2),
              op, ": rstd must be [B, T, M] = ", u.sizes().slice(0, 3), ", got ", rstd.sizes());
  TORCH_CHECK(rstd.scalar_type() == acc, op, ": rstd must be ", acc, ", got ", rstd.scalar_type());
  TORCH_CHECK(rstd.device() == u.device(), op, ": rstd must be on u's device ", u.device(), ", got ", rstd.device());
}

inline ConvShape conv_shape(const at::Tensor& u, const at::Tensor& conv_weight, int64_t dilation) {
  return {u.size(0), u.size(1), u.size(2), u.size(3), u.size(2) * u.size(3), conv_weight.size(1), dilation};
}

// The arguments of one call, prepared once for either backend: checked, contiguous, the weights
// in the accumulation dtype (the conv weight transposed to [K, C]), outputs allocated on u's
// device. A CUDA adapter sets its device guard before preparing.
struct ConvForwardArgs {
  at::Tensor u, norm_weight, weight_t, out, rstd;
  ConvShape shape;
  double eps;
  bool activation;

  template <typename scalar_t, typename acc_t>
  ConvForwardParams<scalar_t, acc_t> params() const {
    return {u.const_data_ptr<scalar_t>(),     norm_weight.const_data_ptr<acc_t>(),
            weight_t.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(),
            rstd.mutable_data_ptr<acc_t>(),   shape,
            static_cast<acc_t>(eps),          activation};
  }
  std::tuple<at::Tensor, at::Tensor> outputs() const { return {out, rstd}; }
};

inline ConvForwardArgs prepare_short_conv_forward(const at::Tensor& u, const at::Tensor& norm_weight,
                                                  const at::Tensor& conv_weight, int64_t dilation, double eps,
                                                  bool activation) {
  constexpr const char* op = "short_conv_forward";
  check_short_conv_args(op, u, norm_weight, conv_weight, dilation);
  check_short_conv_eps(op, eps);
  const auto acc = conv_acc_dtype(u.scalar_type());
  ConvForwardArgs a;
  a.shape = conv_shape(u, conv_weight, dilation);
  a.u = u.contiguous();
  a.norm_weight = norm_weight.to(acc).contiguous();
  a.weight_t = conv_weight.to(acc).t().contiguous();  // [K, C]: each tap's weights contiguous in c
  a.out = at::empty(u.sizes(), a.u.options());
  a.rstd = at::empty({a.shape.B, a.shape.T, a.shape.M}, a.u.options().dtype(acc));
  a.eps = eps;
  a.activation = activation;
  return a;
}

struct ConvBackwardArgs {
  at::Tensor grad_out, u, norm_weight, weight_t, rstd, grad_u, grad_norm_weight, grad_weight_t;
  at::ScalarType norm_weight_dtype, conv_weight_dtype;
  ConvShape shape;
  bool activation;

  template <typename scalar_t, typename acc_t>
  ConvBackwardParams<scalar_t, acc_t> params() const {
    return {grad_out.const_data_ptr<scalar_t>(),
            u.const_data_ptr<scalar_t>(),
            norm_weight.const_data_ptr<acc_t>(),
            weight_t.const_data_ptr<acc_t>(),
            rstd.const_data_ptr<acc_t>(),
            grad_u.mutable_data_ptr<scalar_t>(),
            grad_norm_weight.mutable_data_ptr<acc_t>(),
            grad_weight_t.mutable_data_ptr<acc_t>(),
            shape,
            activation};
  }
  // The weight gradients in the weights' own dtypes and layouts ([M, D] and [C, K]).
  std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {grad_u, grad_norm_weight.to(norm_weight_dtype), grad_weight_t.t().contiguous().to(conv_weight_dtype)};
  }
};

inline ConvBackwardArgs prepare_short_conv_backward(const at::Tensor& grad_out, const at::Tensor& u,
                                                    const at::Tensor& norm_weight, const at::Tensor& conv_weight,
                                                    const at::Tensor& rstd, int64_t dilation, bool activation) {
  check_short_conv_backward_args(grad_out, u, norm_weight, conv_weight, rstd, dilation);
  const auto acc = conv_acc_dtype(u.scalar_type());
  ConvBackwardArgs a;
  a.shape = conv_shape(u, conv_weight, dilation);
  a.grad_out = grad_out.contiguous();
  a.u = u.contiguous();
  a.norm_weight = norm_weight.to(acc).contiguous();
  a.weight_t = conv_weight.to(acc).t().contiguous();
  a.rstd = rstd.contiguous();
  a.grad_u = at::empty(u.sizes(), a.u.options());
  a.grad_norm_weight = at::zeros({a.shape.M, a.shape.D}, a.u.options().dtype(acc));
  a.grad_weight_t = at::zeros({a.shape.K, a.shape.C}, a.u.options().dtype(acc));
  a.norm_weight_dtype = norm_weight.scalar_type();
  a.conv_weight_dtype = conv_weight.scalar_type();
  a.activation = activation;
  return a;
}

}  // namespace engram
