// ngram_hash through the dispatcher against golden rows from an independent NumPy transcription
// of the official algorithm (tests/data/golden_hash.txt, shared with pytest).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "engram/hash.h"
#include "engram/primes.h"

namespace {

using HashFn = at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, int64_t, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&, int64_t, const std::optional<at::Tensor>&,
                          at::ScalarType, bool);

at::Tensor call_hash(const at::Tensor& ids, int64_t num_ids, const at::Tensor& mult, const at::Tensor& primes,
                     const at::Tensor& offsets, int64_t pad, at::ScalarType out = at::kLong) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("engram::ngram_hash", "").typed<HashFn>();
  return op.call(ids, std::nullopt, num_ids, mult, primes, offsets, pad, std::nullopt, out, false);
}

std::vector<int64_t> ints(std::istringstream& in) {
  std::vector<int64_t> v;
  int64_t x;
  while (in >> x) v.push_back(x);
  return v;
}

at::Tensor tensor_of(const std::vector<int64_t>& v) { return at::tensor(at::ArrayRef<int64_t>(v), at::kLong).clone(); }

TEST(NgramHash, MatchesGoldenOfficialFormulation) {
  std::ifstream f(std::string(ENGRAM_TEST_DATA_DIR) + "/golden_hash.txt");
  ASSERT_TRUE(f.good());
  std::string line;
  int cases = 0;
  while (std::getline(f, line)) {
    if (line.rfind("case ", 0) != 0) continue;
    // case NAME v1 v2 .. | N K Vc pad seed | layers.. | T
    std::string body = line.substr(5);
    std::vector<std::string> parts;
    std::stringstream ss(body);
    std::string part;
    while (std::getline(ss, part, '|')) parts.push_back(part);
    ASSERT_EQ(parts.size(), 4u) << line;
    std::istringstream p0(parts[0]);
    std::string name;
    p0 >> name;
    auto vocab = ints(p0);
    std::istringstream p1(parts[1]), p2(parts[2]), p3(parts[3]);
    auto nk = ints(p1);
    auto layers = ints(p2);
    int64_t T = ints(p3).at(0);
    const int64_t N = nk[0], K = nk[1], v_comp = nk[2], pad = nk[3];
    const int64_t L = layers.size(), H = (N - 1) * K;

    std::getline(f, line);
    std::istringstream ids_line(line.substr(4));
    at::Tensor ids = tensor_of(ints(ids_line)).view({-1, T});
    auto primes_nested = engram::layer_primes(vocab, L, K);
    std::vector<int64_t> primes, offsets, mult;
    std::vector<at::Tensor> expected;
    for (int64_t l = 0; l < L; ++l) {
      int64_t base = 0;
      for (const auto& order : primes_nested[l]) {
        for (int64_t p : order) {
          primes.push_back(p);
          offsets.push_back(base);
          base += p;
        }
      }
      std::getline(f, line);
      std::istringstream m(line.substr(5));
      auto ml = ints(m);
      mult.insert(mult.end(), ml.begin(), ml.end());
      std::getline(f, line);
      std::istringstream r(line.substr(5));
      expected.push_back(tensor_of(ints(r)).view({ids.size(0), T, H}));
    }
    auto out = call_hash(ids, v_comp, tensor_of(mult).view({L, N}), tensor_of(primes).view({L, H}),
                         tensor_of(offsets).view({L, H}), pad);
    ASSERT_EQ(out.sizes(), (std::vector<int64_t>{L, ids.size(0), T, H}));
    for (int64_t l = 0; l < L; ++l) {
      EXPECT_TRUE(at::equal(out[l], expected[l])) << name << " T=" << T << " layer " << l;
    }
    auto out32 = call_hash(ids, v_comp, tensor_of(mult).view({L, N}), tensor_of(primes).view({L, H}),
                           tensor_of(offsets).view({L, H}), pad, at::kInt);
    EXPECT_TRUE(at::equal(out32.to(at::kLong), out)) << name << " int32 output";
    ++cases;
  }
  EXPECT_EQ(cases, 6);
}

TEST(NgramHash, FastModEqualsModulo) {
  std::mt19937_64 rng(7);
  const uint64_t divisors[] = {1, 2, 3, 646403, 16000057, 4294967291ull, 4294967311ull, (1ull << 62) - 57};
  for (uint64_t p : divisors) {
    auto f = engram::make_fastmod(p);
    for (int i = 0; i < 20000; ++i) {
      uint64_t h = rng() >> (i % 3 == 0 ? 1 : 0);
      ASSERT_EQ(engram::fastmod(h, f), h % p) << h << " mod " << p;
      ASSERT_EQ(engram::fastmod_split(h, f.p, f.magic), h % p) << h << " mod " << p;
      ASSERT_EQ(engram::mulhi64_split(h, f.magic), engram::mulhi64(h, f.magic));
    }
    for (uint64_t h : {uint64_t{0}, p - 1, p, p + 1, ~uint64_t{0}, ~uint64_t{0} >> 1}) {
      ASSERT_EQ(engram::fastmod(h, f), h % p) << h << " mod " << p;
      ASSERT_EQ(engram::fastmod_split(h, f.p, f.magic), h % p) << h << " mod " << p;
    }
  }
}

TEST(NgramHash, RejectsBadInput) {
  auto mult = at::ones({1, 3}, at::kLong);
  auto primes = at::full({1, 4}, 7, at::kLong);
  auto offsets = at::zeros({1, 4}, at::kLong);
  auto ids = at::zeros({2, 5}, at::kLong);
  EXPECT_THROW(call_hash(ids.view({-1}), 10, mult, primes, offsets, 0), c10::Error);
  EXPECT_THROW(call_hash(ids.to(at::kFloat), 10, mult, primes, offsets, 0), c10::Error);
  EXPECT_THROW(call_hash(ids, 10, mult, primes.narrow(1, 0, 3), offsets, 0), c10::Error);
  auto bad = ids.clone();
  bad[1][3] = 10;
  try {
    call_hash(bad, 10, mult, primes, offsets, 0);
    FAIL() << "out-of-range id accepted";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("ids must lie in [0, 10)"), std::string::npos) << e.what();
  }
  EXPECT_EQ(call_hash(at::zeros({0, 5}, at::kLong), 10, mult, primes, offsets, 0).numel(), 0);
}

}  // namespace
