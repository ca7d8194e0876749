// Argument checks of the table optimizer ops (table_update, multihead_gather_fused_update) shared
// by the CPU and CUDA adapters: the optimizer name, the state tensors it needs, hyper-parameters.
// Never device tensor values, so the CUDA path stays free of host synchronisation (row ids are
// checked by the kernels themselves); hparams is a CPU tensor and is read here.
#pragma once

#include <ATen/ATen.h>

#include <ATen/OpMathType.h>
#include <optional>

#include <cmath>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "engram/table_optim.h"

namespace engram {

inline TableOptimizer parse_table_optimizer(std::string_view name, const char* op) {
  if (name == "sgd") return TableOptimizer::kSgd;
  if (name == "adam") return TableOptimizer::kAdam;
  if (name == "partial_rowwise_adam") return TableOptimizer::kPartialRowwiseAdam;
  if (name == "rowwise_adagrad") return TableOptimizer::kRowwiseAdagrad;
  TORCH_CHECK(false, op, ": optimizer must be one of 'sgd', 'adam', 'partial_rowwise_adam', 'rowwise_adagrad', got '",
              std::string(name), "'");
}

struct TableUpdateArgs {
  TableOptimizer optimizer;
  TableOptimParams params;
  bool stochastic_rounding;  // seed >= 0 and a bfloat16 weight
  bool moments_bf16;         // the [R, d_head] moments (adam kinds) are bfloat16
};

// weight [R, d]; momentum1, momentum2, row_step and step as the optimizer needs them (docs in
// csrc/library.cpp); hparams float64 CPU [5].
inline TableUpdateArgs check_table_state(const char* op, const at::Tensor& weight, const at::Tensor& momentum1,
                                         const at::Tensor& momentum2, const at::Tensor& row_step,
                                         const at::Tensor& step, const at::Tensor& hparams, std::string_view optimizer,
                                         int64_t seed) {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be [num_rows, d_head], got shape ", weight.sizes());
  const auto t = weight.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble, op,
              ": weight must be float32, bfloat16, float16 or float64, got ", t);
  // In-place updates need a plain row-major layout: on a strided view the update would land in a copy.
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous, got strides ", weight.strides());
  const int64_t R = weight.size(0), D = weight.size(1);
  const auto opmath = at::toOpMathType(t);
  const TableOptimizer o = parse_table_optimizer(optimizer, op);

  auto check_state = [&](const at::Tensor& s, const char* name, at::IntArrayRef shape, bool allow_bf16) {
    TORCH_CHECK(s.sizes() == shape, op, ": ", name, " must have shape ", shape, " for optimizer '",
                std::string(optimizer), "' and weight ", weight.sizes(), ", got ", s.sizes());
    TORCH_CHECK(s.device() == weight.device(), op, ": ", name, " must be on the weight's device ", weight.device(),
                ", got ", s.device());
    if (s.numel() == 0) return;
    TORCH_CHECK(s.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", s.strides());
    TORCH_CHECK(s.scalar_type() == opmath || (allow_bf16 && s.scalar_type() == at::kBFloat16), op, ": ", name,
                " must be ", opmath, allow_bf16 ? " or bfloat16" : "", " (the maths dtype of a ", t, " weight), got ",
                s.scalar_type());
  };
  const bool adam = o == TableOptimizer::kAdam, partial = o == TableOptimizer::kPartialRowwiseAdam;
  const bool adagrad = o == TableOptimizer::kRowwiseAdagrad;
  const std::vector<int64_t> full{R, D}, per_row{R}, none{0};
  check_state(momentum1, "momentum1", adam || partial ? full : adagrad ? per_row : none, adam || partial);
  check_state(momentum2, "momentum2", adam ? full : partial ? per_row : none, adam);
  if (adam) {
    TORCH_CHECK(momentum1.scalar_type() == momentum2.scalar_type(), op,
                ": momentum1 and momentum2 of 'adam' must share a dtype, got ", momentum1.scalar_type(), " and ",
                momentum2.scalar_type());
  }
  const int64_t steps = adam || partial ? R : 0;
  TORCH_CHECK(row_step.dim() == 1 && row_step.size(0) == steps, op, ": row_step must be [", steps, "] for optimizer '",
              std::string(optimizer), "', got shape ", row_step.sizes());
  TORCH_CHECK(steps == 0 || (row_step.scalar_type() == at::kInt && row_step.is_contiguous() &&
                             row_step.device() == weight.device()),
              op, ": row_step must be contiguous int32 on ", weight.device(), ", got ", row_step.scalar_type(), " on ",
              row_step.device());
  TORCH_CHECK(
      step.dim() == 1 && step.size(0) == 1 && step.scalar_type() == at::kLong && step.device() == weight.device(), op,
      ": step must be an int64 [1] tensor on ", weight.device(), ", got ", step.scalar_type(), " ", step.sizes(),
      " on ", step.device());

  TORCH_CHECK(
      hparams.device().is_cpu() && hparams.scalar_type() == at::kDouble && hparams.dim() == 1 && hparams.size(0) == 5,
      op, ": hparams must be a float64 CPU tensor [5] (lr, beta1, beta2, eps, weight_decay), got ",
      hparams.scalar_type(), " ", hparams.sizes(), " on ", hparams.device());
  const auto h = hparams.contiguous();
  const double* v = h.const_data_ptr<double>();
  TableOptimParams p{v[0], v[1], v[2], v[3], v[4]};
  TORCH_CHECK(std::isfinite(p.lr) && p.lr >= 0.0, op, ": lr must be finite and >= 0, got ", p.lr);
  TORCH_CHECK(p.beta1 >= 0.0 && p.beta1 < 1.0, op, ": beta1 must lie in [0, 1), got ", p.beta1);
  TORCH_CHECK(p.beta2 >= 0.0 && p.beta2 < 1.0, op, ": beta2 must lie in [0, 1), got ", p.beta2);
  TORCH_CHECK(std::isfinite(p.eps) && p.eps >= 0.0, op, ": eps must be finite and >= 0, got ", p.eps);
  TORCH_CHECK(std::isfinite(p.weight_decay) && p.weight_decay >= 0.0, op,
              ": weight_decay must be finite and >= 0, got ", p.weight_decay);
  TORCH_CHECK(seed < 0 || t == at::kBFloat16, op, ": stochastic rounding (seed >= 0) is for bfloat16 weights, got a ",
              t, " weight with seed ", seed);
  return {o, p, seed >= 0, (adam || partial) && momentum1.scalar_type() == at::kBFloat16};
}

// rows [U] int64/int32 and grads [U, d_head] (the weight's dtype or float32) of table_update.
inline void check_table_update_rows(const char* op, const at::Tensor& weight, const at::Tensor& rows,
                                    const at::Tensor& grads) {
  TORCH_CHECK(rows.dim() == 1, op, ": rows must be [U], got shape ", rows.sizes());
  TORCH_CHECK(rows.scalar_type() == at::kLong || rows.scalar_type() == at::kInt, op,
              ": rows must be int64 or int32, got ", rows.scalar_type());
  const int64_t U = rows.size(0), D = weight.size(1);
  TORCH_CHECK(grads.dim() == 2 && grads.size(0) == U && grads.size(1) == D, op, ": grads must be [U=", U,
              ", d_head=", D, "], got shape ", grads.sizes());
  TORCH_CHECK(grads.scalar_type() == weight.scalar_type() || grads.scalar_type() == at::kFloat, op, ": grads must be ",
              weight.scalar_type(), " (the weight's dtype) or float32, got ", grads.scalar_type());
  TORCH_CHECK(rows.device() == weight.device() && grads.device() == weight.device(), op,
              ": rows and grads must be on the weight's device ", weight.device(), ", got ", rows.device(), " and ",
              grads.device());
}

// Calls run(opt_tag, mom_tag) with the optimizer as a compile-time constant
// (std::integral_constant<TableOptimizer, O>) and a value of the [R, d] moments' dtype (acc_t or
// bfloat16; the optimizers without such moments always get acc_t), for the CPU and CUDA adapters.
template <typename acc_t, typename F>
void dispatch_table_optimizer(const TableUpdateArgs& a, const F& run) {
  const TableOptimizer o = a.optimizer;
  using TO = TableOptimizer;
  auto with_mom = [&](auto opt_tag) {
    if (a.moments_bf16) {
      run(opt_tag, c10::BFloat16{});
    } else {
      run(opt_tag, acc_t{});
    }
  };
  switch (o) {
    case TO::kSgd:
      run(std::integral_constant<TO, TO::kSgd>{}, acc_t{});
      break;
    case TO::kAdam:
      with_mom(std::integral_constant<TO, TO::kAdam>{});
      break;
    case TO::kPartialRowwiseAdam:
      with_mom(std::integral_constant<TO, TO::kPartialRowwiseAdam>{});
      break;
    case TO::kRowwiseAdagrad:
      run(std::integral_constant<TO, TO::kRowwiseAdagrad>{}, acc_t{});
      break;
  }
}

// row_ids of a cached table: [weight.size(0)] int64 on the weight's device; the row each slot holds.
inline const int64_t* check_row_ids(const char* op, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& row_ids) {
  if (!row_ids.has_value()) return nullptr;
  const at::Tensor& r = *row_ids;
  TORCH_CHECK(r.dim() == 1 && r.size(0) == weight.size(0) && r.scalar_type() == at::kLong && r.is_contiguous(), op,
              ": row_ids must be contiguous int64 [", weight.size(0), "] (the table row of every weight row), got ",
              r.scalar_type(), " ", r.sizes());
  TORCH_CHECK(r.device() == weight.device(), op, ": row_ids must be on the weight's device ", weight.device(), ", got ",
              r.device());
  return r.const_data_ptr<int64_t>();
}

}  // namespace engram
