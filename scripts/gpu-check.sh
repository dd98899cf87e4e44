#!/usr/bin/env bash
# The whole check on the lent GPU machine, in one call: adapter report, every test binary on
# the device's default path (cooperative matrices there), the matmul tests again forced onto
# the scalar path, then the kernel benchmark; prints a short table last.
# Here: ../shared/tools/device-pack, then the device tool's run with carry [".gl", ".device"]
# and the command `bash scripts/gpu-check.sh [bench filter]`.
set -uo pipefail
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
export ATELIER_BIN=$PWD/.device/bin/atelier
out=${OUT:-/tmp/out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader || true
.device/bin/atelier info 2>&1 | tee "$out/info.txt" | grep -E "^\[|selected|kernel path|coop 16x16x16"
summary=""
for t in .device/tests/*; do
  name=$(basename "$t")
  if "$t" --test-threads=1 >"$out/test-$name.log" 2>&1; then r=pass; else r=FAIL; fi
  summary+="$(printf '%-28s %s' "test $name" "$r")"$'\n'
done
if ATELIER_SCALAR=1 .device/tests/matmul --test-threads=1 >"$out/test-matmul-scalar.log" 2>&1; then r=pass; else r=FAIL; fi
summary+="$(printf '%-28s %s' "test matmul (scalar)" "$r")"$'\n'
grep -h -A12 "panicked" "$out"/test-*.log | head -40
.device/bin/atelier bench ${1:+--filter "$1"} 2>&1 | tee "$out/bench.txt"
echo; echo "$summary"
