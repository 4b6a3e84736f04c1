#!/usr/bin/env bash
# The async job queue (`infermesh bench-jobs`): jobs per second through the
# jobs service alone, the latency a queued job adds over a synchronous call
# for a short completion, and a saturating burst of queued jobs beside the
# same number of synchronous calls. One `infermesh up` (release build);
# writes tests/bench/results/jobs.md.
set -euo pipefail
source "$(dirname "$0")/release.sh"
export RUST_LOG="${RUST_LOG:-warn}"
work=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
"$bin" up --http "127.0.0.1:$port" --data-dir "$work/up" --no-nats --signups-per-minute-per-ip 0 \
  --job-runner-slots 8 >"$work/up.log" 2>&1 &
pid=$!
for _ in $(seq 600); do curl -fs "$base/readyz" >/dev/null 2>&1 && break; sleep 0.5; done
curl -fs "$base/readyz" >/dev/null || { echo "up never became ready" >&2; cat "$work/up.log" >&2; exit 1; }
out=tests/bench/results/jobs.md
{
  echo "# Async jobs"
  echo
  echo "$(nproc) cores ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)); $(date -u '+%Y-%m-%d %H:%M UTC')."
  echo "One \`infermesh up\` (release; Gemma 3 270M Q4_K_M on CPU; jobs on SQLite; 8 job-runner slots; tenants"
  echo "run 2 jobs at once). Reproduce: \`./tests/bench/jobs.sh\`."
  echo
  "$bin" bench-jobs --base "$base" "$@"
} | tee "$out"
