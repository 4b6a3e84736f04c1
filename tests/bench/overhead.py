"""What a gateway adds to every call: an instant mock upstream
(`infermesh mock-upstream`) measured directly (the floor) and behind
infermesh (`up`: real keys, rate limits, billing on SQLite, NATS), the
TensorZero gateway (from its PyPI wheel) and the LiteLLM proxy, with `oha` at
constant rates, non-streaming and streaming. Run by tests/bench/overhead.sh.

Writes tests/bench/results/overhead.md and overhead.png; the markdown ends
with `overhead_p99_ms@1000rps infermesh=X tensorzero=Y litellm=Z`.
"""

import argparse
import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

TARGETS = ["mock", "infermesh", "tensorzero", "litellm"]
# The mock's usage (12 prompt, 3 completion tokens) at the bench model's prices ($0.01 and $0.02 per million).
PER_REQUEST_NANOS = 12 * 10 + 3 * 20
MODES = ["json", "stream"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url, body=None, headers=None, method=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    if data is not None:
        request.add_header("content-type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")


def wait_for(check, what, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.3)
    sys.exit(f"{what} did not start")


def rss_mib(pid):
    """Resident memory of a process and its children, in MiB."""
    total = 0
    try:
        pids = [pid] + [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]
    except Exception:
        pids = [pid]
    for p in pids:
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="infermesh-overhead-"))
        self.procs = []
        self.cores = os.cpu_count() or 1

    def pin(self, role):
        """Load generator and mock on the first core, the gateway under test on the last."""
        if self.cores < 2:
            return []
        core = 0 if role == "client" else self.cores - 1
        return ["taskset", "-c", str(core)]

    def start(self, role, command, env=None, log=None):
        log = open(self.work / f"{log or role}.log", "w")
        proc = subprocess.Popen(self.pin(role) + command, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop_all(self):
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except OSError:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except Exception:
                os.killpg(proc.pid, signal.SIGKILL)

    def setup(self):
        a = self.args
        mock_port = free_port()
        self.start("client", [a.bin, "mock-upstream", "--listen", f"127.0.0.1:{mock_port}"], log="mock")
        mock = f"http://127.0.0.1:{mock_port}/v1"
        wait_for(lambda: http(f"{mock}/models"), "the mock")

        # infermesh: every check on, the mock as the model's only backend.
        config = self.work / "infermesh.toml"
        config.write_text(f'''default_plan = "open"
[[plans]]
id = "open"
name = "Open"
models = ["*"]
included_tokens_per_month = 0

[[models]]
id = "bench/mock"
context_length = 8192
max_output_tokens = 256
pricing = {{ prompt = 0.01, completion = 0.02 }}
backends = [{{ kind = "openai_compatible", name = "mock", base_url = "{mock}", model = "mock", api_key = "none", timeout_ms = 1000 }}]
''')
        port = free_port()
        self.infermesh = self.start("gateway", [
            a.bin, "up", "--http", f"127.0.0.1:{port}", "--data-dir", str(self.work / "infermesh"),
            "--config", str(config), "--no-worker", "--nats-url", a.nats_url, "--admin-token", "bench-admin",
            "--signups-per-minute-per-ip", "0", "--free-requests-per-minute", "1000000000",
            "--free-tokens-per-minute", "4000000000", "--free-tokens-per-day", "0", "--free-max-concurrent", "0",
            "--signup-credit", "1000",
        ], env={"RUST_LOG": "warn"}, log="infermesh")
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: urllib.request.urlopen(f"{base}/readyz", timeout=2).status == 200, "infermesh")
        self.infermesh_base = base
        self.infermesh_key = http(f"{base}/v1/auth/signup", {"email": "bench@bench.local"})["key"]

        # TensorZero's gateway, observability off.
        tz_config = self.work / "tensorzero.toml"
        tz_config.write_text(f'''[gateway]
observability.enabled = false

[models.mock]
routing = ["mock"]

[models.mock.providers.mock]
type = "openai"
model_name = "mock"
api_base = "{mock}/"
api_key_location = "none"
''')
        tz_script = self.work / "tensorzero_gateway.py"
        tz_script.write_text('''import sys, time, tensorzero
gateway = tensorzero._start_http_gateway(config_file=sys.argv[1], clickhouse_url=None, postgres_url=None,
                                         valkey_url=None, async_setup=False)
print("BASE", gateway.base_url, flush=True)
while True:
    time.sleep(3600)
''')
        self.tensorzero = self.start("gateway", [a.python, str(tz_script), str(tz_config)], log="tensorzero")
        tz_log = self.work / "tensorzero.log"
        wait_for(lambda: "BASE " in tz_log.read_text(), "tensorzero")
        self.tensorzero_base = tz_log.read_text().split("BASE ", 1)[1].split()[0]

        # LiteLLM's proxy with a master key (slow to start: skipped when not measured).
        self.litellm = None
        if "litellm" in a.targets.split(","):
            self.litellm_key = "sk-" + secrets.token_hex(32)
            ll_config = self.work / "litellm.yaml"
            ll_config.write_text(f'''model_list:
  - model_name: mock
    litellm_params:
      model: openai/mock
      api_base: {mock}
      api_key: none
''')
            ll_port = free_port()
            self.litellm = self.start("gateway", [a.litellm, "--config", str(ll_config), "--port", str(ll_port), "--num_workers", "1"],
                                      env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MASTER_KEY": self.litellm_key,
                                           "LITELLM_LOG": "ERROR"}, log="litellm")
            self.litellm_base = f"http://127.0.0.1:{ll_port}"
            wait_for(lambda: urllib.request.urlopen(f"{self.litellm_base}/health/liveliness", timeout=2).status == 200,
                     "litellm", seconds=180)

        self.targets = {
            "mock": (f"{mock}/chat/completions", "mock", None, None),
            "infermesh": (f"{base}/v1/chat/completions", "bench/mock", self.infermesh_key, self.infermesh.pid),
            "tensorzero": (f"{self.tensorzero_base}/chat/completions", "tensorzero::model_name::mock", None,
                           self.tensorzero.pid),
        }
        if self.litellm:
            self.targets["litellm"] = (f"{self.litellm_base}/v1/chat/completions", "mock", self.litellm_key,
                                       self.litellm.pid)

    def load(self, target, mode, rate, seconds, connections=None):
        url, model, key, pid = self.targets[target]
        body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}
        if mode == "stream":
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        command = self.pin("client") + [
            self.args.oha, "-z", f"{seconds}s", "-q", str(rate), "-c", str(connections or self.args.connections),
            "--latency-correction", "--no-tui", "-t", "1s", "--output-format", "json",
            "-m", "POST", "-H", "content-type: application/json", "-d", json.dumps(body),
        ]
        if key:
            command += ["-H", f"Authorization: Bearer {key}"]
        command.append(url)
        # The gateways not under test are paused, so their idle work
        # (LiteLLM's background loops) takes nothing from the one measured.
        others = [p for p in (self.infermesh, self.tensorzero, self.litellm) if p and p.pid != pid]
        for other in others:
            os.killpg(other.pid, signal.SIGSTOP)
        peak_rss = 0.0
        try:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            while proc.poll() is None:
                if pid:
                    peak_rss = max(peak_rss, rss_mib(pid))
                time.sleep(0.5)
            out = json.loads(proc.stdout.read())
        finally:
            for other in others:
                os.killpg(other.pid, signal.SIGCONT)
        summary, percentiles = out["summary"], out.get("latencyPercentiles") or {}
        codes = out.get("statusCodeDistribution") or {}
        ok = int(codes.get("200", 0))
        # Requests still open when the run's time is up are cut by oha itself.
        errors = {k: int(v) for k, v in (out.get("errorDistribution") or {}).items() if "deadline" not in k}
        total = sum(int(v) for v in codes.values()) + sum(errors.values())
        ms = lambda name: (percentiles.get(name) or float("nan")) * 1000
        return {
            "target": target, "mode": mode, "rate": rate,
            "achieved": ok / seconds, "success": ok / total if total else 0.0, "ok": ok,
            "codes": codes, "errors": errors, "timeouts": int((out.get("errorDistribution") or {}).get("timeout", 0)),
            "p50": ms("p50"), "p99": ms("p99"), "p999": ms("p99.9"), "rss": peak_rss,
        }

    def billing_check(self, served):
        base = self.infermesh_base
        ledger = http(f"{base}/admin/v1/ledger", headers={"Authorization": "Bearer bench-admin"})["data"]
        credits = http(f"{base}/v1/credits", headers={"Authorization": f"Bearer {self.infermesh_key}"})["data"]

        async def usage_events():
            import nats
            client = await nats.connect(self.args.nats_url)
            info = await client.jetstream().stream_info("USAGE")
            await client.close()
            return info.state.messages

        deadline = time.time() + 120
        events = 0
        while time.time() < deadline:
            events = asyncio.run(usage_events())
            if events >= served:
                break
            time.sleep(1)
        return {
            "served": served, "events": events, "balanced": ledger["balanced"],
            "revenue_nanos": ledger["revenue_nanos"], "usage_nanos": round(credits["total_usage"] * 1e9),
        }


def highest(rows, target, mode, floor, limit):
    best = None
    for row in sorted(rows, key=lambda r: r["rate"]):
        if row["target"] != target or row["mode"] != mode:
            continue
        base = floor.get((mode, row["rate"]))
        held = row["success"] >= 0.999 and row["achieved"] >= 0.99 * row["rate"]
        if held and base is not None and row["p99"] - base["p99"] < limit:
            best = row["rate"]
    return best


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", required=True)
    parser.add_argument("--python", required=True)
    parser.add_argument("--litellm", required=True)
    parser.add_argument("--oha", required=True)
    parser.add_argument("--nats-url", required=True)
    parser.add_argument("--rates", default="250,500,1000,2000,4000")
    parser.add_argument("--targets", default=",".join(TARGETS), help="a subset of " + ",".join(TARGETS))
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--overload-rate", type=int, default=10000,
                        help="past every target's capacity; 0 skips the overload runs")
    parser.add_argument("--overload-connections", type=int, default=2048,
                        help="more than infermesh's default --max-concurrent-requests (1024)")
    parser.add_argument("--out", default="tests/bench/results/overhead")
    args = parser.parse_args()
    rates = [int(r) for r in args.rates.split(",")]

    bench = Bench(args)
    rows = []
    try:
        bench.setup()
        for mode in MODES:
            failed = set()
            for rate in rates:
                for target in TARGETS:
                    if target in failed or target not in bench.targets:
                        continue
                    row = bench.load(target, mode, rate, args.seconds)
                    rows.append(row)
                    print(f"{mode:6} {rate:5} {target:10} ok {row['success']*100:6.2f}% achieved {row['achieved']:7.1f} "
                          f"p50 {row['p50']:8.2f} p99 {row['p99']:8.2f} p99.9 {row['p999']:8.2f} ms rss {row['rss']:.0f} MiB "
                          f"{row['codes']} {row['errors']}", file=sys.stderr, flush=True)
                    # Far past what it holds: higher rates only add timeouts.
                    if row["success"] < 0.5:
                        failed.add(target)
        # Past capacity, from many clients at once: what a flood gets back.
        overload = []
        if args.overload_rate:
            for target in ("infermesh", "tensorzero"):
                if target in bench.targets:
                    row = bench.load(target, "json", args.overload_rate, args.seconds, args.overload_connections)
                    overload.append(row)
                    print(f"overload {target:10} {row['codes']} {row['errors']} p99 {row['p99']:8.2f} ms "
                          f"rss {row['rss']:.0f} MiB", file=sys.stderr, flush=True)
        served = sum(r["ok"] for r in rows + overload if r["target"] == "infermesh")
        check = bench.billing_check(served)
    finally:
        bench.stop_all()

    floor = {(r["mode"], r["rate"]): r for r in rows if r["target"] == "mock"}
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    lines = ["# Gateway overhead", "",
             f"{os.cpu_count()} cores ({cpu}); {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
             f"`oha` at constant rates, {args.seconds} s per run, {args.connections} connections, 1 s timeout, "
             "latency correction on; `oha`, the mock and NATS on the first core, the gateway under test on the last "
             "(the other gateways paused meanwhile). "
             "Reproduce: `./tests/bench/overhead.sh`.", "",
             "- **mock**: `infermesh mock-upstream`, an instant OpenAI-compatible answer (the floor).",
             "- **infermesh**: `infermesh up --no-worker` with every check on: API key, rate limits (ratelimit service), "
             "credit hold and settlement (billing on SQLite, synchronous=FULL), usage events to NATS; the model's backend is the mock.",
             "- **tensorzero**: TensorZero's gateway from the `tensorzero` wheel, observability off, the mock as an `openai` provider.",
             "- **litellm**: the LiteLLM proxy (`litellm[proxy]`, one worker), the mock as an `openai/` model.", "",
             "Overhead = the target's latency minus the mock's at the same rate and percentile. RSS = the target's "
             "process tree at its peak during the run (for infermesh: every service of `up` in one process, NATS aside).", ""]
    for mode in MODES:
        lines += [f"## {'Non-streaming' if mode == 'json' else 'Streaming'} chat completions", "",
                  "| target | RPS offered | RPS achieved | success % | p50 ms | p99 ms | p99.9 ms | p99 overhead ms | RSS MiB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in rows:
            if row["mode"] != mode:
                continue
            base = floor.get((mode, row["rate"]))
            overhead = row["p99"] - base["p99"] if base and row["target"] != "mock" else float("nan")
            lines.append(f"| {row['target']} | {row['rate']} | {row['achieved']:.0f} | {row['success']*100:.2f} | "
                         f"{row['p50']:.2f} | {row['p99']:.2f} | {row['p999']:.2f} | "
                         f"{'' if overhead != overhead else f'{overhead:.2f}'} | {row['rss']:.0f} |")
        lines += ["", "| target | highest rate with p99 overhead < 1 ms | < 5 ms |", "|---|---:|---:|"]
        for target in TARGETS[1:]:
            lines.append(f"| {target} | {highest(rows, target, mode, floor, 1.0) or 'none'} | "
                         f"{highest(rows, target, mode, floor, 5.0) or 'none'} |")
        lines.append("")
    if overload:
        lines += ["## Above capacity", "",
                  f"Non-streaming, {args.overload_rate} RPS offered over {args.overload_connections} connections "
                  f"for {args.seconds} s (more than infermesh's default `--max-concurrent-requests` 1024). "
                  "Refused = answered at once with 503 (infermesh: `Retry-After: 1`, OpenAI's error shape); "
                  "timeouts = no answer within 1 s. RSS here includes a buffer per open connection.", "",
                  "| target | 200 per s | refused (503/429) | timeouts | other errors | p50 ms | p99 ms | RSS MiB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in overload:
            refused = sum(int(v) for k, v in row["codes"].items() if k in ("503", "429"))
            other = sum(v for k, v in row["errors"].items() if k != "timeout")
            lines.append(f"| {row['target']} | {row['achieved']:.0f} | {refused} | {row['timeouts']} | {other} | "
                         f"{row['p50']:.2f} | {row['p99']:.2f} | {row['rss']:.0f} |")
        lines.append("")
    lines += ["## Billing after the run", "",
              f"infermesh answered {check['served']} requests with 200 (a few more completed as oha's clock ran out); "
              f"usage events in JetStream: {check['events']}; ledger revenue {check['revenue_nanos']} nano-dollars = "
              f"the key's usage {check['usage_nanos']} = {check['events']} events × {PER_REQUEST_NANOS} "
              f"({'exact' if check['revenue_nanos'] == check['usage_nanos'] == check['events'] * PER_REQUEST_NANOS else 'MISMATCH'}); "
              f"books balanced: {check['balanced']}.", ""]

    def at_1000(target):
        row = next((r for r in rows if r["target"] == target and r["mode"] == "json" and r["rate"] == 1000), None)
        base = floor.get(("json", 1000))
        if row is None or base is None or row["success"] < 0.999 or row["achieved"] < 0.99 * row["rate"]:
            return "fail"
        return f"{row['p99'] - base['p99']:.2f}"

    lines.append(f"overhead_p99_ms@1000rps infermesh={at_1000('infermesh')} tensorzero={at_1000('tensorzero')} "
                 f"litellm={at_1000('litellm')}")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(json.dumps(rows + [dict(r, mode="overload") for r in overload], indent=1))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, mode in zip(axes, MODES):
        for target in TARGETS:
            points = [(r["rate"], r["p99"]) for r in rows if r["target"] == target and r["mode"] == mode and r["success"] >= 0.5]
            if points:
                axis.plot(*zip(*points), marker="o", label=target)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("offered requests/s")
        axis.set_ylabel("p99 latency (ms)")
        axis.set_title("non-streaming" if mode == "json" else "streaming")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(args.out + ".png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
