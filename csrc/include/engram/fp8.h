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

// E8M0 byte s: 2^(s - 127); s = 0 is 2^-127 (a float subnormal), 0xFF is NaN.
ENGRAM_HOST_DEVICE float e8m0_to_float(uint8_t s) {
  if (s == 0xFFu) return float_of_bits(0x7FC00000u);
  if (s == 0) return float_of_bits(0x00400000u);
  return float_of_bits(static_cast<uint32_t>(s) << 23);
}

}  // namespace engram
