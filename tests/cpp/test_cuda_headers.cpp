// The torch-free code that the CUDA kernels run, checked on the CPU: the per-token hash of the
// CUDA ngram_hash kernel (engram/ngram_window.h) against the CPU op bit for bit, and the launch
// arithmetic of the gather/scatter kernels (engram/gather_launch.h).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "engram/gather_launch.h"
#include "engram/hash.h"
#include "engram/ngram_window.h"

namespace {

using HashFn = at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, int64_t, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&, int64_t, const std::optional<at::Tensor>&,
                          at::ScalarType, bool);

at::Tensor cpu_hash(const at::Tensor& ids, const std::optional<at::Tensor>& lut, int64_t num_ids,
                    const at::Tensor& mult, const at::Tensor& primes, const at::Tensor& offsets, int64_t pad,
                    const std::optional<at::Tensor>& doc_start, bool oov_to_pad) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("engram::ngram_hash", "").typed<HashFn>();
  return op.call(ids, lut, num_ids, mult, primes, offsets, pad, doc_start, at::kLong, oov_to_pad);
}

// The CUDA kernel's per-token code, run serially: ngram_window then ngram_rows per layer.
template <typename id_t>
at::Tensor window_hash(const at::Tensor& ids, const std::optional<at::Tensor>& lut, int64_t num_ids,
                       const at::Tensor& mult, const at::Tensor& primes, const at::Tensor& offsets, int64_t pad,
                       const std::optional<at::Tensor>& doc_start, int64_t* first_bad) {
  const int64_t B = ids.size(0), T = ids.size(1), L = mult.size(0), N = mult.size(1), H = primes.size(1);
  const int K = static_cast<int>(H / (N - 1));
  std::vector<engram::FastMod> mods(L * H);
  for (int64_t c = 0; c < L * H; ++c) mods[c] = engram::make_fastmod(primes.data_ptr<int64_t>()[c]);
  auto out = at::empty({L, B, T, H}, at::kLong);
  std::vector<uint64_t> xs(N);
  *first_bad = -1;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t bad = engram::ngram_window<id_t>(
          ids.data_ptr<id_t>() + b * T, doc_start ? doc_start->data_ptr<bool>() + b * T : nullptr, t,
          static_cast<int>(N), lut ? lut->data_ptr<int64_t>() : nullptr, num_ids, pad, xs.data());
      if (bad >= 0 && *first_bad < 0) *first_bad = b * T + bad;
      for (int64_t l = 0; l < L; ++l) {
        engram::ngram_rows<int64_t>(xs.data(), static_cast<int>(N), K,
                                    reinterpret_cast<const uint64_t*>(mult.data_ptr<int64_t>()) + l * N,
                                    mods.data() + l * H, offsets.data_ptr<int64_t>() + l * H,
                                    out.data_ptr<int64_t>() + ((l * B + b) * T + t) * H);
      }
    }
  }
  return out;
}

struct Layout {
  at::Tensor mult, primes, offsets;
};

Layout random_layout(std::mt19937_64& rng, int64_t L, int64_t N, int64_t K, int64_t v_comp) {
  const int64_t H = (N - 1) * K;
  auto mult = at::empty({L, N}, at::kLong);
  auto primes = at::empty({L, H}, at::kLong);
  auto offsets = at::empty({L, H}, at::kLong);
  const uint64_t half = std::max<uint64_t>(1, (static_cast<uint64_t>(INT64_MAX) / v_comp) / 2);
  for (int64_t i = 0; i < L * N; ++i) mult.data_ptr<int64_t>()[i] = static_cast<int64_t>(2 * (rng() % half) + 1);
  for (int64_t l = 0; l < L; ++l) {
    int64_t base = 0;
    uint64_t p = 1000 + rng() % 100000;
    for (int64_t j = 0; j < H; ++j) {
      do ++p;
      while (!engram::is_prime(p));
      primes.data_ptr<int64_t>()[l * H + j] = static_cast<int64_t>(p);
      offsets.data_ptr<int64_t>()[l * H + j] = base;
      base += static_cast<int64_t>(p);
    }
  }
  return {mult, primes, offsets};
}

TEST(CudaHashWindow, MatchesCpuOpBitForBit) {
  std::mt19937_64 rng(2024);
  struct Case {
    int64_t B, T, N, K, L;
    bool lut, doc;
  };
  const Case cases[] = {{3, 17, 3, 8, 2, true, true},  {2, 9, 4, 2, 1, false, true}, {1, 1, 3, 4, 2, true, false},
                        {2, 2, 4, 3, 2, false, false}, {4, 33, 2, 1, 3, true, true}, {1, 5, 5, 2, 1, true, true}};
  for (const Case& cs : cases) {
    const int64_t num_ids = 500, v_comp = 300, pad = 7;
    Layout lay = random_layout(rng, cs.L, cs.N, cs.K, v_comp);
    auto ids = at::randint(0, num_ids, {cs.B, cs.T}, at::kLong);
    std::optional<at::Tensor> lut, doc;
    int64_t range = num_ids;
    if (cs.lut) {
      lut = at::randint(0, v_comp, {num_ids}, at::kLong);
    } else {
      range = v_comp;
      ids = at::randint(0, v_comp, {cs.B, cs.T}, at::kLong);
    }
    if (cs.doc) doc = at::rand({cs.B, cs.T}) < 0.3;
    int64_t bad = 0;
    auto expected = cpu_hash(ids, lut, range, lay.mult, lay.primes, lay.offsets, pad, doc, false);
    auto got = window_hash<int64_t>(ids, lut, range, lay.mult, lay.primes, lay.offsets, pad, doc, &bad);
    EXPECT_EQ(bad, -1);
    EXPECT_TRUE(at::equal(got, expected)) << "B=" << cs.B << " T=" << cs.T << " N=" << cs.N;
    auto got32 = window_hash<int32_t>(ids.to(at::kInt), lut, range, lay.mult, lay.primes, lay.offsets, pad, doc, &bad);
    EXPECT_TRUE(at::equal(got32, expected)) << "int32 ids, B=" << cs.B << " T=" << cs.T;
  }
}

TEST(CudaHashWindow, OutOfRangeIdsReadAsPad) {
  std::mt19937_64 rng(5);
  Layout lay = random_layout(rng, 2, 3, 4, 50);
  auto ids = at::randint(0, 50, {2, 12}, at::kLong);
  ids[0][3] = -100;
  ids[1][0] = 50;
  ids[1][7] = 1 << 20;
  int64_t bad = 0;
  auto expected = cpu_hash(ids, std::nullopt, 50, lay.mult, lay.primes, lay.offsets, 4, std::nullopt, true);
  auto got = window_hash<int64_t>(ids, std::nullopt, 50, lay.mult, lay.primes, lay.offsets, 4, std::nullopt, &bad);
  EXPECT_TRUE(at::equal(got, expected));
  EXPECT_EQ(bad, 3);  // the first bad position seen scanning tokens in order: [0, 3]
}

TEST(CudaHashWindow, DocStartPadsEveryLargerShift) {
  // N = 4, a document starting at t = 2: token 3 reads ids 3, 2 then pad, pad.
  const int64_t ids[] = {11, 12, 13, 14, 15};
  const bool doc[] = {true, false, true, false, false};
  uint64_t xs[4];
  EXPECT_EQ(engram::ngram_window<int64_t>(ids, doc, 3, 4, nullptr, 100, 9, xs), -1);
  EXPECT_EQ(xs[0], 14u);
  EXPECT_EQ(xs[1], 13u);
  EXPECT_EQ(xs[2], 9u);
  EXPECT_EQ(xs[3], 9u);
  // Without doc_start the window runs back to the sequence start, then pads.
  engram::ngram_window<int64_t>(ids, nullptr, 1, 4, nullptr, 100, 9, xs);
  EXPECT_EQ(xs[0], 12u);
  EXPECT_EQ(xs[1], 11u);
  EXPECT_EQ(xs[2], 9u);
  EXPECT_EQ(xs[3], 9u);
}

TEST(GatherLaunch, VectorBytes) {
  EXPECT_EQ(engram::vector_bytes(128, 128, 0x1000), 16);  // d_head 64 bfloat16
  EXPECT_EQ(engram::vector_bytes(128, 256, 0x1000), 16);  // column slice of a wider table
  EXPECT_EQ(engram::vector_bytes(128, 0, 0x1000), 16);    // expanded table (pitch 0)
  EXPECT_EQ(engram::vector_bytes(24, 24, 0x1000), 8);     // d_head 3 float64
  EXPECT_EQ(engram::vector_bytes(128, 128, 0x1008), 8);   // misaligned base
  EXPECT_EQ(engram::vector_bytes(12, 12, 0x1000), 4);     // d_head 3 float32
  EXPECT_EQ(engram::vector_bytes(6, 6, 0x1000), 2);       // d_head 3 bfloat16
  EXPECT_EQ(engram::vector_bytes(128, 130, 0x1000), 2);   // odd pitch in elements
}

TEST(GatherLaunch, RowGroupSize) {
  EXPECT_EQ(engram::row_group_size(1), 1);
  EXPECT_EQ(engram::row_group_size(3), 4);
  EXPECT_EQ(engram::row_group_size(8), 8);
  EXPECT_EQ(engram::row_group_size(32), 32);
  EXPECT_EQ(engram::row_group_size(1000), 32);
  for (int g : {1, 2, 4, 8, 16, 32}) EXPECT_EQ(1 << engram::log2_pow2(g), g);
}

TEST(GatherLaunch, RadixEndBitCoversEveryRow) {
  for (int64_t num_rows : {int64_t{1}, int64_t{2}, int64_t{3}, int64_t{4}, int64_t{5}, int64_t{1} << 20,
                           (int64_t{1} << 20) + 1, int64_t{10344164}, int64_t{384016682}, int64_t{1} << 31}) {
    const int bits = engram::radix_end_bit(num_rows, 64);
    EXPECT_GE(bits, 1);
    EXPECT_LE(static_cast<uint64_t>(num_rows - 1) >> bits, 0u) << num_rows;                      // every row id fits
    if (bits > 1) EXPECT_GT(static_cast<uint64_t>(num_rows - 1) >> (bits - 1), 0u) << num_rows;  // and no more
  }
  EXPECT_EQ(engram::radix_end_bit(10344164, 64), 24);
  EXPECT_EQ(engram::radix_end_bit(int64_t{1} << 40, 32), 32);  // clamped to the key width
}

TEST(GatherLaunch, HotRowTiles) {
  EXPECT_FALSE(engram::is_hot_row(engram::kHotRowReaders));
  EXPECT_TRUE(engram::is_hot_row(engram::kHotRowReaders + 1));
  EXPECT_EQ(engram::hot_tile_rows(8, 256, 8), 256);  // d_head 64 bfloat16: 256 reader rows per tile
  EXPECT_EQ(engram::hot_tile_rows(256, 256, 8), 8);
  EXPECT_EQ(engram::hot_tile_rows(3, 256, 8), 682);
  for (int v = 1; v <= 256; ++v) EXPECT_LE(engram::hot_tile_rows(v, 256, 8) * v, 256 * 8);
}

}  // namespace
