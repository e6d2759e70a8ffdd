"""Quality bar on the default model: SmolLM2 layer-10 MLP, pydocs corpus, 1M token-steps.

Reference (PyTorch TopK SAE, same recipe, design.md): expansion 16, k 32, batch 1024,
lr 1e-3 -> normalized MSE 0.101 (all tokens) / 0.159 (lowest-norm 99%), dead 0.02% with
AuxK (0.56% without); k 64 -> 0.085; expansion 8 -> 0.111. Bar: nmse <= 0.11,
nmse_p99 <= 0.17, dead < 1%. Prints one JSON line with every variant's figures.

    python benchmarks/quality.py [--variants base,no_auxk,k64,x8] [--train-tokens 1000000]
"""

import argparse
import json
import tempfile
import time

import saelab  # noqa: F401  (fast path before mlx.core)
from saelab.accel import STATE
from saelab.config import DataConfig, SAEConfig, TrialConfig
from saelab.trial import run_trial

VARIANTS = {
    "base": {},
    "no_auxk": {"auxk": False},
    "k64": {"k": 64},
    "x8": {"expansion_factor": 8},
    "linear0": {"lr_decay": "linear", "min_lr_ratio": 0.0},
    "lr2e-3": {"learning_rate": 2e-3},
    "lr2e-3_auxk8": {"learning_rate": 2e-3, "auxk_coefficient": 0.125},
    "lr1.5e-3": {"learning_rate": 1.5e-3},
    "noclip": {"gradient_clip": 0.0},
    # the recipe differences to the PyTorch reference, one at a time
    "bdec_mean": {"b_dec_init": "mean"},
    "constant_lr": {"lr_decay": "constant"},
    "unit_norm": {"input_norm_target": 1.0},
    "kaux256": {"k_aux": 256},
    # dead-latent strategies at equal tokens: AuxK (base), resampling, neither (no_auxk)
    "resample": {"auxk": False, "resample_every": 100},
    "auxk_resample": {"resample_every": 100},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--train-tokens", type=int, default=1_000_000)
    ap.add_argument("--max-tokens", type=int, default=400_000)
    args = ap.parse_args()
    out = {"benchmark": "quality", "blas": STATE.blas, "layer": 10, "component": "mlp",
           "captured_tokens_budget": args.max_tokens, "train_tokens": args.train_tokens}
    for name in args.variants.split(","):
        recipe = {"expansion_factor": 16, "k": 32, "learning_rate": 1e-3, "batch_size": 1024,
                  "train_tokens": args.train_tokens}
        sae = SAEConfig(**{**recipe, **VARIANTS[name]})
        cfg = TrialConfig(data=DataConfig(max_tokens=args.max_tokens), sae=sae, layer=10,
                          component="mlp")
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            r = run_trial(cfg, output_dir=tmp, progress=False)
        m = r.metrics
        out[name] = {"nmse": round(m["val/nmse"], 4), "nmse_p99": round(m["val/nmse_p99"], 4),
                     "dead_fraction": round(m["val/dead_fraction"], 5), "l0": m["val/l0"],
                     "train_tokens_per_s": round(m["time/tokens_per_s"]),
                     "capture_s": round(m["time/capture_s"], 1), "wall_s": round(time.perf_counter() - t, 1)}
        print(json.dumps({name: out[name]}), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
