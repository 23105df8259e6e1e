"""Nothing half-applied, whatever the input (issue 16): what a step and a load depend on is
checked before anything changes, on every path. Each case compares every parameter and
every state tensor with torch.equal before and after the failure."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import pytest
import torch

import descend

PATHS = [{"foreach": False}, {"foreach": True}, {}, {"flat": True}]


def _two_groups(cls: type, **kw: Any) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(4, 3, generator=g).requires_grad_() for _ in range(2)]
    opt = cls([{"params": [params[0]]}, {"params": [params[1]]}], lr=0.01, warn=False, **kw)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()  # state exists
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    return opt, params


def _snapshot(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[Any]]:
    state = [(id(p), k, v.clone() if isinstance(v, torch.Tensor) else v)
             for p in params for k, v in opt.state.get(p, {}).items()]
    return [p.detach().clone() for p in params], state


def _unchanged(opt: torch.optim.Optimizer, params: list[torch.Tensor], snap: tuple[list[torch.Tensor], list[Any]]) -> None:
    before_params, before_state = snap
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before_params))
    by_id = {id(p): p for p in params}
    for pid, key, value in before_state:
        now = opt.state[by_id[pid]][key]
        assert torch.equal(now, value) if isinstance(value, torch.Tensor) else now == value


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_and_bool_parameters_are_refused(dtype: torch.dtype) -> None:
    for cls in (descend.SGD, descend.Adam, descend.LBFGS):
        with pytest.raises(ValueError, match=r"Invalid params: .*dtype"):
            cls([torch.zeros(3, dtype=dtype)])
    opt = descend.SGD([torch.zeros(3, requires_grad=True)])
    with pytest.raises(ValueError, match=r"Invalid params: .*dtype"):
        opt.add_param_group({"params": [torch.zeros(3, dtype=dtype)]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("path", PATHS, ids=str)
@pytest.mark.parametrize("cls", [descend.SGD, descend.AdamW])
@pytest.mark.parametrize("lr", [Fraction(1, 10), "0.1", None, float("nan"), -1.0])
def test_bad_lr_set_on_the_second_group_changes_nothing(cls: type, path: dict, lr: Any) -> None:
    opt, params = _two_groups(cls, **path)
    opt.param_groups[1]["lr"] = lr
    snap = _snapshot(opt, params)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.step()
    _unchanged(opt, params, snap)


@pytest.mark.parametrize("path", [{"foreach": False}, {"fused": True}, {}], ids=str)
def test_one_element_tensor_lr_steps_like_a_scalar(path: dict) -> None:
    a, b = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    descend.Adam([a], lr=torch.tensor([0.1]), **path)
    for p, lr in ((a, torch.tensor([0.1])), (b, torch.tensor(0.1))):
        opt = descend.Adam([p], lr=lr, **path)
        p.grad = torch.ones(3)
        opt.step()
    assert torch.equal(a, b)


@pytest.mark.parametrize("path", PATHS, ids=str)
@pytest.mark.parametrize("base_lr", ["0.1", None, float("nan"), -1.0, float("inf")])
def test_bad_base_lr_changes_nothing(path: dict, base_lr: Any) -> None:
    opt, params = _two_groups(descend.AdamW, decay="independent", weight_decay=1e-4, **path)
    opt.param_groups[1]["base_lr"] = base_lr
    snap = _snapshot(opt, params)
    with pytest.raises(ValueError, match="Invalid base_lr"):
        opt.step()
    _unchanged(opt, params, snap)
    with pytest.raises(ValueError, match="Invalid base_lr"):
        descend.SGD([{"params": [torch.zeros(2, requires_grad=True)], "base_lr": base_lr}])


@pytest.mark.parametrize("path", PATHS, ids=str)
def test_decoupled_lr_times_lambda_above_one_is_refused_before_any_group_steps(path: dict) -> None:
    opt, params = _two_groups(descend.AdamW, weight_decay=0.5, **path)
    opt.param_groups[1]["lr"] = 3.0  # 1 − lr·λ = −0.5: θ would flip sign
    snap = _snapshot(opt, params)
    with pytest.raises(ValueError, match="Invalid weight_decay"):
        opt.step()
    _unchanged(opt, params, snap)


@pytest.mark.parametrize("path", PATHS, ids=str)
@pytest.mark.parametrize("key, value, message", [
    ("step", torch.tensor(-1.0), "allowed: a finite number >= 0"),
    ("step", torch.tensor(float("nan")), "allowed: a finite number"),
    ("step", torch.zeros(4, 3), "shape"),
    ("step", None, "is None"),
    ("exp_avg", "zeros", "not a tensor"),
    ("exp_avg", 0.0, "not a tensor"),
    ("exp_avg", [0.0] * 12, "not a tensor"),
    ("exp_avg", torch.zeros(3, 4), "shape"),
    ("exp_avg", torch.zeros(4, 3, dtype=torch.float64), "dtype"),
    ("exp_avg_sq", -torch.ones(4, 3), "below 0"),
])
def test_corrupted_state_dict_is_refused_and_changes_nothing(path: dict, key: str, value: Any, message: str) -> None:
    opt, params = _two_groups(descend.Adam, **path)
    sd = opt.state_dict()
    sd["state"][1] = dict(sd["state"][1])
    sd["state"][1][key] = value
    snap = _snapshot(opt, params)
    groups = [dict(g) for g in opt.param_groups]
    state_obj = opt.state
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(sd)
    assert opt.state is state_obj
    assert [dict(g) for g in opt.param_groups] == groups
    _unchanged(opt, params, snap)


@pytest.mark.parametrize("path", [{"foreach": False}, {"foreach": True}, {}, {"fused": True}], ids=str)
def test_replaced_data_of_another_shape_is_refused(path: dict) -> None:
    """The fused SGD kernel would read past the end of the old, shorter gradient."""
    p = torch.nn.Parameter(torch.ones(4))
    q = torch.nn.Parameter(torch.ones(4))
    opt = descend.SGD([q, p], lr=0.1, momentum=0.9, **path)
    for t in (p, q):
        t.grad = torch.ones(4)
    opt.step()
    p.data = torch.ones(6)
    before = q.detach().clone()
    with pytest.raises(ValueError, match=r"gradient of .* has shape \(4,\), but the parameter has shape \(6,\)"):
        opt.step()
    assert torch.equal(q.detach(), before)
    p.data = p.data[:2]  # the same memory in another shape: the state of shape (4,) no longer fits
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match="momentum_buffer"):
        opt.step()
    assert torch.equal(q.detach(), before)


@pytest.mark.parametrize("path", PATHS, ids=str)
def test_gradient_of_another_dtype_is_refused(path: dict) -> None:
    opt, params = _two_groups(descend.Adam, **path)
    params[1].grad_dtype = None  # torch refuses the assignment otherwise
    params[1].grad = params[1].grad.double()
    snap = _snapshot(opt, params)
    with pytest.raises(ValueError, match="dtype torch.float64, but the parameter has dtype torch.float32"):
        opt.step()
    _unchanged(opt, params, snap)
