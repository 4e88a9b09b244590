#!/usr/bin/env bash
# Set up everything the tests need on a fresh Debian machine, then run lint, types and tests.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests drive for real: Chromium (chat page), PostgreSQL and Redis
# (scale-out), nginx (load balancer in front of several nodes). Installed only when missing;
# needs root or sudo.
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need+=(postgresql)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing Debian packages: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# Exact versions from the lock (requirements/lock.txt), the installer and build backend too.
.venv/bin/python -m pip install -q -c requirements/lock.txt --upgrade pip
.venv/bin/python -m pip install -q -c requirements/lock.txt --build-constraint requirements/lock.txt -e '.[test]'

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
