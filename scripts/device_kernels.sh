#!/usr/bin/env bash
# One device run of scripts/measure_kernels.py on the GPU machine (docs/performance.md, "GPU work per token"),
# from the checkout's root there, carrying .devsite and .fxcache (scripts/device_env.sh):
#   bash scripts/device_kernels.sh NAME [measure_kernels.py options...]
# What comes back under $OUT (at most 8 files): NAME.log, NAME-summary.json, NAME-table.md, NAME-logs.tgz.
set -uo pipefail
name=$1; shift
out=${OUT:-/tmp/out}
mkdir -p "$out"
. scripts/device_env.sh || exit 1
work=/tmp/mk/$name
rm -rf "$work"
"$py" scripts/measure_kernels.py "${EXPERIMENT:-experiments/llama2_qlora_bench.toml}" --out "$work" "$@" 2>&1 \
  | tee "$out/$name.log"
rc=${PIPESTATUS[0]}
cp "$work/summary.json" "$out/$name-summary.json"
cp "$work/table.md" "$out/$name-table.md"
tar -czf "$out/$name-logs.tgz" -C "$work" --exclude=setup.json $(cd "$work" && ls -d *.log work 2>/dev/null)
exit "$rc"
