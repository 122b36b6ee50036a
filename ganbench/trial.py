"""One trial of a study, from asking to telling: the search space, the seeded sampling, the
training of its seeds (alone or as a population), and the failure policy that turns what
training returned into the trial's state.

The policy in one place (``_conclude``): a stopped seed → PRUNED; a diverged seed → FAIL,
counted, with its reason; an exception in training → FAIL, counted, with its traceback; a
failure of the storage or the tracking server → FAIL, not counted, re-queued; Ctrl-C →
FAIL, not counted, re-queued; else COMPLETE with the seeds' mean metrics.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from ganbench import optuna_adapter as oa
from ganbench.accounting import (
    INFRASTRUCTURE,
    INTERRUPTED,
    TRIAL_FAULT,
    fail_trial,
    is_counted,
    is_infrastructure,
)
from ganbench.config import TrainConfig
from ganbench.files import points
from ganbench.metrics import pruning_metric
from ganbench.spec import StudySpec
from ganbench.study import make_sampler, quiet_warnings, run_dir
from ganbench.train import TrainResult, save_checkpoint, train

# ---------------------------------------------------------------- asking
# Set by a process that runs trials for a cluster (``ganbench.cluster``): what names this
# worker beyond host and pid (``worker``, ``node``), recorded on every trial it asks or
# trains, so that its trials are recovered by name when it is lost with its node.
WORKER: dict[str, str] = {}


def worker_identity() -> dict[str, Any]:
    """This worker's host, pid and cluster names: recorded on the trials it runs."""
    return {"host": socket.gethostname(), "pid": os.getpid(), **WORKER}


def ask_indexed(study: optuna.Study, spec: StudySpec,
                trials: Sequence[FrozenTrial] | None = None) -> optuna.Trial:
    """Ask the study's next trial and record its index (``trial_index``), host, pid and,
    on a database storage, its first heartbeat. Relative samplers (CMA-ES, GP) draw at
    asking, so the sampler is seeded for the index the trial will have."""
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    study.sampler = make_sampler(spec, trial_index(trials, len(trials)))
    with quiet_warnings():  # "heartbeat outside Study.optimize": ours beats (Heartbeat)
        trial = study.ask()
    index = trial_index(study.get_trials(deepcopy=False), trial.number)
    for key, value in {"index": index, **worker_identity()}.items():
        trial.set_user_attr(key, value)  # through the trial: ``sample`` reads its copy
    if oa.has_heartbeat(study):
        oa.record_heartbeat(study, trial)
    return trial



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
    trial.set_user_attr("device", device)
    trial.set_user_attr("execution", spec.execution.mode)
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
    errors = [r for r in results if r.status == "error"]
    if errors:  # a population member's own exception
        return _fault(study, trial, run, errors[0].error)
    if oa.is_finished(study, trial):
        return _lost(trial, run)
    try:
        return _tell(study, trial, spec, results, run)
    except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
        if oa.is_finished(study, trial):
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
    state, reason, values, mean = TrialState.COMPLETE, "", None, {}
    checkpoint = None
    for unit, used in compute_used(results).items():
        trial.set_user_attr(unit, used)
    if results and results[0].samples.numel():
        trial.set_user_attr("samples", points(results[0].samples))
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
        trial.set_user_attr("metrics", mean)
        if spec.seeds > 1:
            trial.set_user_attr("seed_metrics", seeds_metrics)
        checkpoint = _keep_generator(study, trial, spec, results[0])
        study.tell(trial, values)
    elif state == TrialState.PRUNED:
        study.tell(trial, state=TrialState.PRUNED)
    else:
        fail_trial(study, trial, TRIAL_FAULT, reason)
    if run is not None:
        final = {f"objective.{o.metric}": v for o, v in zip(spec.objectives, values or [])}
        if spec.seeds > 1 and state == TrialState.COMPLETE:
            final |= {f"mean.{k}": v for k, v in mean.items()}
        run.end(state, final, reason, last, checkpoint=checkpoint)
    if checkpoint is not None and not kept_locally(spec):  # it was MLflow's copy only
        shutil.rmtree(checkpoint.parent, ignore_errors=True)
    return TrialOutcome(trial.number, state, values, reason)


def generator_path(spec: StudySpec, number: int) -> Path:
    """Where a trial's final generator is kept beside a local (journal) study."""
    return run_dir(spec) / "generators" / f"trial-{number}.pt"


def _keep_generator(study: optuna.Study, trial: optuna.Trial, spec: StudySpec,
                    result: TrainResult) -> Path | None:
    """Save the first seed's final generator (with its config and metrics) in the study's
    run folder when it is kept here: a journal study, or a database one without tracking
    (then on the machine that trained it). A database study with tracking keeps it in MLflow
    only: it goes to a temporary file, removed once logged. A kept path is recorded on the
    trial."""
    if result.generator is None:
        return None
    local = kept_locally(spec)
    path = generator_path(spec, trial.number) if local else \
        Path(tempfile.mkdtemp(prefix="ganbench-")) / f"trial-{trial.number}.pt"
    save_checkpoint(path, result, study=spec.name, trial=trial.number)
    if local:
        trial.set_user_attr("checkpoint", str(path.resolve()))
    return path


def kept_locally(spec: StudySpec) -> bool:
    """Are the study's generators kept in its run folder (else in MLflow only)?"""
    return spec.storage is None or spec.tracking is False


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
    infra = is_infrastructure(exc)
    reason = f"{'storage or tracking error' if infra else 'error'}: {type(exc).__name__}: " \
             f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    tb = "".join(traceback.format_exception(exc))
    with contextlib.suppress(Exception):  # the storage itself may be what failed
        trial.set_user_attr("traceback", tb)
    fail_trial(study, trial, INFRASTRUCTURE if infra else TRIAL_FAULT, reason)
    if run is not None:
        run.end(TrialState.FAIL, {}, reason, None)
    return TrialOutcome(trial.number, TrialState.FAIL, None, reason)


def _interrupted(study: optuna.Study, trial: optuna.Trial, run) -> None:
    """Ctrl-C: the trial FAILs, not counted, and is re-queued; its MLflow run is KILLED."""
    fail_trial(study, trial, INTERRUPTED,
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
