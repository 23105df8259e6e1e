"""Validated loading (descend.checkpoint): what torch.optim accepts silently is rejected
before anything changes, and the same names in another order are matched by name."""

from __future__ import annotations

import copy

import pytest
import torch

import descend


def _named(n: int = 3) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(f"p{i}", torch.randn(i + 2, generator=g).requires_grad_()) for i in range(n)]


def _trained(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int = 3) -> dict:
    for _ in range(steps):
        opt.zero_grad()
        sum((p * torch.arange(p.numel())).sin().sum() for p in params).backward()
        opt.step()
    return opt.state_dict()


def _unchanged(opt: torch.optim.Optimizer):
    before = copy.deepcopy((opt.state_dict(), [dict(g, params=None) for g in opt.param_groups]))

    def check() -> None:
        after = (opt.state_dict(), [dict(g, params=None) for g in opt.param_groups])
        assert repr(after) == repr(before)

    return check


def test_adam_state_into_sgd_is_rejected() -> None:
    named = _named()
    sd = _trained(descend.Adam(named, lr=0.1), [p for _, p in named])
    sgd = descend.SGD(named, lr=0.1, momentum=0.9)
    check = _unchanged(sgd)
    with pytest.raises(ValueError, match="lacks.*momentum.*another kind"):
        sgd.load_state_dict(sd)
    check()
    # a state entry SGD does not keep, in groups that look like SGD's
    sgd_sd = _trained(descend.SGD(named, lr=0.1, momentum=0.9), [p for _, p in named])
    sgd_sd["state"][1]["exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"'p1' holds \['exp_avg'\].*another kind"):
        sgd.load_state_dict(sgd_sd)
    check()
    with pytest.raises(ValueError, match="momentum"):  # torch's Adam state: no momentum in its groups
        descend.SGD([p for _, p in named], lr=0.1).load_state_dict(
            _trained(torch.optim.Adam([p for _, p in named]), [p for _, p in named]))


def test_sgd_state_into_adam_is_rejected() -> None:
    params = [p for _, p in _named()]
    sd = _trained(torch.optim.SGD(params, lr=0.1, momentum=0.9), params)
    adam = descend.Adam(params)
    with pytest.raises(ValueError, match="betas"):
        adam.load_state_dict(sd)


def test_shape_and_dtype_mismatch_are_rejected() -> None:
    params = [p for _, p in _named()]
    sd = _trained(descend.Adam(params, lr=0.1), params)
    other = [torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True), torch.zeros(5, requires_grad=True)]
    opt = descend.Adam(other)
    check = _unchanged(opt)
    with pytest.raises(ValueError, match=r"exp_avg.*shape \(4,\).*\(5,\)"):
        opt.load_state_dict(sd)
    check()
    doubles = [p.detach().double().requires_grad_() for p in params]
    with pytest.raises(ValueError, match="dtype torch.float32.*torch.float64"):
        descend.Adam(doubles).load_state_dict(sd)


def test_names_in_another_order_are_matched_by_name() -> None:
    named = _named()
    opt = descend.Adam(named, lr=0.1)
    sd = _trained(opt, [p for _, p in named])
    shuffled = [named[2], named[0], named[1]]
    opt2 = descend.Adam(shuffled, lr=0.1)
    opt2.load_state_dict(sd)
    for _, p in named:
        torch.testing.assert_close(opt2.state[p]["exp_avg"], opt.state[p]["exp_avg"], rtol=0, atol=0)
    assert opt2.param_groups[0]["param_names"] == ["p2", "p0", "p1"]


def test_missing_names_are_listed() -> None:
    named = _named()
    sd = _trained(descend.SGD(named, lr=0.1, momentum=0.9), [p for _, p in named])
    renamed = [("p0", named[0][1]), ("p1", named[1][1]), ("q2", named[2][1])]
    opt = descend.SGD(renamed, lr=0.1, momentum=0.9)
    check = _unchanged(opt)
    with pytest.raises(ValueError, match=r"missing from the state dict \['q2'\].*not in the optimizer \['p2'\]"):
        opt.load_state_dict(sd)
    check()


def test_group_count_and_sizes_are_checked_first() -> None:
    params = [p for _, p in _named()]
    sd = _trained(descend.SGD(params, lr=0.1), params)
    with pytest.raises(ValueError, match="3 parameters.*has 2"):
        descend.SGD(params[:2]).load_state_dict(sd)
    with pytest.raises(ValueError, match="parameter groups"):
        descend.SGD([{"params": params[:1]}, {"params": params[1:]}]).load_state_dict(sd)
    with pytest.raises(ValueError, match="not an optimizer state dict"):
        descend.SGD(params).load_state_dict({"state": {}})


def test_torch_state_dicts_still_load() -> None:
    named = _named()
    params = [p for _, p in named]
    for theirs, ours in ((torch.optim.SGD(named, lr=0.1, momentum=0.9), descend.SGD(named, lr=0.1, momentum=0.9)),
                         (torch.optim.AdamW(named), descend.AdamW(named))):
        ours.load_state_dict(_trained(theirs, params))
        assert len(ours.state) == 3
