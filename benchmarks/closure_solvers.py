"""descend's CG and L-BFGS beside scipy.optimize.minimize (CG, L-BFGS-B) on the problem set.

    .venv/bin/python benchmarks/closure_solvers.py [--problems rosenbrock,wood] [--reach-tol 1e-8]

Every solver runs with its defaults from the standard starting point, in float64, on the same
function and autograd gradient (tests/problems.py: Moré–Garbow–Hillstrom, chained Rosenbrock,
convex quadratics). descend runs through ``descend.minimize``, whose ``tol=1e-5`` bounds the
largest gradient component as scipy's default ``gtol``/``pgtol`` do.

For each problem and pair (descend CG vs scipy CG, descend L-BFGS vs scipy L-BFGS-B) the table
shows iterations, function evaluations (each with its gradient) and the final f of both, then
``reach``: the evaluations descend had spent when an iterate it accepted first had
f ≤ f_scipy + reach_tol·max(1, |f_scipy|), where f_scipy is scipy's final value. A pair counts
as a win when descend reaches scipy's final f with no more evaluations than scipy spent in all
(``sp-reach`` shows when scipy's own accepted iterates first got there, for the stricter
comparison). The goal is a win on at least 80% of the pairs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.optimize
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import descend  # noqa: E402
from tests.problems import PROBLEMS, Problem  # noqa: E402

PAIRS = (("cg", "CG"), ("lbfgs", "L-BFGS-B"))


@dataclass
class Run:
    nit: int
    nfev: int
    fun: float
    history: list[tuple[int, float]]  # (evaluations so far, f) at each accepted iterate

    def reach(self, target: float) -> int | None:
        for nfev, f in self.history:
            if f <= target:
                return nfev
        return self.nfev if self.fun <= target else None


def run_scipy(problem: Problem, method: str) -> Run:
    evaluations = [0]

    def fun(z: np.ndarray) -> tuple[float, np.ndarray]:
        evaluations[0] += 1
        t = torch.tensor(z, dtype=torch.float64, requires_grad=True)
        value = problem(t)
        value.backward()
        return value.item(), t.grad.numpy().copy()  # type: ignore[union-attr]

    history: list[tuple[int, float]] = []

    def callback(intermediate_result: scipy.optimize.OptimizeResult) -> None:
        history.append((evaluations[0], float(intermediate_result.fun)))

    res = scipy.optimize.minimize(fun, np.array(problem.x0), jac=True, method=method, callback=callback)
    return Run(int(res.nit), int(res.nfev), float(res.fun), history)


def run_descend(problem: Problem, method: str) -> Run:
    history: list[tuple[int, float]] = []
    res = descend.minimize(problem, problem.start(torch.float64), method=method,
                           callback=lambda r: history.append((r.nfev, r.fun)))
    return Run(res.nit, res.nfev, res.fun, history)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", default="", help="comma-separated names (default: all)")
    parser.add_argument("--reach-tol", type=float, default=1e-8,
                        help="f counts as reached within this, relative to max(1, |f_scipy|) (default 1e-8)")
    args = parser.parse_args(argv)
    chosen = [p for p in PROBLEMS if not args.problems or p.name in args.problems.split(",")]
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)

    header = (f"{'problem':22s} {'n':>3s} {'method':8s} | {'scipy nit':>9s} {'nfev':>5s} {'f':>11s} | "
              f"{'descend nit':>11s} {'nfev':>5s} {'f':>11s} | {'reach':>5s} {'sp-reach':>8s}  win")
    print(header)
    print("-" * len(header))
    wins = {m: 0 for m, _ in PAIRS}
    strict = {m: 0 for m, _ in PAIRS}
    evals = {m: [0, 0] for m, _ in PAIRS}
    start = time.perf_counter()
    for problem in chosen:
        for ours, theirs in PAIRS:
            ref = run_scipy(problem, theirs)
            got = run_descend(problem, ours)
            target = ref.fun + args.reach_tol * max(1.0, abs(ref.fun))
            reach = got.reach(target)
            scipy_reach = ref.reach(target)
            win = reach is not None and reach <= ref.nfev
            wins[ours] += win
            strict[ours] += reach is not None and scipy_reach is not None and reach <= scipy_reach
            evals[ours][0] += ref.nfev
            evals[ours][1] += got.nfev
            label = ours.upper() if ours == "cg" else "L-BFGS"
            print(f"{problem.name:22s} {problem.n:3d} {label:8s} | {ref.nit:9d} {ref.nfev:5d} {ref.fun:11.4e} | "
                  f"{got.nit:11d} {got.nfev:5d} {got.fun:11.4e} | {reach if reach is not None else '-':>5} "
                  f"{scipy_reach if scipy_reach is not None else '-':>8}  {'yes' if win else 'NO'}")
    total = len(chosen) * len(PAIRS)
    print()
    for ours, theirs in PAIRS:
        print(f"descend {ours:5s} vs scipy {theirs:8s}: reaches scipy's final f with no more evaluations on "
              f"{wins[ours]}/{len(chosen)} problems (against scipy's own first reach: {strict[ours]}/{len(chosen)}); "
              f"evaluations in all: scipy {evals[ours][0]}, descend {evals[ours][1]}")
    share = sum(wins.values()) / total if total else math.nan
    print(f"overall: {sum(wins.values())}/{total} = {share:.1%} (goal: at least 80%) -> "
          f"{'met' if share >= 0.8 else 'NOT met'}   [{time.perf_counter() - start:.0f} s]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
