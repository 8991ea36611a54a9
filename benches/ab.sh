#!/usr/bin/env bash
# Two dsv3 binaries side by side on the same models, runs alternating (the machine is shared and
# noisy): `dsv3 bench` prefill and decode per model, ROUNDS rounds.
#   bash benches/ab.sh OLD_DSV3 NEW_DSV3 ROUNDS MODEL_DIR...
set -euo pipefail
old=$1 new=$2 rounds=$3
shift 3
for m in "$@"; do
  for r in $(seq "$rounds"); do
    for tag in old new; do
      bin=$old; [ "$tag" = new ] && bin=$new
      "$bin" bench --model "$m" --prompt-len 128 --gen 64 --json 2>/dev/null |
        python3 -c "import json,sys; v=json.load(sys.stdin); print('$(basename "$m")', '$tag', $r, round(v['prefill_tokens_per_second'],1), round(v['decode_tokens_per_second'],2))"
    done
  done
done
