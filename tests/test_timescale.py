"""descend.timescale: τ = −1/ln(1 − s·λ), its inverse, and the AdamW paper's normalized weight decay."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import descend
from descend.regularization import DECOUPLED_MODES, decay_factor
from descend.timescale import timescale_of_factor

SETTINGS = [  # (weight_decay, lr, base_lr): lr below, at and above lr₀
    (0.05, 1e-3, 1e-3),
    (1e-4, 3e-4, 1e-3),
    (0.01, 2e-3, 1e-3),
]


@pytest.mark.parametrize("decay", DECOUPLED_MODES)
@pytest.mark.parametrize(("wd", "lr", "base_lr"), SETTINGS)
def test_factor_to_the_timescale_is_one_over_e(decay: str, wd: float, lr: float, base_lr: float) -> None:
    tau = descend.timescale(decay, weight_decay=wd, lr=lr, base_lr=base_lr)
    factor = decay_factor(decay, lr, base_lr, wd)
    assert 0 < tau < math.inf
    assert factor**tau == pytest.approx(math.exp(-1), rel=1e-12)


def test_timescale_closed_forms_of_each_mode() -> None:
    lr, lr0, wd = 2e-3, 1e-3, 0.01
    scales = {"decoupled": lr, "independent": lr / lr0, "fixed": 1.0, "corrected": lr**2 / lr0}
    for decay, s in scales.items():
        assert descend.timescale(decay, weight_decay=wd, lr=lr, base_lr=lr0) == pytest.approx(
            -1 / math.log(1 - s * wd), rel=1e-12)
    # first order: τ = 1/(s·λ) − 1/2 + O(s·λ); torch's AdamW at lr 1e-3, λ 0.05: 20,000 − 0.5 steps
    assert descend.timescale("decoupled", weight_decay=0.05, lr=1e-3, base_lr=1e-3) == pytest.approx(
        19999.5, abs=1e-4)


def test_no_decay_coupled_decay_and_lr_zero_have_no_timescale() -> None:
    assert descend.timescale("decoupled", weight_decay=0.0, lr=1e-3, base_lr=1e-3) == math.inf
    assert descend.timescale("coupled", weight_decay=0.1, lr=1e-3, base_lr=1e-3) == math.inf
    for decay in DECOUPLED_MODES:
        assert descend.timescale(decay, weight_decay=0.1, lr=0.0, base_lr=1e-3) == math.inf
    assert timescale_of_factor(1.0) == math.inf
    assert timescale_of_factor(0.0) == 0.0 and timescale_of_factor(-0.5) == 0.0  # zeroed or flipped in one step
    assert timescale_of_factor(math.exp(-1 / 250)) == pytest.approx(250, rel=1e-12)


@pytest.mark.parametrize("decay", DECOUPLED_MODES)
@pytest.mark.parametrize("steps", [1.0, 37.5, 1_000.0, 2e6])
@pytest.mark.parametrize(("lr", "base_lr"), [(1e-3, 1e-3), (3e-4, 1e-3), (2e-3, 1e-3)])
def test_round_trip_between_timescale_and_weight_decay(decay: str, steps: float, lr: float, base_lr: float) -> None:
    wd = descend.weight_decay_for_timescale(steps, decay=decay, lr=lr, base_lr=base_lr)
    assert wd > 0
    assert descend.timescale(decay, weight_decay=wd, lr=lr, base_lr=base_lr) == pytest.approx(steps, rel=1e-9)
    again = descend.weight_decay_for_timescale(descend.timescale(decay, weight_decay=wd, lr=lr, base_lr=base_lr),
                                               decay=decay, lr=lr, base_lr=base_lr)
    assert again == pytest.approx(wd, rel=1e-9)


def test_weight_decay_for_timescale_closed_forms() -> None:
    tau, lr, lr0 = 5_000.0, 2e-3, 1e-3
    shrink = 1 - math.exp(-1 / tau)
    got = {d: descend.weight_decay_for_timescale(tau, decay=d, lr=lr, base_lr=lr0) for d in DECOUPLED_MODES}
    assert got["decoupled"] == pytest.approx(shrink / lr, rel=1e-12)
    assert got["independent"] == pytest.approx(shrink * lr0 / lr, rel=1e-12)
    assert got["fixed"] == pytest.approx(shrink, rel=1e-12)
    assert got["corrected"] == pytest.approx(shrink * lr0 / lr**2, rel=1e-12)  # s = lr²/lr₀
    # base_lr defaults to lr: the λ to build an optimizer with at this lr ("independent": s = 1)
    assert descend.weight_decay_for_timescale(tau, decay="independent", lr=lr) == pytest.approx(shrink, rel=1e-12)
    assert descend.weight_decay_for_timescale(tau, decay="corrected", lr=lr) == pytest.approx(shrink / lr, rel=1e-12)
    assert descend.weight_decay_for_timescale(math.inf, decay="decoupled", lr=lr) == 0.0


def test_wang_aitchison_weight_decay_from_a_timescale_in_epochs() -> None:
    # λ = 1/(lr·τ_epoch·M) to first order: 5 epochs of 1,000 iterations at lr 1e-3 → λ ≈ 0.2
    lr, tau_epoch, iterations_per_epoch = 1e-3, 5, 1_000
    wd = descend.weight_decay_for_timescale(tau_epoch * iterations_per_epoch, decay="decoupled", lr=lr)
    assert wd == pytest.approx(1 / (lr * tau_epoch * iterations_per_epoch), rel=1e-4)
    assert wd == pytest.approx((1 - math.exp(-1 / 5_000)) / lr, rel=1e-12)


def test_torch_adamw_with_the_timescale_weight_decay_shrinks_the_weights_by_e() -> None:
    # zero gradients: AdamW's update is 0, so only decay moves θ; after τ steps θ = θ₀/e
    steps, lr = 200, 1e-2
    wd = descend.weight_decay_for_timescale(steps, decay="decoupled", lr=lr)
    theta = torch.full((3,), 2.0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.AdamW([theta], lr=lr, weight_decay=wd)
    for _ in range(steps):
        theta.grad = torch.zeros_like(theta)
        opt.step()
    torch.testing.assert_close(theta.detach(), torch.full((3,), 2.0 / math.e, dtype=torch.float64),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("decay", ["independent", "corrected"])
def test_descend_sgd_with_the_timescale_weight_decay_shrinks_the_weights_by_e(decay: str) -> None:
    # plain SGD on zero gradients: decay alone; lr held below lr₀ by hand, as a scheduler would
    steps, lr0, lr = 300, 0.1, 0.05
    wd = descend.weight_decay_for_timescale(steps, decay=decay, lr=lr, base_lr=lr0)
    theta = torch.full((4,), 3.0, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # construction at lr₀ may warn; the shrink at lr is what is tested
        opt = descend.SGD([theta], lr=lr0, weight_decay=wd, decay=decay)
    opt.param_groups[0]["lr"] = lr
    for _ in range(steps):
        theta.grad = torch.zeros_like(theta)
        opt.step()
    torch.testing.assert_close(theta.detach(), torch.full((4,), 3.0 / math.e, dtype=torch.float64),
                               rtol=1e-11, atol=0)


def test_normalized_weight_decay_is_the_papers_formula() -> None:
    lam = descend.normalized_weight_decay(0.05, batch_size=128, dataset_size=50_000, epochs=100)
    assert lam == pytest.approx(0.05 * math.sqrt(128 / (50_000 * 100)), rel=1e-15)
    # quadrupling the run (epochs) halves λ; a batch 4× larger doubles it
    assert descend.normalized_weight_decay(0.05, batch_size=128, dataset_size=50_000, epochs=400) == pytest.approx(
        lam / 2, rel=1e-15)
    assert descend.normalized_weight_decay(0.05, batch_size=512, dataset_size=50_000, epochs=100) == pytest.approx(
        lam * 2, rel=1e-15)
    assert descend.normalized_weight_decay(0.0, batch_size=1, dataset_size=1, epochs=0.5) == 0.0


def test_normalized_weight_decay_maps_to_each_mode_as_documented() -> None:
    # the paper's λ is an "independent" λ; torch's (decoupled) λ is λ/lr₀: the same factor at lr₀
    lr0 = 3e-4
    lam = descend.normalized_weight_decay(0.05, batch_size=128, dataset_size=50_000, epochs=100)
    independent = decay_factor("independent", lr0, lr0, lam)
    assert decay_factor("decoupled", lr0, lr0, lam / lr0) == pytest.approx(independent, rel=1e-15)
    assert decay_factor("corrected", lr0, lr0, lam / lr0) == pytest.approx(independent, rel=1e-15)
    assert decay_factor("fixed", lr0, lr0, lam) == pytest.approx(independent, rel=1e-15)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: descend.weight_decay_for_timescale(100, decay="coupled", lr=1e-3), r"Invalid decay: 'coupled'"),
    (lambda: descend.weight_decay_for_timescale(100, decay="l2", lr=1e-3), r"Invalid decay: 'l2'"),
    (lambda: descend.weight_decay_for_timescale(0, decay="decoupled", lr=1e-3), r"Invalid steps: 0 "),
    (lambda: descend.weight_decay_for_timescale(-5, decay="decoupled", lr=1e-3), r"Invalid steps: -5 "),
    (lambda: descend.weight_decay_for_timescale(math.nan, decay="decoupled", lr=1e-3), r"Invalid steps: nan"),
    (lambda: descend.weight_decay_for_timescale("100", decay="decoupled", lr=1e-3), r"Invalid steps: '100'"),
    (lambda: descend.weight_decay_for_timescale(100, decay="decoupled", lr=0.0), r"Invalid learning rate: 0.0 "),
    (lambda: descend.weight_decay_for_timescale(100, decay="independent", lr=1e-3, base_lr=0.0),
     r"Invalid base_lr: 0.0 "),
    (lambda: descend.weight_decay_for_timescale(1e-3, decay="fixed", lr=1e-3), r"Invalid steps: 0.001 "),
    (lambda: descend.timescale("decoupled", weight_decay=-0.1, lr=1e-3, base_lr=1e-3), r"Invalid weight_decay value: -0.1"),
    (lambda: descend.timescale("adamw", weight_decay=0.1, lr=1e-3, base_lr=1e-3), r"Invalid decay: 'adamw'"),
    (lambda: descend.timescale("decoupled", weight_decay=0.1, lr=-1.0, base_lr=1e-3), r"Invalid learning rate: -1.0"),
    (lambda: descend.normalized_weight_decay(-1.0, batch_size=1, dataset_size=1, epochs=1), r"Invalid lambda_norm"),
    (lambda: descend.normalized_weight_decay(0.05, batch_size=0, dataset_size=1, epochs=1), r"Invalid batch_size: 0"),
    (lambda: descend.normalized_weight_decay(0.05, batch_size=True, dataset_size=1, epochs=1),
     r"Invalid batch_size: True"),
    (lambda: descend.normalized_weight_decay(0.05, batch_size=8, dataset_size=10.0, epochs=1),
     r"Invalid dataset_size: 10.0"),
    (lambda: descend.normalized_weight_decay(0.05, batch_size=8, dataset_size=10, epochs=0), r"Invalid epochs: 0 "),
])
def test_bad_input_is_a_value_error_in_descends_format(call, message: str) -> None:
    with pytest.raises(ValueError, match=message + r".*\((\w+; )?allowed: "):
        call()
