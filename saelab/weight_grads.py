"""The fast step's encoder and decoder weight gradients, in three forms:
``enc[l] = sum g_pre * xc[token]`` and ``dec[l] = sum codes * g_r[token]`` over the
(token, latent) pairs at each latent l.

- ``segment``: MLX row gathers and segment-sums over the pairs sorted by latent;
- ``dense``: the codes scattered into [tokens, latents] and multiplied (BLAS), for codes
  too wide for the gathers to pay;
- ``host``: the C kernel ``saelab/_kernels.c`` over the evaluated arrays. MLX runs the
  segment form's gathers on one thread at ~5 GB/s: 45.4 ms against 10.2 ms for the
  kernel on one thread at x8 k32 batch 1024 (benchmarks/cpu_kernels.py). It splits the
  latents over two threads (the C code releases the GIL) and hands back two copies.

``pip install`` compiles ``saelab._kernels`` where a C compiler is present; it is an
optional extension, so without one the install succeeds and ``segment`` is used.
``SAELAB_FAST=0`` turns the kernel off with saelab's other fast paths.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import saelab  # noqa: F401  (OpenBLAS preload before mlx.core)
import mlx.core as mx

from saelab.accel import fast_paths_enabled
from saelab.sae import GATHER_RATIO

try:
    from saelab import _kernels
except ImportError:  # not built: no compiler at install time
    _kernels = None

HOST_THREADS = 2
_POOL: list[ThreadPoolExecutor] = []
os.register_at_fork(after_in_child=_POOL.clear)  # a forked child has none of the threads


def host_available() -> bool:
    """The C kernel is built and enabled, and MLX computes on the CPU."""
    return _kernels is not None and fast_paths_enabled() and mx.default_device() == mx.cpu


def choose_grad_mode(k: int, d_hidden: int, tied: bool = False) -> str:
    """The form by shape, for ``k`` pairs per token: the sorted segment-sum costs ~k per
    token, the dense matmul ~d_hidden; the segment-sum wins from ``GATHER_RATIO``
    latents per pair, the same crossover as the decode's gather (benchmarks/README.md,
    "Step profile"), and the C kernel does it when it can (not for tied weights, whose
    step sums both gradients in one compiled update). A fixed rule, not a timing probe,
    so a run's arithmetic (and result) does not depend on machine load."""
    if k * GATHER_RATIO > d_hidden:
        return "dense"
    return "host" if host_available() and not tied else "segment"


def mlx_weight_grads(idx: mx.array, g_pre: mx.array, xc: mx.array, codes: mx.array,
                     g_r: mx.array, h: int, mode: str) -> tuple[mx.array, mx.array]:
    """(encoder, decoder) weight gradients [h, d_model] over the top-k pairs (``idx``,
    ``g_pre``, ``codes``: [tokens, k]), ``segment`` or ``dense``."""
    if mode == "dense":
        def dense(w):
            return mx.put_along_axis(mx.zeros((idx.shape[0], h)), idx, w, axis=1).T
        return dense(g_pre) @ xc, dense(codes) @ g_r
    flat = idx.reshape(-1)
    order = mx.argsort(flat)
    counts = mx.zeros((h,), mx.int32).at[flat].add(1)
    ends = mx.cumsum(counts)
    segments = mx.stack([ends - counts, ends], axis=-1).astype(mx.uint32)
    token = order // idx.shape[1]
    enc = mx.segmented_mm(g_pre.reshape(-1)[order][None], xc[token], segments)
    dec = mx.segmented_mm(codes.reshape(-1)[order][None], g_r[token], segments)
    return enc.reshape(h, -1), dec.reshape(h, -1)


def _host(parts: list[mx.array], dtype: type) -> np.ndarray:
    """One contiguous numpy array of the token slices' evaluated arrays, in batch order."""
    arrays = [np.asarray(p) for p in parts]
    return np.ascontiguousarray(np.concatenate(arrays) if len(arrays) > 1 else arrays[0],
                                dtype=dtype)


def host_weight_grads(slices: list[tuple[mx.array, ...]], h: int) -> tuple[mx.array, mx.array]:
    """The ``host`` form over every token slice's pairs: ``slices`` are (idx, g_pre,
    codes, xc, g_r) tuples, as the step's halves return them."""
    mx.eval(*[a for part in slices for a in part])
    idx, g_pre, codes, xc, g_r = (_host([part[i] for part in slices],
                                        np.uint32 if i == 0 else np.float32) for i in range(5))
    k, d = idx.shape[1], xc.shape[1]
    enc, dec = np.empty((h, d), np.float32), np.empty((h, d), np.float32)
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(HOST_THREADS, thread_name_prefix="saelab-grads"))
    bounds = np.linspace(0, h, HOST_THREADS + 1).astype(int)
    jobs = [_POOL[0].submit(_kernels.weight_grads, idx, g_pre, codes, xc, g_r, k, d, int(lo),
                            int(hi), enc, dec) for lo, hi in zip(bounds, bounds[1:])]
    for job in jobs:
        job.result()
    return mx.array(enc), mx.array(dec)
