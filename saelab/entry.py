"""Reading an activation-cache entry (format: ``saelab.shards``) without reading all of it.

Checks: opening reads the manifest, every shard's size and header, and docs.npy
(checksummed; 24 B per document) - never the activations. A shard's sha256 is
computed at creation from the bytes written (``ShardWriter``), then verified lazily,
the first time a process reads the shard: once per process and shard, 0.4 GB/s on
one core of the loaded machine here (0.3 s per 120 MB shard, ~2% of the time a trial
takes to train on the shard's rows), about what reading it from disk costs anyway.
Verifying only at creation would miss a shard damaged since. The readers are
local - a training window (``saelab.batches``), the capped validation set and the
statistics sample each come from a few shards - so a trial verifies about what it
reads and never a whole cache it does not need. A shard that fails its checksum is
renamed ``*.corrupt`` and never read; the next capture of the key keeps the entry's
good shards and recaptures that one.

Sharing: opening memory-maps the shards read-only (no copy). Rows are read with pread
(``copy_rows``: training chunks, the validation set) or from the mapping, whose pages
are then dropped from the process (``sample``): either way through the kernel's page
cache, so any number of processes reading one entry share one copy of it, hold none
privately, and do not grow with the entry (tests/test_cache.py runs two at once).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saelab.shards import (HEADER_BYTES, VERIFIED_SHARDS, clip_runs, merge_runs, open_shard,
                           runs_rows, shard_name)

log = logging.getLogger(__name__)


class CorruptShardError(RuntimeError):
    """A shard failed its checksum; it was moved aside and its key will be recaptured."""


@dataclass(frozen=True)
class Split:
    """A document-level train/validation split as row ranges (memory per document)."""

    train: np.ndarray
    """int64 [n, 2]: sorted [start, stop) row ranges of the training documents."""
    val: np.ndarray
    """int64 [m, 2]: the same for the validation documents."""
    val_docs: np.ndarray
    """Sorted ids of the validation documents."""
    seed: int

    @property
    def n_train(self) -> int:
        return runs_rows(self.train)

    @property
    def n_val(self) -> int:
        return runs_rows(self.val)


@dataclass
class CacheEntry:
    """An opened entry: shards memory-mapped (shared with other processes through the
    page cache), each verified the first time this process reads it."""

    path: Path
    manifest: dict[str, Any]
    shards: list[np.ndarray]
    """float16 [rows, d_model] read-only memmaps; read them through ``rows(j)``."""
    docs: np.ndarray
    """int64 [n_docs, 3]: (document id, first row, end row), in row order."""
    inodes: list[tuple[int, int]]

    def __post_init__(self) -> None:
        self.offsets = np.r_[0, np.cumsum([len(s) for s in self.shards])].astype(np.int64)

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    def rows(self, j: int) -> np.ndarray:
        """Shard ``j`` (a memmap), checksummed first if this process has not yet done so."""
        digest = self.manifest["shards"][j]["sha256"]
        if (*self.inodes[j], digest) not in VERIFIED_SHARDS:
            if self._digest(j) != digest:
                self._quarantine(j)
                raise CorruptShardError(
                    f"activation cache shard {self.path / 'shards' / shard_name(j)} failed its "
                    "checksum: moved aside, never read; the next capture of this key recaptures it")
            VERIFIED_SHARDS.add((*self.inodes[j], digest))
        return self.shards[j]

    def _digest(self, j: int) -> str:
        """sha256 of shard ``j``'s rows, read with read() (the page cache, not this process's
        mapping: hashing does not add the shard to the resident set)."""
        try:
            with open(self.path / "shards" / shard_name(j), "rb") as f:
                st = os.fstat(f.fileno())
                if (st.st_dev, st.st_ino) == self.inodes[j]:
                    f.seek(HEADER_BYTES)
                    return hashlib.file_digest(f, "sha256").hexdigest()
        except OSError:
            pass
        return hashlib.sha256(self.shards[j]).hexdigest()  # the entry moved since it was opened

    def copy_rows(self, j: int, a: int, b: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [a, b) of shard ``j`` (shard-local), copied (into ``out``) with pread: through
        the page cache, shared with other processes, never mapped into this one, so reading
        a whole cache never makes it resident here. (Copying from the mapping and dropping
        the rows' pages left the cached neighbours each fault maps in: +400 MB of resident
        set over one epoch of a 5M-token cache, benchmarks/memory.py.)"""
        self.rows(j)  # checksummed on the first read
        rows = np.empty((b - a, self.d_model), self.shards[j].dtype)
        try:
            fd = os.open(self.path / "shards" / shard_name(j), os.O_RDONLY)
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != self.inodes[j]:
                    raise OSError("the entry moved since it was opened")
                got = os.preadv(fd, [rows], HEADER_BYTES + a * rows.strides[0])
            finally:
                os.close(fd)
            if got != rows.nbytes:
                raise OSError("short read")
        except OSError:  # read the file this entry opened, through its mapping
            rows[...] = self.shards[j][a:b]
            self.release(j)
        if out is None:
            return rows
        out[...] = rows
        return out

    def release(self, j: int, a: int = 0, b: int | None = None) -> None:
        """Drop shard ``j``'s mapped pages of rows [a, b) (all by default) from this process."""
        mm = getattr(self.shards[j], "_mmap", None)
        if mm is None:
            return
        row = self.d_model * self.shards[j].itemsize
        start = (HEADER_BYTES + a * row) // mmap.PAGESIZE * mmap.PAGESIZE
        stop = min(len(mm), HEADER_BYTES + (len(self.shards[j]) if b is None else b) * row)
        if stop > start:
            mm.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def _quarantine(self, j: int) -> None:
        path = self.path / "shards" / shard_name(j)
        try:  # only the file this entry opened (a rebuilt entry may be in place by now)
            st = path.stat()
            if (st.st_dev, st.st_ino) == self.inodes[j]:
                os.replace(path, path.with_name(path.name + ".corrupt"))
        except OSError:
            pass

    def read_runs(self, runs: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
        """The rows of sorted ranges ``runs``, concatenated, as ``dtype``."""
        out = np.empty((runs_rows(runs), self.d_model), dtype=dtype)
        pos = 0
        for j in range(self.n_shards):
            lo, hi = int(self.offsets[j]), int(self.offsets[j + 1])
            part = clip_runs(runs, lo, hi)
            if not len(part):
                continue
            for a, b in part:
                self.copy_rows(j, a - lo, b - lo, out[pos:pos + b - a])
                pos += b - a
        return out

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Rows at sorted indices ``idx`` as float32 (read run by run: sequential, no copy of
        a whole shard)."""
        idx = np.asarray(idx, dtype=np.int64)
        if not len(idx):
            return np.empty((0, self.d_model), np.float32)
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        starts, ends = np.r_[0, breaks], np.r_[breaks, len(idx)]
        return self.read_runs(np.stack([idx[starts], idx[ends - 1] + 1], axis=1))

    def split(self, validation_split: float, seed: int) -> Split:
        """Documents ordered by a hash of (seed, doc id); the first
        ``round(validation_split * n_docs)`` (at least one) are held out: deterministic,
        independent of numpy's RNG, and no document is in both."""
        if not 0.0 < validation_split < 1.0:
            raise ValueError(f"validation_split={validation_split!r} is not valid; allowed: (0, 1)")
        ids = self.docs[:, 0]
        docs = np.unique(ids)
        if len(docs) < 2:
            raise ValueError(f"the cached corpus has {len(docs)} document(s); a "
                             "document-level validation split needs at least 2")
        order = sorted(docs.tolist(), key=lambda d: hashlib.blake2b(
            f"{seed}:{d}".encode(), digest_size=8).digest())
        n_val = min(len(docs) - 1, max(1, round(validation_split * len(docs))))
        val_docs = np.sort(np.asarray(order[:n_val], dtype=np.int64))
        is_val = np.isin(ids, val_docs)
        return Split(train=merge_runs(self.docs[~is_val, 1:]),
                     val=merge_runs(self.docs[is_val, 1:]), val_docs=val_docs, seed=seed)

    def validation(self, split: Split, max_tokens: int) -> np.ndarray:
        """At most ``max_tokens`` validation rows as float32: the split's validation rows
        of shards taken in an order seeded by ``split.seed`` (all of them when they fit),
        so a capped set comes from few shards and is the same for every trial."""
        order = np.random.default_rng([split.seed, 2]).permutation(self.n_shards)
        parts, total = [], 0
        for j in order:
            part = clip_runs(split.val, int(self.offsets[j]), int(self.offsets[j + 1]))
            n = runs_rows(part)
            if total + n >= max_tokens:
                keep = np.searchsorted(np.cumsum(part[:, 1] - part[:, 0]), max_tokens - total)
                part = part[:keep + 1].copy()
                part[-1, 1] -= runs_rows(part) - (max_tokens - total)
                parts.append(part)
                break
            parts.append(part)
            total += n
        runs = np.concatenate(parts) if parts else np.empty((0, 2), np.int64)
        return self.read_runs(runs[np.argsort(runs[:, 0])])


def open_entry(path: Path, key: str) -> CacheEntry | None:
    """The complete entry at ``path``, or None when there is none or it is invalid (logged;
    the caller recaptures it under the key's lock). Reads no activations."""
    if not path.exists():
        return None
    try:
        m = json.loads((path / "manifest.json").read_text())
        if m.get("key") != key:
            raise ValueError("manifest key differs")
        d = int(m["d_model"])
        shards, inodes = [], []
        for j, rec in enumerate(m["shards"]):
            f = path / "shards" / shard_name(j)
            shards.append(open_shard(f, int(rec["rows"]), d))
            st = f.stat()
            inodes.append((st.st_dev, st.st_ino))
        docs = np.load(path / "docs.npy")
        if (docs.dtype != np.int64 or docs.ndim != 2 or docs.shape[1] != 3
                or hashlib.sha256(docs).hexdigest() != m["docs"]["sha256"]):
            raise ValueError("docs.npy does not match its checksum")
        if sum(len(s) for s in shards) != m["n_tokens"] or int(docs[-1, 2]) != m["n_tokens"]:
            raise ValueError("shard rows do not add up to n_tokens")
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        log.warning("activation cache entry %s is invalid (%s); it will be recaptured", path, e)
        return None
    return CacheEntry(path=path, manifest=m, shards=shards, docs=docs, inodes=inodes)
