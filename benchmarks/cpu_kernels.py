"""saelab's C kernels against the MLX ops they replace, each on one thread with the same
inputs; prints one JSON line.

The fast step on the CPU (saelab/host_step.py) keeps the encoder matmul in MLX and runs
the rest in C (saelab/_kernels*.c, built by ``pip install``): MLX runs those ops (top-k,
row gathers, segment-sums, elementwise Adam) on one thread each without SIMD. The step
runs each kernel on two threads; here each runs on one, over the whole batch (like one
MLX stream), against the MLX form the MLX fast step (saelab/steps.py) uses:

- ``sparse_half``: top-k, codes, the decode's residual and the codes' gradients, against
  ``topk_codes`` (block top-k) + ``steps._decode_residual`` (index sets checked equal);
- ``grad_rows``: the weight gradients (and, in the same pass, the encoder-bias gradient,
  firing counts, decoder projection and squared norms), against MLX's segment-sums alone
  (``weight_grads.mlx_weight_grads``); the largest difference of the weight gradients
  is printed, relative to the largest value;
- ``adam_rows``: Adam on one [latents, d_model] matrix, against ``steps._adam``.

It also times the copy of one [latents, d_model] numpy array into an ``mx.array``.

    python benchmarks/cpu_kernels.py [--expansion 8] [--k 32] [--batch 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import saelab  # noqa: F401  (OpenBLAS preload before mlx.core)
import mlx.core as mx

from saelab.host_step import adam_consts
from saelab.sae import topk_codes
from saelab.steps import _adam, _decode_residual
from saelab.topk import block_topk
from saelab.kernels import _kernels
from saelab.weight_grads import mlx_weight_grads

D = 576


def median_ms(fn, reps: int = 15) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1e3 * sorted(times)[reps // 2], 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    args = ap.parse_args()
    if _kernels is None:
        raise SystemExit("saelab._kernels is not built: pip install -e . with a C compiler")
    n, k, h = args.batch, args.k, args.expansion * D
    rng = np.random.default_rng(0)
    pre = rng.standard_normal((n, h), dtype=np.float32)
    x = rng.standard_normal((n, D), dtype=np.float32)
    w_enc, w_dec = (rng.standard_normal((h, D), dtype=np.float32) / 24 for _ in range(2))
    b_dec = rng.standard_normal(D, dtype=np.float32)
    out = {"benchmark": "cpu_kernels", "shape": {"d_model": D, "latents": h, "k": k, "batch": n},
           "loadavg": [round(v, 2) for v in os.getloadavg()]}

    bufs = {key: np.empty((n, k), np.uint32 if key == "idx" else np.float32)
            for key in ("idx", "codes", "g_pre", "vg")}
    bufs |= {key: np.empty((n, D), np.float32) for key in ("xc", "r", "g_r")}
    sums, gbdec = np.zeros(3), np.zeros(D)
    mpre, mw_dec, mxc = mx.array(pre), mx.array(w_dec), mx.array(x - b_dec)

    @mx.compile
    def mlx_sparse(pre, w_dec, xc):
        codes = topk_codes(pre, k, select=block_topk)
        r, g_r, g_v = _decode_residual(w_dec, codes.values, codes.indices, -xc, 2 / n)
        return codes.indices, r, g_r, mx.where(codes.selected > 0, g_v, 0)

    out["sparse_half_ms"] = {
        "mlx": median_ms(lambda: mx.eval(mlx_sparse(mpre, mw_dec, mxc))),
        "c": median_ms(lambda: _kernels.sparse_half(
            pre, x, w_dec, b_dec, 0, k, 2 / n, 0.0, *bufs.values(), sums, gbdec))}
    out["topk_equal_sets"] = bool((np.sort(bufs["idx"], 1) == np.sort(
        np.array(mlx_sparse(mpre, mw_dec, mxc)[0]), 1)).all())

    enc, dec = np.empty((h, D), np.float32), np.empty((h, D), np.float32)
    g_benc, fired = np.empty(h, np.float32), np.empty(h, np.int32)
    no_aux = (np.zeros((0, D), np.float32),) * 2 + (np.zeros(0, np.float32),) * 2
    m = [mx.array(bufs[key]) for key in ("idx", "g_pre", "xc", "codes", "g_r")]
    mlx_wg = mx.compile(lambda *a: mlx_weight_grads(*a, h, "segment"))
    zero = np.zeros((h, D), np.float32)  # w_dec 0: no projection, so enc/dec are the raw sums
    out["grad_rows_ms"] = {
        "mlx_segment_sums": median_ms(lambda: mx.eval(mlx_wg(*m))),
        "c": median_ms(lambda: _kernels.grad_rows(
            bufs["idx"], bufs["g_pre"], bufs["codes"], bufs["vg"], bufs["xc"], bufs["g_r"], w_enc,
            zero, np.full(h, -1, np.int32), *no_aux, 0, h, enc, dec, g_benc, fired, np.zeros(2),
            np.zeros(D)))}
    out["grad_rows_max_rel_diff"] = float(max(
        np.abs(np.array(a) - b).max() / np.abs(b).max() for a, b in zip(mlx_wg(*m), (enc, dec))))

    p, mo, g = (rng.standard_normal((h, D), dtype=np.float32) for _ in range(3))
    v = np.abs(rng.standard_normal((h, D), dtype=np.float32)) * 1e-6
    state = [mx.array(a) for a in (p, mo, v, g)]
    mlx_adam = mx.compile(lambda p, m, v, g, lr, t: _adam(p, m, v, g, lr, t, (0.9, 0.999)))
    lr, t, c = mx.array(1e-3), mx.array(5.0), adam_consts(1.0, 1e-3, 5.0, (0.9, 0.999))
    out["adam_rows_ms"] = {"mlx": median_ms(lambda: mx.eval(mlx_adam(*state, lr, t))),
                           "c": median_ms(lambda: _kernels.adam_rows(p, mo, v, g, 0, h, D, c,
                                                                     False))}
    out["numpy_to_mlx_copy_ms"] = median_ms(lambda: mx.eval(mx.array(enc)))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
