"""Training throughput of the fast and reference SAE steps; prints one JSON line.

    python benchmarks/train_step.py [--steps 5] [--modes segment,dense]
    python benchmarks/train_step.py --profile [--steps 7]
    python benchmarks/train_step.py --against REV [--dead 0,70,288] [--reps 5]

``--against REV`` times the fast step (``host_step.make_step``) against the one of git
revision REV (its ``saelab/steps.py`` and ``host_step.py``; the rest of saelab and the
C kernels as built now), alternating reps of ``--steps`` steps per side after an
untimed rep each, queued as train.py queues them; with ``--dead N`` the first N
latents are dead at every step (their tokens-since-fired reset). REV's files must
import only names saelab still has and call the kernels as built (revisions from the
C step on; older ones: time them from a git worktree with its own build). Each row:
both sides' tok/s per rep, median CPU ms per step, and REV's median time / this one's.

``--profile`` times the fast step's blocks instead, as the step runs them: the C
step's phases (``host``), or for MLX's step (``--modes segment``) each block
compiled on its own, inputs ready, OpenBLAS on one thread ([wall ms, CPU ms of
all threads], medians over ``--steps``): one token half's encoder matmul, top-k,
decode with its gradients and weight gradients on one stream, and that half as
one piece; both halves on the two streams; the gradients' combination and the
two updates (decoder projection, clipping, Adam, renorm), one per stream; the
whole step; AuxK (the whole step with dead latents minus without). Blocks timed
alone find their inputs in cache: inside the half, the decode took 13 ms at
8 / 32 / 1024 against 6 alone.

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
import subprocess
import sys
import time
import types
from pathlib import Path

import saelab
import mlx.core as mx

from saelab.accel import STATE, blas_threads
from saelab.config import SAEConfig
from saelab.sae import SAE, pre_activations, topk_codes
from saelab.steps import (StepConsts, StepMetrics, _dec_grad, _dec_update, _decode_residual,
                          _enc_grads, _enc_update, _slice_grads, make_fast_step,
                          reference_step)
from saelab.host_step import make_host_step, make_step
from saelab.weight_grads import choose_grad_mode, mlx_weight_grads
from saelab.topk import block_topk, cpu_streams

D = 576
SHAPES = [(8, 32, 1024), (8, 32, 4096), (8, 128, 4096), (32, 32, 4096), (32, 128, 4096)]
PROFILE_SHAPES = [(8, 32, 1024), (32, 32, 4096), (32, 128, 1024)]


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


def median_ms(fn, *args, reps: int) -> tuple[float, float]:
    """Median wall ms and CPU ms (all threads) of ``fn(*args)`` evaluated, after two
    warm-up calls."""
    for _ in range(2):
        mx.eval(fn(*args))
    wall, cpu = [], []
    for _ in range(reps):
        start, start_cpu = time.perf_counter(), time.process_time()
        mx.eval(fn(*args))
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return tuple(round(1e3 * sorted(v)[len(v) // 2], 1) for v in (wall, cpu))


def on_stream(fn, stream):
    def run(*args):
        with mx.stream(stream):
            return fn(*args)
    return run


def profile_host_shape(consts: StepConsts, sae: SAE, batch: int, reps: int) -> dict:
    """Median wall ms of the C step's phases as it runs them (``make_host_step``'s
    ``timings``) and of the whole step, over ``reps`` chained steps after two, without
    dead latents and with k_aux of them (``dead_`` rows: the ``auxk`` phase)."""
    row = {"expansion": sae.d_hidden // D, "k": consts.k, "batch": batch, "grad_mode": "host"}
    x, lr, t = mx.random.normal((batch, D), key=mx.random.key(0)) * 4, mx.array(1e-3), mx.array(1.0)
    for dead, prefix in ((0, ""), (consts.k_aux, "dead_")):
        timings, walls, state = {}, [], new_state(sae, dead)
        step, tsf = make_host_step(consts, timings), state["tsf"]
        with blas_threads(1):
            for _ in range(reps + 2):
                start = time.perf_counter()
                new, out = step(state, x, lr, t, dead)
                mx.eval(new, out)
                walls.append(time.perf_counter() - start)
                state = {**new, "tsf": tsf}  # the dead stay dead
        for name, times in {"step": walls, **timings}.items():
            row[prefix + name] = round(1e3 * sorted(times[2:])[reps // 2], 1)
    return row


def profile_shape(expansion: int, k: int, batch: int, reps: int, mode: str | None) -> dict:
    """Wall and CPU ms of the fast step's blocks as it runs them (no AuxK unless
    named): one token half's blocks on one stream, both halves on the two
    streams, the two updates one per stream, the whole step, all with OpenBLAS on
    one thread as train.py runs the step. The C step (``host``): its phases."""
    cfg = SAEConfig(expansion_factor=expansion, k=k, batch_size=batch)
    sae = SAE(D, expansion * D, k)
    h = sae.d_hidden
    consts = StepConsts.from_config(cfg, D, h, grad_mode=None if mode == "auto" else mode)
    mode = consts.grad_mode or choose_grad_mode(k, h)  # without AuxK
    if mode == "host":
        return profile_host_shape(consts, sae, batch, reps)
    state = new_state(sae)
    p, x = state["params"], mx.random.normal((batch, D), key=mx.random.key(0)) * 4
    half, tsf = x[: batch // 2], state["tsf"]
    lr, t, inv_n = mx.array(1e-3), mx.array(1.0), mx.array(1 / batch)
    pre = pre_activations(p, half)
    codes = topk_codes(pre, k, select=block_topk)
    xc, tv = half - p["b_dec"], mx.sum(mx.square(x - mx.mean(x, axis=0)))
    r, g_r, g_v = _decode_residual(p["W_dec"], codes.values, codes.indices, -xc, 2 / tv)
    g_pre = mx.where(codes.selected > 0, g_v, 0)
    grads = mx.compile(lambda q, xs: _slice_grads(q, xs, tv, inv_n, tsf, 0, consts))
    a, b = grads(p, half), grads(p, x[batch // 2:])
    mx.eval(pre, codes, r, g_r, g_v, g_pre, a, b)
    s0, s1 = cpu_streams()

    def halves(q, xs):
        return on_stream(grads, s0)(q, xs[: batch // 2]), on_stream(grads, s1)(q, xs[batch // 2:])

    enc_grads, dec_grad = mx.compile(_enc_grads), mx.compile(_dec_grad)
    enc_update = mx.compile(lambda *u: _enc_update(*u, consts))
    dec_update = mx.compile(lambda *u: _dec_update(*u, consts))
    g_enc, sq_enc = enc_grads(p, a, b)
    g_dec, sq_dec = dec_grad(p["W_dec"], a, b)
    mx.eval(g_enc, sq_enc, g_dec, sq_dec)

    def updates(s):
        with mx.stream(s0):
            u = enc_update(s, g_enc, sq_enc + sq_dec, lr, t)
        with mx.stream(s1):
            return u, dec_update(s, g_dec, sq_dec + sq_enc, lr, t)

    blocks = {  # (function, args, counted in the half's sum)
        "encoder_matmul": (on_stream(mx.compile(pre_activations), s0), (p, half), True),
        "topk": (on_stream(mx.compile(lambda c: topk_codes(c, k, select=block_topk)), s0),
                 (pre,), True),
        "decode_and_code_grads": (on_stream(mx.compile(
            lambda w, v, i, o: _decode_residual(w, v, i, o, 2 / tv)), s0),
            (p["W_dec"], codes.values, codes.indices, -xc), True),
        "half": (on_stream(grads, s0), (p, half), False),
        "both_halves": (halves, (p, x), False),
        "weight_grads": (on_stream(mx.compile(
            lambda i, g, c, v, r: mlx_weight_grads(i, g, c, v, r, h, mode)), s0),
            (codes.indices, g_pre, xc, codes.values, g_r), True),
        "combine_grads": (lambda: (on_stream(enc_grads, s0)(p, a, b),
                                   on_stream(dec_grad, s1)(p["W_dec"], a, b)), (), False),
        "update": (updates, (state,), False),
    }
    row = {"expansion": expansion, "k": k, "batch": batch, "grad_mode": mode}
    step = make_fast_step(consts)
    with blas_threads(1):
        for name, (fn, args, _) in blocks.items():
            row[name] = median_ms(fn, *args, reps=reps)
        row["half_blocks_sum"] = tuple(round(sum(row[n][i] for n, b in blocks.items() if b[2]), 1)
                                       for i in (0, 1))
        row["step"] = median_ms(lambda s: step(s, x, lr, t, 0), state, reps=reps)
        dead = consts.k_aux  # enough dead latents for a full-width AuxK pass
        aux = median_ms(lambda s: step(s, x, lr, t, dead), new_state(sae, dead), reps=reps)
    row["auxk_extra"] = tuple(round(aux[i] - row["step"][i], 1) for i in (0, 1))
    return row


def time_step(step, state: dict, batches: list, steps: int, dead: int = 0
              ) -> tuple[float, float]:
    """Wall and CPU seconds per step after one warm-up (compile) step, run as train.py
    runs it (queued with ``async_eval``, the metrics read every step), each from the
    last; with dead latents, their tokens-since-fired from ``state`` (they stay dead)."""
    lr, t = mx.array(1e-3), mx.array(1.0)
    warm, out = step(state, batches[0], lr, t, dead)
    mx.eval(warm, out)
    # from the warm-up's state: the C step copies a state it did not return (not timed)
    current = {**warm, "tsf": state["tsf"]} if dead else warm
    start, start_cpu = time.perf_counter(), time.process_time()
    for i in range(steps):
        new, out = step(current, batches[(i + 1) % len(batches)], lr, t, dead)
        mx.async_eval(new, out)
        StepMetrics.read(out)
        # with dead latents their tokens-since-fired start from state's every step (the
        # weights go on: the step updates in place the arrays it returned)
        current = {**new, "tsf": state["tsf"]} if dead else new
    mx.eval(new)
    return (time.perf_counter() - start) / steps, (time.process_time() - start_cpu) / steps


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
        with blas_threads(1):  # as train.py runs the fast step
            sec, _ = time_step(make_step(consts), state, batches, steps)
        row[f"fast_{mode}_tok_s"] = round(batch / sec)
        row[f"fast_{mode}_peak_fraction"] = round(flops / sec / 1e9 / peak, 3)
    consts = StepConsts.from_config(cfg, D, sae.d_hidden)
    sec, _ = time_step(lambda *a: reference_step(*a, consts), state, batches, max(2, steps // 2))
    row["reference_tok_s"] = round(batch / sec)
    return row


def _module_at(rev: str, path: str) -> types.ModuleType | None:
    """``path`` as of git revision ``rev``, executed as a module (None if ``rev`` lacks it)."""
    repo = Path(__file__).resolve().parents[1]
    got = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True,
                         text=True)
    if got.returncode:
        return None
    name = f"{Path(path).stem}_at_{rev}"
    module = sys.modules[name] = types.ModuleType(name)
    exec(compile(got.stdout, f"{rev}:{path}", "exec"), module.__dict__)
    return module


def steps_at(rev: str) -> types.SimpleNamespace:
    """The step as of git revision ``rev``: its saelab/steps.py and, where it has one, its
    saelab/host_step.py importing that steps.py (the rest of saelab, and the C kernels,
    as built now): ``StepConsts`` and ``make_step``."""
    steps = _module_at(rev, "saelab/steps.py")
    current = sys.modules["saelab.steps"]
    sys.modules["saelab.steps"] = steps  # host_step's "from saelab.steps import ..."
    try:
        host = _module_at(rev, "saelab/host_step.py")
    finally:
        sys.modules["saelab.steps"] = current
    return types.SimpleNamespace(StepConsts=steps.StepConsts,
                                 make_step=host.make_step if host else steps.make_fast_step)


def compare_shape(expansion: int, k: int, batch: int, deads: list[int], steps: int,
                  reps: int, rev: str, old) -> list[dict]:
    """The fast step against ``old``'s (steps.py at ``rev``), alternating reps of
    ``steps`` steps, with each count of dead latents: medians of tok/s and CPU ms."""
    cfg = SAEConfig(expansion_factor=expansion, k=k, batch_size=batch)
    sae = SAE(D, expansion * D, k)
    batches = [mx.random.normal((batch, D), key=mx.random.key(i)) * 4 for i in range(3)]
    sides = {"now": make_step(StepConsts.from_config(cfg, D, sae.d_hidden)),
             rev: old.make_step(old.StepConsts.from_config(cfg, D, sae.d_hidden))}
    rows = []
    for dead in deads:
        state, got = new_state(sae, dead), {side: [] for side in sides}
        with blas_threads(1):
            for step in sides.values():  # untimed: a side's first rep ran slower
                time_step(step, state, batches, 2, dead)
            for _ in range(reps):
                for side, step in sides.items():
                    got[side].append(time_step(step, state, batches, steps, dead))
        row = {"expansion": expansion, "k": k, "batch": batch, "dead": dead}
        for side, times in got.items():
            row[f"{side}_tok_s"] = sorted(round(batch / w) for w, _ in times)
            row[f"{side}_cpu_ms"] = round(1e3 * sorted(c for _, c in times)[reps // 2], 1)
        row["ratio"] = round(sorted(w for w, _ in got[rev])[reps // 2]
                             / sorted(w for w, _ in got["now"])[reps // 2], 3)
        rows.append(row)
    return rows


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
    ap.add_argument("--against", metavar="REV", help="time the fast step against "
                    "saelab/steps.py at git revision REV instead, alternating")
    ap.add_argument("--dead", default="0", help="with --against: dead latents, N,...")
    ap.add_argument("--reps", type=int, default=3, help="with --against: reps per side")
    args = ap.parse_args()
    shapes = PROFILE_SHAPES if args.profile else SHAPES
    if args.shapes:
        shapes = [parse_shape(s) for s in args.shapes.split(",")]
    load_start, peak = [round(x, 2) for x in os.getloadavg()], matmul_peak()
    if args.against:
        old, deads = steps_at(args.against), [int(n) for n in args.dead.split(",")]
        rows = [r for e, k, b in shapes
                for r in compare_shape(e, k, b, deads, args.steps, args.reps, args.against, old)]
    elif args.profile:
        rows = [profile_shape(e, k, b, args.steps, mode)
                for e, k, b in shapes for mode in (args.modes or "auto").split(",")]
    else:
        modes = (args.modes or "segment,dense").split(",")
        rows = [bench_shape(e, k, b, args.steps, modes, peak) for e, k, b in shapes]
    name = "train_step_against" if args.against else \
        "train_step_profile" if args.profile else "train_step"
    print(json.dumps({"benchmark": name, "against": args.against,
                      "device": str(mx.default_device()),
                      "blas": STATE.blas, "malloc_tuned": STATE.malloc_tuned,
                      "saelab": saelab.__version__, "matmul_peak_gflops": round(peak, 1),
                      "matmul_peak_end_gflops": round(matmul_peak(), 1),
                      "loadavg_start": load_start,
                      "loadavg": [round(x, 2) for x in os.getloadavg()], "d_model": D,
                      "shapes": rows}))


if __name__ == "__main__":
    main()
