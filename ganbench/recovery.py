"""Counting and recovery of trials: which trials count, local locks, heartbeats, dead
workers, re-queueing.

Counting: a study is done when it holds ``spec.trials`` *counted* trials: COMPLETE, PRUNED,
and FAIL through the trial's own doing (divergence, an error in training). A trial that failed
because its worker died or was interrupted does not count; its parameters are re-queued.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

HEARTBEAT_INTERVAL = 30   # default seconds between heartbeats of a running trial (RDB)
GRACE_PERIOD = 120        # default: a trial silent this long is failed and retried
MAX_RETRY = 3             # retries of one trial's parameters after worker deaths

# fail_kind user attribute: who is to blame for a FAIL.
TRIAL_FAULT = "trial"             # diverged or raised in training: counts
WORKER_DIED = "worker_died"       # killed, lost machine: does not count, retried
INTERRUPTED = "interrupted"       # Ctrl-C: does not count, retried
SURPLUS = "surplus"               # asked after the total was reached elsewhere: does not count
INFRASTRUCTURE = "infrastructure"  # the storage or tracking server failed: does not count

# Libraries whose exceptions mean "a service failed", not "the trial is broken".
_SERVICE_MODULES = ("sqlalchemy", "psycopg", "psycopg2", "mlflow", "requests", "urllib3",
                    "optuna.storages")


class Interrupted(KeyboardInterrupt):
    """A stop asked by a signal (SIGINT, SIGTERM); the command exits 128 + ``signum``."""

    last: int | None = None  # the latest stop's signal (what a CLI wrapper may swallow)

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)
        Interrupted.last = self.signum


def exit_code(exc: BaseException) -> int:
    """The conventional exit status of a command stopped by ``exc``: 130 for SIGINT, 143
    for SIGTERM."""
    return 128 + getattr(exc, "signum", Interrupted.last or signal.SIGINT)


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event, received: list[int] | None = None,
                    on_signal: Callable[[int], None] | None = None) -> Iterator[None]:
    """SIGINT and SIGTERM set ``stop`` (and append their number to ``received``, and call
    ``on_signal``) instead of interrupting: the caller stops at its next safe point. Outside
    the main thread (where handlers cannot be set) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame) -> None:
        if received is not None:
            received.append(signum)
        stop.set()
        if on_signal is not None:
            on_signal(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def watch_parent(parent: int, every: float = 1.0) -> threading.Thread:
    """Stop this worker (a SIGINT to itself, acted on at its next safe point) once the
    process ``parent`` is gone, even if it was SIGKILLed: workers never outlive their
    supervisor."""
    def watch() -> None:
        while True:
            time.sleep(every)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGINT)
                return

    thread = threading.Thread(target=watch, daemon=True, name="watch-parent")
    thread.start()
    return thread


def exception_chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and what caused it (``__cause__``, else ``__context__``), each once."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_infrastructure(exc: BaseException) -> bool:
    """Did ``exc`` (or what caused it) come from the storage or the tracking server?
    Such a failure is not the trial's fault."""
    return any((type(e).__module__ or "").startswith(_SERVICE_MODULES)
               or isinstance(e, (ConnectionError, optuna.exceptions.StorageInternalError))
               for e in exception_chain(exc))


def is_counted(trial: FrozenTrial) -> bool:
    """Does this trial count towards the study's total?"""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and trial.user_attrs.get("fail_kind") == TRIAL_FAULT


def count_trials(trials: Sequence[FrozenTrial]) -> tuple[int, int]:
    """(counted finished trials, running trials)."""
    done = sum(1 for t in trials if is_counted(t))
    running = sum(1 for t in trials if t.state == TrialState.RUNNING)
    return done, running


def compute_spent(trials: Sequence[FrozenTrial], unit: str) -> float:
    """Compute used by the counted trials, in ``unit`` (trials, g_steps, d_steps, seconds;
    each trial records the last three as user attributes)."""
    counted = [t for t in trials if is_counted(t)]
    if unit == "trials":
        return float(len(counted))
    return float(sum(t.user_attrs.get(unit, 0) for t in counted))


def requeue(study: optuna.Study, trial: FrozenTrial, reason: str | None = None) -> None:
    """Re-queue a lost trial's parameters (at most MAX_RETRY times per original trial);
    the new trial records which it retries and, if given, why."""
    origin = trial.user_attrs.get("retry_of", trial.number)
    retries = trial.user_attrs.get("retry", 0) + 1
    if retries > MAX_RETRY or not trial.params:  # lost before sampling: nothing to retry
        return
    attrs = {"retry_of": origin, "retry": retries} | ({"retry_reason": reason} if reason else {})
    study.enqueue_trial(trial.params, user_attrs=attrs, skip_if_exists=False)


STALE = "worker died (no heartbeat)"


def retry_callback(study: optuna.Study, trial: FrozenTrial) -> None:
    """A trial failed by Optuna for a silent heartbeat (its worker died, here or on another
    machine): its parameters are re-queued. The failed trial is already finished and can
    take no attribute: a FAIL without ``fail_kind`` is such a trial, and is not counted.
    Passed to Optuna's RDBStorage as ``failed_trial_callback``."""
    requeue(study, trial, STALE)


def pid_alive(pid: int) -> bool:
    """Is process ``pid`` of this machine alive?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_trial(study: optuna.Study, trial: FrozenTrial, kind: str, reason: str) -> None:
    """Mark a RUNNING trial FAIL with a reason (and re-queue it unless it was its own fault)."""
    storage = study._storage
    storage.set_trial_user_attr(trial._trial_id, "fail_kind", kind)
    storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
    try:
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except RuntimeError:  # finished meanwhile by someone else
        return
    if kind != TRIAL_FAULT:
        requeue(study, trial)


def recover_dead_workers(study: optuna.Study,
                         on_lost: Callable[[FrozenTrial, str], None] | None = None,
                         kind: str = WORKER_DIED) -> list[int]:
    """Fail and re-queue RUNNING trials whose worker was a process of this host that is gone;
    ``on_lost(trial, reason)`` lets the caller close what else the trial had open (its
    MLflow run).

    Local workers are detected directly by pid (no heartbeat grace period to wait out);
    workers on other machines are left to the storage's heartbeats.
    """
    host = socket.gethostname()
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w_host, w_pid = trial.user_attrs.get("host"), trial.user_attrs.get("pid")
        if w_host == host and isinstance(w_pid, int) and not pid_alive(w_pid):
            reason = (f"worker died (pid {w_pid} on {host})" if kind == WORKER_DIED
                      else "interrupted (Ctrl-C)")
            fail_trial(study, trial, kind, reason)
            if on_lost is not None:
                on_lost(trial, reason)
            recovered.append(trial.number)
    fail_stale(study)
    return recovered


@contextlib.contextmanager
def local_lock(folder: Path) -> Iterator[None]:
    """Serialize 'check the total, ask a trial' between the workers of this machine
    (a file lock in the study's run folder)."""
    from ganbench.files import file_lock

    with file_lock(Path(folder) / ".ask.lock"):
        yield


def has_heartbeat(storage: optuna.storages.BaseStorage) -> bool:
    """Does ``storage`` keep heartbeats (a database storage, also behind Optuna's cache)?"""
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

    return isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage)


def fail_stale(study: optuna.Study) -> list[int]:
    """On RDB storages: fail (and re-queue, through the storage's callback) the RUNNING
    trials whose heartbeat is older than the grace period, with Optuna's own machinery.
    Trials are stale only once they have a heartbeat: workers record one at ask time."""
    if not has_heartbeat(study._storage):
        return []
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    with warnings.catch_warnings():  # experimental in Optuna: nothing a user can act on
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)
    return [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            if t.number in running and "fail_kind" not in t.user_attrs]


class Heartbeat:
    """Records heartbeats of the running trials on RDB storages (ask/tell does not), at the
    storage's interval."""

    def __init__(self, study: optuna.Study) -> None:
        storage = study._storage
        self.storage = storage if has_heartbeat(storage) else None

    @contextlib.contextmanager
    def beating(self, *trials: optuna.Trial) -> Iterator[None]:
        if self.storage is None:
            yield
            return
        stop = threading.Event()

        def beat() -> None:
            while not stop.is_set():
                for trial in trials:
                    with contextlib.suppress(Exception):
                        self.storage.record_heartbeat(trial._trial_id)
                stop.wait(self.storage.get_heartbeat_interval() or HEARTBEAT_INTERVAL)

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)
