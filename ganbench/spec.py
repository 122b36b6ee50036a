"""The study YAML: pydantic models, loading with overrides, and one-line errors.

``load_spec(path, overrides)`` returns a validated :class:`StudySpec` or raises
:class:`SpecError` whose message reads ``<file>: <field.path>: <what is wrong>``.
"""

from __future__ import annotations

import difflib
import math
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from ganbench.config import MODEL_FIELDS, TRAIN_FIELDS, TrainConfig
from ganbench.errors import GanbenchError, SpecError, redact, register_secret_url
from ganbench.metrics import METRICS

SEARCHABLE = tuple(f for f in TRAIN_FIELDS + MODEL_FIELDS
                   if f not in ("eval_every", "eval_samples", "eval_seed", "device", "dtype"))
# Sampler and pruner names → their optuna.samplers / optuna.pruners classes (built in
# ganbench.study; named here so that a spec is checked without importing Optuna).
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "grid": "GridSampler",
            "cmaes": "CmaEsSampler", "gp": "GPSampler", "nsga2": "NSGAIISampler",
            "qmc": "QMCSampler"}
PRUNERS = {"none": "NopPruner", "median": "MedianPruner", "percentile": "PercentilePruner",
           "successive_halving": "SuccessiveHalvingPruner", "hyperband": "HyperbandPruner",
           "patient": "PatientPruner"}

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # study, arm: names of files and runs
# A comparison's arm studies join its name, a target and an arm (<name>__<target>__<arm>__r9):
# 64 characters each keeps that, and every file name built from it, below 255 bytes.
MAX_NAME = 64
MAX_STUDY_NAME = 3 * MAX_NAME + 8
NAME_RULE = "letters, digits and _ . - (starting with a letter or digit)"


def check_name(value: Any, limit: int = MAX_NAME) -> Any:
    """Before pydantic: a study, comparison or arm name (at most ``limit`` characters); one
    given as a YAML number is told to be quoted."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise ValueError(f"expected a name ({NAME_RULE}, at most {limit}); YAML read "
                         f"{value!r} as a number: quote it, e.g. name: \"{value}\"")
    if isinstance(value, str) and not (NAME.fullmatch(value) and len(value) <= limit):
        raise ValueError(f"expected a name of {NAME_RULE}, at most {limit}; got "
                         f"{_short(value)!r}")
    return value


def _study_name(value: Any) -> Any:
    return check_name(value, MAX_STUDY_NAME)

STORAGE_URL = re.compile(r"^(sqlite:///\S+|postgresql(\+psycopg)?://\S*@?[\w.\-\[\]:]+(:\d+)?/\w\S*)$")

# Unknown keys are errors, and values are taken as written: `trials: "5"` or `log: "yes"`
# is refused, not converted (as the JSON Schema of ganbench.schema says).
_STRICT = ConfigDict(extra="forbid", strict=True)
_OPEN = ConfigDict(extra="allow", strict=True)


def _section(name: str, fields: tuple[str, ...]) -> type[BaseModel]:
    hints = typing.get_type_hints(TrainConfig)
    return create_model(name, __config__=_STRICT,
                        **{f: (hints[f] | None, None) for f in fields})


TrainSection = _section("TrainSection", TRAIN_FIELDS)
ModelSection = _section("ModelSection", MODEL_FIELDS)


class Distribution(BaseModel):
    """One search dimension: int / float (optionally log or stepped) or categorical."""

    model_config = _STRICT
    type: Literal["int", "float", "categorical"]  # the kind of range
    low: float | None = None               # lowest value (int, float)
    high: float | None = None              # highest value, included (int, float)
    log: bool = False                      # sample on a log scale (int, float)
    step: float | None = None              # values low, low + step, ... (int, float)
    choices: list[Any] | None = None       # the values to choose from (categorical)

    @model_validator(mode="after")
    def _check(self) -> "Distribution":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty 'choices' list")
            if self.low is not None or self.high is not None or self.log:
                raise ValueError("categorical takes 'choices', not low/high/log")
            return self
        if self.choices is not None:
            raise ValueError(f"{self.type} takes low/high, not 'choices'")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs both 'low' and 'high'")
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError("low and high must be finite numbers")
        if self.low > self.high:
            raise ValueError(f"low ({self.low:g}) must be <= high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0, got {self.low:g}")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError("int range needs integer low and high")
        if self.step is not None and self.step <= 0:
            raise ValueError("step must be > 0")
        return self

    def values(self) -> list[Any] | None:
        """Every value of a finite dimension (for the grid sampler); None if continuous."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            step = int(self.step or 1)
            return list(range(int(self.low), int(self.high) + 1, step))
        if self.step is not None:
            n = int(math.floor((self.high - self.low) / self.step + 1e-9))
            return [self.low + i * self.step for i in range(n + 1)]
        return None

    def ends(self) -> list[Any]:
        """The extreme values (used to validate the space against the trainer)."""
        if self.type == "categorical":
            return list(self.choices)
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high)]


def _registered(registry: dict, kind: str):
    """A validator: the value must be a key of ``registry`` (read when validating, so a
    name registered at run time is accepted)."""
    def check(value: str) -> str:
        if value not in registry:
            raise ValueError(f"unknown {kind} {value!r}; choose one of: "
                             f"{', '.join(registry)}")
        return value

    return field_validator("name" if kind != "metric" else "metric")(check)


class Objective(BaseModel):
    """A metric of ganbench.metrics.METRICS to optimise; its direction by default."""

    model_config = _STRICT
    metric: str                            # a metric of ganbench.metrics (w1, modes, hq, ...)
    direction: Literal["minimize", "maximize"] | None = None  # default: the metric's own
    _metric = _registered(METRICS, "metric")

    @model_validator(mode="after")
    def _default_direction(self) -> "Objective":
        self.direction = self.direction or METRICS[self.metric].direction
        return self


class TargetSpec(BaseModel):
    """``name`` plus the target's own parameters (e.g. modes, radius, std), and ``pool``:
    train on a fixed set of this many target points, drawn once from each run's seed
    (PacGAN's protocol: 100000), instead of fresh points every batch."""

    model_config = _OPEN
    name: str                              # the target (ring, grid, spiral, ...), plus its own
                                           # parameters beside it (modes, radius, std, ...)
    pool: int | None = Field(None, gt=0)   # train on a fixed set of this many points

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def derive_seed(seed: int, *parts: Any) -> int:
    """A seed in [0, 2**32) that depends only on ``seed`` and ``parts`` (names, indices):
    the same on every machine, Python version and process."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps([seed, *parts]).encode()).digest()
    return int.from_bytes(digest[:4], "big")


class SamplerSpec(BaseModel):
    """``name``, ``seed`` and any keyword options of the Optuna sampler."""

    model_config = _OPEN
    name: str = "tpe"                      # an Optuna sampler; other keys are its options
    seed: int | None = 0                   # the search's seed (None: a fresh one every run)
    _name = _registered(SAMPLERS, "sampler")


class PrunerSpec(BaseModel):
    """``name`` and keyword options of the Optuna pruner; ``patient`` wraps ``wrapped``."""

    model_config = _OPEN
    name: str = "median"                   # an Optuna pruner; other keys are its options
    wrapped: "PrunerSpec | None" = None    # the pruner a patient pruner wraps
    _name = _registered(PRUNERS, "pruner")


class TrackingSpec(BaseModel):
    """Where runs are logged in MLflow (``tracking: false`` turns logging off)."""

    model_config = _STRICT
    uri: str | None = None                 # default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db


class ExecutionSpec(BaseModel):
    """How trials run: one at a time per worker, or K members trained as one batched
    population (seed repeats of a trial are members too)."""

    model_config = _STRICT
    mode: Literal["trial", "population"] = "trial"  # one trial at a time, or populations
    size: int = Field(16, gt=0)                  # members per population
    streams: Literal["auto", "member", "shared"] = "auto"  # see ganbench.population
    # Compile each bucket's forwards (torch.compile), at seconds to tens of seconds per bucket
    # shape; it fuses element-wise work only. Results equal to rounding.
    compile: bool = False
    # Where workers run: processes of this machine, or Ray tasks on a cluster (the
    # ``ray`` extra; the storage must be a database every node reaches, MLflow a server).
    backend: Literal["local", "ray"] = "local"
    address: str | None = None   # Ray: the cluster's address (host:port, ray://…, auto)
    cpus: int = Field(1, gt=0)   # Ray: CPU cores each population worker reserves (its lanes)

    @model_validator(mode="after")
    def _address_for_ray(self) -> "ExecutionSpec":
        if self.address is not None and self.backend != "ray":
            raise ValueError("address is for backend: ray (add backend: ray, or --ray "
                             "ADDRESS)")
        return self


class HeartbeatSpec(BaseModel):
    """Liveness of trials on a database storage: a running trial's worker records a
    heartbeat every ``interval`` seconds; a trial silent for ``grace`` seconds is failed
    (not counted) and its parameters are re-queued by the next worker that asks."""

    model_config = _STRICT
    interval: float = Field(30, gt=0)      # seconds between a running trial's heartbeats
    grace: float = Field(120, gt=0)        # seconds of silence after which it is failed

    @model_validator(mode="after")
    def _grace_after_interval(self) -> "HeartbeatSpec":
        if self.grace <= self.interval:
            raise ValueError(f"grace ({self.grace:g} s) must exceed interval "
                             f"({self.interval:g} s): a live worker would be declared dead")
        return self


class Budget(BaseModel):
    """How much tuning a study (or each arm of a comparison) gets: a number of trials, or
    the compute its counted trials may use — generator steps, discriminator steps or
    seconds of training, summed over seeds. Exactly one of them."""

    model_config = _STRICT
    trials: int | None = Field(None, gt=0)   # counted trials
    g_steps: int | None = Field(None, gt=0)  # generator steps of counted trials, all seeds
    d_steps: int | None = Field(None, gt=0)  # discriminator steps of counted trials
    seconds: float | None = Field(None, gt=0)  # seconds of training of counted trials

    @model_validator(mode="after")
    def _one(self) -> "Budget":
        given = [k for k, v in self.model_dump().items() if v is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one unit: {BUDGET_FORMS}")
        return self

    @property
    def unit(self) -> str:
        return next(k for k, v in self.model_dump().items() if v is not None)

    @property
    def amount(self) -> float:
        return getattr(self, self.unit)

    def label(self) -> str:
        unit = self.unit.replace("_", " ").replace("g steps", "G steps").replace(
            "d steps", "D steps")
        return f"{self.amount:g} {unit}"


BUDGET_FORMS = ("expected a number of trials or one of {trials: N}, {g_steps: N}, "
                "{d_steps: N}, {seconds: S}")
# A compute budget caps a study's trials at this many (the compute decides before).
COMPUTE_TRIALS_CAP = 10_000


class StudySpec(BaseModel):
    """A whole study; see studies/*.yaml for annotated examples."""

    model_config = _STRICT
    name: str                              # the study's name: its storage, runs and report
    target: TargetSpec                     # the distribution to learn
    train: TrainSection = Field(default_factory=TrainSection)  # fixed trainer values
    model: ModelSection = Field(default_factory=ModelSection)  # fixed network values
    search: dict[str, Distribution] = Field(default_factory=dict)  # trainer field → range
    objectives: list[Objective] = Field(   # one (or several: a Pareto front) metrics
        default_factory=lambda: [Objective(metric="w1")], min_length=1)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)  # how trials are drawn
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)     # how trials are stopped early
    trials: int = Field(20, gt=0)          # counted trials to run (a cap with a budget)
    budget: Budget | None = None           # stop at this compute instead (trials as a cap)
    timeout: float | None = Field(None, gt=0)  # seconds after which no trial starts
    seeds: int = Field(1, gt=0)            # training seeds per trial (its metrics: the mean)
    storage: str | None = None             # sqlite:/// or postgresql:// (default: a journal)
    tracking: TrackingSpec | Literal[False] = Field(default_factory=TrackingSpec)  # MLflow
    workers: int | None = Field(None, gt=0)  # default: one per GPU, or per CPU core
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec)  # trials or populations
    heartbeat: HeartbeatSpec = Field(default_factory=HeartbeatSpec)  # database storages

    _name = field_validator("name", mode="before")(_study_name)

    def fixed(self) -> dict[str, Any]:
        """The fixed trainer fields: target, train and model sections."""
        out = {"target": self.target.name, "target_params": self.target.params(),
               "pool": self.target.pool}
        for section in (self.train, self.model):
            out |= {k: v for k, v in section.model_dump().items() if v is not None}
        return out

    def trial_config(self, params: dict[str, Any], seed: int = 0) -> TrainConfig:
        """The trainer config for sampled ``params`` and ``seed``; ``tricks.<name>.<param>``
        parameters go into the config's tricks."""
        return TrainConfig(**merge_params(self.fixed(), params) | {"seed": seed})

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1


def merge_params(fixed: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Fixed trainer fields updated by sampled ones; dotted trick parameters are nested."""
    out = dict(fixed)
    tricks = {k: dict(v or {}) for k, v in (out.get("tricks") or {}).items()}
    for key, value in params.items():
        if key.startswith("tricks."):
            _, name, param = key.split(".", 2)
            tricks.setdefault(name, {})[param] = value
        else:
            out[key] = value
    if tricks:
        out["tricks"] = tricks
    return out


def _dotted(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-after"))


def _pydantic_message(err: dict, model: type[BaseModel] | None = None) -> str:
    if err["type"] == "extra_forbidden":
        valid = _keys_at(model.model_json_schema(), err["loc"][:-1]) if model else []
        key = str(err["loc"][-1])
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        if close:
            return f"unknown key; did you mean `{close[0]}`?"
        return f"unknown key; valid keys: {', '.join(valid)}" if valid else "unknown key"
    msg = err["msg"]
    return msg.removeprefix("Value error, ")


def _keys_at(schema: dict, loc: tuple) -> list[str]:
    """The keys the JSON Schema ``schema`` allows in the mapping at ``loc``."""
    defs = schema.get("$defs", {})

    def resolve(node: dict) -> list[dict]:
        if "$ref" in node:
            return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
        if "anyOf" in node:
            return [n for branch in node["anyOf"] for n in resolve(branch)]
        return [node]

    nodes = resolve(schema)
    for part in loc:
        nxt: list[dict] = []
        for node in nodes:
            if isinstance(part, str) and part in defs:  # a union's branch, by model name
                nxt += resolve(defs[part]) if node.get("properties") is None else [node]
            elif isinstance(part, str) and part in node.get("properties", {}):
                nxt += resolve(node["properties"][part])
            elif isinstance(node.get("additionalProperties"), dict):
                nxt += resolve(node["additionalProperties"])
            elif isinstance(part, int) and "items" in node:
                nxt += resolve(node["items"])
        nodes = nxt
    return sorted({k for node in nodes for k in node.get("properties", {})})


MAX_PROBLEMS = 20  # lines of one file's errors


# How pydantic names the branch of a union in an error's location (not a key of the file).
_BRANCH = re.compile(r"(int|float|str|bool|none|(list|dict|tuple|set|literal)\[.*\]|"
                     r"function-.*|is-instance\[.*\])")


def _validation_error(path: str, exc: ValidationError, model: type[BaseModel]) -> SpecError:
    """Every problem pydantic found, one per line, unknown keys with the nearest valid one.
    A value that fits no branch of a union (``hidden: 0.5`` for ``int | list[int]``) is one
    problem naming what each branch expected; the branch a mapping did not take
    (``tracking: {...} | false``) is left out."""
    defs = set(model.model_json_schema().get("$defs", {}))
    errors = exc.errors()

    def branchless(loc: tuple) -> tuple:
        return tuple(p for p in loc if not (isinstance(p, str) and (
            p in defs or _BRANCH.fullmatch(p))))

    def mapping_branch_taken(e: dict) -> bool:  # a literal's error beside a model's
        if not any(isinstance(p, str) and p.startswith("literal[") for p in e["loc"]):
            return False
        where = branchless(e["loc"])
        return any(f is not e and branchless(f["loc"])[:len(where)] == where and
                   any(isinstance(p, str) and p in defs for p in f["loc"]) for f in errors)

    grouped: dict[str, list[str]] = {}
    for e in errors:
        if not mapping_branch_taken(e):
            grouped.setdefault(_dotted(branchless(e["loc"])), []).append(
                _pydantic_message(e, model))
    problems = []
    for field, messages in grouped.items():
        messages = list(dict.fromkeys(messages))
        if len(messages) > 1 and all(m.startswith("Input should be ") for m in messages):
            messages = ["Input should be " + " or ".join(
                m.removeprefix("Input should be ") for m in messages)]
        problems += [(field, m) for m in messages]
    if len(problems) > MAX_PROBLEMS:
        problems = problems[:MAX_PROBLEMS - 1] + [
            ("", f"and {len(problems) - MAX_PROBLEMS + 1} more problems")]
    return SpecError(path, *problems[0], more=problems[1:])


def _attributed(exc: SpecError, overrides: list[str]) -> SpecError:
    """``exc`` with each problem that a ``--set`` caused said to come from it (not the
    file)."""
    keys = {item.partition("=")[0]: item for item in overrides}

    def source(field: str) -> str:
        for key, item in keys.items():
            if field == key or field.startswith(key + ".") or key.startswith(field + "."):
                shown = item if item.isprintable() else repr(item)
                return f" (from --set {_short(shown)})"
        return ""

    problems = [(f, m + source(f)) for f, m in exc.problems]
    if not any(source(f) for f, _ in exc.problems):
        return exc
    return SpecError(exc.path, *problems[0], more=problems[1:])


def register_urls(raw: Any) -> None:
    """Remember the passwords of a raw study's URLs (storage, tracking.uri) before anything
    can echo them: every message is then free of them, however odd their characters."""
    if not isinstance(raw, dict):
        return
    register_secret_url(raw.get("storage"))
    tracking = raw.get("tracking")
    if isinstance(tracking, dict):
        register_secret_url(tracking.get("uri"))


def apply_overrides(raw: dict, overrides: list[str], path: str) -> dict:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML scalars) to ``raw``."""
    for item in overrides:
        register_secret_url(item.partition("=")[2].strip())
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise SpecError(path, "--set", f"expected dotted.key=value, got {item!r}")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None or child is False:  # e.g. `tracking: false` then tracking.uri=…
                child = node[part] = {}
            if not isinstance(child, dict):
                raise SpecError(path, key, f"cannot set inside {part!r}: it is not a mapping")
            node = child
        try:
            node[parts[-1]] = parse_yaml(value, f"--set {_short(key)}") if value else None
        except SpecError:
            node[parts[-1]] = value
    return raw


# A study file is a page of YAML: anything much larger is not one, and YAML's aliases can
# make a small file expand without bound, so both sizes are capped before anything is built.
MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_NODES = 100_000
MAX_STRING = 1000


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key given twice in one mapping (YAML says keys
    are unique; PyYAML would keep the last silently). Merge keys (``<<``) may still be
    overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or \
                    key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {_short(key_node.value)!r} given twice in one mapping",
                    key_node.start_mark)
            seen.add(key_node.value)
        return super().construct_mapping(node, deep)


# YAML 1.2 reads 1e-3 as a number; PyYAML (YAML 1.1) would read it as a string.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"""),
    list("-+0123456789"))


def _short(text: str, limit: int = 60) -> str:
    """``text`` cut to ``limit`` characters for an error message."""
    return text if len(text) <= limit else text[:limit] + "…"


def _expanded_size(node: yaml.Node) -> int:
    """How many values ``node`` holds once every alias is expanded (capped just above
    MAX_SPEC_NODES): aliases share nodes, so sizes are memoised per node."""
    sizes: dict[int, int] = {}

    def size(n: yaml.Node, depth: int) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if depth > 100:
            return MAX_SPEC_NODES + 1
        sizes[id(n)] = MAX_SPEC_NODES + 1  # a node that contains itself is too large
        total = 1
        if isinstance(n, yaml.SequenceNode):
            children = n.value
        elif isinstance(n, yaml.MappingNode):
            children = [c for pair in n.value for c in pair]
        else:
            children = []
        for child in children:
            total = min(total + size(child, depth + 1), MAX_SPEC_NODES + 1)
        sizes[id(n)] = total
        return total

    return size(node, 0)


def parse_yaml(text: str, p: str) -> Any:
    """The YAML document in ``text`` (from file ``p``), bounded in size and alias expansion,
    duplicate keys refused; every failure is a SpecError."""
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(p, "", f"{len(text)} characters; a study file is at most "
                        f"{MAX_SPEC_BYTES} (is this the right file?)")
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is not None and _expanded_size(node) > MAX_SPEC_NODES:
                raise SpecError(p, "", f"its aliases expand to more than {MAX_SPEC_NODES} "
                                "values; a study file needs far fewer")
            return None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SpecError(p, "", f"invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    except RecursionError:
        raise SpecError(p, "", "invalid YAML: nested too deeply") from None


def check_values(raw: Any, p: str, where: tuple = ()) -> None:
    """Every number in a study mapping is finite and of a sane size, every string (and key)
    at most MAX_STRING characters; SpecError names the first field that is not."""
    field = ".".join(str(k) for k in where)
    if isinstance(raw, dict):
        for key, value in raw.items():
            if isinstance(key, str) and len(key) > MAX_STRING:
                raise SpecError(p, field, f"a key of {len(key)} characters; at most "
                                f"{MAX_STRING}")
            check_values(value, p, (*where, key))
    elif isinstance(raw, list):
        for i, value in enumerate(raw):
            check_values(value, p, (*where, i))
    elif isinstance(raw, bool):
        return
    elif isinstance(raw, float) and not math.isfinite(raw):
        raise SpecError(p, field, f"expected a finite number, got {raw}")
    elif isinstance(raw, (int, float)) and abs(raw) > 2**63:
        raise SpecError(p, field, f"expected a number below 2**63 in size, got "
                        f"{_short(str(raw), 30)}")
    elif isinstance(raw, str) and len(raw) > MAX_STRING:
        raise SpecError(p, field, f"a value of {len(raw)} characters; at most {MAX_STRING}")


def read_yaml(path: str | Path) -> dict:
    """The YAML mapping in ``path``; SpecError for a missing, unreadable or invalid file."""
    p = str(path)
    try:
        if Path(path).stat().st_size > MAX_SPEC_BYTES:
            raise SpecError(p, "", f"{Path(path).stat().st_size} bytes; a study file is at "
                            f"most {MAX_SPEC_BYTES} (is this the right file?)")
        text = Path(path).read_text()
    except FileNotFoundError:
        raise SpecError(p, "", "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(p, "", f"cannot read file ({exc.__class__.__name__})") from None
    raw = parse_yaml(text, p)
    register_urls(raw)
    if raw is None:
        raise SpecError(p, "", "empty file; expected a study mapping with name, target, ...")
    if not isinstance(raw, dict):
        raise SpecError(p, "", f"expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def validate_spec(raw: dict, path: str = "<spec>") -> StudySpec:
    """Validate a raw mapping into a StudySpec; every failure is a SpecError."""
    if not isinstance(raw, dict):
        raise SpecError(path, "", "expected a mapping at the top level")
    register_urls(raw)
    check_values(raw, path)
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as exc:
        raise _validation_error(path, exc, StudySpec) from None
    except (TypeError, ValueError, RecursionError) as exc:
        raise SpecError(path, "", f"invalid study: {exc}") from None
    _check_semantics(spec, path)
    return spec


def is_compare(raw: dict) -> bool:
    """Is this YAML mapping a comparison (arms over targets) rather than a study?"""
    return "arms" in raw or "targets" in raw


def load_spec(path: str | Path, overrides: list[str] | None = None) -> StudySpec:
    """Read, override and validate a study file."""
    raw = read_yaml(path)
    if is_compare(raw):
        raise SpecError(str(path), "", "this is a comparison (it has arms and targets); "
                        f"run it with `ganbench compare {path}`")
    try:
        return validate_spec(apply_overrides(raw, overrides or [], str(path)), str(path))
    except SpecError as exc:
        raise _attributed(exc, overrides or []) from None


def load_any(path: str | Path, overrides: list[str] | None = None
             ) -> "StudySpec | CompareSpec":
    """A study or a comparison file, whichever ``path`` holds."""
    if is_compare(read_yaml(path)):
        return load_compare(path, overrides)
    return load_spec(path, overrides)


def _check_semantics(spec: StudySpec, path: str) -> None:
    """Checks that need the registries: names, ranges against the trainer, the sampler."""
    from ganbench.targets import get_target  # loads torch: after the cheap checks

    try:
        target = get_target(spec.target.name, **spec.target.params())
    except GanbenchError as exc:
        field = exc.field if (exc.field or "").startswith("target.") else "target"
        raise SpecError(path, field, str(exc)) from None
    for key in spec.search:
        if key.startswith("tricks."):
            _check_trick_key(key, path)
            continue
        if key not in SEARCHABLE:
            raise SpecError(path, f"search.{key}",
                            f"not a searchable field; choose from: {', '.join(SEARCHABLE)}")
        for section, fields in (("train", TRAIN_FIELDS), ("model", MODEL_FIELDS)):
            if key in fields and getattr(getattr(spec, section), key) is not None:
                raise SpecError(path, f"search.{key}", f"also fixed in {section}.{key}; "
                                "fix it or search it, not both")
    # The fixed values, then each search dimension at its extremes, must make a valid trainer.
    try:
        spec.trial_config({}).validate()
    except GanbenchError as exc:
        section = "train" if exc.field in TRAIN_FIELDS else \
            "target" if exc.field == "pool" else "model"
        raise SpecError(path, f"{section}.{exc.field}", str(exc)) from None
    except TypeError as exc:
        raise SpecError(path, "model", str(exc)) from None
    for key, dist in spec.search.items():
        for value in dist.ends():
            try:
                spec.trial_config({key: value}).validate()
            except (GanbenchError, TypeError) as exc:
                raise SpecError(path, f"search.{key}", f"value {value!r}: {exc}") from None
    for i, objective in enumerate(spec.objectives):
        if METRICS[objective.metric].needs_centers and target.centers is None:
            raise SpecError(path, f"objectives.{i}.metric", f"{objective.metric!r} needs a "
                            f"target with modes; {spec.target.name!r} has none (use w1)")
    if spec.sampler.name == "grid":
        for key, dist in spec.search.items():
            if dist.values() is None:
                raise SpecError(path, f"search.{key}", "the grid sampler needs categorical, "
                                "int or stepped float ranges, not a continuous range")
    if spec.storage is not None and not STORAGE_URL.match(spec.storage):
        raise SpecError(path, "storage", f"expected sqlite:///PATH or "
                        f"postgresql://USER[:PASSWORD]@HOST[:PORT]/DB, got "
                        f"{redact(spec.storage)!r}")


def _check_trick_key(key: str, path: str) -> None:
    from ganbench.tricks import TRICKS

    parts = key.split(".")
    if len(parts) != 3 or parts[1] not in TRICKS or parts[2] not in TRICKS[parts[1]].params:
        choices = ", ".join(f"tricks.{n}.{p}" for n, c in TRICKS.items() for p in c.params)
        raise SpecError(path, f"search.{key}", f"not a trick parameter; choose from: {choices}")


def logged(spec: "StudySpec | CompareSpec") -> dict[str, Any]:
    """The spec as it is logged and shown (MLflow params): URLs without their passwords."""
    data = spec.model_dump(exclude_none=True, mode="json")
    if "storage" in data:
        data["storage"] = redact(data["storage"])
    if isinstance(data.get("tracking"), dict) and "uri" in data["tracking"]:
        data["tracking"]["uri"] = redact(data["tracking"]["uri"])
    return data


# ---------------------------------------------------------------- comparisons
# `ganbench compare --quick`: the same pipeline at smoke size.
QUICK = ["budget=2", "eval_seeds=2", "train.steps=200", "train.eval_every=100",
         "train.eval_samples=500"]
_ArmFields = _section("_ArmFields", MODEL_FIELDS + TRAIN_FIELDS)


class ArmSection(_ArmFields):
    """An arm: the loss, tricks and trainer values it fixes; ``from: <arm>`` makes it a
    matched arm, which does not tune but retrains, replicate by replicate, exactly the
    parameters its source arm selected on the same held-out seeds, so that only the values
    it names differ."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)
    source: str | None = Field(None, alias="from")  # a matched arm's source arm

    def fixed(self) -> dict[str, Any]:
        """The trainer values the arm fixes."""
        return {k: v for k, v in self.model_dump(exclude={"source"}).items() if v is not None}


class Correction(BaseModel):
    """Multiple-testing correction of each family: ``confirmatory`` (the objective metric
    over every contrast and target, one family) and ``exploratory`` (every other metric,
    one family)."""

    model_config = _STRICT
    confirmatory: Literal["holm", "bonferroni", "bh", "none"] = "holm"  # the objective's
    exploratory: Literal["holm", "bonferroni", "bh", "none"] = "bh"     # every other metric


# Default start-up trials of Optuna's model-based samplers (random draws before the model).
SAMPLER_STARTUP = {"tpe": 10, "gp": 10, "cmaes": 1}


def quick_overrides(path: str | Path) -> list[str]:
    """The overrides of ``--quick``: QUICK, two tuning replicates where the file has more,
    and the name ``<name>-quick``."""
    raw = read_yaml(path)
    replicates = raw.get("tuning_replicates")
    fewer = ["tuning_replicates=2"] if isinstance(replicates, int) and replicates > 2 else []
    return QUICK + fewer + [f"name={raw.get('name', 'compare')}-quick"]


class CompareSpec(BaseModel):
    """A budget-fair comparison of arms (loss + tricks + fixed values) over held-out seeds."""

    model_config = _STRICT
    name: str                              # the comparison's name: its studies and report
    targets: list[TargetSpec] = Field(min_length=1)  # each arm runs on each target
    train: TrainSection = Field(default_factory=TrainSection)  # trainer values of every arm
    model: ModelSection = Field(default_factory=ModelSection)  # network values of every arm
    search: dict[str, Distribution] = Field(default_factory=dict)  # what each arm tunes
    arms: dict[str, ArmSection] = Field(min_length=1)  # arm name → what it fixes
    baseline: str                          # the arm the others are tested against
    mode: Literal["tune", "fixed"] = "tune"  # tune every arm, or train the fixed values
    # Tuning per arm and target, the same for every arm: trials (an int) or compute.
    budget: Budget = Field(default_factory=lambda: Budget(trials=8))
    # Retrains of each arm's best config on held-out seeds. 10 lets a consistent difference
    # reach p < 0.05 after Holm over up to 1,700 arms; 5 seeds cannot with 7 arms.
    eval_seeds: int = Field(10, ge=2, le=1000)  # per tuning replicate
    # The evaluation sample (reference points, generator noise, projections) of held-out
    # runs: not the one the tuning chose the best configuration on.
    heldout_eval_seed: int = 4321
    objective: Objective = Field(default_factory=lambda: Objective(metric="w1"))  # tuned, tested
    # Each arm and target samples with its own seed, derived from sampler.seed.
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)  # how tuning trials stop early
    # Trials of an arm asked together, trained side by side and told before the next are
    # asked; default: 1 (a sequential search; the arms run side by side instead), or as many
    # trials as fill a population. What an arm tries depends on this, never on the number
    # of workers.
    tuning_batch: int | None = Field(None, gt=0)
    storage: str | None = None             # sqlite:/// or postgresql:// (default: journals)
    tracking: TrackingSpec | Literal[False] = Field(default_factory=TrackingSpec)  # MLflow
    workers: int | None = Field(None, gt=0)  # default: one per GPU, or per CPU core
    # Of the tuning trials; held-out runs are populations anyway, compiled if compile is set.
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec)
    heartbeat: HeartbeatSpec = Field(default_factory=HeartbeatSpec)  # database storages
    # Independent tunings of every arm on every target, each with its own sampler seed and
    # its own held-out seeds: the unit the tests compare when there are two or more.
    tuning_replicates: int = Field(1, ge=1, le=100)
    # The tests, as [arm, reference arm] pairs; default: every arm against the baseline, a
    # matched (from:) arm against its source.
    contrasts: list[Annotated[list[str], Field(min_length=2, max_length=2)]] | None = None
    correction: Correction = Field(default_factory=Correction)  # of each family of tests

    def arm_study(self, target: TargetSpec, arm: str, replicate: int = 0) -> StudySpec:
        """The Optuna study that tunes one arm on one target in one tuning replicate (the
        arm's fixed values win over the shared search space); a matched arm's study does
        not search."""
        fixed = self.arms[arm].fixed()
        train = self.train.model_dump(exclude_none=True) | {
            k: v for k, v in fixed.items() if k in TRAIN_FIELDS}
        model = self.model.model_dump(exclude_none=True) | {
            k: v for k, v in fixed.items() if k in MODEL_FIELDS}
        search = {k: d for k, d in self.search.items()
                  if k not in fixed and not (k.startswith("tricks.")
                                              and k.split(".")[1] not in model.get("tricks", {}))}
        budget = self.budget
        trials, compute = budget.trials or COMPUTE_TRIALS_CAP, (
            None if budget.unit == "trials" else budget)
        if self.mode == "fixed" or self.arms[arm].source:
            trials, compute = 1, None
        suffix = f"__r{replicate}" if replicate else ""
        return StudySpec(
            name=f"{self.name}__{target.name}__{arm}{suffix}", target=target, train=train,
            model=model, search=search if self.tuned(arm) else {},
            objectives=[self.objective], sampler=self.arm_sampler(target, arm, replicate),
            pruner=self.pruner,
            trials=trials, budget=compute, storage=self.storage,
            tracking=self.tracking, workers=self.workers, execution=self.execution,
            heartbeat=self.heartbeat)

    @property
    def batch(self) -> int:
        """Tuning trials an arm asks at a time (``tuning_batch`` or its default)."""
        if self.tuning_batch is not None:
            return self.tuning_batch
        return self.execution.size if self.execution.mode == "population" else 1

    def arm_sampler(self, target: TargetSpec, arm: str, replicate: int = 0) -> SamplerSpec:
        """The arm's sampler on ``target`` in ``replicate``: the spec's, seeded for this
        arm, target and replicate (no two draw the same candidates; each draws the same on
        every machine)."""
        if self.sampler.seed is None:
            return self.sampler
        parts = (target.name, arm) + ((replicate,) if replicate else ())
        return self.sampler.model_copy(update={
            "seed": derive_seed(self.sampler.seed, *parts)})

    def tuned(self, arm: str) -> bool:
        """Does ``arm`` tune (mode: tune, and not a matched arm)?"""
        return self.mode == "tune" and not self.arms[arm].source

    @property
    def replicates(self) -> list[int]:
        return list(range(self.tuning_replicates))

    def tests(self) -> list[tuple[str, str]]:
        """The contrasts tested, as (arm, reference arm)."""
        if self.contrasts is not None:
            return [tuple(c) for c in self.contrasts]
        return [(arm, a.source or self.baseline) for arm, a in self.arms.items()
                if arm != self.baseline]

    def matched(self, arm: str, reference: str) -> bool:
        """Is the contrast matched: ``arm`` retrains ``reference``'s selected parameters on
        the same held-out seeds (so runs pair up seed by seed)?"""
        return self.arms[arm].source == reference

    def startup(self) -> int | None:
        """Start-up trials of the sampler before its model is used (None: not model-based,
        e.g. random or QMC search)."""
        default = SAMPLER_STARTUP.get(self.sampler.name)
        if default is None:
            return None
        return int((self.sampler.model_extra or {}).get("n_startup_trials", default))

    _name = field_validator("name", mode="before")(check_name)

    @field_validator("budget", mode="before")
    @classmethod
    def _trials(cls, value: Any) -> Any:
        # A plain number counts trials: `budget: 3` is `budget: {trials: 3}`.
        if isinstance(value, int) and not isinstance(value, bool):
            return {"trials": value}
        if not isinstance(value, (dict, Budget)):
            raise ValueError(BUDGET_FORMS)
        return value


def load_compare(path: str | Path, overrides: list[str] | None = None) -> CompareSpec:
    """Read, override and validate a comparison file; every arm × target study is checked."""
    try:
        return _load_compare(path, overrides)
    except SpecError as exc:
        raise _attributed(exc, overrides or []) from None


def _load_compare(path: str | Path, overrides: list[str] | None) -> CompareSpec:
    raw = read_yaml(path)
    p = str(path)
    if not is_compare(raw):
        raise SpecError(p, "", "this is a study (it has no arms); run it with "
                        f"`ganbench sweep {path}`")
    raw = apply_overrides(raw, overrides or [], p)
    register_urls(raw)  # as overridden (read_yaml registered the file's)
    check_values(raw, p)
    try:
        spec = CompareSpec.model_validate(raw)
    except ValidationError as exc:
        raise _validation_error(p, exc, CompareSpec) from None
    for arm in spec.arms:  # arm names become study, run and file names
        if not (NAME.fullmatch(arm) and len(arm) <= MAX_NAME):
            raise SpecError(p, f"arms.{_short(arm)!r}", f"an arm name is {NAME_RULE}, at "
                            f"most {MAX_NAME} characters")
    names = [target.name for target in spec.targets]
    for i, name in enumerate(names):
        if not (NAME.fullmatch(name) and len(name) <= MAX_NAME):
            raise SpecError(p, f"targets.{i}.name", f"bad target name {_short(name)!r}")
        if name in names[:i]:
            raise SpecError(p, f"targets.{i}", f"target {name!r} is listed twice (each "
                            "target is one study per arm: list it once)")
    if spec.baseline not in spec.arms:
        raise SpecError(p, "baseline", f"no arm named {spec.baseline!r}; arms: "
                        f"{', '.join(spec.arms)}")
    for arm, section in spec.arms.items():
        if section.source is not None and (section.source not in spec.arms
                                           or section.source == arm
                                           or spec.arms[section.source].source):
            raise SpecError(p, f"arms.{arm}.from", "expected another arm that tunes; arms: "
                            f"{', '.join(a for a, s in spec.arms.items() if not s.source)}")
    for i, pair in enumerate(spec.tests()):
        bad = [a for a in pair if a not in spec.arms]
        if bad or pair[0] == pair[1]:
            raise SpecError(p, f"contrasts.{i}", f"expected [arm, reference arm], two "
                            f"different arms of {', '.join(spec.arms)}; got {list(pair)}")
    for arm in spec.arms:
        for target in spec.targets:
            try:
                validate_spec(spec.arm_study(target, arm).model_dump(exclude_none=True), p)
            except SpecError as exc:
                field = exc.field
                if field.startswith(("model.", "train.")):
                    field = f"arms.{arm}.{field.split('.', 1)[1]}"
                raise SpecError(p, field, exc.message) from None
    for arm in spec.arms:
        for target in spec.targets:
            if spec.arm_study(target, arm).trial_config({}).eval_seed == spec.heldout_eval_seed:
                raise SpecError(p, "heldout_eval_seed", f"equals the tuning eval_seed of arm "
                                f"{arm!r}: held-out runs need their own evaluation sample")
    return spec
