// Prime search and the official table layout against docs/SPEC.md's golden numbers.
#include <gtest/gtest.h>

#include <numeric>

#include "engram/primes.h"

namespace {

int64_t rows_of(const std::vector<std::vector<int64_t>>& layer) {
  int64_t total = 0;
  for (const auto& order : layer) total = std::accumulate(order.begin(), order.end(), total);
  return total;
}

TEST(Primes, MillerRabinAgreesWithTrialDivision) {
  for (uint64_t n = 0; n < 20000; ++n) {
    bool trial = n >= 2;
    for (uint64_t d = 2; d * d <= n; ++d) {
      if (n % d == 0) {
        trial = false;
        break;
      }
    }
    ASSERT_EQ(engram::is_prime(n), trial) << n;
  }
  EXPECT_TRUE(engram::is_prime(18446744073709551557ull));  // largest 64-bit prime
  EXPECT_FALSE(engram::is_prime(3215031751ull));           // strong pseudoprime to bases 2,3,5,7
  EXPECT_FALSE(engram::is_prime(18446744073709551615ull));
}

TEST(Primes, DemoLayout) {
  auto p = engram::layer_primes({646400, 646400}, 2, 8);
  const std::vector<int64_t> order2 = {646403, 646411, 646421, 646423, 646433, 646453, 646519, 646523};
  EXPECT_EQ(p[0][0], order2);
  EXPECT_EQ(p[0][1].front(), 646537);
  EXPECT_EQ(p[0][1].back(), 646619);
  EXPECT_EQ(p[1][0].front(), 646631);
  EXPECT_EQ(rows_of(p[0]), 10344164);
  EXPECT_EQ(rows_of(p[1]), 10348242);
}

TEST(Primes, V41FlashLayout) {
  auto p = engram::layer_primes({16000000, 16000000, 16000000}, 2, 8);
  EXPECT_EQ(rows_of(p[0]), 384006168);
  EXPECT_EQ(rows_of(p[1]), 384016682);
}

TEST(Primes, RejectsBadArguments) {
  EXPECT_THROW(engram::layer_primes({1}, 1, 8), std::invalid_argument);
  EXPECT_THROW(engram::layer_primes({100}, 1, 0), std::invalid_argument);
}

}  // namespace
