#!/usr/bin/env bash
# What a gateway adds per call (issue: the hot path): the instant mock
# upstream directly, then behind infermesh (every check on), TensorZero and
# LiteLLM, under `oha` at constant rates (tests/bench/overhead.py). Installs
# what it needs outside the clone: a venv with `tensorzero`,
# `litellm[proxy]`, `nats-py` and matplotlib, and `oha` from crates.io.
# Writes tests/bench/results/overhead.{md,json,png}. Options go to
# overhead.py (e.g. --rates 250,1000 --seconds 10).
set -euo pipefail
source "$(dirname "$0")/release.sh"
venv="$cache/bench-venv"
if [ ! -x "$venv/bin/litellm" ] || ! "$venv/bin/python" -c 'import tensorzero, nats, matplotlib' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q tensorzero 'litellm[proxy]' nats-py matplotlib
fi
oha=$(command -v oha || true)
if [ -z "$oha" ]; then
  cargo install oha --locked --root "$cache/tools"
  oha="$cache/tools/bin/oha"
fi
nats_server=$(command -v nats-server || echo "$PWD/.venv/bin/nats-server")
[ -x "$nats_server" ] || { echo "nats-server is missing: run scripts/setup.sh" >&2; exit 1; }
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# NATS is infrastructure outside the gateway (`up` dials it), like the
# mock: it shares the first core with them, not the gateway's.
taskset -c 0 "$nats_server" -a 127.0.0.1 -p "$port" -js -sd "$work/nats" >/dev/null 2>&1 &
nats_pid=$!
trap 'kill $nats_pid 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
sleep 1
"$venv/bin/python" tests/bench/overhead.py --bin "$bin" --python "$venv/bin/python" --litellm "$venv/bin/litellm" \
  --oha "$oha" --nats-url "nats://127.0.0.1:$port" "$@"
