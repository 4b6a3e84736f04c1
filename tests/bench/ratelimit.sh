#!/usr/bin/env bash
# Admission speed: Acquire calls/s and latency over loopback gRPC
# (`infermesh bench-ratelimit` at 1, 8 and 64 callers), then the whole-request
# overhead of rate limits through `infermesh up` (ratelimit.py, limits on vs
# off). Writes tests/bench/results/ratelimit.md.
set -euo pipefail
source "$(dirname "$0")/release.sh"
"$bin" fetch-models >/dev/null
out=tests/bench/results/ratelimit.md
{
  echo "# Admission benchmark"
  echo
  echo "$(nproc) cores ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)); $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "## Acquire over loopback gRPC (\`infermesh bench-ratelimit\`, client and server on the same cores)"
  echo
  echo '```'
  for callers in 1 8 64; do
    "$bin" bench-ratelimit --concurrency "$callers" --seconds "${SECONDS_PER_RUN:-10}" | tail -2
  done
  echo '```'
  echo
  echo "## Per-request overhead through the gateway (\`tests/bench/ratelimit.py\`)"
  echo
  python3 tests/bench/ratelimit.py --infermesh "$bin" "$@"
} | tee "$out"
