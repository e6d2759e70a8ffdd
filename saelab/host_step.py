"""The fast step on the CPU with saelab's C kernels (``host`` mode), and ``make_step``,
which picks it or MLX's fast step (``steps.make_fast_step``).

MLX runs a TopK step's encoder matmul near the BLAS peak, but its sparse work (top-k,
row gathers, segment-sums, the elementwise Adam) on one thread per op without SIMD:
at expansion 8 / k 32 / batch 1024 that was ~60% of the step (benchmarks/README.md,
"Step profile"). This step keeps the matmul in MLX and does the rest in C
(``saelab/_kernels*.c``), each part split over the two cores:

1. MLX: the two token halves' encoder matmuls, one per CPU stream;
2. C ``sparse_half``, a thread per half: top-k, codes, residual, the codes' gradients;
3. MLX, only with dead latents: AuxK over their columns (``steps._auxk``), a stream per half;
4. C ``grad_rows``, latents split over two threads: the weight and bias gradients,
   finished (AuxK's rows added, the decoder projection, the squared norms);
5. C ``adam_rows``: the global-norm clip, Adam, the decoder rows renormalized, in place.

It computes what the reference step does (tested against it); the top-k's ties may
break differently.

**In place.** The weights and Adam moments the step returns are the arrays it writes at
its next call (as JAX's donated buffers): a caller that keeps a returned state past the
next step must copy it. A state the step did not return (a new one, ``resample_dead``'s,
another step's) is first copied into arrays of its own, so a caller's arrays are never
written unless they came from this step.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

import saelab  # noqa: F401  (OpenBLAS preload before mlx.core)
import mlx.core as mx

from saelab.kernels import THREADS, _kernels, c_array, pre_activation_halves, run_threads, split
from saelab.steps import (_TSF_CAP, ADAM_EPS, StepConsts, StepMetrics, _auxk, make_fast_step,
                          reference_step)
from saelab.topk import cpu_streams
from saelab.weight_grads import choose_grad_mode


def make_step(consts: StepConsts):
    """The fast step for ``consts``: C (``make_host_step``) when ``choose_grad_mode`` says
    ``host``, else MLX's (``steps.make_fast_step``)."""
    mode = consts.grad_mode or choose_grad_mode(consts.k, consts.d_hidden, consts.tied)
    return make_host_step(consts) if mode == "host" else make_fast_step(consts)


def adam_consts(clip: float, lr: float, t: float, betas: Sequence[float]) -> tuple:
    """``adam_rows``' scalars: steps._adam's, in float32 as MLX forms them."""
    b1, b2 = betas
    f = np.float32
    c1 = f(lr) / (f(1) - f(b1) ** f(t))
    c2 = f(1) / np.sqrt(f(1) - f(b2) ** f(t))
    return tuple(float(c) for c in (clip, b1, 1 - b1, b2, 1 - b2, c1, c2, ADAM_EPS))


class _Owned:
    """The arrays a step updates in place: (mx.array, writable numpy view) per part and key."""

    def __init__(self):
        self.arrays: dict[tuple[str, str], tuple[mx.array, np.ndarray]] = {}

    def take(self, state: dict) -> dict[str, dict[str, tuple[mx.array, np.ndarray]]]:
        """This step's own arrays for ``state``: a copy of any array it did not return."""
        out: dict[str, dict] = {"params": {}, "m": {}, "v": {}}
        for part, arrays in out.items():
            for key, a in state[part].items():
                mine = self.arrays.get((part, key))
                if mine is None or mine[0] is not a:
                    if a.dtype != mx.float32:
                        raise ValueError(f"state[{part!r}][{key!r}] has dtype {a.dtype}; "
                                         "allowed: float32 (grad_mode 'host')")
                    copy = mx.array(np.array(a, np.float32))
                    mine = self.arrays[(part, key)] = (copy, np.asarray(copy))
                arrays[key] = mine
        return out


def _aux_rows(pre: mx.array, tsf: mx.array, w_dec: mx.array, r: mx.array, xc: mx.array,
              coef: mx.array, width: int, consts: StepConsts) -> tuple[mx.array, ...]:
    """AuxK's share of one token half, per dead column: (columns, encoder rows, decoder
    rows, encoder-bias gradient, decoder projection, squared AuxK error)."""
    cols, codes, g_pre, e, g_e, g_codes = _auxk(pre, tsf, w_dec, r, coef, width, consts)
    return (cols, g_pre.T @ xc, codes.T @ g_e, mx.sum(g_pre, axis=0),
            mx.sum(codes * g_codes, axis=0), mx.sum(mx.square(e)))


def make_host_step(consts: StepConsts, timings: dict[str, list] | None = None):
    """The C-backed fast step, with ``steps.make_fast_step``'s signature (see the module
    docstring; it counts the dead latents from ``state["tsf"]`` itself, so ``num_dead``
    matters only for a batch of one token). With ``timings``, each call appends its
    phases' wall seconds there (``benchmarks/train_step.py --profile``)."""
    if consts.tied:  # the tied update sums both gradients into one matrix
        raise ValueError("grad_mode='host' is not valid with tied weights; allowed: "
                         "segment, dense, None")
    if _kernels is None:
        raise ValueError("grad_mode='host' needs the C extension saelab._kernels, not built "
                         "here (pip install with a C compiler); allowed: segment, dense, None")
    s_a, s_b = cpu_streams()
    aux_fns, own, bufs = {}, _Owned(), {}
    h, k = consts.d_hidden, consts.k
    clock = [0.0]

    def phase(name: str) -> None:
        if timings is not None:
            now = time.perf_counter()
            timings.setdefault(name, []).append(now - clock[0])
            clock[0] = now

    def buffers(n: int, d: int) -> dict[str, np.ndarray]:
        if bufs.get("n") != (n, d):
            bufs.clear()
            bufs.update({"n": (n, d), "idx": np.empty((n, k), np.uint32),
                         **{key: np.empty((n, k), np.float32) for key in ("codes", "g_pre", "vg")},
                         **{key: np.empty((n, d), np.float32) for key in ("xc", "r", "g_r")},
                         "enc": np.empty((h, d), np.float32), "dec": np.empty((h, d), np.float32),
                         "g_benc": np.empty(h, np.float32), "fired": np.empty(h, np.int32)})
        return bufs

    def auxk(width: int, pre: list, tsf: mx.array, w_dec: mx.array, b: dict, tv: float,
             num_dead: int) -> tuple:
        if width not in aux_fns:
            aux_fns[width] = mx.compile(lambda *a: _aux_rows(*a, width, consts))
        scale = np.float32(min(num_dead / consts.k_aux, 1.0))
        coef = mx.array(np.float32(2 * consts.auxk_coefficient) * scale / np.float32(tv))
        r, xc, half = mx.array(b["r"]), mx.array(b["xc"]), pre[0].shape[0]
        outs = []
        for s, rows, pre_i in ((s_a, slice(0, half), pre[0]), (s_b, slice(half, None), pre[1])):
            with mx.stream(s):
                outs.append(aux_fns[width](pre_i, tsf, w_dec, r[rows], xc[rows], coef))
        mx.eval(outs)
        (cols, *sa), (_, *sb) = outs  # the same columns in both halves
        enc, dec, benc, proj = (c_array(x) + c_array(y) for x, y in zip(sa[:4], sb[:4]))
        sq = sa[4].item() + sb[4].item()
        return (c_array(cols, np.int32), enc, dec, benc, proj), sq * float(scale) / tv

    def step(state: dict, x: mx.array, lr: mx.array, t: mx.array, num_dead: int):
        n, d = x.shape
        if n < 2:  # no two token halves
            return reference_step(state, x, lr, t, num_dead, consts)
        clock[0] = time.perf_counter()
        own_arrays = own.take(state)
        p = {key: a for key, (a, _) in own_arrays["params"].items()}
        w = {key: view for key, (_, view) in own_arrays["params"].items()}
        half, pre = n // 2, pre_activation_halves(p, x)
        tv = mx.sum(mx.square(x - mx.mean(x, axis=0)))
        mx.eval(pre, tv, x, state["tsf"])
        phase("matmuls")
        tv = float(tv.item())
        b = buffers(n, d)
        sums, gbdec = np.zeros((THREADS, 3)), np.zeros((THREADS, d))
        coef = float(np.float32(2) / np.float32(tv))
        l1n = float(np.float32(consts.l1_coefficient) * np.float32(1 / n))
        run_threads([(_kernels.sparse_half, c_array(pre_i), c_array(x), w["W_dec"], w["b_dec"],
                      t0, k, coef, l1n, b["idx"], b["codes"], b["g_pre"], b["vg"], b["xc"],
                      b["r"], b["g_r"], sums[i], gbdec[i])
                     for i, (pre_i, t0) in enumerate(zip(pre, (0, half)))])
        phase("sparse_halves")
        tsf = np.asarray(state["tsf"])
        dead_before = int(np.count_nonzero(tsf > consts.dead_threshold))
        width, sq_e = consts.aux_width(dead_before), 0.0
        aux_of = np.full(h, -1, np.int32)
        aux = (np.zeros((0, d), np.float32),) * 2 + (np.zeros(0, np.float32),) * 2
        if width:
            (cols, *aux), sq_e = auxk(width, pre, state["tsf"], p["W_dec"], b, tv, dead_before)
            aux_of[cols] = np.arange(len(cols), dtype=np.int32)
            phase("auxk")
        sq, bdec = np.zeros((THREADS, 2)), np.zeros((THREADS, d))
        run_threads([(_kernels.grad_rows, b["idx"], b["g_pre"], b["codes"], b["vg"], b["xc"],
                      b["g_r"], w["W_enc"], w["W_dec"], aux_of, *aux, lo, hi, b["enc"], b["dec"],
                      b["g_benc"], b["fired"], sq[i], bdec[i])
                     for i, (lo, hi) in enumerate(split(h))])
        phase("grad_rows")
        grads = {"W_enc": b["enc"], "W_dec": b["dec"], "b_enc": b["g_benc"],
                 "b_dec": (gbdec.sum(axis=0) - bdec.sum(axis=0)).astype(np.float32)}
        clip = 1.0
        if consts.gradient_clip > 0:  # steps._clip (the squared norm summed in float64)
            norm = np.sqrt(sq.sum() + sum(np.square(grads[key], dtype=np.float64).sum()
                                          for key in ("b_enc", "b_dec")))
            clip = float(np.float32(min(1.0, consts.gradient_clip / (norm + 1e-6))))
        c = adam_consts(clip, float(lr.item()), float(t.item()), consts.betas)
        m, v = ({key: view for key, (_, view) in own_arrays[part].items()} for part in "mv")
        jobs = [(_kernels.adam_rows, w[key], m[key], v[key], grads[key], lo, hi, d, c,
                 key == "W_dec") for lo, hi in split(h) for key in ("W_enc", "W_dec")]
        jobs += [(_kernels.adam_rows, w[key], m[key], v[key], grads[key], 0, 1, grads[key].size,
                  c, False) for key in ("b_enc", "b_dec")]
        run_threads(jobs)
        phase("adam")
        tsf = np.where(b["fired"] > 0, 0, np.minimum(tsf + n, _TSF_CAP)).astype(np.int32)
        sq_r, sum_v, nonzero = sums.sum(axis=0)
        fvu, auxk_loss, l1 = sq_r / tv, sq_e, sum_v / n
        metrics = StepMetrics(
            loss=fvu + consts.auxk_coefficient * auxk_loss + consts.l1_coefficient * l1,
            fvu=fvu, auxk=auxk_loss, l1=l1, l0=nonzero / n,
            dead=float(np.count_nonzero(tsf > consts.dead_threshold)))
        new = {part: {key: a for key, (a, _) in own_arrays[part].items()} for part in own_arrays}
        with np.errstate(over="ignore"):  # a diverged loss is inf, as in float32 MLX
            new["tsf"], metrics = mx.array(tsf), mx.array(np.array(metrics, np.float32))
        phase("metrics")
        return new, metrics

    return step
