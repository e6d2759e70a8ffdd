"""Where a study lives and who is running its trials: Optuna storages with
heartbeats, worker ids and liveness, dead-trial recovery and the trial budget.

Dead workers: every running trial beats in the storage (Optuna's RDB
heartbeat; the journal storage gets the same through system attributes here)
and carries its worker's ``host:pid:start``. A trial whose worker is gone is
failed and re-queued with the same params (``RetryHeartbeatStaleTrialCallback``):
at once when the worker ran on this machine, after ``grace_period`` otherwise.
"""

from __future__ import annotations

import copy
import hashlib
import os
import socket
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Optional

import optuna
from filelock import FileLock
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import DBAPIError

from saelab.config import StudyConfig

WORKER_ATTR = "saelab:worker"
"""System attribute: the sweep process that asked for the trial and beats for it."""
JOB_ATTR = "saelab:job"
"""System attribute: the process that trained it (another one under joblib or submitit)."""
HEARTBEAT_ATTR = "saelab:heartbeat"

optuna.logging.set_verbosity(optuna.logging.WARNING)
# heartbeats, stale-trial failing and retries are "experimental" but stable since Optuna 2.9
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# ask/tell with heartbeats is what the sweeper does on purpose (it runs the heartbeat thread)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")


# ---------------------------------------------------------------- storages

class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """A journal-file storage with heartbeats (Optuna has them for RDB only):
    the beat is a system attribute, so ``fail_stale_trials`` works the same."""

    def __init__(self, path: str, heartbeat_interval: int, grace_period: int,
                 callback: RetryHeartbeatStaleTrialCallback) -> None:
        super().__init__(JournalFileBackend(path))
        self.url = f"journal://{path}"
        self._interval, self._grace, self._callback = heartbeat_interval, grace_period, callback

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        return [t._trial_id for t in running
                if HEARTBEAT_ATTR in t.system_attrs and now - t.system_attrs[HEARTBEAT_ATTR] > self._grace]

    def get_heartbeat_interval(self) -> int:
        return self._interval

    def get_heartbeat_stale_trial_callback(self) -> RetryHeartbeatStaleTrialCallback:
        return self._callback


def open_storage(cfg: StudyConfig) -> BaseStorage:
    """``sqlite:///rel/path`` (relative to the cwd; parent dirs created),
    ``journal:///path``, or any SQLAlchemy URL (postgresql, mysql); with heartbeats.
    ``grpc://host:port`` is Optuna's gRPC proxy in front of one of those (no heartbeats:
    dead workers are found by process id on their own machine only)."""
    url = cfg.storage
    retry = RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retry)
    try:
        if url.startswith("grpc://"):
            from optuna.storages import GrpcStorageProxy

            host, _, port = url[len("grpc://"):].rstrip("/").rpartition(":")
            proxy = GrpcStorageProxy(host=host or "localhost", port=int(port))
            proxy.wait_server_ready(timeout=10)  # fail here, not at the first trial
            proxy.url = url
            return proxy
        if url.startswith("journal://"):
            path = Path(url[len("journal://"):]).expanduser().resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
            return HeartbeatJournalStorage(str(path), cfg.heartbeat_interval, cfg.grace_period, retry)
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            path = Path(url[len("sqlite:///"):]).expanduser().resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
            url = f"sqlite:///{path}"
        # SQLite: wait on a locked database instead of failing at once (several workers write)
        engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
        for attempt in range(3):  # workers starting together may race to create the schema
            try:
                return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=cfg.heartbeat_interval,
                                  grace_period=cfg.grace_period, heartbeat_stale_trial_callback=retry)
            except DBAPIError:
                if attempt == 2:
                    raise
                time.sleep(1.0)
    except Exception as e:  # noqa: BLE001  (any driver error means: cannot be opened)
        raise ValueError(f"study.storage={cfg.storage!r} cannot be opened ({type(e).__name__}: {e}); "
                         "allowed: sqlite:///path.db, journal:///path.log, postgresql://..., "
                         "mysql://..., grpc://host:port") from e


def storage_url(storage: BaseStorage) -> str:
    """The URL ``storage`` was opened with (absolute for files; see ``open_storage``),
    through Optuna's cache wrapper around RDB storages."""
    backend = getattr(storage, "_backend", storage)
    return getattr(storage, "url", None) or getattr(backend, "url", "")


def close_storage(storage: BaseStorage) -> None:
    """Return an RDB storage's pooled connections (a gRPC proxy's channel) now: jobs open
    one storage per trial."""
    backend = getattr(storage, "_backend", storage)
    if getattr(backend, "engine", None) is not None:
        backend.engine.dispose()
    elif callable(getattr(backend, "close", None)):
        backend.close()


def open_existing_storage(url: str) -> BaseStorage:
    """Open an Optuna storage that must already exist (never creates an empty database)."""
    for scheme in ("sqlite:///", "journal://"):
        if url.startswith(scheme) and url != "sqlite:///:memory:":
            path = Path(url[len(scheme):]).expanduser()
            if not path.is_file():
                raise ValueError(f"--storage={url!r} does not exist: no such database file "
                                 f"{path.resolve()}; "
                                 "allowed: the storage a sweep wrote, e.g. sqlite:///outputs/optuna.db")
    return open_storage(StudyConfig(storage=url))


# ---------------------------------------------------------------- workers

def _start_time(pid: int) -> Optional[str]:
    try:  # field 22 of /proc/<pid>/stat: start time, tells a reused pid apart
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def worker_alive(worker: str) -> Optional[bool]:
    """True/False for a worker on this machine, None for another machine's."""
    host, pid, start = worker.rsplit(":", 2)
    if host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _start_time(int(pid))
    return now is None or start == "None" or now == start


def ask_lock(study: optuna.Study) -> FileLock:
    """Held while counting and asking, so this machine's workers never overshoot n_trials."""
    digest = hashlib.sha1(f"{storage_url(study._storage)}|{study.study_name}".encode()).hexdigest()[:16]
    return FileLock(str(Path(tempfile.gettempdir()) / f"saelab-study-{digest}.lock"))


def claim(study: optuna.Study, trial: optuna.Trial) -> None:
    """Mark ``trial`` as run by this process."""
    study._storage.set_trial_system_attr(trial._trial_id, WORKER_ATTR, worker_id())


def requeue(study: optuna.Study, trial: FrozenTrial, cfg: StudyConfig) -> None:
    """Add a waiting retry of ``trial`` with its params (at most ``cfg.max_retry`` times),
    unless it has one; the budget counts the failure through its retry. Called before
    the trial is failed, so a kill between the two writes leaves a retry, never a lost
    trial. The retry keeps the sampler's attributes (grid point, generation), not the
    dead run's record (metrics, history, constraints, worker)."""
    if any(trial.number in t.system_attrs.get("retry_history", [])
           for t in study.get_trials(deepcopy=False)):
        return
    clean = copy.deepcopy(trial)
    clean.user_attrs = {}
    clean.system_attrs = {k: v for k, v in trial.system_attrs.items()
                          if k not in (WORKER_ATTR, JOB_ATTR, HEARTBEAT_ATTR)
                          and not k.startswith("constraints")}
    RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retry)(study, clean)


def reap_dead_trials(study: optuna.Study, cfg: StudyConfig) -> list[int]:
    """Fail (and re-queue) running trials whose worker died; returns their numbers."""
    storage = study._storage
    reaped = []
    for t in study.get_trials(deepcopy=True, states=(TrialState.RUNNING,)):
        worker = t.system_attrs.get(WORKER_ATTR)
        if worker is None:  # asked, never claimed: its process died in between (or is another
            # machine's, between the two writes now): after the grace period, dead either way
            age = (datetime.now() - t.datetime_start).total_seconds() if t.datetime_start else 0
            if age <= cfg.grace_period:
                continue
        elif worker_alive(worker) is not False:
            continue
        try:
            requeue(study, t, cfg)  # first: see requeue
            storage.set_trial_user_attr(t._trial_id, "fail_reason",
                                        f"worker {worker or '(unclaimed)'} died")
            if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                reaped.append(t.number)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker got there first
    optuna.storages.fail_stale_trials(study)
    return reaped


def unowned_running(study: optuna.Study) -> list[int]:
    """Running trials not known to be alive on this machine (another machine's,
    or a dead worker's that the heartbeat has not yet declared stale)."""
    return [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if not (w := t.system_attrs.get(WORKER_ATTR)) or worker_alive(w) is not True]


# ---------------------------------------------------------------- budget

@dataclass
class Budget:
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0

    @property
    def used(self) -> int:
        """Trials that count toward ``n_trials``: finished (a failure that was
        re-queued counts through its retry) plus running."""
        return self.complete + self.pruned + self.failed + self.running


def budget(study: optuna.Study) -> Budget:
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    b = Budget()
    for t in trials:
        if t.state == TrialState.COMPLETE:
            b.complete += 1
        elif t.state == TrialState.PRUNED:
            b.pruned += 1
        elif t.state == TrialState.FAIL and t.number not in retried:
            b.failed += 1
        elif t.state == TrialState.RUNNING:
            b.running += 1
    return b
