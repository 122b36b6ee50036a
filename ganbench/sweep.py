"""A sweep, as ``ganbench sweep`` and ``ganbench worker`` run it: open tracking and the
study, run workers under the supervisor until the study holds its total, record provenance,
register the best generator, and close tracking in every case.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from ganbench.accounting import INTERRUPTED, budget_spent, count_trials, recover_dead_workers
from ganbench.cluster import open_supervisor, plan_workers
from ganbench.errors import GanbenchError
from ganbench.registry import register_best
from ganbench.spec import StudySpec, logged
from ganbench.study import open_study
from ganbench.supervisor import WorkerDied
from ganbench.trial import TrialOutcome
from ganbench.worker import (
    cpu_threads,
    needed_workers,
    run_worker,
    say,
    set_threads,
    worker_jobs,
    worker_loop,
)

# ---------------------------------------------------------------- the supervised sweep
REPLACEMENTS = 3  # new tasks per cluster worker whose task was lost with its node


@dataclass
class Snapshot:
    """The study's state as the supervisor last saw it."""

    done: int
    running: list[FrozenTrial]
    best: list[float] | None
    total: int
    trials: list[FrozenTrial]     # all of them, as read for this snapshot


def snapshot(study: optuna.Study, spec: StudySpec, total: int) -> Snapshot:
    """The study's counted, running and best trials now."""
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
              on_lost: Callable[[FrozenTrial, str], None] | None = None,
              on_event: Callable[[str], None] | None = None) -> Snapshot:
    """Run the study to ``spec.trials`` counted trials with one worker per device: local
    processes, or Ray tasks on a cluster (``execution.backend``).

    Resumable: trials already in the storage count; dead local workers' trials are failed
    and re-queued first. On a signal the supervisor stops the workers (they mark their
    trials), recovers what was left running and raises ``Interrupted``. A worker lost with
    its Ray node has its trials failed and re-queued at once and its place taken by a new
    task (up to ``REPLACEMENTS`` per worker); a local worker that dies is not replaced. A
    study that ends short of its total (a worker died, or trials run elsewhere) is a
    GanbenchError.
    """
    study = open_study(spec)
    recover_dead_workers(study, on_lost)
    total = spec.trials
    deadline = time.time() + spec.timeout if spec.timeout else None
    snap = snapshot(study, spec, total)
    if snap.done >= total:
        return snap
    devices = needed_workers(devices, total, snap.done)
    failures: list[str] = []
    ex = spec.execution
    workers = open_supervisor(ex.backend, ex.address, devices, cpus=ex.cpus)
    lost = getattr(workers, "lost", None)  # cluster workers lost, by name

    def recover() -> None:  # a worker stopped between asking and training leaves it RUNNING
        recover_dead_workers(study, on_lost, kind=INTERRUPTED, lost=lost)

    workers.on_stop = recover
    threads = (ex.cpus if ex.mode == "population" else 1) if ex.backend == "ray" else None
    jobs = worker_jobs(spec, devices, total, deadline, tracking, threads)
    replaced = 0
    with workers:
        for i, job in enumerate(jobs):
            workers.submit(i, run_worker, job)
        while workers.busy():
            snap = snapshot(study, spec, total)
            if on_poll:
                on_poll(snap)
            for done in workers.wait(poll):
                if isinstance(done.error, WorkerDied) and workers.replaces_dead and \
                        replaced < REPLACEMENTS * len(devices):
                    replaced += 1
                    lost_now = recover_dead_workers(study, on_lost, lost=lost)
                    if on_event:
                        on_event(f"{done.error}: trial(s) {_numbers(lost_now)} failed, not "
                                 "counted, re-queued; a new worker takes its place")
                    workers.submit(done.worker, run_worker, jobs[done.worker])
                elif done.error is not None:
                    failures.append(str(done.error).strip().splitlines()[0]
                                    if str(done.error).strip() else type(done.error).__name__)
    recover_dead_workers(study, on_lost, lost=lost)  # a dead worker's trial: re-queued
    snap = snapshot(study, spec, total)
    if on_poll:
        on_poll(snap)
    finished = budget_spent(spec, study.get_trials(deepcopy=False), reserve=False)
    if snap.done < total and not finished and (deadline is None or time.time() < deadline):
        if failures:
            raise GanbenchError(f"{len(failures)} worker(s) failed before the study reached "
                                f"{total} trials ({'; '.join(failures)}); rerun to continue")
        raise GanbenchError(f"the study ended short: {snap.done} of {total} counted, "
                            f"{len(snap.running)} still running elsewhere; rerun to continue")
    return snap


def _numbers(numbers: Sequence[int]) -> str:
    return ", ".join(map(str, numbers)) or "none"


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
    left (``devices`` by default: one per GPU, or per CPU core, of this machine or of the
    Ray cluster)."""
    from ganbench.devices import resolve_device

    device_list = plan_workers(spec, devices, spec.execution.mode == "population")
    if spec.execution.backend == "local":
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
    if spec.execution.backend == "ray":
        from ganbench.cluster import describe

        entry["cluster"] = describe()
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
                         on_lost=tracker and tracker.end_lost, on_event=on_event)
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


def join_study(spec: StudySpec, device: str = "auto",
               on_join: Callable[[str], None] | None = None,
               on_trial: Callable[[TrialOutcome], None] | None = None,
               on_event: Callable[[str], None] | None = say) -> int:
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
