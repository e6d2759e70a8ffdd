"""The share of a trial's wall time spent in validation at the default cadence; one JSON line.

    flock /tmp/bench.lock python benchmarks/validation.py [--rounds 2] [--cases guide,quick]

Cases (``run_trial`` on a synthetic cache entry in the real format, written with
``benchmarks/memory.py``'s ``write_entry`` at the key the trial looks up, documents
of 250 tokens, d_model 576; no downstream evaluation, no W&B):

- ``guide``: the guide-API run of issue 10 (x4, k 32, batch 256, the default 3
  epochs over ~31.7k training tokens: 372 steps, 5% of documents held out);
- ``quick``: a quick-sweep trial (x8, k 32, batch 1024, 200k token-steps on a
  100k-token cache, 5% held out).

Each trial runs in a fresh subprocess (compilation included, as in a new job), in
two modes alternating over ``--rounds``: ``default`` (``eval_every`` unset: about 8
evaluations) and ``final`` (only the last one). The child times every
``saelab.validate.Validator`` construction and call (wrapped, timed to completion: each call ends
in a host read; timing starts once the step in flight has updated the weights) and the trial's wall time (``time/wall_s``). Reported per case:
``val_fraction`` = validation seconds / wall seconds of the default mode (median
over rounds) and ``diff_fraction`` = (default wall - final wall) / default wall
(best of each; it leaves out the one evaluation both modes do).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memory import trial_config, write_entry  # benchmarks/ is sys.path[0]

DOC_TOKENS = 250
CASES = {
    # cache tokens, SAE fields
    "guide": (33_500, {"expansion_factor": 4, "k": 32, "batch_size": 256, "train_tokens": None,
                       "num_epochs": 3, "validation_split": 0.05}),
    "quick": (100_000, {"expansion_factor": 8, "k": 32, "batch_size": 1024,
                        "train_tokens": 200_000, "validation_split": 0.05}),
}


def run_child(case: str, mode: str, root: Path) -> dict:
    """One trial with the validator timed; returns its row."""
    import saelab  # noqa: F401
    import mlx.core as mx
    from saelab import validate
    from saelab.trial import run_trial

    spent = {"s": 0.0, "calls": 0, "build_s": 0.0}
    init, call = validate.Validator.__init__, validate.Validator.__call__

    def timed_init(self, *a, **kw):
        t = time.perf_counter()
        init(self, *a, **kw)
        spent["build_s"] += time.perf_counter() - t

    def timed_call(self, *a, **kw):
        mx.eval(a[0])  # the step in flight first: its update is training time, not validation's
        t = time.perf_counter()
        out = call(self, *a, **kw)
        spent["s"] += time.perf_counter() - t
        spent["calls"] += 1
        return out

    validate.Validator.__init__, validate.Validator.__call__ = timed_init, timed_call
    tokens, sae = CASES[case]
    cfg = trial_config(tokens, root, **sae, eval_every=10**9 if mode == "final" else None)
    out = Path(tempfile.mkdtemp(prefix="saelab-validation-bench-"))
    try:
        result = run_trial(cfg, output_dir=out, progress=False)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    m, wall = result.metrics, result.metrics["time/wall_s"]
    return {"case": case, "mode": mode, "steps": int(m["train/steps"]),
            "val_tokens": result.sae.metadata["val_activations"], "evaluations": spent["calls"],
            "wall_s": round(wall, 2), "val_s": round(spent["s"] + spent["build_s"], 3),
            "val_build_s": round(spent["build_s"], 3),
            "val_fraction": round((spent["s"] + spent["build_s"]) / wall, 4),
            "train_tokens_per_s": round(m["train/tokens_per_second"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="guide,quick")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)  # CASE,MODE,ROOT
    args = p.parse_args()
    if args.child:
        case, mode, root = args.child.split(",", 2)
        print(json.dumps(run_child(case, mode, Path(root))))
        return
    base = Path(tempfile.mkdtemp(prefix="saelab-validation-bench-"))
    cases = args.cases.split(",")
    load = [round(x, 2) for x in os.getloadavg()]
    rows = []
    try:
        for case in cases:
            write_entry(CASES[case][0], base / case, doc_tokens=DOC_TOKENS)
        for _ in range(args.rounds):
            for case in cases:
                for mode in ("default", "final"):
                    child = subprocess.run(
                        [sys.executable, __file__, "--child", f"{case},{mode},{base / case}"],
                        capture_output=True, text=True, check=True)
                    rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
                    print(rows[-1], file=sys.stderr)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    summary = {}
    for case in cases:
        mine = {mode: [r for r in rows if (r["case"], r["mode"]) == (case, mode)]
                for mode in ("default", "final")}
        wall = {mode: min(r["wall_s"] for r in rs) for mode, rs in mine.items()}
        summary[case] = {
            "steps": mine["default"][0]["steps"],
            "evaluations": mine["default"][0]["evaluations"],
            "val_fraction": statistics.median(r["val_fraction"] for r in mine["default"]),
            "diff_fraction": round((wall["default"] - wall["final"]) / wall["default"], 4),
            "wall_s": wall}
    print(json.dumps({"benchmark": "validation", "loadavg_start": load,
                      "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                      "summary": summary, "runs": rows}))


if __name__ == "__main__":
    main()
