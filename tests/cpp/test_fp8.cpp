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
