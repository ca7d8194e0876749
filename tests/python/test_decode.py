"""Incremental decoding: EngramState steps equal the full forward bit for bit (CPU, fp32), and the
sweep's transformer decodes with a KV cache and generates the same tokens as recomputing."""

import pytest
import torch

import torch_engram as te
from conftest import one_layer_config, tiny_lm_config
from torch_engram.experiment.models import TransformerLM
from torch_engram.state import EngramState

pytestmark = pytest.mark.usefixtures("one_thread")
V = 50


def layer(M=1, use_conv=True, D=32, seed=0):
    cfg = one_layer_config()
    if not use_conv:
        import dataclasses

        cfg = dataclasses.replace(cfg, use_conv=False, gate_eps=1e-20)
    torch.manual_seed(seed)
    eng = te.Engram(cfg, 1, D, hc_mult=M, hasher=te.NgramHasher(cfg))
    with torch.no_grad():
        if use_conv:
            eng.conv_weight.normal_()  # zero-initialised: make the conv matter
        eng.norm_q_weight.uniform_(0.5, 1.5)
    return eng


def inputs(eng, B, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    hidden = torch.randn(B, T, eng.hc_mult, eng.hidden_size, generator=g)
    return ids, hidden


def run_steps(eng, ids, hidden, steps, doc_start=None, state=None):
    state = state or EngramState(eng.config, ids.shape[0])
    outs, t = [], 0
    for k in steps:
        ds = None if doc_start is None else doc_start[:, t : t + k]
        outs.append(eng(hidden[:, t : t + k], input_ids=ids[:, t : t + k], doc_start=ds, state=state))
        t += k
    assert t == ids.shape[1]
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize("use_conv", [True, False])
@pytest.mark.parametrize("B", [1, 3])
@torch.no_grad()
@pytest.mark.parametrize("T", [24, 23])  # 23: the full forward's GEMM has a tail block
def test_steps_equal_the_full_forward_bit_for_bit(M, use_conv, B, T):
    eng = layer(M, use_conv)
    ids, hidden = inputs(eng, B, T)
    full = eng(hidden, input_ids=ids)
    for steps in ([1] * T, [5, 1, 1, 3, 8, T - 18], [T], [2, 11, 1, T - 14]):
        got, _ = run_steps(eng, ids, hidden, steps)
        assert torch.equal(got, full), steps


@torch.no_grad()
def test_document_starts_are_honoured_across_steps():
    eng = layer(2)
    B, T = 3, 24
    ids, hidden = inputs(eng, B, T)
    doc = torch.zeros(B, T, dtype=torch.bool)
    doc[0, 5] = doc[1, 1] = doc[1, 2] = doc[2, 23] = True
    full = eng(hidden, input_ids=ids, doc_start=doc)
    assert not torch.equal(full, eng(hidden, input_ids=ids))  # the starts change the n-grams
    for steps in ([1] * T, [4, 2, 6, 12], [6, 18]):
        got, _ = run_steps(eng, ids, hidden, steps, doc_start=doc)
        assert torch.equal(got, full), steps


@torch.no_grad()
def test_right_padded_batches_of_different_lengths():
    # Three sequences of different lengths decoded together, right-padded, each equal to its own
    # full forward: the state advances by each sequence's length only.
    eng = layer(2)
    lens = [16, 8, 24]
    seqs = [inputs(eng, 1, n, seed=10 + i) for i, n in enumerate(lens)]
    fulls = [eng(h, input_ids=i) for i, h in seqs]
    B = len(lens)
    state = EngramState(eng.config, B)
    # Chunks per sequence: (lengths of this step's valid tokens).
    schedule = [[5, 3, 7], [0, 5, 1], [11, 0, 16]]
    pos = [0] * B
    outs = [[] for _ in range(B)]
    for chunk in schedule:
        k = max(chunk)
        ids = torch.zeros(B, k, dtype=torch.int64)
        hid = torch.zeros(B, k, 2, eng.hidden_size)
        for b, n in enumerate(chunk):
            ids[b, :n] = seqs[b][0][0, pos[b] : pos[b] + n]
            hid[b, :n] = seqs[b][1][0, pos[b] : pos[b] + n]
        y = eng(hid, input_ids=ids, state=state, lengths=torch.tensor(chunk))
        for b, n in enumerate(chunk):
            outs[b].append(y[b, :n])
            pos[b] += n
    assert pos == lens
    for b in range(B):
        assert torch.equal(torch.cat(outs[b]), fulls[b][0]), b


@torch.no_grad()
def test_reset_starts_a_sequence_anew():
    eng = layer(1)
    ids, hidden = inputs(eng, 2, 16)
    state = EngramState(eng.config, 2)
    run_steps(eng, ids[:, :8], hidden[:, :8], [3, 5], state=state)
    state.reset(torch.tensor([False, True]))
    got, _ = run_steps(eng, ids[:, 8:], hidden[:, 8:], [1, 7], state=state)
    fresh = eng(hidden[1:, 8:], input_ids=ids[1:, 8:])
    cont = eng(hidden[:1], input_ids=ids[:1])[:, 8:]
    assert torch.equal(got[1:], fresh)
    assert torch.equal(got[:1], cont)


def test_state_errors_name_the_argument():
    eng = layer(1)
    ids, hidden = inputs(eng, 2, 4)
    state = EngramState(eng.config, 2)
    with pytest.raises(ValueError, match="lengths must lie in"):
        eng(hidden, input_ids=ids, state=state, lengths=torch.tensor([5, 1]))
    with pytest.raises(ValueError, match=r"input_ids must be \[2, k\]"):
        state.hash(eng.hasher, ids[:1])
    with pytest.raises(ValueError, match="mask must be"):
        state.reset(torch.tensor([True]))
    with pytest.raises(ValueError, match="batch_size"):
        EngramState(eng.config, 0)


def lm_config(**changes):
    fields = dict(d_model=32, max_seq_len=48, n_routed_experts=4, d_expert=16, d_shared=32)
    return tiny_lm_config(V, **{**fields, **changes})


def lm(**changes):
    torch.manual_seed(0)
    model = TransformerLM(lm_config(**changes)).eval()
    with torch.no_grad():
        for e in model.engram_modules():
            e.conv_weight.normal_(std=0.5)
    return model


@pytest.mark.parametrize("hc_mult", [1, 2])
@torch.no_grad()
def test_cached_steps_match_the_full_sequence(hc_mult):
    # Within float rounding only: BLAS GEMMs and attention round a few-row step differently from
    # the whole sequence (the Engram layers alone are bit-exact, above).
    model = lm(hc_mult=hc_mult)
    ids = torch.randint(0, V, (3, 30), generator=torch.Generator().manual_seed(0))
    full = model(ids).logits
    cache = model.new_cache(3)
    outs, t = [], 0
    for k in (7, 1, 1, 4, 17):
        outs.append(model(ids[:, t : t + k], cache=cache).logits)
        t += k
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.lengths.tolist() == [30, 30, 30]


@pytest.mark.parametrize("sampling", [None, dict(temperature=0.8, top_k=8, seed=5)])
def test_generate_with_the_cache_gives_the_tokens_of_recomputation(sampling):
    model = lm()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (3, 9, 1)]
    kw = sampling or {}
    cached = model.generate(prompts, 20, **kw)
    assert [len(t) for t in cached] == [20, 20, 20]
    assert cached == model.generate(prompts, 20, use_cache=False, **kw)
    # One prompt alone gives its tokens of the batch (greedy: no shared random stream).
    if sampling is None:
        assert model.generate(prompts[1:2], 20) == cached[1:2]
    else:
        assert model.generate(prompts, 20, **kw) == cached  # seeded
        assert model.generate(prompts, 20, **{**kw, "seed": 6}) != cached


def test_generate_stops_at_eos_and_checks_its_arguments():
    model = lm()
    prompt = [[1, 2, 3]]
    first = model.generate(prompt, 5)[0]
    assert model.generate(prompt, 5, eos_id=first[1]) == [first[: first.index(first[1]) + 1]]
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(prompt, 46)
    with pytest.raises(ValueError, match="non-empty"):
        model.generate([[]], 2)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="max_seq_len"):
        cache = model.new_cache(1)
        model(torch.zeros(1, 49, dtype=torch.int64), cache=cache)


@pytest.mark.parametrize("table", ["sgd", "rowwise_adagrad", "fp8"])
def test_saved_models_load_back_with_any_table(table, tmp_path):
    # Empty optimizer-state buffers (sgd, rowwise_adagrad) and FP8 tables survive save_model.
    from torch_engram.experiment.models import load_model, save_model

    torch.manual_seed(0)
    cfg = lm_config(engram=lm_config().engram.replace(n_embed_per_ngram=64))  # d_head 32 for FP8
    model = TransformerLM(cfg, table_optimizer="sgd" if table == "fp8" else table).eval()
    if table == "fp8":
        for e in model.engram_modules():
            e.table.quantize_fp8_()
    save_model(tmp_path, model)
    back, _, _ = load_model(tmp_path)
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    assert back.state_dict().keys() == model.state_dict().keys()


@torch.no_grad()
def test_a_failed_step_leaves_the_cache_as_it_was():
    model = lm()
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(4))
    cache = model.new_cache(2)
    model(ids[:, :8], cache=cache)
    block = model.blocks[2]
    real = block.forward

    def fails(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    block.forward = fails
    with pytest.raises(RuntimeError, match="simulated"):
        model(ids[:, 8:], cache=cache)
    block.forward = real
    assert cache.lengths.tolist() == [8, 8] and cache.step_lengths is None
    again = model(ids[:, 8:], cache=cache).logits
    fresh = model.new_cache(2)
    model(ids[:, :8], cache=fresh)
    assert torch.equal(again, model(ids[:, 8:], cache=fresh).logits)
