"""The guide's Phase 2 on a trained SAE: the strongest features of a prompt, the texts
where a feature fires most, a feature's picture, a dashboard, and steering.

``SAE`` methods of the same names call these (sae.py imports this module lazily).

- ``analyze_text``: per token of a prompt, its strongest features and activations.
- ``top_activating_texts``: from a ``FeatureIndex`` built once per (SAE, dataset) in
  one pass and saved beside the SAE (``features.npz`` for its training corpus,
  ``features-<id>.npz`` for a list of texts); later lookups only read it.
- ``visualize_feature``: activation histogram, top contexts and logit effect. The
  logit effect is the feature's direct path to the output: its decoder row in raw
  activation units times the final RMSNorm's weight, through the unembedding
  (``lm_head``, or the tied embedding). The norm's division by the residual's RMS
  is left out: it is one positive number per token, so it changes no ranking.
- ``steer``: inside ``with model.trace(prompt):``, adds ``strength`` times the
  feature's decoder row in raw activation units to the component's output at
  every position. ``strength`` is in the SAE's code units: exactly what a code of
  value ``strength`` for this feature adds to the reconstruction (top activating
  texts show a feature's natural range).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

import saelab  # noqa: F401  (OpenBLAS preload before mlx.core)
import mlx.core as mx

from saelab.config import DataConfig, ModelConfig
from saelab.feature_index import ActivatingText, FeatureIndex, weights_hash
from saelab.paths import outputs_root
from saelab.trace import Edit, TracedModel, shared_model
from saelab.names import activation_name

BATCH = 16
"""Sequences per forward pass when computing activations of a list of texts."""


class TokenFeatures(NamedTuple):
    """A prompt token and its strongest features as (feature index, activation)."""

    token: str
    features: list[tuple[int, float]]


class _State:
    """Phase 2 state an SAE object carries (set with object.__setattr__: an mlx Module
    would otherwise take dicts and arrays for parameters)."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.hash: str | None = None
        self.indexes: dict[str, FeatureIndex] = {}


def state(sae: Any) -> _State:
    if "_phase2" not in vars(sae):
        object.__setattr__(sae, "_phase2", _State())
    return vars(sae)["_phase2"]


def remember_path(sae: Any, path: str | Path) -> Any:
    """Record where ``sae`` lives on disk (its feature indexes are saved there)."""
    state(sae).path = Path(path).resolve()
    return sae


# ---------------------------------------------------------------- checks


def check_feature(sae: Any, feature_idx: Any) -> int:
    if isinstance(feature_idx, bool) or not isinstance(feature_idx, (int, np.integer)) or \
            not 0 <= int(feature_idx) < sae.d_hidden:
        raise ValueError(f"feature_idx={feature_idx!r} is not valid; allowed: an integer in "
                         f"0..{sae.d_hidden - 1} (the SAE has d_hidden={sae.d_hidden} features)")
    return int(feature_idx)


def check_model(sae: Any, model: Any, layer: int | None = None) -> tuple[int, str]:
    """The SAE's (layer, component) once ``model`` (and ``layer``) match its metadata."""
    meta = sae.metadata
    trained, comp = meta.get("layer"), meta.get("component")
    if trained is None or comp is None:
        raise ValueError("sae: its metadata names no layer/component; allowed: an SAE trained "
                         "by saelab (train_sae, saelab train) or given metadata")
    layer = trained if layer is None else layer
    if not sae.is_compatible(model, layer=layer, component=comp):
        got = getattr(getattr(model, "info", None), "name", model)
        raise ValueError(f"model={got!r}, layer={layer} does not match the SAE; allowed: the "
                         f"model and layer it was trained on ({meta.get('model_name')!r}, layer "
                         f"{trained}, component {comp!r}, d_model {sae.d_model})")
    return int(layer), comp


def model_for(sae: Any, model: Any = None) -> TracedModel:
    """``model`` checked against the SAE, or the SAE's own model (loaded once per process)."""
    if model is None:
        meta = sae.metadata
        if not meta.get("model_name"):
            raise ValueError("model=None: the SAE's metadata names no model; allowed: pass "
                             "model=InterpretableModel(...)")
        model = shared_model(ModelConfig(meta["model_name"], meta.get("model_dtype", "float32")))
    check_model(sae, model)
    return model


_TOKENIZERS: dict[str, Any] = {}


def tokenizer_for(sae: Any, model: Any = None) -> Any:
    """``model``'s tokenizer, or the SAE's model's, loaded without its weights."""
    if model is not None:
        check_model(sae, model)
        return model.tokenizer
    name = sae.metadata.get("model_name")
    if not name:
        raise ValueError("model=None: the SAE's metadata names no model; allowed: pass "
                         "model=InterpretableModel(...)")
    if name not in _TOKENIZERS:
        from mlx_lm.utils import load_tokenizer

        from saelab.models import model_info

        cfg = ModelConfig(name, sae.metadata.get("model_dtype", "float32"))
        _TOKENIZERS[name] = load_tokenizer(Path(model_info(cfg).path))
    return _TOKENIZERS[name]


def dataset_texts(dataset: Any) -> list[str]:
    """The documents of ``dataset``: a list of strings or a ``datasets`` dataset with ``text``."""
    allowed = "allowed: a non-empty list of strings or a datasets dataset with a 'text' column"
    if hasattr(dataset, "column_names"):  # a datasets.Dataset
        if "text" not in dataset.column_names:
            raise ValueError(f"dataset has columns {dataset.column_names} and no 'text'; {allowed}")
        dataset = dataset["text"]
    if isinstance(dataset, str) or not hasattr(dataset, "__len__"):
        raise ValueError(f"dataset={type(dataset).__name__} is not valid; {allowed}")
    texts = [t for t in dataset if isinstance(t, str)]
    if not texts or len(texts) != len(dataset):
        raise ValueError(f"dataset with {len(dataset)} items ({len(texts)} strings) is not valid; "
                         f"{allowed}")
    return texts


# ---------------------------------------------------------------- analyze_text


def analyze_text(sae: Any, model: Any, prompt: str, top_k: int = 10) -> list[TokenFeatures]:
    """Per token of ``prompt``: its ``top_k`` strongest features, strongest first."""
    layer, comp = check_model(sae, model)
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt={prompt!r} is not valid; allowed: a non-empty string")
    if not isinstance(top_k, int) or not 1 <= top_k <= sae.k:
        raise ValueError(f"top_k={top_k!r} is not valid; allowed: an integer in 1..{sae.k} "
                         "(the SAE's k: features active per token)")
    tokens, _ = model.tokenize(prompt, arg="prompt")
    name = activation_name(layer, comp)
    act = model.trace(tokens, capture=[name]).activations[name][0]
    values, idx = (np.array(a) for a in sae.encode_topk(act))
    out = []
    for tok, v, i in zip(np.array(tokens[0]).tolist(), values, idx, strict=True):
        order = np.argsort(-v, kind="stable")[:top_k]
        out.append(TokenFeatures(model.tokenizer.decode([tok]),
                                 [(int(i[j]), float(v[j])) for j in order if v[j] > 0]))
    return out


# ---------------------------------------------------------------- feature indexes


def _index_path(sae: Any, name: str) -> Path:
    st = state(sae)
    if st.path is not None and st.path.is_dir():
        return st.path / name
    return outputs_root() / "features" / st.hash / name  # an SAE never saved: by its weights


def _text_source(sae: Any, model: TracedModel, texts: list[str], context_length: int,
                 max_tokens: int | None):
    from saelab.data import pack_documents

    layer, comp = check_model(sae, model)
    packed = pack_documents(model.tokenizer, texts, context_length, max_tokens or 10**15)
    name = activation_name(layer, comp)

    def chunks():
        for lo in range(0, len(packed.tokens), BATCH):
            mask = packed.mask[lo:lo + BATCH]
            act = model.trace(mx.array(packed.tokens[lo:lo + BATCH]), capture=[name])
            yield np.asarray(act.activations[name].astype(mx.float32))[mask]

    return chunks(), packed.tokens, packed.mask


def _corpus_source(sae: Any, model: TracedModel):
    """The SAE's training corpus: activations from its activation cache, in chunks."""
    from saelab.cache import ensure_activations
    from saelab.data import load_texts, pack_documents

    data = sae.metadata.get("data_config")
    if not data:
        raise ValueError("dataset=None: the SAE was trained on in-memory texts, not a corpus "
                         "config; allowed: dataset=<a list of texts>")
    cfg = DataConfig(**data)
    layer, comp = check_model(sae, model)
    where = sae.metadata.get("activation_cache")  # the cache root the SAE's trial used
    entry = ensure_activations(model.config, cfg, [(layer, comp)], model=model,
                               root=Path(where).parent if where else None)[(layer, comp)]
    packed = pack_documents(model.tokenizer, load_texts(cfg), cfg.context_length, cfg.max_tokens)
    step = 8192

    def chunks():
        for lo in range(0, entry.n_tokens, step):
            yield entry.take(np.arange(lo, min(lo + step, entry.n_tokens)))

    return chunks(), packed.tokens, packed.mask


def feature_index(sae: Any, dataset: Any = None, model: Any = None,
                  max_tokens: int | None = None) -> FeatureIndex:
    """The SAE's index over ``dataset`` (None: its training corpus; or a list of texts),
    loaded from beside the SAE or built in one pass and saved there."""
    from saelab.data import texts_identity

    st = state(sae)
    st.hash = st.hash or weights_hash(sae)
    if dataset is None:
        key = "features.npz"
    else:
        texts = dataset_texts(dataset)
        ctx = int((sae.metadata.get("data_config") or {}).get("context_length", 128))
        key = f"features-{texts_identity(texts)[:12]}-{ctx}-{max_tokens or 'all'}.npz"
    if key in st.indexes:
        return st.indexes[key]
    path = _index_path(sae, key)
    index = FeatureIndex.load(path, st.hash)
    if index is None:
        model = model_for(sae, model)
        chunks, tokens, mask = (_corpus_source(sae, model) if dataset is None else
                                _text_source(sae, model, texts, ctx, max_tokens))
        index = FeatureIndex.build(sae, chunks, tokens, mask, source=key)
        path.parent.mkdir(parents=True, exist_ok=True)
        index.save(path)
    st.indexes[key] = index
    return index


def top_activating_texts(sae: Any, feature_idx: int, dataset: Any = None, top_k: int = 20,
                         model: Any = None) -> list[ActivatingText]:
    """The ``top_k`` contexts of ``dataset`` where ``feature_idx`` fires most."""
    f = check_feature(sae, feature_idx)
    index = feature_index(sae, dataset, model)
    return index.contexts(f, top_k, tokenizer_for(sae, model))


# ---------------------------------------------------------------- logit effect, picture


def logit_effect(sae: Any, model: TracedModel, feature_idx: int, k: int = 10
                 ) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """(promoted, suppressed): the ``k`` tokens whose logits the feature's direction
    raises most and lowers most (see the module docstring)."""
    f = check_feature(sae, feature_idx)
    direction = sae.decoder_weight[f] / sae.input_scale
    norm = getattr(getattr(model.model, "model", None), "norm", None)
    if getattr(norm, "weight", None) is not None:
        direction = direction * norm.weight.astype(mx.float32)
    effect = np.array(model.unembedding() @ direction)
    order = np.argsort(effect)
    decode = model.tokenizer.decode
    return ([(decode([int(t)]), float(effect[t])) for t in order[::-1][:k]],
            [(decode([int(t)]), float(effect[t])) for t in order[:k]])


def visualize_feature(sae: Any, feature_idx: int, model: Any = None, dataset: Any = None,
                      top_k: int = 10, html_path: str | Path | None = None):
    """A plotly figure of the feature: activation histogram, logit effect, top contexts;
    also written to ``html_path`` (self-contained) when given."""
    from saelab.feature_plot import feature_figure

    f = check_feature(sae, feature_idx)
    model = model_for(sae, model)
    index = feature_index(sae, dataset, model)
    fig = feature_figure(f, index, index.contexts(f, top_k, model.tokenizer),
                         *logit_effect(sae, model, f))
    if html_path is not None:
        from saelab.paths import atomic_write_text

        atomic_write_text(html_path, fig.to_html(include_plotlyjs=True, full_html=True))
    return fig


# ---------------------------------------------------------------- steering


def steering_edit(sae: Any, feature_idx: int, strength: float) -> Edit:
    """Adds ``strength`` x the feature's decoder row (raw activation units) everywhere."""
    f = check_feature(sae, feature_idx)
    if not isinstance(strength, (int, float)) or not np.isfinite(strength):
        raise ValueError(f"strength={strength!r} is not valid; allowed: a finite number "
                         "(code units of the feature)")
    add = float(strength) * sae.decoder_weight[f] / sae.input_scale
    return lambda a: a + add.astype(a.dtype)


def steer(sae: Any, model: Any, layer: int, feature_idx: int, strength: float) -> None:
    """Register the steering of ``feature_idx`` on the trace being built (the guide's
    ``with model.trace(prompt): sae.steer(model=model, layer=10, ...)``)."""
    layer, comp = check_model(sae, model, layer)
    edit = steering_edit(sae, feature_idx, strength)
    model.current_trace("sae.steer(...)").intervene(activation_name(layer, comp), edit)
