"""Export a study's chosen trials: standalone configs, SAE weights, SAELens format, summary, report.

``saelab export STUDY`` reads only the Optuna storage and the files its trials
point to (the study is the record). It picks the Pareto set (multi-objective:
exactly ``study.best_trials``), the top N (single-objective) or the best
trials under a rule (``saelab.selection``), and writes into ``outputs/<study>/export/``:

- ``trial_<n>.yaml``: a complete Hydra config (schema ``trial_schema``, every
  field set, its own ``hydra:`` section) that
  ``saelab train --config-path <export dir> --config-name trial_<n>`` re-runs as is;
- ``trial_<n>/sae.mlx``: the trained SAE (``SAE.load`` / ``model.load_sae``);
- ``saelens/trial_<n>/`` (``--saelens``): ``cfg.json`` + ``sae_weights.safetensors``
  for ``sae_lens.SAE.load_from_disk``;
- ``summary.json``, ``summary.md`` and ``report.html``;
- with ``--eval-data "OVERRIDES"``: every exported SAE's reconstruction and downstream
  metrics on that corpus (``saelab.evaluate``; e.g. ``"data=files data.paths=[a.txt]"``,
  or ``""`` for the SAEs' training corpus), in the summary.

The export is built in a temporary sibling directory and renamed over the
target, so a failing export leaves nothing behind and an earlier one intact.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

import optuna
from omegaconf import OmegaConf
from optuna.trial import FrozenTrial, TrialState

from saelab.config import StudyConfig
from saelab.configs import trial_from_dict
from saelab.errors import CommandParser
from saelab.paths import atomic_dir, outputs_root
from saelab.report import write_report
from saelab.saelens import write_saelens
from saelab.selection import DEFAULT_TOP, KEY_METRICS, fmt_value, select_trials
from saelab.study import load_existing_study, objectives_of


# ---------------------------------------------------------------- files of one trial

def standalone_config(t: FrozenTrial, study_name: str) -> dict[str, Any]:
    """A complete Hydra primary config that re-runs trial ``t`` without the sweep file."""
    config = t.user_attrs.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"trial {t.number} of study {study_name!r} has no 'config' record; "
                         "it cannot be exported")
    try:
        trial = trial_from_dict(config)
    except TypeError as e:  # an unknown key: the record is not a TrialConfig
        raise ValueError(f"trial {t.number}: its config is not a valid trial config ({e})") from e
    fields = asdict(trial)
    fields["output_dir"] = None  # never write into the original trial's directory
    tag = re.sub(r"[^\w.-]", "_", f"{study_name}-trial_{t.number}")
    out = "${oc.env:SAELAB_OUTPUTS,outputs}"
    return {"defaults": ["trial_schema", "_self_"], **fields,
            "hydra": {"run": {"dir": f"{out}/runs/${{now:%Y-%m-%d}}/${{now:%H-%M-%S}}-{tag}"},
                      "sweep": {"dir": f"{out}/reruns/{tag}", "subdir": "${hydra.job.num}"},
                      "job": {"chdir": False}}}


def write_config(path: Path, t: FrozenTrial, study_name: str, export_dir: Path) -> None:
    cfg = OmegaConf.create(standalone_config(t, study_name))
    header = (f"# Trial {t.number} of study {study_name!r}, exported by `saelab export`.\n"
              f"# Re-run as is:  saelab train --config-path {export_dir} --config-name {path.stem}\n")
    path.write_text(header + OmegaConf.to_yaml(cfg))


# ---------------------------------------------------------------- summary

def summary_markdown(summary: dict[str, Any]) -> str:
    """``summary.md``: the exported trials' params and metrics as a table, and how to re-run them."""
    rows = summary["exported"]
    params = sorted({p for r in rows for p in r["params"]})
    metrics = [m for m in dict.fromkeys([*summary["objectives"], *KEY_METRICS])
               if any(m in r["metrics"] for r in rows)]
    cols = ["trial", *params, *metrics, "config", "SAE"]
    lines = [f"# Study `{summary['study']}`: exported trials", "",
             f"{summary['selection']}; {len(rows)} of {summary['n_complete']} finished trials "
             f"({summary['n_trials']} in all). Objectives (minimized): "
             f"{', '.join(summary['objectives'])}.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [str(r["number"]), *(fmt_value(r["params"].get(p)) for p in params),
                 *(fmt_value(r["metrics"].get(m)) for m in metrics), f"`{r['config']}`", f"`{r['sae']}`"]
        lines.append("| " + " | ".join(cells) + " |")
    if summary.get("eval_data") is not None:
        from saelab.evaluate import METRIC_ORDER
        from saelab.evals import DOWNSTREAM_METRICS

        names = [m for m in (*METRIC_ORDER, *DOWNSTREAM_METRICS, "eval/tokens")
                 if any(m in r["eval"] for r in rows)]
        lines += ["", f"## Evaluation on `{summary['eval_data'] or 'the training corpus'}`", "",
                  "| trial | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
        lines += ["| " + " | ".join([str(r["number"]), *(fmt_value(r["eval"].get(m))
                                                           for m in names)]) + " |" for r in rows]
    lines += ["", "Re-run a trial: `saelab train --config-path <this dir> --config-name trial_<n>`."]
    if summary["wandb_sync"]:
        lines += ["", f"Upload the offline W&B runs: `{summary['wandb_sync']}`"]
    return "\n".join(lines) + "\n"


def wandb_sync_command(study: optuna.Study) -> Optional[str]:
    """``wandb sync`` over the offline W&B runs of the study's trials that exist on disk."""
    dirs = [d for t in study.get_trials(deepcopy=False)
            if (d := t.user_attrs.get("wandb_run_dir")) and Path(d).is_dir()]
    return "wandb sync " + " ".join(shlex.quote(d) for d in dict.fromkeys(dirs)) if dirs else None


# ---------------------------------------------------------------- export

def default_export_dir(study_name: str) -> Path:
    return outputs_root() / re.sub(r"[^\w.-]", "_", study_name) / "export"


def export_study(study: optuna.Study, out: str | os.PathLike, trials: Sequence[FrozenTrial], *,
                 selection: str = "", saelens: bool = False, storage_url: str = "",
                 report: bool = True, eval_data: Optional[str] = None) -> dict[str, Any]:
    """Write the export of ``trials`` to ``out`` atomically; returns the summary dict.
    ``eval_data``: data overrides to evaluate every exported SAE on (see the module doc)."""
    out = Path(out).resolve()
    for t in trials:  # everything checkable is checked before anything is written
        sae = t.user_attrs.get("sae_path")
        if not sae or not (Path(sae) / "sae.json").is_file():
            raise ValueError(f"trial {t.number}: sae_path={sae!r} is not a saved SAE directory")
        standalone_config(t, study.study_name)
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    try:
        with atomic_dir(out) as tmp:
            exported = []
            for t in trials:
                name = f"trial_{t.number}"
                write_config(tmp / f"{name}.yaml", t, study.study_name, out)
                shutil.copytree(t.user_attrs["sae_path"], tmp / name / "sae.mlx")
                if saelens:
                    write_saelens(tmp / name / "sae.mlx", tmp / "saelens" / name,
                                  t.user_attrs["config"], t.number)
                exported.append({
                    "number": t.number, "values": t.values, "params": t.params,
                    "metrics": t.user_attrs.get("metrics", {}), "config": f"{name}.yaml",
                    "sae": f"{name}/sae.mlx", "saelens": f"saelens/{name}" if saelens else None,
                    "source_sae_path": t.user_attrs["sae_path"], "run_dir": t.user_attrs.get("run_dir"),
                    "wandb_run_dir": t.user_attrs.get("wandb_run_dir"),
                })
                if eval_data is not None:
                    from saelab.evaluate import evaluate_path

                    exported[-1]["eval"] = evaluate_path(tmp / name / "sae.mlx",
                                                         shlex.split(eval_data))["metrics"]
            all_trials = study.get_trials(deepcopy=False)
            summary = {
                "study": study.study_name, "storage": storage_url, "objectives": objectives_of(study),
                "directions": [d.name.lower() for d in study.directions],
                "constraints": study.user_attrs.get("constraints", {}), "selection": selection,
                "n_trials": len(all_trials),
                "n_complete": sum(t.state == TrialState.COMPLETE for t in all_trials),
                "exported": exported, "wandb_sync": wandb_sync_command(study),
                "report": "report.html" if report else None, "eval_data": eval_data,
            }
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
            (tmp / "summary.md").write_text(summary_markdown(summary))
            if report:
                write_report(study, tmp / "report.html", trials)
    except BaseException:
        for p in created:  # parents this export made, if still empty
            try:
                p.rmdir()
            except OSError:
                break
        raise
    return summary


# ---------------------------------------------------------------- commands

def export_main(argv: Sequence[str]) -> int:
    """``saelab export STUDY [--storage URL] [--out DIR] [--top N] [--rule RULE] [--saelens]``."""
    p = CommandParser(
        prog="saelab export", description=__doc__.split("\n\n")[0],
        epilog="RULE: min|max NAME [where NAME OP NUMBER [and ...]], OP one of <= < >= > ==, "
               "e.g. \"min val/nmse where val/dead_fraction<=0.05\"")
    p.add_argument("study", help="study name (study.name of the sweep)")
    p.add_argument("--storage", default=StudyConfig.storage, help="Optuna storage URL")
    p.add_argument("--out", help="export directory (default: outputs/<study>/export)")
    p.add_argument("--top", type=int, help=f"single-objective: the best N trials (default "
                   f"{DEFAULT_TOP}); with --rule: the best N under it (default 1)")
    p.add_argument("--rule", help="export the best trial(s) under this rule instead")
    p.add_argument("--saelens", action="store_true", help="also write SAELens-format SAEs")
    p.add_argument("--eval-data", metavar="OVERRIDES", nargs="?", const="",
                   help="evaluate each exported SAE on this corpus, e.g. \"data=files "
                        "data.paths=[a.txt]\" (alone: the SAEs' training corpus)")
    args = p.parse_args(list(argv))
    try:
        study = load_existing_study(args.study, args.storage)
        trials, selection = select_trials(study, args.top, args.rule)
        out = Path(args.out) if args.out else default_export_dir(args.study)
        summary = export_study(study, out, trials, selection=selection, saelens=args.saelens,
                               storage_url=args.storage, eval_data=args.eval_data)
    except (ValueError, FileNotFoundError) as e:
        print(f"saelab export: {e}", file=sys.stderr)
        return 2
    out = out.resolve()
    print(f"[saelab] {selection}: exported trials {[r['number'] for r in summary['exported']]} "
          f"of study {args.study!r} to {out}")
    print(f"[saelab] summary: {out / 'summary.md'}; report: {out / 'report.html'}")
    first = summary["exported"][0]["number"]
    print(f"[saelab] re-run: saelab train --config-path {out} --config-name trial_{first}")
    if summary["wandb_sync"]:
        print(f"[saelab] upload the offline W&B runs: {summary['wandb_sync']}")
    return 0
