"""Train a TopK SAE on activation arrays: schedule, initialization, validation,
metrics, callbacks.

The training loop; the steps it runs (the compiled fast step by default, the
autodiff reference step when ``cfg.fast_step`` is false) and the loss they
minimize are in :mod:`saelab.steps`. Dead latents are revived by AuxK inside
the step (``cfg.auxk``) and/or by :func:`resample_dead` between steps
(``cfg.resample_every``).

Metrics (averaged over the ``log_every`` window unless said):
``train/loss``, ``train/recon_loss`` (the FVU term), ``train/auxk_loss``,
``train/l1_loss`` (mean over tokens of the sum of codes), ``train/l0``,
``train/dead_fraction`` (now: latents not fired in the last
``dead_tokens_threshold`` training tokens), ``train/learning_rate`` (now),
``train/tokens``, ``train/resampled`` (with ``resample_every``: latents
re-initialized in the window). Validation metrics (``val/nmse``, ``val/nmse_p99``,
...; :mod:`saelab.validate`) every ``eval_every`` steps: intermediate evaluations
over ``sae.eval_tokens`` evenly spaced validation rows, the final one over all.

Callbacks may raise :class:`StopTraining` from ``on_eval`` (Optuna pruning);
it propagates to the caller after ``on_abort``. A non-finite loss raises
:class:`TrainingDiverged` (a RuntimeError, not a StopTraining: divergence is a
failure, not a pruning decision) before any SAE is returned.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np

import saelab  # noqa: F401  (OpenBLAS + malloc set-up before mlx.core)
import mlx.core as mx
from tqdm.auto import tqdm

from saelab.accel import blas_threads
from saelab.batches import TrainRows, as_rows
from saelab.config import SAEConfig
from saelab.sae import SAE
from saelab.host_step import make_step
from saelab.steps import StepConsts, StepMetrics, reference_step
from saelab.validate import EVAL_BATCH, token_errors, validators

STAT_SAMPLE = 32_768
"""Tokens sampled for the input scale and the b_dec initialization (as openai)."""

RESAMPLE_SAMPLE = 16_384
"""Training tokens scored to choose the inputs dead latents are resampled toward."""

RESAMPLE_ENCODER_SCALE = 1.0
"""A resampled encoder row's norm as a fraction of the mean alive one. Towards
Monosemanticity used 0.2 (ReLU + L1, where any positive pre-activation fires); a
TopK latent must enter the top k: on tests/test_train.py's data 0.2 left 32% of
latents dead, 0.5 15%, 1.0 12%, and 2.0 diverged."""

TRAIN_METRICS = {"loss": "train/loss", "fvu": "train/recon_loss", "auxk": "train/auxk_loss",
                 "l1": "train/l1_loss", "l0": "train/l0"}
"""StepMetrics fields averaged over the ``log_every`` window -> their logged names."""


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
    start = max(warmup, total_steps - round(cfg.decay_fraction * total_steps))
    p = np.clip((s - start) / max(1, total_steps - start), 0.0, 1.0)
    decay = {"cosine": 0.5 * (1 + np.cos(np.pi * p)), "linear": 1 - p,
             "constant": np.ones_like(p)}[cfg.lr_decay]
    if cfg.lr_decay != "constant":
        decay = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay
    warm = np.minimum(1.0, (s + 1) / warmup) if warmup > 0 else 1.0
    return cfg.learning_rate * np.where(s < warmup, warm, decay)


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


def init_sae(sample: np.ndarray, cfg: SAEConfig, metadata: dict) -> SAE:
    """A fresh SAE with input scale and b_dec estimated from ``sample``, a seeded sample
    of the training rows (``TrainRows.sample``)."""
    d = sample.shape[1]
    sample = np.asarray(sample, dtype=np.float64)
    if not np.isfinite(sample).all():
        raise ValueError("train contains non-finite values (NaN/inf); allowed: finite activations")
    sae = SAE(d, cfg.expansion_factor * d, cfg.k, normalize_input=cfg.normalize_input,
              tied_weights=cfg.tied_weights, metadata=metadata, seed=cfg.seed)
    target = cfg.input_norm_target or math.sqrt(d)
    scale = target / math.sqrt(max(np.mean(np.sum(sample ** 2, axis=1)), 1e-30)) \
        if cfg.normalize_input else 1.0
    sample *= scale
    b_dec = {"geometric_median": geometric_median, "mean": lambda s: s.mean(axis=0),
             "zeros": lambda s: np.zeros(d)}[cfg.b_dec_init](sample)
    sae.input_scale = mx.array(scale, dtype=mx.float32)
    sae.b_dec = mx.array(b_dec, dtype=mx.float32)
    return sae


def resample_dead(state: dict, x: mx.array, k: int, dead_threshold: int,
                  rng: np.random.Generator) -> tuple[dict, np.ndarray]:
    """Re-initialize the dead latents of ``state`` toward badly reconstructed
    inputs (Towards Monosemanticity's resampling); returns (state, their indices).

    Dead: not fired in ``dead_threshold`` tokens. Each takes one token of the
    normalized sample ``x`` [n, d_model], drawn with probability proportional to
    the square of its squared reconstruction error, and its unit direction from
    ``b_dec``: the decoder row becomes that direction, the encoder row the
    direction times RESAMPLE_ENCODER_SCALE x the mean alive encoder-row norm
    (tied weights: the unit direction), the encoder bias 0; those rows' Adam
    moments and tokens-since-fired are reset."""
    tsf = np.array(state["tsf"])
    dead = np.flatnonzero(tsf > dead_threshold)
    if not len(dead):
        return state, dead
    p = state["params"]
    err = np.concatenate([np.array(token_errors(p, x[lo:lo + EVAL_BATCH], k)[0], np.float64)
                          for lo in range(0, x.shape[0], EVAL_BATCH)])
    weight = err ** 2
    prob = weight / weight.sum() if weight.sum() > 0 else None  # None: uniform
    pick = rng.choice(len(err), size=len(dead), replace=len(dead) > np.count_nonzero(weight),
                      p=prob)
    direction = np.array(x[mx.array(pick)] - p["b_dec"], np.float64)
    direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-12)
    if "W_dec" in p:
        alive = np.setdiff1d(np.arange(len(tsf)), dead)
        enc_norm = np.linalg.norm(np.array(p["W_enc"])[alive], axis=1).mean() if len(alive) else 1.0
        rows = {"W_dec": direction, "W_enc": direction * RESAMPLE_ENCODER_SCALE * enc_norm}
    else:  # tied: W_enc is the decoder too, with unit rows
        rows = {"W_enc": direction}
    rows["b_enc"] = 0.0
    new = {"params": dict(p), "m": dict(state["m"]), "v": dict(state["v"])}
    for key, value in rows.items():
        for part, fill in (("params", value), ("m", 0.0), ("v", 0.0)):
            a = np.array(new[part][key])
            a[dead] = fill
            new[part][key] = mx.array(a)
    tsf[dead] = 0
    return {**state, **new, "tsf": mx.array(tsf)}, dead


def _resample(state: dict, train: TrainRows, scale: float, cfg: SAEConfig,
              step: int) -> tuple[dict, np.ndarray]:
    """resample_dead toward a seeded sample of RESAMPLE_SAMPLE training tokens."""
    rng = np.random.default_rng([cfg.seed, 2, step])
    x = mx.array(np.asarray(train.sample(RESAMPLE_SAMPLE, rng), dtype=np.float32)) * scale
    return resample_dead(state, x, cfg.k, cfg.dead_tokens_threshold, rng)


def _check_inputs(train: np.ndarray, val: np.ndarray, cfg: SAEConfig) -> None:
    for name, a in (("train", train), ("val", val)):
        if a.ndim != 2 or a.shape[0] == 0 or not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"{name} has shape {a.shape} and dtype {a.dtype}; allowed: "
                             "a non-empty 2-D float array [tokens, d_model]")
    if train.shape[1] != val.shape[1]:
        raise ValueError(f"val width {val.shape[1]} != train width {train.shape[1]}")
    cfg.check_dims(train.shape[1])


def train_sae_on_arrays(train: np.ndarray | TrainRows, val: np.ndarray, cfg: SAEConfig, *,
                        metadata: dict, callbacks: Sequence[Callback] = (),
                        progress: bool = True,
                        eval_hook: Callable[[SAE], dict] | None = None) -> tuple[SAE, dict]:
    """Train an SAE on ``train`` [N, d] (an array, or ``saelab.batches.EntryRows``: a
    cache entry read out of core), validate on ``val`` (in RAM).

    ``eval_hook(sae)`` (the SAE holding the current weights) returns more metrics for
    each evaluation, merged before the ``on_eval`` callbacks see them (the downstream
    metrics of ``sae.downstream_eval=every``); its time is left out of
    ``train/tokens_per_second``, which counts from the first batch ready (out of core,
    the shuffle buffer's first fill is a load, as reading ``train`` into RAM is).

    Returns the SAE (metadata filled in: training tokens, steps, final
    metrics, config) and the final metrics."""
    train = as_rows(train)
    _check_inputs(train, val, cfg)
    n, d = train.shape
    total = math.ceil((cfg.train_tokens or cfg.num_epochs * n) / cfg.batch_size)
    eval_every = cfg.eval_every or max(1, math.ceil(total / 8))
    lrs = lr_schedule(cfg, total)
    sae = init_sae(train.sample(STAT_SAMPLE, np.random.default_rng([cfg.seed, 1])), cfg, metadata)
    scale = float(sae.input_scale.item())
    validate, validate_all = validators(
        val, scale, cfg.eval_tokens or max(1024, total * cfg.batch_size // 200))
    consts = StepConsts.from_config(cfg, d, sae.d_hidden)
    fast = make_step(consts) if cfg.fast_step else None

    params = dict(sae.trainable_parameters())
    state = {"params": params, "m": {k: mx.zeros_like(p) for k, p in params.items()},
             "v": {k: mx.zeros_like(p) for k, p in params.items()},
             "tsf": mx.zeros((sae.d_hidden,), mx.int32)}
    run_config = {**cfg.to_dict(), **metadata, "d_model": d, "d_hidden": sae.d_hidden,
                  "train_activations": n, "val_activations": val.shape[0],
                  "total_steps": total, "input_scale": scale}
    for cb in callbacks:
        cb.on_start(run_config)

    window, num_dead, last_val, hook_s = np.zeros(len(TRAIN_METRICS)), 0, {}, 0.0
    reborn_in_window = 0
    bar = tqdm(total=total, desc="Training", disable=not progress, dynamic_ncols=True)
    try:
        batches = train.batches(cfg.batch_size, cfg.seed)
        x = mx.array(next(batches)) * scale
        start = time.perf_counter()
        for step in range(total):
            lr, t = mx.array(lrs[step], mx.float32), mx.array(step + 1, mx.float32)
            with blas_threads(1 if fast is not None else None):  # it splits work itself
                state, out = (fast(state, x, lr, t, num_dead) if fast is not None
                              else reference_step(state, x, lr, t, num_dead, consts))
                mx.async_eval(state, out)
                if step + 1 < total:  # gather the next batch while the step runs
                    x = mx.array(next(batches)) * scale
                got = StepMetrics.read(out)
            if not all(math.isfinite(v) for v in got):
                raise TrainingDiverged(
                    f"loss became {got.loss} at step {step + 1} (learning_rate={lrs[step]:.3g}); "
                    "lower learning_rate or check the activations for NaN/inf")
            window += [getattr(got, f) for f in TRAIN_METRICS]
            num_dead = int(got.dead)
            bar.update(1)
            done = step + 1
            # until the last resample_every steps: a reborn latent then has as many steps to
            # train as a dead one had to die (on the reference recipe no latent was dead in
            # the first 225 of 977 steps, and a first-half-only rule never fired)
            if cfg.resample_every and done % cfg.resample_every == 0 and \
                    done + cfg.resample_every <= total:
                state, reborn = _resample(state, train, scale, cfg, done)
                num_dead -= len(reborn)
                reborn_in_window += len(reborn)
            if done % cfg.log_every == 0 or done == total:
                count = (done - 1) % cfg.log_every + 1
                metrics = dict(zip(TRAIN_METRICS.values(), (window / count).tolist()))
                metrics |= {"train/dead_fraction": num_dead / sae.d_hidden,
                            "train/learning_rate": float(lrs[step]),
                            "train/tokens": done * cfg.batch_size}
                if cfg.resample_every:
                    metrics["train/resampled"], reborn_in_window = reborn_in_window, 0
                window[:] = 0
                bar.set_postfix_str(f"loss={metrics['train/loss']:.3f}, "
                                    f"l0={metrics['train/l0']:.1f}, "
                                    f"dead={100 * metrics['train/dead_fraction']:.1f}%")
                for cb in callbacks:
                    cb.on_log(done, metrics)
            if done % eval_every == 0 or done == total:
                last_val = (validate_all if done == total else validate)(
                    state["params"], cfg.k, cfg.l1_coefficient)
                if not math.isfinite(last_val["val/nmse"]):
                    raise TrainingDiverged(f"val/nmse became {last_val['val/nmse']} at step {done}")
                if eval_hook is not None:
                    t_hook = time.perf_counter()
                    sae.update(state["params"])
                    last_val = {**last_val, **eval_hook(sae)}
                    hook_s += time.perf_counter() - t_hook
                for cb in callbacks:
                    cb.on_eval(done, last_val)
    except BaseException as e:
        for cb in callbacks:  # on_abort is optional for duck-typed callbacks
            if hasattr(cb, "on_abort"):
                cb.on_abort(getattr(e, "reason", None) or f"{type(e).__name__}: {e}")
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - start - hook_s
    final = {**last_val, **metrics, "train/steps": total,
             "train/tokens_per_second": total * cfg.batch_size / seconds}
    sae.update(state["params"])
    sae.update_metadata(training_tokens=total * cfg.batch_size, training_steps=total,
                        metrics=final, config=cfg.to_dict(), saelab_version=saelab.__version__)
    for cb in callbacks:
        cb.on_end(final)
    return sae, final
