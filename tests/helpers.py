"""A small, well-conditioned training problem for comparing optimizers step by step.

Its parameter set has the awkward cases on purpose: a parameter that gets a gradient only
on even steps (grad None otherwise, after ``zero_grad()``), a zero-size parameter, and a
non-contiguous one. The loss is smooth and the step sizes small, so two implementations
that agree to rounding stay within rounding of each other over many steps (a chaotic
problem would amplify 1e-16 into O(1) and prove nothing).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor


def make_params(dtype: torch.dtype = torch.float64, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(6, 4, generator=g, dtype=dtype) * 0.5
    b1 = torch.randn(6, generator=g, dtype=dtype) * 0.1
    w2 = torch.randn(3, 6, generator=g, dtype=dtype) * 0.5
    sometimes = torch.randn(5, generator=g, dtype=dtype)
    empty = torch.zeros(0, dtype=dtype)
    transposed = torch.randn(5, 4, generator=g, dtype=dtype).t()  # non-contiguous leaf
    return [_leaf(p) for p in (w1, b1, w2, sometimes, empty, transposed)]


def _leaf(t: Tensor) -> Tensor:
    t = t.detach()
    return t.requires_grad_()


def loss_fn(params: list[Tensor], step: int) -> Tensor:
    w1, b1, w2, sometimes, empty, transposed = params
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(16, 4, generator=g, dtype=w1.dtype)
    y = torch.randn(16, 3, generator=g, dtype=w1.dtype)
    hidden = torch.tanh(x @ w1.t() + b1)
    loss = ((hidden @ w2.t() - y) ** 2).mean()
    loss = loss + 0.1 * ((x @ transposed) ** 2).mean() + empty.sum()
    if step % 2 == 0:
        loss = loss + 0.5 * ((sometimes - 1.0) ** 2).sum()
    return loss


def train(
    make_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer],
    *,
    steps: int = 50,
    dtype: torch.dtype = torch.float64,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    extra_loss: Callable[[list[Tensor]], Tensor] | None = None,
    params: list[Tensor] | None = None,
    all_grads: bool = False,
) -> tuple[list[Tensor], torch.optim.Optimizer]:
    """Run ``steps`` steps of the problem; returns the final parameters and the optimizer.

    ``all_grads``: every parameter gets a gradient at every step (a loss term over all
    parameters, such as an L2 penalty, gives them one)."""
    params = make_params(dtype) if params is None else params
    opt = make_optimizer(params)
    sched = scheduler(opt) if scheduler else None
    for step in range(steps):
        opt.zero_grad()
        loss = loss_fn(params, 0 if all_grads else step)
        if extra_loss is not None:
            loss = loss + extra_loss(params)
        if opt.param_groups[0].get("maximize"):
            loss = -loss  # maximizing −f walks the same well-conditioned path as minimizing f
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    return [p.detach().clone() for p in params], opt


def max_abs_diff(a: list[Tensor], b: list[Tensor]) -> float:
    return max(((x - y).abs().max().item() if x.numel() else 0.0) for x, y in zip(a, b, strict=True))


def max_rel_diff(a: list[Tensor], b: list[Tensor]) -> float:
    """max over tensors of ‖a − b‖ / max(‖b‖, tiny): the relative error of whole tensors."""
    out = 0.0
    for x, y in zip(a, b, strict=True):
        if x.numel():
            out = max(out, ((x - y).norm() / y.norm().clamp_min(1e-30)).item())
    return out


def assert_same_run(a: list[Tensor], b: list[Tensor], dtype: torch.dtype) -> None:
    """float64: <= 1e-12 absolute; float32: <= 1e-6 relative (per tensor, in norm)."""
    if dtype == torch.float64:
        assert max_abs_diff(a, b) <= 1e-12, max_abs_diff(a, b)
    else:
        assert max_rel_diff(a, b) <= 1e-6, max_rel_diff(a, b)


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (the directory is not a package)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"descend_benchmarks_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
