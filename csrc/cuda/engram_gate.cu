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
using cuda::reduce_chunks_kernel;
using cuda::row_threads;
using cuda::store_vec;
using cuda::with_vec;

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
__global__ void gate_forward_kernel(const GateForwardParams<scalar_t, acc_t> p) {
  __shared__ acc_t scratch[32 * 3];
  const int64_t M = p.M, D = p.D, S = (M + 1) * D, vecs = D / V, rows = p.N * M;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t n = row / M, m = row - n * M;
    const scalar_t* __restrict__ xr = p.hidden + row * D;
    const scalar_t* __restrict__ kr = p.kv + n * S + m * D;  // the fused K/V row of token n, read in place
    const acc_t* __restrict__ wr = p.weight + m * D;
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
    const acc_t rx = rms_reciprocal(sums[0], D, p.eps);
    const acc_t rk = rms_reciprocal(sums[1], D, p.eps);
    const acc_t a = gate_alpha(sums[2], rx, rk, p.inv_sqrt_d);
    if (threadIdx.x == 0) {
      p.alpha[row] = a;
      p.r_x[row] = rx;
      p.r_k[row] = rk;
      p.raw[row] = sums[2];
    }
    const scalar_t* __restrict__ vr = p.kv + n * S + M * D;
    scalar_t* __restrict__ orow = p.out + row * D;
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
__global__ void gate_backward_kernel(const GateBackwardParams<scalar_t, acc_t> p, const GateChunks chunks,
                                     const bool partial_in_shared, acc_t* __restrict__ partials) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* gv_acc = reinterpret_cast<acc_t*>(smem_raw);
  __shared__ acc_t scratch[32];
  const int64_t M = p.M, D = p.D, S = (M + 1) * D, vecs = D / V;  // S: M keys, then the value
  const int64_t chunk = blockIdx.x;
  acc_t* gw = partial_in_shared ? gv_acc + D : partials + chunk * M * D;
  // Each thread owns the same columns of every row, so gv_acc and gw need no synchronisation.
  for (int64_t c = threadIdx.x; c < vecs; c += blockDim.x) {
    for (int64_t m = 0; m < M; ++m) {
#pragma unroll
      for (int j = 0; j < V; ++j) gw[m * D + c * V + j] = acc_t(0);
    }
  }
  const int64_t n_end = min(p.N, (chunk + 1) * chunks.size);
  for (int64_t n = chunk * chunks.size; n < n_end; ++n) {
    const scalar_t* __restrict__ vr = p.kv + n * S + M * D;
    for (int64_t c = threadIdx.x; c < vecs; c += blockDim.x) {
#pragma unroll
      for (int j = 0; j < V; ++j) gv_acc[c * V + j] = acc_t(0);
    }
    for (int64_t m = 0; m < M; ++m) {
      const int64_t row = n * M + m;
      const scalar_t* __restrict__ gr = p.grad_out + row * D;
      acc_t dot[1] = {acc_t(0)};
      for (int64_t c = threadIdx.x; c < vecs; c += blockDim.x) {
        acc_t gg[V], vv[V];
        load_vec<acc_t, scalar_t, V>(gr + c * V, gg);
        load_vec<acc_t, scalar_t, V>(vr + c * V, vv);
#pragma unroll
        for (int j = 0; j < V; ++j) dot[0] += gg[j] * vv[j];
      }
      block_sum<acc_t, 1>(dot, scratch);
      const acc_t a = p.alpha[row], rw = p.raw[row], rx = p.r_x[row], rk = p.r_k[row];
      const acc_t coef = gate_backward_coef(dot[0], a, rw, rx, rk, p.inv_sqrt_d);
      const acc_t term_x = gate_norm_term(rw, rx, D), term_k = gate_norm_term(rw, rk, D);
      const acc_t* __restrict__ wr = p.weight + m * D;
      for (int64_t c = threadIdx.x; c < vecs; c += blockDim.x) {
        acc_t gg[V], xv[V], kk[V], ox[V], ok[V];
        load_vec<acc_t, scalar_t, V>(gr + c * V, gg);
        load_vec<acc_t, scalar_t, V>(p.hidden + row * D + c * V, xv);
        load_vec<acc_t, scalar_t, V>(p.kv + n * S + m * D + c * V, kk);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const int64_t d = c * V + j;
          const acc_t wd = wr[d];
          gv_acc[d] += gg[j] * a;
          gw[m * D + d] += coef * xv[j] * kk[j];
          ox[j] = coef * (kk[j] * wd - xv[j] * term_x);
          ok[j] = coef * (xv[j] * wd - kk[j] * term_k);
        }
        store_vec<acc_t, scalar_t, V>(p.grad_hidden + row * D + c * V, ox);
        store_vec<acc_t, scalar_t, V>(p.grad_kv + n * S + m * D + c * V, ok);
      }
    }
    for (int64_t c = threadIdx.x; c < vecs; c += blockDim.x) {
      acc_t out[V];
#pragma unroll
      for (int j = 0; j < V; ++j) out[j] = gv_acc[c * V + j];
      store_vec<acc_t, scalar_t, V>(p.grad_kv + n * S + M * D + c * V, out);
    }
  }
  if (partial_in_shared) {
    for (int64_t c = threadIdx.x; c < vecs; c += blockDim.x) {
      for (int64_t m = 0; m < M; ++m) {
#pragma unroll
        for (int j = 0; j < V; ++j) partials[(chunk * M + m) * D + c * V + j] = gw[m * D + c * V + j];
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> engram_gate_forward_cuda(
    const at::Tensor& hidden, const at::Tensor& kv, const at::Tensor& weight, double eps) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  const auto a = prepare_gate_forward(hidden, kv, weight, eps);
  if (a.N == 0) return a.outputs();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.hidden.scalar_type(), "engram_gate_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = a.params<scalar_t, acc_t>();
    with_vec<scalar_t>(p.D, {p.hidden, p.kv, p.out}, [&](auto vec) {
      constexpr int kV = decltype(vec)::value;
      gate_forward_kernel<scalar_t, acc_t, kV>
          <<<cuda::grid_for(p.N * p.M, 1, 32), row_threads(p.D / kV), 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return a.outputs();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> engram_gate_backward_cuda(const at::Tensor& grad_out,
                                                                         const at::Tensor& hidden, const at::Tensor& kv,
                                                                         const at::Tensor& weight,
                                                                         const at::Tensor& alpha, const at::Tensor& r_x,
                                                                         const at::Tensor& r_k, const at::Tensor& raw) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  const auto a = prepare_gate_backward(grad_out, hidden, kv, weight, alpha, r_x, r_k, raw);
  if (a.N == 0) return a.outputs();
  const GateChunks chunks = gate_chunks(a.N);
  auto partials = at::empty({chunks.count, a.M, a.D}, a.grad_weight.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.hidden.scalar_type(), "engram_gate_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = a.params<scalar_t, acc_t>();
    const size_t gv_bytes = p.D * sizeof(acc_t), gw_bytes = p.M * p.D * sizeof(acc_t);
    with_vec<scalar_t>(p.D, {p.grad_out, p.hidden, p.kv, p.grad_hidden, p.grad_kv}, [&](auto vec) {
      constexpr int kV = decltype(vec)::value;
      auto kernel = gate_backward_kernel<scalar_t, acc_t, kV>;
      const size_t limit = cuda::dynamic_shared_limit(kernel);
      TORCH_CHECK(gv_bytes <= limit, "engram_gate_backward (CUDA): D=", p.D, " is too wide for shared memory (",
                  gv_bytes, " bytes needed, ", limit, " available)");
      const bool in_shared = gv_bytes + gw_bytes <= limit;
      const size_t smem = gv_bytes + (in_shared ? gw_bytes : 0);
      cuda::allow_shared(kernel, smem);
      kernel<<<static_cast<unsigned>(chunks.count), row_threads(p.D / kV), smem, stream>>>(p, chunks, in_shared,
                                                                                           ptr<acc_t>(partials));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    reduce_chunks_kernel<acc_t><<<cuda::grid_for(p.M * p.D, cuda::kBlock), cuda::kBlock, 0, stream>>>(
        ptr<acc_t>(partials), chunks.count, p.M * p.D, p.grad_weight);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return a.outputs();
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CUDA, m) {
  m.impl("_engram_gate_forward", &engram_gate_forward_cuda);
  m.impl("_engram_gate_backward", &engram_gate_backward_cuda);
}

}  // namespace engram
