"""Viewing a study: the trials table (``saelab trials``), the study-summary W&B
run the sweep logs at its end, and optuna-dashboard (``saelab dashboard``).

All read the study from its storage only; the table marks the Pareto set
(``study.best_trials``) and shows each trial's params, objectives, the key
metrics and why it was pruned or failed.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
from typing import Any, Optional, Sequence

import optuna
from optuna.trial import TrialState

from saelab.config import StudyConfig
from saelab.errors import CommandParser
from saelab.report import report_figures
from saelab.selection import KEY_METRICS, fmt_value
from saelab.storage import budget
from saelab.study import load_existing_study, objectives_of


def trial_rows(study: optuna.Study) -> tuple[list[str], list[list[Any]]]:
    """One row per trial: number, state, Pareto mark, params, objectives, key metrics, reason."""
    trials = study.get_trials(deepcopy=False)
    objectives = objectives_of(study)
    pareto = {t.number for t in study.best_trials} if any(
        t.state == TrialState.COMPLETE for t in trials) else set()
    params = sorted({p for t in trials for p in t.params})
    metrics = [m for m in KEY_METRICS if m not in objectives]
    cols = ["trial", "state", "pareto", *params, *objectives, *metrics, "reason"]
    rows = []
    for t in trials:
        m = t.user_attrs.get("metrics", {})
        vals = list(t.values) if t.values else [None] * len(objectives)
        reason = t.user_attrs.get("prune_reason") or t.user_attrs.get("fail_reason") or ""
        if t.system_attrs.get("failed_trial") is not None:
            reason = f"retry of #{t.system_attrs['failed_trial']} {reason}".strip()
        reason = reason.splitlines()[0][:80] if reason else ""
        rows.append([t.number, t.state.name, t.number in pareto, *(t.params.get(p) for p in params),
                     *vals, *(m.get(k) for k in metrics), reason])
    return cols, rows


def _cell(v: Any) -> str:
    """The Pareto column's bool reads as a mark; everything else as in every saelab table."""
    if isinstance(v, bool):
        return "*" if v else ""
    return fmt_value(v)


def print_trials(study: optuna.Study) -> None:
    cols, rows = trial_rows(study)
    title = f"study {study.study_name}: {len(rows)} trials (* = Pareto set)"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(c), *(len(_cell(r[i])) for r in rows)) if rows else len(c)
                  for i, c in enumerate(cols)]
        print(title)
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
        for r in rows:
            print("  ".join(_cell(v).ljust(w) for v, w in zip(r, widths)))
        return
    table = Table(title=title)
    for c in cols:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*(_cell(v) for v in r))
    console = Console()
    if not console.is_terminal:  # logs and pipes: no 80-column wrapping
        console = Console(width=240)
    console.print(table)


def log_summary_run(study: optuna.Study, project: str, directory: str) -> Optional[str]:
    """One W&B run per study: a table of all trials with the Pareto set marked, and the
    report's figures (Pareto front, NMSE vs L0/expansion, history, importances, curves)."""
    import wandb

    cols, rows = trial_rows(study)
    run = wandb.init(project=project, group=study.study_name, name=f"{study.study_name}-summary",
                     job_type="study-summary", dir=directory, reinit="create_new",
                     mode=os.environ.get("WANDB_MODE", "offline"),
                     settings=wandb.Settings(silent=True, x_disable_stats=True),
                     config={"study": study.study_name, **study.user_attrs})
    table = wandb.Table(columns=[c.replace("pareto", "is_pareto") for c in cols],
                        data=[[v if not isinstance(v, float) or math.isfinite(v) else None
                               for v in r] for r in rows])
    pareto = [r[0] for r in rows if r[2]]
    figures = report_figures(study, [t for t in study.get_trials(deepcopy=False) if t.number in pareto])
    run.log({"trials": table, **{f"report/{name}": fig for name, fig in figures.items()}})
    b = budget(study)
    run.summary.update({"n_complete": b.complete, "n_pruned": b.pruned, "n_failed": b.failed,
                        "pareto_trials": pareto})
    run_dir = os.path.dirname(run.dir)
    run.finish()
    return run_dir


# ---------------------------------------------------------------- commands

def _load(prog: str, args: argparse.Namespace) -> Optional[optuna.Study]:
    """The study named on the command line, or None after printing why it cannot be opened."""
    try:
        return load_existing_study(args.study, args.storage)
    except ValueError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return None


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = CommandParser(prog=prog, description=description)
    p.add_argument("study", help="study name (study.name of the sweep)")
    p.add_argument("--storage", default=StudyConfig.storage, help="Optuna storage URL")
    return p


def trials_main(argv: Sequence[str]) -> int:
    """``saelab trials STUDY [--storage URL]``."""
    args = _parser("saelab trials", "Table of a study's trials.").parse_args(list(argv))
    study = _load("saelab trials", args)
    if study is None:
        return 2
    print_trials(study)
    return 0


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid; allowed: 1..65535")
    return int(text)


def dashboard_main(argv: Sequence[str]) -> int:
    """``saelab dashboard STUDY [--storage URL] [--port 8080] [--host 127.0.0.1]``."""
    p = _parser("saelab dashboard", "Serve a study's storage with optuna-dashboard.")
    p.add_argument("--port", type=_port, default=8080)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    args = p.parse_args(list(argv))
    study = _load("saelab dashboard", args)
    if study is None:
        return 2
    try:  # a taken port or an unknown host: one line now, not a traceback from the server
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as e:
        why = str(e.strerror or e).split(" (while attempting")[0]
        print(f"saelab dashboard: --host={args.host} --port={args.port} is not valid ({why}); "
              "allowed: an address of this machine and a free port", file=sys.stderr)
        return 2
    from optuna_dashboard import run_server  # only this command needs it

    print(f"[saelab] optuna-dashboard for {args.storage}: "
          f"http://{args.host}:{args.port}/dashboard/studies/{study._study_id}  (Ctrl-C stops it)",
          flush=True)
    run_server(study._storage, host=args.host, port=args.port)
    return 0
