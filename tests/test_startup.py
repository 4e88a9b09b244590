"""What stops `cortex serve` and `cortex migrate` from starting is said in one line, exit 2.

Each case runs the real command in a subprocess and checks stderr: one `cortex:` line naming
the path or the setting, and never a traceback.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest


def cortex(*args: str, cwd: Path, database: Path | str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CORTEX_", "LLM_"))}
    env["CORTEX_DATABASE_URL"] = f"sqlite+aiosqlite:///{database}"
    return subprocess.run(
        [sys.executable, "-m", "cortex", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def refusal(done: subprocess.CompletedProcess[str]) -> str:
    """The one `cortex:` line of a refused start (log lines may come before it)."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("cortex:")]
    return line


@pytest.mark.parametrize("command", ["serve", "migrate", "token list"])
def test_a_missing_database_folder_is_named(command: str, tmp_path: Path) -> None:
    database = tmp_path / "no" / "such" / "cortex.db"
    line = refusal(cortex(*command.split(), cwd=tmp_path, database=database))
    assert "CORTEX_DATABASE_URL" in line and str(tmp_path / "no" / "such") in line


def test_a_database_folder_that_is_a_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("not a folder")
    line = refusal(cortex("serve", cwd=tmp_path, database=tmp_path / "plain" / "cortex.db"))
    assert f"{tmp_path / 'plain'} is not a folder" in line


def test_a_port_in_use_is_named(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = cortex("serve", "--port", str(port), cwd=tmp_path, database=tmp_path / "c.db")
    line = refusal(done)
    assert f"cannot listen on 127.0.0.1:{port}" in line and "in use" in line
    assert "CORTEX_PORT" in line


def test_a_database_from_a_newer_cortex_is_refused(tmp_path: Path) -> None:
    database = tmp_path / "c.db"
    assert cortex("migrate", cwd=tmp_path, database=database).returncode == 0
    with sqlite3.connect(database) as db:
        db.execute("UPDATE alembic_version SET version_num = '0999'")
    for command in ("serve", "migrate"):
        line = refusal(cortex(command, cwd=tmp_path, database=database))
        assert "revision 0999" in line and "newer Cortex" in line
    with sqlite3.connect(database) as db:  # refused, not half-migrated
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("0999",)]


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_version_and_help_answer_without_importing_litellm(flag: str, tmp_path: Path) -> None:
    probe = (
        "import sys\n"
        "from cortex.cli import main\n"
        "try:\n"
        f"    main([{flag!r}])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('litellm', 'sqlalchemy', 'websockets') if m in sys.modules]\n"
        "print('heavy:', ','.join(heavy))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("heavy:"), done.stdout
