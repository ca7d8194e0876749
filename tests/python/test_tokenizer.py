"""Tokenizer compression (docs/SPEC.md section 1) on a real byte-level BPE trained offline on Python's
own documentation, on hand-made vocabularies, and against a pure-Python re-implementation."""

import re
import unicodedata

import pytest
import torch

from torch_engram import EngramConfig, NgramHasher
from torch_engram.experiment.corpus import SPECIAL_TOKENS
from torch_engram.tokenizer import Compression, build_compression, compress, engram_normalizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable symbol table, written out independently of `tokenizers`."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_SYMBOL = bytes_to_unicode()
SYMBOL_BYTE = {s: b for b, s in BYTE_SYMBOL.items()}


def texts_of(tok):
    n = tok.get_vocab_size(with_added_tokens=True)
    return [tok.decode([i], skip_special_tokens=False) for i in range(n)]


def raw_bytes_vocab(tok) -> list[bytes]:
    """The vocabulary as raw bytes (special tokens as their UTF-8 text)."""
    out = []
    for i in range(tok.get_vocab_size(with_added_tokens=True)):
        t = tok.id_to_token(i)
        out.append(t.encode() if t in SPECIAL_TOKENS else bytes(SYMBOL_BYTE[c] for c in t))
    return out


# Structure of the LUT ------------------------------------------------------------------------------
def test_lut_is_first_appearance_surjection(bpe, comp):
    assert isinstance(comp, Compression) and f"num_compressed={comp.num_compressed}" in repr(comp)
    lut = comp.lut
    assert lut.dtype == torch.int64 and lut.dim() == 1
    assert comp.vocab_size == bpe.get_vocab_size(with_added_tokens=True) == lut.numel() == 2048
    assert sorted(set(lut.tolist())) == list(range(comp.num_compressed))
    assert len(comp.keys) == comp.num_compressed
    next_new = 0
    for tid, new in enumerate(lut.tolist()):
        assert new <= next_new, f"tid {tid} got new id {new} before {next_new} appeared"
        next_new += new == next_new
    assert comp.num_compressed < comp.vocab_size, "a real BPE vocabulary has case/space variants to merge"
    assert 0.0 < comp.ratio < 1.0
    assert comp.ratio == pytest.approx(1 - comp.num_compressed / comp.vocab_size)


def test_keys_are_normalized_texts(bpe, comp):
    normalize = engram_normalizer().normalize_str
    for tid, text in enumerate(texts_of(bpe)):
        key = comp.keys[int(comp.lut[tid])]
        if "\ufffd" in text:
            assert key == bpe.id_to_token(tid)
        else:
            assert key == (normalize(text) or text)


def test_decode_batch_matches_per_id_decode(bpe):
    # build_compression decodes in one batch; the official rule is decode([tid]) one id at a time.
    n = bpe.get_vocab_size(with_added_tokens=True)
    assert bpe.decode_batch([[i] for i in range(n)], skip_special_tokens=False) == texts_of(bpe)


def test_special_tokens_kept(comp):
    assert comp.lut[: len(SPECIAL_TOKENS)].tolist() == list(range(len(SPECIAL_TOKENS)))
    assert comp.keys[: len(SPECIAL_TOKENS)] == SPECIAL_TOKENS


# Merges --------------------------------------------------------------------------------------------
def test_case_accent_whitespace_variants_merge():
    vocab = [
        "Hello",
        "hello",
        "HELLO",
        " hello ",
        "café",
        "cafe",
        "CAFÉ",
        "ﬁle",
        "file",
        "\t\n",
        " ",
        "\r\n \t",
        "  ",
        "x",
    ]
    c = build_compression(vocab)
    assert c.lut.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 4]
    assert c.keys == ("hello", "cafe", "file", " ", "x")


def test_case_variants_merge_in_real_vocab(bpe, comp):
    by_text = {}
    for tid, text in enumerate(texts_of(bpe)):
        if text.isascii() and text.strip():
            by_text.setdefault(text.strip().lower(), []).append(tid)
    groups = [tids for tids in by_text.values() if len(tids) > 1]
    assert len(groups) > 50, "the BPE should hold many ' the'/'the'/'The' style variants"
    for tids in groups:
        assert len({int(comp.lut[t]) for t in tids}) == 1, [texts_of(bpe)[t] for t in tids]
    the = [bpe.token_to_id(t) for t in ("the", "Ġthe", "The", "ĠThe")]
    assert None not in the and len({int(comp.lut[t]) for t in the}) == 1


def test_space_token_distinct_from_empty():
    c = build_compression(["", " ", "\t", "  ", "\n\n", "a"])
    assert c.lut.tolist() == [0, 1, 1, 1, 1, 2]
    assert c.keys == ("", " ", "a")


def test_space_token_in_real_vocab(bpe, comp):
    space = bpe.token_to_id("Ġ")
    assert comp.keys[int(comp.lut[space])] == " "


def test_partial_utf8_tokens_keep_raw_key(bpe, comp):
    lead_c3, lead_e2 = bpe.token_to_id(BYTE_SYMBOL[0xC3]), bpe.token_to_id(BYTE_SYMBOL[0xE2])
    for tid in (lead_c3, lead_e2):
        assert "\ufffd" in bpe.decode([tid], skip_special_tokens=False)
        assert comp.keys[int(comp.lut[tid])] == bpe.id_to_token(tid)
    assert int(comp.lut[lead_c3]) != int(comp.lut[lead_e2])


def test_partial_utf8_bytes_keep_raw_bytes():
    c = build_compression([b"\xc3", b"\xe2", "\ufffd", b"caf\xc3\xa9", "cafe", bytearray(b"\xc3")])
    assert c.lut.tolist() == [0, 1, 2, 3, 3, 0]
    assert c.keys == (b"\xc3", b"\xe2", "\ufffd", "cafe")


def test_list_of_bytes_matches_tokenizer(bpe, comp):
    assert torch.equal(build_compression(raw_bytes_vocab(bpe)).lut, comp.lut)


def test_list_of_strings_matches_tokenizer_off_partial_tokens(bpe, comp):
    texts = texts_of(bpe)
    c = build_compression(texts)
    whole = [i for i, t in enumerate(texts) if "\ufffd" not in t]
    # Same partition on whole-character tokens; partial tokens given as text all read "\ufffd".
    pairs = {(int(comp.lut[i]), int(c.lut[i])) for i in whole}
    assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})


class FakeHFTokenizer:
    """Duck-typed transformers tokenizer: decode drops special tokens unless told otherwise."""

    def __init__(self, tok):
        self.tok = tok
        self.special = {tok.token_to_id(t) for t in SPECIAL_TOKENS}

    def __len__(self):
        return self.tok.get_vocab_size(with_added_tokens=True)

    def decode(self, ids, skip_special_tokens=True):
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special]
        return self.tok.decode(ids, skip_special_tokens=False)

    def convert_ids_to_tokens(self, tid):
        return self.tok.id_to_token(tid)


def test_duck_typed_transformers_tokenizer(bpe, comp):
    c = build_compression(FakeHFTokenizer(bpe))
    assert torch.equal(c.lut, comp.lut)
    assert c.keys == comp.keys


def test_bad_vocabularies():
    with pytest.raises(ValueError, match="at least one token"):
        build_compression([])
    with pytest.raises(TypeError, match="tokens must be str or bytes, got int at index 1"):
        build_compression(["a", 3])
    with pytest.raises(TypeError, match="tokenizer must be"):
        build_compression(42)


# Independent re-implementation ---------------------------------------------------------------------
def python_key(text: str) -> str:
    """docs/SPEC.md section 1 in plain Python; agrees with `tokenizers` on ASCII (Python's str.strip
    would also strip \\x1c-\\x1f, which are not Unicode White_Space)."""
    s = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    s = "".join(ch for ch in s if unicodedata.category(ch) != "Mn").lower()
    s = re.sub(r"[ \t\r\n]+", " ", s)
    s = " " if s == " " else s.strip(" \t\n\v\f\r")
    return s or text


def python_lut(texts: list[str]) -> list[int]:
    seen: dict[str, int] = {}
    return [seen.setdefault(python_key(t), len(seen)) for t in texts]


def test_normalizer_matches_python_on_ascii_vocab(bpe):
    normalize = engram_normalizer().normalize_str
    ascii_texts = [t for t in texts_of(bpe) if t.isascii()]
    assert len(ascii_texts) > 1000
    extra = [chr(c) for c in range(128)] + ["A \t\r\n B", " \x0b ", "\x1c", "  X  ", "\n", "Tab\tTab", ""]
    for t in ascii_texts + extra:
        assert (normalize(t) or t) == python_key(t), repr(t)
    assert build_compression(ascii_texts).lut.tolist() == python_lut(ascii_texts)


# compress() ----------------------------------------------------------------------------------------
def test_compress_values(comp):
    ids = torch.randint(0, comp.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    out = compress(ids, comp.lut)
    assert out.dtype == torch.int64 and out.shape == ids.shape
    assert torch.equal(out, comp.lut[ids])
    assert torch.equal(comp.compress(ids.to(torch.int32)), out)
    assert compress([[1, 2]], comp).tolist() == [[1, 2]]
    assert compress(torch.empty(0, 5, dtype=torch.int64), comp.lut).shape == (0, 5)


def test_compress_out_of_range_raises(comp):
    n = comp.vocab_size
    with pytest.raises(ValueError, match=rf"ids must lie in \[0, {n}\) \(the lut length\), got {n}"):
        compress(torch.tensor([0, n, 1]), comp.lut)
    with pytest.raises(ValueError, match=r"got -100 \(2 ids outside"):
        compress(torch.tensor([[5, -100], [-100, 7]]), comp.lut)
    with pytest.raises(TypeError, match=r"ids must be an integer tensor, got dtype torch\.float32"):
        compress(torch.zeros(3), comp.lut)
    with pytest.raises(ValueError, match="lut must be a 1-D int64 tensor"):
        compress(torch.zeros(3, dtype=torch.int64), comp.lut.to(torch.int32))


def test_compress_oov_to_pad(comp):
    pad = SPECIAL_TOKENS.index("<pad>")
    ids = torch.tensor([3, -100, comp.vocab_size + 5, 10])
    out = compress(ids, comp.lut, oov_to_pad=pad)
    assert out.tolist() == [int(comp.lut[3]), int(comp.lut[pad]), int(comp.lut[pad]), int(comp.lut[10])]
    with pytest.raises(ValueError, match=rf"oov_to_pad must be a raw id in \[0, {comp.vocab_size}\).*got -1"):
        compress(ids, comp.lut, oov_to_pad=-1)


# Storage with the model ----------------------------------------------------------------------------
def test_hasher_from_tokenizer(bpe, comp):
    config = EngramConfig(engram_vocab_size=(1009, 1013), layer_ids=(0, 3), n_embed_per_ngram=64, n_head_per_ngram=2)
    hasher = NgramHasher.from_tokenizer(config, bpe)
    assert torch.equal(hasher.lut, comp.lut)
    assert hasher.compressed_vocab_size == comp.num_compressed
    assert int(hasher.pad_id) == int(comp.lut[config.pad_id])
    assert "lut" in hasher.state_dict()
    the, The, dot = bpe.token_to_id("the"), bpe.token_to_id("The"), bpe.token_to_id(".")
    rows = hasher(torch.tensor([[The, the, dot, the], [the, The, dot, The], [the, dot, dot, the]]))
    assert torch.equal(rows[:, 0], rows[:, 1]), "case variants must hash to the same rows"
    assert not torch.equal(rows[:, 0], rows[:, 2])
