import socket
import subprocess

import optuna
import pytest
from optuna.trial import TrialState

from ganbench import trial as trial_mod
from ganbench import worker
from ganbench.accounting import TRIAL_FAULT, WORKER_DIED, count_trials, recover_dead_workers
from ganbench.report import trials_frame
from ganbench.spec import load_spec
from ganbench.study import get_storage, open_study
from tests.conftest import TINY, ganbench, write_spec

TINY_SEARCH = TINY["search"]


def states(study):
    return [t.state for t in study.get_trials(deepcopy=False)]


def test_suggest_maps_the_space_onto_trainer_fields(in_tmp):
    spec = load_spec(write_spec(in_tmp))
    trial = optuna.trial.FixedTrial({"lr_g": 1e-3, "lr_d": 2e-3, "hidden": 32})
    params = trial_mod.suggest(trial, spec)
    config = spec.trial_config(params, seed=2)
    assert (config.lr_g, config.lr_d, config.hidden, config.seed) == (1e-3, 2e-3, 32, 2)
    assert config.steps == 40 and config.depth == 1


def test_sequential_sweep_completes_exactly_the_total_and_is_deterministic(in_tmp):
    def run(name):
        spec = load_spec(write_spec(in_tmp, name=name))
        ran = worker.worker_loop(spec, "cpu", spec.trials)
        study = open_study(spec)
        return ran, [(t.params, t.values) for t in study.get_trials()]

    ran, first = run("a")
    assert ran == 4 and len(first) == 4
    _, second = run("b")
    assert first == second  # same sampler seed, one worker: identical trials and metrics


def test_pruner_prunes_a_bad_region(in_tmp):
    space = {"lr_g": {"type": "float", "low": 1e-7, "high": 1e-2, "log": True}}
    spec = load_spec(write_spec(
        in_tmp, trials=10, search=space,
        train={"steps": 80, "eval_every": 10, "eval_samples": 256, "batch_size": 64},
        pruner={"name": "median", "n_startup_trials": 2, "n_warmup_steps": 10}))
    worker.worker_loop(spec, "cpu", spec.trials)
    study = open_study(spec)
    pruned = [t for t in study.get_trials() if t.state == TrialState.PRUNED]
    assert pruned and len(study.get_trials()) == 10
    assert all(t.last_step is not None and t.last_step < 80 for t in pruned)
    # One column, one metric: a pruned trial's last value is sliced W1 and shown as such.
    frame = trials_frame(study.get_trials(), [("w1", "minimize")]).set_index("number")
    for t in pruned:
        assert frame.loc[t.number, "objective_w1"] != frame.loc[t.number, "objective_w1"]
        assert frame.loc[t.number, "last_sliced_w1"] == t.intermediate_values[t.last_step]
    complete = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    for t in complete:
        assert frame.loc[t.number, "objective_w1"] == t.user_attrs["metrics"]["w1"]
    assert list(frame["state"])[:len(complete)] == ["COMPLETE"] * len(complete)
    assert study.user_attrs["intermediate_values"] == "sliced_w1"


@pytest.mark.slow  # spawns processes
def test_a_changed_study_is_refused_naming_the_field(in_tmp):
    path = write_spec(in_tmp, trials=1)
    worker.worker_loop(load_spec(path), "cpu", 1)
    for command in ("sweep", "worker", "report", "status"):
        proc = ganbench(command, str(path), "--set", "train.steps=60", "--set",
                        "search.hidden.choices=[16]", cwd=in_tmp)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert ("study 'tiny' in the storage is another experiment: search.hidden.choices: "
                "[16, 32] there, [16] here; train.steps: 40 there, 60 here; to run this one, "
                "give it a new name (e.g. --set name=tiny-2)") in proc.stderr
    # What does not define the trials can change: more trials top the study up.
    topped = ganbench("sweep", str(path), "--trials", "2", "--set", "sampler.seed=5",
                      "--set", "pruner.name=median", cwd=in_tmp)
    assert topped.returncode == 0, topped.stderr
    assert len(open_study(load_spec(path)).get_trials()) == 2


def test_diverging_trials_fail_with_reason_and_count(in_tmp):
    spec = load_spec(write_spec(
        in_tmp, trials=2, model={"loss": "wasserstein"},
        train={"steps": 40, "eval_every": 20, "eval_samples": 256, "optimizer": "sgd"},
        search={"lr_g": {"type": "float", "low": 1e5, "high": 1e6, "log": True},
                "lr_d": {"type": "float", "low": 1e5, "high": 1e6, "log": True}}))
    worker.worker_loop(spec, "cpu", spec.trials)
    trials = open_study(spec).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 2
    for t in trials:
        assert t.user_attrs["fail_kind"] == TRIAL_FAULT
        assert t.user_attrs["fail_reason"].startswith("seed 0 diverged at step ")
    assert count_trials(trials) == (2, 0)
    frame = trials_frame(trials, [("w1", "minimize")])
    assert list(frame["state"]) == ["FAIL", "FAIL"] and frame["reason"].str.contains(
        "diverged").all()


def test_multi_objective_yields_a_pareto_table(in_tmp):
    spec = load_spec(write_spec(
        in_tmp, trials=5, objectives=[{"metric": "w1"}, {"metric": "modes"}],
        sampler={"name": "nsga2", "seed": 0, "population_size": 4}))
    assert spec.directions == ["minimize", "maximize"]
    worker.worker_loop(spec, "cpu", spec.trials)
    study = open_study(spec)
    front = [t.number for t in study.best_trials]
    frame = trials_frame(study.get_trials(), [("w1", "minimize"), ("modes", "maximize")], front)
    assert {"objective_w1", "objective_modes", "pareto"} <= set(frame.columns)
    assert sorted(frame.loc[frame["pareto"], "number"]) == sorted(front)
    # No Pareto member is dominated by another finished trial.
    done = frame[frame["state"] == "COMPLETE"]
    for _, p in done[done["pareto"]].iterrows():
        assert not ((done["objective_w1"] <= p["objective_w1"])
                    & (done["objective_modes"] >= p["objective_modes"])
                    & ((done["objective_w1"] < p["objective_w1"])
                       | (done["objective_modes"] > p["objective_modes"]))).any()


def test_multi_objective_report_has_the_pareto_front(in_tmp):
    from ganbench.report import write_study_report

    spec = load_spec(write_spec(
        in_tmp, trials=4, objectives=[{"metric": "w1"}, {"metric": "modes"}],
        sampler={"name": "nsga2", "seed": 0, "population_size": 4}))
    worker.worker_loop(spec, "cpu", spec.trials)
    files = write_study_report(open_study(spec), [("w1", "minimize"),
                                                        ("modes", "maximize")],
                               list(spec.search), in_tmp / "out")
    names = {f.name for f in files}
    assert {"pareto.png", "leaderboard.csv", "index.html", "samples.png"} <= names
    assert "Pareto front" in (in_tmp / "out" / "index.html").read_text()


def test_seed_repeats_are_averaged_and_kept(in_tmp):
    spec = load_spec(write_spec(in_tmp, trials=1, seeds=3))
    worker.worker_loop(spec, "cpu", spec.trials)
    (trial,) = open_study(spec).get_trials()
    per_seed = trial.user_attrs["seed_metrics"]
    assert len(per_seed) == 3 and len({s["w1"] for s in per_seed}) == 3
    assert trial.values[0] == pytest.approx(sum(s["w1"] for s in per_seed) / 3)


@pytest.mark.slow  # spawns processes
def test_a_dead_local_workers_trial_is_failed_and_retried(in_tmp):
    spec = load_spec(write_spec(in_tmp, trials=2))
    study = open_study(spec)
    trial = study.ask()
    trial_mod.suggest(trial, spec)
    dead = subprocess.Popen(["true"])
    dead.wait()
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", dead.pid)
    assert recover_dead_workers(study) == [trial.number]
    lost = study.get_trials()[0]
    assert lost.state == TrialState.FAIL and lost.user_attrs["fail_kind"] == WORKER_DIED
    assert count_trials(study.get_trials()) == (0, 0)  # a lost trial does not count
    worker.worker_loop(spec, "cpu", spec.trials)
    trials = study.get_trials()
    assert count_trials(trials) == (2, 0) and len(trials) == 3
    retry = trials[1]
    assert retry.params == lost.params and retry.user_attrs["retry_of"] == lost.number


@pytest.mark.slow
def test_cli_sweep_two_workers_resumes_and_tops_up(in_tmp):
    spec = write_spec(in_tmp)
    first = ganbench("sweep", str(spec), "--workers", "2", cwd=in_tmp)
    assert first.returncode == 0, first.stderr
    assert "best trials" in first.stdout and (in_tmp / "runs/tiny/report/leaderboard.csv").exists()
    study = optuna.load_study(study_name="tiny", storage=get_storage(load_spec(spec)))
    assert states(study) == [TrialState.COMPLETE] * 4
    # Two worker processes were started (recorded with the run), and only they ran trials.
    assert study.user_attrs["provenance"][-1]["workers"] == 2
    assert 1 <= len({t.user_attrs["pid"] for t in study.get_trials()}) <= 2
    # Piped to a file: one line per finished trial (number, state, objective, duration).
    lines = [line for line in first.stdout.splitlines() if line.startswith("trial ")]
    assert sorted(int(line.split()[1]) for line in lines) == [0, 1, 2, 3]
    assert all(" COMPLETE w1 " in line and " s) · " in line for line in lines)  # named
    again = ganbench("sweep", str(spec), "--workers", "2", cwd=in_tmp)
    assert again.returncode == 0 and len(study.get_trials()) == 4  # never starts over
    assert "trial 0 COMPLETE" not in again.stdout  # earlier trials are not logged again
    more = ganbench("sweep", str(spec), "--workers", "2", "--trials", "7", cwd=in_tmp)
    assert more.returncode == 0, more.stderr
    numbers = [t.number for t in study.get_trials()]
    assert numbers == list(range(7)) and states(study) == [TrialState.COMPLETE] * 7
    (in_tmp / "runs/tiny/report/leaderboard.csv").unlink()
    files = sorted(p for p in in_tmp.rglob("*") if p.is_file())
    status = ganbench("status", str(spec), cwd=in_tmp)
    assert status.returncode == 0 and "COMPLETE" in status.stdout
    assert "7/7 counted trials" in status.stdout  # the total the last sweep ran to
    assert "best trials" in status.stdout
    assert sorted(p for p in in_tmp.rglob("*") if p.is_file()) == files  # status only reads


@pytest.mark.slow
def test_cli_sweep_on_postgres_with_two_workers(in_tmp, postgres):
    spec = write_spec(in_tmp, name="pg", trials=5)
    proc = ganbench("sweep", str(spec), "--workers", "2", "--storage", postgres.url, cwd=in_tmp)
    assert proc.returncode == 0, proc.stderr
    study = optuna.load_study(study_name="pg", storage=get_storage(
        load_spec(spec, [f"storage={postgres.url}"])))
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(5))
    assert states(study) == [TrialState.COMPLETE] * 5
    assert study.user_attrs["provenance"][-1]["workers"] == 2
    assert 1 <= len({t.user_attrs["pid"] for t in trials}) <= 2
    assert not (in_tmp / "runs/pg/optuna.log").exists()


def test_workers_option_sizes_the_sweep_to_the_trials_left(in_tmp):
    """--workers N starts N workers (not one per core), never more than trials are left."""
    from ganbench.sweep import plan_sweep

    assert plan_sweep(load_spec(write_spec(in_tmp, trials=4, workers=3))).devices == \
        ["cpu"] * 3
    assert plan_sweep(load_spec(write_spec(in_tmp, trials=2, workers=3, name="two"))
                      ).devices == ["cpu"] * 2


@pytest.mark.slow
def test_cli_worker_joins_a_postgres_study(in_tmp, postgres):
    spec = write_spec(in_tmp, name="joined", trials=2)
    proc = ganbench("worker", str(spec), "--storage", postgres.url, "--device", "cpu",
                    cwd=in_tmp)
    assert proc.returncode == 0, proc.stderr
    assert "trial 0: COMPLETE" in proc.stdout and "ran 2 trial(s)" in proc.stdout


@pytest.mark.slow  # spawns processes
@pytest.mark.parametrize("args,needle", [
    (["--storage", "postgresql://nobody@127.0.0.1:1/none"], "cannot connect"),
    (["--storage", "redis://x"], "storage: expected sqlite:///PATH or postgresql"),
    (["--set", "search.lr_g.low=0"], "search.lr_g: log scale needs low > 0"),
    (["--set", "sampler.name=grid"], "grid sampler needs categorical"),
    (["--trials", "0"], "trials: Input should be greater than 0"),
    (["--tracking-uri", "http://127.0.0.1:1"], "tracking server http://127.0.0.1:1 is "
                                               "unreachable"),
    (["--devices", "cuda:7"], "device 'cuda:7' is not available"),
])
def test_cli_bad_input_is_one_line_and_creates_nothing(in_tmp, args, needle):
    spec = write_spec(in_tmp)
    proc = ganbench("sweep", str(spec), *args, cwd=in_tmp)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr
    assert sorted(p.name for p in in_tmp.iterdir()) == ["tiny.yaml"]


@pytest.mark.slow  # spawns processes
@pytest.mark.parametrize("command", ["sweep", "worker", "status", "report", "compare"])
def test_every_study_command_reports_a_missing_spec(in_tmp, command):
    proc = ganbench(command, "nope.yaml", cwd=in_tmp)
    assert proc.returncode == 2 and proc.stderr == "error: nope.yaml: file not found\n"
    assert list(in_tmp.iterdir()) == []


@pytest.mark.slow  # spawns processes
@pytest.mark.parametrize("command,kind,serves", [
    ("sweep", "compare", "ganbench compare"), ("worker", "compare", "ganbench compare"),
    ("compare", "study", "ganbench sweep"),
])
def test_a_file_of_the_other_kind_names_the_command_that_serves_it(in_tmp, command, kind,
                                                                     serves):
    if kind == "compare":
        path = in_tmp / "cmp.yaml"
        path.write_text("name: cmp\ntargets: [{name: ring}]\narms: {plain: {}}\n"
                        "baseline: plain\n")
    else:
        path = write_spec(in_tmp)
    proc = ganbench(command, str(path), cwd=in_tmp)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"`{serves} {path}`" in proc.stderr
    assert sorted(p.name for p in in_tmp.iterdir()) == [path.name]


@pytest.mark.slow  # spawns processes
def test_version(in_tmp):
    from ganbench import __version__

    proc = ganbench("--version", cwd=in_tmp)
    assert proc.returncode == 0 and proc.stdout == f"ganbench {__version__}\n"


@pytest.mark.slow  # spawns processes
def test_status_of_a_study_that_never_ran(in_tmp):
    proc = ganbench("status", str(write_spec(in_tmp)), cwd=in_tmp)
    assert proc.returncode == 2 and "no study found" in proc.stderr
    assert not (in_tmp / "runs").exists()


def test_service_failures_are_not_the_trials_fault():
    """What counts against a trial: its own exceptions; not a storage or tracking outage."""
    import requests
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    from ganbench.accounting import is_infrastructure

    def raised(make):
        try:
            try:
                raise make()
            except Exception as inner:
                raise RuntimeError("while logging") from inner
        except RuntimeError as outer:
            return outer

    assert is_infrastructure(sqlalchemy.exc.OperationalError("SELECT 1", {}, OSError()))
    assert is_infrastructure(requests.ConnectionError("refused"))
    assert is_infrastructure(MlflowException("server error"))
    assert is_infrastructure(raised(lambda: ConnectionRefusedError()))  # through a cause
    assert not is_infrastructure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_infrastructure(ValueError("nan in loss"))


def test_a_trial_failed_by_a_service_is_requeued_not_counted(tmp_path):
    import optuna
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    from ganbench.accounting import count_trials
    from ganbench.trial import _fault

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "j.log")))
    study = optuna.create_study(storage=storage, study_name="s")
    own, service = study.ask(), study.ask()
    for trial in (own, service):
        trial.suggest_float("lr_g", 1e-4, 1e-2, log=True)
    assert _fault(study, own, None, ValueError("a bug")).state == TrialState.FAIL
    _fault(study, service, None, ConnectionError("storage went away"))
    trials = study.get_trials()
    assert trials[0].user_attrs["fail_kind"] == "trial"
    assert trials[1].user_attrs["fail_kind"] == "infrastructure"
    assert trials[1].user_attrs["fail_reason"].startswith("storage or tracking error")
    assert count_trials(trials) == (1, 0)  # only the trial's own failure counts
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert len(waiting) == 1 and waiting[0].user_attrs["retry_of"] == service.number


def test_a_trial_lost_between_two_suggestions_keeps_what_it_had_sampled(tmp_path):
    """A worker killed after sampling some of a trial's parameters: the retry keeps those
    and samples the rest; a trial lost before sampling anything is not re-queued."""
    from optuna.storages.journal import JournalFileBackend

    from ganbench.accounting import requeue

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "j.log")))
    study = optuna.create_study(storage=storage, study_name="s",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    partial, empty = study.ask(), study.ask()
    hidden = partial.suggest_categorical("hidden", [16, 32])
    lr_d = partial.suggest_float("lr_d", 1e-4, 1e-2, log=True)
    for trial in (partial, empty):
        study.tell(trial, state=TrialState.FAIL)
        requeue(study, study.trials[trial.number], "worker died")
    assert [t.state for t in study.trials].count(TrialState.WAITING) == 1
    retry = study.ask()
    params = (retry.suggest_categorical("hidden", [16, 32]),
              retry.suggest_float("lr_d", 1e-4, 1e-2, log=True),
              retry.suggest_float("lr_g", 1e-4, 1e-2, log=True))
    assert params[:2] == (hidden, lr_d) and 1e-4 <= params[2] <= 1e-2
    assert retry.user_attrs["retry_of"] == partial.number


@pytest.mark.slow  # spawns processes
def test_a_sweep_that_ends_short_says_so_and_fails(in_tmp):
    """A trial held RUNNING by a worker on another machine, on a journal (no heartbeats):
    the local workers cannot finish the study, and the sweep says so instead of exit 0."""
    spec = write_spec(in_tmp, trials=3)
    study = optuna.create_study(study_name="tiny", storage=get_storage(load_spec(spec)))
    elsewhere = study.ask()
    elsewhere.set_user_attr("host", "another-machine")
    elsewhere.set_user_attr("pid", 1)
    proc = ganbench("sweep", str(spec), "--workers", "1", cwd=in_tmp)
    assert proc.returncode == 2
    assert "the study ended short: 2 of 3 counted, 1 still running elsewhere" in proc.stderr


def test_a_result_told_after_the_trial_was_failed_elsewhere_is_dropped(tmp_path):
    """A trial whose heartbeat went stale while it trained (failed and re-queued by another
    worker) cannot be told any more: its result is dropped, nothing raises."""
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    from ganbench.accounting import WORKER_DIED, fail_trial
    from ganbench.train import TrainConfig, train
    from ganbench.trial import _conclude

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "j.log")))
    study = optuna.create_study(storage=storage, study_name="tiny")
    trial = study.ask()
    trial.suggest_float("lr_g", 1e-4, 1e-2, log=True)
    result = train(TrainConfig(steps=20, eval_every=10, eval_samples=200, batch_size=64,
                               hidden=16, depth=1))
    fail_trial(study, trial, WORKER_DIED, "no heartbeat")
    outcome = _conclude(study, trial, load_spec(write_spec(tmp_path)), [result], None)
    assert outcome.state == TrialState.FAIL and "finished elsewhere" in outcome.reason
    assert study.get_trials()[0].user_attrs["fail_kind"] == WORKER_DIED  # untouched


@pytest.mark.slow  # spawns processes
def test_a_sweep_with_a_compute_budget_ends_cleanly_at_it(in_tmp):
    spec = write_spec(in_tmp, budget={"g_steps": 120})  # trials of 40 steps: 3 of them
    proc = ganbench("sweep", str(spec), "--workers", "1", cwd=in_tmp)
    assert proc.returncode == 0, proc.stderr
    study = optuna.load_study(study_name="tiny", storage=get_storage(load_spec(spec)))
    assert states(study) == [TrialState.COMPLETE] * 3


@pytest.mark.slow
def test_a_population_never_overshoots_a_compute_budget(in_tmp):
    """A population asks its trials together; asking reserves each running trial's planned
    steps, so a budget of 100 G steps with trials of 40 holds two trials, not a population
    of four (160 steps)."""
    spec = write_spec(in_tmp, budget={"g_steps": 100}, trials=8,
                      execution={"mode": "population", "size": 4})
    proc = ganbench("sweep", str(spec), "--workers", "1", cwd=in_tmp)
    assert proc.returncode == 0, proc.stderr
    study = optuna.load_study(study_name="tiny", storage=get_storage(load_spec(spec)))
    trials = study.get_trials()
    assert states(study) == [TrialState.COMPLETE] * 2
    assert sum(t.user_attrs["g_steps"] for t in trials) == 80 <= 100


def test_asking_reserves_the_planned_compute_of_running_trials(in_tmp):
    """Budget accounting on a real journal study: spent counts finished trials, reserved
    the running ones (a searched step count at its upper bound until sampled)."""
    from ganbench.accounting import (
        budget_spent,
        compute_reserved,
        compute_spent,
        planned_compute,
        trials_that_fit,
    )

    train = {k: v for k, v in TINY["train"].items() if k != "steps"}
    spec = load_spec(write_spec(in_tmp, budget={"d_steps": 500}, trials=10, train=train, search={
        **TINY_SEARCH, "steps": {"type": "int", "low": 20, "high": 100},
        "d_steps": {"type": "categorical", "choices": [1, 2]}}))
    assert planned_compute(spec, None, "d_steps") == 100 * 2   # bounds before sampling
    assert planned_compute(spec, {"steps": 30, "d_steps": 1}, "d_steps") == 30
    study = open_study(spec)
    assert trials_that_fit(spec, study.get_trials(), 10) == 2  # 500 // 200
    done = study.ask({"steps": optuna.distributions.IntDistribution(20, 100)})
    done.set_user_attr("d_steps", 120)
    study.tell(done, 0.5)                                      # spent: 120
    running = study.ask()                                      # unsampled: reserves 200
    trials = study.get_trials()
    assert compute_spent(trials, "d_steps") == 120
    assert compute_reserved(spec, trials, "d_steps") == 200
    assert trials_that_fit(spec, trials, 10) == 0 and budget_spent(spec, trials)
    assert not budget_spent(spec, trials, reserve=False)       # 380 left without it
    study.tell(running, state=TrialState.FAIL)                 # lost: uncounted, unreserved
    assert trials_that_fit(spec, study.get_trials(), 10) == 1


def test_a_database_study_without_tracking_keeps_its_generators(in_tmp):
    """With a database storage and ``tracking: false`` nothing else keeps a trial's
    generator: it stays in the run folder, its path on the trial (not saved and deleted)."""
    spec = load_spec(write_spec(in_tmp, trials=2, storage=f"sqlite:///{in_tmp / 's.db'}"))
    worker.worker_loop(spec, "cpu", spec.trials)
    trials = open_study(spec).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    for t in trials:
        path = in_tmp / "runs" / "tiny" / "generators" / f"trial-{t.number}.pt"
        assert path.is_file() and t.user_attrs["checkpoint"] == str(path.resolve())
