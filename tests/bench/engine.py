#!/usr/bin/env python3
"""The engine benchmark: infermesh against llama.cpp on the same GGUF, the
same thread count and the same HTTP client, in one run.

    ./tests/bench/engine.sh            # builds, fetches, runs, writes results

Each server is measured alone (they never share the cores):

- TTFT and prefill tokens/s for a 512-token prompt (streamed, max_tokens 1;
  every run's prompt differs so no prefix cache helps);
- decode tokens/s for one stream (128 tokens, EOS banned with logit_bias);
- aggregate decode tokens/s and per-stream inter-token latency at 1, 4, 8 and
  16 concurrent streams (128 tokens each). Aggregate decode counts the tokens
  that arrive while every stream is decoding (after the last stream's first
  token, up to the first stream's last), over that window: each prompt's
  prefill stays out, as it does from one stream's decode rate, which is the
  same measure with one stream. Tokens over the whole run, prefills and
  queueing included, are reported beside it as throughput;
- the same at 8 streams with temperature 0.7 and top_p 0.9 (sampled from
  all 262,144 logits: llama.cpp's own top_k, min_p and repeat penalty off);
- peak RSS of the serving process (VmHWM).

Writes tests/bench/results/engine.md (a markdown table) and engine.png.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

MODEL_ID = "infermesh/gemma-3-270m"
# Tokens each concurrent stream asks for, as many as the single-stream decode run.
CONCURRENT_TOKENS = 128
# Gemma's end-of-generation tokens: banned so every stream runs to max_tokens.
BAN_EOS = {"1": -100, "106": -100}
# The sampled run: what chat clients commonly send.
SAMPLED = {"temperature": 0.7, "top_p": 0.9}
SAMPLED_STREAMS = 8
FILLER = (
    "The history of the city begins with a small settlement on an island in the river, where fishermen "
    "and traders built wooden houses and a market. Over the centuries walls were raised, bridges crossed "
    "the water, and churches, schools and workshops filled the streets. "
)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url, body=None, key=None, timeout=600):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    return urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=timeout)


def wait_for(url, seconds=600):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with request(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} never answered")


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    def __init__(self, name, base, model, key, process, sampling_defaults_off=None):
        self.name, self.base, self.model, self.key, self.process = name, base, model, key, process
        # Request fields that turn off a server's own sampling defaults.
        self.sampling_defaults_off = sampling_defaults_off or {}

    def stream(self, prompt, max_tokens, sampling=None):
        """Streams one completion (greedy unless `sampling` says otherwise);
        returns (start, chunk arrival times, completion tokens)."""
        body = {
            "model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "logit_bias": BAN_EOS,
        }
        if sampling:
            body.update(self.sampling_defaults_off, **sampling)
        started = time.perf_counter()
        arrivals, tokens = [], None
        with request(f"{self.base}/v1/completions", body, self.key) as response:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("text") for c in chunk.get("choices", [])):
                    arrivals.append(time.perf_counter())
        return started, arrivals, tokens if tokens is not None else len(arrivals)


def start_infermesh(binary, data_dir, threads):
    port = free_port()
    env = dict(os.environ, RUST_LOG="warn", RAYON_NUM_THREADS=str(threads))
    # Limits and credit far above what the bench uses: it measures the
    # engine, not the rate limiter.
    process = subprocess.Popen(
        [binary, "up", "--http", f"127.0.0.1:{port}", "--data-dir", data_dir, "--no-nats",
         "--signup-credit", "1000", "--free-requests-per-minute", "100000", "--free-max-concurrent", "0",
         "--free-tokens-per-minute", "1000000000", "--free-tokens-per-day", "0"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_for(f"{base}/readyz")
    with request(f"{base}/v1/auth/signup", {"email": "bench@example.com"}) as response:
        key = json.load(response)["key"]
    return Server("infermesh", base, MODEL_ID, key, process)


def start_llama(python, gguf, threads, shim_dir):
    port = free_port()
    code = (
        "import sys; sys.path.insert(0, %r); import llama_cpp_no_amx; "
        "from llama_cpp.server.__main__ import main; sys.argv = sys.argv[:1] + sys.argv[1:]; main()" % shim_dir
    )
    process = subprocess.Popen(
        [python, "-c", code, "--model", gguf, "--n_threads", str(threads), "--n_threads_batch", str(threads),
         "--n_ctx", "8192", "--n_batch", "512", "--host", "127.0.0.1", "--port", str(port),
         # By default a new request cuts off the one streaming; queue instead.
         "--interrupt_requests", "False"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_for(f"{base}/v1/models")
    # llama-cpp-python's completions default to top_k 40, min_p 0.05 and a
    # 1.1 repeat penalty; OpenAI's (and ours) to none of them.
    return Server("llama.cpp", base, "gemma", None, process,
                  sampling_defaults_off={"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0})


def long_prompt(server_tokenize, run):
    """Text whose tokenization (with BOS) is exactly 512 tokens; `run` makes it unique."""
    text = f"Record {run}. " + FILLER * 12
    ids = server_tokenize(text)
    while len(ids) > 512:
        text = text[: int(len(text) * 0.98)]
        ids = server_tokenize(text)
    while len(ids) < 512:
        text += " and"
        ids = server_tokenize(text)
    return text, len(ids)


def measure(server, long_prompts, levels):
    server.stream("Warm up.", 4)
    result = {}
    ttfts, prompt_tokens = [], None
    runs = len(long_prompts)
    for prompt, prompt_tokens in long_prompts:
        started, arrivals, _ = server.stream(prompt, 1)
        ttfts.append(arrivals[0] - started)
    ttft = statistics.median(ttfts)
    result["prompt_tokens"] = prompt_tokens
    result["ttft_ms"] = ttft * 1000
    result["prefill_tps"] = prompt_tokens / ttft

    decode_rates = []
    for run in range(runs):
        _, arrivals, tokens = server.stream(f"Run {run}: the history of the city of Paris begins", 128)
        decode_rates.append((tokens - 1) / (arrivals[-1] - arrivals[0]))
    result["decode_tps"] = statistics.median(decode_rates)

    result["concurrency"] = {streams: concurrent(server, streams) for streams in levels}
    result["sampled"] = concurrent(server, SAMPLED_STREAMS, SAMPLED)
    result["peak_rss_mib"] = peak_rss_mib(server.process.pid)
    return result


def concurrent(server, streams, sampling=None):
    """`streams` completions at once, CONCURRENT_TOKENS each."""
    outcomes = [None] * streams

    def one(i):
        outcomes[i] = server.stream(f"Story {i} of {streams}: once upon a time", CONCURRENT_TOKENS, sampling)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    begin = min(o[0] for o in outcomes)
    end = max(o[1][-1] for o in outcomes)
    total = sum(o[2] for o in outcomes)
    short = [o[2] for o in outcomes if o[2] != CONCURRENT_TOKENS]
    if short:
        raise RuntimeError(f"{server.name}: {len(short)} of {streams} streams stopped early: {short}")
    itls = [(o[1][-1] - o[1][0]) / max(o[2] - 1, 1) * 1000 for o in outcomes]
    # Every stream decoding: after the last first token, up to the first last token.
    window = (max(o[1][0] for o in outcomes), min(o[1][-1] for o in outcomes))
    in_window = sum(1 for o in outcomes for t in o[1] if window[0] < t <= window[1])
    # A server that queues requests never has them all decoding; then
    # throughput is all there is to say.
    together = window[1] > window[0]
    return {
        "aggregate_tps": in_window / (window[1] - window[0]) if together else total / (end - begin),
        "all_decoding": together,
        "throughput_tps": total / (end - begin),
        "itl_ms_mean": statistics.mean(itls),
        "itl_ms_max": max(itls),
        # Request start to last token: what a client waits, queueing included.
        "latency_s_mean": statistics.mean(o[1][-1] - o[0] for o in outcomes),
    }


def write_results(out_dir, ours, theirs, meta, levels):
    os.makedirs(out_dir, exist_ok=True)
    rows = [
        ("TTFT, 512-token prompt (ms)", "ttft_ms", "{:.0f}"),
        ("prefill (tokens/s)", "prefill_tps", "{:.1f}"),
        ("decode, one stream (tokens/s)", "decode_tps", "{:.1f}"),
        ("peak RSS (MiB)", "peak_rss_mib", "{:.0f}"),
    ]
    lines = [
        "# Engine benchmark: infermesh vs llama.cpp",
        "",
        f"{meta}",
        "",
        "| metric | infermesh | llama.cpp | ratio |",
        "|---|---:|---:|---:|",
    ]
    for label, field, fmt in rows:
        a, b = ours[field], theirs[field]
        lines.append(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {a / b:.2f}x |")
    mark = lambda r: "" if r["all_decoding"] else " †"
    for streams in levels:
        a, b = ours["concurrency"][streams], theirs["concurrency"][streams]
        lines.append(f"| {streams} streams: aggregate decode (tokens/s) | {a['aggregate_tps']:.1f}{mark(a)} | "
                     f"{b['aggregate_tps']:.1f}{mark(b)} | {a['aggregate_tps'] / b['aggregate_tps']:.2f}x |")
        lines.append(f"| {streams} streams: throughput, prefills included (tokens/s) | {a['throughput_tps']:.1f} | "
                     f"{b['throughput_tps']:.1f} | {a['throughput_tps'] / b['throughput_tps']:.2f}x |")
        lines.append(f"| {streams} streams: inter-token latency, mean (ms) | {a['itl_ms_mean']:.1f} | "
                     f"{b['itl_ms_mean']:.1f} | {a['itl_ms_mean'] / b['itl_ms_mean']:.2f}x |")
        lines.append(f"| {streams} streams: request latency, mean (s) | {a['latency_s_mean']:.2f} | "
                     f"{b['latency_s_mean']:.2f} | {a['latency_s_mean'] / b['latency_s_mean']:.2f}x |")
    a, b = ours["sampled"], theirs["sampled"]
    sampled = f"{SAMPLED_STREAMS} streams, temperature {SAMPLED['temperature']}, top_p {SAMPLED['top_p']}"
    lines.append(f"| {sampled}: aggregate decode (tokens/s) | {a['aggregate_tps']:.1f}{mark(a)} | "
                 f"{b['aggregate_tps']:.1f}{mark(b)} | {a['aggregate_tps'] / b['aggregate_tps']:.2f}x |")
    scaling = ours["concurrency"][levels[-1] if 8 not in levels else 8]["aggregate_tps"] / ours["decode_tps"]
    lines += [
        "",
        f"infermesh aggregate at 8 streams / its own single stream: {scaling:.2f}x",
        "",
        "Aggregate decode counts the tokens that arrive while every stream is decoding, over that window",
        "(prefills stay out, as they do from one stream's decode rate); throughput counts every token over",
        "the whole run, prefills and queueing included. † no moment had every stream decoding (the requests",
        "queued), so the figure is the throughput.",
        "",
        "llama-cpp-python's server runs one request at a time (no batching), so its concurrent streams queue:",
        "their inter-token latency is that of one stream, or less where its chunks arrive in bursts, and the",
        "cost shows in request latency. infermesh's RSS is the whole `infermesh up` process: every service",
        "and the MiniLM embedding model (~90 MB) besides Gemma.",
        "",
    ]
    with open(os.path.join(out_dir, "engine.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out_dir, "engine.json"), "w") as f:
        json.dump({"meta": meta, "infermesh": ours, "llama.cpp": theirs}, f, indent=2)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no chart", file=sys.stderr)
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, data in (("infermesh", ours), ("llama.cpp", theirs)):
        left.plot(levels, [data["concurrency"][s]["aggregate_tps"] for s in levels], marker="o", label=name)
        right.plot(levels, [data["concurrency"][s]["latency_s_mean"] for s in levels], marker="o", label=name)
    left.set(xlabel="concurrent streams", ylabel="aggregate decode tokens/s", title="Throughput")
    right.set(xlabel="concurrent streams", ylabel=f"mean request latency, {CONCURRENT_TOKENS} tokens (s)", title="Latency per request")
    for ax in (left, right):
        ax.set_xticks(levels)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(meta, fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "engine.png"), dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--infermesh", required=True, help="the infermesh binary (a release build)")
    parser.add_argument("--llama-python", required=True, help="python with llama-cpp-python[server]")
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--shim-dir", required=True, help="dir holding llama_cpp_no_amx.py")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--levels", default="1,4,8,16")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    data_dir = tempfile.mkdtemp(prefix="infermesh-bench-")
    ours_server = start_infermesh(args.infermesh, data_dir, args.threads)

    def tokenize(text):
        with request(f"{ours_server.base}/tokenize", {"model": MODEL_ID, "prompt": text}, ours_server.key) as r:
            return json.load(r)["tokens"]

    try:
        # Distinct prompts per run and per server, so no prefix cache helps;
        # our tokenizer gives llama.cpp's ids (tested), so both see 512 tokens.
        prompts = {name: [long_prompt(tokenize, f"{name}-{run}") for run in range(3)]
                   for name in ("infermesh", "llama.cpp")}
        ours = measure(ours_server, prompts["infermesh"], levels)
    finally:
        ours_server.process.send_signal(signal.SIGINT)
        ours_server.process.wait(timeout=30)
        shutil.rmtree(data_dir, ignore_errors=True)
    theirs_server = start_llama(args.llama_python, args.gguf, args.threads, args.shim_dir)
    try:
        theirs = measure(theirs_server, prompts["llama.cpp"], levels)
    finally:
        theirs_server.process.terminate()
        theirs_server.process.wait(timeout=30)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    # The kernels differ by instruction set (AVX-512 VNNI or AVX2), and the
    # same model name covers both.
    flags = next((l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")), [])
    isa = "AVX-512 VNNI" if "avx512_vnni" in flags else "AVX2, no AVX-512" if "avx2" in flags else "no AVX2"
    meta = (f"Gemma 3 270M Q4_K_M, {args.threads} threads, {os.cpu_count()} cores ({cpu}, {isa}); "
            f"llama-cpp-python server, extra buffer types off; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    write_results(args.out, ours, theirs, meta, levels)
    print(open(os.path.join(args.out, "engine.md")).read())


if __name__ == "__main__":
    main()
