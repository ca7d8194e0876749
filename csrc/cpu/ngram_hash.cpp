// CPU kernel of ngram_hash: tokens split across threads, each range hashed one sequence segment
// and one layer at a time. Picks the kernel per call: the AVX-512 one of ngram_hash_x86.cpp
// (every prime in [2^14, 2^31), K a multiple of 8) or the portable one below (any table).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "check/ngram_hash.h"
#include "engram/hash.h"
#include "ngram_hash_kernels.h"
#include "rows.h"

namespace engram {
namespace cpu {
namespace {

// The portable kernel: plain loops over the hash.h functions, compiled for AVX-512, AVX2 and
// baseline x86-64 and picked at load time, so the loop over the K heads of one order (one SIMD
// lane per prime) vectorises wherever possible; other architectures get the compiler's own
// vectorisation. dmod (one FMA per head) where every prime allows it, fastmod_split (Barrett, a
// 64x64-bit high product from 32-bit halves) otherwise.

// Tokens u = 0 .. n-1 of one segment and layer l (see for_each_segment): window of token u
// at xr[n - 1 - u], output row at row + u * H. s: the dmod constants, or nullptr for fastmod.
template <typename out_t, bool DOC, bool DMOD, int64_t K_FIXED>
ENGRAM_INLINE void portable_layer(const HashArgs& a, const DmodPlan* s, int64_t l, const uint64_t* xr,
                                  const int64_t* dist, int64_t n, out_t* __restrict row) {
  const int64_t N = a.N, H = a.H, K = K_FIXED > 0 ? K_FIXED : H / (N - 1);
  const uint64_t* m = a.m + l * N;
  const uint64_t pad = static_cast<uint64_t>(a.pad_id);
  // The layer's constants, head c at [c]; loaded once, not per token.
  const double* __restrict inv = DMOD ? s->inv.data() + l * s->stride() : nullptr;
  const int32_t* __restrict p32 = DMOD ? s->p.data() + l * s->stride() : nullptr;
  const int32_t* __restrict off32 = DMOD ? s->off32.data() + l * s->stride() : nullptr;
  const uint64_t* __restrict p = a.p + l * H;
  const uint64_t* __restrict magic = a.magic + l * H;
  const int64_t* __restrict off = a.off + l * H;
  const uint64_t* w = xr + (n - 1);
  for (int64_t u = 0; u < n; ++u, --w, row += H) {
    // h of order k + 1 after step k; the loop over the K heads of that order is the one that
    // vectorises (it needs plain locals: restrict is lost on lambda captures).
    uint64_t h = w[0] * m[0];
    for (int64_t k = 1; k < N; ++k) {
      h = mix_step(h, (!DOC || k <= dist[u]) ? w[k] : pad, m[k]);
      const int64_t c = (k - 1) * K;
      out_t* __restrict dst = row + c;
      // Not unrolled: fully unrolled (-O3, K = 8) GCC no longer vectorises it.
#pragma GCC unroll 1
      for (int64_t j = 0; j < K; ++j) {
        if constexpr (DMOD && std::is_same_v<out_t, int32_t>) {
          dst[j] = static_cast<int32_t>(dmod(h, p32[c + j], inv[c + j])) + off32[c + j];
        } else if constexpr (DMOD) {
          dst[j] = static_cast<int64_t>(dmod(h, p32[c + j], inv[c + j])) + off[c + j];
        } else {
          dst[j] = static_cast<out_t>(static_cast<int64_t>(fastmod_split(h, p[c + j], magic[c + j])) + off[c + j]);
        }
      }
    }
  }
}

template <typename out_t, bool DOC, bool DMOD>
ENGRAM_INLINE int64_t portable_range(const HashArgs& a, const DmodPlan* s, int64_t begin, int64_t end, out_t* o) {
  const bool k8 = a.H / (a.N - 1) == 8;
  return for_each_segment(a, begin, end,
                          [&](int64_t l, const uint64_t* xr, const int64_t* dist, int64_t n, int64_t seg)
                              ENGRAM_INLINE_LAMBDA {
                                out_t* row = o + (l * a.B * a.T + seg) * a.H;
                                if (k8) {
                                  portable_layer<out_t, DOC, DMOD, 8>(a, s, l, xr, dist, n, row);
                                } else {
                                  portable_layer<out_t, DOC, DMOD, 0>(a, s, l, xr, dist, n, row);
                                }
                              });
}

template <typename out_t>
ENGRAM_INLINE int64_t portable_kernel(const HashArgs& a, const DmodPlan* s, int64_t begin, int64_t end, out_t* o) {
  if (s) {
    return a.doc_start ? portable_range<out_t, true, true>(a, s, begin, end, o)
                       : portable_range<out_t, false, true>(a, s, begin, end, o);
  }
  return a.doc_start ? portable_range<out_t, true, false>(a, s, begin, end, o)
                     : portable_range<out_t, false, false>(a, s, begin, end, o);
}

}  // namespace

HashIsa ngram_hash_isa() {
  HashIsa best = HashIsa::kPortable;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw")) {
    best = HashIsa::kAvx512;
  }
#endif
  const char* env = std::getenv("ENGRAM_NGRAM_HASH_ISA");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) return best;
  HashIsa cap;
  if (std::strcmp(env, "portable") == 0) {
    cap = HashIsa::kPortable;
  } else if (std::strcmp(env, "avx512") == 0) {
    cap = HashIsa::kAvx512;
  } else {
    TORCH_CHECK(false, "ngram_hash: ENGRAM_NGRAM_HASH_ISA must be auto, portable or avx512, got '", env, "'");
  }
  return std::min(best, cap);
}

const char* isa_name(HashIsa isa) { return isa == HashIsa::kAvx512 ? "avx512" : "portable"; }

ENGRAM_CPU_CLONES int64_t hash_range_portable(const HashArgs& a, const DmodPlan* s, int64_t begin, int64_t end,
                                              int32_t* out) {
  return portable_kernel(a, s, begin, end, out);
}

ENGRAM_CPU_CLONES int64_t hash_range_portable(const HashArgs& a, const DmodPlan* s, int64_t begin, int64_t end,
                                              int64_t* out) {
  return portable_kernel(a, s, begin, end, out);
}

}  // namespace cpu

namespace {

using cpu::DmodPlan;
using cpu::HashArgs;
using cpu::HashIsa;

// dmod needs a fused multiply-add; without the instruction (x86-64 before AVX2) it is a slow
// library call, and the Barrett form is faster.
bool has_fast_fma() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  return __builtin_cpu_supports("fma");
#elif defined(__aarch64__) || defined(__FP_FAST_FMA)
  return true;
#else
  return false;
#endif
}

at::Tensor ngram_hash_cpu(const at::Tensor& ids, const std::optional<at::Tensor>& lut, int64_t num_ids,
                          const at::Tensor& multipliers, const at::Tensor& primes, const at::Tensor& offsets,
                          int64_t pad_id, const std::optional<at::Tensor>& doc_start, at::ScalarType out_dtype,
                          bool oov_to_pad) {
  const NgramHashArgs in =
      prepare_ngram_hash(ids, lut, num_ids, multipliers, primes, offsets, pad_id, doc_start, out_dtype);
  const int64_t L = in.L, H = in.H;
  const at::Tensor& ids_c = in.ids;
  const at::Tensor& mult_c = in.multipliers;
  const at::Tensor& off_c = in.offsets;
  const at::Tensor& primes_c = in.primes;

  // Table layout checks need the values; on the CPU they are free.
  std::vector<uint64_t> mod_p(L * H), mod_magic(L * H);
  bool dmod_ok = true;
  const int64_t* p = primes_c.data_ptr<int64_t>();
  const int64_t* o = off_c.data_ptr<int64_t>();
  for (int64_t c = 0; c < L * H; ++c) {
    TORCH_CHECK(p[c] >= 1, "ngram_hash: primes must be positive, got ", p[c], " at flat index ", c);
    TORCH_CHECK(o[c] >= 0, "ngram_hash: offsets must be non-negative, got ", o[c], " at flat index ", c);
    const FastMod f = make_fastmod(static_cast<uint64_t>(p[c]));
    mod_p[c] = f.p;
    mod_magic[c] = f.magic;
    dmod_ok = dmod_ok && dmod_exact(f.p);
    if (out_dtype == at::kInt) {
      TORCH_CHECK(o[c] + p[c] <= (int64_t{1} << 31),
                  "ngram_hash: out_dtype=int32 needs fewer than 2^31 rows per layer, but table ", c, " ends at row ",
                  o[c] + p[c], "; use out_dtype=torch.int64");
    }
  }

  // Compressed ids (LUT entries, ids without a LUT, the pad id) must keep x' * m within int64.
  uint64_t m_max = 1;
  const int64_t* mv = mult_c.data_ptr<int64_t>();
  for (int64_t c = 0; c < mult_c.numel(); ++c) {
    TORCH_CHECK(mv[c] >= 1, "ngram_hash: multipliers must be positive, got ", mv[c], " at flat index ", c);
    m_max = std::max(m_max, static_cast<uint64_t>(mv[c]));
  }
  const uint64_t max_id =
      std::min<uint64_t>(static_cast<uint64_t>(num_ids - 1), static_cast<uint64_t>(INT64_MAX) / m_max);
  TORCH_CHECK(static_cast<uint64_t>(pad_id) <= max_id, "ngram_hash: pad_id must be a compressed id in [0, ", max_id + 1,
              ") (below num_ids and such that pad_id * multiplier fits in int64), got ", pad_id);

  const at::Tensor& out = in.out;
  if (out.numel() == 0) return out;
  const bool ids32 = ids_c.scalar_type() == at::kInt;
  HashArgs a{ids32 ? nullptr : ids_c.data_ptr<int64_t>(),
             ids32 ? ids_c.data_ptr<int32_t>() : nullptr,
             ids.size(0),
             ids.size(1),
             L,
             multipliers.size(1),
             H,
             in.lut.defined() ? in.lut.data_ptr<int64_t>() : nullptr,
             num_ids,
             reinterpret_cast<const uint64_t*>(mult_c.data_ptr<int64_t>()),
             mod_p.data(),
             mod_magic.data(),
             o,
             pad_id,
             in.doc_start.defined() ? in.doc_start.data_ptr<bool>() : nullptr,
             oov_to_pad,
             max_id};
  // The AVX-512 kernel takes half chunks of 8 heads of one order; the dmod constants serve it and
  // the portable kernel alike.
  const bool use_dmod = dmod_ok && has_fast_fma();
  const HashIsa best = cpu::ngram_hash_isa();  // read (and checked) at every call
  const HashIsa isa = use_dmod && (H / (a.N - 1)) % 8 == 0 ? best : HashIsa::kPortable;
  const DmodPlan plan = use_dmod ? cpu::make_dmod_plan(a) : DmodPlan{};
  const DmodPlan* dplan = use_dmod ? &plan : nullptr;
  std::atomic<int64_t> bad_index{-1};
  at::parallel_for(0, a.B * a.T, 2048, [&](int64_t begin, int64_t end) {
    int64_t bad;
    if (out_dtype == at::kInt) {
      int32_t* o32 = out.data_ptr<int32_t>();
      bad = isa == HashIsa::kAvx512 ? cpu::hash_range_avx512(a, plan, begin, end, o32)
                                    : cpu::hash_range_portable(a, dplan, begin, end, o32);
    } else {
      int64_t* o64 = out.data_ptr<int64_t>();
      bad = isa == HashIsa::kAvx512 ? cpu::hash_range_avx512(a, plan, begin, end, o64)
                                    : cpu::hash_range_portable(a, dplan, begin, end, o64);
    }
    if (bad >= 0) {
      int64_t expected = -1;
      bad_index.compare_exchange_strong(expected, bad);
    }
  });
  const int64_t bad = bad_index.load();
  if (bad >= 0) {
    const int64_t raw = cpu::raw_id(a, bad);
    if (raw >= 0 && raw < num_ids) {
      const int64_t c = a.lut ? a.lut[raw] : raw;
      TORCH_CHECK(false, "ngram_hash: ", a.lut ? "lut entries" : "ids", " must be compressed ids in [0, ", max_id + 1,
                  ") (below num_ids and such that id * multiplier fits in int64), got ",
                  a.lut ? "lut[" + std::to_string(raw) + "] = " : std::string(), c, " at [", bad / a.T, ", ", bad % a.T,
                  "]");
    }
  }
  TORCH_CHECK(bad < 0, "ngram_hash: ids must lie in [0, ", num_ids, ") (the compression LUT length), got ",
              cpu::raw_id(a, bad), " at [", bad / a.T, ", ", bad % a.T,
              "]; pass oov_to_pad=True to map such ids to the pad id");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CPU, m) { m.impl("ngram_hash", &ngram_hash_cpu); }

}  // namespace engram
