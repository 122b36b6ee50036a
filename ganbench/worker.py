"""A worker: the loop that runs trials until its study holds its total, and the worker
process around it (devices, torch threads, the job it is given, its end on a signal or
on its supervisor's death). Sweeps and a comparison's tuning run the same workers, under
the one supervisor of ``ganbench.supervisor``.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import optuna
from optuna.trial import TrialState

from ganbench import optuna_adapter as oa
from ganbench.accounting import (
    INTERRUPTED,
    SURPLUS,
    Heartbeat,
    budget_spent,
    count_trials,
    fail_stale,
    fail_trial,
    local_lock,
    pid_alive,
    trials_that_fit,
)
from ganbench.signals import Interrupted, stop_on_signals
from ganbench.spec import StudySpec
from ganbench.study import open_study, run_dir
from ganbench.trial import TrialOutcome, ask_indexed, run_population, run_trial


# ---------------------------------------------------------------- the worker loop
def ask_next(study: optuna.Study, spec: StudySpec, total: int,
             should_stop: Callable[[], bool] | None = None,
             on_event: Callable[[str], None] | None = None) -> optuna.Trial | None:
    """Ask a trial if the study still needs one (and no stop was asked), else None.

    Local workers serialize this with a file lock, so they never overshoot. On a database
    storage, trials whose worker went silent (no heartbeat for the grace period) are failed
    and re-queued first, and the new trial gets its first heartbeat, host and pid at once:
    a worker that dies right after asking leaves a trial the next ask recovers. Workers on
    other machines can race; a trial asked beyond the total is marked FAIL 'surplus'
    (not counted) by the check after asking.
    """
    with local_lock(run_dir(spec)):
        for number in fail_stale(study):
            if on_event:
                on_event(f"trial {number}: its worker went silent (no heartbeat for "
                         f"{spec.heartbeat.grace:g} s); failed, not counted, re-queued")
        trials = study.get_trials(deepcopy=False)
        done, running = count_trials(trials)
        if done + running >= total or not trials_that_fit(spec, trials, 1) or \
                (should_stop is not None and should_stop()):
            return None
        trial = ask_indexed(study, spec, trials)
        if should_stop is not None and should_stop():  # the signal came while asking
            fail_trial(study, trial, INTERRUPTED,
                       "interrupted (Ctrl-C) before it trained")
            return None
    before = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number]
    done, running = count_trials(before)
    if done + running >= total:
        fail_trial(study, trial, SURPLUS,
                   "surplus: the study reached its total elsewhere")
        return None
    return trial


def _wait_for_others(study: optuna.Study, spec: StudySpec, total: int,
                     stop: threading.Event) -> bool:
    """Nothing to ask, but the study is short while trials run elsewhere: wait a while
    (True) if they will end — they finish, or, on a database storage, a dead worker's trial
    goes stale and the next ask re-queues it; on a journal, while their workers are live
    processes of this machine. False: stop here (the study is done, or cannot progress)."""
    trials = study.get_trials(deepcopy=False)
    done, running = count_trials(trials)
    if stop.is_set() or done >= total or budget_spent(spec, trials, reserve=False) or \
            not running:
        return False
    if oa.has_heartbeat(study):
        stop.wait(min(spec.heartbeat.interval, 5.0))
        return True
    host = socket.gethostname()
    local = [t for t in trials if t.state == TrialState.RUNNING
             and t.user_attrs.get("host") == host and isinstance(t.user_attrs.get("pid"), int)
             and pid_alive(t.user_attrs["pid"])]
    if local:
        stop.wait(1.0)
        return True
    return False


def worker_loop(spec: StudySpec, device: str, total: int, deadline: float | None = None,
                tracker=None, on_trial: Callable[[TrialOutcome], None] | None = None,
                on_event: Callable[[str], None] | None = None) -> int:
    """Run trials until the study holds ``total`` counted trials (or the deadline passes).
    Returns the number of trials this worker ran. SIGINT or SIGTERM stops it at the next
    safe point: its running trials are marked and re-queued, then ``Interrupted`` is
    raised."""
    study = open_study(spec)
    ran = 0
    heartbeat = Heartbeat(study)
    # SIGINT and SIGTERM only set a flag, acted on at safe points (before asking, every few
    # training steps): an exception raised inside a library's cleanup callback is swallowed.
    stop = threading.Event()
    received: list[int] = []

    def stopped() -> Interrupted:
        return Interrupted(received[0] if received else signal.SIGINT)

    with stop_on_signals(stop, received):
        try:
            ran = _work(study, spec, device, total, deadline, tracker, on_trial, on_event,
                        heartbeat, stop)
        except KeyboardInterrupt:
            raise stopped() from None
        if stop.is_set():
            raise stopped()
    return ran


def _work(study: optuna.Study, spec: StudySpec, device: str, total: int,
          deadline: float | None, tracker, on_trial, on_event, heartbeat: Heartbeat,
          stop: threading.Event) -> int:
    """worker_loop's loop: ask, train, tell until nothing is left (or a stop)."""
    ran = 0
    while deadline is None or time.time() < deadline:
        if stop.is_set():
            raise KeyboardInterrupt
        if spec.execution.mode == "population":
            # As many trials as fill the population (each trial is `seeds` members).
            trials: list[optuna.Trial] = []
            while len(trials) < max(1, spec.execution.size // spec.seeds):
                if (trial := ask_next(study, spec, total, stop.is_set, on_event)) is None:
                    break
                trials.append(trial)
            if not trials:
                if _wait_for_others(study, spec, total, stop):
                    continue
                break
            with heartbeat.beating(*trials):
                outcomes = run_population(study, trials, spec, device, tracker,
                                          stop.is_set)
        else:
            trial = ask_next(study, spec, total, stop.is_set, on_event)
            if trial is None:
                if _wait_for_others(study, spec, total, stop):
                    continue
                break
            with heartbeat.beating(trial):
                outcomes = [run_trial(study, trial, spec, device, tracker, stop.is_set)]
        ran += len(outcomes)
        for outcome in outcomes:
            if on_trial:
                on_trial(outcome)
    return ran


# ---------------------------------------------------------------- devices and threads
def default_devices(workers: int | None = None, devices: Sequence[str] | None = None,
                    population: bool = False) -> list[str]:
    """One worker per visible GPU, or one per CPU core (one in all for a population, which
    uses every core itself); ``devices`` lists them explicitly."""
    import torch

    if devices:
        base = list(devices)
    elif torch.cuda.is_available():
        base = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    else:
        base = ["cpu"] * (1 if population else os.cpu_count() or 1)
    n = workers or len(base)
    return [base[i % len(base)] for i in range(n)]


def cpu_threads(spec: StudySpec, cpu_workers: int) -> int:
    """Torch threads of a CPU worker: one per trial-at-a-time worker (processes beat threads
    for one small model); a population worker shares the cores with the other CPU workers."""
    if spec.execution.mode != "population":
        return 1
    return population_threads(cpu_workers)


def population_threads(cpu_workers: int) -> int:
    """Torch threads of each of ``cpu_workers`` population workers: the cores shared out."""
    return max(1, (os.cpu_count() or 1) // max(1, cpu_workers))


def set_threads(device: str, threads: int) -> None:
    """Size torch's CPU thread pool for a worker on ``device`` (GPU workers keep theirs)."""
    if device == "cpu":
        import torch

        torch.set_num_threads(threads)


def needed_workers(devices: Sequence[str], total: int, done: int) -> list[str]:
    """The first of ``devices``, as many as trials are left (at least one): more workers
    would only start and stop again."""
    return list(devices)[:max(1, total - done)]


# ---------------------------------------------------------------- a sweep's worker process
@dataclass
class WorkerJob:
    """Picklable: everything a sweep's worker process needs."""

    spec_json: str                 # the StudySpec as JSON
    device: str
    total: int                     # run trials until the study holds this many counted
    deadline: float | None = None  # time.time() after which no trial starts
    tracking: Any = None           # a tracking.TrackingHandle, or None
    threads: int = 1               # torch threads on CPU


def run_worker(job: WorkerJob) -> int:
    """A sweep's job in a worker process: threads, tracker, spec, then the worker loop.
    Returns trials run; SIGINT or SIGTERM ends it (the loop has marked its trials) with
    ``Interrupted``."""
    set_threads(job.device, job.threads)
    spec = StudySpec.model_validate_json(job.spec_json)
    tracker = None
    if job.tracking is not None:
        from ganbench.tracking import Tracker

        tracker = Tracker.attach(job.tracking)
    return worker_loop(spec, job.device, job.total, job.deadline, tracker, on_event=say)


def say(line: str) -> None:
    """A worker's event (a recovered trial, a storage outage): one line on the console."""
    print(line, flush=True)


def worker_jobs(spec: StudySpec, devices: Sequence[str], total: int,
                deadline: float | None = None, tracking: Any = None,
                threads: int | None = None) -> list[WorkerJob]:
    """One job per entry of ``devices``, CPU threads shared out among the CPU workers of
    this machine (or ``threads`` each: a cluster worker's reserved CPUs)."""
    threads = threads or cpu_threads(spec, list(devices).count("cpu"))
    return [WorkerJob(spec.model_dump_json(), device, total, deadline, tracking, threads)
            for device in devices]
