"""Trial accounting: which trials count, the compute they spent and reserve, and what
becomes of trials whose worker is lost (failed uncounted, parameters re-queued).

Counting: a study is done when it holds ``spec.trials`` *counted* trials: COMPLETE, PRUNED,
and FAIL through the trial's own doing (divergence, an error in training). A trial that failed
because its worker died or was interrupted does not count; its parameters are re-queued.

Budgets: a compute budget is never overshot. A trial is asked only if the compute spent by
counted trials, plus the compute *reserved* by running trials (what they use if they run to
their last step), plus what the new trial may use, fits in the budget. A trial whose steps are
searched reserves the search's upper bound until it is sampled. Seconds cannot be planned: a
budget in seconds reserves the mean seconds of the trials counted so far.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from ganbench import optuna_adapter as oa
from ganbench.errors import exception_chain

if TYPE_CHECKING:
    from ganbench.spec import StudySpec

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


def is_infrastructure(exc: BaseException) -> bool:
    """Did ``exc`` (or what caused it) come from the storage or the tracking server?
    Such a failure is not the trial's fault."""
    return any((type(e).__module__ or "").startswith(_SERVICE_MODULES)
               or isinstance(e, (ConnectionError, optuna.exceptions.StorageInternalError))
               for e in exception_chain(exc))


# ---------------------------------------------------------------- what counts
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


# ---------------------------------------------------------------- compute and budgets
def compute_spent(trials: Sequence[FrozenTrial], unit: str) -> float:
    """Compute used by the counted trials, in ``unit`` (trials, g_steps, d_steps, seconds;
    each trial records the last three as user attributes)."""
    counted = [t for t in trials if is_counted(t)]
    if unit == "trials":
        return float(len(counted))
    return float(sum(t.user_attrs.get(unit, 0) for t in counted))


def planned_compute(spec: "StudySpec", params: dict[str, Any] | None, unit: str,
                    trials: Sequence[FrozenTrial] = ()) -> float:
    """The compute one trial uses if it runs to its last step, over all its seeds: with
    ``params`` as sampled, or (None) before sampling, with searched steps and D steps at
    their upper bounds. Seconds: the mean of the counted ``trials`` (0 before any)."""
    if unit == "trials":
        return 1.0
    if unit == "seconds":
        seconds = [t.user_attrs.get("seconds", 0.0) for t in trials if is_counted(t)]
        return float(sum(seconds) / len(seconds)) if seconds else 0.0
    from ganbench.config import TrainConfig
    from ganbench.spec import merge_params

    values = merge_params(spec.fixed(), params or {})
    for key in ("steps", "d_steps"):
        if params is None and key in spec.search:
            d = spec.search[key]
            values[key] = max(d.choices) if d.type == "categorical" else d.high
    steps = int(values.get("steps", TrainConfig.steps))
    d_steps = int(values.get("d_steps", TrainConfig.d_steps))
    return float(spec.seeds * steps * (d_steps if unit == "d_steps" else 1))


def compute_reserved(spec: "StudySpec", trials: Sequence[FrozenTrial], unit: str) -> float:
    """Compute the running trials may still use: their planned compute."""
    return sum(planned_compute(spec, t.params or None, unit, trials)
               for t in trials if t.state == TrialState.RUNNING)


def trials_that_fit(spec: "StudySpec", trials: Sequence[FrozenTrial], wanted: int) -> int:
    """How many of ``wanted`` new trials the study may ask now: its total less the counted
    and running trials, and, with a compute budget, as many as fit in what is neither spent
    nor reserved."""
    done, running = count_trials(trials)
    room = max(0, min(wanted, spec.trials - done - running))
    if spec.budget is None or room == 0:
        return room
    left = budget_left(spec, trials)
    each = planned_compute(spec, None, spec.budget.unit, trials)
    fit = room if each <= 0 else int((left + 1e-9) // each)
    return max(0, min(room, fit))


def budget_spent(spec: "StudySpec", trials: Sequence[FrozenTrial], reserve: bool = True
                 ) -> bool:
    """Is the study's compute budget (if any) used up: no further trial fits beside what
    is spent and (``reserve``) reserved by running trials?"""
    if spec.budget is None:
        return False
    left = budget_left(spec, trials, reserve)
    return left <= 0 or planned_compute(spec, None, spec.budget.unit, trials) > left + 1e-9


def budget_left(spec: "StudySpec", trials: Sequence[FrozenTrial], reserve: bool = True
                ) -> float:
    """What the study's compute budget still holds: its amount less what counted trials
    spent and (``reserve``) what running trials may still use."""
    unit = spec.budget.unit
    left = spec.budget.amount - compute_spent(trials, unit)
    return left - compute_reserved(spec, trials, unit) if reserve else left


# ---------------------------------------------------------------- lost trials
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
    Passed to Optuna's RDBStorage as ``heartbeat_stale_trial_callback``."""
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


def fail_trial(study: optuna.Study, trial: Any, kind: str, reason: str) -> None:
    """Mark a RUNNING trial (a Trial or FrozenTrial of ``study``) FAIL with a reason, and
    re-queue its parameters unless the failure was its own fault."""
    if oa.is_finished(study, trial):  # finished meanwhile by someone else
        return
    try:
        oa.set_user_attr(study, trial, "fail_kind", kind)
        oa.set_user_attr(study, trial, "fail_reason", reason)
        frozen = study.tell(trial.number, state=TrialState.FAIL)
    except RuntimeError:  # finished meanwhile (Optuna's errors for it are RuntimeErrors)
        return
    if kind != TRIAL_FAULT:
        requeue(study, frozen)


def recover_dead_workers(study: optuna.Study,
                         on_lost: Callable[[FrozenTrial, str], None] | None = None,
                         kind: str = WORKER_DIED,
                         lost: Mapping[str, str] | None = None) -> list[int]:
    """Fail and re-queue RUNNING trials whose worker was a process of this host that is gone,
    or a cluster worker named in ``lost`` (its ``worker`` name → how it was lost);
    ``on_lost(trial, reason)`` lets the caller close what else the trial had open (its
    MLflow run).

    Local workers are detected directly by pid, cluster workers by the name their
    supervisor reports lost (no heartbeat grace period to wait out); other workers on other
    machines are left to the storage's heartbeats.
    """
    host = socket.gethostname()
    lost = lost or {}
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w_host, w_pid = trial.user_attrs.get("host"), trial.user_attrs.get("pid")
        name = trial.user_attrs.get("worker")
        if name in lost:  # a cluster worker's process outlives its tasks: its name decides
            how = lost[name]
        elif name is None and w_host == host and isinstance(w_pid, int) and \
                not pid_alive(w_pid):
            how = f"pid {w_pid} on {host}"
        else:
            continue
        reason = f"worker died ({how})" if kind == WORKER_DIED else "interrupted (Ctrl-C)"
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


def fail_stale(study: optuna.Study) -> list[int]:
    """On RDB storages: fail (and re-queue, through the storage's callback) the RUNNING
    trials whose heartbeat is older than the grace period, with Optuna's own machinery.
    Trials are stale only once they have a heartbeat: workers record one at ask time."""
    if not oa.has_heartbeat(study):
        return []
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    oa.fail_stale_trials(study)
    return [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            if t.number in running and "fail_kind" not in t.user_attrs]


class Heartbeat:
    """Records heartbeats of the running trials on RDB storages (ask/tell does not), at the
    storage's interval."""

    def __init__(self, study: optuna.Study) -> None:
        self.study = study if oa.has_heartbeat(study) else None

    @contextlib.contextmanager
    def beating(self, *trials: Any) -> Iterator[None]:
        if self.study is None:
            yield
            return
        stop = threading.Event()
        study = self.study

        def beat() -> None:
            while not stop.is_set():
                for trial in trials:
                    with contextlib.suppress(Exception):
                        oa.record_heartbeat(study, trial)
                stop.wait(oa.heartbeat_interval(study))

        thread = threading.Thread(target=beat, daemon=True, name="heartbeat")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)
