"""Train a TopK SAE on activation arrays: schedule, initialization, validation,
metrics, callbacks.

The training loop; the steps it runs (the compiled fast step by default, the
autodiff reference step when ``cfg.fast_step`` is false) and the loss they
minimize are in :mod:`saelab.steps`.

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
from typing import Sequence

import numpy as np

import saelab  # noqa: F401  (OpenBLAS + malloc set-up before mlx.core)
import mlx.core as mx
from tqdm.auto import tqdm

from saelab.batches import TrainRows, as_rows
from saelab.config import SAEConfig
from saelab.sae import SAE, decode_codes, pre_activations, topk_codes
from saelab.steps import StepConsts, StepMetrics, make_fast_step, reference_step

STAT_SAMPLE = 32_768
"""Tokens sampled for the input scale and the b_dec initialization (as openai)."""

EVAL_BATCH = 4096

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
    p = np.clip((s - warmup) / max(1, total_steps - warmup), 0.0, 1.0)
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
        pre = pre_activations(params, x)
        v, idx, _ = topk_codes(pre, k)
        recon = decode_codes(w_dec, v, idx) + params["b_dec"]
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
                        progress: bool = True) -> tuple[SAE, dict]:
    """Train an SAE on ``train`` [N, d] (an array, or ``saelab.batches.EntryRows``: a
    cache entry read out of core), validate on ``val`` (in RAM).

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

    window, num_dead, last_val = np.zeros(len(TRAIN_METRICS)), 0, {}
    bar = tqdm(total=total, desc="Training", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        batches = train.batches(cfg.batch_size, cfg.seed)
        x = mx.array(next(batches)) * scale
        for step in range(total):
            lr, t = mx.array(lrs[step], mx.float32), mx.array(step + 1, mx.float32)
            if fast is not None:
                state, out = fast(state, x, lr, t, num_dead)
            else:
                state, out = reference_step(state, x, lr, t, num_dead, consts)
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
            if done % cfg.log_every == 0 or done == total:
                count = (done - 1) % cfg.log_every + 1
                metrics = dict(zip(TRAIN_METRICS.values(), (window / count).tolist()))
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
