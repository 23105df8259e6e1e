"""A/B of two optimizer steps: torch.optim's fused step against descend's default (or flat).

``descend bench`` steps five or more candidates per round; on a shared 2-core machine one
disturbed round moves every ratio of it. This script steps only two, in a random order
each round, for many rounds, and reports the median over rounds of the paired ratio
(torch's time / descend's time: above 1 means descend is faster) with its quartiles::

    python benchmarks/ab_step.py --set resnet50 --optimizer adam --rounds 150
    python benchmarks/ab_step.py --set many-small --optimizer sgd --flat
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

import descend
from descend.cli import bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=bench.SETS, default="resnet50")
    parser.add_argument("--optimizer", choices=bench.OPTIMIZERS, default="adam")
    parser.add_argument("--flat", action="store_true", help="descend with flat=True")
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    name, shapes = bench.param_shapes(args.set)
    # the candidates, hyperparameters and data of ``descend bench``, each with its own copies
    data, grads = bench._master(shapes, args.seed)
    options = bench.SETTINGS[args.optimizer]
    cls = bench.TORCH_CLASSES[args.optimizer]
    steps = {"torch fused": getattr(torch.optim, cls)(bench._params(data, grads), fused=True, **options).step,
             "descend": getattr(descend, cls)(bench._params(data, grads), flat=args.flat, **options).step}
    del data, grads
    for step in steps.values():  # state is created
        step()
        step()
    times: dict[str, list[float]] = {key: [] for key in steps}
    for _ in range(args.rounds):
        for key in rng.sample(list(steps), len(steps)):
            start = time.perf_counter()
            steps[key]()
            times[key].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(times["torch fused"], times["descend"], strict=True)]
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    medians = ", ".join(f"{key} {statistics.median(t) * 1e3:.2f} ms" for key, t in times.items())
    flat = " flat=True" if args.flat else ""
    print(f"{name}, {args.optimizer}{flat}, {args.rounds} rounds: {medians}; "
          f"speed-up of descend (paired median) {median:.3f}× (quartiles {q1:.3f}–{q3:.3f})")


if __name__ == "__main__":
    main()
