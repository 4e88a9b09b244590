#!/usr/bin/env bash
# Refresh requirements/lock.txt: exact versions, from today's releases, within the ranges in
# pyproject.toml, for every platform and for Python 3.11 and newer. Run it, then scripts/test.sh,
# and commit both files. Usage: scripts/lock.sh [uv pip compile args, e.g. --upgrade-package X]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q -c requirements/lock.txt uv
.venv/bin/uv pip compile --quiet --universal --python-version 3.11 --upgrade \
  --extra test --custom-compile-command scripts/lock.sh \
  pyproject.toml requirements/tools.in -o requirements/lock.txt "$@"
echo "requirements/lock.txt refreshed; now run scripts/test.sh"
