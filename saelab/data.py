"""Corpora through ``datasets``: load texts, identify them, pack them into sequences.

Three sources (``DataConfig.source``):

- ``pydocs``: Python's own documentation, present on every Python install
  (built once by ``saelab.pydocs`` into a JSONL file named by its content hash).
- ``files``: local ``.txt`` (one document per blank-line separated block),
  ``.jsonl``/``.json`` and ``.parquet`` (one document per row, ``text_field``).
- ``hub``: ``datasets.load_dataset(name, subset, split=split, streaming=True)``.

Every source is read as a stream: a hub dataset is streamed (``streaming=True``:
rows arrive as they are read, never a whole download first; offline, a copy in the
local datasets cache), local files are memory-mapped Arrow tables, and
``iter_texts`` reads either in batches of ``READ_BATCH`` rows, so no corpus is ever
one list in memory; ``pack_blocks`` tokenizes that stream in batches as the
capture consumes it. Packing never lets a sequence span two documents, so a
document-level train/validation split of the captured tokens is clean.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saelab import pydocs
from saelab.config import DataConfig
from saelab.paths import cache_root

log = logging.getLogger(__name__)

FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
READ_BATCH = 1024
"""Rows read from a corpus's Arrow table at a time."""
DOC_WINDOW = 8192
"""Documents shuffled together (by content hash) before packing: the whole of a
corpus this size or smaller, consecutive windows of a larger (streamed) one."""


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes (``files`` corpora are identified by content)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_files(cfg: DataConfig) -> list[Path]:
    """Existing, readable files with allowed suffixes, or a ValueError naming ``data.paths``."""
    paths = [Path(p).expanduser() for p in cfg.paths]
    for p in paths:
        if p.suffix.lower() not in FILE_SUFFIXES:
            raise ValueError(f"data.paths={str(p)!r} is not valid; allowed: files ending in "
                             f"{', '.join(FILE_SUFFIXES)}")
        if not p.is_file() or not os.access(p, os.R_OK):
            raise ValueError(f"data.paths={str(p)!r} is not valid; allowed: an existing, "
                             "readable file")
    return paths


def _local_dataset(kind: str, path: Path, **kwargs: Any):
    import datasets

    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train",
                                     cache_dir=str(cache_root() / "datasets"), **kwargs)
    except Exception as e:  # malformed json/parquet, undecodable text, ...
        raise ValueError(f"data.paths={str(path)!r} is not valid: could not be read as {kind} "
                         f"({type(e).__name__}: {e})") from e


def _column(ds, field: str, where: str) -> Iterator[Any]:
    """The ``field`` values of a dataset or a streamed one, ``READ_BATCH`` rows at a time
    (checked now where the columns are known up front, else at the first batch)."""
    names = ds.column_names  # None for a stream whose features are only known once read

    def missing(columns: Any) -> ValueError:
        return ValueError(f"data.text_field={field!r} is not valid for {where}; allowed: "
                          f"one of its columns {list(columns)}")

    if names is not None and field not in names:
        raise missing(names)

    def rows() -> Iterator[Any]:
        for batch in (ds if names is None else ds.select_columns([field])).iter(
                batch_size=READ_BATCH):
            if field not in batch:
                raise missing(batch)
            yield from batch[field]

    return rows()


def _file_texts(cfg: DataConfig, path: Path) -> Iterator[Any]:
    where = f"data.paths={str(path)!r}"
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _column(_local_dataset("text", path, sample_by="paragraph"), "text", where)
    kind = "parquet" if suffix == ".parquet" else "json"
    return _column(_local_dataset(kind, path), cfg.text_field, where)


def _hub_texts(cfg: DataConfig) -> Iterator[Any]:
    import datasets

    try:  # streamed: rows arrive as the capture reads them, the dataset is never downloaded whole
        ds = datasets.load_dataset(cfg.name, cfg.subset, split=cfg.split, streaming=True)
    except Exception:
        try:  # offline: a copy in the local datasets cache (memory-mapped Arrow)
            ds = datasets.load_dataset(cfg.name, cfg.subset, split=cfg.split)
        except Exception as e:  # unknown name/subset/split, auth, not cached
            raise ValueError(
                f"data.name={cfg.name!r} (subset={cfg.subset!r}, split={cfg.split!r}) could not "
                f"be loaded from the Hugging Face hub ({type(e).__name__}: {e}); allowed: a "
                "dataset reachable from here or in the local datasets cache. Offline, use "
                "data.source=pydocs or data.source=files.") from e
    return _column(ds, cfg.text_field, f"data.name={cfg.name!r}")


def iter_texts(cfg: DataConfig) -> Iterator[str]:
    """The corpus as a stream of documents (stripped, at least ``min_chars`` long), in
    source order. Every source is opened and checked (files, columns, hub names) before
    this returns; the stream raises at its end if no document was long enough."""
    if cfg.source == "pydocs":
        sources = [_column(_local_dataset("json", pydocs.corpus_path()), "text", "pydocs")]
    elif cfg.source == "files":
        sources = [_file_texts(cfg, p) for p in _check_files(cfg)]
    else:
        sources = [_hub_texts(cfg)]

    def stream() -> Iterator[str]:
        kept = 0
        for source in sources:
            for t in source:
                if isinstance(t, str) and len(t := t.strip()) >= cfg.min_chars:
                    kept += 1
                    yield t
        if not kept:
            raise ValueError(f"data.min_chars={cfg.min_chars} leaves no document in the corpus "
                             f"(source={cfg.source!r}); allowed: a smaller value or more text")

    return stream()


def load_texts(cfg: DataConfig) -> list[str]:
    """The corpus as a list of documents (``iter_texts``; for small corpora and examples)."""
    return list(iter_texts(cfg))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


def corpus_identity(cfg: DataConfig) -> str:
    """A stable hash of everything that changes the corpus text.

    Validates ``files`` paths (ValueError) without loading them; ``hub``
    datasets are identified by name/subset/split (not by content, which would
    need a download).
    """
    if cfg.source == "pydocs":
        what: dict[str, Any] = {"pydocs": pydocs.corpus_path().name}
    elif cfg.source == "files":
        what = {"files": [file_sha256(p) for p in _check_files(cfg)], "field": cfg.text_field}
    else:
        what = {"hub": [cfg.name, cfg.subset, cfg.split, cfg.text_field]}
    return _digest({"source": cfg.source, "min_chars": cfg.min_chars, **what})


def texts_identity(texts: Sequence[str], min_chars: int = 0) -> str:
    """Identity of an in-memory corpus (the guide's ``dataset=texts``)."""
    h = hashlib.sha256(f"texts:{min_chars}:".encode())
    for t in texts:
        h.update(hashlib.sha256(t.encode("utf-8")).digest())
    return h.hexdigest()


@dataclass
class Packed:
    """Documents tokenized into fixed-length sequences (a whole corpus or one block of it)."""

    tokens: np.ndarray
    """int32 [n_seq, context_length]."""
    mask: np.ndarray
    """bool [n_seq, context_length]: False at padding, BOS and other special tokens."""
    doc_ids: np.ndarray
    """int32 [n_seq]: index into the packed ``texts`` of each sequence's document."""

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())

    def token_doc_ids(self) -> np.ndarray:
        """int32 [n_tokens]: the document of every unmasked token, in corpus order."""
        return np.broadcast_to(self.doc_ids[:, None], self.mask.shape)[self.mask].astype(np.int32)

    def doc_runs(self) -> np.ndarray:
        """int64 [n, 2]: (document, unmasked tokens) of each run of consecutive sequences of
        one document, in order: a document's rows are contiguous, so this is all a split needs."""
        rows = self.mask.sum(axis=1)
        starts = np.flatnonzero(np.r_[True, self.doc_ids[1:] != self.doc_ids[:-1]])
        return np.stack([self.doc_ids[starts].astype(np.int64),
                         np.add.reduceat(rows, starts).astype(np.int64)], axis=1)

    @staticmethod
    def concat(blocks: Iterable[Packed]) -> Packed:
        """One ``Packed`` of consecutive blocks (``pack_blocks``' output)."""
        blocks = list(blocks)
        return Packed(*(np.concatenate([getattr(b, f) for b in blocks])
                        for f in ("tokens", "mask", "doc_ids")))


def _hf(tokenizer: Any) -> Any:
    """The Hugging Face tokenizer itself, or the one inside mlx_lm's TokenizerWrapper."""
    return tokenizer if callable(tokenizer) else tokenizer._tokenizer


def _doc_order(texts: Iterable[str]) -> Iterator[tuple[int, str]]:
    """(index, text) in a content-determined shuffle of each ``DOC_WINDOW`` documents, so a
    token budget samples the whole of a corpus that size rather than its first documents
    (and needs no RNG version guarantees), while a stream is held one window at a time."""
    window: list[tuple[bytes, int, str]] = []

    def flush() -> Iterator[tuple[int, str]]:
        yield from ((i, t) for _, i, t in sorted(window))
        window.clear()

    for i, t in enumerate(texts):
        window.append((hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), i, t))
        if len(window) == DOC_WINDOW:
            yield from flush()
    yield from flush()


def _pieces(hf: Any, texts: Iterable[str], body: int, batch_docs: int):
    """(doc index, up to ``body`` of its tokens), in ``_doc_order``, tokenized in batches
    of 8 documents doubling up to ``batch_docs``: a small token budget tokenizes little
    more than it packs (256 pydocs documents are ~160k tokens)."""
    order = _doc_order(texts)
    size = min(8, batch_docs)
    while batch := list(itertools.islice(order, size)):
        size = min(2 * size, batch_docs)
        encoded = hf([t for _, t in batch], add_special_tokens=False)["input_ids"]
        for (doc, _), toks in zip(batch, encoded, strict=True):
            toks = np.asarray(toks, dtype=np.int32)
            for s in range(0, len(toks), body):
                yield doc, toks[s:s + body]


def pack_blocks(tokenizer: Any, texts: Iterable[str], context_length: int, max_tokens: int,
                block_sequences: int, batch_docs: int = 256) -> Iterator[Packed]:
    """Tokenize a stream of documents (in ``_doc_order``) into sequences of
    ``context_length``, yielded in blocks of ``block_sequences`` sequences (the last
    block may be shorter); memory holds one block and one ``DOC_WINDOW``.

    Each sequence starts with BOS when the tokenizer has one (masked out), holds
    tokens of one document only, and is padded at the end (masked out).
    Stops once ``max_tokens`` unmasked tokens are packed.
    """
    if context_length < 2:
        raise ValueError(f"data.context_length={context_length} is not valid; allowed: >= 2")
    hf = _hf(tokenizer)
    bos = getattr(hf, "bos_token_id", None)
    special = np.array(sorted(set(getattr(hf, "all_special_ids", None) or [])
                              | ({bos} if bos is not None else set())), dtype=np.int32)
    pad = next((t for t in (getattr(hf, "pad_token_id", None), getattr(hf, "eos_token_id", None))
                if t is not None), 0)
    offset = int(bos is not None)

    def block(rows: list[np.ndarray], ends: list[int], docs: list[int]) -> Packed:
        tokens = np.stack(rows)
        mask = np.arange(context_length)[None, :] < np.asarray(ends)[:, None]
        mask &= ~np.isin(tokens, special)
        return Packed(tokens=tokens, mask=mask, doc_ids=np.asarray(docs, dtype=np.int32))

    rows: list[np.ndarray] = []
    ends: list[int] = []  # where each row's content ends (the pad id may be a real token)
    docs: list[int] = []
    remaining, packed_any = max_tokens, False
    for doc, piece in _pieces(hf, texts, context_length - offset, batch_docs):
        keep = ~np.isin(piece, special)
        if keep.sum() > remaining:  # cut at the budget
            piece = piece[:int(np.searchsorted(np.cumsum(keep), remaining)) + 1]
            keep = keep[:len(piece)]
        if not keep.any():
            continue
        row = np.full(context_length, pad, dtype=np.int32)
        if bos is not None:
            row[0] = bos
        row[offset:offset + len(piece)] = piece
        rows.append(row)
        ends.append(offset + len(piece))
        docs.append(doc)
        remaining -= int(keep.sum())
        if len(rows) == block_sequences:
            yield block(rows, ends, docs)
            rows, ends, docs, packed_any = [], [], [], True
        if remaining == 0:
            break
    if rows:
        yield block(rows, ends, docs)
    elif not packed_any:
        raise ValueError("the corpus has no tokens to pack (after removing special tokens)")
    if remaining:
        log.info("corpus exhausted: packed %d tokens of the %d requested", max_tokens - remaining,
                 max_tokens)


def pack_documents(tokenizer: Any, texts: Iterable[str], context_length: int,
                   max_tokens: int) -> Packed:
    """``pack_blocks`` in one ``Packed`` (for corpora that fit in memory)."""
    return Packed.concat(pack_blocks(tokenizer, texts, context_length, max_tokens,
                                     block_sequences=4096))
