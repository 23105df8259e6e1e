"""The Muon rows of ``descend bench``: descend.Muon's step against torch.optim.Muon's, in one process.

A Muon step is dominated by the Newton–Schulz iteration, 3·K matrix products per matrix (K = 5).
torch.optim.Muon runs them matrix by matrix; descend.Muon stacks the matrices of a group that
have the same shape (up to transposition) and runs each product once for the whole stack
(:mod:`descend.orthogonalize`). On large matrices the products are compute-bound either way, so
the gain is what a batched call saves over many calls (targets: at least 1× on GPT-2-small-like
shapes); on many small matrices dispatch dominates, and one batched call replaces hundreds
(target: at least 5×).

Method: :func:`descend.cli.bench.measure`: both optimizers (the same settings, torch's names) live
in this process and are stepped once per round in a new random order, with the STREAM triad as a
third member; the ratio is the median over rounds of torch's time over descend's in the same
round (> 1: descend is faster). Sets: GPT-2 small's hidden matrices (12 layers of 768 × 2304,
768 × 768, 768 × 3072 and 3072 × 768; ``quick``: 2 layers) and 256 matrices of 64 × 64.

Run as ``descend bench --sets muon`` (with bench's ``--quick``, ``--steps``, ``--warmup``,
``--min-seconds``, ``--threads``, ``--device``, ``--seed`` and ``--json``), or
``python -m descend.cli.bench_muon``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from descend.cli.bench import Candidate, Shapes, Triad, machine, measure, paired_ratio, release
from descend.optimizers.muon import Muon

__all__ = ["MUON_SETS", "MuonRow", "muon_shapes", "bench_muon", "muon_table", "muon_report", "main"]

MUON_SETS = ("gpt2-matrices", "many-small-matrices")
#: the settings both optimizers get (torch's names; torch's defaults besides lr)
SETTINGS: dict[str, Any] = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True)
#: the ratio each set is meant to reach (torch's time over descend's)
TARGETS = {"gpt2-matrices": 1.0, "many-small-matrices": 5.0}


def muon_shapes(name: str, quick: bool = False) -> tuple[str, Shapes]:
    """(label, shapes) of a Muon parameter set."""
    if name == "gpt2-matrices":
        layers = 2 if quick else 12
        d = 768
        return (f"GPT-2 small hidden matrices, {layers} layers",
                [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)] * layers)
    if name == "many-small-matrices":
        return "256 × (64 × 64)", [(64, 64)] * 256
    raise ValueError(f"Invalid set: {name!r} (allowed: {', '.join(MUON_SETS)})")


@dataclass
class MuonRow:
    set: str
    matrices: int
    torch_ms: float  # median step time
    descend_ms: float
    ratio: float  # median over rounds of torch's time / descend's (> 1: descend faster)
    target: float
    spread: float  # interquartile range of descend's times over their median
    rounds: int

    @property
    def meets_target(self) -> bool:
        return self.ratio >= self.target


def _spread(times: list[float]) -> float:
    if len(times) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(times, n=4)
    return (q3 - q1) / statistics.median(times)


def bench_muon(*, quick: bool = False, sets: tuple[str, ...] = MUON_SETS, steps: int | None = None,
               warmup: int = 1, min_seconds: float | None = None, seed: int = 0, device: str = "cpu",
               shapes: dict[str, tuple[str, Shapes]] | None = None, max_rounds: int = 200,
               log: Callable[[str], None] = lambda msg: None) -> list[MuonRow]:
    """Time descend.Muon against torch.optim.Muon on each set, interleaved; one row per set.

    ``shapes``: (label, shapes) per set name, in place of :func:`muon_shapes` (tests use tiny ones)."""
    steps = steps if steps is not None else (3 if quick else 5)
    min_seconds = min_seconds if min_seconds is not None else (1.0 if quick else 3.0)
    triad = Triad(16, device)  # a member of every round, as in descend bench (its bandwidth is not reported here)
    rows = []
    for name in sets:
        label, set_shapes = shapes[name] if shapes and name in shapes else muon_shapes(name, quick)
        log(f"{label}: {len(set_shapes)} matrices, on {device}")
        candidates = [Candidate("torch.optim.Muon", lambda p: torch.optim.Muon(p, **SETTINGS), 3),
                      Candidate("descend.Muon", lambda p: Muon(p, **SETTINGS), 3)]
        measure(candidates, set_shapes, steps=steps, warmup=warmup, triad=triad, seed=seed, memory=False, log=log,
                min_seconds=min_seconds, max_rounds=max_rounds, device=device)
        theirs, ours = candidates
        rows.append(MuonRow(label, len(set_shapes), theirs.median * 1e3, ours.median * 1e3,
                            paired_ratio(theirs, ours), TARGETS[name], _spread(ours.times), len(ours.times)))
        release(candidates)
    return rows


def muon_table(rows: list[MuonRow]) -> str:
    """The rows as a Markdown table."""
    lines = ["| set | matrices | torch.optim.Muon ms | descend.Muon ms | speed-up | target | spread | rounds |",
             "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r.set} | {r.matrices} | {r.torch_ms:.1f} | {r.descend_ms:.1f} | {r.ratio:.2f}× | "
                     f"≥ {r.target:g}× {'met' if r.meets_target else 'NOT met'} | {r.spread:.0%} | {r.rounds} |")
    return "\n".join(lines)


def muon_report(rows: list[MuonRow]) -> str:
    """What ``descend bench --sets muon`` prints: a sentence on the method, then the table."""
    return ("descend.Muon against torch.optim.Muon (lr 0.02, weight_decay 0.1, momentum 0.95, nesterov; "
            "5 Newton–Schulz steps in bfloat16), stepped in the same rounds in random order: speed-up is the "
            "median over rounds of torch's time over descend's in the same round (> 1: descend is faster); "
            "spread is the interquartile range of descend's times over their median.\n\n" + muon_table(rows))


def main(argv: list[str] | None = None) -> int:
    """``python -m descend.cli.bench_muon [--quick] [--threads N]``: the table on stdout."""
    parser = argparse.ArgumentParser(prog="python -m descend.cli.bench_muon",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="2 GPT-2 layers instead of 12, fewer rounds")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default 5, 3 with --quick)")
    args = parser.parse_args(argv)
    if args.threads < 1 or (args.steps is not None and args.steps < 1):
        print("bench_muon: --threads and --steps must be positive", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        info = machine()
        rows = bench_muon(quick=args.quick, steps=args.steps, log=lambda m: print(m, file=sys.stderr, flush=True))
    finally:
        torch.set_num_threads(threads)
    print(f"Machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}, {args.threads} threads; "
          f"load average {info['load_average']}; {info['date']}.\n")
    print(muon_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
