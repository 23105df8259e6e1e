"""Checkpoints: a descend state_dict round trip continues identically, and state dicts move
between torch.optim and descend in both directions without losing moment estimates."""

from __future__ import annotations

import io

import pytest
import torch

import descend
from tests.helpers import loss_fn, make_params, max_abs_diff

PAIRS = {
    "SGD": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
            lambda p: descend.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "Adam": (lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01, amsgrad=True),
             lambda p: descend.Adam(p, lr=0.01, weight_decay=0.01, amsgrad=True)),
    "AdamW": (lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
              lambda p: descend.AdamW(p, lr=0.01, weight_decay=0.1)),
}


def _steps(opt: torch.optim.Optimizer, params: list[torch.Tensor], start: int, stop: int) -> None:
    for step in range(start, stop):
        opt.zero_grad()
        loss_fn(params, step).backward()
        opt.step()


def _roundtrip(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _resumed(first, second, k: int = 10, n: int = 30) -> list[torch.Tensor]:
    """k steps with optimizer ``first``, save, load into ``second`` on fresh tensors holding
    the same values, n − k more steps."""
    params = make_params()
    opt = first(params)
    _steps(opt, params, 0, k)
    sd = _roundtrip(opt.state_dict())
    fresh = [p.detach().clone().requires_grad_() for p in params]
    opt2 = second(fresh)
    opt2.load_state_dict(sd)
    _steps(opt2, fresh, k, n)
    return [p.detach() for p in fresh]


def _uninterrupted(make, n: int = 30) -> list[torch.Tensor]:
    params = make_params()
    _steps(make(params), params, 0, n)
    return [p.detach() for p in params]


@pytest.mark.parametrize("name", list(PAIRS))
def test_descend_round_trip_continues_identically(name: str) -> None:
    ours = PAIRS[name][1]
    assert max_abs_diff(_resumed(ours, ours), _uninterrupted(ours)) == 0.0


@pytest.mark.parametrize("name", list(PAIRS))
def test_torch_state_loads_into_descend(name: str) -> None:
    theirs, ours = PAIRS[name]
    assert max_abs_diff(_resumed(theirs, ours), _uninterrupted(theirs)) <= 1e-12


@pytest.mark.parametrize("name", list(PAIRS))
def test_descend_state_loads_into_torch(name: str) -> None:
    theirs, ours = PAIRS[name]
    assert max_abs_diff(_resumed(ours, theirs), _uninterrupted(ours)) <= 1e-12


def test_state_dict_keeps_torch_format_and_descend_keys() -> None:
    params = make_params()
    opt = descend.AdamW(params, lr=0.01, weight_decay=0.1, decay="independent", l1=0.001)
    _steps(opt, params, 0, 2)
    sd = opt.state_dict()
    group = sd["param_groups"][0]
    assert group["decay"] == "independent" and group["l1"] == 0.001 and group["base_lr"] == 0.01
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert sd["state"][0]["step"].dtype == torch.float32 and sd["state"][0]["step"].item() == 2


def test_torch_state_without_base_lr_takes_initial_lr_then_lr() -> None:
    params = make_params()
    t = torch.optim.AdamW(params, lr=0.02)
    sched = torch.optim.lr_scheduler.ExponentialLR(t, gamma=0.5)
    _steps(t, params, 0, 1)
    sched.step()
    ours = descend.AdamW(params, lr=0.3)
    ours.load_state_dict(t.state_dict())
    g = ours.param_groups[0]
    assert g["base_lr"] == 0.02 and g["lr"] == 0.01 and g["decay"] == "decoupled" and g["l1"] == 0
    plain = torch.optim.SGD(params, lr=0.07)
    ours_sgd = descend.SGD(params, lr=0.3)
    ours_sgd.load_state_dict(plain.state_dict())
    assert ours_sgd.param_groups[0]["base_lr"] == 0.07 and ours_sgd.param_groups[0]["decay"] == "coupled"
