"""Worker processes and their supervision: devices and torch threads, the one bootstrap
every worker process runs (sweeps and a comparison's tuning alike), the supervisor of a
sweep, and a sweep as the CLI runs it (tracking opened and closed around it).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from ganbench.errors import GanbenchError
from ganbench.recovery import (
    INTERRUPTED,
    Interrupted,
    count_trials,
    recover_dead_workers,
    stop_on_signals,
    watch_parent,
)
from ganbench.spec import StudySpec, logged
from ganbench.study import open_study
from ganbench.sweep import TrialOutcome, budget_spent, worker_loop


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


# ---------------------------------------------------------------- worker processes
@dataclass
class WorkerJob:
    """Picklable: everything a worker process needs."""

    spec_json: str                 # the StudySpec as JSON
    device: str
    total: int                     # run trials until the study holds this many counted
    deadline: float | None = None  # time.time() after which no trial starts
    tracking: Any = None           # a tracking.TrackingHandle, or None
    threads: int = 1               # torch threads on CPU
    supervisor: int = 0            # pid of the process that started it (0: not watched)


def run_worker(job: WorkerJob) -> int:
    """Entry point of every spawned worker process: threads, tracker, spec, then the worker
    loop. SIGINT or SIGTERM ends it quietly (the loop has marked its trials), and so does its
    supervisor's death. Returns trials run."""
    if job.supervisor:
        watch_parent(job.supervisor)
    set_threads(job.device, job.threads)
    spec = StudySpec.model_validate_json(job.spec_json)
    tracker = None
    if job.tracking is not None:
        from ganbench.tracking import Tracker

        tracker = Tracker.attach(job.tracking)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return worker_loop(spec, job.device, job.total, job.deadline, tracker,
                           on_event=_say)
    except KeyboardInterrupt:
        return 0


def _say(line: str) -> None:
    """A worker's event (a recovered trial, a storage outage): one line on the console."""
    print(line, flush=True)


def worker_jobs(spec: StudySpec, devices: Sequence[str], total: int,
                deadline: float | None = None, tracking: Any = None) -> list[WorkerJob]:
    """One job per entry of ``devices``, CPU threads shared out among the CPU workers."""
    threads = cpu_threads(spec, list(devices).count("cpu"))
    return [WorkerJob(spec.model_dump_json(), device, total, deadline, tracking, threads,
                      os.getpid()) for device in devices]


def start_workers(spec: StudySpec, devices: Sequence[str], total: int,
                  deadline: float | None, tracking: Any = None) -> list[mp.Process]:
    """Spawn one worker process per entry of ``devices``."""
    ctx = mp.get_context("spawn")
    procs = []
    for job in worker_jobs(spec, devices, total, deadline, tracking):
        p = ctx.Process(target=run_worker, args=(job,), daemon=False)
        p.start()
        procs.append(p)
    return procs


# ---------------------------------------------------------------- the supervisor
@dataclass
class Snapshot:
    """The study's state as the supervisor last saw it."""

    done: int
    running: list[FrozenTrial]
    best: list[float] | None
    total: int
    trials: list[FrozenTrial]     # all of them, as read for this snapshot


def snapshot(study: optuna.Study, spec: StudySpec, total: int) -> Snapshot:
    trials = study.get_trials(deepcopy=False)
    done, _ = count_trials(trials)
    running = [t for t in trials if t.state == TrialState.RUNNING]
    best = None
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete and not spec.multi_objective:
        pick = min if spec.directions[0] == "minimize" else max
        best = pick(complete, key=lambda t: t.values[0]).values
    return Snapshot(done, running, best, total, trials)


def supervise(spec: StudySpec, devices: Sequence[str], tracking: Any = None,
              on_poll: Callable[[Snapshot], None] | None = None, poll: float = 1.0,
              on_lost: Callable[[FrozenTrial, str], None] | None = None) -> Snapshot:
    """Run the study to ``spec.trials`` counted trials with one worker process per device.

    Resumable: trials already in the storage count; dead local workers' trials are failed
    and re-queued first. On Ctrl-C the workers mark their trials and the KeyboardInterrupt
    is re-raised after they exit.
    """
    study = open_study(spec)
    recover_dead_workers(study, on_lost)
    total = spec.trials
    deadline = time.time() + spec.timeout if spec.timeout else None
    snap = snapshot(study, spec, total)
    if snap.done >= total:
        return snap
    devices = needed_workers(devices, total, snap.done)
    procs = start_workers(spec, devices, total, deadline, tracking)
    # SIGINT (Ctrl-C, or `kill -INT` to this process alone) and SIGTERM (kill, timeout,
    # systemd, Slurm) only set a flag here; the loop passes the stop on to every worker
    # (a terminal's Ctrl-C reached them already; a signal to this pid alone did not).
    stop = threading.Event()
    received: list[int] = []

    def forward(signum: int) -> None:  # at once: no worker may start a trial after it
        for p in procs:
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(p.pid, signal.SIGINT)

    with stop_on_signals(stop, received, forward):
        while any(p.is_alive() for p in procs) and not stop.is_set():
            snap = snapshot(study, spec, total)
            if on_poll:
                on_poll(snap)
            for p in procs:
                p.join(timeout=poll / len(procs))
        if stop.is_set():
            # The workers mark their trials and stop at their next safe point; one that has
            # not within 30 s is killed (SIGTERM would only ask it again) and its trial
            # recovered below.
            end = time.time() + 30  # 30 s for all of them, however many
            for p in procs:
                p.join(timeout=max(0.0, end - time.time()))
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
            # A worker stopped between asking a trial and starting it leaves it RUNNING.
            recover_dead_workers(study, on_lost, kind=INTERRUPTED)
            raise Interrupted(received[0] if received else signal.SIGINT)
    snap = snapshot(study, spec, total)
    if on_poll:
        on_poll(snap)
    failed = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    finished = budget_spent(spec, study.get_trials(deepcopy=False))  # a compute budget
    if snap.done < total and not finished and (deadline is None or time.time() < deadline):
        if failed:
            raise GanbenchError(f"{len(failed)} worker(s) exited with codes {failed} before "
                                f"the study reached {total} trials; rerun to continue")
        raise GanbenchError(f"the study ended short: {snap.done} of {total} counted, "
                            f"{len(snap.running)} still running elsewhere; rerun to continue")
    return snap


# ---------------------------------------------------------------- sweeps as the CLI runs them
def open_tracked(spec: StudySpec) -> tuple[optuna.Study, Any]:
    """Check the tracking server, open the storage and study, then the study's parent run
    (a ``tracking.Tracker``, or None with tracking off).

    The order makes every unreachable service a one-line error before anything is created.
    """
    from ganbench.study import storage_label

    if spec.tracking is not False:
        from ganbench.tracking import check_reachable, resolve_uri

        check_reachable(resolve_uri(spec.tracking.uri))
    study = open_study(spec)
    tracker = None
    if spec.tracking is not False:
        from ganbench.tracking import Tracker

        tracker = Tracker.for_study(spec, logged(spec),
                                    storage_label(spec))
    return study, tracker


@dataclass
class SweepPlan:
    """An opened sweep: its study, tracker and the workers it will start."""

    spec: StudySpec
    study: optuna.Study
    tracker: Any
    devices: list[str]


def plan_sweep(spec: StudySpec, devices: Sequence[str] | None = None) -> SweepPlan:
    """Check the devices, open tracking and the study, and size the workers to the trials
    left (``devices`` by default: one per GPU, or per CPU core)."""
    from ganbench.devices import resolve_device

    pop = spec.execution.mode == "population"
    device_list = default_devices(spec.workers, devices, population=pop)
    for d in set(device_list):
        resolve_device(d)
    study, tracker = open_tracked(spec)
    done, _ = count_trials(study.get_trials(deepcopy=False))
    return SweepPlan(spec, study, tracker, needed_workers(device_list, spec.trials, done))


def run_sweep(plan: SweepPlan, on_poll: Callable[[Snapshot], None] | None = None,
              on_event: Callable[[str], None] | None = None) -> Snapshot:
    """Run a planned sweep to its total; MLflow runs left open by an earlier kill or by this
    run's interruption are closed, and the study's parent run is ended in every case."""
    from ganbench import provenance

    tracker = plan.tracker
    spec = plan.spec
    entry = provenance.collect(logged(spec), plan.devices, {spec.name: spec.sampler.seed},
                               cpu_threads(spec, plan.devices.count("cpu")))
    provenance.record(plan.study, entry)
    if tracker is not None:
        tracker.set_tags(provenance.tags(entry))
    start = time.perf_counter()
    try:
        if tracker is not None:
            # Dead workers' trials first: a run whose trial was still RUNNING is an orphan
            # only once that trial is failed (a kill can land between creating the run and
            # recording its id in the trial).
            recover_dead_workers(plan.study, tracker.end_lost)
            tracker.close_orphans(plan.study)
        snap = supervise(plan.spec, plan.devices, tracker and tracker.handle, on_poll,
                         on_lost=tracker and tracker.end_lost)
        provenance.record(plan.study, provenance.finished(entry, time.perf_counter() - start))
        if tracker is not None:
            try:
                if (line := register_best(plan.spec, plan.study, tracker)) and on_event:
                    on_event(line)
            except Exception as exc:  # the registry is a copy: never fail a sweep over it
                print(f"warning: tracking: could not register the best generator: "
                      f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}",
                      file=sys.stderr)
        return snap
    except KeyboardInterrupt:
        if tracker is not None:
            tracker.close_orphans(plan.study)
        raise
    finally:
        if tracker is not None:
            tracker.finish(plan.study)


def register_best(spec: StudySpec, study: optuna.Study, tracker) -> str | None:
    """Register the study's best generator in the MLflow model registry as
    ``<study>-generator`` when it beats the registered one (single objective, a completed
    trial with a kept generator). Returns what happened, in one line."""
    import tempfile

    import torch

    from ganbench.tracking import download_generator
    from ganbench.train import load_checkpoint

    if tracker is None or spec.multi_objective or not any(
            t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return None
    best = study.best_trial
    with tempfile.TemporaryDirectory() as tmp:
        path = best.user_attrs.get("checkpoint")
        if not path or not os.path.isfile(path):
            if "mlflow_run_id" not in best.user_attrs:
                return None
            path = download_generator(tracker.handle.uri, best.user_attrs["mlflow_run_id"],
                                      tmp)
        config, g, _ = load_checkpoint(path)
    example = torch.randn(5, config.noise_dim, generator=torch.Generator().manual_seed(0),
                          dtype=next(g.parameters()).dtype)
    return tracker.register_generator(
        f"{spec.name}-generator", g, example, best.values[0], spec.directions[0],
        {"study": spec.name, "trial": str(best.number)})


def join_study(spec: StudySpec, device: str = "auto",
               on_join: Callable[[str], None] | None = None,
               on_trial: Callable[[TrialOutcome], None] | None = None,
               on_event: Callable[[str], None] | None = _say) -> int:
    """Run one worker in this process (``ganbench worker``, e.g. on another machine against
    a shared storage) until the study holds its total; returns the trials it ran."""
    from ganbench.devices import resolve_device

    dev = str(resolve_device(device))
    set_threads(dev, cpu_threads(spec, 1))
    study, tracker = open_tracked(spec)
    recover_dead_workers(study, tracker and tracker.end_lost)
    if tracker is not None:
        tracker.close_orphans(study)
    deadline = time.time() + spec.timeout if spec.timeout else None
    if on_join is not None:
        on_join(dev)
    try:
        return worker_loop(spec, dev, spec.trials, deadline, tracker, on_trial,
                           on_event=on_event)
    finally:
        if tracker is not None:
            tracker.finish(study)
