#!/usr/bin/env python3
"""Load on loopback against `dsv3 serve` and llama.cpp's `llama-server` on the same model (issue 5).

    python benches/serve_load.py --model bench-models/fp8 --gguf bench-models/gguf/bench-q8_0.gguf \\
        --llama-server LLAMA_CPP_DIR/build/bin/llama-server --clients 1 8 32 64 --seconds 20

Each client streams greedy completions of 64 random token ids, 64 new tokens each, back to back
for the given time. Reported per engine and client count: output tokens/s, time to first token and
time per output token (p50/p99), errors, and the server's peak RSS. Servers are started one at a
time with 2 threads each.
"""
import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port, proc, timeout=600):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become ready")


def peak_rss(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def client(port, deadline, vocab, gen, out, seed):
    rng = random.Random(seed)
    while time.time() < deadline:
        prompt = [rng.randrange(2, vocab) for _ in range(64)]
        body = json.dumps({"prompt": prompt, "max_tokens": gen, "temperature": 0, "stream": True,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
        t0 = time.time()
        times = []
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                for raw in r:
                    line = raw.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    v = json.loads(line[6:])
                    ch = v.get("choices") or [{}]
                    if ch[0].get("text") or ch[0].get("finish_reason") is None:
                        times.append(time.time())
            if times:
                out["ttft"].append(times[0] - t0)
                out["tpot"].extend(b - a for a, b in zip(times, times[1:]))
                out["tokens"] += len(times)
        except Exception as e:  # noqa: BLE001 - every failure counts as an error
            out["errors"] += 1
            out["last_error"] = repr(e)


def load(port, clients, seconds, vocab, gen):
    out = {"ttft": [], "tpot": [], "tokens": 0, "errors": 0}
    deadline = time.time() + seconds
    threads = [threading.Thread(target=client, args=(port, deadline, vocab, gen, out, i)) for i in range(clients)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] if len(xs) >= 2 else (xs[0] if xs else float("nan"))
    return {"clients": clients, "tokens_per_second": out["tokens"] / wall, "ttft_p50": q(out["ttft"], 50),
            "ttft_p99": q(out["ttft"], 99), "tpot_p50": q(out["tpot"], 50), "tpot_p99": q(out["tpot"], 99),
            "errors": out["errors"], "last_error": out.get("last_error")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "bench-models/fp8"))
    ap.add_argument("--dsv3", default=os.path.join(ROOT, "target/release/dsv3"))
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--llama-server", default=None)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--dsv3-args", default="")
    a = ap.parse_args()
    vocab = json.load(open(os.path.join(a.model, "config.json")))["vocab_size"]
    engines = [("dsv3", lambda p, n: [a.dsv3, "serve", "--model", a.model, "--port", str(p), "--max-batch", str(max(n, 1)),
                                      "--max-queue", "256"] + a.dsv3_args.split())]
    if a.llama_server and a.gguf:
        engines.append(("llama-server", lambda p, n: [a.llama_server, "-m", a.gguf, "--port", str(p), "-t", "2", "-tb", "2",
                                                      "-np", str(max(n, 1)), "-c", str(256 * max(n, 1)), "--no-webui"]))
    rows = []
    for name, cmd in engines:
        for n in a.clients:
            port = free_port()
            proc = subprocess.Popen(cmd(port, n), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_ready(port, proc)
                r = load(port, n, a.seconds, vocab, a.gen)
                r["engine"], r["peak_rss_mib"] = name, peak_rss(proc.pid) / 2**20
                rows.append(r)
                print(json.dumps(r), flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    print("| engine | clients | output tok/s | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) | errors | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['clients']} | {r['tokens_per_second']:.1f} | {r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | "
              f"{1000 * r['tpot_p50']:.1f} / {1000 * r['tpot_p99']:.1f} | {r['errors']} | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
