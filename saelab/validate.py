"""Validation metrics of a TopK SAE over held-out activations, on the device.

A :class:`Validator` is built once per run from the validation rows (in RAM,
capped by ``data.max_val_tokens``): the float64 statistics (means, total
variances, the 99%-lowest-norm mask) and the normalized float32 rows in fixed
``EVAL_BATCH``-row chunks (the last one zero-padded, its padding weighted 0).
An evaluation schedules chunk after chunk without waiting, accumulates on the
device, and reads the host values once at the end; the chunk graph is compiled
once per (chunk shape, k) and shared by every trial in the process. On the CPU with
saelab's C kernels built (``saelab.kernels``), each chunk's encoder matmuls run in MLX
(a CPU stream per half) and its top-k and decode in C (a thread per half): MLX runs
those on one thread, and with the C training step validation would otherwise have
taken 6% of a trial (benchmarks/README.md, "Validation").

Metrics: ``val/mse`` (raw units, per element), ``val/nmse`` (squared error /
squared deviation from the validation mean: the fraction of variance
unexplained), ``val/nmse_p99`` (the same over the 99% of tokens with the lowest
norm, about their own mean), ``val/explained_variance`` (1 - nmse), ``val/loss``
(nmse + l1 term), ``val/l0``, ``val/dead_fraction`` (latents that never fire on
the rows evaluated).

:func:`validators` gives a trial its two: intermediate evaluations (pruning,
curves) on an evenly spaced subset of about ``sae.eval_tokens`` rows, and the
final evaluation on every validation row. A validation token costs ~0.6 of a
training token (the encoder matmul, top-k and decode without the gradients), so
8 full passes over a quick-sweep trial's 5,000 validation tokens took 10% of it.
"""

from __future__ import annotations

import math

import numpy as np

import saelab  # noqa: F401  (OpenBLAS + malloc set-up before mlx.core)
import mlx.core as mx

from saelab.kernels import _kernels, c_array, host_available, pre_activation_halves, run_threads
from saelab.sae import decode_codes, pre_activations, topk_codes

EVAL_BATCH = 1024
"""Rows per validation chunk (at most). As fast as 4096 per token (x8 k32, x16 k128)
and a quarter of the memory: a chunk's [rows, k, d_model] decoder gather is 75 MB."""


def token_errors(params: dict, x: mx.array, k: int) -> tuple[mx.array, mx.array, mx.array]:
    """(squared reconstruction error per token, code values, code indices) of normalized x."""
    w_dec = params.get("W_dec", params["W_enc"])
    v, idx, _ = topk_codes(pre_activations(params, x), k)
    return mx.sum(mx.square(decode_codes(w_dec, v, idx) + params["b_dec"] - x), axis=1), v, idx


def _chunk_sums(params: dict, x: mx.array, weights: mx.array, k: int) -> tuple:
    """Sums over one validation chunk, padding rows weighted 0: squared error
    (all tokens, lowest-norm 99%), nonzero codes (int), code sum, and per-latent
    firing counts (int). Fixed-shape chunks, so compiled once per (shape, k)."""
    err, v, idx = token_errors(params, x, k)
    on = (v > 0) & (weights[:, :1] > 0)
    fired = mx.zeros((params["b_enc"].shape[0],), mx.int32).at[idx.reshape(-1)].add(
        on.reshape(-1).astype(mx.int32))
    return (mx.sum(err[:, None] * weights, axis=0), mx.sum(on.astype(mx.int32)),
            mx.sum(v * weights[:, :1]), fired)


_eval_chunk = mx.compile(_chunk_sums)  # module level: trials in one process share its graphs


def _total_variance(x: np.ndarray, mask: np.ndarray | None, chunk: int) -> float:
    """Sum of squared deviations from the mean of the (masked) rows, in float64 chunks."""
    def rows(lo: int) -> np.ndarray:
        c = x[lo:lo + chunk] if mask is None else x[lo:lo + chunk][mask[lo:lo + chunk]]
        return c.astype(np.float64)

    starts = range(0, len(x), chunk)
    mean = sum(rows(lo).sum(axis=0) for lo in starts) / (len(x) if mask is None else mask.sum())
    return float(sum(np.sum((rows(lo) - mean) ** 2) for lo in starts))


class Validator:
    """Validation metrics over all rows of ``val`` (raw activations; ``scale``
    normalizes them as the SAE's input scale does)."""

    def __init__(self, val: np.ndarray, scale: float, max_chunk: int = EVAL_BATCH):
        n = len(val)
        self.n, self.d, self.scale = n, val.shape[1], scale
        # equal chunks of at most max_chunk rows (a multiple of 8): little padding
        chunk = 8 * math.ceil(n / math.ceil(n / max_chunk) / 8)
        pad = -n % chunk
        xs = np.zeros((n + pad, self.d), np.float32)
        for lo in range(0, n, chunk):
            xs[:n][lo:lo + chunk] = np.asarray(val[lo:lo + chunk], np.float32) * np.float32(scale)
        norms = np.linalg.norm(xs[:n], axis=1)
        if not np.isfinite(norms).all():
            raise ValueError("val contains non-finite values (NaN/inf); allowed: finite activations")
        p99 = norms <= np.quantile(norms, 0.99)
        self.tv, self.tv_p99 = (_total_variance(xs[:n], m, chunk) for m in (None, p99))
        # weights[:, 0]: a real token (not padding); weights[:, 1]: a lowest-norm-99% token
        weights = np.zeros((n + pad, 2), np.float32)
        weights[:n, 0], weights[:n, 1] = 1.0, p99
        self.chunks = [(mx.array(xs[lo:lo + chunk]), mx.array(weights[lo:lo + chunk]))
                       for lo in range(0, n + pad, chunk)]
        mx.eval(self.chunks)

    def __call__(self, params: dict, k: int, l1_coefficient: float) -> dict:
        sums = self._host_sums if _host_params(params, k) else self._mlx_sums
        (err_all, err_p99), l0, l1, dead = sums(params, k)
        n, d = self.n, self.d
        nmse = err_all / self.tv
        return {"val/loss": nmse + l1_coefficient * l1 / n,
                "val/mse": err_all / (n * d) / self.scale ** 2,
                "val/nmse": nmse, "val/nmse_p99": err_p99 / self.tv_p99,
                "val/explained_variance": 1.0 - nmse, "val/l0": l0 / n,
                "val/dead_fraction": dead}

    def _mlx_sums(self, params: dict, k: int) -> tuple:
        err = l0 = l1 = fired = 0
        for x, w in self.chunks:
            c_err, c_l0, c_l1, c_fired = _eval_chunk(params, x, w, k)
            err, l0, l1, fired = err + c_err, l0 + c_l0, l1 + c_l1, fired + c_fired
            # scheduled chunk by chunk (no wait): one lazy graph over all chunks kept
            # every chunk's B x M pre-activations alive at once (+2.6 GB at 32k tokens, x16)
            mx.async_eval(err, l0, l1, fired)
        dead = mx.mean(fired == 0)
        mx.eval(err, l0, l1, dead)  # the one wait of an evaluation
        return err.tolist(), l0.item(), l1.item(), dead.item()

    def _host_sums(self, params: dict, k: int) -> tuple:
        """The same sums with the C kernels: each chunk's two halves' encoder matmuls on
        the two CPU streams, then their top-k and decode in C, a thread per half."""
        w_dec, b_dec = (c_array(params[key]) for key in ("W_dec", "b_dec"))
        err = np.zeros(2)
        l0, l1, fired = 0, 0.0, np.zeros(w_dec.shape[0], np.int64)
        for x, w in self.chunks:
            rows, half = x.shape[0], x.shape[0] // 2
            pre = pre_activation_halves(params, x)
            mx.eval(pre)
            idx, codes = np.empty((rows, k), np.uint32), np.empty((rows, k), np.float32)
            tok_err = np.empty(rows, np.float32)
            run_threads([(_kernels.encode_rows, c_array(p), c_array(x), w_dec, b_dec, t0, k, idx,
                          codes, tok_err) for p, t0 in zip(pre, (0, half))])
            w = np.asarray(w)
            on = (codes > 0) & (w[:, :1] > 0)
            err += tok_err.astype(np.float64) @ w
            l0, l1 = l0 + int(on.sum()), l1 + float((codes * w[:, :1]).sum(dtype=np.float64))
            fired += np.bincount(idx[on], minlength=len(fired))
        return err.tolist(), l0, l1, float(np.mean(fired == 0))


def _host_params(params: dict, k: int) -> bool:
    """The C kernels can evaluate these: built and on, untied float32 weights, two halves."""
    return (host_available() and "W_dec" in params and params["W_dec"].shape[0] >= k
            and all(a.dtype == mx.float32 for a in params.values()))


def validators(val: np.ndarray, scale: float, eval_tokens: int) -> tuple[Validator, Validator]:
    """(intermediate, final): the final one over every row of ``val``; the
    intermediate one over ``eval_tokens`` evenly spaced rows (the same rows at
    every evaluation and in every trial on this validation set, so pruners
    compare like with like), or the final one itself when ``val`` is no larger."""
    final = Validator(val, scale)
    if len(val) <= eval_tokens:
        return final, final
    rows = np.linspace(0, len(val) - 1, eval_tokens).round().astype(np.int64)
    return Validator(np.asarray(val)[rows], scale), final
