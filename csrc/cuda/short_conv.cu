// CUDA kernels of short_conv_forward and short_conv_backward (docs/SPEC.md section 5):
// Y = U + SiLU(Conv1D(RMSNorm(U))), depthwise, causal, dilated; acc_t (float; double for float64)
// accumulation, per-element maths from engram/conv.h, the same saved statistic (rstd [B, T, M])
// and the same decomposition as the CPU op.
//
// Forward: rstd per (token, branch) row (block reduction), then one thread per vector of
// channels of a token sums its K taps of the normalised input, formed on the fly from u and rstd.
// Backward: grad_pre = grad_out * SiLU'(pre) (pre recomputed) into an acc_t buffer, then one block
// per fixed chunk of tokens: the conv transpose gives dL/dnormed, the RMSNorm backward gives
// grad_u (one block reduction per branch), and the weight gradients go to the chunk's partials,
// added in chunk order afterwards. No atomics: bitwise reproducible run to run.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "check/conv.h"
#include "cuda_utils.cuh"
#include "engram/conv.h"

namespace engram {
namespace {

using cuda::block_sum;
using cuda::load_vec;
using cuda::ptr;
using cuda::reduce_chunks_kernel;
using cuda::row_threads;
using cuda::store_vec;
using cuda::with_vec;

// Token chunks of the weight-gradient sums: at most kConvChunks, sized from the token count.
constexpr int64_t kConvChunks = 512;

// rstd[row] = 1 / sqrt(mean(u[row, :]^2) + eps), one block per (token, branch) row.
template <typename scalar_t, typename acc_t, int V>
__global__ void rstd_kernel(const ConvForwardParams<scalar_t, acc_t> p) {
  __shared__ acc_t scratch[32];
  const scalar_t* __restrict__ u = p.u;
  const int64_t D = p.shape.D, vecs = D / V, rows = p.shape.B * p.shape.T * p.shape.M;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    acc_t s[1] = {acc_t(0)};
    for (int64_t c = threadIdx.x; c < vecs; c += blockDim.x) {
      acc_t xv[V];
      load_vec<acc_t, scalar_t, V>(u + row * D + c * V, xv);
#pragma unroll
      for (int j = 0; j < V; ++j) s[0] += xv[j] * xv[j];
    }
    block_sum<acc_t, 1>(s, scratch);
    if (threadIdx.x == 0) p.rstd[row] = rms_reciprocal(s[0], D, p.eps);
  }
}

// Pre-activation conv output of V channels [c, c + V) of `token` (all in branch m):
//   pre = sum over taps i of (w_t[i] * norm_weight) * u[token - shift_i] * rstd[token - shift_i].
template <typename scalar_t, typename acc_t, int V>
__device__ __forceinline__ void conv_pre(const scalar_t* __restrict__ u, const acc_t* __restrict__ rstd,
                                         const acc_t* __restrict__ nw, const acc_t* __restrict__ wt, const ConvShape& s,
                                         int64_t token, int64_t c, acc_t (&pre)[V]) {
  const int64_t t = token % s.T, m = c / s.D;
#pragma unroll
  for (int j = 0; j < V; ++j) pre[j] = acc_t(0);
  for (int64_t i = 0; i < s.K; ++i) {
    const int64_t shift = conv_tap_shift(i, s.K, s.dilation);
    if (t - shift < 0) continue;
    const int64_t src = token - shift;
    const acc_t r = rstd[src * s.M + m];
    acc_t xv[V];
    load_vec<acc_t, scalar_t, V>(u + src * s.C + c, xv);
#pragma unroll
    for (int j = 0; j < V; ++j) pre[j] += wt[i * s.C + c + j] * nw[c + j] * xv[j] * r;
  }
}

template <typename scalar_t, typename acc_t, int V>
__global__ void conv_forward_kernel(const ConvForwardParams<scalar_t, acc_t> p) {
  const ConvShape& s = p.shape;
  const int64_t vecs = s.C / V, total = s.B * s.T * vecs;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t token = idx / vecs, c = (idx - token * vecs) * V;
    acc_t pre[V], xv[V];
    conv_pre<scalar_t, acc_t, V>(p.u, p.rstd, p.norm_weight, p.weight_t, s, token, c, pre);
    load_vec<acc_t, scalar_t, V>(p.u + token * s.C + c, xv);
#pragma unroll
    for (int j = 0; j < V; ++j) xv[j] += p.activation ? silu(pre[j]) : pre[j];
    store_vec<acc_t, scalar_t, V>(p.out + token * s.C + c, xv);
  }
}

// grad_pre = grad_out * SiLU'(pre) (or grad_out without the activation), as acc_t.
template <typename scalar_t, typename acc_t, int V>
__global__ void grad_pre_kernel(const ConvBackwardParams<scalar_t, acc_t> p, acc_t* __restrict__ grad_pre) {
  const ConvShape& s = p.shape;
  const int64_t vecs = s.C / V, total = s.B * s.T * vecs;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t token = idx / vecs, c = (idx - token * vecs) * V;
    acc_t gv[V];
    load_vec<acc_t, scalar_t, V>(p.grad_out + token * s.C + c, gv);
    if (p.activation) {
      acc_t pre[V];
      conv_pre<scalar_t, acc_t, V>(p.u, p.rstd, p.norm_weight, p.weight_t, s, token, c, pre);
#pragma unroll
      for (int j = 0; j < V; ++j) gv[j] *= silu_grad(pre[j]);
    }
#pragma unroll
    for (int j = 0; j < V; ++j) grad_pre[token * s.C + c + j] = gv[j];
  }
}

// One block per chunk of tokens. Dynamic shared memory: a [D] (dL/dnormed * norm_weight of the
// current branch), then (when it fits) the chunk's partials [C + K * C]: grad_norm_weight, then
// the conv weight gradient per tap without its norm_weight factor; otherwise the partials live
// in global memory, owned by this block alone.
template <typename scalar_t, typename acc_t, int V>
__global__ void conv_backward_kernel(const ConvBackwardParams<scalar_t, acc_t> p, const acc_t* __restrict__ grad_pre,
                                     const int64_t chunk_size, const bool partial_in_shared,
                                     acc_t* __restrict__ partials) {
  const ConvShape& s = p.shape;
  const scalar_t* __restrict__ g = p.grad_out;
  const scalar_t* __restrict__ u = p.u;
  const acc_t* __restrict__ rstd = p.rstd;
  const acc_t* __restrict__ nw = p.norm_weight;
  const acc_t* __restrict__ wt = p.weight_t;
  scalar_t* __restrict__ grad_u = p.grad_u;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* a_buf = reinterpret_cast<acc_t*>(smem_raw);
  __shared__ acc_t scratch[32];
  const int64_t C = s.C, D = s.D, part = C + s.K * C, tokens = s.B * s.T;
  const int64_t chunk = blockIdx.x;
  acc_t* gnw = partial_in_shared ? a_buf + D : partials + chunk * part;
  acc_t* gw = gnw + C;
  const int64_t vecs = D / V;
  // Thread ownership of columns is the same for every token: no synchronisation on partials.
  for (int64_t m = 0; m < s.M; ++m) {
    for (int64_t cv = threadIdx.x; cv < vecs; cv += blockDim.x) {
      const int64_t c = m * D + cv * V;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        gnw[c + j] = acc_t(0);
        for (int64_t i = 0; i < s.K; ++i) gw[i * C + c + j] = acc_t(0);
      }
    }
  }
  const int64_t token_end = min(tokens, (chunk + 1) * chunk_size);
  for (int64_t token = chunk * chunk_size; token < token_end; ++token) {
    const int64_t t = token % s.T;
    for (int64_t m = 0; m < s.M; ++m) {
      const acc_t r = rstd[token * s.M + m];
      acc_t dot[1] = {acc_t(0)};
      for (int64_t cv = threadIdx.x; cv < vecs; cv += blockDim.x) {
        const int64_t c = m * D + cv * V;
        acc_t gn[V], xv[V];
#pragma unroll
        for (int j = 0; j < V; ++j) gn[j] = acc_t(0);
        const acc_t* gp = grad_pre + token * C + c;
        for (int64_t i = 0; i < s.K; ++i) {
          const int64_t shift = conv_tap_shift(i, s.K, s.dilation);
          if (t + shift < s.T) {  // output t + shift read this token through tap i
#pragma unroll
            for (int j = 0; j < V; ++j) gn[j] += wt[i * C + c + j] * grad_pre[(token + shift) * C + c + j];
          }
          if (t - shift >= 0) {  // this token's output read position t - shift through tap i
            const int64_t src = token - shift;
            const acc_t rs = rstd[src * s.M + m];
            acc_t xs[V];
            load_vec<acc_t, scalar_t, V>(u + src * C + c, xs);
#pragma unroll
            for (int j = 0; j < V; ++j) gw[i * C + c + j] += gp[j] * xs[j] * rs;
          }
        }
        load_vec<acc_t, scalar_t, V>(u + token * C + c, xv);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const acc_t aj = gn[j] * nw[c + j];
          gnw[c + j] += gn[j] * xv[j] * r;
          a_buf[cv * V + j] = aj;
          dot[0] += aj * xv[j];
        }
      }
      block_sum<acc_t, 1>(dot, scratch);
      const acc_t term = rmsnorm_grad_term(dot[0], r, D);
      for (int64_t cv = threadIdx.x; cv < vecs; cv += blockDim.x) {
        const int64_t c = m * D + cv * V;
        acc_t gv[V], xv[V];
        load_vec<acc_t, scalar_t, V>(g + token * C + c, gv);
        load_vec<acc_t, scalar_t, V>(u + token * C + c, xv);
#pragma unroll
        for (int j = 0; j < V; ++j) gv[j] = gv[j] + r * a_buf[cv * V + j] - xv[j] * term;
        store_vec<acc_t, scalar_t, V>(grad_u + token * C + c, gv);
      }
    }
  }
  if (partial_in_shared) {
    for (int64_t m = 0; m < s.M; ++m) {
      for (int64_t cv = threadIdx.x; cv < vecs; cv += blockDim.x) {
        const int64_t c = m * D + cv * V;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          partials[chunk * part + c + j] = gnw[c + j];
          for (int64_t i = 0; i < s.K; ++i) partials[chunk * part + C + i * C + c + j] = gw[i * C + c + j];
        }
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> short_conv_forward_cuda(const at::Tensor& u, const at::Tensor& norm_weight,
                                                           const at::Tensor& conv_weight, int64_t dilation, double eps,
                                                           bool activation) {
  const c10::cuda::CUDAGuard guard(u.device());
  const auto a = prepare_short_conv_forward(u, norm_weight, conv_weight, dilation, eps, activation);
  if (a.out.numel() == 0) return a.outputs();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.u.scalar_type(), "short_conv_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = a.params<scalar_t, acc_t>();
    const ConvShape& s = p.shape;
    with_vec<scalar_t>(s.D, {p.u, p.out}, [&](auto vec) {
      constexpr int kV = decltype(vec)::value;
      rstd_kernel<scalar_t, acc_t, kV><<<cuda::grid_for(s.B * s.T * s.M, 1, 32), row_threads(s.D / kV), 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t work = s.B * s.T * (s.C / kV);
      conv_forward_kernel<scalar_t, acc_t, kV><<<cuda::grid_for(work, cuda::kBlock, 16), cuda::kBlock, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return a.outputs();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> short_conv_backward_cuda(const at::Tensor& grad_out, const at::Tensor& u,
                                                                        const at::Tensor& norm_weight,
                                                                        const at::Tensor& conv_weight,
                                                                        const at::Tensor& rstd, int64_t dilation,
                                                                        bool activation) {
  const c10::cuda::CUDAGuard guard(u.device());
  const auto a = prepare_short_conv_backward(grad_out, u, norm_weight, conv_weight, rstd, dilation, activation);
  if (a.u.numel() == 0) return a.outputs();
  const ConvShape& s = a.shape;
  const int64_t tokens = s.B * s.T;
  const int64_t chunk_size = (tokens + kConvChunks - 1) / kConvChunks;
  const int64_t chunks = (tokens + chunk_size - 1) / chunk_size;
  const int64_t part = s.C + s.K * s.C;
  const auto acc_options = a.grad_norm_weight.options();
  auto partials = at::empty({chunks, part}, acc_options);
  auto grad_pre = at::empty({tokens, s.C}, acc_options);
  auto total = at::empty({part}, acc_options);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.u.scalar_type(), "short_conv_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = a.params<scalar_t, acc_t>();
    with_vec<scalar_t>(s.D, {p.grad_out, p.u, p.grad_u}, [&](auto vec) {
      constexpr int kV = decltype(vec)::value;
      const int64_t work = tokens * (s.C / kV);
      grad_pre_kernel<scalar_t, acc_t, kV>
          <<<cuda::grid_for(work, cuda::kBlock, 16), cuda::kBlock, 0, stream>>>(p, ptr<acc_t>(grad_pre));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const size_t a_bytes = s.D * sizeof(acc_t), part_bytes = part * sizeof(acc_t);
      auto kernel = conv_backward_kernel<scalar_t, acc_t, kV>;
      const size_t limit = cuda::dynamic_shared_limit(kernel);
      TORCH_CHECK(a_bytes <= limit, "short_conv_backward (CUDA): D=", s.D, " is too wide for shared memory (", a_bytes,
                  " bytes needed, ", limit, " available)");
      const bool in_shared = a_bytes + part_bytes <= limit;
      const size_t smem = a_bytes + (in_shared ? part_bytes : 0);
      cuda::allow_shared(kernel, smem);
      kernel<<<static_cast<unsigned>(chunks), row_threads(s.D / kV), smem, stream>>>(
          p, ptr<acc_t>(grad_pre), chunk_size, in_shared, ptr<acc_t>(partials));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    reduce_chunks_kernel<acc_t><<<cuda::grid_for(part, cuda::kBlock), cuda::kBlock, 0, stream>>>(
        ptr<acc_t>(partials), chunks, part, ptr<acc_t>(total));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  a.grad_norm_weight.copy_(total.narrow(0, 0, s.C).view({s.M, s.D}));
  // The conv weight gradient's norm_weight factor, applied once after the reduction.
  a.grad_weight_t.copy_(total.narrow(0, s.C, s.K * s.C).view({s.K, s.C}) * a.norm_weight.view({1, s.C}));
  return a.outputs();
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CUDA, m) {
  m.impl("_short_conv_forward", &short_conv_forward_cuda);
  m.impl("_short_conv_backward", &short_conv_backward_cuda);
}

}  // namespace engram
