"""FP8 tables: the E4M3/E8M0 quantiser, the gather with fused dequantisation (exact against the
reference), its error bounds against the unquantised table, and EngramTable's FP8 storage."""

import pytest
import torch

import torch_engram as te
from conftest import DEVICES, one_layer_config
from torch_engram import reference
from torch_engram.fp8 import BLOCK, dequantize_fp8, e8m0_to_float, quantize_fp8


def wide_table(R=64, d=64, seed=0):
    # Rows spanning 2^-30 .. 2^30, with zeros, exact powers of two and a few tiny values mixed in
    # with large ones (they land on E4M3 subnormals).
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(R, d, generator=g) * torch.logspace(-9, 9, R, base=10.0).view(-1, 1)
    t[3] = 0
    t[4, :BLOCK] = 2.0 ** (torch.arange(BLOCK) % 17 - 8).float()  # within one block's range
    t[5, ::7] *= 1e-6
    return t


def pow2(e):
    return e8m0_to_float((e + 127).to(torch.uint8))


@pytest.mark.parametrize("device", DEVICES)
def test_decoders_match_torch_for_every_byte(device):
    # Every E4M3 byte under scale 2^0, and every finite E8M0 byte under value 1.0.
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(1, 256).view(torch.float8_e4m3fn)
    scale = torch.full((1, 256 // BLOCK), 127, dtype=torch.uint8)
    got = te.ops.multihead_gather_fp8(
        values.to(device), scale.to(device), torch.zeros(1, 1, dtype=torch.int64, device=device), torch.float32
    )
    torch.testing.assert_close(got.cpu().view(256), values.float().view(256), equal_nan=True, atol=0, rtol=0)
    ones = torch.full((255, BLOCK), 0x38, dtype=torch.uint8).view(torch.float8_e4m3fn)  # 1.0
    exps = torch.arange(255, dtype=torch.int32).to(torch.uint8).view(255, 1)
    got = te.ops.multihead_gather_fp8(
        ones.to(device), exps.to(device), torch.arange(255, device=device).view(255, 1), torch.float32
    )
    want = torch.ldexp(torch.ones(255), torch.arange(255) - 127)
    assert torch.equal(got.cpu()[:, 0], want)


def test_quantiser_picks_the_smallest_scale_and_meets_the_bounds():
    t = wide_table()
    v, s = quantize_fp8(t)
    assert v.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu
    assert v.shape == t.shape and s.shape == (t.shape[0], t.shape[1] // BLOCK)
    e = s.view(torch.uint8).to(torch.int64) - 127
    blocks = t.view(t.shape[0], -1, BLOCK)
    amax = blocks.abs().amax(-1)
    nz = amax > 0
    # amax / 2^e <= 448 < amax / 2^(e - 1): no value saturates, and no smaller scale would do.
    assert bool((amax[nz] / pow2(e[nz]) <= 448).all())
    assert bool((amax[nz] / pow2(e[nz] - 1) > 448).all())
    deq = dequantize_fp8(v, s).view_as(blocks)
    err = (deq - blocks).abs()
    scale = pow2(e).unsqueeze(-1)
    normal = blocks.abs() >= scale * 2.0**-6
    assert bool((err[normal] <= blocks.abs()[normal] * 2.0**-4).all())
    assert bool((err[~normal] <= (scale * 2.0**-10).expand_as(err)[~normal]).all())
    assert torch.equal(deq[3], torch.zeros_like(deq[3]))
    assert torch.equal(deq[4, 0], blocks[4, 0])  # powers of two within E4M3's range are exact


def test_quantiser_rejects_bad_tables():
    with pytest.raises(ValueError, match="d_head % 32"):
        quantize_fp8(torch.zeros(4, 48))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_fp8(torch.tensor([[float("inf")] * 32]))
    with pytest.raises(ValueError, match="float tensor"):
        quantize_fp8(torch.zeros(2, 32, dtype=torch.int32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_gather_equals_the_dequantised_rows_exactly(device, out_dtype, index_dtype):
    t = wide_table(R=97, d=96)
    v, s = quantize_fp8(t)
    rows = torch.randint(0, 97, (3, 5, 4), generator=torch.Generator().manual_seed(1)).to(index_dtype)
    got = te.ops.multihead_gather_fp8(v.to(device), s.to(device), rows.to(device), out_dtype)
    assert got.dtype == out_dtype and got.shape == (3, 5, 4 * 96)
    want = dequantize_fp8(v, s)[rows.long()].reshape(3, 5, -1)
    assert torch.equal(got.float().cpu(), want)  # exact in bfloat16 too
    assert torch.equal(got.cpu(), reference.multihead_gather_fp8(v, s, rows, out_dtype))
    # Scales as raw bytes (the layout of loaders that store E8M0 as uint8) give the same rows.
    assert torch.equal(
        te.ops.multihead_gather_fp8(v.to(device), s.view(torch.uint8).to(device), rows.to(device), out_dtype), got
    )


def test_gather_errors_name_the_argument():
    v, s = quantize_fp8(torch.randn(10, 64))
    rows = torch.tensor([[1, 10]])
    with pytest.raises(RuntimeError, match=r"rows must lie in \[0, 10\) \(table.size\(0\)\), got 10 at rows\[0, 1\]"):
        te.ops.multihead_gather_fp8(v, s, rows, torch.float32)
    with pytest.raises(RuntimeError, match="table must be float8_e4m3fn"):
        te.ops.multihead_gather_fp8(v.float(), s, rows, torch.float32)
    with pytest.raises(RuntimeError, match=r"scale must be \[num_rows, d_head / 32\]"):
        te.ops.multihead_gather_fp8(v, s[:, :1], rows, torch.float32)
    with pytest.raises(RuntimeError, match="out_dtype must be float32 or bfloat16"):
        te.ops.multihead_gather_fp8(v, s, rows, torch.float16)


def test_opcheck():
    v, s = quantize_fp8(torch.randn(50, 64))
    rows = torch.randint(0, 50, (2, 3, 4))
    # Without test_schema: it compares inputs with float maths PyTorch does not implement for FP8.
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    for dt in (torch.float32, torch.bfloat16):
        torch.library.opcheck(torch.ops.engram.multihead_gather_fp8, (v, s, rows, dt), test_utils=utils)


def test_table_storage_memory_checkpoint_and_casts():
    R, d = 4096, 64
    bf16 = te.EngramTable(R, d, dtype=torch.bfloat16, init_std=0.5)
    rows = torch.randint(0, R, (4, 16, 4))
    ref = bf16(rows).detach()
    fp8 = te.EngramTable(R, d, dtype=torch.bfloat16)
    fp8.load_state_dict(bf16.state_dict())
    fp8.quantize_fp8_()
    # Memory: half of bfloat16 plus one byte per 32 values.
    nbytes = fp8.weight.nbytes + fp8.weight_scale.nbytes
    assert nbytes == R * d + R * d // 32
    assert nbytes / bf16.weight.nbytes == pytest.approx(0.5 + 1 / 64)
    got = fp8(rows)
    assert got.dtype == torch.bfloat16
    assert float((got.float() - ref.float()).abs().max()) <= 2.0**-4 * float(ref.float().abs().max())
    # The checkpoint is the V4.1 layout and restores bit for bit into a table built as FP8.
    sd = fp8.state_dict()
    assert sd["weight"].dtype == torch.float8_e4m3fn and sd["weight_scale"].dtype == torch.float8_e8m0fnu
    back = te.EngramTable(R, d, storage="fp8", dtype=torch.bfloat16)
    back.load_state_dict(sd)
    assert torch.equal(back(rows), got)
    # Casts move the bytes untouched and change the gather's output dtype.
    back.float()
    assert back.weight.dtype == torch.float8_e4m3fn and back.weight_scale.dtype == torch.float8_e8m0fnu
    assert torch.equal(back(rows), got.float())
    with pytest.raises(RuntimeError, match="FP8 tables are inference storage"):
        back.weight.requires_grad_(True)
        back(rows)


def test_table_storage_errors():
    with pytest.raises(ValueError, match="d_head % 32"):
        te.EngramTable(10, 16, storage="fp8")
    with pytest.raises(ValueError, match="placement='device'"):
        te.EngramTable(10, 32, storage="fp8", placement="host", cache_rows=4)
    with pytest.raises(ValueError, match="storage must be one of"):
        te.EngramTable(10, 32, storage="int8")


def test_engram_layer_with_an_fp8_table_trains_the_rest():
    # The layer runs on an FP8 table: outputs close to the bf16 table's, and the projections and
    # gate still train (the table is frozen).
    cfg = one_layer_config()
    import dataclasses

    cfg = dataclasses.replace(cfg, n_embed_per_ngram=64)  # d_head 32
    torch.manual_seed(0)
    eng = te.Engram(cfg, 1, 32, hasher=te.NgramHasher(cfg))
    ids = torch.randint(0, 50, (2, 12))
    hidden = torch.randn(2, 12, 32)
    ref = eng(hidden, input_ids=ids).detach()
    eng.table.quantize_fp8_()
    out = eng(hidden, input_ids=ids)
    torch.testing.assert_close(out, ref, atol=0.1 * float(ref.abs().max()), rtol=0.1)
    before = eng.table.weight.view(torch.uint8).clone()
    out.sum().backward()
    assert float(eng.kv_proj.weight.grad.abs().sum()) > 0 and float(eng.norm_q_weight.grad.abs().sum()) > 0
    assert torch.equal(eng.table.weight.view(torch.uint8), before)  # frozen
