"""What ganbench needs from Optuna beyond its public API (``ganbench.optuna_adapter``),
checked against the installed Optuna on real storages: a release that renames or changes
any of it fails here. The database-outage retries are exercised on a real PostgreSQL in
test_reliability."""

import re
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from packaging.specifiers import SpecifierSet

from ganbench import optuna_adapter as oa
from ganbench.accounting import fail_stale, fail_trial, retry_callback

ROOT = Path(__file__).parent.parent


def test_the_installed_optuna_is_in_the_range_written_for():
    pin = re.search(r'"optuna([^"]*)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert SpecifierSet(pin) == SpecifierSet(oa.OPTUNA_RANGE)
    assert optuna.__version__ in SpecifierSet(oa.OPTUNA_RANGE)


def test_every_retried_storage_method_exists_in_optuna():
    """The trial cache in front of a database storage calls these (private ones included);
    a renamed one would bypass the retries silently."""
    for name in oa.RETRIED:
        assert callable(getattr(optuna.storages.RDBStorage, name, None)), name
        assert getattr(oa.ResilientRDBStorage, name) is not getattr(
            optuna.storages.RDBStorage, name), name


@pytest.fixture(params=["journal", "sqlite"])
def storage(request, tmp_path):
    if request.param == "journal":
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "j.log")))
    return oa.ResilientRDBStorage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=1,
                                  grace_period=2, heartbeat_stale_trial_callback=retry_callback)


def test_a_trial_asked_elsewhere_is_reached_by_its_number(storage):
    """A comparison asks in its supervisor and trains in a worker; recovery marks another
    process's trial: here two Study objects on one storage stand for the two processes."""
    asker = optuna.create_study(study_name="s", storage=storage)
    asked = asker.ask()
    asked.suggest_float("x", 0, 1)
    other = optuna.load_study(study_name="s", storage=storage)
    live = oa.live_trial(other, asked.number)
    assert live.suggest_float("x", 0, 1) == asked.params["x"]  # its sampled value back
    oa.set_user_attr(other, asked.number, "pid", 42)
    assert oa.get_trial(asker, asked).user_attrs["pid"] == 42
    assert not oa.is_finished(asker, asked.number)
    fail_trial(other, live, "interrupted", "stopped")
    again = oa.get_trial(asker, asked.number)
    assert again.state == TrialState.FAIL and again.user_attrs["fail_kind"] == "interrupted"
    assert oa.is_finished(other, asked)
    requeued = asker.get_trials(states=(TrialState.WAITING,))
    assert len(requeued) == 1 and requeued[0].system_attrs["fixed_params"] == asked.params
    fail_trial(other, live, "interrupted", "twice")  # finished: nothing more happens
    assert len(asker.get_trials()) == 2


def test_heartbeats_on_a_database_storage_only(storage, tmp_path):
    study = optuna.create_study(study_name="h", storage=storage)
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    if isinstance(storage, optuna.storages.JournalStorage):
        assert not oa.has_heartbeat(study) and fail_stale(study) == []
        return
    assert oa.has_heartbeat(study) and oa.heartbeat_interval(study) == 1
    oa.record_heartbeat(study, trial)
    assert fail_stale(study) == []          # alive within the grace period
    time.sleep(3)
    assert fail_stale(study) == [trial.number]  # silent: failed, re-queued by the callback
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].system_attrs["fixed_params"] == trial.params
