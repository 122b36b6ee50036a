"""The project's error types: user errors become one line and exit 2 in the CLI."""

from __future__ import annotations


class GanbenchError(Exception):
    """A user-facing error: bad input, a missing file, an unreachable service."""


class SpecError(GanbenchError):
    """A study file is invalid; the message names the file and the field path."""

    def __init__(self, path: str, field: str, message: str) -> None:
        self.path, self.field, self.message = path, field, message
        where = f"{path}: {field}" if field else path
        super().__init__(f"{where}: {message}")


def lookup(registry: dict, name: str, kind: str):
    """Return ``registry[name]`` or raise a GanbenchError listing the valid choices."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        choices = ", ".join(sorted(registry))
        raise GanbenchError(f"unknown {kind} {name!r}; choose one of: {choices}") from None
