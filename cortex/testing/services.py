"""Private PostgreSQL and Redis servers for tests and benchmarks.

Scale-out code must be tested against the real servers, not fakes: each class here starts its
own throwaway instance in a temporary folder on a free loopback port, tuned for speed (no fsync,
no persistence), and removes every trace on ``stop()``::

    with PostgresServer() as pg, RedisServer() as redis:
        url = pg.create_database("t_example")  # postgresql+asyncpg://postgres@127.0.0.1:PORT/...
        redis.url                              # redis://127.0.0.1:PORT/0

The methods block; call them through ``asyncio.to_thread`` from async code.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import IO, Self

__all__ = ["PostgresServer", "RedisServer", "free_port"]

# Every wait is bounded: a server that is not up by then will not come up.
READY_TIMEOUT = 20.0

POSTGRES_MISSING = (
    "PostgreSQL is not installed: run scripts/test.sh (it installs Debian's postgresql) "
    "or apt-get install postgresql"
)
REDIS_MISSING = (
    "Redis is not installed: run scripts/test.sh (it installs Debian's redis-server) "
    "or apt-get install redis-server"
)


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _log_tail(path: Path, lines: int = 20) -> str:
    """The end of a server's log, to explain why it did not start."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _postgres_bindir() -> Path:
    """The newest PostgreSQL server binaries: Debian's versioned dirs, then pg_config, PATH."""
    candidates: list[Path] = []
    versions = Path("/usr/lib/postgresql").glob("*/bin")

    def version_key(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    candidates.extend(sorted(versions, key=version_key, reverse=True))
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(Path(out.stdout.strip()))
    initdb = shutil.which("initdb")
    if initdb is not None:
        candidates.append(Path(initdb).parent)
    for bindir in candidates:
        if all((bindir / name).is_file() for name in ("initdb", "pg_ctl", "createdb")):
            return bindir
    raise RuntimeError(POSTGRES_MISSING)


class _Service(ABC):
    """A server a test starts and stops: `with Server() as server:`."""

    @abstractmethod
    def start(self) -> None:
        """Start the server and wait until it answers."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the server and remove its files."""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class PostgresServer(_Service):
    """A throwaway PostgreSQL cluster: ``initdb`` + ``pg_ctl start`` in a temporary folder.

    PostgreSQL refuses to run as root, so as root the cluster belongs to the ``postgres``
    system user (Debian's package creates it) and its binaries run through ``runuser``.
    Authentication is ``trust``: only this machine's loopback can reach it.
    """

    def __init__(self) -> None:
        self.port = 0
        self.folder: Path | None = None
        self._bindir: Path | None = None
        self._as_postgres = os.geteuid() == 0

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of one database on this server."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def running(self) -> bool:
        return self.folder is not None

    def _server_cmd(self, *args: str) -> list[str]:
        """A server binary's command line, run as the ``postgres`` user when we are root."""
        assert self._bindir is not None
        cmd = [str(self._bindir / args[0]), *args[1:]]
        if self._as_postgres:
            return ["runuser", "-u", "postgres", "--", *cmd]
        return cmd

    def _run(self, cmd: list[str], what: str, timeout: float = 60.0) -> None:
        """Run a command to completion; raise with its output if it fails."""
        result = subprocess.run(
            cmd,
            cwd=self.folder,  # postgres' binaries warn when they cannot read the cwd
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{what} failed (exit {result.returncode}): {result.stdout}{result.stderr}"
            )

    def start(self) -> None:
        """Create the cluster and start it; return once it accepts connections."""
        if self.running:
            return
        self._bindir = _postgres_bindir()
        owner: pwd.struct_passwd | None = None
        if self._as_postgres:
            if shutil.which("runuser") is None:
                raise RuntimeError("running PostgreSQL as root needs runuser (util-linux)")
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError(
                    "PostgreSQL refuses to run as root and there is no 'postgres' user: "
                    + POSTGRES_MISSING
                ) from None
        # /tmp is traversable by every user, unlike root's TMPDIR or home.
        folder = Path(
            tempfile.mkdtemp(prefix="cortex-pg-", dir="/tmp" if self._as_postgres else None)
        )
        self.folder = folder
        try:
            (folder / "sock").mkdir()
            if owner is not None:
                for path in (folder, folder / "sock"):
                    os.chown(path, owner.pw_uid, owner.pw_gid)
            data = folder / "data"
            self._run(
                self._server_cmd(
                    "initdb",
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ),
                "initdb",
            )
            self._start_on_free_port(data)
        except BaseException:
            self.stop()
            raise
        atexit.register(self.stop)

    def _start_on_free_port(self, data: Path, attempts: int = 3) -> None:
        """Start the cluster, picking another port if someone took ours meanwhile."""
        assert self.folder is not None
        for attempt in range(attempts):
            self.port = free_port()
            settings = {
                "port": str(self.port),
                "listen_addresses": "'127.0.0.1'",
                "unix_socket_directories": f"'{self.folder / 'sock'}'",
                "fsync": "off",
                "synchronous_commit": "off",
                "full_page_writes": "off",
                "max_connections": "300",
            }
            # postgresql.auto.conf is read last; rewriting it replaces the previous attempt's port.
            (data / "postgresql.auto.conf").write_text(
                "".join(f"{key} = {value}\n" for key, value in settings.items())
            )
            log = self.folder / "postgres.log"
            try:
                self._run(
                    self._server_cmd(
                        "pg_ctl",
                        "start",
                        "-D",
                        str(data),
                        "-l",
                        str(log),
                        "-w",
                        "-t",
                        str(int(READY_TIMEOUT)),
                    ),
                    "pg_ctl start",
                    timeout=READY_TIMEOUT + 10,
                )
                return
            except RuntimeError as exc:
                if attempt == attempts - 1:
                    raise RuntimeError(f"{exc}\n{_log_tail(log)}") from None

    def create_database(self, name: str) -> str:
        """Create an empty database and return its URL: one per test, cheap and isolated."""
        if not self.running or self._bindir is None:
            raise RuntimeError("PostgresServer is not running")
        self._run(
            [
                str(self._bindir / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-w",
                name,
            ],
            f"createdb {name}",
            timeout=READY_TIMEOUT,
        )
        return self.url(name)

    def stop(self) -> None:
        """Stop the server at once (nothing to keep) and delete its folder."""
        folder, self.folder = self.folder, None
        if folder is None:
            return
        atexit.unregister(self.stop)
        data = folder / "data"
        if (data / "postmaster.pid").exists():
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    self._server_cmd("pg_ctl", "stop", "-D", str(data), "-m", "immediate", "-w"),
                    cwd=folder,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=READY_TIMEOUT,
                    check=False,
                )
        shutil.rmtree(folder, ignore_errors=True)


def _redis_answers(port: int) -> bool:
    """Whether a Redis server on this port answers PING (raw RESP, no client library)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer(_Service):
    """A throwaway ``redis-server`` subprocess with no persistence.

    ``kill()`` then ``start()`` simulates Redis dying and coming back on the same port, empty.
    """

    def __init__(self) -> None:
        self.port = 0
        self.folder: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server (again, on the same port after ``kill()``) and wait for PONG."""
        if self.running:
            return
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(REDIS_MISSING)
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="cortex-redis-"))
            self.port = free_port()
            atexit.register(self.stop)
        log_path = self.folder / "redis.log"
        self._close_log()
        self._log = log_path.open("ab")
        self._process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + READY_TIMEOUT
        while not _redis_answers(self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"redis-server did not start on port {self.port}:\n{_log_tail(log_path)}"
                )
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL the server, as a crash would; ``start()`` brings it back."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
        if process is not None:
            process.wait(timeout=READY_TIMEOUT)
        self._close_log()

    def stop(self) -> None:
        """Stop the server cleanly (SIGTERM, then SIGKILL) and delete its folder."""
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        self.kill()
        folder, self.folder = self.folder, None
        if folder is not None:
            atexit.unregister(self.stop)
            shutil.rmtree(folder, ignore_errors=True)

    def _close_log(self) -> None:
        log, self._log = self._log, None
        if log is not None:
            log.close()
