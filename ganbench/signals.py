"""Signals and exit codes: how a stop asked by SIGINT or SIGTERM travels through a run.

A signal never interrupts a library call: handlers only set a flag, and every loop acts on
it at its next safe point (before asking a trial, every few training steps). A command
stopped by a signal exits 128 + its number (130 for Ctrl-C, 143 for SIGTERM).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Callable, Iterator


class Interrupted(KeyboardInterrupt):
    """A stop asked by a signal (SIGINT, SIGTERM); the command exits 128 + ``signum``."""

    last: int | None = None  # the latest stop's signal (what a CLI wrapper may swallow)

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)
        Interrupted.last = self.signum


def exit_code(exc: BaseException) -> int:
    """The conventional exit status of a command stopped by ``exc``: 130 for SIGINT, 143
    for SIGTERM."""
    return 128 + getattr(exc, "signum", Interrupted.last or signal.SIGINT)


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event, received: list[int] | None = None,
                    on_signal: Callable[[int], None] | None = None) -> Iterator[None]:
    """SIGINT and SIGTERM set ``stop`` (and append their number to ``received``, and call
    ``on_signal``) instead of interrupting: the caller stops at its next safe point. Outside
    the main thread (where handlers cannot be set) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame) -> None:
        if received is not None:
            received.append(signum)
        stop.set()
        if on_signal is not None:
            on_signal(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


_watched: set[int] = set()  # the parents this process already watches


def watch_parent(parent: int, every: float = 1.0) -> None:
    """Stop this worker (a SIGINT to itself, acted on at its next safe point) once the
    process ``parent`` is gone, even if it was SIGKILLed: workers never outlive their
    supervisor. One watching thread per process and parent, however often it is called."""
    if parent in _watched:
        return
    _watched.add(parent)

    def watch() -> None:
        while True:
            time.sleep(every)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGINT)
                return

    threading.Thread(target=watch, daemon=True, name="watch-parent").start()
