"""Decay alone on bfloat16 parameters: does AdamW's weight decay take effect?

AdamW (lr 1e-3, weight_decay 0.01) on 2,000 parameters whose gradients are so small (1e-12)
that only the decay acts; the norm after ``--steps`` steps over the norm before, against the
closed form (1 − lr·λ)^steps. On bfloat16, θ·(1 − 1e-5) rounds back to θ: torch's AdamW and
descend's nearest rounding keep the norm at 1; compensated and stochastic rounding follow
float32.

    .venv/bin/python benchmarks/decay_only.py              # 5,000 steps, the issue's experiment

tests/test_precision.py runs it for 3,000 steps and asserts it.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from typing import Any

import torch

import descend

LR, WEIGHT_DECAY = 1e-3, 0.01


def decay_only(dtype: torch.dtype, steps: int, make: Callable[..., torch.optim.Optimizer] = descend.AdamW,
               **kw: Any) -> float:
    """The norm after ``steps`` decay-only steps over the norm before."""
    g = torch.Generator().manual_seed(0)
    p = torch.randn(2000, generator=g).to(dtype).requires_grad_()
    torch.manual_seed(0)  # (stochastic rounding's generator is seeded from it: the same figure every run)
    opt = make([p], lr=LR, weight_decay=WEIGHT_DECAY, **kw)
    start = float(p.detach().float().norm())
    tiny = (torch.randn(2000, generator=g) * 1e-12).to(dtype)
    for _ in range(steps):
        p.grad = tiny
        opt.step()
    return float(p.detach().float().norm()) / start


RUNS: dict[str, tuple[torch.dtype, Callable[..., torch.optim.Optimizer], dict[str, Any]]] = {
    "float32 (descend.AdamW)": (torch.float32, descend.AdamW, {}),
    "bfloat16, torch.optim.AdamW": (torch.bfloat16, torch.optim.AdamW, {}),
    "bfloat16, rounding='nearest'": (torch.bfloat16, descend.AdamW, {}),
    "bfloat16, rounding='compensated'": (torch.bfloat16, descend.AdamW, dict(rounding="compensated")),
    "bfloat16, rounding='stochastic'": (torch.bfloat16, descend.AdamW, dict(rounding="stochastic")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=5000)
    args = parser.parse_args()
    print(f"AdamW lr {LR:g}, weight_decay {WEIGHT_DECAY:g}, {args.steps} decay-only steps; "
          f"closed form (1 − lr·λ)^steps = {(1 - LR * WEIGHT_DECAY) ** args.steps:.4f}\n")
    print("| run | norm after / before |\n|---|--:|")
    for name, (dtype, make, kw) in RUNS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the warning that nearest rounding erases the decay)
            print(f"| {name} | {decay_only(dtype, args.steps, make, **kw):.4f} |")


if __name__ == "__main__":
    main()
