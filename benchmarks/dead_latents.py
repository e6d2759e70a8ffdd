"""Dead-latent strategies at equal tokens on the quality recipe: AuxK (the default),
resampling (``sae.resample_every``), both, and neither. One JSON line.

Each variant is the config ``saelab train`` composes from ``train=reference
data.max_tokens=400000 sae.lr_decay=constant`` plus the variant's overrides (the
quality recipe: SmolLM2 layer-10 MLP, pydocs corpus, 400k captured tokens, expansion
16, k 32, batch 1024, lr 1e-3, 1M token-steps, rate constant after warm-up;
downstream metrics at the end on the default held-out sequences), run by
``saelab.trial.run_trial``; the ``auxk`` variant is that config unchanged.

    python benchmarks/dead_latents.py [--variants auxk,resample,neither] [--out DIR]
    python benchmarks/dead_latents.py --quick-trial end|off [--cache-dir DIR] [--repeat N]

``--quick-trial`` instead times one quick-sweep-shaped trial (``sweep=quick``, x8 k32 lr
1e-3) with ``sae.downstream_eval`` end or off: what the downstream metrics cost a trial.

Per variant: validation nMSE (all tokens, lowest-norm 99%), ``val/dead_fraction``
(latents that never fire on the validation tokens), the training dead fraction
(latents not fired in the last ``dead_tokens_threshold`` tokens) at the end and at
its peak, latents re-initialized by resampling, and the downstream metrics.
"""

import argparse
import json
import tempfile
import time

import saelab  # noqa: F401  (fast path before mlx.core)
from saelab.accel import STATE
from saelab.evals import DOWNSTREAM_METRICS
from saelab.trial import run_trial

RECIPE = ["train=reference", "data.max_tokens=400000", "sae.lr_decay=constant", "layer=10",
          "component=mlp", "sae.expansion_factor=16", "sae.k=32"]
VARIANTS = {
    "auxk": [],
    "resample": ["sae.auxk=false", "sae.resample_every=100"],
    "auxk_resample": ["sae.resample_every=100"],
    "neither": ["sae.auxk=false"],
}


def compose_trial(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from saelab.configs import conf_dir, register_configs, trial_from_dict

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return trial_from_dict(OmegaConf.to_container(
            compose(config_name="config", overrides=overrides), resolve=True))


class DeadCurve:
    """The training dead fraction at each log and the latents resampled in all."""

    def __init__(self) -> None:
        self.dead: list[float] = []
        self.resampled = 0

    def on_start(self, config: dict) -> None: ...
    def on_eval(self, step: int, metrics: dict) -> None: ...
    def on_end(self, metrics: dict) -> None: ...

    def on_log(self, step: int, metrics: dict) -> None:
        self.dead.append(metrics["train/dead_fraction"])
        self.resampled += int(metrics.get("train/resampled", 0))


def quick_trial(arm: str, cache_dir: str | None, repeat: int = 1) -> dict:
    import os

    from saelab.paths import activation_cache_root

    cache_dir = cache_dir or str(activation_cache_root())  # before W&B's outputs move
    cfg = compose_trial(["sweep=quick", "sae.expansion_factor=8", "sae.k=32",
                         "sae.learning_rate=0.001", f"sae.downstream_eval={arm}",
                         f"cache_dir={cache_dir}"])
    load, trials = os.getloadavg(), []
    for _ in range(repeat):  # one process, as a sweep worker runs its trials
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["SAELAB_OUTPUTS"] = tmp  # W&B's offline run
            m = run_trial(cfg, output_dir=tmp, progress=False).metrics
        trials.append({"trial_s": round(time.perf_counter() - t, 1),
                       "downstream_s": round(m.get("time/downstream_s", 0.0), 2),
                       "train_s": round(m["time/train_s"], 1)})
    return {"benchmark": "downstream_cost", "downstream_eval": arm, **trials[0],
            "trials": trials, "load_before": load, "load_after": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="auxk,resample,neither")
    ap.add_argument("--out", default=None, help="keep each variant's SAE in DIR/<variant>")
    ap.add_argument("--quick-trial", choices=["end", "off"], default=None)
    ap.add_argument("--repeat", type=int, default=1, help="--quick-trial: trials in one process")
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()
    if args.quick_trial:
        print(json.dumps(quick_trial(args.quick_trial, args.cache_dir, args.repeat)))
        return
    out = {"benchmark": "dead_latents", "blas": STATE.blas, "recipe": RECIPE}
    for name in args.variants.split(","):
        cfg = compose_trial(RECIPE + VARIANTS[name])
        curve, t = DeadCurve(), time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            where = f"{args.out}/{name}" if args.out else tmp
            m = run_trial(cfg, [curve], output_dir=where, progress=False).metrics
        out[name] = {
            "nmse": round(m["val/nmse"], 4), "nmse_p99": round(m["val/nmse_p99"], 4),
            "val_dead_fraction": round(m["val/dead_fraction"], 5),
            "train_dead_fraction": round(curve.dead[-1], 5),
            "train_dead_fraction_max": round(max(curve.dead), 5),
            "resampled": curve.resampled,
            **{k.removeprefix("val/"): round(m[k], 5) for k in DOWNSTREAM_METRICS},
            "train_tokens_per_s": round(m["time/tokens_per_s"]),
            "downstream_s": round(m["time/downstream_s"], 1),
            "train_tokens": m["train/tokens"], "config": VARIANTS[name],
            "wall_s": round(time.perf_counter() - t, 1)}
        print(json.dumps({name: out[name]}), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
