"""The fast step's encoder and decoder weight gradients, and which form runs:
``enc[l] = sum g_pre * xc[token]`` and ``dec[l] = sum codes * g_r[token]`` over the
(token, latent) pairs at each latent l.

- ``segment``: MLX row gathers and segment-sums over the pairs sorted by latent;
- ``dense``: the codes scattered into [tokens, latents] and multiplied (BLAS), for codes
  too wide for the gathers to pay;
- ``host``: the step on the CPU with saelab's C kernels (``saelab/host_step.py``), which
  computes these sums in C with the rest of the step's sparse work. MLX runs the segment
  form's gathers on one thread at ~5 GB/s: 45.4 ms against 10.2 ms for the C kernel on
  one thread at x8 k32 batch 1024 (benchmarks/cpu_kernels.py).

Without the C kernels (``saelab.kernels``), MLX's forms are used.
"""

from __future__ import annotations

import saelab  # noqa: F401  (OpenBLAS preload before mlx.core)
import mlx.core as mx

from saelab.kernels import host_available
from saelab.sae import GATHER_RATIO


def choose_grad_mode(k: int, d_hidden: int, tied: bool = False, host: bool | None = None) -> str:
    """The form by shape, for ``k`` pairs per token: the sorted segment-sum costs ~k per
    token, the dense matmul ~d_hidden; the segment-sum wins from ``GATHER_RATIO``
    latents per pair, the same crossover as the decode's gather (benchmarks/README.md,
    "Step profile"), and the C kernels do it when they can (``host``: default
    ``host_available()``; not for tied weights, whose step sums both gradients in one
    compiled update). A fixed rule, not a timing probe, so a run's arithmetic (and
    result) does not depend on machine load."""
    if k * GATHER_RATIO > d_hidden:
        return "dense"
    return "host" if (host_available() if host is None else host) and not tied else "segment"


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
