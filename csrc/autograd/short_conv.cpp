// Autograd of short_conv: a torch::autograd::Function over the short_conv_forward and
// short_conv_backward ops (called through the dispatcher, so every backend and fake tensors
// share it), plus the CompositeExplicitAutograd kernel used when no gradient is recorded.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace engram {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> conv_forward_op(const at::Tensor& u, const at::Tensor& norm_weight,
                                                   const at::Tensor& conv_weight, int64_t dilation, double eps,
                                                   bool activation) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("engram::_short_conv_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, int64_t, double, bool)>();
  return op.call(u, norm_weight, conv_weight, dilation, eps, activation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_backward_op(const at::Tensor& grad_out, const at::Tensor& u,
                                                                const at::Tensor& norm_weight,
                                                                const at::Tensor& conv_weight, const at::Tensor& rstd,
                                                                int64_t dilation, bool activation) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("engram::_short_conv_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, const at::Tensor&, int64_t, bool)>();
  return op.call(grad_out, u, norm_weight, conv_weight, rstd, dilation, activation);
}

class ShortConvFunction : public torch::autograd::Function<ShortConvFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& u, const at::Tensor& norm_weight,
                            const at::Tensor& conv_weight, int64_t dilation, double eps, bool activation) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, rstd] = conv_forward_op(u, norm_weight, conv_weight, dilation, eps, activation);
    ctx->save_for_backward({u, norm_weight, conv_weight, rstd});
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["activation"] = activation;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    auto [grad_u, grad_norm_weight, grad_conv_weight] =
        conv_backward_op(grad_outputs[0], saved[0], saved[1], saved[2], saved[3], ctx->saved_data["dilation"].toInt(),
                         ctx->saved_data["activation"].toBool());
    return {grad_u, grad_norm_weight, grad_conv_weight, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor short_conv_autograd(const at::Tensor& u, const at::Tensor& norm_weight, const at::Tensor& conv_weight,
                               int64_t dilation, double eps, bool activation) {
  return ShortConvFunction::apply(u, norm_weight, conv_weight, dilation, eps, activation);
}

at::Tensor short_conv_no_grad(const at::Tensor& u, const at::Tensor& norm_weight, const at::Tensor& conv_weight,
                              int64_t dilation, double eps, bool activation) {
  return std::get<0>(conv_forward_op(u, norm_weight, conv_weight, dilation, eps, activation));
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, Autograd, m) { m.impl("short_conv", &short_conv_autograd); }

TORCH_LIBRARY_IMPL(engram, CompositeExplicitAutograd, m) { m.impl("short_conv", &short_conv_no_grad); }

}  // namespace engram
