"""saelab's C kernels (``saelab/_kernels.c``: bindings, ``_kernels_math.c``: the math) and
the two threads that run them.

``pip install`` compiles ``saelab._kernels`` where a C compiler is present; it is an
optional extension, so without one the install succeeds and MLX's ops do the same
work. ``SAELAB_FAST=0`` turns it off with saelab's other fast paths. Each kernel works on
a range of tokens or latents and releases the GIL, so ``run_threads`` splits a job
over the two cores without locks; the fast step (``host_step``) and validation
(``validate``) use them.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

import saelab  # noqa: F401  (OpenBLAS preload before mlx.core)
import mlx.core as mx

from saelab.accel import fast_paths_enabled
from saelab.sae import pre_activations
from saelab.topk import cpu_streams

try:
    from saelab import _kernels
except ImportError:  # not built: no compiler at install time
    _kernels = None

THREADS = 2
_POOL: list[ThreadPoolExecutor] = []
_PRE_ACTIVATIONS = mx.compile(pre_activations)
os.register_at_fork(after_in_child=_POOL.clear)  # a forked child has none of the threads


def host_available() -> bool:
    """The C kernels are built and enabled, and MLX computes on the CPU."""
    return _kernels is not None and fast_paths_enabled() and mx.default_device() == mx.cpu


def run_threads(jobs: Sequence[tuple]) -> None:
    """Each (function, *args) on a pool thread (two at once); returns when all are done."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(THREADS, thread_name_prefix="saelab-kernels"))
    for job in [_POOL[0].submit(*job) for job in jobs]:
        job.result()


def split(rows: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of ``rows``, one per thread."""
    cuts = np.linspace(0, rows, THREADS + 1).astype(int)
    return [(int(lo), int(hi)) for lo, hi in zip(cuts, cuts[1:])]


def c_array(a: mx.array | np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """A C-contiguous numpy view of an array for the kernels (evaluated; a copy only if
    it must be)."""
    return np.ascontiguousarray(np.asarray(a), dtype=dtype)


def pre_activation_halves(params: dict, x: mx.array) -> list[mx.array]:
    """The encoder's pre-activations of ``x``'s two token halves (rows up to ``n // 2``,
    then the rest), each queued on its own CPU stream, not evaluated: the kernels then
    take a half per thread."""
    half, out = x.shape[0] // 2, []
    for s, rows in zip(cpu_streams(), (x[:half], x[half:])):
        with mx.stream(s):
            out.append(_PRE_ACTIVATIONS(params, rows))
    return out
