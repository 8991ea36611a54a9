#!/usr/bin/env bash
# The report's claims at small scale (issue 3; results in docs/experiments.md): the tiny preset on
# the built-in corpus, same seed, data and steps, one run per setting:
#   aux-free (default: bias γ=1e-3 + sequence-wise α=1e-4) vs aux-loss α=0.001 and 0.01 vs none;
#   MTP depth 1 (the aux-free run) vs 0; γ set to 0 half-way (the report's last 500B tokens).
# Then comparison plots and a table: dsv3 plot --compare.
# Usage: bash scripts/experiments.sh [OUT=runs/exp] [STEPS=300]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/exp}
STEPS=${2:-300}
DSV3=${DSV3:-target/release/dsv3}
[ -x "$DSV3" ] || cargo build --release
run() {
  local name=$1; shift
  if [ -f "$OUT/$name/train_state.json" ] && grep -q "\"step\": $STEPS" "$OUT/$name/train_state.json"; then
    echo "$name: done already"; return
  fi
  echo "== $name: $*"
  "$DSV3" train --steps "$STEPS" --out "$OUT/$name" --no-sample --json "$@" > "$OUT/$name.log"
  tail -1 "$OUT/$name.log"
}
mkdir -p "$OUT"
run aux-free
run aux-loss-0.001 --balance aux-loss --aux-alpha 0.001
run aux-loss-0.01 --balance aux-loss --aux-alpha 0.01
run none --balance none
run mtp0 --mtp-depth 0
run freeze-half --bias-freeze-step $((STEPS / 2))
"$DSV3" plot --compare --out "$OUT" \
  "$OUT/aux-free" "$OUT/aux-loss-0.001" "$OUT/aux-loss-0.01" "$OUT/none" "$OUT/mtp0" "$OUT/freeze-half" | tee "$OUT/table.md"
