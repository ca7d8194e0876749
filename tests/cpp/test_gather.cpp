// multihead_gather and its backward ops called through the dispatcher (as LibTorch C++ users
// would), against naive loops; plus the torch-free sort-key helpers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>
#include <torch/autograd.h>

#include <tuple>
#include <vector>

#include "engram/multihead_gather.h"

namespace {

at::Tensor gather(const at::Tensor& table, const at::Tensor& rows, bool sparse_grad = false) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("engram::multihead_gather", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, bool)>();
  return op.call(table, rows, sparse_grad);
}

at::Tensor backward_dense(const at::Tensor& grad_e, const at::Tensor& rows, int64_t num_rows) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("engram::_multihead_gather_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt)>();
  return op.call(grad_e, rows, c10::SymInt(num_rows));
}

std::tuple<at::Tensor, at::Tensor> backward_sparse(const at::Tensor& grad_e, const at::Tensor& rows) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("engram::_multihead_gather_backward_sparse", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&)>();
  return op.call(grad_e, rows);
}

// e[t, h * d + j] = table[rows[t, h], j]
at::Tensor naive_gather(const at::Tensor& table, const at::Tensor& rows) {
  const int64_t T = rows.size(0), H = rows.size(1), d = table.size(1);
  at::Tensor e = at::empty({T, H * d}, table.options());
  auto tab = table.accessor<float, 2>();
  auto r = rows.accessor<int64_t, 2>();
  auto out = e.accessor<float, 2>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t j = 0; j < d; ++j) out[t][h * d + j] = tab[r[t][h]][j];
  return e;
}

// Position-order fp32 sums, the order the kernels promise.
at::Tensor naive_backward(const at::Tensor& grad_e, const at::Tensor& rows, int64_t num_rows) {
  const int64_t T = rows.size(0), H = rows.size(1), d = grad_e.size(1) / H;
  at::Tensor out = at::zeros({num_rows, d}, grad_e.options());
  at::Tensor seen = at::zeros({num_rows}, at::kBool);
  auto g = grad_e.accessor<float, 2>();
  auto r = rows.accessor<int64_t, 2>();
  auto o = out.accessor<float, 2>();
  auto s = seen.accessor<bool, 1>();
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t row = r[t][h];
      for (int64_t j = 0; j < d; ++j) o[row][j] = s[row] ? o[row][j] + g[t][h * d + j] : g[t][h * d + j];
      s[row] = true;
    }
  }
  return out;
}

TEST(MultiheadGather, ForwardMatchesNaiveLoop) {
  at::manual_seed(0);
  const at::Tensor table = at::randn({37, 5});
  const at::Tensor rows = at::randint(0, 37, {11, 4}, at::kLong);
  const at::Tensor expected = naive_gather(table, rows);
  EXPECT_TRUE(at::equal(gather(table, rows), expected));
  EXPECT_TRUE(at::equal(gather(table, rows.to(at::kInt)), expected));
  // [B, T, H] rows give [B, T, H * d_head].
  EXPECT_TRUE(at::equal(gather(table, rows.view({1, 11, 4})), expected.view({1, 11, 20})));
}

at::Tensor rows_of(std::vector<int64_t> values) {
  return at::tensor(values, at::kLong).view({1, static_cast<int64_t>(values.size())});
}

TEST(MultiheadGather, OutOfRangeRowsThrow) {
  const at::Tensor table = at::randn({10, 3});
  EXPECT_THROW(gather(table, rows_of({1, 10})), c10::Error);
  EXPECT_THROW(gather(table, rows_of({-1, 2})), c10::Error);
  EXPECT_THROW(backward_dense(at::randn({1, 6}), rows_of({1, 10}), 10), c10::Error);
  EXPECT_THROW(backward_sparse(at::randn({1, 6}), rows_of({1, -3})), c10::Error);
}

// Small (comparison sort) and large (parallel radix sort) inputs, duplicates everywhere.
class Backward : public ::testing::TestWithParam<int64_t> {};

TEST_P(Backward, DenseAndSparseMatchNaiveLoop) {
  at::manual_seed(1);
  const int64_t T = GetParam(), H = 8, d = 6, R = 3000;
  const at::Tensor rows = at::randint(0, 500, {T, H}, at::kLong) * 5;  // rows 0, 5, ..., 2495
  const at::Tensor grad_e = at::randn({T, H * d});
  const at::Tensor expected = naive_backward(grad_e, rows, R);
  const at::Tensor dense = backward_dense(grad_e, rows, R);
  EXPECT_TRUE(at::equal(dense, expected));
  EXPECT_TRUE(at::equal(backward_dense(grad_e, rows.to(at::kInt), R), expected));

  auto [unique_rows, values] = backward_sparse(grad_e, rows);
  const at::Tensor expected_rows = std::get<0>(at::_unique(rows.flatten(), /*sorted=*/true));
  EXPECT_TRUE(at::equal(unique_rows, expected_rows));
  EXPECT_TRUE(at::equal(values, expected.index_select(0, expected_rows)));
}

INSTANTIATE_TEST_SUITE_P(Sizes, Backward, ::testing::Values(1, 37, 4096));

TEST(MultiheadGather, BackwardIndependentOfThreadCount) {
  at::manual_seed(2);
  const at::Tensor rows = at::randint(0, 2000, {8192, 16}, at::kLong);
  const at::Tensor grad_e = at::randn({8192, 16 * 4});
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  const at::Tensor one = backward_dense(grad_e, rows, 2000);
  at::set_num_threads(std::max(threads, 2));
  const at::Tensor many = backward_dense(grad_e, rows, 2000);
  at::set_num_threads(threads);
  EXPECT_TRUE(at::equal(one, many));
}

TEST(MultiheadGather, AutogradThroughDispatcher) {
  at::manual_seed(3);
  const at::Tensor table = at::randn({20, 4}).requires_grad_();
  const at::Tensor rows = at::randint(0, 20, {6, 3}, at::kLong);
  const at::Tensor grad_e = at::randn({6, 12});
  gather(table, rows).backward(grad_e);
  EXPECT_TRUE(at::equal(table.grad(), naive_backward(grad_e, rows, 20)));

  const at::Tensor sparse_table = table.detach().clone().requires_grad_();
  const at::Tensor e = gather(sparse_table, rows, /*sparse_grad=*/true);
  const auto grads = torch::autograd::grad({e}, {sparse_table}, {grad_e});
  ASSERT_TRUE(grads[0].is_sparse());
  EXPECT_TRUE(grads[0].is_coalesced());
  EXPECT_TRUE(at::equal(grads[0].to_dense(), table.grad()));
}

TEST(SegmentKeys, RoundTripAndOrder) {
  EXPECT_EQ(engram::bit_width(0), 0);
  EXPECT_EQ(engram::bit_width(1), 1);
  EXPECT_EQ(engram::bit_width(255), 8);
  EXPECT_EQ(engram::bit_width(256), 9);
  EXPECT_EQ(engram::segment_pos_bits(1), 0);
  EXPECT_EQ(engram::segment_pos_bits(2), 1);
  EXPECT_EQ(engram::segment_pos_bits(262144), 18);
  const int pb = engram::segment_pos_bits(262144);
  const uint64_t k = engram::segment_key(10344163, 262143, pb);
  EXPECT_EQ(engram::segment_key_row(k, pb), 10344163);
  EXPECT_EQ(engram::segment_key_pos(k, pb), 262143);
  // Row first, then position.
  EXPECT_LT(engram::segment_key(5, 262143, pb), engram::segment_key(6, 0, pb));
  EXPECT_LT(engram::segment_key(5, 3, pb), engram::segment_key(5, 4, pb));
  EXPECT_TRUE(engram::row_in_range(0, 1));
  EXPECT_FALSE(engram::row_in_range(1, 1));
  EXPECT_FALSE(engram::row_in_range(-1, 1000));
  EXPECT_EQ(engram::segment_row_limit(pb), uint64_t{1} << 46);
}

}  // namespace
