#!/usr/bin/env bash
# On the GPU machine, from the checkout's root, carrying .devsite (devsite.tar.xz: the packages the image lacks) and
# .fxcache (the random source's cut tokenizers): fx plan and fx bench of each preference method's Llama 2 7B
# experiment (experiments/llama2_<method>_bench.toml) under the T4 cap, one after the other, each result and log in
# $OUT (default ./bench-out). The random 7B weights are written once to /tmp/fxcache and reused by the next method.
#
#   bash scripts/bench_methods.sh [STEPS [WARMUP [METHODS...]]]      (default: 8 2 orpo simpo kto)
set -uo pipefail
steps=${1:-8}; warmup=${2:-2}; shift $(( $# < 2 ? $# : 2 ))
methods=("$@"); [ ${#methods[@]} -gt 0 ] || methods=(orpo simpo kto)
out=${OUT:-bench-out}; mkdir -p "$out" /tmp/dev /tmp/fxcache
[ -d /tmp/dev/site ] || tar -xJf .devsite/devsite.tar.xz -C /tmp/dev || exit 1
[ -d .fxcache ] && cp -rn .fxcache/. /tmp/fxcache/
export PYTHONPATH=/tmp/dev/site PYTHONUNBUFFERED=1 FX_CACHE=/tmp/fxcache HF_HUB_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1
python3 -m pip install -q --no-deps --no-build-isolation --no-cache-dir -e . >/tmp/pip-fx.log 2>&1 \
  || { tail -20 /tmp/pip-fx.log; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, trl, bitsandbytes; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'bitsandbytes', bitsandbytes.__version__)"
fx() { python3 -c 'import sys; from fx.cli import main; sys.argv[0] = "fx"; sys.exit(main())' "$@"; }
status=0
for m in "${methods[@]}"; do
  exp=experiments/llama2_${m}_bench.toml
  echo "== $m: fx plan $exp"
  fx plan "$exp" > "$out/$m-plan.txt" 2>&1; tail -3 "$out/$m-plan.txt"
  echo "== $m: fx bench $exp --steps $steps --warmup $warmup"
  start=$(date +%s)
  fx bench "$exp" --steps "$steps" --warmup "$warmup" --out "$out/$m-h200.json" > "$out/$m-bench.log" 2>&1 \
    || { echo "$m: fx bench failed"; status=1; }
  tail -25 "$out/$m-bench.log"; echo "$m: $(( $(date +%s) - start )) s"
done
exit $status
