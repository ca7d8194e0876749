"""The offline real-text corpus, document splits, the byte-level BPE trainer, its cache and the
token stream encoder."""

import gzip

import pytest
import torch

from torch_engram.experiment import corpus
from torch_engram.experiment.corpus import (
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    default_tokenizer,
    encode_documents,
    load_documents,
    load_documents_by_source,
    load_text_files,
    split_train_val,
    train_bpe_tokenizer,
)


def needs(source):
    return pytest.mark.skipif(source not in corpus.available_sources(), reason=f"{source} is not installed")


# Sources -------------------------------------------------------------------------------------------
def test_pydoc_topics_always_present():
    import pydoc_data.topics

    assert "pydoc_topics" in corpus.available_sources()
    docs = load_documents(["pydoc_topics"])
    topics = pydoc_data.topics.topics
    assert docs == [topics[k] for k in sorted(topics) if topics[k].strip()]


def test_documents_deterministic_and_ordered():
    by_source = load_documents_by_source()
    assert tuple(by_source) == corpus.available_sources()
    flat = [d for docs in by_source.values() for d in docs]
    assert load_documents() == flat
    assert all(isinstance(d, str) and d.strip() for d in flat)


@needs("python_docs")
def test_python_docs_one_document_per_file():
    docs = load_documents(["python_docs"])
    assert len(docs) == len(corpus._source_files("python_docs")) > 100
    assert any("Built-in Functions" in d for d in docs)


@needs("fortunes")
def test_fortunes_without_overstrike():
    docs = load_documents(["fortunes"])
    assert len(docs) > 10 and not any("\x08" in d for d in docs)
    assert any("\n%\n" in d for d in docs)


@needs("jargon")
def test_jargon_split_into_sections():
    docs = load_documents(["jargon"])
    assert len(docs) > 30
    assert any(d.startswith("  H\n") and ":hacker:" in d for d in docs)


def test_unknown_and_absent_sources(monkeypatch):
    with pytest.raises(ValueError, match=r"sources must be names from .*got 'wikipedia'"):
        load_documents(["wikipedia"])
    monkeypatch.setattr(corpus, "_JARGON_FILES", ("/nonexistent/jargon.txt",))
    assert "jargon" not in corpus.available_sources()
    assert "jargon" not in load_documents_by_source()
    with pytest.raises(FileNotFoundError, match="source 'jargon' is not installed"):
        load_documents(["jargon"])


def test_max_bytes_caps_at_character_boundary():
    docs = load_documents(max_bytes=100_000)
    sizes = [len(d.encode()) for d in docs]
    assert sum(sizes) <= 100_000 and sum(sizes) > 99_990
    full = load_documents()
    assert docs[:-1] == full[: len(docs) - 1] and full[len(docs) - 1].startswith(docs[-1])
    assert load_documents(max_bytes=0) == []
    # A cut through a multi-byte character drops the whole character.
    assert corpus._cap(["ab", "é"], 3) == ["ab"]
    assert corpus._cap(["ab", "é"], 4) == ["ab", "é"]
    with pytest.raises(ValueError, match="max_bytes must be >= 0 or None, got -1"):
        load_documents(max_bytes=-1)


def test_load_text_files(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("second")
    (tmp_path / "d" / "a.txt").write_text("first")
    (tmp_path / "d" / "sub" / "c.txt.gz").write_bytes(gzip.compress("third ünïcode".encode()))
    (tmp_path / "d" / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    docs = load_text_files([tmp_path / "latin1.txt", tmp_path / "d"])
    assert docs == ["café", "first", "second", "third ünïcode"]
    assert load_text_files(str(tmp_path / "d" / "a.txt")) == ["first"]
    with pytest.raises(FileNotFoundError, match=r"must name existing files or directories, got '.*missing'"):
        load_text_files([tmp_path / "missing"])


# Splits --------------------------------------------------------------------------------------------
def test_split_train_val_deterministic(small_docs):
    small_docs = [f"{i}:{d}" for i, d in enumerate(small_docs)]  # some pydoc topics share a text
    train, val = split_train_val(small_docs, val_fraction=0.1, seed=3)
    assert (train, val) == split_train_val(small_docs, val_fraction=0.1, seed=3)
    assert len(val) == round(0.1 * len(small_docs)) and len(train) + len(val) == len(small_docs)
    assert sorted(train + val) == sorted(small_docs)
    index = {d: i for i, d in enumerate(small_docs)}
    assert [index[d] for d in train] == sorted(index[d] for d in train)
    assert split_train_val(small_docs, val_fraction=0.1, seed=4)[1] != val
    assert split_train_val(["a", "b"], val_fraction=0.01)[1] != []
    assert split_train_val(small_docs, val_fraction=0.0) == (small_docs, [])
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\), got 1.0"):
        split_train_val(small_docs, val_fraction=1.0)


# Tokenizer -----------------------------------------------------------------------------------------
def test_bpe_layout_and_round_trip(small_bpe):
    assert small_bpe.get_vocab_size(with_added_tokens=True) == 1024
    assert [small_bpe.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (EOS_ID, PAD_ID) == (1, 2) and SPECIAL_TOKENS[PAD_ID] == "<pad>"
    text = "def f(x):\n    return x ** 2  # café, naïve — ☃ 日本語\n"
    enc = small_bpe.encode(text, add_special_tokens=False)
    assert small_bpe.decode(enc.ids) == text
    assert small_bpe.token_to_id("<unk>") not in enc.ids
    assert len(enc.ids) < len(text.encode()), "merges should compress ASCII text"


def test_bpe_training_deterministic(small_docs, small_bpe):
    assert train_bpe_tokenizer(small_docs, vocab_size=1024).to_str() == small_bpe.to_str()


def test_bpe_too_small_vocab():
    with pytest.raises(ValueError, match=r"vocab_size must be >= 260 .*got 100"):
        train_bpe_tokenizer(["hello"], vocab_size=100)


def test_default_tokenizer_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_ENGRAM_CACHE", str(tmp_path))
    tok = default_tokenizer(vocab_size=512, max_bytes=200_000)
    files = list((tmp_path / "tokenizers").glob("bpe-512-*.json"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    again = default_tokenizer(vocab_size=512, max_bytes=200_000)
    assert again.to_str() == tok.to_str() and files[0].stat().st_mtime_ns == stamp
    assert default_tokenizer(vocab_size=512, max_bytes=200_000, refresh=True).to_str() == tok.to_str()
    default_tokenizer(vocab_size=600, max_bytes=200_000)
    assert len(list((tmp_path / "tokenizers").glob("*.json"))) == 2
    assert not list((tmp_path / "tokenizers").glob("*.tmp"))


def test_default_tokenizer_unwritable_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("TORCH_ENGRAM_CACHE", str(blocker))
    with pytest.warns(UserWarning, match="could not cache the tokenizer"):
        tok = default_tokenizer(vocab_size=300, max_bytes=20_000)
    assert tok.get_vocab_size() == 300


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_ENGRAM_CACHE", str(tmp_path / "x"))
    assert corpus.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("TORCH_ENGRAM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert corpus.cache_dir() == tmp_path / "xdg" / "torch_engram"


# Token stream --------------------------------------------------------------------------------------
def test_encode_documents(small_bpe):
    docs = ["Hello world.", "Second document — with ünïcode.", "x"]
    stream = encode_documents(small_bpe, docs)
    assert stream.ids.dtype == torch.int64 and stream.doc_starts.dtype == torch.int64
    assert stream.num_bytes == sum(len(d.encode()) for d in docs)
    ends = torch.cat([stream.doc_starts[1:], torch.tensor([stream.ids.numel()])])
    assert stream.doc_starts[0] == 0
    for d, s, e in zip(docs, stream.doc_starts.tolist(), ends.tolist()):
        assert int(stream.ids[e - 1]) == EOS_ID
        assert small_bpe.decode(stream.ids[s : e - 1].tolist()) == d
    assert int((stream.ids == EOS_ID).sum()) == len(docs)
    ids, num_bytes, starts = encode_documents(small_bpe, [])
    assert ids.numel() == 0 and num_bytes == 0 and starts.numel() == 0


def test_encode_documents_bad_eos(small_bpe):
    with pytest.raises(ValueError, match=r"eos_id must lie in \[0, 1024\), got 5000"):
        encode_documents(small_bpe, ["a"], eos_id=5000)
    no_eos = train_bpe_tokenizer(["hello world"], vocab_size=300, special_tokens=["<pad>"])
    with pytest.raises(ValueError, match="has no '<eos>' token; pass eos_id"):
        encode_documents(no_eos, ["a"])


def test_tile_reads_the_stream_again_from_its_start():
    from torch_engram.experiment.corpus import tile

    ids = torch.arange(5)
    assert tile(ids, 3).tolist() == [0, 1, 2]
    assert tile(ids, 12).tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    with pytest.raises(ValueError, match="empty"):
        tile(ids[:0], 3)
