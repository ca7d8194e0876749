// Token-range kernels of the CPU ngram_hash op, shared by the adapter (ngram_hash.cpp) and the
// x86 SIMD kernels (ngram_hash_x86.cpp). Torch-free; the instruction set is picked per call.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace engram::cpu {

struct HashArgs {
  const int64_t* x;    // raw ids [B, T] when int64, else nullptr
  const int32_t* x32;  // raw ids [B, T] when int32, else nullptr
  int64_t B, T, L, N, H;
  const int64_t* lut;  // nullptr: ids are already compressed
  int64_t num_ids;
  const uint64_t* m;      // [L, N]
  const uint64_t* p;      // [L, H]
  const uint64_t* magic;  // [L, H], Barrett constants of p (portable kernel)
  const int64_t* off;     // [L, H]
  int64_t pad_id;
  const bool* doc_start;  // nullptr: no document boundaries
  bool oov_to_pad;
};

// Constants of the SIMD kernels, heads padded to whole chunks of kChunk (padding lanes have
// inv = 0, p = 1, offset 0 and are never stored). Built only when every prime satisfies
// dmod_exact (engram/hash.h).
struct SimdPlan {
  static constexpr int64_t kChunk = 16;
  int64_t chunks = 0;                // ceil(H / kChunk)
  std::vector<double> inv;           // [L, chunks * kChunk] 1 / p
  std::vector<int32_t> p;            // [L, chunks * kChunk]
  std::vector<int32_t> p_avx2;       // p in the AVX2 kernel's lane order (see ngram_hash_x86.cpp)
  std::vector<int32_t> off32;        // [L, chunks * kChunk] (int32 output only)
  std::vector<int64_t> order_lane;   // [chunks * kChunk] n - 1 for a head of order n
};

// Plan of a call whose primes all satisfy dmod_exact and whose offsets, for int32 output, end
// below 2^31.
inline SimdPlan make_simd_plan(const HashArgs& a) {
  constexpr int64_t kC = SimdPlan::kChunk;
  SimdPlan s;
  const int64_t L = a.L, H = a.H, K = H / (a.N - 1);
  s.chunks = (H + kC - 1) / kC;
  const int64_t HP = s.chunks * kC;
  s.inv.assign(L * HP, 0.0);
  s.p.assign(L * HP, 1);
  s.p_avx2.assign(L * HP, 1);
  s.off32.assign(L * HP, 0);
  s.order_lane.assign(HP, 0);
  for (int64_t c = 0; c < H; ++c) s.order_lane[c] = c / K + 1;
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t c = 0; c < H; ++c) {
      const uint64_t p = a.p[l * H + c];
      s.inv[l * HP + c] = 1.0 / static_cast<double>(p);
      s.p[l * HP + c] = static_cast<int32_t>(p);
      // Only read for int32 output, where offset + p <= 2^31 has been checked.
      s.off32[l * HP + c] = static_cast<int32_t>(a.off[l * H + c]);
    }
    // The AVX2 kernel's lane order within each group of 8 heads (see ngram_hash_x86.cpp).
    static constexpr int64_t kAvx2Head[8] = {0, 1, 4, 5, 2, 3, 6, 7};
    for (int64_t c = 0; c < HP; ++c) s.p_avx2[l * HP + c] = s.p[l * HP + c / 8 * 8 + kAvx2Head[c % 8]];
  }
  return s;
}

// Instruction sets of the kernels, in increasing order.
enum class HashIsa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// The best kernel this CPU runs, capped by the environment variable ENGRAM_NGRAM_HASH_ISA
// (portable, avx2 or avx512; unset or auto: no cap). Read at each call, so tests can cover every
// kernel in one process.
HashIsa ngram_hash_isa();
const char* isa_name(HashIsa isa);

// Each kernel hashes tokens [begin, end) of the flattened [B, T] ids into out ([L, B, T, H],
// int32 or int64) and returns the flat index of the first out-of-range id it met (with
// oov_to_pad false), or -1.
int64_t hash_range_avx2(const HashArgs& a, const SimdPlan& s, int64_t begin, int64_t end, int32_t* out);
int64_t hash_range_avx2(const HashArgs& a, const SimdPlan& s, int64_t begin, int64_t end, int64_t* out);
int64_t hash_range_avx512(const HashArgs& a, const SimdPlan& s, int64_t begin, int64_t end, int32_t* out);
int64_t hash_range_avx512(const HashArgs& a, const SimdPlan& s, int64_t begin, int64_t end, int64_t* out);

inline int64_t raw_id(const HashArgs& a, int64_t i) { return a.x ? a.x[i] : a.x32[i]; }

// Compressed ids of positions [first, t1) of sequence b, each LUT entry read once:
// store(s, x'[s]). Out-of-range ids become the pad id; the first one (flat index) is kept in bad.
template <typename id_t, typename Store>
inline void compress_ids(const HashArgs& a, const id_t* x, int64_t b, int64_t first, int64_t t1, Store store,
                         int64_t& bad) {
  x += b * a.T;
  for (int64_t s = first; s < t1; ++s) {
    const int64_t raw = x[s];
    int64_t c;
    if (raw < 0 || raw >= a.num_ids) {
      if (!a.oov_to_pad && bad < 0) bad = b * a.T + s;
      c = a.pad_id;
    } else {
      c = a.lut ? a.lut[raw] : raw;
    }
    store(s, static_cast<uint64_t>(c));
  }
}

template <typename Store>
inline void compress_ids(const HashArgs& a, int64_t b, int64_t first, int64_t t1, Store store, int64_t& bad) {
  if (a.x) {
    compress_ids(a, a.x, b, first, t1, store, bad);
  } else {
    compress_ids(a, a.x32, b, first, t1, store, bad);
  }
}

// Latest document start at or before t0 - 1 that still reaches back into the window of t0
// (positions t0 - N + 1 .. t0 - 1), or -1.
inline int64_t last_doc_start_before(const bool* ds, int64_t t0, int64_t N) {
  if (!ds) return -1;
  for (int64_t s = t0 - 1; s >= std::max<int64_t>(0, t0 - (N - 1)); --s) {
    if (ds[s]) return s;
  }
  return -1;
}

}  // namespace engram::cpu
