"""The SAE guide's Python API: ``InterpretableModel``, a traced model that trains and loads SAEs.

    from saelab import InterpretableModel, SAEConfig
    model = InterpretableModel("smollm2_135m")
    sae = model.train_sae(layer=10, dataset=texts, save_path="outputs/my_sae.mlx")
    with model.trace("The capital of France is") as trace:
        pass
    features = sae.encode(trace.activations["model.layers.10.mlp"])
    text = model.generate("The weather today", max_tokens=20, steer=[(sae, 1234, 8.0)])

Training goes through ``saelab.trial.run_trial`` like every other entry point, with
this already loaded model and the given texts in place of the configured corpus.
``SAE`` is the TopK SAE with the guide's Phase 2 methods (``analyze_text``, ``steer``, ...),
which live in ``saelab.analysis``, ``saelab.evaluate`` and ``saelab.features_app``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from saelab import analysis, evaluate, features_app
from saelab.analysis import check_model, dataset_texts, remember_path, steering_edit
from saelab.config import DataConfig, SAEConfig, TrialConfig
from saelab.paths import outputs_root
from saelab.sae import SAE as TopKSAE
from saelab.trace import TracedModel
from saelab.names import activation_name
from saelab.trial import run_trial


class SAE(TopKSAE):
    """The guide's SAE: the TopK SAE of ``saelab.sae`` (encode/decode, save/load,
    metadata, is_compatible) plus the Phase 2 calls, implemented in ``saelab.analysis``,
    ``saelab.evaluate`` and ``saelab.features_app``. ``SAE.load`` returns this class."""

    def analyze_text(self, model: Any, prompt: str, top_k: int = 10) -> list:
        """Per token of ``prompt``: (token, [(feature, activation), ...]), strongest first."""
        return analysis.analyze_text(self, model, prompt, top_k)

    def get_top_activating_texts(self, feature_idx: int, dataset: Any = None, top_k: int = 20,
                                 model: Any = None) -> list:
        """The contexts of ``dataset`` (texts; None: the training corpus) where the feature
        fires most, the token marked ``[[...]]``; every feature's list is computed in one
        pass and saved beside the SAE."""
        return analysis.top_activating_texts(self, feature_idx, dataset, top_k, model)

    def visualize_feature(self, feature_idx: int, model: Any = None, dataset: Any = None,
                          top_k: int = 10, html_path: str | os.PathLike | None = None):
        """A plotly figure: activation histogram, top contexts, logit effect (HTML too)."""
        return analysis.visualize_feature(self, feature_idx, model, dataset, top_k, html_path)

    def launch_dashboard(self, model: Any = None, dataset: Any = None, host: str = "127.0.0.1",
                         port: int = 8050, block: bool = True, max_tokens: int | None = None):
        """Browse every feature on a local web page (``block=False``: a running server)."""
        return features_app.launch(self, model, dataset, host=host, port=port, block=block,
                                   max_tokens=max_tokens)

    def steer(self, model: Any, layer: int, feature_idx: int, strength: float) -> None:
        """Inside ``with model.trace(prompt):``, add ``strength`` (code units) times the
        feature's decoder direction to the component's output at every position."""
        analysis.steer(self, model, layer, feature_idx, strength)

    def evaluate(self, model: Any = None, dataset: Any = None, **options: Any) -> dict:
        """Reconstruction and downstream metrics on ``dataset`` (texts, a DataConfig, or
        None: the held-out documents of the training corpus); see saelab.evaluate."""
        return evaluate.evaluate(self, model, dataset, **options)


class InterpretableModel(TracedModel):
    """``TracedModel`` (``trace``, ``tokenize``, ``info``) plus the guide's ``train_sae``/``load_sae``."""

    def train_sae(self, layer: int, dataset: Any, component: str = "mlp",
                  config: SAEConfig | None = None, save_path: str | Path | None = None, *,
                  max_tokens: int | None = None, context_length: int = 128,
                  callbacks: Sequence[Any] = ()) -> SAE:
        """Train a TopK SAE on this model's ``layer``/``component`` activations of ``dataset``.

        ``dataset`` is a list of strings or a ``datasets`` dataset with a ``text``
        column; ``max_tokens`` caps the activations captured from it (default: all),
        packed into sequences of ``context_length``. Activations go through the same
        content-addressed cache as sweeps, so a second call on the same texts, layer
        and component skips the capture. The run's metrics and SAE are written under
        ``<outputs>/runs/``; ``save_path`` puts the SAE elsewhere.
        """
        texts = dataset_texts(dataset)
        cfg = TrialConfig(
            model=self.config, layer=layer, component=component,
            # min_chars=1: the caller chose these texts; only empty strings are dropped
            data=DataConfig(source="pydocs", max_tokens=max_tokens or 10**12,
                            context_length=context_length, min_chars=1),
            sae=config or SAEConfig(),
        )
        stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
        out = outputs_root() / "runs" / f"{stamp}-train_sae-l{layer}-{cfg.component}"
        result = run_trial(cfg, callbacks, output_dir=out, sae_path=save_path, texts=texts,
                           model=self)
        result.sae.__class__ = SAE  # the same arrays; the guide's class only adds methods
        return remember_path(result.sae, result.sae_path)

    def load_sae(self, path: str | Path) -> SAE:
        """Load an SAE saved by ``sae.save(path)`` / ``train_sae(save_path=...)``."""
        return remember_path(SAE.load(path), path)

    def generate(self, prompt: str, max_tokens: int = 64,
                 steer: Sequence[tuple[SAE, int, float]] = (), temperature: float = 0.0) -> str:
        """Continue ``prompt`` (greedy unless ``temperature`` > 0), with each
        ``(sae, feature_idx, strength)`` of ``steer`` added at the SAE's layer and
        component on every position, prompt and new tokens alike (see ``sae.steer``)."""
        import mlx_lm
        from mlx_lm.sample_utils import make_sampler

        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens!r} is not valid; allowed: an integer >= 1")
        ids = self.tokenize(prompt, arg="prompt")[0]
        limit = self.context_length
        if limit is not None and ids.shape[1] + max_tokens > limit:
            raise ValueError(f"max_tokens={max_tokens} is not valid for a {ids.shape[1]}-token "
                             f"prompt; allowed: at most {limit - ids.shape[1]} (context {limit})")
        edits: dict[str, list] = {}
        for item in steer:
            if not (isinstance(item, tuple) and len(item) == 3):
                raise ValueError(f"steer item {item!r} is not valid; allowed: (sae, "
                                 "feature_idx, strength)")
            sae, feature, strength = item
            layer, comp = check_model(sae, self)
            edits.setdefault(activation_name(layer, comp), []).append(
                steering_edit(sae, feature, strength))
        with self.intervening(edits):
            return mlx_lm.generate(self.model, self.tokenizer, prompt, max_tokens=max_tokens,
                                   sampler=make_sampler(temp=temperature))
