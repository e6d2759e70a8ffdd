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
re-initialized in the window). Validation over every validation token: ``val/mse`` (raw
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
from typing import Callable, Sequence

import numpy as np

import saelab  # noqa: F401  (OpenBLAS + malloc set-up before mlx.core)
import mlx.core as mx
from tqdm.auto import tqdm

from saelab.accel import blas_threads
from saelab.batches import TrainRows, as_rows
from saelab.config import SAEConfig
from saelab.sae import SAE, decode_codes, pre_activations, topk_codes
from saelab.steps import StepConsts, StepMetrics, make_fast_step, reference_step

STAT_SAMPLE = 32_768
"""Tokens sampled for the input scale and the b_dec initialization (as openai)."""

EVAL_BATCH = 1024
"""Rows per validation chunk (at most). As fast as 4096 per token (x8 k32, x16 k128)
and a quarter of the memory: a chunk's [rows, k, d_model] decoder gather is 75 MB."""

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
    target = cfg.input_norm_target or math.sqrt(d)
    scale = target / math.sqrt(max(np.mean(np.sum(sample ** 2, axis=1)), 1e-30)) \
        if cfg.normalize_input else 1.0
    sample *= scale
    b_dec = {"geometric_median": geometric_median, "mean": lambda s: s.mean(axis=0),
             "zeros": lambda s: np.zeros(d)}[cfg.b_dec_init](sample)
    sae.input_scale = mx.array(scale, dtype=mx.float32)
    sae.b_dec = mx.array(b_dec, dtype=mx.float32)
    return sae


def _token_errors(params: dict, x: mx.array, k: int) -> tuple[mx.array, mx.array, mx.array]:
    """(squared reconstruction error per token, code values, code indices) of normalized x."""
    w_dec = params.get("W_dec", params["W_enc"])
    v, idx, _ = topk_codes(pre_activations(params, x), k)
    return mx.sum(mx.square(decode_codes(w_dec, v, idx) + params["b_dec"] - x), axis=1), v, idx


def _chunk_sums(params: dict, x: mx.array, weights: mx.array, k: int) -> tuple:
    """Sums over one validation chunk, padding rows weighted 0: squared error
    (all tokens, lowest-norm 99%), nonzero codes (int), code sum, and per-latent
    firing counts (int). Fixed-shape chunks, so compiled once per (shape, k)."""
    err, v, idx = _token_errors(params, x, k)
    on = (v > 0) & (weights[:, :1] > 0)
    fired = mx.zeros((params["b_enc"].shape[0],), mx.int32).at[idx.reshape(-1)].add(
        on.reshape(-1).astype(mx.int32))
    return (mx.sum(err[:, None] * weights, axis=0), mx.sum(on.astype(mx.int32)),
            mx.sum(v * weights[:, :1]), fired)


_eval_chunk = mx.compile(_chunk_sums)  # module level: trials in one process share its graphs


def _total_variance(x: np.ndarray, mask: np.ndarray | None, chunk: int) -> float:
    """Sum of squared deviations from the mean of the (masked) rows, in float64 chunks."""
    def rows(lo: int) -> np.ndarray:
        c = x[lo:lo + chunk] if mask is None else x[lo:lo + chunk][mask[lo:lo + chunk]]
        return c.astype(np.float64)

    starts = range(0, len(x), chunk)
    mean = sum(rows(lo).sum(axis=0) for lo in starts) / (len(x) if mask is None else mask.sum())
    return float(sum(np.sum((rows(lo) - mean) ** 2) for lo in starts))


class _Validator:
    """Validation metrics over all validation tokens.

    Built once per run: the float64 statistics (means, total variances, the
    99%-lowest-norm mask), and the normalized float32 validation set in
    fixed ``EVAL_BATCH``-row chunks (the last one zero-padded, its padding
    weighted 0). An evaluation schedules chunk after chunk without waiting
    (memory: about one chunk's intermediates), accumulating on the device, and
    reads the host values once at the end."""

    def __init__(self, val: np.ndarray, scale: float, max_chunk: int = EVAL_BATCH):
        n = len(val)
        self.n, self.d, self.scale = n, val.shape[1], scale
        # equal chunks of at most max_chunk rows (a multiple of 8): little padding
        chunk = 8 * math.ceil(n / math.ceil(n / max_chunk) / 8)
        pad = -n % chunk
        xs = np.zeros((n + pad, self.d), np.float32)
        for lo in range(0, n, chunk):
            xs[:n][lo:lo + chunk] = np.asarray(val[lo:lo + chunk], np.float32) * np.float32(scale)
        norms = np.linalg.norm(xs[:n], axis=1)
        if not np.isfinite(norms).all():
            raise ValueError("val contains non-finite values (NaN/inf); allowed: finite activations")
        p99 = norms <= np.quantile(norms, 0.99)
        self.tv, self.tv_p99 = (_total_variance(xs[:n], m, chunk) for m in (None, p99))
        # weights[:, 0]: a real token (not padding); weights[:, 1]: a lowest-norm-99% token
        weights = np.zeros((n + pad, 2), np.float32)
        weights[:n, 0], weights[:n, 1] = 1.0, p99
        self.chunks = [(mx.array(xs[lo:lo + chunk]), mx.array(weights[lo:lo + chunk]))
                       for lo in range(0, n + pad, chunk)]
        mx.eval(self.chunks)

    def __call__(self, params: dict, k: int, l1_coefficient: float) -> dict:
        err = l0 = l1 = fired = 0
        for x, w in self.chunks:
            c_err, c_l0, c_l1, c_fired = _eval_chunk(params, x, w, k)
            err, l0, l1, fired = err + c_err, l0 + c_l0, l1 + c_l1, fired + c_fired
            # scheduled chunk by chunk (no wait): one lazy graph over all chunks kept
            # every chunk's B x M pre-activations alive at once (+2.6 GB at 32k tokens, x16)
            mx.async_eval(err, l0, l1, fired)
        dead = mx.mean(fired == 0)
        mx.eval(err, l0, l1, dead)  # the one wait of an evaluation
        (err_all, err_p99), l0, l1, dead = err.tolist(), l0.item(), l1.item(), dead.item()
        n, d = self.n, self.d
        nmse = err_all / self.tv
        return {"val/loss": nmse + l1_coefficient * l1 / n,
                "val/mse": err_all / (n * d) / self.scale ** 2,
                "val/nmse": nmse, "val/nmse_p99": err_p99 / self.tv_p99,
                "val/explained_variance": 1.0 - nmse, "val/l0": l0 / n,
                "val/dead_fraction": dead}


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
    err = np.concatenate([np.array(_token_errors(p, x[lo:lo + EVAL_BATCH], k)[0], np.float64)
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
    ``train/tokens_per_second``.

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

    window, num_dead, last_val, hook_s = np.zeros(len(TRAIN_METRICS)), 0, {}, 0.0
    reborn_in_window = 0
    bar = tqdm(total=total, desc="Training", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        batches = train.batches(cfg.batch_size, cfg.seed)
        x = mx.array(next(batches)) * scale
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
                last_val = validate(state["params"], cfg.k, cfg.l1_coefficient)
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
