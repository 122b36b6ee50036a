"""The project's error types: user errors become one line and exit 2 in the CLI."""

from __future__ import annotations


class GanbenchError(Exception):
    """A user-facing error: bad input, a missing file, an unreachable service.

    ``field`` optionally names the config field at fault (used to build spec error paths).
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class SpecError(GanbenchError):
    """A study file is invalid; the message names the file and the field path."""

    def __init__(self, path: str, field: str, message: str) -> None:
        where = f"{path}: {field}" if field else path
        super().__init__(f"{where}: {message}", field)
        self.path, self.message = path, message


class NoStudy(GanbenchError):
    """The study (or its storage) does not exist yet."""


def lookup(registry: dict, name: str, kind: str, field: str | None = None):
    """Return ``registry[name]`` or raise a GanbenchError listing the valid choices."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        choices = ", ".join(sorted(registry))
        raise GanbenchError(f"unknown {kind} {name!r}; choose one of: {choices}",
                            field or kind) from None
