"""The ``descend`` command line: ``descend demo``, ``descend sweep``, ``descend muon-demo`` (and
``descend bench`` where that module is installed).

Each subcommand lives in its own module, which exposes ``HELP`` (one line, optional),
``add_arguments(parser)``, ``check_args(args)`` (optional: checks that involve several options,
raising ``argparse.ArgumentTypeError``, reported as a usage error) and ``run(args) -> int``;
this module only wires them together. The argparse types of the options and the checks of
output paths are shared, in :mod:`descend.cli.options`.
The command line stands on the public API; the demo's own dependencies (scikit-learn,
matplotlib, tqdm: the ``descend[demo]`` extra) are imported when a command runs, never by
``import descend``.

Exit codes: 0 success, 1 an error reported in one line (an output directory that cannot be
written, a missing extra), 2 bad usage (argparse), 130 interrupted (Ctrl-C; what was
finished is kept).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

import descend
from descend.cli.options import CommandError

#: subcommand → module; a module that fails to import (``bench`` lives elsewhere) is left out.
SUBCOMMANDS = {"demo": "descend.cli.demo", "sweep": "descend.cli.sweep", "bench": "descend.cli.bench",
               "muon-demo": "descend.cli.muon_demo"}
_REQUIRED = {"demo", "sweep"}


def _load(name: str) -> ModuleType | None:
    module_name = SUBCOMMANDS[name]
    if name in _REQUIRED:
        return importlib.import_module(module_name)
    try:
        module = importlib.import_module(module_name)
    except Exception:  # an optional subcommand that cannot be imported is simply absent
        return None
    if not (hasattr(module, "add_arguments") and hasattr(module, "run")):
        return None
    return module


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="descend",
        description="descend: PyTorch optimizers in which regularization is explicit, correct and fast.",
        epilog="Run 'descend COMMAND --help' for a command's options. The commands need the demo extra: "
        "pip install 'descend[demo]'.",
    )
    parser.add_argument("--version", action="version", version=f"descend {descend.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        module = _load(name)
        if module is None:
            continue
        doc = (module.__doc__ or "").strip()
        summary = getattr(module, "HELP", doc.splitlines()[0] if doc else name)
        sub = subparsers.add_parser(name, help=summary, description=doc or summary,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run, _check=getattr(module, "check_args", None), _parser=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with code 2 and a usage message on bad input
    if args._check is not None:  # what depends on several options: a usage error too
        try:
            args._check(args)
        except argparse.ArgumentTypeError as e:
            args._parser.error(str(e))
    args.argv = argv
    try:
        return int(args._run(args))
    except CommandError as e:
        print(f"descend {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"descend {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
