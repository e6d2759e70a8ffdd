"""The compiled fast TopK step with hand-written gradients, and the autodiff
reference step it is tested against.

Both give the same update from the same state and batch (tested):
``reference_step`` (autodiff + argpartition, uncompiled) and the fast step
(``make_fast_step``: hand-written gradients, block top-k, gather decode,
segment-sum weight gradients, one ``mx.compile`` including Adam, the memory-bound
work split over two CPU streams; block timings in benchmarks/README.md). Both
minimize

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
from saelab.sae import (GATHER_RATIO, decode_codes, decode_codes_vjp, pre_activations,
                        topk_codes)
from saelab.topk import argpartition_topk, cpu_streams

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
    """Weight-gradient form: ``segment`` (sorted segment-sums), ``dense`` (BLAS matmul),
    or None: ``choose_grad_mode`` by the shape of each compiled step (k plus its AuxK
    width)."""

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
        """Latents the AuxK top-k selects: all dead ones up to k_aux, in power-of-2
        buckets (>= 16) so only a few step shapes get compiled."""
        if not self.k_aux or not num_dead:
            return 0
        return min(self.k_aux, max(16, 1 << (min(num_dead, self.k_aux) - 1).bit_length()))


def choose_grad_mode(k: int, d_hidden: int) -> str:
    """Weight-gradient form by shape, for ``k`` gradient pairs per token (top-k plus
    AuxK): the sorted segment-sum costs ~k per token, the dense matmul ~d_hidden;
    the segment-sum wins from ``GATHER_RATIO`` latents per pair,
    the same crossover as the decode's gather (benchmarks/README.md, "Step profile").
    A fixed rule, not a timing probe, so a run's arithmetic (and result) does not
    depend on machine load."""
    return "segment" if k * GATHER_RATIO <= d_hidden else "dense"


def _decoder_key(consts: StepConsts) -> str:
    return "W_enc" if consts.tied else "W_dec"


def _apply_update(state: dict, grads: dict, lr: mx.array, t: mx.array,
                  consts: StepConsts) -> dict:
    """Shared by both steps: project out the decoder-parallel gradient, clip the
    global norm, Adam (bias-corrected, mlx.optimizers.Adam's arithmetic),
    renormalize decoder rows. Per-row scalars are indexed ``[:, None]`` rather
    than kept 2-D: a [rows, 1] operand made by elementwise ops is fused into the
    [rows, d] kernel and recomputed (sqrt and all) for every element. One stream:
    running the decoder's and the encoder's updates on two CPU streams took more
    CPU and wall time (benchmarks/README.md, "Step profile")."""
    params, dec = state["params"], _decoder_key(consts)
    w, g = params[dec], grads[dec]
    grads = {**grads, dec: g - mx.sum(g * w, axis=1)[:, None] * w}
    if consts.gradient_clip > 0:
        norm = mx.sqrt(sum(mx.sum(mx.square(g)) for g in grads.values()))
        clip = mx.minimum(1.0, consts.gradient_clip / (norm + 1e-6))
        grads = {k: g * clip for k, g in grads.items()}
    b1, b2 = consts.betas
    c1 = lr / (1 - b1 ** t)
    c2 = mx.rsqrt(1 - b2 ** t)
    new = {"params": {}, "m": {}, "v": {}}
    for key, g in grads.items():
        m = b1 * state["m"][key] + (1 - b1) * g
        v = b2 * state["v"][key] + (1 - b2) * mx.square(g)
        new["m"][key], new["v"][key] = m, v
        new["params"][key] = params[key] - c1 * m / (mx.sqrt(v) * c2 + ADAM_EPS)
    w = new["params"][dec]
    new["params"][dec] = w / (mx.sqrt(mx.sum(mx.square(w), axis=1)) + 1.1920929e-07)[:, None]
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


class _Pairs(NamedTuple):
    """The (token, latent) pairs a step's weight gradients sum over: each token's
    ``k`` top-k slots, then its AuxK slots (if any)."""

    idx: mx.array
    """[n, kk] latent of each slot."""
    codes: mx.array
    """[n, kk] code values: the decoder gradient's weights."""
    g_pre: mx.array
    """[n, kk] pre-activation gradients: the encoder gradient's weights."""
    row: mx.array
    """[n, kk] row of ``g_out`` each slot's decoder gradient reads: the token for
    top-k slots, ``n`` + the token for AuxK slots."""


def _pairs(idx: mx.array, codes: mx.array, g_pre: mx.array, k: int) -> _Pairs:
    n, kk = idx.shape
    row = mx.arange(n, dtype=mx.uint32)[:, None] + n * (mx.arange(kk) >= k).astype(mx.uint32)
    return _Pairs(idx, codes, g_pre, row)


def _weight_grads(pairs: _Pairs, xc: mx.array, g_out: mx.array, h: int, mode: str
                  ) -> tuple[mx.array, mx.array]:
    """(encoder, decoder) weight gradients: ``enc[l] = sum g_pre * xc[token]`` and
    ``dec[l] = sum codes * g_out[row]`` over the pairs at latent l. ``segment``
    sorts the pairs by latent once for both and runs the two segment-sums on
    the two CPU streams; ``dense`` multiplies scattered [tokens, latents] codes
    (BLAS, both cores)."""
    n, kk = pairs.idx.shape
    if mode == "dense":
        tok = mx.arange(n)[:, None]
        enc = mx.zeros((n, h)).at[tok, pairs.idx].add(pairs.g_pre)  # add: AuxK may repeat a latent
        dec = mx.zeros((g_out.shape[0], h)).at[pairs.row, pairs.idx].add(pairs.codes)
        return enc.T @ xc, dec.T @ g_out
    flat, row = pairs.idx.reshape(-1), pairs.row.reshape(-1)
    order = mx.argsort(flat)
    counts = mx.zeros((h,), mx.int32).at[flat].add(1)
    ends = mx.cumsum(counts)
    segments = mx.stack([ends - counts, ends], axis=-1).astype(mx.uint32)
    enc_stream, dec_stream = cpu_streams()
    with mx.stream(enc_stream):
        enc = mx.segmented_mm(pairs.g_pre.reshape(-1)[order][None], xc[order // kk], segments)
    with mx.stream(dec_stream):
        dec = mx.segmented_mm(pairs.codes.reshape(-1)[order][None], g_out[row[order]], segments)
    return enc.reshape(h, -1), dec.reshape(h, -1)


def _by_halves(fn, *arrays: mx.array) -> tuple[mx.array, ...]:
    """``fn`` over the two token halves of ``arrays`` on the two CPU streams; its
    outputs are joined along the token axis."""
    n = arrays[0].shape[0]
    parts = []
    for s, rows in zip(cpu_streams(), (slice(0, n // 2), slice(n // 2, n)), strict=True):
        with mx.stream(s):
            parts.append(fn(*(a[rows] for a in arrays)))
    return tuple(mx.concatenate(halves, axis=0) for halves in zip(*parts, strict=True))


def _decode_residual(w_dec: mx.array, values: mx.array, idx: mx.array, offset: mx.array,
                     coef: mx.array) -> tuple[mx.array, ...]:
    """(resid, g_out, g_values), token halves on the two CPU streams: ``resid =
    decode + offset``, the loss ``coef / 2 * |resid|^2``'s gradient ``g_out = coef *
    resid`` w.r.t. the decode, and ``g_values`` w.r.t. the codes."""
    def half(v_h, idx_h, offset_h):
        resid = decode_codes(w_dec, v_h, idx_h) + offset_h
        g_out = coef * resid
        return resid, g_out, decode_codes_vjp(w_dec, idx_h, g_out)
    return _by_halves(half, values, idx, offset)


def _fast_grads(p: dict, x: mx.array, tsf: mx.array, aux_width: int, consts: StepConsts):
    """Hand-written gradients of the loss (see module docstring)."""
    n, h, k = x.shape[0], consts.d_hidden, consts.k
    w_dec, b_dec = p[_decoder_key(consts)], p["b_dec"]
    xc = x - b_dec
    pre = pre_activations(p, x)
    codes = topk_codes(pre, k)
    idx, v = codes.indices, codes.values
    tv = mx.sum(mx.square(x - mx.mean(x, axis=0)))
    r, g_r, g_v = _decode_residual(w_dec, v, idx, -xc, 2 / tv)  # r = recon - x
    fvu = mx.sum(mx.square(r)) / tv
    l1 = mx.sum(v) / n
    g_pre = mx.where(codes.selected > 0, g_v + consts.l1_coefficient / n, 0)
    pairs, g_out = _pairs(idx, v, g_pre, k), g_r
    auxk = mx.array(0.0)
    if aux_width:
        dead = tsf > consts.dead_threshold
        scale = mx.minimum(mx.sum(dead).astype(mx.float32) / consts.k_aux, 1.0)
        aux = topk_codes(mx.where(dead, pre, -mx.inf), aux_width)  # -inf where alive -> code 0
        coef = 2 * consts.auxk_coefficient * scale / tv
        # e = e_hat - (x - recon): AuxK's decode of the dead latents against the residual
        e, g_e, g_av = _decode_residual(w_dec, aux.values, aux.indices, r, coef)
        auxk = scale * mx.sum(mx.square(e)) / tv
        pairs = _pairs(mx.concatenate([idx, aux.indices], axis=1),
                       mx.concatenate([v, aux.values], axis=1),
                       mx.concatenate([g_pre, mx.where(aux.selected > 0, g_av, 0)], axis=1), k)
        g_out = mx.concatenate([g_r, g_e], axis=0)
    mode = consts.grad_mode or choose_grad_mode(pairs.idx.shape[1], h)
    g_wenc, g_wdec = _weight_grads(pairs, xc, g_out, h, mode)
    g_benc = mx.zeros((h,)).at[pairs.idx.reshape(-1)].add(pairs.g_pre.reshape(-1))
    grads = {"W_enc": g_wenc, "b_enc": g_benc, "b_dec": mx.sum(g_r, axis=0) - g_benc @ p["W_enc"]}
    if consts.tied:
        grads["W_enc"] = g_wenc + g_wdec
    else:
        grads["W_dec"] = g_wdec
    loss = fvu + consts.auxk_coefficient * auxk + consts.l1_coefficient * l1
    return grads, codes, dict(loss=loss, fvu=fvu, auxk=auxk, l1=l1, l0=mx.sum(v > 0) / n)


def make_fast_step(consts: StepConsts):
    """The compiled fast step, with the reference step's signature minus consts.
    One compiled graph per AuxK width bucket (see StepConsts.aux_width)."""
    compiled: dict[int, object] = {}

    def build(aux_width: int):
        def step(state, x, lr, t):
            grads, codes, metrics = _fast_grads(state["params"], x, state["tsf"], aux_width,
                                                consts)
            new = _apply_update(state, grads, lr, t, consts)
            new["tsf"] = _fired_tsf(state["tsf"], codes.indices, codes.values)
            dead = mx.sum(new["tsf"] > consts.dead_threshold)
            return new, StepMetrics.pack(**metrics, dead=dead)
        return mx.compile(step)

    def fast_step(state: dict, x: mx.array, lr: mx.array, t: mx.array, num_dead: int):
        width = consts.aux_width(num_dead)
        if width not in compiled:
            compiled[width] = build(width)
        return compiled[width](state, x, lr, t)

    return fast_step
