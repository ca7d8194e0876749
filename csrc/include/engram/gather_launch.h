// Launch shapes of the CUDA gather and row-gradient kernels, torch-free so GoogleTest checks the
// arithmetic on any machine: vector widths, sub-warp group sizes, radix-sort bits, hot rows.
#pragma once

#include <cstdint>

#include "engram/common.h"

namespace engram {

// Widest power-of-two access (16, 8, 4, 2 or 1 bytes) that divides the row width, the row pitch
// and the base address, so every row of the table can be moved in aligned vectors.
ENGRAM_HOST_DEVICE int vector_bytes(int64_t row_bytes, int64_t pitch_bytes, uint64_t base_addr) {
  for (int w = 16; w > 1; w /= 2) {
    if (row_bytes % w == 0 && pitch_bytes % w == 0 && base_addr % w == 0) return w;
  }
  return 1;
}

// Threads cooperating on one row of `vectors` vectors: the next power of two, at most a warp, so
// narrow rows (d_head 64 in bfloat16 is 8 vectors of 16 bytes) pack several rows into a warp.
ENGRAM_HOST_DEVICE int row_group_size(int64_t vectors) {
  int g = 1;
  while (g < 32 && g < vectors) g *= 2;
  return g;
}

// log2 of a power of two.
ENGRAM_HOST_DEVICE int log2_pow2(int x) {
  int r = 0;
  while ((1 << r) < x) ++r;
  return r;
}

// Bits the radix sort looks at: enough for every row id in [0, num_rows) (at least 1), at most
// the key width.
ENGRAM_HOST_DEVICE int radix_end_bit(int64_t num_rows, int key_bits) {
  int bits = 1;
  while (bits < key_bits && (uint64_t{1} << bits) < static_cast<uint64_t>(num_rows)) ++bits;
  return bits;
}

// A row read by more lookups than this is summed by a whole thread block (its reader rows
// streamed through shared memory, many loads in flight) instead of one sub-warp group, so that a
// frequent n-gram does not leave one group running long after the rest of the backward. The sum
// order is the same (position order) either way.
constexpr int64_t kHotRowReaders = 128;

ENGRAM_HOST_DEVICE bool is_hot_row(int64_t readers) { return readers > kHotRowReaders; }

// Hot-row tile: a block of block_threads threads stages loads_per_thread vectors each, i.e.
// block_threads * loads_per_thread / vectors_per_row reader rows per tile (at least 1).
ENGRAM_HOST_DEVICE int hot_tile_rows(int vectors_per_row, int block_threads, int loads_per_thread) {
  const int rows = block_threads * loads_per_thread / vectors_per_row;
  return rows > 0 ? rows : 1;
}

}  // namespace engram
