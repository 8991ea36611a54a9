#!/usr/bin/env python3
"""Fixtures for dsv3's GGUF k-quant writer: rows of a model's unquantized GGUF and the blocks
llama.cpp's own `llama-quantize` wrote for the same rows, one tensor per type.

    python3 benches/gguf_llamacpp.py --llama LLAMA_CPP_DIR --formats bf16,q8_0,q4_k_m   # the files
    llama-quantize target/bench-gguf/bench-bf16.gguf target/bench-gguf/bench-q5_k_m.gguf Q5_K_M
    python3 scripts/make_kquant_fixtures.py target/bench-gguf/bench-bf16.gguf \
        target/bench-gguf/bench-q4_k_m.gguf target/bench-gguf/bench-q5_k_m.gguf target/bench-gguf/bench-q8_0.gguf

writes tests/fixtures/llama-quantize/k-quants.gguf: for each type (Q4_K, Q5_K, Q6_K,
Q5_0, Q5_1, Q8_0) the first ROWS rows of one tensor llama-quantize stored in it, as `src.<type>`
(f32, from the source) and `llama.<type>` (the raw blocks). `crates/model/tests/gguf.rs` quantizes the
source rows with dsv3 and compares its error with llama.cpp's.
"""
import os
import sys

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFReader, GGUFWriter

ROWS = 16
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../tests/fixtures/llama-quantize/k-quants.gguf")


def source_rows(t, n):
    cols = int(t.shape[0])
    data = np.asarray(t.data).reshape(-1)
    if t.tensor_type == T.BF16:
        return (data.view(np.uint16)[: n * cols].astype(np.uint32) << 16).view(np.float32).reshape(n, cols)
    return data.view(np.float32)[: n * cols].reshape(n, cols).copy()


def main():
    src = {t.name: t for t in GGUFReader(sys.argv[1]).tensors}
    want = [T.Q4_K, T.Q5_K, T.Q6_K, T.Q5_0, T.Q5_1, T.Q8_0]
    found = {}
    for f in sys.argv[2:]:
        for t in GGUFReader(f).tensors:
            if t.tensor_type in want and t.tensor_type not in found and len(t.shape) >= 2:
                found[t.tensor_type] = t
    w = GGUFWriter(OUT, "dsv3-fixture")
    for ty in want:
        t = found[ty]
        x = source_rows(src[t.name], ROWS)
        raw = np.asarray(t.data).reshape(-1, np.asarray(t.data).shape[-1])[:ROWS]
        w.add_tensor(f"src.{ty.name}", x)
        w.add_tensor(f"llama.{ty.name}", np.ascontiguousarray(raw), raw_dtype=ty)
        print(ty.name, t.name, x.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(OUT, os.path.getsize(OUT))


if __name__ == "__main__":
    main()
