#!/usr/bin/env python3
"""dsv3 and llama-perplexity on the same GGUF and text: the same chunks scored the same way.

    python benches/gguf_perplexity.py --llama LLAMA_CPP_DIR FILE.gguf TEXT [--ctx 128] [--chunks 4]

llama-perplexity tokenizes TEXT (with BOS), cuts it into chunks of --ctx tokens, puts BOS first in
each, and scores the second half of every chunk (tokens ctx/2+1 .. ctx-1). This does the same with
`dsv3 tokenize` and `dsv3 score --ids` and prints both perplexities per chunk and in total.
"""
import argparse
import json
import math
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DSV3 = ROOT / "target/release/dsv3"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama", type=Path, required=True)
    ap.add_argument("model", type=Path)
    ap.add_argument("text", type=Path)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--chunks", type=int, default=4)
    a = ap.parse_args()
    out = subprocess.run([str(a.llama / "build/bin/llama-perplexity"), "-m", str(a.model), "-f", str(a.text),
                          "-c", str(a.ctx), "-b", str(a.ctx), "--chunks", str(a.chunks), "-t", "2"],
                         check=True, capture_output=True, text=True)
    log = out.stdout + out.stderr
    llama_running = [float(v) for v in re.findall(r"\[\d+\]([\d.]+),", log)]
    llama_final = float(re.search(r"Final estimate: PPL = ([\d.]+)", log).group(1))
    def tokenize(text):
        return json.loads(subprocess.run([str(DSV3), "tokenize", "--tokenizer", str(a.model), "--text", text, "--json"],
                                         check=True, capture_output=True, text=True).stdout)["ids"]
    tok = tokenize(a.text.read_text())
    # llama-perplexity puts BOS first in each chunk where the vocabulary adds one, and otherwise
    # scores the text's own tokens.
    bos = tokenize("")[:1]
    n, first = a.ctx, a.ctx // 2
    nll, count, running = 0.0, 0, []
    for i in range(min(a.chunks, len(tok) // n)):
        ids = bos + tok[i * n + len(bos):(i + 1) * n]
        s = json.loads(subprocess.run([str(DSV3), "score", "--model", str(a.model), "--ids", ",".join(map(str, ids)),
                                       "--json"], check=True, capture_output=True, text=True).stdout)
        lp = s["logprobs"][first:n - 1]
        nll -= sum(lp)
        count += len(lp)
        running.append(math.exp(nll / count))
    dsv3_final = running[-1]
    print(f"| file | chunks × ctx | llama-perplexity | dsv3 | dsv3 / llama |")
    print(f"|---|---|---|---|---|")
    print(f"| {a.model.name} | {len(running)} × {n} | {llama_final:.4f} | {dsv3_final:.4f} | {dsv3_final / llama_final:.5f} |")
    print("running:", " ".join(f"{x:.2f}/{y:.2f}" for x, y in zip(running, llama_running)))


if __name__ == "__main__":
    main()
