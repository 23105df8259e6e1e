"""descend.ConjugateGradient against linear CG (scipy), textbook formulas and known minima."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import cg as scipy_linear_cg
from torch import nn

import descend
from descend.solvers.cg import BETAS, CGRule, cg_beta
from tests.problems import TEST_PROBLEMS, by_name, quadratic


def solve(problem_f, x0, **kw):
    """ConjugateGradient on f from x0 in one step; returns (x, optimizer)."""
    x = nn.Parameter(x0.clone())
    opt = descend.CG([x], **kw)

    def closure():
        opt.zero_grad()
        loss = problem_f(x)
        loss.backward()
        return loss

    opt.step(closure)
    return x.detach(), opt


# --- quadratics: nonlinear CG with exact line searches is linear CG -----------------------------


@pytest.mark.parametrize("beta", BETAS)
def test_on_a_quadratic_every_rule_follows_linear_cg_and_ends_within_n_iterations(beta):
    n = 30
    f, a, x_star = quadratic(n, condition=10.0, seed=3)
    b = a @ x_star
    reference = []
    scipy_linear_cg(a, b, x0=np.zeros(n), rtol=1e-14, maxiter=n, callback=lambda xk: reference.append(xk.copy()))

    x = nn.Parameter(torch.zeros(n, dtype=torch.float64))
    # c2 = 1e-3: an exact-enough line search (on a quadratic the cubic interpolant is exact).
    # ‖g‖∞ ≤ 1e-7 is about the limit of a search on function values here: f ≈ −8 resolves
    # decreases of 1e-15, and a step at ‖g‖ = 1e-8 decreases f by about 1e-16.
    opt = descend.CG([x], beta=beta, c2=1e-3, max_iter=1, max_eval=50, tolerance_grad=1e-7, tolerance_change=0)

    def closure():
        opt.zero_grad()
        loss = f(x)
        loss.backward()
        return loss

    iterates = []
    for _ in range(2 * n):
        opt.step(closure)  # one iteration per call: the next call continues with d and the last gradient
        iterates.append(x.detach().numpy().copy())
        if opt.last_stop == "tolerance_grad":
            break
    for k in range(10):  # the iterates are linear CG's (to rounding, which grows with k)
        np.testing.assert_allclose(iterates[k], reference[k], rtol=0, atol=1e-10 * np.abs(reference[k]).max())
    assert np.abs(a @ x.detach().numpy() - b).max() <= 1e-7
    np.testing.assert_allclose(x.detach().numpy(), x_star, atol=1e-7)
    assert opt.state[x]["n_iter"] <= n  # within n iterations, as linear CG
    assert opt.state[x]["restarts"] == 0  # gradients stay orthogonal: Powell's test never fires


def test_one_long_call_equals_many_short_ones():
    """The step contract: a later call continues from the saved direction and gradient."""
    problem = by_name("rosenbrock")
    kw = dict(max_eval=10_000, tolerance_grad=0, tolerance_change=0)
    x_long, _ = solve(problem, problem.start(), max_iter=12, **kw)
    x = nn.Parameter(problem.start())
    opt = descend.CG([x], max_iter=3, **kw)

    def closure():
        opt.zero_grad()
        loss = problem(x)
        loss.backward()
        return loss

    first = closure().item()
    losses = [opt.step(closure).item() for _ in range(4)]
    assert losses[0] == first  # step returns the loss of its first evaluation
    assert torch.equal(x.detach(), x_long)


# --- the β formulas and restarts -------------------------------------------------------------------


def _numpy_beta(rule, g, gp, d):
    y = g - gp
    if rule == "FR":
        return g @ g / (gp @ gp)
    if rule == "PR":
        return g @ y / (gp @ gp)
    if rule == "PR+":
        return max(g @ y / (gp @ gp), 0.0)
    if rule == "HS":
        return g @ y / (d @ y)
    if rule == "DY":
        return g @ g / (d @ y)
    beta_n = (y - 2 * d * (y @ y) / (d @ y)) @ g / (d @ y)  # Hager & Zhang 2005
    eta = -1 / (np.linalg.norm(d) * min(0.01, np.linalg.norm(gp)))  # Hager & Zhang 2006 (CG_DESCENT)
    return max(beta_n, eta)


@pytest.mark.parametrize("rule", BETAS)
def test_beta_formulas_match_the_textbook(rule):
    rng = np.random.RandomState(0)
    for _ in range(20):
        g, gp, d = rng.randn(7), rng.randn(7), rng.randn(7) * rng.choice([1e-3, 1.0, 1e3])
        if d @ (g - gp) <= 0:
            d = -d
        expected = _numpy_beta(rule, g, gp, d)
        got = cg_beta(rule, [torch.tensor(g)], [torch.tensor(gp)], [torch.tensor(d)])
        assert float(got) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_beta_is_none_where_its_denominator_vanishes():
    g, zero = [torch.tensor([1.0, 2.0])], [torch.zeros(2)]
    assert cg_beta("FR", g, zero, g) is None
    assert cg_beta("HS", g, g, g) is None  # y = 0


def test_a_direction_that_is_not_descent_is_replaced_by_steepest_descent():
    rule = CGRule("PR", restart=None, restart_every=None, tolerance_change=1e-9)
    g, g_prev, d_prev = [torch.tensor([1.0, 0.0])], [torch.tensor([-1.0, 0.0])], [torch.tensor([1.0, 0.0])]
    state = {"prev_flat_grad": g_prev, "d": d_prev, "since_restart": 3}
    # β^PR = gᵀ(g − g_prev)/‖g_prev‖² = 2, so −g + 2·d_prev = (1, 0): uphill
    d = rule.direction(state, g, first=False)
    assert torch.equal(d[0], -g[0])
    assert state["restarts"] == 1 and state["since_restart"] == 0


def test_powell_restarts_fire_only_when_gradients_are_far_from_orthogonal():
    rule = CGRule("FR", restart="powell", restart_every=None, tolerance_change=1e-9)
    d_prev = [torch.tensor([-1.0, -1.0])]
    g_prev = [torch.tensor([1.0, 0.0])]
    # |gᵀg_prev| = 0.5 ≥ 0.2·‖g‖² = 0.2·1.25: restart
    state = {"prev_flat_grad": g_prev, "d": d_prev}
    assert torch.equal(rule.direction(state, [torch.tensor([0.5, 1.0])], first=False)[0], torch.tensor([-0.5, -1.0]))
    assert state["restarts"] == 1
    # |gᵀg_prev| = 0.1 < 0.2·‖g‖² = 0.202: conjugate direction −g + β·d
    state = {"prev_flat_grad": g_prev, "d": d_prev}
    g = torch.tensor([0.1, 1.0])
    d = rule.direction(state, [g], first=False)[0]
    torch.testing.assert_close(d, -g + (g @ g) * d_prev[0])
    assert state.get("restarts", 0) == 0


@pytest.mark.parametrize("every", [1, 4])
def test_restart_every_n_iterations(every):
    problem = by_name("rosenbrock")
    _, opt = solve(problem, problem.start(), restart=None, restart_every=every, max_iter=20, max_eval=500,
                   tolerance_grad=0, tolerance_change=0)
    state = next(iter(opt.state.values()))
    assert state["n_iter"] == 20
    # the first iteration is steepest descent by construction, then one restart every `every`
    assert state["restarts"] >= (20 - 1) // every


# --- known minima ------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", BETAS)
def test_every_rule_solves_rosenbrock(beta):
    problem = by_name("rosenbrock")
    x, opt = solve(problem, problem.start(), beta=beta, max_iter=2000, max_eval=6000, tolerance_grad=1e-9,
                   tolerance_change=1e-15)
    torch.testing.assert_close(x, torch.ones(2, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", TEST_PROBLEMS)
def test_standard_problems_reach_their_minima(name):
    problem = by_name(name)
    x, _ = solve(problem, problem.start(), max_iter=20_000, max_eval=50_000, tolerance_grad=1e-9,
                 tolerance_change=1e-15)
    f = problem(x).item()
    assert f == pytest.approx(problem.f_min, abs=1e-8 * max(1.0, abs(problem.f_min)) + 1e-9)
    if problem.x_min is not None:
        tol = 1e-2 if "powell" in name else 1e-4  # singular minimizers are flat to 4th order
        torch.testing.assert_close(x, torch.tensor(problem.x_min, dtype=torch.float64), atol=tol, rtol=tol)


def test_real_module_in_float32_reaches_least_squares_solution():
    torch.manual_seed(0)
    x = torch.randn(200, 6)
    y = x @ torch.randn(6, 1) + 0.3 + 0.01 * torch.randn(200, 1)
    model = nn.Linear(6, 1)
    opt = descend.CG(model.parameters(), max_iter=200, max_eval=600)

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    design = torch.cat([x, torch.ones(200, 1)], 1).double()
    solution = torch.linalg.lstsq(design, y.double()).solution.squeeze(1)
    torch.testing.assert_close(model.weight.detach().double().squeeze(0), solution[:6], atol=1e-4, rtol=0)
    torch.testing.assert_close(model.bias.detach().double(), solution[6:], atol=1e-4, rtol=0)


def test_groups_with_weight_decay_equal_an_explicit_penalty():
    torch.manual_seed(0)
    x, y = torch.randn(50, 4, dtype=torch.float64), torch.randn(50, 1, dtype=torch.float64)
    lam = 0.5
    plain = nn.Linear(4, 1).double()
    grouped = copy.deepcopy(plain)
    opt_p = descend.CG(plain.parameters(), max_iter=30, max_eval=200)
    opt_g = descend.CG([{"params": [grouped.weight], "weight_decay": lam}, {"params": [grouped.bias]}],
                       max_iter=30, max_eval=200)

    def closure_for(model, opt, penalty):
        def closure():
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean() + (lam / 2 * (model.weight**2).sum() if penalty else 0)
            loss.backward()
            return loss

        return closure

    opt_p.step(closure_for(plain, opt_p, True))
    opt_g.step(closure_for(grouped, opt_g, False))
    for p, q in zip(plain.parameters(), grouped.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)
    # and both are the ridge solution: (2/m·XᵀX + λ·diag(1, …, 1, 0))·w = 2/m·Xᵀy (no decay on the bias)
    design = torch.cat([x, torch.ones(50, 1, dtype=torch.float64)], 1)
    mask = torch.diag(torch.tensor([1.0] * 4 + [0.0], dtype=torch.float64))
    ridge = torch.linalg.solve(2 / 50 * design.T @ design + lam * mask, 2 / 50 * design.T @ y).squeeze(1)
    torch.testing.assert_close(grouped.weight.detach().squeeze(0), ridge[:4], atol=1e-6, rtol=0)


def test_maximize():
    target = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    x, _ = solve(lambda z: -((z - target) ** 2).sum(), torch.zeros(3, dtype=torch.float64), maximize=True)
    torch.testing.assert_close(x, target)


def test_non_finite_values_are_stepped_back_from():
    # f = Σ x − log x, NaN for x < 0; a first step of lr = 50 lands there
    x, _ = solve(lambda z: (z - torch.log(z)).sum(), torch.tensor([5.0, 0.2], dtype=torch.float64), lr=50,
                 max_iter=100)
    torch.testing.assert_close(x, torch.ones(2, dtype=torch.float64), atol=1e-6, rtol=0)


# --- validation, state, exceptions -------------------------------------------------------------


@pytest.mark.parametrize("kw,match", [
    (dict(beta="CD"), "beta"),
    (dict(restart="always"), "restart"),
    (dict(restart_every=0), "restart_every"),
    (dict(c2=1.0), "c2"),
    (dict(decay="decoupled"), "decay"),
    (dict(l1=1e-3), "l1"),
])
def test_invalid_options_raise_value_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        descend.CG([nn.Parameter(torch.ones(2))], **kw)


def test_defaults():
    assert descend.CG is descend.ConjugateGradient
    opt = descend.CG([nn.Parameter(torch.ones(2))])
    group = opt.param_groups[0]
    assert group["beta"] == "PR+" and group["restart"] == "powell" and group["line_search_fn"] == "strong_wolfe"
    assert group["c2"] < 0.5  # so that Fletcher–Reeves directions are descent directions (N&W Lemma 5.6)
    with pytest.raises(ValueError, match="beta"):
        descend.CG([{"params": [nn.Parameter(torch.ones(1))]}, {"params": [nn.Parameter(torch.ones(1))], "beta": "FR"}])


def _rosenbrock_run(steps, opt_factory, start=None):
    problem = by_name("rosenbrock")
    x = nn.Parameter(problem.start() if start is None else start)
    opt = opt_factory([x])

    def closure():
        opt.zero_grad()
        loss = problem(x)
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(steps)]
    return x, opt, closure, losses


def test_state_dict_round_trip_continues_identically():
    def factory(p):
        return descend.CG(p, beta="HZ", max_iter=4, restart_every=3)

    x_ref, _, _, losses_ref = _rosenbrock_run(5, factory)
    x, opt, _, losses = _rosenbrock_run(2, factory)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    x2, opt2, closure2, _ = _rosenbrock_run(0, factory, start=x.detach().clone())
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    losses += [opt2.step(closure2).item() for _ in range(3)]
    assert losses == losses_ref
    assert torch.equal(x2.detach(), x_ref.detach())


@pytest.mark.parametrize("fail_at", [1, 2, 5])
def test_a_closure_that_raises_leaves_parameters_and_state_as_they_were(fail_at):
    def factory(p):
        return descend.CG(p, max_iter=5)

    x_ref, _, _, losses_ref = _rosenbrock_run(3, factory)
    x, opt, closure, losses = _rosenbrock_run(2, factory)
    calls = {"n": 0}

    def failing():
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise KeyError("boom")
        return closure()

    with pytest.raises(KeyError):
        opt.step(failing)
    losses.append(opt.step(closure).item())
    assert losses == losses_ref
    assert torch.equal(x.detach(), x_ref.detach())


def test_fixed_steps_without_line_search_converge_on_a_quadratic():
    """Without a line search consecutive gradients are not orthogonal, Powell's test restarts
    every iteration, and the method is gradient descent with step lr."""
    f, a, x_star = quadratic(10, condition=5.0, seed=0)
    x, opt = solve(f, torch.zeros(10, dtype=torch.float64), line_search_fn=None, lr=0.1, max_iter=300,
                   tolerance_change=0, tolerance_grad=1e-10)
    np.testing.assert_allclose(x.numpy(), x_star, atol=1e-9)
    state = opt.state[next(iter(opt.state))]
    assert state["restarts"] == state["n_iter"] - 1


# --- groups without parameters ----------------------------------------------------------------

EMPTY_ALLOWED = r"\(allowed: at least one parameter: ConjugateGradient runs one solver over the parameters of all"


@pytest.mark.parametrize("groups, shown", [
    ([], r"\[\]"),
    (iter([]), r"\[\]"),
    ([{"params": []}], r"\[\[\]\]"),
    ([{"params": []}, {"params": [], "weight_decay": 0.1}], r"\[\[\], \[\]\]"),
])
def test_empty_set_of_groups_is_refused_at_construction(groups, shown):
    with pytest.raises(ValueError, match=r"^Invalid params: " + shown + " " + EMPTY_ALLOWED):
        descend.ConjugateGradient(groups)


def _linear_run(with_empty):
    torch.manual_seed(0)
    x, y = torch.randn(50, 4, dtype=torch.float64), torch.randn(50, 1, dtype=torch.float64)
    model = nn.Linear(4, 1).double()
    groups = [{"params": [model.weight], "weight_decay": 0.5}, {"params": [model.bias]}]
    if with_empty:
        groups = [{"params": [], "weight_decay": 2.0}, groups[0], {"params": []}, groups[1]]
    opt = descend.ConjugateGradient(groups, max_iter=4, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(3)]
    return model, opt, losses


def test_empty_groups_beside_others_are_accepted_and_change_nothing():
    model_a, opt_a, losses_a = _linear_run(False)
    model_b, opt_b, losses_b = _linear_run(True)
    assert losses_a == losses_b
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert sorted(sa) == sorted(sb) and sa
        for key in sa:
            a, b = sa[key], sb[key]
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_empty_group_added_with_add_param_group():
    model, opt, _ = _linear_run(False)
    opt.add_param_group({"params": []})  # beside parameters: accepted
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1, 0]
    before = [p.detach().clone() for p in model.parameters()]
    for group in opt.param_groups:  # emptied by hand
        group["params"] = []
    with pytest.raises(ValueError, match=r"^Invalid params: \[\[\], \[\], \[\], \[\]\] " + EMPTY_ALLOWED):
        opt.add_param_group({"params": []})
    assert len(opt.param_groups) == 3
    with pytest.raises(ValueError, match=r"^Invalid params: \[\[\], \[\], \[\]\] " + EMPTY_ALLOWED):
        opt.step(lambda: torch.zeros(()))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
