"""The claims of the tutorials in shared/seeds/ and of DESIGN.md, as tests.

Oracles: autograd on an explicit loss term (the tutorials' own formulation), torch.optim,
and the AdamW paper's Algorithm 2 written out by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

import descend
from tests.helpers import make_params, max_abs_diff, train

LAM = 0.1


@pytest.mark.parametrize("kw", [
    {},
    {"momentum": 0.9},
    {"momentum": 0.9, "nesterov": True},
    {"momentum": 0.9, "dampening": 0.4},
], ids=["plain", "momentum", "nesterov", "dampening"])
def test_sgd_weight_decay_equals_l2_term_in_loss(kw: dict) -> None:
    """SGD(weight_decay=λ) == SGD on loss + λ/2·Σθ² (so the tutorials' λ·Σθ² is weight_decay=2λ)."""
    decayed, _ = train(lambda p: descend.SGD(p, lr=0.05, weight_decay=LAM, **kw), all_grads=True)
    in_loss, _ = train(lambda p: descend.SGD(p, lr=0.05, **kw),
                       all_grads=True, extra_loss=lambda p: LAM / 2 * descend.l2_penalty(p))
    assert max_abs_diff(decayed, in_loss) <= 1e-10
    torch_decayed, _ = train(lambda p: torch.optim.SGD(p, lr=0.05, weight_decay=LAM, **kw), all_grads=True)
    assert max_abs_diff(decayed, torch_decayed) <= 1e-12
    tutorial, _ = train(lambda p: descend.SGD(p, lr=0.05, **kw),
                        all_grads=True, extra_loss=lambda p: (LAM / 2) * sum(q.pow(2.0).sum() for q in p))
    assert max_abs_diff(tutorial, in_loss) <= 1e-10


def test_sgd_without_momentum_coupled_equals_decoupled() -> None:
    coupled, _ = train(lambda p: descend.SGD(p, lr=0.05, weight_decay=LAM))
    decoupled, _ = train(lambda p: descend.SGD(p, lr=0.05, weight_decay=LAM, decay="decoupled"))
    assert max_abs_diff(coupled, decoupled) <= 1e-12


def test_sgd_with_momentum_decoupled_differs_from_coupled() -> None:
    coupled, _ = train(lambda p: descend.SGD(p, lr=0.05, momentum=0.9, weight_decay=LAM))
    decoupled, _ = train(lambda p: descend.SGD(p, lr=0.05, momentum=0.9, weight_decay=LAM, decay="decoupled"))
    assert max_abs_diff(coupled, decoupled) > 1e-3


def test_adam_coupled_equals_adam_on_l2_loss() -> None:
    decayed, _ = train(lambda p: descend.Adam(p, lr=0.01, weight_decay=LAM), all_grads=True)
    in_loss, _ = train(lambda p: descend.Adam(p, lr=0.01), all_grads=True, extra_loss=lambda p: LAM / 2 * descend.l2_penalty(p))
    assert max_abs_diff(decayed, in_loss) <= 1e-10


def test_adamw_differs_from_adam_with_l2() -> None:
    adamw, _ = train(lambda p: descend.AdamW(p, lr=0.01, weight_decay=LAM))
    adam_l2, _ = train(lambda p: descend.Adam(p, lr=0.01, weight_decay=LAM))
    assert max_abs_diff(adamw, adam_l2) > 1e-3


def _paper_algorithm_2(params: list[torch.Tensor], grads_of, *, alpha: float, lam: float, steps: int,
                       eta, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> list[torch.Tensor]:
    """Loshchilov & Hutter, Algorithm 2 (AdamW), line by line:
    m_t = β1 m + (1−β1) g;  v_t = β2 v + (1−β2) g²;  m̂ = m/(1−β1^t);  v̂ = v/(1−β2^t);
    θ_t = θ_{t−1} − η_t (α m̂ / (√v̂ + ε) + λ θ_{t−1})."""
    theta = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in theta]
    v = [torch.zeros_like(p) for p in theta]
    counts = [0] * len(theta)  # t counts the steps a parameter took part in
    for step in range(steps):
        grads = grads_of(theta, step)
        for i, g in enumerate(grads):
            if g is None:
                continue  # this parameter took no part in this step (as in torch, it is not decayed)
            counts[i] += 1
            t = counts[i]
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            m_hat = m[i] / (1 - beta1**t)
            v_hat = v[i] / (1 - beta2**t)
            theta[i] = theta[i] - eta(step) * (alpha * m_hat / (v_hat.sqrt() + eps) + lam * theta[i])
    return theta


def test_paper_adamw_equals_independent_decay_under_lambdalr() -> None:
    """The paper's η_t·λ (a cosine schedule multiplier) is decay="independent" with the
    paper's λ, and torch's AdamW with weight_decay = λ/α."""
    from tests.helpers import loss_fn

    steps, alpha, lam = 40, 0.01, 0.05

    def eta(t: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * t / steps))

    def grads_of(theta: list[torch.Tensor], step: int) -> list[torch.Tensor | None]:
        leaves = [x.detach().requires_grad_() for x in theta]
        loss_fn(leaves, step).backward()
        return [x.grad for x in leaves]

    paper = _paper_algorithm_2(make_params(), grads_of, alpha=alpha, lam=lam, steps=steps, eta=eta)
    sched = lambda o: torch.optim.lr_scheduler.LambdaLR(o, eta)  # noqa: E731
    ours, _ = train(lambda p: descend.AdamW(p, lr=alpha, weight_decay=lam, decay="independent"),
                    steps=steps, scheduler=sched)
    assert max_abs_diff(ours, paper) <= 1e-12
    theirs, _ = train(lambda p: torch.optim.AdamW(p, lr=alpha, weight_decay=lam / alpha), steps=steps, scheduler=sched)
    assert max_abs_diff(ours, theirs) <= 1e-12
    # and a decoupled λ that does not follow lr₀ is a different run
    decoupled, _ = train(lambda p: descend.AdamW(p, lr=alpha, weight_decay=lam), steps=steps, scheduler=sched)
    assert max_abs_diff(decoupled, paper) > 1e-4


@pytest.mark.parametrize("cls, kw", [(descend.SGD, {"momentum": 0.9}), (descend.Adam, {})], ids=["SGD", "Adam"])
def test_coupled_l1_equals_l1_term_in_loss(cls: type, kw: dict) -> None:
    ours, _ = train(lambda p: cls(p, lr=0.01, l1=0.02, **kw), all_grads=True)
    in_loss, _ = train(lambda p: cls(p, lr=0.01, **kw), all_grads=True, extra_loss=lambda p: 0.02 * descend.l1_penalty(p))
    assert max_abs_diff(ours, in_loss) <= 1e-10


@pytest.mark.parametrize("decay", ["decoupled", "independent", "fixed"])
@pytest.mark.parametrize("cls", [descend.SGD, descend.AdamW])
def test_decoupled_l1_produces_exact_zeros(cls: type, decay: str) -> None:
    l1 = 0.05 if decay == "fixed" else 2.0
    params, _ = train(lambda p: cls(p, lr=0.01, weight_decay=0.0, l1=l1, decay=decay), steps=60)
    zeros = sum(int((p == 0).sum()) for p in params)
    coupled, _ = train(lambda p: cls(p, lr=0.01, weight_decay=0.0, l1=l1, decay="coupled"), steps=60)
    assert zeros >= 10  # of 73 weights; coupled L1 (a subgradient) oscillates around 0 instead
    assert sum(int((p == 0).sum()) for p in coupled) == 0


def test_penalties_closed_form() -> None:
    a = torch.tensor([3.0, -4.0])
    b = torch.tensor([[1.0, -2.0]])
    assert descend.l2_penalty([a, b]).item() == 9 + 16 + 1 + 4
    assert descend.l1_penalty([a, b]).item() == 3 + 4 + 1 + 2
    z = torch.tensor([3 + 4j])
    assert descend.l2_penalty([z]).item() == pytest.approx(25.0)
    assert descend.l1_penalty([z]).item() == pytest.approx(5.0)
    model = torch.nn.Linear(2, 1)
    expected = sum(p.pow(2).sum() for p in model.parameters())
    assert descend.l2_penalty(model).item() == pytest.approx(expected.item())
