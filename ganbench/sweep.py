"""One trial of a study, from asking to telling: the search space, the objective, the
failure policy, and the worker loop that runs trials until the study holds its total.

Which trials count, and how lost ones are recovered, is ``ganbench.recovery``; worker
processes and the supervisor are ``ganbench.workers``.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from ganbench.config import TrainConfig
from ganbench.metrics import pruning_metric
from ganbench.recovery import (
    INFRASTRUCTURE,
    INTERRUPTED,
    SURPLUS,
    TRIAL_FAULT,
    Heartbeat,
    Interrupted,
    compute_spent,
    count_trials,
    fail_stale,
    fail_trial,
    has_heartbeat,
    is_counted,
    is_infrastructure,
    local_lock,
    pid_alive,
    stop_on_signals,
)
from ganbench.report import points
from ganbench.spec import StudySpec
from ganbench.study import make_sampler, open_study, quiet_warnings, run_dir
from ganbench.train import TrainResult, save_checkpoint, train


# ---------------------------------------------------------------- the objective
def suggest(trial: optuna.Trial, spec: StudySpec) -> dict[str, Any]:
    """Map the spec's search space onto trial.suggest_* (parameter name = trainer field)."""
    params: dict[str, Any] = {}
    for key, d in spec.search.items():
        if d.type == "categorical":
            params[key] = trial.suggest_categorical(key, d.choices)
        elif d.type == "int":
            params[key] = trial.suggest_int(key, int(d.low), int(d.high),
                                            step=int(d.step or 1), log=d.log)
        else:
            params[key] = trial.suggest_float(key, d.low, d.high, step=d.step, log=d.log)
    return params


@dataclass
class TrialOutcome:
    """What one trial produced, for the caller's display."""

    number: int
    state: TrialState
    values: list[float] | None
    reason: str = ""


def _stopper(should_stop: Callable[[], bool] | None):
    """An on_step callback that turns a requested stop into a KeyboardInterrupt."""
    if should_stop is None:
        return None

    def on_step(step: int, d_loss: float, g_loss: float) -> None:
        if should_stop():
            raise KeyboardInterrupt

    return on_step


def intermediate_metric(spec: StudySpec) -> str:
    """The metric reported at each evaluation for pruning (see metrics.pruning_metric)."""
    return pruning_metric(spec.objectives[0].metric)


def objective_values(spec: StudySpec, metrics: dict[str, float]) -> list[float]:
    return [float(metrics[o.metric]) for o in spec.objectives]


def trial_index(trials: Sequence[FrozenTrial], number: int) -> int:
    """Trial ``number``'s position in the study's sequence of trials: how many trials before
    it count or are still to run (complete, pruned, failed by their own fault, running,
    waiting). Trials lost to a dead worker or an interrupt are skipped (their re-queued
    copies hold their place), so an uninterrupted run and a resumed one number alike."""
    live = (TrialState.RUNNING, TrialState.WAITING)
    return sum(1 for t in trials if t.number < number and (is_counted(t) or t.state in live))


def sample(study: optuna.Study, trial: optuna.Trial, spec: StudySpec) -> dict[str, Any]:
    """Sample ``trial``'s parameters with the sampler seeded for its index (recorded when it
    was asked): they depend on the spec's seed, the index and the results told before, not
    on which worker samples it. Parameters already set (a re-queued trial's) are kept."""
    index = trial.user_attrs.get("index")
    if index is None:  # asked by another version: its position now
        index = trial_index(study.get_trials(deepcopy=False), trial.number)
    study.sampler = make_sampler(spec, index)
    return suggest(trial, spec)


def _begin_trial(study: optuna.Study, trial: optuna.Trial, spec: StudySpec, device: str,
                 tracker=None) -> tuple[dict[str, Any], Any]:
    """Record where the trial runs, sample its parameters, open its MLflow run."""
    storage = study._storage
    storage.set_trial_user_attr(trial._trial_id, "device", device)
    storage.set_trial_user_attr(trial._trial_id, "execution", spec.execution.mode)
    params = sample(study, trial, spec)
    return params, (tracker.start_trial(trial, spec, params) if tracker else None)


def seed_configs(spec: StudySpec, params: dict[str, Any], device: str,
                 seeds: Sequence[int] | None = None) -> list[TrainConfig]:
    """The trainer configs of ``params`` on ``seeds`` (default: the study's search seeds)."""
    seeds = range(spec.seeds) if seeds is None else seeds
    configs = [spec.trial_config(params, seed=i) for i in seeds]
    for config in configs:
        config.device = device
    return configs


def _eval_callback(spec: StudySpec, trial: optuna.Trial, run, seed: int, steps: int
                   ) -> Callable[[int, dict[str, float]], bool]:
    """Log an evaluation of one seed (curves of seed i follow those of seed i-1) and, for
    the first seed, report it to the pruner; True = prune."""

    def on_eval(step: int, row: dict[str, float]) -> bool:
        if run is not None:
            run.log_eval(step + seed * steps, row)
        # Pruning follows the first seed's curve (Optuna needs one value per step).
        if seed > 0 or spec.multi_objective:
            return False
        value = float(row.get(intermediate_metric(spec), math.nan))
        if math.isfinite(value):
            trial.report(value, step)
        return trial.should_prune()

    return on_eval


def _conclude(study: optuna.Study, trial: optuna.Trial, spec: StudySpec,
              results: list[TrainResult], run) -> TrialOutcome:
    """Tell Optuna (and MLflow) a trial's result from its seeds' training results.

    The failure policy lives here: a stopped seed → PRUNED; a diverged seed → FAIL (counted,
    reason in ``fail_reason``); else COMPLETE with the seeds' mean metrics.
    """
    storage = study._storage
    errors = [r for r in results if r.status == "error"]
    if errors:  # a population member's own exception
        return _fault(study, trial, run, errors[0].error)
    if storage.get_trial(trial._trial_id).state.is_finished():
        return _lost(trial, run)
    try:
        return _tell(study, trial, spec, results, run)
    except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
        if storage.get_trial(trial._trial_id).state.is_finished():
            return _lost(trial, run)
        raise


def _lost(trial: optuna.Trial, run) -> TrialOutcome:
    """The trial was failed elsewhere while it trained (its heartbeat went stale, e.g. the
    storage was unreachable): its result is dropped, its parameters were re-queued."""
    reason = "finished elsewhere while training (heartbeat lost): result dropped, re-queued"
    if run is not None:
        run.end(TrialState.FAIL, {}, reason, None)
    return TrialOutcome(trial.number, TrialState.FAIL, None, reason)


def _tell(study: optuna.Study, trial: optuna.Trial, spec: StudySpec,
          results: list[TrainResult], run) -> TrialOutcome:
    storage = study._storage
    state, reason, values, mean = TrialState.COMPLETE, "", None, {}
    checkpoint = None
    for unit, used in compute_used(results).items():
        storage.set_trial_user_attr(trial._trial_id, unit, used)
    if results and results[0].samples.numel():
        storage.set_trial_user_attr(trial._trial_id, "samples", points(results[0].samples))
    last = results[-1] if results else None
    for i, result in enumerate(results):
        if result.status in ("stopped", "diverged"):
            last = result
            state, reason = (TrialState.PRUNED, f"pruned at step {result.steps}") \
                if result.status == "stopped" else (TrialState.FAIL, f"seed {i} {result.reason}")
            break
    if state == TrialState.COMPLETE:
        seeds_metrics = [r.metrics for r in results]
        mean = {k: sum(m[k] for m in seeds_metrics) / len(seeds_metrics)
                for k in seeds_metrics[0]}
        values = objective_values(spec, mean)
        storage.set_trial_user_attr(trial._trial_id, "metrics", mean)
        if spec.seeds > 1:
            storage.set_trial_user_attr(trial._trial_id, "seed_metrics", seeds_metrics)
        checkpoint = _keep_generator(study, trial, spec, results[0])
        study.tell(trial, values)
    elif state == TrialState.PRUNED:
        study.tell(trial, state=TrialState.PRUNED)
    else:
        fail_trial(study, storage.get_trial(trial._trial_id), TRIAL_FAULT, reason)
    if run is not None:
        final = {f"objective.{o.metric}": v for o, v in zip(spec.objectives, values or [])}
        if spec.seeds > 1 and state == TrialState.COMPLETE:
            final |= {f"mean.{k}": v for k, v in mean.items()}
        run.end(state, final, reason, last, checkpoint=checkpoint)
    if checkpoint is not None and spec.storage is not None:  # it was MLflow's copy only
        shutil.rmtree(checkpoint.parent, ignore_errors=True)
    return TrialOutcome(trial.number, state, values, reason)


def generator_path(spec: StudySpec, number: int) -> Path:
    """Where a trial's final generator is kept beside a local (journal) study."""
    return run_dir(spec) / "generators" / f"trial-{number}.pt"


def _keep_generator(study: optuna.Study, trial: optuna.Trial, spec: StudySpec,
                    result: TrainResult) -> Path | None:
    """Save the first seed's final generator (with its config and metrics): beside the
    study's journal with the local defaults, else in a temporary file for MLflow alone.
    The path is recorded on the trial."""
    if result.generator is None:
        return None
    path = generator_path(spec, trial.number) if spec.storage is None else \
        Path(tempfile.mkdtemp(prefix="ganbench-")) / f"trial-{trial.number}.pt"
    save_checkpoint(path, result, study=spec.name, trial=trial.number)
    if spec.storage is None:
        study._storage.set_trial_user_attr(trial._trial_id, "checkpoint", str(path.resolve()))
    return path


def compute_used(results: Sequence[TrainResult]) -> dict[str, float]:
    """The compute a trial's runs used, summed over its seeds: generator steps,
    discriminator steps (d_steps per G step) and seconds of training."""
    return {"g_steps": sum(r.steps for r in results),
            "d_steps": sum(r.steps * r.config.d_steps for r in results),
            "seconds": sum(r.seconds for r in results)}


def _fault(study: optuna.Study, trial: optuna.Trial, run, exc: Exception) -> TrialOutcome:
    """An exception in a trial. A bug in training (not a diverging GAN): the trial FAILs,
    counted, with its traceback. A failure of the storage or the tracking server is not the
    trial's: it FAILs uncounted and its parameters are re-queued."""
    storage = study._storage
    infra = is_infrastructure(exc)
    reason = f"{'storage or tracking error' if infra else 'error'}: {type(exc).__name__}: " \
             f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    tb = "".join(traceback.format_exception(exc))
    with contextlib.suppress(Exception):  # the storage itself may be what failed
        storage.set_trial_user_attr(trial._trial_id, "traceback", tb)
    fail_trial(study, storage.get_trial(trial._trial_id),
               INFRASTRUCTURE if infra else TRIAL_FAULT, reason)
    if run is not None:
        run.end(TrialState.FAIL, {}, reason, None)
    return TrialOutcome(trial.number, TrialState.FAIL, None, reason)


def _interrupted(study: optuna.Study, trial: optuna.Trial, run) -> None:
    """Ctrl-C: the trial FAILs, not counted, and is re-queued; its MLflow run is KILLED."""
    fail_trial(study, study._storage.get_trial(trial._trial_id), INTERRUPTED,
               "interrupted (Ctrl-C)")
    if run is not None:
        run.end(TrialState.FAIL, {}, "interrupted", None, killed=True)


def run_trial(study: optuna.Study, trial: optuna.Trial, spec: StudySpec, device: str,
              tracker=None, should_stop: Callable[[], bool] | None = None) -> TrialOutcome:
    """Train one trial over ``spec.seeds`` seeds, one after another, and tell Optuna."""
    run = None
    try:
        params, run = _begin_trial(study, trial, spec, device, tracker)
        results: list[TrainResult] = []
        for i, config in enumerate(seed_configs(spec, params, device)):
            results.append(train(config, _eval_callback(spec, trial, run, i, config.steps),
                                 _stopper(should_stop)))
            if results[-1].status != "completed":
                break
    except KeyboardInterrupt:
        _interrupted(study, trial, run)
        raise
    except Exception as exc:  # a bug in training: the trial's own fault
        return _fault(study, trial, run, exc)
    return _conclude(study, trial, spec, results, run)


def run_population(study: optuna.Study, trials: Sequence[optuna.Trial], spec: StudySpec,
                   device: str, tracker=None, should_stop: Callable[[], bool] | None = None
                   ) -> list[TrialOutcome]:
    """Train ``trials`` × ``spec.seeds`` members as one population, then tell Optuna each
    trial's result. Each trial is pruned on its own: its members leave the batch."""
    from ganbench.population import train_population

    begun: list[tuple[optuna.Trial, Any]] = []
    configs: list[TrainConfig] = []
    callbacks: list[Callable[[int, dict[str, float]], bool]] = []
    owner: list[int] = []
    pruned: set[int] = set()
    try:
        for t, trial in enumerate(trials):
            params, run = _begin_trial(study, trial, spec, device, tracker)
            begun.append((trial, run))
            for i, config in enumerate(seed_configs(spec, params, device)):
                configs.append(config)
                callbacks.append(_eval_callback(spec, trial, run, i, config.steps))
                owner.append(t)

        def on_eval(member: int, step: int, row: dict[str, float]) -> bool:
            # Seed 0 decides for its trial; the trial's other seeds leave with it.
            if callbacks[member](step, row):
                pruned.add(owner[member])
            return owner[member] in pruned

        results = train_population(configs, on_eval, _stopper(should_stop),
                                   streams=spec.execution.streams,
                                   compile=spec.execution.compile)
    except KeyboardInterrupt:
        for trial, run in begun:
            _interrupted(study, trial, run)
        for trial in trials[len(begun):]:
            _interrupted(study, trial, None)
        raise
    except Exception as exc:  # a bug in training: every trial of the batch fails
        return [_fault(study, trial, run, exc) for trial, run in begun] + \
            [_fault(study, trial, None, exc) for trial in trials[len(begun):]]
    return [_conclude(study, trial, spec,
                      [r for r, o in zip(results, owner) if o == t], run)
            for t, (trial, run) in enumerate(begun)]


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
        if done + running >= total or budget_spent(spec, trials) or \
                (should_stop is not None and should_stop()):
            return None
        trial = ask_indexed(study, spec, trials)
        if should_stop is not None and should_stop():  # the signal came while asking
            fail_trial(study, study._storage.get_trial(trial._trial_id), INTERRUPTED,
                       "interrupted (Ctrl-C) before it trained")
            return None
    before = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number]
    done, running = count_trials(before)
    if done + running >= total:
        fail_trial(study, study._storage.get_trial(trial._trial_id), SURPLUS,
                   "surplus: the study reached its total elsewhere")
        return None
    return trial


def ask_indexed(study: optuna.Study, spec: StudySpec,
                trials: Sequence[FrozenTrial] | None = None) -> optuna.Trial:
    """Ask the study's next trial and record its index (``trial_index``), host, pid and,
    on a database storage, its first heartbeat. Relative samplers (CMA-ES, GP) draw at
    asking, so the sampler is seeded for the index the trial will have."""
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    study.sampler = make_sampler(spec, trial_index(trials, len(trials)))
    with quiet_warnings():  # "heartbeat outside Study.optimize": ours beats (Heartbeat)
        trial = study.ask()
    storage = study._storage
    index = trial_index(study.get_trials(deepcopy=False), trial.number)
    for key, value in (("index", index), ("host", socket.gethostname()),
                       ("pid", os.getpid())):
        trial.set_user_attr(key, value)  # through the trial: ``sample`` reads its copy
    if has_heartbeat(storage):
        storage.record_heartbeat(trial._trial_id)
    return trial


def _wait_for_others(study: optuna.Study, spec: StudySpec, total: int,
                     stop: threading.Event) -> bool:
    """Nothing to ask, but the study is short while trials run elsewhere: wait a while
    (True) if they will end — they finish, or, on a database storage, a dead worker's trial
    goes stale and the next ask re-queues it; on a journal, while their workers are live
    processes of this machine. False: stop here (the study is done, or cannot progress)."""
    trials = study.get_trials(deepcopy=False)
    done, running = count_trials(trials)
    if stop.is_set() or done >= total or budget_spent(spec, trials) or not running:
        return False
    if has_heartbeat(study._storage):
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


def budget_spent(spec: StudySpec, trials: Sequence[FrozenTrial]) -> bool:
    """Has the study's compute budget (if any) been used up by its counted trials?"""
    if spec.budget is None:
        return False
    return compute_spent(trials, spec.budget.unit) >= spec.budget.amount


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
