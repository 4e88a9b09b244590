#!/usr/bin/env bash
# Set up a venv, install Cortex, migrate the database and serve (the mock model answers when
# no provider key is set). Settings come from CORTEX_* variables or a .env file.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# Exact versions from the lock (requirements/lock.txt), the installer and build backend too.
.venv/bin/python -m pip install -q -c requirements/lock.txt --upgrade pip
.venv/bin/python -m pip install -q -c requirements/lock.txt --build-constraint requirements/lock.txt -e .
exec .venv/bin/cortex serve "$@"
