"""Training throughput of the fast and reference SAE steps; prints one JSON line.

    python benchmarks/train_step.py [--steps 5] [--modes segment,dense,scatter]

Shapes: d_model 576 (SmolLM2-135M), expansion 8 and 32, k 32 and 128, batch
4096, plus batch 1024 at expansion 8 / k 32 (design.md's 11.3k tok/s probe,
sparsify's 9.1k). AuxK is idle (no dead latents), as in a healthy run. The
fast step is timed with each weight-gradient form in ``--modes``; ``auto`` is
the form ``choose_grad_mode`` picks. GFLOP/s counts the work a step must do:
the dense encoder matmul (2*B*H*d) plus the sparse decode and gradient
products (10*B*k*d); it is compared with a float32 2048^2 matmul measured in
the same run. The machine may be shared: see ``loadavg``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import saelab
import mlx.core as mx

from saelab.accel import STATE
from saelab.config import SAEConfig
from saelab.sae import SAE
from saelab.steps import StepConsts, choose_grad_mode, make_fast_step, reference_step

D = 576
SHAPES = [(8, 32, 1024), (8, 32, 4096), (8, 128, 4096), (32, 32, 4096), (32, 128, 4096)]


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a @ b)
    t = time.perf_counter()
    for _ in range(reps):
        mx.eval(a @ b)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def time_step(step, state: dict, batches: list, steps: int) -> float:
    """Seconds per step after one warm-up (compile) step."""
    lr, t = mx.array(1e-3), mx.array(1.0)
    state, out = step(state, batches[0], lr, t, 0)
    mx.eval(state, out)
    start = time.perf_counter()
    for i in range(steps):
        state, out = step(state, batches[(i + 1) % len(batches)], lr, t, 0)
        mx.eval(state, out)
    return (time.perf_counter() - start) / steps


def bench_shape(expansion: int, k: int, batch: int, steps: int, modes: list[str],
                peak: float) -> dict:
    cfg = SAEConfig(expansion_factor=expansion, k=k, batch_size=batch)
    sae = SAE(D, expansion * D, k)
    params = dict(sae.trainable_parameters())
    state = {"params": params, "m": {n: mx.zeros_like(p) for n, p in params.items()},
             "v": {n: mx.zeros_like(p) for n, p in params.items()},
             "tsf": mx.zeros((sae.d_hidden,), mx.int32)}
    batches = [mx.random.normal((batch, D), key=mx.random.key(i)) * 4 for i in range(3)]
    flops = 2 * batch * sae.d_hidden * D + 10 * batch * k * D
    row = {"expansion": expansion, "d_hidden": sae.d_hidden, "k": k, "batch": batch,
           "auto_mode": choose_grad_mode(k)}
    for mode in modes:
        consts = StepConsts.from_config(cfg, D, sae.d_hidden, grad_mode=mode)
        sec = time_step(make_fast_step(consts), state, batches, steps)
        row[f"fast_{mode}_tok_s"] = round(batch / sec)
        row[f"fast_{mode}_peak_fraction"] = round(flops / sec / 1e9 / peak, 3)
    consts = StepConsts.from_config(cfg, D, sae.d_hidden)
    sec = time_step(lambda *a: reference_step(*a, consts), state, batches, max(2, steps // 2))
    row["reference_tok_s"] = round(batch / sec)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    ap.add_argument("--modes", default="segment,dense,scatter",
                    help="weight-gradient forms of the fast step to time")
    args = ap.parse_args()
    peak = matmul_peak()
    rows = [bench_shape(e, k, b, args.steps, args.modes.split(","), peak)
            for e, k, b in SHAPES]
    print(json.dumps({"benchmark": "train_step", "device": str(mx.default_device()),
                      "blas": STATE.blas, "malloc_tuned": STATE.malloc_tuned,
                      "saelab": saelab.__version__, "matmul_peak_gflops": round(peak, 1),
                      "loadavg": [round(x, 2) for x in os.getloadavg()], "d_model": D,
                      "shapes": rows}))


if __name__ == "__main__":
    main()
