#!/usr/bin/env bash
# The latency the upstream-provider path adds: a second `infermesh up`
# serves as the OpenAI-compatible upstream of the first, whose catalogue
# lists a model served by it (`openai_compatible` backend). The same
# streamed completion then goes, alternately, straight to the upstream and
# through the front gateway (`infermesh bench-proxy`). Writes
# tests/bench/results/proxy.md.
set -euo pipefail
source "$(dirname "$0")/release.sh"
export RUST_LOG="${RUST_LOG:-warn}"
requests="${REQUESTS:-50}"
work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
start_up() { # name port [flags...]
  local name=$1 port=$2; shift 2
  "$bin" up --http "127.0.0.1:$port" --data-dir "$work/$name" --no-nats --no-rate-limits "$@" >"$work/$name.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 600); do curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && return; sleep 0.5; done
  echo "$name never became ready" >&2; cat "$work/$name.log" >&2; exit 1
}
signup() { curl -fs "$1/v1/auth/signup" -d "{\"email\":\"$2\"}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])'; }

upstream_port=$(free_port); front_port=$(free_port)
upstream="http://127.0.0.1:$upstream_port"; front="http://127.0.0.1:$front_port"
cat >"$work/front.toml" <<'TOML'
default_plan = "open"
[[plans]]
id = "open"
name = "Open"
models = ["*"]
included_tokens_per_month = 0
TOML
start_up upstream "$upstream_port"
start_up front "$front_port" --admin-token bench-admin --config "$work/front.toml"
upstream_key=$(signup "$upstream" upstream@bench.local)
front_key=$(signup "$front" client@bench.local)
curl -fs -X PUT "$front/admin/v1/models/bench/relayed-gemma" -H 'Authorization: Bearer bench-admin' -d "{
  \"context_length\": 32768, \"pricing\": {\"prompt\": 0.03, \"completion\": 0.06},
  \"backends\": [{\"kind\": \"openai_compatible\", \"name\": \"upstream-infermesh\", \"base_url\": \"$upstream/v1\",
                  \"model\": \"infermesh/gemma-3-270m\", \"api_key\": \"$upstream_key\"}]}" >/dev/null
sleep 1
out=tests/bench/results/proxy.md
{
  echo "# Upstream-provider proxy latency"
  echo
  echo "$(nproc) cores ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)); $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Upstream: a second \`infermesh up\` (Gemma 3 270M on CPU). Each request: a chat completion, streamed, 16 tokens,"
  echo "greedy; direct and proxied requests alternate, one at a time, after one warm-up each."
  echo
  "$bin" bench-proxy --direct-url "$upstream/v1" --direct-key "$upstream_key" --direct-model infermesh/gemma-3-270m \
    --proxied-url "$front/v1" --proxied-key "$front_key" --proxied-model bench/relayed-gemma --requests "$requests"
} | tee "$out"
