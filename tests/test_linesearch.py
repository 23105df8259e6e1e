"""The strong Wolfe line search: against torch's own, the Moré–Thuente test functions, and
non-finite values."""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim.lbfgs import _cubic_interpolate, _strong_wolfe

from descend.solvers.linesearch import cubic_minimizer, strong_wolfe


def line(phi_and_slope):
    """phi(t) for strong_wolfe along the 1-D direction d = [1] (values as float64 tensors)."""

    def phi(t):
        value, slope = phi_and_slope(float(t))
        return value, [torch.tensor([slope], dtype=torch.float64)]

    return phi


def run(phi_and_slope, t0, *, c1=1e-4, c2=0.9, max_ls=25):
    f0, g0 = phi_and_slope(0.0)
    d = [torch.ones(1, dtype=torch.float64)]
    g = [torch.tensor([g0], dtype=torch.float64)]
    gtd = torch.tensor(g0, dtype=torch.float64)
    return strong_wolfe(line(phi_and_slope), t0, d, f0, g, gtd, c1=c1, c2=c2, max_ls=max_ls), f0, g0


def assert_strong_wolfe(phi_and_slope, t, c1, c2):
    f0, g0 = phi_and_slope(0.0)
    ft, gt = phi_and_slope(float(t))
    assert ft <= f0 + c1 * float(t) * g0
    assert abs(gt) <= c2 * abs(g0)


# --- Moré & Thuente (1994), "Line search algorithms with guaranteed sufficient decrease", §5 ---


def mt1(t, beta=2.0):  # minimizer √2
    return -t / (t * t + beta), (t * t - beta) / (t * t + beta) ** 2


def mt2(t, beta=0.004):  # minimizer 1.6 − β
    return (t + beta) ** 5 - 2 * (t + beta) ** 4, 5 * (t + beta) ** 4 - 8 * (t + beta) ** 3


@pytest.mark.parametrize("fn,c1,c2,t0", [(mt1, 1e-3, 0.1, t0) for t0 in (1e-3, 1e-1, 1.0, 10.0)]
                         + [(mt2, 0.1, 0.1, t0) for t0 in (1e-3, 1e-1, 1.0, 10.0, 1e3)])
def test_more_thuente_functions_end_at_a_strong_wolfe_point(fn, c1, c2, t0):
    result, _, _ = run(fn, t0, c1=c1, c2=c2)
    assert_strong_wolfe(fn, result.t, c1, c2)
    assert result.evaluations <= 14
    assert result.nonfinite == 0


def test_far_start_on_more_thuente_1_runs_out_of_budget_as_torch_does():
    """A known weakness of torch's zoom, kept for parity: from t0 = 1000 on φ = −t/(t² + 2)
    the bracket [0, 1000] shrinks about 10% per evaluation, so 25 evaluations end on a lower
    point (φ < φ(0)) that lacks sufficient decrease. Moré–Thuente's search needs a handful."""
    result, f0, g0 = run(mt1, 1e3, c1=1e-3, c2=0.1)
    d, g = torch.ones(1, dtype=torch.float64), torch.tensor([g0], dtype=torch.float64)
    f_t, _, t_t, n_t = _strong_wolfe(lambda x, t, d_: (lambda r: (r[0], torch.tensor([r[1]], dtype=torch.float64)))(mt1(float(t))),
                                     torch.zeros(1), 1e3, d, f0, g, torch.tensor(g0, dtype=torch.float64),
                                     c1=1e-3, c2=0.1)
    assert (float(result.t), result.evaluations) == (float(t_t), n_t) == (pytest.approx(333.335, rel=1e-6), 26)
    assert result.value < f0


@pytest.mark.parametrize("seed", range(20))
def test_matches_torch_strong_wolfe_on_random_problems(seed):
    """descend's search is torch's: same step, value, gradient and evaluation count, bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    n = 5
    a = torch.randn(n, n, generator=gen)
    a = a @ a.T + 0.1 * torch.eye(n)
    b = torch.randn(n, generator=gen)
    x = torch.randn(n, generator=gen)

    def f_and_g(z):
        return float(0.5 * z @ a @ z - b @ z + 0.1 * (z**4).sum()), a @ z - b + 0.4 * z**3

    f, g = f_and_g(x)
    d = -g * (0.1 + torch.rand(n, generator=gen))
    gtd = g.dot(d)
    t0 = float(torch.rand((), generator=gen) * 10)

    f_t, g_t, t_t, n_t = _strong_wolfe(lambda x_, t_, d_: f_and_g(x_ + t_ * d_), x, t0, d, f, g, gtd, max_ls=25)

    def phi(t_):
        value, grad = f_and_g(x + t_ * d)
        return value, [grad]

    ours = strong_wolfe(phi, t0, [d], f, [g], gtd, max_ls=25)
    assert float(ours.t) == float(t_t)
    assert ours.value == f_t
    assert torch.equal(ours.grad[0], g_t)
    assert ours.evaluations == n_t


def test_cubic_minimizer_is_exact_on_cubics_and_matches_torch():
    # φ(t) = t³ − 3t has its local minimizer at t = 1
    def fg(t):
        return t**3 - 3 * t, 3 * t**2 - 3

    x1, x2 = 0.2, 3.0
    (f1, g1), (f2, g2) = fg(x1), fg(x2)
    t = cubic_minimizer(x1, f1, torch.tensor(g1, dtype=torch.float64), x2, f2, torch.tensor(g2, dtype=torch.float64))
    assert float(t) == pytest.approx(1.0, abs=1e-12)
    args = (0.0, 1.0, torch.tensor(-2.0), 2.0, 3.0, torch.tensor(5.0))
    assert float(cubic_minimizer(*args)) == float(_cubic_interpolate(*args))
    assert float(cubic_minimizer(*args, bounds=(0.5, 0.7))) == float(_cubic_interpolate(*args, bounds=(0.5, 0.7)))


def test_cubic_minimizer_bisects_on_non_finite_values_and_overflow():
    assert cubic_minimizer(0.0, 1.0, -1.0, 2.0, math.inf, math.nan) == 1.0
    huge = torch.tensor(1e300, dtype=torch.float64)
    # finite inputs whose intermediate terms overflow (torch returns NaN here)
    t = cubic_minimizer(0.0, 1.0, -huge, 1.0, 1e308, huge)
    assert t == 0.5


def test_non_finite_trial_points_make_the_search_step_back():
    """f = t − log(1.5 − t)... is NaN beyond t = 1.5; the first trial t = 4 lands there."""

    def fn(t):
        if t >= 1.5:
            return math.nan, math.nan
        return (t - 1) ** 2, 2 * (t - 1)

    result, f0, g0 = run(fn, 4.0, c2=0.9)
    assert result.nonfinite >= 1
    assert 0 < float(result.t) < 1.5
    assert_strong_wolfe(fn, result.t, 1e-4, 0.9)


def test_inf_in_zoom_is_bisected_not_interpolated():
    # finite up to 0.9, inf after; minimizer at 0.85 so the bracket is [·, inf region]
    def fn(t):
        if t > 0.9:
            return math.inf, math.inf
        return (t - 0.85) ** 2, 2 * (t - 0.85)

    result, _, _ = run(fn, 0.5, c2=0.01)
    assert math.isfinite(result.value)
    assert_strong_wolfe(fn, result.t, 1e-4, 0.01)


def test_no_finite_point_returns_the_start():
    def fn(t):
        return (1.0, -1.0) if t == 0 else (math.nan, math.nan)

    result, f0, _ = run(fn, 1.0, max_ls=10)
    assert float(result.t) == 0
    assert result.value == f0
    assert result.nonfinite == 11  # every trial: the first one and max_ls more
    assert result.evaluations == 11
