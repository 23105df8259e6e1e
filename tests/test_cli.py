"""The ``descend`` command line: help, usage errors (exit 2), unwritable output (exit 1,
one line, no traceback), Ctrl-C (exit 130), the lazily registered ``bench`` subcommand,
and ``import descend`` staying free of the demo's dependencies."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from importlib import metadata

import pytest

from descend import cli


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    return int(info.value.code or 0)


def test_help_lists_the_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "sweep" in out


@pytest.mark.parametrize("command", ["demo", "sweep"])
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"usage: descend {command}" in out and "--out" in out and "--seed" in out


@pytest.mark.parametrize("argv", [
    [],  # a command is required
    ["nonsense"],
    ["demo", "--no-such-option"],
    ["demo", "--epochs", "0"],
    ["demo", "--epochs", "many"],
    ["demo", "--seed", "x"],
    ["demo", "--only", "sgd-wd,nope"],
    ["sweep", "--n-lr", "0"],
    ["sweep", "--lr", "-3"],
    ["sweep", "--wd", "a", "b"],
    ["sweep", "--methods", "adam-l2,sgd"],
    ["sweep", "--workers", "-1"],
])
def test_bad_usage_exits_2_with_a_usage_message(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert "usage: descend" in err and "error:" in err


# One interpreter for both checks below: starting one (and importing torch) takes seconds.
_SCRIPT = """
import json, runpy, sys
import torch
before = set(sys.modules)
import descend
by_import = sorted(set(sys.modules) - before)
import descend.cli, descend.cli.demo, descend.cli.sweep
descend.cli.build_parser()
by_parser = sorted(set(sys.modules) - before)
print(json.dumps([by_import, by_parser]), flush=True)
sys.argv = ["descend", "demo", "--out", sys.argv[1], "--no-progress"]
runpy.run_module("descend", run_name="__main__")  # python -m descend demo --out ...
"""


@pytest.fixture(scope="module")
def fresh_interpreter(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, str]:
    blocker = tmp_path_factory.mktemp("cli") / "a-file"
    blocker.write_text("not a directory")
    out = str(blocker / "out")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, out], capture_output=True, text=True, timeout=300)
    return proc, out


def test_import_descend_does_not_import_the_demo_extras(fresh_interpreter) -> None:
    # torch itself imports tqdm when it is installed (torch.hub); what counts is what descend adds
    proc, _ = fresh_interpreter
    by_import, by_parser = json.loads(proc.stdout.strip().splitlines()[0])
    extras = ("sklearn", "matplotlib", "tqdm", "scipy")
    assert "descend" in by_import and "descend.cli" not in by_import
    assert [m for m in by_import if m.split(".")[0] in extras] == []
    assert [m for m in by_parser if m.split(".")[0] in extras] == []


def test_unwritable_output_directory_is_one_line_exit_1(fresh_interpreter, tmp_path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    proc, out = fresh_interpreter
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("descend demo: error: cannot write to output directory")
    assert out in lines[0] and "Traceback" not in proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1  # only the import check's line
    # the sweep checks the same way
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert cli.main(["sweep", "--out", str(blocker / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("descend sweep: error: cannot write to output directory")
    assert str(blocker / "out") in err[0]


def test_ctrl_c_exits_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    from descend.cli import demo

    monkeypatch.setattr(demo, "run", interrupted)
    assert cli.main(["demo"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_bench_is_registered_lazily(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # absent: importing descend.cli.bench fails
    monkeypatch.setitem(sys.modules, "descend.cli.bench", None)  # makes `import descend.cli.bench` raise ImportError
    parser = cli.build_parser()
    choices = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert "bench" not in choices and {"demo", "sweep", "muon-demo"} <= set(choices)

    # present: a module with add_arguments and run becomes a subcommand
    fake = types.ModuleType("descend.cli.bench")
    fake.__doc__ = "descend bench: a stand-in."

    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--size", type=int, default=3)

    def run(args: argparse.Namespace) -> int:
        print(f"bench size={args.size}")
        return 7

    fake.add_arguments = add_arguments  # type: ignore[attr-defined]
    fake.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "descend.cli.bench", fake)
    assert cli.main(["bench", "--size", "5"]) == 7
    assert "bench size=5" in capsys.readouterr().out


def test_console_script_is_declared() -> None:
    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")}
    assert scripts.get("descend") == "descend.cli:main"


# --- every numeric option is a usage error; outputs are checked before any work --------------

SEED_RANGE = "a seed must be an integer in [-2**63, 2**64 - 1] (torch.manual_seed's range)"


@pytest.mark.parametrize("argv, message", [
    (["bench", "--triad-mb", "0"], "argument --triad-mb: must be an integer in [1, 1048576], got 0"),
    (["bench", "--triad-mb", "-1"], "argument --triad-mb: must be an integer in [1, 1048576], got -1"),
    (["bench", "--triad-mb", "1" * 23], "argument --triad-mb: must be an integer in [1, 1048576]"),
    (["bench", "--triad-mb", "1.5"], "argument --triad-mb: invalid integer: '1.5'"),
    (["bench", "--seed", "1" * 23], f"argument --seed: {SEED_RANGE}, got {'1' * 23}"),
    (["bench", "--seed", "x"], "argument --seed: invalid seed: 'x'"),
    (["demo", "--seed", "1" * 23], f"argument --seed: {SEED_RANGE}, got {'1' * 23}"),
    (["demo", "--seed", str(-(2**63) - 1)], f"argument --seed: {SEED_RANGE}"),
    (["demo", "--epochs", "-3"], "argument --epochs: must be a positive integer, got -3"),
    (["sweep", "--seed", str(2**64)], f"argument --seed: {SEED_RANGE}, got {2**64}"),
    (["bench", "--steps", "0"], "argument --steps: must be a positive integer, got 0"),
    (["bench", "--steps", "two"], "argument --steps: invalid positive integer: 'two'"),
    (["bench", "--warmup", "0"], "argument --warmup: must be a positive integer, got 0"),
    (["bench", "--threads", "0"], "argument --threads: must be an integer in [1, 1024], got 0"),
    (["bench", "--threads", "1" * 23], "argument --threads: must be an integer in [1, 1024]"),
    (["bench", "--min-seconds", "-1"], "argument --min-seconds: must be a finite number >= 0, got -1"),
    (["bench", "--min-seconds", "nan"], "argument --min-seconds: must be a finite number >= 0, got nan"),
    (["bench", "--min-seconds", "inf"], "argument --min-seconds: must be a finite number >= 0, got inf"),
    (["bench", "--min-seconds", "soon"], "argument --min-seconds: invalid number: 'soon'"),
    (["bench", "--sets", "resnet50,nope"], "argument --sets: Invalid --sets: 'resnet50,nope'"),
    (["bench", "--optimizers", ","], "argument --optimizers: Invalid --optimizers: ','"),
])
def test_numeric_options_are_usage_errors_before_any_work(argv: list[str], message: str,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from descend.cli import bench, demo, sweep

    for module in (bench, demo, sweep):
        monkeypatch.setattr(module, "run", lambda args: pytest.fail("the command ran"))
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert f"usage: descend {argv[0]}" in err and f"descend {argv[0]}: error: {message}" in err
    assert "Traceback" not in err


def test_the_ends_of_each_range_are_accepted() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["bench", "--triad-mb", "1", "--threads", "1024", "--seed", str(2**64 - 1),
                              "--min-seconds", "0", "--steps", "1", "--warmup", "1"])
    assert (args.triad_mb, args.threads, args.seed, args.min_seconds, args.steps, args.warmup) == (1, 1024, 2**64 - 1,
                                                                                                 0.0, 1, 1)
    assert parser.parse_args(["demo", "--seed", str(-(2**63))]).seed == -(2**63)
    assert parser.parse_args(["sweep", "--n-lr", "1000", "--seed", "-1"]).n_lr == 1000


def _no_bench_work(monkeypatch: pytest.MonkeyPatch) -> None:
    from descend.cli import bench

    monkeypatch.setattr(bench, "Triad", lambda mb: pytest.fail("the benchmark started"))
    monkeypatch.setattr(bench, "_run", lambda *a: pytest.fail("the benchmark started"))


@pytest.mark.parametrize("where", ["missing directory", "under a file", "a directory"])
def test_bench_json_that_cannot_be_written_is_one_line_exit_1_before_any_work(
        where: str, tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from descend.cli import bench

    _no_bench_work(monkeypatch)
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-dir").mkdir()
    path = {"missing directory": tmp_path / "nope" / "out.json", "under a file": tmp_path / "a-file" / "out.json",
            "a directory": tmp_path / "a-dir"}[where]
    expected = (f"cannot write {str(path)!r}: it is a directory" if where == "a directory" else
                f"cannot write {str(path)!r}: directory {str(path.parent)!r} does not exist")
    assert cli.main(["bench", "--quick", "--json", str(path)]) == 1
    assert capsys.readouterr().err.splitlines() == [f"descend bench: error: {expected}"]
    # and the same through python benchmarks/step_speed.py (bench.main)
    assert bench.main(["--quick", "--json", str(path)]) == 1
    assert capsys.readouterr().err.splitlines() == [f"descend bench: error: {expected}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-dir", "a-file"]
    assert list((tmp_path / "a-dir").iterdir()) == []


def test_bench_triad_larger_than_memory_is_one_line_exit_1_before_any_work(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from descend.cli import bench

    _no_bench_work(monkeypatch)
    monkeypatch.setattr(bench, "_physical_memory", lambda: 3 * 2**30)
    assert cli.main(["bench", "--triad-mb", "1025"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "descend bench: error: --triad-mb 1025: the triad's three arrays of 1025 MiB do not fit in this machine's "
        "3.0 GiB of memory"]


def test_bench_usage_errors_are_return_codes_of_bench_main(capsys: pytest.CaptureFixture[str]) -> None:
    from descend.cli import bench

    assert bench.main(["--triad-mb", "0"]) == 2
    err = capsys.readouterr().err
    assert "usage: descend bench" in err and "argument --triad-mb: must be an integer in [1, 1048576], got 0" in err


def test_bench_writes_its_json_through_the_command_line(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from descend.cli import bench

    monkeypatch.setattr(bench, "param_shapes", lambda name, quick=False: ("tiny", [(30,), (4, 5)]))
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--sets", "many-small", "--optimizers", "sgd", "--steps", "1", "--warmup", "1",
                     "--triad-mb", "1", "--threads", "1", "--min-seconds", "0", "--no-modes", "--no-memory",
                     "--seed", str(2**64 - 1), "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["args"]["triad_mb"] == 1 and doc["args"]["seed"] == 2**64 - 1
    assert not [k for k in doc["args"] if k.startswith("_")]  # the parser's own entries stay out
    assert {r["label"] for r in doc["rows"]} >= {"torch fused", "descend (default)"}
    assert "| tiny | SGD |" in capsys.readouterr().out
