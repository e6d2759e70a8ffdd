"""The ``saelab`` command: doctor, prepare, train, sweep, trials, export, dashboard, eval,
features."""

from __future__ import annotations

import functools
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
  eval SAE_PATH [data overrides] [--out FILE]
                         reconstruction and downstream (LM loss, KL) metrics of a saved SAE
  features SAE_PATH      browse an SAE's features on a local web page (127.0.0.1)
"""


def _check_flags(args: list[str]) -> None:
    """Unknown options fail as one line here, not as Hydra's multi-line argparse usage."""
    from hydra._internal.utils import get_args_parser

    allowed = "Hydra's options (saelab train --hydra-help) and KEY=VALUE overrides"
    parser = get_args_parser()

    def error(message: str):
        raise ValueError(f"{message}; allowed: {allowed}")

    parser.error = error  # this parser instance only
    _, unknown = parser.parse_known_args(args)
    if unknown:
        raise ValueError(f"{' '.join(unknown)} is not valid: unknown option; allowed: {allowed}")


def _run_hydra(cmd: str, args: list[str], task) -> int:
    """Run ``task`` as a Hydra app over saelab's configs with ``args`` as its command line
    (the ``sweep`` group: see saelab/configs.py). Bad input is one line and exit 2
    (saelab.errors); ``HYDRA_FULL_ERROR=1`` keeps Hydra's tracebacks."""
    import os

    import hydra

    from saelab import configs
    from saelab.configs import register_configs
    from saelab.errors import full_errors, one_line

    user_full = full_errors()
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises; the error is printed below

    @functools.wraps(task)
    def single_run(cfg):  # Hydra would log the failed job's overrides first: a second line
        try:
            return task(cfg)
        except Exception as e:
            brief = None if user_full else one_line(e, args)
            if brief is None:
                raise
            print(f"saelab {cmd}: {brief[0]}", file=sys.stderr)
            raise SystemExit(brief[1]) from None

    multirun = "-m" in args or "--multirun" in args  # there a failed job fails its trial only
    try:
        _check_flags(args)
        register_configs()
        app = hydra.main(config_path=str(configs.conf_dir()), config_name="config",
                         version_base="1.3")(task if multirun else single_run)
        sys.argv = ["saelab", *args]
        app()
    except Exception as e:
        brief = None if user_full else one_line(e, args)
        if brief is None:
            raise
        print(f"saelab {cmd}: {brief[0]}", file=sys.stderr)
        return brief[1]
    finally:
        if not user_full:
            os.environ.pop("HYDRA_FULL_ERROR", None)
    return 0


def _prepare_task(cfg) -> None:
    from omegaconf import OmegaConf

    from saelab.cache import ensure_activations
    from saelab.configs import trial_from_dict
    from saelab.trial import validate_trial

    trial = trial_from_dict(OmegaConf.to_container(cfg, resolve=True))
    validate_trial(trial)
    entry = ensure_activations(trial.model, trial.data, [(trial.layer, trial.component)],
                               root=trial.cache_dir)[(trial.layer, trial.component)]
    print(f"[saelab] activations ready: {entry.n_tokens} tokens x {entry.d_model} in "
          f"{entry.n_shards} shards at {entry.path}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "doctor":
        from saelab.doctor import main as doctor

        if rest:
            print(f"saelab doctor: {' '.join(rest)} is not valid; allowed: no arguments",
                  file=sys.stderr)
            return 2
        return doctor(rest)
    if cmd == "train":
        from saelab.trial import hydra_task

        return _run_hydra(cmd, rest, hydra_task)
    if cmd == "sweep":
        from saelab.trial import hydra_task

        if not any(a.split("=", 1)[0].lstrip("+") in ("sweep", "hydra/sweeper") for a in rest):
            from saelab.configs import sweep_dirs

            names = sorted({f.stem for d in sweep_dirs() for f in d.glob("*.yaml")})
            print(f"saelab sweep: sweep=NAME is missing; allowed: sweep=NAME, NAME one of "
                  f"{', '.join(names)} (./sweeps/ and saelab's own)", file=sys.stderr)
            return 2
        return _run_hydra(cmd, ["--multirun", *rest], hydra_task)
    if cmd == "prepare":
        return _run_hydra(cmd, rest, _prepare_task)
    if cmd == "trials":
        from saelab.trials import trials_main

        return trials_main(rest)
    if cmd == "export":
        from saelab.export import export_main

        return export_main(rest)
    if cmd == "dashboard":
        from saelab.trials import dashboard_main

        return dashboard_main(rest)
    if cmd == "eval":
        from saelab.evaluate import eval_main

        return eval_main(rest)
    if cmd == "features":
        from saelab.features_app import features_main

        return features_main(rest)
    print(f"saelab: command {cmd!r} is not valid; allowed: doctor, prepare, train, sweep, trials, "
          "export, dashboard (saelab --help)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
