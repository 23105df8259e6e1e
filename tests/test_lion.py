"""descend.Lion against lion-pytorch 0.2.5 (the oracle), closed forms of every decay mode on a
zero gradient, validation, and state dicts."""

from __future__ import annotations

import copy
import math
import re
from typing import Any

import lion_pytorch
import pytest
import torch
from torch import Tensor

import descend
from tests.helpers import assert_same_run, make_params, max_abs_diff, train

# the large decays of the closed forms are meant: no "implausible decay" warnings
pytestmark = pytest.mark.filterwarnings("ignore:group .* of Lion:UserWarning")

LR = 3e-3
STEPS = 30
FORMS: list[dict[str, Any]] = [{"foreach": False}, {"foreach": True}, {}, {"flat": True}]
FORM_IDS = ["single", "foreach", "default", "flat"]


def lion_ref(**kwargs: Any) -> Any:
    return lambda ps: lion_pytorch.Lion(ps, **kwargs)


def ours(**kwargs: Any) -> Any:
    return lambda ps: descend.Lion(ps, **kwargs)


def lr_schedule(opt: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + 0.2 * s))


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("wd", [0.0, 0.3])
def test_equals_lion_pytorch(form: dict[str, Any], wd: float) -> None:
    # lion-pytorch's default decay is descend's "decoupled" (θ·(1 − lr·λ)), descend.Lion's default too
    expected, _ = train(lion_ref(lr=LR, betas=(0.9, 0.99), weight_decay=wd), steps=STEPS)
    got, opt = train(ours(lr=LR, betas=(0.9, 0.99), weight_decay=wd, **form), steps=STEPS)
    assert_same_run(got, expected, torch.float64)
    moved = max_abs_diff(got, make_params())
    assert moved > 10 * LR  # the run did something to compare
    assert opt.flat == bool(form.get("flat"))


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_independent_is_lion_pytorch_decoupled_weight_decay(form: dict[str, Any]) -> None:
    wd = 0.05
    expected, _ = train(lion_ref(lr=LR, weight_decay=wd, decoupled_weight_decay=True), steps=STEPS,
                        scheduler=lr_schedule)
    got, opt = train(ours(lr=LR, weight_decay=wd, decay="independent", **form), steps=STEPS, scheduler=lr_schedule)
    assert_same_run(got, expected, torch.float64)
    assert opt.param_groups[0]["lr"] < LR / 2  # the schedule moved lr away from lr₀
    # under the schedule neither "decoupled" nor "fixed" with the same λ is that rule
    for decay in ("decoupled", "fixed"):
        other, _ = train(ours(lr=LR, weight_decay=wd, decay=decay, **form), steps=STEPS, scheduler=lr_schedule)
        assert max_abs_diff(other, expected) > 1e-6


def test_independent_takes_each_groups_own_lr0() -> None:
    # a deviation: lion-pytorch divides every group's λ by the constructor's lr, descend by the
    # group's own lr₀; so a group with lr = LR/2 needs λ twice as large in lion-pytorch
    wd = 0.05
    expected, _ = train(lambda ps: lion_pytorch.Lion([{"params": ps[:3]}, {"params": ps[3:], "lr": LR / 2,
                                                      "weight_decay": 2 * wd}], lr=LR, weight_decay=wd,
                                                     decoupled_weight_decay=True), steps=STEPS, scheduler=lr_schedule)
    got, _ = train(lambda ps: descend.Lion([{"params": ps[:3]}, {"params": ps[3:], "lr": LR / 2}], lr=LR,
                                           weight_decay=wd, decay="independent"), steps=STEPS, scheduler=lr_schedule)
    assert_same_run(got, expected, torch.float64)


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_maximize_is_minimizing_the_negated_objective(form: dict[str, Any]) -> None:
    # train() maximizes −f when the group says maximize: the same path as minimizing f
    expected, _ = train(lion_ref(lr=LR, weight_decay=0.2), steps=STEPS)
    got, _ = train(ours(lr=LR, weight_decay=0.2, maximize=True, **form), steps=STEPS)
    assert_same_run(got, expected, torch.float64)
    # one step on a gradient of ones: maximizing climbs by lr
    flipped = descend.Lion(make_params(), lr=LR, maximize=True, **form)
    p = flipped.param_groups[0]["params"][1]
    p.grad = torch.ones_like(p)
    before = p.detach().clone()
    flipped.step()
    assert torch.equal(p.detach(), before + LR)


THETA0 = torch.tensor([0.5, -0.25, 0.0, 0.125, -1.0], dtype=torch.float64)


def zero_grad_run(steps: int, *, lr: float, set_lr: float | None = None, **kwargs: Any) -> tuple[Tensor, Tensor]:
    p = THETA0.clone().requires_grad_()
    opt = descend.Lion([p], lr=lr, **kwargs)
    if set_lr is not None:
        opt.param_groups[0]["lr"] = set_lr  # as a scheduler would: lr₀ stays
    for _ in range(steps):
        p.grad = torch.zeros_like(p)
        opt.step()
    return p.detach(), opt.state[p]["exp_avg"]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(("decay", "factor"), [
    ("decoupled", 1 - 0.02 * 0.5),
    ("independent", 1 - (0.02 / 0.05) * 0.5),
    ("fixed", 1 - 0.5),
    ("corrected", 1 - 0.5 * 0.02**2 / 0.05),
])
def test_decoupled_decay_closed_form_on_zero_gradient(decay: str, factor: float, foreach: bool) -> None:
    # sign(0) = 0: the rule itself does not move θ, so θ_T = θ₀·factorᵀ exactly
    got, m = zero_grad_run(7, lr=0.05, set_lr=0.02, weight_decay=0.5, decay=decay, foreach=foreach)
    assert max_abs_diff([got], [THETA0 * factor**7]) <= 1e-15
    assert torch.equal(m, torch.zeros_like(m))


@pytest.mark.parametrize("foreach", [False, True])
def test_decoupled_l1_closed_form_on_zero_gradient(foreach: bool) -> None:
    lr, l1, steps = 0.01, 3.0, 5  # threshold lr·λ₁ = 0.03 per step: 0.125 reaches 0 after 5 steps
    got, m = zero_grad_run(steps, lr=lr, l1=l1, foreach=foreach)
    expected = THETA0.sign() * (THETA0.abs() - steps * lr * l1).clamp(min=0)
    assert max_abs_diff([got], [expected]) <= 1e-15
    assert got[3].item() == 0.0 and torch.equal(m, torch.zeros_like(m))


@pytest.mark.parametrize("term", [{"weight_decay": 0.1}, {"l1": 0.1}])
def test_coupled_terms_go_through_the_sign(term: dict[str, float]) -> None:
    # coupled: g = λθ (or λ₁·sgn θ), whose sign is θ's: θ moves by lr towards 0 each step, whatever λ
    lr, steps = 0.01, 6
    got, m = zero_grad_run(steps, lr=lr, decay="coupled", **term)
    assert max_abs_diff([got], [THETA0 - steps * lr * THETA0.sign()]) <= 1e-15
    assert torch.equal(m.sign(), THETA0.sign())


def test_complex_parameter_is_its_real_and_imaginary_parts() -> None:
    gen = torch.Generator().manual_seed(3)
    z0 = torch.randn(4, 3, dtype=torch.complex128, generator=gen)
    grads = [torch.randn(4, 3, dtype=torch.complex128, generator=gen) for _ in range(6)]
    results = []
    for flat in (False, True):
        z = z0.clone().requires_grad_()
        r = torch.view_as_real(z0).clone().requires_grad_()
        opt = descend.Lion([z], lr=0.1, weight_decay=0.3, flat=flat)
        ref = descend.Lion([r], lr=0.1, weight_decay=0.3)
        for g in grads:
            z.grad, r.grad = g.clone(), torch.view_as_real(g).clone()
            opt.step()
            ref.step()
        assert torch.equal(torch.view_as_real(z.detach()), r.detach())
        results.append(z.detach())
    step = torch.view_as_real(results[0] - z0 * (1 - 0.1 * 0.3) ** 6)
    assert step.abs().max().item() > 0.1  # a real step, per part
    assert torch.equal(results[0], results[1])


def test_forms_agree_bitwise_on_mixed_dtypes() -> None:
    runs = []
    for foreach in (False, True):
        params = [p.to(torch.float32).detach().requires_grad_() if i % 2 else p for i, p in enumerate(make_params())]
        opt = descend.Lion(params, lr=LR, weight_decay=0.1, foreach=foreach)
        batch = opt._prepare()[0]
        assert batch.implementation == ("foreach" if foreach else "single") or not batch.params
        for step in range(10):
            opt.zero_grad()
            for i, p in enumerate(params):
                if p.numel() and (i != 3 or step % 2 == 0):
                    p.grad = torch.cos(p.detach() * (step + 1))
            opt.step()
        runs.append([p.detach() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_default_implementation_is_foreach() -> None:
    params = make_params()
    for p in params:
        p.grad = torch.ones_like(p)
    assert descend.Lion(params)._prepare()[0].implementation == "foreach"
    assert descend.Lion(params, foreach=False)._prepare()[0].implementation == "single"


#: (option, bad value, what the message says is allowed); torch's words start the message
#: where torch has some (descend.validation.TORCH_WORDING), with the option's name after them
BAD = [
    ("lr", -1.0, "a number in [0, inf)"),
    ("betas", (1.0, 0.99), "a number in [0, 1)"),
    ("betas", (0.9, -0.1), "a number in [0, 1)"),
    ("betas", (0.9,), "a pair (beta1, beta2)"),
    ("betas", "0.9", "a pair (beta1, beta2)"),
    ("weight_decay", -0.1, "a number in [0, inf)"),
    ("l1", math.nan, "a finite real number"),
    ("decay", "l2", "'coupled'"),
    ("maximize", "no", "True or False"),
    ("foreach", 1, "True or False or None"),
]


@pytest.mark.parametrize(("name", "value", "allowed"), BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_invalid_options_fail_at_construction_and_in_add_param_group(name: str, value: Any, allowed: str) -> None:
    start = f"Invalid {name}: {value!r} ("
    if name == "lr":
        start = f"Invalid learning rate: {value!r} (lr; "
    elif name == "weight_decay":
        start = f"Invalid weight_decay value: {value!r} ("
    elif name == "betas" and isinstance(value, tuple) and len(value) == 2:
        i = 0 if not 0 <= value[0] < 1 else 1
        start = f"Invalid beta parameter at index {i}: {value[i]!r} (betas[{i}]; "
    message = "^" + re.escape(start + "allowed: ") + ".*" + re.escape(allowed)
    with pytest.raises(ValueError, match=message):
        descend.Lion(make_params(), **{name: value})
    opt = descend.Lion(make_params()[:2])
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": make_params()[2:], name: value})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize(("name", "value", "allowed"), [("flat", "yes", "True or False"),
                                                         ("nonfinite", "warn", "'ignore', 'skip', 'raise'")])
def test_invalid_constructor_only_options(name: str, value: Any, allowed: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"Invalid {name}: {value!r} (allowed: {allowed})")):
        descend.Lion(make_params(), **{name: value})


@pytest.mark.parametrize("flat", [False, True])
def test_state_dict_round_trip_continues_bit_identically(flat: bool) -> None:
    params = make_params()
    _, opt = train(ours(lr=LR, weight_decay=0.2, l1=0.01, flat=flat), steps=10, params=params)
    saved = copy.deepcopy(opt.state_dict())
    twins = [p.detach().clone().requires_grad_() for p in params]
    resumed = descend.Lion(twins, lr=LR, weight_decay=0.2, l1=0.01, flat=flat)
    resumed.load_state_dict(saved)
    assert torch.equal(resumed.state[twins[0]]["exp_avg"], opt.state[params[0]]["exp_avg"])
    a, _ = train(lambda ps: opt, steps=10, params=params)
    b, _ = train(lambda ps: resumed, steps=10, params=twins)
    assert max_abs_diff(a, b) == 0.0 and max_abs_diff(a, make_params()) > 0


def test_lion_pytorch_state_dict_loads_and_continues() -> None:
    params = make_params()
    _, theirs = train(lion_ref(lr=LR, weight_decay=0.2), steps=10, params=params)
    twins = [p.detach().clone().requires_grad_() for p in params]
    mine = descend.Lion(twins, lr=LR, weight_decay=0.2)
    mine.load_state_dict(copy.deepcopy(theirs.state_dict()))
    assert mine.param_groups[0]["decay"] == "decoupled"
    a, _ = train(lambda ps: theirs, steps=10, params=params)
    b, _ = train(lambda ps: mine, steps=10, params=twins)
    assert max_abs_diff(a, b) <= 1e-12


def test_kind_checks_refuse_foreign_state_dicts() -> None:
    params = make_params()
    _, lion = train(ours(lr=LR), steps=3, params=params)
    with pytest.raises(ValueError, match=r"lacks \['eps', 'amsgrad'\], which Adam needs"):
        descend.Adam(make_params()).load_state_dict(lion.state_dict())
    _, adam = train(lambda ps: descend.Adam(ps), steps=3)
    before = copy.deepcopy(lion.state_dict())
    with pytest.raises(ValueError, match=r"holds \['exp_avg_sq', 'step'\], which Lion does not keep"):
        lion.load_state_dict(adam.state_dict())
    after = lion.state_dict()
    assert all(torch.equal(after["state"][i]["exp_avg"], s["exp_avg"]) for i, s in before["state"].items())
