// Autograd of the table optimizer ops.
//
// multihead_gather_fused: a torch::autograd::Function whose backward calls
// multihead_gather_fused_update through the dispatcher, so the table learns inside backward on
// every backend and for every caller (Python, torch.compile, LibTorch C++), and no gradient
// tensor of the table ever exists. Weight and state are held as plain values, not saved
// variables: the update bumps their version counters, and a table gathered twice in one forward
// must still unpack its second backward after the first one updated it.
//
// table_update and multihead_gather_fused_update are not differentiable: like torch's in-place
// optimizer updates they refuse to run on tensors autograd is tracking while grad mode is on,
// and bump the version counters of what they write, so a backward that saved the table earlier
// fails loudly instead of reading new values.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace engram {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using T = const at::Tensor&;

using OptT = const std::optional<at::Tensor>&;
using UpdateFn = void(T, T, T, T, T, T, T, T, c10::string_view, int64_t, OptT);
using FusedUpdateFn = void(T, T, T, T, T, T, T, T, c10::string_view, int64_t, OptT);

const c10::TypedOperatorHandle<UpdateFn>& update_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("engram::table_update", "").typed<UpdateFn>();
  return op;
}

const c10::TypedOperatorHandle<FusedUpdateFn>& fused_update_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("engram::_multihead_gather_fused_update", "")
                             .typed<FusedUpdateFn>();
  return op;
}

void refuse_tracked(const char* op, std::initializer_list<const at::Tensor*> ts) {
  if (!at::GradMode::is_enabled()) return;
  for (const auto* t : ts) {
    TORCH_CHECK(!t->requires_grad(), op,
                ": updates the table in place and is not differentiable; call it under torch.no_grad() (EngramTable "
                "does), got an argument that requires grad with grad mode enabled");
  }
}

void bump(std::initializer_list<const at::Tensor*> ts) {
  for (const auto* t : ts) t->unsafeGetTensorImpl()->bump_version();
}

void table_update_autograd(T weight, T m1, T m2, T row_step, T step, T rows, T grads, T hparams,
                           c10::string_view optimizer, int64_t seed, OptT row_ids) {
  refuse_tracked("table_update", {&weight, &m1, &m2, &grads});
  at::AutoDispatchBelowAutograd guard;
  update_op().call(weight, m1, m2, row_step, step, rows, grads, hparams, optimizer, seed, row_ids);
}

void table_update_inplace(T weight, T m1, T m2, T row_step, T step, T rows, T grads, T hparams,
                          c10::string_view optimizer, int64_t seed, OptT row_ids) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    update_op().call(weight, m1, m2, row_step, step, rows, grads, hparams, optimizer, seed, row_ids);
  }
  bump({&weight, &m1, &m2, &row_step, &step});
}

void fused_update_autograd(T grad_e, T rows, T weight, T m1, T m2, T row_step, T step, T hparams,
                           c10::string_view optimizer, int64_t seed, OptT row_ids) {
  refuse_tracked("multihead_gather_fused_update", {&grad_e, &weight, &m1, &m2});
  at::AutoDispatchBelowAutograd guard;
  fused_update_op().call(grad_e, rows, weight, m1, m2, row_step, step, hparams, optimizer, seed, row_ids);
}

void fused_update_inplace(T grad_e, T rows, T weight, T m1, T m2, T row_step, T step, T hparams,
                          c10::string_view optimizer, int64_t seed, OptT row_ids) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    fused_update_op().call(grad_e, rows, weight, m1, m2, row_step, step, hparams, optimizer, seed, row_ids);
  }
  bump({&weight, &m1, &m2, &row_step, &step});
}

at::Tensor call_gather(T weight, T rows) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("engram::multihead_gather", "").typed<at::Tensor(T, T, bool)>();
  return op.call(weight, rows, false);
}

// Every backend's forward: the plain gather (the state only travels to backward).
at::Tensor multihead_gather_fused_forward(T weight, T rows, T, T, T, T, T, c10::string_view, int64_t, OptT) {
  return call_gather(weight, rows);
}

class MultiheadGatherFused : public torch::autograd::Function<MultiheadGatherFused> {
 public:
  static at::Tensor forward(AutogradContext* ctx, T weight, T rows, T m1, T m2, T row_step, T step, T hparams,
                            c10::string_view optimizer, int64_t seed, OptT row_ids) {
    at::Tensor e;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("engram::multihead_gather_fused", "")
                           .typed<at::Tensor(T, T, T, T, T, T, T, c10::string_view, int64_t, OptT)>();
      e = op.call(weight, rows, m1, m2, row_step, step, hparams, optimizer, seed, row_ids);
    }
    ctx->save_for_backward({rows});
    ctx->saved_data["weight"] = weight;
    ctx->saved_data["momentum1"] = m1;
    ctx->saved_data["momentum2"] = m2;
    ctx->saved_data["row_step"] = row_step;
    ctx->saved_data["step"] = step;
    ctx->saved_data["hparams"] = hparams;
    ctx->saved_data["optimizer"] = std::string(optimizer.data(), optimizer.size());
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["row_ids"] = row_ids.has_value() ? c10::IValue(*row_ids) : c10::IValue();
    return e;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor rows = ctx->get_saved_variables()[0];
    const at::Tensor& grad_e = grad_outputs[0];
    if (grad_e.defined()) {
      // The update is not part of any graph, even under backward(create_graph=True).
      at::NoGradGuard no_grad;
      const std::string optimizer = ctx->saved_data["optimizer"].toStringRef();
      fused_update_op().call(grad_e, rows, ctx->saved_data["weight"].toTensor(),
                             ctx->saved_data["momentum1"].toTensor(), ctx->saved_data["momentum2"].toTensor(),
                             ctx->saved_data["row_step"].toTensor(), ctx->saved_data["step"].toTensor(),
                             ctx->saved_data["hparams"].toTensor(), optimizer, ctx->saved_data["seed"].toInt(),
                             ctx->saved_data["row_ids"].toOptional<at::Tensor>());
    }
    // No gradient for anything: the weight has already learnt.
    return variable_list(10);
  }
};

at::Tensor multihead_gather_fused_autograd(T weight, T rows, T m1, T m2, T row_step, T step, T hparams,
                                           c10::string_view optimizer, int64_t seed, OptT row_ids) {
  return MultiheadGatherFused::apply(weight, rows, m1, m2, row_step, step, hparams, optimizer, seed, row_ids);
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, Autograd, m) {
  m.impl("table_update", &table_update_autograd);
  m.impl("_multihead_gather_fused_update", &fused_update_autograd);
  m.impl("multihead_gather_fused", &multihead_gather_fused_autograd);
}
TORCH_LIBRARY_IMPL(engram, ADInplaceOrView, m) {
  m.impl("table_update", &table_update_inplace);
  m.impl("_multihead_gather_fused_update", &fused_update_inplace);
}
TORCH_LIBRARY_IMPL(engram, CompositeExplicitAutograd, m) {
  m.impl("multihead_gather_fused", &multihead_gather_fused_forward);
}

}  // namespace engram
