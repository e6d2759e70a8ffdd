"""Exact top-k indices along the last axis, fast on MLX's CPU backend, and the
two CPU streams it (and the training step) split work over.

``mx.argpartition`` is single-threaded and was a quarter of a TopK SAE step.
The block-max form is exact: take the max of each block of ``block`` latents,
keep the k blocks with the largest maxima (at most k blocks can hold a top-k
value), then select k among those k * block candidates. Splitting the rows
over two CPU streams uses both cores. Index sets equal ``argpartition``'s up
to ties (tested). Indices come back unsorted within a row.
"""

from __future__ import annotations

import saelab  # noqa: F401  (OpenBLAS + malloc set-up before mlx.core)
import mlx.core as mx

_STREAMS: list = []


def cpu_streams() -> list:
    """Two CPU streams: MLX runs each stream's ops on its own thread, one op at a
    time, so independent work placed on both uses both cores."""
    if not _STREAMS:
        _STREAMS.extend(mx.new_stream(mx.cpu) for _ in range(2))
    return _STREAMS


def argpartition_topk(x: mx.array, k: int) -> mx.array:
    """Reference: indices of the k largest values of each row (argpartition)."""
    return mx.argpartition(-x, k - 1, axis=-1)[..., :k]


def block_size(k: int) -> int:
    """Latents per block: 16 up to k 64, else 8 (fastest measured at 4,608 and 18,432
    latents, k 32 and 128: benchmarks/README.md, "Step profile")."""
    return 16 if k <= 64 else 8


def block_topk(x: mx.array, k: int, block: int | None = None) -> mx.array:
    """Indices of the k largest values of each row of a 2-D array, via block maxima."""
    block = block or block_size(k)
    n, h = x.shape
    if h <= k * block:  # too few blocks for the two-stage form to pay
        return argpartition_topk(x, k)
    pad = -h % block
    if pad:
        x = mx.concatenate([x, mx.full((n, pad), -mx.inf, dtype=x.dtype)], axis=1)
    blocks = x.reshape(n, -1, block)
    best_blocks = argpartition_topk(blocks.max(axis=-1), k)  # [n, k]
    cand = mx.take_along_axis(blocks, best_blocks[:, :, None], axis=1).reshape(n, k * block)
    pos = argpartition_topk(cand, k)  # [n, k] positions among the candidates
    return mx.take_along_axis(best_blocks, pos // block, axis=1) * block + pos % block


def fast_topk(x: mx.array, k: int, block: int | None = None) -> mx.array:
    """``block_topk`` over rows split across two CPU streams (both cores)."""
    n = x.shape[0]
    if n < 2 or mx.default_device() != mx.cpu:
        return block_topk(x, k, block)
    half = n // 2
    parts = []
    for s, (lo, hi) in zip(cpu_streams(), ((0, half), (half, n))):
        with mx.stream(s):
            parts.append(block_topk(x[lo:hi], k, block))
    return mx.concatenate(parts, axis=0)
