"""The activation cache: capture once, share across trials and worker processes.

An entry holds one (model, layer, component, corpus, token budget) as
``acts.npy`` (float16 [N, d_model], unmasked tokens in corpus order),
``doc_ids.npy`` (int32 [N]) and ``manifest.json``, in ``<root>/<key[:16]>/``.
``key`` is the sha256 of everything that changes the activations.

- One forward pass fills every missing entry a caller asks for (the trace stops
  after the deepest requested layer); the model is loaded only if one is missing.
- A file lock per key makes concurrent workers capture once; the others wait
  and reuse the result.
- Entries are built in a temporary directory, manifest last, then renamed into
  place. Opening checks the manifest and file sizes/headers every time, and the
  full sha256 once per process and entry: ~1-2 s per GB, small next to a
  trial's training and about what reading the file into the page cache costs
  anyway, and the only check that catches flipped bytes. A bad entry is
  logged, moved aside and rebuilt, never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from saelab.config import DataConfig, ModelConfig, canonical_component
from saelab.data import corpus_identity, file_sha256, load_texts, pack_documents, texts_identity
from saelab.paths import activation_cache_root, replace_dir

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Bump when what an entry holds changes (packing, layout, dtype policy)."""
STORAGE_DTYPE = "float16"
_FILES = ("acts.npy", "doc_ids.npy")
_VERIFIED: set[tuple[str, str]] = set()  # (entry dir, key) whose sha256 this process checked


@dataclass
class CacheStats:
    """What this process did (for logs, benchmarks and tests)."""

    model_loads: int = 0
    captures: int = 0
    rebuilt: int = 0


STATS = CacheStats()


@dataclass
class CacheEntry:
    """A verified cache entry; ``acts`` is memory-mapped."""

    path: Path
    manifest: dict[str, Any]
    acts: np.ndarray
    """float16 [n_tokens, d_model], read-only memmap."""
    doc_ids: np.ndarray
    """int32 [n_tokens]."""
    _splits: dict[tuple[float, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict,
                                                                            repr=False)

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    def split(self, validation_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(train_idx, val_idx) token indices, split by document.

        Documents are ordered by a hash of (seed, doc id) and the first
        ``round(validation_split * n_docs)`` (at least one) are held out:
        deterministic, independent of numpy's RNG, and no document is in both.
        """
        if not 0.0 < validation_split < 1.0:
            raise ValueError(f"validation_split={validation_split!r} is not valid; allowed: (0, 1)")
        if (validation_split, seed) not in self._splits:
            docs = np.unique(self.doc_ids)
            if len(docs) < 2:
                raise ValueError(f"the cached corpus has {len(docs)} document(s); a "
                                 "document-level validation split needs at least 2")
            order = sorted(docs.tolist(), key=lambda d: hashlib.blake2b(
                f"{seed}:{d}".encode(), digest_size=8).digest())
            n_val = min(len(docs) - 1, max(1, round(validation_split * len(docs))))
            is_val = np.isin(self.doc_ids, np.asarray(order[:n_val], dtype=self.doc_ids.dtype))
            self._splits[(validation_split, seed)] = (np.flatnonzero(~is_val),
                                                      np.flatnonzero(is_val))
        return self._splits[(validation_split, seed)]

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (sorted) as float32. Documents are contiguous, so ``idx`` is a few
        long runs: copying run by run reads the memmap sequentially, ~3x faster than
        fancy indexing, and makes no float16 copy of the whole."""
        out = np.empty((len(idx), self.d_model), dtype=np.float32)
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        for s, e in zip(np.r_[0, breaks], np.r_[breaks, len(idx)]):
            out[s:e] = self.acts[idx[s]:idx[e - 1] + 1]
        return out

    def arrays(self, validation_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(train, val) activations as float32 arrays for the trainer."""
        train_idx, val_idx = self.split(validation_split, seed)
        return self.take(train_idx), self.take(val_idx)


# ---------------------------------------------------------------- keys


def cache_key(model_identity: str, layer: int, component: str, corpus: str, max_tokens: int,
              context_length: int) -> tuple[str, dict[str, Any]]:
    """(sha256 hex, the fields hashed)."""
    fields = {"format": CACHE_FORMAT, "model": model_identity, "layer": int(layer),
              "component": canonical_component(component), "corpus": corpus,
              "max_tokens": int(max_tokens), "context_length": int(context_length),
              "dtype": STORAGE_DTYPE}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest(), fields


# ---------------------------------------------------------------- open / verify


class _Invalid(Exception):
    pass


def _npy_shape(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    fmt = np.lib.format
    with open(path, "rb") as f:
        version = fmt.read_magic(f)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read(f)
    return shape, dtype


def _check(path: Path, key: str, full: bool) -> dict[str, Any]:
    """The manifest of a complete, consistent entry, or _Invalid(reason)."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise _Invalid(f"manifest unreadable ({type(e).__name__})") from e
    if manifest.get("key") != key:
        raise _Invalid("manifest key differs")
    n, d = manifest["n_tokens"], manifest["d_model"]
    expect = {"acts.npy": ((n, d), np.dtype(STORAGE_DTYPE)),
              "doc_ids.npy": ((n,), np.dtype(np.int32))}
    for name, (shape, dtype) in expect.items():
        f = path / name
        meta = manifest["files"].get(name, {})
        if not f.is_file() or f.stat().st_size != meta.get("bytes"):
            raise _Invalid(f"{name} missing or wrong size")
        try:
            got = _npy_shape(f)
        except (OSError, ValueError) as e:
            raise _Invalid(f"{name} header unreadable ({e})") from e
        if got != (shape, dtype):
            raise _Invalid(f"{name} holds {got}, manifest says {(shape, dtype)}")
        if full and file_sha256(f) != meta.get("sha256"):
            raise _Invalid(f"{name} checksum mismatch")
    return manifest


def open_entry(path: Path, key: str) -> Optional[CacheEntry]:
    """The entry at ``path`` if present and valid; None if absent; a corrupt one is
    logged and None returned (the caller rebuilds it under the lock)."""
    if not path.exists():
        return None
    full = (str(path), key) not in _VERIFIED
    try:
        manifest = _check(path, key, full)
    except (_Invalid, KeyError, TypeError, AttributeError) as e:  # the latter: a malformed manifest
        log.warning("activation cache entry %s is invalid (%s); it will be rebuilt", path, e)
        return None
    _VERIFIED.add((str(path), key))
    return CacheEntry(path=path, manifest=manifest,
                      acts=np.load(path / "acts.npy", mmap_mode="r"),
                      doc_ids=np.load(path / "doc_ids.npy"))


# ---------------------------------------------------------------- ensure / capture


@dataclass
class _Job:
    pair: tuple[int, str]
    key: str
    fields: dict[str, Any]
    path: Path


def ensure_activations(model_cfg: ModelConfig, data_cfg: DataConfig,
                       pairs: Iterable[tuple[int, str]], root: Optional[str | Path] = None,
                       texts: Optional[Sequence[str]] = None, batch_size: int = 16,
                       model: Any = None) -> dict[tuple[int, str], CacheEntry]:
    """Cache entries for every (layer, component), capturing missing ones in one pass.

    ``texts`` replaces the configured corpus (the guide's ``dataset=texts``);
    ``data_cfg`` still gives ``max_tokens``, ``context_length`` and ``min_chars``.
    ``model`` is an already loaded InterpretableModel of ``model_cfg`` to capture
    with (the guide's ``model.train_sae``); otherwise it is loaded only if needed.
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
            _capture(model_cfg, data_cfg, texts, todo, batch_size, model)
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


def _npy_bytes_sha(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _capture(model_cfg: ModelConfig, data_cfg: DataConfig, texts: Optional[Sequence[str]],
             jobs: list[_Job], batch_size: int, model: Any = None) -> None:
    """Run the corpus through the model once and write every job's entry."""
    import mlx.core as mx

    from saelab.trace import TracedModel, activation_name

    source = data_cfg.source if texts is None else "texts"
    texts = texts if texts is not None else load_texts(data_cfg)
    if model is None:
        model = TracedModel(model_cfg.name, model_cfg.dtype)
        STATS.model_loads += 1
    packed = pack_documents(model.tokenizer, texts, data_cfg.context_length, data_cfg.max_tokens)
    n, d = packed.n_tokens, model.d_model
    names = [activation_name(*j.pair) for j in jobs]
    root = jobs[0].path.parent
    for job in jobs:  # left by a killed capture (we hold these keys' locks)
        for stale in root.glob(f".{job.key[:16]}.tmp*"):
            shutil.rmtree(stale, ignore_errors=True)
    tmps = [Path(tempfile.mkdtemp(prefix=f".{j.key[:16]}.tmp", dir=root)) for j in jobs]
    try:
        outs = [np.lib.format.open_memmap(t / "acts.npy", mode="w+", dtype=STORAGE_DTYPE,
                                          shape=(n, d)) for t in tmps]
        start = time.perf_counter()
        pos = 0
        with tqdm(total=n, unit="tok", unit_scale=True, desc=f"capture {', '.join(names)}") as bar:
            for s in range(0, len(packed.tokens), batch_size):
                mask = packed.mask[s:s + batch_size]
                tr = model.trace(mx.array(packed.tokens[s:s + batch_size]), capture=names)
                rows = int(mask.sum())
                for name, out in zip(names, outs):
                    act = np.asarray(tr.activations[name].astype(mx.float16))[mask]
                    if not np.isfinite(act).all():  # a float16 overflow would poison training
                        peak = float(mx.abs(tr.activations[name]).max())
                        raise RuntimeError(f"{name}: activations are not finite in float16 "
                                           f"storage (max |x| = {peak:g} before the cast)")
                    out[pos:pos + rows] = act
                del tr
                pos += rows
                bar.update(rows)
        seconds = time.perf_counter() - start
        token_docs = packed.token_doc_ids()
        for job, tmp, out in zip(jobs, tmps, outs):
            out.flush()
            np.save(tmp / "doc_ids.npy", token_docs)
            manifest = {
                "key": job.key, **job.fields, "model_name": model_cfg.name,
                "model_path": model.info.path, "d_model": d, "n_tokens": n,
                "n_sequences": int(len(packed.tokens)), "n_docs": int(len(np.unique(token_docs))),
                "data": {"source": source,
                         "paths": list(data_cfg.paths), "name": data_cfg.name,
                         "subset": data_cfg.subset, "split": data_cfg.split,
                         "text_field": data_cfg.text_field, "min_chars": data_cfg.min_chars},
                "files": {f: _npy_bytes_sha(tmp / f) for f in _FILES},
                "capture_seconds": round(seconds, 2), "capture_layers": names,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
            _install(tmp, job.path)
            _VERIFIED.add((str(job.path), job.key))  # its checksums were just computed from disk
        outs.clear()
        STATS.captures += 1
        log.info("captured %d tokens x %d activations in %.1f s (%.0f tokens/s)", n, len(jobs),
                 seconds, n / max(seconds, 1e-9))
    finally:
        for t in tmps:
            shutil.rmtree(t, ignore_errors=True)


def _install(tmp: Path, target: Path) -> None:
    """Rename a finished entry into place, moving a bad one aside first (caller holds the lock)."""
    if target.exists():
        STATS.rebuilt += 1
    replace_dir(tmp, target)
