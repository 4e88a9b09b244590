"""nginx in front of several Cortex processes, for the scale-out bench (bench/scale.py).

nginx runs in the foreground (`daemon off;`) with a generated configuration in a temporary
folder that also holds its pid file, error log and temp paths, so nothing of the system's
nginx setup is read or written. One `upstream` lists the Cortex ports, balanced plain
round-robin (no sticky sessions): consecutive connections go to consecutive processes.
WebSocket upgrades are passed through (HTTP/1.1, `Upgrade`/`Connection` headers) with a long
read timeout and no buffering, and `Host` is passed on unchanged: with auth off, Cortex on
loopback only accepts a loopback name in `Host`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from cortex.testing.processes import Child, log_tail

NGINX = "/usr/sbin/nginx"
READY_TIMEOUT = 20.0

_CONFIG = """\
{user}worker_processes {workers};
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;

events {{
    worker_connections 16384;
}}

http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}

    upstream cortex {{
{servers}
    }}

    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://cortex;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            proxy_buffering off;
        }}
    }}
}}
"""


def nginx_binary() -> str | None:
    return NGINX if os.access(NGINX, os.X_OK) else shutil.which("nginx")


def write_config(folder: Path, port: int, upstreams: Sequence[int], workers: int = 1) -> Path:
    """The configuration of a proxy on 127.0.0.1:`port` to the Cortex `upstreams` ports."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "nginx.conf"
    config.write_text(
        _CONFIG.format(
            user="user root;\n" if os.geteuid() == 0 else "",
            workers=workers,
            tmp=folder,
            port=port,
            servers="\n".join(f"        server 127.0.0.1:{p};" for p in upstreams),
        )
    )
    return config


async def _accepts(port: int) -> bool:
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def start_nginx(folder: Path, port: int, upstreams: Sequence[int], workers: int = 1) -> Child:
    """nginx in the foreground, proxying 127.0.0.1:`port` to `upstreams`; returns once it
    accepts connections. `Child.stop()` (SIGTERM: fast shutdown) ends it."""
    binary = nginx_binary()
    if binary is None:
        raise RuntimeError("nginx is not installed (apt-get install nginx-light)")
    config = write_config(folder, port, upstreams, workers)
    log_path = folder / "error.log"
    with (folder / "stderr.log").open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            binary,
            "-p",
            str(folder),
            "-e",
            str(log_path),
            "-c",
            str(config),
            "-g",
            "daemon off;",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )
    child = Child("nginx", proc, log_path, url=f"ws://127.0.0.1:{port}/ws")
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            while not await _accepts(port):
                if proc.returncode is not None:
                    raise RuntimeError(
                        f"nginx exited with code {proc.returncode}:\n"
                        f"{log_tail(folder / 'stderr.log')}{log_tail(log_path)}"
                    )
                await asyncio.sleep(0.05)
    except TimeoutError:
        await child.stop(timeout=5)
        raise RuntimeError(
            f"nginx did not accept on port {port} within {READY_TIMEOUT:g} s"
        ) from None
    except BaseException:
        await child.stop(timeout=5)
        raise
    return child


def nginx_problems(path: Path, limit: int = 10) -> tuple[int, list[str]]:
    """Lines of nginx's error log at level error or worse: count and first ones."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return 0, []
    bad = [
        line
        for line in text.splitlines()
        if any(f"[{level}]" in line for level in ("error", "crit", "alert", "emerg"))
    ]
    return len(bad), bad[:limit]
