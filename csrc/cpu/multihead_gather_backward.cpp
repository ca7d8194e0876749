// CPU kernels of multihead_gather_backward (dense) and multihead_gather_backward_sparse: one
// sort/segment path for both (segments.h), each touched row's gradient summed in position order
// and rounded once into the output.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "segments.h"

namespace engram {
namespace {

using cpu::RowSegments;
using cpu::segments_of;

// out row of segment u = dst_rows[u] (dense) or u (dst_rows == nullptr, sparse).
void reduce_into(const RowSegments& seg, const at::Tensor& grad_c, int64_t d_head, const int64_t* dst_rows,
                 at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_c.scalar_type(), "multihead_gather_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* g = grad_c.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    cpu::sum_segments<scalar_t, acc_t>(seg, g, d_head, [&](int64_t u, const acc_t* a) {
      scalar_t* dst = o + (dst_rows ? dst_rows[u] : u) * d_head;
      for (int64_t j = 0; j < d_head; ++j) dst[j] = static_cast<scalar_t>(a[j]);
    });
  });
}

at::Tensor multihead_gather_backward_cpu(const at::Tensor& grad_e, const at::Tensor& rows, int64_t num_rows) {
  const int64_t d_head = check_multihead_gather_backward_args(grad_e, rows, "multihead_gather_backward");
  TORCH_CHECK(num_rows >= 0, "multihead_gather_backward: num_rows must be non-negative, got ", num_rows);
  const at::Tensor rows_c = rows.contiguous();
  const at::Tensor grad_c = grad_e.contiguous();
  const RowSegments seg = segments_of(rows_c, num_rows, "multihead_gather_backward");
  at::Tensor out = at::zeros({num_rows, d_head}, grad_c.options());
  reduce_into(seg, grad_c, d_head, seg.unique_rows.const_data_ptr<int64_t>(), out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> multihead_gather_backward_sparse_cpu(const at::Tensor& grad_e,
                                                                        const at::Tensor& rows) {
  const int64_t d_head = check_multihead_gather_backward_args(grad_e, rows, "multihead_gather_backward_sparse");
  const at::Tensor rows_c = rows.contiguous();
  const at::Tensor grad_c = grad_e.contiguous();
  const RowSegments seg = segments_of(rows_c, -1, "multihead_gather_backward_sparse");
  at::Tensor values = at::empty({seg.unique_rows.size(0), d_head}, grad_c.options());
  reduce_into(seg, grad_c, d_head, nullptr, values);
  return {seg.unique_rows, values};
}

}  // namespace

TORCH_LIBRARY_IMPL(engram, CPU, m) {
  m.impl("_multihead_gather_backward", &multihead_gather_backward_cpu);
  m.impl("_multihead_gather_backward_sparse", &multihead_gather_backward_sparse_cpu);
}

}  // namespace engram
