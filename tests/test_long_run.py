"""Long runs, bounded: memory after the warm-up stays flat. The full version (10,000 steps of
every optimizer in every implementation, with a table of figures) is benchmarks/long_run.py;
this test runs its ``run`` in a fresh interpreter and asserts, between the warm-up and the end:

- live tensors (``torch.Tensor`` objects the garbage collector sees) are the same number at
  every sample: a leak of one tensor per step, per skipped step or per L-BFGS history update
  would show as hundreds;
- Python objects tracked by the collector do not grow;
- resident memory (VmRSS, after malloc_trim) grows by at most RSS_MARGIN_MIB = 2 MiB.
  Measured growth over 2,000 steps (and over 10,000 in the benchmark) is at most 0.3 MiB,
  allocator noise; a leak of one step's gradients (676 float32 numbers, 2.7 kB) over the
  1,600 steps after the warm-up would be 4.3 MB.

Optimizers: the default SGD (fused) with ``nonfinite="skip"`` skipping a bad batch every 997
steps, AdamW with flat storage and the guard, 2,000 steps each; L-BFGS with the strong Wolfe
line search (history of 10, full after the warm-up) and conjugate gradient, 1,000 steps of
2 iterations each (a step costs several closure evaluations).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import load_benchmark

WARMUP = 400
OBJECT_MARGIN = 8  # gc objects; the runs step at least 600 times after the warm-up
RSS_MARGIN_MIB = 2.0


long_run = load_benchmark("long_run")
ROOT = Path(__file__).resolve().parent.parent


def run_in_a_fresh_process(name: str, steps: int) -> Any:
    """long_run.run in its own interpreter: the census counts every tensor and object of the
    process, and what earlier tests in this worker left behind can be freed mid-run (CI once saw
    59 tensors of another test go between the warm-up and the next sample)."""
    code = ("import dataclasses, json, sys; sys.path.insert(0, sys.argv[1]); "
            "from tests.helpers import load_benchmark; "
            "r = load_benchmark('long_run').run(sys.argv[2], steps=int(sys.argv[3]), warmup=int(sys.argv[4]), "
            "checkpoints=2); print(json.dumps(dataclasses.asdict(r)))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), name, str(steps), str(WARMUP)],
                         capture_output=True, text=True, check=True, timeout=600)
    raw = json.loads(out.stdout.strip().splitlines()[-1])
    return long_run.Result(raw["name"], [long_run.Sample(**s) for s in raw["samples"]], raw["seconds"])


@pytest.mark.parametrize(("name", "steps"), [("SGD-fused", 2000), ("AdamW-flat", 2000), ("LBFGS-wolfe", 1000),
                                             ("CG", 1000)])
def test_memory_stays_flat(name: str, steps: int) -> None:
    result = run_in_a_fresh_process(name, steps)
    figures = [(s.step, s.tensors, s.objects, round(s.rss, 2)) for s in result.samples]
    assert [s.step for s in result.samples] == [WARMUP, (WARMUP + steps) // 2, steps]
    assert all(s.tensors == result.warm.tensors for s in result.samples), figures
    # (in a fresh process the objects tracked move by one between samples; a leak of one object
    # per step adds hundreds)
    assert result.end.objects - result.warm.objects <= OBJECT_MARGIN, figures
    assert result.max_rss_growth <= RSS_MARGIN_MIB, figures
