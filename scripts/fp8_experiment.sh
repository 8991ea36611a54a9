#!/usr/bin/env bash
# The report's FP8 validation at small scale (issue 4; results in docs/experiments.md): the tiny
# preset on the built-in corpus, same seed, data and steps, trained with bf16 GEMM inputs (the
# baseline), with the FP8 recipe (every Linear's three GEMMs on E4M3, 1×128 / 128×128 tiles,
# promotion every 128), and with FP8 whose Dgrad gradient uses 128×128 blocks (the report's App.
# B.2 variant that diverged at 16B scale). Then comparison plots and a table.
# Usage: bash scripts/fp8_experiment.sh [OUT=runs/fp8] [STEPS=600]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/fp8}
STEPS=${2:-600}
DSV3=${DSV3:-target/release/dsv3}
[ -x "$DSV3" ] || cargo build --release
mkdir -p "$OUT"
for p in bf16 fp8 fp8-block-dgrad; do
  if [ -f "$OUT/$p/train_state.json" ] && grep -q "\"step\": $STEPS" "$OUT/$p/train_state.json"; then
    echo "$p: done already"; continue
  fi
  echo "== $p"
  "$DSV3" train --steps "$STEPS" --precision "$p" --out "$OUT/$p" --no-sample --json > "$OUT/$p.log"
  tail -1 "$OUT/$p.log"
done
"$DSV3" plot --compare --out "$OUT" "$OUT/bf16" "$OUT/fp8" "$OUT/fp8-block-dgrad" | tee "$OUT/table.md"
# Relative loss error against bf16: training loss averaged over the last 10% of steps, and the
# final validation loss.
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
def stats(p):
    rows = [json.loads(l) for l in open(f"{out}/{p}/metrics.jsonl")]
    train = [r["lm_loss"] for r in rows if "lm_loss" in r]
    tail = train[-max(1, len(train) // 10):]
    val = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    return sum(tail) / len(tail), (val[-1] if val else float("nan"))
base = stats("bf16")
print("| run | LM loss, last 10% of steps | rel. error vs bf16 | final val loss | rel. error vs bf16 |")
print("|---|---|---|---|---|")
for p in ["bf16", "fp8", "fp8-block-dgrad"]:
    t, v = stats(p)
    print(f"| {p} | {t:.4f} | {100 * (t - base[0]) / base[0]:+.3f}% | {v:.4f} | {100 * (v - base[1]) / base[1]:+.3f}% |")
PY
