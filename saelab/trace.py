"""``TracedModel`` and ``trace()``: named activations of an mlx_lm model.

(The guide's ``InterpretableModel``, in ``saelab.guide``, adds SAE training on top.)

Capture works by swapping the class of each decoder block and of its attention
and MLP modules for a recording subclass (see ``_recording_class``): parameter
names, attributes such as ``use_sliding`` and the model's own forward code stay
untouched, and outside a trace the subclasses just call through.

Names: ``model.layers.N.mlp`` (MLP output), ``model.layers.N.attn`` (self-attention
output, also ``.self_attn``) and ``model.layers.N.output`` (residual stream after
layer N, also ``model.layers.N``), each shaped [batch, seq, d_model].

With ``capture=[names]`` the forward pass is cut off (an exception) as soon as
every requested activation has been produced, and they are evaluated together.
Without it every activation is recorded *lazily*: MLX computes only what an
evaluated array depends on, so reading layer 10 of 30 runs layers 0..10 only.
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import saelab  # noqa: F401  (OpenBLAS preload before mlx.core)
import mlx.core as mx
import numpy as np

from saelab.config import COMPONENT_ALIASES, COMPONENTS, ModelConfig, canonical_component
from saelab.models import DEFAULT_MODEL, load_model

Inputs = Union[str, Sequence[str], mx.array, np.ndarray]
Key = tuple[int, str]

_ATTN_ATTRS = ("self_attn", "attention", "attn")
_MLP_ATTRS = ("mlp", "feed_forward")
_NAME = re.compile(r"model\.layers\.(-?\d+)(?:\.(\w+))?")
_EXTRA_ALIASES = {None: "output", "self_attn": "attn"}


def activation_name(layer: int, component: str) -> str:
    """The canonical activation name, e.g. ``activation_name(10, "mlp") == "model.layers.10.mlp"``."""
    return f"model.layers.{int(layer)}.{canonical_component(component)}"


class ActivationNameError(KeyError, ValueError):
    """An activation name that is malformed, out of range or was not captured.

    A ValueError (bad input) and a KeyError (so ``Mapping.get``/``in`` behave)."""

    def __str__(self) -> str:
        return str(self.args[0])


def parse_name(name: str, n_layers: int) -> Key:
    """(layer, canonical component) of an activation name, or ActivationNameError."""
    m = _NAME.fullmatch(name) if isinstance(name, str) else None
    comps = sorted(set(COMPONENTS) | set(COMPONENT_ALIASES) | {"self_attn"})
    valid = (f"model.layers.N.{{{','.join(comps)}}} or model.layers.N (= .output), "
             f"N in 0..{n_layers - 1}")
    comp = _EXTRA_ALIASES.get(m[2], m[2]) if m else None
    if comp is not None and comp not in COMPONENTS:
        comp = COMPONENT_ALIASES.get(comp)
    if m is None or comp is None:
        raise ActivationNameError(f"activation name {name!r} is not valid; valid names: {valid}")
    layer = int(m[1])
    if not 0 <= layer < n_layers:
        raise ActivationNameError(f"activation name {name!r}: layer {layer} is out of range; "
                                  f"valid layers: 0..{n_layers - 1} (the model has {n_layers})")
    return layer, comp


class _StopForward(Exception):
    """Raised inside the forward pass once every requested activation exists."""


class _Recorder:
    def __init__(self, keys: dict[int, Key], wanted: Optional[set[Key]]):
        self.keys = keys  # id(module) -> (layer, component)
        self.wanted = wanted
        self.acts: dict[Key, mx.array] = {}

    def record(self, module: Any, out: Any) -> None:
        key = self.keys.get(id(module))
        if key is None or (self.wanted is not None and key not in self.wanted):
            return
        self.acts[key] = out[0] if isinstance(out, tuple) else out
        if self.wanted is not None and len(self.acts) == len(self.wanted):
            raise _StopForward


_ACTIVE: ContextVar[Optional[_Recorder]] = ContextVar("saelab_recorder", default=None)
_SUBCLASSES: dict[type, type] = {}


def _recording_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``__call__`` also hands its output to the active recorder."""
    if cls not in _SUBCLASSES:
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            out = super(sub, self).__call__(*args, **kwargs)
            recorder = _ACTIVE.get()
            if recorder is not None:
                recorder.record(self, out)
            return out

        sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__})
        _SUBCLASSES[cls] = sub
        _SUBCLASSES[sub] = sub  # swapping twice is a no-op
    return _SUBCLASSES[cls]


def _submodule(block: Any, attrs: Iterable[str], what: str, layer: int) -> Any:
    for a in attrs:
        if a in block:
            return block[a]
    raise ValueError(f"layer {layer} ({type(block).__name__}) has no {what} module; "
                     f"looked for {', '.join(attrs)}")


class Activations(Mapping[str, mx.array]):
    """Activations by name (aliases accepted); arrays may still be lazy until evaluated."""

    def __init__(self, acts: dict[Key, mx.array], n_layers: int):
        self._acts = acts
        self._n_layers = n_layers

    def __getitem__(self, name: str) -> mx.array:
        key = parse_name(name, self._n_layers)
        if key not in self._acts:
            raise ActivationNameError(
                f"activation {name!r} was not captured; captured: {sorted(self)}; "
                "list it in trace(..., capture=[...]) or omit capture to record every layer")
        return self._acts[key]

    def __iter__(self) -> Iterator[str]:
        return (activation_name(*k) for k in sorted(self._acts))

    def __len__(self) -> int:
        return len(self._acts)


class Trace:
    """One forward pass: ``activations``, ``tokens`` [batch, seq], ``mask`` [batch, seq]
    (True at real tokens; batches of texts are right-padded, which causal attention
    never lets real tokens see) and, when the whole model ran, ``logits``."""

    def __init__(self, tokens: mx.array, mask: mx.array, activations: Activations,
                 logits: Optional[mx.array]):
        self.tokens = tokens
        self.mask = mask
        self.activations = activations
        self._logits = logits

    @property
    def logits(self) -> mx.array:
        """[batch, seq, vocab] (lazy: computing it runs every layer)."""
        if self._logits is None:
            raise RuntimeError("the forward pass stopped after the captured activations "
                               "(capture=[...]); trace without capture to get logits")
        return self._logits

    output = logits

    def __enter__(self) -> "Trace":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class TracedModel:
    """An mlx_lm model with named activations: ``with model.trace(text) as t: ...``."""

    def __init__(self, name_or_path: str = DEFAULT_MODEL, dtype: str = "float32"):
        self.config = ModelConfig(name=str(name_or_path), dtype=dtype)
        self.model, self.tokenizer, self.info = load_model(self.config)
        self._keys: dict[int, Key] = {}
        for i, block in enumerate(self.model.layers):
            parts = {"output": block,
                     "attn": _submodule(block, _ATTN_ATTRS, "attention", i),
                     "mlp": _submodule(block, _MLP_ATTRS, "MLP", i)}
            for comp, module in parts.items():
                module.__class__ = _recording_class(type(module))
                self._keys[id(module)] = (i, comp)

    @property
    def n_layers(self) -> int:
        return self.info.n_layers

    @property
    def d_model(self) -> int:
        return self.info.d_model

    def trace(self, inputs: Inputs, capture: Optional[Iterable[str]] = None) -> Trace:
        """Run ``inputs`` (text, list of texts, or token ids [batch, seq]) through the model.

        ``capture``: activation names to compute now, in one pass that stops after
        the deepest of them. Without it every activation is recorded lazily."""
        wanted = None if capture is None else {parse_name(n, self.n_layers) for n in capture}
        if wanted is not None and not wanted:
            raise ValueError("capture=[] is empty; list activation names or omit capture")
        tokens, mask = self.tokenize(inputs)
        recorder = _Recorder(self._keys, wanted)
        reset = _ACTIVE.set(recorder)
        try:
            logits = self.model(tokens)
        except _StopForward:
            logits = None
        finally:
            _ACTIVE.reset(reset)
        if wanted is not None:
            mx.eval(list(recorder.acts.values()))
        return Trace(tokens, mask, Activations(recorder.acts, self.n_layers), logits)

    def tokenize(self, inputs: Inputs) -> tuple[mx.array, mx.array]:
        """Token ids [batch, seq] (int32) and a mask [batch, seq] (True at real tokens)."""
        if isinstance(inputs, str):
            inputs = [inputs]
        if isinstance(inputs, (mx.array, np.ndarray)):
            ids = np.asarray(inputs)
            ids = ids[None] if ids.ndim == 1 else ids
            if ids.ndim != 2 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"inputs: token ids must be a non-empty integer array "
                                 f"[batch, seq]; got shape {ids.shape}, dtype {ids.dtype}")
            if ids.min() < 0 or ids.max() >= self.info.vocab_size:
                raise ValueError(f"inputs: token ids must be in [0, {self.info.vocab_size}); "
                                 f"got {ids.min()}..{ids.max()}")
            return mx.array(ids, dtype=mx.int32), mx.ones(ids.shape, dtype=mx.bool_)
        if not (isinstance(inputs, Sequence) and inputs and all(isinstance(t, str) for t in inputs)):
            raise ValueError("inputs: expected a string, a non-empty list of strings or token "
                             f"ids [batch, seq]; got {type(inputs).__name__}")
        encoded = [self.tokenizer.encode(t) for t in inputs]
        empty = [i for i, e in enumerate(encoded) if not e]
        if empty:
            raise ValueError(f"inputs: text(s) at index {empty} encode to no tokens")
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        width = max(map(len, encoded))
        ids = np.full((len(encoded), width), pad, dtype=np.int32)
        mask = np.zeros((len(encoded), width), dtype=bool)
        for i, e in enumerate(encoded):
            ids[i, :len(e)] = e
            mask[i, :len(e)] = True
        return mx.array(ids), mx.array(mask)
