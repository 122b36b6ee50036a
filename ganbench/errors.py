"""The project's error types: user errors become one line and exit 2 in the CLI."""

from __future__ import annotations

import re

# A URL in any text, up to whitespace or a quote; password-like query values in it.
_URL = re.compile(r"[A-Za-z][\w+.-]*://[^\s'\"]+")
_SECRET_QUERY = re.compile(r"(?i)\b(password|passwd|pwd|token|secret|api_key)=([^&\s'\"]*)")


def redact(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ***.

    The credentials end at the *last* ``@`` of the URL, so an unencoded ``@`` inside a
    password stays hidden; password-like query parameters (``?password=…``) are hidden too.
    Every URL shown, logged or tagged goes through here.
    """
    def one(match: re.Match) -> str:
        scheme, _, rest = match.group(0).partition("://")
        cred, at, host = rest.rpartition("@")
        url = f"{scheme}://{cred.split(':', 1)[0]}:***@{host}" if at and ":" in cred \
            else match.group(0)
        return _SECRET_QUERY.sub(r"\1=***", url)

    return _URL.sub(one, text)


MAX_MESSAGE = 600


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` with line breaks shown as ``\\n`` and cut to ``limit`` characters."""
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit - 1] + "…"


class GanbenchError(Exception):
    """A user-facing error: bad input, a missing file, an unreachable service.

    ``field`` optionally names the config field at fault (used to build spec error paths).
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        # Printed as one line: no URL leaves with a password, no echoed value runs on.
        super().__init__(one_line(redact(message)))
        self.field = field


class SpecError(GanbenchError):
    """A study file is invalid; the message names the file and the field path."""

    def __init__(self, path: str, field: str, message: str) -> None:
        where = f"{path}: {field}" if field else path
        super().__init__(f"{where}: {message}", field)
        self.path, self.message = path, one_line(redact(message))


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
