// The double-quotient modulo (engram/hash.h dmod) on edge values, and every CPU ngram_hash kernel
// (AVX-512; portable with dmod or with fastmod) against a plain scalar transcription, over
// arbitrary token ranges.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "../../csrc/cpu/ngram_hash_kernels.h"
#include "engram/hash.h"
#include "engram/primes.h"

namespace {

using engram::cpu::HashArgs;
using engram::cpu::HashIsa;

// h values where an error would show: around multiples of p (both sides of every quotient step),
// around half steps (where a rounded quotient switches), around powers of two that change the
// rounding of double(h), and the top of the 64-bit range.
std::vector<uint64_t> edge_values(uint64_t p) {
  std::vector<uint64_t> hs;
  auto around = [&](uint64_t c) {
    for (uint64_t d = 0; d <= 3; ++d) {
      hs.push_back(c + d);
      hs.push_back(c - d);
    }
  };
  const uint64_t qmax = ~uint64_t{0} / p;
  for (uint64_t q : {uint64_t{0}, uint64_t{1}, uint64_t{2}, (uint64_t{1} << 32) / p, (uint64_t{1} << 32),
                     (uint64_t{1} << 40), (uint64_t{1} << 49) + 12345, (uint64_t{1} << 63) / p, qmax - 1, qmax}) {
    around(q * p);
    around(q * p + p / 2);
    around(q * p + (p + 1) / 2);
  }
  for (int e = 31; e < 64; ++e) around(uint64_t{1} << e);
  around(~uint64_t{0});
  return hs;
}

std::vector<uint64_t> dmod_divisors() {
  std::vector<uint64_t> ps = {engram::kDmodMinP,
                              engram::kDmodMinP + 1,
                              16411,
                              646403,
                              646619,
                              16000057,
                              (uint64_t{1} << 30) + 3,
                              2147483629,
                              engram::kDmodMaxP - 2,
                              engram::kDmodMaxP - 1};
  std::mt19937_64 rng(11);
  for (int i = 0; i < 40; ++i) ps.push_back(engram::kDmodMinP + rng() % (engram::kDmodMaxP - engram::kDmodMinP));
  return ps;
}

TEST(Dmod, ExactOnEdgeValues) {
  for (uint64_t p : dmod_divisors()) {
    ASSERT_TRUE(engram::dmod_exact(p)) << p;
    const double inv = 1.0 / static_cast<double>(p);
    for (uint64_t h : edge_values(p)) {
      ASSERT_EQ(engram::dmod(h, static_cast<uint32_t>(p), inv), h % p) << h << " mod " << p;
    }
  }
}

TEST(Dmod, ExactOnRandomValues) {
  std::mt19937_64 rng(5);
  for (uint64_t p : dmod_divisors()) {
    const double inv = 1.0 / static_cast<double>(p);
    for (int i = 0; i < 50000; ++i) {
      const uint64_t h = rng() >> (i % 4 == 0 ? 1 : 0);
      ASSERT_EQ(engram::dmod(h, static_cast<uint32_t>(p), inv), h % p) << h << " mod " << p;
    }
  }
}

TEST(Dmod, RangeGuardIsNeeded) {
  // Below kDmodMinP the quotient estimate can be off by more than one step for large h: the
  // kernels must fall back there, which is why dmod_exact exists.
  EXPECT_FALSE(engram::dmod_exact(engram::kDmodMinP - 1));
  EXPECT_FALSE(engram::dmod_exact(engram::kDmodMaxP));
  std::mt19937_64 rng(3);
  int wrong = 0;
  for (uint64_t p : {uint64_t{3}, uint64_t{1021}}) {
    for (int i = 0; i < 1000; ++i) {
      const uint64_t h = rng() | (uint64_t{1} << 63);
      wrong += engram::dmod(h, static_cast<uint32_t>(p), 1.0 / static_cast<double>(p)) != h % p;
    }
  }
  EXPECT_GT(wrong, 0);
}

// ---- kernels ----------------------------------------------------------------------------------

struct Problem {
  int64_t B, T, L, N, K, num_ids;
  std::vector<int64_t> ids, lut;
  std::vector<uint64_t> m, p, magic;
  std::vector<int64_t> off;
  int64_t pad;
  std::vector<char> doc;  // empty: no document starts
  bool oov_to_pad;

  int64_t H() const { return (N - 1) * K; }
  HashArgs args() const {
    return HashArgs{ids.data(),
                    nullptr,
                    B,
                    T,
                    L,
                    N,
                    H(),
                    lut.empty() ? nullptr : lut.data(),
                    num_ids,
                    m.data(),
                    p.data(),
                    magic.data(),
                    off.data(),
                    pad,
                    doc.empty() ? nullptr : reinterpret_cast<const bool*>(doc.data()),
                    oov_to_pad,
                    static_cast<uint64_t>(INT64_MAX)};
  }
};

// Random problem with the official prime layout for nominal table size `vocab` per order.
Problem make_problem(std::mt19937_64& rng, int64_t B, int64_t T, int64_t L, int64_t N, int64_t K, int64_t vocab,
                     bool with_lut, bool with_doc, bool with_oov) {
  Problem pr{B, T, L, N, K, 0, {}, {}, {}, {}, {}, {}, 0, {}, with_oov};
  const int64_t v_comp = 1000 + static_cast<int64_t>(rng() % 200000);
  pr.num_ids = with_lut ? v_comp + 5000 : v_comp;
  if (with_lut) {
    pr.lut.resize(pr.num_ids);
    for (auto& v : pr.lut) v = static_cast<int64_t>(rng() % v_comp);
  }
  pr.pad = static_cast<int64_t>(rng() % v_comp);
  pr.ids.resize(B * T);
  for (auto& v : pr.ids) v = static_cast<int64_t>(rng() % pr.num_ids);
  if (with_oov) {
    for (int64_t i = 0; i < B * T; i += 7) pr.ids[i] = (i % 2) ? -100 : pr.num_ids + 3;
  }
  if (with_doc) {
    pr.doc.resize(B * T);
    for (auto& v : pr.doc) v = rng() % 5 == 0;
  }
  const uint64_t half = std::max<uint64_t>(1, (~uint64_t{0} >> 1) / v_comp / 2);
  for (int64_t i = 0; i < L * N; ++i) pr.m.push_back((rng() % half) * 2 + 1);
  const auto primes = engram::layer_primes(std::vector<int64_t>(N - 1, vocab), L, K);
  for (int64_t l = 0; l < L; ++l) {
    int64_t base = 0;
    for (const auto& order : primes[l]) {
      for (int64_t q : order) {
        pr.p.push_back(q);
        pr.magic.push_back(~uint64_t{0} / q);
        pr.off.push_back(base);
        base += q;
      }
    }
  }
  return pr;
}

// Plain transcription of docs/SPEC.md section 2 with document starts: rows [L, B, T, H].
std::vector<int64_t> scalar_rows(const Problem& pr) {
  const int64_t H = pr.H();
  std::vector<int64_t> out(pr.L * pr.B * pr.T * H);
  auto compressed = [&](int64_t raw) -> uint64_t {
    if (raw < 0 || raw >= pr.num_ids) return pr.pad;
    return pr.lut.empty() ? raw : pr.lut[raw];
  };
  for (int64_t b = 0; b < pr.B; ++b) {
    for (int64_t t = 0; t < pr.T; ++t) {
      std::vector<uint64_t> xs(pr.N, pr.pad);
      for (int64_t k = 0; k < pr.N && t - k >= 0; ++k) {
        xs[k] = compressed(pr.ids[b * pr.T + t - k]);
        if (!pr.doc.empty() && pr.doc[b * pr.T + t - k]) break;  // larger shifts cross a document start
      }
      for (int64_t l = 0; l < pr.L; ++l) {
        uint64_t h = xs[0] * pr.m[l * pr.N];
        for (int64_t k = 1; k < pr.N; ++k) {
          h ^= xs[k] * pr.m[l * pr.N + k];
          for (int64_t j = 0; j < pr.K; ++j) {
            const int64_t c = l * H + (k - 1) * pr.K + j;
            out[((l * pr.B + b) * pr.T + t) * H + (k - 1) * pr.K + j] = static_cast<int64_t>(h % pr.p[c]) + pr.off[c];
          }
        }
      }
    }
  }
  return out;
}

// The kernel variants: the AVX-512 kernel and the portable one with dmod take tables whose primes
// are dmod_exact (and K % 8 == 0 for AVX-512); the portable one with fastmod takes any table.
enum class Variant { kPortableFastmod, kPortableDmod, kAvx512 };

const char* variant_name(Variant v) {
  return v == Variant::kAvx512 ? "avx512" : v == Variant::kPortableDmod ? "portable+dmod" : "portable+fastmod";
}

template <typename out_t>
int64_t run_kernel(Variant v, const HashArgs& a, const engram::cpu::DmodPlan& plan, int64_t begin, int64_t end,
                   out_t* out) {
  switch (v) {
    case Variant::kAvx512:
      return engram::cpu::hash_range_avx512(a, plan, begin, end, out);
    case Variant::kPortableDmod:
      return engram::cpu::hash_range_portable(a, &plan, begin, end, out);
    default:
      return engram::cpu::hash_range_portable(a, nullptr, begin, end, out);
  }
}

std::vector<Variant> variants_on_this_cpu() {
  unsetenv("ENGRAM_NGRAM_HASH_ISA");
  std::vector<Variant> vs = {Variant::kPortableFastmod, Variant::kPortableDmod};
  if (engram::cpu::ngram_hash_isa() == HashIsa::kAvx512) vs.push_back(Variant::kAvx512);
  return vs;
}

// Every kernel on random problems, each over a random split of the tokens into ranges (so ranges
// start mid-sequence and mid-window), against scalar_rows.
TEST(NgramHashKernels, MatchScalarOverRandomRanges) {
  std::mt19937_64 rng(17);
  for (Variant v : variants_on_this_cpu()) {
    for (int trial = 0; trial < 24; ++trial) {
      const int64_t N = 2 + trial % 4;  // 2..5
      const int64_t K = v == Variant::kAvx512 ? 8 * (1 + trial % 3) : 1 + trial % 9;
      const int64_t L = 1 + trial % 3, B = 1 + trial % 3;
      const int64_t T = std::vector<int64_t>{1, 2, 3, 5, 17, 64}[trial % 6];
      const int64_t vocab = v == Variant::kPortableFastmod && trial % 3 == 0 ? 1000 : trial % 2 ? 646400 : 16000000;
      const Problem pr = make_problem(rng, B, T, L, N, K, vocab, trial % 3 != 0, trial % 4 >= 2, trial % 5 == 0);
      const HashArgs a = pr.args();
      const auto plan = engram::cpu::make_dmod_plan(a);
      const auto expected = scalar_rows(pr);
      std::vector<int32_t> out32(expected.size(), -1);
      std::vector<int64_t> out64(expected.size(), -1);
      for (int64_t begin = 0; begin < B * T;) {
        const int64_t end = std::min<int64_t>(B * T, begin + 1 + static_cast<int64_t>(rng() % (T + 3)));
        // Out-of-range ids come only with oov_to_pad, so no range reports one.
        EXPECT_EQ(run_kernel(v, a, plan, begin, end, out32.data()), -1);
        EXPECT_EQ(run_kernel(v, a, plan, begin, end, out64.data()), -1);
        begin = end;
      }
      for (size_t i = 0; i < expected.size(); ++i) {
        ASSERT_EQ(out64[i], expected[i]) << variant_name(v) << " trial " << trial << " at " << i;
        ASSERT_EQ(out32[i], expected[i]) << variant_name(v) << " trial " << trial << " at " << i;
      }
    }
  }
}

TEST(NgramHashKernels, ReportFirstOutOfRangeId) {
  std::mt19937_64 rng(2);
  Problem pr = make_problem(rng, 2, 9, 2, 3, 8, 646400, true, false, false);
  pr.ids[1 * 9 + 4] = -100;
  pr.ids[1 * 9 + 7] = pr.num_ids;
  const HashArgs a = pr.args();
  const auto plan = engram::cpu::make_dmod_plan(a);
  std::vector<int32_t> out(2 * 2 * 9 * 16);
  for (Variant v : variants_on_this_cpu()) {
    EXPECT_EQ(run_kernel(v, a, plan, 0, 18, out.data()), 1 * 9 + 4) << variant_name(v);
    EXPECT_EQ(run_kernel(v, a, plan, 0, 9, out.data()), -1) << variant_name(v);
  }
}

// ---- the op: ENGRAM_NGRAM_HASH_ISA picks the kernel, every kernel gives the same rows ----------

using HashFn = at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, int64_t, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&, int64_t, const std::optional<at::Tensor>&,
                          at::ScalarType, bool);

at::Tensor as_tensor(const std::vector<int64_t>& v) { return at::tensor(at::ArrayRef<int64_t>(v), at::kLong).clone(); }
at::Tensor as_tensor(const std::vector<uint64_t>& v) { return as_tensor(std::vector<int64_t>(v.begin(), v.end())); }

class IsaEnv : public ::testing::Test {
 protected:
  void TearDown() override { unsetenv("ENGRAM_NGRAM_HASH_ISA"); }
};

TEST_F(IsaEnv, EveryKernelGivesTheScalarRows) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("engram::ngram_hash", "").typed<HashFn>();
  std::mt19937_64 rng(23);
  // K = 8 (every kernel), K = 4 and K = 3 (portable only), and a table with primes below
  // kDmodMinP (portable with fastmod).
  struct Case {
    int64_t N, K, vocab;
  };
  for (const Case& c :
       {Case{3, 8, 646400}, Case{4, 8, 16000000}, Case{4, 4, 646400}, Case{3, 3, 646400}, Case{3, 8, 1000}}) {
    const Problem pr = make_problem(rng, 3, 41, 2, c.N, c.K, c.vocab, true, true, false);
    const auto expected = as_tensor(scalar_rows(pr)).view({pr.L, pr.B, pr.T, pr.H()});
    std::vector<char> doc(pr.doc.begin(), pr.doc.end());
    const auto doc_t = as_tensor(std::vector<int64_t>(doc.begin(), doc.end())).to(at::kBool).view({pr.B, pr.T});
    for (const char* isa : {"portable", "avx512", "auto"}) {
      setenv("ENGRAM_NGRAM_HASH_ISA", isa, 1);
      for (at::ScalarType dt : {at::kInt, at::kLong}) {
        auto out = op.call(as_tensor(pr.ids).view({pr.B, pr.T}), as_tensor(pr.lut), pr.num_ids,
                           as_tensor(pr.m).view({pr.L, pr.N}), as_tensor(pr.p).view({pr.L, pr.H()}),
                           as_tensor(pr.off).view({pr.L, pr.H()}), pr.pad, doc_t, dt, false);
        EXPECT_TRUE(at::equal(out.to(at::kLong), expected)) << isa << " N=" << c.N << " K=" << c.K << " " << dt;
      }
    }
  }
}

TEST_F(IsaEnv, CapsTheInstructionSetAndRejectsUnknownNames) {
  unsetenv("ENGRAM_NGRAM_HASH_ISA");
  const HashIsa best = engram::cpu::ngram_hash_isa();
  setenv("ENGRAM_NGRAM_HASH_ISA", "portable", 1);
  EXPECT_EQ(engram::cpu::ngram_hash_isa(), HashIsa::kPortable);
  setenv("ENGRAM_NGRAM_HASH_ISA", "avx512", 1);
  EXPECT_EQ(engram::cpu::ngram_hash_isa(), best);
  setenv("ENGRAM_NGRAM_HASH_ISA", "sse9", 1);
  try {
    engram::cpu::ngram_hash_isa();
    FAIL() << "unknown instruction set accepted";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("ENGRAM_NGRAM_HASH_ISA must be auto, portable or avx512, got 'sse9'"),
              std::string::npos)
        << e.what();
  }
}

}  // namespace
