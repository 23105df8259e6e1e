#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA device and a CUDA build of torch (it never installs
# torch: the machine's own is used). In under 5 minutes it
#   1. makes ./.venv-gpu on top of the system's Python packages (so the CUDA torch is seen) and
#      installs descend and its test extra there; without network it installs from the wheels in
#      ./.gpu-wheels when that folder exists (`pip download -d .gpu-wheels -e ".[test]"` beforehand);
#   2. runs the CUDA tests (tests/test_cuda.py: parity of every path, no host-device syncs under
#      torch.cuda.set_sync_debug_mode("error"), bf16/fp16 fused kernels, softshrink L1, GradScaler
#      with fp16 autocast, CUDA-graph capture and replay), the host-sync and DTensor-fused tests;
#   3. runs `descend bench --device cuda` on GPT-2 small's shapes (AdamW and SGD) and the
#      per-step overhead set;
# and prints one summary line: "gpu-check: PASS|FAIL ...". Writes its logs to ${OUT:-.gpu-check}.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-.gpu-check}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
start=$(date +%s)

fail() { echo "gpu-check: FAIL $*"; exit 1; }

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
  || fail "no CUDA device seen by $PY's torch ($("$PY" -c 'import torch; print(torch.__version__)' 2>&1 | tail -1))"

if [ ! -x .venv-gpu/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv-gpu || fail "cannot make .venv-gpu"
fi
pip_args=(--quiet --disable-pip-version-check)
if [ -d .gpu-wheels ]; then
  pip_args+=(--no-index --find-links .gpu-wheels)
fi
# torch is already there (system site packages), so `torch>=2.4` is satisfied and never replaced
.venv-gpu/bin/pip install "${pip_args[@]}" -e ".[test]" >"$OUT_DIR/install.log" 2>&1 \
  || fail "pip install -e .[test] (see $OUT_DIR/install.log)"
.venv-gpu/bin/python -c "import torch, descend; assert torch.cuda.is_available()" \
  || fail "the venv's torch does not see the GPU"
gpu=$(.venv-gpu/bin/python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'), torch.__version__)")

timeout 180 .venv-gpu/bin/python -m pytest -q -p no:cacheprovider -p no:randomly \
  tests/test_cuda.py tests/test_host_syncs.py tests/test_dtensor_fused.py \
  --junitxml="$OUT_DIR/tests.xml" >"$OUT_DIR/tests.log" 2>&1
tests_rc=$?
counts=$(.venv-gpu/bin/python - "$OUT_DIR/tests.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    print("tests: no report"); sys.exit()
suites = [root] if root.tag == "testsuite" else list(root)
n = lambda k: sum(int(s.get(k, 0)) for s in suites)
print(f"tests: {n('tests') - n('failures') - n('errors') - n('skipped')} passed, "
      f"{n('failures') + n('errors')} failed, {n('skipped')} skipped")
EOF
)

timeout 150 .venv-gpu/bin/descend bench --device cuda --sets gpt2,overhead --optimizers adamw,sgd \
  --steps 20 --min-seconds 1 --no-memory --json "$OUT_DIR/bench.json" >"$OUT_DIR/bench.log" 2>&1
bench_rc=$?
bench=$(.venv-gpu/bin/python - "$OUT_DIR/bench.json" <<'EOF'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["rows"]
except (OSError, ValueError, KeyError):
    print("bench: no report"); sys.exit()
out = []
for r in rows:
    if r["kind"] == "main" and r["label"].startswith("descend") and r["vs_fastest"]:
        out.append(f"{r['set']}/{r['optimizer']} {r['label']} {r['vs_fastest']:.2f}x torch's fastest")
    if r["kind"] == "overhead" and r["vs_baseline"] and r["label"].startswith("descend"):
        out.append(f"overhead {r['label']} {r['vs_baseline']:.2f}x torch fused")
print("bench: " + "; ".join(out) if out else "bench: no rows")
EOF
)

secs=$(( $(date +%s) - start ))
verdict=PASS
[ "$tests_rc" -eq 0 ] || verdict=FAIL
[ "$bench_rc" -eq 0 ] || verdict=FAIL
echo "gpu-check: $verdict on $gpu in ${secs}s; $counts (rc $tests_rc); $bench (rc $bench_rc); logs in $OUT_DIR"
[ "$verdict" = PASS ]
