"""``sae.evaluate(model, dataset)`` and ``saelab eval SAE_PATH [data overrides]``: every
metric of a saved SAE on any corpus the data configs can load.

Reconstruction metrics (``val/mse``, ``nmse``, ``nmse_p99``, ``explained_variance``,
``l0``, ``dead_fraction``: the trainer's definitions) come from the activation
cache entry of the corpus at the SAE's layer and component (captured once, shared
with trials); downstream metrics (``saelab.evals``) from the first
``sequences`` packed sequences of the same documents. ``split=validation`` uses
the documents the SAE's own document split holds out (on its training corpus: the
trial's validation set); ``split=all`` every document (the default for a list of
texts, which is the caller's evaluation set).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from saelab.config import DataConfig, ModelConfig, SAEConfig
from saelab.errors import CommandParser

SPLITS = ("validation", "all")
METRIC_ORDER = ("val/mse", "val/nmse", "val/nmse_p99", "val/explained_variance", "val/l0",
                "val/dead_fraction")


def evaluate(sae: Any, model: Any = None, dataset: Any = None, *, split: str | None = None,
             sequences: int = SAEConfig.downstream_sequences,
             max_tokens: int | None = None) -> dict[str, float]:
    """All metrics of ``sae`` on ``dataset``: a list of texts (or a ``datasets`` dataset
    with ``text``), a ``DataConfig``, or None (the SAE's training corpus config)."""
    from saelab.analysis import check_model, dataset_texts, model_for
    from saelab.cache import ensure_activations
    from saelab.evals import entry_downstream, reconstruction_metrics

    if split is not None and split not in SPLITS:
        raise ValueError(f"split={split!r} is not valid; allowed: {', '.join(SPLITS)}")
    if not isinstance(sequences, int) or sequences < 1:
        raise ValueError(f"sequences={sequences!r} is not valid; allowed: an integer >= 1")
    meta = sae.metadata
    model = model_for(sae, model)
    layer, comp = check_model(sae, model)
    texts = None
    if dataset is None or isinstance(dataset, DataConfig):
        if dataset is None and not meta.get("data_config"):
            raise ValueError("dataset=None: the SAE was trained on in-memory texts, not a "
                             "corpus config; allowed: a list of texts or a DataConfig")
        data = dataset or DataConfig(**meta["data_config"])
        split = split or "validation"
    else:
        texts = dataset_texts(dataset)
        ctx = int((meta.get("data_config") or {}).get("context_length", 128))
        data = DataConfig(max_tokens=max_tokens or 10**12, context_length=ctx, min_chars=1)
        split = split or "all"
    trained = meta.get("config") or {}
    validation_split = trained.get("validation_split", SAEConfig.validation_split)
    seed = (meta.get("data_config") or {}).get("split_seed", data.split_seed)
    entry = ensure_activations(model.config, data, [(layer, comp)], texts=texts,
                               model=model)[(layer, comp)]
    acts = (entry.read_runs(np.array([[0, entry.n_tokens]])) if split == "all" else
            entry.validation(entry.split(validation_split, seed), data.max_val_tokens))
    metrics = reconstruction_metrics(sae, acts)
    metrics |= entry_downstream(entry, data, model, sae, layer=layer, component=comp,
                                n_sequences=sequences, validation_split=validation_split,
                                seed=seed, split=split, texts=texts)
    return {**metrics, "eval/tokens": float(len(acts))}


# ---------------------------------------------------------------- configs from overrides


def compose_eval_config(overrides: Sequence[str], sae_meta: dict) -> tuple[ModelConfig,
                                                                            DataConfig]:
    """(model, data) configs from ``data=...``/``data.*=...``/``model...`` overrides over
    saelab's config groups; the model defaults to the SAE's."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from saelab.configs import conf_dir, register_configs, trial_from_dict

    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        if key.split(".", 1)[0] not in ("data", "model") or "=" not in o:
            raise ValueError(f"override {o!r} is not valid; allowed: data=<pydocs|files|hub>, "
                             "data.<field>=<value>, model=<preset> or model.<field>=<value>")
    model_given = any(o.lstrip("+~").startswith("model") for o in overrides)
    defaults = [] if model_given else [f"model.name={sae_meta.get('model_name')}",
                                       f"model.dtype={sae_meta.get('model_dtype', 'float32')}"]
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*defaults, *overrides])
    trial = trial_from_dict(OmegaConf.to_container(cfg, resolve=True))
    return trial.model, trial.data


def _table(metrics: dict[str, float]) -> str:
    from saelab.evals import DOWNSTREAM_METRICS
    from saelab.selection import fmt_value

    names = [*METRIC_ORDER, *DOWNSTREAM_METRICS, "eval/tokens"]
    width = max(map(len, names))
    return "\n".join(f"{n.ljust(width)}  {fmt_value(metrics[n])}" for n in names if n in metrics)


def evaluate_path(path: str | Path, overrides: Sequence[str], *, split: str | None = None,
                  sequences: int | None = None) -> dict[str, Any]:
    """``saelab eval``'s work: load the SAE at ``path``, evaluate it on the corpus the
    overrides give (default: its training corpus config) over ``sequences`` downstream
    sequences (default: as many as its trial used), return a JSON-able record."""
    from saelab.analysis import remember_path
    from saelab.sae import SAE
    from saelab.trace import shared_model

    sae = remember_path(SAE.load(path), path)
    model_cfg, data = compose_eval_config(overrides, sae.metadata)
    if not any(o.lstrip("+~").startswith("data") for o in overrides) and \
            sae.metadata.get("data_config"):
        data = DataConfig(**sae.metadata["data_config"])
    sequences = sequences or (sae.metadata.get("config") or {}).get(
        "downstream_sequences", SAEConfig.downstream_sequences)
    metrics = evaluate(sae, shared_model(model_cfg), data, split=split, sequences=sequences)
    return {"sae": str(Path(path).resolve()), "model": asdict(model_cfg), "data": asdict(data),
            "split": split or "validation", "sequences": sequences, "metrics": metrics}


def eval_main(argv: Sequence[str]) -> int:
    """``saelab eval SAE_PATH [data/model overrides] [--out FILE] [--split S] [--sequences N]``."""
    p = CommandParser(
        prog="saelab eval", description=__doc__.split("\n\n")[0],
        epilog="e.g. saelab eval outputs/quick/export/trial_3/sae.mlx data=files "
               "data.paths=[notes.txt] data.max_tokens=20000 --out eval.json")
    p.add_argument("sae", help="a saved SAE directory (sae.json + sae.safetensors)")
    p.add_argument("overrides", nargs="*", help="data=..., data.<field>=..., model...=...")
    p.add_argument("--out", help="also write the metrics as JSON to this file")
    p.add_argument("--split", choices=SPLITS, help="documents to evaluate on (default: the "
                   "SAE's held-out documents of the corpus)")
    p.add_argument("--sequences", type=int, help="sequences for the downstream metrics "
                   "(default: as many as the SAE's trial used)")
    args = p.parse_args(list(argv))
    try:
        record = evaluate_path(args.sae, args.overrides, split=args.split,
                               sequences=args.sequences)
    except (ValueError, FileNotFoundError) as e:
        print(f"saelab eval: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    data = record["data"]
    where = data["source"] if data["source"] == "pydocs" else \
        ", ".join(data["paths"]) or data["name"]
    print(f"[saelab] {record['sae']} on {where} ({record['split']} documents, "
          f"{int(record['metrics']['eval/tokens'])} tokens)")
    print(_table(record["metrics"]))
    if args.out:
        from saelab.paths import atomic_write_text

        atomic_write_text(args.out, json.dumps(record, indent=2))
        print(f"[saelab] metrics written to {args.out}")
    return 0
