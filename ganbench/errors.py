"""The project's error types: user errors become one line and exit 2 in the CLI."""

from __future__ import annotations

import re
from typing import Any, Iterator

# A URL in free text, up to whitespace or a quote; password-like query values in it.
_URL = re.compile(r"[A-Za-z][\w+.-]*://[^\s'\"]+")
_SECRET_QUERY = re.compile(r"(?i)\b(password|passwd|pwd|token|secret|api_key)=([^&\s'\"]*)")
# Passwords of the URLs this process was given (specs, --storage, --tracking-uri, MLflow's
# environment), in every form they can be printed in: hidden wherever they appear.
_SECRETS: set[str] = set()


def split_credentials(url: str) -> tuple[str, str | None, str]:
    """``scheme://user:password@rest`` → (``scheme://user``, password, ``rest``), parsed as
    RFC 3986 reads a URL: the user info ends at the last ``@`` before the path, so an
    unencoded ``@``, ``:``, space or quote inside a password stays in it. No password:
    (url, None, "")."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url, None, ""
    # The authority ends at the first / ? # after the user info; the user info at the last
    # @ before that. A password may hold / ? #, so look for the last @ whose tail is a host.
    at = rest.rfind("@")
    while at != -1:
        tail = rest[at + 1:]
        if re.match(r"^[\w.\-\[\]]+(:\d*)?([/?#]|$)", tail):
            break
        at = rest.rfind("@", 0, at)
    if at == -1 or ":" not in rest[:at]:
        return url, None, ""
    user, _, password = rest[:at].partition(":")
    return f"{scheme}://{user}", password, rest[at + 1:]


def register_secret_url(url: Any) -> None:
    """Remember the password of ``url`` (if any) so that ``redact`` hides it everywhere:
    raw, percent-decoded and -encoded, and escaped as repr and JSON print it."""
    if not isinstance(url, str):
        return
    _, password, _ = split_credentials(url)
    if password:
        register_secret(password)


def register_secret(secret: str) -> None:
    """Hide ``secret`` (and its encoded forms) in everything ``redact`` sees."""
    import json
    from urllib.parse import quote, unquote

    if not secret or secret == "***":
        return
    for form in (secret, unquote(secret)):
        for shown in (form, quote(form, safe=""), quote(form), repr(form)[1:-1],
                      json.dumps(form)[1:-1], json.dumps(form, ensure_ascii=False)[1:-1]):
            if len(shown) >= 2:  # one character would blank out unrelated text
                _SECRETS.add(shown)


def redact(text: str) -> str:
    """``text`` with every known password (see ``register_secret_url``) and the password of
    every URL in it replaced by ***; password-like query parameters (``?password=…``) are
    hidden too. Every URL shown, logged or tagged goes through here."""
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, "***")

    def one(match: re.Match) -> str:
        head, password, rest = split_credentials(match.group(0))
        url = match.group(0) if password in (None, "***", "PASSWORD") else \
            f"{head}:***@{rest}"
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

    def __init__(self, path: str, field: str, message: str,
                 more: "list[tuple[str, str]] | None" = None) -> None:
        problems = [(field, message), *(more or [])]
        # One line per problem (each cut and redacted as any error line is).
        Exception.__init__(self, "\n".join(one_line(redact(f"{path}: {f}: {m}" if f else
                                                          f"{path}: {m}"))
                                            for f, m in problems))
        self.field = field
        self.path, self.message = path, one_line(redact(message))
        self.problems = problems  # every error of the file, one per line


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


def exception_chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and what caused it (``__cause__``, else ``__context__``), each once."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__
