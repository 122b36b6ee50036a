"""Real services for tests: a PostgreSQL server and an MLflow tracking server on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """initdb into a temp dir and pg_ctl on a free loopback port, as the postgres user."""

    def __init__(self, password: str | None = None) -> None:
        """``password``: TCP logins need it (scram-sha-256) as user ``ganbench``; otherwise
        every login is trusted."""
        self.password = password
        bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                                check=True).stdout.strip()
        self.bin = Path(bindir)
        self.dir = Path(tempfile.mkdtemp(prefix="ganbench-pg-"))
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"

    def _run(self, *args: str) -> None:
        cmd = list(args)
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def start(self) -> "Postgres":
        auth = ["--auth-local=trust", "--auth-host=scram-sha-256"] if self.password \
            else ["--auth=trust"]
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", *auth,
                  "-E", "UTF8")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"),
                  "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "-w",
                  "start")
        # Administration over the Unix socket (trusted), clients over TCP.
        self._run(str(self.bin / "createdb"), "-h", str(self.dir), "-p", str(self.port),
                  "-U", "postgres", "ganbench")
        if self.password:
            escaped = self.password.replace("'", "''")
            self._run(str(self.bin / "psql"), "-h", str(self.dir), "-p", str(self.port),
                      "-U", "postgres", "-d", "ganbench", "-c",
                      f"CREATE ROLE ganbench LOGIN PASSWORD '{escaped}'; "
                      "GRANT ALL ON SCHEMA public TO ganbench")
        return self

    @property
    def url(self) -> str:
        if self.password:
            from urllib.parse import quote

            return (f"postgresql://ganbench:{quote(self.password, safe='')}@127.0.0.1:"
                    f"{self.port}/ganbench")
        return f"postgresql://postgres@127.0.0.1:{self.port}/ganbench"

    def halt(self) -> None:
        """Stop the server, keeping its data (a restart follows with ``resume``)."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def resume(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"),
                  "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "-w",
                  "start")

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class MlflowServer:
    """``mlflow server`` with a sqlite backend in a temp dir, waited for via /health."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> "MlflowServer":
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=open(self.root / "server.log", "w"), stderr=subprocess.STDOUT,
            start_new_session=True)
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError((self.root / "server.log").read_text()[-2000:])
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not become healthy")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
