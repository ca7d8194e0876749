// FP8 tables (docs/SPEC.md section 3): values in E4M3 ("fn": no infinities, S.1111.111 is NaN)
// with one E8M0 scale ("fnu": unsigned power of two, 0xFF is NaN) per block of 32 values of a row,
// the DeepSeek-V4.1 layout. The dequantised value is e4m3(v) * 2^(s - 127); both factors are exact
// in float, and so is their product (short of float underflow), so the float result is exact and
// a bfloat16 result (8 mantissa bits against E4M3's 4) is exact too. Torch-free: the CPU kernel,
// the CUDA kernel and GoogleTest share these decoders.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#include "engram/common.h"

namespace engram {

// Values per E8M0 scale along a row.
constexpr int64_t kFp8Block = 32;

ENGRAM_HOST_DEVICE float float_of_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

// E4M3 byte s.eeee.mmm, exponent bias 7: normal (1 + m/8) * 2^(e - 7), subnormal (m/8) * 2^-6.
ENGRAM_HOST_DEVICE float e4m3_to_float(uint8_t b) {
  const uint32_t sign = static_cast<uint32_t>(b & 0x80u) << 24;
  const uint32_t e = (b >> 3) & 0xFu, m = b & 0x7u;
  if (e == 0xFu && m == 0x7u) return float_of_bits(0x7FC00000u | sign);  // NaN
  if (e == 0) {
    // m * 2^-9, exact; 2^-9 = bits (127 - 9) << 23.
    const float v = static_cast<float>(m) * float_of_bits(118u << 23);
    return sign ? -v : v;
  }
  return float_of_bits(sign | ((e + 120u) << 23) | (m << 20));  // exponent e - 7 + 127
}

ENGRAM_HOST_DEVICE uint32_t bits_of_float(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
#endif
}

// e4m3_to_float(b) * scale (scale > 0 a power of two) without branches, as float bits, so loops of
// it vectorise (exact unless the CPU flushes denormals: the intermediate of an E4M3 subnormal is a
// float subnormal): the byte's exponent and mantissa, moved to float's mantissa-aligned position, read
// as a float that is 2^-120 times the value (subnormals included), so one exact multiply by 2^120
// restores it; the sign goes in last; 0x7F (the NaN pattern) is mapped to NaN.
ENGRAM_HOST_DEVICE uint32_t e4m3_scaled_bits(uint8_t b, float scale) {
  const uint32_t mag = static_cast<uint32_t>(b & 0x7Fu);
  const float x = float_of_bits(mag << 20) * float_of_bits((127u + 120u) << 23) * scale;
  const uint32_t nan = 0u - static_cast<uint32_t>(mag == 0x7Fu);  // all ones for the NaN pattern
  const uint32_t bits = (bits_of_float(x) & ~nan) | (0x7FC00000u & nan);
  return bits | (static_cast<uint32_t>(b & 0x80u) << 24);
}

// float bits to bfloat16 bits, rounding to nearest even (NaN stays a quiet NaN).
ENGRAM_HOST_DEVICE uint16_t bfloat16_bits_rne(uint32_t bits) {
  const uint32_t nan = 0u - static_cast<uint32_t>((bits & 0x7FFFFFFFu) > 0x7F800000u);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((rounded & ~nan) | (((bits >> 16) | 0x40u) & nan));
}

// E8M0 byte s: 2^(s - 127); s = 0 is 2^-127 (a float subnormal), 0xFF is NaN.
ENGRAM_HOST_DEVICE float e8m0_to_float(uint8_t s) {
  if (s == 0xFFu) return float_of_bits(0x7FC00000u);
  if (s == 0) return float_of_bits(0x00400000u);
  return float_of_bits(static_cast<uint32_t>(s) << 23);
}

}  // namespace engram
