"""saelab's training step against EleutherAI sparsify's, timed side by side; prints one JSON line.

    python benchmarks/peers.py [--reps 3] [--steps 3] [--cells 576:8:32:1024,...]

sparsify (``eai-sparsify`` 1.3.3, PyTorch CPU) goes into its own throwaway venv,
``<saelab cache>/peers/sparsify-venv`` (never a saelab dependency): ``torch==2.13.0``
first, then ``eai-sparsify`` with a constraint holding torch at that version; a CUDA
build of torch is refused. It runs in a worker process of that venv (this file with
``--worker``), which times sparsify's step only when told to and answers before this
process times saelab's: the two never run at the same time. Per cell, the reps
alternate sparsify, saelab, sparsify, saelab, ...

The step is the one each trainer runs. sparsify, as ``Trainer`` does it with
``optimizer="adam"``, ``loss_fn="fvu"``: unit-norm the decoder, ``SparseCoder`` forward
with the dead mask and the batch's total variance, backward, remove the
decoder-parallel gradient, ``torch.optim.Adam`` step, zero_grad, warm-up schedule step,
tokens-since-fired update, the host reads of fvu and AuxK loss the trainer logs.
saelab, as ``train.py`` does it: the fast step (weight-gradient form from
``choose_grad_mode``) under ``blas_threads(1)``, async eval and the one host read of
``StepMetrics``. No latent
is dead, so neither runs an AuxK pass. Same shapes, float32, Adam, one process per
side using both cores (``torch.set_num_threads(2)``; MLX: BLAS threads plus two CPU
streams), the same batches (numpy's generator, seeded per batch). tokens/s per side is
batch / the median over reps of seconds per step; ``ratio`` is saelab / sparsify;
``cpu_ms_per_step`` is each process's user + system CPU time per step (all threads), a
view less sensitive to machine load than wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

TORCH = "2.13.0"
SPARSIFY = "1.3.3"
LR = 1e-3
DEAD_TOKENS = 10_000_000
"""Both sides' dead-latent threshold (sparsify's default): no AuxK pass in a benchmark run."""
CELLS = [(576, 8, 32, 1024), (576, 8, 32, 4096), (576, 8, 128, 1024), (576, 8, 128, 4096),
         (576, 32, 32, 1024), (576, 32, 32, 4096), (576, 32, 128, 1024), (576, 32, 128, 4096),
         (2048, 8, 32, 1024), (2048, 8, 32, 4096)]
"""(d_model, expansion, k, batch)."""


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def batch_array(batch: int, d: int, i: int):
    """The i-th benchmark batch, identical in both processes."""
    import numpy as np
    return np.random.default_rng(i).standard_normal((batch, d), dtype=np.float32) * 4


# -- the sparsify side (runs inside the sparsify venv) ------------------------------------

def worker() -> None:
    """Answer JSON-line commands on stdin: ``setup`` a cell, ``time`` steps, ``info``."""
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout = sys.stderr  # library prints must not mix with replies
    import torch
    from sparsify import SparseCoder, SparseCoderConfig
    from transformers import get_linear_schedule_with_warmup

    torch.set_num_threads(2)
    step = None
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "info":
            from importlib.metadata import version
            out = {"torch": torch.__version__, "sparsify": version("eai-sparsify"),
                   "torch_threads": torch.get_num_threads(), "cuda": torch.version.cuda}
        elif cmd["cmd"] == "setup":
            step = None  # free the previous cell first
            step = _sparsify_step(torch, SparseCoder, SparseCoderConfig,
                                  get_linear_schedule_with_warmup, **cmd["cell"])
            step(2)  # warm-up
            out = {"ok": True}
        elif cmd["cmd"] == "time":
            out = dict(zip(("seconds", "cpu"), step(cmd["steps"])))
        else:
            return
        reply.write(json.dumps(out) + "\n")


def _sparsify_step(torch, SparseCoder, SparseCoderConfig, schedule, d: int, latents: int,
                   k: int, batch: int):
    torch.manual_seed(0)
    sae = SparseCoder(d, SparseCoderConfig(num_latents=latents, k=k), device="cpu",
                      dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=LR)
    sched = schedule(opt, 1000, 10**6)
    tsf = torch.zeros(latents, dtype=torch.long)
    xs = [torch.from_numpy(batch_array(batch, d, i)) for i in range(2)]
    auxk_alpha = 1 / 32

    def run(steps: int) -> tuple[float, float]:
        start, cpu = time.perf_counter(), _cpu_seconds()
        for i in range(steps):
            x = xs[i % 2]
            sae.set_decoder_norm_to_unit_norm()
            dead_mask = tsf > DEAD_TOKENS
            total_variance = (x - x.mean(0)).pow(2).sum()
            out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
            did_fire = torch.zeros(latents, dtype=torch.bool)
            did_fire[out.latent_indices.flatten()] = True
            float(out.fvu.detach()), float(out.auxk_loss.detach())
            loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
            loss.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
            sched.step()
            with torch.no_grad():
                tsf.add_(x.shape[0])
                tsf[did_fire] = 0
        return (time.perf_counter() - start) / steps, (_cpu_seconds() - cpu) / steps

    return run


class Sparsify:
    """The worker process in the sparsify venv."""

    def __init__(self, python: Path):
        self.proc = subprocess.Popen([str(python), os.path.abspath(__file__), "--worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     bufsize=1)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"sparsify worker died on {cmd} (exit {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done.stdout


def sparsify_venv() -> Path:
    """The venv's python, installing it first if missing; refuses a CUDA torch."""
    from saelab.paths import cache_root
    venv = cache_root() / "peers" / "sparsify-venv"
    python = venv / "bin" / "python"
    check = ("import torch, importlib.metadata as m; "
             "print(torch.__version__, torch.version.cuda, m.version('eai-sparsify'))")
    if python.exists():
        got = subprocess.run([str(python), "-c", check], capture_output=True, text=True)
        if got.returncode == 0 and got.stdout.split()[0].startswith(TORCH):
            return python
    print(f"installing sparsify {SPARSIFY} with torch {TORCH} into {venv}", file=sys.stderr)
    _run([sys.executable, "-m", "venv", "--clear", str(venv)])
    _run([str(python), "-m", "pip", "install", "-q", f"torch=={TORCH}"])
    constraint = venv / "constraints.txt"
    constraint.write_text(f"torch=={TORCH}\n")
    _run([str(python), "-m", "pip", "install", "-q", f"eai-sparsify=={SPARSIFY}",
          "-c", str(constraint)])
    torch_version, cuda, sparsify = _run([str(python), "-c", check]).split()
    if not torch_version.startswith(TORCH) or cuda != "None" or sparsify != SPARSIFY:
        raise RuntimeError(f"{venv}: got torch {torch_version} (CUDA {cuda}), sparsify "
                           f"{sparsify}; wanted a CPU torch {TORCH} and sparsify {SPARSIFY}")
    return python


# -- the saelab side (this process) --------------------------------------------------------

def _saelab_step(d: int, latents: int, k: int, batch: int):
    import mlx.core as mx
    from saelab.accel import blas_threads
    from saelab.config import SAEConfig
    from saelab.sae import SAE
    from saelab.host_step import make_step
    from saelab.steps import StepConsts, StepMetrics

    cfg = SAEConfig(expansion_factor=latents // d, k=k, batch_size=batch, learning_rate=LR,
                    dead_tokens_threshold=DEAD_TOKENS)
    params = dict(SAE(d, latents, k).trainable_parameters())
    box = {"state": {"params": params, "m": {n: mx.zeros_like(p) for n, p in params.items()},
                     "v": {n: mx.zeros_like(p) for n, p in params.items()},
                     "tsf": mx.zeros((latents,), mx.int32)}, "dead": 0}
    fast = make_step(StepConsts.from_config(cfg, d, latents))
    xs = [mx.array(batch_array(batch, d, i)) for i in range(2)]
    lr = mx.array(LR)

    def run(steps: int) -> tuple[float, float]:
        start, cpu = time.perf_counter(), _cpu_seconds()
        for i in range(steps):  # as train.py's loop
            with blas_threads(1):
                state, out = fast(box["state"], xs[i % 2], lr, mx.array(i + 1.0), box["dead"])
                mx.async_eval(state, out)
                box["state"], box["dead"] = state, int(StepMetrics.read(out).dead)
        return (time.perf_counter() - start) / steps, (_cpu_seconds() - cpu) / steps

    return run


def matmul_peak() -> float:
    from saelab.doctor import measure
    return measure(n=2048, repeats=5)["mlx_gflops"]


def parse_cells(text: str | None) -> list[tuple[int, int, int, int]]:
    if not text:
        return CELLS
    cells = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--cells item {item!r} is not valid; allowed: "
                             "d_model:expansion:k:batch with positive integers")
        cells.append(tuple(int(p) for p in parts))
    return cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="alternating timed reps per side")
    ap.add_argument("--steps", type=int, default=3, help="steps per rep")
    ap.add_argument("--cells", help="d_model:expansion:k:batch,... (default: the ten cells)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker()
    cells = parse_cells(args.cells)
    import saelab
    import mlx.core as mx
    from saelab.accel import STATE

    peer = Sparsify(sparsify_venv())
    info = peer.ask(cmd="info")
    load_start, peak_start = os.getloadavg(), matmul_peak()
    rows = []
    for d, expansion, k, batch in cells:
        cell = dict(d=d, latents=d * expansion, k=k, batch=batch)
        peer.ask(cmd="setup", cell=cell)
        ours = _saelab_step(**cell)
        ours(2)  # warm-up (compiles)
        times, cpus = {"sparsify": [], "saelab": []}, {"sparsify": [], "saelab": []}
        for _ in range(args.reps):
            got = peer.ask(cmd="time", steps=args.steps)
            times["sparsify"].append(got["seconds"])
            cpus["sparsify"].append(got["cpu"])
            seconds, cpu = ours(args.steps)
            times["saelab"].append(seconds)
            cpus["saelab"].append(cpu)
        del ours
        tok = {side: batch / statistics.median(t) for side, t in times.items()}
        rows.append({"d_model": d, "expansion": expansion, "latents": d * expansion, "k": k,
                     "batch": batch, "saelab_tok_s": round(tok["saelab"]),
                     "sparsify_tok_s": round(tok["sparsify"]),
                     "ratio": round(tok["saelab"] / tok["sparsify"], 2),
                     "cpu_ms_per_step": {s: round(1e3 * statistics.median(c))
                                         for s, c in cpus.items()},
                     "rep_tok_s": {s: [round(batch / x) for x in t] for s, t in times.items()}})
        print(f"{rows[-1]}", file=sys.stderr, flush=True)
    peer.close()
    print(json.dumps({
        "benchmark": "peers", "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "matmul_peak_gflops": {"start": peak_start, "end": matmul_peak()},
        "versions": {"saelab": saelab.__version__, "mlx": mx.__version__, "blas": STATE.blas,
                     "python": platform.python_version(), **info},
        "reps": args.reps, "steps_per_rep": args.steps, "cells": rows}))


if __name__ == "__main__":
    main()
