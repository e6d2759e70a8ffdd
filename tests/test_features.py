"""The feature index's one-pass build against a brute-force computation (every code of
every token, fully sorted per feature), with the candidate lists compacted often."""

import numpy as np
import pytest

import saelab  # noqa: F401  (before mlx)
import mlx.core as mx

from saelab import feature_index
from saelab.feature_index import BIN_EDGES, FeatureIndex
from saelab.sae import SAE


@pytest.mark.parametrize("compact", [1, 64])
def test_build_matches_brute_force(monkeypatch, compact):
    monkeypatch.setattr(feature_index._TopLists, "COMPACT", compact)
    rng = np.random.default_rng(0)
    sae = SAE(32, 512, 4, seed=0)
    tokens = rng.integers(0, 100, size=(40, 100)).astype(np.int32)
    mask = rng.random((40, 100)) > 0.1
    x = rng.normal(size=(int(mask.sum()), 32)).astype(np.float32)
    x[:50] *= 3.0  # a few strong tokens: features whose top list fills up early
    top_n = 16
    index = FeatureIndex.build(sae, (x[i:i + 333] for i in range(0, len(x), 333)), tokens, mask,
                               "test", top_n=top_n)
    v, idx = (np.array(a) for a in sae.encode_topk(mx.array(x)))
    for f in range(sae.d_hidden):
        rows, vals = np.nonzero((idx == f) & (v > 0))[0], v[(idx == f) & (v > 0)]
        order = np.lexsort((rows, -vals))[:top_n]  # strongest first, earlier row on ties
        n = len(order)
        assert index.counts[f] == len(rows)
        assert np.array_equal(index.top_values[f, :n], vals[order])
        assert np.array_equal(index.top_rows[f, :n], rows[order])
        assert (index.top_values[f, n:] == 0).all() and (index.top_rows[f, n:] == -1).all()
        bins = np.clip(np.searchsorted(BIN_EDGES, vals) - 1, 0, len(BIN_EDGES) - 2)
        assert np.array_equal(index.hist[f], np.bincount(bins, minlength=len(BIN_EDGES) - 1))
    assert (index.counts >= top_n).sum() > 10  # some lists were full (thresholds in use)
