// FastMod (Barrett reduction in engram/hash.h) against the hardware % operator: random 64-bit
// hashes, primes from 2 to near 2^64, and the edge values where the quotient estimate is worst.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

#include "engram/hash.h"

namespace {

// Largest prime <= n (n >= 2).
uint64_t prime_at_most(uint64_t n) {
  while (!engram::is_prime(n)) --n;
  return n;
}

// Smallest prime >= n.
uint64_t prime_at_least(uint64_t n) {
  while (!engram::is_prime(n)) ++n;
  return n;
}

std::vector<uint64_t> test_primes() {
  std::vector<uint64_t> ps = {2, 3, 5, 7, 11, 13, 251, 257, 65521, 65537, 646403, 646619, 16000057};
  for (int bits : {20, 31, 32, 33, 40, 48, 52, 53, 56, 61, 62, 63, 64}) {
    const uint64_t top = bits == 64 ? ~uint64_t{0} : (uint64_t{1} << bits) - 1;
    ps.push_back(prime_at_most(top));
    if (bits < 64) ps.push_back(prime_at_least(top + 1));
  }
  // Near 2^32 and 2^62 from both sides, a few apart.
  for (uint64_t base : {uint64_t{1} << 32, uint64_t{1} << 62}) {
    uint64_t lo = base, hi = base;
    for (int i = 0; i < 4; ++i) {
      lo = prime_at_most(lo - 1);
      hi = prime_at_least(hi + 1);
      ps.push_back(lo);
      ps.push_back(hi);
    }
  }
  return ps;
}

std::vector<uint64_t> edge_hashes(uint64_t p) {
  const uint64_t max = ~uint64_t{0};
  std::vector<uint64_t> hs = {0,
                              1,
                              2,
                              p - 1,
                              p,
                              p + 1,
                              2 * p - 1,
                              2 * p,
                              max,
                              max - 1,
                              max - p,
                              max - p + 1,
                              uint64_t{1} << 63,
                              (uint64_t{1} << 63) - 1,
                              uint64_t{1} << 32,
                              (uint64_t{1} << 32) - 1};
  // Around the largest multiples of p, where mulhi(h, magic) undershoots the quotient the most.
  const uint64_t q = max / p;
  for (uint64_t k : {q, q - 1, q / 2, q / 3}) {
    if (k == 0) continue;
    const uint64_t m = k * p;
    hs.insert(hs.end(), {m - 1, m, m + 1, m + p - 1});
  }
  return hs;
}

TEST(FastMod, EqualsModuloForRandomHashes) {
  std::mt19937_64 rng(12345);
  for (uint64_t p : test_primes()) {
    ASSERT_TRUE(engram::is_prime(p)) << p;
    const engram::FastMod f = engram::make_fastmod(p);
    for (int i = 0; i < 20000; ++i) {
      uint64_t h = rng();
      // Mix in short hashes too: the official products x' * m are < 2^63.
      if (i % 4 == 1) h >>= 1;
      if (i % 4 == 2) h >>= (rng() % 64);
      ASSERT_EQ(engram::fastmod(h, f), h % p) << "h=" << h << " p=" << p;
    }
  }
}

TEST(FastMod, EqualsModuloAtEdges) {
  for (uint64_t p : test_primes()) {
    const engram::FastMod f = engram::make_fastmod(p);
    for (uint64_t h : edge_hashes(p)) ASSERT_EQ(engram::fastmod(h, f), h % p) << "h=" << h << " p=" << p;
  }
}

TEST(FastMod, EqualsModuloForAnyDivisor) {
  // Not only primes: 1, powers of two and their neighbours, and the largest 64-bit values.
  std::mt19937_64 rng(7);
  std::vector<uint64_t> ds = {1, 2, 4, 6, 10, 1000, ~uint64_t{0}, ~uint64_t{0} - 1, uint64_t{1} << 63};
  for (int s = 1; s < 64; s += 3) {
    ds.insert(ds.end(), {(uint64_t{1} << s) - 1, uint64_t{1} << s, (uint64_t{1} << s) + 1});
  }
  for (int i = 0; i < 200; ++i) ds.push_back(rng() >> (rng() % 64) | 1);
  for (uint64_t d : ds) {
    const engram::FastMod f = engram::make_fastmod(d);
    for (uint64_t h : edge_hashes(d)) ASSERT_EQ(engram::fastmod(h, f), h % d) << "h=" << h << " d=" << d;
    for (int i = 0; i < 2000; ++i) {
      const uint64_t h = rng();
      ASSERT_EQ(engram::fastmod(h, f), h % d) << "h=" << h << " d=" << d;
    }
  }
}

TEST(FastMod, MulHiMatchesSchoolbookLimbs) {
  // The device path uses __umul64hi; check the host __int128 path against 32-bit limbs so a
  // future portable fallback has a reference.
  std::mt19937_64 rng(99);
  for (int i = 0; i < 100000; ++i) {
    const uint64_t a = rng(), b = rng();
    const uint64_t a0 = a & 0xffffffffu, a1 = a >> 32, b0 = b & 0xffffffffu, b1 = b >> 32;
    const uint64_t p00 = a0 * b0, p01 = a0 * b1, p10 = a1 * b0, p11 = a1 * b1;
    const uint64_t mid = (p00 >> 32) + (p01 & 0xffffffffu) + (p10 & 0xffffffffu);
    const uint64_t hi = p11 + (p01 >> 32) + (p10 >> 32) + (mid >> 32);
    ASSERT_EQ(engram::mulhi64(a, b), hi) << a << " * " << b;
  }
}

}  // namespace
