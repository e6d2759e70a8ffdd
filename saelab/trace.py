"""``TracedModel`` and ``trace()``: named activations of an mlx_lm model, and interventions.

(The guide's ``InterpretableModel``, in ``saelab.guide``, adds SAE training on top.)

Capture works by swapping the class of each decoder block and of its attention
and MLP modules for a recording subclass (see ``_recording_class``): parameter
names, attributes such as ``use_sliding`` and the model's own forward code stay
untouched, and outside a trace the subclasses just call through. Inside one,
each output goes to the active recorder, which may hand back a *replacement*
that flows on through the model: that is how evals splice an SAE's
reconstruction in and how steering adds a feature's direction. On a CPU, MLPs and
attention that call mlx_lm's ``swiglu`` / ``scaled_dot_product_attention`` run their
own code with ``saelab.fastops``' versions in place (``fastops.fast_forward``): MLX's CPU
``exp`` is scalar, and this cut the forward pass's CPU time by about a third.

Names: ``model.layers.N.mlp`` (MLP output), ``model.layers.N.attn`` (self-attention
output, also ``.self_attn``) and ``model.layers.N.output`` (residual stream after
layer N, also ``model.layers.N``), each shaped [batch, seq, d_model].

A trace is deferred: ``model.trace(x)`` tokenizes at once and runs the forward
pass the first time its activations or logits are read, or when its ``with``
block exits, so interventions registered inside the block apply
(``trace.intervene(name, fn)``, ``sae.steer(...)``) and ``model.output.save()``
returns a handle that holds the logits after the block.

With ``capture=[names]`` the forward pass is cut off (an exception) as soon as
every requested activation has been produced, and they are evaluated together.
Without it every activation is recorded *lazily*: MLX computes only what an
evaluated array depends on, so reading layer 10 of 30 runs layers 0..10 only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import saelab  # noqa: F401  (OpenBLAS preload before mlx.core)
import mlx.core as mx
import numpy as np

from saelab.config import ModelConfig
from saelab.fastops import fast_forward
from saelab.models import DEFAULT_MODEL, load_model
from saelab.names import ActivationNameError, Key, activation_name, parse_name

Inputs = str | Sequence[str] | mx.array | np.ndarray
Edit = Callable[[mx.array], mx.array]
"""An intervention: a component's output [batch, seq, d_model] -> its replacement."""

_ATTN_ATTRS = ("self_attn", "attention", "attn")
_MLP_ATTRS = ("mlp", "feed_forward")


class _StopForward(Exception):
    """Raised inside the forward pass once every requested activation exists."""


class _Recorder:
    """Applies the edits of each (layer, component) and keeps the outputs ``wanted``
    (None: all). ``stop``: cut the pass off once every wanted output exists."""

    def __init__(self, keys: dict[int, Key], wanted: set[Key] | None,
                 edits: Mapping[Key, Sequence[Edit]] | None = None, stop: bool = False):
        self.keys = keys  # id(module) -> (layer, component)
        self.wanted, self.edits, self.stop = wanted, edits or {}, stop
        self.acts: dict[Key, mx.array] = {}

    def record(self, module: Any, out: Any) -> Any:
        """The output the model goes on with (``out`` or its replacement)."""
        key = self.keys.get(id(module))
        if key is None:
            return out
        act = out[0] if isinstance(out, tuple) else out
        for edit in self.edits.get(key, ()):
            act = edit(act)
        if self.wanted is None or key in self.wanted:
            self.acts[key] = act
            if self.stop and len(self.acts) == len(self.wanted):
                raise _StopForward
        return (act, *out[1:]) if isinstance(out, tuple) else act


_ACTIVE: ContextVar[_Recorder | None] = ContextVar("saelab_recorder", default=None)
_SUBCLASSES: dict[type, type] = {}


def _recording_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``__call__`` hands its output to the active recorder
    and returns what the recorder gives back."""
    if cls not in _SUBCLASSES:
        forward = fast_forward(cls)

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            out = forward(self, *args, **kwargs)
            recorder = _ACTIVE.get()
            return out if recorder is None else recorder.record(self, out)

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


class Saved:
    """What ``model.output.save()`` returns inside a trace: after the trace has run,
    ``.value`` is the logits [batch, seq, vocab]; ``np.asarray(saved)``, indexing and
    array attributes (``.shape``, ``.argmax(...)``) read through to it."""

    def __init__(self, trace: Trace):
        self._trace = trace

    @property
    def value(self) -> mx.array:
        if not self._trace.ran:
            raise RuntimeError("model.output.save(): the trace has not run yet; read the saved "
                               "value after the `with model.trace(...)` block")
        return self._trace.logits

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = np.asarray(self.value)
        return a if dtype is None else a.astype(dtype)

    def __getitem__(self, index: Any) -> mx.array:
        return self.value[index]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.value, name)

    def __repr__(self) -> str:
        state = f"shape={tuple(self.value.shape)}" if self._trace.ran else "pending"
        return f"Saved(model.output, {state})"


class _Output:
    """``model.output`` inside a trace: ``.save()`` the logits for after the block."""

    def __init__(self, trace: Trace):
        self._trace = trace

    def save(self) -> Saved:
        return Saved(self._trace)


class Trace:
    """One forward pass of ``tokens`` [batch, seq] with ``mask`` [batch, seq] (True at
    real tokens; batches of texts are right-padded, which causal attention never lets
    real tokens see). Runs when first read or when its ``with`` block exits:
    ``activations``, and ``logits`` when the whole model ran (no ``capture``)."""

    def __init__(self, model: TracedModel, tokens: mx.array, mask: mx.array,
                 wanted: set[Key] | None):
        self.tokens, self.mask = tokens, mask
        self._model, self._wanted = model, wanted
        self._edits: dict[Key, list[Edit]] = {}
        self._acts: dict[Key, mx.array] | None = None
        self._logits: mx.array | None = None

    @property
    def ran(self) -> bool:
        return self._acts is not None

    def intervene(self, name: str, edit: Edit) -> None:
        """Replace activation ``name`` by ``edit(output)`` in this trace's forward pass
        (edits of one name apply in the order given)."""
        if self.ran:
            raise RuntimeError("trace.intervene: this trace has already run; register "
                               "interventions inside the `with model.trace(...)` block")
        self._edits.setdefault(parse_name(name, self._model.n_layers), []).append(edit)

    def run(self) -> Trace:
        """Run the forward pass now (idempotent)."""
        if not self.ran:
            self._acts, self._logits = self._model._forward(self.tokens, self._wanted,
                                                            self._edits)
        return self

    @property
    def activations(self) -> Activations:
        return Activations(self.run()._acts, self._model.n_layers)

    @property
    def logits(self) -> mx.array:
        """[batch, seq, vocab] (lazy: computing it runs every layer)."""
        if self.run()._logits is None:
            raise RuntimeError("the forward pass stopped after the captured activations "
                               "(capture=[...]); trace without capture to get logits")
        return self._logits

    @property
    def output(self) -> mx.array:
        """The logits (the guide's ``output``)."""
        return self.logits

    def __enter__(self) -> Trace:
        self._model._open.append(self)
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self._model._open.remove(self)
        if exc_type is None:
            self.run()


class TracedModel:
    """An mlx_lm model with named activations: ``with model.trace(text) as t: ...``."""

    def __init__(self, name_or_path: str = DEFAULT_MODEL, dtype: str = "float32"):
        self.config = ModelConfig(name=str(name_or_path), dtype=dtype)
        self.model, self.tokenizer, self.info = load_model(self.config)
        self._open: list[Trace] = []  # traces whose `with` block is running, innermost last
        self._unembed: mx.array | None = None
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

    @property
    def context_length(self) -> int | None:
        """The longest input the model takes (``max_position_embeddings``), if it says."""
        args = getattr(self.model, "args", None)
        return getattr(args, "max_position_embeddings", None)

    def final_norm(self, h: mx.array) -> mx.array:
        """The model's final norm, applied to the last layer's output before the unembedding."""
        norm = getattr(getattr(self.model, "model", None), "norm", None)
        if norm is None:
            raise ValueError(f"model {self.info.name!r} ({type(self.model).__name__}) has no "
                             "final norm at model.norm; allowed: mlx_lm decoder models")
        return norm(h)

    def unembedding(self) -> mx.array:
        """W_U [vocab, d_model] (float32): ``lm_head``, or the tied input embedding;
        logits are ``final_norm(h) @ W_U.T`` for the llama family."""
        if self._unembed is None:
            head = self.model["lm_head"] if "lm_head" in self.model else \
                self.model.model.embed_tokens
            w = head.weight
            if hasattr(head, "scales"):  # quantized: unpack once
                w = mx.dequantize(w, head.scales, head.get("biases"), head.group_size, head.bits)
            self._unembed = w.astype(mx.float32)
        return self._unembed

    def trace(self, inputs: Inputs, capture: Iterable[str] | None = None) -> Trace:
        """A forward pass of ``inputs`` (text, list of texts, or token ids [batch, seq]),
        run when first read or when its ``with`` block exits.

        ``capture``: activation names to compute, in one pass that stops after the
        deepest of them. Without it every activation is recorded lazily."""
        wanted = None if capture is None else {parse_name(n, self.n_layers) for n in capture}
        if wanted is not None and not wanted:
            raise ValueError("capture=[] is empty; list activation names or omit capture")
        tokens, mask = self.tokenize(inputs)
        return Trace(self, tokens, mask, wanted)

    def current_trace(self, who: str) -> Trace:
        """The innermost trace whose ``with`` block is running (``who`` names the caller
        in the error raised outside one)."""
        if not self._open:
            raise RuntimeError(f"{who} is only available inside `with model.trace(...) as "
                               "trace:`; open a trace first")
        return self._open[-1]

    @property
    def output(self) -> _Output:
        """The current trace's logits: ``output = model.output.save()`` inside the block."""
        return _Output(self.current_trace("model.output"))

    def _forward(self, tokens: mx.array, wanted: set[Key] | None,
                 edits: Mapping[Key, Sequence[Edit]]) -> tuple[dict[Key, mx.array],
                                                                mx.array | None]:
        recorder = _Recorder(self._keys, wanted, edits, stop=wanted is not None)
        reset = _ACTIVE.set(recorder)
        try:
            logits = self.model(tokens)
        except _StopForward:
            logits = None
        finally:
            _ACTIVE.reset(reset)
        if wanted is not None:
            mx.eval(list(recorder.acts.values()))
        return recorder.acts, logits

    @contextmanager
    def intervening(self, edits: Mapping[str, Sequence[Edit]]) -> Iterator[None]:
        """Apply ``edits`` (activation name -> interventions) to every forward pass of
        ``self.model`` inside the block, e.g. ``mlx_lm.generate``'s; nothing is recorded."""
        keyed = {parse_name(n, self.n_layers): list(fns) for n, fns in edits.items()}
        reset = _ACTIVE.set(_Recorder(self._keys, set(), keyed))
        try:
            yield
        finally:
            _ACTIVE.reset(reset)

    def tokenize(self, inputs: Inputs, arg: str = "inputs") -> tuple[mx.array, mx.array]:
        """Token ids [batch, seq] (int32) and a mask [batch, seq] (True at real tokens).
        ``arg`` names the argument in errors."""
        if isinstance(inputs, str):
            inputs = [inputs]
        if isinstance(inputs, (mx.array, np.ndarray)):
            ids = np.asarray(inputs)
            ids = ids[None] if ids.ndim == 1 else ids
            if ids.ndim != 2 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"{arg}: token ids must be a non-empty integer array "
                                 f"[batch, seq]; got shape {ids.shape}, dtype {ids.dtype}")
            if ids.min() < 0 or ids.max() >= self.info.vocab_size:
                raise ValueError(f"{arg}: token ids must be in [0, {self.info.vocab_size}); "
                                 f"got {ids.min()}..{ids.max()}")
            self._check_length(ids.shape[1], arg)
            return mx.array(ids, dtype=mx.int32), mx.ones(ids.shape, dtype=mx.bool_)
        if not (isinstance(inputs, Sequence) and inputs and all(isinstance(t, str) for t in inputs)):
            raise ValueError(f"{arg}: expected a string, a non-empty list of strings or token "
                             f"ids [batch, seq]; got {type(inputs).__name__}")
        encoded = [self.tokenizer.encode(t) for t in inputs]
        empty = [i for i, e in enumerate(encoded) if not e]
        if empty:
            raise ValueError(f"{arg}: text(s) at index {empty} encode to no tokens")
        width = max(map(len, encoded))
        self._check_length(width, arg)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        ids = np.full((len(encoded), width), pad, dtype=np.int32)
        mask = np.zeros((len(encoded), width), dtype=bool)
        for i, e in enumerate(encoded):
            ids[i, :len(e)] = e
            mask[i, :len(e)] = True
        return mx.array(ids), mx.array(mask)

    def _check_length(self, n: int, arg: str) -> None:
        limit = self.context_length
        if limit is not None and n > limit:
            raise ValueError(f"{arg} is {n} tokens long; allowed: at most the model's context "
                             f"of {limit} tokens ({self.info.name})")


_SHARED: dict[tuple[str, str], TracedModel] = {}


def shared_model(cfg: ModelConfig) -> TracedModel:
    """One loaded model per (name, dtype) per process: trials, evals and analyses that
    only need *a* copy of ``cfg``'s model share it instead of loading it again."""
    key = (cfg.name, cfg.dtype)
    if key not in _SHARED:
        _SHARED[key] = TracedModel(cfg.name, cfg.dtype)
    return _SHARED[key]
