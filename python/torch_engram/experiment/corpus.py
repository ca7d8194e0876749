"""Real English text available offline (no download) and a byte-level BPE tokenizer trained on it.

Sources, in this fixed order (each skipped when absent, documents sorted within each):
  "pydoc_topics"  Python's own `pydoc_data.topics` (always present): one document per topic.
  "python_docs"   reST sources of the Python documentation (Debian `python3.X-doc`,
                  /usr/share/doc/python3.X/html/_sources/**/*.txt): one document per file.
  "fortunes"      fortune cookie files (Debian `fortunes`, /usr/share/games/fortunes): one per file.
  "jargon"        the Jargon File (Debian `jargon-text`): one document per chapter, appendix or
                  lexicon letter.

Tokenizer ids: the special tokens come first, laid out as in DeepSeek-V3 so that
`EngramConfig.pad_id = 2` is the pad token: 0 "<bos>", 1 "<eos>", 2 "<pad>", 3 "<unk>".
"""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import re
import sys
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SOURCES = ("pydoc_topics", "python_docs", "fortunes", "jargon")
SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>", "<unk>")
BOS_ID, EOS_ID, PAD_ID, UNK_ID = range(len(SPECIAL_TOKENS))

# Bumped whenever the corpus cleaning or the trainer settings change, so cached tokenizers refresh.
_FORMAT_VERSION = 1
_FORTUNE_DIRS = ("/usr/share/games/fortunes", "/usr/share/fortune")
_JARGON_FILES = ("/usr/share/doc/jargon-text/jargon.txt.gz", "/usr/share/doc/jargon-text/jargon.txt")
# Column-0 headings of the Jargon File, plus the two-space indented letter heads of the lexicon.
_JARGON_SPLIT = re.compile(r"^(?=(?:Chapter|Appendix|Glossary|Bibliography)\b|  [0-9A-Z]$)", re.MULTILINE)


# Source discovery ----------------------------------------------------------------------------------
def _python_docs_dir() -> Path | None:
    """The reST sources of the running Python's docs, else of the newest python3.X-doc installed."""
    own = Path(f"/usr/share/doc/python{sys.version_info.major}.{sys.version_info.minor}/html/_sources")
    if own.is_dir():
        return own

    def version(p: Path) -> tuple[int, ...]:
        digits = re.findall(r"\d+", p.parts[4])
        return tuple(int(d) for d in digits)

    found = sorted(Path("/usr/share/doc").glob("python3*/html/_sources"), key=version)
    return found[-1] if found else None


def _source_files(source: str) -> list[Path]:
    """The files a source reads, in a fixed order (empty when the source is not installed)."""
    if source == "pydoc_topics":
        import pydoc_data.topics

        return [Path(pydoc_data.topics.__file__)]
    if source == "python_docs":
        root = _python_docs_dir()
        return sorted(root.rglob("*.txt"), key=lambda p: p.relative_to(root).as_posix()) if root else []
    if source == "fortunes":
        for d in map(Path, _FORTUNE_DIRS):
            if d.is_dir():
                # *.dat are strfile indexes and *.u8 symlinks repeat the plain files.
                return sorted(
                    p for p in d.iterdir() if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")
                )
        return []
    if source == "jargon":
        return [p for p in map(Path, _JARGON_FILES) if p.is_file()][:1]
    raise ValueError(f"corpus: source must be one of {SOURCES}, got {source!r}")


def available_sources() -> tuple[str, ...]:
    """The built-in sources present on this machine ("pydoc_topics" always is)."""
    return tuple(s for s in SOURCES if _source_files(s))


def _strip_overstrike(text: str) -> str:
    """Old fortune files underline and embolden by backspacing over a line ("___\\b\\b\\bone",
    "x\\bx"): replay the line as a terminal would, a letter winning over an underscore."""
    if "\b" not in text:
        return text
    lines = []
    for line in text.split("\n"):
        if "\b" not in line:
            lines.append(line)
            continue
        cells: list[str] = []
        pos = 0
        for ch in line:
            if ch == "\b":
                pos = max(pos - 1, 0)
                continue
            if pos < len(cells):
                if cells[pos] == "_" or ch != "_":
                    cells[pos] = ch
            else:
                cells.append(ch)
            pos += 1
        lines.append("".join(cells))
    return "\n".join(lines)


# Reading -------------------------------------------------------------------------------------------
def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        # Old text files are often Latin-1; it decodes any byte string, so no U+FFFD is invented.
        return data.decode("latin-1")


def _documents_of(source: str) -> list[str]:
    files = _source_files(source)
    if source == "pydoc_topics":
        import pydoc_data.topics

        topics = pydoc_data.topics.topics
        docs = [topics[k] for k in sorted(topics)]
    elif source == "python_docs":
        docs = [_read_text(p) for p in files]
    elif source == "fortunes":
        docs = [_strip_overstrike(_read_text(p)) for p in files]
    else:  # jargon
        docs = [part for p in files for part in _JARGON_SPLIT.split(_read_text(p))]
    return [d for d in docs if d.strip()]


def _resolve_sources(sources: Iterable[str] | None) -> tuple[str, ...]:
    if sources is None:
        return available_sources()
    names = (sources,) if isinstance(sources, str) else tuple(sources)
    for s in names:
        if s not in SOURCES:
            raise ValueError(f"load_documents: sources must be names from {SOURCES}, got {s!r}")
        if not _source_files(s):
            raise FileNotFoundError(
                f"load_documents: source {s!r} is not installed on this machine (installed: {available_sources()})"
            )
    return tuple(s for s in SOURCES if s in names)


def load_documents_by_source(sources: Iterable[str] | None = None) -> dict[str, list[str]]:
    """{source: documents} in SOURCES order. sources=None takes every installed source; a source named
    explicitly but not installed raises FileNotFoundError."""
    return {s: _documents_of(s) for s in _resolve_sources(sources)}


def _truncate_utf8(text: str, max_bytes: int) -> str:
    return text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def _cap(docs: Iterable[str], max_bytes: int | None) -> list[str]:
    if max_bytes is None:
        return list(docs)
    if max_bytes < 0:
        raise ValueError(f"load_documents: max_bytes must be >= 0 or None, got {max_bytes}")
    out, total = [], 0
    for d in docs:
        n = len(d.encode("utf-8"))
        if total + n > max_bytes:
            # The crossing document is cut at a character boundary so the total never exceeds max_bytes.
            rest = _truncate_utf8(d, max_bytes - total)
            if rest:
                out.append(rest)
            break
        out.append(d)
        total += n
    return out


def load_documents(sources: Iterable[str] | None = None, max_bytes: int | None = None) -> list[str]:
    """Documents of the built-in sources, in SOURCES order then sorted order within each source.

    max_bytes caps the total UTF-8 size: documents are taken in order and the one that crosses the
    cap is cut at a character boundary.
    """
    by_source = load_documents_by_source(sources)
    return _cap((d for docs in by_source.values() for d in docs), max_bytes)


def load_text_files(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    max_bytes: int | None = None,
) -> list[str]:
    """A user's own text as documents: one per file. A directory contributes its files recursively
    in sorted order; *.gz files are decompressed; UTF-8, falling back to Latin-1."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            inside = (f for f in p.rglob("*") if f.is_file())
            files.extend(sorted(inside, key=lambda f, root=p: f.relative_to(root).as_posix()))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"load_text_files: paths must name existing files or directories, got {str(p)!r}")
    return _cap((d for d in map(_read_text, files) if d.strip()), max_bytes)


def split_train_val(
    documents: Sequence[str],
    val_fraction: float = 0.05,
    seed: int = 0,
) -> tuple[list[str], list[str]]:
    """Deterministic split by whole documents: round(val_fraction * n) documents (at least one when
    val_fraction > 0 and n >= 2) chosen by a seeded shuffle go to validation. Both parts keep the
    input order."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"split_train_val: val_fraction must be in [0, 1), got {val_fraction}")
    n = len(documents)
    n_val = round(val_fraction * n)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [d for i, d in enumerate(documents) if i not in val_idx]
    val = [d for i, d in enumerate(documents) if i in val_idx]
    return train, val


# Tokenizer -----------------------------------------------------------------------------------------
def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2, special_tokens: Sequence[str] = SPECIAL_TOKENS
) -> Tokenizer:
    """A byte-level BPE tokenizer trained offline on `texts` (no normalizer, GPT-2 style ByteLevel
    pre-tokenizer and decoder). Special tokens take ids 0.. in the order given; the 256 byte
    symbols follow, so any text encodes without <unk>. The trainer has no randomness (no seed to
    set): the same texts give the same tokenizer whatever the thread count. The vocabulary comes
    out smaller than vocab_size when the texts run out of pairs seen min_frequency times."""
    min_vocab = len(special_tokens) + 256
    if vocab_size < min_vocab:
        raise ValueError(
            f"train_bpe_tokenizer: vocab_size must be >= {min_vocab} (special tokens + 256 bytes), got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>" if "<unk>" in special_tokens else None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def cache_dir() -> Path:
    """$TORCH_ENGRAM_CACHE, else $XDG_CACHE_HOME/torch_engram, else ~/.cache/torch_engram."""
    env = os.environ.get("TORCH_ENGRAM_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "torch_engram"


def _corpus_fingerprint(sources: tuple[str, ...], max_bytes: int | None, vocab_size: int) -> str:
    """Cheap identity of the training input: file names, sizes and mtimes, not contents."""
    import tokenizers

    h = hashlib.sha256()
    h.update(repr((_FORMAT_VERSION, tokenizers.__version__, sources, max_bytes, vocab_size)).encode())
    for s in sources:
        for p in _source_files(s):
            st = p.stat()
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def default_tokenizer(vocab_size: int = 8192, max_bytes: int | None = None, refresh: bool = False) -> Tokenizer:
    """The byte-level BPE tokenizer of the built-in corpus (every installed source), cached as JSON
    under cache_dir()/tokenizers so repeat calls only load it. The cache key covers the vocab
    size, max_bytes, the source files (name, size, mtime) and the tokenizers version."""
    sources = available_sources()
    key = _corpus_fingerprint(sources, max_bytes, vocab_size)
    path = cache_dir() / "tokenizers" / f"bpe-{vocab_size}-{key}.json"
    if path.is_file() and not refresh:
        return Tokenizer.from_file(str(path))
    tokenizer = train_bpe_tokenizer(load_documents(sources, max_bytes=max_bytes), vocab_size=vocab_size)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a concurrent reader never sees a partial file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            tokenizer.save(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as err:  # a read-only cache only costs the retraining next time
        warnings.warn(f"default_tokenizer: could not cache the tokenizer at {path}: {err}", stacklevel=2)
    return tokenizer


class TokenStream(NamedTuple):
    """Documents encoded back to back. ids: int64 [n_tokens]; num_bytes: UTF-8 bytes of the text
    (the <eos> separators count none), for bits per byte = total NLL in bits / num_bytes;
    doc_starts: int64 index of each document's first token."""

    ids: torch.Tensor
    num_bytes: int
    doc_starts: torch.Tensor


def encode_documents(tokenizer: Tokenizer, documents: Sequence[str], eos_id: int | None = None) -> TokenStream:
    """One long token stream: each document's ids followed by <eos> (so <eos> separates documents
    and ends the stream). eos_id defaults to the tokenizer's "<eos>" token."""
    if eos_id is None:
        eos_id = tokenizer.token_to_id("<eos>")
        if eos_id is None:
            raise ValueError("encode_documents: the tokenizer has no '<eos>' token; pass eos_id")
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if not 0 <= eos_id < vocab:
        raise ValueError(f"encode_documents: eos_id must lie in [0, {vocab}), got {eos_id}")
    encodings = tokenizer.encode_batch(list(documents), add_special_tokens=False)
    lengths = torch.tensor([len(e.ids) + 1 for e in encodings], dtype=torch.int64)
    doc_starts = torch.cumsum(lengths, 0) - lengths
    ids = torch.full((int(lengths.sum()),), eos_id, dtype=torch.int64)
    for start, e in zip(doc_starts.tolist(), encodings):
        ids[start : start + len(e.ids)] = torch.tensor(e.ids, dtype=torch.int64)
    num_bytes = sum(len(d.encode("utf-8")) for d in documents)
    return TokenStream(ids, num_bytes, doc_starts)


def tile(ids: torch.Tensor, n: int) -> torch.Tensor:
    """The first n ids of a token stream, read again from its start as often as a stream shorter
    than n needs (for benchmarks and analyses that want a fixed length of real text)."""
    if ids.numel() == 0:
        raise ValueError("tile: the token stream is empty")
    return ids.repeat(-(-n // ids.numel()))[:n] if ids.numel() < n else ids[:n]
