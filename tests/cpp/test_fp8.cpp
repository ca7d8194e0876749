// The torch-free FP8 decoders of engram/fp8.h: E4M3 ("fn") and E8M0 ("fnu") bytes to float.
#include <gtest/gtest.h>

#include <cmath>

#include "engram/fp8.h"

namespace {

using engram::e4m3_to_float;
using engram::e8m0_to_float;

TEST(Fp8, E4M3KnownValues) {
  EXPECT_EQ(e4m3_to_float(0x38), 1.0f);    // 0.0111.000: 2^0
  EXPECT_EQ(e4m3_to_float(0x7E), 448.0f);  // largest finite: 1.75 * 2^8
  EXPECT_EQ(e4m3_to_float(0xFE), -448.0f);
  EXPECT_EQ(e4m3_to_float(0x08), std::ldexp(1.0f, -6));      // smallest normal
  EXPECT_EQ(e4m3_to_float(0x01), std::ldexp(1.0f, -9));      // smallest subnormal
  EXPECT_EQ(e4m3_to_float(0x07), 7 * std::ldexp(1.0f, -9));  // largest subnormal
  EXPECT_EQ(e4m3_to_float(0x00), 0.0f);
  EXPECT_TRUE(std::signbit(e4m3_to_float(0x80)));
  EXPECT_TRUE(std::isnan(e4m3_to_float(0x7F)));
  EXPECT_TRUE(std::isnan(e4m3_to_float(0xFF)));
  EXPECT_EQ(e4m3_to_float(0x77), 240.0f);  // 0.1110.111: 1.875 * 2^7, an exponent of all ones but one
}

TEST(Fp8, E4M3IsMonotoneOverPositiveBytes) {
  for (int b = 1; b < 0x7F; ++b) EXPECT_LT(e4m3_to_float(b - 1), e4m3_to_float(b)) << b;
}

TEST(Fp8, E8M0IsAPowerOfTwo) {
  for (int s = 1; s < 255; ++s) EXPECT_EQ(e8m0_to_float(s), std::ldexp(1.0f, s - 127)) << s;
  EXPECT_EQ(e8m0_to_float(0), std::ldexp(1.0f, -127));
  EXPECT_TRUE(std::isnan(e8m0_to_float(255)));
}

}  // namespace

namespace {

TEST(Fp8, BranchFreeDecodeEqualsTheReferenceForEveryByteAndScale) {
  for (int s = 0; s < 255; ++s) {
    const float f = engram::e8m0_to_float(static_cast<uint8_t>(s));
    for (int b = 0; b < 256; ++b) {
      const float want = engram::e4m3_to_float(static_cast<uint8_t>(b)) * f;
      const float got = engram::float_of_bits(engram::e4m3_scaled_bits(static_cast<uint8_t>(b), f));
      if (std::isnan(want)) {
        EXPECT_TRUE(std::isnan(got)) << b << " " << s;
      } else {
        EXPECT_EQ(engram::bits_of_float(got), engram::bits_of_float(want)) << b << " " << s;
      }
    }
  }
}

TEST(Fp8, BFloat16RoundsToNearestEven) {
  EXPECT_EQ(engram::bfloat16_bits_rne(0x3F800000u), 0x3F80);           // 1.0
  EXPECT_EQ(engram::bfloat16_bits_rne(0x3F808000u), 0x3F80);           // a tie to even (down)
  EXPECT_EQ(engram::bfloat16_bits_rne(0x3F818000u), 0x3F82);           // a tie to even (up)
  EXPECT_EQ(engram::bfloat16_bits_rne(0x3F808001u), 0x3F81);           // above the tie
  EXPECT_EQ(engram::bfloat16_bits_rne(0x7F800000u), 0x7F80);           // inf stays inf
  EXPECT_EQ(engram::bfloat16_bits_rne(0x7FC00000u) & 0x7FC0, 0x7FC0);  // NaN stays NaN
}

}  // namespace
