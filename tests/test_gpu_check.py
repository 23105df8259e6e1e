"""scripts/gpu-check.sh where there is no GPU: it stops at once with one FAIL line naming why
(on a GPU machine it is run by hand: see the script's header)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu-check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: run the script itself")
def test_gpu_check_fails_fast_without_a_device(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: FAIL no CUDA device"), done.stdout
    assert torch.__version__ in lines[0]
