"""The on-disk format of an activation-cache entry, and how one is written resumably.

An entry ``<root>/<key[:16]>/`` holds:

- ``shards/000000.npy``, ...: float16 [rows, d_model], the unmasked tokens of a fixed
  number of packed sequences each (``shard_sequences``), in corpus order; ``.npy``
  files with a 128-byte header, so ``np.load(..., mmap_mode="r")`` reads them too;
- ``docs.npy``: int64 [n_docs, 3], (document id, first row, end row). Packing keeps
  each document's tokens contiguous, so the document-level split needs nothing per token;
- ``manifest.json`` (written last): the key and its fields, sizes, the capture layout,
  and per shard its rows and the sha256 of its rows' bytes (after the header).

``EntryBuilder`` builds it in ``<root>/.<key[:16]>.partial/``: each shard is streamed
to a temporary file, fsynced, renamed, and only then recorded in ``progress.json``
(replaced atomically), so a killed build resumes after its last complete shard and a
half-written shard is never read. Finishing writes docs.npy and the manifest and
renames the directory into place. Reading is ``saelab.entry``'s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from saelab.paths import atomic_write_text, replace_dir

log = logging.getLogger(__name__)

CACHE_FORMAT = 2
"""Bump when what an entry holds changes (packing, layout, dtype policy); part of the key."""
STORAGE_DTYPE = "float16"
HEADER_BYTES = 128
"""Every shard's .npy header is padded to this, so a shard can be streamed to disk and
its final row count written into the header at the end."""
VERIFIED_SHARDS: set[tuple[int, int, str]] = set()
"""(device, inode, sha256) of the shards this process has checksummed."""


# ---------------------------------------------------------------- row ranges


def merge_runs(runs: np.ndarray) -> np.ndarray:
    """Sorted, non-overlapping [start, stop) row ranges with touching ranges joined."""
    runs = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
    if len(runs) < 2:
        return runs.copy()
    new = np.r_[True, runs[1:, 0] != runs[:-1, 1]]
    return np.stack([runs[new, 0], runs[np.r_[new[1:], True], 1]], axis=1)


def clip_runs(runs: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The parts of sorted row ranges ``runs`` inside [lo, hi)."""
    i0 = int(np.searchsorted(runs[:, 1], lo, side="right"))
    i1 = int(np.searchsorted(runs[:, 0], hi, side="left"))
    out = runs[i0:i1].copy()
    if len(out):
        out[0, 0], out[-1, 1] = max(out[0, 0], lo), min(out[-1, 1], hi)
    return out


def runs_rows(runs: np.ndarray) -> int:
    return int((runs[:, 1] - runs[:, 0]).sum())


# ---------------------------------------------------------------- files


def shard_name(j: int) -> str:
    return f"{j:06d}.npy"


def _npy_header(rows: int, d: int) -> bytes:
    text = repr({"descr": np.dtype(STORAGE_DTYPE).str, "fortran_order": False,
                 "shape": (rows, d)})
    body = text.ljust(HEADER_BYTES - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin1")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_shard(path: Path, rows: int, d: int) -> np.ndarray:
    """The shard as a read-only memmap after checking its size and header (ValueError)."""
    want = HEADER_BYTES + rows * d * np.dtype(STORAGE_DTYPE).itemsize
    if not path.is_file() or path.stat().st_size != want:
        raise ValueError(f"{path.name} missing or not {want} bytes")
    mm = np.load(path, mmap_mode="r")
    if mm.shape != (rows, d) or mm.dtype != np.dtype(STORAGE_DTYPE) or mm.offset != HEADER_BYTES:
        raise ValueError(f"{path.name} holds {mm.shape} {mm.dtype}, expected ({rows}, {d})")
    return mm


class ShardWriter:
    """One shard being written: rows streamed into a temporary file, then fsynced and renamed."""

    def __init__(self, path: Path, d: int):
        self.path, self.d, self.rows = path, d, 0
        self.tmp = path.with_name(f".{path.name}.tmp")
        self._f = open(self.tmp, "wb")  # noqa: SIM115  (closed by close/abort)
        self._f.write(_npy_header(0, d))
        self._sha = hashlib.sha256()

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=STORAGE_DTYPE)
        self._f.write(rows)
        self._sha.update(rows)
        self.rows += len(rows)

    def close(self) -> dict[str, Any]:
        """Finish the file (header, fsync, rename); returns its progress record."""
        self._f.seek(0)
        self._f.write(_npy_header(self.rows, self.d))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)
        digest = self._sha.hexdigest()
        st = self.path.stat()
        VERIFIED_SHARDS.add((st.st_dev, st.st_ino, digest))  # checksummed from the bytes written
        return {"rows": self.rows, "sha256": digest}

    def abort(self) -> None:
        self._f.close()
        self.tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- building


class EntryBuilder:
    """Builds the entry ``final`` in its ``.partial`` directory, shard by shard.

    Resumes a partial build of the same key and ``layout`` (anything else there is
    discarded); an invalid complete entry at ``final`` is salvaged: its shards whose
    size and header still match its manifest are kept, the rest recaptured.
    ``replaced`` says whether an existing entry was salvaged or moved aside."""

    def __init__(self, final: Path, key: str, layout: dict[str, int]):
        self.final, self.key, self.layout = final, key, dict(layout)
        self.dir = final.parent / f".{final.name}.partial"
        self.replaced = final.exists()
        progress = self._load(self.dir / "progress.json")
        if progress is None and self.replaced:
            progress = self._salvage()
        if progress is None:
            shutil.rmtree(self.dir, ignore_errors=True)
            progress = {}
        (self.dir / "shards").mkdir(parents=True, exist_ok=True)
        shards = self.dir / "shards"
        for stray in [*shards.glob(".*.tmp"), *shards.glob("*.corrupt")]:
            stray.unlink()  # a killed shard (never recorded), a shard that failed its checksum
        d = self.layout["d_model"]
        self.done: dict[int, dict[str, Any]] = {}
        for j, rec in progress.items():
            try:
                open_shard(self.dir / "shards" / shard_name(j), rec["rows"], d)
                self.done[j] = rec
            except ValueError as e:
                log.warning("activation cache %s: shard %d is damaged (%s); recapturing it",
                            self.dir, j, e)
        if self.done:
            log.info("activation cache %s: resuming after %d complete shards", final,
                     len(self.done))
        self._save()

    def _load(self, path: Path) -> dict[int, dict[str, Any]] | None:
        try:
            p = json.loads(path.read_text())
            if p["key"] == self.key and p["layout"] == self.layout:
                return {int(j): rec for j, rec in p["shards"].items()}
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def _salvage(self) -> dict[int, dict[str, Any]] | None:
        """Move an invalid complete entry back into the partial directory, keeping its shards."""
        try:
            m = json.loads((self.final / "manifest.json").read_text())
            if m["key"] != self.key or m["layout"] != self.layout:
                raise ValueError("other key or layout")
            shards = {j: {"rows": s["rows"], "sha256": s["sha256"]}
                      for j, s in enumerate(m["shards"])}
        except (OSError, ValueError, KeyError, TypeError):
            replace_dir_aside(self.final)
            return None
        shutil.rmtree(self.dir, ignore_errors=True)
        os.replace(self.final, self.dir)
        (self.dir / "manifest.json").unlink(missing_ok=True)
        return shards

    def _save(self) -> None:
        atomic_write_text(self.dir / "progress.json", json.dumps(
            {"key": self.key, "layout": self.layout,
             "shards": {str(j): rec for j, rec in sorted(self.done.items())}}))

    def writer(self, j: int) -> ShardWriter:
        return ShardWriter(self.dir / "shards" / shard_name(j), self.layout["d_model"])

    def record(self, j: int, rec: dict[str, Any]) -> None:
        """Shard ``j`` is complete on disk: record it (the progress file is replaced atomically)."""
        self.done[j] = rec
        self._save()

    def finish(self, docs: np.ndarray, fields: dict[str, Any]) -> None:
        """Write docs.npy and the manifest, then rename the entry into place."""
        n = len(self.done)
        if sorted(self.done) != list(range(n)):
            raise RuntimeError(f"activation cache {self.final}: shards {sorted(self.done)} are "
                               f"not 0..{n - 1}")
        rows = [self.done[j]["rows"] for j in range(n)]
        if int(docs[-1, 2]) != sum(rows):
            raise RuntimeError(f"activation cache {self.final}: documents cover {docs[-1, 2]} "
                               f"rows, shards {sum(rows)}")
        docs = np.ascontiguousarray(docs, dtype=np.int64)
        np.save(self.dir / "docs.npy", docs)
        manifest = {"key": self.key, **fields, "layout": self.layout,
                    "d_model": self.layout["d_model"], "n_tokens": sum(rows),
                    "n_docs": len(docs), "n_shards": n,
                    "shards": [{"file": shard_name(j), **self.done[j]} for j in range(n)],
                    "docs": {"file": "docs.npy", "sha256": hashlib.sha256(docs).hexdigest()}}
        atomic_write_text(self.dir / "manifest.json", json.dumps(manifest, indent=1))
        _fsync_dir(self.dir)
        replace_dir(self.dir, self.final)
        (self.final / "progress.json").unlink(missing_ok=True)


def replace_dir_aside(path: Path) -> None:
    """Remove the directory ``path`` by renaming it first (readers keep their open files)."""
    if path.exists():
        aside = path.parent / f".{path.name}.old-{os.getpid()}"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)
        shutil.rmtree(aside, ignore_errors=True)
