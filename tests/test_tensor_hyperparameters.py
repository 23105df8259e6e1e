"""Tensor hyperparameters as torch.optim has them: a 1-element tensor lr, and Adam's and AdamW's
betas as two 1-element tensors, accepted where torch accepts them, stepped as torch steps them
(its for-loop Adam computes with tensor betas in their dtype: float32 for torch.tensor(0.9)),
and refused in torch's words where torch refuses them.

Oracle: torch.optim on the same float64 parameters and gradients, 1e-12 absolute.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

import descend

ATOL = 1e-12


def make_params() -> list[Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in ((4, 3), (3,))]


def run(make: Callable[[list[Tensor]], torch.optim.Optimizer], steps: int = 6,
        between: Callable[[torch.optim.Optimizer, int], None] | None = None) -> list[Tensor]:
    params = make_params()
    opt = make(params)
    for step in range(steps):
        g = torch.Generator().manual_seed(10 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
        opt.step()
        if between is not None:
            between(opt, step)
    return [p.detach() for p in params]


def assert_same(ours: list[Tensor], theirs: list[Tensor]) -> None:
    for a, b in zip(ours, theirs, strict=True):
        assert (a - b).abs().max().item() <= ATOL


def tensor_betas(shape: tuple[int, ...] = ()) -> tuple[Tensor, Tensor]:
    return torch.tensor(0.9).reshape(shape), torch.tensor(0.99).reshape(shape)


IMPLS = {"single": {"foreach": False}, "fused": {"fused": True}, "default": {}}
OPTIONS = {
    "betas": lambda: dict(betas=tensor_betas()),
    "betas-1x1": lambda: dict(betas=tensor_betas((1, 1))),
    "betas-lr": lambda: dict(betas=tensor_betas(), lr=torch.tensor(0.01)),
    "betas-amsgrad-wd": lambda: dict(betas=tensor_betas(), amsgrad=True, weight_decay=0.1),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_tensor_betas_step_as_torch(name: str, options: str, impl: str) -> None:
    theirs = run(lambda p: getattr(torch.optim, name)(p, **OPTIONS[options](), **IMPLS[impl]))
    ours = run(lambda p: getattr(descend, name)(p, **OPTIONS[options](), **IMPLS[impl]))
    assert_same(ours, theirs)


def test_tensor_betas_are_computed_with_as_tensors() -> None:
    """Tensor betas are not the same as their float values (torch's bias corrections are then
    float32): the case above is not passed by converting them to numbers."""
    as_tensors = run(lambda p: descend.Adam(p, betas=tensor_betas(), foreach=False))
    as_floats = run(lambda p: descend.Adam(p, betas=tuple(float(b) for b in tensor_betas()), foreach=False))
    assert max((a - b).abs().max().item() for a, b in zip(as_tensors, as_floats, strict=True)) > 1e-10


def test_a_tensor_beta_changed_in_place_is_followed() -> None:
    """A scheduler may write a tensor beta in place (as OneCycleLR writes the lr): each step reads it."""
    def cool(opt: torch.optim.Optimizer, step: int) -> None:
        if step == 2:
            opt.param_groups[0]["betas"][0].fill_(0.5)

    theirs = run(lambda p: torch.optim.Adam(p, betas=tensor_betas(), foreach=False), between=cool)
    ours = run(lambda p: descend.Adam(p, betas=tensor_betas(), foreach=False), between=cool)
    assert_same(ours, theirs)


@pytest.mark.parametrize("impl", ["single", "foreach", "fused"])
def test_tensor_lr_steps_sgd_as_torch_on_every_path(impl: str) -> None:
    flags = {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[impl]
    theirs = run(lambda p: torch.optim.SGD(p, lr=torch.tensor(0.05), momentum=0.9, **flags))
    ours = run(lambda p: descend.SGD(p, lr=torch.tensor(0.05), momentum=0.9, **flags))
    assert_same(ours, theirs)


# --- what torch refuses, refused in its words --------------------------------------------

REFUSED = {
    "lr-foreach": dict(lr=torch.tensor(0.01), foreach=True),
    "betas-mixed-0": dict(betas=(torch.tensor(0.9), 0.99)),
    "betas-mixed-1": dict(betas=(0.9, torch.tensor(0.99))),
    "betas-foreach": dict(betas=tensor_betas(), foreach=True),
    "lr-2-elements": dict(lr=torch.tensor([0.01, 0.01])),
}


@pytest.mark.parametrize("case", list(REFUSED))
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_refused_with_torchs_message(name: str, case: str) -> None:
    with pytest.raises(ValueError) as theirs:
        getattr(torch.optim, name)(make_params(), **REFUSED[case])
    with pytest.raises(ValueError, match="^" + re.escape(str(theirs.value)) + r".*allowed: "):
        getattr(descend, name)(make_params(), **REFUSED[case])


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "Adafactor", "LBFGS"])
def test_a_tensor_lr_of_two_elements_is_refused_with_torchs_message(name: str) -> None:
    lr = torch.tensor([0.01, 0.01])
    with pytest.raises(ValueError, match="^Tensor lr must be 1-element$"):
        getattr(torch.optim, name)(make_params(), lr=lr)
    with pytest.raises(ValueError, match=r"^Tensor lr must be 1-element, not of shape \(2,\) \(lr; allowed: "):
        getattr(descend, name)(make_params(), lr=lr)


def test_tensor_betas_of_two_elements_are_refused() -> None:
    """(torch raises a RuntimeError here, from comparing a 2-element tensor with 0: descend says what it needs.)"""
    with pytest.raises(ValueError, match=r"^Tensor betas\[1\] must be 1-element, not of shape \(2,\) "):
        descend.Adam(make_params(), betas=(torch.tensor(0.9), torch.tensor([0.99, 0.9])))


@pytest.mark.parametrize("edit", [
    {"betas": (torch.tensor(0.9), 0.99)},
    {"lr": torch.tensor(0.01), "foreach": True},
    {"betas": (torch.tensor(1.0), torch.tensor(0.99))},
], ids=["betas-mixed", "lr-foreach", "beta1-out-of-range"])
def test_a_group_edited_to_what_torch_refuses_is_refused_before_the_step_changes_anything(edit: dict[str, Any]) -> None:
    params = make_params()
    opt = descend.Adam([{"params": params[:1]}, {"params": params[1:]}], lr=0.01)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before = [p.detach().clone() for p in params]
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    opt.param_groups[1].update(edit)
    with pytest.raises(ValueError, match=r"betas|lr as a Tensor"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, params, strict=True))
    assert all(torch.equal(s[k], opt.state[p][k]) for s, p in zip(states, params, strict=True) for k in s)
