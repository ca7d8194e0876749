// Maths of the row cache shared by its CPU and CUDA kernels (docs/SPEC.md section 3), torch-free:
// the counter-based initial values of never-written rows and the eviction order keys.
#pragma once

#include <cmath>
#include <cstdint>

#include "engram/common.h"

namespace engram {

ENGRAM_HOST_DEVICE uint64_t cache_mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Elements j and j + 1 of row `row`'s initial weight, N(0, 1) * std: Box-Muller on two 24-bit
// uniforms of one (seed, row, j) hash, so a row's values depend on the seed alone, not on the
// order rows are first fetched in (CPU and CUDA libm may differ in the last bit).
ENGRAM_HOST_DEVICE void initial_pair(uint64_t seed, int64_t row, int64_t j, float std, float* a, float* b) {
  const uint64_t row_key = cache_mix64(seed ^ cache_mix64(static_cast<uint64_t>(row)));
  const uint64_t h = cache_mix64(row_key ^ static_cast<uint64_t>(j));
  const float u1 = (static_cast<float>(h >> 40) + 1.0f) * (1.0f / 16777216.0f);  // (0, 1]
  const float u2 = static_cast<float>((h >> 8) & 0xFFFFFF) * (1.0f / 16777216.0f);
  const float r = sqrtf(-2.0f * logf(u1)) * std;
  const float t = 6.2831853f * u2;
  *a = r * cosf(t);
  *b = r * sinf(t);
}

// Eviction order of a slot (smaller goes first): free slots, then by (last stamp, uses) for LRU
// or (uses, last stamp) for LFU; pinned slots (stamp >= keep_from) never. Stamps and uses are
// clamped to 31 bits each (2 billion steps).
constexpr uint64_t kPinnedKey = ~uint64_t{0};

ENGRAM_HOST_DEVICE uint64_t eviction_key(int64_t held_row, int64_t stamp, int64_t uses, int64_t keep_from, bool lfu) {
  if (held_row < 0) return 0;
  if (stamp >= keep_from) return kPinnedKey;
  const uint64_t s = static_cast<uint64_t>(stamp + 1 < 0x7FFFFFFF ? stamp + 1 : 0x7FFFFFFF);
  const uint64_t u = static_cast<uint64_t>(uses < 0x7FFFFFFF ? uses : 0x7FFFFFFF);
  return 1 + (lfu ? (u << 31 | s) : (s << 31 | u));
}

}  // namespace engram
