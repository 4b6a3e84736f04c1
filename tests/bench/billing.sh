#!/usr/bin/env bash
# The ledger's speed: durable reserve + settle pairs/s and their latency
# (`infermesh bench-billing`) on SQLite at 64, 1,024 and 4,096 requests in
# flight, then on a throwaway PostgreSQL 15 server (fsync on, as a
# production server runs) when its binaries are installed. Writes
# tests/bench/results/billing.md.
set -euo pipefail
source "$(dirname "$0")/release.sh"
seconds="${SECONDS_PER_RUN:-10}"
export RUST_LOG="${RUST_LOG:-warn}"
pg_bin=/usr/lib/postgresql/15/bin
pg_dir=""
as_postgres() {
  if [ "$(id -u)" = 0 ]; then setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; else "$@"; fi
}
stop_postgres() {
  if [ -n "$pg_dir" ]; then as_postgres "$pg_bin/pg_ctl" -D "$pg_dir/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$pg_dir"; fi
}
trap stop_postgres EXIT
out=tests/bench/results/billing.md
{
  echo "# Ledger benchmark"
  echo
  echo "$(nproc) cores ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)); $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Each pair is a Reserve then a Settle of one request, each answered only once its batch is durable"
  echo "(SQLite: WAL, synchronous FULL; PostgreSQL: fsync on). Usage events go to the outbox and are drained from it as by the NATS publisher (minus the network)."
  echo "Request ids are the gateway's (time-ordered UUIDv7)."
  echo
  echo "## SQLite"
  echo
  echo '```'
  for inflight in 64 1024 4096; do
    "$bin" bench-billing --concurrency "$inflight" --seconds "$seconds" | tail -1 | sed "s/^/$inflight in flight: /"
  done
  echo '```'
  if [ -x "$pg_bin/initdb" ]; then
    pg_dir=$(mktemp -d)
    chmod 755 "$pg_dir"
    [ "$(id -u)" = 0 ] && chown postgres "$pg_dir"
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    as_postgres "$pg_bin/initdb" -D "$pg_dir/data" -U postgres --auth=trust >/dev/null
    as_postgres "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/log" -w \
      -o "-p $port -k $pg_dir -c listen_addresses=127.0.0.1" start >/dev/null
    as_postgres "$pg_bin/createdb" -h 127.0.0.1 -p "$port" -U postgres bench
    echo
    echo "## PostgreSQL 15"
    echo
    echo '```'
    for inflight in 64 1024 4096; do
      "$bin" bench-billing --database-url "postgres://postgres@127.0.0.1:$port/bench" \
        --concurrency "$inflight" --seconds "$seconds" | tail -1 | sed "s/^/$inflight in flight: /"
    done
    echo '```'
  fi
} | tee "$out"
