"""The one supervisor of sweeps and comparisons, on real spawned worker processes: jobs and
their errors come back, a dead worker is named, and nothing leaks (threads, processes)."""

import multiprocessing as mp
import os
import signal
import threading
import time

import pytest

from ganbench.supervisor import Supervisor, WorkerDied

pytestmark = pytest.mark.slow  # spawns processes


def thread_count(_: object) -> int:
    """A job: the threads alive in the worker process running it."""
    return threading.active_count()


def fail(message: str) -> None:
    raise ValueError(message)


def die(_: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def run_all(workers: Supervisor, jobs: list) -> list:
    """Submit ``jobs`` (function, argument) to the idle workers as they free up; the Done
    of each, in submission order."""
    pending, done = list(enumerate(jobs)), []
    while pending or workers.busy():
        for i in workers.idle():
            if pending:
                tag, (fn, job) = pending.pop(0)
                workers.submit(i, fn, job, tag)
        done += workers.wait(1.0)
    return sorted(done, key=lambda d: d.tag)


def test_jobs_reuse_their_processes_without_leaking_threads():
    """The old comparison pool started a parent-watching thread per job: after many jobs on
    one worker its thread count grew. The supervisor's workers watch once."""
    before = threading.active_count()
    with Supervisor(["cpu"]) as workers:
        counts = [d.value for d in run_all(workers, [(thread_count, None)] * 5)]
    assert len(set(counts)) == 1, counts                # the same threads, job after job
    assert counts[0] <= 2                               # main + one parent watcher
    assert mp.active_children() == []                   # every worker joined
    assert threading.active_count() == before


def test_errors_and_deaths_come_back_named():
    with Supervisor(["cpu", "cpu"]) as workers:
        done = run_all(workers, [(fail, "bad value"), (nap, 0.1), (die, None)])
        assert isinstance(done[0].error, ValueError) and str(done[0].error) == "bad value"
        assert done[1].value == 0.1 and done[1].error is None
        assert isinstance(done[2].error, WorkerDied)
        assert "SIGKILL" in str(done[2].error)
        assert len(workers.idle()) == 1                 # the dead one takes no more jobs
    assert mp.active_children() == []


def test_a_signal_stops_every_worker_and_runs_the_recovery():
    """SIGTERM to the supervising process: the workers are stopped (a sleeping job is
    interrupted), ``on_stop`` runs once they are gone, and Interrupted carries SIGTERM."""
    recovered = []
    with pytest.raises(KeyboardInterrupt) as stopped:
        with Supervisor(["cpu", "cpu"],
                        on_stop=lambda: recovered.append(mp.active_children())) as workers:
            workers.submit(0, nap, 60.0)
            workers.submit(1, nap, 60.0)
            threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
            start = time.time()
            while True:
                workers.wait(0.5)
    assert getattr(stopped.value, "signum", None) == signal.SIGTERM
    assert time.time() - start < 20                     # not the jobs' 60 s
    assert recovered == [[]]                            # after every worker ended
    assert mp.active_children() == []
