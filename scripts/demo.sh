#!/usr/bin/env bash
# The main job: set up, then run the demo (extra arguments go to `descend demo`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/descend demo "$@"
