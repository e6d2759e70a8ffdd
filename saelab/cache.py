"""The activation cache: capture once, resumably, and share across trials and workers.

An entry holds one (model, layer, component, corpus, token budget) in the sharded
format of ``saelab.shards`` at ``<root>/<key[:16]>/``; ``key`` is the sha256 of
everything that changes the activations.

- One forward pass fills every missing entry a caller asks for (only the layers up
  to the deepest requested one are computed); the model is loaded only if one is
  missing. Each forward batch runs as two slices on two CPU streams.
- A file lock per key makes concurrent workers capture once; the others wait
  and reuse the result. Holding the lock is what lets a capture write the key's
  shards, so two processes never write the same shard.
- The corpus streams through the model in blocks of ``shard_sequences`` packed
  sequences, one shard per block and key, each recorded once complete: a killed
  capture resumes from its last complete shard (a kill loses at most one shard's
  work), re-tokenizing, but not re-running, the blocks already done. An entry
  found damaged keeps its good shards and recaptures the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from saelab.accel import blas_threads
from saelab.config import DataConfig, ModelConfig, canonical_component
from saelab.data import corpus_identity, iter_texts, pack_blocks, texts_identity
from saelab.entry import CacheEntry, open_entry
from saelab.paths import activation_cache_root
from saelab.shards import CACHE_FORMAT, STORAGE_DTYPE, EntryBuilder

log = logging.getLogger(__name__)

SHARD_BYTES = 128 << 20
"""Target shard size: ``shard_sequences`` is the number of whole forward batches of
``context_length`` tokens closest to this (at most 128 MB of float16 per shard)."""
CAPTURE_BATCH = 16
"""Sequences per forward batch."""
CAPTURE_STREAMS = 2
"""A forward batch runs as this many slices (1 or 2) on as many CPU streams at once, each with
one OpenBLAS thread: MLX runs an element-wise op on one thread per stream, and those
ops (norms, rope, softmax, silu) are a third of the forward's CPU time even with
``saelab.fastops``, so with one stream a core idled for that third."""


@dataclass
class CacheStats:
    """What this process did (for logs, benchmarks and tests)."""

    model_loads: int = 0
    captures: int = 0
    rebuilt: int = 0
    shards_written: int = 0


STATS = CacheStats()


def cache_key(model_identity: str, layer: int, component: str, corpus: str, max_tokens: int,
              context_length: int) -> tuple[str, dict[str, Any]]:
    """(sha256 hex, the fields hashed)."""
    fields = {"format": CACHE_FORMAT, "model": model_identity, "layer": int(layer),
              "component": canonical_component(component), "corpus": corpus,
              "max_tokens": int(max_tokens), "context_length": int(context_length),
              "dtype": STORAGE_DTYPE}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest(), fields


def capture_layout(d_model: int, context_length: int, batch_size: int = CAPTURE_BATCH,
                   shard_sequences: int | None = None) -> dict[str, int]:
    """How a capture cuts its work (part of a partial build's identity: a resumed build
    must batch exactly as the killed one did to write the same bytes)."""
    seqs = shard_sequences or SHARD_BYTES // (context_length * d_model * 2)
    seqs = batch_size * max(1, seqs // batch_size)  # whole forward batches per shard
    return {"d_model": d_model, "shard_sequences": seqs, "batch_size": batch_size}


@dataclass
class _Job:
    pair: tuple[int, str]
    key: str
    fields: dict[str, Any]
    path: Path


def ensure_activations(model_cfg: ModelConfig, data_cfg: DataConfig,
                       pairs: Iterable[tuple[int, str]], root: str | Path | None = None,
                       texts: Sequence[str] | None = None, batch_size: int = CAPTURE_BATCH,
                       model: Any = None, shard_sequences: int | None = None
                       ) -> dict[tuple[int, str], CacheEntry]:
    """Cache entries for every (layer, component), capturing missing ones in one pass.

    ``texts`` replaces the configured corpus (the guide's ``dataset=texts``);
    ``data_cfg`` still gives ``max_tokens``, ``context_length`` and ``min_chars``.
    ``model`` is an already loaded InterpretableModel of ``model_cfg`` to capture
    with (the guide's ``model.train_sae``); otherwise it is loaded only if needed.
    ``shard_sequences`` overrides the shard size (``SHARD_BYTES``) of new captures.
    """
    from saelab.models import model_info  # cheap: no weights are loaded

    pairs = sorted({(int(layer), canonical_component(comp)) for layer, comp in pairs})
    if not pairs:
        raise ValueError("pairs is empty; allowed: one or more (layer, component)")
    if texts is not None:
        texts = [t.strip() for t in texts if len(t.strip()) >= data_cfg.min_chars]
        if not texts:
            raise ValueError(f"dataset: no text of at least data.min_chars={data_cfg.min_chars} "
                             "characters; allowed: a non-empty list of strings")
    corpus = texts_identity(texts, data_cfg.min_chars) if texts is not None else \
        corpus_identity(data_cfg)  # validates data.paths before any model work
    info = model_info(model_cfg)
    for layer, _ in pairs:
        info.check_layer(layer)
    root = Path(root) if root is not None else activation_cache_root()
    jobs = []
    for layer, comp in pairs:
        key, fields = cache_key(info.identity, layer, comp, corpus, data_cfg.max_tokens,
                                data_cfg.context_length)
        jobs.append(_Job((layer, comp), key, fields, root / key[:16]))

    entries = {j.pair: e for j in jobs if (e := open_entry(j.path, j.key)) is not None}
    missing = [j for j in jobs if j.pair not in entries]
    if not missing:
        return entries
    locks = root / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    held = [FileLock(str(locks / f"{key[:16]}.lock")) for key in sorted(j.key for j in missing)]
    try:
        for lock in held:  # sorted order: no deadlock between workers wanting overlapping sets
            try:
                lock.acquire(timeout=0)
            except Timeout:
                log.info("waiting for another process capturing into %s", root)
                lock.acquire()
        # another process may have captured some while we waited
        todo = []
        for j in missing:
            e = open_entry(j.path, j.key)
            if e is None:
                todo.append(j)
            else:
                entries[j.pair] = e
        if todo:
            layout = capture_layout(info.d_model, data_cfg.context_length, batch_size,
                                    shard_sequences)
            _capture(model_cfg, data_cfg, texts, todo, layout, model)
            for j in todo:
                e = open_entry(j.path, j.key)
                if e is None:
                    raise RuntimeError(f"activation cache entry {j.path} failed verification "
                                       "right after capture")
                entries[j.pair] = e
    finally:
        for lock in reversed(held):
            if lock.is_locked:
                lock.release()
    return entries


def _doc_table(runs: list[np.ndarray]) -> np.ndarray:
    """int64 [n_docs, 3] (doc, first row, end row) from the blocks' (doc, rows) runs; a
    document cut by a block boundary continues in the next block and becomes one run."""
    runs = np.concatenate(runs)
    first = np.flatnonzero(np.r_[True, runs[1:, 0] != runs[:-1, 0]])
    rows = np.add.reduceat(runs[:, 1], first)
    ends = np.cumsum(rows)
    return np.stack([runs[first, 0], ends - rows, ends], axis=1).astype(np.int64)


def _capture(model_cfg: ModelConfig, data_cfg: DataConfig, texts: Sequence[str] | None,
             jobs: list[_Job], layout: dict[str, int], model: Any = None) -> None:
    """Stream the corpus through the model once, writing each job's missing shards."""
    from saelab.trace import TracedModel
    from saelab.names import activation_name

    builders = [EntryBuilder(j.path, j.key, layout) for j in jobs]
    STATS.rebuilt += sum(b.replaced for b in builders)
    if model is None:
        model = TracedModel(model_cfg.name, model_cfg.dtype)
        STATS.model_loads += 1
    names = [activation_name(*j.pair) for j in jobs]
    docs = iter(texts) if texts is not None else iter_texts(data_cfg)
    blocks = pack_blocks(model.tokenizer, docs, data_cfg.context_length, data_cfg.max_tokens,
                         layout["shard_sequences"])
    runs, n_seq, captured, seconds = [], 0, 0, 0.0
    desc = f"capture {', '.join(names)}"
    with tqdm(total=data_cfg.max_tokens if texts is None else None, unit="tok",
              unit_scale=True, desc=desc) as bar:
        for j, block in enumerate(blocks):
            need = [i for i, b in enumerate(builders) if j not in b.done]
            if need:
                start = time.perf_counter()
                _capture_block(model, block, [builders[i] for i in need],
                               [names[i] for i in need], j, layout["batch_size"])
                seconds += time.perf_counter() - start
                captured += block.n_tokens
            for b in builders:
                if b.done[j]["rows"] != block.n_tokens:
                    raise RuntimeError(f"activation cache {b.dir}: shard {j} holds "
                                       f"{b.done[j]['rows']} rows, the corpus now gives "
                                       f"{block.n_tokens}; delete {b.dir} to recapture it")
            runs.append(block.doc_runs())
            n_seq += len(block.tokens)
            bar.update(block.n_tokens)
    table = _doc_table(runs)
    for job, b in zip(jobs, builders, strict=True):
        b.finish(table, {
            **job.fields, "model_name": model_cfg.name, "model_path": model.info.path,
            "n_sequences": n_seq,
            "data": {"source": data_cfg.source if texts is None else "texts",
                     "paths": list(data_cfg.paths), "name": data_cfg.name,
                     "subset": data_cfg.subset, "split": data_cfg.split,
                     "text_field": data_cfg.text_field, "min_chars": data_cfg.min_chars},
            "capture_seconds": round(seconds, 2), "capture_layers": names,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    STATS.captures += 1
    log.info("captured %d tokens x %d activations in %.1f s (%.0f tokens/s)", captured,
             len(jobs), seconds, captured / max(seconds, 1e-9))


def forward_streams() -> list[Any]:
    """The streams a forward batch is split over (capture here, the downstream metrics
    in ``saelab.evals``): the first ``CAPTURE_STREAMS`` of the CPU streams the training
    step uses (``topk.cpu_streams``), or the device's default stream on a GPU."""
    import mlx.core as mx

    from saelab.topk import cpu_streams

    if mx.default_device() != mx.cpu:
        return [mx.default_stream(mx.default_device())]
    return cpu_streams()[:CAPTURE_STREAMS]


def _capture_block(model: Any, block: Any, builders: list[EntryBuilder], names: list[str],
                   j: int, batch_size: int) -> None:
    """Shard ``j`` of every builder from one block of packed sequences. Each batch's
    forward is queued (``mx.async_eval``) before the previous batch's activations are
    copied out and written, so the streams never wait on that host work."""
    streams = forward_streams()
    writers = [b.writer(j) for b in builders]
    try:
        with blas_threads(1 if len(streams) > 1 else None):
            pending = None
            for s in range(0, len(block.tokens), batch_size):
                acts = _launch(model, block.tokens[s:s + batch_size], names, streams)
                if pending is not None:
                    _write(*pending, names, writers)
                pending = acts, block.mask[s:s + batch_size]
            if pending is not None:
                _write(*pending, names, writers)
        for b, w in zip(builders, writers, strict=True):
            b.record(j, w.close())
            STATS.shards_written += 1
    except BaseException:
        for w in writers:
            w.abort()
        raise


def _launch(model: Any, tokens: np.ndarray, names: list[str], streams: list[Any]
            ) -> list[list[Any]]:
    """Queue the forward of ``tokens`` as one slice per stream: per name, the float16
    activations of each slice (being computed)."""
    import mlx.core as mx

    acts: list[list[Any]] = [[] for _ in names]
    for part, stream in zip(np.array_split(np.arange(len(tokens)), len(streams)), streams,
                            strict=True):
        if not len(part):
            continue
        with mx.stream(stream):  # lazy: only the layers read are computed
            tr = model.trace(mx.array(tokens[part[0]:part[-1] + 1]))
            for a, name in zip(acts, names, strict=True):
                a.append(tr.activations[name].astype(mx.float16))
    mx.async_eval(acts)  # every stream at once
    return acts


def _write(acts: list[list[Any]], mask: np.ndarray, names: list[str], writers: list[Any]
           ) -> None:
    """Each name's activations at the unmasked tokens, to its shard writer."""
    for a, name, w in zip(acts, names, writers, strict=True):
        act = np.concatenate([np.asarray(x) for x in a])[mask]  # waits for the forward
        if not np.isfinite(act).all():  # a float16 overflow would poison training
            raise RuntimeError(f"{name}: activations are not finite in float16 "
                               "storage (an overflow in the cast)")
        w.write(act)
