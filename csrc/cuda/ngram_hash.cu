// CUDA kernel of ngram_hash: one thread per token, compression LUT fused, every layer and head of
// that token at once; bit-exact with the CPU kernel (same engram/hash.h arithmetic).
//
// No host synchronisation: argument checks look at shapes, dtypes and devices only, and every
// check that needs tensor values (ids inside [0, num_ids), primes >= 1, offsets >= 0, and with
// out_dtype=int32 every table ending at row <= 2^31) is a device-side assertion
// (CUDA_KERNEL_ASSERT_MSG). A failed assertion aborts the kernel and poisons the CUDA context; the
// error surfaces as "device-side assert triggered" at the next synchronising call. Use
// oov_to_pad=True to map unknown ids to the pad id instead. NgramHasher picks int32 output only
// when its host-side layout (rows_per_layer) is below 2^31 rows, so the int32 assertion never
// fires through it.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "check/ngram_hash.h"
#include "cuda_utils.cuh"
#include "engram/hash.h"
#include "engram/ngram_window.h"

namespace engram {
namespace {

constexpr int kTokensPerBlock = 128;
// Dynamic shared memory beyond 48 KiB would need a per-kernel opt-in; the layout never needs it.
constexpr size_t kSharedLimit = 48 * 1024;

struct HashParams {
  const void* ids;         // [B, T], id_t
  const int64_t* lut;      // [num_ids] or nullptr
  const bool* doc_start;   // [B, T] or nullptr
  const uint64_t* mult;    // [L, N]
  const int64_t* primes;   // [L, H]
  const int64_t* offsets;  // [L, H]
  void* out;               // [L, B, T, H], out_t
  int64_t num_ids, pad_id, B, T;
  int L, N, H, K;
  bool oov_to_pad;
};

// Dynamic shared memory: FastMod [L*H] | offsets [L*H] | multipliers [L*N] | optional staging of
// this block's outputs of one layer [kTokensPerBlock * H] (then written back coalesced: a token's
// H outputs are contiguous, so a thread writing them directly strides by H across the warp).
template <typename id_t, typename out_t, bool kStage>
__global__ void __launch_bounds__(kTokensPerBlock) ngram_hash_kernel(HashParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int LH = p.L * p.H;
  FastMod* mods = reinterpret_cast<FastMod*>(smem);
  int64_t* offs = reinterpret_cast<int64_t*>(mods + LH);
  uint64_t* mult = reinterpret_cast<uint64_t*>(offs + LH);
  out_t* stage = reinterpret_cast<out_t*>(mult + p.L * p.N);

  for (int c = threadIdx.x; c < LH; c += blockDim.x) {
    const int64_t prime = p.primes[c], off = p.offsets[c];
    CUDA_KERNEL_ASSERT_MSG(prime >= 1, "ngram_hash: primes must be positive");
    CUDA_KERNEL_ASSERT_MSG(off >= 0, "ngram_hash: offsets must be non-negative");
    if constexpr (sizeof(out_t) == 4) {
      CUDA_KERNEL_ASSERT_MSG(off + prime <= (int64_t{1} << 31),
                             "ngram_hash: out_dtype=int32 needs fewer than 2^31 rows per layer");
    }
    mods[c] = make_fastmod(static_cast<uint64_t>(prime < 1 ? 1 : prime));
    offs[c] = off;
  }
  for (int c = threadIdx.x; c < p.L * p.N; c += blockDim.x) mult[c] = p.mult[c];
  __syncthreads();
  // Compressed ids (LUT entries, the pad id) must keep x' * m within int64, as on the CPU.
  uint64_t m_max = 1;
  for (int c = 0; c < p.L * p.N; ++c) {
    CUDA_KERNEL_ASSERT_MSG(static_cast<int64_t>(mult[c]) >= 1, "ngram_hash: multipliers must be positive");
    m_max = mult[c] > m_max ? mult[c] : m_max;
  }
  const uint64_t max_id_mult = static_cast<uint64_t>(INT64_MAX) / m_max;
  const uint64_t max_id =
      max_id_mult < static_cast<uint64_t>(p.num_ids - 1) ? max_id_mult : static_cast<uint64_t>(p.num_ids - 1);

  const int64_t BT = p.B * p.T;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kTokensPerBlock;
  const int64_t i = first + threadIdx.x;
  const bool active = i < BT;
  const id_t* x = static_cast<const id_t*>(p.ids);

  // The window of compressed ids (engram/ngram_window.h, shared with GoogleTest); N is small and
  // the window stays in registers or local memory.
  constexpr int kMaxN = 16;
  uint64_t xs[kMaxN];
  if (active) {
    const int64_t b = i / p.T, t = i - b * p.T;
    const int64_t bad = ngram_window<id_t>(x + b * p.T, p.doc_start ? p.doc_start + b * p.T : nullptr, t, p.N, p.lut,
                                           p.num_ids, p.pad_id, xs);
    CUDA_KERNEL_ASSERT_MSG(bad < 0 || p.oov_to_pad,
                           "ngram_hash: ids must lie in [0, num_ids); pass oov_to_pad=True to map them to pad_id");
    for (int k = 0; k < p.N; ++k) {
      CUDA_KERNEL_ASSERT_MSG(xs[k] <= max_id,
                             "ngram_hash: lut entries and pad_id must be compressed ids below num_ids whose "
                             "products with the multipliers fit in int64");
    }
  }

  out_t* out = static_cast<out_t*>(p.out);
  const int64_t n_tok = min(static_cast<int64_t>(kTokensPerBlock), BT - first);
  for (int l = 0; l < p.L; ++l) {
    out_t* dst = kStage ? stage + threadIdx.x * p.H : out + (static_cast<int64_t>(l) * BT + i) * p.H;
    if (active) ngram_rows<out_t>(xs, p.N, p.K, mult + l * p.N, mods + l * p.H, offs + l * p.H, dst);
    if constexpr (kStage) {
      __syncthreads();
      // The block's tokens of layer l are one contiguous run of n_tok * H outputs.
      out_t* run = out + (static_cast<int64_t>(l) * BT + first) * p.H;
      for (int64_t e = threadIdx.x; e < n_tok * p.H; e += blockDim.x) run[e] = stage[e];
      __syncthreads();
    }
  }
}

at::Tensor ngram_hash_cuda(const at::Tensor& ids, const std::optional<at::Tensor>& lut, int64_t num_ids,
                           const at::Tensor& multipliers, const at::Tensor& primes, const at::Tensor& offsets,
                           int64_t pad_id, const std::optional<at::Tensor>& doc_start, at::ScalarType out_dtype,
                           bool oov_to_pad) {
  const c10::cuda::CUDAGuard guard(ids.device());
  const NgramHashArgs in =
      prepare_ngram_hash(ids, lut, num_ids, multipliers, primes, offsets, pad_id, doc_start, out_dtype);
  const int64_t L = in.L, N = in.N, H = in.H;
  const at::Tensor& out = in.out;
  if (out.numel() == 0) return out;

  HashParams p;
  p.ids = in.ids.data_ptr();
  p.lut = in.lut.defined() ? in.lut.data_ptr<int64_t>() : nullptr;
  p.doc_start = in.doc_start.defined() ? in.doc_start.data_ptr<bool>() : nullptr;
  p.mult = reinterpret_cast<const uint64_t*>(in.multipliers.data_ptr<int64_t>());
  p.primes = in.primes.data_ptr<int64_t>();
  p.offsets = in.offsets.data_ptr<int64_t>();
  p.out = out.data_ptr();
  p.num_ids = num_ids;
  p.pad_id = pad_id;
  p.B = ids.size(0);
  p.T = ids.size(1);
  p.L = static_cast<int>(L);
  p.N = static_cast<int>(N);
  p.H = static_cast<int>(H);
  p.K = static_cast<int>(H / (N - 1));
  p.oov_to_pad = oov_to_pad;

  const size_t layout_bytes =
      static_cast<size_t>(L * H) * (sizeof(FastMod) + sizeof(int64_t)) + static_cast<size_t>(L * N) * sizeof(uint64_t);
  const size_t stage_bytes = static_cast<size_t>(kTokensPerBlock * H) * c10::elementSize(out_dtype);
  TORCH_CHECK(layout_bytes <= kSharedLimit, "ngram_hash (CUDA): num_layers * heads = ", L * H,
              " tables exceed the shared-memory layout cache (at most about ", kSharedLimit / 24, ")");
  const bool stage = layout_bytes + stage_bytes <= kSharedLimit;
  const size_t smem = layout_bytes + (stage ? stage_bytes : 0);
  const int64_t blocks = (p.B * p.T + kTokensPerBlock - 1) / kTokensPerBlock;
  auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "ngram_hash_cuda_ids", [&] {
    using id_t = index_t;
    AT_DISPATCH_INDEX_TYPES(out_dtype, "ngram_hash_cuda_out", [&] {
      using out_t = index_t;
      if (stage) {
        ngram_hash_kernel<id_t, out_t, true><<<blocks, kTokensPerBlock, smem, stream>>>(p);
      } else {
        ngram_hash_kernel<id_t, out_t, false><<<blocks, kTokensPerBlock, smem, stream>>>(p);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CUDA, m) { m.impl("ngram_hash", &ngram_hash_cuda); }

}  // namespace engram
