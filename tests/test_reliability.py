"""Kill -9, Ctrl-C, concurrent workers and a tracking outage: nothing finished is lost."""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from ganbench.accounting import count_trials
from ganbench.spec import StudySpec
from ganbench.study import get_storage
from tests.conftest import TINY, cli_env, write_spec
from tests.services import MlflowServer

pytestmark = pytest.mark.slow
# Long enough that a trial is still training when a test acts on it (tiny nets run ~2k steps/s).
SLOWER = {"steps": 3000, "eval_every": 250, "eval_samples": 256, "batch_size": 64}


def journal_study(folder, name):
    backend = JournalFileBackend(str(folder / "runs" / name / "optuna.log"))
    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(backend))


def start(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "ganbench", *args], cwd=cwd, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for(predicate, timeout=300, proc=None):
    """Poll until predicate holds; fail at once (with its output) if proc exits first."""
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"exited {proc.returncode} before the awaited state:\n"
                                 f"{out}\n{err}")
        try:
            if predicate():
                return
        except (KeyError, FileNotFoundError, ValueError):
            pass
        time.sleep(0.3)
    raise TimeoutError


def by_state(study, state):
    return [t for t in study.get_trials() if t.state == state]


def assert_complete_study(study, total):
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(len(trials)))  # unique, no gaps
    assert not by_state(study, TrialState.RUNNING)
    assert count_trials(trials) == (total, 0)


def mlflow_runs(folder, name):
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    return [r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("ganbench.role") == "trial"]


def sweep_until_busy(spec, folder, name, after_one_complete=False):
    """Start a 2-worker sweep; return once both workers run a trial (and, if asked, one
    trial has completed)."""
    proc = start(["sweep", str(spec), "--workers", "2"], folder)
    study = None

    def busy():
        nonlocal study
        study = study or journal_study(folder, name)
        trials = study.get_trials()
        running = [t for t in trials if t.state == TrialState.RUNNING and "pid" in t.user_attrs
                   and t.params]  # training, not just asked
        done = any(t.state == TrialState.COMPLETE for t in trials)
        return len(running) == 2 and (done or not after_one_complete)

    wait_for(busy, proc=proc)
    return proc, study


def test_sigkill_then_rerun_loses_nothing(tmp_path):
    spec = write_spec(tmp_path, name="killed", trials=6, train=SLOWER, tracking={})
    proc, study = sweep_until_busy(spec, tmp_path, "killed", after_one_complete=True)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {t.number: t for t in study.get_trials()}
    completed_before = {n for n, t in before.items() if t.state == TrialState.COMPLETE}
    killed = {n for n, t in before.items() if t.state == TrialState.RUNNING}
    assert killed  # a trial can finish between the check and the kill: at least one remains

    rerun = subprocess.run([sys.executable, "-m", "ganbench", "sweep", str(spec), "--workers",
                            "2"], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert_complete_study(study, 6)
    trials = {t.number: t for t in study.get_trials()}
    assert completed_before <= {n for n, t in trials.items() if t.state == TrialState.COMPLETE}
    for n in killed:
        lost = trials[n]
        assert lost.state == TrialState.FAIL and lost.user_attrs["fail_kind"] == "worker_died"
        assert lost.user_attrs["fail_reason"].startswith("worker died (pid ")
        retries = [t for t in trials.values() if t.user_attrs.get("retry_of") == n]
        if not lost.params:  # killed between its ask and its sampling: nothing to retry
            assert not retries
            continue
        # the retry keeps every value the lost trial had sampled (all of them, unless it
        # was killed between two suggestions) and samples the rest
        assert len(retries) == 1 and lost.params.items() <= retries[0].params.items()
        assert set(retries[0].params) == set(TINY["search"])
        assert retries[0].state == TrialState.COMPLETE
    runs = mlflow_runs(tmp_path, "killed")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    killed_runs = [r for r in runs if r.data.tags.get("trial_number") in map(str, killed)]
    assert {r.info.status for r in killed_runs} == {"KILLED"}


def test_one_worker_killed_ends_the_sweep_short_in_one_line_and_the_rerun_is_exact(tmp_path):
    """SIGKILL to one worker of two (an out-of-memory kill): the other finishes what it can,
    the sweep names the dead worker in one line (exit 2, "rerun to continue") after failing
    and re-queuing its trial, and the rerun ends with exactly the total."""
    spec = write_spec(tmp_path, name="one-dead", trials=4, train=SLOWER)
    proc, study = sweep_until_busy(spec, tmp_path, "one-dead")
    victim = next(t for t in study.get_trials() if t.state == TrialState.RUNNING)
    os.kill(victim.user_attrs["pid"], signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 2 and err.count("\n") == 1, err
    assert "a worker on cpu died (killed by SIGKILL)" in err and "rerun to continue" in err
    lost = study.get_trials()[victim.number]
    assert lost.state == TrialState.FAIL and lost.user_attrs["fail_kind"] == "worker_died"
    rerun = subprocess.run([sys.executable, "-m", "ganbench", "sweep", str(spec), "--workers",
                            "2"], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert_complete_study(study, 4)
    retried = [t for t in study.get_trials() if t.user_attrs.get("retry_of") == victim.number]
    assert len(retried) == 1 and retried[0].params == victim.params


def test_ctrl_c_is_a_graceful_stop_and_rerun_continues(tmp_path):
    spec = write_spec(tmp_path, name="interrupted", trials=5, train=SLOWER, tracking={})
    proc, study = sweep_until_busy(spec, tmp_path, "interrupted")
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in out + err and "Traceback" not in err
    assert not by_state(study, TrialState.RUNNING)
    stopped = [t for t in study.get_trials() if t.user_attrs.get("fail_kind") == "interrupted"]
    assert 1 <= len(stopped) <= 2  # a trial may finish between the check and the signal
    runs = {r.data.tags["trial_number"]: r for r in mlflow_runs(tmp_path, "interrupted")}
    # A trial interrupted before its MLflow run was created has none; the others are KILLED.
    assert {runs[str(t.number)].info.status for t in stopped if str(t.number) in runs} <= \
        {"KILLED"}
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]
    rerun = subprocess.run([sys.executable, "-m", "ganbench", "sweep", str(spec)],
                           cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert_complete_study(study, 5)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("sig, load", [(signal.SIGINT, 0), (signal.SIGTERM, 0),
                                       (signal.SIGTERM, 4)],
                         ids=["SIGINT", "SIGTERM", "SIGTERM-saturated-cpu"])
def test_a_signal_to_the_supervisor_alone_is_a_clean_stop(tmp_path, sig, load):
    """`kill -INT` / `kill` (SIGTERM) to the supervisor's pid, from outside its process
    group, also with the CPU saturated by competing processes: the workers stop too, within
    seconds, no trial trains after the signal, every MLflow run ends, the exit status says
    which signal, and a rerun completes exactly N."""
    spec = write_spec(tmp_path, name="signalled", trials=6, train=SLOWER, tracking={})
    proc, study = sweep_until_busy(spec, tmp_path, "signalled")
    workers = {t.user_attrs["pid"] for t in study.get_trials() if "pid" in t.user_attrs}
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(load)]
    try:
        time.sleep(2 if load else 0)  # let the competitors take the cores
        sent = time.time()
        os.kill(proc.pid, sig)
        out, err = proc.communicate(timeout=120)
        took = time.time() - sent
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert proc.returncode == 128 + sig, err
    assert took < 30, f"took {took:.1f} s to stop"
    assert "interrupted" in err and "Traceback" not in err
    assert "best trials" in out  # the leaderboard so far
    assert not [p for p in workers if pid_alive(p)]  # no worker outlives its supervisor
    trials = study.get_trials()
    assert not by_state(study, TrialState.RUNNING)
    # A trial asked as the signal arrives is failed before it trains (re-queued ones wait,
    # unstarted): none trains after the signal.
    late = [t for t in trials if t.datetime_start is not None and
            t.datetime_start.timestamp() > sent + 0.5]
    assert not [t.number for t in late if t.state != TrialState.FAIL or
                t.intermediate_values], "trials trained after the signal"
    assert {t.user_attrs["fail_kind"] for t in trials if t.state == TrialState.FAIL} <= \
        {"interrupted"}
    assert not [r for r in mlflow_runs(tmp_path, "signalled") if r.info.status == "RUNNING"]
    rerun = subprocess.run([sys.executable, "-m", "ganbench", "sweep", str(spec)],
                           cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert_complete_study(study, 6)


def test_workers_stop_when_their_supervisor_is_killed(tmp_path):
    spec = write_spec(tmp_path, name="orphaned", trials=6, train=SLOWER, tracking={})
    proc, study = sweep_until_busy(spec, tmp_path, "orphaned")
    workers = {t.user_attrs["pid"] for t in study.get_trials() if "pid" in t.user_attrs}
    os.kill(proc.pid, signal.SIGKILL)  # the supervisor alone: its workers are orphaned
    proc.wait()
    wait_for(lambda: not [p for p in workers if pid_alive(p)], timeout=60)
    # They stopped at a safe point: their trials are marked, not left RUNNING.
    assert not by_state(study, TrialState.RUNNING)
    rerun = subprocess.run([sys.executable, "-m", "ganbench", "sweep", str(spec)],
                           cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert_complete_study(study, 6)


@pytest.mark.parametrize("backend", ["journal", "postgresql"])
def test_four_workers_finish_exactly_n_each_logged_once(tmp_path, backend, request,
                                                        mlflow_server):
    name = f"four-{backend}"
    args = ["sweep", str(write_spec(tmp_path, name=name, trials=8,
                                    tracking={"uri": mlflow_server.url})), "--workers", "4"]
    if backend == "postgresql":
        args += ["--storage", request.getfixturevalue("postgres").url]
    proc = subprocess.run([sys.executable, "-m", "ganbench", *args], cwd=tmp_path,
                          env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    if backend == "journal":
        study = journal_study(tmp_path, name)
    else:
        storage = get_storage(StudySpec.model_validate(
            {"name": name, "target": {"name": "ring"},
             "storage": request.getfixturevalue("postgres").url}))
        study = optuna.load_study(study_name=name, storage=storage)
    assert_complete_study(study, 8)
    assert len(study.get_trials()) == 8
    # Which worker ran what is the scheduler's business; that four were started (not one
    # per core: two here) and that they are this sweep's is not.
    assert study.user_attrs["provenance"][-1]["workers"] == 4
    assert 1 <= len({t.user_attrs["pid"] for t in study.get_trials()}) <= 4
    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name(name)
    runs = [r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("ganbench.role") == "trial"]
    assert sorted(int(r.data.tags["trial_number"]) for r in runs) == list(range(8))
    assert {t.user_attrs["mlflow_run_id"] for t in study.get_trials()} == \
        {r.info.run_id for r in runs}


def test_tracking_outage_does_not_stop_training(tmp_path):
    server = MlflowServer(tmp_path / "mlflow").start()
    spec = write_spec(tmp_path, name="outage", trials=4, train=SLOWER,
                      tracking={"uri": server.url})
    proc = start(["sweep", str(spec), "--workers", "1"], tmp_path)
    try:
        study = None

        def one_done():
            nonlocal study
            study = study or journal_study(tmp_path, "outage")
            return len(by_state(study, TrialState.COMPLETE)) >= 1

        wait_for(one_done)
        server.stop()
        out, err = proc.communicate(timeout=600)
    finally:
        server.stop()
    assert proc.returncode == 0, err
    assert_complete_study(study, 4)
    warnings = [line for line in err.splitlines() if line.startswith("warning: tracking")]
    # At most once per trial, plus the study run's end and the model registry's copy.
    assert 1 <= len(warnings) <= 4 + 2
    report = subprocess.run([sys.executable, "-m", "ganbench", "report", str(spec)],
                            cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                            timeout=300)
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "runs/outage/report/leaderboard.csv").exists()


def test_a_journal_lock_left_by_a_killed_worker_is_released(tmp_path):
    """A process killed while it holds the journal's lock leaves the lock behind; the next
    sweep waits out Optuna's grace period (30 s), then takes it and finishes."""
    spec = write_spec(tmp_path, name="locked", trials=1)
    dies_holding_the_lock = (
        "import os, signal, sys\n"
        "real = os.symlink\n"
        "def symlink(src, dst, *args, **kwargs):\n"
        "    real(src, dst, *args, **kwargs)\n"
        "    if str(dst).endswith('.lock'):\n"  # Optuna's journal lock is this symlink
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.symlink = symlink\n"
        "from ganbench.cli import main\n"
        f"main(['sweep', {str(spec)!r}])\n")
    killed = subprocess.run([sys.executable, "-c", dies_holding_the_lock], cwd=tmp_path,
                            env=cli_env(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert list((tmp_path / "runs/locked").glob("*.lock"))
    again = subprocess.run([sys.executable, "-m", "ganbench", "sweep", str(spec)],
                           cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                           timeout=150)
    assert again.returncode == 0, again.stderr
    assert_complete_study(journal_study(tmp_path, "locked"), 1)


def test_a_dead_remote_worker_is_recovered_by_the_other_while_it_runs(tmp_path, postgres):
    """Two workers on PostgreSQL with a 2 s heartbeat and a 6 s grace; one is SIGKILLed
    right after it asks. The other fails the silent trial inside its own ask, re-queues its
    parameters and finishes the study: exactly N counted, no configuration counted twice."""
    spec = write_spec(tmp_path, name="stale", trials=5, train=SLOWER, storage=postgres.url,
                      heartbeat={"interval": 2, "grace": 6})
    survivor = start(["worker", str(spec), "--device", "cpu"], tmp_path)
    victim = start(["worker", str(spec), "--device", "cpu"], tmp_path)
    storage = get_storage(StudySpec.model_validate(
        {"name": "stale", "target": {"name": "ring"}, "storage": postgres.url}))
    wait_for(lambda: optuna.load_study(study_name="stale", storage=storage) is not None)
    study = optuna.load_study(study_name="stale", storage=storage)
    try:
        # killed once it has sampled all its parameters: a trial killed between two
        # suggestions re-queues those it had, and the rest are sampled afresh
        wait_for(lambda: any(t.state == TrialState.RUNNING and
                             set(t.params) == set(TINY["search"]) and
                             t.user_attrs.get("pid") == victim.pid
                             for t in study.get_trials()), timeout=120)
    except TimeoutError:
        victim.kill()
        survivor.kill()
        states = [(t.number, t.state, t.user_attrs) for t in study.get_trials()]
        raise AssertionError(f"{victim.communicate()} {survivor.communicate()} "
                             f"{states}") from None
    victim.kill()
    victim.wait()
    out, err = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, err
    assert "went silent" in out  # the recovery is said, in one line
    assert_complete_study(study, 5)
    trials = study.get_trials()
    lost = [t for t in trials if t.state == TrialState.FAIL]
    assert len(lost) == 1 and lost[0].user_attrs["pid"] == victim.pid
    assert "fail_kind" not in lost[0].user_attrs  # failed by Optuna's heartbeat check
    counted = [t for t in trials if t.state != TrialState.FAIL]
    assert len({tuple(sorted(t.params.items())) for t in counted}) == len(counted) == 5
    retry = [t for t in counted if t.user_attrs.get("retry_of") == lost[0].number]
    assert len(retry) == 1 and retry[0].params == lost[0].params
    assert retry[0].user_attrs["retry_reason"] == "worker died (no heartbeat)"


def test_a_database_restart_mid_sweep_loses_nothing(tmp_path):
    """PostgreSQL stops for about 10 s while two workers train, then starts again: the
    sweep waits it out and completes exactly N counted trials, each once, and says so."""
    from tests.services import Postgres

    server = Postgres().start()
    try:
        spec = write_spec(tmp_path, name="restart", trials=6, train=SLOWER,
                          storage=server.url)
        proc = start(["sweep", str(spec), "--workers", "2"], tmp_path)
        storage = get_storage(StudySpec.model_validate(
            {"name": "restart", "target": {"name": "ring"}, "storage": server.url}))

        def busy() -> bool:
            trials = optuna.load_study(study_name="restart", storage=storage).get_trials()
            return any(t.state == TrialState.COMPLETE for t in trials) and \
                any(t.state == TrialState.RUNNING for t in trials)

        wait_for(busy)
        server.halt()
        time.sleep(10)
        server.resume()
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        assert "unreachable" in out and "reachable again after" in out
        study = optuna.load_study(study_name="restart", storage=storage)
        assert_complete_study(study, 6)
        trials = study.get_trials()  # each trial once: none lost, none repeated
        assert len(trials) == 6, [(t.number, t.state, t.user_attrs) for t in trials]
    finally:
        server.stop()


def test_an_outage_between_asking_and_suggesting_costs_no_trial():
    """The server stops at the moment a trial is created and again at the moment its
    parameter is stored (the calls Optuna's trial cache makes for ``ask`` and ``suggest``):
    both wait the outage out, and the study holds exactly the one trial with its parameter,
    none failed or repeated."""
    import threading

    from tests.services import Postgres

    server = Postgres().start()
    try:
        storage = get_storage(StudySpec.model_validate(
            {"name": "gap", "target": {"name": "ring"}, "storage": server.url}))
        study = optuna.create_study(study_name="gap", storage=storage)
        said: list[str] = []
        storage.say = said.append

        def outage_at(name):
            call = getattr(storage, name)

            def halted_first(*args, **kwargs):
                server.halt()
                threading.Timer(3.0, server.resume).start()
                return call(*args, **kwargs)
            setattr(storage, name, halted_first)

        outage_at("_create_new_trial")
        outage_at("_set_trial_param")
        trial = study.ask()
        value = trial.suggest_float("lr", 1e-4, 1e-2, log=True)
        study.tell(trial, 1.0)
        trials = study.get_trials()
        assert [(t.number, t.state, t.params) for t in trials] == \
            [(0, TrialState.COMPLETE, {"lr": value})]
        assert any("reachable again after" in line for line in said), said
    finally:
        server.stop()


def _journal(folder, name):
    return folder / "runs" / name / "optuna.log"


def test_a_cut_last_record_is_set_aside_and_the_study_goes_on(tmp_path):
    """A crash mid-write leaves the journal's last record cut: status reads the whole
    records and says so (writing nothing); the next sweep moves the cut bytes aside in one
    line and ends with exactly the requested count; no later record is glued to it."""
    from tests.conftest import ganbench

    spec = write_spec(tmp_path, name="cut", trials=2)
    assert ganbench("sweep", str(spec), cwd=tmp_path).returncode == 0
    path = _journal(tmp_path, "cut")
    data = path.read_bytes()
    path.write_bytes(data[:-15])  # the last record loses its end
    status = ganbench("status", str(spec), cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "its last record is cut off" in status.stdout
    assert path.read_bytes() == data[:-15]  # status writes nothing
    more = write_spec(tmp_path, name="cut", trials=3)
    rerun = ganbench("sweep", str(more), cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert "last record was cut off" in rerun.stdout and "Traceback" not in rerun.stderr
    aside = list(path.parent.glob("optuna.log.cut-*"))
    assert len(aside) == 1
    cut = data[:-15][data[:-15].rfind(b"\n") + 1:]
    assert aside[0].read_bytes() == cut
    assert_complete_study(journal_study(tmp_path, "cut"), 3)
    again = ganbench("status", str(more), cwd=tmp_path)
    assert again.returncode == 0 and "set aside" in again.stdout


def test_a_damaged_record_stops_in_one_line_until_repaired(tmp_path):
    """A garbled record inside the journal: status, sweep and report end in one line naming
    the file and record (exit 2, nothing written); `ganbench repair` keeps the records before
    it, keeps the original beside it, and the next sweep reruns what was set aside to
    exactly the requested count."""
    from tests.conftest import ganbench

    spec = write_spec(tmp_path, name="garbled", trials=3)
    assert ganbench("sweep", str(spec), cwd=tmp_path).returncode == 0
    path = _journal(tmp_path, "garbled")
    lines = path.read_bytes().split(b"\n")
    at = len(lines) // 2
    lines[at] = lines[at][:12] + b"\x00\xff" + lines[at][30:]
    damaged = b"\n".join(lines)
    path.write_bytes(damaged)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for command in ("status", "sweep", "report"):
        out = ganbench(command, str(spec), cwd=tmp_path)
        assert out.returncode == 2, (command, out.stderr)
        assert out.stderr.strip().count("\n") == 0, out.stderr
        assert f"record {at + 1} of" in out.stderr and "optuna.log" in out.stderr
        assert "ganbench repair" in out.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    repaired = ganbench("repair", str(spec), cwd=tmp_path)
    assert repaired.returncode == 0, repaired.stderr
    assert f"kept {at} records" in repaired.stdout
    original = list(path.parent.glob("optuna.log.damaged-*"))
    assert len(original) == 1 and original[0].read_bytes() == damaged
    assert path.read_bytes() == b"".join(line + b"\n" for line in lines[:at])
    rerun = ganbench("sweep", str(spec), cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert_complete_study(journal_study(tmp_path, "garbled"), 3)
    clean = ganbench("repair", str(spec), cwd=tmp_path)
    assert clean.returncode == 0 and "none damaged" in clean.stdout


@pytest.mark.parametrize("kind", ["journal", "postgresql"])
def test_sweeps_started_together_in_a_fresh_folder_count_exactly(tmp_path, request, kind):
    """Three sweeps of one study started in the same second where neither mlflow.db nor the
    study exists yet: all end cleanly, the study holds exactly its trials, MLflow one
    experiment with one parent run and one run per trial."""
    storage = {} if kind == "journal" else \
        {"storage": request.getfixturevalue("postgres").url}
    spec = write_spec(tmp_path, name="together", trials=6, tracking={}, **storage)
    procs = [start(["sweep", str(spec), "--workers", "1"], tmp_path) for _ in range(3)]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    study = journal_study(tmp_path, "together") if kind == "journal" else \
        optuna.load_study(study_name="together", storage=get_storage(StudySpec.model_validate(
            {"name": "together", "target": {"name": "ring"}} | storage)))
    assert_complete_study(study, 6)
    assert len(study.get_trials()) == 6
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [e.name for e in client.search_experiments()].count("together") == 1
    exp = client.get_experiment_by_name("together")
    roles = sorted(r.data.tags.get("ganbench.role", "") for r in
                   client.search_runs([exp.experiment_id]))
    assert roles == ["study"] + ["trial"] * 6
