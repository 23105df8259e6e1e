"""descend's RMSprop, Adagrad, Adadelta and Adamax against torch.optim 2.13 (the oracle).

The problem is tests/helpers.py's: a parameter whose grad is None on odd steps (its step count
falls behind), a zero-size and a non-contiguous parameter. Each of descend's implementations is
compared with torch's same implementation over a grid of the rule's options (float64 <= 1e-12
absolute, float32 <= 1e-6 relative after 30 steps; in float64 the forced forms are also held
to torch's bit for bit). The decay modes and L1, which torch does not have, are held to closed
forms built on torch's own step (shrink θ by hand, then torch's step with weight_decay=0; torch's
step, then the soft-threshold by hand; L1 as a loss term) and to each other across forms.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest
import torch
from torch import Tensor

from descend.optimizers.adadelta import Adadelta
from descend.optimizers.adagrad import Adagrad
from descend.optimizers.adamax import Adamax
from descend.optimizers.rmsprop import RMSprop
from tests.helpers import assert_same_run, loss_fn, make_params, max_abs_diff, train

# the large decays of the closed forms are meant: no "implausible decay" warnings
pytestmark = pytest.mark.filterwarnings("ignore:group .* of (RMSprop|Adagrad|Adadelta|Adamax):UserWarning")

STEPS = 30

#: per rule: torch's class, ours, a base lr, and the grid of the rule's own options (torch's names)
RULES: dict[str, tuple[type, type, float, list[dict[str, Any]]]] = {
    "RMSprop": (torch.optim.RMSprop, RMSprop, 1e-2, [
        dict(centered=c, momentum=m, maximize=mx, weight_decay=wd, alpha=a)
        for c, m, mx, wd, a in itertools.product([False, True], [0.0, 0.5], [False, True], [0.0, 0.1], [0.99])
    ] + [dict(alpha=0.7, eps=1e-3, momentum=0.9, centered=True, weight_decay=0.3)]),
    "Adagrad": (torch.optim.Adagrad, Adagrad, 5e-2, [
        dict(lr_decay=ld, weight_decay=wd, initial_accumulator_value=iv, maximize=mx)
        for ld, wd, iv, mx in itertools.product([0.0, 0.3], [0.0, 0.1], [0.0, 0.2], [False, True])
    ] + [dict(eps=1e-3, lr_decay=0.05)]),
    "Adadelta": (torch.optim.Adadelta, Adadelta, 1.0, [
        dict(rho=r, weight_decay=wd, maximize=mx)
        for r, wd, mx in itertools.product([0.9, 0.5], [0.0, 0.1], [False, True])
    ] + [dict(rho=0.95, eps=1e-4, weight_decay=0.9)]),
    "Adamax": (torch.optim.Adamax, Adamax, 1e-2, [
        dict(betas=b, weight_decay=wd, maximize=mx)
        for b, wd, mx in itertools.product([(0.9, 0.999), (0.5, 0.9)], [0.0, 0.1], [False, True])
    ] + [dict(eps=1e-3, betas=(0.0, 0.5))]),
}
IMPLS = {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
RULE_IMPLS = [(r, i) for r in RULES for i in IMPLS if i != "fused" or r == "Adagrad"]
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
        chosen = opt._prepare()[0].implementation  # (the last step's gradients are still there)
        assert chosen == impl


@pytest.mark.parametrize("rule", list(RULES))
def test_default_matches_torchs_default(rule: str) -> None:
    # torch's default on the CPU is its for-loop; descend's is foreach (fused for Adagrad)
    for kw in RULES[rule][3][::3]:
        make_theirs, make_ours = torch_and_ours(rule, **kw)
        for dtype in (torch.float64, torch.float32):
            theirs, _ = train(make_theirs, steps=STEPS, dtype=dtype)
            ours, _ = train(make_ours, steps=STEPS, dtype=dtype)
            assert_same_run(ours, theirs, dtype)


@pytest.mark.parametrize(("rule", "impl"), RULE_IMPLS, ids=[f"{r}-{i}" for r, i in RULE_IMPLS])
def test_tensor_lr_matches_torch(rule: str, impl: str) -> None:
    """torch.tensor(lr) is float32: torch's for-loop and foreach Adagrad and its for-loop Adamax divide
    it by their schedule factor in float32 (the fused Adagrad in double); each form here does as torch's."""
    extra = {"lr_decay": 0.3} if rule == "Adagrad" else {"weight_decay": 0.1}
    lr = torch.tensor(RULES[rule][2] * 1.3)
    sched = lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5)  # noqa: E731
    make_theirs, make_ours = torch_and_ours(rule, lr=lr, **extra, **IMPLS[impl])
    theirs, _ = train(make_theirs, steps=STEPS, scheduler=sched)
    ours, opt = train(make_ours, steps=STEPS, scheduler=sched)
    assert max_abs_diff(ours, theirs) <= 1e-12
    assert isinstance(opt.param_groups[0]["lr"], Tensor)
    floated, _ = train(torch_and_ours(rule, lr=float(lr), **extra, **IMPLS[impl])[1], steps=STEPS, scheduler=sched)
    if (rule, impl) in (("Adagrad", "single"), ("Adagrad", "foreach"), ("Adamax", "single")):
        assert max_abs_diff(floated, theirs) > 1e-12  # the float32 rounding is what was matched


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


@pytest.mark.parametrize("rule", list(RULES))
def test_complex_parameters_match_torch(rule: str) -> None:
    # torch steps a complex parameter as its real and imaginary parts; so does descend (its
    # foreach and fused forms hand complex parameters to the reference)
    kw = dict(weight_decay=0.1, **({"centered": True, "momentum": 0.5} if rule == "RMSprop" else {}),
              **({"initial_accumulator_value": 0.1} if rule == "Adagrad" else {}))
    make_theirs, make_ours = torch_and_ours(rule, **kw, foreach=False)
    theirs = complex_run(make_theirs)
    ours = complex_run(make_ours)
    default = complex_run(torch_and_ours(rule, **kw)[1])
    assert max_abs_diff(ours, theirs) <= 1e-12 and max_abs_diff(default, theirs) <= 1e-12
    assert max_abs_diff(ours, complex_params()) > 1e-2


def _forms(rule: str) -> list[dict[str, Any]]:
    return [{"foreach": True}] + ([{"fused": True}] if rule == "Adagrad" else []) + [{}, {"flat": True}]


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
    for form in _forms(rule):
        got, _ = train(lambda p, f=form: ours(p, lr=lr, weight_decay=wd, l1=l1, decay=decay, **f),
                       steps=STEPS, scheduler=sched)
        assert max_abs_diff(got, reference) <= 1e-12, form


def closed_form_run(rule: str, *, wd: float, l1: float, kw: dict[str, Any]) -> list[Tensor]:
    """torch's step with weight_decay=0, θ shrunk by 1 − lr·λ before it and soft-thresholded by lr·λ₁
    after it, by hand: what ``decay="decoupled"`` means."""
    theirs, _, lr, _ = RULES[rule]
    params = make_params()
    opt = theirs(params, lr=lr, weight_decay=0, **kw)
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
    kw = {"momentum": 0.5, "centered": True} if rule == "RMSprop" else {}
    wd, l1 = 0.2 if rule != "Adadelta" else 0.02, 0.01 if rule != "Adadelta" else 0.001
    expected = closed_form_run(rule, wd=wd, l1=l1, kw=kw)
    got, _ = train(lambda p: RULES[rule][1](p, lr=RULES[rule][2], weight_decay=wd, l1=l1, decay="decoupled",
                                             **kw, **form), steps=STEPS)
    assert max_abs_diff(got, expected) <= 1e-12
    coupled, _ = train(torch_and_ours(rule, weight_decay=wd, **kw)[0], steps=STEPS)
    assert max_abs_diff(coupled, expected) > 1e-6  # torch's own weight_decay is another rule


@pytest.mark.parametrize("rule", list(RULES))
def test_coupled_l1_is_the_loss_term(rule: str) -> None:
    # coupled L1 adds λ₁·sgn(θ) to the gradient: torch on loss + λ₁·‖θ‖₁ (whose gradient at 0 is 0 = sgn 0)
    l1 = 0.05
    make_theirs, make_ours = torch_and_ours(rule, weight_decay=0.1)
    expected, _ = train(make_theirs, steps=STEPS, extra_loss=lambda ps: l1 * sum(p.abs().sum() for p in ps))
    got, _ = train(lambda p: RULES[rule][1](p, lr=RULES[rule][2], weight_decay=0.1, l1=l1), steps=STEPS,
                   extra_loss=lambda ps: 0 * sum(p.sum() for p in ps))  # every parameter gets a gradient, as there
    assert max_abs_diff(got, expected) <= 1e-12


SCHEDULERS = {
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=STEPS,
                                                             cycle_momentum=False),
}


@pytest.mark.parametrize("sched", list(SCHEDULERS))
@pytest.mark.parametrize("rule", list(RULES))
def test_lr_schedulers_match_torch(rule: str, sched: str) -> None:
    kw = {"momentum": 0.5} if rule == "RMSprop" else {"lr_decay": 0.1} if rule == "Adagrad" else {}
    make_theirs, make_ours = torch_and_ours(rule, weight_decay=0.1, **kw)
    theirs, t_opt = train(make_theirs, steps=STEPS, scheduler=SCHEDULERS[sched])
    ours, o_opt = train(make_ours, steps=STEPS, scheduler=SCHEDULERS[sched])
    assert_same_run(ours, theirs, torch.float64)
    assert o_opt.param_groups[0]["lr"] == t_opt.param_groups[0]["lr"] != RULES[rule][2]


@pytest.mark.parametrize("rule", list(RULES))
def test_torch_state_dict_loads_and_continues(rule: str) -> None:
    kw = {"momentum": 0.5, "centered": True} if rule == "RMSprop" else {}
    make_theirs, make_ours = torch_and_ours(rule, weight_decay=0.1, **kw)
    params = make_params()
    _, theirs = train(make_theirs, steps=10, params=params)
    twins = [p.detach().clone().requires_grad_() for p in params]
    mine = make_ours(twins)
    mine.load_state_dict(copy.deepcopy(theirs.state_dict()))
    assert mine.param_groups[0]["decay"] == "coupled"
    a, _ = train(lambda ps: theirs, steps=10, params=params)
    b, _ = train(lambda ps: mine, steps=10, params=twins)
    assert max_abs_diff(a, b) == 0.0 and max_abs_diff(a, make_params()) > 1e-3
    # and back: descend's state dict continues in torch
    back = make_theirs([p.detach().clone().requires_grad_() for p in twins])
    back.load_state_dict(copy.deepcopy(mine.state_dict()))
    c, _ = train(lambda ps: back, steps=5, params=back.param_groups[0]["params"])
    d, _ = train(lambda ps: mine, steps=5, params=twins)
    assert max_abs_diff(c, d) == 0.0


@pytest.mark.parametrize("rule", list(RULES))
def test_state_holds_torchs_entries(rule: str) -> None:
    kw = {"momentum": 0.5, "centered": True} if rule == "RMSprop" else {}
    make_theirs, make_ours = torch_and_ours(rule, **kw, foreach=False)
    _, theirs = train(make_theirs, steps=3)
    _, ours = train(make_ours, steps=3)
    a, b = theirs.state_dict()["state"], ours.state_dict()["state"]
    assert sorted(a) == sorted(b)
    for i in a:
        assert sorted(a[i]) == sorted(b[i])
        for key in a[i]:
            assert a[i][key].dtype == b[i][key].dtype and a[i][key].device == b[i][key].device
            assert torch.equal(a[i][key], b[i][key]), (i, key)


def test_adagrad_makes_every_state_at_construction_like_torch() -> None:
    # torch's Adagrad makes step = 0 and sum = τ for every parameter in its constructor
    params = make_params()
    theirs = torch.optim.Adagrad(params, initial_accumulator_value=0.25)
    ours = Adagrad(params, initial_accumulator_value=0.25)
    a, b = theirs.state_dict()["state"], ours.state_dict()["state"]
    assert sorted(a) == sorted(b) == list(range(len(params)))
    for i in a:
        assert torch.equal(a[i]["step"], b[i]["step"]) and b[i]["step"].dtype == torch.float32
        assert torch.equal(a[i]["sum"], b[i]["sum"])
    # a parameter without gradient keeps that state, untouched; a group added later gets state at its first step
    extra = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    ours.add_param_group({"params": [extra], "initial_accumulator_value": 0.5})
    assert extra not in ours.state
    _, ours = train(lambda ps: ours, steps=1, params=params)
    assert float(ours.state[params[3]]["step"]) == 1.0  # "sometimes" has a gradient on even steps
    ours.zero_grad()
    extra.grad = torch.ones(3, dtype=torch.float64)
    ours.step()
    assert float(ours.state[params[3]]["step"]) == 1.0
    # descend takes each group's own τ (torch takes the constructor's for every group)
    assert torch.allclose(ours.state[extra]["sum"], torch.full((3,), 1.5, dtype=torch.float64))


def test_adagrad_flat_state_starts_with_the_eager_state() -> None:
    params = make_params()
    opt = Adagrad(params, initial_accumulator_value=0.1, flat=True)
    assert opt.flat and all(torch.equal(opt.state[p]["sum"], torch.full_like(p, 0.1)) for p in params)


def contiguous_params() -> list[Tensor]:
    return [p.detach().contiguous().requires_grad_() for p in make_params()]


@pytest.mark.parametrize("rule", list(RULES))
def test_flat_equals_non_flat(rule: str) -> None:
    kw = {"momentum": 0.5, "centered": True} if rule == "RMSprop" else {}
    ours, lr = RULES[rule][1], RULES[rule][2]
    for extra in ({"weight_decay": 0.1}, {"weight_decay": 0.1, "l1": 0.01, "decay": "independent"}):
        reference, _ = train(lambda p, e=extra: ours(p, lr=lr, foreach=False, **kw, **e), steps=STEPS)
        flat, opt = train(lambda p, e=extra: ours(p, lr=lr, flat=True, **kw, **e), steps=STEPS)
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


def test_adagrad_fused_skip_changes_nothing() -> None:
    # nonfinite="skip" on the fused path: the kernel's own found_inf flag; counts stay
    params = make_params()
    opt = Adagrad(params, lr=0.1, fused=True, nonfinite="skip")
    _, opt = train(lambda ps: opt, steps=2, params=params)
    before = [p.detach().clone() for p in params]
    sums = [opt.state[p]["sum"].clone() for p in params]
    steps = [opt.state[p]["step"].clone() for p in params]
    loss_fn(params, 0).backward()
    params[0].grad[0, 0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(opt.state[p]["sum"], s) for p, s in zip(params, sums))
    assert all(torch.equal(opt.state[p]["step"], s) for p, s in zip(params, steps))


def test_rmsprop_momentum_and_centering_switched_on_later_start_from_zeros() -> None:
    params = make_params()
    _, opt = train(lambda ps: RMSprop(ps, lr=1e-2), steps=4, params=params)
    assert all("momentum_buffer" not in s for s in opt.state.values())
    opt.param_groups[0].update(momentum=0.5, centered=True)
    _, opt = train(lambda ps: opt, steps=1, params=params)
    # one step from zero buffers: b = d, ḡ = (1 − α)·g; both now held, as torch would after a first step
    assert all("momentum_buffer" in opt.state[p] and "grad_avg" in opt.state[p] for p in params[:3])
    p, state = params[0], opt.state[params[0]]
    g = p.grad
    assert torch.allclose(state["grad_avg"], (1 - 0.99) * g, rtol=1e-12, atol=0)


# the first part of each message is torch's (its regex, as optim_db's error inputs have them),
# whatever descend's wording after it
BAD: list[tuple[str, dict[str, Any], str]] = [
    ("RMSprop", {"momentum": -1.0}, r"Invalid momentum\b.*-1\.0"),
    ("RMSprop", {"momentum": 1.0}, r"Invalid momentum\b.*1\.0"),
    ("RMSprop", {"alpha": -0.5}, r"Invalid alpha\b.*-0\.5"),
    ("RMSprop", {"alpha": 1.5}, r"Invalid alpha\b.*1\.5"),
    ("RMSprop", {"eps": -1e-8}, r"Invalid eps.*-1e-08"),
    ("RMSprop", {"weight_decay": -0.1}, r"Invalid weight_decay\b.*-0\.1"),
    ("RMSprop", {"centered": "yes"}, r"Invalid centered\b.*yes"),
    ("RMSprop", {"l1": -1.0}, r"Invalid l1\b.*-1\.0"),
    ("Adagrad", {"lr_decay": -0.5}, r"Invalid lr_decay\b.*-0\.5"),
    ("Adagrad", {"initial_accumulator_value": -1.0}, r"Invalid initial_accumulator_value\b.*-1\.0"),
    ("Adagrad", {"eps": float("nan")}, r"Invalid eps.*nan"),
    ("Adagrad", {"decay": "l2"}, r"Invalid decay\b.*l2"),
    ("Adadelta", {"rho": 1.1}, r"Invalid rho\b.*1\.1"),
    ("Adadelta", {"rho": -0.1}, r"Invalid rho\b.*-0\.1"),
    ("Adadelta", {"eps": -1.0}, r"Invalid eps.*-1\.0"),
    ("Adamax", {"betas": (0.0, 1.0)}, r"Invalid beta.*1\.0"),
    ("Adamax", {"betas": (-0.1, 0.9)}, r"Invalid beta.*-0\.1"),
    ("Adamax", {"eps": -1.0}, r"Invalid eps.*-1\.0"),
    ("Adamax", {"maximize": 1}, r"Invalid maximize\b.*1"),
]


@pytest.mark.parametrize(("rule", "bad", "message"), BAD, ids=[f"{r}-{next(iter(b))}={next(iter(b.values()))!r}"
                                                             for r, b, _ in BAD])
def test_invalid_options_fail_at_construction_in_add_param_group_and_before_a_step(
        rule: str, bad: dict[str, Any], message: str) -> None:
    ours = RULES[rule][1]
    with pytest.raises(ValueError, match=message):
        ours(make_params(), **bad)
    params = make_params()
    opt = ours(params[:2])
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": params[2:], **bad})
    assert len(opt.param_groups) == 1
    # a group edited by hand is checked before the step changes anything
    loss_fn(params, 0).backward()
    opt.param_groups[0].update(bad)
    before = [p.detach().clone() for p in params[:2]]
    state = copy.deepcopy(opt.state_dict()["state"])
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params[:2], before))
    assert sorted(opt.state_dict()["state"]) == sorted(state)


@pytest.mark.parametrize("rule", ["RMSprop", "Adadelta", "Adamax"])
def test_capturable_is_refused(rule: str) -> None:
    with pytest.raises(ValueError, match=r"Invalid capturable\b.*True.*allowed: False"):
        RULES[rule][1](make_params(), capturable=True)
    RULES[rule][1](make_params(), capturable=False)  # torch's default is accepted


def test_adagrad_fused_and_foreach_together_are_refused() -> None:
    with pytest.raises(ValueError, match="foreach.*fused"):
        Adagrad(make_params(), foreach=True, fused=True)


@pytest.mark.parametrize("rule", ["RMSprop", "Adadelta", "Adamax"])
def test_no_fused_form(rule: str) -> None:
    with pytest.raises(ValueError, match=r"Invalid fused\b.*no fused kernel"):
        RULES[rule][1]([{"params": make_params(), "fused": True}])


def sparse_run(make: Any, steps: int = 12, maximize: bool = False) -> tuple[list[Tensor], Any]:
    """An embedding with sparse gradients (a few of rows 0-7 per step, some twice; rows 8, 9 never) and a dense head."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 3, sparse=True).double()
    head = torch.nn.Linear(3, 1).double()
    params = [*emb.parameters(), *head.parameters()]
    opt = make(params)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        loss = head(emb(torch.randint(0, 8, (6,), generator=g))).pow(2).sum()
        (-loss if maximize else loss).backward()
        opt.step()
    return [p.detach().clone() for p in params], opt


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
@pytest.mark.parametrize("kw", [dict(lr=0.1), dict(lr=0.1, lr_decay=0.2, initial_accumulator_value=0.1, maximize=True),
                                dict(lr=0.1, foreach=True)], ids=["plain", "options", "foreach"])
def test_adagrad_sparse_gradients_match_torch(kw: dict[str, Any]) -> None:
    theirs, _ = sparse_run(lambda p: torch.optim.Adagrad(p, **kw), maximize=kw.get("maximize", False))
    ours, opt = sparse_run(lambda p: Adagrad(p, **kw), maximize=kw.get("maximize", False))
    assert max_abs_diff(ours, theirs) == 0.0
    rows_moved = (ours[0] - sparse_run(lambda p: Adagrad(p, lr=0.0))[0][0]).abs().sum(dim=1)
    assert bool((rows_moved[:8] > 0).all()) and bool((rows_moved[8:] == 0).all())
    assert bool((opt.state[opt.param_groups[0]["params"][0]]["sum"][8:] == kw.get("initial_accumulator_value", 0)).all())


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
@pytest.mark.parametrize("kw", [dict(weight_decay=0.1), dict(l1=0.01), dict(fused=True)])
def test_adagrad_refuses_what_would_densify_a_sparse_gradient_before_changing_anything(kw: dict[str, Any]) -> None:
    params, opt = sparse_run(lambda p: Adagrad(p, lr=0.1), steps=2)
    opt.param_groups[0].update(kw)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(RuntimeError, match="sparse gradient.*nothing was changed"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(opt.param_groups[0]["params"], params))
    assert all(torch.equal(opt.state_dict()["state"][i]["sum"], before["state"][i]["sum"]) for i in before["state"])
    # the decoupled modes shrink θ and never touch the gradient: they apply
    opt.param_groups[0].update(fused=None, decay="decoupled")
    opt.step()
