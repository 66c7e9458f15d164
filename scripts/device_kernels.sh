#!/usr/bin/env bash
# One device run of scripts/measure_kernels.py on the GPU machine (docs/performance.md, "GPU work per token").
# Run from the checkout's root there, carrying .devsite (devsite.tar.xz: the extra packages, Unsloth's apart) and
# .fxcache (the random source's cut tokenizers):
#   bash scripts/device_kernels.sh NAME [measure_kernels.py options...]
# The random weights go to /tmp/fxcache (written once per machine: a second run on a warm machine reuses them).
# What comes back under $OUT (at most 8 files): NAME.log, NAME-summary.json, NAME-table.md, NAME-logs.tgz.
set -uo pipefail
name=$1; shift
out=${OUT:-/tmp/out}
mkdir -p /tmp/dev /tmp/fxcache "$out"
[ -d /tmp/dev/site ] || tar -xJf .devsite/devsite.tar.xz -C /tmp/dev || exit 1
cp -rn .fxcache/. /tmp/fxcache/
export PYTHONPATH=${DEVICE_SITE-/tmp/dev/site} PYTHONUNBUFFERED=1 FX_CACHE=/tmp/fxcache FX_DEVSITE=/tmp/dev HF_HUB_OFFLINE=1
py=${PYTHON:-python3}
"$py" -m pip install -q --no-deps --no-build-isolation --no-cache-dir -e . >/tmp/pip-$name.log 2>&1 \
  || { tail -20 /tmp/pip-$name.log; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
"$py" -c "import torch, transformers, peft, trl, bitsandbytes; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'bitsandbytes', bitsandbytes.__version__)"
work=/tmp/mk/$name
rm -rf "$work"
"$py" scripts/measure_kernels.py "${EXPERIMENT:-experiments/llama2_qlora_bench.toml}" --out "$work" "$@" 2>&1 | tee "$out/$name.log"
rc=${PIPESTATUS[0]}
cp "$work/summary.json" "$out/$name-summary.json"
cp "$work/table.md" "$out/$name-table.md"
tar -czf "$out/$name-logs.tgz" -C "$work" --exclude=setup.json $(cd "$work" && ls -d *.log work 2>/dev/null)
exit "$rc"
