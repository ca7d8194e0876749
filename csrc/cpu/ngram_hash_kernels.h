// Token-range kernels of the CPU ngram_hash op and what they share: the portable kernel in
// ngram_hash.cpp, the AVX-512 one in ngram_hash_x86.cpp. Torch-free; the kernel is picked per call.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "engram/hash.h"

namespace engram::cpu {

struct HashArgs {
  const int64_t* x;    // raw ids [B, T] when int64, else nullptr
  const int32_t* x32;  // raw ids [B, T] when int32, else nullptr
  int64_t B, T, L, N, H;
  const int64_t* lut;  // nullptr: ids are already compressed
  int64_t num_ids;
  const uint64_t* m;      // [L, N]
  const uint64_t* p;      // [L, H]
  const uint64_t* magic;  // [L, H], Barrett constants of p (fastmod)
  const int64_t* off;     // [L, H]
  int64_t pad_id;
  const bool* doc_start;  // nullptr: no document boundaries
  bool oov_to_pad;
  // Largest compressed id allowed: below num_ids, and small enough that x' * m cannot overflow
  // for any multiplier (a LUT entry past the compressed vocabulary would silently wrap).
  uint64_t max_id;
};

// Constants of dmod (engram/hash.h), for calls whose primes all satisfy dmod_exact. Heads are
// padded to whole chunks of kChunk for the AVX-512 kernel (padding: inv = 0, p = 1, offset 0,
// never stored); head c of layer l sits at l * stride() + c.
struct DmodPlan {
  static constexpr int64_t kChunk = 16;
  int64_t chunks = 0;               // ceil(H / kChunk)
  std::vector<double> inv;          // 1 / p
  std::vector<int32_t> p;           // p
  std::vector<int32_t> off32;       // offsets (read for int32 output, where offset + p <= 2^31)
  std::vector<int64_t> order_lane;  // [chunks * kChunk] n - 1 for a head of order n
  int64_t stride() const { return chunks * kChunk; }
};

inline DmodPlan make_dmod_plan(const HashArgs& a) {
  DmodPlan s;
  const int64_t L = a.L, H = a.H, K = H / (a.N - 1);
  s.chunks = (H + DmodPlan::kChunk - 1) / DmodPlan::kChunk;
  const int64_t HP = s.stride();
  s.inv.assign(L * HP, 0.0);
  s.p.assign(L * HP, 1);
  s.off32.assign(L * HP, 0);
  s.order_lane.assign(HP, 0);
  for (int64_t c = 0; c < H; ++c) s.order_lane[c] = c / K + 1;
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t c = 0; c < H; ++c) {
      const uint64_t p = a.p[l * H + c];
      s.inv[l * HP + c] = 1.0 / static_cast<double>(p);
      s.p[l * HP + c] = static_cast<int32_t>(p);
      s.off32[l * HP + c] = static_cast<int32_t>(a.off[l * H + c]);
    }
  }
  return s;
}

// Kernels, in increasing order of instruction set.
enum class HashIsa : int { kPortable = 0, kAvx512 = 1 };

// The best kernel this CPU runs, capped by the environment variable ENGRAM_NGRAM_HASH_ISA
// (portable or avx512; unset or auto: no cap). Read at each call, so tests can cover every
// kernel in one process.
HashIsa ngram_hash_isa();
const char* isa_name(HashIsa isa);

// Each kernel hashes tokens [begin, end) of the flattened [B, T] ids into out ([L, B, T, H],
// int32 or int64) and returns the flat index of the first out-of-range id it met (with
// oov_to_pad false), or -1. The portable kernel takes any table, with dmod if given its plan (all
// primes dmod_exact), fastmod otherwise; the AVX-512 kernel needs the plan and K % 8 == 0.
int64_t hash_range_portable(const HashArgs& a, const DmodPlan* s, int64_t begin, int64_t end, int32_t* out);
int64_t hash_range_portable(const HashArgs& a, const DmodPlan* s, int64_t begin, int64_t end, int64_t* out);
int64_t hash_range_avx512(const HashArgs& a, const DmodPlan& s, int64_t begin, int64_t end, int32_t* out);
int64_t hash_range_avx512(const HashArgs& a, const DmodPlan& s, int64_t begin, int64_t end, int64_t* out);

// ---- shared by the kernels ------------------------------------------------------------------

// Kernel bodies are templates and lambdas inlined into each kernel entry point, so they compile
// for that entry point's instruction set (target attributes and target clones).
#define ENGRAM_INLINE inline __attribute__((always_inline))
#define ENGRAM_INLINE_LAMBDA __attribute__((always_inline))

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
      // A bad LUT entry is an error whatever oov_to_pad says: the id itself was valid.
      if (static_cast<uint64_t>(c) > a.max_id) {
        if (bad < 0) bad = b * a.T + s;
        c = a.pad_id;
      }
    }
    store(s, static_cast<uint64_t>(c));
  }
}

// Compressed ids of segment [t0, t1) of sequence b in reverse, xr[j] = x'[t1 - 1 - j], so that
// the window x'[t], x'[t-1], ..., x'[t-N+1] of token t is the contiguous xr[t1 - 1 - t ..].
// Positions before the sequence start hold the pad id.
inline void fill_reversed(const HashArgs& a, int64_t b, int64_t t0, int64_t t1, std::vector<uint64_t>& xr,
                          int64_t& bad) {
  xr.assign(t1 - t0 + (a.N - 1), static_cast<uint64_t>(a.pad_id));
  uint64_t* last = xr.data() + (t1 - 1);  // last - s is the slot of position s
  const int64_t first = std::max<int64_t>(0, t0 - (a.N - 1));
  auto store = [last](int64_t s, uint64_t c) { *(last - s) = c; };
  if (a.x) {
    compress_ids(a, a.x, b, first, t1, store, bad);
  } else {
    compress_ids(a, a.x32, b, first, t1, store, bad);
  }
}

// Runs layer(l, xr, dist, n, seg) over the segments of tokens [begin, end) (one sequence each)
// and every layer: xr as above, n tokens, seg the flat index of the segment's first token. With
// document starts, dist[u] is the distance from token u back to the latest document start at or
// before it (or to the sequence start): window lane k is a real id iff k <= dist[u], else the
// pad id. One layer at a time keeps that layer's constants in registers.
template <typename Layer>
ENGRAM_INLINE int64_t for_each_segment(const HashArgs& a, int64_t begin, int64_t end, Layer&& layer) {
  std::vector<uint64_t> xr;
  std::vector<int64_t> dist;
  int64_t bad = -1;
  for (int64_t seg = begin; seg < end;) {
    const int64_t b = seg / a.T, t0 = seg % a.T;
    const int64_t t1 = std::min(a.T, t0 + (end - seg)), n = t1 - t0;
    fill_reversed(a, b, t0, t1, xr, bad);
    if (a.doc_start) {
      const bool* ds = a.doc_start + b * a.T;
      // The latest start that still reaches into the window of t0.
      int64_t last_start = -1;
      for (int64_t s = t0 - 1; s >= std::max<int64_t>(0, t0 - (a.N - 1)); --s) {
        if (ds[s]) {
          last_start = s;
          break;
        }
      }
      dist.resize(n);
      for (int64_t t = t0; t < t1; ++t) {
        if (ds[t]) last_start = t;
        dist[t - t0] = t - std::max<int64_t>(last_start, 0);
      }
    }
    for (int64_t l = 0; l < a.L; ++l) layer(l, xr.data(), dist.data(), n, seg);
    seg += n;
  }
  return bad;
}

}  // namespace engram::cpu
