"""The ``saelab`` command: doctor, prepare, train, sweep, trials, export, dashboard."""

from __future__ import annotations

import sys

import saelab  # noqa: F401  (fast path before mlx.core)

USAGE = """usage: saelab COMMAND [ARGS]

commands:
  doctor                 MLX version, device, BLAS in use, measured matmul GFLOP/s vs numpy
  prepare [overrides]    fetch/convert the model and capture the activations of a config, then stop
  train [overrides]      train one SAE from Hydra-composed configs (conf/), e.g.
                           saelab train layer=10 component=mlp sae.expansion_factor=16 sae.k=32
                         `saelab train --multirun sweep=NAME` runs a study (same as `saelab sweep`)
  sweep sweep=NAME [overrides]
                         run (or resume) an Optuna study defined in NAME.yaml of ./sweeps/
                         or saelab's own sweeps (smoke, quick, layers, k_expansion), e.g.
                           saelab sweep sweep=quick study.n_trials=8 study.n_jobs=2
  trials STUDY           table of a study's trials with the Pareto set marked
  export STUDY           Pareto/best trials -> configs, weights, SAELens format, report.html
  dashboard STUDY        serve the study with optuna-dashboard on 127.0.0.1
"""


def _run_hydra(args: list[str], task) -> int:
    """Run ``task`` as a Hydra app over saelab's configs with ``args`` as its command line
    (the ``sweep`` group: see saelab/configs.py)."""
    import hydra

    from saelab import configs
    from saelab.config import register_configs

    register_configs()
    app = hydra.main(config_path=str(configs.conf_dir()), config_name="config",
                     version_base="1.3")(task)
    sys.argv = ["saelab", *args]
    app()
    return 0


def _prepare_task(cfg) -> None:
    from omegaconf import OmegaConf

    from saelab.cache import ensure_activations
    from saelab.config import trial_from_dict
    from saelab.trial import validate_trial

    trial = trial_from_dict(OmegaConf.to_container(cfg, resolve=True))
    validate_trial(trial)
    entry = ensure_activations(trial.model, trial.data, [(trial.layer, trial.component)],
                               root=trial.cache_dir)[(trial.layer, trial.component)]
    print(f"[saelab] activations ready: {entry.n_tokens} tokens x {entry.d_model} at {entry.path}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "doctor":
        from saelab.doctor import main as doctor

        return doctor(rest)
    if cmd == "train":
        from saelab.trial import hydra_task

        return _run_hydra(rest, hydra_task)
    if cmd == "sweep":
        from saelab.trial import hydra_task

        return _run_hydra(["--multirun", *rest], hydra_task)
    if cmd == "prepare":
        return _run_hydra(rest, _prepare_task)
    if cmd == "trials":
        from saelab.trials import trials_main

        return trials_main(rest)
    if cmd == "export":
        from saelab.export import export_main

        return export_main(rest)
    if cmd == "dashboard":
        from saelab.trials import dashboard_main

        return dashboard_main(rest)
    print(f"saelab: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
