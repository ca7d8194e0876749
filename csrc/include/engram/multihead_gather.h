// Multi-head gather/scatter primitives (docs/SPEC.md section 3), torch-free so the CPU kernels, the
// CUDA kernels and GoogleTest agree on row validation and on the sort keys of the backward.
//
// Backward layout: lookup n (flat index into rows, n = token * H + head) reads table row rows[n]
// and owns grad_e[n * d_head : (n + 1) * d_head]. The backward sorts one 64-bit key per lookup,
//   key = row << pos_bits | n,        pos_bits = bit_width(num_lookups - 1),
// so that keys are unique, sort by row first and by position within a row, and a row's
// gradient is summed in position order whatever sort (stable or not, serial or parallel)
// produced them: the result is deterministic and independent of the thread count.
#pragma once

#include <cstdint>

#include "engram/common.h"

namespace engram {

// True when 0 <= row < num_rows (one unsigned compare also rejects negative rows).
ENGRAM_HOST_DEVICE bool row_in_range(int64_t row, int64_t num_rows) {
  return static_cast<uint64_t>(row) < static_cast<uint64_t>(num_rows);
}

// Bits needed to write x in binary (0 for x == 0).
ENGRAM_HOST_DEVICE int bit_width(uint64_t x) {
  int bits = 0;
  while (x != 0) {
    ++bits;
    x >>= 1;
  }
  return bits;
}

// Position bits of the sort key for num_lookups lookups.
ENGRAM_HOST_DEVICE int segment_pos_bits(int64_t num_lookups) {
  return num_lookups <= 1 ? 0 : bit_width(static_cast<uint64_t>(num_lookups - 1));
}

// Rows must stay below this bound for the key to fit in 64 bits.
ENGRAM_HOST_DEVICE uint64_t segment_row_limit(int pos_bits) {
  return pos_bits == 0 ? ~uint64_t{0} : (uint64_t{1} << (64 - pos_bits));
}

ENGRAM_HOST_DEVICE uint64_t segment_key(int64_t row, int64_t pos, int pos_bits) {
  return (static_cast<uint64_t>(row) << pos_bits) | static_cast<uint64_t>(pos);
}

ENGRAM_HOST_DEVICE int64_t segment_key_row(uint64_t key, int pos_bits) { return static_cast<int64_t>(key >> pos_bits); }

ENGRAM_HOST_DEVICE int64_t segment_key_pos(uint64_t key, int pos_bits) {
  return static_cast<int64_t>(key & ((uint64_t{1} << pos_bits) - 1));
}

}  // namespace engram
