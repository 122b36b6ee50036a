"""The one supervisor of every multi-process run: a sweep's workers and a comparison's.

``Supervisor(devices)`` starts one spawned worker process per device and hands them jobs
(a picklable function and its argument); each process takes jobs one after another until it
is told to end. What it guarantees, for sweeps and comparisons alike:

- **Signals**: SIGINT (Ctrl-C, or ``kill -INT`` to this process alone) and SIGTERM (kill,
  timeout, systemd, Slurm) only set a flag here, and are passed on at once to every worker
  as SIGINT; workers mark their trials and stop at their next safe point. A worker that has
  not ended within ``STOP_PATIENCE`` seconds (for all of them together) is killed; then
  ``on_stop`` recovers what was left running, and ``Interrupted`` is raised (exit 130 or 143).
- **A worker that dies** (killed, out of memory) is reported as a ``Done`` with a
  ``WorkerDied`` error naming its exit code; the caller recovers its trials and decides.
- **Nothing leaks**: each worker process watches its supervisor once (it stops when the
  supervisor is gone, even SIGKILLed); leaving the ``with`` block ends and joins every
  process.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Sequence

from ganbench.errors import GanbenchError
from ganbench.signals import Interrupted, stop_on_signals, watch_parent

STOP_PATIENCE = 30.0  # seconds all workers together get to stop after a signal


class WorkerDied(GanbenchError):
    """A worker process ended without finishing its job."""

    def __init__(self, device: str, exitcode: int | None = None, how: str | None = None
                 ) -> None:
        how = how or (f"killed by {signal.Signals(-exitcode).name}"
                      if exitcode and exitcode < 0 else f"exit code {exitcode}")
        super().__init__(f"a worker on {device} died ({how})")
        self.exitcode = exitcode
        self.how = how


@dataclass
class Done:
    """A job's end: its value, or the error it raised (``WorkerDied`` if its process died)."""

    worker: int
    device: str
    tag: Any                        # what the caller submitted with the job
    value: Any = None
    error: BaseException | None = None


def serve(conn: Connection, supervisor: int) -> None:
    """A worker process: run the jobs the supervisor sends, one at a time, until it sends
    None. A stop (SIGINT) ends the process once the job has marked its trials."""
    from ganbench.study import quiet_optuna

    watch_parent(supervisor)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    quiet_optuna()  # a process of ganbench's own, as the CLI that started it
    try:
        while (message := conn.recv()) is not None:
            fn, job = message
            try:
                conn.send(("ok", fn(job)))
            except KeyboardInterrupt:
                return
            except BaseException as exc:  # reported to the supervisor, which decides
                conn.send(("error", _picklable(exc)))
    except (KeyboardInterrupt, EOFError, OSError):
        return


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


class Supervisor:
    """Worker processes, one per entry of ``devices``, fed jobs by ``submit`` and reaped by
    ``wait``. Use as a context manager; ``on_stop`` runs after a signal's stop, once every
    worker has ended (to recover their trials)."""

    replaces_dead = False  # a dead worker's process is gone: its slot takes no more jobs

    def __init__(self, devices: Sequence[str],
                 on_stop: Callable[[], None] | None = None) -> None:
        self.devices = list(devices)
        self.on_stop = on_stop
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        self.jobs: dict[int, Any] = {}          # worker → tag of its job in flight
        self.dead: set[int] = set()
        self.stop = threading.Event()
        self.received: list[int] = []
        self._signals = contextlib.ExitStack()

    # ------------------------------------------------------------ lifetime
    def __enter__(self) -> "Supervisor":
        ctx = mp.get_context("spawn")
        try:
            for _ in self.devices:
                ours, theirs = ctx.Pipe()
                proc = ctx.Process(target=serve, args=(theirs, os.getpid()), daemon=False)
                proc.start()
                theirs.close()
                self.procs.append(proc)
                self.conns.append(ours)
            self._signals.enter_context(stop_on_signals(self.stop, self.received,
                                                        self._forward))
        except BaseException:
            self._end(kill=True)
            raise
        return self

    def __exit__(self, kind, exc, tb) -> None:
        # The signal handlers stay until every worker has ended: a second signal while they
        # stop only asks again, it does not interrupt the stopping.
        with self._signals:
            if kind is None:
                self._end(kill=False)
                return
            # A signal, or an error of the caller's: the workers mark their trials and stop
            # (as on Ctrl-C), then what they left running is recovered.
            self._stop_workers()
            if self.on_stop is not None:
                self.on_stop()

    def _forward(self, signum: int) -> None:
        """At once: no worker may start a trial after a stop."""
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, TypeError, ValueError):
                if proc.is_alive():
                    os.kill(proc.pid, signal.SIGINT)

    def _stop_workers(self) -> None:
        """After a signal: the workers mark their trials and end; one that has not within
        STOP_PATIENCE seconds (all of them together) is killed."""
        self._forward(signal.SIGINT)
        for conn in self.conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send(None)
        end = time.time() + STOP_PATIENCE
        for proc in self.procs:
            proc.join(timeout=max(0.0, end - time.time()))
        self._end(kill=True)

    def _end(self, kill: bool) -> None:
        """Tell every worker to end, join them (killing the ones asked to stop that do not),
        and close the pipes."""
        for conn in self.conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send(None)
        for proc in self.procs:
            proc.join(timeout=1.0 if kill else 10.0)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for conn in self.conns:
            conn.close()

    # ------------------------------------------------------------ jobs
    def idle(self) -> list[int]:
        """The workers without a job (live ones only)."""
        return [i for i in range(len(self.procs)) if i not in self.jobs and i not in self.dead]

    def busy(self) -> bool:
        return bool(self.jobs)

    def submit(self, worker: int, fn: Callable[[Any], Any], job: Any, tag: Any = None) -> None:
        """Give ``worker`` (an idle one) the job ``fn(job)``; ``tag`` comes back with it."""
        self.jobs[worker] = tag
        self.conns[worker].send((fn, job))

    def wait(self, timeout: float) -> list[Done]:
        """The jobs that ended within ``timeout`` seconds (none if none did). A stop asked
        by a signal raises ``Interrupted`` here."""
        if self.stop.is_set():
            raise Interrupted(self.received[0] if self.received else signal.SIGINT)
        if not self.jobs:
            return []
        watched = {}
        for i in self.jobs:
            watched[self.conns[i]] = i
            watched[self.procs[i].sentinel] = i
        ready = wait(list(watched), timeout=timeout)
        out: list[Done] = []
        for i in sorted({watched[r] for r in ready}):
            if i not in self.jobs:
                continue
            try:
                status, value = self.conns[i].recv() if self.conns[i].poll() else \
                    (None, None)
            except (EOFError, OSError):
                status, value = None, None
            if status is None:  # the process ended without an answer
                self.procs[i].join(timeout=5)
                if self.procs[i].is_alive():
                    continue
                self.dead.add(i)
                out.append(Done(i, self.devices[i], self.jobs.pop(i),
                                error=WorkerDied(self.devices[i], self.procs[i].exitcode)))
            elif status == "ok":
                out.append(Done(i, self.devices[i], self.jobs.pop(i), value=value))
            else:
                out.append(Done(i, self.devices[i], self.jobs.pop(i), error=value))
        if self.stop.is_set():
            raise Interrupted(self.received[0] if self.received else signal.SIGINT)
        return out
