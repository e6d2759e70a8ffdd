"""The compiled fast TopK step with hand-written gradients, and the autodiff
reference step it is tested against.

Both give the same update from the same state and batch (tested):
``reference_step`` (autodiff + argpartition, uncompiled) and the fast step
(``make_fast_step``: hand-written gradients, block top-k, gather decode,
segment-sum weight gradients, AuxK as dense products over the dead latents'
columns only; the batch's two token halves on the two CPU streams, then the
encoder's and the decoder's updates one per stream; block timings in
benchmarks/README.md; on the CPU with the C extension built, ``host_step`` runs the
step's sparse work in C instead). Both minimize

    loss = FVU + auxk_coefficient * AuxK + l1_coefficient * L1

with FVU = sum of squared errors / sum of squared deviations of the batch
from its mean (sparsify's normalized MSE), in the SAE's normalized space.

State: {"params", "m", "v" (Adam moments), "tsf" (tokens since each latent
last fired)}. A step returns (state, metrics): ``metrics`` is one array laid
out as ``StepMetrics``' fields (``StepMetrics.pack`` inside the step,
``StepMetrics.read`` in the loop: one host transfer per step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import saelab  # noqa: F401  (OpenBLAS + malloc set-up before mlx.core)
import mlx.core as mx

from saelab.config import SAEConfig
from saelab.sae import decode_codes, decode_codes_vjp, pre_activations, topk_codes
from saelab.topk import argpartition_topk, block_topk, cpu_streams
from saelab.weight_grads import choose_grad_mode, mlx_weight_grads

ADAM_EPS = 1e-8
_TSF_CAP = 2**30  # tokens-since-fired saturates here (int32)


class StepMetrics(NamedTuple):
    """What one step reports, by name (the step packs them into one array)."""

    loss: float
    """The minimized loss: fvu + auxk_coefficient * auxk + l1_coefficient * l1."""
    fvu: float
    """Fraction of the batch's variance unexplained (normalized MSE)."""
    auxk: float
    """AuxK loss (0 when no latent is dead)."""
    l1: float
    """Mean over tokens of the sum of codes."""
    l0: float
    """Mean nonzero codes per token."""
    dead: float
    """Latents not fired in the last ``dead_threshold`` tokens, after the step."""

    @classmethod
    def pack(cls, **values: mx.array) -> mx.array:
        """One float32 array in field order (inside the compiled step)."""
        return mx.stack([values[f].astype(mx.float32) for f in cls._fields])

    @classmethod
    def read(cls, packed: mx.array) -> "StepMetrics":
        """Host values of a packed array (one transfer)."""
        return cls(*packed.tolist())


@dataclass(frozen=True)
class StepConsts:
    """Everything a step needs besides state and batch (compile-time constants)."""

    k: int
    d_hidden: int
    k_aux: int
    auxk_coefficient: float
    dead_threshold: int
    l1_coefficient: float
    gradient_clip: float
    betas: tuple[float, float]
    tied: bool
    grad_mode: str | None
    """Top-k weight-gradient form: ``segment`` (sorted segment-sums), ``dense`` (BLAS
    matmul), ``host`` (C: ``host_step.make_host_step``), or None: ``choose_grad_mode``."""

    @classmethod
    def from_config(cls, cfg: SAEConfig, d_model: int, d_hidden: int,
                    grad_mode: str | None = None) -> "StepConsts":
        return cls(k=cfg.k, d_hidden=d_hidden,
                   k_aux=min(cfg.k_aux or d_model // 2, d_hidden) if cfg.auxk else 0,
                   auxk_coefficient=cfg.auxk_coefficient,
                   dead_threshold=cfg.dead_tokens_threshold,
                   l1_coefficient=cfg.l1_coefficient, gradient_clip=cfg.gradient_clip,
                   betas=tuple(cfg.adam_betas), tied=cfg.tied_weights,
                   grad_mode=grad_mode)

    def aux_width(self, num_dead: int) -> int:
        """Columns (latents) the AuxK pass reads: the dead ones, padded to a power-of-2
        bucket (>= 16) so only a few step shapes get compiled; capped at k_aux when at
        most k_aux are dead (all are selected), else at d_hidden (top k_aux of them)."""
        if not self.k_aux or not num_dead:
            return 0
        bucket = max(16, 1 << (num_dead - 1).bit_length())
        return min(bucket, self.k_aux if num_dead <= self.k_aux else self.d_hidden)


def _decoder_key(consts: StepConsts) -> str:
    return "W_enc" if consts.tied else "W_dec"


def _held(scalar: mx.array) -> mx.array:
    """A scalar made by elementwise ops, kept out of the fused kernels that read it:
    fused, it is recomputed (powers, sqrt and all) for every element, which made
    the decoder's update 3.6x slower (benchmarks/README.md, "Step profile"). A
    reshape does not fuse; per-row scalars are indexed ``[:, None]`` for the same reason."""
    return scalar.reshape(1)


def _clip(sq_norm: mx.array, consts: StepConsts) -> mx.array:
    """The factor clipping a gradient of squared global norm ``sq_norm``."""
    if consts.gradient_clip <= 0:
        return mx.array(1.0)
    return _held(mx.minimum(1.0, consts.gradient_clip / (mx.sqrt(sq_norm) + 1e-6)))


def _adam(p: mx.array, m: mx.array, v: mx.array, g: mx.array, lr: mx.array, t: mx.array,
          betas: tuple[float, float]) -> tuple[mx.array, mx.array, mx.array]:
    """Bias-corrected Adam, mlx.optimizers.Adam's arithmetic: (p, m, v) after ``g``."""
    b1, b2 = betas
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * mx.square(g)
    c1, c2 = _held(lr / (1 - b1 ** t)), _held(mx.rsqrt(1 - b2 ** t))
    return p - c1 * m / (mx.sqrt(v) * c2 + ADAM_EPS), m, v


def _unit_rows(w: mx.array) -> mx.array:
    return w / (mx.sqrt(mx.sum(mx.square(w), axis=1)) + 1.1920929e-07)[:, None]


def _apply_update(state: dict, grads: dict, lr: mx.array, t: mx.array,
                  consts: StepConsts) -> dict:
    """The reference step's update (the fast step's splits it over two streams):
    project out the decoder-parallel gradient, clip the global norm, Adam,
    renormalize decoder rows."""
    params, dec = state["params"], _decoder_key(consts)
    w, g = params[dec], grads[dec]
    grads = {**grads, dec: g - mx.sum(g * w, axis=1)[:, None] * w}
    clip = _clip(sum(mx.sum(mx.square(g)) for g in grads.values()), consts)
    new = {"params": {}, "m": {}, "v": {}}
    for key, g in grads.items():
        new["params"][key], new["m"][key], new["v"][key] = _adam(
            params[key], state["m"][key], state["v"][key], g * clip, lr, t, consts.betas)
    new["params"][dec] = _unit_rows(new["params"][dec])
    return new


def _fired_tsf(tsf: mx.array, idx: mx.array, v: mx.array) -> mx.array:
    fired = mx.zeros(tsf.shape, mx.int32).at[idx.reshape(-1)].add(
        (v > 0).reshape(-1).astype(mx.int32)) > 0
    return mx.where(fired, 0, mx.minimum(tsf + idx.shape[0], _TSF_CAP))


def reference_step(state: dict, x: mx.array, lr: mx.array, t: mx.array, num_dead: int,
                   consts: StepConsts) -> tuple[dict, mx.array]:
    """Autodiff step: argpartition top-k, AuxK as sparsify."""
    dead = state["tsf"] > consts.dead_threshold
    k_aux = min(consts.k_aux, num_dead)

    def loss_fn(p):
        w_dec = p[_decoder_key(consts)]
        pre = pre_activations(p, x)
        codes = topk_codes(pre, consts.k, select=argpartition_topk)
        recon = decode_codes(w_dec, codes.values, codes.indices) + p["b_dec"]
        tv = mx.sum(mx.square(x - mx.mean(x, axis=0)))
        fvu = mx.sum(mx.square(recon - x)) / tv
        auxk = mx.array(0.0)
        if k_aux:
            aux = topk_codes(mx.where(dead, pre, -mx.inf), k_aux, select=argpartition_topk)
            e_hat = decode_codes(w_dec, aux.values, aux.indices)
            resid = mx.stop_gradient(x - recon)
            auxk = min(num_dead / consts.k_aux, 1.0) * mx.sum(mx.square(e_hat - resid)) / tv
        l1 = mx.sum(codes.values) / x.shape[0]
        loss = fvu + consts.auxk_coefficient * auxk + consts.l1_coefficient * l1
        return loss, (fvu, auxk, l1, codes)

    (loss, (fvu, auxk, l1, codes)), grads = mx.value_and_grad(loss_fn)(state["params"])
    new = _apply_update(state, grads, lr, t, consts)
    new["tsf"] = _fired_tsf(state["tsf"], codes.indices, codes.values)
    return new, StepMetrics.pack(loss=loss, fvu=fvu, auxk=auxk, l1=l1,
                                 l0=mx.sum(codes.values > 0) / x.shape[0],
                                 dead=mx.sum(new["tsf"] > consts.dead_threshold))


def _decode_residual(w_dec: mx.array, values: mx.array, idx: mx.array, offset: mx.array,
                     coef: mx.array) -> tuple[mx.array, ...]:
    """(resid, g_out, g_values): ``resid = decode + offset``, the loss ``coef / 2 *
    |resid|^2``'s gradient ``g_out = coef * resid`` w.r.t. the decode, and
    ``g_values`` w.r.t. the codes."""
    resid = decode_codes(w_dec, values, idx) + offset
    g_out = coef * resid
    return resid, g_out, decode_codes_vjp(w_dec, idx, g_out)


def _auxk(pre: mx.array, tsf: mx.array, w_dec: mx.array, r: mx.array, coef: mx.array,
          width: int, consts: StepConsts) -> tuple[mx.array, ...]:
    """AuxK over the ``width`` columns of the dead latents only, as dense [n, width]
    codes (unselected and padding columns 0): (cols, codes, g_pre, e, g_e, g_codes)
    with ``e`` AuxK's decode plus ``r`` and ``g_e = coef * e``. Exactly sparsify's
    AuxK: every dead latent when they are at most k_aux, else their top k_aux."""
    h = pre.shape[1]
    ar = mx.arange(h)
    key = mx.sort(mx.where(tsf > consts.dead_threshold, ar, ar + h))[:width]  # dead first
    cols = key % h
    cand = mx.where(key < h, mx.take(pre, cols, axis=1), -mx.inf)
    if width > consts.k_aux:
        pos = block_topk(cand, consts.k_aux)
        cand = mx.put_along_axis(mx.full(cand.shape, -mx.inf), pos,
                                 mx.take_along_axis(cand, pos, axis=1), axis=1)
    codes, w = mx.maximum(cand, 0), w_dec[cols]
    e = codes @ w + r
    g_e = coef * e
    g_codes = g_e @ w.T
    return cols, codes, mx.where(cand > 0, g_codes, 0), e, g_e, g_codes


class _Partial(NamedTuple):
    """One token slice's share of a step: gradient and metric sums over its tokens."""

    g_wenc: mx.array
    """[latents, d_model] encoder weight gradient."""
    g_wdec: mx.array
    """[latents, d_model] decoder weight gradient (before the row projection)."""
    g_benc: mx.array
    """[latents] encoder bias gradient."""
    g_bdec: mx.array
    """Column sum of the reconstruction gradient (b_dec's gradient before the
    encoder-bias term)."""
    proj: mx.array
    """[latents] sum of codes x code gradients: the decoder gradient's component
    along each (unit) decoder row, summed without forming the gradient."""
    fired: mx.array
    """[latents] number of nonzero codes."""
    sums: mx.array
    """[4]: squared residual, squared AuxK error (unscaled), codes, nonzero codes."""


def _slice_grads(p: dict, x: mx.array, tv: mx.array, inv_n: mx.array, tsf: mx.array,
                 aux_width: int, consts: StepConsts) -> _Partial:
    """Hand-written gradients (see module docstring) over one slice of the batch's
    tokens: everything up to the update is a sum over tokens, so the two halves
    of a batch run on the two CPU streams, each from its own encoder matmul."""
    h, k = consts.d_hidden, consts.k
    w_dec = p[_decoder_key(consts)]
    xc = x - p["b_dec"]
    pre = pre_activations(p, x)
    codes = topk_codes(pre, k, select=block_topk)
    idx, v = codes.indices, codes.values
    r, g_r, g_v = _decode_residual(w_dec, v, idx, -xc, 2 / tv)  # r = recon - x
    g_pre = mx.where(codes.selected > 0, g_v + consts.l1_coefficient * inv_n, 0)
    mode = consts.grad_mode or choose_grad_mode(k, h, consts.tied, host=False)
    g_wenc, g_wdec = mlx_weight_grads(idx, g_pre, xc, v, g_r, h, mode)
    flat = idx.reshape(-1)
    g_benc = mx.zeros((h,)).at[flat].add(g_pre.reshape(-1))
    proj = mx.zeros((h,)).at[flat].add((v * g_v).reshape(-1))
    aux_sq = mx.array(0.0)
    if aux_width:
        scale = mx.minimum(mx.sum(tsf > consts.dead_threshold).astype(mx.float32)
                           / consts.k_aux, 1.0)
        coef = 2 * consts.auxk_coefficient * scale / tv
        # e = e_hat - (x - recon): AuxK's decode of the dead latents against the residual
        cols, aux_v, aux_g, e, g_e, g_av = _auxk(pre, tsf, w_dec, r, coef, aux_width, consts)
        aux_sq = mx.sum(mx.square(e))
        g_wenc = g_wenc.at[cols].add(aux_g.T @ xc)  # cols are distinct latents
        g_wdec = g_wdec.at[cols].add(aux_v.T @ g_e)
        g_benc = g_benc.at[cols].add(mx.sum(aux_g, axis=0))
        proj = proj.at[cols].add(mx.sum(aux_v * g_av, axis=0))
    return _Partial(g_wenc, g_wdec, g_benc, mx.sum(g_r, axis=0), proj,
                    mx.zeros((h,), mx.int32).at[flat].add((v > 0).reshape(-1).astype(mx.int32)),
                    mx.stack([mx.sum(mx.square(r)), aux_sq, mx.sum(v),
                              mx.sum(v > 0).astype(mx.float32)]))


def _enc_grads(p: dict, a: _Partial, b: _Partial) -> tuple[dict, mx.array]:
    """The encoder's and biases' gradients from the two halves, and their squared norm."""
    g_benc = a.g_benc + b.g_benc
    g = {"W_enc": a.g_wenc + b.g_wenc, "b_enc": g_benc,
         "b_dec": a.g_bdec + b.g_bdec - g_benc @ p["W_enc"]}
    return g, sum(mx.sum(mx.square(x)) for x in g.values())


def _dec_grad(w: mx.array, a: _Partial, b: _Partial) -> tuple[mx.array, mx.array]:
    """The decoder's gradient without its row-parallel part, and its squared norm."""
    g = a.g_wdec + b.g_wdec - (a.proj + b.proj)[:, None] * w
    return g, mx.sum(mx.square(g))


def _enc_update(state: dict, g: dict, sq_norm: mx.array, lr: mx.array, t: mx.array,
                consts: StepConsts) -> dict:
    clip = _clip(sq_norm, consts)
    return {key: _adam(state["params"][key], state["m"][key], state["v"][key], gk * clip,
                       lr, t, consts.betas) for key, gk in g.items()}


def _dec_update(state: dict, g: mx.array, sq_norm: mx.array, lr: mx.array, t: mx.array,
                consts: StepConsts) -> tuple[mx.array, mx.array, mx.array]:
    w, m, v = _adam(state["params"]["W_dec"], state["m"]["W_dec"], state["v"]["W_dec"],
                    g * _clip(sq_norm, consts), lr, t, consts.betas)
    return _unit_rows(w), m, v


def make_fast_step(consts: StepConsts):
    """The fast step, with the reference step's signature minus consts (``num_dead``
    must be the count of dead latents in ``state["tsf"]``, as the loop passes it).
    Each piece is compiled on its own and placed on a stream here: inside one ``mx.compile`` the
    graph's shared constants join the two streams' work and they run one after the
    other (benchmarks/README.md, "Step profile"). One compiled half-step per AuxK
    width bucket (see StepConsts.aux_width). ``host_step.make_step`` picks this step or
    the C one."""
    if consts.grad_mode == "host":
        raise ValueError("grad_mode='host' is not valid for steps.make_fast_step (MLX ops); "
                         "allowed: segment, dense, None (host_step.make_step runs 'host')")
    s_enc, s_dec = cpu_streams()
    halves: dict[int, object] = {}
    enc_grads, dec_grad = mx.compile(_enc_grads), mx.compile(_dec_grad)
    enc_update = mx.compile(lambda *a: _enc_update(*a, consts))
    dec_update = mx.compile(lambda *a: _dec_update(*a, consts))

    @mx.compile
    def tied_update(state, a, b, lr, t):
        g, _ = _enc_grads(state["params"], a, b)
        g["W_enc"] = g["W_enc"] + a.g_wdec + b.g_wdec
        return _apply_update(state, g, lr, t, consts)

    @mx.compile
    def finish(tsf, a, b, tv, n):
        """tokens-since-fired and the packed metrics."""
        sq_r, sq_e, sum_v, nonzero = a.sums + b.sums
        scale = mx.minimum(mx.sum(tsf > consts.dead_threshold) / max(consts.k_aux, 1), 1.0)
        tsf = mx.where(a.fired + b.fired > 0, 0, mx.minimum(tsf + n, _TSF_CAP))
        fvu, auxk, l1 = sq_r / tv, scale * sq_e / tv, sum_v / n
        loss = fvu + consts.auxk_coefficient * auxk + consts.l1_coefficient * l1
        return tsf, StepMetrics.pack(loss=loss, fvu=fvu, auxk=auxk, l1=l1, l0=nonzero / n,
                                     dead=mx.sum(tsf > consts.dead_threshold))

    def fast_step(state: dict, x: mx.array, lr: mx.array, t: mx.array, num_dead: int):
        width = consts.aux_width(num_dead)
        if width not in halves:
            halves[width] = mx.compile(
                lambda p, xs, tv, inv_n, tsf: _slice_grads(p, xs, tv, inv_n, tsf, width, consts))
        n, p, tsf = x.shape[0], state["params"], state["tsf"]
        if n < 2:  # no two token halves
            return reference_step(state, x, lr, t, num_dead, consts)
        tv = mx.sum(mx.square(x - mx.mean(x, axis=0)))
        inv_n = mx.array(1 / n, mx.float32)
        parts = []
        for s, rows in ((s_enc, slice(0, n // 2)), (s_dec, slice(n // 2, n))):
            with mx.stream(s):
                parts.append(halves[width](p, x[rows], tv, inv_n, tsf))
        a, b = parts
        new = {"params": {}, "m": {}, "v": {}}
        with mx.stream(s_enc):
            new["tsf"], metrics = finish(tsf, a, b, tv, mx.array(n, mx.float32))
            if consts.tied:
                return {**tied_update(state, a, b, lr, t), "tsf": new["tsf"]}, metrics
        with mx.stream(s_enc):
            g_enc, sq_enc = enc_grads(p, a, b)
        with mx.stream(s_dec):
            g_dec, sq_dec = dec_grad(p["W_dec"], a, b)
            updated = {"W_dec": dec_update(state, g_dec, sq_dec + sq_enc, lr, t)}
        with mx.stream(s_enc):
            updated |= enc_update(state, g_enc, sq_enc + sq_dec, lr, t)
        for key, (pk, mk, vk) in updated.items():
            new["params"][key], new["m"][key], new["v"][key] = pk, mk, vk
        return new, metrics

    return fast_step
