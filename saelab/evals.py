"""Reconstruction and downstream metrics of an SAE on a model and token sequences.

Downstream metrics splice the SAE into the model's forward pass (``saelab.trace``
interventions) over held-out sequences, scoring next-token prediction:

- ``val/ce_loss_clean``: mean cross-entropy (nats) of the unmodified model;
- ``val/ce_loss_spliced``: the component's output replaced by the SAE's reconstruction;
- ``val/ce_loss_ablated``: the component's output set to zero;
- ``val/delta_lm_loss`` = spliced - clean; ``val/ce_loss_score`` =
  (ablated - spliced) / (ablated - clean) (1: as good as the model, 0: as bad as
  removing the component);
- ``val/kl_div``: mean KL(clean || spliced) of the next-token distributions.

Masked tokens (BOS, padding: ``False`` in the packing's mask) are excluded
everywhere: the SAE replaces the output only at real tokens, and a position is
scored only when it and the token it predicts are both real.

What does not depend on the SAE is computed once per (cache entry = model,
layer, component, corpus; validation split; number of sequences) and kept in
``<activation cache root>/.downstream/<key>.npz`` (a dot directory, like the
root's ``.locks``: not an entry): the sequences, the clean and ablated losses,
the clean output of the layer before (so a spliced pass runs only the layers
from the SAE's on: MLX never evaluates the replaced prefix), and for the KL the
clean distribution's negative entropy and expected unembedding
``E_p[W_U]`` per position (exact for a linear head: sum_v p_v log q_v =
h_q . E_p[W_U] - logsumexp(z_q)). A per-trial evaluation is then one partial
forward pass.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

import saelab  # noqa: F401  (OpenBLAS preload before mlx.core)
import mlx.core as mx

from saelab.accel import blas_threads
from saelab.cache import forward_streams
from saelab.fastops import exp
from saelab.paths import atomic_file, atomic_write_text
from saelab.trace import Edit, TracedModel
from saelab.names import activation_name
from saelab.validate import Validator

FORMAT = 1
"""Bump when what a baseline file holds or how it is computed changes."""
BATCH = 4
"""Sequences per forward pass (logits of 4 x 128 tokens x 49k vocab: 100 MB)."""
DOWNSTREAM_METRICS = ("val/ce_loss_clean", "val/ce_loss_spliced", "val/ce_loss_ablated",
                      "val/delta_lm_loss", "val/ce_loss_score", "val/kl_div")


@dataclass
class EvalSet:
    """Token sequences to score: ``tokens`` int32 [n, T] and ``mask`` bool [n, T]."""

    tokens: np.ndarray
    mask: np.ndarray

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2 or self.tokens.shape != self.mask.shape or not self.targets.any():
            raise ValueError(f"eval set: tokens {self.tokens.shape} / mask {self.mask.shape} "
                             "hold no scored position; allowed: sequences with two or more "
                             "consecutive real tokens")

    @property
    def targets(self) -> np.ndarray:
        """bool [n, T-1]: position t is scored (t and t+1 are real tokens)."""
        return self.mask[:, :-1] & self.mask[:, 1:]

    def batches(self, size: int = BATCH):
        for lo in range(0, len(self.tokens), size):
            yield lo, self.tokens[lo:lo + size], self.mask[lo:lo + size]


def eval_set(tokenizer: Any, texts: list[str], context_length: int, n_sequences: int) -> EvalSet:
    """The first ``n_sequences`` packed sequences of ``texts`` (saelab.data's packing)."""
    from saelab.data import pack_documents

    if not texts:
        raise ValueError("dataset: no documents to evaluate on; allowed: a non-empty corpus")
    packed = pack_documents(tokenizer, texts, context_length, n_sequences * context_length)
    return EvalSet(packed.tokens[:n_sequences], packed.mask[:n_sequences])


# ---------------------------------------------------------------- one batch


def _targets(tokens: np.ndarray, mask: np.ndarray) -> tuple[mx.array, mx.array]:
    """Flat indices into [b*(T-1)] of the scored positions, and their next tokens."""
    t = mask[:, :-1] & mask[:, 1:]
    flat = np.flatnonzero(t)
    return mx.array(flat.astype(np.int32)), mx.array(tokens[:, 1:].reshape(-1)[flat])


def _at(x: mx.array, flat: mx.array) -> mx.array:
    """Rows ``flat`` of x[:, :-1] flattened to [b*(T-1), ...]."""
    return x[:, :-1].reshape(-1, x.shape[-1])[flat]


def _vsum(x: mx.array, block: int = 256) -> mx.array:
    """Sum over the last (vocabulary) axis in blocks: MLX's one-pass float32 sum (and its
    logsumexp) over ~50k terms drifts by ~1e-4 relative; blockwise stays near 1e-6."""
    pad = -x.shape[-1] % block
    if pad:
        x = mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return mx.sum(mx.sum(x.reshape(*x.shape[:-1], -1, block), axis=-1), axis=-1)


@mx.compile  # one fused pass per op chain: exp_poly is a dozen element-wise ops
def _logsumexp(z: mx.array) -> mx.array:
    top = z.max(axis=-1, keepdims=True)
    return top[..., 0] + mx.log(_vsum(exp(z - top)))


def _nll(z: mx.array, next_tokens: mx.array) -> tuple[mx.array, mx.array]:
    """(per-position cross-entropy, logsumexp) of logits z [m, V]."""
    lse = _logsumexp(z)
    return lse - mx.take_along_axis(z, next_tokens[:, None], axis=-1)[:, 0], lse


def _masked(mask: np.ndarray, fn: Edit) -> Edit:
    """``fn`` applied at real tokens only (BOS and padding keep the model's own output)."""
    m = mx.array(mask)[..., None]
    return lambda a: mx.where(m, fn(a).astype(a.dtype), a)


class _Pass:
    """The trace set-up shared by every pass over one eval set at one (layer, component)."""

    def __init__(self, model: TracedModel, layer: int, component: str):
        self.model, self.layer = model, layer
        self.name = activation_name(layer, component)
        self.prev = activation_name(layer - 1, "output") if layer > 0 else None
        self.last = activation_name(model.n_layers - 1, "output")

    def run(self, tokens: np.ndarray, mask: np.ndarray, edit: Edit | None,
            prefix: np.ndarray | None):
        """A trace of ``tokens`` with ``edit`` at the component (masked) and the layer
        before replaced by the stored clean ``prefix`` (its layers are then never run)."""
        tr = self.model.trace(mx.array(tokens))
        if prefix is not None and self.prev is not None:
            p = mx.array(prefix)
            tr.intervene(self.prev, lambda a: p.astype(a.dtype))
        if edit is not None:
            tr.intervene(self.name, _masked(mask, edit))
        return tr


# ---------------------------------------------------------------- the SAE-free part


@dataclass
class Baseline:
    """Everything a downstream evaluation needs that does not depend on the SAE."""

    tokens: np.ndarray
    mask: np.ndarray
    clean_ce: float
    ablated_ce: float
    n_targets: int
    prefix: np.ndarray
    """float32 [n, T, d] clean output of the layer before the SAE's ([0, ...] at layer 0)."""
    neg_entropy: np.ndarray
    """float32 [n_targets]: sum_v p log p of the clean next-token distribution."""
    expected_unembed: np.ndarray
    """float32 [n_targets, d]: sum_v p_v W_U[v] (empty when the head is not linear)."""

    @property
    def linear_head(self) -> bool:
        return self.expected_unembed.size > 0


def compute_baseline(model: TracedModel, layer: int, component: str, es: EvalSet) -> Baseline:
    """Clean and ablated losses and the clean terms of the KL over ``es``."""
    p = _Pass(model, layer, component)
    w_u = model.unembedding()
    clean, ablated, prefixes, negents, expected = [], [], [], [], []
    linear = True
    for _, tokens, mask in es.batches():
        flat, nxt = _targets(tokens, mask)
        tr = p.run(tokens, mask, None, None)
        z = _at(tr.logits, flat)
        nll, lse = _nll(z, nxt)
        logp = z - lse[:, None]
        prob = exp(logp)
        h = _at(model.final_norm(tr.activations[p.last]), flat)
        tol = 1e-3 * (1.0 + mx.abs(z).max().item())
        linear &= mx.allclose(h @ w_u.T, z, rtol=1e-4, atol=tol).item()
        prefix = tr.activations[p.prev] if p.prev else mx.zeros((0,))
        ab = p.run(tokens, mask, mx.zeros_like, prefix if p.prev else None)
        ab_nll, _ = _nll(_at(ab.logits, flat), nxt)
        mx.eval(nll, ab_nll, prefix, negent := _vsum(prob * logp),
                exp_u := prob @ w_u)
        clean.append(np.array(nll))
        ablated.append(np.array(ab_nll))
        prefixes.append(np.array(prefix, dtype=np.float32))
        negents.append(np.array(negent))
        expected.append(np.array(exp_u))
    d = model.d_model
    return Baseline(
        es.tokens, es.mask, float(np.concatenate(clean).mean()),
        float(np.concatenate(ablated).mean()), int(es.targets.sum()),
        np.concatenate(prefixes) if p.prev else np.zeros((0, 0, d), np.float32),
        np.concatenate(negents).astype(np.float32),
        np.concatenate(expected).astype(np.float32) if linear else np.zeros((0, d), np.float32))


def baseline_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"format": FORMAT, **fields}, sort_keys=True,
                                     default=str).encode()).hexdigest()


def cached_baseline(path: Path, make_eval_set, model: TracedModel, layer: int,
                    component: str, fields: dict[str, Any]) -> Baseline:
    """The baseline stored at ``path`` (``.npz`` + ``.json``), computed once under a file
    lock by whichever worker gets there first. ``make_eval_set()`` builds the sequences."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_suffix(".lock"))):
        if path.with_suffix(".json").is_file() and path.with_suffix(".npz").is_file():
            with np.load(path.with_suffix(".npz")) as f:
                arrays = {k: f[k] for k in f.files}
            info = json.loads(path.with_suffix(".json").read_text())
            return Baseline(clean_ce=info["clean_ce"], ablated_ce=info["ablated_ce"],
                            n_targets=info["n_targets"], **arrays)
        t0 = time.perf_counter()
        b = compute_baseline(model, layer, component, make_eval_set())
        with atomic_file(path.with_suffix(".npz")) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, tokens=b.tokens, mask=b.mask, prefix=b.prefix,
                         neg_entropy=b.neg_entropy, expected_unembed=b.expected_unembed)
        atomic_write_text(path.with_suffix(".json"), json.dumps(  # written last: complete
            {**fields, "format": FORMAT, "clean_ce": b.clean_ce, "ablated_ce": b.ablated_ce,
             "n_targets": b.n_targets, "n_sequences": len(b.tokens),
             "linear_head": b.linear_head, "seconds": round(time.perf_counter() - t0, 2)},
            indent=2, default=str))
        return b


# ---------------------------------------------------------------- the SAE's part


def _spliced_terms(p: _Pass, model: TracedModel, sae: Any, base: Baseline, a: int, b: int,
                   row: int) -> tuple[mx.array, mx.array]:
    """(per-position cross-entropy, KL(clean || spliced)) of sequences a:b with ``sae``
    spliced in; ``row``: the first of their scored positions in the baseline's arrays."""
    tokens, mask = base.tokens[a:b], base.mask[a:b]
    flat, nxt = _targets(tokens, mask)
    m = int(flat.size)
    prefix = base.prefix[a:b] if p.prev else None
    tr = p.run(tokens, mask, sae, prefix)
    z = _at(tr.logits, flat)
    nll, lse = _nll(z, nxt)
    if base.linear_head:  # sum_v p_v log q_v = h_q . E_p[W_U] - logsumexp(z_q)
        h = _at(model.final_norm(tr.activations[p.last]), flat)
        cross = mx.sum(h * mx.array(base.expected_unembed[row:row + m]), axis=-1) - lse
        return nll, mx.array(base.neg_entropy[row:row + m]) - cross
    # a non-linear head (e.g. logit soft-capping): the clean pass again
    zc = _at(p.run(tokens, mask, None, prefix).logits, flat)
    logp = zc - _logsumexp(zc)[:, None]
    return nll, _vsum(exp(logp) * (logp - (z - lse[:, None])))


def downstream_metrics(model: TracedModel, sae: Any, layer: int, component: str,
                       base: Baseline) -> dict[str, float]:
    """The ``DOWNSTREAM_METRICS`` of ``sae`` (anything mapping raw activations
    [..., d_model] to a reconstruction, e.g. an SAE) spliced in at (layer, component)."""
    p = _Pass(model, layer, component)
    es = EvalSet(base.tokens, base.mask)
    spliced, kl, row, streams = [], [], 0, forward_streams()
    with blas_threads(1 if len(streams) > 1 else None):  # each batch as slices on streams
        for lo, tokens, _ in es.batches():
            terms = []
            for part, stream in zip(np.array_split(np.arange(len(tokens)), len(streams)),
                                    streams, strict=True):
                if not len(part):
                    continue
                a, b = lo + part[0], lo + part[-1] + 1
                with mx.stream(stream):
                    terms.append(_spliced_terms(p, model, sae, base, a, b, row))
                row += int(terms[-1][0].size)
            mx.eval(terms)
            spliced += [np.array(nll) for nll, _ in terms]
            kl += [np.array(kl_b) for _, kl_b in terms]
    ce = float(np.concatenate(spliced).mean())
    gap = base.ablated_ce - base.clean_ce
    return {"val/ce_loss_clean": base.clean_ce, "val/ce_loss_spliced": ce,
            "val/ce_loss_ablated": base.ablated_ce, "val/delta_lm_loss": ce - base.clean_ce,
            "val/ce_loss_score": (base.ablated_ce - ce) / gap if gap != 0 else float("nan"),
            "val/kl_div": float(np.concatenate(kl).mean())}


def reconstruction_metrics(sae: Any, acts: np.ndarray) -> dict[str, float]:
    """The trainer's validation metrics (``val/mse``, ``nmse``, ``nmse_p99``,
    ``explained_variance``, ``l0``, ``dead_fraction``) of ``sae`` on ``acts`` [N, d_model]."""
    if len(acts) == 0:
        raise ValueError("dataset: no activations to evaluate on; allowed: a non-empty corpus")
    params = {k: v for k, v in sae.trainable_parameters().items()}
    metrics = Validator(acts, float(sae.input_scale.item()))(params, sae.k, 0.0)
    metrics.pop("val/loss", None)
    return metrics


# ---------------------------------------------------------------- on a cache entry (trials, `saelab eval`)


def entry_docs(entry: Any, split: str, validation_split: float, seed: int) -> np.ndarray:
    """Document ids of an activation-cache entry: its held-out (``validation``) documents
    under the trial's split, or ``all`` of them."""
    if split == "all":
        return np.unique(entry.docs[:, 0])
    return entry.split(validation_split, seed).val_docs


def corpus_texts(data_cfg: Any, texts: list[str] | None) -> list[str]:
    """The documents an entry's ``doc_ids`` index: the configured corpus, or the caller's
    ``texts`` filtered as the capture filters them."""
    from saelab.data import load_texts

    if texts is None:
        return load_texts(data_cfg)
    return [t.strip() for t in texts if len(t.strip()) >= data_cfg.min_chars]


def entry_downstream(entry: Any, data_cfg: Any, model: TracedModel, sae: Any, *, layer: int,
                     component: str, n_sequences: int, validation_split: float, seed: int,
                     split: str = "validation", texts: list[str] | None = None
                     ) -> dict[str, float]:
    """Downstream metrics over the first ``n_sequences`` sequences of the entry's
    ``split`` documents, with the baseline cached beside the activation cache."""
    fields = {"entry": entry.manifest["key"], "split": split, "n_sequences": n_sequences,
              "validation_split": validation_split if split != "all" else None,
              "seed": seed if split != "all" else None}
    path = entry.path.parent / ".downstream" / baseline_key(fields)[:16]

    def make() -> EvalSet:
        corpus = corpus_texts(data_cfg, texts)
        docs = entry_docs(entry, split, validation_split, seed)
        return eval_set(model.tokenizer, [corpus[d] for d in docs], data_cfg.context_length,
                        n_sequences)

    base = cached_baseline(path, make, model, layer, component, fields)
    return downstream_metrics(model, sae, layer, component, base)
