#!/usr/bin/env bash
# The test command: lint and type-check the library, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks examples
.venv/bin/mypy src
.venv/bin/python -m pytest -n 2 -q "$@"
