// CPU kernel of ngram_hash: one task per token, all layers and heads of that token at once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "engram/hash.h"
#include "engram/ngram_hash_check.h"

namespace engram {
namespace {

// Per-head reduction of one order's hash: lanes over heads, so the loop vectorises (one SIMD
// lane per prime). target_clones picks an AVX-512 / AVX2 build at load time on x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ENGRAM_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ENGRAM_TARGET_CLONES
#endif

template <typename out_t>
ENGRAM_TARGET_CLONES void reduce_heads(uint64_t h, const uint64_t* __restrict p, const uint64_t* __restrict magic,
                                       const int64_t* __restrict off, int64_t K, out_t* __restrict row) {
  for (int64_t j = 0; j < K; ++j) {
    row[j] = static_cast<out_t>(static_cast<int64_t>(fastmod_split(h, p[j], magic[j])) + off[j]);
  }
}

template <typename id_t, typename out_t>
void hash_kernel(const id_t* x, int64_t B, int64_t T, const int64_t* lut, int64_t num_ids, const uint64_t* m,
                 int64_t L, int64_t N, int64_t H, const uint64_t* p, const uint64_t* magic, const int64_t* off,
                 int64_t pad_id, const bool* doc_start, bool oov_to_pad, out_t* o) {
  const int64_t K = H / (N - 1);
  std::atomic<int64_t> bad_index{-1};

  at::parallel_for(0, B * T, 2048, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> xs(N);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / T, t = i % T;
      // Compressed ids of the window t, t-1, ..., t-N+1; pads before the start of the sequence
      // and, with doc_start, from the first shift that crosses a document start onwards.
      bool crossed = false;
      for (int64_t k = 0; k < N; ++k) {
        const int64_t s = t - k;
        if (s < 0 || crossed) {
          xs[k] = static_cast<uint64_t>(pad_id);
          continue;
        }
        const int64_t raw = static_cast<int64_t>(x[b * T + s]);
        int64_t c;
        if (raw < 0 || raw >= num_ids) {
          if (!oov_to_pad) {
            int64_t expected = -1;
            bad_index.compare_exchange_strong(expected, b * T + s);
          }
          c = pad_id;
        } else {
          c = lut ? lut[raw] : raw;
        }
        xs[k] = static_cast<uint64_t>(c);
        if (doc_start && doc_start[b * T + s]) crossed = true;
      }
      for (int64_t l = 0; l < L; ++l) {
        uint64_t h = xs[0] * m[l * N];
        out_t* row = o + ((l * B + b) * T + t) * H;
        for (int64_t k = 1; k < N; ++k) {
          h = mix_step(h, xs[k], m[l * N + k]);
          const int64_t c = l * H + (k - 1) * K;
          reduce_heads<out_t>(h, p + c, magic + c, off + c, K, row + (k - 1) * K);
        }
      }
    }
  });
  const int64_t bad = bad_index.load();
  TORCH_CHECK(bad < 0, "ngram_hash: ids must lie in [0, ", num_ids, ") (the compression LUT length), got ",
              static_cast<int64_t>(x[bad]), " at [", bad / T, ", ", bad % T,
              "]; pass oov_to_pad=True to map such ids to the pad id");
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
  const int64_t* lut_ptr = lut.has_value() ? lut_c.data_ptr<int64_t>() : nullptr;
  const bool* doc_ptr = doc_start.has_value() ? doc_c.data_ptr<bool>() : nullptr;
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "ngram_hash_ids", [&] {
    using id_t = index_t;
    AT_DISPATCH_INDEX_TYPES(out_dtype, "ngram_hash_out", [&] {
      hash_kernel<id_t, index_t>(ids_c.data_ptr<id_t>(), ids.size(0), ids.size(1), lut_ptr, num_ids,
                                 reinterpret_cast<const uint64_t*>(mult_c.data_ptr<int64_t>()), L,
                                 multipliers.size(1), H, mod_p.data(), mod_magic.data(), o, pad_id, doc_ptr,
                                 oov_to_pad, out.data_ptr<index_t>());
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CPU, m) { m.impl("ngram_hash", &ngram_hash_cpu); }

}  // namespace engram
