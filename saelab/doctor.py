"""What saelab runs on: MLX version and device, the BLAS in use, measured matmul rate.

``saelab doctor`` prints it for people; ``benchmarks/matmul.py`` prints the same
figures as one JSON line.
"""

from __future__ import annotations

import platform
import time

import saelab  # noqa: F401  (fast path before mlx.core)
from saelab.accel import STATE


def _gflops(fn, n: int, repeats: int) -> float:
    fn()  # warm up (first call allocates, loads kernels)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def measure(n: int = 2048, repeats: int = 5) -> dict:
    """Float32 n x n matmul GFLOP/s of MLX and numpy, measured side by side."""
    import mlx.core as mx
    import numpy as np

    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a, b)
    an = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    bn = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    mlx_rate = _gflops(lambda: mx.eval(a @ b), n, repeats)
    np_rate = _gflops(lambda: an @ bn, n, repeats)
    return {
        "mlx_version": mx.__version__,
        "device": str(mx.default_device()),
        "platform": f"{platform.system()} {platform.machine()}",
        "blas": STATE.blas,
        "malloc_tuned": STATE.malloc_tuned,
        "fast_path_note": STATE.reason,
        "matmul_n": n,
        "mlx_gflops": round(mlx_rate, 1),
        "numpy_gflops": round(np_rate, 1),
        "mlx_over_numpy": round(mlx_rate / np_rate, 3),
    }


def main(argv: list[str] | None = None) -> int:
    r = measure()
    print(f"saelab {saelab.__version__}")
    print(f"MLX {r['mlx_version']} on {r['device']} ({r['platform']})")
    print(f"BLAS: {r['blas']}")
    print(f"malloc tuned for large arrays: {r['malloc_tuned']}")
    if r["fast_path_note"]:
        print(f"note: {r['fast_path_note']}")
    print(f"float32 matmul {r['matmul_n']}x{r['matmul_n']}: MLX {r['mlx_gflops']} GFLOP/s, "
          f"numpy {r['numpy_gflops']} GFLOP/s (ratio {r['mlx_over_numpy']})")
    if r["mlx_over_numpy"] < 0.5:
        print("warning: MLX matmul is far below numpy's; see README 'Fast MLX on Linux'")
    return 0
