#!/usr/bin/env python3
"""The official `openai` Python client against `dsv3 serve` (issue 5), run by scripts/test.sh.

Serves a copy of tests/fixtures/train_roundtrip (a dsv3-trained checkpoint, given a small chat
template) on a free loopback port with an API key, then: completions and chat, streaming and not
(greedy: the same text either way), usage, models, the client's error classes for 400 and 401, and
a graceful shutdown on SIGINT.

Usage: python scripts/test_openai_client.py DSV3_BINARY
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import openai

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    binary = sys.argv[1]
    tmp = tempfile.mkdtemp(prefix="dsv3-openai-")
    src = os.path.join(ROOT, "tests", "fixtures", "train_roundtrip")
    for f in ["config.json", "model.safetensors", "tokenizer.json"]:
        shutil.copy(os.path.join(src, f), tmp)
    tc = json.load(open(os.path.join(src, "tokenizer_config.json")))
    tc["chat_template"] = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                           "{% if add_generation_prompt %}assistant:{% endif %}")
    json.dump(tc, open(os.path.join(tmp, "tokenizer_config.json"), "w"))
    port = free_port()
    server = subprocess.Popen([binary, "serve", "--model", tmp, "--port", str(port), "--api-key", "secret"],
                              stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="secret")

        c = client.completions.create(model="x", prompt="pub fn forward(", max_tokens=10, temperature=0)
        assert c.choices[0].finish_reason == "length", c
        assert c.usage.completion_tokens == 10 and c.usage.prompt_tokens > 0, c.usage
        streamed = "".join(ch.choices[0].text for ch in client.completions.create(
            model="x", prompt="pub fn forward(", max_tokens=10, temperature=0, stream=True))
        assert streamed == c.choices[0].text, (streamed, c.choices[0].text)

        msgs = [{"role": "user", "content": "fn main"}]
        r = client.chat.completions.create(model="x", messages=msgs, max_tokens=8, temperature=0)
        assert r.choices[0].message.role == "assistant" and r.object == "chat.completion", r
        parts = [ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
            model="x", messages=msgs, max_tokens=8, temperature=0, stream=True)]
        assert "".join(parts) == r.choices[0].message.content, (parts, r.choices[0].message.content)

        assert [m.id for m in client.models.list().data] == [os.path.basename(tmp)]
        try:
            client.completions.create(model="x", prompt="x", max_tokens=10**6)
            raise AssertionError("max_tokens beyond the context was accepted")
        except openai.BadRequestError as e:
            assert "context" in str(e), e
        try:
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong").models.list()
            raise AssertionError("a wrong API key was accepted")
        except openai.AuthenticationError:
            pass
    finally:
        server.send_signal(signal.SIGINT)
        code = server.wait(timeout=30)
        err = server.stderr.read()
        shutil.rmtree(tmp, ignore_errors=True)
    assert code == 0, f"exit {code}: {err}"
    assert "panicked" not in err, err
    print("openai client: ok (openai", openai.__version__ + ")")


if __name__ == "__main__":
    main()
