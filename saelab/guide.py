"""The SAE guide's Python API: ``InterpretableModel``, a traced model that trains and loads SAEs.

    from saelab import InterpretableModel, SAEConfig
    model = InterpretableModel("smollm2_135m")
    sae = model.train_sae(layer=10, dataset=texts, save_path="outputs/my_sae.mlx")
    with model.trace("The capital of France is") as trace:
        pass
    features = sae.encode(trace.activations["model.layers.10.mlp"])

Training goes through ``saelab.trial.run_trial`` like every other entry point, with
this already loaded model and the given texts in place of the configured corpus.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from saelab.config import DataConfig, SAEConfig, TrialConfig
from saelab.paths import outputs_root
from saelab.sae import SAE
from saelab.trace import TracedModel
from saelab.trial import run_trial


def _texts(dataset: Any) -> list[str]:
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
        texts = _texts(dataset)
        cfg = TrialConfig(
            model=self.config, layer=layer, component=component,
            # min_chars=1: the caller chose these texts; only empty strings are dropped
            data=DataConfig(source="pydocs", max_tokens=max_tokens or 10**12,
                            context_length=context_length, min_chars=1),
            sae=config or SAEConfig(),
        )
        stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
        out = outputs_root() / "runs" / f"{stamp}-train_sae-l{layer}-{cfg.component}"
        return run_trial(cfg, callbacks, output_dir=out, sae_path=save_path, texts=texts,
                         model=self).sae

    def load_sae(self, path: str | Path) -> SAE:
        """Load an SAE saved by ``sae.save(path)`` / ``train_sae(save_path=...)``."""
        return SAE.load(path)
