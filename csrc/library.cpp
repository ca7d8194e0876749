// The one contract file: every engram op schema. A schema change touches this file, the fake
// kernel in python/torch_engram/_fake.py, and the tests.
#include <torch/library.h>

TORCH_LIBRARY(engram, m) {
  // Row ids of every Engram layer: ids [B, T] -> rows [L, B, T, H] (ENGRAM.md section 2).
  // lut: compression LUT of length num_ids (None: ids are already compressed, < num_ids).
  // multipliers [L, N], primes and offsets [L, H] (order-major, head-minor), pad_id compressed.
  // doc_start [B, T] bool: a shift that crosses a document start reads pad_id.
  // oov_to_pad: map ids outside [0, num_ids) to pad_id instead of raising.
  m.def(
      "ngram_hash(Tensor ids, Tensor? lut, int num_ids, Tensor multipliers, Tensor primes, "
      "Tensor offsets, int pad_id, Tensor? doc_start=None, ScalarType out_dtype=long, "
      "bool oov_to_pad=False) -> Tensor");

  // e[..., h*d_head:(h+1)*d_head] = table[rows[..., h]] (ENGRAM.md section 3). Differentiable in
  // table; sparse_grad makes the table gradient a coalesced sparse COO tensor.
  m.def("multihead_gather(Tensor table, Tensor rows, bool sparse_grad=False) -> Tensor");
  // Dense table gradient [num_rows, d_head], deterministic (no order-dependent float sums).
  m.def("multihead_gather_backward(Tensor grad_e, Tensor rows, SymInt num_rows) -> Tensor");
  // Row-sparse table gradient: (sorted unique rows [U] int64, summed gradients [U, d_head]).
  m.def("multihead_gather_backward_sparse(Tensor grad_e, Tensor rows) -> (Tensor, Tensor)");
  // -- gather/scatter internals go here --

  // Context-aware gate (ENGRAM.md section 4): hidden x [..., M, D], key k [..., M, D] (the M key
  // projections), value v [..., D], folded RMSNorm gains w = w_q * w_k [M, D] float32, RMSNorm
  // eps. Returns u = alpha * v, [..., M, D] in x's dtype. Differentiable in x, k, v and w.
  m.def("engram_gate(Tensor hidden, Tensor key, Tensor value, Tensor weight, float eps) -> Tensor");
  // -- gate internals (forward with saved statistics, backward) go here --

  // Short causal convolution (ENGRAM.md section 5): u [B, T, M, D], per-branch RMSNorm gains
  // norm_weight [M, D], depthwise conv weight [M * D, kernel_size] (channel m * D + d), dilation,
  // RMSNorm eps. Returns u + SiLU(conv(RMSNorm(u))) (no SiLU when activation is False).
  m.def(
      "short_conv(Tensor u, Tensor norm_weight, Tensor conv_weight, int dilation, float eps, "
      "bool activation=True) -> Tensor");
  // -- short_conv internals go here --
}
