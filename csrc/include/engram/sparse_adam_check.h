// Argument checks of sparse_adam_step shared by the CPU and CUDA adapters: shapes, dtypes,
// devices, layouts and hyper-parameters; never tensor values, so the CUDA path stays free of host
// synchronisation (the row values are checked by the kernels themselves).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cmath>

namespace engram {

inline void check_sparse_adam_args(const at::Tensor& table, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                                   const at::Tensor& row_step, const at::Tensor& rows, const at::Tensor& grads,
                                   double lr, double beta1, double beta2, double eps, double weight_decay) {
  constexpr const char* op = "sparse_adam_step: ";
  TORCH_CHECK(table.dim() == 2, op, "table must be [num_rows, d_head], got shape ", table.sizes());
  const auto t = table.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble, op,
              "table must be float32, bfloat16, float16 or float64, got ", t);
  // In-place updates need a plain row-major layout: a transposed or strided view would need a
  // copy, and the update would land in the copy.
  TORCH_CHECK(table.is_contiguous(), op, "table must be contiguous, got strides ", table.strides());
  const auto opmath = at::toOpMathType(t);
  for (const auto* s : {&exp_avg, &exp_avg_sq}) {
    TORCH_CHECK(s->sizes() == table.sizes(), op, "exp_avg and exp_avg_sq must have the table's shape ",
                table.sizes(), ", got ", s->sizes());
    TORCH_CHECK(s->is_contiguous(), op, "exp_avg and exp_avg_sq must be contiguous, got strides ", s->strides());
    TORCH_CHECK(s->device() == table.device(), op, "exp_avg and exp_avg_sq must be on the table's device ",
                table.device(), ", got ", s->device());
  }
  TORCH_CHECK(exp_avg.scalar_type() == exp_avg_sq.scalar_type(), op,
              "exp_avg and exp_avg_sq must share a dtype, got ", exp_avg.scalar_type(), " and ",
              exp_avg_sq.scalar_type());
  TORCH_CHECK(exp_avg.scalar_type() == opmath || exp_avg.scalar_type() == at::kBFloat16, op,
              "exp_avg and exp_avg_sq must be ", opmath, " (the maths dtype of a ", t, " table) or bfloat16, got ",
              exp_avg.scalar_type());
  TORCH_CHECK(row_step.dim() == 1 && row_step.size(0) == table.size(0), op, "row_step must be [num_rows=",
              table.size(0), "], got shape ", row_step.sizes());
  TORCH_CHECK(row_step.scalar_type() == at::kInt, op, "row_step must be int32, got ", row_step.scalar_type());
  TORCH_CHECK(row_step.is_contiguous(), op, "row_step must be contiguous, got strides ", row_step.strides());
  TORCH_CHECK(row_step.device() == table.device(), op, "row_step must be on the table's device ", table.device(),
              ", got ", row_step.device());
  TORCH_CHECK(rows.dim() == 1, op, "rows must be [U], got shape ", rows.sizes());
  TORCH_CHECK(rows.scalar_type() == at::kLong || rows.scalar_type() == at::kInt, op,
              "rows must be int64 or int32, got ", rows.scalar_type());
  TORCH_CHECK(rows.device() == table.device(), op, "rows must be on the table's device ", table.device(), ", got ",
              rows.device());
  TORCH_CHECK(grads.dim() == 2 && grads.size(0) == rows.size(0) && grads.size(1) == table.size(1), op,
              "grads must be [U=", rows.size(0), ", d_head=", table.size(1), "], got shape ", grads.sizes());
  TORCH_CHECK(grads.scalar_type() == t || grads.scalar_type() == at::kFloat, op, "grads must be ", t,
              " (the table's dtype) or float32, got ", grads.scalar_type());
  TORCH_CHECK(grads.device() == table.device(), op, "grads must be on the table's device ", table.device(),
              ", got ", grads.device());
  TORCH_CHECK(std::isfinite(lr) && lr >= 0.0, op, "lr must be finite and >= 0, got ", lr);
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0, op, "beta1 must lie in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0.0 && beta2 < 1.0, op, "beta2 must lie in [0, 1), got ", beta2);
  TORCH_CHECK(eps >= 0.0 && std::isfinite(eps), op, "eps must be finite and >= 0, got ", eps);
  TORCH_CHECK(std::isfinite(weight_decay) && weight_decay >= 0.0, op, "weight_decay must be finite and >= 0, got ",
              weight_decay);
}

}  // namespace engram
