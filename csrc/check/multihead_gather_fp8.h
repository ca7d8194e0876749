// Argument checks and preparation of multihead_gather_fp8 shared by the CPU and CUDA adapters
// (shapes, dtypes, devices; never tensor values, so the CUDA path stays free of host syncs).
#pragma once

#include <ATen/ATen.h>

#include "check/multihead_gather.h"
#include "engram/fp8.h"

namespace engram {

struct GatherFp8Args {
  at::Tensor table, scale, rows, out;  // table and scale as uint8 views
};

inline GatherFp8Args prepare_multihead_gather_fp8(const at::Tensor& table, const at::Tensor& scale,
                                                  const at::Tensor& rows, at::ScalarType out_dtype) {
  const char* op = "multihead_gather_fp8";
  check_gather_table_rows(table, rows, op);
  TORCH_CHECK(table.scalar_type() == at::kFloat8_e4m3fn, op, ": table must be float8_e4m3fn, got ",
              table.scalar_type());
  TORCH_CHECK(table.size(1) % kFp8Block == 0, op, ": table's d_head must be a multiple of ", kFp8Block,
              " (one scale per ", kFp8Block, " values), got ", table.size(1));
  TORCH_CHECK(scale.scalar_type() == at::kFloat8_e8m0fnu || scale.scalar_type() == at::kByte, op,
              ": scale must be float8_e8m0fnu (or its bytes, uint8), got ", scale.scalar_type());
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == table.size(0) && scale.size(1) == table.size(1) / kFp8Block, op,
              ": scale must be [num_rows, d_head / ", kFp8Block, "] = [", table.size(0), ", ",
              table.size(1) / kFp8Block, "], got shape ", scale.sizes());
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16, op,
              ": out_dtype must be float32 or bfloat16, got ", out_dtype);
  TORCH_CHECK(scale.device() == table.device(), op, ": scale must be on table's device ", table.device(), ", got ",
              scale.device());
  GatherFp8Args a;
  a.table = table.contiguous().view(at::kByte);
  a.scale = scale.contiguous().view(at::kByte);
  a.rows = rows.contiguous();
  a.out = empty_gather_output(rows, table.size(1), table.options().dtype(out_dtype));
  return a;
}

}  // namespace engram
