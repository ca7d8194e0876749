// CUDA kernels of engram_gate_forward and engram_gate_backward (docs/SPEC.md section 4), fused and
// accumulated in acc_t (float; double for float64), per-element maths from engram/gate.h.
//
// Forward: one block per (token, branch) row; one pass computes sum(x^2), sum(k^2) and
// raw = sum(x*w*k), then alpha and u = alpha * v, and saves alpha, r_x, r_k, raw as the CPU op does.
// Backward: one block per fixed chunk of tokens (the chunking depends on the token count only).
// Per token the block walks the M branches: dL/dalpha = sum(g*v) (block reduction), then grad_x
// and grad_k, grad_v summed over branches in shared memory, and the token's r*x*k added to the
// chunk's grad_w partial; the partials are then added in chunk order. No atomics: the results
// are bitwise reproducible run to run (they differ from the CPU op in the order of the D-wide
// sums only, well inside the tolerances of the tests).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "check/gate.h"
#include "cuda_utils.cuh"
#include "engram/gate.h"

namespace engram {
namespace {

using cuda::block_sum;
using cuda::load_vec;
using cuda::ptr;
using cuda::store_vec;

// Threads per block for rows of `vecs` vectors: a warp multiple, at most 256.
int row_threads(int64_t vecs) {
  int t = 32;
  while (t < 256 && t < vecs) t *= 2;
  return t;
}

// Chunks of tokens of the weight-gradient sums: at most kGateChunks, sized from N alone.
constexpr int64_t kGateChunks = 512;

struct GateChunks {
  int64_t size, count;
};

GateChunks gate_chunks(int64_t N) {
  const int64_t size = (N + kGateChunks - 1) / kGateChunks;
  return {size, (N + size - 1) / size};
}

template <typename scalar_t, typename acc_t, int V>
__global__ void gate_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ kv,
                                    const acc_t* __restrict__ w, int64_t rows, int M, int64_t D, acc_t eps,
                                    acc_t inv_sqrt_d, scalar_t* __restrict__ out, acc_t* __restrict__ alpha,
                                    acc_t* __restrict__ r_x, acc_t* __restrict__ r_k, acc_t* __restrict__ raw) {
  __shared__ acc_t scratch[32 * 3];
  const int64_t vecs = D / V;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t n = row / M, m = row - n * M;
    const scalar_t* xr = x + row * D;
    const scalar_t* kr = kv + n * (M + 1) * D + m * D;  // the fused K/V row of token n, read in place
    const acc_t* wr = w + m * D;
    acc_t sums[3] = {acc_t(0), acc_t(0), acc_t(0)};  // sum(x^2), sum(k^2), sum(x*w*k)
    for (int64_t c = threadIdx.x; c < vecs; c += blockDim.x) {
      acc_t xv[V], kv[V];
      load_vec<acc_t, scalar_t, V>(xr + c * V, xv);
      load_vec<acc_t, scalar_t, V>(kr + c * V, kv);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        sums[0] += xv[j] * xv[j];
        sums[1] += kv[j] * kv[j];
        sums[2] += xv[j] * wr[c * V + j] * kv[j];
      }
    }
    block_sum<acc_t, 3>(sums, scratch);
    const acc_t rx = rms_reciprocal(sums[0], D, eps);
    const acc_t rk = rms_reciprocal(sums[1], D, eps);
    const acc_t a = gate_alpha(sums[2], rx, rk, inv_sqrt_d);
    if (threadIdx.x == 0) {
      alpha[row] = a;
      r_x[row] = rx;
      r_k[row] = rk;
      raw[row] = sums[2];
    }
    const scalar_t* vr = kv + n * (M + 1) * D + M * D;
    scalar_t* orow = out + row * D;
    for (int64_t c = threadIdx.x; c < vecs; c += blockDim.x) {
      acc_t vv[V];
      load_vec<acc_t, scalar_t, V>(vr + c * V, vv);
#pragma unroll
      for (int j = 0; j < V; ++j) vv[j] = a * vv[j];
      store_vec<acc_t, scalar_t, V>(orow + c * V, vv);
    }
  }
}

// Dynamic shared memory: grad_v accumulator [D], then (when it fits) the chunk's grad_w partial
// [M, D]; otherwise the partial lives in global memory (still owned by this block alone).
template <typename scalar_t, typename acc_t, int V>
__global__ void gate_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                     const scalar_t* __restrict__ kv, const acc_t* __restrict__ w,
                                     const acc_t* __restrict__ alpha, const acc_t* __restrict__ r_x,
                                     const acc_t* __restrict__ r_k, const acc_t* __restrict__ raw, int64_t N, int M,
                                     int64_t D, int64_t chunk_size, acc_t inv_sqrt_d, bool partial_in_shared,
                                     scalar_t* __restrict__ gx, scalar_t* __restrict__ gkv,
                                     acc_t* __restrict__ partials) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* gv_acc = reinterpret_cast<acc_t*>(smem_raw);
  __shared__ acc_t scratch[32];
  const int64_t chunk = blockIdx.x;
  acc_t* gw = partial_in_shared ? gv_acc + D : partials + chunk * M * D;
  const int64_t vecs = D / V;
  // Each thread owns the same columns of every row, so gv_acc and gw need no synchronisation.
  for (int64_t c = threadIdx.x; c < vecs; c += blockDim.x) {
    for (int m = 0; m < M; ++m) {
#pragma unroll
      for (int j = 0; j < V; ++j) gw[m * D + c * V + j] = acc_t(0);
    }
  }
  const int64_t n_end = min(N, (chunk + 1) * chunk_size);
  const int64_t S = (M + 1) * D;  // fused K/V row width: M keys, then the value
  for (int64_t n = chunk * chunk_size; n < n_end; ++n) {
    const scalar_t* vr = kv + n * S + M * D;
    for (int64_t c = threadIdx.x; c < vecs; c += blockDim.x) {
#pragma unroll
      for (int j = 0; j < V; ++j) gv_acc[c * V + j] = acc_t(0);
    }
    for (int m = 0; m < M; ++m) {
      const int64_t row = n * M + m;
      const scalar_t* gr = g + row * D;
      acc_t dot[1] = {acc_t(0)};
      for (int64_t c = threadIdx.x; c < vecs; c += blockDim.x) {
        acc_t gg[V], vv[V];
        load_vec<acc_t, scalar_t, V>(gr + c * V, gg);
        load_vec<acc_t, scalar_t, V>(vr + c * V, vv);
#pragma unroll
        for (int j = 0; j < V; ++j) dot[0] += gg[j] * vv[j];
      }
      block_sum<acc_t, 1>(dot, scratch);
      const acc_t a = alpha[row], rw = raw[row], rx = r_x[row], rk = r_k[row];
      const acc_t coef = gate_backward_coef(dot[0], a, rw, rx, rk, inv_sqrt_d);
      const acc_t term_x = gate_norm_term(rw, rx, D), term_k = gate_norm_term(rw, rk, D);
      const acc_t* wr = w + m * D;
      for (int64_t c = threadIdx.x; c < vecs; c += blockDim.x) {
        acc_t gg[V], xv[V], kk[V], ox[V], ok[V];
        load_vec<acc_t, scalar_t, V>(gr + c * V, gg);
        load_vec<acc_t, scalar_t, V>(x + row * D + c * V, xv);
        load_vec<acc_t, scalar_t, V>(kv + n * S + m * D + c * V, kk);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const int64_t d = c * V + j;
          const acc_t wd = wr[d];
          gv_acc[d] += gg[j] * a;
          gw[m * D + d] += coef * xv[j] * kk[j];
          ox[j] = coef * (kk[j] * wd - xv[j] * term_x);
          ok[j] = coef * (xv[j] * wd - kk[j] * term_k);
        }
        store_vec<acc_t, scalar_t, V>(gx + row * D + c * V, ox);
        store_vec<acc_t, scalar_t, V>(gkv + n * S + m * D + c * V, ok);
      }
    }
    for (int64_t c = threadIdx.x; c < vecs; c += blockDim.x) {
      acc_t out[V];
#pragma unroll
      for (int j = 0; j < V; ++j) out[j] = gv_acc[c * V + j];
      store_vec<acc_t, scalar_t, V>(gkv + n * S + M * D + c * V, out);
    }
  }
  if (partial_in_shared) {
    for (int64_t c = threadIdx.x; c < vecs; c += blockDim.x) {
      for (int m = 0; m < M; ++m) {
#pragma unroll
        for (int j = 0; j < V; ++j) partials[(chunk * M + m) * D + c * V + j] = gw[m * D + c * V + j];
      }
    }
  }
}

// out[j] = sum over chunks (in order) of partials[chunk][j].
template <typename acc_t>
__global__ void reduce_chunks_kernel(const acc_t* __restrict__ partials, int64_t chunks, int64_t n,
                                     acc_t* __restrict__ out) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t s = acc_t(0);
    for (int64_t c = 0; c < chunks; ++c) s += partials[c * n + j];
    out[j] = s;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> engram_gate_forward_cuda(
    const at::Tensor& hidden, const at::Tensor& kv, const at::Tensor& weight, double eps) {
  check_engram_gate_args("engram_gate_forward", hidden, kv, weight);
  check_gate_eps("engram_gate_forward", eps);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const auto acc = gate_acc_dtype(hidden.scalar_type());
  const int64_t M = hidden.size(-2), D = hidden.size(-1);
  const int64_t N = hidden.numel() / (M * D);
  auto x = hidden.contiguous();
  auto k = kv.contiguous();  // the GEMM's output is: no copy
  auto w = weight.to(acc).contiguous();
  auto out = at::empty(hidden.sizes(), x.options());
  const auto stat_shape = gate_stat_shape(hidden);
  auto alpha = at::empty(stat_shape, x.options().dtype(acc));
  auto r_x = at::empty_like(alpha);
  auto r_k = at::empty_like(alpha);
  auto raw = at::empty_like(alpha);
  if (N == 0) return {out, alpha, r_x, r_k, raw};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "engram_gate_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int V = cuda::row_vec<scalar_t>(D, {x.data_ptr(), k.data_ptr(), out.data_ptr()});
    const int threads = row_threads(D / V);
    const unsigned grid = cuda::grid_for(N * M, 1, 32);
    const acc_t inv_sqrt_d = acc_t(1) / std::sqrt(static_cast<acc_t>(D));
    auto launch = [&](auto vec) {
      constexpr int kV = decltype(vec)::value;
      gate_forward_kernel<scalar_t, acc_t, kV><<<grid, threads, 0, stream>>>(
          ptr<scalar_t>(x), ptr<scalar_t>(k), ptr<acc_t>(w), N * M, static_cast<int>(M), D, static_cast<acc_t>(eps),
          inv_sqrt_d, ptr<scalar_t>(out), ptr<acc_t>(alpha), ptr<acc_t>(r_x), ptr<acc_t>(r_k), ptr<acc_t>(raw));
    };
    if (V > 1) {
      launch(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, alpha, r_x, r_k, raw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> engram_gate_backward_cuda(const at::Tensor& grad_out,
                                                                         const at::Tensor& hidden, const at::Tensor& kv,
                                                                         const at::Tensor& weight,
                                                                         const at::Tensor& alpha, const at::Tensor& r_x,
                                                                         const at::Tensor& r_k, const at::Tensor& raw) {
  check_engram_gate_backward_args(grad_out, hidden, kv, weight, alpha, r_x, r_k, raw);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const auto acc = gate_acc_dtype(hidden.scalar_type());
  const int64_t M = hidden.size(-2), D = hidden.size(-1);
  const int64_t N = hidden.numel() / (M * D);
  auto g = grad_out.contiguous();
  auto x = hidden.contiguous();
  auto k = kv.contiguous();
  auto w = weight.to(acc).contiguous();
  auto a = alpha.contiguous();
  auto rx = r_x.contiguous();
  auto rk = r_k.contiguous();
  auto rw = raw.contiguous();
  auto grad_hidden = at::empty(hidden.sizes(), x.options());
  auto grad_kv = at::empty(kv.sizes(), x.options());
  auto grad_weight = at::zeros({M, D}, x.options().dtype(acc));
  if (N > 0) {
    const GateChunks chunks = gate_chunks(N);
    auto partials = at::empty({chunks.count, M, D}, x.options().dtype(acc));
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "engram_gate_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const int V = cuda::row_vec<scalar_t>(
          D, {g.data_ptr(), x.data_ptr(), k.data_ptr(), grad_hidden.data_ptr(), grad_kv.data_ptr()});
      const int threads = row_threads(D / V);
      const size_t gv_bytes = D * sizeof(acc_t), gw_bytes = M * D * sizeof(acc_t);
      const acc_t inv_sqrt_d = acc_t(1) / std::sqrt(static_cast<acc_t>(D));
      auto launch = [&](auto vec) {
        constexpr int kV = decltype(vec)::value;
        auto kernel = gate_backward_kernel<scalar_t, acc_t, kV>;
        const size_t limit = cuda::dynamic_shared_limit(kernel);
        TORCH_CHECK(gv_bytes <= limit, "engram_gate_backward (CUDA): D=", D, " is too wide for shared memory (",
                    gv_bytes, " bytes needed, ", limit, " available)");
        const bool in_shared = gv_bytes + gw_bytes <= limit;
        const size_t smem = gv_bytes + (in_shared ? gw_bytes : 0);
        cuda::allow_shared(kernel, smem);
        kernel<<<static_cast<unsigned>(chunks.count), threads, smem, stream>>>(
            ptr<scalar_t>(g), ptr<scalar_t>(x), ptr<scalar_t>(k), ptr<acc_t>(w), ptr<acc_t>(a), ptr<acc_t>(rx),
            ptr<acc_t>(rk), ptr<acc_t>(rw), N, static_cast<int>(M), D, chunks.size, inv_sqrt_d, in_shared,
            ptr<scalar_t>(grad_hidden), ptr<scalar_t>(grad_kv), ptr<acc_t>(partials));
      };
      if (V > 1) {
        launch(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
      } else {
        launch(std::integral_constant<int, 1>{});
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      reduce_chunks_kernel<acc_t><<<cuda::grid_for(M * D, cuda::kBlock), cuda::kBlock, 0, stream>>>(
          ptr<acc_t>(partials), chunks.count, M * D, ptr<acc_t>(grad_weight));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {grad_hidden, grad_kv, grad_weight.to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CUDA, m) {
  m.impl("_engram_gate_forward", &engram_gate_forward_cuda);
  m.impl("_engram_gate_backward", &engram_gate_backward_cuda);
}

}  // namespace engram
