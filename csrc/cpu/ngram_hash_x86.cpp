// AVX-512 and AVX2 kernels of the CPU ngram_hash op: the double-quotient modulo of engram/hash.h
// (dmod) with one SIMD lane per head. Each function carries its own target attribute and
// ngram_hash.cpp calls it only on a CPU that has the instructions, so the library loads anywhere.
#include "ngram_hash_kernels.h"

#include <type_traits>

#include "engram/hash.h"

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
#define ENGRAM_AVX2 __attribute__((target("avx2,fma")))

// Compressed ids of segment [t0, t1) of sequence b in reverse, xr[j] = x'[t1 - 1 - j], so that
// the window x'[t], x'[t-1], ... of token t is the contiguous xr[t1 - 1 - t ..]. Positions before
// the sequence start hold the pad id, as do 8 slots past the window of t0 (no load leaves xr).
void fill_reversed(const HashArgs& a, int64_t b, int64_t t0, int64_t t1, std::vector<uint64_t>& xr, int64_t& bad) {
  xr.assign(t1 - t0 + (a.N - 1) + 8, static_cast<uint64_t>(a.pad_id));
  uint64_t* dst = xr.data() + (t1 - 1);
  compress_ids(a, b, std::max<int64_t>(0, t0 - (a.N - 1)), t1, [dst](int64_t s, uint64_t c) { *(dst - s) = c; },
               bad);
  // dst - s indexes xr at t1 - 1 - s; positions before t0 - N + 1 are never read as real ids.
}

// Document boundaries: lane k of token t's window is real iff k <= dist, the distance back to the
// latest document start at or before t (or to the sequence start).
inline int64_t window_dist(int64_t t, int64_t last_start) { return t - std::max<int64_t>(last_start, 0); }

// ---- AVX-512 ----------------------------------------------------------------------------------
// Per token and layer: the window (W = 4 or 8 lanes of ids, lane k = x'[t-k]) times the
// multipliers, a prefix XOR over lanes (lane n - 1 = hash of order n), one conversion to double;
// per chunk of 16 heads: two FMAs give the quotient estimates, their low halves are packed into
// 16 int32 lanes where the rest of dmod runs.

template <int W>
struct Win512;

template <>
struct Win512<4> {
  using V = __m256i;
  ENGRAM_AVX512 static V load(const uint64_t* p) { return _mm256_loadu_si256(reinterpret_cast<const V*>(p)); }
  ENGRAM_AVX512 static V load_masked(V src, __mmask8 k, const uint64_t* p) {
    return _mm256_mask_loadu_epi64(src, k, p);
  }
  ENGRAM_AVX512 static V set1(uint64_t v) { return _mm256_set1_epi64x(static_cast<long long>(v)); }
  // Lane k becomes the XOR of lanes 0..k.
  ENGRAM_AVX512 static V prefix_xor(V h) {
    const V z = _mm256_setzero_si256();
    h = _mm256_xor_si256(h, _mm256_alignr_epi64(h, z, 3));
    return _mm256_xor_si256(h, _mm256_alignr_epi64(h, z, 2));
  }
  ENGRAM_AVX512 static V mul(V a, const uint64_t* m) { return _mm256_mullo_epi64(a, load(m)); }
  ENGRAM_AVX512 static __m512i wide(V h) { return _mm512_castsi256_si512(h); }
  ENGRAM_AVX512 static __m512d to_double(V h) { return _mm512_castpd256_pd512(_mm256_cvtepu64_pd(h)); }
};

template <>
struct Win512<8> {
  using V = __m512i;
  ENGRAM_AVX512 static V load(const uint64_t* p) { return _mm512_loadu_si512(p); }
  ENGRAM_AVX512 static V load_masked(V src, __mmask8 k, const uint64_t* p) {
    return _mm512_mask_loadu_epi64(src, k, p);
  }
  ENGRAM_AVX512 static V set1(uint64_t v) { return _mm512_set1_epi64(static_cast<long long>(v)); }
  ENGRAM_AVX512 static V prefix_xor(V h) {
    const V z = _mm512_setzero_si512();
    h = _mm512_xor_si512(h, _mm512_alignr_epi64(h, z, 7));
    h = _mm512_xor_si512(h, _mm512_alignr_epi64(h, z, 6));
    return _mm512_xor_si512(h, _mm512_alignr_epi64(h, z, 4));
  }
  ENGRAM_AVX512 static V mul(V a, const uint64_t* m) { return _mm512_mullo_epi64(a, load(m)); }
  ENGRAM_AVX512 static __m512i wide(V h) { return h; }
  ENGRAM_AVX512 static __m512d to_double(V h) { return _mm512_cvtepu64_pd(h); }
};

template <int W, typename out_t, bool DOC>
ENGRAM_AVX512 int64_t avx512_impl(const HashArgs& a, const SimdPlan& s, int64_t begin, int64_t end,
                                  out_t* __restrict o) {
  using Win = Win512<W>;
  constexpr int64_t kC = SimdPlan::kChunk;
  const int64_t H = a.H, HP = s.chunks * kC;
  const __m512d round = _mm512_set1_pd(kDmodRound);
  // Low dword of each 64-bit lane of two vectors: lanes 0-7 from the first, 8-15 from the second.
  const __m512i pack = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const typename Win::V pad = Win::set1(static_cast<uint64_t>(a.pad_id));
  std::vector<uint64_t> xr;
  int64_t bad = -1;
  for (int64_t seg = begin; seg < end;) {
    const int64_t b = seg / a.T, t0 = seg % a.T;
    const int64_t t1 = std::min(a.T, t0 + (end - seg));
    fill_reversed(a, b, t0, t1, xr, bad);
    const bool* ds = DOC ? a.doc_start + b * a.T : nullptr;
    int64_t last_start = DOC ? last_doc_start_before(ds, t0, a.N) : -1;
    for (int64_t t = t0; t < t1; ++t) {
      const uint64_t* w = xr.data() + (t1 - 1 - t);
      typename Win::V win;
      if constexpr (DOC) {
        if (ds[t]) last_start = t;
        const int64_t dist = window_dist(t, last_start);
        const __mmask8 real = dist >= W - 1 ? static_cast<__mmask8>((1u << W) - 1) : static_cast<__mmask8>((2u << dist) - 1);
        win = Win::load_masked(pad, real, w);
      } else {
        win = Win::load(w);  // before the sequence start xr already holds the pad id
      }
      const int64_t i = b * a.T + t;
      for (int64_t l = 0; l < a.L; ++l) {
        const typename Win::V hv = Win::prefix_xor(Win::mul(win, s.m8.data() + l * 8));
        const __m512i hq = Win::wide(hv);
        const __m512d hd = Win::to_double(hv);
        const double* inv = s.inv.data() + l * HP;
        const int32_t* p = s.p.data() + l * HP;
        out_t* row = o + (l * a.B * a.T + i) * H;
        for (int64_t h0 = 0; h0 < H; h0 += kC) {
          const __m512d ta = _mm512_fmadd_pd(_mm512_permutexvar_pd(_mm512_loadu_si512(s.order_lane.data() + h0), hd),
                                             _mm512_loadu_pd(inv + h0), round);
          __m512d tb = ta;
          if (H - h0 > 8) {
            tb = _mm512_fmadd_pd(_mm512_permutexvar_pd(_mm512_loadu_si512(s.order_lane.data() + h0 + 8), hd),
                                 _mm512_loadu_pd(inv + h0 + 8), round);
          }
          const __m512i q = _mm512_permutex2var_epi32(_mm512_castpd_si512(ta), pack, _mm512_castpd_si512(tb));
          const __m512i hl = _mm512_permutexvar_epi32(_mm512_loadu_si512(s.order_dword.data() + h0), hq);
          const __m512i pv = _mm512_loadu_si512(p + h0);
          __m512i r = _mm512_sub_epi32(hl, _mm512_mullo_epi32(q, pv));
          r = _mm512_min_epu32(r, _mm512_add_epi32(r, pv));  // r in [-p, p) -> [0, p)
          const int64_t left = H - h0;
          if constexpr (std::is_same_v<out_t, int32_t>) {
            r = _mm512_add_epi32(r, _mm512_loadu_si512(s.off32.data() + l * HP + h0));
            if (left >= kC) {
              _mm512_storeu_si512(row + h0, r);
            } else {
              _mm512_mask_storeu_epi32(row + h0, static_cast<__mmask16>((1u << left) - 1), r);
            }
          } else {
            const int64_t* off = a.off + l * H + h0;
            const __mmask8 k0 = left >= 8 ? 0xFF : static_cast<__mmask8>((1u << left) - 1);
            const __mmask8 k1 = left >= 16 ? 0xFF : left <= 8 ? 0 : static_cast<__mmask8>((1u << (left - 8)) - 1);
            const __m512i lo = _mm512_add_epi64(_mm512_cvtepu32_epi64(_mm512_castsi512_si256(r)),
                                                _mm512_maskz_loadu_epi64(k0, off));
            const __m512i hi = _mm512_add_epi64(_mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(r, 1)),
                                                _mm512_maskz_loadu_epi64(k1, off + 8));
            _mm512_mask_storeu_epi64(row + h0, k0, lo);
            _mm512_mask_storeu_epi64(row + h0 + 8, k1, hi);
          }
        }
      }
    }
    seg += t1 - t0;
  }
  return bad;
}

template <typename out_t>
ENGRAM_AVX512 int64_t avx512_dispatch(const HashArgs& a, const SimdPlan& s, int64_t begin, int64_t end, out_t* o) {
  if (a.N <= 4) {
    return a.doc_start ? avx512_impl<4, out_t, true>(a, s, begin, end, o)
                       : avx512_impl<4, out_t, false>(a, s, begin, end, o);
  }
  return a.doc_start ? avx512_impl<8, out_t, true>(a, s, begin, end, o)
                     : avx512_impl<8, out_t, false>(a, s, begin, end, o);
}

// ---- AVX2 -------------------------------------------------------------------------------------
// Scalar mixing (no 64-bit lane multiply in AVX2), then per group of 8 heads two FMAs over 4
// lanes each; needs K % 4 == 0 so that each group of 4 heads has one order. The packed quotient
// halves come out in the lane order a0 a1 b0 b1 a2 a3 b2 b3 (a, b: the two groups of 4), which
// SimdPlan::p_avx2 follows; one permute restores the head order before the offsets.

template <typename out_t, bool DOC>
ENGRAM_AVX2 int64_t avx2_impl(const HashArgs& a, const SimdPlan& s, int64_t begin, int64_t end,
                              out_t* __restrict o) {
  const int64_t H = a.H, HP = s.chunks * SimdPlan::kChunk, N = a.N;
  const __m256d round = _mm256_set1_pd(kDmodRound);
  const uint64_t pad = static_cast<uint64_t>(a.pad_id);
  std::vector<uint64_t> xr;
  int64_t bad = -1;
  for (int64_t seg = begin; seg < end;) {
    const int64_t b = seg / a.T, t0 = seg % a.T;
    const int64_t t1 = std::min(a.T, t0 + (end - seg));
    fill_reversed(a, b, t0, t1, xr, bad);
    const bool* ds = DOC ? a.doc_start + b * a.T : nullptr;
    int64_t last_start = DOC ? last_doc_start_before(ds, t0, N) : -1;
    for (int64_t t = t0; t < t1; ++t) {
      const uint64_t* w = xr.data() + (t1 - 1 - t);
      int64_t dist = N;
      if constexpr (DOC) {
        if (ds[t]) last_start = t;
        dist = window_dist(t, last_start);
      }
      const int64_t i = b * a.T + t;
      for (int64_t l = 0; l < a.L; ++l) {
        const uint64_t* m = a.m + l * N;
        // hd[n - 1], hlo[n - 1]: the order-n hash as double and its low 32 bits; [0] is read
        // only by padding heads.
        double hd[16] = {0.0};
        uint32_t hlo[16] = {0};
        uint64_t h = w[0] * m[0];
        for (int64_t k = 1; k < N; ++k) {
          h = mix_step(h, (!DOC || k <= dist) ? w[k] : pad, m[k]);
          hd[k] = static_cast<double>(h);
          hlo[k] = static_cast<uint32_t>(h);
        }
        const double* inv = s.inv.data() + l * HP;
        const int32_t* p = s.p_avx2.data() + l * HP;
        out_t* row = o + (l * a.B * a.T + i) * H;
        for (int64_t h0 = 0; h0 < H; h0 += 8) {
          const int64_t oa = s.order_lane[h0], ob = s.order_lane[h0 + 4];
          const __m256d ta = _mm256_fmadd_pd(_mm256_set1_pd(hd[oa]), _mm256_loadu_pd(inv + h0), round);
          const __m256d tb = _mm256_fmadd_pd(_mm256_set1_pd(hd[ob]), _mm256_loadu_pd(inv + h0 + 4), round);
          const __m256i q = _mm256_castps_si256(
              _mm256_shuffle_ps(_mm256_castpd_ps(ta), _mm256_castpd_ps(tb), _MM_SHUFFLE(2, 0, 2, 0)));
          const __m256i hl = _mm256_blend_epi32(_mm256_set1_epi32(static_cast<int>(hlo[oa])),
                                                _mm256_set1_epi32(static_cast<int>(hlo[ob])), 0xCC);
          const __m256i pv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + h0));
          __m256i r = _mm256_sub_epi32(hl, _mm256_mullo_epi32(q, pv));
          r = _mm256_min_epu32(r, _mm256_add_epi32(r, pv));
          r = _mm256_permute4x64_epi64(r, _MM_SHUFFLE(3, 1, 2, 0));
          const int64_t left = H - h0;
          if constexpr (std::is_same_v<out_t, int32_t>) {
            r = _mm256_add_epi32(r, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.off32.data() + l * HP + h0)));
            if (left >= 8) {
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + h0), r);
            } else {  // left == 4 (H is a multiple of 4)
              _mm_storeu_si128(reinterpret_cast<__m128i*>(row + h0), _mm256_castsi256_si128(r));
            }
          } else {
            const long long* off = reinterpret_cast<const long long*>(a.off + l * H + h0);
            long long* dst = reinterpret_cast<long long*>(row + h0);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                                _mm256_add_epi64(_mm256_cvtepu32_epi64(_mm256_castsi256_si128(r)),
                                                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(off))));
            if (left >= 8) {
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 4),
                                  _mm256_add_epi64(_mm256_cvtepu32_epi64(_mm256_extracti128_si256(r, 1)),
                                                   _mm256_loadu_si256(reinterpret_cast<const __m256i*>(off + 4))));
            }
          }
        }
      }
    }
    seg += t1 - t0;
  }
  return bad;
}

}  // namespace

int64_t hash_range_avx512(const HashArgs& a, const SimdPlan& s, int64_t begin, int64_t end, int32_t* out) {
  return avx512_dispatch(a, s, begin, end, out);
}
int64_t hash_range_avx512(const HashArgs& a, const SimdPlan& s, int64_t begin, int64_t end, int64_t* out) {
  return avx512_dispatch(a, s, begin, end, out);
}
int64_t hash_range_avx2(const HashArgs& a, const SimdPlan& s, int64_t begin, int64_t end, int32_t* out) {
  return a.doc_start ? avx2_impl<int32_t, true>(a, s, begin, end, out) : avx2_impl<int32_t, false>(a, s, begin, end, out);
}
int64_t hash_range_avx2(const HashArgs& a, const SimdPlan& s, int64_t begin, int64_t end, int64_t* out) {
  return a.doc_start ? avx2_impl<int64_t, true>(a, s, begin, end, out) : avx2_impl<int64_t, false>(a, s, begin, end, out);
}

#else  // not x86-64: ngram_hash_isa() never selects these

int64_t hash_range_avx512(const HashArgs&, const SimdPlan&, int64_t, int64_t, int32_t*) { return -1; }
int64_t hash_range_avx512(const HashArgs&, const SimdPlan&, int64_t, int64_t, int64_t*) { return -1; }
int64_t hash_range_avx2(const HashArgs&, const SimdPlan&, int64_t, int64_t, int32_t*) { return -1; }
int64_t hash_range_avx2(const HashArgs&, const SimdPlan&, int64_t, int64_t, int64_t*) { return -1; }

#endif

}  // namespace engram::cpu
