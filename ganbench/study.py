"""The Optuna study of a spec: sampler, pruner, storage, and opening (create or resume).

``get_storage(spec)`` is the one place a storage URL becomes an Optuna storage;
``open_study(spec)`` the one place a study is created or loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna

from ganbench.accounting import retry_callback
from ganbench.errors import GanbenchError, NoStudy, SpecError, redact, register_secret_url
from ganbench.files import atomic_write_bytes
from ganbench.optuna_adapter import ResilientRDBStorage
from ganbench.spec import PRUNERS, SAMPLERS, StudySpec, derive_seed


def quiet_optuna() -> None:
    """Keep Optuna's per-study and per-trial INFO lines off the console: ganbench reports
    trials itself. Called by the processes ganbench owns (the CLI, its workers), never on
    import, so a program that uses ganbench as a library keeps its own logging."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)


# ---------------------------------------------------------------- samplers and pruners
def make_sampler(spec: StudySpec, index: int | None = None) -> optuna.samplers.BaseSampler:
    """The Optuna sampler named in the spec, with its options and seed.

    ``index``: the trial it will sample (its position among the study's live and counted
    trials, see ``sweep.trial_index``). Trial n's sampler is seeded from the spec's seed and
    n, so what it draws depends on n and on the results already told, not on which worker
    asks first nor on whether the study was resumed. QMC keeps the spec's seed: it is the
    scrambling of one sequence whose position Optuna tracks itself.
    """
    opts = dict(spec.sampler.model_extra or {})
    seed, name = spec.sampler.seed, spec.sampler.name
    if seed is not None and index is not None and name != "qmc":
        seed = derive_seed(seed, index)
    cls = getattr(optuna.samplers, SAMPLERS[name])
    if name == "grid":
        space = {k: d.values() for k, d in spec.search.items()}
        return cls(space, seed=seed, **opts)
    if name == "tpe" and spec.execution.mode == "population":
        # K trials are asked before any is told: without a lie for the running ones, TPE
        # draws them all from the same posterior and they bunch up (benchmarks/).
        opts.setdefault("constant_liar", True)
    return cls(seed=seed, **opts)


def _pruner(p) -> optuna.pruners.BasePruner:
    opts = dict(p.model_extra or {})
    cls = getattr(optuna.pruners, PRUNERS[p.name])
    if p.name == "patient":
        if p.wrapped is None:
            raise ValueError("patient needs 'wrapped: {name: ...}' and 'patience'")
        return cls(_pruner(p.wrapped), **opts)
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
            with quiet_warnings():
                build(spec)
        except (TypeError, ValueError, ImportError) as exc:
            name = getattr(spec, field).name
            raise SpecError(path, field, f"bad options for {field} {name!r}: {exc}") from None


@contextlib.contextmanager
def quiet_warnings() -> Iterator[None]:
    """Silence Optuna's experimental-feature warnings (the user cannot act on them)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------- storage
def run_dir(spec: StudySpec) -> Path:
    """runs/<name>/ in the working directory: the default journal and local lock files."""
    return Path("runs") / spec.name


def report_dir(spec: StudySpec) -> Path:
    """runs/<name>/report/: where a run's tables and plots go unless told otherwise, so trying
    the tool never overwrites the committed results in reports/ (written with ``--out``)."""
    return run_dir(spec) / "report"


COMMITTED = Path("reports")  # the shipped studies' committed results: reports/<name>/


def journal_path(spec: StudySpec) -> Path:
    """The default storage: a journal file in the study's run folder."""
    return run_dir(spec) / "optuna.log"


def _sqlalchemy_url(url: str) -> str:
    # SQLAlchemy's default PostgreSQL driver is psycopg2; we ship psycopg 3.
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def get_storage(spec: StudySpec, create: bool = True) -> optuna.storages.BaseStorage:
    """None → journal file runs/<name>/optuna.log; sqlite:/// or postgresql:// → RDB storage
    with heartbeats and retries of trials whose worker died. Unreachable → GanbenchError."""
    if spec.storage is None:
        from optuna.storages.journal import JournalFileBackend

        path = journal_path(spec)
        if not create and not path.exists():
            raise NoStudy(f"no study found: {path} does not exist (run `ganbench sweep` "
                          "first)")
        path.parent.mkdir(parents=True, exist_ok=True)
        check_journal(path, set_aside=create)
        # An absolute path: Optuna's lock is a symlink to the journal, and a relative target
        # dangles from inside runs/<name>/, so a lock left by a killed worker was never seen
        # as stale (its grace period reads the target's mtime) and the next run spun forever.
        return optuna.storages.JournalStorage(JournalFileBackend(str(path.resolve())))
    url = spec.storage
    register_secret_url(url)  # also in a worker process, which did not read the spec file
    if url.startswith("sqlite:///") and not create and not Path(url[10:]).exists():
        raise NoStudy(f"no study found: {url[10:]} does not exist")
    for attempt in range(3):
        try:
            with quiet_warnings():
                return ResilientRDBStorage(
                    _sqlalchemy_url(url),
                    heartbeat_interval=int(math.ceil(spec.heartbeat.interval)),
                    grace_period=int(math.ceil(spec.heartbeat.grace)),
                    heartbeat_stale_trial_callback=retry_callback,
                    engine_kwargs={"pool_pre_ping": True} if url.startswith("postgresql")
                    else None)
        except Exception as exc:  # sqlalchemy raises many types; all mean "cannot use it"
            # Workers starting together on an empty database race to create its tables:
            # the loser sees a duplicate key, and finds the tables on its next attempt.
            if "duplicate key" in str(exc) or "already exists" in str(exc):
                time.sleep(0.5 * (attempt + 1))
                continue
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else \
                type(exc).__name__
            raise GanbenchError(f"storage {redact(url)}: cannot connect: {first}") from None
    raise GanbenchError(f"storage {redact(url)}: cannot create its tables (another process "
                        "keeps creating them)")


# ---------------------------------------------------------------- a damaged journal
@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold Optuna's own lock of the journal at ``path`` (its writers append under it)."""
    from optuna.storages.journal import JournalFileSymlinkLock

    lock = JournalFileSymlinkLock(str(path.resolve()))
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _first_bad_record(lines: list[bytes]) -> int | None:
    """The 0-based index of the first record (line) that is not a JSON object."""
    import json

    for i, line in enumerate(lines):
        try:
            if not isinstance(json.loads(line), dict):
                return i
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            return i
    return None


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + f"-{time.time_ns() % 10**9:09d}"


def check_journal(path: Path, set_aside: bool = True,
                  say: Callable[[str], None] = lambda line: print(line, flush=True)) -> None:
    """Read the journal at ``path`` record by record, under Optuna's lock.

    A last record cut off by a crash or a full disk (no line end) would be silently skipped
    by Optuna and then glued to the next record written, garbling the file: it is moved to
    ``<journal>.cut-<time>`` and the journal truncated to its whole records (with
    ``set_aside``; a read-only command only says so). A damaged record elsewhere stops with
    one line naming the file and record, and how to repair it (``ganbench repair``).
    """
    if not path.exists() or path.stat().st_size == 0:
        return
    with _locked(path):
        data = path.read_bytes()
        whole = data.rfind(b"\n") + 1
        lines = data[:whole].split(b"\n")[:-1]
        bad = _first_bad_record(lines)
        records = len(lines)
        if bad is not None:
            raise GanbenchError(
                f"{path}: record {bad + 1} of {records} is damaged (not a JSON record); "
                "`ganbench repair` keeps the records before it and sets the rest aside")
        if whole == len(data):
            return
        if not set_aside:
            say(f"{path}: its last record is cut off ({len(data) - whole} bytes, a crash or "
                f"a full disk mid-write); read its {records} whole records (the next sweep "
                "sets the cut bytes aside)")
            return
        aside = path.with_name(f"{path.name}.cut-{_stamp()}")
        aside.write_bytes(data[whole:])
        os.truncate(path, whole)
    say(f"{path}: its last record was cut off (a crash or a full disk mid-write): kept its "
        f"{records} whole records, moved the {len(data) - whole} cut bytes to {aside.name}")


@dataclasses.dataclass
class Repair:
    """What ``repair_journal`` did: records kept, records set aside (and the finished
    trials among them, which will run again), and where the original file went."""
    kept: int
    dropped: int
    finished_dropped: int
    original: Path | None


def repair_journal(path: Path) -> Repair:
    """Keep the records of the journal at ``path`` before its first damaged one (a cut last
    record included): the whole original goes to ``<journal>.damaged-<time>``, and the
    journal is replaced atomically by the records before the damage. Optuna replays a
    journal in order, so the records after a damaged one cannot be trusted and are set
    aside with it."""
    import json

    if not path.exists():
        raise NoStudy(f"no journal at {path}")
    with _locked(path):
        data = path.read_bytes()
        lines = data.split(b"\n")
        whole = lines[:-1]  # the last element is what follows the last line end
        bad = _first_bad_record(whole)
        keep = len(whole) if bad is None else bad
        dropped = len(whole) - keep + (1 if lines[-1] else 0)
        if dropped == 0:
            return Repair(keep, 0, 0, None)
        finished = 0
        for line in whole[keep:]:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                record = json.loads(line)
                # Optuna's journal op 6 sets a trial's state; states 1-3 finish it.
                finished += record.get("op_code") == 6 and record.get("state") in (1, 2, 3)
        original = path.with_name(f"{path.name}.damaged-{_stamp()}")
        shutil.copyfile(path, original)
        atomic_write_bytes(path, b"".join(line + b"\n" for line in whole[:keep]))
    return Repair(keep, dropped, finished, original)


def journal_notes(path: Path) -> list[str]:
    """Lines for ``status``: bytes or records of this journal that were set aside."""
    notes = []
    for aside in sorted(path.parent.glob(f"{path.name}.cut-*")):
        notes.append(f"{aside.stat().st_size} bytes of a cut last record set aside in "
                     f"{aside}")
    for aside in sorted(path.parent.glob(f"{path.name}.damaged-*")):
        notes.append(f"repaired: the damaged original is kept in {aside}")
    return notes


def stored_storage(spec: Any) -> optuna.storages.BaseStorage | None:
    """The storage of an existing study or comparison (its first arm's), None where it has
    none yet (a journal file not written, a sqlite file absent); nothing is created."""
    from ganbench.spec import CompareSpec

    if isinstance(spec, CompareSpec):
        spec = spec.arm_study(spec.targets[0], spec.baseline)
    try:
        return get_storage(spec, create=False)
    except NoStudy:
        return None


def storage_label(spec: StudySpec) -> str:
    """Where the study is stored, for display and tags."""
    return redact(spec.storage) if spec.storage else str(journal_path(spec))


def open_study(spec: StudySpec, storage: optuna.storages.BaseStorage | None = None,
               create: bool = True) -> optuna.Study:
    """Create or load the spec's Optuna study (name = spec.name)."""
    storage = storage or get_storage(spec, create=create)
    if not create:
        try:
            study = optuna.load_study(study_name=spec.name, storage=storage,
                                      sampler=make_sampler(spec),
                                      pruner=make_pruner(spec))
        except KeyError:
            raise NoStudy(f"no study named {spec.name!r} in the storage") from None
        check_definition(study, spec, record=False)
        return study
    with quiet_warnings():
        study = optuna.create_study(
            study_name=spec.name, storage=storage, sampler=make_sampler(spec),
            pruner=make_pruner(spec), directions=spec.directions, load_if_exists=True)
    if [d.name.lower() for d in study.directions] != spec.directions:
        raise GanbenchError(f"study {spec.name!r} exists with other objectives; rename the study")
    check_definition(study, spec)
    if "intermediate_values" not in study.user_attrs:
        # What Optuna's intermediate values (and a pruned trial's value) hold, by name.
        from ganbench.metrics import pruning_metric

        study.set_user_attr("intermediate_values", pruning_metric(spec.objectives[0].metric))
    if "reference" not in study.user_attrs:
        study.set_user_attr("reference", reference_points(spec))
    return study


# ---------------------------------------------------------------- one study, one experiment
# What defines a study's trials. Left out: how many trials and how they run (trials, budget,
# timeout, workers, execution, the device), where they are stored and logged, and how they
# are drawn and stopped (sampler, pruner): changing those continues the same experiment.
DEFINING = ("target", "train", "model", "search", "objectives", "seeds")


def definition(spec: StudySpec) -> dict[str, Any]:
    """The fields that define the study's trials, flattened to dotted keys (JSON values)."""
    import json

    data = json.loads(spec.model_dump_json(include=set(DEFINING), exclude_none=True))
    data.get("train", {}).pop("device", None)
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
        else:
            flat[prefix] = value

    walk("", data)
    return flat


def check_definition(study: optuna.Study, spec: StudySpec, record: bool = True) -> None:
    """Refuse to reopen a study with another definition (one line naming the fields that
    differ); a study without one (new, or from an older version) records this one."""
    current = definition(spec)
    stored = study.user_attrs.get("definition")
    if stored is None:
        if record:
            study.set_user_attr("definition", current)
        return
    differ = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
    if not differ:
        return
    shown = "; ".join(f"{k}: {_show(stored.get(k))} there, {_show(current.get(k))} here"
                      for k in differ[:3])
    more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
    raise GanbenchError(
        f"study {spec.name!r} in the storage is another experiment: {shown}{more}; to run "
        f"this one, give it a new name (e.g. --set name={spec.name.split('__')[0]}-2); "
        "to continue the stored one, undo the change")


def _show(value: Any) -> str:
    return "unset" if value is None else repr(value)


def reference_points(spec: StudySpec) -> dict[str, Any]:
    """The target's evaluation points and mode centres (first two coordinates), stored in the
    study so reports can draw scatters from the storage alone."""
    import torch

    from ganbench.files import PLOT_POINTS, points
    from ganbench.targets import get_target

    target = get_target(spec.target.name, **spec.target.params())
    config = spec.trial_config({})
    sample = target.sample(PLOT_POINTS, torch.Generator().manual_seed(config.eval_seed))
    centers = None if target.centers is None else points(target.centers)
    return {"points": points(sample), "centers": centers, "dim": target.dim}



# ---------------------------------------------------------------- compact exports
EXPORT = "storage.json.gz"  # beside a report: what `ganbench report` rebuilds it from


def export_studies(studies: list[optuna.Study], path: Path,
                   keep: Callable[[str, Any], Any] | None = None) -> Path:
    """Write ``studies`` (attributes, every trial with its parameters, distributions,
    values, intermediate values, user attributes and times) to gzipped JSON at ``path``,
    written atomically and byte-for-byte the same for the same studies.
    ``keep(key, value)`` may slim a user attribute (trial's or study's): it returns the
    value to store, or None to drop it."""
    import gzip
    import json
    import os

    from optuna.distributions import distribution_to_json

    def attrs(items: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in items.items():
            value = keep(key, value) if keep else value
            if value is not None:
                out[key] = value
        return out

    data = []
    for study in studies:
        trials = []
        for t in study.get_trials(deepcopy=False):
            trials.append({
                "number": t.number, "state": t.state.name, "values": t.values,
                "params": t.params,
                "distributions": {k: distribution_to_json(d)
                                  for k, d in t.distributions.items()},
                "intermediate": {str(k): v for k, v in t.intermediate_values.items()},
                "user_attrs": attrs(t.user_attrs),
                "start": t.datetime_start.isoformat() if t.datetime_start else None,
                "complete": t.datetime_complete.isoformat() if t.datetime_complete else None})
        data.append({"name": study.study_name,
                     "directions": [d.name.lower() for d in study.directions],
                     "user_attrs": attrs(study.user_attrs), "trials": trials})
    # Keys in their stored order: a rebuilt report's columns come out in the same order.
    text = json.dumps({"format": 1, "studies": data}, allow_nan=True, separators=(",", ":"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:  # mtime 0: the same studies give the same bytes
        with gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, filename="") as gz:
            gz.write(text.encode())
    os.replace(tmp, path)
    return path


def import_studies(path: Path) -> optuna.storages.BaseStorage:
    """An in-memory Optuna storage holding the studies of an export (``export_studies``)."""
    import datetime as dt
    import gzip
    import json

    from optuna.distributions import json_to_distribution
    from optuna.trial import FrozenTrial, TrialState

    try:
        data = json.loads(gzip.decompress(Path(path).read_bytes()))
    except (OSError, ValueError, EOFError) as exc:
        raise GanbenchError(f"{path}: not a readable study export ({exc})") from None
    storage = optuna.storages.InMemoryStorage()

    def when(text: str | None) -> dt.datetime | None:
        return dt.datetime.fromisoformat(text) if text else None

    for s in data["studies"]:
        study = optuna.create_study(storage=storage, study_name=s["name"],
                                    directions=s["directions"])
        for key, value in s["user_attrs"].items():
            study.set_user_attr(key, value)
        for t in s["trials"]:
            state = TrialState[t["state"]]
            values = t["values"]
            study.add_trial(FrozenTrial(
                number=t["number"], state=state, value=None, values=values,
                datetime_start=when(t["start"]), datetime_complete=when(t["complete"]),
                params=t["params"],
                distributions={k: json_to_distribution(d)
                               for k, d in t["distributions"].items()},
                user_attrs=t["user_attrs"], system_attrs={},
                intermediate_values={int(k): v for k, v in t["intermediate"].items()},
                trial_id=0))
    return storage
