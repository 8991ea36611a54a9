#!/usr/bin/env python3
"""Decode and prefill tokens/s of transformers (eager, CPU) on a dsv3 bench checkpoint, for the
side-by-side figure in benches/README.md.

Usage: python benches/transformers_decode.py MODEL_DIR [--dtype bfloat16|float32] [--prompt-len 128] [--gen 16]
"""
import argparse
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen", type=int, default=16)
    a = ap.parse_args()
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype), attn_implementation="eager").eval()
    ids = torch.tensor([[2 + (i * 7919) % 31998 for i in range(a.prompt_len)]])
    with torch.no_grad():
        model(ids[:, :8], use_cache=True)  # warm-up
        # Prefill and decode timed separately: one forward over the prompt, then one forward per
        # token over the cache (greedy), as `dsv3 bench` does.
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        t1 = time.perf_counter()
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(a.gen):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
    prefill, decode = t1 - t0, t2 - t1
    print(f"transformers {a.dtype}: prefill {a.prompt_len / prefill:.1f} tok/s, decode {a.gen / decode:.2f} tok/s")


if __name__ == "__main__":
    main()
