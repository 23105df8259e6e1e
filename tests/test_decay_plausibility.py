"""Decay you cannot get wrong (issue 12): the "corrected" mode against its closed form,
plausibility warnings, factors ≤ 0 refused at the step with nothing changed, timm's lr_scale
as part of lr₀, and plain groups added to an optimizer built with names."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import descend

THETA = [0.5, -0.3, 0.02, -0.001, 0.0]


def _param() -> torch.Tensor:
    return torch.tensor(THETA, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("impl", [{"foreach": False}, {"foreach": True}, {"fused": True}])
@pytest.mark.parametrize("cls", [descend.SGD, descend.Adam])
def test_corrected_decay_is_lambda_lr_squared_over_lr0(cls: type, impl: dict) -> None:
    """AdamC's θ·(1 − λ·lr²/lr₀) and its L1 threshold λ₁·lr²/lr₀, on zero gradients, at every
    lr of a schedule (so that lr ≠ lr₀)."""
    lam, l1, lr0 = 0.3, 0.02, 0.1
    p = _param()
    opt = cls([p], lr=lr0, weight_decay=lam, l1=l1, decay="corrected", warn=False, **impl)
    theta = torch.tensor(THETA, dtype=torch.float64)
    for lr in (0.1, 0.05, 0.02):
        opt.param_groups[0]["lr"] = lr
        p.grad = torch.zeros_like(p)
        opt.step()
        s = lr * lr / lr0
        theta = theta * (1 - lam * s)
        theta = torch.sign(theta) * (theta.abs() - l1 * s).clamp(min=0)
        torch.testing.assert_close(p.detach(), theta, rtol=0, atol=1e-15)
    assert descend.regularization.describe(opt.param_groups[0]) == "θ *= 1 − (lr²/lr₀)·0.3; prox L1 (lr²/lr₀)·0.02"


def _record(make) -> list[warnings.WarningMessage]:  # type: ignore[no-untyped-def]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make()
    return [w for w in caught if issubclass(w.category, UserWarning)]


def test_readme_trap_warns_once_naming_group_factor_timescale_and_torch_lambda() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    caught = _record(lambda: descend.AdamW(descend.param_groups(model, weight_decay=0.05), lr=3e-4,
                                           decay="independent"))
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "group 0 of AdamW" in text and "0.95" in text
    assert f"timescale {-1 / math.log(0.95):.3g} steps" in text
    assert "weight_decay=166.7" in text  # the torch AdamW this is: λ/lr₀
    assert "weight_decay=1.5e-05" in text  # torch's 0.05 in the paper's units: λ·lr₀
    assert caught[0].filename == __file__  # points at the user's line, not at descend


@pytest.mark.parametrize("decay, lam, lr", [("decoupled", 0.2, 0.1), ("fixed", 0.02, 1e-3), ("corrected", 0.5, 0.1)])
def test_every_decoupled_mode_warns_above_one_percent(decay: str, lam: float, lr: float) -> None:
    caught = _record(lambda: descend.SGD([_param()], lr=lr, weight_decay=lam, decay=decay))
    assert len(caught) == 1 and decay in str(caught[0].message)


def test_plausible_settings_and_warn_false_are_silent() -> None:
    assert _record(lambda: descend.AdamW([_param()], lr=1e-3, weight_decay=0.1)) == []  # torch's usual
    assert _record(lambda: descend.AdamW([_param()], lr=3e-4, weight_decay=1e-5, decay="independent")) == []
    assert _record(lambda: descend.Adam([_param()], lr=0.1, weight_decay=5.0)) == []  # coupled: no shrink factor
    assert _record(lambda: descend.SGD([_param()], lr=0.1, weight_decay=0.5, decay="fixed", warn=False)) == []
    opt = descend.SGD([_param()], lr=0.1, warn=False)
    assert _record(lambda: opt.add_param_group({"params": [_param()], "weight_decay": 0.9, "decay": "fixed"})) == []
    with pytest.raises(ValueError, match="Invalid warn"):
        descend.SGD([_param()], warn="no")


def test_add_param_group_warns_for_its_own_group() -> None:
    opt = descend.SGD([_param()], lr=0.1)
    caught = _record(lambda: opt.add_param_group({"params": [_param()], "weight_decay": 0.5, "decay": "fixed"}))
    assert len(caught) == 1 and "group 1 of SGD" in str(caught[0].message)


def test_a_factor_at_or_below_zero_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match=r"Invalid weight_decay value: 10 .*multiplied by 0;"):
        descend.AdamW([_param()], lr=0.1, weight_decay=10)
    with pytest.raises(ValueError, match="Invalid weight_decay"):
        descend.SGD([_param()], lr=0.5, weight_decay=2, decay="corrected")


def test_onecycle_that_would_flip_the_weights_refuses_the_step_and_changes_nothing() -> None:
    """independent decay with lr/lr₀ up to 25 under OneCycleLR: once 1 − (lr/lr₀)·λ ≤ 0 the step
    raises before anything changes (parameters and every state tensor)."""
    p = _param()
    opt = descend.AdamW([p], lr=0.004, weight_decay=0.05, decay="independent")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=40, pct_start=0.5)
    refused = None
    for step in range(40):
        p.grad = torch.full_like(p, 0.1)
        lr = opt.param_groups[0]["lr"]
        if 1 - lr / 0.004 * 0.05 <= 0:
            before = p.detach().clone()
            state = {k: v.clone() for k, v in opt.state[p].items()}
            with pytest.raises(ValueError, match="nothing was changed"):
                opt.step()
            assert torch.equal(p.detach(), before)
            assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())
            refused = step
            break
        opt.step()
        sched.step()
    assert refused is not None and refused > 0


def test_timm_lr_scale_is_part_of_lr0() -> None:
    """A group with lr_scale (timm's layer decay; its scheduler sets lr = lr_sched·lr_scale)
    gets lr₀ = lr·lr_scale, so "independent" decay is the same however the scale is applied."""
    lam, lr, scale = 0.01, 0.1, 0.25
    scaled_later = _param()
    opt = descend.SGD([{"params": [scaled_later], "lr_scale": scale}], lr=lr, weight_decay=lam, decay="independent")
    assert opt.param_groups[0]["base_lr"] == pytest.approx(lr * scale)
    opt.param_groups[0]["lr"] = lr * scale  # what timm's scheduler does at every step
    set_at_construction = _param()
    ref = descend.SGD([set_at_construction], lr=lr * scale, weight_decay=lam, decay="independent")
    for p, o in ((scaled_later, opt), (set_at_construction, ref)):
        p.grad = torch.zeros_like(p)
        o.step()
    assert torch.equal(scaled_later, set_at_construction)
    torch.testing.assert_close(scaled_later.detach(), torch.tensor(THETA, dtype=torch.float64) * (1 - lam),
                               rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="Invalid lr_scale"):
        descend.SGD([{"params": [_param()], "lr_scale": "x"}], lr=0.1)


def test_backbone_finetuning_pattern_plain_group_into_named_optimizer() -> None:
    """Freeze the backbone, build from descend.param_groups (named; frozen parameters are left
    out), train, unfreeze and add the backbone as a plain group (Lightning's BackboneFinetuning):
    the group gets made-up names, and state dicts still round-trip and load into torch.optim."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    backbone = model[0]
    backbone.requires_grad_(False)
    opt = descend.AdamW(descend.param_groups(model, weight_decay=0.01), lr=1e-2)
    x = torch.randn(8, 3, dtype=torch.float64)

    def train(o: torch.optim.Optimizer, steps: int) -> None:
        for _ in range(steps):
            o.zero_grad()
            model(x).square().mean().backward()
            o.step()

    train(opt, 2)
    backbone.requires_grad_(True)
    opt.add_param_group({"params": list(backbone.parameters()), "lr": 1e-3})
    assert opt.param_groups[-1]["param_names"] == ["group2.param0", "group2.param1"]
    train(opt, 2)
    saved = opt.state_dict()

    def rebuilt(cls: type, names: bool) -> torch.optim.Optimizer:
        backbone.requires_grad_(False)
        o = cls(descend.param_groups(model, weight_decay=0.01), lr=1e-2)
        backbone.requires_grad_(True)
        params = list(backbone.parameters())
        o.add_param_group({"params": list(zip(["group2.param0", "group2.param1"], params)) if names else params,
                           "lr": 1e-3})
        o.load_state_dict(copy.deepcopy(saved))  # torch's load shares same-dtype tensors with the dict
        return o

    fresh = rebuilt(descend.AdamW, names=False)
    assert all(torch.equal(fresh.state[p][k], opt.state[p][k]) for p in opt.state for k in opt.state[p])
    theirs = rebuilt(torch.optim.AdamW, names=True)  # torch wants the names spelled out
    weights = [p.detach().clone() for p in model.parameters()]
    train(opt, 3)
    ours_after = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(w)
    train(theirs, 3)
    for a, b in zip(ours_after, model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-12)
