// N-gram hash primitives (ENGRAM.md section 2), torch-free so CPU, CUDA and GoogleTest share
// one bit-exact definition. All arithmetic is unsigned 64-bit: compressed ids are non-negative
// and x' * m < 2^63, so unsigned results equal the official signed NumPy ones, and no
// floor-vs-truncate modulo ambiguity can arise.
#pragma once

#include <cstdint>

#include "engram/common.h"

namespace engram {

// High 64 bits of a 64x64-bit product.
ENGRAM_HOST_DEVICE uint64_t mulhi64(uint64_t a, uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(a, b);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#endif
}

// The same product from 32-bit halves: slower as scalar code, but it auto-vectorises (vpmuludq),
// so loops over heads run one SIMD lane per prime.
ENGRAM_HOST_DEVICE uint64_t mulhi64_split(uint64_t a, uint64_t b) {
  // Explicit 32-bit operands let compilers emit 32x32->64 multiplies (vpmuludq).
  const uint32_t a_lo = static_cast<uint32_t>(a), a_hi = static_cast<uint32_t>(a >> 32);
  const uint32_t b_lo = static_cast<uint32_t>(b), b_hi = static_cast<uint32_t>(b >> 32);
  const uint64_t lo_lo = uint64_t{a_lo} * b_lo, hi_lo = uint64_t{a_hi} * b_lo;
  const uint64_t lo_hi = uint64_t{a_lo} * b_hi, hi_hi = uint64_t{a_hi} * b_hi;
  const uint64_t cross = (lo_lo >> 32) + (hi_lo & 0xffffffffu) + lo_hi;
  return hi_hi + (hi_lo >> 32) + (cross >> 32);
}

// Division-free modulo by a runtime divisor (Barrett reduction). `magic` is
// floor((2^64 - 1) / p); the quotient estimate mulhi(h, magic) is at most 2 below the true
// quotient for any 64-bit h, so two conditional subtractions make the result exact.
struct FastMod {
  uint64_t p;
  uint64_t magic;
};

ENGRAM_HOST_DEVICE FastMod make_fastmod(uint64_t p) { return FastMod{p, ~uint64_t{0} / p}; }

ENGRAM_HOST_DEVICE uint64_t fastmod(uint64_t h, FastMod f) {
  uint64_t r = h - mulhi64(h, f.magic) * f.p;
  if (r >= f.p) r -= f.p;
  if (r >= f.p) r -= f.p;
  return r;
}

// fastmod with the split product, for vectorised loops (bit-identical results).
ENGRAM_HOST_DEVICE uint64_t fastmod_split(uint64_t h, uint64_t p, uint64_t magic) {
  uint64_t r = h - mulhi64_split(h, magic) * p;
  // r >= p ? r - p : r, as an unsigned min (r - p wraps when r < p): one vpminuq per step.
  r = r - p < r ? r - p : r;
  r = r - p < r ? r - p : r;
  return r;
}

// One step of the rolling mix: h ^= x'[t-k] * m[k].
ENGRAM_HOST_DEVICE uint64_t mix_step(uint64_t h, uint64_t x, uint64_t m) { return h ^ (x * m); }

// Deterministic Miller-Rabin for all 64-bit n (the first 12 primes are a proven witness set).
inline uint64_t mulmod64(uint64_t a, uint64_t b, uint64_t n) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) % n);
}

inline uint64_t powmod64(uint64_t a, uint64_t e, uint64_t n) {
  uint64_t r = 1;
  a %= n;
  while (e) {
    if (e & 1) r = mulmod64(r, a, n);
    a = mulmod64(a, a, n);
    e >>= 1;
  }
  return r;
}

inline bool is_prime(uint64_t n) {
  if (n < 2) return false;
  static constexpr uint64_t small[] = {2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37};
  for (uint64_t p : small) {
    if (n % p == 0) return n == p;
  }
  uint64_t d = n - 1;
  int s = 0;
  while ((d & 1) == 0) {
    d >>= 1;
    ++s;
  }
  for (uint64_t a : small) {
    uint64_t x = powmod64(a, d, n);
    if (x == 1 || x == n - 1) continue;
    bool composite = true;
    for (int i = 1; i < s; ++i) {
      x = mulmod64(x, x, n);
      if (x == n - 1) {
        composite = false;
        break;
      }
    }
    if (composite) return false;
  }
  return true;
}

}  // namespace engram
