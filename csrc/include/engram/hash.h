// N-gram hash primitives (docs/SPEC.md section 2), torch-free so CPU, CUDA and GoogleTest share
// one bit-exact definition. All arithmetic is unsigned 64-bit: compressed ids are non-negative
// and x' * m < 2^63, so unsigned results equal the official signed NumPy ones, and no
// floor-vs-truncate modulo ambiguity can arise.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

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

// Modulo through a double-precision quotient estimate: the scalar form of what the CPU SIMD
// kernels compute per lane (one fused multiply-add, then 32-bit integer lanes). Exact for any
// 64-bit h when kDmodMinP <= p < kDmodMaxP:
// - Q = h / p < 2^64 / 2^14 = 2^50. double(h) and inv_p = double(1 / p) are each within a
//   relative 2^-53 of the exact values, so P = double(h) * inv_p (exact inside the FMA) is
//   within Q * (2^-52 + 2^-106) < 0.2501 of Q.
// - P + 2^52 lies in [2^52, 2^53), where doubles are the integers: the FMA rounds it to
//   2^52 + q with q = round(P), |q - Q| < 0.7501, so q is floor(Q) or floor(Q) + 1, and q < 2^51
//   sits in the low mantissa bits of the result.
// - h - q * p is then h mod p or h mod p - p, in [-p, p), inside int32 since p < 2^31: it equals
//   its own value mod 2^32, computed from the low 32 bits of h, q and p alone. One conditional
//   add of p ends in [0, p).
// Smaller p lets the estimate err by more than one quotient step; larger p leaves int32.
constexpr uint64_t kDmodMinP = uint64_t{1} << 14;
constexpr uint64_t kDmodMaxP = uint64_t{1} << 31;
constexpr double kDmodRound = 4503599627370496.0;  // 2^52

ENGRAM_HOST_DEVICE bool dmod_exact(uint64_t p) { return p >= kDmodMinP && p < kDmodMaxP; }

// Low 32 bits of the quotient estimate q = round(h * inv_p).
ENGRAM_HOST_DEVICE uint32_t dmod_quotient_lo(uint64_t h, double inv_p) {
  const double t = fma(static_cast<double>(h), inv_p, kDmodRound);
#if defined(__CUDA_ARCH__)
  return static_cast<uint32_t>(__double_as_longlong(t));
#else
  uint64_t bits;
  std::memcpy(&bits, &t, sizeof(bits));
  return static_cast<uint32_t>(bits);
#endif
}

// h mod p for dmod_exact(p), inv_p = 1.0 / p.
ENGRAM_HOST_DEVICE uint32_t dmod(uint64_t h, uint32_t p, double inv_p) {
  const uint32_t q = dmod_quotient_lo(h, inv_p);
  const int32_t r = static_cast<int32_t>(static_cast<uint32_t>(h) - q * p);
  return static_cast<uint32_t>(r < 0 ? r + static_cast<int32_t>(p) : r);
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
