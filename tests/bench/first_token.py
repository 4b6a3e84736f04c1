"""Times `infermesh up` from launch to the first streamed token, then the
decode speed of that one stream through the whole mesh (gateway, auth,
ratelimit, billing, registry, worker).

Usage: python3 tests/bench/first_token.py [path/to/infermesh] [max_tokens]
Models must already be in the cache (run `infermesh fetch-models` once), so
the number measures start-up, not the download.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

binary = sys.argv[1] if len(sys.argv) > 1 else "target/release/infermesh"
max_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 128

with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
base = f"http://127.0.0.1:{port}"


def post(path, body, key=None):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return urllib.request.urlopen(urllib.request.Request(base + path, data=json.dumps(body).encode(), headers=headers), timeout=300)


with tempfile.TemporaryDirectory() as data:
    started = time.monotonic()
    proc = subprocess.Popen([binary, "up", "--http", f"127.0.0.1:{port}", "--data-dir", data, "--no-nats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "warn"})
    try:
        while True:
            try:
                if urllib.request.urlopen(base + "/readyz", timeout=1).status == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if proc.poll() is not None:
                sys.exit("infermesh up exited")
            time.sleep(0.02)
        ready = time.monotonic() - started
        key = json.load(post("/v1/auth/signup", {"email": "bench@example.com"}))["key"]
        request = {"model": "infermesh/gemma-3-270m", "messages": [{"role": "user", "content": "Tell me about the history of Paris."}],
                   "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        sent = time.monotonic()
        first = None
        usage = None
        with post("/v1/chat/completions", request, key) as response:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.monotonic()
                if chunk.get("usage"):
                    usage = chunk["usage"]
        done = time.monotonic()
        completion = usage["completion_tokens"]
        print(f"up -> ready (all services, worker registered): {ready:.2f} s")
        print(f"up -> first token: {first - started:.2f} s (request -> first token: {(first - sent) * 1000:.0f} ms)")
        print(f"one stream through the mesh: {completion} tokens, decode {(completion - 1) / (done - first):.1f} tokens/s")
    finally:
        proc.terminate()
        proc.wait()
