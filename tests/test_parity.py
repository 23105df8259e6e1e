"""descend reproduces torch.optim.SGD, Adam and AdamW with torch-compatible settings.

Oracle: torch.optim itself, run on the same problem (tests/helpers.py: a parameter whose
grad is None on odd steps, a zero-size and a non-contiguous parameter). Tolerances are the
issue's: float64 <= 1e-12 absolute after 50 steps, float32 <= 1e-6 relative. Each of
descend's implementations is compared with torch's same implementation, and descend's
default with torch's default.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import descend
from tests.helpers import assert_same_run, loss_fn, make_params, max_abs_diff, train

IMPLS = {
    "single": ({"foreach": False}, {"foreach": False}),
    "foreach": ({"foreach": True}, {"foreach": True}),
    "fused": ({"fused": True}, {"fused": True}),
    "default": ({}, {}),
}

SGD_GRID = [
    dict(momentum=m, dampening=d, nesterov=n, maximize=mx, weight_decay=wd)
    for m, d, n, mx, wd in itertools.product([0.0, 0.9], [0.0, 0.3], [False, True], [False, True], [0.0, 0.1])
    if not (n and (m == 0 or d != 0))
]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_sgd_matches_torch(impl: str, dtype: torch.dtype) -> None:
    ours_flags, torch_flags = IMPLS[impl]
    for kw in SGD_GRID:

        theirs, _ = train(lambda p, kw=kw: torch.optim.SGD(p, lr=0.05, **kw, **torch_flags), dtype=dtype)
        ours, _ = train(lambda p, kw=kw: descend.SGD(p, lr=0.05, **kw, **ours_flags), dtype=dtype)
        assert_same_run(ours, theirs, dtype)


ADAM_GRID = [
    dict(amsgrad=a, maximize=mx, weight_decay=wd, betas=b)
    for a, mx, wd, b in itertools.product([False, True], [False, True], [0.0, 0.1], [(0.9, 0.999)])
] + [dict(betas=(0.5, 0.9), eps=1e-3, weight_decay=0.1)]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("pair", [(torch.optim.Adam, descend.Adam), (torch.optim.AdamW, descend.AdamW)],
                         ids=["Adam", "AdamW"])
def test_adam_matches_torch(impl: str, dtype: torch.dtype, pair: tuple) -> None:
    torch_cls, our_cls = pair
    ours_flags, torch_flags = IMPLS[impl]
    for kw in ADAM_GRID:
        theirs, _ = train(lambda p, kw=kw: torch_cls(p, lr=0.01, **kw, **torch_flags), dtype=dtype)
        ours, _ = train(lambda p, kw=kw: our_cls(p, lr=0.01, **kw, **ours_flags), dtype=dtype)
        assert_same_run(ours, theirs, dtype)


def test_torch_decoupled_adam_flag_is_descend_decoupled() -> None:
    theirs, _ = train(lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True))
    ours, _ = train(lambda p: descend.Adam(p, lr=0.01, weight_decay=0.1, decay="decoupled"))
    assert_same_run(ours, theirs, torch.float64)


def _complex_params() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(4, 3, dtype=torch.complex128, generator=g).requires_grad_(),
            torch.randn(5, dtype=torch.float64, generator=g).requires_grad_()]


def _complex_run(make_opt) -> list[torch.Tensor]:
    params = _complex_params()
    target = torch.linspace(-1, 1, 12, dtype=torch.float64).view(4, 3) * (1 + 0.5j)
    opt = make_opt(params)
    for _ in range(30):
        opt.zero_grad()
        loss = (params[0] - target).abs().pow(2).sum() + (params[1] ** 2).sum()
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("make", [
    (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1),
     lambda p: descend.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1)),
    (lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.1, amsgrad=True),
     lambda p: descend.Adam(p, lr=0.05, weight_decay=0.1, amsgrad=True)),
    (lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
     lambda p: descend.AdamW(p, lr=0.05, weight_decay=0.1)),
], ids=["SGD", "Adam", "AdamW"])
def test_complex_params_match_torch(make) -> None:
    theirs = _complex_run(make[0])
    ours = _complex_run(make[1])
    assert max_abs_diff(ours, theirs) <= 1e-12


SCHEDULERS = {
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5),
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=50),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=50),
}


@pytest.mark.parametrize("sched", list(SCHEDULERS))
@pytest.mark.parametrize("pair", [
    (lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=0.1),
     lambda p: descend.SGD(p, lr=0.01, momentum=0.9, weight_decay=0.1)),
    (lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1),
     lambda p: descend.Adam(p, lr=0.01, weight_decay=0.1)),
    (lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
     lambda p: descend.AdamW(p, lr=0.01, weight_decay=0.1)),
], ids=["SGD", "Adam", "AdamW"])
def test_lr_schedulers_match_torch(sched: str, pair: tuple) -> None:
    """OneCycleLR also cycles SGD's momentum and Adam's beta1: both must be read each step."""
    theirs, t_opt = train(pair[0], scheduler=SCHEDULERS[sched])
    ours, o_opt = train(pair[1], scheduler=SCHEDULERS[sched])
    assert_same_run(ours, theirs, torch.float64)
    assert o_opt.param_groups[0]["lr"] == t_opt.param_groups[0]["lr"]


@pytest.mark.parametrize("impl", ["single", "fused"])
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_tensor_lr_matches_torch(impl: str, name: str) -> None:
    """A 1-element tensor lr (float32 here, as ``torch.tensor(0.02)``). torch's own paths
    differ with a tensor lr (its for-loop Adam computes the step size in the tensor's
    float32), so each implementation is compared with torch's same one; descend's default
    is the fused path."""
    extra = {"momentum": 0.9} if name == "SGD" else {"weight_decay": 0.1}
    flags = {"foreach": False} if impl == "single" else {"fused": True}
    sched = SCHEDULERS["cosine"]
    theirs, _ = train(lambda p: getattr(torch.optim, name)(p, lr=torch.tensor(0.02), **extra, **flags), scheduler=sched)
    ours, _ = train(lambda p: getattr(descend, name)(p, lr=torch.tensor(0.02), **extra, **flags), scheduler=sched)
    assert_same_run(ours, theirs, torch.float64)
    if impl == "fused":
        default, _ = train(lambda p: getattr(descend, name)(p, lr=torch.tensor(0.02), **extra), scheduler=sched)
        assert_same_run(default, theirs, torch.float64)


@pytest.mark.parametrize("cls", [descend.SGD, descend.Adam, descend.AdamW])
@pytest.mark.parametrize("decay", ["coupled", "decoupled", "independent", "fixed"])
@pytest.mark.parametrize("l1", [0.0, 0.01])
def test_every_implementation_equals_the_reference(cls: type, decay: str, l1: float) -> None:
    """The per-tensor reference and the fast paths agree in every decay mode, with L1."""
    extra = {"momentum": 0.9, "nesterov": True} if cls is descend.SGD else {"amsgrad": True}
    kw = dict(lr=0.01, weight_decay=0.05, decay=decay, l1=l1, **extra)
    reference, _ = train(lambda p: cls(p, foreach=False, **kw))
    for flags in ({"foreach": True}, {"fused": True}, {}):
        fast, _ = train(lambda p, f=flags: cls(p, **f, **kw))
        assert max_abs_diff(fast, reference) <= 1e-12, flags
    for maximize_flags in ({"foreach": False}, {"fused": True}):
        a, _ = train(lambda p, f=maximize_flags: cls(p, maximize=True, **f, **kw), steps=10)
        b, _ = train(lambda p: cls(p, maximize=True, foreach=True, **kw), steps=10)
        assert max_abs_diff(a, b) <= 1e-12, maximize_flags


def test_untouched_params_are_not_touched() -> None:
    """A parameter whose grad is None is not moved, not decayed, and gets no state."""
    params = make_params()
    lonely = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = descend.AdamW(params + [lonely], lr=0.1, weight_decay=0.5)
    for step in range(3):
        opt.zero_grad()
        loss_fn(params, step).backward()
        opt.step()
    assert torch.equal(lonely.detach(), torch.ones(3, dtype=torch.float64))
    assert lonely not in opt.state
