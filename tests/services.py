"""Real services for tests: a PostgreSQL server, an MLflow tracking server and a Ray cluster,
on loopback."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
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


class RayCluster:
    """A real Ray cluster on this machine: a head node (``ray start --head`` on 127.0.0.1)
    and a second node joining it, one CPU each, their files under ``root``. ``kill_node``
    SIGKILLs the second node's raylet, as a lost machine; ``stop`` ends this cluster's
    processes only (``ray stop`` would end every cluster of the machine)."""

    def __init__(self, root: Path, cpus: int = 1) -> None:
        # Ray's socket paths must stay short: its files go under a short /tmp folder.
        self.root = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))
        self.log = root / "ray.log"
        self.cpus = cpus
        self.port = free_port()
        self.node_ports = [free_port(), free_port()]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # Ray 2.5x turns token authentication on by itself when ~/.ray/auth_token exists (any
    # earlier ray.init() writes one), and then a joining node is refused: this test
    # cluster, its nodes and the commands that use it turn it off explicitly.
    ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}

    def _ray(self, *args: str) -> None:
        env = dict(os.environ, **self.ENV)
        with open(self.log, "a") as log:
            subprocess.run([str(Path(sys.executable).parent / "ray"), "start", *args,
                            f"--num-cpus={self.cpus}", "--disable-usage-stats"], check=True,
                           stdout=log, stderr=subprocess.STDOUT, timeout=180, env=env)

    def start(self) -> "RayCluster":
        try:
            self._ray("--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
                      "--include-dashboard=false", f"--temp-dir={self.root}",
                      f"--node-manager-port={self.node_ports[0]}")
            self.add_node()
        except BaseException:  # a half-started cluster is stopped, not left running
            self.stop()
            raise
        return self

    def add_node(self) -> None:
        """(Re)start the second node."""
        self._ray(f"--address={self.address}", "--node-ip-address=127.0.0.1",
                  f"--node-manager-port={self.node_ports[1]}")

    def _pids(self, needle: str) -> list[int]:
        pids = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    if needle in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                        pids.append(int(proc.name))
                except OSError:
                    continue
        return pids

    def _children(self, pids: list[int]) -> list[int]:
        found = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                if ppid in pids:
                    found.append(int(proc.name))
        return found

    def _kill(self, pids: list[int]) -> None:
        for pid in pids + self._children(pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def kill_node(self) -> None:
        """The second node is lost: its raylet and the processes it started, SIGKILLed."""
        self._kill(self._pids(f"--node_manager_port={self.node_ports[1]}"))

    def stop(self) -> None:
        self._kill(self._pids(str(self.root)))
        shutil.rmtree(self.root, ignore_errors=True)
