// Per-token n-gram hashing of the CUDA kernel (docs/SPEC.md section 2), torch-free so GoogleTest
// runs the very same code on the CPU and compares it with the CPU op bit for bit.
#pragma once

#include <cstdint>

#include "engram/common.h"
#include "engram/hash.h"

namespace engram {

// Compressed ids of the window t, t-1, ..., t-N+1 of one sequence into xs[0..N): the pad id
// before the sequence start and, with doc_start, from the first shift that crosses a document
// start onwards (the shift that reads a document's first token still reads it). Ids outside
// [0, num_ids) read as pad_id; the return value is the first such position s, or -1.
template <typename id_t>
ENGRAM_HOST_DEVICE int64_t ngram_window(const id_t* seq, const bool* doc_start, int64_t t, int N, const int64_t* lut,
                                        int64_t num_ids, int64_t pad_id, uint64_t* xs) {
  int64_t bad = -1;
  bool crossed = false;
  for (int k = 0; k < N; ++k) {
    const int64_t s = t - k;
    if (s < 0 || crossed) {
      xs[k] = static_cast<uint64_t>(pad_id);
      continue;
    }
    const int64_t raw = static_cast<int64_t>(seq[s]);
    int64_t c = pad_id;
    if (raw < 0 || raw >= num_ids) {
      if (bad < 0) bad = s;
    } else {
      c = lut ? lut[raw] : raw;
    }
    xs[k] = static_cast<uint64_t>(c);
    if (doc_start && doc_start[s]) crossed = true;
  }
  return bad;
}

// Row ids of one layer for one token: out[(k-1)*K + j] = (h_k mod p) + offset for orders
// n = k+1 = 2..N and heads j, h_k the rolling mix of xs[0..k] with multipliers mult[0..N).
template <typename out_t>
ENGRAM_HOST_DEVICE void ngram_rows(const uint64_t* xs, int N, int K, const uint64_t* mult, const FastMod* mods,
                                   const int64_t* offsets, out_t* out) {
  uint64_t h = xs[0] * mult[0];
  for (int k = 1; k < N; ++k) {
    h = mix_step(h, xs[k], mult[k]);
    for (int j = 0; j < K; ++j) {
      const int c = (k - 1) * K + j;
      out[c] = static_cast<out_t>(static_cast<int64_t>(fastmod(h, mods[c])) + offsets[c]);
    }
  }
}

}  // namespace engram
