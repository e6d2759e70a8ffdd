"""Training throughput of the fast and reference SAE steps; prints one JSON line.

    python benchmarks/train_step.py [--steps 5] [--modes segment,dense]
    python benchmarks/train_step.py --profile [--steps 7]

``--profile`` times the fast step's blocks one by one instead (each compiled on
its own, inputs ready, median ms over ``--steps``): encoder matmul, top-k,
decode with its gradients, the two weight gradients, the update (decoder
projection, clipping, Adam, renorm), tokens-since-fired and metrics, AuxK (the
whole step with dead latents minus without), and the whole step; at 8/32 and
32/128, batch 1024 and 4096.

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
from saelab.sae import SAE, pre_activations, topk_codes
from saelab.steps import (StepConsts, _apply_update, _decode_residual, _fired_tsf, _pairs,
                          _weight_grads, choose_grad_mode, make_fast_step, reference_step)

D = 576
SHAPES = [(8, 32, 1024), (8, 32, 4096), (8, 128, 4096), (32, 32, 4096), (32, 128, 4096)]
PROFILE_SHAPES = [(8, 32, 1024), (8, 32, 4096), (32, 128, 1024), (32, 128, 4096)]


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a @ b)
    t = time.perf_counter()
    for _ in range(reps):
        mx.eval(a @ b)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def new_state(sae: SAE, dead: int = 0) -> dict:
    params = dict(sae.trainable_parameters())
    tsf = mx.zeros((sae.d_hidden,), mx.int32)
    if dead:
        tsf = mx.where(mx.arange(sae.d_hidden) < dead, 10**9, tsf)
    return {"params": params, "m": {n: mx.zeros_like(p) for n, p in params.items()},
            "v": {n: mx.zeros_like(p) for n, p in params.items()}, "tsf": tsf}


def median_ms(fn, *args, reps: int) -> float:
    """Median wall ms of ``fn(*args)`` evaluated, after two warm-up calls."""
    for _ in range(2):
        mx.eval(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        mx.eval(fn(*args))
        times.append(time.perf_counter() - start)
    return round(1e3 * sorted(times)[len(times) // 2], 1)


def profile_shape(expansion: int, k: int, batch: int, reps: int, mode: str | None) -> dict:
    """Block-by-block ms of the fast step (no AuxK unless named)."""
    cfg = SAEConfig(expansion_factor=expansion, k=k, batch_size=batch)
    sae = SAE(D, expansion * D, k)
    h = sae.d_hidden
    consts = StepConsts.from_config(cfg, D, h, grad_mode=None if mode == "auto" else mode)
    mode = consts.grad_mode or choose_grad_mode(k, h)  # without AuxK
    state = new_state(sae)
    p, x = state["params"], mx.random.normal((batch, D), key=mx.random.key(0)) * 4
    lr, t = mx.array(1e-3), mx.array(1.0)
    pre = pre_activations(p, x)
    codes = topk_codes(pre, k)
    xc, tv = x - p["b_dec"], mx.sum(mx.square(x - mx.mean(x, axis=0)))
    r, g_r, g_v = _decode_residual(p["W_dec"], codes.values, codes.indices, -xc, 2 / tv)
    pairs = _pairs(codes.indices, codes.values, mx.where(codes.selected > 0, g_v, 0), k)
    grads = {n: mx.random.normal(a.shape) * 1e-3 for n, a in p.items()}
    mx.eval(pre, codes, r, g_r, g_v, pairs, grads)
    blocks = {
        "encoder_matmul": (pre_activations, p, x),
        "topk": (lambda a: topk_codes(a, k), pre),
        "decode_and_code_grads": (lambda w, v, i, o, c: _decode_residual(w, v, i, o, c),
                                  p["W_dec"], codes.values, codes.indices, -xc, 2 / tv),
        "weight_grads": (lambda q, a, g: _weight_grads(q, a, g, h, mode),
                         pairs, xc, g_r),
        "update": (lambda s, g: _apply_update(s, g, lr, t, consts), state, grads),
        "tsf_and_metrics": (lambda f, i, v, s: (_fired_tsf(f, i, v), mx.sum(mx.square(s)),
                                                mx.sum(v > 0)),
                            state["tsf"], codes.indices, codes.values, r),
    }
    row = {"expansion": expansion, "k": k, "batch": batch, "grad_mode": mode}
    for name, (fn, *args) in blocks.items():
        row[name] = median_ms(mx.compile(fn), *args, reps=reps)
    step = make_fast_step(consts)
    row["blocks_sum"] = round(sum(row[n] for n in blocks), 1)
    row["step"] = median_ms(lambda s: step(s, x, lr, t, 0), state, reps=reps)
    dead = consts.k_aux  # enough dead latents for a full-width AuxK pass
    row["auxk_extra"] = round(median_ms(lambda s: step(s, x, lr, t, dead), new_state(sae, dead),
                                        reps=reps) - row["step"], 1)
    return row


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
    state = new_state(sae)
    batches = [mx.random.normal((batch, D), key=mx.random.key(i)) * 4 for i in range(3)]
    flops = 2 * batch * sae.d_hidden * D + 10 * batch * k * D
    row = {"expansion": expansion, "d_hidden": sae.d_hidden, "k": k, "batch": batch,
           "auto_mode": choose_grad_mode(k, sae.d_hidden)}
    for mode in modes:
        consts = StepConsts.from_config(cfg, D, sae.d_hidden, grad_mode=mode)
        sec = time_step(make_fast_step(consts), state, batches, steps)
        row[f"fast_{mode}_tok_s"] = round(batch / sec)
        row[f"fast_{mode}_peak_fraction"] = round(flops / sec / 1e9 / peak, 3)
    consts = StepConsts.from_config(cfg, D, sae.d_hidden)
    sec = time_step(lambda *a: reference_step(*a, consts), state, batches, max(2, steps // 2))
    row["reference_tok_s"] = round(batch / sec)
    return row


def parse_shape(text: str) -> tuple[int, int, int]:
    parts = text.split(":")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--shapes item {text!r} is not valid; allowed: "
                         "expansion:k:batch with positive integers")
    return tuple(int(p) for p in parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    ap.add_argument("--modes", help="weight-gradient forms of the fast step to time "
                    "(default: segment,dense; with --profile: choose_grad_mode's)")
    ap.add_argument("--profile", action="store_true", help="time the fast step's blocks")
    ap.add_argument("--shapes", help="expansion:k:batch,... instead of the default shapes")
    args = ap.parse_args()
    shapes = PROFILE_SHAPES if args.profile else SHAPES
    if args.shapes:
        shapes = [parse_shape(s) for s in args.shapes.split(",")]
    peak = matmul_peak()
    if args.profile:
        rows = [profile_shape(e, k, b, args.steps, mode)
                for e, k, b in shapes for mode in (args.modes or "auto").split(",")]
    else:
        modes = (args.modes or "segment,dense").split(",")
        rows = [bench_shape(e, k, b, args.steps, modes, peak) for e, k, b in shapes]
    print(json.dumps({"benchmark": "train_step_profile" if args.profile else "train_step",
                      "device": str(mx.default_device()),
                      "blas": STATE.blas, "malloc_tuned": STATE.malloc_tuned,
                      "saelab": saelab.__version__, "matmul_peak_gflops": round(peak, 1),
                      "loadavg": [round(x, 2) for x in os.getloadavg()], "d_model": D,
                      "shapes": rows}))


if __name__ == "__main__":
    main()
