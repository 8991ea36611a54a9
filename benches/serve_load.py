"""Concurrent greedy completions against one or more dsv3 servers; prints tokens/s.

usage: python benches/serve_load.py PORT[,PORT...] REQUESTS CLIENTS PROMPT_TOKENS NEW_TOKENS

Request i goes to port i mod len(ports) (with `serve --expert-parallel --data-parallel`: the
front's port, or each process's own); prompts are token ids, so any model folder works.
"""
import json
import sys
import threading
import time
import urllib.request

ports = [int(p) for p in sys.argv[1].split(",")]
n, clients, plen, gen = (int(a) for a in sys.argv[2:6])
for p in ports:
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{p}/health", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
jobs, lock, tokens, completion = list(range(n)), threading.Lock(), [0], [0]


def client():
    while True:
        with lock:
            if not jobs:
                return
            i = jobs.pop()
        ids = [2 + (i * 7919 + j * 104729) % 31000 for j in range(plen)]
        body = json.dumps({"prompt": ids, "max_tokens": gen, "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{ports[i % len(ports)]}/v1/completions", data=body, headers={"Content-Type": "application/json"})
        usage = json.load(urllib.request.urlopen(req))["usage"]
        with lock:
            tokens[0] += usage["prompt_tokens"] + usage["completion_tokens"]
            completion[0] += usage["completion_tokens"]


threads = [threading.Thread(target=client) for _ in range(clients)]
t = time.time()
for th in threads:
    th.start()
for th in threads:
    th.join()
dt = time.time() - t
print(f"{n} requests, {tokens[0]} tokens (prompt + completion) in {dt:.2f} s: {tokens[0] / dt:.1f} tok/s, {completion[0] / dt:.1f} completion tok/s")
