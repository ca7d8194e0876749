// A LibTorch C++ program that uses torch-engram without Python: an Engram layer's ops forward and
// backward through the library's C++ autograd Functions, and a fused Adam update of a table
// inside backward. Build it against an installed torch-engram (see examples/cpp/CMakeLists.txt).
#include <torch_engram.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace {

void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "engram_ops: FAILED: %s\n", what);
    std::exit(1);
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  const int64_t B = 2, T = 7, H = 4, d_head = 8, M = 2, D = 16, rows_n = 500;
  // Rows of the demo rule would come from ngram_hash; random rows exercise the same gather.
  const at::Tensor rows = at::randint(0, rows_n, {B, T, H}, at::kLong);
  const at::Tensor table = at::randn({rows_n, d_head}).requires_grad_(true);
  const at::Tensor proj = (0.1 * at::randn({(M + 1) * D, H * d_head})).requires_grad_(true);
  const at::Tensor hidden = at::randn({B, T, M, D}).requires_grad_(true);
  const at::Tensor gains = at::ones({M, D}).requires_grad_(true);
  const at::Tensor conv_norm = at::ones({M, D});
  const at::Tensor conv_weight = (0.1 * at::randn({M * D, 4})).requires_grad_(true);

  // Forward: gather -> fused K/V projection -> gate -> short conv; backward through all of it.
  const at::Tensor e = torch_engram::multihead_gather(table, rows);
  const at::Tensor kv = at::matmul(e, proj.t());
  const at::Tensor u = torch_engram::engram_gate(hidden, kv, gains, 1e-6);
  const at::Tensor y = torch_engram::short_conv(u, conv_norm, conv_weight, 3, 1e-5);
  y.square().sum().backward();
  expect(e.sizes() == at::IntArrayRef({B, T, H * d_head}), "gather shape");
  expect(y.sizes() == hidden.sizes(), "layer output shape");
  for (const at::Tensor* t : {&table, &proj, &hidden, &gains, &conv_weight}) {
    expect(t->grad().defined() && at::isfinite(t->grad()).all().item<bool>(), "finite gradients");
  }
  // Only looked-up rows get gradient.
  const at::Tensor touched = at::zeros({rows_n}, at::kBool).index_fill_(0, rows.flatten(), true);
  expect(table.grad().index({touched.logical_not()}).abs().max().item<float>() == 0.0f, "untouched rows");
  expect(table.grad().index({touched}).abs().sum(1).gt(0).all().item<bool>(), "touched rows");

  // The fused update: Adam on the looked-up rows inside backward, no table gradient.
  const at::Tensor weight = at::randn({rows_n, d_head}).requires_grad_(true);
  const at::Tensor before = weight.detach().clone();
  const at::Tensor m1 = at::zeros({rows_n, d_head}), m2 = at::zeros({rows_n, d_head});
  const at::Tensor row_step = at::zeros({rows_n}, at::kInt), step = at::zeros({1}, at::kLong);
  const at::Tensor hparams = at::tensor({0.01, 0.9, 0.999, 1e-8, 0.0}, at::kDouble);
  torch_engram::multihead_gather_fused(weight, rows, m1, m2, row_step, step, hparams, "adam").sum().backward();
  expect(!weight.grad().defined(), "fused tables get no gradient");
  expect(step.item<int64_t>() == 1, "one update");
  const at::Tensor moved = (weight.detach() - before).abs().sum(1).gt(0);
  expect(at::equal(moved, touched), "exactly the looked-up rows moved");
  // First Adam step from zero state: lr * sign(g) with g = 1 * (lookups of the row).
  const float delta = (before - weight.detach()).index({touched}).mean().item<float>();
  expect(std::fabs(delta - 0.01f) < 1e-5f, "Adam's first step is lr");

  std::printf("engram_ops: LibTorch C++ forward/backward and fused table update OK (%lld touched rows)\n",
              static_cast<long long>(touched.sum().item<int64_t>()));
  return 0;
}
