"""MLflow logging: a parent run per study, a child run per trial. The only module that
imports mlflow.

Workers are processes: child runs are created with an explicit parent run id through
``MlflowClient`` (never the per-thread active-run stack), metrics go in batches, and a
failure to log never stops training: it is reported once per trial.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ganbench.config import MODEL_FIELDS, TRAIN_FIELDS
from ganbench.errors import GanbenchError

DEFAULT_URI = "sqlite:///mlflow.db"
FLUSH_SECONDS = 30.0  # curves of a running trial reach MLflow at least this often

# MLflow's settings ganbench uses unless the user set them: applied when ganbench first
# talks to MLflow (not at import), to this process's environment, where MLflow reads them.
MLFLOW_DEFAULTS = {
    # A tracking server that went away must not stall training in long retry loops.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    # MLflow prints "View run … at <tracking URL>" whenever a run ends: it breaks the
    # progress display, and would print the credentials of a tracking URL that has them.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # one-line output
}


def _client(uri: str):
    """An MlflowClient whose library logs are kept out of our output: its INFO lines
    (database migrations) and the tracebacks it logs for a failed call (a full disk: eight
    of them), which ganbench reports itself, in one line per event. The levels are set
    after the import because importing mlflow configures its loggers."""
    for key, value in MLFLOW_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from mlflow.tracking import MlflowClient

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return MlflowClient(tracking_uri=uri)


STUDY_TAG = "ganbench.study"
GENERATOR_ARTIFACT = "generator.pt"  # a trial's final generator, as train.save_checkpoint
# MLflow's UI opens an experiment by its kind: without this tag, MLflow 3 opens a new one in
# its GenAI view (traces), where runs are hidden behind a toggle.
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
ROLE_TAG = "ganbench.role"


def resolve_uri(spec_uri: str | None) -> str:
    """spec / --tracking-uri, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here."""
    from ganbench.errors import register_secret, register_secret_url

    uri = spec_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    register_secret_url(uri)
    register_secret(os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
    return uri


# MLflow 3's UI opens an experiment in the view its browser last used (GenAI by default,
# kept in local storage as ``mlflow.workflowType``) unless the URL names one: this query
# parameter opens the runs table, in any browser.
UI_RUNS = "#/experiments/{id}/runs?workflowType=machine_learning"
UI_DEFAULT = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store


def runs_url(uri: str, experiment: str) -> tuple[str, str | None] | None:
    """Where experiment ``experiment``'s runs open in MLflow's UI, and the command that
    serves a local store there (None for a server); None if the experiment does not
    exist."""
    from ganbench.errors import split_credentials

    try:
        exp = _client(uri).get_experiment_by_name(experiment)
    except Exception:  # the link is a convenience: never fail a finished run over it
        return None
    if exp is None:
        return None
    path = UI_RUNS.format(id=exp.experiment_id)
    if uri.startswith(("http://", "https://")):
        _, password, rest = split_credentials(uri)  # a link never carries a password
        base = uri if password is None else f"{uri.split('://', 1)[0]}://{rest}"
        return f"{base.rstrip('/')}/{path}", None
    return f"{UI_DEFAULT}/{path}", f"mlflow ui --backend-store-uri {uri}"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """An HTTP tracking server must answer its health endpoint (through ``requests``, the
    client MLflow uses: user info in the URI, or MLFLOW_TRACKING_USERNAME / PASSWORD, are
    sent as basic auth); a local sqlite store is created once, under a lock. One-line error
    otherwise."""
    if uri.startswith(("http://", "https://")):
        import requests

        env = (os.environ.get("MLFLOW_TRACKING_USERNAME"),
               os.environ.get("MLFLOW_TRACKING_PASSWORD"))
        try:
            resp = requests.get(uri.rstrip("/") + "/health", timeout=timeout,
                                auth=env if all(env) else None)
            if resp.status_code != 200:
                raise OSError(f"HTTP {resp.status_code}")
        except (OSError, ValueError, requests.RequestException) as exc:
            reason = type(exc).__name__ if isinstance(exc, requests.RequestException) else exc
            raise GanbenchError(f"tracking server {uri} is unreachable: {reason}") from None
    elif uri.startswith("sqlite:///"):
        create_sqlite_store(uri)
    elif not uri.startswith(("file:", "postgresql", "mysql")) and "://" in uri:
        raise GanbenchError(f"tracking uri {uri!r}: expected http(s)://, sqlite:///, file: "
                            "or a database URL")


@contextlib.contextmanager
def store_lock(uri: str):
    """Held while a local sqlite tracking store is created or a study's experiment and
    parent run are found or created, so sweeps started together in a fresh folder neither
    race through MLflow's schema creation (which fails for all but one) nor make two
    experiments or parent runs. A tracking server or database needs no lock here."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import hashlib

    from ganbench.files import file_lock

    path = Path(uri.removeprefix("sqlite:///")).resolve()
    key = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    with file_lock(Path(tempfile.gettempdir()) / f"ganbench-mlflow-{key}.lock"):
        yield


def create_sqlite_store(uri: str) -> None:
    """Create (or migrate) the sqlite tracking store at ``uri`` under ``store_lock``."""
    with store_lock(uri):
        _client(uri).search_experiments(max_results=1)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr_g": 1e-3}} → {"train.lr_g": 1e-3}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out |= flatten(value, name + ".")
        else:
            out[name] = value
    return out


@dataclass
class TrackingHandle:
    """Picklable: what a worker process needs to log into the study's parent run."""

    uri: str
    experiment_id: str
    parent_run_id: str


class Tracker:
    """Logs one study; create it in the coordinating process with :meth:`for_study`."""

    def __init__(self, handle: TrackingHandle) -> None:
        self.handle = handle
        self.client = _client(handle.uri)

    # ---- study level (coordinator) ----
    @classmethod
    def for_study(cls, spec, raw_spec: dict, storage_label: str) -> "Tracker":
        """Find or create the study's parent run (resumed sweeps reuse it)."""
        tags = {"storage": storage_label, "sampler": spec.sampler.name,
                "pruner": spec.pruner.name, "target": spec.target.name,
                "objectives": ",".join(f"{o.metric}:{o.direction}" for o in spec.objectives)}
        return cls._root(spec, "study", tags, raw_spec)

    @classmethod
    def for_compare(cls, spec, raw_spec: dict) -> "Tracker":
        """Find or create a comparison's parent run."""
        tags = {"baseline": spec.baseline, "mode": spec.mode, "budget": spec.budget.label(),
                "targets": ",".join(t.name for t in spec.targets)}
        return cls._root(spec, "compare", tags, raw_spec)

    @classmethod
    def _root(cls, spec, role: str, tags: dict[str, str], raw_spec: dict) -> "Tracker":
        uri = resolve_uri(spec.tracking.uri if spec.tracking else None)
        check_reachable(uri)
        client = _client(uri)
        try:
            with store_lock(uri):
                exp = client.get_experiment_by_name(spec.name)
                exp_id = exp.experiment_id if exp else client.create_experiment(
                    spec.name, tags={EXPERIMENT_KIND: MODEL_TRAINING})
                if exp is not None and exp.tags.get(EXPERIMENT_KIND) != MODEL_TRAINING:
                    client.set_experiment_tag(exp_id, EXPERIMENT_KIND, MODEL_TRAINING)
                run_id = _find_or_create(client, exp_id, spec.name, {
                    ROLE_TAG: role, STUDY_TAG: spec.name} | tags, raw_spec)
        except GanbenchError:
            raise
        except Exception as exc:
            raise GanbenchError(f"tracking {uri}: {_one_line(exc)}") from None
        return cls(TrackingHandle(uri, exp_id, run_id))

    def nested(self, name: str, tags: dict[str, str], params: dict | None = None
               ) -> "Tracker":
        """A tracker whose runs nest under a (found or new) child run of this one."""
        run_id = _find_or_create(self.client, self.handle.experiment_id, name, tags | {
            "mlflow.parentRunId": self.handle.parent_run_id}, params or {})
        return Tracker(TrackingHandle(self.handle.uri, self.handle.experiment_id, run_id))

    def log_eval_seed(self, target: str, arm: str, seed: int, params: dict, out: dict,
                      study_spec, checkpoint: str | None = None) -> None:
        """One held-out evaluation run (nested under the arm's run), with its final
        generator when it has one."""
        try:
            from mlflow.entities import RunTag

            run = self.client.create_run(self.handle.experiment_id,
                                         run_name=f"{target}__{arm}__s{seed}", tags={
                "mlflow.parentRunId": self.handle.parent_run_id, ROLE_TAG: "eval",
                "target": target, "arm": arm, "seed": str(seed), "state": out["status"]})
            config = study_spec.trial_config(params, seed=seed)
            flat = _config_params(config) | {"seed": seed}
            _log_batch(self.client, run.info.run_id,
                       params={k: _param(v) for k, v in flat.items()},
                       metrics={k: v for k, v in out.items() if isinstance(v, float)})
            if out.get("reason"):
                self.client.log_batch(run.info.run_id, tags=[RunTag("reason", out["reason"])])
            if checkpoint:
                with tempfile.TemporaryDirectory() as tmp:
                    shutil.copyfile(checkpoint, Path(tmp) / GENERATOR_ARTIFACT)
                    self.client.log_artifacts(run.info.run_id, tmp)
            self.client.set_terminated(run.info.run_id,
                                       "FINISHED" if out["status"] == "completed" else "FAILED")
        except Exception as exc:
            print(f"warning: tracking: eval run {target}/{arm}/seed {seed}: {_one_line(exc)}",
                  file=sys.stderr)

    @classmethod
    def attach(cls, handle: TrackingHandle) -> "Tracker":
        """The tracker of a worker process; loads the plotting stack up front (about a
        second, once per worker) rather than inside the first trial."""
        import ganbench.report  # noqa: F401

        return cls(handle)

    def finish(self, study) -> None:
        """Log the best trial's metrics on the parent run and end it."""
        try:
            complete = [t for t in study.get_trials(deepcopy=False)
                        if t.state.name == "COMPLETE"]
            metrics: dict[str, float] = {"trials_complete": float(len(complete))}
            tags = {}
            if complete and len(study.directions) == 1:
                best = study.best_trial
                metrics |= {f"best.{k}": float(v) for k, v in
                            best.user_attrs.get("metrics", {}).items()}
                tags["best_trial"] = str(best.number)
        except Exception as exc:  # never lose a sweep's results over logging
            print(f"warning: tracking: could not finish the study run: {_one_line(exc)}",
                  file=sys.stderr)
            return
        self.end("FINISHED", metrics, tags)

    def register_generator(self, name: str, generator, example, value: float,
                           direction: str, tags: dict[str, str]) -> str:
        """Log ``generator`` (a torch module) with MLflow's PyTorch flavour under this
        tracker's run and register it as model ``name``, unless the model's latest version
        scores at least as well (its ``objective`` tag, in ``direction``). Returns a line
        saying which. The ganbench package travels with the model (``code_paths``), so
        ``mlflow.pytorch.load_model("models:/<name>/latest")`` needs no install of it."""
        import mlflow
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        versions = self.client.search_model_versions(f"name='{name}'")
        latest = max(versions, key=lambda v: int(v.version)) if versions else None
        if latest is not None and "objective" in latest.tags:
            previous = float(latest.tags["objective"])
            better = value < previous if direction == "minimize" else value > previous
            if not better:
                return (f"model {name}: version {latest.version} stays ({previous:.4g}; this "
                        f"sweep's best is {value:.4g})")
        import ganbench

        mlflow.set_tracking_uri(self.handle.uri)
        with torch.no_grad():
            output = generator(example).numpy()
        with mlflow.start_run(run_id=self.handle.parent_run_id):
            info = mlflow.pytorch.log_model(
                generator, name="generator", input_example=example.numpy(),
                signature=infer_signature(example.numpy(), output),
                code_paths=[str(Path(ganbench.__file__).parent)],
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
        with contextlib.redirect_stderr(io.StringIO()):  # MLflow's "Created version" lines
            version = mlflow.register_model(info.model_uri, name, tags={
                "objective": repr(value), "direction": direction} | tags)
        return f"model {name}: registered version {version.version} ({value:.4g})"

    def end(self, status: str = "FINISHED", metrics: dict[str, float] | None = None,
            tags: dict[str, str] | None = None) -> None:
        """End this tracker's own run (a comparison's or an arm's) with final metrics."""
        try:
            if metrics or tags:
                from mlflow.entities import RunTag

                _log_batch(self.client, self.handle.parent_run_id, metrics=metrics or {})
                if tags:
                    self.client.log_batch(self.handle.parent_run_id,
                                          tags=[RunTag(k, v) for k, v in tags.items()])
            self.client.set_terminated(self.handle.parent_run_id, status)
        except Exception as exc:
            print(f"warning: tracking: could not end run: {_one_line(exc)}", file=sys.stderr)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Tag this tracker's own run (e.g. with its provenance); a failure is a warning."""
        try:
            from mlflow.entities import RunTag

            self.client.log_batch(self.handle.parent_run_id,
                                  tags=[RunTag(k, v[:5000]) for k, v in tags.items()])
        except Exception as exc:
            print(f"warning: tracking: could not tag run: {_one_line(exc)}", file=sys.stderr)

    def end_lost(self, trial, reason: str) -> None:
        """Close the MLflow run of a trial whose worker died (it was left RUNNING)."""
        run_id = trial.user_attrs.get("mlflow_run_id")
        if not run_id:
            return
        try:
            self.client.set_tag(run_id, "state", "FAIL")
            self.client.set_tag(run_id, "fail_reason", reason)
            self.client.set_terminated(run_id, "KILLED")
        except Exception as exc:
            print(f"warning: tracking: could not close run of trial {trial.number}: "
                  f"{_one_line(exc)}", file=sys.stderr)

    def close_orphans(self, study) -> int:
        """End child runs left RUNNING whose Optuna trial is not running any more (a worker
        killed or interrupted between creating the run and recording it in Optuna)."""
        try:
            running = {str(t.number) for t in study.get_trials(deepcopy=False)
                       if t.state.name == "RUNNING"}
            runs = self.client.search_runs(
                [self.handle.experiment_id],
                filter_string=f"tags.`mlflow.parentRunId` = '{self.handle.parent_run_id}' "
                              "and attributes.status = 'RUNNING'")
            closed = 0
            for run in runs:
                if run.data.tags.get("trial_number") not in running:
                    self.client.set_tag(run.info.run_id, "state", "FAIL")
                    self.client.set_terminated(run.info.run_id, "KILLED")
                    closed += 1
            return closed
        except Exception as exc:
            print(f"warning: tracking: could not close orphaned runs: {_one_line(exc)}",
                  file=sys.stderr)
            return 0

    # ---- trial level (workers) ----
    def start_trial(self, trial, spec, params: dict[str, Any]) -> "TrialRun":
        return TrialRun(self, trial, spec, params)


class TrialRun:
    """One child run; every method swallows logging errors after one warning."""

    def __init__(self, tracker: Tracker, trial, spec, params: dict[str, Any]) -> None:
        self.client, self.handle = tracker.client, tracker.handle
        self.trial_number = trial.number
        self.run_id: str | None = None
        self.warned = False
        self.pending: list[tuple[str, float, int, int]] = []
        self.flushed = time.time()
        config = spec.trial_config(params)
        self.config = config
        name = f"{spec.target.name}__{config.loss}__t{trial.number}"
        dotted = flatten({"target": {"name": spec.target.name, "pool": spec.target.pool,
                                     **spec.target.params()}}) | \
            _config_params(config) | {"seeds": spec.seeds}

        def start() -> None:
            run = self.client.create_run(self.handle.experiment_id, run_name=name, tags={
                "mlflow.parentRunId": self.handle.parent_run_id, ROLE_TAG: "trial",
                STUDY_TAG: spec.name, "trial_number": str(trial.number), "state": "RUNNING",
            })
            self.run_id = run.info.run_id
            _log_batch(self.client, self.run_id,
                       params={k: _param(v) for k, v in dotted.items()})
            trial.set_user_attr("mlflow_run_id", self.run_id)

        self._safe(start)

    def log_eval(self, step: int, row: dict[str, float]) -> None:
        """Curves: losses and metrics of one evaluation. Buffered and sent in one batch at
        most every FLUSH_SECONDS (each request costs tens of ms on a sqlite store)."""
        now = int(time.time() * 1000)
        self.pending += [(k, float(v), now, step) for k, v in row.items() if k != "step"]
        if time.time() - self.flushed > FLUSH_SECONDS:
            self._safe(self._flush)

    def _flush(self) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(k, v, ts, step) for k, v, ts, step in self.pending if _finite(v)]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
        self.pending, self.flushed = [], time.time()

    def end(self, state, final: dict[str, float], reason: str, result=None,
            killed: bool = False, checkpoint: Path | None = None) -> None:
        """Final metrics, tags, samples PNG, config and generator artifacts, terminal
        status."""
        def finish() -> None:
            from mlflow.entities import RunTag

            step = result.steps if result is not None else 0
            now = int(time.time() * 1000)
            self.pending += [(k, float(v), now, step) for k, v in final.items()]
            tags = {"state": state.name}
            if reason:
                tags["fail_reason" if state.name == "FAIL" else "reason"] = reason
            if state.name == "PRUNED":
                tags["pruned"] = "true"
            if killed:
                tags["interrupted"] = "true"
            self._flush()
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "config.json").write_text(
                    json.dumps(self.config.to_dict(), indent=2, default=str))
                if result is not None and result.samples.numel():
                    from ganbench.report import save_samples_png
                    from ganbench.targets import get_target

                    tgt = get_target(self.config.target, **self.config.target_params)
                    save_samples_png(Path(tmp) / "samples.png", result.samples.numpy(),
                                     result.reference.numpy(),
                                     None if tgt.centers is None else tgt.centers.numpy(),
                                     f"trial {self.trial_number} · {state.name.lower()}")
                if checkpoint is not None:  # the final generator (ganbench sample reads it)
                    shutil.copyfile(checkpoint, Path(tmp) / GENERATOR_ARTIFACT)
                self.client.log_artifacts(self.run_id, tmp)
            status = {"COMPLETE": "FINISHED", "FAIL": "FAILED", "PRUNED": "KILLED"}[state.name]
            self.client.set_terminated(self.run_id, "KILLED" if killed else status)

        self._safe(finish)

    def _safe(self, fn) -> None:
        # After one failure the run is given up: no retry storms while training goes on.
        if self.warned or (self.run_id is None and fn.__name__ != "start"):
            return
        try:
            fn()
        except Exception as exc:
            if not self.warned:
                self.warned = True
                print(f"warning: tracking: trial {self.trial_number}: logging failed "
                      f"({_one_line(exc)}); training goes on", file=sys.stderr)


def download_generator(uri: str, run_id: str, dest: str | Path) -> Path:
    """The final generator logged with MLflow run ``run_id``, downloaded into ``dest``.
    GanbenchError (one line) for an unknown run or a run without one."""
    client = _client(uri)
    try:
        run = client.get_run(run_id)
    except Exception:
        raise GanbenchError(f"no MLflow run {run_id!r} at {uri}") from None
    names = {a.path for a in client.list_artifacts(run_id)}
    if GENERATOR_ARTIFACT not in names:
        state = run.data.tags.get("state", run.info.status)
        raise GanbenchError(f"MLflow run {run_id} has no generator (its trial is {state}: "
                            "only completed trials keep one)")
    return Path(client.download_artifacts(run_id, GENERATOR_ARTIFACT, str(dest)))


def _find_or_create(client, exp_id: str, name: str, tags: dict[str, str],
                    params: dict) -> str:
    """The run with these role/study/parent tags, or a new one holding ``params``."""
    keys = [k for k in (ROLE_TAG, STUDY_TAG, "mlflow.parentRunId", "arm", "target")
            if k in tags]
    query = " and ".join(f"tags.`{k}` = '{tags[k]}'" for k in keys)
    found = client.search_runs([exp_id], filter_string=query, max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(exp_id, run_name=name, tags=tags)
    _log_batch(client, run.info.run_id,
               params={k: _param(v) for k, v in flatten(params).items()})
    return run.info.run_id


def _config_params(config) -> dict[str, Any]:
    """A trainer config as MLflow params under their YAML names (train.lr_g, model.hidden)."""
    return flatten({"train": {k: getattr(config, k) for k in TRAIN_FIELDS},
                    "model": {k: getattr(config, k) for k in MODEL_FIELDS}})


def _finite(v: Any) -> bool:
    import math

    return isinstance(v, (int, float)) and math.isfinite(v)


def _param(v: Any) -> str:
    return str(v)[:6000]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _log_batch(client, run_id: str, params: dict | None = None, metrics: dict | None = None,
               step: int = 0) -> None:
    """One request per call: MLflow limits a batch to 100 params / 1000 metrics."""
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    p = [Param(k, v) for k, v in (params or {}).items()]
    m = [Metric(k, v, now, step) for k, v in (metrics or {}).items() if _finite(v)]
    for i in range(0, max(len(p), 1), 100):
        chunk = p[i:i + 100]
        if chunk or (i == 0 and m):
            client.log_batch(run_id, metrics=m if i == 0 else [], params=chunk)
