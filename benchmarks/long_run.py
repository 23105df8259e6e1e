"""Long runs: does memory stay flat over 10,000 steps of every optimizer?

For each optimizer (SGD, Adam and AdamW in each implementation and with flat storage, with
the non-finite guard on; L-BFGS with and without a line search; conjugate gradient) this
trains a small MLP for ``--steps`` steps and records, after a warm-up (state allocated,
L-BFGS's history full), at evenly spaced checkpoints:

- live tensors: ``torch.Tensor`` objects the garbage collector can see (after ``gc.collect()``),
- Python objects tracked by the collector,
- resident set size (VmRSS from /proc/self/status, after glibc's ``malloc_trim``, so that
  freed heap pages are returned and do not read as growth).

A leak of one tensor per step would read as +``steps`` tensors; memory is flat when the
tensor count does not change after the warm-up and RSS moves only by allocator noise.

    .venv/bin/python benchmarks/long_run.py                 # 10,000 steps of each
    .venv/bin/python benchmarks/long_run.py --steps 2000 --only SGD-fused LBFGS

tests/test_long_run.py runs a bounded version (2,000 steps) and asserts it.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import descend

IMPLS: dict[str, dict[str, Any]] = {
    "single": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "flat": {"flat": True},
}

Factory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


def _first_order(cls: type[torch.optim.Optimizer], impl: str, **kw: Any) -> Factory:
    return lambda groups: cls(groups, nonfinite="skip", **IMPLS[impl], **kw)


OPTIMIZERS: dict[str, tuple[Factory, bool]] = {}  # name -> (factory, needs a closure)
for _impl in IMPLS:
    OPTIMIZERS[f"SGD-{_impl}"] = (_first_order(descend.SGD, _impl, lr=0.01, momentum=0.9, weight_decay=1e-4), False)
    OPTIMIZERS[f"Adam-{_impl}"] = (_first_order(descend.Adam, _impl, lr=1e-3, amsgrad=True), False)
    OPTIMIZERS[f"AdamW-{_impl}"] = (_first_order(descend.AdamW, _impl, lr=1e-3, l1=1e-5), False)
OPTIMIZERS["LBFGS"] = (lambda g: descend.LBFGS(g, lr=0.02, max_iter=2, history_size=10), True)
OPTIMIZERS["LBFGS-wolfe"] = (lambda g: descend.LBFGS(g, max_iter=2, history_size=10, line_search_fn="strong_wolfe"),
                             True)
OPTIMIZERS["CG"] = (lambda g: descend.CG(g, max_iter=2), True)


def census() -> tuple[int, int]:
    """(live tensors, Python objects) tracked by the garbage collector, after a collection."""
    gc.collect()
    objects = gc.get_objects()
    with warnings.catch_warnings():  # isinstance() on torch.distributed's deprecated names warns
        warnings.simplefilter("ignore")
        return sum(1 for o in objects if isinstance(o, torch.Tensor)), len(objects)


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def rss_mib() -> float:
    """Resident set size of this process in MiB (Linux)."""
    _trim()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return math.nan


@dataclass
class Sample:
    step: int
    tensors: int
    objects: int
    rss: float


@dataclass
class Result:
    name: str
    samples: list[Sample]
    seconds: float

    @property
    def warm(self) -> Sample:
        return self.samples[0]

    @property
    def end(self) -> Sample:
        return self.samples[-1]

    @property
    def tensor_growth(self) -> int:
        return self.end.tensors - self.warm.tensors

    @property
    def max_tensor_growth(self) -> int:
        return max(s.tensors for s in self.samples) - self.warm.tensors

    @property
    def rss_growth(self) -> float:
        return self.end.rss - self.warm.rss

    @property
    def max_rss_growth(self) -> float:
        return max(s.rss for s in self.samples) - self.warm.rss


def run(name: str, steps: int = 10_000, warmup: int = 500, checkpoints: int = 5, seed: int = 0) -> Result:
    """Train ``steps`` steps with optimizer ``name``; sample memory after ``warmup`` steps and at
    ``checkpoints`` evenly spaced steps after it (the last at ``steps``)."""
    factory, closure_solver = OPTIMIZERS[name]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    named = list(model.named_parameters())
    groups = [{"params": [(n, p) for n, p in named if n.endswith("weight")]},
              {"params": [(n, p) for n, p in named if n.endswith("bias")], "weight_decay": 0.0}]
    opt = factory(groups)
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(32, 16, generator=g), torch.randn(32, 4, generator=g)) for _ in range(8)]
    loss_fn = nn.functional.mse_loss
    marks = sorted({warmup + round(i * (steps - warmup) / checkpoints) for i in range(checkpoints + 1)})
    samples: list[Sample] = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        x, y = data[step % len(data)]
        if closure_solver:
            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
        else:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            if step % 997 == 0:  # now and then a bad batch, skipped by the guard
                model[0].bias.grad[0] = math.nan  # type: ignore[index]
            opt.step()
        if step in marks:
            tensors, objects = census()
            # (the samples taken so far are Python objects too: not counted)
            samples.append(Sample(step, tensors, objects - len(samples), rss_mib()))
    seconds = time.perf_counter() - start
    return Result(name, samples, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--checkpoints", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", choices=list(OPTIMIZERS), default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.only or list(OPTIMIZERS)
    print(f"torch {torch.__version__}, {args.steps} steps each, memory sampled after step {args.warmup} and at "
          f"{args.checkpoints} checkpoints after it; RSS after malloc_trim")
    header = (f"{'optimizer':<14} {'tensors@warm':>12} {'tensors@end':>11} {'max Δ':>6} {'objects Δ':>9} "
              f"{'RSS@warm MiB':>12} {'RSS@end MiB':>11} {'max Δ MiB':>9} {'s':>6}")
    print(header)
    print("-" * len(header))
    for name in names:
        r = run(name, args.steps, args.warmup, args.checkpoints)
        print(f"{name:<14} {r.warm.tensors:>12} {r.end.tensors:>11} {r.max_tensor_growth:>+6} "
              f"{r.end.objects - r.warm.objects:>+9} {r.warm.rss:>12.1f} {r.end.rss:>11.1f} "
              f"{r.max_rss_growth:>+9.2f} {r.seconds:>6.1f}", flush=True)


if __name__ == "__main__":
    main()
