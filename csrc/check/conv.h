// Argument checks of short_conv and its internal ops shared by the CPU and CUDA adapters
// (shapes, dtypes, devices; never tensor values).
#pragma once

#include <ATen/ATen.h>

#include <cmath>

namespace engram {

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
  const auto acc = u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(rstd.dim() == 3 && rstd.size(0) == u.size(0) && rstd.size(1) == u.size(1) && rstd.size(2) == u.size(2),
              op, ": rstd must be [B, T, M] = ", u.sizes().slice(0, 3), ", got ", rstd.sizes());
  TORCH_CHECK(rstd.scalar_type() == acc, op, ": rstd must be ", acc, ", got ", rstd.scalar_type());
  TORCH_CHECK(rstd.device() == u.device(), op, ": rstd must be on u's device ", u.device(), ", got ", rstd.device());
}

}  // namespace engram
