// The one contract file: every engram op schema. Internal ops (the forwards with saved
// statistics and the backwards that the C++ autograd Functions call) carry a leading underscore,
// as torchvision's do; the others are the public API. A schema change touches this file, the fake
// kernel in python/torch_engram/_fake.py, and the tests.
#include <torch/library.h>

TORCH_LIBRARY(engram, m) {
  // Row ids of every Engram layer: ids [B, T] -> rows [L, B, T, H] (docs/SPEC.md section 2).
  // lut: compression LUT of length num_ids (None: ids are already compressed, < num_ids).
  // multipliers [L, N], primes and offsets [L, H] (order-major, head-minor), pad_id compressed.
  // doc_start [B, T] bool: a shift that crosses a document start reads pad_id.
  // oov_to_pad: map ids outside [0, num_ids) to pad_id instead of raising.
  m.def(
      "ngram_hash(Tensor ids, Tensor? lut, int num_ids, Tensor multipliers, Tensor primes, "
      "Tensor offsets, int pad_id, Tensor? doc_start=None, ScalarType out_dtype=long, "
      "bool oov_to_pad=False) -> Tensor");

  // e[..., h*d_head:(h+1)*d_head] = table[rows[..., h]] (docs/SPEC.md section 3). Differentiable in
  // table; sparse_grad makes the table gradient a coalesced sparse COO tensor.
  m.def("multihead_gather(Tensor table, Tensor rows, bool sparse_grad=False) -> Tensor");
  // Dense table gradient [num_rows, d_head], deterministic (no order-dependent float sums).
  m.def("_multihead_gather_backward(Tensor grad_e, Tensor rows, SymInt num_rows) -> Tensor");
  // Row-sparse table gradient: (sorted unique rows [U] int64, summed gradients [U, d_head]).
  m.def("_multihead_gather_backward_sparse(Tensor grad_e, Tensor rows) -> (Tensor, Tensor)");
  // -- gather/scatter internals go here --
  // The gather of an FP8 table (docs/SPEC.md section 3): table [num_rows, d_head] float8_e4m3fn
  // and scale [num_rows, d_head / 32] float8_e8m0fnu (or its uint8 bytes), one power-of-two scale
  // per 32 values (the DeepSeek-V4.1 layout); e = table[rows] * scale, dequantised exactly into
  // out_dtype (float32 or bfloat16). Not differentiable: FP8 tables are inference storage.
  m.def("multihead_gather_fp8(Tensor table, Tensor scale, Tensor rows, ScalarType out_dtype) -> Tensor");

  // Context-aware gate (docs/SPEC.md section 4): hidden x [..., M, D]; kv [..., (M + 1) * D], the
  // fused K/V projection output as it comes from its GEMM (the M keys first, then the value
  // shared by the branches), read in place; folded RMSNorm gains w = w_q * w_k [M, D] float32;
  // RMSNorm eps. Returns u = alpha * v, [..., M, D] in x's dtype. Differentiable in x, kv and w;
  // the kv gradient comes back as one [..., (M + 1) * D] tensor, the layout the GEMM's backward
  // takes. kv shares hidden's dtype; weight is float32 or hidden's dtype.
  m.def("engram_gate(Tensor hidden, Tensor kv, Tensor weight, float eps) -> Tensor");
  // -- gate internals (forward with saved statistics, backward) go here --
  // Forward with the statistics the backward needs, all [..., M] in the accumulation dtype
  // (float64 for float64 hidden, float32 otherwise): alpha, the RMS reciprocals r_x and r_k,
  // and raw = sum(x * w * k), so s = raw * r_x * r_k / sqrt(D).
  m.def(
      "_engram_gate_forward(Tensor hidden, Tensor kv, Tensor weight, float eps) -> (Tensor out, "
      "Tensor alpha, Tensor r_x, Tensor r_k, Tensor raw)");
  // Gradients w.r.t. hidden, kv (input dtype) and weight (weight's dtype); grad_weight is summed
  // in a fixed order (bitwise reproducible).
  m.def(
      "_engram_gate_backward(Tensor grad_out, Tensor hidden, Tensor kv, Tensor weight, "
      "Tensor alpha, Tensor r_x, Tensor r_k, Tensor raw) -> (Tensor grad_hidden, Tensor grad_kv, "
      "Tensor grad_weight)");

  // Short causal convolution (docs/SPEC.md section 5): u [B, T, M, D], per-branch RMSNorm gains
  // norm_weight [M, D], depthwise conv weight [M * D, kernel_size] (channel m * D + d; tap i reads
  // position t - (kernel_size - 1 - i) * dilation, nn.Conv1d's causal layout; t < 0 reads zero),
  // dilation, RMSNorm eps. Returns u + SiLU(conv(RMSNorm(u))) (no SiLU when activation is False).
  // Weights float32 or u's dtype. Differentiable in u and both weights.
  m.def(
      "short_conv(Tensor u, Tensor norm_weight, Tensor conv_weight, int dilation, float eps, "
      "bool activation=True) -> Tensor");
  // -- short_conv internals go here --
  // Forward that also returns the RMSNorm reciprocals rstd [B, T, M] (accumulation dtype); the
  // backward recomputes the normalised input and the conv from them.
  m.def(
      "_short_conv_forward(Tensor u, Tensor norm_weight, Tensor conv_weight, int dilation, float eps, "
      "bool activation=True) -> (Tensor out, Tensor rstd)");
  // Gradients w.r.t. u (u's dtype), norm_weight and conv_weight (their dtypes), weight
  // gradients summed in a fixed order (bitwise reproducible).
  m.def(
      "_short_conv_backward(Tensor grad_out, Tensor u, Tensor norm_weight, Tensor conv_weight, Tensor rstd, "
      "int dilation, bool activation) -> (Tensor grad_u, Tensor grad_norm_weight, Tensor grad_conv_weight)");

  // ---- Table optimizer ops (docs/SPEC.md section 7) ----
  // State of a table [R, d_head] under each optimizer (unused slots are empty [0] tensors):
  //   sgd                   momentum1 [0], momentum2 [0], row_step [0]
  //   adam                  momentum1 [R, d_head], momentum2 [R, d_head], row_step int32 [R]
  //   partial_rowwise_adam  momentum1 [R, d_head], momentum2 [R], row_step int32 [R]
  //   rowwise_adagrad       momentum1 [R] (the accumulator), momentum2 [0], row_step [0]
  // [R, d_head] moments are the weight's maths dtype (float32; float64 for float64 weights) or
  // bfloat16; per-row state is the maths dtype. step int64 [1] counts the table's updates (it
  // seeds stochastic rounding). hparams float64 CPU [5] = (lr, beta1, beta2, eps, weight_decay),
  // read at each call, so a learning-rate schedule that writes it needs no recompilation.
  // seed >= 0 rounds bfloat16 weights stochastically (deterministic given seed, step, row and
  // column); seed < 0 rounds to nearest. Maths in engram/table_optim.h; rows not updated keep
  // weight and state (lazy), and row-wise bias correction uses each row's own row_step.

  // One update of the listed rows: rows [U] strictly increasing in [0, R) (the sorted output of
  // multihead_gather_backward_sparse or of a coalesced sparse gradient), grads [U, d_head] in the
  // weight's dtype or float32.
  m.def(
      "table_update(Tensor(a!) weight, Tensor(b!) momentum1, Tensor(c!) momentum2, Tensor(d!) row_step, "
      "Tensor(e!) step, Tensor rows, Tensor grads, Tensor hparams, str optimizer, int seed, Tensor? row_ids=None) -> "
      "()");
  // The fused backward of multihead_gather: sorts the lookups, sums each touched row's gradient
  // in lookup order (fp32 accumulation, fp64 for float64) and updates the row and its state,
  // with no gradient tensor formed. grad_e [..., H * d_head] in the weight's dtype, rows [..., H].
  m.def(
      "_multihead_gather_fused_update(Tensor grad_e, Tensor rows, Tensor(a!) weight, Tensor(b!) momentum1, "
      "Tensor(c!) momentum2, Tensor(d!) row_step, Tensor(e!) step, Tensor hparams, str optimizer, int seed, "
      "Tensor? row_ids=None) -> ()");
  // row_ids [R] (optional): the table row that each weight row holds, when the weight is a cache of
  // a larger table; stochastic rounding draws its bits for that row, so a cached table rounds as
  // the same table on the device would.
  // multihead_gather whose backward is multihead_gather_fused_update on the same weight and state:
  // the table learns inside backward and gets no gradient (weight.grad stays None). The forward
  // reads the state tensors only to hand them to backward. A weight that does not require grad
  // is not updated (frozen).
  m.def(
      "multihead_gather_fused(Tensor weight, Tensor rows, Tensor momentum1, Tensor momentum2, Tensor row_step, "
      "Tensor step, Tensor hparams, str optimizer, int seed, Tensor? row_ids=None) -> Tensor");
  // ---- end of table optimizer ops ----

  // ---- row cache of host- and file-placed tables (docs/SPEC.md section 3) ----
  // Brings the rows of one step into the cache: rows [..., H] of a table whose records live in
  // store [R, record_bytes] (uint8; each record holds the row's weight and optimizer state at
  // field_offsets), cached in the fields `cache` ([S, ...] each). Misses evict the slots not
  // pinned (last stamp < keep_from), LRU (lru_links: the slots' order, [S + 1, 2]) or LFU, writing
  // them back first. Returns the slot of
  // every lookup ([..., H] int64); stats [4] accumulates hits, misses, evictions, bytes moved.
  // With flag_offset >= 0, a record whose byte at flag_offset is 0 has never been written: its slot
  // is initialised on the row's first fetch (weight, the first field, init_std * N(0, 1) from a
  // counter-based generator of (init_seed, row); the other fields zero), and the record is written
  // and flagged when the row is written back.
  m.def(
      "_row_cache_fetch(Tensor rows, Tensor(a!) slot_of_row, Tensor(b!) slot_row, Tensor(c!) slot_meta, "
      "Tensor(g!) lru_links, Tensor(d!) store, Tensor(e!)[] cache, int[] field_offsets, int stamp, int keep_from, str "
      "policy, "
      "Tensor(f!) stats, int flag_offset, float init_std, int init_seed) -> Tensor");
  // Writes every cached row back to its record (and flags it written when flag_offset >= 0).
  m.def(
      "_row_cache_flush(Tensor slot_row, Tensor(a!) store, Tensor[] cache, int[] field_offsets, int flag_offset) -> "
      "()");
}
