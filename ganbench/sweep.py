"""Optuna studies from a spec: samplers, pruners, storages, the objective and the workers.

Counting: a study is done when it holds ``spec.trials`` *counted* trials: COMPLETE, PRUNED,
and FAIL through the trial's own doing (divergence, an error in training). A trial that failed
because its worker died or was interrupted does not count; its parameters are re-queued.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from ganbench.errors import GanbenchError, SpecError
from ganbench.spec import StudySpec
from ganbench.train import TrainConfig, TrainResult, train

HEARTBEAT_INTERVAL = 30   # seconds between heartbeats of a running trial (RDB storages)
GRACE_PERIOD = 120        # a trial silent this long is failed and retried by the next worker
MAX_RETRY = 3             # retries of one trial's parameters after worker deaths

# fail_kind user attribute: who is to blame for a FAIL.
TRIAL_FAULT = "trial"             # diverged or raised in training: counts
WORKER_DIED = "worker_died"       # killed, lost machine: does not count, retried
INTERRUPTED = "interrupted"       # Ctrl-C: does not count, retried
SURPLUS = "surplus"               # asked after the total was reached elsewhere: does not count

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ---------------------------------------------------------------- samplers and pruners
def make_sampler(spec: StudySpec, worker: int = 0) -> optuna.samplers.BaseSampler:
    """The Optuna sampler named in the spec, with its options and seed; worker i > 0 gets
    seed + i so parallel workers do not draw the same parameters."""
    opts = dict(spec.sampler.model_extra or {})
    seed, name = spec.sampler.seed, spec.sampler.name
    if seed is not None:
        seed += worker
    if name == "grid":
        space = {k: d.values() for k, d in spec.search.items()}
        return optuna.samplers.GridSampler(space, seed=seed, **opts)
    cls = {
        "tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
        "cmaes": optuna.samplers.CmaEsSampler, "gp": optuna.samplers.GPSampler,
        "nsga2": optuna.samplers.NSGAIISampler, "qmc": optuna.samplers.QMCSampler,
    }[name]
    return cls(seed=seed, **opts)


def _pruner(p) -> optuna.pruners.BasePruner:
    opts = dict(p.model_extra or {})
    if p.name == "patient":
        if p.wrapped is None:
            raise ValueError("patient needs 'wrapped: {name: ...}' and 'patience'")
        return optuna.pruners.PatientPruner(_pruner(p.wrapped), **opts)
    cls = {
        "none": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
        "percentile": optuna.pruners.PercentilePruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
    }[p.name]
    return cls(**opts)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The Optuna pruner named in the spec (NopPruner for multi-objective studies,
    which Optuna cannot prune)."""
    pruner = _pruner(spec.pruner)
    return optuna.pruners.NopPruner() if spec.multi_objective else pruner


def check_spec(spec: StudySpec, path: str) -> None:
    """Checks of a spec that need Optuna: sampler and pruner options build."""
    for field, build in (("sampler", make_sampler), ("pruner", make_pruner)):
        try:
            with _quiet_warnings():
                build(spec)
        except (TypeError, ValueError, ImportError) as exc:
            name = getattr(spec, field).name
            raise SpecError(path, field, f"bad options for {field} {name!r}: {exc}") from None


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------- storage
def run_dir(spec: StudySpec) -> Path:
    """runs/<name>/ in the working directory: the default journal and local lock files."""
    return Path("runs") / spec.name


def _sqlalchemy_url(url: str) -> str:
    # SQLAlchemy's default PostgreSQL driver is psycopg2; we ship psycopg 3.
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def _redact(url: str) -> str:
    head, sep, tail = url.partition("@")
    if sep and ":" in head.split("//", 1)[-1]:
        scheme, _, cred = head.partition("//")
        return f"{scheme}//{cred.split(':')[0]}:***@{tail}"
    return url


def get_storage(spec: StudySpec, create: bool = True) -> optuna.storages.BaseStorage:
    """None → journal file runs/<name>/optuna.log; sqlite:/// or postgresql:// → RDB storage
    with heartbeats and retries of trials whose worker died. Unreachable → GanbenchError."""
    if spec.storage is None:
        from optuna.storages.journal import JournalFileBackend

        path = run_dir(spec) / "optuna.log"
        if not create and not path.exists():
            raise GanbenchError(f"no study found: {path} does not exist (run `ganbench sweep` "
                                "first)")
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    url = spec.storage
    if url.startswith("sqlite:///") and not create and not Path(url[10:]).exists():
        raise GanbenchError(f"no study found: {url[10:]} does not exist")
    try:
        with _quiet_warnings():
            return optuna.storages.RDBStorage(
                _sqlalchemy_url(url), heartbeat_interval=HEARTBEAT_INTERVAL,
                grace_period=GRACE_PERIOD,
                failed_trial_callback=_retry_callback,
                engine_kwargs={"pool_pre_ping": True} if url.startswith("postgresql") else None,
            )
    except Exception as exc:  # sqlalchemy raises many types; all mean "cannot use it"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GanbenchError(f"storage {_redact(url)}: cannot connect: {first}") from None


def _retry_callback(study: optuna.Study, trial: FrozenTrial) -> None:
    """Heartbeat-failed trial (worker on another machine died): tag it, re-queue its params."""
    study._storage.set_trial_user_attr(trial._trial_id, "fail_kind", WORKER_DIED)
    study._storage.set_trial_user_attr(trial._trial_id, "fail_reason",
                                       "worker died (no heartbeat)")
    requeue(study, trial)


def open_study(spec: StudySpec, storage: optuna.storages.BaseStorage | None = None,
               create: bool = True, worker: int = 0) -> optuna.Study:
    """Create or load the spec's Optuna study (name = spec.name)."""
    storage = storage or get_storage(spec, create=create)
    if not create:
        try:
            return optuna.load_study(study_name=spec.name, storage=storage,
                                     sampler=make_sampler(spec, worker), pruner=make_pruner(spec))
        except KeyError:
            raise GanbenchError(f"no study named {spec.name!r} in the storage") from None
    with _quiet_warnings():
        study = optuna.create_study(
            study_name=spec.name, storage=storage, sampler=make_sampler(spec, worker),
            pruner=make_pruner(spec), directions=spec.directions, load_if_exists=True)
    if [d.name.lower() for d in study.directions] != spec.directions:
        raise GanbenchError(f"study {spec.name!r} exists with other objectives; rename the study")
    if "reference" not in study.user_attrs:
        study.set_user_attr("reference", plot_reference(spec))
    existing = len(study.get_trials(deepcopy=False))
    if existing:
        # A resumed seeded sampler would replay the draws of the first run: shift its seed
        # by the trials already there (still deterministic for a given history).
        study.sampler = make_sampler(spec, worker + 7919 * existing)
    return study


PLOT_POINTS = 500  # samples kept per trial (and of the target) for the report's scatters


def points(x) -> list[list[float]]:
    """The first PLOT_POINTS samples' first two coordinates, rounded (for JSON storage)."""
    return [[round(float(v), 4) for v in row[:2]] for row in x[:PLOT_POINTS].tolist()]


def plot_reference(spec: StudySpec) -> dict[str, Any]:
    """The target's evaluation points and mode centres (first two coordinates), stored in the
    study so reports can draw scatters from the storage alone."""
    import torch

    from ganbench.targets import get_target

    target = get_target(spec.target.name, **spec.target.params())
    config = spec.trial_config({})
    sample = target.sample(PLOT_POINTS, torch.Generator().manual_seed(config.eval_seed))
    centers = None if target.centers is None else points(target.centers)
    return {"points": points(sample), "centers": centers, "dim": target.dim}


# ---------------------------------------------------------------- counting and recovery
def counts(trial: FrozenTrial) -> bool:
    """Does this trial count towards the study's total?"""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and trial.user_attrs.get("fail_kind") == TRIAL_FAULT


def count_trials(trials: Sequence[FrozenTrial]) -> tuple[int, int]:
    """(counted finished trials, running trials)."""
    done = sum(1 for t in trials if counts(t))
    running = sum(1 for t in trials if t.state == TrialState.RUNNING)
    return done, running


def requeue(study: optuna.Study, trial: FrozenTrial) -> None:
    """Re-queue a lost trial's parameters (at most MAX_RETRY times per original trial)."""
    origin = trial.user_attrs.get("retry_of", trial.number)
    retries = trial.user_attrs.get("retry", 0) + 1
    if retries > MAX_RETRY:
        return
    study.enqueue_trial(trial.params, user_attrs={"retry_of": origin, "retry": retries},
                        skip_if_exists=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_trial(study: optuna.Study, trial: FrozenTrial, kind: str, reason: str) -> None:
    """Mark a RUNNING trial FAIL with a reason (and re-queue it unless it was its own fault)."""
    storage = study._storage
    storage.set_trial_user_attr(trial._trial_id, "fail_kind", kind)
    storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
    try:
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except RuntimeError:  # finished meanwhile by someone else
        return
    if kind != TRIAL_FAULT:
        requeue(study, trial)


def recover_dead_workers(study: optuna.Study,
                         on_lost: Callable[[FrozenTrial, str], None] | None = None,
                         kind: str = WORKER_DIED) -> list[int]:
    """Fail and re-queue RUNNING trials whose worker was a process of this host that is gone;
    ``on_lost(trial, reason)`` lets the caller close what else the trial had open (its
    MLflow run).

    Local workers are detected directly by pid (no heartbeat grace period to wait out);
    workers on other machines are left to the storage's heartbeats.
    """
    host = socket.gethostname()
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w_host, w_pid = trial.user_attrs.get("host"), trial.user_attrs.get("pid")
        if w_host == host and isinstance(w_pid, int) and not _pid_alive(w_pid):
            reason = (f"worker died (pid {w_pid} on {host})" if kind == WORKER_DIED
                      else "interrupted (Ctrl-C)")
            fail_trial(study, trial, kind, reason)
            if on_lost is not None:
                on_lost(trial, reason)
            recovered.append(trial.number)
    if isinstance(study._storage, optuna.storages.RDBStorage):
        optuna.storages.fail_stale_trials(study)
    return recovered


@contextlib.contextmanager
def local_lock(spec: StudySpec) -> Iterator[None]:
    """Serialize 'check the total, ask a trial' between the workers of this machine."""
    path = run_dir(spec) / ".ask.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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
    """The metric reported at each evaluation for pruning: exact W1 is computed only for the
    final score (an n³ assignment), so a W1 objective is tracked by sliced W1 meanwhile."""
    metric = spec.objectives[0].metric
    return "sliced_w1" if metric == "w1" else metric


def objective_values(spec: StudySpec, metrics: dict[str, float]) -> list[float]:
    return [float(metrics[o.metric]) for o in spec.objectives]


def _begin_trial(study: optuna.Study, trial: optuna.Trial, spec: StudySpec, device: str,
                 tracker=None) -> tuple[dict[str, Any], Any]:
    """Record where the trial runs, sample its parameters, open its MLflow run."""
    storage = study._storage
    storage.set_trial_user_attr(trial._trial_id, "host", socket.gethostname())
    storage.set_trial_user_attr(trial._trial_id, "pid", os.getpid())
    storage.set_trial_user_attr(trial._trial_id, "device", device)
    storage.set_trial_user_attr(trial._trial_id, "execution", spec.execution.mode)
    params = suggest(trial, spec)
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
    state, reason, values, mean = TrialState.COMPLETE, "", None, {}
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
        study.tell(trial, values)
    elif state == TrialState.PRUNED:
        study.tell(trial, state=TrialState.PRUNED)
    else:
        fail_trial(study, storage.get_trial(trial._trial_id), TRIAL_FAULT, reason)
    if run is not None:
        final = {f"objective.{o.metric}": v for o, v in zip(spec.objectives, values or [])}
        if spec.seeds > 1 and state == TrialState.COMPLETE:
            final |= {f"mean.{k}": v for k, v in mean.items()}
        run.end(state, final, reason, last)
    return TrialOutcome(trial.number, state, values, reason)


def _fault(study: optuna.Study, trial: optuna.Trial, run, exc: Exception) -> TrialOutcome:
    """A bug in training (not a diverging GAN): the trial FAILs, counted, with traceback."""
    storage = study._storage
    reason = f"error: {type(exc).__name__}: {exc}"
    storage.set_trial_user_attr(trial._trial_id, "traceback", traceback.format_exc())
    fail_trial(study, storage.get_trial(trial._trial_id), TRIAL_FAULT, reason)
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
                                   streams=spec.execution.streams)
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


# ---------------------------------------------------------------- workers
def ask_next(study: optuna.Study, spec: StudySpec, total: int) -> optuna.Trial | None:
    """Ask a trial if the study still needs one, else None.

    Local workers serialize this with a file lock, so they never overshoot. Workers on
    other machines can race; a trial asked beyond the total is marked FAIL 'surplus'
    (not counted) by the check after asking.
    """
    with local_lock(spec):
        done, running = count_trials(study.get_trials(deepcopy=False))
        if done + running >= total:
            return None
        trial = study.ask()
    before = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number]
    done, running = count_trials(before)
    if done + running >= total:
        fail_trial(study, study._storage.get_trial(trial._trial_id), SURPLUS,
                   "surplus: the study reached its total elsewhere")
        return None
    return trial


def worker_loop(spec: StudySpec, device: str, total: int, deadline: float | None = None,
                tracker=None, on_trial: Callable[[TrialOutcome], None] | None = None,
                worker: int = 0) -> int:
    """Run trials until the study holds ``total`` counted trials (or the deadline passes).
    Returns the number of trials this worker ran."""
    study = open_study(spec, worker=worker)
    ran = 0
    heartbeat = _Heartbeat(study)
    # Ctrl-C only sets a flag, acted on at safe points (between trials, every few training
    # steps): a KeyboardInterrupt raised inside a library's cleanup callback is swallowed.
    stop = threading.Event()
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda s, f: stop.set()) if in_main else None
    try:
        while deadline is None or time.time() < deadline:
            if stop.is_set():
                raise KeyboardInterrupt
            if spec.execution.mode == "population":
                # As many trials as fill the population (each trial is `seeds` members).
                trials: list[optuna.Trial] = []
                while len(trials) < max(1, spec.execution.size // spec.seeds):
                    if (trial := ask_next(study, spec, total)) is None:
                        break
                    trials.append(trial)
                if not trials:
                    break
                with heartbeat.beating(*trials):
                    outcomes = run_population(study, trials, spec, device, tracker,
                                              stop.is_set)
            else:
                trial = ask_next(study, spec, total)
                if trial is None:
                    break
                with heartbeat.beating(trial):
                    outcomes = [run_trial(study, trial, spec, device, tracker, stop.is_set)]
            ran += len(outcomes)
            for outcome in outcomes:
                if on_trial:
                    on_trial(outcome)
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)
    return ran


class _Heartbeat:
    """Records heartbeats of the running trial on RDB storages (ask/tell does not)."""

    def __init__(self, study: optuna.Study) -> None:
        storage = study._storage
        self.storage = storage if isinstance(storage, optuna.storages.RDBStorage) else None

    @contextlib.contextmanager
    def beating(self, *trials: optuna.Trial) -> Iterator[None]:
        if self.storage is None:
            yield
            return
        stop = threading.Event()

        def beat() -> None:
            while not stop.is_set():
                for trial in trials:
                    with contextlib.suppress(Exception):
                        self.storage.record_heartbeat(trial._trial_id)
                stop.wait(HEARTBEAT_INTERVAL)

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)


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


def needed_workers(devices: Sequence[str], total: int, done: int) -> list[str]:
    """The first of ``devices``, as many as trials are left (at least one): more workers
    would only start and stop again."""
    return list(devices)[:max(1, total - done)]


def _worker_process(spec_json: str, device: str, total: int, deadline: float | None,
                    tracking: Any, worker: int, threads: int = 1) -> None:
    """Entry point of a spawned worker process."""
    import signal

    import torch

    if device == "cpu":
        torch.set_num_threads(threads)
    spec = StudySpec.model_validate_json(spec_json)
    tracker = None
    if tracking is not None:
        from ganbench.tracking import Tracker

        tracker = Tracker.attach(tracking)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        worker_loop(spec, device, total, deadline, tracker, worker=worker)
    except KeyboardInterrupt:
        pass


def start_workers(spec: StudySpec, devices: Sequence[str], total: int,
                  deadline: float | None, tracking: Any = None) -> list[mp.Process]:
    """Spawn one worker process per entry of ``devices``."""
    ctx = mp.get_context("spawn")
    procs = []
    threads = cpu_threads(spec, list(devices).count("cpu"))
    for i, device in enumerate(devices):
        p = ctx.Process(target=_worker_process,
                        args=(spec.model_dump_json(), device, total, deadline, tracking, i,
                              threads),
                        daemon=False)
        p.start()
        procs.append(p)
    return procs


@dataclass
class Snapshot:
    """The study's state as the supervisor last saw it."""

    done: int
    running: list[FrozenTrial]
    best: list[float] | None
    total: int


def snapshot(study: optuna.Study, spec: StudySpec, total: int) -> Snapshot:
    trials = study.get_trials(deepcopy=False)
    done, _ = count_trials(trials)
    running = [t for t in trials if t.state == TrialState.RUNNING]
    best = None
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete and not spec.multi_objective:
        pick = min if spec.directions[0] == "minimize" else max
        best = pick(complete, key=lambda t: t.values[0]).values
    return Snapshot(done, running, best, total)


def run_sweep(spec: StudySpec, devices: Sequence[str], tracking: Any = None,
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
    # Ctrl-C reaches the workers directly (same process group). Here it only sets a flag
    # checked by the loop, so it never lands inside a library's cleanup callback.
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    try:
        while any(p.is_alive() for p in procs):
            if stop.is_set():
                raise KeyboardInterrupt
            snap = snapshot(study, spec, total)
            if on_poll:
                on_poll(snap)
            for p in procs:
                p.join(timeout=poll / len(procs))
    except KeyboardInterrupt:
        # Workers got the same SIGINT: let them mark their trials, then stop.
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        # A worker stopped between asking a trial and starting it leaves it RUNNING.
        recover_dead_workers(study, on_lost, kind=INTERRUPTED)
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    if stop.is_set():  # Ctrl-C as the workers were finishing
        recover_dead_workers(study, on_lost, kind=INTERRUPTED)
        raise KeyboardInterrupt
    snap = snapshot(study, spec, total)
    if on_poll:
        on_poll(snap)
    failed = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    if failed and snap.done < total and (deadline is None or time.time() < deadline):
        raise GanbenchError(f"{len(failed)} worker(s) exited with codes {failed} before the "
                            f"study reached {total} trials; rerun to continue")
    return snap
