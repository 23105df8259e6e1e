"""``descend sweep`` on a 2×2 grid: every cell once, the figure, and resuming after an
interrupted run (a results file cut short, and a real Ctrl-C to a pool of workers) with
nothing lost and nothing recomputed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from descend import cli
from descend.cli import sweep

GRID = ["--n-lr", "2", "--n-wd", "2", "--lr", "-8", "-6", "--wd", "-12", "-6", "--no-progress"]


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in _lines(path)]


def _main(out: Path, *extra: str) -> int:
    return cli.main(["sweep", "--out", str(out), *GRID, *extra])


def test_grid_runs_every_cell_once_and_draws_the_heatmaps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(tmp_path, "--epochs", "1", "--workers", "1") == 0
    out = capsys.readouterr().out
    records = _records(tmp_path / "sweep.jsonl")
    assert len(records) == 8 and len({r["key"] for r in records}) == 8
    assert {r["method"] for r in records} == {"adam-l2", "adamw"}
    assert sorted({r["lr"] for r in records}) == [2.0**-8, 2.0**-6]
    assert sorted({r["weight_decay"] for r in records}) == [2.0**-12, 2.0**-6]
    assert all(0 <= r["test_error"] <= 1 and r["epochs"] == 1 for r in records)
    png = (tmp_path / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Adam + L2: test error %" in out and "AdamW" in out and "8 of 8 cells" in out

    # the same command again: nothing to do, nothing appended
    before = (tmp_path / "sweep.jsonl").read_bytes()
    assert _main(tmp_path, "--epochs", "1", "--workers", "1") == 0
    assert "(0 computed now" in capsys.readouterr().out
    assert (tmp_path / "sweep.jsonl").read_bytes() == before

    # a different setting is a different cell
    assert cli.main(["sweep", "--out", str(tmp_path), *GRID, "--epochs", "1", "--workers", "1",
                     "--methods", "adam-l2", "--n-wd", "1"]) == 0
    assert len(_records(tmp_path / "sweep.jsonl")) == 8  # (lr, 2^-12) cells of adam-l2 were all there


def test_resume_after_a_write_cut_short(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(tmp_path, "--epochs", "1", "--workers", "1") == 0
    path = tmp_path / "sweep.jsonl"
    lines = _lines(path)
    kept = lines[:3]
    path.write_text("\n".join(kept) + "\n" + lines[3][: len(lines[3]) // 2], encoding="utf-8")  # no newline
    capsys.readouterr()
    assert _main(tmp_path, "--epochs", "1", "--workers", "1") == 0
    assert "(5 computed now" in capsys.readouterr().out
    after = _lines(path)
    assert after[:3] == kept  # finished cells untouched
    valid = sweep.read_results(str(path))
    assert len(valid) == 8
    assert sorted(r["key"] for r in valid.values()) == sorted(json.loads(line)["key"] for line in lines)


def test_ctrl_c_on_a_pool_keeps_finished_cells_and_rerun_does_the_rest(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "sweep.jsonl"
    argv = [sys.executable, "-m", "descend", "sweep", "--out", str(tmp_path), *GRID, "--epochs", "10",
            "--workers", "2"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists() and _lines(path):
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground process group
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    kept = _lines(path)
    assert 1 <= len(kept) < 8
    assert all(json.loads(line)["epochs"] == 10 for line in kept)

    assert cli.main(["sweep", "--out", str(tmp_path), *GRID, "--epochs", "10", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert f"({8 - len(kept)} computed now" in out
    after = _lines(path)
    assert after[: len(kept)] == kept
    assert len(after) == 8 and len({json.loads(line)["key"] for line in after}) == 8
