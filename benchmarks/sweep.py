"""Wall time of a study with the shared activation cache vs capturing per trial,
and the sweep's orchestration overhead per trial; prints one JSON line.

    python benchmarks/sweep.py [--trials 8] [--max-tokens 20000] [--train-tokens 60000]

Both runs are real ``saelab sweep sweep=quick`` subprocesses on the default
model (random sampler, same seed, so the same 8 trials), each with a fresh
activation cache root; "per trial" points ``cache_dir`` at each trial's own
directory. Overhead per completed trial = its duration as Optuna recorded it
(ask to tell) minus its capture (``time/capture_s``) and its training loop
(``train/tokens / train/tokens_per_second``): Hydra composition, SAE
initialization, W&B run set-up and finish, saving, Optuna bookkeeping. Goal:
< 5% of the trial. The machine may be shared: see ``loadavg``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState


def run_study(root: Path, name: str, args, extra: list[str]) -> dict:
    storage = f"sqlite:///{root}/optuna.db"
    cmd = [sys.executable, "-m", "saelab.cli", "sweep", "sweep=quick", f"study.name={name}",
           f"study.storage={storage}", f"study.n_trials={args.trials}", "study.sampler=random",
           f"data.max_tokens={args.max_tokens}", f"sae.train_tokens={args.train_tokens}", *extra]
    env = {**os.environ, "SAELAB_OUTPUTS": str(root / "out"),
           "SAELAB_ACT_CACHE": str(root / f"cache_{name}"), "WANDB_MODE": "offline"}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"sweep {name} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    finished = [t for t in optuna.load_study(study_name=name, storage=storage).trials
                if t.state.is_finished()]
    trials = [t for t in finished if t.state == TrialState.COMPLETE]
    dur = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials]
    all_dur = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in finished)
    m = [t.user_attrs["metrics"] for t in trials]
    loop = [x["train/tokens"] / x["train/tokens_per_second"] for x in m]  # the step loop alone
    capture = [x["time/capture_s"] for x in m]
    overhead = [d - lp - c for d, lp, c in zip(dur, loop, capture)]
    outside = [d - x["time/wall_s"] for d, x in zip(dur, m)]  # Hydra + Optuna around run_trial
    return {"wall_s": round(wall, 1), "trials_complete": len(trials),
            "trials_pruned_or_failed": len(finished) - len(trials),
            "trial_s_total": round(all_dur, 1), "train_loop_s_total": round(sum(loop), 1),
            "capture_s_total": round(sum(capture), 1),
            "startup_and_summary_s": round(wall - all_dur, 1),
            "overhead_s_per_trial": round(sum(overhead) / len(overhead), 3),
            "overhead_fraction": round(sum(overhead) / sum(dur), 4),
            "overhead_fraction_max": round(max(o / d for o, d in zip(overhead, dur)), 4),
            "outside_run_trial_s_per_trial": round(sum(outside) / len(outside), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=20_000)
    p.add_argument("--train-tokens", type=int, default=60_000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="saelab-bench-sweep-") as tmp:
        root = Path(tmp)
        shared = run_study(root, "shared", args, [])
        per_trial = run_study(root, "per_trial", args, ["cache_dir=${hydra:runtime.output_dir}/cache"])
    print(json.dumps({
        "benchmark": "sweep", "trials": args.trials, "data.max_tokens": args.max_tokens,
        "sae.train_tokens": args.train_tokens, "shared_cache": shared, "capture_per_trial": per_trial,
        "speedup": round(per_trial["wall_s"] / shared["wall_s"], 2),
        "loadavg": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
