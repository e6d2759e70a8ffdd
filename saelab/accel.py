"""Fast MLX on Linux CPU: preload an optimized BLAS and tune glibc malloc.

MLX's Linux CPU wheel links a reference BLAS (~6 GFLOP/s for a float32
2048x2048 matmul on a 2-core x86 machine). Loading OpenBLAS with RTLD_GLOBAL
before ``mlx.core`` is first imported lets MLX resolve its BLAS symbols there
(~200 GFLOP/s, numpy's rate). MLX's CPU allocator also keeps no buffer cache,
so every large array is mmap'ed and zeroed afresh by the kernel; keeping large
blocks on glibc's heap (M_MMAP_MAX=0, no trimming) removes that cost. OpenBLAS
picks its kernels by CPU model and falls back to the slowest (Prescott, SSE3) on
a model it does not know, such as a virtual machine's "Intel Xeon Processor":
where ``OPENBLAS_CORETYPE`` is unset, saelab sets it from the CPU's flags
(SkylakeX with AVX-512, Haswell with AVX2): 4.5x faster float32 matmuls on such
a machine (benchmarks/README.md, "Step profile").

This module must not import mlx. ``saelab/__init__.py`` calls ``setup()``.
Environment switches:

- ``SAELAB_FAST=0``: do nothing (plain MLX).
- ``SAELAB_BLAS=/path/to/libblas.so``: preload this BLAS instead of searching.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)


@dataclass
class AccelState:
    enabled: bool = False
    blas_path: str | None = None
    """The BLAS preloaded before mlx.core, or None (MLX's bundled reference BLAS)."""
    malloc_tuned: bool = False
    blas_coretype: str | None = None
    """The ``OPENBLAS_CORETYPE`` saelab set (None: OpenBLAS's own detection or the user's)."""
    reason: str = ""
    """Why the fast path is off or partial (empty when fully on)."""

    @property
    def blas(self) -> str:
        if self.blas_path:
            core = f", OPENBLAS_CORETYPE={self.blas_coretype}" if self.blas_coretype else ""
            return f"OpenBLAS preloaded ({self.blas_path}{core})"
        if sys.platform == "darwin":
            return "Accelerate (MLX on macOS)"
        return "reference BLAS bundled with MLX (slow)"


STATE = AccelState()
_BLAS: list = []
"""The preloaded OpenBLAS library handle, once loaded."""


def _openblas_coretype() -> str | None:
    """The OpenBLAS kernel family the CPU's flags support (x86 Linux), else None."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration, IndexError):
        return None
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def _find_blas() -> str | None:
    explicit = os.environ.get("SAELAB_BLAS")
    if explicit:
        return explicit
    for path in _CANDIDATES:
        if os.path.exists(path):
            return path
    found = ctypes.util.find_library("openblas")
    return found


def fast_paths_enabled() -> bool:
    """False when ``SAELAB_FAST=0`` asks for plain MLX (this preload, the C kernel)."""
    return os.environ.get("SAELAB_FAST", "1") != "0"


def setup() -> AccelState:
    """Apply the fast path once; must run before ``mlx.core`` is imported."""
    if STATE.enabled or STATE.reason:
        return STATE
    if not sys.platform.startswith("linux"):
        STATE.reason = "not Linux: MLX uses its own fast backend"
        return STATE
    if not fast_paths_enabled():
        STATE.reason = "disabled by SAELAB_FAST=0"
        return STATE
    if "mlx.core" in sys.modules:
        STATE.reason = "mlx.core was imported before saelab; import saelab first"
        warnings.warn(f"saelab fast path not applied: {STATE.reason}", stacklevel=3)
        return STATE
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_MAX, 0)
        # -1: never trim. A 2 GB threshold still handed a training step's 4 GB of
        # temporaries back to the kernel and faulted them in again every step
        # (600k page faults, ~1 s of system time per step at 18,432 latents, k 128, batch 4096).
        libc.mallopt(_M_TRIM_THRESHOLD, -1)
        STATE.malloc_tuned = True
    except OSError:
        pass
    path = _find_blas()
    if path:
        if "OPENBLAS_CORETYPE" not in os.environ:  # read when OpenBLAS loads
            STATE.blas_coretype = _openblas_coretype()
            if STATE.blas_coretype:
                os.environ["OPENBLAS_CORETYPE"] = STATE.blas_coretype
        try:
            _BLAS.append(ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL))
            STATE.blas_path = path
        except OSError as e:
            STATE.reason = f"could not load {path}: {e}"
    else:
        STATE.reason = ("no OpenBLAS found (Debian/Ubuntu: apt-get install libopenblas0-pthread; "
                        "or set SAELAB_BLAS)")
    STATE.enabled = True
    if STATE.blas_path is None:
        warnings.warn(f"saelab: MLX runs on its reference BLAS (~30x slower matmul): {STATE.reason}",
                      stacklevel=3)
    return STATE


@contextmanager
def blas_threads(n: int | None) -> Iterator[None]:
    """OpenBLAS runs its calls on at most ``n`` threads inside the block (no-op for
    None or without a preloaded OpenBLAS). The fast training step splits its work over
    two CPU streams itself, each with its own encoder matmul: with OpenBLAS's two
    threads per call on top, four threads shared the two cores and the step ran
    10-30% slower (benchmarks/README.md, "Step profile")."""
    lib = _BLAS[0] if _BLAS else None
    if n is None or lib is None or not hasattr(lib, "openblas_set_num_threads"):
        yield
        return
    before = lib.openblas_get_num_threads()
    lib.openblas_set_num_threads(n)
    try:
        yield
    finally:
        lib.openblas_set_num_threads(before)
