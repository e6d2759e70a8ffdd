"""Every feature's top-activating contexts, firing count and activation histogram over
one dataset, computed in one streaming pass and saved, so any feature's lookup is instant.

``FeatureIndex.build`` encodes activation chunks (from the activation cache, or
from the model over a list of texts) with the SAE and keeps, for all features at
once, a running [d_hidden, top_n] list of the largest activations and the rows
(tokens) they came from, per-feature firing counts and a histogram of positive
activations in fixed log-spaced bins (code units). The token ids of the
sequences are stored with it, so a context is read back without the corpus.
``features*.npz`` files carry the SAE's weights hash and are rebuilt when the
weights change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

import saelab  # noqa: F401  (OpenBLAS preload before mlx.core)
import mlx.core as mx

from saelab.paths import atomic_file

TOP_N = 64
"""Contexts kept per feature."""
BIN_EDGES = np.geomspace(1e-3, 1e3, 49)
"""Histogram bin edges of positive activations (code units; values outside go to the ends)."""
BEFORE, AFTER = 24, 8
"""Tokens of context shown before and after the marked token."""
FORMAT = 1


class ActivatingText(NamedTuple):
    """One context where a feature fires: ``text`` marks the token as ``[[token]]``."""

    activation: float
    text: str
    token: str
    before: str
    after: str
    sequence: int
    position: int


def weights_hash(sae: Any) -> str:
    """Identifies an SAE's weights (an index of older weights is stale)."""
    h = hashlib.sha256()
    for name in ("W_enc", "b_enc", "b_dec", "input_scale"):
        h.update(np.asarray(getattr(sae, name), dtype=np.float32).tobytes())
    return h.hexdigest()[:24]


@dataclass
class FeatureIndex:
    """The precomputed top lists of every feature of one SAE over one dataset."""

    top_values: np.ndarray
    """float32 [d_hidden, top_n], descending; 0 where a feature fired fewer times."""
    top_rows: np.ndarray
    """int64 [d_hidden, top_n]: index among the real tokens (``mask``, row-major); -1: none."""
    counts: np.ndarray
    """int64 [d_hidden]: tokens on which the feature fired (activation > 0)."""
    hist: np.ndarray
    """int64 [d_hidden, len(BIN_EDGES) - 1]: positive activations per bin."""
    tokens: np.ndarray
    """int32 [n_seq, T]: the sequences."""
    mask: np.ndarray
    """bool [n_seq, T]: real tokens (the rows, in row-major order)."""
    sae_hash: str
    source: str

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())

    @cached_property
    def positions(self) -> np.ndarray:
        """Row -> flat position in ``tokens`` (row-major over the real tokens)."""
        return np.flatnonzero(self.mask.ravel())

    @property
    def frequency(self) -> np.ndarray:
        """Fraction of tokens on which each feature fires."""
        return self.counts / max(self.n_tokens, 1)

    @classmethod
    def build(cls, sae: Any, chunks: Iterable[np.ndarray], tokens: np.ndarray, mask: np.ndarray,
              source: str, top_n: int = TOP_N) -> FeatureIndex:
        """One pass over ``chunks`` (float activations [n, d_model], the real tokens of
        ``tokens``/``mask`` in row-major order)."""
        top = _TopLists(sae.d_hidden, top_n)
        offset = 0
        for v, idx in _encoded(sae, chunks):
            fired = v > 0
            top.add(idx[fired], v[fired],
                    np.broadcast_to(np.arange(offset, offset + len(v))[:, None], v.shape)[fired])
            offset += len(v)
        if offset != int(mask.sum()):
            raise ValueError(f"the activation chunks hold {offset} tokens; the sequences "
                             f"{int(mask.sum())}")
        vals, rows = top.result()
        return cls(vals, rows, top.counts, top.hist.reshape(sae.d_hidden, -1),
                   np.asarray(tokens, np.int32), np.asarray(mask, bool), weights_hash(sae), source)

    # -- persistence ----------------------------------------------------------------
    def save(self, path: Path) -> Path:
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, top_values=self.top_values, top_rows=self.top_rows, counts=self.counts,
                     hist=self.hist, tokens=self.tokens, mask=self.mask,
                     meta=np.array([FORMAT], np.int64), sae_hash=np.array(self.sae_hash),
                     source=np.array(self.source))
        return path

    @classmethod
    def load(cls, path: Path, sae_hash: str) -> FeatureIndex | None:
        """The index at ``path`` if it exists and belongs to these weights, else None."""
        if not path.is_file():
            return None
        with np.load(path) as f:
            if int(f["meta"][0]) != FORMAT or str(f["sae_hash"]) != sae_hash:
                return None
            return cls(f["top_values"], f["top_rows"], f["counts"], f["hist"], f["tokens"],
                       f["mask"], str(f["sae_hash"]), str(f["source"]))

    # -- lookups ----------------------------------------------------------------------
    def contexts(self, feature: int, top_k: int, tokenizer: Any) -> list[ActivatingText]:
        """The ``top_k`` strongest activations of ``feature`` with their contexts."""
        if top_k > self.top_values.shape[1]:
            raise ValueError(f"top_k={top_k} is not valid; allowed: at most "
                             f"{self.top_values.shape[1]} (contexts kept per feature)")
        flat, width = self.positions, self.tokens.shape[1]
        out = []
        for value, row in zip(self.top_values[feature, :top_k], self.top_rows[feature, :top_k],
                              strict=True):
            if row < 0 or value <= 0:
                break
            seq, pos = divmod(int(flat[row]), width)
            real = self.mask[seq]
            ids = self.tokens[seq]
            before = [t for t, m in zip(ids[max(0, pos - BEFORE):pos],
                                        real[max(0, pos - BEFORE):pos], strict=True) if m]
            after = [t for t, m in zip(ids[pos + 1:pos + 1 + AFTER], real[pos + 1:pos + 1 + AFTER],
                                       strict=True) if m]
            b, tok, a = (tokenizer.decode([int(t) for t in part])
                         for part in (before, [ids[pos]], after))
            out.append(ActivatingText(float(value), f"{b}[[{tok}]]{a}", tok, b, a, seq, pos))
        return out

    def top_token_ids(self, top_k: int) -> np.ndarray:
        """int [d_hidden, top_k]: the marked token of each feature's top contexts (-1: none)."""
        rows = self.top_rows[:, :top_k]
        ok = (rows >= 0) & (self.top_values[:, :top_k] > 0)
        ids = self.tokens.ravel()[self.positions[np.where(ok, rows, 0)]]
        return np.where(ok, ids, -1)


def _encoded(sae: Any, chunks: Iterable[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(values float32 [n, k], indices int64 [n, k]) per chunk; the next chunk's encoding
    runs on MLX while the caller merges this one in numpy (a single thread)."""
    pending = None
    for chunk in chunks:
        codes = sae.encode_topk(mx.array(np.asarray(chunk, np.float32)))
        mx.async_eval(codes)
        if pending is not None:
            yield np.array(pending[0]), np.array(pending[1]).astype(np.int64)
        pending = codes
    if pending is not None:
        yield np.array(pending[0]), np.array(pending[1]).astype(np.int64)


class _TopLists:
    """Running per-feature top-``top_n`` lists, counts and histograms.

    A (feature, activation, row) triple is kept as a candidate only if it beats the
    feature's current ``top_n``-th value; candidates are reduced to the top lists once
    they outnumber ``COMPACT`` x d_hidden, so after the first chunks few survive the
    threshold and the merge costs little beyond the counting."""

    COMPACT = 64

    def __init__(self, d: int, top_n: int):
        self.d, self.top_n = d, top_n
        self.counts = np.zeros(d, np.int64)
        self.hist = np.zeros(d * (len(BIN_EDGES) - 1), np.int64)
        self.threshold = np.zeros(d, np.float32)
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.pending = 0

    def add(self, feats: np.ndarray, acts: np.ndarray, rows: np.ndarray) -> None:
        nb = len(BIN_EDGES) - 1
        self.counts += np.bincount(feats, minlength=self.d)
        bins = np.clip(np.searchsorted(BIN_EDGES, acts) - 1, 0, nb - 1)
        self.hist += np.bincount(feats * nb + bins, minlength=self.d * nb)
        keep = acts > self.threshold[feats]
        self.parts.append((feats[keep], acts[keep], rows[keep]))
        self.pending += int(keep.sum())
        if self.pending > self.COMPACT * self.d:
            self._compact()

    def _compact(self) -> None:
        feats, acts, rows = (np.concatenate(p) for p in zip(*self.parts))
        order = np.lexsort((-acts, feats))  # by feature, strongest first
        feats, acts, rows = feats[order], acts[order], rows[order]
        rank = np.arange(len(feats)) - np.searchsorted(feats, feats)
        keep = rank < self.top_n
        feats, acts, rows = feats[keep], acts[keep], rows[keep]
        full = np.bincount(feats, minlength=self.d) == self.top_n
        last = np.searchsorted(feats, np.flatnonzero(full), side="right") - 1
        self.threshold[full] = acts[last]
        self.parts, self.pending = [(feats, acts, rows)], len(feats)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(values float32 [d, top_n] descending, rows int64 [d, top_n]; 0 and -1 pad)."""
        self._compact()
        feats, acts, rows = self.parts[0]
        rank = np.arange(len(feats)) - np.searchsorted(feats, feats)
        vals = np.zeros((self.d, self.top_n), np.float32)
        out = np.full((self.d, self.top_n), -1, np.int64)
        vals[feats, rank], out[feats, rank] = acts, rows
        return vals, out
