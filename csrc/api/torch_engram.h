// The Engram ops for LibTorch C++ programs: typed calls through the dispatcher, so they run the
// same kernels and the same C++ autograd Functions as Python (differentiable where the schema in
// csrc/library.cpp says so). Link TorchEngram::torch_engram (find_package(TorchEngram)); loading
// that library registers the ops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string>

namespace torch_engram {

namespace detail {
template <typename Signature>
const c10::TypedOperatorHandle<Signature>& op(const char* name) {
  // One handle per (name, signature); looked up once.
  static const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
  return handle;
}
}  // namespace detail

// Row ids [L, B, T, H] of every Engram layer (docs/SPEC.md section 2).
inline at::Tensor ngram_hash(const at::Tensor& ids, const std::optional<at::Tensor>& lut, int64_t num_ids,
                             const at::Tensor& multipliers, const at::Tensor& primes, const at::Tensor& offsets,
                             int64_t pad_id, const std::optional<at::Tensor>& doc_start = std::nullopt,
                             at::ScalarType out_dtype = at::kLong, bool oov_to_pad = false) {
  using Sig =
      at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, int64_t, const at::Tensor&, const at::Tensor&,
                 const at::Tensor&, int64_t, const std::optional<at::Tensor>&, at::ScalarType, bool);
  return detail::op<Sig>("engram::ngram_hash")
      .call(ids, lut, num_ids, multipliers, primes, offsets, pad_id, doc_start, out_dtype, oov_to_pad);
}

// e [..., H * d_head] of table rows [..., H]; differentiable in table (section 3).
inline at::Tensor multihead_gather(const at::Tensor& table, const at::Tensor& rows, bool sparse_grad = false) {
  using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, bool);
  return detail::op<Sig>("engram::multihead_gather").call(table, rows, sparse_grad);
}

// The gate u = alpha * v on the fused K/V projection output kv [..., (M + 1) * D] (section 4).
inline at::Tensor engram_gate(const at::Tensor& hidden, const at::Tensor& kv, const at::Tensor& weight, double eps) {
  using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double);
  return detail::op<Sig>("engram::engram_gate").call(hidden, kv, weight, eps);
}

// u + SiLU(conv(RMSNorm(u))), causal and depthwise (section 5).
inline at::Tensor short_conv(const at::Tensor& u, const at::Tensor& norm_weight, const at::Tensor& conv_weight,
                             int64_t dilation, double eps, bool activation = true) {
  using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double, bool);
  return detail::op<Sig>("engram::short_conv").call(u, norm_weight, conv_weight, dilation, eps, activation);
}

// multihead_gather whose backward updates weight and optimizer state in place (section 7).
inline at::Tensor multihead_gather_fused(const at::Tensor& weight, const at::Tensor& rows, const at::Tensor& momentum1,
                                         const at::Tensor& momentum2, const at::Tensor& row_step,
                                         const at::Tensor& step, const at::Tensor& hparams,
                                         const std::string& optimizer, int64_t seed = -1,
                                         const std::optional<at::Tensor>& row_ids = std::nullopt) {
  using Sig =
      at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                 const at::Tensor&, const at::Tensor&, c10::string_view, int64_t, const std::optional<at::Tensor>&);
  return detail::op<Sig>("engram::multihead_gather_fused")
      .call(weight, rows, momentum1, momentum2, row_step, step, hparams, optimizer, seed, row_ids);
}

}  // namespace torch_engram
