"""What ganbench needs from Optuna beyond its public API, in one place, and why.

Optuna's public API covers a study and the trials a process asks and tells itself
(``study.ask``, ``trial.set_user_attr``, ``study.tell(number, state=..., skip_if_finished=
True)``). Three things ganbench does are not in it:

- **Acting on a trial this process does not hold**: a comparison asks trials in its
  supervisor and trains them in worker processes; recovery marks the trial of a worker that
  died. Optuna reaches such a trial only through its storage and the trial's id.
- **Heartbeats of trials trained outside ``study.optimize``**: Optuna records them only in
  its own optimize loop; ``record_heartbeat`` is a storage method, and whether a storage
  keeps heartbeats is decided in ``optuna.storages._heartbeat``.
- **Waiting out a database restart**: ``RDBStorage`` has no retry, and the trial cache
  Optuna puts in front of it calls private methods of the storage (``_create_new_trial``,
  ``_set_trial_param``, ...), so every one of them is wrapped.

Everything here is checked against the installed Optuna by ``tests/test_optuna_adapter.py``
(the names exist and behave as used), for the range ``OPTUNA_RANGE`` that ``pyproject.toml``
pins: a release that changes any of it fails the tests, not a user's sweep. Outside this
module the package uses Optuna's public API only (a test greps for the rest).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial

from ganbench.errors import exception_chain, redact

OPTUNA_RANGE = ">=5,<6"   # the versions this module is written and tested for

HEARTBEAT_INTERVAL = 30   # default seconds between heartbeats of a running trial (RDB)


# ---------------------------------------------------------------- trials by number
def _storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    return study._storage


def _trial_id(study: optuna.Study, trial: Any) -> int:
    """The storage id of ``trial`` (a Trial, a FrozenTrial or a trial number)."""
    if isinstance(trial, int):
        storage = _storage(study)
        return storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name(study.study_name), trial)
    return trial._trial_id


def set_user_attr(study: optuna.Study, trial: Any, key: str, value: Any) -> None:
    """Set a user attribute of a running trial of ``study`` that this process need not
    hold (a Trial, a FrozenTrial or its number)."""
    _storage(study).set_trial_user_attr(_trial_id(study, trial), key, value)


def get_trial(study: optuna.Study, trial: Any) -> FrozenTrial:
    """``trial`` as the storage holds it now (not a cached copy)."""
    return _storage(study).get_trial(_trial_id(study, trial))


def is_finished(study: optuna.Study, trial: Any) -> bool:
    """Has ``trial`` been finished (told, failed) by this or another process?"""
    return get_trial(study, trial).state.is_finished()


def live_trial(study: optuna.Study, number: int) -> optuna.Trial:
    """A ``Trial`` object for trial ``number``, asked by another process, to train and tell
    here (its parameters, already sampled, are read back by ``suggest_*``)."""
    return optuna.trial.Trial(study, _trial_id(study, number))


# ---------------------------------------------------------------- heartbeats
def has_heartbeat(study_or_storage: Any) -> bool:
    """Does the study's storage keep heartbeats (a database storage, also behind Optuna's
    trial cache)?"""
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

    storage = study_or_storage._storage if isinstance(study_or_storage, optuna.Study) \
        else study_or_storage
    return isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage)


def record_heartbeat(study: optuna.Study, trial: Any) -> None:
    """Record that ``trial``'s worker is alive (database storages only)."""
    _storage(study).record_heartbeat(_trial_id(study, trial))


def heartbeat_interval(study: optuna.Study) -> float:
    """Seconds between heartbeats of the study's storage."""
    return float(_storage(study).get_heartbeat_interval() or HEARTBEAT_INTERVAL)


# ---------------------------------------------------------------- a database that restarts
# How long a database call waits for its server to come back (a restart, a failover).
OUTAGE_PATIENCE = 300.0

# Every storage method a study, a trial or Optuna's trial cache calls: the public storage
# interface, and the private methods the cache calls on the storage behind it.
RETRIED = ("create_new_study", "delete_study", "set_study_user_attr",
           "set_study_system_attr", "get_study_id_from_name", "get_study_name_from_id",
           "get_study_directions", "get_study_user_attrs", "get_study_system_attrs",
           "get_all_studies", "create_new_trial", "set_trial_param",
           "get_trial_id_from_study_id_trial_number", "get_trial_number_from_id",
           "get_trial_param", "set_trial_state_values", "set_trial_intermediate_value",
           "set_trial_user_attr", "set_trial_system_attr", "get_trial", "get_all_trials",
           "get_n_trials", "get_best_trial", "record_heartbeat", "_get_trials",
           "_get_stale_trial_ids", "_create_new_trial", "_set_trial_param",
           "_get_best_trial_id")


def _unreachable(exc: BaseException) -> bool:
    """Is ``exc`` a lost or refused database connection (not a bad query)?"""
    import sqlalchemy.exc

    return any(isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError))
               or (isinstance(e, sqlalchemy.exc.DBAPIError) and e.connection_invalidated)
               for e in exception_chain(exc))


def _retried(name: str) -> Callable[..., Any]:
    def call(self: "ResilientRDBStorage", *args: Any, **kwargs: Any) -> Any:
        return self._call(name, *args, **kwargs)

    call.__name__ = name
    return call


class ResilientRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage whose calls wait out a database restart: a call that cannot
    reach the server is retried with backoff for up to OUTAGE_PATIENCE seconds (SQLAlchemy's
    ``pool_pre_ping`` then replaces the dead connections). Each outage is said in one line
    when it starts and one when it ends."""

    say: Callable[[str], None] = staticmethod(lambda line: print(line, flush=True))

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        method = getattr(optuna.storages.RDBStorage, name)
        start, delay = None, 0.25
        while True:
            try:
                out = method(self, *args, **kwargs)
            except Exception as exc:
                if not _unreachable(exc):
                    raise
                now = time.monotonic()
                if start is None:
                    start = now
                    self.say(f"storage {redact(self.url)} unreachable ({type(exc).__name__}); "
                             f"retrying for up to {OUTAGE_PATIENCE:g} s")
                if now - start > OUTAGE_PATIENCE:
                    raise
                time.sleep(delay)
                delay = min(2 * delay, 5.0)
                continue
            if start is not None:
                self.say(f"storage reachable again after {time.monotonic() - start:.1f} s")
            return out


# The retried methods of the subclass, each calling RDBStorage's own through ``_call``.
for _name in RETRIED:
    setattr(ResilientRDBStorage, _name, _retried(_name))


def fail_stale_trials(study: optuna.Study) -> None:
    """Optuna's own failing of trials whose heartbeat went stale (experimental in Optuna:
    its warning is nothing a user can act on)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)

