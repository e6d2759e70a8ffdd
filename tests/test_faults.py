"""Fault injection on real processes and real storages (``pytest -m fault``).

Real ``saelab`` processes on tiny trials (2,000 captured tokens, 1,024 token-steps):
SIGKILL at random points (during capture, training, the SAE save and the Optuna
write) then resume; 4 workers on one study on SQLite, a journal file and a
PostgreSQL server started here; a full and a read-only output disk (a tmpfs when
``mount`` works, as root; else RLIMIT_FSIZE and chmod); trials that diverge, would
run out of memory (the worker under RLIMIT_AS) or raise inside training. Each test
prints a ``FAULTS`` line with its figures (docs/reliability.md quotes them).
"""

import glob
import os
import random
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from saelab.config import StudyConfig
from saelab.sae import SAE
from saelab.study import open_study

pytestmark = [pytest.mark.fault, pytest.mark.slow]

SAELAB = str(Path(sys.executable).parent / "saelab")
TINY = ["sweep=smoke", "sae.use_wandb=false", "data.max_tokens=2000", "sae.train_tokens=1024",
        "sae.batch_size=256", "sae.expansion_factor=1", "sae.eval_every=2", "sae.downstream_eval=off"]
SEED = int(os.environ.get("SAELAB_FAULT_SEED", time.time_ns() % 10**6))
KILL_TRIALS = 10
"""Trials of the random-kill study: enough that three kill rounds land before it ends."""


def env_for(tmp: Path, cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return {**env, "SAELAB_OUTPUTS": str(tmp / "out"), "SAELAB_ACT_CACHE": str(cache),
            "WANDB_MODE": "offline"}


def sweep(tmp: Path, cache: Path, name: str, storage: str, *args: str, check: bool = True,
          preexec=None, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run([SAELAB, "sweep", *TINY, f"study.name={name}", f"study.storage={storage}",
                        *args], cwd=tmp, env={**env_for(tmp, cache), **(extra_env or {})},
                       capture_output=True, text=True, timeout=900, preexec_fn=preexec)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def logs(tmp: Path, name: str, pattern: str = "**/*.log") -> str:
    """What a sweep's processes wrote: worker logs and trial job logs (``trial_*/*.log``:
    each trial's log lines once)."""
    return "".join(f.read_text(errors="replace") for f in (tmp / "out/studies" / name).glob(pattern))


def figures(**kv) -> None:
    print("FAULTS " + " ".join(f"{k}={v}" for k, v in kv.items()))


def check_study(study: optuna.Study, n_trials: int) -> dict:
    """The invariants after any fault: n_trials finished (complete or pruned), every failure
    re-queued, no chain of retries completed twice, every complete trial's record whole
    and its SAE loadable."""
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == n_trials, [(t.number, t.state.name, t.system_attrs.get(
        "retry_history"), t.user_attrs.get("fail_reason", "")[:200]) for t in trials]
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert all(t.number in retried for t in failed), "a failed trial was not re-queued"
    root = {t.number: t.system_attrs.get("retry_history", [t.number])[0] for t in trials}
    chains = [root[t.number] for t in trials if t.state == TrialState.COMPLETE]
    assert len(chains) == len(set(chains)), "a trial completed twice"
    for t in trials:
        if t.state == TrialState.COMPLETE:
            a = t.user_attrs
            assert {"metrics", "config", "history", "sae_path", "run_dir"} <= set(a)
            assert SAE.load(a["sae_path"]).k == t.params.get("sae.k", a["config"]["sae"]["k"])
    return {"trials": len(trials), "failed_then_retried": len(failed)}


# ---------------------------------------------------------------- the activation cache

@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> dict:
    """The suite's activation cache, built by a `saelab prepare` killed mid-capture
    (its partial entry on disk) and then run again."""
    tmp = tmp_path_factory.mktemp("faults")
    root = tmp / "cache"
    cmd = [SAELAB, "prepare", *[a for a in TINY if a.startswith(("data.", "sae."))]]
    proc = subprocess.Popen(cmd, cwd=tmp, env=env_for(tmp, root), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial, deadline = [], time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        partial = [p for p in root.glob(".*") if p.name != ".locks"] if root.is_dir() else []
        if partial:  # the capture is writing its entry: kill at a random point of it
            time.sleep(random.Random(SEED).uniform(0, 0.5))
            break
        time.sleep(0.02)
    killed = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    left = sorted(p.name for p in root.glob(".*") if p.name != ".locks")
    p = subprocess.run(cmd, cwd=tmp, env=env_for(tmp, root), capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return {"root": root, "killed": killed and bool(partial), "left": left, "resume": p}


def test_kill_during_capture_then_resume(cache):
    assert cache["killed"], "the capture finished before it could be killed"
    assert cache["left"], "the killed capture left no partial entry to recover from"
    out = cache["resume"].stdout + cache["resume"].stderr
    assert "activations ready:" in out and "captured" in out
    entries = [d for d in cache["root"].iterdir() if not d.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "manifest.json").is_file()
    assert not [p for p in cache["root"].glob(".*") if p.name != ".locks"]  # partial removed
    figures(test="capture", seed=SEED, killed_during_capture=1, partial_left=len(cache["left"]))


# ---------------------------------------------------------------- SIGKILL during a sweep

def _trial_dirs(tmp: Path, name: str) -> list[Path]:
    base = tmp / "out/studies" / name
    return list(base.glob("trial_*")) if base.is_dir() else []


def _states(db: Path) -> list[str]:
    try:  # read-only: never races the sweep creating the schema
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            return [r[0] for r in con.execute("SELECT state FROM trials ORDER BY number")]
    except sqlite3.Error:
        return []


def _wait_for(proc, phase: str, tmp: Path, name: str, db: Path, rng: random.Random) -> bool:
    """Block until the sweep is in ``phase``; False if it ended first."""
    seen = {p for d in _trial_dirs(tmp, name) for p in d.glob("sae.mlx")}
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        dirs = _trial_dirs(tmp, name)
        if phase == "save" and any(d.glob(".sae.mlx.tmp-*") for d in dirs):
            return True  # the SAE is being written
        if phase == "record" and {p for d in dirs for p in d.glob("sae.mlx")} - seen:
            time.sleep(rng.uniform(0, 0.3))  # saved: metrics.json, then the Optuna records
            return True
        if phase == "train" and "RUNNING" in _states(db):
            time.sleep(rng.uniform(1.0, 4.0))
            return True
        time.sleep(0.005 if phase == "save" else 0.05)
    return False


def test_sigkill_at_random_points_then_resume(tmp_path, cache):
    rng = random.Random(SEED)
    db = tmp_path / "optuna.db"
    storage = f"sqlite:///{db}"
    # a larger SAE (18 MB) makes the save long enough to be caught; 2 workers
    # a trial asked but not yet claimed when killed waits out the grace period: keep it short
    # 10 trials: with 6, tiny trials finished the study within two kill rounds (CI, 29 Nov)
    args = [f"study.n_trials={KILL_TRIALS}", "study.n_jobs=2", "study.max_retry=20", "sae.expansion_factor=8",
            "study.heartbeat_interval=1", "study.grace_period=3"]
    cmd = [SAELAB, "sweep", *TINY, "study.name=kill", f"study.storage={storage}", *args]
    kills, landed = 0, []
    for phase in ["train", "save", "record", "train", "save", "record"]:
        before = {t.number: (t.params, t.values) for t in _complete(storage, "kill")}
        err = tmp_path / f"round_{kills}.err"
        with open(err, "w") as stderr:
            proc = subprocess.Popen(cmd, cwd=tmp_path, env=env_for(tmp_path, cache["root"]),
                                    start_new_session=True, stdout=subprocess.DEVNULL,
                                    stderr=stderr)
        hit = _wait_for(proc, phase, tmp_path, "kill", db, rng)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its worker processes
        except ProcessLookupError:
            pass
        if proc.wait() != -signal.SIGKILL:
            assert proc.returncode == 0, err.read_text()[-3000:]
        if not hit:
            break  # the study finished first
        kills += 1
        landed.append(phase)
        after = {t.number: (t.params, t.values) for t in _complete(storage, "kill")}
        assert all(after[n] == v for n, v in before.items())  # nothing completed was lost
        # a killed save leaves only its temporary directory: never a partial sae.mlx
        for d in _trial_dirs(tmp_path, "kill"):
            if (d / "sae.mlx").exists():
                SAE.load(d / "sae.mlx")
    sweep(tmp_path, cache["root"], "kill", storage, *args)
    study = optuna.load_study(study_name="kill", storage=storage)
    facts = check_study(study, KILL_TRIALS)
    for d in _trial_dirs(tmp_path, "kill"):  # orphans of killed attempts included
        if (d / "sae.mlx").exists():
            SAE.load(d / "sae.mlx")
    assert kills >= 3, landed
    figures(test="sigkill", seed=SEED, kills=kills, phases="+".join(landed), **facts)


def _complete(storage: str, name: str) -> list:
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(
            deepcopy=False, states=(TrialState.COMPLETE,))
    except KeyError:  # not created yet
        return []


# ---------------------------------------------------------------- 4 workers, 3 storages

def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server on 127.0.0.1, a free port and a temporary directory, for this
    module; None (and the reason) where it cannot start."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        yield None, "the Python driver psycopg2 is missing (pip install -e '.[test]')"
        return
    if not initdb or not pg_ctl:
        yield None, "PostgreSQL's initdb/pg_ctl not found (apt-get install postgresql)"
        return
    as_root = os.geteuid() == 0
    run_as = ["runuser", "-u", "postgres", "--"] if as_root else []
    base = Path(tempfile.mkdtemp(prefix="saelab-pg-", dir="/tmp"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    if as_root:
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        subprocess.run([*run_as, initdb, "-D", str(data), "-A", "trust", "-U", "saelab"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([*run_as, pg_ctl, "-D", str(data), "-l", str(base / "server.log"), "-w",
                        "-o", f"-p {port} -k {sock} -c listen_addresses=127.0.0.1", "start"],
                       check=True, capture_output=True, timeout=120)
    except (subprocess.CalledProcessError, OSError) as e:
        shutil.rmtree(base, ignore_errors=True)
        yield None, f"PostgreSQL did not start here ({e})"
        return
    try:
        yield f"postgresql+psycopg2://saelab@127.0.0.1:{port}/postgres", ""
    finally:
        subprocess.run([*run_as, pg_ctl, "-D", str(data), "-m", "fast", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def grpc_proxy(tmp_path_factory):
    """Optuna's gRPC storage proxy (in front of SQLite) in a process of its own."""
    db = tmp_path_factory.mktemp("grpc") / "behind_proxy.db"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import sys, optuna; optuna.storages.run_grpc_proxy_server("
            "optuna.storages.RDBStorage(sys.argv[1]), host='127.0.0.1', port=int(sys.argv[2]))")
    proc = subprocess.Popen([sys.executable, "-c", code, f"sqlite:///{db}", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"grpc://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()


@pytest.mark.parametrize("backend", ["sqlite", "journal", "grpc", "postgresql"])
def test_four_workers_lose_and_duplicate_nothing(tmp_path, cache, postgres, grpc_proxy,
                                                 require_system, backend):
    if backend == "postgresql":
        url, why = postgres
        require_system("a PostgreSQL server", url is not None, why)
        storage = url
    elif backend == "grpc":
        storage = grpc_proxy
    elif backend == "journal":
        storage = f"journal:///{tmp_path}/optuna.log"
    else:
        storage = f"sqlite:///{tmp_path}/optuna.db"
    # SQLite starts from an empty cache: the four workers must capture its key once
    root = tmp_path / "fresh_cache" if backend == "sqlite" else cache["root"]
    name = f"w4-{backend}-{SEED}"
    t0 = time.monotonic()
    p = sweep(tmp_path, root, name, storage, "study.n_trials=16", "study.n_jobs=4")
    seconds = time.monotonic() - t0
    study = open_study(StudyConfig(name=name, storage=storage))
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 16
    assert sorted(t.number for t in trials) == list(range(16))
    assert len({t.user_attrs["run_dir"] for t in trials}) == 16  # no trial ran twice
    workers = {t.system_attrs["saelab:worker"] for t in trials}
    text = p.stdout + p.stderr + logs(tmp_path, name)
    assert "database is locked" not in text and "Traceback" not in text
    # each process's console once (the first in p.stdout, the others in worker_*.log):
    # trial log files repeat what their process printed
    consoles = p.stdout + p.stderr + logs(tmp_path, name, "worker_*.log")
    captures = consoles.count("captured 2000 tokens")
    assert captures == (1 if backend == "sqlite" else 0), consoles[-3000:]
    figures(test="workers", backend=backend, workers=4, ran_trials=len(workers),
            trials=len(trials), seconds=round(seconds, 1))


# ---------------------------------------------------------------- full / read-only output

def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _fill(path: Path, leave: int) -> Path:
    """Fill the file system of ``path`` but ``leave`` bytes."""
    filler = path / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 2**20)
                f.flush()
        except OSError:
            pass
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - leave))
    return filler


def _error_lines(p: subprocess.CompletedProcess) -> list[str]:
    """stderr without the progress bars of the trials that ran before the error."""
    return [line for line in p.stderr.strip().splitlines() if not line.startswith("Training")]


def test_full_then_read_only_output_dir(tmp_path, cache):
    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, "64m")
    how = "tmpfs" if mounted else "RLIMIT_FSIZE+chmod"
    storage = f"sqlite:///{disk}/optuna.db"
    env = {"SAELAB_OUTPUTS": str(disk / "out")}
    try:
        args = ["sae.expansion_factor=4"]  # a 10 MB SAE
        sweep(tmp_path, cache["root"], "disk", storage, "study.n_trials=1", *args, extra_env=env)
        first = optuna.load_study(study_name="disk", storage=storage).trials[0]
        assert first.state == TrialState.COMPLETE

        # full: the next SAE cannot be written; the study database still can
        limit = None
        if mounted:
            filler = _fill(disk, leave=2 * 2**20)
        else:
            def limit():
                resource.setrlimit(resource.RLIMIT_FSIZE, (2**20 * 2, 2**20 * 2))
        p = sweep(tmp_path, cache["root"], "disk", storage, "study.n_trials=2", *args,
                  extra_env=env, check=False, preexec=limit)
        lines = _error_lines(p)
        assert p.returncode == 1 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
        assert "could not write its output" in lines[0] and "re-queued" in lines[0]
        trials = optuna.load_study(study_name="disk", storage=storage).trials
        assert trials[0].values == first.values and SAE.load(trials[0].user_attrs["sae_path"])
        assert trials[1].state == TrialState.FAIL and trials[2].state == TrialState.WAITING
        assert not (Path(trials[1].user_attrs["run_dir"]) / "sae.mlx").exists()
        if mounted:
            filler.unlink()
        sweep(tmp_path, cache["root"], "disk", storage, "study.n_trials=2", *args, extra_env=env)
        check_study(optuna.load_study(study_name="disk", storage=storage), 2)

        # read-only (a read-only bind mount of the same files: this process still has the
        # database open, so the tmpfs itself cannot be remounted): nothing starts, one line,
        # the earlier results readable as they were
        ro = disk
        if mounted:
            ro = tmp_path / "read_only"
            ro.mkdir()
            subprocess.run(["mount", "--bind", str(disk), str(ro)], check=True)
            subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        else:
            (disk / "out").chmod(0o555)
        env = {"SAELAB_OUTPUTS": str(ro / "out")}
        p = sweep(tmp_path, cache["root"], "disk", f"sqlite:///{ro}/optuna.db", "study.n_trials=3",
                  *args, extra_env=env, check=False)
        lines = _error_lines(p)
        assert p.returncode in (1, 2) and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
        assert "is not writable" in lines[0] or "cannot be opened" in lines[0], lines[0]
        study = optuna.load_study(study_name="disk", storage=storage)
        assert len(study.trials) == 3 and SAE.load(study.trials[0].user_attrs["sae_path"])
        t = subprocess.run([SAELAB, "train", *TINY[1:]], cwd=tmp_path, capture_output=True,
                           text=True, env={**env_for(tmp_path, cache["root"]), **env}, timeout=300)
        assert t.returncode in (1, 2) and len(_error_lines(t)) == 1, t.stderr
    finally:
        if mounted:
            for m in (tmp_path / "read_only", disk):
                subprocess.run(["umount", "-l", str(m)], capture_output=True)
    figures(test="output_dir", how=how, full_disk_stops=1, read_only_refused=1)


# ---------------------------------------------------------------- failing trials

def _address_space_limit():
    """The worker's address space is capped: a trial that really allocated too much would
    fail inside it, never take the machine's memory."""
    resource.setrlimit(resource.RLIMIT_AS, (16 * 2**30, 16 * 2**30))


def test_failing_trials_are_recorded_and_the_study_goes_on(tmp_path, cache):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    # NaN (lr 1e30) and out of memory (48 GiB of weights and Adam state), beside good trials
    sweep(tmp_path, cache["root"], "bad", storage, "study.sampler=grid", "study.n_trials=4",
          "sae.k=16", "sae.learning_rate=1e30,1e-3", "sae.expansion_factor=1,4000",
          preexec=_address_space_limit)
    trials = optuna.load_study(study_name="bad", storage=storage).trials
    by = {(t.params["sae.learning_rate"], t.params["sae.expansion_factor"]): t for t in trials}
    assert by[(1e-3, 1)].state == TrialState.COMPLETE
    nan = by[(1e30, 1)]
    assert nan.state == TrialState.FAIL and nan.user_attrs["fail_reason"].startswith("diverged: ")
    for lr in (1e30, 1e-3):
        oom = by[(lr, 4000)]
        assert oom.state == TrialState.FAIL
        assert oom.user_attrs["fail_reason"].startswith("MemoryError: sae.expansion_factor=4000")
    # an exception inside training: W&B refuses the project name when the run starts
    sweep(tmp_path, cache["root"], "raise", storage, "study.sampler=grid", "study.n_trials=2",
          "sae.k=16", "sae.learning_rate=1e-3", "sae.use_wandb=true",
          "sae.wandb_project=saelab,bad%project", preexec=_address_space_limit)
    trials = optuna.load_study(study_name="raise", storage=storage).trials
    by = {t.params["sae.wandb_project"]: t for t in trials}
    assert by["saelab"].state == TrialState.COMPLETE
    bad = by["bad%project"]
    assert bad.state == TrialState.FAIL and "Invalid project name" in bad.user_attrs["fail_reason"]
    figures(test="failing_trials", nan=1, out_of_memory=2, raised=1, completed_beside=2)
