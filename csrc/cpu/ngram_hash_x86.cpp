// AVX-512 kernel of the CPU ngram_hash op: the double-quotient modulo of engram/hash.h (dmod)
// with one SIMD lane per head, in intrinsics. Its functions carry their own target attribute and
// ngram_hash.cpp calls them only on a CPU that has the instructions, so the library loads anywhere.
#include <type_traits>

#include "engram/hash.h"
#include "ngram_hash_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define ENGRAM_X86_KERNELS 1
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 intrinsics pass _mm512_undefined_*() as the unused merge source of unmasked
// operations, which -Wmaybe-uninitialized reports at every call.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#else
#define ENGRAM_X86_KERNELS 0
#endif

namespace engram::cpu {

#if ENGRAM_X86_KERNELS
namespace {

#define ENGRAM_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw")))

// One layer at a time over a segment of tokens (so the layer's constants stay in registers), the
// order hashes of each token mixed in scalar registers (a vector mix needs lane shuffles that
// cost more than they save), then each half chunk of 8 heads of one order takes its hash by a
// broadcast load. The quotient estimates are doubles (one FMA per 8 heads); their low 32 bits
// are packed into 16 int32 lanes, where the rest of dmod runs.

// ---- AVX-512: chunks of 16 heads, needs K % 8 == 0 (each half chunk has one order) ----------

struct Chunk512 {
  __m512d inv_a, inv_b;  // 1 / p of heads 0-7 and 8-15
  __m512i p;             // 16 x int32
  __m512i off_a, off_b;  // int32 output: 16 offsets in off_a; int64: heads 0-7 and 8-15
  int64_t oa, ob;        // order lane (n - 1) of heads 0-7 and 8-15
  __mmask16 keep;        // heads that exist
};

template <typename out_t>
ENGRAM_AVX512 inline Chunk512 load_chunk(const HashArgs& a, const DmodPlan& s, int64_t l, int64_t h0) {
  const int64_t HP = s.stride(), left = a.H - h0;
  Chunk512 c;
  c.inv_a = _mm512_loadu_pd(s.inv.data() + l * HP + h0);
  c.inv_b = _mm512_loadu_pd(s.inv.data() + l * HP + h0 + 8);
  c.p = _mm512_loadu_si512(s.p.data() + l * HP + h0);
  c.oa = s.order_lane[h0];
  c.ob = s.order_lane[h0 + 8];
  c.keep = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
  if constexpr (std::is_same_v<out_t, int32_t>) {
    c.off_a = _mm512_loadu_si512(s.off32.data() + l * HP + h0);
    c.off_b = _mm512_setzero_si512();
  } else {
    const int64_t* off = a.off + l * a.H + h0;
    c.off_a = _mm512_maskz_loadu_epi64(static_cast<__mmask8>(c.keep), off);
    c.off_b = _mm512_maskz_loadu_epi64(static_cast<__mmask8>(c.keep >> 8), off + 8);
  }
  return c;
}

template <typename out_t>
ENGRAM_AVX512 ENGRAM_INLINE void hash_chunk(const Chunk512& c, const double* hd, const uint32_t* hlo, out_t* dst) {
  const __m512d round = _mm512_set1_pd(kDmodRound);
  const __m512d ta = _mm512_fmadd_pd(_mm512_set1_pd(hd[c.oa]), c.inv_a, round);
  if ((c.keep >> 8) == 0) {
    // At most 8 heads (the last chunk of H = 24, say): the int32 part in 8 lanes.
    const __m256i p = _mm512_castsi512_si256(c.p);
    const __m256i q = _mm512_cvtepi64_epi32(_mm512_castpd_si512(ta));
    __m256i r = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(hlo[c.oa])), _mm256_mullo_epi32(q, p));
    r = _mm256_min_epu32(r, _mm256_add_epi32(r, p));  // r in [-p, p) -> [0, p)
    if constexpr (std::is_same_v<out_t, int32_t>) {
      r = _mm256_add_epi32(r, _mm512_castsi512_si256(c.off_a));
      if (c.keep == 0xFF) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), r);
      } else {
        _mm256_mask_storeu_epi32(dst, static_cast<__mmask8>(c.keep), r);
      }
    } else {
      _mm512_mask_storeu_epi64(dst, static_cast<__mmask8>(c.keep), _mm512_add_epi64(_mm512_cvtepu32_epi64(r), c.off_a));
    }
    return;
  }
  // Low dword of each 64-bit lane of ta (lanes 0-7) and tb (lanes 8-15).
  const __m512i pack = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512d tb = _mm512_fmadd_pd(_mm512_set1_pd(hd[c.ob]), c.inv_b, round);
  const __m512i q = _mm512_permutex2var_epi32(_mm512_castpd_si512(ta), pack, _mm512_castpd_si512(tb));
  const __m512i hl =
      _mm512_mask_set1_epi32(_mm512_set1_epi32(static_cast<int>(hlo[c.oa])), 0xFF00, static_cast<int>(hlo[c.ob]));
  __m512i r = _mm512_sub_epi32(hl, _mm512_mullo_epi32(q, c.p));
  r = _mm512_min_epu32(r, _mm512_add_epi32(r, c.p));
  if constexpr (std::is_same_v<out_t, int32_t>) {
    r = _mm512_add_epi32(r, c.off_a);
    if (c.keep == 0xFFFF) {
      _mm512_storeu_si512(dst, r);
    } else {
      _mm512_mask_storeu_epi32(dst, c.keep, r);
    }
  } else {
    const __m512i lo = _mm512_add_epi64(_mm512_cvtepu32_epi64(_mm512_castsi512_si256(r)), c.off_a);
    const __m512i hi = _mm512_add_epi64(_mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(r, 1)), c.off_b);
    _mm512_mask_storeu_epi64(dst, static_cast<__mmask8>(c.keep), lo);
    _mm512_mask_storeu_epi64(dst + 8, static_cast<__mmask8>(c.keep >> 8), hi);
  }
}

// Tokens u = 0 .. n-1 of one segment and layer l: window of token u at xr[n - 1 - u], output
// row of token u at row + u * H. C > 0: the layer has exactly C chunks, whose constants stay in
// registers; C = 0: any number, reloaded per token.
template <typename out_t, bool DOC, int C>
ENGRAM_AVX512 void avx512_layer(const HashArgs& a, const DmodPlan& s, int64_t l, const uint64_t* xr,
                                const int64_t* dist, int64_t n, out_t* __restrict row) {
  constexpr int64_t kC = DmodPlan::kChunk;
  const int64_t H = a.H, N = a.N;
  const uint64_t pad = static_cast<uint64_t>(a.pad_id);
  const uint64_t* m = a.m + l * N;
  Chunk512 chunk[C > 0 ? C : 1];
  if constexpr (C > 0) {
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) chunk[c] = load_chunk<out_t>(a, s, l, c * kC);
  }
  // hd[n - 1] = double(h_n), hlo[n - 1] = its low 32 bits; [0] is read only by padding heads.
  double hd[16] = {0.0};
  uint32_t hlo[16] = {0};
  const uint64_t* w = xr + (n - 1);
  for (int64_t u = 0; u < n; ++u, --w, row += H) {
    uint64_t h = w[0] * m[0];
    for (int64_t k = 1; k < N; ++k) {
      h = mix_step(h, (!DOC || k <= dist[u]) ? w[k] : pad, m[k]);
      hd[k] = static_cast<double>(h);
      hlo[k] = static_cast<uint32_t>(h);
    }
    if constexpr (C > 0) {
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) hash_chunk<out_t>(chunk[c], hd, hlo, row + c * kC);
    } else {
      for (int64_t h0 = 0; h0 < H; h0 += kC) hash_chunk<out_t>(load_chunk<out_t>(a, s, l, h0), hd, hlo, row + h0);
    }
  }
}

template <typename out_t, bool DOC>
int64_t avx512_run(const HashArgs& a, const DmodPlan& s, int64_t begin, int64_t end, out_t* o) {
  return for_each_segment(a, begin, end,
                          [&](int64_t l, const uint64_t* xr, const int64_t* dist, int64_t n, int64_t seg)
                              ENGRAM_INLINE_LAMBDA {
                                out_t* row = o + (l * a.B * a.T + seg) * a.H;
                                switch (s.chunks) {
                                  case 1:
                                    return avx512_layer<out_t, DOC, 1>(a, s, l, xr, dist, n, row);
                                  case 2:
                                    return avx512_layer<out_t, DOC, 2>(a, s, l, xr, dist, n, row);
                                  default:
                                    return avx512_layer<out_t, DOC, 0>(a, s, l, xr, dist, n, row);
                                }
                              });
}

template <typename out_t>
int64_t avx512_range(const HashArgs& a, const DmodPlan& s, int64_t begin, int64_t end, out_t* out) {
  return a.doc_start ? avx512_run<out_t, true>(a, s, begin, end, out) : avx512_run<out_t, false>(a, s, begin, end, out);
}

}  // namespace

int64_t hash_range_avx512(const HashArgs& a, const DmodPlan& s, int64_t begin, int64_t end, int32_t* out) {
  return avx512_range(a, s, begin, end, out);
}
int64_t hash_range_avx512(const HashArgs& a, const DmodPlan& s, int64_t begin, int64_t end, int64_t* out) {
  return avx512_range(a, s, begin, end, out);
}

#else  // not x86-64: ngram_hash_isa() never selects these

int64_t hash_range_avx512(const HashArgs&, const DmodPlan&, int64_t, int64_t, int32_t*) { return -1; }
int64_t hash_range_avx512(const HashArgs&, const DmodPlan&, int64_t, int64_t, int64_t*) { return -1; }

#endif

}  // namespace engram::cpu
