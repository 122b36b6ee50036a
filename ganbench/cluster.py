"""Workers on a Ray cluster: the supervisor of ``execution: {backend: ray}`` (``--ray``).

``RaySupervisor`` has the local ``Supervisor``'s interface and guarantees, with Ray tasks in
place of spawned processes: each job (a sweep's worker loop, a comparison's tuning batch or
held-out run) is a Ray task that reserves what it needs (one GPU for a GPU worker, one CPU,
or ``execution.cpus`` for a population worker), placed by Ray on whatever node has room.

- **The storage stays the one source of truth**: tasks open the study from its database
  like any worker; nothing about trials travels through Ray. A journal or SQLite file
  cannot be shared by the nodes and is refused before anything starts (so is an MLflow
  store in a local file).
- **Signals**: SIGINT/SIGTERM set a flag here and cancel every task (Ray raises SIGINT in
  it: the worker loop marks its trials and stops); a task that has not ended within
  ``STOP_PATIENCE`` seconds is force-cancelled; then ``on_stop`` recovers what was left.
- **A lost node**: its tasks end with Ray's failure (no answer of theirs), reported as a
  ``Done`` with ``WorkerDied``; every trial a task ran carries its name (``worker``), so
  the caller fails and re-queues exactly those at once (``lost``), and, unlike local
  workers, may submit the job again: Ray places it on a node that is alive.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Any, Callable, Sequence

from ganbench.errors import GanbenchError
from ganbench.signals import Interrupted, stop_on_signals
from ganbench.supervisor import STOP_PATIENCE, Done, Supervisor, WorkerDied

RAY_EXTRA = "pip install -e '.[ray]'"
_REMOTE: Any = None  # _serve as a Ray remote function, made once


def _ray():
    try:
        import ray
    except ImportError:
        raise GanbenchError(f"execution.backend ray: Ray is not installed ({RAY_EXTRA})") \
            from None
    return ray


def check_shared(storage: str | None, tracking_uri: str | None) -> None:
    """Refuse, in one line, what a cluster's nodes cannot share: the default journal file,
    a SQLite storage, an MLflow store in a local file or SQLite database."""
    if storage is None:
        raise GanbenchError("execution.backend ray: the nodes cannot share the journal file "
                            "runs/<name>/optuna.log; give --storage postgresql://…")
    if storage.startswith("sqlite:"):
        raise GanbenchError(f"execution.backend ray: the nodes cannot share {storage}; give "
                            "--storage postgresql://…")
    if tracking_uri is not None and not tracking_uri.startswith(("http://", "https://",
                                                                 "databricks")):
        raise GanbenchError(f"execution.backend ray: the nodes cannot share the MLflow store "
                            f"{tracking_uri}; give --tracking-uri http://… (an mlflow "
                            "server), or --set tracking=false")


def connect(address: str | None) -> None:
    """Join the Ray cluster at ``address`` (once per process); one line if unreachable."""
    ray = _ray()
    if ray.is_initialized():
        return
    import logging

    try:
        ray.init(address=address or "auto", logging_level=logging.WARNING,
                 log_to_driver=True, configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GanbenchError(f"execution.address {address or 'auto'}: cannot reach a Ray "
                            f"cluster ({first})") from None


def cluster_devices(workers: int | None, cpus: int = 1) -> list[str]:
    """One worker per GPU of the cluster, or one per ``cpus`` of its CPUs (``workers``
    overrides the count); "cuda" names a GPU worker: inside its task, the GPU Ray gave it."""
    ray = _ray()
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    kind = "cuda" if gpus else "cpu"
    n = workers or (gpus if gpus else max(1, int(resources.get("CPU", 1)) // cpus))
    return [kind] * n


def plan_workers(spec: Any, devices: Sequence[str] | None, population: bool = False
                 ) -> list[str]:
    """A run's workers: on this machine (one per GPU, or per CPU core; one in all for a
    population on CPUs), or on the Ray cluster when ``execution.backend`` is ray."""
    if spec.execution.backend == "ray":
        return cluster_workers(spec, devices)
    from ganbench.worker import default_devices

    return default_devices(spec.workers, devices, population=population)


def cluster_workers(spec: Any, devices: Sequence[str] | None) -> list[str]:
    """A cluster run's workers (``spec``: a study or comparison with backend ray): refuse
    what the nodes cannot share, join the cluster, then one worker per GPU or per
    ``execution.cpus`` CPUs of it (``spec.workers``, or ``devices`` by kind, say
    otherwise)."""
    from ganbench.tracking import resolve_uri

    execution = spec.execution
    check_shared(spec.storage, None if spec.tracking is False
                 else resolve_uri(spec.tracking.uri))
    connect(execution.address)
    if devices:
        return ["cuda" if d.startswith("cuda") else "cpu" for d in devices]
    return cluster_devices(spec.workers,
                           execution.cpus if execution.mode == "population" else 1)


def describe() -> dict[str, Any]:
    """The cluster a run used, for its provenance: Ray's version, live nodes, CPUs, GPUs."""
    ray = _ray()
    resources = ray.cluster_resources()
    return {"ray": ray.__version__, "nodes": sum(1 for n in ray.nodes() if n.get("Alive")),
            "cpus": resources.get("CPU", 0), "gpus": resources.get("GPU", 0)}


def _serve(fn: Callable[[Any], Any], job: Any) -> Any:
    """A job inside its Ray task: named for recovery, quiet as ganbench's own processes,
    stopped by Ray's cancel (SIGINT) as a local worker is by its supervisor."""
    import ray

    from ganbench import trial
    from ganbench.study import quiet_optuna

    ctx = ray.get_runtime_context()
    trial.WORKER.clear()
    trial.WORKER.update(worker=f"ray:{ctx.get_task_id()}", node=ctx.get_node_id())
    quiet_optuna()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return fn(job)
    finally:
        signal.signal(signal.SIGINT, previous)
        trial.WORKER.clear()


class RaySupervisor:
    """Jobs as Ray tasks, one in flight per entry of ``devices`` ("cpu" or "cuda"), each
    reserving one CPU (``cpus`` for population jobs) and, for "cuda", one GPU. The local
    ``Supervisor``'s interface; ``lost`` maps the name of every task lost with its node to
    how it was lost, for ``recover_dead_workers``."""

    replaces_dead = True   # a lost task's job may be submitted again: Ray places it anew

    def __init__(self, address: str | None, devices: Sequence[str],
                 on_stop: Callable[[], None] | None = None, cpus: int = 1) -> None:
        self.address = address
        self.devices = list(devices)
        self.on_stop = on_stop
        self.cpus = cpus
        self.refs: dict[int, Any] = {}          # worker slot → its task's ObjectRef
        self.jobs: dict[int, Any] = {}          # worker slot → tag of its job in flight
        self.dead: set[int] = set()             # never filled: a slot outlives its task
        self.lost: dict[str, str] = {}
        self.stop = threading.Event()
        self.received: list[int] = []
        self._signals = contextlib.ExitStack()

    def __enter__(self) -> "RaySupervisor":
        connect(self.address)
        self._signals.enter_context(stop_on_signals(self.stop, self.received, self._forward))
        return self

    def __exit__(self, kind, exc, tb) -> None:
        with self._signals:
            if kind is None:
                return
            self._stop_workers()
            if self.on_stop is not None:
                self.on_stop()

    def _forward(self, signum: int) -> None:
        ray = _ray()
        for ref in list(self.refs.values()):
            with contextlib.suppress(Exception):
                ray.cancel(ref)

    def _stop_workers(self) -> None:
        """Cancel every task (SIGINT in it), wait STOP_PATIENCE seconds for all of them,
        then force-cancel the rest; tasks that did not end on their own count as lost."""
        ray = _ray()
        self._forward(signal.SIGINT)
        refs = list(self.refs.values())
        end = time.time() + STOP_PATIENCE
        while refs and time.time() < end:
            _, refs = ray.wait(refs, num_returns=len(refs), timeout=1.0)
        for ref in refs:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
            self.lost[_name(ref)] = "stopped"
        self.refs.clear()

    def idle(self) -> list[int]:
        return [i for i in range(len(self.devices)) if i not in self.jobs]

    def busy(self) -> bool:
        return bool(self.jobs)

    def submit(self, worker: int, fn: Callable[[Any], Any], job: Any, tag: Any = None) -> None:
        """Start ``fn(job)`` as a Ray task for the (idle) slot ``worker``."""
        ray = _ray()
        gpu = self.devices[worker].startswith("cuda")
        population = bool(getattr(job, "population", False)) or \
            getattr(job, "threads", 1) > 1
        global _REMOTE
        _REMOTE = _REMOTE or ray.remote(_serve)
        task = _REMOTE.options(
            num_cpus=self.cpus if population else 1, num_gpus=1 if gpu else 0,
            max_retries=0, name=f"ganbench-worker-{worker}")
        self.jobs[worker] = tag
        self.refs[worker] = task.remote(fn, job)

    def wait(self, timeout: float) -> list[Done]:
        """The jobs that ended within ``timeout`` seconds. A job whose task was lost (its
        node died, its process was killed) is a ``Done`` with ``WorkerDied``."""
        ray = _ray()
        if self.stop.is_set():
            raise Interrupted(self.received[0] if self.received else signal.SIGINT)
        if not self.refs:
            return []
        slots = {ref: i for i, ref in self.refs.items()}
        ready, _ = ray.wait(list(slots), num_returns=len(slots), timeout=timeout)
        out: list[Done] = []
        for ref in ready:
            i = slots[ref]
            device, tag = self.devices[i], self.jobs.pop(i)
            del self.refs[i]
            try:
                out.append(Done(i, device, tag, value=ray.get(ref)))
            except ray.exceptions.RayTaskError as exc:  # the job raised: its own error
                out.append(Done(i, device, tag, error=_cause(exc)))
            except ray.exceptions.RayError as exc:  # the task was lost with its process
                how = _how(exc)
                self.lost[_name(ref)] = how
                out.append(Done(i, device, tag, error=WorkerDied(device, how=how)))
        if self.stop.is_set():
            raise Interrupted(self.received[0] if self.received else signal.SIGINT)
        return out


def _name(ref: Any) -> str:
    return f"ray:{ref.task_id().hex()}"


def _cause(exc: Any) -> BaseException:
    cause = exc.cause if getattr(exc, "cause", None) is not None else exc
    if isinstance(cause, KeyboardInterrupt):
        return Interrupted(signal.SIGINT)
    return cause


def _how(exc: BaseException) -> str:
    names = {"NodeDiedError": "its node died", "WorkerCrashedError": "its process died",
             "LocalRayletDiedError": "its node died", "OwnerDiedError": "its owner died",
             "TaskCancelledError": "cancelled"}
    return names.get(type(exc).__name__, f"Ray: {type(exc).__name__}")


def open_supervisor(backend: str, address: str | None, devices: Sequence[str],
                    on_stop: Callable[[], None] | None = None, cpus: int = 1
                    ) -> Supervisor | RaySupervisor:
    """The supervisor of ``backend``: local processes, or Ray tasks on the cluster."""
    if backend == "ray":
        return RaySupervisor(address, devices, on_stop, cpus)
    return Supervisor(devices, on_stop)
