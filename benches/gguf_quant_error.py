#!/usr/bin/env python3
"""Per-tensor quantization error of two GGUF files of the same model against its unquantized GGUF,
decoded by llama.cpp's own `gguf` package (issue 16: dsv3's k-quant writer against llama-quantize).

    python benches/gguf_quant_error.py SOURCE.gguf A.gguf B.gguf [--rows 256]

Prints, per tensor, the type each file chose and each file's relative RMS error
(‖dequant − source‖ / ‖source‖) over the first `--rows` rows of every matrix, then the
totals per type. Source tensors may be F32, F16 or BF16.
"""
import argparse
import sys
from collections import defaultdict

import numpy as np
from gguf import GGUFReader, quants


def rows_of(t, n):
    """The first n rows of tensor t as f32 [rows, cols]."""
    cols = int(t.shape[0])
    data = np.asarray(t.data)
    if t.tensor_type.name in ("F32", "F16"):
        x = data.reshape(-1, cols).astype(np.float32)
    elif t.tensor_type.name == "BF16":
        x = (data.reshape(-1).view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(-1, cols)
    else:
        raw = data.reshape(-1, data.shape[-1])
        x = quants.dequantize(raw[:n], t.tensor_type).reshape(-1, cols)
    return x[:n]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("files", nargs=2)
    ap.add_argument("--rows", type=int, default=256)
    a = ap.parse_args()
    src = {t.name: t for t in GGUFReader(a.source).tensors}
    files = [{t.name: t for t in GGUFReader(f).tensors} for f in a.files]
    same, differ = 0, []
    tot = [defaultdict(lambda: [0.0, 0.0]) for _ in files]
    print(f"| tensor | {a.files[0]} | err | {a.files[1]} | err |")
    print("|---|---|---|---|---|")
    for name, s in src.items():
        if len(s.shape) < 2:
            continue
        x = rows_of(s, a.rows)
        cells = []
        for i, f in enumerate(files):
            t = f.get(name)
            if t is None:
                cells += ["missing", ""]
                continue
            y = rows_of(t, a.rows)
            e2, n2 = float(((y - x) ** 2).sum()), float((x ** 2).sum())
            tot[i][t.tensor_type.name][0] += e2
            tot[i][t.tensor_type.name][1] += n2
            cells += [t.tensor_type.name, f"{(e2 / max(n2, 1e-30)) ** 0.5:.4f}"]
        if cells[0] == cells[2]:
            same += 1
        else:
            differ.append(name)
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\n{same} tensors of the same type, {len(differ)} differ: {differ[:10]}")
    for i, f in enumerate(a.files):
        print(f"{f}: " + ", ".join(f"{k} {(e / n) ** 0.5:.4f}" for k, (e, n) in sorted(tot[i].items())))


if __name__ == "__main__":
    sys.exit(main())
