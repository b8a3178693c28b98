#!/usr/bin/env bash
# Set up finetune on a fresh machine: a virtual environment in .venv with the project and its test tools.
# Without CUDA, torch==2.13.0 is installed first: pip then takes the CPU wheel and no other package can pull a
# newer torch with several GB of CUDA libraries (ENVIRONMENT.md, "torch trap").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! command -v nvidia-smi >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[test]"
