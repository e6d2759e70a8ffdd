"""What compiled CPU kernels would save in the fast step: the step's single-threaded MLX
blocks against plain C versions of them, on one thread, same inputs; prints one JSON line.

The fast step (saelab/steps.py) is at parity with sparsify at expansion 8 / k 32 / batch
1024 (benchmarks/README.md, "Peers"): its encoder matmul runs near the BLAS peak, and
most of the rest is MLX CPU work that runs on one thread without SIMD (row gathers,
segment-sums, ``argpartition``, ``sqrt``). It times, over the whole batch, on one thread
(like each MLX stream):

- the weight gradients (``weight_grads.mlx_weight_grads``, segment form) against
  saelab's own kernel (``saelab._kernels``, built by ``pip install``; the step runs it on
  two threads): a counting sort of the pairs by latent, then per latent the sums of
  ``g_pre * xc[token]`` and ``codes * g_r[token]``, in the same order (equal up to float
  rounding: the largest difference is printed, relative to the largest value);

and, against C versions compiled here with the system compiler (``cc -O3 -march=native
-fno-math-errno``) into a temporary directory:

- top-k selection (``topk.block_topk``): a size-k min-heap per row (index sets equal
  ``argpartition``'s, checked);
- Adam on one [latents, d_model] matrix (``steps._adam``).

It also times the copy of one [latents, d_model] numpy result into an ``mx.array``, the
price of handing a kernel's output back to MLX. The top-k and Adam kernels are not used
by saelab: they measure what building them into the package would save.

    python benchmarks/cpu_kernels.py [--expansion 8] [--k 32] [--batch 1024]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

import saelab  # noqa: F401  (OpenBLAS preload before mlx.core)
import mlx.core as mx

from saelab.steps import _adam
from saelab.weight_grads import _kernels, mlx_weight_grads
from saelab.topk import block_topk

D = 576
C_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static void sift(float *v, int32_t *ix, int k, int i) {
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < k && v[l] < v[m]) m = l;
        if (r < k && v[r] < v[m]) m = r;
        if (m == i) return;
        float tv = v[i]; v[i] = v[m]; v[m] = tv;
        int32_t ti = ix[i]; ix[i] = ix[m]; ix[m] = ti;
        i = m;
    }
}

void topk_rows(const float *x, int n, int h, int k, int32_t *out) {
    float *v = malloc(k * sizeof(float));
    for (int r = 0; r < n; r++) {
        const float *row = x + (size_t)r * h;
        int32_t *ix = out + (size_t)r * k;
        for (int j = 0; j < k; j++) { v[j] = row[j]; ix[j] = j; }
        for (int j = k / 2 - 1; j >= 0; j--) sift(v, ix, k, j);
        for (int j = k; j < h; j++)
            if (row[j] > v[0]) { v[0] = row[j]; ix[0] = j; sift(v, ix, k, 0); }
    }
    free(v);
}

void adam(float *p, float *m, float *v, const float *g, size_t n, float b1, float b2,
          float c1, float c2, float eps) {
    for (size_t i = 0; i < n; i++) {
        float mi = b1 * m[i] + (1 - b1) * g[i], vi = b2 * v[i] + (1 - b2) * g[i] * g[i];
        m[i] = mi; v[i] = vi;
        p[i] = p[i] - c1 * mi / (sqrtf(vi) * c2 + eps);
    }
}
"""


def build(tmp: Path) -> ctypes.CDLL:
    src, lib = tmp / "kernels.c", tmp / "kernels.so"
    src.write_text(C_SOURCE)
    subprocess.run(["cc", "-O3", "-march=native", "-fno-math-errno", "-shared", "-fPIC",
                    str(src), "-o", str(lib)], check=True)
    return ctypes.CDLL(str(lib))


def median_ms(fn, reps: int = 15) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1e3 * sorted(times)[reps // 2], 2)


def ptr(a: np.ndarray) -> ctypes.c_void_p:
    return a.ctypes.data_as(ctypes.c_void_p)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    args = ap.parse_args()
    n, k, h = args.batch, args.k, args.expansion * D
    rng = np.random.default_rng(0)
    pre = rng.standard_normal((n, h), dtype=np.float32)
    idx = np.argpartition(-pre, k - 1, axis=1)[:, :k].astype(np.int32)
    g_pre, codes = rng.standard_normal((n, k), np.float32), rng.random((n, k), np.float32)
    xc, g_r = rng.standard_normal((n, D), np.float32), rng.standard_normal((n, D), np.float32)
    enc, dec = np.empty((h, D), np.float32), np.empty((h, D), np.float32)
    out = {"benchmark": "cpu_kernels", "shape": {"d_model": D, "latents": h, "k": k, "batch": n},
           "loadavg": list(np.round(np.array(__import__("os").getloadavg()), 2))}
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(Path(tmp))
        lib.adam.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_size_t] + [ctypes.c_float] * 5

        m = [mx.array(a) for a in (idx.astype(np.uint32), g_pre, xc, codes, g_r)]
        mlx_wg = mx.compile(lambda *a: mlx_weight_grads(*a, h, "segment"))
        out["weight_grads_ms"] = {"mlx": median_ms(lambda: mx.eval(mlx_wg(*m)))}
        if _kernels is not None:  # saelab's kernel, on one thread (all latents in one call)
            out["weight_grads_ms"]["c"] = median_ms(lambda: _kernels.weight_grads(
                idx.view(np.uint32), g_pre, codes, xc, g_r, k, D, 0, h, enc, dec))
            e, o = mlx_wg(*m)
            out["weight_grads_max_rel_diff"] = float(max(
                np.abs(np.array(a) - b).max() / np.abs(b).max() for a, b in ((e, enc), (o, dec))))

        top = np.empty((n, k), np.int32)
        mlx_topk, mpre = mx.compile(lambda a: block_topk(a, k)), mx.array(pre)
        out["topk_ms"] = {"mlx": median_ms(lambda: mx.eval(mlx_topk(mpre))),
                          "c": median_ms(lambda: lib.topk_rows(ptr(pre), n, h, k, ptr(top)))}
        out["topk_equal_sets"] = bool((np.sort(top, 1) == np.sort(idx, 1)).all())

        p, mo, g = (rng.standard_normal((h, D), dtype=np.float32) for _ in range(3))
        v = np.abs(rng.standard_normal((h, D), dtype=np.float32)) * 1e-6
        state = [mx.array(a) for a in (p, mo, v, g)]
        mlx_adam = mx.compile(lambda p, m, v, g, lr, t: _adam(p, m, v, g, lr, t, (0.9, 0.999)))
        lr, t = mx.array(1e-3), mx.array(5.0)
        out["adam_ms"] = {"mlx": median_ms(lambda: mx.eval(mlx_adam(*state, lr, t))),
                          "c": median_ms(lambda: lib.adam(ptr(p), ptr(mo), ptr(v), ptr(g), h * D,
                                                          0.9, 0.999, 1e-3, 1.0, 1e-8))}
        out["numpy_to_mlx_copy_ms"] = median_ms(lambda: mx.eval(mx.array(enc)))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
