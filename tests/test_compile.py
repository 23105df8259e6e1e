"""``torch.compile`` of a function that calls ``opt.step()``: every descend optimizer compiles
with its default settings, gives the eager step's numbers, and costs no more graph breaks and
no more compiled graphs than its torch.optim counterpart.

The setting is torch's documented recipe against recompiles: a tensor lr
(``lr=torch.tensor(0.01)``), the step alone in ``torch.compile(fullgraph=False)``, and a
LambdaLR schedule stepped outside the compiled function (it fills the lr tensor in place),
over six steps of a two-layer MLP. Graph breaks and graphs are read from
``torch._dynamo.utils.counters`` (``counters["graph_break"]``, summed over reasons, and
``counters["stats"]["unique_graphs"]``), reset between runs; descend and torch are measured
in the same test. Oracle for the numbers: the same descend optimizer in eager mode (its
default there is torch's fused kernel, under compile the foreach form: they agree to float32
rounding, so the bound is relative 1e-5). The model is tiny, and there is one compiled
configuration per optimizer class, since compiling is slow on a 2-core runner.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import descend

STEPS = 6
RTOL = 1e-5


def _mlp() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model, torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)


def _run(make: Callable[[Any], torch.optim.Optimizer], *, compiled: bool,
         grad_hook: Callable[[int, torch.nn.Module], None] | None = None) -> dict[str, Any]:
    """Six scheduled steps; the final parameters, and what dynamo counted on the way."""
    torch._dynamo.reset()
    counters.clear()
    model, x, y = _mlp()
    opt = make(model.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.9**step)

    def fn() -> None:
        opt.step()

    if compiled:
        fn = torch.compile(fn, fullgraph=False)
    for i in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if grad_hook is not None:
            grad_hook(i, model)
        fn()
        schedule.step()
    result = dict(params=[p.detach().clone() for p in model.parameters()], opt=opt,
                  breaks=sum(counters["graph_break"].values()), graphs=counters["stats"]["unique_graphs"],
                  reasons=sorted(reason.splitlines()[0] for reason in counters["graph_break"]))
    torch._dynamo.reset()
    counters.clear()
    return result


def _assert_close(compiled: list[torch.Tensor], eager: list[torch.Tensor]) -> None:
    for c, e in zip(compiled, eager, strict=True):
        assert c.dtype == torch.float32
        scale = e.abs().max().item()
        assert (c - e).abs().max().item() <= RTOL * scale, (c, e)


def _lr() -> torch.Tensor:
    return torch.tensor(0.01)


# (descend class, its torch.optim counterpart, options both take). Lion has no torch.optim
# counterpart: it is held to torch's Adam, the element-wise rule with θ-shaped state.
CASES = {
    "SGD": (descend.SGD, torch.optim.SGD, dict(momentum=0.9)),
    "Adam": (descend.Adam, torch.optim.Adam, {}),
    "AdamW": (descend.AdamW, torch.optim.AdamW, {}),
    "Lion": (getattr(descend, "Lion", None), torch.optim.Adam, {}),
    "Adafactor": (getattr(descend, "Adafactor", None), getattr(torch.optim, "Adafactor", None), {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_step_equals_eager_with_no_more_breaks_or_graphs_than_torch(name: str) -> None:
    ours, theirs, options = CASES[name]
    if ours is None or theirs is None:
        pytest.skip(f"{name} is not in this tree (or in this torch)")
    eager = _run(lambda p: ours(p, lr=_lr(), **options), compiled=False)
    compiled = _run(lambda p: ours(p, lr=_lr(), **options), compiled=True)
    reference = _run(lambda p: theirs(p, lr=_lr(), **options), compiled=True)
    _assert_close(compiled["params"], eager["params"])
    assert compiled["params"][0].ne(_mlp()[0][0].weight).any(), "the compiled steps changed nothing"
    measured = (f"descend: {compiled['breaks']} breaks, {compiled['graphs']} graphs {compiled['reasons']}; "
                f"torch: {reference['breaks']} breaks, {reference['graphs']} graphs {reference['reasons']}")
    assert compiled["breaks"] <= reference["breaks"], measured
    assert compiled["graphs"] <= reference["graphs"], measured


def test_compiled_nonfinite_skip_equals_eager() -> None:
    """nonfinite="skip" under compile skips the same step as in eager mode and gives the same
    numbers. (Its finiteness check is data-dependent, so the graph breaks there; torch.optim has
    no such option to compare counts with.)"""

    def poison(step: int, model: torch.nn.Module) -> None:
        if step == 2:
            next(model.parameters()).grad[0, 0] = float("inf")

    def make(p: Any) -> torch.optim.Optimizer:
        return descend.Adam(p, lr=_lr(), nonfinite="skip")

    eager = _run(make, compiled=False, grad_hook=poison)
    compiled = _run(make, compiled=True, grad_hook=poison)
    assert eager["opt"].skipped_steps == compiled["opt"].skipped_steps == 1
    _assert_close(compiled["params"], eager["params"])
    steps = {float(s["step"]) for s in compiled["opt"].state.values()}
    assert steps == {STEPS - 1.0}
