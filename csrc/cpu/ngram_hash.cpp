// CPU kernel of ngram_hash: one task per token, all layers and heads of that token at once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "engram/hash.h"
#include "engram/ngram_hash_check.h"

namespace engram {
namespace {

// The token loop is compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time, so
// the per-head reductions (one SIMD lane per prime, fastmod_split) vectorise wherever possible.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ENGRAM_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ENGRAM_TARGET_CLONES
#endif

struct HashArgs {
  const int64_t* x;  // raw ids [B, T] (int32 ids are widened first)
  int64_t B, T, L, N, H;
  const int64_t* lut;  // nullptr: ids are already compressed
  int64_t num_ids;
  const uint64_t* m;      // [L, N]
  const uint64_t* p;      // [L, H]
  const uint64_t* magic;  // [L, H]
  const int64_t* off;     // [L, H]
  int64_t pad_id;
  const bool* doc_start;  // nullptr: no document boundaries
  bool oov_to_pad;
};

// Output row of (layer l, token i = b * T + t) is l * B * T + i in [L, B, T, H]. Tokens are
// processed one sequence segment at a time: the segment's ids (and the N - 1 before it) are
// compressed once into xc, so each LUT entry is read once rather than N times.
template <typename out_t, int64_t K_FIXED>
__attribute__((always_inline)) inline int64_t hash_range_impl(const HashArgs& a, int64_t begin, int64_t end,
                                                              out_t* __restrict o) {
  const int64_t K = K_FIXED > 0 ? K_FIXED : a.H / (a.N - 1);
  const int64_t N = a.N;
  std::vector<uint64_t> xc;
  int64_t bad = -1;
  for (int64_t seg = begin; seg < end;) {
    const int64_t b = seg / a.T, t0 = seg % a.T;
    const int64_t t1 = std::min(a.T, t0 + (end - seg));
    const int64_t first = std::max<int64_t>(0, t0 - (N - 1));
    const int64_t* x = a.x + b * a.T;
    const bool* ds = a.doc_start ? a.doc_start + b * a.T : nullptr;
    xc.resize(t1 - first);
    for (int64_t s = first; s < t1; ++s) {
      const int64_t raw = x[s];
      int64_t c;
      if (raw < 0 || raw >= a.num_ids) {
        if (!a.oov_to_pad && bad < 0) bad = b * a.T + s;
        c = a.pad_id;
      } else {
        c = a.lut ? a.lut[raw] : raw;
      }
      xc[s - first] = static_cast<uint64_t>(c);
    }
    for (int64_t t = t0; t < t1; ++t) {
      // Window t, t-1, ..., t-N+1: pad before the sequence start and, with doc_start, from the
      // first shift that crosses a document start onwards.
      uint64_t xs[16];
      bool crossed = false;
      for (int64_t k = 0; k < N; ++k) {
        const int64_t s = t - k;
        if (s < 0 || crossed) {
          xs[k] = static_cast<uint64_t>(a.pad_id);
        } else {
          xs[k] = xc[s - first];
          if (ds && ds[s]) crossed = true;
        }
      }
      const int64_t i = b * a.T + t;
      for (int64_t l = 0; l < a.L; ++l) {
        const uint64_t* m = a.m + l * N;
        uint64_t h = xs[0] * m[0];
        out_t* __restrict row = o + (l * a.B * a.T + i) * a.H;
        for (int64_t k = 1; k < N; ++k) {
          h = mix_step(h, xs[k], m[k]);
          const int64_t c = l * a.H + (k - 1) * K;
          const uint64_t* __restrict p = a.p + c;
          const uint64_t* __restrict mg = a.magic + c;
          const int64_t* __restrict off = a.off + c;
          out_t* __restrict dst = row + (k - 1) * K;
          for (int64_t j = 0; j < K; ++j) {
            dst[j] = static_cast<out_t>(static_cast<int64_t>(fastmod_split(h, p[j], mg[j])) + off[j]);
          }
        }
      }
    }
    seg += t1 - t0;
  }
  return bad;
}

ENGRAM_TARGET_CLONES int64_t hash_range_i32(const HashArgs& a, int64_t begin, int64_t end, int32_t* o) {
  return a.H / (a.N - 1) == 8 ? hash_range_impl<int32_t, 8>(a, begin, end, o)
                              : hash_range_impl<int32_t, 0>(a, begin, end, o);
}

ENGRAM_TARGET_CLONES int64_t hash_range_i64(const HashArgs& a, int64_t begin, int64_t end, int64_t* o) {
  return a.H / (a.N - 1) == 8 ? hash_range_impl<int64_t, 8>(a, begin, end, o)
                              : hash_range_impl<int64_t, 0>(a, begin, end, o);
}

at::Tensor ngram_hash_cpu(const at::Tensor& ids, const std::optional<at::Tensor>& lut, int64_t num_ids,
                          const at::Tensor& multipliers, const at::Tensor& primes, const at::Tensor& offsets,
                          int64_t pad_id, const std::optional<at::Tensor>& doc_start, at::ScalarType out_dtype,
                          bool oov_to_pad) {
  check_ngram_hash_args(ids, lut, num_ids, multipliers, primes, offsets, pad_id, doc_start, out_dtype);
  const int64_t L = multipliers.size(0), H = primes.size(1);
  auto ids_c = ids.contiguous();
  auto mult_c = multipliers.contiguous();
  auto off_c = offsets.contiguous();
  auto primes_c = primes.contiguous();
  at::Tensor lut_c;
  if (lut.has_value()) lut_c = lut->contiguous();
  at::Tensor doc_c;
  if (doc_start.has_value()) doc_c = doc_start->contiguous();

  // Table layout checks need the values; on the CPU they are free.
  std::vector<uint64_t> mod_p(L * H), mod_magic(L * H);
  const int64_t* p = primes_c.data_ptr<int64_t>();
  const int64_t* o = off_c.data_ptr<int64_t>();
  for (int64_t c = 0; c < L * H; ++c) {
    TORCH_CHECK(p[c] >= 1, "ngram_hash: primes must be positive, got ", p[c], " at flat index ", c);
    TORCH_CHECK(o[c] >= 0, "ngram_hash: offsets must be non-negative, got ", o[c], " at flat index ", c);
    const FastMod f = make_fastmod(static_cast<uint64_t>(p[c]));
    mod_p[c] = f.p;
    mod_magic[c] = f.magic;
    if (out_dtype == at::kInt) {
      TORCH_CHECK(o[c] + p[c] <= (int64_t{1} << 31),
                  "ngram_hash: out_dtype=int32 needs fewer than 2^31 rows per layer, but table ", c,
                  " ends at row ", o[c] + p[c], "; use out_dtype=torch.int64");
    }
  }

  auto out = at::empty({L, ids.size(0), ids.size(1), H}, ids.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  TORCH_CHECK(multipliers.size(1) <= 16, "ngram_hash: max_ngram_size must be <= 16, got ", multipliers.size(1));
  // Widening int32 ids once keeps one kernel per output type.
  auto ids_l = ids_c.to(at::kLong);
  HashArgs a{ids_l.data_ptr<int64_t>(), ids.size(0), ids.size(1), L, multipliers.size(1), H,
             lut.has_value() ? lut_c.data_ptr<int64_t>() : nullptr, num_ids,
             reinterpret_cast<const uint64_t*>(mult_c.data_ptr<int64_t>()), mod_p.data(), mod_magic.data(), o,
             pad_id, doc_start.has_value() ? doc_c.data_ptr<bool>() : nullptr, oov_to_pad};
  std::atomic<int64_t> bad_index{-1};
  at::parallel_for(0, a.B * a.T, 2048, [&](int64_t begin, int64_t end) {
    const int64_t bad = out_dtype == at::kInt ? hash_range_i32(a, begin, end, out.data_ptr<int32_t>())
                                              : hash_range_i64(a, begin, end, out.data_ptr<int64_t>());
    if (bad >= 0) {
      int64_t expected = -1;
      bad_index.compare_exchange_strong(expected, bad);
    }
  });
  const int64_t bad = bad_index.load();
  TORCH_CHECK(bad < 0, "ngram_hash: ids must lie in [0, ", num_ids, ") (the compression LUT length), got ",
              a.x[bad], " at [", bad / a.T, ", ", bad % a.T, "]; pass oov_to_pad=True to map such ids to the pad id");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CPU, m) { m.impl("ngram_hash", &ngram_hash_cpu); }

}  // namespace engram
