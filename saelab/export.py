"""Export a study's chosen trials: standalone configs, SAE weights, SAELens format, summary, report.

``saelab export STUDY`` reads only the Optuna storage and the files its trials
point to (the study is the record). It picks the Pareto set (multi-objective:
exactly ``study.best_trials``), the top N (single-objective) or the best
trials under a rule, and writes into ``outputs/<study>/export/``:

- ``trial_<n>.yaml``: a complete Hydra config (schema ``trial_schema``, every
  field set, its own ``hydra:`` section) that
  ``saelab train --config-path <export dir> --config-name trial_<n>`` re-runs as is;
- ``trial_<n>/sae.mlx``: the trained SAE (``SAE.load`` / ``model.load_sae``);
- ``saelens/trial_<n>/`` (``--saelens``): ``cfg.json`` + ``sae_weights.safetensors``
  for ``sae_lens.SAE.load_from_disk``;
- ``summary.json``, ``summary.md`` and ``report.html``.

The export is built in a temporary sibling directory and renamed over the
target, so a failing export leaves nothing behind and an earlier one intact.

Rule syntax (``--rule``)::

    RULE := ("min" | "max") NAME ["where" COND ("and" COND)*]
    COND := NAME ("<=" | "<" | ">=" | ">" | "==") NUMBER

NAME is a trial metric (``val/nmse``) or a swept parameter (``sae.k``), e.g.
``min val/nmse where val/dead_fraction<=0.05 and sae.k<=32``.
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import os
import re
import shlex
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from saelab.config import StudyConfig, trial_from_dict
from saelab.paths import atomic_dir
from saelab.study import load_existing_study, objectives_of

KEYWORDS = ("min", "max", "where", "and")
OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt, "==": operator.eq}
KEY_METRICS = ("val/nmse", "val/nmse_p99", "val/explained_variance", "val/l0",
               "val/dead_fraction", "train/tokens", "time/wall_s")
DEFAULT_TOP = 3
"""Trials exported from a single-objective study without ``--top`` (a rule exports 1)."""

# SAELens names of saelab's components (TransformerLens hook points)
SAELENS_HOOKS = {"mlp": "hook_mlp_out", "attn": "hook_attn_out", "output": "hook_resid_post"}
SAELENS_FORMAT_VERSION = "6.54.12"
"""The SAELens version whose ``cfg.json`` layout is written (>= 6.0 skips its legacy-config path)."""
HF_MODEL_IDS = {"smollm2_135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


# ---------------------------------------------------------------- selection

def trial_values(t: FrozenTrial) -> dict[str, Any]:
    """What a rule can name: the trial's params and final metrics."""
    return {**t.params, **t.user_attrs.get("metrics", {})}


@dataclass(frozen=True)
class Rule:
    """``min|max NAME [where NAME OP NUMBER [and ...]]`` (see the module docstring)."""

    direction: str
    name: str
    conditions: tuple[tuple[str, str, float], ...] = ()

    _TOKEN = re.compile(r"\s*(?:(<=|>=|==|<|>)|([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
                        r"|([A-Za-z_][\w./-]*))")

    @classmethod
    def parse(cls, text: str) -> "Rule":
        tokens, pos, text = [], 0, text.strip()
        while pos < len(text):
            m = cls._TOKEN.match(text, pos)
            if not m or m.end() == pos:
                raise ValueError(f"--rule={text!r}: unexpected {text[pos:].split()[0]!r} at "
                                 f"character {pos}; allowed: min|max NAME [where NAME OP NUMBER "
                                 "[and ...]] with OP one of <= < >= > ==")
            kind = "op" if m.group(1) else "num" if m.group(2) else "name"
            tokens.append((kind, m.group(m.lastindex)))
            pos = m.end()

        def take(i: int, kind: str, what: str, words: tuple[str, ...] = ()) -> str:
            if i >= len(tokens):
                raise ValueError(f"--rule={text!r}: ends where {what} was expected")
            k, v = tokens[i]
            if k != kind or (words and v not in words) or (not words and v in KEYWORDS):
                raise ValueError(f"--rule={text!r}: unexpected {v!r} (token {i + 1}); "
                                 f"expected {what}")
            return v

        direction = take(0, "name", "min or max", ("min", "max"))
        name = take(1, "name", "a metric or parameter name")
        conditions, i = [], 2
        while i < len(tokens):
            take(i, "name", "'where'" if i == 2 else "'and'", ("where",) if i == 2 else ("and",))
            conditions.append((take(i + 1, "name", "a metric or parameter name"),
                               take(i + 2, "op", "one of <= < >= > =="),
                               float(take(i + 3, "num", "a number"))))
            i += 4
        return cls(direction, name, tuple(conditions))

    def check_names(self, known: set[str]) -> None:
        for name in [self.name, *(c[0] for c in self.conditions)]:
            if name not in known:
                raise ValueError(f"--rule: unknown name {name!r}; allowed: {', '.join(sorted(known))}")

    def admits(self, values: dict[str, Any]) -> bool:
        def number(v: Any) -> bool:  # categorical values (component=mlp) never compare
            return isinstance(v, (int, float)) and math.isfinite(v)

        return number(values.get(self.name)) and all(
            number(values.get(n)) and OPS[op](values[n], x) for n, op, x in self.conditions)

    def __str__(self) -> str:
        conds = " and ".join(f"{n}{op}{x:g}" for n, op, x in self.conditions)
        return f"{self.direction} {self.name}" + (f" where {conds}" if conds else "")


def select_trials(study: optuna.Study, top: Optional[int] = None,
                  rule: Optional[str] = None) -> tuple[list[FrozenTrial], str]:
    """The trials to export and a one-line description of how they were chosen."""
    if top is not None and top < 1:
        raise ValueError(f"--top={top} is not valid; allowed: an integer >= 1")
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        states = sorted({t.state.name for t in study.get_trials(deepcopy=False)})
        raise ValueError(f"study {study.study_name!r} has no finished (COMPLETE) trial to export "
                         f"(trial states: {', '.join(states) or 'no trials'})")
    if rule is not None:
        parsed = Rule.parse(rule)
        parsed.check_names({k for t in done for k in trial_values(t)})
        ok = [t for t in done if parsed.admits(trial_values(t))]
        if not ok:
            raise ValueError(f"--rule={rule!r}: no finished trial satisfies it "
                             f"({len(done)} finished trials)")
        sign = 1 if parsed.direction == "min" else -1
        ok.sort(key=lambda t: (sign * trial_values(t)[parsed.name], t.number))
        return ok[: top or 1], f"rule: {parsed}"
    if len(study.directions) > 1:
        if top is not None:
            raise ValueError(f"--top={top} is not valid for the multi-objective study "
                             f"{study.study_name!r} (its Pareto set is exported); allowed: "
                             "--rule to pick by one metric")
        return sorted(study.best_trials, key=lambda t: t.number), "Pareto set (study.best_trials)"
    sign = 1 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1
    ranked = sorted(done, key=lambda t: (sign * t.value, t.number))
    n = top or DEFAULT_TOP
    return ranked[:n], f"top {n} by {objectives_of(study)[0]}"


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
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(standalone_config(t, study_name))
    header = (f"# Trial {t.number} of study {study_name!r}, exported by `saelab export`.\n"
              f"# Re-run as is:  saelab train --config-path {export_dir} --config-name {path.stem}\n")
    path.write_text(header + OmegaConf.to_yaml(cfg))


def write_saelens(sae_dir: Path, out: Path, config: dict[str, Any], number: int) -> None:
    """SAELens 6.x ``cfg.json`` + ``sae_weights.safetensors`` for a saelab TopK SAE.

    SAELens has no stored input scale for ``load_from_disk``, so the scale
    ``s`` is folded into the weights (as its ``fold_activation_norm_scaling_factor``
    does): W_enc' = s * W_enc.T, W_dec' = W_dec / s, b_dec' = b_dec / s. Then
    SAELens' ``topk(relu)((x - b_dec') @ W_enc' + b_enc) @ W_dec' + b_dec'`` on raw
    ``x`` equals saelab's reconstruction."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

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


# ---------------------------------------------------------------- summary

def fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else f"{v:.4g}"
    return "" if v is None else str(v)


def summary_markdown(summary: dict[str, Any]) -> str:
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
    from saelab.paths import outputs_root

    return outputs_root() / re.sub(r"[^\w.-]", "_", study_name) / "export"


def export_study(study: optuna.Study, out: str | os.PathLike, trials: Sequence[FrozenTrial], *,
                 selection: str = "", saelens: bool = False, storage_url: str = "",
                 report: bool = True) -> dict[str, Any]:
    """Write the export of ``trials`` to ``out`` atomically; returns the summary dict."""
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
            all_trials = study.get_trials(deepcopy=False)
            summary = {
                "study": study.study_name, "storage": storage_url, "objectives": objectives_of(study),
                "directions": [d.name.lower() for d in study.directions],
                "constraints": study.user_attrs.get("constraints", {}), "selection": selection,
                "n_trials": len(all_trials),
                "n_complete": sum(t.state == TrialState.COMPLETE for t in all_trials),
                "exported": exported, "wandb_sync": wandb_sync_command(study),
                "report": "report.html" if report else None,
            }
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
            (tmp / "summary.md").write_text(summary_markdown(summary))
            if report:
                from saelab.report import write_report

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
    p = argparse.ArgumentParser(
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
    args = p.parse_args(list(argv))
    try:
        study = load_existing_study(args.study, args.storage)
        trials, selection = select_trials(study, args.top, args.rule)
        out = Path(args.out) if args.out else default_export_dir(args.study)
        summary = export_study(study, out, trials, selection=selection, saelens=args.saelens,
                               storage_url=args.storage)
    except ValueError as e:
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


def dashboard_main(argv: Sequence[str]) -> int:
    """``saelab dashboard STUDY [--storage URL] [--port 8080] [--host 127.0.0.1]``."""
    p = argparse.ArgumentParser(prog="saelab dashboard",
                                description="Serve a study's storage with optuna-dashboard.")
    p.add_argument("study", help="study name (study.name of the sweep)")
    p.add_argument("--storage", default=StudyConfig.storage, help="Optuna storage URL")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    args = p.parse_args(list(argv))
    try:
        study = load_existing_study(args.study, args.storage)
    except ValueError as e:
        print(f"saelab dashboard: {e}", file=sys.stderr)
        return 2
    from optuna_dashboard import run_server

    print(f"[saelab] optuna-dashboard for {args.storage}: "
          f"http://{args.host}:{args.port}/dashboard/studies/{study._study_id}  (Ctrl-C stops it)",
          flush=True)
    run_server(study._storage, host=args.host, port=args.port)
    return 0
