// Autograd and ADInplaceOrView kernels of sparse_adam_step. The op is not differentiable; these
// make it behave like torch's own in-place optimizer updates: it refuses to run on a table that
// autograd is tracking, and it bumps the version counters of everything it writes, so a backward
// that saved the table (or its moments) before the update fails loudly instead of using new values.
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

namespace engram {
namespace {

using SparseAdamFn = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&, double, double, double, double, double);

const c10::TypedOperatorHandle<SparseAdamFn>& sparse_adam_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("engram::sparse_adam_step", "").typed<SparseAdamFn>();
  return op;
}

void sparse_adam_step_autograd(const at::Tensor& table, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                               const at::Tensor& row_step, const at::Tensor& rows, const at::Tensor& grads,
                               double lr, double beta1, double beta2, double eps, double weight_decay) {
  if (at::GradMode::is_enabled()) {
    for (const auto* t : {&table, &exp_avg, &exp_avg_sq, &grads}) {
      TORCH_CHECK(!t->requires_grad(),
                  "sparse_adam_step: updates the table in place and is not differentiable; call it under "
                  "torch.no_grad() (the optimizers in torch_engram.optim do), got an argument that requires grad "
                  "with grad mode enabled");
    }
  }
  at::AutoDispatchBelowAutograd guard;
  sparse_adam_op().call(table, exp_avg, exp_avg_sq, row_step, rows, grads, lr, beta1, beta2, eps, weight_decay);
}

void sparse_adam_step_inplace(const at::Tensor& table, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                              const at::Tensor& row_step, const at::Tensor& rows, const at::Tensor& grads,
                              double lr, double beta1, double beta2, double eps, double weight_decay) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    sparse_adam_op().call(table, exp_avg, exp_avg_sq, row_step, rows, grads, lr, beta1, beta2, eps, weight_decay);
  }
  for (const auto* t : {&table, &exp_avg, &exp_avg_sq, &row_step}) t->unsafeGetTensorImpl()->bump_version();
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, Autograd, m) { m.impl("sparse_adam_step", &sparse_adam_step_autograd); }
TORCH_LIBRARY_IMPL(engram, ADInplaceOrView, m) { m.impl("sparse_adam_step", &sparse_adam_step_inplace); }

}  // namespace engram
