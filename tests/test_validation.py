"""Bad input: a ValueError naming the argument, the value and what is allowed, at
construction and in add_param_group; nothing is half-applied."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import descend

ALL = [descend.SGD, descend.Adam, descend.AdamW]
ADAMS = [descend.Adam, descend.AdamW]

BAD = [
    (ALL, "lr", -0.1),
    (ALL, "lr", math.nan),
    (ALL, "lr", math.inf),
    (ALL, "weight_decay", -1e-4),
    (ALL, "l1", -1.0),
    (ALL, "decay", "l2"),
    ([descend.SGD], "momentum", -0.5),
    ([descend.SGD], "momentum", 1.0),
    ([descend.SGD], "dampening", -0.1),
    ([descend.SGD], "dampening", 1.5),
    (ADAMS, "betas", (1.0, 0.999)),
    (ADAMS, "betas", (0.9, -0.1)),
    (ADAMS, "betas", (0.9,)),
    (ADAMS, "eps", -1e-8),
]
CASES = [(cls, name, value) for classes, name, value in BAD for cls in classes]


def _params() -> list[torch.Tensor]:
    return [torch.zeros(3, requires_grad=True)]


@pytest.mark.parametrize("cls, name, value", CASES, ids=[f"{c.__name__}-{n}-{v}" for c, n, v in CASES])
def test_bad_option_at_construction(cls: type, name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name) as info:
        cls(_params(), **{name: value})
    shown = value
    if name == "betas" and len(value) == 2:  # torch's words show the bad one ("Invalid beta parameter at index 0: 1.0")
        shown = next(b for b in value if not 0 <= b < 1)
    assert repr(shown) in str(info.value) and "allowed" in str(info.value)
    # as a group option too (torch checks only the defaults)
    with pytest.raises(ValueError, match=name):
        cls([{"params": _params(), name: value}])


@pytest.mark.parametrize("cls, name, value", CASES, ids=[f"{c.__name__}-{n}-{v}" for c, n, v in CASES])
def test_bad_option_in_add_param_group(cls: type, name: str, value: object) -> None:
    opt = cls(_params())
    before = copy.deepcopy(opt.param_groups)
    with pytest.raises(ValueError, match=name):
        opt.add_param_group({"params": _params(), name: value})
    assert len(opt.param_groups) == len(before)


def test_unknown_decay_lists_the_valid_modes() -> None:
    with pytest.raises(ValueError) as info:
        descend.AdamW(_params(), decay="weight")
    for mode in descend.DECAY_MODES:
        assert repr(mode) in str(info.value)


@pytest.mark.parametrize("kw", [dict(nesterov=True), dict(nesterov=True, momentum=0.9, dampening=0.1)])
def test_nesterov_needs_momentum_and_no_dampening(kw: dict) -> None:
    with pytest.raises(ValueError, match="nesterov"):
        descend.SGD(_params(), **kw)
    opt = descend.SGD(_params())
    with pytest.raises(ValueError, match="nesterov"):
        opt.add_param_group({"params": _params(), **kw})


@pytest.mark.parametrize("cls", ALL)
def test_fixed_decay_needs_weight_decay_below_one(cls: type) -> None:
    with pytest.raises(ValueError, match="weight_decay.*fixed"):
        cls(_params(), weight_decay=1.0, decay="fixed")
    cls(_params(), weight_decay=0.5, decay="fixed")  # fine
    opt = cls(_params(), decay="fixed", weight_decay=0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        opt.add_param_group({"params": _params(), "weight_decay": 2.0})


def test_other_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="nonfinite"):
        descend.SGD(_params(), nonfinite="zero")
    with pytest.raises(ValueError, match="foreach"):
        descend.Adam(_params(), foreach=True, fused=True)
    with pytest.raises(ValueError, match="lr"):
        descend.SGD(_params(), lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="lr"):
        descend.SGD(_params(), lr="0.1")


def test_invalid_value_set_on_a_group_later_fails_the_step_and_changes_nothing() -> None:
    p = torch.ones(3, requires_grad=True)
    opt = descend.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(3)
    opt.step()
    snapshot = (p.detach().clone(), opt.state[p]["momentum_buffer"].clone())
    opt.param_groups[0]["momentum"] = 2.0
    with pytest.raises(ValueError, match="momentum"):
        opt.step()
    assert torch.equal(p.detach(), snapshot[0]) and torch.equal(opt.state[p]["momentum_buffer"], snapshot[1])


@pytest.mark.parametrize("cls", ALL)
def test_sparse_gradient_is_a_clear_error_and_changes_nothing(cls: type) -> None:
    dense = torch.ones(4, requires_grad=True)
    sparse_param = torch.ones(5, requires_grad=True)
    opt = cls([dense, sparse_param], lr=0.1)
    dense.grad = torch.ones(4)
    sparse_param.grad = torch.ones(5)
    opt.step()
    state_before = copy.deepcopy(opt.state_dict())
    values_before = (dense.detach().clone(), sparse_param.detach().clone())
    dense.grad = torch.ones(4)
    sparse_param.grad = torch.sparse_coo_tensor([[0, 3]], [1.0, 2.0], (5,))
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(dense.detach(), values_before[0]) and torch.equal(sparse_param.detach(), values_before[1])
    after = opt.state_dict()
    for key, st in state_before["state"].items():
        for k, v in st.items():
            assert torch.equal(after["state"][key][k], v) if torch.is_tensor(v) else after["state"][key][k] == v


def test_state_that_does_not_fit_its_parameter_is_rejected_before_any_change() -> None:
    a, b = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    opt = descend.Adam([a, b], lr=0.1)
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    opt.step()
    opt.state[b]["exp_avg"] = torch.zeros(7)
    before = a.detach().clone()
    with pytest.raises(ValueError, match="exp_avg"):
        opt.step()
    assert torch.equal(a.detach(), before) and opt.state[a]["step"].item() == 1
