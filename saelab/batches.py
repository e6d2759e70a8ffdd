"""Training batches, in RAM (``ArrayRows``) or out of core from a cache entry (``EntryRows``).

``train_sae_on_arrays`` takes either (``TrainRows``): both give ``shape``, random
samples of distinct rows (``sample``: statistics, resampling) and an endless stream
of float32 batches (``batches``) in which every training row appears exactly once
per epoch, deterministic given the seed.

``EntryRows`` reads the float16 shards directly (pread through the page cache:
``CacheEntry.copy_rows``), in bounded memory: an epoch visits the shards holding
training rows in a seeded order, a window of them at a time (about ``WINDOW_BUFFERS``
buffers of rows); within a window its training rows are cut into ``CHUNK_ROWS``-row
contiguous chunks, read in a seeded random order into a fixed-size shuffle buffer, and
batches are drawn from random buffer slots, each refilled by the next row read
(SAELens' ``ActivationsStore`` mixes its activations through a buffer the same way,
keeping half of it; here the buffer stays full and is drained at the end of each
epoch, so epochs are exact). Reads stay local (a few shards at a time: sequential I/O,
and each shard's lazy checksum is paid about when it is read), memory is the buffer
plus one window's chunk list, and processes share the cache through the page cache
instead of private copies.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np

from saelab.entry import CacheEntry
from saelab.shards import clip_runs, runs_rows

CHUNK_ROWS = 512
"""Rows read contiguously from a shard into the shuffle buffer at a time."""
WINDOW_BUFFERS = 4
"""A window of shards holds about this many shuffle buffers of training rows."""


class ArrayRows:
    """Training rows held in memory (or any array, e.g. a memmap): per-epoch permutations."""

    def __init__(self, x: np.ndarray):
        self.x = x
        self.shape, self.ndim, self.dtype = x.shape, x.ndim, x.dtype

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Up to ``n`` distinct rows drawn with ``rng`` (in row order)."""
        rows = np.sort(rng.choice(len(self.x), size=min(len(self.x), n), replace=False))
        return np.asarray(self.x[rows])

    def batches(self, batch_size: int, seed: int) -> Iterator[np.ndarray]:
        """float32 batches: consecutive slices of per-epoch permutations, rows sorted
        within a batch (memmap locality)."""
        n = len(self.x)
        epoch, perm, pos = 0, np.random.default_rng([seed, 0]).permutation(n), 0
        while True:
            parts, need = [], batch_size
            while need:
                take = perm[pos:pos + need]
                parts.append(take)
                need -= len(take)
                pos += len(take)
                if pos == n:
                    epoch += 1
                    perm, pos = np.random.default_rng([seed, epoch]).permutation(n), 0
            yield np.asarray(self.x[np.sort(np.concatenate(parts))], dtype=np.float32)


class EntryRows:
    """The training rows ``runs`` of a cache entry, read out of core (see module docstring)."""

    def __init__(self, entry: CacheEntry, runs: np.ndarray, buffer_tokens: int):
        self.entry, self.runs = entry, runs
        n = runs_rows(runs)
        self.shape, self.ndim = (n, entry.d_model), 2
        self.dtype = np.dtype(np.float16)
        self.buffer_rows = min(buffer_tokens, n)
        # the training rows of each shard (memory: one range per document and shard)
        self._parts = [clip_runs(runs, int(entry.offsets[j]), int(entry.offsets[j + 1]))
                       for j in range(entry.n_shards)]
        self._counts = np.array([runs_rows(p) for p in self._parts], dtype=np.int64)

    def _rows(self, j: int, a: int, b: int) -> np.ndarray:
        lo = int(self.entry.offsets[j])
        return self.entry.copy_rows(j, a - lo, b - lo)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Up to ``n`` distinct training rows drawn with ``rng``, uniformly among those of
        shards drawn in random order until they hold ``4 n`` (all of them for a small
        cache): a few shards read, not the split."""
        chosen, total = [], 0
        for j in rng.permutation(np.flatnonzero(self._counts)):
            chosen.append(int(j))
            total += int(self._counts[j])
            if total >= 4 * n:
                break
        chosen.sort()
        idx = np.sort(rng.choice(total, size=min(total, n), replace=False))
        out, base = [], 0
        for j in chosen:  # sample indices -> rows of each chosen shard's training ranges
            part = self._parts[j]
            lens = part[:, 1] - part[:, 0]
            ends = np.cumsum(lens)
            mine = idx[(idx >= base) & (idx < base + ends[-1])] - base
            r = np.searchsorted(ends, mine, side="right")
            rows = part[r, 0] + mine - (ends[r] - lens[r]) - int(self.entry.offsets[j])
            out.append(np.asarray(self.entry.rows(j)[rows]))
            self.entry.release(j)
            base += int(ends[-1])
        return np.concatenate(out)

    def _windows(self, rng: np.random.Generator) -> Iterator[list[int]]:
        """Shards with training rows in a seeded order, grouped into windows."""
        target = WINDOW_BUFFERS * self.buffer_rows
        window, rows = [], 0
        for j in rng.permutation(np.flatnonzero(self._counts)):
            window.append(int(j))
            rows += int(self._counts[j])
            if rows >= target:
                yield window
                window, rows = [], 0
        if window:
            yield window

    def _chunks(self, rng: np.random.Generator) -> Iterator[np.ndarray]:
        """One epoch of training rows as float16 chunks: every row once."""
        for window in self._windows(rng):
            chunks = [(j, a, min(a + CHUNK_ROWS, b)) for j in window
                      for a0, b in self._parts[j] for a in range(int(a0), int(b), CHUNK_ROWS)]
            for i in rng.permutation(len(chunks)):
                yield self._rows(*chunks[i])

    def _epoch(self, rng: np.random.Generator, out_rows: int) -> Iterator[np.ndarray]:
        """One epoch through the shuffle buffer, in pieces of at most ``out_rows`` rows."""
        size = self.buffer_rows
        buf = np.empty((size, self.shape[1]), np.float16)
        fill, perm, p = 0, np.empty(0, np.int64), 0
        for chunk in self._chunks(rng):
            pos = 0
            while pos < len(chunk):
                if fill < size:  # filling up
                    m = min(size - fill, len(chunk) - pos)
                    buf[fill:fill + m] = chunk[pos:pos + m]
                    fill, pos = fill + m, pos + m
                    continue
                if p == len(perm):
                    perm, p = rng.permutation(size), 0
                slots = perm[p:p + min(out_rows, len(chunk) - pos, size - p)]
                p += len(slots)
                yield buf[slots]  # a copy (fancy indexing), then the slots take new rows
                buf[slots] = chunk[pos:pos + len(slots)]
                pos += len(slots)
        order = rng.permutation(fill)  # the epoch's end: drain the buffer
        for i in range(0, fill, out_rows):
            yield buf[order[i:i + out_rows]]

    def batches(self, batch_size: int, seed: int) -> Iterator[np.ndarray]:
        """float32 batches of ``batch_size`` rows; an epoch's last batch continues into the next."""
        pending: list[np.ndarray] = []
        have = 0
        for epoch in itertools.count():
            for piece in self._epoch(np.random.default_rng([seed, epoch]), batch_size):
                pending.append(piece)
                have += len(piece)
                while have >= batch_size:
                    rows = np.concatenate(pending) if len(pending) > 1 else pending[0]
                    yield rows[:batch_size].astype(np.float32)
                    pending, have = [rows[batch_size:]], have - batch_size


TrainRows = ArrayRows | EntryRows


def as_rows(train: np.ndarray | TrainRows) -> TrainRows:
    """``train`` itself if it is already a row source, else its rows in RAM."""
    return train if isinstance(train, (ArrayRows, EntryRows)) else ArrayRows(train)
