"""Corpora through ``datasets``: load texts, identify them, pack them into sequences.

Three sources (``DataConfig.source``):

- ``pydocs``: Python's own documentation, present on every Python install
  (built once by ``saelab.pydocs`` into a JSONL file named by its content hash).
- ``files``: local ``.txt`` (one document per blank-line separated block),
  ``.jsonl``/``.json`` and ``.parquet`` (one document per row, ``text_field``).
- ``hub``: ``datasets.load_dataset(name, subset, split=split)``.

Packing never lets a sequence span two documents, so a document-level
train/validation split of the captured tokens is clean.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from saelab import pydocs
from saelab.config import DataConfig
from saelab.paths import cache_root

log = logging.getLogger(__name__)

FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


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


def _column(ds, cfg: DataConfig, where: str) -> list[str]:
    if cfg.text_field not in ds.column_names:
        raise ValueError(f"data.text_field={cfg.text_field!r} is not valid for {where}; allowed: "
                         f"one of its columns {ds.column_names}")
    return [t for t in ds[cfg.text_field] if isinstance(t, str)]


def _file_texts(cfg: DataConfig, path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _local_dataset("text", path, sample_by="paragraph")["text"]
    kind = "parquet" if suffix == ".parquet" else "json"
    return _column(_local_dataset(kind, path), cfg, f"data.paths={str(path)!r}")


def _hub_texts(cfg: DataConfig) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.name, cfg.subset, split=cfg.split)
    except Exception as e:  # offline, unknown name/subset/split, auth
        raise ValueError(
            f"data.name={cfg.name!r} (subset={cfg.subset!r}, split={cfg.split!r}) could not be "
            f"loaded from the Hugging Face hub ({type(e).__name__}: {e}); allowed: a dataset "
            "reachable from here or in the local datasets cache. Offline, use data.source=pydocs "
            "or data.source=files.") from e
    return _column(ds, cfg, f"data.name={cfg.name!r}")


def load_texts(cfg: DataConfig) -> list[str]:
    """The corpus as a list of documents (stripped, at least ``min_chars`` long)."""
    import datasets

    if cfg.source == "pydocs":
        texts = datasets.load_dataset("json", data_files=str(pydocs.corpus_path()), split="train",
                                      cache_dir=str(cache_root() / "datasets"))["text"]
    elif cfg.source == "files":
        texts = [t for p in _check_files(cfg) for t in _file_texts(cfg, p)]
    else:
        texts = _hub_texts(cfg)
    kept = [t.strip() for t in texts if len(t.strip()) >= cfg.min_chars]
    if not kept:
        raise ValueError(f"data.min_chars={cfg.min_chars} leaves no document in the corpus "
                         f"(source={cfg.source!r}); allowed: a smaller value or more text")
    return kept


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
    """Documents tokenized into fixed-length sequences."""

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


def _hf(tokenizer: Any) -> Any:
    """The Hugging Face tokenizer itself, or the one inside mlx_lm's TokenizerWrapper."""
    return tokenizer if callable(tokenizer) else tokenizer._tokenizer


def _doc_order(texts: Sequence[str]) -> list[int]:
    """A content-determined shuffle, so a token budget samples the whole corpus
    rather than its first documents (and needs no RNG version guarantees)."""
    keys = [hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest() for t in texts]
    return sorted(range(len(texts)), key=lambda i: (keys[i], i))


def _pieces(hf: Any, texts: Sequence[str], body: int, batch_docs: int):
    """(doc index, up to ``body`` of its tokens), in ``_doc_order``, tokenized in batches."""
    order = _doc_order(texts)
    for start in range(0, len(order), batch_docs):
        ids = order[start:start + batch_docs]
        encoded = hf([texts[i] for i in ids], add_special_tokens=False)["input_ids"]
        for doc, toks in zip(ids, encoded):
            toks = np.asarray(toks, dtype=np.int32)
            for s in range(0, len(toks), body):
                yield doc, toks[s:s + body]


def pack_documents(tokenizer: Any, texts: Sequence[str], context_length: int, max_tokens: int,
                   batch_docs: int = 256) -> Packed:
    """Tokenize documents (in a fixed shuffled order) into sequences of ``context_length``.

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
    rows: list[np.ndarray] = []
    ends: list[int] = []  # where each row's content ends (the pad id may be a real token)
    docs: list[int] = []
    remaining = max_tokens
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
        if remaining == 0:
            break
    if not rows:
        raise ValueError("the corpus has no tokens to pack (after removing special tokens)")
    tokens = np.stack(rows)
    mask = np.arange(context_length)[None, :] < np.asarray(ends)[:, None]
    mask &= ~np.isin(tokens, special)
    if remaining:
        log.info("corpus exhausted: packed %d tokens of the %d requested", max_tokens - remaining,
                 max_tokens)
    return Packed(tokens=tokens, mask=mask, doc_ids=np.asarray(docs, dtype=np.int32))
