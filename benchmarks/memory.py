"""Peak memory of one trial on a 5M- and a 1M-token cache, and out-of-core vs in-RAM speed;
one JSON line.

    python benchmarks/memory.py --dir D --prepare          # write the entries (untimed)
    flock /tmp/bench.lock python benchmarks/memory.py --dir D --part memory
    flock /tmp/bench.lock python benchmarks/memory.py --dir D --part speed
    python benchmarks/memory.py --dir D --clean            # delete them

Without ``--dir`` the entries go to a temporary directory, every part runs and the
entries are deleted. Synthetic entries in the real cache format (``EntryBuilder``:
float16 shards of ~105k rows as a capture at context 128 writes them, d_model 576,
documents of ~5,000 tokens, Gaussian activations) are written under the key a trial
of ``layer=10 component=mlp data.max_tokens=N`` computes, so ``run_trial`` opens them
as its cache and never loads the model. Each case runs in a fresh subprocess:

- ``trial``: ``run_trial`` (out of core: ``EntryRows`` over the memmapped shards);
- ``read``: one whole epoch of the train split through ``EntryRows.batches`` (every
  shard read and checksummed, no training): the reader's memory over a full pass;
- ``in_ram``: the same split read into one float32 array, then the same training
  (``train_sae_on_arrays`` on the array) - the pre-sharding path, for speed.

``--part memory``: ``trial`` (validation at the default cadence) and ``read`` on each
cache. ``--part speed``: ``trial`` and ``in_ram`` on the smallest cache, alternating
over ``--rounds``, with one evaluation at the end; the best of each is compared by
training tokens/s (``train/tokens_per_second``). Memory is the
child's peak resident set (``resource.getrusage``: ru_maxrss) and its peak anonymous
resident memory (``RssAnon`` sampled every 20 ms; file-backed pages of the cache are
the page cache's and are dropped after each read). Training is x8, k 32, batch 1024,
``--train-tokens`` token-steps, ``validation_split=0.1`` (both caches hit the
``data.max_val_tokens`` cap), no downstream evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

D = 576
SHARD_ROWS = 104_857  # ~912 sequences of ~115 unmasked tokens: a capture's 120 MB shard
DOC_TOKENS = 5_000


def trial_config(tokens: int, root: Path, train_tokens: int = 1, **sae):
    """The trial whose cache key the synthetic entry of ``tokens`` tokens is written under."""
    from saelab.config import DataConfig, SAEConfig, TrialConfig

    sae = {"expansion_factor": 8, "k": 32, "batch_size": 1024, "train_tokens": train_tokens,
           "validation_split": 0.1, "downstream_eval": "off", **sae}
    return TrialConfig(layer=10, component="mlp", cache_dir=str(root),
                       data=DataConfig(max_tokens=tokens, context_length=128),
                       sae=SAEConfig(**sae))


def write_entry(tokens: int, root: Path, doc_tokens: int = DOC_TOKENS) -> Path:
    """A synthetic entry at the key ``trial_config(tokens, root)`` looks up (kept if there)."""
    from saelab.cache import cache_key, capture_layout
    from saelab.data import corpus_identity
    from saelab.entry import open_entry
    from saelab.models import model_info
    from saelab.shards import EntryBuilder

    cfg = trial_config(tokens, root)
    info = model_info(cfg.model)
    key, fields = cache_key(info.identity, cfg.layer, cfg.component, corpus_identity(cfg.data),
                            tokens, cfg.data.context_length)
    if open_entry(root / key[:16], key) is not None:
        return root / key[:16]
    builder = EntryBuilder(root / key[:16], key, capture_layout(D, cfg.data.context_length))
    rng = np.random.default_rng(0)
    mean = rng.standard_normal(D).astype(np.float32)
    for j, start in enumerate(range(0, tokens, SHARD_ROWS)):
        w = builder.writer(j)
        for lo in range(start, min(start + SHARD_ROWS, tokens), 16_384):
            n = min(lo + 16_384, start + SHARD_ROWS, tokens) - lo
            w.write(rng.standard_normal((n, D), dtype=np.float32) + mean)
        builder.record(j, w.close())
    starts = np.arange(0, tokens, doc_tokens)
    docs = np.stack([np.arange(len(starts)), starts, np.r_[starts[1:], tokens]], axis=1)
    builder.finish(docs, {**fields, "synthetic": True})
    return root / key[:16]


def peak_anon() -> list[int]:
    """A running max of RssAnon (kB), sampled by a daemon thread."""
    import threading

    peak = [0]

    def sample() -> None:
        while True:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak[0] = max(peak[0], int(line.split()[1]))
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    return peak


def run_case(case: str, tokens: int, root: Path, train_tokens: int,
             eval_every: int | None) -> dict:
    """In the child: one case; returns its row."""
    import resource

    anon = peak_anon()
    import saelab  # noqa: F401
    from saelab.batches import EntryRows
    from saelab.cache import ensure_activations
    from saelab.train import train_sae_on_arrays
    from saelab.trial import run_trial

    cfg = trial_config(tokens, root, train_tokens, eval_every=eval_every)
    out = Path(tempfile.mkdtemp(prefix="saelab-memory-bench-"))
    row: dict = {"case": case, "cache_tokens": tokens}
    t0, cpu = time.perf_counter(), time.process_time()
    try:
        if case == "trial":
            metrics = run_trial(cfg, output_dir=out, progress=False).metrics
        else:
            e = ensure_activations(cfg.model, cfg.data, [(10, "mlp")], root=root)[(10, "mlp")]
            split = e.split(cfg.sae.validation_split, cfg.data.split_seed)
            if case == "read":
                rows = EntryRows(e, split.train, cfg.data.shuffle_buffer_tokens)
                batches = rows.batches(cfg.sae.batch_size, 0)
                n = -(-split.n_train // cfg.sae.batch_size)
                t_read = time.perf_counter()
                for _ in range(n):
                    next(batches)
                row |= {"read_tokens": n * cfg.sae.batch_size,
                        "read_tokens_per_s": round(n * cfg.sae.batch_size
                                                   / (time.perf_counter() - t_read))}
                metrics = None
            else:  # in_ram
                train = e.read_runs(split.train)  # float32, the whole split in RAM
                val = e.validation(split, cfg.data.max_val_tokens)
                _, metrics = train_sae_on_arrays(train, val, cfg.sae, metadata={},
                                                 progress=False)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    row |= {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "peak_anon_mb": round(anon[0] / 1024),
            "wall_s": round(time.perf_counter() - t0, 1),
            "cpu_s": round(time.process_time() - cpu, 1)}
    if metrics is not None:
        row |= {"train_tokens_per_s": round(metrics["train/tokens_per_second"]),
                "val_nmse": round(metrics["val/nmse"], 4)}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="5000000,1000000")
    p.add_argument("--train-tokens", type=int, default=131_072)
    p.add_argument("--dir", default=None, help="where the entries are (default: a temp dir)")
    p.add_argument("--part", choices=("memory", "speed", "all"), default="all")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prepare", action="store_true", help="write the entries, then exit")
    p.add_argument("--clean", action="store_true", help="delete --dir, then exit")
    p.add_argument("--eval-every", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)  # child mode: CASE,TOKENS,ROOT
    args = p.parse_args()
    if args.case:
        case, tokens, root = args.case.split(",", 2)
        print(json.dumps(run_case(case, int(tokens), Path(root), args.train_tokens,
                                  args.eval_every)))
        return
    if args.clean:
        shutil.rmtree(args.dir, ignore_errors=True)
        return
    import saelab  # noqa: F401

    base = Path(args.dir or tempfile.mkdtemp(prefix="saelab-memory-bench-"))
    sizes = [int(x) for x in args.tokens.split(",")]
    rows: list[dict] = []
    try:
        for tokens in sizes:
            t = time.perf_counter()
            write_entry(tokens, base / str(tokens))
            print(f"{tokens} tokens ready in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        if args.prepare:
            return
        cases = []  # (case, cache tokens, eval_every)
        if args.part in ("memory", "all"):  # validation at the default cadence
            cases += [(c, n, None) for n in sizes for c in ("trial", "read")]
        if args.part in ("speed", "all"):  # alternating (the machine may be shared); one
            # evaluation, at the end: both do the same, and it is not what is compared
            cases += [(c, min(sizes), 10**9) for _ in range(args.rounds)
                      for c in ("trial", "in_ram")]
        load = [round(x, 2) for x in os.getloadavg()]
        for case, tokens, every in cases:
            child = subprocess.run(
                [sys.executable, __file__, "--case", f"{case},{tokens},{base / str(tokens)}",
                 "--train-tokens", str(args.train_tokens)]
                + (["--eval-every", str(every)] if every else []),
                capture_output=True, text=True, check=True)
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr)
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)

    def pick(case: str, tokens: int) -> list[dict]:
        return [r for r in rows if (r["case"], r["cache_tokens"]) == (case, tokens)]

    out = {"benchmark": "memory", "d_model": D, "train_tokens": args.train_tokens,
           "part": args.part, "loadavg_start": load,
           "loadavg_end": [round(x, 2) for x in os.getloadavg()], "cases": rows}
    big, small = max(sizes), min(sizes)
    if args.part in ("memory", "all"):
        for case in ("trial", "read"):
            out[f"{case}_rss_ratio_big_over_small"] = round(
                pick(case, big)[0]["peak_rss_mb"] / pick(case, small)[0]["peak_rss_mb"], 3)
    if args.part in ("speed", "all"):
        best = {c: max(r["train_tokens_per_s"] for r in pick(c, small))
                for c in ("trial", "in_ram")}
        out["out_of_core_over_in_ram_speed"] = round(best["trial"] / best["in_ram"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
