"""Feature-index precompute and lookup speed (``get_top_activating_texts``); one JSON line.

    python benchmarks/features.py --sae outputs/dead_latents/auxk/sae.mlx [--tokens 1000000]

The SAE's own activation cache entry (its training corpus: the pydocs layer-10 MLP
entry) is streamed in the chunks ``saelab.analysis`` uses until ``--tokens`` rows
have been encoded. The pydocs corpus holds ~470k tokens, so a 1M-token pass reads the
entry's real activations more than once (and the index's sequences are the packed
corpus repeated): the work per token, encoding and merging, is that of a 1M-token
cache. Figures: the one pass (``FeatureIndex.build``), an encode-only pass over the
same rows (the floor the merge adds to), saving and loading the index, and lookups
of 200 random features (``contexts``, top 20), plus the float32 matmul peak and
``uptime`` before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

import saelab  # noqa: F401  (fast path before mlx.core)
import mlx.core as mx

from saelab.doctor import measure
from saelab.feature_index import FeatureIndex

STEP = 8192  # rows per chunk, as saelab.analysis reads a cache entry


def load_all(sae_path: str):
    from saelab.analysis import check_model, model_for
    from saelab.cache import ensure_activations
    from saelab.config import DataConfig
    from saelab.data import load_texts, pack_documents
    from saelab.guide import SAE

    sae = SAE.load(sae_path)
    model = model_for(sae)
    cfg = DataConfig(**sae.metadata["data_config"])
    layer, comp = check_model(sae, model)
    entry = ensure_activations(model.config, cfg, [(layer, comp)], model=model,
                               root=Path(sae.metadata["activation_cache"]).parent)[(layer, comp)]
    packed = pack_documents(model.tokenizer, load_texts(cfg), cfg.context_length, cfg.max_tokens)
    return sae, model, entry, packed


def repeated(entry, packed, tokens: int):
    """(chunk factory, tokens, mask): whole packed sequences, repeated until >= ``tokens``."""
    n = entry.n_tokens
    reps = math.ceil(tokens / n)
    seq_tokens, seq_mask = np.tile(packed.tokens, (reps, 1)), np.tile(packed.mask, (reps, 1))
    s = int(np.searchsorted(np.cumsum(seq_mask.sum(axis=1)), tokens)) + 1
    seq_tokens, seq_mask = seq_tokens[:s], seq_mask[:s]
    total = int(seq_mask.sum())

    def chunks():
        for lo in range(0, total, STEP):
            rows = np.arange(lo, min(lo + STEP, total)) % n
            cut = np.flatnonzero(np.diff(rows) < 0) + 1  # where the entry starts over
            yield np.concatenate([entry.take(part) for part in np.split(rows, cut)])

    return chunks, seq_tokens, seq_mask


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sae", default="outputs/dead_latents/auxk/sae.mlx")
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--skip-encode-only", action="store_true")
    args = ap.parse_args()
    out = {"benchmark": "features", "uptime_before": os.getloadavg()}
    sae, model, entry, packed = load_all(args.sae)
    chunks, tokens, mask = repeated(entry, packed, args.tokens)
    out |= {"sae": args.sae, "d_hidden": sae.d_hidden, "k": sae.k, "entry_tokens": entry.n_tokens,
            "tokens": int(mask.sum()), "matmul": measure(n=2048, repeats=5)["mlx_gflops"]}
    t = time.perf_counter()
    index = FeatureIndex.build(sae, chunks(), tokens, mask, source="bench")
    out["build_s"] = round(time.perf_counter() - t, 1)
    if not args.skip_encode_only:
        t = time.perf_counter()
        for c in chunks():
            v, i = sae.encode_topk(mx.array(c))
            mx.eval(v, i)
        out["encode_only_s"] = round(time.perf_counter() - t, 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "features.npz"
        t = time.perf_counter()
        index.save(path)
        out["save_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        index = FeatureIndex.load(path, index.sae_hash)
        out["load_s"] = round(time.perf_counter() - t, 2)
    feats = np.random.default_rng(0).choice(sae.d_hidden, 200, replace=False)
    index.contexts(int(feats[0]), 20, model.tokenizer)  # positions computed once
    ms = []
    for f in feats:
        t = time.perf_counter()
        index.contexts(int(f), 20, model.tokenizer)
        ms.append(1000 * (time.perf_counter() - t))
    out |= {"lookup_ms_median": round(float(np.median(ms)), 2),
            "lookup_ms_max": round(float(np.max(ms)), 2),
            "alive_features": int((index.counts > 0).sum()),
            "uptime_after": os.getloadavg()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
