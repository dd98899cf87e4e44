#!/usr/bin/env bash
# Same-process A/B of two atelier builds on the lent GPU machine: runs `atelier bench --model`
# with each binary in turn, ROUNDS times, on the full-size random-weight model that
# scripts/gpu-check-models.py builds (run that first in the same call), and prints each
# round's network timings side by side. Timings from different machines do not compare; these
# do.
# Usage: bash scripts/gpu-ab.sh OLD_BIN NEW_BIN [ROUNDS] [WORK_DIR]
set -uo pipefail
old=$1 new=$2 rounds=${3:-3} work=${4:-/tmp/sd15-random}
[ -f "$work/inputs.safetensors" ] || { echo "no model in $work: run scripts/gpu-check-models.py first"; exit 1; }
for r in $(seq "$rounds"); do
  for bin in "$old" "$new"; do
    printf '%-28s round %s: ' "$(basename "$bin")" "$r"
    "$bin" bench --model "$work" --batch 2 --vae-batch 1 --repeat 20 2>&1 \
      | awk '/^(clip|unet|vae decode|vae encode) / { n = ($1 == "vae") ? $1 " " $2 : $1; v = ($1 == "vae") ? $4 : $3; printf "%s %s ms  ", n, v } END { print "" }'
  done
done
