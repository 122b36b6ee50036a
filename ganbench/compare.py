"""Budget-fair comparisons, whole: tune every arm with the same trial budget, retrain each
arm's best configuration on held-out seeds (Lucic et al. 2018, "Are GANs Created Equal?"),
assemble the per-seed frame and compute its statistics, once. ``report`` only renders.

Each (target, arm) is an Optuna study ``<name>__<target>__<arm>`` run by the sweep machinery
(so it resumes like a sweep); held-out results are stored per seed as user attributes of
that study, so a rerun skips what is done and ``ganbench report`` rebuilds the tables
without training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from ganbench import provenance, worker
from ganbench.accounting import (
    INTERRUPTED,
    WORKER_DIED,
    budget_spent,
    compute_spent,
    count_trials,
    is_counted,
    recover_dead_workers,
    trials_that_fit,
)
from ganbench.cluster import open_supervisor, plan_workers
from ganbench.config import TrainConfig
from ganbench.errors import GanbenchError, NoStudy
from ganbench.metrics import METRICS
from ganbench.spec import CompareSpec, StudySpec, TargetSpec, logged
from ganbench.study import EXPORT, export_studies, get_storage, open_study, report_dir, run_dir
from ganbench.supervisor import WorkerDied
from ganbench.train import save_checkpoint
from ganbench.trial import kept_locally

if TYPE_CHECKING:
    import pandas as pd

# Search trials train with seed 0 (spec.seeds = 1); held-out seeds start far from it, and
# tuning replicate r's seeds at HELDOUT_SEED_BASE + r * REPLICATE_STRIDE.
HELDOUT_SEED_BASE = 1000
REPLICATE_STRIDE = 1000
# Held-out seeds are dealt into this many populations, whatever the number of workers: a
# member's result is bit-identical in any group for the MLPs tested, but not for every
# architecture (PacGAN's batch-norm and maxout networks drift apart after a few hundred
# steps), so the groups are fixed, and a group is always trained whole.
HELDOUT_GROUPS = 2



def heldout_seeds(spec: CompareSpec, replicate: int = 0) -> list[int]:
    """The held-out training seeds of a tuning replicate, disjoint from the seeds used
    while tuning and from every other replicate's (a matched arm uses its source's)."""
    first = HELDOUT_SEED_BASE + replicate * REPLICATE_STRIDE
    return [first + i for i in range(spec.eval_seeds)]


def units(spec: CompareSpec) -> list[tuple[TargetSpec, int, str]]:
    """Every (target, replicate, arm) of a comparison, in the order it runs and reports."""
    return [(t, r, arm) for t in spec.targets for r in spec.replicates for arm in spec.arms]


def heldout_groups(seeds: Sequence[int]) -> list[list[int]]:
    """The populations the held-out ``seeds`` train in: dealt into HELDOUT_GROUPS, the
    same on every machine and worker count."""
    return [list(seeds[i::HELDOUT_GROUPS]) for i in range(min(HELDOUT_GROUPS, len(seeds)))]


def search_seeds(study: StudySpec) -> list[int]:
    """The training seeds of a tuning trial (0 .. seeds-1)."""
    return list(range(study.seeds))


@dataclass
class ArmResult:
    target: str
    arm: str
    params: dict[str, Any]
    seeds: dict[int, dict[str, Any]]   # held-out seed → metrics (+ status, "samples")
    status: str = "tuned"              # tuned | fixed | from <arm> | untuned (why)
    compute: dict[str, float] = field(default_factory=dict)  # what the arm used
    reference: Any = None              # the study's stored evaluation points and centres
    tuning: list[dict[str, Any]] = field(default_factory=list)  # its tuning trials
    provenance: list[dict[str, Any]] = field(default_factory=list)  # runs that made it
    replicate: int = 0                 # which tuning replicate


# ---------------------------------------------------------------- running the arms
def heldout_configs(spec: CompareSpec, study: StudySpec, params: dict[str, Any],
                    device: str, seeds: Sequence[int]) -> list[TrainConfig]:
    """The held-out runs of a configuration: its trainer configs on ``seeds``, scored on
    the held-out evaluation sample (``heldout_eval_seed``), not the one tuning chose on."""
    from ganbench.trial import seed_configs

    configs = seed_configs(study, params, device, seeds)
    for config in configs:
        config.eval_seed = spec.heldout_eval_seed
    return configs


def config_key(config: TrainConfig) -> str:
    """What trained a held-out run, as a short hash of its config (seed and device left
    out): results are reused only for the configuration that produced them."""
    data = config.to_dict()
    for key in ("seed", "device"):
        data.pop(key)
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _train_heldout(args: tuple[str, str, dict[str, Any], list[int], str, int]
                   ) -> list[tuple[int, dict[str, Any]]]:
    """Worker: train one configuration on held-out seeds, all of them as one population
    (seed repeats have one shape: the ideal batch). Every member draws from its own
    seed's streams on every device, so a seed's result depends neither on the seeds
    trained beside it nor on resumes."""
    from ganbench.files import points
    from ganbench.population import train_population

    compare_json, study_json, params, seeds, device, threads = args
    worker.set_threads(device, threads)
    spec = CompareSpec.model_validate_json(compare_json)
    study = StudySpec.model_validate_json(study_json)
    configs = heldout_configs(spec, study, params, device, seeds)
    out = []
    results = train_population(configs, streams="member", compile=spec.execution.compile)
    for seed, config, result in zip(seeds, configs, results):
        row: dict[str, Any] = {k: float(v) for k, v in result.metrics.items()}
        row |= {"status": result.status, "reason": result.reason, "seconds": result.seconds,
                "g_steps": result.steps, "d_steps": result.steps * config.d_steps,
                "config": config_key(config)}
        if result.samples.numel():
            row["samples"] = points(result.samples)
        if result.generator is not None:  # kept beside a local study, else for MLflow alone
            folder = run_dir(study) / "heldout" if kept_locally(study) else \
                Path(tempfile.mkdtemp(prefix="ganbench-"))
            path = save_checkpoint(folder / f"seed-{seed}.pt", result, study=study.name,
                                   seed=seed)
            row["checkpoint"] = str(path.resolve())
        out.append((seed, row))
    return out


def best_params(study, spec: CompareSpec) -> dict[str, Any] | None:
    """The parameters of the arm's best COMPLETE tuning trial (None if it has none)."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not complete:
        return None
    pick = min if spec.objective.direction == "minimize" else max
    return pick(complete, key=lambda t: t.values[0]).params


def _stored_seeds(study, key: str | None) -> dict[int, dict[str, Any]]:
    """Held-out results stored in the arm's study, those of configuration ``key`` only."""
    return {int(k.split(".")[1]): v for k, v in study.user_attrs.items()
            if k.startswith("eval.") and (key is None or v.get("config") == key)}


def _arm_state(spec: CompareSpec, study_spec: StudySpec, study, arm: str,
               source_params: dict[str, Any] | None = None
               ) -> tuple[str, dict[str, Any] | None, str | None]:
    """(status, selected parameters or None if untuned, key of the held-out configuration).
    A matched arm takes ``source_params``, its source's selection in the same replicate,
    less the values it fixes itself."""
    source = spec.arms[arm].source
    if source:
        fixed = spec.arms[arm].fixed()
        params = None if source_params is None else {
            k: v for k, v in source_params.items() if k not in fixed}
        status = f"from {source}" if params is not None else f"untuned ({source} untuned)"
    elif spec.mode == "fixed":
        params = {}
        status = "fixed"
    else:
        params = best_params(study, spec)
        trials = [t for t in study.get_trials(deepcopy=False) if is_counted(t)]
        status = "tuned" if params is not None else f"untuned ({len(trials)} failed/pruned)"
    if params is None:
        return status, None, None
    config = heldout_configs(spec, study_spec, params, "cpu", [0])[0]
    return status, params, config_key(config)


def _compute(study, seeds: dict[int, dict[str, Any]]) -> dict[str, float]:
    """The compute an arm used: its counted tuning trials (steps, and seconds of training
    summed over trials) and its held-out runs (steps, and the wall seconds they took)."""
    trials = study.get_trials(deepcopy=False)
    out = {f"tune_{u}": compute_spent(trials, u)
           for u in ("trials", "g_steps", "d_steps", "seconds")}
    for unit in ("g_steps", "d_steps"):
        out[f"heldout_{unit}"] = float(sum(r.get(unit, 0) for r in seeds.values()))
    out["heldout_wall_seconds"] = float(study.user_attrs.get("heldout_wall_seconds", 0.0))
    return out


@dataclass
class TuneJob:
    """Picklable: trials of one arm's study, already asked and sampled, for a worker to
    train and tell (one population in population mode, else one after another)."""

    spec_json: str                 # the arm's StudySpec as JSON
    trials: list[int]              # their numbers
    population: bool               # train the trials as one population
    device: str = "cpu"
    threads: int = 1
    tracking: Any = None           # a tracking.TrackingHandle, or None


def _tune(job: TuneJob) -> int:
    """Worker: train and tell the job's trials. SIGINT or SIGTERM marks them interrupted
    (re-queued with their parameters) and ends the job with KeyboardInterrupt; returns
    trials run."""
    from ganbench import optuna_adapter as oa
    from ganbench.accounting import Heartbeat, fail_trial
    from ganbench.signals import stop_on_signals
    from ganbench.trial import run_population, run_trial, worker_identity

    worker.set_threads(job.device, job.threads)
    spec = StudySpec.model_validate_json(job.spec_json)
    study = open_study(spec)
    tracker = None
    if job.tracking is not None:
        from ganbench.tracking import Tracker

        tracker = Tracker.attach(job.tracking)
    trials = [oa.live_trial(study, number) for number in job.trials]
    for trial in trials:  # a dead worker's trials are recovered by its pid (or name)
        for key, value in worker_identity().items():
            trial.set_user_attr(key, value)
    stop = threading.Event()
    try:
        with stop_on_signals(stop), Heartbeat(study).beating(*trials):
            if job.population:
                return len(run_population(study, trials, spec, job.device, tracker,
                                          stop.is_set))
            for trial in trials:
                if stop.is_set():  # a trial not started is re-queued as interrupted ones
                    raise KeyboardInterrupt
                run_trial(study, trial, spec, job.device, tracker, stop.is_set)
            return len(trials)
    except KeyboardInterrupt:
        for trial in trials:  # those not started yet (a started one marked itself)
            fail_trial(study, trial, INTERRUPTED, "interrupted (Ctrl-C) before it trained")
        raise


def ask_batch(study, study_spec: StudySpec, size: int) -> list[Any]:
    """Ask and sample the arm's next trials in order, in this process, as many of ``size``
    as its total and budget allow (``trials_that_fit``): trial n's parameters depend on the
    spec's seed, the arm, the target, n and the trials told before the batch, never on
    which worker trains it or when."""
    from ganbench.accounting import local_lock
    from ganbench.trial import ask_indexed, sample

    asked = []
    with local_lock(run_dir(study_spec)):
        for _ in range(size):
            if not trials_that_fit(study_spec, study.get_trials(deepcopy=False), 1):
                break
            trial = ask_indexed(study, study_spec)
            sample(study, trial, study_spec)
            asked.append(trial)
    return asked


@dataclass
class _Arm:
    """One arm on one target as the comparison drives it: tuning batches, then its
    held-out runs."""

    target: TargetSpec
    name: str
    study_spec: StudySpec
    study: Any
    tracker: Any
    replicate: int = 0
    source: "_Arm | None" = None       # a matched arm's source (same target and replicate)
    pending: int = 0                   # its jobs not yet finished
    asked: int = 0                     # tuning trials asked by this run
    phase: str = "tune"                # tune → heldout → done
    params: dict[str, Any] | None = None
    status: str = ""
    seeds: dict[int, dict[str, Any]] = field(default_factory=dict)
    started: float = 0.0               # when its held-out runs were dispatched (0: none)
    result: ArmResult | None = None

    @property
    def label(self) -> str:
        rep = f" · r{self.replicate}" if self.replicate else ""
        return f"{self.target.name} · {self.name}{rep}"


def run_arms(spec: CompareSpec, devices: Sequence[str],
             tracker_for: Callable[[str, str, int], Any] | None = None,
             on_step: Callable[[str], None] | None = None,
             studies: Sequence[Any] | None = None) -> list[ArmResult]:
    """Tune (unless mode: fixed) and evaluate every arm on every target; resumable.

    Every arm's study asks ``spec.batch`` trials at a time in this process, in order,
    and asks the next batch once the workers have told all of them; the jobs of all arms
    share one set of workers (one per device) under the supervisor, so workers stay busy
    while each arm tunes in batches. Which configurations an arm tries therefore depends on
    neither the number of workers nor their timing, nor on an interruption and resume.
    ``studies``: the arms' studies already opened, in target × arm order.

    Signals and dead workers are handled as in a sweep: a stop marks and re-queues the
    running trials (exit 130/143); a worker that dies has its trials re-queued, and the
    comparison stops with a one-line error once the other jobs are in ("rerun to continue").
    """
    say = on_step or (lambda line: None)
    every = units(spec)
    if studies is None:
        studies = [open_study(spec.arm_study(t, arm, r)) for t, r, arm in every]
    arms = [_Arm(t, arm, spec.arm_study(t, arm, r), study,
                 tracker_for(t.name, arm, r) if tracker_for else None, r)
            for (t, r, arm), study in zip(every, studies)]
    by_unit = {(a.target.name, a.replicate, a.name): a for a in arms}
    for a in arms:
        if spec.arms[a.name].source:
            a.source = by_unit[(a.target.name, a.replicate, spec.arms[a.name].source)]
    ready: list[tuple[_Arm, Callable, Any]] = []   # (arm, function, job without a device)
    died: list[str] = []

    def recover(kind: str) -> None:
        for a in arms:
            recover_dead_workers(a.study, a.tracker.end_lost if a.tracker else None, kind=kind,
                                 lost=lost)

    ex = spec.execution
    sup = open_supervisor(ex.backend, ex.address, devices, cpus=ex.cpus)
    sup.on_stop = lambda: recover(INTERRUPTED)
    lost = getattr(sup, "lost", None)  # cluster workers lost, by name
    cpus = ex.cpus if ex.backend == "ray" else None
    try:
        with sup as workers:
            while not all(a.phase == "done" for a in arms):
                if not died:  # after a death: only the jobs in flight are awaited
                    for a in arms:
                        if a.pending == 0 and a.phase != "done":
                            ready += [(a, fn, job) for fn, job in _advance(
                                spec, a, heldout_seeds(spec, a.replicate), say)]
                    for i in workers.idle():
                        if not ready:
                            break
                        a, fn, job = ready.pop(0)
                        workers.submit(i, fn, _on_device(job, devices[i], devices, cpus), a)
                if not workers.busy():
                    if died:
                        break
                    continue
                for done in workers.wait(0.5):
                    a = done.tag
                    a.pending -= 1
                    if isinstance(done.error, WorkerDied):
                        died.append(str(done.error))
                    elif done.error is not None:
                        raise done.error
                    elif a.phase == "heldout":
                        _store_heldout(spec, a, done.value)
    except KeyboardInterrupt as exc:  # every arm's run still open ends, KILLED with the reason
        for a in arms:
            if a.tracker and a.phase != "done":
                a.tracker.end("KILLED", tags={"status": f"interrupted ({exc or 'SIGINT'})"})
        raise
    if died:
        recover(WORKER_DIED)
        for a in arms:
            if a.tracker and a.phase != "done":
                a.tracker.end("FAILED", tags={"status": "a worker died"})
        raise GanbenchError(f"{'; '.join(died)} before the comparison finished (its trials "
                            "were re-queued); rerun to continue")
    return [a.result for a in arms]


def _on_device(job: Any, device: str, devices: Sequence[str], cpus: int | None = None) -> Any:
    """A job placed on ``device``, its CPU threads the cores shared out among the workers
    (``cpus``: a cluster worker's reserved CPUs)."""
    threads = cpus or worker.population_threads(list(devices).count("cpu"))
    if isinstance(job, TuneJob):  # one trial at a time: one thread (processes beat threads)
        return dataclasses.replace(job, device=device, threads=threads if job.population
                                   else 1)
    compare_json, study_json, params, part, _, _ = job
    return (compare_json, study_json, params, part, device, threads)


def _advance(spec: CompareSpec, a: _Arm, seeds: list[int], say: Callable[[str], None]
             ) -> list[tuple[Callable, Any]]:
    """The arm's next jobs once none is in flight: a tuning batch, its held-out runs, or
    none (then it is done, or a matched arm waits for its source's selection)."""
    if a.source is not None and a.source.phase == "tune":
        return []
    if a.phase == "tune" and spec.tuned(a.name):
        tracker = a.tracker
        recover_dead_workers(a.study, tracker.end_lost if tracker else None)
        trials = a.study.get_trials(deepcopy=False)
        counted, _ = count_trials(trials)
        asked = [] if tuning_done(a.study_spec, trials) else \
            ask_batch(a.study, a.study_spec, min(spec.batch, a.study_spec.trials - counted))
        if asked:
            a.asked += len(asked)
            say(f"{a.label}: tuning ({_tuning_progress(spec, trials)} done), "
                f"trials {', '.join(str(t.number) for t in asked)}")
            population = a.study_spec.execution.mode == "population"
            base = TuneJob(a.study_spec.model_dump_json(), [], population,
                           tracking=tracker.handle if tracker else None)
            groups = [asked] if population else [[t] for t in asked]
            a.pending = len(groups)
            return [(_tune, dataclasses.replace(base, trials=[t.number for t in g]))
                    for g in groups]
        say(f"{a.label}: tuning done ({_tuning_progress(spec, trials)})" if a.asked else
            f"{a.label}: tuning ({_tuning_progress(spec, trials)} done)")
    if a.phase == "tune":
        a.phase = "heldout"
        status, params, key = _arm_state(spec, a.study_spec, a.study, a.name,
                                         a.source.params if a.source else None)
        a.status, a.params = status, params
        if params is None:  # nothing to retrain: named as untuned, left out of the tests
            say(f"{a.label}: {status}: no held-out runs")
            if a.tracker:
                a.tracker.end("FAILED", tags={"status": status})
            a.result = _arm_result(a.target, a.name, a.study, {}, {}, status, a.replicate)
            a.phase = "done"
            return []
        a.seeds = _stored_seeds(a.study, key)
        todo = [s for s in seeds if s not in a.seeds]
        say(f"{a.label}: held-out seeds ({len(seeds) - len(todo)}/{len(seeds)} done)")
        if todo:
            a.started = time.perf_counter()
            # The fixed groups, each trained whole where any of its seeds is missing.
            parts = [g for g in heldout_groups(seeds) if set(g) & set(todo)]
            a.pending = len(parts)
            return [(_train_heldout, (spec.model_dump_json(), a.study_spec.model_dump_json(),
                                      params, part, "cpu", 1)) for part in parts]
    # Every held-out seed is in: its wall time, the arm's result and its MLflow run's end.
    if a.started:  # members of a population share the wall time
        wall = time.perf_counter() - a.started
        a.study.set_user_attr("heldout_wall_seconds", a.study.user_attrs.get(
            "heldout_wall_seconds", 0.0) + wall)
        say(f"{a.label}: held-out seeds done ({len(seeds)}/{len(seeds)}, {wall:.0f} s)")
    chosen = {s: a.seeds[s] for s in seeds}
    if a.tracker:  # the arm's run ends with its held-out means
        means = {f"heldout.{m}": float(np.mean([r[m] for r in chosen.values()]))
                 for m in METRICS if all(m in r for r in chosen.values())}
        a.tracker.end("FINISHED", means, {"status": a.status})
    a.result = _arm_result(a.target, a.name, a.study, a.params, chosen, a.status,
                           a.replicate)
    a.phase = "done"
    return []


def _store_heldout(spec: CompareSpec, a: _Arm, finished: list[tuple[int, dict[str, Any]]]
                   ) -> None:
    """Store a held-out job's results in the arm's study as each finishes (resumable)."""
    for seed, out in finished:
        # A temporary generator file (database storage, tracked) goes to MLflow, then away.
        temporary = None if kept_locally(a.study_spec) else out.pop("checkpoint", None)
        a.study.set_user_attr(f"eval.{seed}", out)
        a.seeds[seed] = out
        if a.tracker:
            a.tracker.log_eval_seed(a.target.name, a.name, seed, a.params, out, a.study_spec,
                                    temporary or out.get("checkpoint"))
        if temporary:
            shutil.rmtree(Path(temporary).parent, ignore_errors=True)


def _tuning_progress(spec: CompareSpec, trials: Sequence[Any]) -> str:
    """How much of the arm's tuning budget its counted ``trials`` used, e.g. "2/3 trials"."""
    spent = compute_spent(trials, spec.budget.unit)
    return f"{spent:g}/{spec.budget.amount:g} {spec.budget.unit.replace('_', ' ')}"


def tuning_done(study_spec: StudySpec, trials: Sequence[Any]) -> bool:
    """Has an arm's tuning used its budget (its trials, or the compute they may spend)?"""
    return count_trials(trials)[0] >= study_spec.trials or budget_spent(study_spec, trials)


def _arm_result(target: TargetSpec, arm: str, study, params: dict[str, Any],
                seeds: dict[int, dict[str, Any]], status: str, replicate: int = 0
                ) -> ArmResult:
    return ArmResult(target.name, arm, params, seeds, status, _compute(study, seeds),
                     study.user_attrs.get("reference"), tuning_rows(study),
                     study.user_attrs.get("provenance", []), replicate)


def tuning_rows(study) -> list[dict[str, Any]]:
    """Every finished tuning trial of an arm's study: number, index in the arm's sequence,
    state, objective value (complete trials), parameters, compute and why it failed."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if not t.state.is_finished():
            continue
        attrs = t.user_attrs
        rows.append({"trial": t.number, "index": attrs.get("index"), "state": t.state.name,
                     "objective": t.values[0] if t.state.name == "COMPLETE" else None,
                     "counted": is_counted(t)}
                    | {f"param.{k}": v for k, v in t.params.items()}
                    | {"g_steps": attrs.get("g_steps"), "seconds": attrs.get("seconds"),
                       "reason": attrs.get("fail_reason", ""),
                       "retry_of": attrs.get("retry_of")})
    return rows


def _open_arm(spec: CompareSpec, target: TargetSpec, arm: str, storage: Any = None,
              replicate: int = 0) -> tuple[StudySpec, Any]:
    """An arm's study spec and its stored study (None if it has not run); nothing created.
    ``storage``: an Optuna storage to read instead of the spec's (an imported export)."""
    study_spec = spec.arm_study(target, arm, replicate)
    try:
        return study_spec, open_study(study_spec, storage=storage, create=False)
    except (NoStudy, KeyError):
        return study_spec, None


def _selections(spec: CompareSpec, storage: Any = None) -> Iterator[tuple[
        TargetSpec, int, str, StudySpec, Any, str | None, dict[str, Any] | None, str | None]]:
    """(target, replicate, arm, study spec, study, status, selected parameters, held-out
    key) of every arm as stored, sources before the matched arms that take their selection;
    study, status, parameters and key None where the arm's study has not run."""
    selected: dict[tuple[str, int, str], dict[str, Any] | None] = {}
    for target, r, arm in sorted(units(spec), key=lambda u: bool(spec.arms[u[2]].source)):
        study_spec, study = _open_arm(spec, target, arm, storage, r)
        if study is None:
            yield target, r, arm, study_spec, None, None, None, None
            continue
        source = spec.arms[arm].source
        status, params, key = _arm_state(spec, study_spec, study, arm, selected.get(
            (target.name, r, source)) if source else None)
        selected[(target.name, r, arm)] = params
        yield target, r, arm, study_spec, study, status, params, key


def _unit_order(spec: CompareSpec) -> dict[tuple[str, int, str], int]:
    """(target name, replicate, arm) → its place in :func:`units`."""
    return {(t.name, r, arm): i for i, (t, r, arm) in enumerate(units(spec))}


def stored_arms(spec: CompareSpec, storage: Any = None,
                studies: list[Any] | None = None) -> list[ArmResult]:
    """Every arm's held-out results as stored, without training; GanbenchError naming the
    first arm whose held-out seeds are not all there. The arms' studies are appended to
    ``studies`` when given."""
    results = []
    for target, r, arm, _, study, status, params, key in _selections(spec, storage):
        seeds = heldout_seeds(spec, r)
        where = f"arm {arm!r} on {target.name}" + (f" (replicate {r})" if r else "")
        if study is None:
            raise GanbenchError(f"comparison {spec.name!r}: {where} has not run; run "
                                "`ganbench compare` first")
        if params is None:
            results.append((study, _arm_result(target, arm, study, {}, {}, status, r)))
            continue
        done = _stored_seeds(study, key)
        missing = [s for s in seeds if s not in done]
        if missing:
            raise GanbenchError(f"comparison {spec.name!r}: {where} has "
                                f"{len(seeds) - len(missing)} of {len(seeds)} held-out seeds "
                                "of its selected configuration; run `ganbench compare` to "
                                "finish it")
        results.append((study, _arm_result(target, arm, study, params,
                                           {s: done[s] for s in seeds}, status, r)))
    order = _unit_order(spec)
    results.sort(key=lambda sr: order[(sr[1].target, sr[1].replicate, sr[1].arm)])
    if studies is not None:
        studies += [study for study, _ in results]
    return [result for _, result in results]


# ---------------------------------------------------------------- statistics
ALPHA = 0.05          # the level of every test, interval and bold cell
BOOTSTRAP = 2000      # resamples of every bootstrap interval
EXACT_MAX_N = 56      # up to this many runs in two arms the rank-sum law is counted exactly
# The resolution a KL cell is read at: a perfectly balanced generator's expected KL from its
# finite number of high-quality samples must stay below it (PacGAN's best grid KL is 0.04).
KL_RESOLUTION = 0.05
CORRECTIONS = ("holm", "bonferroni", "bh", "none")


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1): they control
    the familywise error rate."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p, kind="stable")
    m = len(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, (m - rank) * p[i])
        adjusted[i] = min(1.0, running)
    return adjusted.tolist()


def benjamini_hochberg(pvalues: Sequence[float]) -> list[float]:
    """Benjamini–Hochberg adjusted p-values (q-values; step-up, monotone, capped at 1): they
    control the false discovery rate of independent or positively dependent tests."""
    p = np.asarray(pvalues, dtype=float)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 1.0
    for rank in range(m - 1, -1, -1):
        i = order[rank]
        running = min(running, m * p[i] / (rank + 1))
        adjusted[i] = min(1.0, running)
    return adjusted.tolist()


def adjust(pvalues: Sequence[float], method: str) -> list[float]:
    """``pvalues`` adjusted for one family by ``method`` (one of CORRECTIONS)."""
    if method == "holm":
        return holm(pvalues)
    if method == "bh":
        return benjamini_hochberg(pvalues)
    if method == "bonferroni":
        return [min(1.0, len(pvalues) * p) for p in pvalues]
    if method == "none":
        return [float(p) for p in pvalues]
    raise GanbenchError(f"correction must be one of {', '.join(CORRECTIONS)}, got {method!r}")


def _law(weights2: np.ndarray, size: int | None) -> np.ndarray:
    """The null law of a sum of integer ``weights2``: over every ``size``-subset equally
    likely (rank-sum), or, with ``size`` None, over every subset (signed-rank, each weight
    in or out with probability 1/2). Index: the sum; counted exactly in float64."""
    total = int(weights2.sum())
    if size is None:
        counts = np.zeros(total + 1)
        counts[0] = 1.0
        for r in weights2:
            if r:
                counts[r:] = counts[r:] + counts[:-r]  # the sum is formed before it is written
            else:  # a zero weight: in or out gives the same sum
                counts *= 2
        return counts / counts.sum()
    counts = np.zeros((size + 1, total + 1))  # counts[k, s]: k-subsets with sum s
    counts[0, 0] = 1.0
    for r in weights2:
        counts[1:, r:] += counts[:-1, :total + 1 - r]  # numpy reads before writing
    return counts[size] / counts[size].sum()


def _two_sided(law: np.ndarray, w: int) -> float:
    return float(min(1.0, 2 * min(law[w:].sum(), law[:w + 1].sum())))


def rank_sum_p(x: Sequence[float], y: Sequence[float], seed: int = 0) -> float:
    """Two-sided p-value of the Mann-Whitney U (Wilcoxon rank-sum) test, exact under ties.

    The statistic is the sum W of ``x``'s midranks in the pooled sample; its law under the
    null (every split of the pooled values into groups of len(x) and len(y) equally likely)
    is counted exactly, ties included, by a subset-sum recursion over the doubled midranks
    (integers). Two-sided p = min(1, 2 min(P(W ≥ w), P(W ≤ w))), the convention of
    ``scipy.stats.mannwhitneyu`` and ``permutation_test``. Above EXACT_MAX_N runs in all
    (where the counts outgrow float64's exact integers) the tails are estimated from 100,000
    seeded permutations, each as (k + 1) / (R + 1).
    """
    from scipy import stats

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n1, n = len(x), len(x) + len(y)
    ranks2 = np.rint(2 * stats.rankdata(np.concatenate([x, y]))).astype(np.int64)
    w = int(ranks2[:n1].sum())
    if n <= EXACT_MAX_N:
        return _two_sided(_law(ranks2, n1), w)
    rng = np.random.default_rng(seed)
    resamples = 100_000
    draws = np.array([rng.permutation(ranks2)[:n1].sum() for _ in range(resamples)])
    upper = (np.sum(draws >= w) + 1) / (resamples + 1)
    lower = (np.sum(draws <= w) + 1) / (resamples + 1)
    return float(min(1.0, 2 * min(upper, lower)))


def signed_rank_p(d: Sequence[float]) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test of paired differences ``d``,
    exact under ties and zeros: T+ is the sum of the midranks of |d| (zeros ranked, Pratt's
    convention) over the positive differences; under the null every nonzero difference's
    sign is + or − with probability 1/2, and T+'s law is counted exactly."""
    from scipy import stats

    d = np.asarray(d, dtype=float)
    ranks2 = np.rint(2 * stats.rankdata(np.abs(d))).astype(np.int64)
    ranks2[d == 0] = 0
    return _two_sided(_law(ranks2, None), int(ranks2[d > 0].sum()))


def min_p(n1: int, n2: int | None = None) -> float:
    """The smallest two-sided p the exact rank-sum test can give with n1 and n2 units (no
    ties), or, with ``n2`` None, the signed-rank test with n1 pairs."""
    if n2 is None:
        return min(1.0, 2.0 / 2 ** n1)
    return min(1.0, 2.0 / math.comb(n1 + n2, n1))


def min_p_holm(n1: int, n2: int | None, tests: int) -> float:
    """The smallest adjusted p of a family of ``tests`` such tests under Holm or Bonferroni
    (whose first step multiplies by ``tests``): below ALPHA a consistent difference can be
    shown; at or above, it cannot."""
    return min(1.0, tests * min_p(n1, n2))


def units_needed(tests: int, paired: bool = False, alpha: float = ALPHA,
                 correction: str = "holm") -> int:
    """The fewest units per arm (seeds, or tuning replicates) for which a family of
    ``tests`` exact tests adjusted by ``correction`` can reach ``alpha`` (BH and no
    correction: when every test reaches the design's smallest p)."""
    tests = 1 if correction in ("bh", "none") else tests
    n = 2
    while min_p_holm(n, None if paired else n, tests) >= alpha:
        n += 1
    return n



def _cut(level: float, law: np.ndarray) -> int:
    """The largest c with P(S ≤ c) ≤ (1 − level)/2 under ``law`` (−1 if none): the test
    rejects at the two-sided level exactly when its statistic is at most c or at least
    max − c."""
    below = np.nonzero(np.cumsum(law) <= (1 - level) / 2 + 1e-12)[0]
    return int(below[-1]) if len(below) else -1


def moses_interval(x: Sequence[float], y: Sequence[float], level: float = 1 - ALPHA
                   ) -> tuple[float, float]:
    """Exact distribution-free interval of the shift of ``x`` from ``y`` (Moses 1953; the
    inversion of the rank-sum test): the (c+1)-th smallest and largest of the n1·n2
    differences x_i − y_j, c the lower critical value of U. Its coverage is at least
    ``level``; (−inf, inf) where the design is too small for it, (nan, nan) where
    differences are undefined (inf − inf)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    with np.errstate(invalid="ignore"):
        diffs = np.sort(np.subtract.outer(x, y).ravel())
    if np.isnan(diffs).any() or not len(diffs):
        return math.nan, math.nan
    n1 = len(x)
    u_law = _law(2 * np.arange(1, n1 + len(y) + 1), n1)[::2]  # W's law, shifted to U
    u_law = u_law[n1 * (n1 + 1) // 2:]
    c = _cut(level, u_law)
    if c < 0:
        return -math.inf, math.inf
    return float(diffs[c]), float(diffs[len(diffs) - 1 - c])


def walsh_interval(d: Sequence[float], level: float = 1 - ALPHA) -> tuple[float, float]:
    """Exact distribution-free interval of the centre of paired differences ``d`` (Tukey's;
    the inversion of the signed-rank test): the (c+1)-th smallest and largest Walsh
    averages (d_i + d_j)/2, i ≤ j."""
    d = np.asarray(d, dtype=float)
    i, j = np.triu_indices(len(d))
    with np.errstate(invalid="ignore"):
        walsh = np.sort((d[i] + d[j]) / 2)
    if np.isnan(walsh).any() or not len(walsh):
        return math.nan, math.nan
    law = _law(2 * np.arange(1, len(d) + 1), None)[::2]
    c = _cut(level, law)
    if c < 0:
        return -math.inf, math.inf
    return float(walsh[c]), float(walsh[len(walsh) - 1 - c])


def hodges_lehmann(x: Sequence[float], y: Sequence[float] | None = None) -> float:
    """The Hodges–Lehmann shift of ``x`` from ``y``: the median of all differences x_i − y_j
    (the effect size of the rank-sum test); with ``y`` None, the median of the Walsh
    averages of paired differences ``x`` (that of the signed-rank test)."""
    x = np.asarray(x, dtype=float)
    with np.errstate(invalid="ignore"):
        if y is None:
            i, j = np.triu_indices(len(x))
            return float(np.median((x[i] + x[j]) / 2))
        return float(np.median(np.subtract.outer(x, np.asarray(y, dtype=float))))


def bootstrap_ci(values: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap confidence interval of the mean (``scipy.stats.bootstrap``, BCa,
    percentile when BCa is undefined); a constant sample gives (mean, mean)."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    if len(values) < 2 or not np.isfinite(values).all() or np.ptp(values) == 0:
        mean = float(values.mean())
        return mean, mean
    for method in ("BCa", "percentile"):
        res = stats.bootstrap((values,), np.mean, confidence_level=0.95, n_resamples=BOOTSTRAP,
                              method=method, rng=np.random.default_rng(seed))
        low, high = res.confidence_interval
        if np.isfinite(low) and np.isfinite(high):
            return float(low), float(high)
    return float("nan"), float("nan")


def _median(values: np.ndarray) -> float:
    with np.errstate(invalid="ignore"):  # numpy interpolates inf with inf
        return float(np.median(values))


def expected_best(values: Sequence[float], budget: int, direction: str
                  ) -> list[tuple[float, float]]:
    """Expected best objective of k tuning trials, k = 1..budget, with its standard
    deviation (Dodge et al. 2019, "Show Your Work"): k draws with replacement from the
    empirical distribution of ``values``; with the values ordered worst to best,
    P(best of k = v_(i)) = (i/n)^k − ((i−1)/n)^k."""
    v = np.sort(np.asarray(values, dtype=float))
    if direction == "minimize":
        v = v[::-1]
    n = len(v)
    if not n:
        return [(math.nan, math.nan)] * budget
    out = []
    cdf = np.arange(n + 1) / n
    for k in range(1, budget + 1):
        weights = cdf[1:] ** k - cdf[:-1] ** k
        mean = float(weights @ v)
        out.append((mean, float(math.sqrt(max(0.0, weights @ v ** 2 - mean ** 2)))))
    return out


def hq_needed(modes: int, metric: str) -> int:
    """High-quality samples a run needs before its ``modes`` or ``kl`` reads coverage
    rather than sample count: with fewer, a perfectly balanced generator would still miss
    half a mode in expectation (modes: M(1 − 1/M)^H > 1/2), or its KL from its sample's
    histogram would exceed KL_RESOLUTION in expectation ((M − 1)/2H, the multinomial
    sampling bias of the plug-in KL)."""
    if modes <= 1:
        return 1
    if metric == "modes":
        return math.ceil(math.log(0.5 / modes) / math.log(1 - 1 / modes))
    return math.ceil((modes - 1) / (2 * KL_RESOLUTION))


STATS_COLUMNS = ["target", "metric", "arm", "replicates", "n", "n_inf", "mean", "median",
                 "std", "se", "ci_low", "ci_high", "sd_between", "sd_within", "rank",
                 "hq_min", "hq_needed", "few_hq",
                 "reference", "unit", "test", "units", "pair_hq_min", "pair_few_hq",
                 "shift", "shift_low", "shift_high",
                 "p_value", "family", "correction", "family_size", "p_adj", "min_p_adj",
                 "significant"]


def _units(frame: "pd.DataFrame", metric: str, by_replicate: bool) -> "pd.Series":
    """An arm's values per unit: replicate means, or per (replicate, seed) runs."""
    if by_replicate:
        with np.errstate(invalid="ignore"):
            return frame.groupby("replicate")[metric].mean()
    return frame.set_index(["replicate", "seed"])[metric]


def _quiet_numerics(fn: Callable) -> Callable:
    """Run ``fn`` without numpy's and pandas' RuntimeWarnings (an all-NaN column of a
    diverged arm, a mean of nothing): the tables show NaN, and the page says why."""
    import functools
    import warnings

    @functools.wraps(fn)
    def quiet(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            return fn(*args, **kwargs)

    return quiet


@_quiet_numerics
def compare_stats(runs: "pd.DataFrame", baseline: str, metrics: Sequence[str] | None = None,
                  *, contrasts: Sequence[tuple[str, str]] | None = None,
                  matched: Sequence[tuple[str, str]] = (), objective: str = "w1",
                  correction: tuple[str, str] = ("holm", "bh"),
                  modes: dict[str, int] | None = None) -> "pd.DataFrame":
    """Per target, metric and arm: the arm's values (mean, median, std, standard error and a
    95% bootstrap CI of the mean over its units; between- and within-replicate standard
    deviations; rank), then one row per contrast the arm is tested in.

    The unit is the tuning replicate where runs have two or more (each arm's values are
    replicate means; seeds are nested in them), else the seed. A contrast (arm, reference)
    is tested with the exact rank-sum test and its Moses interval of the Hodges–Lehmann
    shift; a ``matched`` one (the arm retrained the reference's selected parameters on the
    same seeds) pairs units and uses the exact signed-rank test and its Walsh-average
    interval. Intervals are exact inversions of the unadjusted test at level 1 − ALPHA.
    Families: the ``objective`` metric over every contrast and target is confirmatory,
    adjusted by ``correction[0]``; every other metric is one exploratory family, adjusted by
    ``correction[1]``. ``modes`` (target → number of modes) flags modes and kl cells whose
    runs have fewer high-quality samples than :func:`hq_needed` (``few_hq``; a contrast is
    flagged, ``pair_few_hq``, and never significant, when either of its arms is).
    """
    import pandas as pd

    runs = runs.copy()
    if "replicate" not in runs:
        runs["replicate"] = 0
    names = list(metrics) if metrics is not None else [m for m in METRICS if m in runs]
    arms_in = list(dict.fromkeys(runs["arm"]))
    pairs = list(contrasts) if contrasts is not None else [
        (a, baseline) for a in arms_in if a != baseline]
    by_replicate = runs["replicate"].nunique() > 1
    rows = []
    for target in runs["target"].unique():
        sub = runs[runs["target"] == target]
        for metric in names:
            if sub[metric].isna().all():
                continue
            block = {}
            for arm, group in sub.groupby("arm", sort=False):
                vals = _units(group, metric, by_replicate).to_numpy(float)
                per = group.groupby("replicate")[metric]
                with np.errstate(invalid="ignore"):  # inf values: std is nan, said so
                    std = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
                    within = float(np.sqrt(per.var(ddof=1).mean())) \
                        if group.groupby("replicate").size().min() > 1 else math.nan
                    between = float(per.mean().std(ddof=1)) if by_replicate else math.nan
                low, high = bootstrap_ci(vals)
                hq_min = hq_need = math.nan
                if metric in ("modes", "kl") and modes and "hq_samples" in group:
                    hq_min = float(group["hq_samples"].min())
                    hq_need = float(hq_needed(modes.get(target, 0), metric))
                block[arm] = {
                    "target": target, "metric": metric, "arm": arm,
                    "replicates": int(group["replicate"].nunique()), "n": len(group),
                    "n_inf": int((~np.isfinite(group[metric].to_numpy(float))).sum()),
                    "mean": float(vals.mean()), "median": _median(vals), "std": std,
                    "se": std / math.sqrt(len(vals)), "ci_low": low, "ci_high": high,
                    "sd_between": between, "sd_within": within,
                    "hq_min": hq_min, "hq_needed": hq_need,
                    "few_hq": bool(hq_min < hq_need)}
            means = pd.Series([b["mean"] for b in block.values()])
            ranks = means.rank(ascending=METRICS[metric].direction == "minimize",
                               method="min", na_option="bottom")  # no value: last
            for b, rank in zip(block.values(), ranks):
                b["rank"] = int(rank)
            tested: dict[str, list[dict[str, Any]]] = {}
            for arm, ref in pairs:
                if arm not in block or ref not in block:
                    continue
                a = _units(sub[sub["arm"] == arm], metric, by_replicate)
                r = _units(sub[sub["arm"] == ref], metric, by_replicate)
                paired = (arm, ref) in set(map(tuple, matched)) and a.index.equals(r.index)
                row = dict(block[arm]) | {
                    "reference": ref, "unit": "replicate" if by_replicate else "seed",
                    "units": len(a),
                    "pair_few_hq": block[arm]["few_hq"] or block[ref]["few_hq"],
                    "pair_hq_min": min(block[arm]["hq_min"], block[ref]["hq_min"])}
                if np.isnan(a.to_numpy(float)).any() or np.isnan(r.to_numpy(float)).any():
                    # A run without a value (not inf: none at all) cannot be ranked.
                    row |= {"test": "not tested: runs without a value", "shift": math.nan,
                            "p_value": math.nan, "shift_low": math.nan,
                            "shift_high": math.nan, "min_p": math.nan}
                elif paired:
                    x, y = a.to_numpy(float), r.to_numpy(float)
                    with np.errstate(invalid="ignore"):  # equal values (inf too) differ by 0
                        d = np.where(x == y, 0.0, x - y)
                    row |= {"test": "signed-rank (matched)", "shift": hodges_lehmann(d),
                            "p_value": signed_rank_p(d)}
                    row["shift_low"], row["shift_high"] = walsh_interval(d)
                    row["min_p"] = min_p(len(d))
                else:
                    x, y = a.to_numpy(float), r.to_numpy(float)
                    row |= {"test": "rank-sum", "shift": hodges_lehmann(x, y),
                            "p_value": rank_sum_p(x, y)}
                    row["shift_low"], row["shift_high"] = moses_interval(x, y)
                    row["min_p"] = min_p(len(x), len(y))
                tested.setdefault(arm, []).append(row)
            for arm, b in block.items():  # in the arms' order, each with its contrasts
                rows += tested.get(arm, [b])
    if not rows:
        return pd.DataFrame(columns=STATS_COLUMNS)
    # Every column, those of contrasts too where none was tested (e.g. a single arm).
    table = pd.DataFrame(rows).reindex(columns=STATS_COLUMNS + ["min_p"])
    table["family"] = np.where(table["metric"] == objective, "confirmatory", "exploratory")
    table["correction"] = table["family"].map({"confirmatory": correction[0],
                                               "exploratory": correction[1]})
    for name in ("p_adj", "min_p_adj"):
        table[name] = math.nan
    table["family_size"] = 0
    for family, method in (("confirmatory", correction[0]), ("exploratory", correction[1])):
        members = table.index[(table["family"] == family) & table["p_value"].notna()]
        if len(members):
            table.loc[members, "p_adj"] = adjust(table.loc[members, "p_value"].tolist(),
                                                 method)
            table.loc[members, "family_size"] = len(members)
            # Holm and Bonferroni multiply the smallest p by the family's size; BH's q of
            # the smallest p is m·p/k with k the tests at or below it, so when all reach the
            # design's smallest p its q is that p.
            scale = 1 if method in ("none", "bh") else len(members)
            table.loc[members, "min_p_adj"] = np.minimum(
                1.0, scale * table.loc[members, "min_p"])
    pair_few = table["pair_few_hq"].astype("boolean").fillna(False).astype(bool)
    table["significant"] = (table["p_adj"] < ALPHA) & ~pair_few
    return table.reindex(columns=STATS_COLUMNS)


# ---------------------------------------------------------------- the comparison, whole
@dataclass
class Comparison:
    """A comparison's results: per-seed values, their statistics and what the report draws."""

    spec: CompareSpec
    runs: "pd.DataFrame"                     # one row per (target, arm, replicate, seed)
    table: "pd.DataFrame"                    # compare_stats(runs) + each arm's compute
    arms: "pd.DataFrame"                     # one row per (target, arm, replicate)
    references: dict[str, Any]               # target → stored evaluation points and centres
    samples: dict[tuple[str, str], Any]      # (target, arm) → first held-out seed's samples
    files: list[Path] = field(default_factory=list)  # the report files written
    tuning: "pd.DataFrame | None" = None     # every tuning trial of every arm
    provenance: list[dict[str, Any]] = field(default_factory=list)  # the runs that made it
    selected: list[dict[str, Any]] = field(default_factory=list)  # each arm's parameters
    expected: "pd.DataFrame | None" = None   # expected best objective vs tuning budget

    @property
    def unit(self) -> str:
        return "replicate" if self.spec.tuning_replicates > 1 else "seed"

    def families(self) -> list[dict[str, Any]]:
        """Each family of tests: its name, metrics, size, correction and the smallest
        adjusted p its design can attain."""
        out = []
        for family in ("confirmatory", "exploratory"):
            rows = self.table[(self.table["family"] == family) & self.table["p_value"].notna()]
            if not len(rows):
                continue
            out.append({"family": family, "metrics": list(dict.fromkeys(rows["metric"])),
                        "size": len(rows), "correction": rows["correction"].iloc[0],
                        "floor": float(rows["min_p_adj"].min())})
        return out

    def design(self) -> list[str]:
        """What the design covers and can detect, one sentence each: the unit of
        replication, the tuning, each family and a warning when it cannot reach ALPHA."""
        spec = self.spec
        r, s = spec.tuning_replicates, spec.eval_seeds
        if r > 1:
            lines = [f"Unit of replication: the tuning replicate ({r} independent tunings per "
                     f"arm and target, each with its own sampler seed and {s} held-out seeds "
                     "nested in it); tests compare replicate means, so they cover the tuning "
                     "as well as the seeds"]
        elif spec.mode == "fixed":
            lines = [f"Unit of replication: the held-out seed ({s} per arm), each arm in its "
                     "fixed configuration"]
        else:
            lines = [f"Unit of replication: the held-out seed ({s} per arm); each arm was tuned "
                     "once, so the tests cover seed noise given each arm's selected "
                     "configuration, not the tuning (tuning_replicates: R ≥ 2 covers it)"]
        lines.append(self.tuning_note())
        names = {"holm": "Holm (familywise error)", "bonferroni":
                 "Bonferroni (familywise error)", "bh": "Benjamini–Hochberg (false "
                 "discovery rate)", "none": "no correction"}
        for f in self.families():
            line = (f"{f['family'].capitalize()} family: {', '.join(f['metrics'])} over every "
                    f"contrast and target, {f['size']} test{'s' * (f['size'] != 1)}, "
                    f"{names[f['correction']]}; "
                    f"smallest attainable adjusted p {f['floor']:.2g}")
            if f["floor"] >= ALPHA:
                paired = (self.table["test"] == "signed-rank (matched)").all()
                line = (f"warning: {line}, so no difference in it can reach p < {ALPHA:g}; use "
                        f"at least {units_needed(f['size'], paired, ALPHA, f['correction'])} "
                        f"{self.unit}s per arm")
            lines.append(line)
        return lines

    def tuning_note(self) -> str:
        """Whether the tuning models or is random search at the budget given."""
        spec = self.spec
        if spec.mode == "fixed":
            return "No tuning: every arm runs its fixed configuration"
        budget = spec.budget.trials
        startup = spec.startup()
        name = spec.sampler.name
        if startup is None:
            return f"Tuning: {name} sampler ({spec.budget.label()} per arm), not model-based"
        if budget is not None and startup >= budget:
            return (f"Tuning: {name}'s start-up is {startup} trials, not fewer than the budget "
                    f"of {budget}: every tuning trial is a random draw (random search)")
        return (f"Tuning: {name} draws its first {startup} trials at random, then samples "
                f"from its model for the rest of the budget ({spec.budget.label()} per arm)")

    def power(self) -> str:
        """The design (see :meth:`design`) as one paragraph, then how to read the tables."""
        units = "replicate means" if self.unit == "replicate" else "held-out seeds"
        return ". ".join(self.design()) + ".\n\n" + (
            f"Values: mean ± s.e. over {units}, #rank. Each contrast: Hodges–Lehmann shift Δ "
            "of the arm from its reference with its exact 95% interval (the inversion of the "
            "same test: Moses' for the rank-sum test, Walsh averages for the signed-rank "
            "test of a matched arm, which pairs units), the test's unadjusted p and its "
            "family-adjusted p (adj). Intervals are marginal, not adjusted for multiplicity. "
            f"Bold: confirmatory family, adjusted p < {ALPHA:g}; †: exploratory family, "
            f"adjusted p < {ALPHA:g}; ⚠: a modes or kl value whose runs had fewer "
            "high-quality samples than needed to tell coverage from sample count (never "
            "marked significant).")


def _eval_samples(spec: CompareSpec, arm: str) -> int:
    """Samples per evaluation of an arm's runs."""
    return (spec.arms[arm].fixed().get("eval_samples") or spec.train.eval_samples
            or TrainConfig.eval_samples)


EXPECTED_COLUMNS = ["target", "arm", "budget", "mean", "lo", "hi", "trials"]


@_quiet_numerics
def expected_best_frame(spec: CompareSpec, tuning: "pd.DataFrame") -> "pd.DataFrame":
    """Expected best objective of k tuning trials, k = 1..budget, per tuned arm and target,
    with a ± 1 standard deviation band clipped to the values seen (:func:`expected_best`),
    from the arm's complete counted tuning trials over all its replicates."""
    import pandas as pd

    rows = []
    if spec.mode != "tune" or tuning is None or tuning.empty:
        return pd.DataFrame(columns=EXPECTED_COLUMNS)
    per = tuning.groupby(["target", "arm", "replicate"]).size()
    for (target, arm), sub in tuning.groupby(["target", "arm"], sort=False):
        if not spec.tuned(arm):
            continue
        done = sub[(sub["state"] == "COMPLETE") & sub["counted"].astype(bool)]
        values = done["objective"].to_numpy(float)
        values = values[np.isfinite(values)]
        budget = spec.budget.trials or int(per.loc[(target, arm)].max())
        for k, (mean, sd) in enumerate(expected_best(values, budget,
                                                     spec.objective.direction), start=1):
            lo, hi = (max(mean - sd, values.min()), min(mean + sd, values.max())) \
                if len(values) else (math.nan, math.nan)
            rows.append({"target": target, "arm": arm, "budget": k, "mean": mean,
                         "lo": float(lo), "hi": float(hi), "trials": len(values)})
    return pd.DataFrame(rows, columns=EXPECTED_COLUMNS)


def assemble(spec: CompareSpec, results: Sequence[ArmResult]) -> Comparison:
    """The per-seed frame, its statistics, each arm's compute and the sample panels."""
    import pandas as pd

    rows, samples, references, arms, tuning = [], {}, {}, [], []
    for r in results:
        references[r.target] = r.reference
        unit = {"target": r.target, "arm": r.arm, "replicate": r.replicate}
        arms.append(unit | {"status": r.status} | r.compute |
                    {"params": json.dumps(r.params, sort_keys=True)})
        tuning += [unit | t for t in r.tuning]
        modes = len((r.reference or {}).get("centers") or [])
        for seed, out in r.seeds.items():
            # Which configuration trained the run (param.*); its generator file is local.
            row = unit | {"seed": seed} | {
                k: v for k, v in out.items() if k not in ("samples", "config", "checkpoint")}
            if modes and "hq" in out:  # hq is a percentage of the evaluation sample
                row["hq_samples"] = round(out["hq"] * _eval_samples(spec, r.arm) / 100)
            rows.append(row | {f"param.{k}": v for k, v in r.params.items()})
        if r.seeds and (r.target, r.arm) not in samples:
            samples[(r.target, r.arm)] = r.seeds[min(r.seeds)].get("samples")
    runs = pd.DataFrame(rows, columns=None if rows else ["target", "arm", "seed"])
    arm_frame = pd.DataFrame(arms)
    modes = {t: len((ref or {}).get("centers") or []) for t, ref in references.items()}
    tested = [c for c in spec.tests() if c[0] in spec.arms and c[1] in spec.arms]
    table = compare_stats(runs, spec.baseline, contrasts=tested,
                          matched=[c for c in tested if spec.matched(*c)],
                          objective=spec.objective.metric,
                          correction=(spec.correction.confirmatory,
                                      spec.correction.exploratory), modes=modes)
    from ganbench.report import arm_totals

    table = table.merge(arm_totals(arm_frame), on=["target", "arm"], how="left")
    runs_made = next((r.provenance for r in results if r.provenance), [])
    tuning_frame = pd.DataFrame(tuning)
    return Comparison(spec, runs, table, arm_frame, references, samples,
                      tuning=tuning_frame, provenance=runs_made,
                      expected=expected_best_frame(spec, tuning_frame),
                      selected=[{"target": r.target, "arm": r.arm, "replicate": r.replicate,
                                 "status": r.status, "params": r.params,
                                 "sampler_seed": spec.arm_sampler(
                                     next(t for t in spec.targets if t.name == r.target),
                                     r.arm, r.replicate).seed if spec.tuned(r.arm) else None}
                                for r in results])


def write_report(comparison: Comparison, out: Path | None = None,
                 studies: Sequence[Any] = ()) -> list[Path]:
    """Render the comparison into runs/<name>/report/ (or ``out``), with its provenance and a
    compact export of its arms' ``studies`` (what ``ganbench report`` rebuilds it from)."""
    from ganbench.report import write_compare_report

    spec = comparison.spec
    folder = out or report_dir(spec)
    rebuild = provenance.report_command(comparison.provenance, out)
    comparison.files = write_compare_report(
        comparison.runs, comparison.table, comparison.arms, spec.baseline,
        comparison.references, comparison.samples, folder,
        f"Comparison {spec.name}", comparison.power(), comparison.tuning,
        {"comparison": spec.name, "runs": comparison.provenance,
         "selected": comparison.selected, "rebuild": rebuild},
        comparison.expected, spec.objective.metric)
    if studies:
        comparison.files.append(export_studies(list(studies), folder / EXPORT, _slim))
    return comparison.files


def _slim(key: str, value: Any) -> Any:
    """What a comparison's export keeps: a tuning trial's drawn samples and local generator
    paths are dropped, and held-out samples but the first seed's (the one drawn)."""
    if key in ("samples", "checkpoint"):
        return None
    if key.startswith("eval.") and isinstance(value, dict):
        drop = {"checkpoint"} | ({"samples"} if key != f"eval.{HELDOUT_SEED_BASE}" else set())
        return {k: v for k, v in value.items() if k not in drop}
    return value


def _unit_name(target: str, arm: str, replicate: int) -> str:
    return f"{target}/{arm}" + (f"/r{replicate}" if replicate else "")


def run(spec: CompareSpec, devices: Sequence[str] | None = None,
        on_step: Callable[[str], None] | None = None, out: Path | None = None) -> Comparison:
    """Run a comparison end to end, resumably: check the services, tune and evaluate every
    arm (logged to MLflow under one parent run), compute the statistics, write the report
    (into ``out``, by default runs/<name>/report/)."""
    from ganbench.study import check_spec

    first = spec.arm_study(spec.targets[0], spec.baseline)
    check_spec(first, spec.name)
    for target, r, arm in units(spec):  # a changed definition is refused before any start
        _open_arm(spec, target, arm, replicate=r)
    device_list = plan_workers(spec, devices)
    root = None
    if spec.tracking is not False:
        from ganbench.tracking import Tracker, check_reachable, resolve_uri

        check_reachable(resolve_uri(spec.tracking.uri))
    get_storage(first)  # an unreachable storage fails here, before any training
    if spec.tracking is not False:
        root = Tracker.for_compare(spec, logged(spec))
    entry = provenance.collect(
        logged(spec), device_list, {_unit_name(t.name, arm, r): spec.arm_sampler(t, arm, r).seed
                                    for t, r, arm in units(spec) if spec.tuned(arm)},
        worker.population_threads(device_list.count("cpu")))
    if spec.execution.backend == "ray":
        from ganbench.cluster import describe

        entry["cluster"] = describe()
    studies = [open_study(spec.arm_study(t, arm, r)) for t, r, arm in units(spec)]
    for study in studies:
        provenance.record(study, entry)
    if root is not None:
        root.set_tags(provenance.tags(entry))
    start = time.perf_counter()

    def tracker_for(target: str, arm: str, replicate: int):
        name = f"{target}__{arm}" + (f"__r{replicate}" if replicate else "")
        return root.nested(name, {"ganbench.role": "arm", "ganbench.study": spec.name,
                                  "arm": arm, "target": target,
                                  "replicate": str(replicate)})

    try:
        results = run_arms(spec, device_list, tracker_for if root else None, on_step,
                           studies)
    except KeyboardInterrupt as exc:  # the arms' runs are ended; the comparison's too
        if root is not None:
            root.end("KILLED", tags={"status": f"interrupted ({exc or 'SIGINT'})"})
        raise
    entry = provenance.finished(entry, time.perf_counter() - start)
    for study in studies:
        provenance.record(study, entry)
    comparison = assemble(spec, results)
    comparison.provenance = studies[0].user_attrs.get("provenance", [])  # with its end
    write_report(comparison, out, studies)
    if root is not None:
        root.end()
    return comparison


def rebuild(spec: CompareSpec, out: Path | None = None, storage: Any = None) -> Comparison:
    """The report of a finished comparison from its storage alone (no training), or from
    ``storage`` (e.g. its committed export, imported)."""
    studies: list[Any] = []
    comparison = assemble(spec, stored_arms(spec, storage, studies))
    write_report(comparison, out, studies)
    return comparison


@dataclass
class ArmProgress:
    """How far one arm of a comparison is (``ganbench status``)."""

    target: str
    arm: str
    tuning: str         # e.g. "3/3 trials", "fixed", "from gan", "untuned (3 failed/pruned)"
    heldout: int        # held-out seeds of the arm's selected configuration stored
    seeds: int          # held-out seeds planned
    replicate: int = 0


def progress(spec: CompareSpec) -> list[ArmProgress]:
    """Every arm's tuning and held-out progress, read from the storage (nothing created)."""
    out = []
    for target, r, arm, study_spec, study, status, params, key in _selections(spec):
        source = spec.arms[arm].source
        if study is None:
            tuning = (f"from {source}" if source else "fixed" if spec.mode == "fixed"
                      else _tuning_progress(spec, []))
            out.append(ArmProgress(target.name, arm, tuning, 0, spec.eval_seeds, r))
            continue
        trials = study.get_trials(deepcopy=False)
        tuning = status if not spec.tuned(arm) else _tuning_progress(spec, trials)
        if params is None and spec.tuned(arm) and tuning_done(study_spec, trials):
            tuning = status
        stored = set(_stored_seeds(study, key)) & set(heldout_seeds(spec, r)) if key else ()
        out.append(ArmProgress(target.name, arm, tuning, len(stored), spec.eval_seeds, r))
    order = _unit_order(spec)
    return sorted(out, key=lambda p: order[(p.target, p.replicate, p.arm)])

