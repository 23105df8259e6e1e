"""Each decay mode against its closed form (DESIGN.md's table), on a zero gradient so that
only regularization moves θ, and lr₀ under schedulers (OneCycleLR rewrites initial_lr)."""

from __future__ import annotations

import pytest
import torch

import descend
from descend import regularization

THETA = [0.5, -0.3, 0.02, -0.001, 0.0]


def _one_step(cls: type, *, lr: float, base_lr: float | None = None, grad: float = 0.0, **kw) -> torch.Tensor:
    p = torch.tensor(THETA, dtype=torch.float64, requires_grad=True)
    opt = cls([p], lr=base_lr if base_lr is not None else lr, **kw)
    opt.param_groups[0]["lr"] = lr  # as a scheduler would
    p.grad = torch.full_like(p, grad)
    opt.step()
    return p.detach()


@pytest.mark.parametrize("impl", [{"foreach": False}, {"foreach": True}, {"fused": True}])
@pytest.mark.parametrize("cls", [descend.SGD, descend.Adam])
def test_decoupled_modes_closed_form(cls: type, impl: dict) -> None:
    theta = torch.tensor(THETA, dtype=torch.float64)
    lam, lr, lr0 = 0.2, 0.05, 0.1
    expected = {
        "decoupled": theta * (1 - lr * lam),
        "independent": theta * (1 - (lr / lr0) * lam),
        "fixed": theta * (1 - lam),
    }
    for decay, want in expected.items():
        got = _one_step(cls, lr=lr, base_lr=lr0, weight_decay=lam, decay=decay, **impl)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-15)


@pytest.mark.parametrize("impl", [{"foreach": False}, {"foreach": True}, {"fused": True}])
def test_coupled_closed_form_sgd(impl: dict) -> None:
    """Coupled: one SGD step on g = 1 with λ and λ₁: θ − lr(1 + λθ + λ₁ sgn θ)."""
    theta = torch.tensor(THETA, dtype=torch.float64)
    lam, l1, lr = 0.2, 0.01, 0.05
    got = _one_step(descend.SGD, lr=lr, grad=1.0, weight_decay=lam, l1=l1, **impl)
    torch.testing.assert_close(got, theta - lr * (1 + lam * theta + l1 * torch.sign(theta)), rtol=0, atol=1e-15)


@pytest.mark.parametrize("impl", [{"foreach": False}, {"foreach": True}, {"fused": True}])
@pytest.mark.parametrize("decay, scale", [("decoupled", 0.05), ("independent", 0.5), ("fixed", 1.0)])
def test_l1_prox_closed_form(decay: str, scale: float, impl: dict) -> None:
    """Soft-threshold with t = s·λ₁: sgn(θ)·max(|θ| − t, 0); small weights become exactly 0."""
    l1 = 0.04
    got = _one_step(descend.SGD, lr=0.05, base_lr=0.1, l1=l1, decay=decay, **impl)
    theta = torch.tensor(THETA, dtype=torch.float64)
    t = scale * l1
    want = torch.sign(theta) * (theta.abs() - t).clamp(min=0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    assert int((got == 0).sum()) == int((theta.abs() <= t).sum())


def test_prox_complex_keeps_phase() -> None:
    z = torch.tensor([3 + 4j, 0.1 + 0.1j], dtype=torch.complex128)
    regularization.prox_l1_(z, 1.0)
    torch.testing.assert_close(z, torch.tensor([2.4 + 3.2j, 0], dtype=torch.complex128))


def test_independent_decay_under_onecycle_peaks_at_max_lr_over_lr0() -> None:
    """OneCycleLR rewrites initial_lr to max_lr/div_factor; lr₀ must stay the constructor's lr."""
    lam, lr0, max_lr = 0.01, 0.01, 0.1
    p = torch.ones(4, dtype=torch.float64, requires_grad=True)
    opt = descend.SGD([p], lr=lr0, weight_decay=lam, decay="independent")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=20, pct_start=0.5,
                                                anneal_strategy="linear", cycle_momentum=False)
    assert opt.param_groups[0]["initial_lr"] != lr0  # torch rewrote it
    factors = []
    for _ in range(20):
        before = p.detach().clone()
        lr = opt.param_groups[0]["lr"]
        p.grad = torch.zeros_like(p)
        opt.step()
        factors.append((p.detach() / before)[0].item())
        assert factors[-1] == pytest.approx(1 - lam * lr / lr0, abs=1e-15)
        sched.step()
    assert min(factors) == pytest.approx(1 - lam * max_lr / lr0, abs=1e-12)
    assert opt.param_groups[0]["base_lr"] == lr0


def test_base_lr_is_the_lr_given_to_the_optimizer() -> None:
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = descend.AdamW([{"params": [a], "lr": 0.3}], lr=0.1)
    opt.add_param_group({"params": [b]})
    assert [g["base_lr"] for g in opt.param_groups] == [0.3, 0.1]
    t = descend.SGD([torch.zeros(1, requires_grad=True)], lr=torch.tensor(0.5))
    assert t.param_groups[0]["base_lr"] == 0.5 and isinstance(t.param_groups[0]["base_lr"], float)


def test_a_step_at_zero_lr_is_no_step_in_every_mode() -> None:
    """"fixed" does not scale with lr, except that lr = 0 means no step (torch's distributed
    checkpoint creates state by stepping at lr = 0 on zero gradients)."""
    for decay in ("coupled", "decoupled", "independent", "fixed"):
        for impl in ({"foreach": False}, {"foreach": True}, {"fused": True}):
            got = _one_step(descend.AdamW, lr=0.0, base_lr=0.1, weight_decay=0.1, l1=0.01, decay=decay, **impl)
            assert torch.equal(got, torch.tensor(THETA, dtype=torch.float64)), (decay, impl)


def test_describe_and_factor() -> None:
    assert regularization.decay_factor("coupled", 0.1, 0.1, 0.5) == 1.0
    assert regularization.decay_factor("decoupled", 0.1, 0.2, 0.5) == pytest.approx(0.95)
    assert regularization.decay_factor("independent", 0.1, 0.2, 0.5) == pytest.approx(0.75)
    assert regularization.decay_factor("fixed", 0.1, 0.2, 0.5) == pytest.approx(0.5)
    assert regularization.describe({"decay": "coupled", "weight_decay": 0.1, "l1": 0}) == "g += 0.1·θ"
    assert regularization.describe({"decay": "fixed", "weight_decay": 0, "l1": 0}) == "none"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_prox_l1_is_the_soft_threshold_elementwise(dtype: torch.dtype) -> None:
    """Both prox forms equal sgn(θ)·max(|θ| − t, 0) computed in float64 and rounded once to
    θ's dtype, t being held in the working precision (float32 for the 16-bit types), with
    NaN and ±inf passed through and every |θ| <= t an exact zero."""
    t = torch.tensor(0.3, dtype=torch.float64 if dtype == torch.float64 else torch.float32).item()
    values = torch.tensor([0.0, -0.0, 0.3, -0.3, 0.29, -0.31, 1.0, -2.5, 1e-8, float("inf"), -float("inf")])
    theta = torch.cat([values, torch.randn(1000, generator=torch.Generator().manual_seed(0))]).to(dtype)
    exact = theta.double()
    expected = (torch.sgn(exact) * (exact.abs() - t).clamp(min=0)).to(dtype)
    one = theta.clone()
    regularization.prox_l1_(one, t)
    parts = list(theta.clone().split([11, 500, 500]))
    regularization.prox_l1_foreach_(parts, t)
    multi = list(theta.clone().split([11, 500, 500]))  # (the form for many small tensors off the CPU)
    regularization.prox_l1_multi_tensor_(multi, t)
    torch.testing.assert_close(one, expected, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(parts), expected, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(multi), expected, rtol=0, atol=0)  # (16-bit: per tensor there)
    assert (one[theta.double().abs() <= t] == 0).all()
    nan = torch.tensor([float("nan")], dtype=dtype)
    regularization.prox_l1_(nan, t)
    assert nan.isnan().all()
