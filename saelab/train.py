"""Train a TopK SAE on activation arrays: schedule, AuxK, metrics, callbacks.

Two interchangeable steps give the same update from the same state and batch
(tested): ``reference_step`` (autodiff + argpartition, uncompiled) and the
default fast step (``make_fast_step``: hand-written gradients, block
top-k, gather decode, one ``mx.compile`` including Adam). Both minimize

    loss = FVU + auxk_coefficient * AuxK + l1_coefficient * L1

with FVU = sum of squared errors / sum of squared deviations of the batch
from its mean (sparsify's normalized MSE), in the SAE's normalized space.

Metrics (averaged over the ``log_every`` window unless said):
``train/loss``, ``train/recon_loss`` (the FVU term), ``train/auxk_loss``,
``train/l1_loss`` (mean over tokens of the sum of codes), ``train/l0``,
``train/dead_fraction`` (now: latents not fired in the last
``dead_tokens_threshold`` training tokens), ``train/learning_rate`` (now),
``train/tokens``. Validation over every validation token: ``val/mse`` (raw
units, per element), ``val/nmse`` (squared error / squared deviation from the
validation mean, i.e. fraction of variance unexplained), ``val/nmse_p99``
(the same over the 99% of tokens with the lowest norm, re-centred),
``val/explained_variance`` (1 - nmse), ``val/loss`` (nmse + l1 term),
``val/l0``, ``val/dead_fraction`` (latents that never fire on the whole
validation set).

Callbacks may raise :class:`StopTraining` from ``on_eval`` (Optuna pruning);
it propagates to the caller after ``on_abort``. A non-finite loss raises
:class:`TrainingDiverged` (a RuntimeError, not a StopTraining: divergence is a
failure, not a pruning decision) before any SAE is returned.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

import saelab  # noqa: F401  (OpenBLAS + malloc set-up before mlx.core)
import mlx.core as mx
from tqdm.auto import tqdm

from saelab.config import SAEConfig
from saelab.sae import SAE
from saelab.topk import argpartition_topk, fast_topk

STAT_SAMPLE = 32_768
"""Tokens sampled for the input scale and the b_dec initialization (as openai)."""

EVAL_BATCH = 4096


class StopTraining(Exception):
    """Raised by a callback to end training early (e.g. an Optuna prune)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; no SAE is produced."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Callback:
    """Hooks into training; every method is a no-op by default."""

    def on_start(self, config: dict) -> None: ...

    def on_log(self, step: int, metrics: dict) -> None: ...

    def on_eval(self, step: int, metrics: dict) -> None:
        """May raise StopTraining(reason)."""

    def on_end(self, metrics: dict) -> None: ...

    def on_abort(self, reason: str) -> None:
        """Training stopped (StopTraining, divergence or an error) before on_end."""


def lr_schedule(cfg: SAEConfig, total_steps: int) -> np.ndarray:
    """Learning rate at each step: linear warm-up, then cosine/linear decay or constant."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(
        cfg.warmup_fraction * total_steps)
    s = np.arange(total_steps, dtype=np.float64)
    p = np.clip((s - warmup) / max(1, total_steps - warmup), 0.0, 1.0)
    decay = {"cosine": 0.5 * (1 + np.cos(np.pi * p)), "linear": 1 - p,
             "constant": np.ones_like(p)}[cfg.lr_decay]
    if cfg.lr_decay != "constant":
        decay = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay
    warm = np.minimum(1.0, (s + 1) / warmup) if warmup > 0 else 1.0
    return cfg.learning_rate * np.where(s < warmup, warm, decay)


def _batches(n: int, batch_size: int, steps: int, seed: int) -> Iterator[np.ndarray]:
    """Sorted row indices of each batch: consecutive slices of per-epoch shuffles."""
    epoch, perm, pos = 0, np.random.default_rng([seed, 0]).permutation(n), 0
    for _ in range(steps):
        parts, need = [], batch_size
        while need:
            take = perm[pos:pos + need]
            parts.append(take)
            need -= len(take)
            pos += len(take)
            if pos == n:
                epoch += 1
                perm, pos = np.random.default_rng([seed, epoch]).permutation(n), 0
        yield np.sort(np.concatenate(parts))  # sorted: memmap locality


def geometric_median(x: np.ndarray, iters: int = 100, tol: float = 1e-7) -> np.ndarray:
    """Weiszfeld's algorithm in float64."""
    y = x.mean(axis=0)
    for _ in range(iters):
        w = 1.0 / np.maximum(np.linalg.norm(x - y, axis=1), 1e-12)
        y_new = (w[:, None] * x).sum(axis=0) / w.sum()
        if np.linalg.norm(y_new - y) <= tol * max(1.0, np.linalg.norm(y)):
            return y_new
        y = y_new
    return y


def init_sae(train: np.ndarray, cfg: SAEConfig, metadata: dict) -> SAE:
    """A fresh SAE with input scale and b_dec estimated from a seeded data sample."""
    n, d = train.shape
    rng = np.random.default_rng([cfg.seed, 1])
    rows = np.sort(rng.choice(n, size=min(n, STAT_SAMPLE), replace=False))
    sample = np.asarray(train[rows], dtype=np.float64)
    if not np.isfinite(sample).all():
        raise ValueError("train contains non-finite values (NaN/inf); allowed: finite activations")
    sae = SAE(d, cfg.expansion_factor * d, cfg.k, normalize_input=cfg.normalize_input,
              tied_weights=cfg.tied_weights, metadata=metadata, seed=cfg.seed)
    scale = math.sqrt(d / max(np.mean(np.sum(sample ** 2, axis=1)), 1e-30)) \
        if cfg.normalize_input else 1.0
    sample *= scale
    b_dec = {"geometric_median": geometric_median, "mean": lambda s: s.mean(axis=0),
             "zeros": lambda s: np.zeros(d)}[cfg.b_dec_init](sample)
    sae.input_scale = mx.array(scale, dtype=mx.float32)
    sae.b_dec = mx.array(b_dec, dtype=mx.float32)
    return sae


class _Validator:
    """Validation metrics over all validation tokens. Statistics (mean, norms,
    variances) are computed once, in float64 chunks, so a large (memmap)
    validation set is never held in memory whole."""

    def __init__(self, val: np.ndarray, scale: float):
        self.val, self.scale = val, scale
        norms = np.concatenate([np.linalg.norm(c, axis=1) for c in self._chunks()])
        if not np.isfinite(norms).all():
            raise ValueError("val contains non-finite values (NaN/inf); allowed: finite activations")
        self.p99 = norms <= np.quantile(norms, 0.99)
        mean = sum(c.sum(axis=0) for c in self._chunks()) / len(norms)
        mean_p99 = sum(c[m].sum(axis=0) for c, m in self._chunks(self.p99)) / self.p99.sum()
        self.tv = sum(float(np.sum((c - mean) ** 2)) for c in self._chunks())
        self.tv_p99 = sum(float(np.sum((c[m] - mean_p99) ** 2))
                          for c, m in self._chunks(self.p99))
        self._fn = mx.compile(self._batch)

    def _chunks(self, mask: np.ndarray | None = None):
        """Normalized float64 chunks of the validation set (with the mask's slice)."""
        for lo in range(0, len(self.val), EVAL_BATCH):
            chunk = np.asarray(self.val[lo:lo + EVAL_BATCH], dtype=np.float64) * self.scale
            yield chunk if mask is None else (chunk, mask[lo:lo + EVAL_BATCH])

    @staticmethod
    def _batch(params: dict, x: mx.array, k: int) -> tuple:
        w_dec = params.get("W_dec", params["W_enc"])
        pre = (x - params["b_dec"]) @ params["W_enc"].T + params["b_enc"]
        idx = fast_topk(pre, k)
        v = mx.maximum(mx.take_along_axis(pre, idx, axis=1), 0)
        recon = (v[:, None, :] @ w_dec[idx])[:, 0, :] + params["b_dec"]
        fired = mx.zeros((pre.shape[1],), mx.int32).at[idx.reshape(-1)].add(
            (v > 0).reshape(-1).astype(mx.int32))
        return mx.sum(mx.square(recon - x), axis=1), mx.sum(v > 0), mx.sum(v), fired

    def __call__(self, params: dict, k: int, l1_coefficient: float) -> dict:
        n, d = self.val.shape
        errs, l0, l1, fired = [], 0.0, 0.0, None
        for lo in range(0, n, EVAL_BATCH):
            x = mx.array(np.asarray(self.val[lo:lo + EVAL_BATCH], dtype=np.float32)) * self.scale
            err, b_l0, b_l1, b_fired = self._fn(params, x, k)
            mx.eval(err, b_l0, b_l1, b_fired)
            errs.append(np.array(err, dtype=np.float64))
            l0, l1 = l0 + b_l0.item(), l1 + b_l1.item()
            fired = b_fired if fired is None else fired + b_fired
        err = np.concatenate(errs)
        nmse = float(err.sum() / self.tv)
        return {"val/loss": nmse + l1_coefficient * l1 / n,
                "val/mse": float(err.sum() / (n * d) / self.scale ** 2),
                "val/nmse": nmse, "val/nmse_p99": float(err[self.p99].sum() / self.tv_p99),
                "val/explained_variance": 1.0 - nmse, "val/l0": l0 / n,
                "val/dead_fraction": float(mx.mean(fired == 0).item())}


# ---------------------------------------------------------------------------
# Training steps. State: {"params", "m", "v" (Adam moments), "tsf" (tokens
# since each latent last fired)}. A step returns (state, metrics) with metrics
# = [loss, fvu, auxk, l1, l0, dead latents after the step].

ADAM_EPS = 1e-8
_TSF_CAP = 2**30  # tokens-since-fired saturates here (int32)


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
    grad_mode: str
    """Weight-gradient form: ``dense`` (BLAS matmul), ``scatter`` or ``segment``."""

    @classmethod
    def from_config(cls, cfg: SAEConfig, d_model: int, d_hidden: int,
                    grad_mode: str | None = None) -> "StepConsts":
        return cls(k=cfg.k, d_hidden=d_hidden,
                   k_aux=min(cfg.k_aux or d_model // 2, d_hidden) if cfg.auxk else 0,
                   auxk_coefficient=cfg.auxk_coefficient,
                   dead_threshold=cfg.dead_tokens_threshold,
                   l1_coefficient=cfg.l1_coefficient, gradient_clip=cfg.gradient_clip,
                   betas=tuple(cfg.adam_betas), tied=cfg.tied_weights,
                   grad_mode=grad_mode or choose_grad_mode(cfg.k))

    def aux_width(self, num_dead: int) -> int:
        """Latents the AuxK top-k selects: all dead ones up to k_aux, in power-of-2
        buckets (>= 16) so only a few step shapes get compiled."""
        if not self.k_aux or not num_dead:
            return 0
        return min(self.k_aux, max(16, 1 << (min(num_dead, self.k_aux) - 1).bit_length()))


def choose_grad_mode(k: int) -> str:
    """Weight-gradient form by shape, from benchmarks/train_step.py (d 576, shared
    2-core CPU): at k 32 the sorted segment-sum beat dense matmuls and scatter-add
    at 4,608 and 18,432 latents (batch 1024 and 4096); at k 128 dense matmuls
    were 1.4-2.4x faster than the segment-sum. A fixed rule, not a timing probe,
    so a run's arithmetic (and result) does not depend on machine load."""
    return "segment" if k < 128 else "dense"


def _decoder_key(consts: StepConsts) -> str:
    return "W_enc" if consts.tied else "W_dec"


def _apply_update(state: dict, grads: dict, lr: mx.array, t: mx.array,
                  consts: StepConsts) -> dict:
    """Shared by both steps: project out the decoder-parallel gradient, clip the
    global norm, Adam (bias-corrected, mlx.optimizers.Adam's arithmetic),
    renormalize decoder rows."""
    params, dec = state["params"], _decoder_key(consts)
    w = params[dec]
    g = grads[dec]
    grads = {**grads, dec: g - mx.sum(g * w, axis=1, keepdims=True) * w}
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
    new["params"][dec] = w / (mx.linalg.norm(w, axis=1, keepdims=True) + 1.1920929e-07)
    return new


def _fired_tsf(tsf: mx.array, idx: mx.array, v: mx.array) -> mx.array:
    fired = mx.zeros(tsf.shape, mx.int32).at[idx.reshape(-1)].add(
        (v > 0).reshape(-1).astype(mx.int32)) > 0
    return mx.where(fired, 0, mx.minimum(tsf + idx.shape[0], _TSF_CAP))


def reference_step(state: dict, x: mx.array, lr: mx.array, t: mx.array, num_dead: int,
                   consts: StepConsts) -> tuple[dict, mx.array]:
    """Autodiff step: argpartition top-k, dense-code decode, AuxK as sparsify."""
    dead = state["tsf"] > consts.dead_threshold
    k_aux = min(consts.k_aux, num_dead)

    def loss_fn(p):
        w_dec = p[_decoder_key(consts)]
        pre = (x - p["b_dec"]) @ p["W_enc"].T + p["b_enc"]
        idx = mx.stop_gradient(argpartition_topk(pre, consts.k))
        v = mx.maximum(mx.take_along_axis(pre, idx, axis=1), 0)
        z = mx.put_along_axis(mx.zeros_like(pre), idx, v, axis=1)
        recon = z @ w_dec + p["b_dec"]
        tv = mx.sum(mx.square(x - mx.mean(x, axis=0)))
        fvu = mx.sum(mx.square(recon - x)) / tv
        auxk = mx.array(0.0)
        if k_aux:
            aidx = mx.stop_gradient(argpartition_topk(mx.where(dead, pre, -mx.inf), k_aux))
            av = mx.maximum(mx.take_along_axis(pre, aidx, axis=1), 0)
            e_hat = mx.put_along_axis(mx.zeros_like(pre), aidx, av, axis=1) @ w_dec
            resid = mx.stop_gradient(x - recon)
            auxk = min(num_dead / consts.k_aux, 1.0) * mx.sum(mx.square(e_hat - resid)) / tv
        l1 = mx.sum(v) / x.shape[0]
        loss = fvu + consts.auxk_coefficient * auxk + consts.l1_coefficient * l1
        return loss, (fvu, auxk, l1, mx.sum(v > 0) / x.shape[0], idx, v)

    (loss, (fvu, auxk, l1, l0, idx, v)), grads = mx.value_and_grad(loss_fn)(state["params"])
    new = _apply_update(state, grads, lr, t, consts)
    new["tsf"] = _fired_tsf(state["tsf"], idx, v)
    dead_after = mx.sum(new["tsf"] > consts.dead_threshold)
    return new, mx.stack([loss, fvu, auxk, l1, l0, dead_after.astype(mx.float32)])


def _weight_grad(idx: mx.array, vals: mx.array, rows: mx.array, h: int, mode: str) -> mx.array:
    """out[l] = sum over (token b, slot j) with idx[b, j] == l of vals[b, j] * rows[b]."""
    n, kk = idx.shape
    if mode == "dense":
        z = mx.zeros((n, h)).at[mx.arange(n)[:, None], idx].add(vals)
        return z.T @ rows
    flat = idx.reshape(-1)
    if mode == "scatter":
        tok = mx.arange(n * kk) // kk
        return mx.zeros((h, rows.shape[1])).at[flat].add(vals.reshape(-1)[:, None] * rows[tok])
    order = mx.argsort(flat)  # segment: sort pairs by latent, one small matmul per latent
    counts = mx.zeros((h,), mx.int32).at[flat].add(1)
    ends = mx.cumsum(counts)
    segments = mx.stack([ends - counts, ends], axis=-1).astype(mx.uint32)
    out = mx.segmented_mm(vals.reshape(-1)[order][None, :], rows[order // kk], segments)
    return out.reshape(h, rows.shape[1])


def _sparse_decode(w: mx.array, idx: mx.array, v: mx.array, g_fn):
    """Decode codes (idx, v) by gathering decoder rows; returns (out, g_v) where
    g_v is the gradient w.r.t. v given the output gradient from ``g_fn(out)``.
    Above 64 codes per token the [tokens, codes, d] gather costs more than
    dense BLAS matmuls, so wide codes (AuxK) go dense."""
    if idx.shape[1] <= 64:
        rows = w[idx]
        out = (v[:, None, :] @ rows)[:, 0, :]
        g_out = g_fn(out)
        return out, g_out, (rows @ g_out[:, :, None])[..., 0]
    z = mx.put_along_axis(mx.zeros((idx.shape[0], w.shape[0])), idx, v, axis=1)
    out = z @ w
    g_out = g_fn(out)
    return out, g_out, mx.take_along_axis(g_out @ w.T, idx, axis=1)


def _fast_grads(p: dict, x: mx.array, tsf: mx.array, aux_width: int, consts: StepConsts):
    """Hand-written gradients of the loss (see module docstring)."""
    n, h, mode = x.shape[0], consts.d_hidden, consts.grad_mode
    w_dec = p[_decoder_key(consts)]
    xc = x - p["b_dec"]
    pre = xc @ p["W_enc"].T + p["b_enc"]
    idx = fast_topk(pre, consts.k)
    pre_k = mx.take_along_axis(pre, idx, axis=1)
    v = mx.maximum(pre_k, 0)
    tv = mx.sum(mx.square(x - mx.mean(x, axis=0)))
    recon, g_r, g_v = _sparse_decode(w_dec, idx, v, lambda out: (2 / tv) * (out + p["b_dec"] - x))
    r = recon + p["b_dec"] - x
    fvu = mx.sum(mx.square(r)) / tv
    l1 = mx.sum(v) / n
    g_pre = mx.where(pre_k > 0, g_v + consts.l1_coefficient / n, 0)
    enc_idx, enc_vals = [idx], [g_pre]
    g_wdec = _weight_grad(idx, v, g_r, h, mode)
    auxk = mx.array(0.0)
    if aux_width:
        dead = tsf > consts.dead_threshold
        scale = mx.minimum(mx.sum(dead).astype(mx.float32) / consts.k_aux, 1.0)
        masked = mx.where(dead, pre, -mx.inf)
        aidx = fast_topk(masked, aux_width)
        a_pre = mx.take_along_axis(masked, aidx, axis=1)  # -inf where not dead -> code 0
        av = mx.maximum(a_pre, 0)
        coef = 2 * consts.auxk_coefficient * scale / tv
        e_hat, g_e, g_av = _sparse_decode(w_dec, aidx, av, lambda out: coef * (out + r))
        auxk = scale * mx.sum(mx.square(e_hat + r)) / tv
        enc_idx.append(aidx)
        enc_vals.append(mx.where(a_pre > 0, g_av, 0))
        g_wdec = g_wdec + _weight_grad(aidx, av, g_e, h, mode)
    all_idx, all_g = mx.concatenate(enc_idx, axis=1), mx.concatenate(enc_vals, axis=1)
    g_benc = mx.zeros((h,)).at[all_idx.reshape(-1)].add(all_g.reshape(-1))
    grads = {"W_enc": _weight_grad(all_idx, all_g, xc, h, mode), "b_enc": g_benc,
             "b_dec": mx.sum(g_r, axis=0) - g_benc @ p["W_enc"]}
    if consts.tied:
        grads["W_enc"] = grads["W_enc"] + g_wdec
    else:
        grads["W_dec"] = g_wdec
    loss = fvu + consts.auxk_coefficient * auxk + consts.l1_coefficient * l1
    return grads, idx, v, mx.stack([loss, fvu, auxk, l1, mx.sum(v > 0) / n])


def make_fast_step(consts: StepConsts):
    """The compiled fast step, with the reference step's signature minus consts.
    One compiled graph per AuxK width bucket (see StepConsts.aux_width)."""
    compiled: dict[int, object] = {}

    def build(aux_width: int):
        def step(state, x, lr, t):
            grads, idx, v, metrics = _fast_grads(state["params"], x, state["tsf"], aux_width,
                                                 consts)
            new = _apply_update(state, grads, lr, t, consts)
            new["tsf"] = _fired_tsf(state["tsf"], idx, v)
            dead_after = mx.sum(new["tsf"] > consts.dead_threshold).astype(mx.float32)
            return new, mx.concatenate([metrics, dead_after[None]])
        return mx.compile(step)

    def fast_step(state: dict, x: mx.array, lr: mx.array, t: mx.array, num_dead: int):
        width = consts.aux_width(num_dead)
        if width not in compiled:
            compiled[width] = build(width)
        return compiled[width](state, x, lr, t)

    return fast_step


def _check_inputs(train: np.ndarray, val: np.ndarray, cfg: SAEConfig) -> None:
    for name, a in (("train", train), ("val", val)):
        if a.ndim != 2 or a.shape[0] == 0 or not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"{name} has shape {a.shape} and dtype {a.dtype}; allowed: "
                             "a non-empty 2-D float array [tokens, d_model]")
    if train.shape[1] != val.shape[1]:
        raise ValueError(f"val width {val.shape[1]} != train width {train.shape[1]}")
    cfg.check_dims(train.shape[1])


def train_sae_on_arrays(train: np.ndarray, val: np.ndarray, cfg: SAEConfig, *,
                        metadata: dict, callbacks: Sequence[Callback] = (),
                        progress: bool = True) -> tuple[SAE, dict]:
    """Train an SAE on ``train`` [N, d] (may be a memmap), validate on ``val``.

    Returns the SAE (metadata filled in: training tokens, steps, final
    metrics, config) and the final metrics."""
    _check_inputs(train, val, cfg)
    n, d = train.shape
    total = math.ceil((cfg.train_tokens or cfg.num_epochs * n) / cfg.batch_size)
    eval_every = cfg.eval_every or max(1, math.ceil(total / 8))
    lrs = lr_schedule(cfg, total)
    sae = init_sae(train, cfg, metadata)
    scale = float(sae.input_scale.item())
    validate = _Validator(val, scale)
    consts = StepConsts.from_config(cfg, d, sae.d_hidden)
    fast = make_fast_step(consts) if cfg.fast_step else None

    params = dict(sae.trainable_parameters())
    state = {"params": params, "m": {k: mx.zeros_like(p) for k, p in params.items()},
             "v": {k: mx.zeros_like(p) for k, p in params.items()},
             "tsf": mx.zeros((sae.d_hidden,), mx.int32)}
    run_config = {**cfg.to_dict(), **metadata, "d_model": d, "d_hidden": sae.d_hidden,
                  "train_activations": n, "val_activations": val.shape[0],
                  "total_steps": total, "input_scale": scale}
    for cb in callbacks:
        cb.on_start(run_config)

    names = ("train/loss", "train/recon_loss", "train/auxk_loss", "train/l1_loss", "train/l0")
    window, num_dead, last_val = np.zeros(len(names)), 0, {}
    bar = tqdm(total=total, desc="Training", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        batches = _batches(n, cfg.batch_size, total, cfg.seed)
        x = mx.array(np.asarray(train[next(batches)], dtype=np.float32)) * scale
        for step in range(total):
            lr, t = mx.array(lrs[step], mx.float32), mx.array(step + 1, mx.float32)
            if fast is not None:
                state, out = fast(state, x, lr, t, num_dead)
            else:
                state, out = reference_step(state, x, lr, t, num_dead, consts)
            mx.async_eval(state, out)
            if step + 1 < total:  # gather the next batch while the step runs
                x = mx.array(np.asarray(train[next(batches)], dtype=np.float32)) * scale
            vals = out.tolist()
            if not all(math.isfinite(v) for v in vals):
                raise TrainingDiverged(
                    f"loss became {vals[0]} at step {step + 1} (learning_rate={lrs[step]:.3g}); "
                    "lower learning_rate or check the activations for NaN/inf")
            window += vals[:5]
            num_dead = int(vals[5])
            bar.update(1)
            done = step + 1
            if done % cfg.log_every == 0 or done == total:
                count = (done - 1) % cfg.log_every + 1
                metrics = dict(zip(names, (window / count).tolist()))
                metrics |= {"train/dead_fraction": num_dead / sae.d_hidden,
                            "train/learning_rate": float(lrs[step]),
                            "train/tokens": done * cfg.batch_size}
                window[:] = 0
                bar.set_postfix_str(f"loss={metrics['train/loss']:.3f}, "
                                    f"l0={metrics['train/l0']:.1f}, "
                                    f"dead={100 * metrics['train/dead_fraction']:.1f}%")
                for cb in callbacks:
                    cb.on_log(done, metrics)
            if done % eval_every == 0 or done == total:
                last_val = validate(state["params"], cfg.k, cfg.l1_coefficient)
                if not math.isfinite(last_val["val/nmse"]):
                    raise TrainingDiverged(f"val/nmse became {last_val['val/nmse']} at step {done}")
                for cb in callbacks:
                    cb.on_eval(done, last_val)
    except BaseException as e:
        for cb in callbacks:  # on_abort is optional for duck-typed callbacks
            if hasattr(cb, "on_abort"):
                cb.on_abort(getattr(e, "reason", None) or f"{type(e).__name__}: {e}")
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    final = {**last_val, **metrics, "train/steps": total,
             "train/tokens_per_second": total * cfg.batch_size / seconds}
    sae.update(state["params"])
    sae.update_metadata(training_tokens=total * cfg.batch_size, training_steps=total,
                        metrics=final, config=cfg.to_dict(), saelab_version=saelab.__version__)
    for cb in callbacks:
        cb.on_end(final)
    return sae, final
