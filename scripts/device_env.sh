# Sourced on the GPU machine, from the checkout's root, carrying .devsite (devsite.tar.xz: the packages the image
# lacks, Unsloth's apart) and .fxcache (the random source's cut tokenizers):  . scripts/device_env.sh
# Unpacks the packages to /tmp/dev (once per machine), installs fx (editable, no dependencies), and points
# FX_CACHE at /tmp/fxcache, where the random weights are written once per machine and reused while it stays warm.
# PYTHON picks another interpreter and DEVICE_SITE another package folder ("" for none): a dry run on a CPU.
mkdir -p /tmp/dev /tmp/fxcache
[ -d /tmp/dev/site ] || tar -xJf .devsite/devsite.tar.xz -C /tmp/dev || return 1
# Unsloth, where carried (.devsite/unsloth.tar.xz: site-unsloth/, for scripts/measure_kernels.py's Unsloth workers)
[ -d /tmp/dev/site-unsloth ] || [ ! -f .devsite/unsloth.tar.xz ] || tar -xJf .devsite/unsloth.tar.xz -C /tmp/dev || return 1
cp -rn .fxcache/. /tmp/fxcache/
export PYTHONPATH=${DEVICE_SITE-/tmp/dev/site} PYTHONUNBUFFERED=1 FX_CACHE=/tmp/fxcache FX_DEVSITE=/tmp/dev \
  HF_HUB_OFFLINE=1
py=${PYTHON:-python3}
"$py" -m pip install -q --no-deps --no-build-isolation --no-cache-dir -e . >/tmp/pip-fx.log 2>&1 \
  || { tail -20 /tmp/pip-fx.log; return 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
"$py" -c "import torch, transformers, peft, trl, bitsandbytes; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'bitsandbytes', bitsandbytes.__version__)"
# the CLI, whether or not pip put its script on PATH
fx() { "$py" -c 'import sys; from fx.cli import main; sys.argv[0] = "fx"; sys.exit(main())' "$@"; }
