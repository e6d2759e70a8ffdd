"""A saelab TopK SAE in SAELens' on-disk format (``cfg.json`` +
``sae_weights.safetensors``), loadable with ``sae_lens.SAE.load_from_disk``
without saelab, MLX or a conversion step; ``saelab export --saelens`` writes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

SAELENS_HOOKS = {"mlp": "hook_mlp_out", "attn": "hook_attn_out", "output": "hook_resid_post"}
"""SAELens (TransformerLens hook point) names of saelab's components."""
SAELENS_FORMAT_VERSION = "6.54.12"
"""The SAELens version whose ``cfg.json`` layout is written (>= 6.0 skips its legacy-config path)."""
HF_MODEL_IDS = {"smollm2_135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
"""Hugging Face ids of saelab's model presets (SAELens names models by hub id)."""


def write_saelens(sae_dir: Path, out: Path, config: dict[str, Any], number: int) -> None:
    """SAELens 6.x ``cfg.json`` + ``sae_weights.safetensors`` for a saelab TopK SAE.

    SAELens has no stored input scale for ``load_from_disk``, so the scale
    ``s`` is folded into the weights (as its ``fold_activation_norm_scaling_factor``
    does): W_enc' = s * W_enc.T, W_dec' = W_dec / s, b_dec' = b_dec / s. Then
    SAELens' ``topk(relu)((x - b_dec') @ W_enc' + b_enc) @ W_dec' + b_dec'`` on raw
    ``x`` equals saelab's reconstruction."""
    meta = json.loads((sae_dir / "sae.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(str(sae_dir / "sae.safetensors")).items()}
    s = float(w["input_scale"])
    w_dec = w["W_enc"] if meta["tied_weights"] else w["W_dec"]
    weights = {"W_enc": np.ascontiguousarray(w["W_enc"].T * s), "b_enc": w["b_enc"],
               "W_dec": w_dec / s, "b_dec": w["b_dec"] / s}
    layer, component = config["layer"], config["component"]
    data, model_name = config["data"], config["model"]["name"]
    cfg = {
        "architecture": "topk", "d_in": meta["d_model"], "d_sae": meta["d_hidden"], "k": meta["k"],
        "rescale_acts_by_decoder_norm": False, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
            "model_name": HF_MODEL_IDS.get(model_name, model_name),
            "hook_name": f"blocks.{layer}.{SAELENS_HOOKS[component]}", "hook_layer": layer,
            "hook_head_index": None, "context_size": data["context_length"], "prepend_bos": True,
            "dataset_path": data["name"] if data["source"] == "hub" else data["source"],
            "saelab": {"trial": number, "component": component, "folded_input_scale": s,
                       "metrics": meta.get("metadata", {}).get("metrics")},
        },
    }
    out.mkdir(parents=True)
    save_file({k: v.astype(np.float32) for k, v in weights.items()},
              str(out / "sae_weights.safetensors"))
    (out / "cfg.json").write_text(json.dumps(cfg, indent=2))
