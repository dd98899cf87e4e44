#!/usr/bin/env bash
# The whole check on the lent GPU machine, in one call: adapter report, every test binary on
# the device's default path (cooperative matrices there), the matmul and attention tests again
# forced onto the scalar path, the kernel benchmark, and the full-size model check against
# PyTorch (scripts/gpu-check-models.py), prompt-to-image against diffusers' pipeline
# (scripts/gpu-check-sample.py), a LoRA training step against diffusers + peft
# (scripts/gpu-check-train.py); prints a short table last.
# Here: ../shared/tools/device-pack --wheels, then the device tool's run with carry
# [".gl", ".device"] and the command `bash scripts/gpu-check.sh [PARTS] [bench filter]`, PARTS
# a comma list of tests, bench, models, sample, train (default: all five).
set -uo pipefail
parts=${1:-tests,bench,models,sample,train}
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
export ATELIER_BIN=$PWD/.device/bin/atelier
out=${OUT:-/tmp/out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader || true
.device/bin/atelier info 2>&1 | tee "$out/info.txt" | grep -E "^\[|selected|kernel path|coop 16x16x16"
summary=""
if [[ $parts == *tests* ]]; then
  for t in .device/tests/*; do
    name=$(basename "$t")
    if "$t" --test-threads=1 >"$out/test-$name.log" 2>&1; then r=pass; else r=FAIL; fi
    summary+="$(printf '%-28s %s' "test $name" "$r")"$'\n'
  done
  for name in matmul attention; do
    [ -x ".device/tests/$name" ] || continue
    if ATELIER_SCALAR=1 ".device/tests/$name" --test-threads=1 >"$out/test-$name-scalar.log" 2>&1; then r=pass; else r=FAIL; fi
    summary+="$(printf '%-28s %s' "test $name (scalar)" "$r")"$'\n'
  done
  grep -h -A12 "panicked" "$out"/test-*.log | head -40
fi
if [[ $parts == *bench* ]]; then
  .device/bin/atelier bench ${2:+--filter "$2"} 2>&1 | tee "$out/bench.txt"
fi
if [[ $parts == *models* ]]; then
  python3 scripts/gpu-check-models.py --atelier .device/bin/atelier --profile 2>&1 | tee "$out/models.txt" | grep -v "^$" | tail -n 200
fi
if [[ $parts == *train* ]]; then
  python3 scripts/gpu-check-train.py --atelier .device/bin/atelier --profile ${TRAIN_LOOP:+--loop} ${TRAIN_ARGS:-} 2>&1 | tee "$out/train.txt" | grep -v "^$" | tail -n 120
fi
if [[ $parts == *sample* ]]; then
  python3 scripts/gpu-check-sample.py --atelier .device/bin/atelier 2>&1 | tee "$out/sample.txt" | grep -v "^$" | tail -n 40
fi
echo; echo "$summary"
