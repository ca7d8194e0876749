// Argument checks and preparation of ngram_hash shared by the CPU and CUDA adapters (shapes, dtypes, devices;
// never tensor values, so the CUDA path stays free of host synchronisation).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace engram {

inline void check_ngram_hash_args(const at::Tensor& ids, const std::optional<at::Tensor>& lut, int64_t num_ids,
                                  const at::Tensor& multipliers, const at::Tensor& primes, const at::Tensor& offsets,
                                  int64_t pad_id, const std::optional<at::Tensor>& doc_start,
                                  at::ScalarType out_dtype) {
  TORCH_CHECK(ids.dim() == 2, "ngram_hash: ids must be [batch, seq], got shape ", ids.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
              "ngram_hash: ids must be int64 or int32, got ", ids.scalar_type());
  TORCH_CHECK(multipliers.dim() == 2 && multipliers.size(1) >= 2,
              "ngram_hash: multipliers must be [num_layers, max_ngram_size >= 2], got shape ", multipliers.sizes());
  const int64_t L = multipliers.size(0), N = multipliers.size(1);
  TORCH_CHECK(primes.dim() == 2 && primes.size(0) == L && primes.size(1) > 0 && primes.size(1) % (N - 1) == 0,
              "ngram_hash: primes must be [num_layers=", L, ", (max_ngram_size-1)*n_head] with max_ngram_size=", N,
              ", got shape ", primes.sizes());
  TORCH_CHECK(offsets.sizes() == primes.sizes(), "ngram_hash: offsets must have the shape of primes ", primes.sizes(),
              ", got ", offsets.sizes());
  for (const auto* t : {&multipliers, &primes, &offsets}) {
    TORCH_CHECK(t->scalar_type() == at::kLong, "ngram_hash: multipliers, primes and offsets must be int64, got ",
                t->scalar_type());
    TORCH_CHECK(t->device() == ids.device(), "ngram_hash: multipliers, primes and offsets must be on ids' device ",
                ids.device(), ", got ", t->device());
  }
  TORCH_CHECK(num_ids >= 1, "ngram_hash: num_ids must be >= 1, got ", num_ids);
  if (lut.has_value()) {
    TORCH_CHECK(lut->dim() == 1 && lut->size(0) == num_ids, "ngram_hash: lut must be [num_ids=", num_ids,
                "], got shape ", lut->sizes());
    TORCH_CHECK(lut->scalar_type() == at::kLong, "ngram_hash: lut must be int64, got ", lut->scalar_type());
    TORCH_CHECK(lut->device() == ids.device(), "ngram_hash: lut must be on ids' device ", ids.device(), ", got ",
                lut->device());
  }
  // The compressed vocabulary is at most num_ids ids (a LUT maps num_ids raw ids onto it).
  TORCH_CHECK(pad_id >= 0 && pad_id < num_ids, "ngram_hash: pad_id must be a compressed id in [0, num_ids=", num_ids,
              "), got ", pad_id);
  if (doc_start.has_value()) {
    TORCH_CHECK(doc_start->sizes() == ids.sizes(), "ngram_hash: doc_start must have the shape of ids ", ids.sizes(),
                ", got ", doc_start->sizes());
    TORCH_CHECK(doc_start->scalar_type() == at::kBool, "ngram_hash: doc_start must be bool, got ",
                doc_start->scalar_type());
    TORCH_CHECK(doc_start->device() == ids.device(), "ngram_hash: doc_start must be on ids' device ", ids.device(),
                ", got ", doc_start->device());
  }
  TORCH_CHECK(out_dtype == at::kLong || out_dtype == at::kInt, "ngram_hash: out_dtype must be int64 or int32, got ",
              out_dtype);
}

// The arguments of one call, checked and made contiguous once for either backend, with the output
// [L, B, T, H] allocated on ids' device. A CUDA adapter sets its device guard before preparing.
struct NgramHashArgs {
  at::Tensor ids, lut, multipliers, primes, offsets, doc_start, out;  // lut, doc_start undefined if absent
  int64_t L, N, H;
};

inline NgramHashArgs prepare_ngram_hash(const at::Tensor& ids, const std::optional<at::Tensor>& lut, int64_t num_ids,
                                        const at::Tensor& multipliers, const at::Tensor& primes,
                                        const at::Tensor& offsets, int64_t pad_id,
                                        const std::optional<at::Tensor>& doc_start, at::ScalarType out_dtype) {
  check_ngram_hash_args(ids, lut, num_ids, multipliers, primes, offsets, pad_id, doc_start, out_dtype);
  NgramHashArgs a;
  a.L = multipliers.size(0);
  a.N = multipliers.size(1);
  a.H = primes.size(1);
  // The kernels keep a token's window of up to 16 ids in registers.
  TORCH_CHECK(a.N <= 16, "ngram_hash: max_ngram_size must be <= 16, got ", a.N);
  a.ids = ids.contiguous();  // int32 ids are read as they are: no widened copy
  if (lut.has_value()) a.lut = lut->contiguous();
  a.multipliers = multipliers.contiguous();
  a.primes = primes.contiguous();
  a.offsets = offsets.contiguous();
  if (doc_start.has_value()) a.doc_start = doc_start->contiguous();
  a.out = at::empty({a.L, ids.size(0), ids.size(1), a.H}, ids.options().dtype(out_dtype));
  return a;
}

}  // namespace engram
