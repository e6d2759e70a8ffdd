"""The TopK sparse autoencoder: encode/decode, save/load, metadata, compatibility.

Architecture (Gao et al. 2024; EleutherAI/sparsify):
``x_n = x * input_scale``; ``pre = (x_n - b_dec) @ W_enc.T + b_enc``;
the k largest pre-activations per token are kept and passed through ReLU;
``x_hat = (codes @ W_dec + b_dec) / input_scale``. Decoder rows have unit norm.

Normalization (SAELens' "expected average only in"): ``input_scale`` is one
scalar chosen so that the mean squared norm of ``x_n`` over the training data
is ``d_model``; the mean is absorbed by ``b_dec``. It is stored with the
weights, so ``encode``/``decode`` take and return raw activations.

L0: exactly k indices are selected per token (ties cannot let more through);
a selected latent whose pre-activation is <= 0 gets code 0 after the ReLU, so
the measured L0 (nonzero codes) is k whenever a token has at least k positive
pre-activations (every token of a trained SAE, in practice) and less otherwise.

On disk, ``path`` (e.g. ``my_sae.mlx``) is a directory holding
``sae.safetensors`` (all arrays, float32) and ``sae.json`` (shape, options,
metadata). Saving writes a temporary sibling directory and renames it into
place; an existing SAE at ``path`` is replaced only after the new one is
complete.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple

import saelab  # noqa: F401  (OpenBLAS + malloc set-up before mlx.core)
import mlx.core as mx
import mlx.nn as nn

from saelab.config import canonical_component
from saelab.paths import atomic_dir
from saelab.topk import fast_topk

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "sae.json"
FORMAT = "saelab.topk_sae"
FORMAT_VERSION = 1

GATHER_RATIO = 64
"""Decode by gathering the active decoder rows when latents >= GATHER_RATIO x codes per
token; below that a dense [tokens, latents] code times the decoder (BLAS) costs less
(crossover measured near 40 latents per code for the decode, 65 for the training
step's weight gradients, which use the same rule: benchmarks/README.md)."""
GATHER_BYTES = 1 << 28
"""At most this many bytes of gathered decoder rows at once: wider decodes gather in
token chunks (a validation batch at k 128 would otherwise gather >1 GB)."""


# -- the one TopK encode/decode: the SAE, the training steps and the validator call these --

class Codes(NamedTuple):
    """The k selected latents of each token."""

    values: mx.array
    """[..., k] codes after the ReLU (a selected latent with pre-activation <= 0 gives 0)."""
    indices: mx.array
    """[..., k] latent indices (unsorted within a token)."""
    selected: mx.array
    """[..., k] the selected pre-activations before the ReLU (their sign gates gradients)."""


def pre_activations(params: dict, x: mx.array) -> mx.array:
    """``(x - b_dec) @ W_enc.T + b_enc`` for normalized ``x`` [n, d_model]. One form
    everywhere: near-ties at the k-th value can flip between algebraically equal forms."""
    return (x - params["b_dec"]) @ params["W_enc"].T + params["b_enc"]


def topk_codes(pre: mx.array, k: int, select: Callable[[mx.array, int], mx.array] = fast_topk
               ) -> Codes:
    """The k largest pre-activations of each row of ``pre`` [n, d_hidden], ReLU'd.
    ``select`` picks the indices (``fast_topk``; the reference step passes argpartition)."""
    idx = mx.stop_gradient(select(pre, k))  # integer indices: no gradient (autodiff needs this)
    selected = mx.take_along_axis(pre, idx, axis=-1)
    return Codes(mx.maximum(selected, 0), idx, selected)


def _gathers(w_dec: mx.array, indices: mx.array) -> bool:
    return indices.shape[-1] * GATHER_RATIO <= w_dec.shape[0]


def _token_chunks(w_dec: mx.array, indices: mx.array) -> list[slice]:
    n, k = indices.shape
    per = max(1, GATHER_BYTES // (k * w_dec.shape[1] * w_dec.itemsize))
    return [slice(lo, min(n, lo + per)) for lo in range(0, n, per)]


def _join(parts: list[mx.array]) -> mx.array:
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)


def decode_codes(w_dec: mx.array, values: mx.array, indices: mx.array) -> mx.array:
    """``sum_j values[:, j] * w_dec[indices[:, j]]`` [n, d_model] (no bias): a gather of
    the active decoder rows, or a dense code times ``w_dec`` for codes too wide to pay."""
    if _gathers(w_dec, indices):
        return _join([(values[rows, None, :] @ w_dec[indices[rows]])[:, 0, :]
                      for rows in _token_chunks(w_dec, indices)])
    dense = mx.put_along_axis(mx.zeros((indices.shape[0], w_dec.shape[0]), values.dtype),
                              indices, values, axis=-1)
    return dense @ w_dec


def decode_codes_vjp(w_dec: mx.array, indices: mx.array, g_out: mx.array) -> mx.array:
    """Gradient of ``decode_codes`` w.r.t. ``values`` given the output gradient ``g_out``.
    Its gathers equal ``decode_codes``' (same chunks), so a compiled step computes them once."""
    if _gathers(w_dec, indices):
        return _join([(w_dec[indices[rows]] @ g_out[rows, :, None])[..., 0]
                      for rows in _token_chunks(w_dec, indices)])
    return mx.take_along_axis(g_out @ w_dec.T, indices, axis=-1)


def _jsonable(obj: Any) -> Any:
    """Plain-JSON copy of metadata (numpy/mlx scalars -> float/int, tuples -> lists)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


class SAE(nn.Module):
    """A TopK sparse autoencoder over ``d_model``-wide activations."""

    def __init__(self, d_model: int, d_hidden: int, k: int, *, normalize_input: bool = True,
                 tied_weights: bool = False, metadata: dict | None = None, seed: int = 0):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_hidden", d_hidden), ("k", k)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is not valid; allowed: an integer >= 1")
        if k > d_hidden:
            raise ValueError(f"k={k} is not valid; allowed: at most d_hidden={d_hidden}")
        self._d_model, self._d_hidden, self._k = d_model, d_hidden, k
        self.normalize_input = normalize_input
        self.tied_weights = tied_weights
        self._metadata = dict(metadata or {})

        # sparsify's init: nn.Linear's U(-1/sqrt(d), 1/sqrt(d)) encoder, zero
        # encoder bias, decoder = the encoder's rows at unit norm.
        bound = 1.0 / math.sqrt(d_model)
        w = mx.random.uniform(-bound, bound, (d_hidden, d_model), key=mx.random.key(seed))
        w_unit = w / mx.linalg.norm(w, axis=1, keepdims=True)
        self.W_enc = w_unit if tied_weights else w
        self.b_enc = mx.zeros((d_hidden,))
        if not tied_weights:
            self.W_dec = w_unit
        self.b_dec = mx.zeros((d_model,))
        self.input_scale = mx.array(1.0)
        """Scalar applied to raw inputs (1.0 when ``normalize_input`` is off)."""
        self.freeze(keys=["input_scale"])

    # -- shape and metadata -------------------------------------------------
    @property
    def d_model(self) -> int:
        return self._d_model

    @property
    def d_hidden(self) -> int:
        return self._d_hidden

    @property
    def k(self) -> int:
        return self._k

    @property
    def decoder_weight(self) -> mx.array:
        """``W_dec`` [d_hidden, d_model], or ``W_enc`` when the weights are tied."""
        return self.W_enc if self.tied_weights else self.W_dec

    @property
    def metadata(self) -> dict:
        """Caller's metadata (model_name, layer, component, training tokens,
        final metrics, config...) plus this SAE's shape and the saelab version."""
        shape = {"d_model": self.d_model, "d_hidden": self.d_hidden, "k": self.k,
                 "expansion_factor": self.d_hidden / self.d_model,
                 "normalize_input": self.normalize_input, "tied_weights": self.tied_weights}
        if self.d_hidden % self.d_model == 0:
            shape["expansion_factor"] = self.d_hidden // self.d_model
        return {**self._metadata, **shape,
                "saelab_version": self._metadata.get("saelab_version", saelab.__version__)}

    def update_metadata(self, **items: Any) -> None:
        self._metadata.update(items)

    # -- forward ------------------------------------------------------------
    def normalize(self, x: mx.array) -> mx.array:
        """Raw activations [..., d_model] -> the SAE's normalized float32 input space."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"input last dimension {x.shape[-1]} != d_model={self.d_model}")
        return x.astype(mx.float32) * self.input_scale

    def pre_activations(self, x: mx.array) -> mx.array:
        """``(x * input_scale - b_dec) @ W_enc.T + b_enc`` for raw ``x`` [..., d_model]."""
        x = self.normalize(x)
        lead = x.shape[:-1]
        pre = pre_activations(self, x.reshape(-1, self.d_model))  # a Module is a dict of its arrays
        return pre.reshape(*lead, self.d_hidden)

    def encode_topk(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """(values, indices), each [..., k]: the k selected latents per token, ReLU'd."""
        pre = self.pre_activations(x)
        lead = pre.shape[:-1]
        codes = topk_codes(pre.reshape(-1, self.d_hidden), self.k)
        return codes.values.reshape(*lead, self.k), codes.indices.reshape(*lead, self.k)

    def encode(self, x: mx.array) -> mx.array:
        """Dense sparse codes [..., d_hidden] (at most k nonzero per token)."""
        values, idx = self.encode_topk(x)
        zeros = mx.zeros((*values.shape[:-1], self.d_hidden), dtype=values.dtype)
        return mx.put_along_axis(zeros, idx, values, axis=-1)

    def decode(self, features: mx.array) -> mx.array:
        """Raw-scale reconstruction [..., d_model] from dense codes [..., d_hidden]."""
        return (features @ self.decoder_weight + self.b_dec) / self.input_scale

    def decode_topk(self, values: mx.array, indices: mx.array) -> mx.array:
        """Raw-scale reconstruction from (values, indices) [..., k]."""
        lead = values.shape[:-1]
        flat = decode_codes(self.decoder_weight, values.reshape(-1, values.shape[-1]),
                            indices.reshape(-1, indices.shape[-1]))
        return ((flat + self.b_dec) / self.input_scale).reshape(*lead, self.d_model)

    def __call__(self, x: mx.array) -> mx.array:
        return self.decode_topk(*self.encode_topk(x))

    # -- compatibility ------------------------------------------------------
    def is_compatible(self, model: Any, layer: int, component: str) -> bool:
        """True if this SAE was trained on ``model``'s ``layer``/``component``.

        ``model`` is an InterpretableModel (``.info.name``, ``.info.identity``,
        ``.d_model``) or a model name. Names match if equal; when both sides
        carry an identity (weights checksum), identities must match too."""
        meta = self._metadata
        wanted, stored = canonical_component(component), meta.get("component")
        if stored is None or canonical_component(stored) != wanted:
            return False
        if meta.get("layer") != layer:
            return False
        if isinstance(model, str):
            name, identity, d_model = model, None, None
        else:
            info = getattr(model, "info", None)
            name = getattr(info, "name", None)
            identity = getattr(info, "identity", None)
            d_model = getattr(model, "d_model", None)
        if d_model is not None and d_model != self.d_model:
            return False
        if meta.get("model_name") != name:
            return False
        known = meta.get("model_identity")
        return not (known and identity and known != identity)

    # -- persistence --------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path/`` (``sae.safetensors`` + ``sae.json``) atomically; returns the path."""
        path = Path(path)
        with atomic_dir(path) as tmp:
            arrays = dict(nn.utils.tree_flatten(self.parameters()))
            mx.save_safetensors(str(tmp / WEIGHTS_FILE), arrays, metadata={"format": FORMAT})
            config = {"format": FORMAT, "format_version": FORMAT_VERSION,
                      "d_model": self.d_model, "d_hidden": self.d_hidden, "k": self.k,
                      "normalize_input": self.normalize_input,
                      "tied_weights": self.tied_weights, "metadata": _jsonable(self.metadata)}
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SAE":
        """Load an SAE written by :meth:`save` (``path`` is its directory)."""
        path = Path(path)
        if path.is_file() and path.name in (WEIGHTS_FILE, CONFIG_FILE):
            path = path.parent
        cfg_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not cfg_file.is_file() or not weights_file.is_file():
            raise FileNotFoundError(f"{path} is not a saved SAE: expected {CONFIG_FILE} and "
                                    f"{WEIGHTS_FILE} in that directory")
        cfg = json.loads(cfg_file.read_text())
        if cfg.get("format") != FORMAT:
            raise ValueError(f"{cfg_file}: format={cfg.get('format')!r}; expected {FORMAT!r}")
        sae = cls(cfg["d_model"], cfg["d_hidden"], cfg["k"],
                  normalize_input=cfg["normalize_input"], tied_weights=cfg["tied_weights"],
                  metadata=cfg.get("metadata", {}))
        sae.load_weights(str(weights_file), strict=True)
        mx.eval(sae.parameters())
        return sae
