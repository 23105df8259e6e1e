#!/usr/bin/env bash
# Creates ./.venv (once) and installs descend with its demo and test extras.
# torch is installed first as the CPU build 2.13.0 when no torch is present, so that the
# broad `torch>=2.4` of the package metadata never pulls a multi-GB CUDA build here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
stamp=.venv/.descend-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".[demo,test]"
  touch "$stamp"
fi
