#!/usr/bin/env bash
# Make .venv-proxy: LiteLLM's proxy for bench/peer_litellm_proxy.py, from bench/requirements-proxy.txt
# (its own venv: the proxy's pins differ from Cortex's lock). Then:
#   .venv/bin/python bench/peer_litellm_proxy.py --proxy .venv-proxy/bin/litellm
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv-proxy/bin/python ] || "$PYTHON" -m venv .venv-proxy
.venv-proxy/bin/python -m pip install -q uv
.venv-proxy/bin/uv pip install -q --python .venv-proxy/bin/python -r bench/requirements-proxy.txt
echo "LiteLLM's proxy: .venv-proxy/bin/litellm"
