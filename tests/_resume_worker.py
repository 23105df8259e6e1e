"""Exact resume: the training runs of tests/test_resume.py, and the fresh process that resumes them.

Every configuration is a small model (two named parameter groups: weights with weight decay,
biases without), an optimizer and an LR scheduler, trained for ``total`` steps on batches
that depend only on the step number. tests/test_resume.py trains each one ``total`` steps
without a break, and ``checkpoint`` steps before saving model, optimizer and scheduler with
``torch.save``; then it runs this file as a script::

    python tests/_resume_worker.py DIR

which, in a process that has never seen the run, loads every ``DIR/<name>.pt`` with
``torch.load(..., weights_only=True)`` into a model and optimizer built from a *different*
seed (so that nothing but the checkpoint can make them agree), trains the remaining steps
and saves the final model, optimizer and scheduler state to ``DIR/<name>.out.pt``; a
configuration that fails writes its traceback to ``DIR/<name>.err`` instead.
"""

from __future__ import annotations

import math
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import lr_scheduler

import descend

FIRST_ORDER_STEPS, FIRST_ORDER_CHECKPOINT = 24, 11
CLOSURE_STEPS, CLOSURE_CHECKPOINT = 7, 3

IMPLS: dict[str, dict[str, Any]] = {
    "single": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "flat": {"flat": True},
}


@dataclass(frozen=True)
class Config:
    name: str
    optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
    scheduler: Callable[[torch.optim.Optimizer], Any]
    closure: bool = False
    total: int = FIRST_ORDER_STEPS
    checkpoint: int = FIRST_ORDER_CHECKPOINT
    nan_steps: tuple[int, ...] = field(default=())  # steps whose gradient is poisoned (nonfinite="skip")


def _sgd(impl: str, **kw: Any) -> Callable[[list[dict[str, Any]]], torch.optim.Optimizer]:
    return lambda g: descend.SGD(g, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, **IMPLS[impl], **kw)


def _adam(impl: str) -> Callable[[list[dict[str, Any]]], torch.optim.Optimizer]:
    return lambda g: descend.Adam(g, lr=0.01, weight_decay=1e-3, amsgrad=True, **IMPLS[impl])


def _adamw(impl: str) -> Callable[[list[dict[str, Any]]], torch.optim.Optimizer]:
    return lambda g: descend.AdamW(g, lr=0.01, weight_decay=0.05, l1=1e-4, decay="independent", **IMPLS[impl])


def _one_cycle(opt: torch.optim.Optimizer) -> Any:
    # rewrites lr, initial_lr and momentum of every group at every step
    return lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=FIRST_ORDER_STEPS, base_momentum=0.8,
                                   max_momentum=0.95)


def _warmup_cosine(opt: torch.optim.Optimizer) -> Any:
    return lr_scheduler.SequentialLR(opt, [lr_scheduler.LinearLR(opt, 0.1, total_iters=5),
                                           lr_scheduler.CosineAnnealingLR(opt, FIRST_ORDER_STEPS - 5)],
                                     milestones=[5])


CONFIGS: dict[str, Config] = {}
for _impl in IMPLS:
    for _config in (
        Config(f"SGD-{_impl}", _sgd(_impl), _one_cycle),
        Config(f"Adam-{_impl}", _adam(_impl), lambda o: lr_scheduler.StepLR(o, step_size=4, gamma=0.7)),
        Config(f"AdamW-{_impl}", _adamw(_impl), _warmup_cosine),
    ):
        CONFIGS[_config.name] = _config
for _config in (
    Config("SGD-skip", _sgd("fused", nonfinite="skip"), _one_cycle, nan_steps=(4, FIRST_ORDER_CHECKPOINT + 3)),
    Config("AdamW-flat-skip", lambda g: descend.AdamW(g, lr=0.01, flat=True, nonfinite="skip"), _warmup_cosine,
           nan_steps=(2, FIRST_ORDER_CHECKPOINT + 1)),
    Config("LBFGS", lambda g: descend.LBFGS(g, lr=0.5, max_iter=5, history_size=3),
           lambda o: lr_scheduler.ExponentialLR(o, gamma=0.9), closure=True, total=CLOSURE_STEPS,
           checkpoint=CLOSURE_CHECKPOINT),
    Config("LBFGS-wolfe", lambda g: descend.LBFGS(g, max_iter=6, history_size=4, line_search_fn="strong_wolfe"),
           lambda o: lr_scheduler.StepLR(o, step_size=2, gamma=0.8), closure=True, total=CLOSURE_STEPS,
           checkpoint=CLOSURE_CHECKPOINT),
    Config("CG", lambda g: descend.CG(g, max_iter=5), lambda o: lr_scheduler.ExponentialLR(o, gamma=0.95),
           closure=True, total=CLOSURE_STEPS, checkpoint=CLOSURE_CHECKPOINT),
    Config("CG-HZ-restarts", lambda g: descend.CG(g, beta="HZ", max_iter=5, restart_every=3),
           lambda o: lr_scheduler.StepLR(o, step_size=3, gamma=0.5), closure=True, total=CLOSURE_STEPS,
           checkpoint=CLOSURE_CHECKPOINT),
):
    CONFIGS[_config.name] = _config


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    named = list(model.named_parameters())
    return [{"params": [(n, p) for n, p in named if n.endswith("weight")]},
            {"params": [(n, p) for n, p in named if n.endswith("bias")], "weight_decay": 0.0}]


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 + step)
    x = torch.randn(32, 4, generator=g)
    return x, torch.sin(x[:, :3] * 2) + 0.1 * torch.randn(32, 3, generator=g)


def build(config: Config, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    model = make_model(seed)
    opt = config.optimizer(param_groups(model))
    return model, opt, config.scheduler(opt)


def train(config: Config, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, start: int, stop: int) -> None:
    for step in range(start, stop):
        x, y = batch(step)
        if config.closure:
            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
        else:
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            if step in config.nan_steps:
                model[2].bias.grad[0] = math.nan  # type: ignore[index]
            opt.step()
        sched.step()


def checkpoint(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, step: int) -> dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "step": step}


def resume(path: Path) -> None:
    """Load ``path`` (weights only) into a model built from another seed, train to the end, save."""
    config = CONFIGS[path.name[: -len(".pt")]]
    saved = torch.load(path, weights_only=True)
    model, opt, sched = build(config, seed=12345)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    train(config, model, opt, sched, saved["step"], config.total)
    torch.save(checkpoint(model, opt, sched, config.total), path.with_suffix(".out.pt"))


def main(directory: str) -> int:
    torch.set_num_threads(1)  # as the test process (tests/conftest.py): the same reduction order
    failed = 0
    for path in sorted(Path(directory).glob("*.pt")):
        if path.name.endswith(".out.pt"):
            continue
        try:
            resume(path)
        except Exception:
            failed += 1
            path.with_suffix(".err").write_text(traceback.format_exc())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
