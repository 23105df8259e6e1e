"""descend's NAdam, RAdam, ASGD, Rprop and SparseAdam against torch.optim 2.13 (the oracle).

The dense problem is tests/helpers.py's: a parameter whose grad is None on odd steps (its step
count falls behind), a zero-size and a non-contiguous parameter. Each of descend's
implementations is compared with torch's same implementation over a grid of the rule's options:
in float64 bit for bit (the same operations in the same order), in float32 to 1e-6 relative,
after 30 steps. The decay modes and L1, which torch does not have (or, for NAdam and RAdam, has
only as ``decoupled_weight_decay``), are held to closed forms built on torch's own step and to
each other across forms. SparseAdam is compared on an ``nn.Embedding(sparse=True)``.
"""

from __future__ import annotations

import copy
import itertools
import re
from typing import Any

import pytest
import torch
from torch import Tensor

from descend.optimizers.asgd import ASGD
from descend.optimizers.nadam import NAdam
from descend.optimizers.radam import RAdam
from descend.optimizers.rprop import Rprop
from descend.optimizers.sparse_adam import SparseAdam
from tests.helpers import assert_same_run, loss_fn, make_params, max_abs_diff, train

# the large decays of the closed forms are meant: no "implausible decay" warnings
pytestmark = pytest.mark.filterwarnings("ignore:group .* of (NAdam|RAdam|ASGD|Rprop):UserWarning")

STEPS = 30

#: per rule: torch's class, ours, a base lr, and the grid of the rule's own options (torch's names)
RULES: dict[str, tuple[type, type, float, list[dict[str, Any]]]] = {
    "NAdam": (torch.optim.NAdam, NAdam, 1e-2, [
        dict(weight_decay=wd, decoupled_weight_decay=dwd, maximize=mx, momentum_decay=md)
        for wd, dwd, mx, md in itertools.product([0.0, 0.1], [False, True], [False, True], [4e-3, 0.1])
    ] + [dict(betas=(0.5, 0.9), eps=1e-3, weight_decay=0.3)]),
    "RAdam": (torch.optim.RAdam, RAdam, 1e-2, [
        dict(weight_decay=wd, decoupled_weight_decay=dwd, maximize=mx, betas=b)
        for wd, dwd, mx, b in itertools.product([0.0, 0.1], [False, True], [False, True], [(0.9, 0.999), (0.5, 0.9)])
    ] + [dict(eps=1e-3, betas=(0.0, 0.99))]),
    "ASGD": (torch.optim.ASGD, ASGD, 2e-2, [
        dict(lambd=la, t0=t0, weight_decay=wd, maximize=mx)
        for la, t0, wd, mx in itertools.product([1e-4, 0.5], [1e6, 5], [0.0, 0.1], [False, True])
    ] + [dict(alpha=0.5, lambd=0.1, t0=0)]),
    "Rprop": (torch.optim.Rprop, Rprop, 1e-2, [
        dict(etas=e, step_sizes=s, maximize=mx)
        for e, s, mx in itertools.product([(0.5, 1.2), (0.3, 1.5)], [(1e-6, 50), (1e-3, 0.02)], [False, True])
    ]),
}
IMPLS = {"single": {"foreach": False}, "foreach": {"foreach": True}}
RULE_IMPLS = [(r, i) for r in RULES for i in IMPLS]
DECAYS = ["decoupled", "independent", "fixed", "corrected"]


def torch_and_ours(rule: str, **kw: Any) -> tuple[Any, Any]:
    theirs, ours, lr, _ = RULES[rule]
    kw = {"lr": lr, **kw}

    def fresh() -> dict[str, Any]:  # a tensor lr of its own for each optimizer: schedulers fill it in place
        return {k: v.clone() if isinstance(v, Tensor) else v for k, v in kw.items()}

    return (lambda p: theirs(p, **fresh())), (lambda p: ours(p, **fresh()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("rule", "impl"), RULE_IMPLS, ids=[f"{r}-{i}" for r, i in RULE_IMPLS])
def test_each_implementation_matches_torchs_same_one(rule: str, impl: str, dtype: torch.dtype) -> None:
    for kw in RULES[rule][3]:
        make_theirs, make_ours = torch_and_ours(rule, **kw, **IMPLS[impl])
        theirs, _ = train(make_theirs, steps=STEPS, dtype=dtype)
        ours, opt = train(make_ours, steps=STEPS, dtype=dtype)
        assert_same_run(ours, theirs, dtype)
        if dtype == torch.float64:  # the same operations in the same order: torch's numbers exactly
            assert max_abs_diff(ours, theirs) == 0.0, kw
        assert max_abs_diff(ours, make_params(dtype)) > 1e-3  # the run did something to compare
        assert opt._prepare()[0].implementation == impl  # (the last step's gradients are still there)


@pytest.mark.parametrize("rule", list(RULES))
def test_default_matches_torchs_default(rule: str) -> None:
    # torch's default on the CPU is its for-loop; descend's is foreach, torch's own default on CUDA.
    # The two forms round differently (NAdam's √(v/c) against √v/√c): in float64 that stays below
    # 1e-12, in float32 it does not, so there descend's default is held to torch's foreach
    for kw in RULES[rule][3][::4]:
        make_theirs, make_ours = torch_and_ours(rule, **kw)
        theirs, _ = train(make_theirs, steps=STEPS)
        ours, _ = train(make_ours, steps=STEPS)
        assert max_abs_diff(ours, theirs) <= forms_tolerance(rule, "foreach")
        theirs, _ = train(torch_and_ours(rule, **kw, foreach=True)[0], steps=STEPS, dtype=torch.float32)
        ours, _ = train(make_ours, steps=STEPS, dtype=torch.float32)
        assert max_abs_diff(ours, theirs) == 0.0


#: options under which a tensor lr takes part in torch's arithmetic (its decoupled factor, η_t)
TENSOR_LR_OPTIONS = {"NAdam": {"weight_decay": 0.1, "decoupled_weight_decay": True},
                     "RAdam": {"weight_decay": 0.1, "decoupled_weight_decay": True},
                     "ASGD": {"lambd": 0.5, "t0": 5}, "Rprop": {}}


@pytest.mark.parametrize(("rule", "impl"), RULE_IMPLS, ids=[f"{r}-{i}" for r, i in RULE_IMPLS])
def test_tensor_lr_matches_torch(rule: str, impl: str) -> None:
    """torch.tensor(lr) is float32, and torch keeps it a tensor: NAdam's and RAdam's factor 1 − γλ
    (both forms), NAdam's per-tensor step sizes, RAdam's foreach step sizes and ASGD's η_t are
    computed in float32. Each form here does as torch's same one, under an LR scheduler."""
    lr = torch.tensor(RULES[rule][2] * 1.3)
    sched = lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5)  # noqa: E731
    make_theirs, make_ours = torch_and_ours(rule, lr=lr, **TENSOR_LR_OPTIONS[rule], **IMPLS[impl])
    theirs, _ = train(make_theirs, steps=STEPS, scheduler=sched)
    ours, opt = train(make_ours, steps=STEPS, scheduler=sched)
    assert max_abs_diff(ours, theirs) == 0.0
    assert isinstance(opt.param_groups[0]["lr"], Tensor)
    floated, _ = train(torch_and_ours(rule, lr=float(lr), **TENSOR_LR_OPTIONS[rule], **IMPLS[impl])[1],
                       steps=STEPS, scheduler=sched)
    if rule != "Rprop":  # (Rprop reads lr once, as its initial step sizes: no arithmetic to round)
        assert max_abs_diff(floated, theirs) > 0.0  # the float32 rounding is what was matched


def complex_params() -> list[Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(4, 3, dtype=torch.complex128, generator=g).requires_grad_(),
            torch.randn(5, dtype=torch.float64, generator=g).requires_grad_()]


def complex_run(make: Any, steps: int = STEPS) -> list[Tensor]:
    params = complex_params()
    target = torch.linspace(-1, 1, 12, dtype=torch.float64).view(4, 3) * (1 + 0.5j)
    opt = make(params)
    for _ in range(steps):
        opt.zero_grad()
        loss = (params[0] - target).abs().pow(2).sum() + (params[1] ** 2).sum()
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("rule", list(RULES))
def test_complex_parameters_match_torch(rule: str, weight_decay: float) -> None:
    # torch steps a complex parameter as its real and imaginary parts; so does descend (its
    # foreach form hands complex parameters to the reference): bit for bit. torch adds a coupled
    # λθ to the real view too, the pipeline in complex arithmetic (rounded otherwise: ≤ 1e-12)
    kw = {"weight_decay": weight_decay} if rule != "Rprop" else {}
    kw.update({"t0": 5, "lambd": 0.1} if rule == "ASGD" else {})
    make_theirs, make_ours = torch_and_ours(rule, **kw, foreach=False)
    theirs = complex_run(make_theirs)
    ours = complex_run(make_ours)
    default = complex_run(torch_and_ours(rule, **kw)[1])
    tolerance = 0.0 if weight_decay == 0 else 1e-12
    assert max_abs_diff(ours, theirs) <= tolerance and max_abs_diff(default, theirs) <= tolerance
    assert max_abs_diff(ours, complex_params()) > 1e-2


#: each form, and the forced implementation it runs
FORMS: list[tuple[dict[str, Any], str]] = [({"foreach": True}, "foreach"), ({}, "foreach"), ({"flat": True}, "foreach"),
                                           ({"flat": True, "foreach": False}, "single")]


def forms_tolerance(rule: str, form_impl: str) -> float:
    """How far a form may be from the per-tensor reference: 1e-12, except ASGD's foreach forms, whose
    η_t torch computes from the float32 step count in float32 (the reference: in float64, then rounded
    once), as descend's foreach does: ~1e-9 apart after 30 steps, in torch as here."""
    return 1e-7 if rule == "ASGD" and form_impl == "foreach" else 1e-12


@pytest.mark.parametrize("decay", DECAYS + ["coupled"])
@pytest.mark.parametrize("rule", list(RULES))
def test_every_decay_mode_and_l1_agree_across_forms(rule: str, decay: str) -> None:
    lr = RULES[rule][2]
    wd = 0.3 if decay != "fixed" else 0.003
    l1 = 0.01 if decay != "fixed" else 1e-4
    sched = lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + 0.1 * s))  # noqa: E731
    ours = RULES[rule][1]
    reference, _ = train(lambda p: ours(p, lr=lr, weight_decay=wd, l1=l1, decay=decay, foreach=False),
                         steps=STEPS, scheduler=sched)
    plain, _ = train(lambda p: ours(p, lr=lr, foreach=False), steps=STEPS, scheduler=sched)
    assert max_abs_diff(reference, plain) > 1e-4  # the regularization did something
    foreach, _ = train(lambda p: ours(p, lr=lr, weight_decay=wd, l1=l1, decay=decay, foreach=True),
                       steps=STEPS, scheduler=sched)
    for form, impl in FORMS:
        got, opt = train(lambda p, f=form: ours(p, lr=lr, weight_decay=wd, l1=l1, decay=decay, **f),
                         steps=STEPS, scheduler=sched)
        assert max_abs_diff(got, reference) <= forms_tolerance(rule, impl), form
        # each form is its implementation's exact computation (flat storage: to rounding of the problem)
        assert max_abs_diff(got, foreach if impl == "foreach" else reference) <= 1e-12, form
        assert opt.param_groups[0]["decay"] == decay


def closed_form_run(rule: str, *, wd: float, l1: float, kw: dict[str, Any]) -> list[Tensor]:
    """torch's step with weight_decay=0, θ shrunk by 1 − lr·λ before it and soft-thresholded by lr·λ₁
    after it, by hand: what ``decay="decoupled"`` means."""
    theirs, _, lr, _ = RULES[rule]
    params = make_params()
    opt = theirs(params, lr=lr, **kw)
    for step in range(STEPS):
        opt.zero_grad()
        loss_fn(params, step).backward()
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.mul_(1 - lr * wd)
        opt.step()
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.copy_(torch.nn.functional.softshrink(p, lr * l1))
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("form", [{"foreach": False}, {"foreach": True}, {}], ids=["single", "foreach", "default"])
@pytest.mark.parametrize("rule", list(RULES))
def test_decoupled_is_a_shrink_then_torchs_step_then_the_l1_prox(rule: str, form: dict[str, Any]) -> None:
    kw = {"t0": 5, "lambd": 0.1} if rule == "ASGD" else {}
    wd, l1 = 0.2, 0.01
    torch_form = {"foreach": form.get("foreach", True)}  # (descend's default is foreach)
    expected = closed_form_run(rule, wd=wd, l1=l1, kw={**kw, **torch_form})
    got, _ = train(lambda p: RULES[rule][1](p, lr=RULES[rule][2], weight_decay=wd, l1=l1, decay="decoupled",
                                             **kw, **form), steps=STEPS)
    assert max_abs_diff(got, expected) <= 1e-12
    if rule in ("NAdam", "RAdam"):
        # torch's own decoupled_weight_decay is the same shrink, before its step: bit for bit
        torchs, _ = train(torch_and_ours(rule, weight_decay=wd, decoupled_weight_decay=True, **torch_form)[0],
                          steps=STEPS)
        ours, _ = train(torch_and_ours(rule, weight_decay=wd, decay="decoupled", **form)[1], steps=STEPS)
        assert max_abs_diff(ours, torchs) == 0.0
        coupled, _ = train(torch_and_ours(rule, weight_decay=wd)[0], steps=STEPS)
        assert max_abs_diff(coupled, torchs) > 1e-6  # torch's default weight_decay is another rule
    assert max_abs_diff(got, make_params()) > 1e-3


@pytest.mark.parametrize("rule", list(RULES))
def test_coupled_weight_decay_and_l1_are_the_loss_terms(rule: str) -> None:
    # coupled: g + λθ + λ₁·sgn(θ), the gradient of λ/2·‖θ‖² + λ₁·‖θ‖₁ (whose gradient at 0 is 0 = sgn 0).
    # torch's Rprop has no weight_decay: there both terms are loss terms
    wd, l1 = 0.1, 0.05
    torch_wd = 0.0 if rule == "Rprop" else wd
    penalty = lambda ps: (wd - torch_wd) / 2 * sum((p * p).sum() for p in ps) + l1 * sum(p.abs().sum() for p in ps)  # noqa: E731,E501
    kw = {"weight_decay": torch_wd} if rule != "Rprop" else {}
    for foreach in (False, True):
        expected, _ = train(torch_and_ours(rule, **kw, foreach=foreach)[0], steps=STEPS, extra_loss=penalty)
        got, _ = train(lambda p, f=foreach: RULES[rule][1](p, lr=RULES[rule][2], weight_decay=wd, l1=l1, foreach=f),
                       steps=STEPS, extra_loss=lambda ps: 0 * sum(p.sum() for p in ps))  # every parameter has a grad
        assert max_abs_diff(got, expected) <= 1e-12
    assert max_abs_diff(got, train(torch_and_ours(rule)[0], steps=STEPS)[0]) > 1e-4


SCHEDULERS = {
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=STEPS,
                                                             cycle_momentum=False),
}


@pytest.mark.parametrize("sched", list(SCHEDULERS))
@pytest.mark.parametrize("rule", list(RULES))
def test_lr_schedulers_match_torch(rule: str, sched: str) -> None:
    kw = {"weight_decay": 0.1, "decoupled_weight_decay": True} if rule in ("NAdam", "RAdam") else \
        {"weight_decay": 0.1, "t0": 5} if rule == "ASGD" else {}
    for foreach in (False, True):
        make_theirs, make_ours = torch_and_ours(rule, **kw, foreach=foreach)
        theirs, t_opt = train(make_theirs, steps=STEPS, scheduler=SCHEDULERS[sched])
        ours, o_opt = train(make_ours, steps=STEPS, scheduler=SCHEDULERS[sched])
        assert max_abs_diff(ours, theirs) == 0.0
        assert o_opt.param_groups[0]["lr"] == t_opt.param_groups[0]["lr"] != RULES[rule][2]


STATE_OPTIONS = {"NAdam": {"weight_decay": 0.1, "decoupled_weight_decay": True, "momentum_decay": 0.1},
                 "RAdam": {"weight_decay": 0.1, "decoupled_weight_decay": True},
                 "ASGD": {"weight_decay": 0.1, "t0": 5, "lambd": 0.1}, "Rprop": {"etas": (0.3, 1.5)}}


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("rule", list(RULES))
def test_torch_state_dict_loads_and_continues(rule: str, foreach: bool) -> None:
    make_theirs, make_ours = torch_and_ours(rule, **STATE_OPTIONS[rule], foreach=foreach)
    params = make_params()
    _, saved = train(make_theirs, steps=10, params=params)
    # torch's load casts every state tensor but the step to its parameter's dtype (NAdam's float32
    # mu_product becomes float64): both continue from the loaded state
    theirs = make_theirs(params)
    theirs.load_state_dict(copy.deepcopy(saved.state_dict()))
    twins = [p.detach().clone().requires_grad_() for p in params]
    # built with the defaults: the loaded groups say what the saved ones did (decoupled_weight_decay)
    mine = RULES[rule][1](twins)
    mine.load_state_dict(copy.deepcopy(saved.state_dict()))
    group = mine.param_groups[0]
    assert group["decay"] == ("decoupled" if rule in ("NAdam", "RAdam") else "coupled")
    assert group["foreach"] is foreach  # (the saved group's: both continue with the same implementation)
    a, _ = train(lambda ps: theirs, steps=10, params=params)
    b, _ = train(lambda ps: mine, steps=10, params=twins)
    assert max_abs_diff(a, b) == 0.0 and max_abs_diff(a, make_params()) > 1e-3
    # and back: descend's state dict continues in torch (which reads decoupled_weight_decay)
    back = RULES[rule][0]([p.detach().clone().requires_grad_() for p in twins])
    back.load_state_dict(copy.deepcopy(mine.state_dict()))
    c, _ = train(lambda ps: back, steps=5, params=back.param_groups[0]["params"])
    d, _ = train(lambda ps: mine, steps=5, params=twins)
    assert max_abs_diff(c, d) == 0.0


@pytest.mark.parametrize("rule", list(RULES))
def test_state_holds_torchs_entries(rule: str) -> None:
    make_theirs, make_ours = torch_and_ours(rule, **STATE_OPTIONS[rule], foreach=False)
    _, theirs = train(make_theirs, steps=3)
    _, ours = train(make_ours, steps=3)
    a, b = theirs.state_dict()["state"], ours.state_dict()["state"]
    assert sorted(a) == sorted(b)
    for i in a:
        assert list(a[i]) == list(b[i])  # the same entries, in torch's order
        for key in a[i]:
            assert a[i][key].dtype == b[i][key].dtype and a[i][key].device == b[i][key].device
            assert torch.equal(a[i][key], b[i][key]), (i, key)


def test_scalar_state_follows_a_float64_default_dtype_as_torchs() -> None:
    # torch keeps step, mu_product, eta and mu in float64 under a float64 default dtype
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for rule, foreach in itertools.product(RULES, (False, True)):
            make_theirs, make_ours = torch_and_ours(rule, **STATE_OPTIONS[rule], foreach=foreach)
            theirs, t_opt = train(make_theirs, steps=STEPS)
            ours, o_opt = train(make_ours, steps=STEPS)
            assert max_abs_diff(ours, theirs) == 0.0, rule
            t_state, o_state = t_opt.state_dict()["state"][0], o_opt.state_dict()["state"][0]
            assert {k: v.dtype for k, v in t_state.items()} == {k: v.dtype for k, v in o_state.items()}
    finally:
        torch.set_default_dtype(previous)


def contiguous_params() -> list[Tensor]:
    return [p.detach().contiguous().requires_grad_() for p in make_params()]


@pytest.mark.parametrize("rule", list(RULES))
def test_flat_equals_non_flat(rule: str) -> None:
    kw = {"t0": 5, "lambd": 0.1} if rule == "ASGD" else {}
    ours, lr = RULES[rule][1], RULES[rule][2]
    for extra in ({"weight_decay": 0.1}, {"weight_decay": 0.1, "l1": 0.01, "decay": "independent"}):
        reference, _ = train(lambda p, e=extra: ours(p, lr=lr, foreach=True, **kw, **e), steps=STEPS)
        flat, opt = train(lambda p, e=extra: ours(p, lr=lr, flat=True, **kw, **e), steps=STEPS)  # (foreach)
        assert opt.flat
        assert max_abs_diff(flat, reference) <= 1e-12
        # the same kernels on the same elements: bit for bit (with every parameter contiguous: flat
        # storage makes the transposed one contiguous, and the problem's matmul then rounds otherwise)
        for flags in ({"foreach": False}, {"foreach": True}):
            a, _ = train(lambda p, f=flags, e=extra: ours(p, lr=lr, flat=True, **f, **kw, **e), steps=12,
                         params=contiguous_params())
            b, _ = train(lambda p, f=flags, e=extra: ours(p, lr=lr, **f, **kw, **e), steps=12,
                         params=contiguous_params())
            assert max_abs_diff(a, b) == 0.0, flags


# --- decoupled_weight_decay, torch's spelling of decay="decoupled" ---------------------


@pytest.mark.parametrize("rule", ["NAdam", "RAdam"])
def test_decoupled_weight_decay_is_decay_decoupled(rule: str) -> None:
    ours = RULES[rule][1]
    params = make_params()
    opt = ours(params, weight_decay=0.1, decoupled_weight_decay=True)
    assert opt.param_groups[0]["decay"] == "decoupled" and opt.param_groups[0]["decoupled_weight_decay"] is True
    assert ours(params, decay="decoupled").param_groups[0]["decoupled_weight_decay"] is True
    assert ours(params, decoupled_weight_decay=True, decay="decoupled").param_groups[0]["decay"] == "decoupled"
    assert ours(params).param_groups[0]["decay"] == "coupled"
    with pytest.raises(ValueError, match=r"Invalid decoupled_weight_decay: True .*decay='independent'"):
        ours(params, decoupled_weight_decay=True, decay="independent")
    with pytest.raises(ValueError, match=r"Invalid decoupled_weight_decay: 'yes'"):
        ours(params, decoupled_weight_decay="yes")
    # per group, as torch takes it: the group's own key wins, the other follows it
    opt = ours([{"params": params[:2], "decoupled_weight_decay": True}, {"params": params[2:4], "decay": "fixed"},
                {"params": params[4:]}], weight_decay=0.01, decoupled_weight_decay=True)
    assert [(g["decay"], g["decoupled_weight_decay"]) for g in opt.param_groups] == [
        ("decoupled", True), ("fixed", False), ("decoupled", True)]
    opt = ours([{"params": params[:2], "decoupled_weight_decay": False}, {"params": params[2:]}],
               weight_decay=0.01, decay="independent")
    assert [(g["decay"], g["decoupled_weight_decay"]) for g in opt.param_groups] == [
        ("coupled", False), ("independent", False)]
    # a group edited by hand into a contradiction is refused before the step changes anything
    opt = ours(params, weight_decay=0.1, decoupled_weight_decay=True)
    loss_fn(params, 0).backward()
    opt.param_groups[0]["decay"] = "independent"
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"Invalid decoupled_weight_decay: True"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not opt.state


# --- invalid options -------------------------------------------------------------------

# the first part of each message is torch's (its regex, as optim_db's error inputs have them),
# whatever descend's wording after it
BAD: list[tuple[str, dict[str, Any], str]] = [
    ("NAdam", {"betas": (1.0, 0.0)}, r"Invalid beta parameter at index 0: 1\.0"),
    ("NAdam", {"betas": (0.9, -0.1)}, r"Invalid beta parameter at index 1: -0\.1"),
    ("NAdam", {"momentum_decay": -0.2}, r"Invalid momentum_decay value: -0\.2"),
    ("NAdam", {"eps": -1e-8}, r"Invalid epsilon value: -1e-08"),
    ("NAdam", {"weight_decay": -0.5}, r"Invalid weight_decay value: -0\.5"),
    ("NAdam", {"lr": -1.0}, r"Invalid learning rate: -1\.0"),
    ("NAdam", {"l1": -1.0}, r"Invalid l1\b.*-1\.0"),
    ("RAdam", {"betas": (1.0, 0.0)}, r"Invalid beta parameter at index 0: 1\.0"),
    ("RAdam", {"weight_decay": -1}, r"Invalid weight_decay value: -1"),
    ("RAdam", {"eps": float("nan")}, r"Invalid epsilon value: nan"),
    ("RAdam", {"decay": "l2"}, r"Invalid decay\b.*l2"),
    ("RAdam", {"maximize": 1}, r"Invalid maximize\b.*1"),
    ("ASGD", {"weight_decay": -0.5}, r"Invalid weight_decay value: -0\.5"),
    ("ASGD", {"lambd": -1.0}, r"Invalid lambd\b.*-1\.0"),
    ("ASGD", {"alpha": -0.5}, r"Invalid alpha\b.*-0\.5"),
    ("ASGD", {"t0": float("inf")}, r"Invalid t0\b.*inf"),
    ("Rprop", {"etas": (1.0, 0.5)}, r"Invalid eta values: 1\.0, 0\.5"),
    ("Rprop", {"etas": (-0.5, 1.2)}, r"Invalid eta values: -0\.5, 1\.2"),
    ("Rprop", {"etas": (0.5, 1.0)}, r"Invalid eta values: 0\.5, 1\.0"),
    ("Rprop", {"etas": (0.5,)}, r"Invalid etas\b.*a pair"),
    ("Rprop", {"step_sizes": (1.0, 0.5)}, r"Invalid step_sizes\b.*min <= max"),
    ("Rprop", {"step_sizes": (-1.0, 0.5)}, r"Invalid step_sizes\[0\]: -1\.0"),
    ("Rprop", {"weight_decay": -0.1}, r"Invalid weight_decay value: -0\.1"),
]


@pytest.mark.parametrize(("rule", "bad", "message"), BAD, ids=[f"{r}-{next(iter(b))}={next(iter(b.values()))!r}"
                                                             for r, b, _ in BAD])
def test_invalid_options_fail_at_construction_in_add_param_group_and_before_a_step(
        rule: str, bad: dict[str, Any], message: str) -> None:
    ours = RULES[rule][1]
    with pytest.raises(ValueError, match=message):
        ours(make_params(), **bad)
    with pytest.raises(ValueError, match=message):  # options first, as torch: before params are read
        ours(None, **bad)
    params = make_params()
    opt = ours(params[:2])
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": params[2:], **bad})
    assert len(opt.param_groups) == 1
    # a group edited by hand is checked before the step changes anything
    loss_fn(params, 0).backward()
    opt.param_groups[0].update(bad)
    before = [p.detach().clone() for p in params[:2]]
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params[:2], before)) and not opt.state


@pytest.mark.parametrize("rule", list(RULES))
def test_capturable_and_differentiable_are_refused(rule: str) -> None:
    for flag in ("capturable", "differentiable"):
        with pytest.raises(ValueError, match=re.escape(f"Invalid {flag}: True (allowed: False")):
            RULES[rule][1](make_params(), **{flag: True})
        RULES[rule][1](make_params(), **{flag: False})  # torch's default is accepted


def test_rprop_reads_lr_once_as_its_initial_step_sizes() -> None:
    params = make_params()
    opt = Rprop(params, lr=0.02)
    _, opt = train(lambda ps: opt, steps=1, params=params)
    p = params[0]
    # one step from g_prev = 0: every factor is 1, so each step size is lr and θ moved by lr·sign(g)
    assert torch.equal(opt.state[p]["step_size"], torch.full_like(p, 0.02))
    assert torch.equal(opt.state[p]["prev"], p.grad)
    opt.param_groups[0]["lr"] = 1.0  # later changes of lr do not reach the step sizes
    _, opt = train(lambda ps: opt, steps=1, params=params)
    assert float(opt.state[p]["step_size"].max()) <= 0.02 * 1.2


# --- SparseAdam ------------------------------------------------------------------------


def embedding_run(make: Any, *, steps: int = STEPS, dtype: torch.dtype = torch.float64, maximize: bool = False,
                  groups: bool = False) -> tuple[list[Tensor], Any]:
    """Two sparse embeddings (one in its own group), batches with repeated indices (uncoalesced
    gradients), rows that no batch touches for a while, and a step on which one table has an empty gradient."""
    torch.manual_seed(0)
    tables = [torch.nn.Embedding(12, 4, sparse=True).to(dtype), torch.nn.Embedding(7, 3, sparse=True).to(dtype)]
    params = [t.weight for t in tables]
    opt = make([{"params": params[:1]}, {"params": params[1:]}] if groups else params)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        opt.zero_grad()
        idx = torch.randint(0, 8, (10,), generator=g)
        hidden = tables[0](idx)
        loss = ((hidden - 0.3) ** 2).sum() + hidden[:4].sum()
        small = tables[1](idx[:6] % (7 if step % 3 else 1) if step % 5 else idx[:0])
        loss = loss + (small ** 2).sum() * 0.5
        (-loss if maximize else loss).backward()
        opt.step()
    return [p.detach().clone() for p in params], opt


SPARSE_OPTIONS = [{}, {"lr": 0.01}, {"maximize": True, "lr": 0.02}, {"betas": (0.5, 0.9), "eps": 1e-3},
                  {"lr": torch.tensor(0.003)}]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_sparse_adam_matches_torch_on_sparse_embeddings(dtype: torch.dtype) -> None:
    def fresh(kw: dict[str, Any]) -> dict[str, Any]:  # a tensor lr of its own for each optimizer
        return {k: v.clone() if isinstance(v, Tensor) else v for k, v in kw.items()}

    for kw in SPARSE_OPTIONS:
        for groups in (False, True):
            theirs, t_opt = embedding_run(lambda p, kw=kw: torch.optim.SparseAdam(p, **fresh(kw)), dtype=dtype,
                                          maximize=kw.get("maximize", False), groups=groups)
            ours, o_opt = embedding_run(lambda p, kw=kw: SparseAdam(p, **fresh(kw)), dtype=dtype,
                                        maximize=kw.get("maximize", False), groups=groups)
            assert_same_run(ours, theirs, dtype)
            if dtype == torch.float64:
                assert max_abs_diff(ours, theirs) == 0.0, kw
            assert [s["step"] for s in o_opt.state.values()] == [s["step"] for s in t_opt.state.values()]
            assert max_abs_diff(ours, embedding_run(lambda p: SparseAdam(p, lr=1e-9), steps=0)[0]) > 1e-3


def test_sparse_adam_moves_only_the_rows_of_the_gradient() -> None:
    emb = torch.nn.Embedding(6, 2, sparse=True).double()
    opt = SparseAdam(emb.parameters(), lr=0.1)
    before = emb.weight.detach().clone()
    emb(torch.tensor([1, 4, 4])).sum().backward()
    opt.step()
    moved = (emb.weight.detach() != before).any(dim=1)
    assert moved.tolist() == [False, True, False, False, True, False]
    # first step of Adam at the touched rows: m̂/(√v̂ + ε) = g/(|g| + ε·…) ≈ sign(g): θ moves by lr
    assert torch.allclose(before[[1, 4]] - emb.weight.detach()[[1, 4]], torch.full((2, 2), 0.1, dtype=torch.float64),
                          rtol=1e-6)
    state = opt.state[emb.weight]
    assert state["step"] == 1 and isinstance(state["step"], int)
    assert (state["exp_avg"][[0, 2, 3, 5]] == 0).all() and (state["exp_avg"][[1, 4]] != 0).all()


def test_sparse_adam_state_dict_round_trip_with_torch() -> None:
    theirs_params, theirs = embedding_run(lambda p: torch.optim.SparseAdam(p, lr=0.01), steps=10)
    mine_params, mine = embedding_run(lambda p: SparseAdam(p, lr=0.05), steps=10)
    mine.load_state_dict(copy.deepcopy(theirs.state_dict()))
    assert mine.param_groups[0]["lr"] == 0.01
    for p, q in zip(mine.param_groups[0]["params"], theirs.param_groups[0]["params"]):
        p.data.copy_(q.data)
        assert mine.state[p]["step"] == theirs.state[q]["step"] == 10
    for opt in (mine, theirs):
        g = torch.Generator().manual_seed(5)
        for _ in range(5):
            opt.zero_grad()
            for w in opt.param_groups[0]["params"]:
                idx = torch.randint(0, w.shape[0], (5,), generator=g)
                torch.nn.functional.embedding(idx, w, sparse=True).pow(2).sum().backward()
            opt.step()
    a = [p.detach() for p in theirs.param_groups[0]["params"]]
    b = [p.detach() for p in mine.param_groups[0]["params"]]
    assert max_abs_diff(a, b) == 0.0
    back = torch.optim.SparseAdam([p.detach().clone().requires_grad_() for p in b])
    back.load_state_dict(copy.deepcopy(mine.state_dict()))
    assert [s["step"] for s in back.state.values()] == [15, 15]


def test_sparse_adam_refuses_what_torch_refuses() -> None:
    emb = torch.nn.Embedding(4, 2, sparse=True).double()
    opt = SparseAdam(emb.parameters())
    emb.weight.grad = torch.ones(4, 2, dtype=torch.float64)  # dense
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="SparseAdam does not support dense gradients, please consider Adam"):
        opt.step()
    assert torch.equal(emb.weight.detach(), before) and not opt.state
    for params in ([torch.zeros(3, layout=torch.sparse_coo)], [{"params": [torch.zeros(3, layout=torch.sparse_coo)]}]):
        with pytest.raises(ValueError, match="SparseAdam requires dense parameter tensors"):
            SparseAdam(params)
    with pytest.raises(ValueError, match="SparseAdam does not support complex parameters"):
        SparseAdam([torch.rand(2, 3, dtype=torch.complex64)])
    for bad, message in (({"lr": 0.0}, r"Invalid learning rate: 0\.0"), ({"eps": 0.0}, r"Invalid epsilon value: 0\.0"),
                         ({"betas": (1.0, 0.0)}, r"Invalid beta parameter at index 0: 1\.0"),
                         ({"lr": torch.tensor([1e-3, 1e-3])}, "Tensor lr must be 1-element")):
        with pytest.raises(ValueError, match=message):
            SparseAdam(emb.parameters(), **bad)
        with pytest.raises(ValueError, match=message):
            SparseAdam(None, **bad)


@pytest.mark.parametrize("option", ["weight_decay", "l1"])
def test_sparse_adam_refuses_regularization_and_says_why(option: str) -> None:
    emb = torch.nn.Embedding(4, 2, sparse=True)
    for decay in ("coupled", "decoupled"):
        with pytest.raises(ValueError, match=rf"Invalid {option}\b.*0\.1.*0: SparseAdam has no regularization.*dense"):
            SparseAdam(emb.parameters(), **{option: 0.1}, decay=decay)
    SparseAdam(emb.parameters(), **{option: 0}, decay="decoupled")  # 0 in any mode is no regularization


@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_sparse_adam_nonfinite_guard_reads_sparse_gradients(mode: str) -> None:
    emb = torch.nn.Embedding(5, 2, sparse=True).double()
    opt = SparseAdam(emb.parameters(), nonfinite=mode)
    emb(torch.tensor([1, 3])).sum().backward()
    opt.step()
    opt.zero_grad()
    before, state = emb.weight.detach().clone(), copy.deepcopy(opt.state_dict()["state"])
    values = torch.tensor([[float("nan"), 1.0]], dtype=torch.float64)
    emb.weight.grad = torch.sparse_coo_tensor(torch.tensor([[2]]), values, (5, 2), check_invariants=True)
    if mode == "raise":
        with pytest.raises(FloatingPointError, match="non-finite gradient in parameter 0 of group 0"):
            opt.step()
    else:
        opt.step()
        assert opt.skipped_steps == 1
    assert torch.equal(emb.weight.detach(), before)
    assert opt.state[emb.weight]["step"] == state[0]["step"] == 1
