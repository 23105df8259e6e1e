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
    assert set(choices) == {"demo", "sweep"}

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
