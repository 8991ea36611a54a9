#!/usr/bin/env bash
# Decode/prefill speed and memory of the bench-1b checkpoint in every weight format dsv3 runs,
# side by side in one session (issue 4): f32, bf16, FP8 (weight-only and with --act-quant fp8),
# NVFP4 and MXFP4. The bf16 checkpoint is made with `dsv3 random-model` and every other format
# with `dsv3 convert` from it. Results: benches/README.md.
# Usage: bash benches/formats.sh [DIR=bench-models]
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-bench-models}
DSV3=${DSV3:-target/release/dsv3}
[ -x "$DSV3" ] || cargo build --release
[ -d "$DIR/bf16" ] || "$DSV3" random-model --preset bench-1b --dtype bf16 --out "$DIR/bf16"
for f in f32 fp8 fp4 mxfp4; do
  [ -d "$DIR/conv-$f" ] || "$DSV3" convert --from "$DIR/bf16" --to "$DIR/conv-$f" --format "$f" --max-memory 2G
done
# The same with the embedding and head in FP8 too (`--quantize-head`).
for f in fp8 mxfp4; do
  [ -d "$DIR/conv-$f-qh" ] || "$DSV3" convert --from "$DIR/bf16" --to "$DIR/conv-$f-qh" --format "$f" --quantize-head --max-memory 2G
done
echo "| format | checkpoint MB | peak RSS MB | prefill tok/s | decode tok/s | decode vs bf16 |"
echo "|---|---|---|---|---|---|"
base=""
for spec in "bf16:$DIR/bf16:none" "f32:$DIR/conv-f32:none" "fp8:$DIR/conv-fp8:none" "fp8 + act-quant fp8:$DIR/conv-fp8:fp8" "nvfp4:$DIR/conv-fp4:none" "mxfp4:$DIR/conv-mxfp4:none" "fp8 + FP8 head:$DIR/conv-fp8-qh:none" "mxfp4 + FP8 head:$DIR/conv-mxfp4-qh:none"; do
  IFS=: read -r name dir aq <<< "$spec"
  size=$(du -sm "$dir" | cut -f1)
  json=$("$DSV3" bench --model "$dir" --prompt-len 128 --gen 64 --act-quant "$aq" --json)
  python3 - "$name" "$size" "$json" "${base:-0}" <<'PY'
import json, sys
name, size, j, base = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4])
d = j["decode_tokens_per_second"]
ratio = f"{d / base:.2f}x" if base else "1.00x"
print(f"| {name} | {size} | {j['peak_memory_bytes'] / 2**20:.0f} | {j['prefill_tokens_per_second']:.0f} | {d:.1f} | {ratio} |")
PY
  [ -n "$base" ] || base=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['decode_tokens_per_second'])" "$json")
done
