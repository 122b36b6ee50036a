"""Where a result came from: the command line, the code, the libraries, the machine and the
workers, recorded in the study storage when a sweep or comparison runs and written beside
its report (``provenance.json``), on its page, and as tags of its MLflow parent run.

Nothing here imports torch or the plotting stack: versions are read from the installed
packages' metadata.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

# The libraries a report names; those in ROUNDING compute the numbers (training, metrics,
# statistics): another version of one of them may round differently, so a result is only
# re-checked bit for bit with the same versions.
LIBRARIES = ("torch", "optuna", "mlflow", "numpy", "scipy", "pot", "pandas")
ROUNDING = ("torch", "numpy", "scipy", "pot")

# The command line of this process, set by the CLI (None when called from Python).
COMMAND: list[str] | None = None


def command_line() -> str | None:
    """This process's ganbench command line, shell-quoted (None from Python)."""
    return None if COMMAND is None else shlex.join(COMMAND)


def code_version() -> dict[str, Any]:
    """The ganbench version, and the git commit of its source tree with whether the package
    or its project file differed from it (None where it is not a git checkout)."""
    root = Path(__file__).resolve().parent.parent
    out: dict[str, Any] = {"ganbench": _version("ganbench"), "commit": None, "dirty": None}

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                  text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit:
        # The code only: studies are recorded whole, and reports change as runs write them.
        status = git("status", "--porcelain", "--", "ganbench", "pyproject.toml")
        out |= {"commit": commit, "dirty": bool(status) if status is not None else None}
    return out


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def libraries() -> dict[str, str | None]:
    """Installed versions of the libraries in LIBRARIES (None if absent)."""
    return {name: _version(name) for name in LIBRARIES}


def cpu_name() -> str:
    """The processor's model name (Linux), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect(spec: dict[str, Any], devices: list[str], sampler_seeds: dict[str, int | None],
            threads: int) -> dict[str, Any]:
    """One run's provenance: the command line, the spec as run (every override applied,
    URLs without their passwords), code and library versions, the machine, devices and
    workers, each study's sampler seed, and when it started."""
    return {
        "command": command_line(),
        **code_version(),
        "python": platform.python_version(),
        "libraries": libraries(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "devices": sorted(set(devices)),
        "workers": len(devices),
        "torch_threads": threads,
        "sampler_seeds": sampler_seeds,
        "seed_rule": "trial n of a study samples with sha256([study seed, n]) "
                     "(ganbench.study.derive_seed)",
        "started": now(),
        "spec": spec,
    }


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def finished(entry: dict[str, Any], seconds: float) -> dict[str, Any]:
    """``entry`` with its end time and wall seconds."""
    return entry | {"finished": now(), "wall_seconds": round(seconds, 1)}


def tags(entry: dict[str, Any]) -> dict[str, str]:
    """The provenance as MLflow tags of a parent run (``ganbench.*``)."""
    out = {"ganbench.command": entry.get("command") or "(from Python)",
           "ganbench.version": str(entry.get("ganbench")),
           "ganbench.commit": str(entry.get("commit")),
           "ganbench.dirty": str(entry.get("dirty")),
           "ganbench.python": str(entry.get("python")),
           "ganbench.devices": ",".join(entry.get("devices", [])),
           "ganbench.workers": str(entry.get("workers")),
           "ganbench.cpu": str(entry.get("cpu"))}
    out |= {f"ganbench.lib.{k}": str(v) for k, v in entry.get("libraries", {}).items()}
    return out


def rounding_differences(recorded: dict[str, Any]) -> list[str]:
    """The libraries in ROUNDING whose installed version differs from ``recorded``'s (and
    Python's), as "name recorded → installed"."""
    here = libraries()
    out = [f"{name} {recorded.get('libraries', {}).get(name)} → {here[name]}"
           for name in ROUNDING if recorded.get("libraries", {}).get(name) != here[name]]
    return out


def record(study: Any, entry: dict[str, Any]) -> None:
    """Append ``entry`` to the study's recorded runs (user attribute ``provenance``), or
    replace the entry of the same run (same start and command) with it."""
    runs = [r for r in study.user_attrs.get("provenance", [])
            if (r.get("started"), r.get("command")) != (entry["started"], entry["command"])]
    study.set_user_attr("provenance", runs + [entry])


# Options of `sweep` and `compare` that change how a study runs, not what it holds: the
# report command leaves them out (value-taking ones with their value); --out is the
# report's own, added where it was given.
_RUN_ONLY = {"--workers": 1, "--devices": 1, "--population": 1, "--compile": 0,
             "--tracking-uri": 1, "--debug": 0, "--out": 1, "--ray": 1}


def report_command(runs: list[dict[str, Any]], out: str | os.PathLike | None = None) -> str:
    """The ``ganbench report`` command that rebuilds what the last recorded run made: its
    spec and the options that define the study (``--trials N`` as ``--set trials=N``), and
    ``--out`` where the report was written somewhere other than the default folder."""
    command = next((r["command"] for r in reversed(runs) if r.get("command")), None)
    if command is None:
        return "ganbench report SPEC (with the --set options of the run)" + (
            f" --out {out}" if out else "")
    argv = shlex.split(command)[2:]  # after "ganbench <command>"
    words, i = ["ganbench", "report"], 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if name in _RUN_ONLY:
            i += 1 + (_RUN_ONLY[name] if "=" not in arg else 0)
            continue
        if name == "--trials":
            value = arg.split("=", 1)[1] if "=" in arg else argv[i + 1]
            words += ["--set", f"trials={value}"]
            i += 1 if "=" in arg else 2
            continue
        words.append(arg)
        i += 1
    return shlex.join(words + (["--out", str(out)] if out else []))
