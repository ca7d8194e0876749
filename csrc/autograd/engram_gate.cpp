// Autograd of engram_gate: a torch::autograd::Function over the engram_gate_forward and
// engram_gate_backward ops (called through the dispatcher, so every backend and fake tensors
// share it), plus the CompositeExplicitAutograd kernel used when no gradient is recorded.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace engram {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_forward_op(const at::Tensor& hidden,
                                                                                       const at::Tensor& kv,
                                                                                       const at::Tensor& weight,
                                                                                       double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("engram::_engram_gate_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return op.call(hidden, kv, weight, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_backward_op(const at::Tensor& grad_out, const at::Tensor& hidden,
                                                                const at::Tensor& kv, const at::Tensor& weight,
                                                                const at::Tensor& alpha, const at::Tensor& r_x,
                                                                const at::Tensor& r_k, const at::Tensor& raw) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("engram::_engram_gate_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(grad_out, hidden, kv, weight, alpha, r_x, r_k, raw);
}

class EngramGateFunction : public torch::autograd::Function<EngramGateFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& kv,
                            const at::Tensor& weight, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, alpha, r_x, r_k, raw] = gate_forward_op(hidden, kv, weight, eps);
    ctx->save_for_backward({hidden, kv, weight, alpha, r_x, r_k, raw});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    auto [grad_hidden, grad_kv, grad_weight] =
        gate_backward_op(grad_outputs[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[6]);
    return {grad_hidden, grad_kv, grad_weight, at::Tensor()};
  }
};

at::Tensor engram_gate_autograd(const at::Tensor& hidden, const at::Tensor& kv, const at::Tensor& weight, double eps) {
  return EngramGateFunction::apply(hidden, kv, weight, eps);
}

at::Tensor engram_gate_no_grad(const at::Tensor& hidden, const at::Tensor& kv, const at::Tensor& weight, double eps) {
  return std::get<0>(gate_forward_op(hidden, kv, weight, eps));
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, Autograd, m) { m.impl("engram_gate", &engram_gate_autograd); }

TORCH_LIBRARY_IMPL(engram, CompositeExplicitAutograd, m) { m.impl("engram_gate", &engram_gate_no_grad); }

}  // namespace engram
