#!/usr/bin/env python3
"""Admission overhead: the same requests through `infermesh up` with rate
limits on and with `--no-rate-limits`, one after the other, same process
layout. Requests are sequential embeddings of one word (the cheapest route
that passes admission), after a warm-up; reports mean, p50 and p99 latency
of each and the difference, which is what Acquire + Commit add per request,
and the gateway's own timing of Acquire (its /metrics summary). Two `up`
processes differ by more than the Acquire call on this shared VM, so the
gateway-side timing is the sharper number.

    ./tests/bench/ratelimit.sh          # builds, runs bench-ratelimit, then this
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from engine import free_port, request, wait_for  # noqa: E402


def start(binary, data_dir, limits_on):
    port = free_port()
    args = [binary, "up", "--http", f"127.0.0.1:{port}", "--data-dir", data_dir, "--no-nats",
            "--signup-credit", "1000", "--free-requests-per-minute", "1000000", "--free-max-concurrent", "0"]
    if not limits_on:
        args.append("--no-rate-limits")
    process = subprocess.Popen(args, env=dict(os.environ, RUST_LOG="warn"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_for(f"{base}/readyz")
    with request(f"{base}/v1/auth/signup", {"email": "bench@example.com"}) as response:
        key = json.load(response)["key"]
    return process, base, key


def acquire_quantiles(base):
    """Quantiles of the gateway's infermesh_gateway_ratelimit_acquire_seconds
    histogram, in ms, interpolated within buckets as Prometheus's
    histogram_quantile does."""
    with request(f"{base}/metrics") as response:
        text = response.read().decode()
    buckets = []
    for line in text.splitlines():
        if line.startswith("infermesh_gateway_ratelimit_acquire_seconds_bucket{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(bound), float(line.split()[-1])))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0
    found = {}
    for q in ("0.5", "0.99"):
        rank = float(q) * total
        lower, below = 0.0, 0.0
        for bound, count in buckets:
            if count >= rank and count > below:
                upper = bound if bound != float("inf") else lower
                found[q] = (lower + (upper - lower) * (rank - below) / (count - below)) * 1000
                break
            lower, below = bound, count
    return found


def measure(base, key, count):
    body = {"model": "infermesh/all-minilm-l6-v2", "input": "hello"}
    for _ in range(50):
        request(f"{base}/v1/embeddings", body, key).read()
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        with request(f"{base}/v1/embeddings", body, key) as response:
            response.read()
            limited = response.headers.get("x-ratelimit-limit-requests")
        latencies.append((time.perf_counter() - started) * 1000)
    latencies.sort()
    return {
        "mean_ms": statistics.mean(latencies),
        "p50_ms": latencies[len(latencies) // 2],
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1],
        "headers": limited is not None,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--infermesh", required=True)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2, help="alternating on/off rounds, to spread VM noise")
    args = parser.parse_args()
    results = {"on": [], "off": []}
    for _ in range(args.rounds):
        for mode in ("on", "off"):
            data_dir = tempfile.mkdtemp(prefix="infermesh-rl-bench-")
            process, base, key = start(args.infermesh, data_dir, mode == "on")
            try:
                results[mode].append(measure(base, key, args.requests))
                if mode == "on":
                    results[mode][-1]["acquire"] = acquire_quantiles(base)
            finally:
                process.send_signal(signal.SIGINT)
                process.wait(timeout=30)
                shutil.rmtree(data_dir, ignore_errors=True)
    summary = {mode: {k: statistics.median(r[k] for r in runs) for k in ("mean_ms", "p50_ms", "p99_ms")}
               for mode, runs in results.items()}
    assert all(r["headers"] for r in results["on"]) and not any(r["headers"] for r in results["off"])
    print(f"| sequential /v1/embeddings ({args.requests} x {args.rounds} rounds) | mean | p50 | p99 |")
    print("|---|---:|---:|---:|")
    for mode in ("on", "off"):
        s = summary[mode]
        print(f"| rate limits {mode} | {s['mean_ms']:.3f} ms | {s['p50_ms']:.3f} ms | {s['p99_ms']:.3f} ms |")
    d = {k: summary["on"][k] - summary["off"][k] for k in ("mean_ms", "p50_ms", "p99_ms")}
    print(f"| overhead (on - off) | {d['mean_ms']:+.3f} ms | {d['p50_ms']:+.3f} ms | {d['p99_ms']:+.3f} ms |")
    acquire = [r["acquire"] for r in results["on"]]
    p50 = statistics.median(a["0.5"] for a in acquire)
    p99 = statistics.median(a["0.99"] for a in acquire)
    print(f"| Acquire as the gateway times it (before the work starts; Commit runs beside billing's settle) "
          f"| | {p50:.3f} ms | {p99:.3f} ms |")


if __name__ == "__main__":
    main()
