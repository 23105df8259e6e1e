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


# --- a damaged results file ------------------------------------------------------------------


def _damage(kind: str, line: bytes) -> bytes:
    rec = json.loads(line)
    if kind == "not json":
        return line[: len(line) // 2] + b"}{"
    if kind == "undecodable":
        return line[:10] + b"\xff\xfe" + line[10:]
    if kind == "not a record":
        return json.dumps([rec["key"], rec["test_error"]]).encode()
    if kind == "string":
        return json.dumps({**rec, "test_error": "0.1"}).encode()
    if kind == "null":
        return json.dumps({**rec, "test_error": None}).encode()
    if kind == "bool":
        return json.dumps({**rec, "test_error": True}).encode()
    if kind == "nan":
        return json.dumps({**rec, "test_error": float("nan")}).encode()  # NaN: Python's JSON reads it
    if kind == "negative":
        return json.dumps({**rec, "test_error": -5}).encode()  # printed "best: -500 %" before
    if kind == "above 1":
        return json.dumps({**rec, "test_error": 1.5}).encode()
    raise AssertionError(kind)


DAMAGE = {"not json": "not JSON (a write cut short?)", "undecodable": "bytes that are not UTF-8", "not a record": "not a cell's record",
          "string": "test_error '0.1' is not a number", "null": "test_error None is not a number",
          "bool": "test_error True is not a number", "nan": "test_error nan is outside [0, 1]",
          "negative": "test_error -5 is outside [0, 1]", "above 1": "test_error 1.5 is outside [0, 1]"}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_line_is_dropped_and_its_cell_recomputed(kind: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--epochs", "1", "--workers", "1", "--methods", "adam-l2"]
    assert _main(tmp_path, *argv) == 0
    path = tmp_path / "sweep.jsonl"
    lines = path.read_bytes().splitlines()
    assert len(lines) == 4
    original = {json.loads(line)["key"]: json.loads(line)["test_error"] for line in lines}
    path.write_bytes(b"\n".join([lines[0], _damage(kind, lines[1]), lines[2], lines[3]]) + b"\n")
    capsys.readouterr()

    assert _main(tmp_path, *argv) == 0
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.startswith("descend sweep:")]
    assert err == [f"descend sweep: {path}: dropped 1 damaged line (line 2: {DAMAGE[kind]}); the cells they held "
                   "are computed again"]
    assert "Traceback" not in captured.err and "(1 computed now" in captured.out
    assert "best: -" not in captured.out
    after = path.read_bytes().splitlines()
    assert after[:3] == [lines[0], lines[2], lines[3]]  # the sound lines as they were, the damaged one gone
    assert len(after) == 4 and json.loads(after[3])["key"] == json.loads(lines[1])["key"]
    assert {json.loads(line)["key"]: json.loads(line)["test_error"] for line in after} == original  # same result

    # a rerun finishes normally: nothing damaged, nothing computed, nothing written
    before = path.read_bytes()
    assert _main(tmp_path, *argv) == 0
    captured = capsys.readouterr()
    assert "damaged line" not in captured.err and "(0 computed now" in captured.out
    assert path.read_bytes() == before


def test_many_damaged_lines_are_reported_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(tmp_path, "--epochs", "1", "--workers", "1") == 0
    path = tmp_path / "sweep.jsonl"
    lines = path.read_bytes().splitlines()
    original = {json.loads(line)["key"]: json.loads(line)["test_error"] for line in lines}
    damaged = [_damage("negative", lines[0]), lines[1], _damage("undecodable", lines[2]), b"", lines[3],
               _damage("string", lines[4]), *lines[5:7], _damage("not json", lines[7])]  # and no final newline
    path.write_bytes(b"\n".join(damaged))
    capsys.readouterr()
    assert _main(tmp_path, "--epochs", "1", "--workers", "1") == 0
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.startswith("descend sweep:")]
    assert err == [f"descend sweep: {path}: dropped 4 damaged lines (line 1: test_error -5 is outside [0, 1] and 3 "
                   "more); the cells they held are computed again"]
    assert "(4 computed now" in captured.out and "8 of 8 cells" in captured.out
    after = path.read_bytes().splitlines()
    assert after[:4] == [lines[1], lines[3], lines[5], lines[6]]
    assert len(after) == 8
    assert {json.loads(line)["key"]: json.loads(line)["test_error"] for line in after} == original


def test_read_results_leaves_damaged_lines_out(tmp_path: Path) -> None:
    path = tmp_path / "sweep.jsonl"
    good = {"key": "k1", "test_error": 0.25}
    path.write_bytes(b"\n".join([json.dumps(good).encode(), b'{"key": "k2", "test_error": -5}', b"\xff",
                                 b'{"key": "k3", "test_error": "x"}', b'{"key": "k4"']))
    assert sweep.read_results(str(path)) == {"k1": good}
    records, sound, damaged = sweep.scan_results(str(path))
    assert records == {"k1": good} and sound == [json.dumps(good).encode()]
    assert [n for n, _ in damaged] == [2, 3, 4, 5]
    assert path.read_bytes().count(b"\n") == 4  # reading changes nothing


@pytest.mark.parametrize("taken", ["sweep.jsonl", "sweep.png"])
def test_output_names_taken_by_directories_are_one_line_exit_1_before_any_work(
        taken: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / taken).mkdir()
    monkeypatch.setattr(sweep, "train_cell", lambda cell: pytest.fail("a cell ran"))
    assert _main(tmp_path, "--epochs", "1", "--workers", "1") == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"descend sweep: error: cannot write {str(tmp_path / taken)!r}: "
                                         "it is a directory"]
    assert captured.out == ""
    assert sorted(os.listdir(tmp_path)) == [taken]


@pytest.mark.parametrize("argv, message", [
    (["--seed", "1" * 23], "argument --seed: a seed must be an integer in [-2**63, 2**64 - 1]"),
    (["--seed", str(2**64)], "argument --seed: a seed must be an integer in [-2**63, 2**64 - 1]"),
    (["--seed", str(-(2**63) - 1)], "argument --seed: a seed must be an integer in [-2**63, 2**64 - 1]"),
    (["--epochs", "0"], "argument --epochs: must be a positive integer, got 0"),
    (["--workers", "0"], "argument --workers: must be a positive integer, got 0"),
    (["--n-lr", "1001"], "argument --n-lr: must be an integer in [1, 1000], got 1001"),
    (["--n-wd", "-1"], "argument --n-wd: must be an integer in [1, 1000], got -1"),
    (["--n-wd", "1" * 23], "argument --n-wd: must be an integer in [1, 1000]"),
    (["--lr", "-8", "-8", "--n-lr", "2"], "--lr -8 -8 with --n-lr 2: the same value 2 times"),
    (["--wd", "-3", "-3", "--n-wd", "3"], "--wd -3 -3 with --n-wd 3: the same value 3 times"),
    (["--lr", "nan", "-4"], "argument --lr: log2 exponent must be in [-60, 10], got nan"),
    (["--wd", "-2", "inf"], "argument --wd: log2 exponent must be in [-60, 10], got inf"),
])
def test_numeric_options_are_usage_errors(argv: list[str], message: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["sweep", "--out", str(tmp_path), *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: descend sweep" in err and f"descend sweep: error: {message}" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []


def test_one_value_twice_is_fine_with_one_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = cli.build_parser().parse_args(["sweep", "--lr", "-8", "-8", "--n-lr", "1", "--seed", str(2**64 - 1)])
    sweep.check_args(args)  # no error
    cells, lrs, _ = sweep.cells_of(args)
    assert lrs == [2.0**-8] and len(cells) == len({c.key for c in cells}) == 2 * 8
