// Autograd kernel of multihead_gather: a torch::autograd::Function whose backward calls the dense
// or the row-sparse backward op through the dispatcher, so every backend (CPU, CUDA, fake) and
// every caller (Python, torch.compile, LibTorch C++) shares one differentiation rule.
//
// The forward re-dispatches the same public op below the autograd keys (the torchvision pattern),
// so a backend registers one kernel per op under the public schema, and inference_mode, no-grad
// calls and fake tensors reach that kernel (or the fake kernel) directly without this file.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

namespace engram {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_gather(const at::Tensor& table, const at::Tensor& rows, bool sparse_grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("engram::multihead_gather", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, bool)>();
  return op.call(table, rows, sparse_grad);
}

at::Tensor call_backward(const at::Tensor& grad_e, const at::Tensor& rows, c10::SymInt num_rows) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("engram::_multihead_gather_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt)>();
  return op.call(grad_e, rows, std::move(num_rows));
}

std::tuple<at::Tensor, at::Tensor> call_backward_sparse(const at::Tensor& grad_e, const at::Tensor& rows) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("engram::_multihead_gather_backward_sparse", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&)>();
  return op.call(grad_e, rows);
}

class MultiheadGather : public torch::autograd::Function<MultiheadGather> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& table, const at::Tensor& rows, bool sparse_grad) {
    at::Tensor e;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      e = call_gather(table, rows, sparse_grad);  // checks the arguments before any use below
    }
    // Sizes as SymInts so traced graphs (torch.compile with dynamic shapes) keep them symbolic.
    ctx->saved_data["num_rows"] = table.sym_size(0);
    ctx->saved_data["d_head"] = table.sym_size(1);
    ctx->saved_data["sparse_grad"] = sparse_grad;
    ctx->save_for_backward({rows});
    return e;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor rows = ctx->get_saved_variables()[0];
    const at::Tensor& grad_e = grad_outputs[0];
    c10::SymInt num_rows = ctx->saved_data["num_rows"].toSymInt();
    at::Tensor grad_table;
    if (ctx->saved_data["sparse_grad"].toBool()) {
      // Row-sparse gradient: only the U touched rows, already sorted and unique, hence coalesced,
      // which torch.optim.SparseAdam and gradient accumulation rely on.
      auto [unique_rows, values] = call_backward_sparse(grad_e, rows);
      c10::SymInt d_head = ctx->saved_data["d_head"].toSymInt();
      grad_table = at::_sparse_coo_tensor_unsafe_symint(unique_rows.unsqueeze(0), values, {num_rows, d_head},
                                                        values.options().layout(at::kSparse),
                                                        /*is_coalesced=*/true);
    } else {
      grad_table = call_backward(grad_e, rows, std::move(num_rows));
    }
    return {grad_table, at::Tensor(), at::Tensor()};
  }
};

at::Tensor multihead_gather_autograd(const at::Tensor& table, const at::Tensor& rows, bool sparse_grad) {
  return MultiheadGather::apply(table, rows, sparse_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, Autograd, m) { m.impl("multihead_gather", &multihead_gather_autograd); }

}  // namespace engram
