"""descend.LBFGS against torch.optim.LBFGS, scipy and known minima."""

from __future__ import annotations

import copy
import io
import math
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import descend
from tests.problems import TEST_PROBLEMS, by_name

# --- helpers ---------------------------------------------------------------------------------


def mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)
    x = torch.randn(64, 5, dtype=dtype)
    y = torch.randn(64, 1, dtype=dtype)
    return model, x, y


class Counter:
    """A closure for a model that counts its calls."""

    def __init__(self, opt, model, x, y, penalty=None):
        self.opt, self.model, self.x, self.y, self.penalty = opt, model, x, y, penalty
        self.calls = 0

    def __call__(self):
        self.calls += 1
        self.opt.zero_grad()
        loss = ((self.model(self.x) - self.y) ** 2).mean()
        if self.penalty is not None:
            loss = loss + self.penalty(self.model)
        loss.backward()
        return loss


def run(cls, steps=3, dtype=torch.float64, seed=0, **kw):
    model, x, y = mlp(dtype, seed)
    opt = cls(model.parameters(), **kw)
    closure = Counter(opt, model, x, y)
    losses = [opt.step(closure).item() for _ in range(steps)]
    return model, opt, closure, losses


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same_run(a, b):
    (model_a, opt_a, closure_a, losses_a), (model_b, opt_b, closure_b, losses_b) = a, b
    assert losses_a == losses_b
    assert closure_a.calls == closure_b.calls
    for p, q in zip(params(model_a), params(model_b), strict=True):
        assert torch.equal(p, q)
    first_a, first_b = next(iter(model_a.parameters())), next(iter(model_b.parameters()))
    for key in ("func_evals", "n_iter"):
        assert opt_a.state[first_a][key] == opt_b.state[first_b][key]


# --- parity with torch.optim.LBFGS -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_reproduces_torch_lbfgs_bit_for_bit(dtype, line_search_fn):
    kw = dict(lr=1, max_iter=20, history_size=7, line_search_fn=line_search_fn)
    assert_same_run(run(torch.optim.LBFGS, 4, dtype, **kw), run(descend.LBFGS, 4, dtype, **kw))


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
@pytest.mark.parametrize("settings", [
    dict(tolerance_grad=1e3),  # optimal at once: one evaluation, no iteration
    dict(tolerance_grad=2e-2),  # optimal after a few iterations
    dict(tolerance_change=1e-3),
    dict(max_iter=3),
    dict(max_iter=50, max_eval=7),
    dict(max_iter=1),
    dict(lr=0.1, max_iter=10),
], ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_stopping_tests_match_torch(settings, line_search_fn):
    kw = dict(line_search_fn=line_search_fn, **settings)
    torch_run, descend_run = run(torch.optim.LBFGS, 3, **kw), run(descend.LBFGS, 3, **kw)
    assert_same_run(torch_run, descend_run)


def test_complex_parameters_match_torch():
    def make(cls):
        torch.manual_seed(1)
        z = nn.Parameter(torch.randn(6, dtype=torch.complex128))
        target = torch.randn(6, dtype=torch.complex128)
        opt = cls([z], line_search_fn="strong_wolfe", max_iter=10)

        def closure():
            opt.zero_grad()
            loss = ((z - target).abs() ** 2).sum() + (z.real**4).sum()
            loss.backward()
            return loss

        losses = [opt.step(closure).item() for _ in range(3)]
        return z.detach().clone(), losses

    (z_t, l_t), (z_d, l_d) = make(torch.optim.LBFGS), make(descend.LBFGS)
    assert l_t == l_d
    assert torch.equal(z_t, z_d)


def test_state_is_per_parameter_and_shaped_like_it():
    model, opt, _, _ = run(descend.LBFGS, 2, line_search_fn="strong_wolfe", history_size=3, max_iter=5)
    for p in model.parameters():
        state = opt.state[p]
        assert state["d"].shape == state["prev_flat_grad"].shape == p.shape
        assert len(state["old_dirs"]) == len(state["old_stps"]) == 3
        assert all(s.shape == p.shape and s.dtype == p.dtype for s in state["old_dirs"] + state["old_stps"])
    first = opt.state[next(model.parameters())]
    assert 2 <= first["n_iter"] <= 10 and isinstance(first["t"], float) and isinstance(first["prev_loss"], float)


def test_a_torch_lbfgs_checkpoint_is_refused_with_a_reason():
    model, opt, _, _ = run(torch.optim.LBFGS, 1, max_iter=3)
    ours = descend.LBFGS(model.parameters(), max_iter=3)
    with pytest.raises(ValueError, match="another kind of optimizer|shape"):
        ours.load_state_dict(opt.state_dict())
    assert not ours.state


def test_state_dict_round_trip_with_weights_only_continues_identically():
    kw = dict(line_search_fn="strong_wolfe", history_size=4, max_iter=4)
    uninterrupted = run(descend.LBFGS, 5, **kw)

    model, opt, closure, losses = run(descend.LBFGS, 2, **kw)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2, x, y = mlp()
    model2.load_state_dict(saved["model"])
    opt2 = descend.LBFGS(model2.parameters(), **kw)
    opt2.load_state_dict(saved["opt"])
    closure2 = Counter(opt2, model2, x, y)
    losses += [opt2.step(closure2).item() for _ in range(3)]
    assert losses == uninterrupted[3]
    for p, q in zip(model2.parameters(), uninterrupted[0].parameters(), strict=True):
        assert torch.equal(p, q)


# --- what torch's L-BFGS cannot do ------------------------------------------------------------


def logistic_data(dtype=torch.float64):
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = (data.data - data.data.mean(0)) / data.data.std(0)
    return torch.tensor(x, dtype=dtype), torch.tensor(data.target, dtype=dtype)


def test_groups_with_different_weight_decay_equal_an_explicit_penalty():
    """Groups (decay on weights, none on biases) = one group with λ/2·‖W‖² in the closure."""
    lam = 0.3
    kw = dict(line_search_fn="strong_wolfe", max_iter=15)
    model_t, x, y = mlp()
    model_d = copy.deepcopy(model_t)
    weights = [p for n, p in model_d.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model_d.named_parameters() if n.endswith("bias")]
    opt_d = descend.LBFGS([{"params": weights, "weight_decay": lam}, {"params": biases}], **kw)
    opt_t = torch.optim.LBFGS(model_t.parameters(), **kw)

    def penalty(m):
        return lam / 2 * sum((p**2).sum() for n, p in m.named_parameters() if n.endswith("weight"))

    closure_t = Counter(opt_t, model_t, x, y, penalty)
    closure_d = Counter(opt_d, model_d, x, y)
    for _ in range(3):
        start_penalty = penalty(model_d).item()
        loss_t = opt_t.step(closure_t).item()
        loss_d = opt_d.step(closure_d).item()
        # descend's closure returns f (the penalty is the optimizer's); torch's returns f + penalty
        assert loss_d + start_penalty == pytest.approx(loss_t, rel=1e-9)
    for p, q in zip(model_t.parameters(), model_d.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9)
    assert closure_t.calls == closure_d.calls


def test_weight_decay_is_in_the_value_the_line_search_sees():
    """On f = 0 the objective is λ/2·‖θ‖²: L-BFGS must reach 0 (a search blind to the penalty
    value would reject every step as 'no decrease')."""
    theta = nn.Parameter(torch.tensor([3.0, -4.0], dtype=torch.float64))
    opt = descend.LBFGS([theta], weight_decay=2.0, line_search_fn="strong_wolfe", max_iter=50)

    def closure():
        opt.zero_grad()
        loss = 0 * theta.sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert theta.abs().max().item() < 1e-10


def test_maximize_equals_minimizing_the_negation_bit_for_bit():
    kw = dict(line_search_fn="strong_wolfe", max_iter=10)
    model_a, x, y = mlp()
    model_b = copy.deepcopy(model_a)
    opt_a = descend.LBFGS(model_a.parameters(), **kw)
    opt_b = descend.LBFGS(model_b.parameters(), maximize=True, **kw)

    def closure_for(model, opt, sign):
        def closure():
            opt.zero_grad()
            loss = sign * ((model(x) - y) ** 2).mean()
            loss.backward()
            return loss

        return closure

    for _ in range(2):
        assert opt_a.step(closure_for(model_a, opt_a, 1)).item() == -opt_b.step(closure_for(model_b, opt_b, -1)).item()
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_logistic_regression_on_breast_cancer_matches_scipy_lbfgsb():
    from scipy.optimize import minimize as scipy_minimize

    x, y = logistic_data()
    lam = 1e-2
    n = x.shape[1]

    def objective(w, b):
        logits = x @ w + b
        return nn.functional.binary_cross_entropy_with_logits(logits, y) + lam / 2 * (w * w).sum()

    def scipy_fun(z):
        t = torch.tensor(z, dtype=torch.float64, requires_grad=True)
        value = objective(t[:n], t[n])
        value.backward()
        return value.item(), t.grad.numpy()

    ref = scipy_minimize(scipy_fun, np.zeros(n + 1), jac=True, method="L-BFGS-B",
                         options=dict(gtol=1e-12, ftol=1e-15, maxiter=5000))

    model = nn.Linear(n, 1).double()
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    for cls, kw in ((descend.LBFGS, {}), (descend.CG, {})):
        with torch.no_grad():
            model.weight.zero_()
            model.bias.zero_()
        opt = cls([{"params": [model.weight], "weight_decay": lam}, {"params": [model.bias], "weight_decay": 0}],
                  line_search_fn="strong_wolfe", max_iter=1000, max_eval=3000, tolerance_grad=1e-9,
                  tolerance_change=1e-14, **kw)

        def closure(opt=opt):
            opt.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(1), y)
            loss.backward()
            return loss

        opt.step(closure)
        final = objective(model.weight.detach().squeeze(0), model.bias.detach().squeeze(0)).item()
        assert final == pytest.approx(ref.fun, abs=1e-6), cls
        assert final <= ref.fun + 1e-10


def test_parameters_on_several_dtypes_work_as_one_vector():
    """float32 and float64 parameters together (torch's LBFGS needs one flat tensor)."""
    a = nn.Parameter(torch.tensor([2.0, -1.0], dtype=torch.float32))
    b = nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
    opt = descend.LBFGS([a, b], line_search_fn="strong_wolfe", max_iter=100)

    def closure():
        opt.zero_grad()
        loss = ((a - 1) ** 2).sum().double() * 3 + ((b + 2) ** 2).sum() + (a[0].double() - 1) * (b[0] + 2)
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(a.detach(), torch.tensor([1.0, 1.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(b.detach(), torch.tensor([-2.0], dtype=torch.float64), atol=1e-5, rtol=0)
    # each bucket's pieces live in the state of its first parameter, in its own dtype
    assert opt.state[a]["d"].dtype == torch.float32
    assert opt.state[b]["d"].dtype == torch.float64


# --- validation -------------------------------------------------------------------------------


def test_solver_settings_must_agree_across_groups():
    w, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match=r"group 1 differs in max_iter=5 \(group 0: 20\)"):
        descend.LBFGS([{"params": [w]}, {"params": [b], "max_iter": 5}])
    with pytest.raises(ValueError, match="history_size"):
        descend.LBFGS([{"params": [w]}, {"params": [b], "history_size": 3}])
    opt = descend.LBFGS([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}])
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(1))], "lr": 0.5})
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("kw,match", [
    (dict(decay="decoupled"), "decay.*'coupled' only"),
    (dict(decay="independent"), "decay.*part of the objective"),
    (dict(l1=0.1), "l1.*smooth"),
    (dict(weight_decay=-1), "weight_decay"),
    (dict(history_size=0), "history_size"),
    (dict(max_iter=0), "max_iter"),
    (dict(max_eval=0), "max_eval"),
    (dict(line_search_fn="armijo"), "line_search_fn"),
    (dict(c1=0.5, c2=0.4), "c2"),
    (dict(tolerance_grad=-1.0), "tolerance_grad"),
    (dict(lr=-1.0), "lr"),
])
def test_invalid_options_raise_value_errors_naming_them(kw, match):
    with pytest.raises(ValueError, match=match):
        descend.LBFGS([nn.Parameter(torch.ones(2))], **kw)


def test_step_needs_a_closure():
    opt = descend.LBFGS([nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="closure"):
        opt.step(None)


# --- nothing half-applied ---------------------------------------------------------------------


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
@pytest.mark.parametrize("fail_at", [1, 3, 6])
def test_a_closure_that_raises_leaves_parameters_and_state_as_they_were(fail_at, line_search_fn):
    kw = dict(line_search_fn=line_search_fn, max_iter=6, history_size=3)
    model, opt, closure, _ = run(descend.LBFGS, 2, **kw)
    before_params = params(model)
    before_state = copy.deepcopy(opt.state_dict())

    calls = {"n": 0}

    def failing():
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise RuntimeError("boom")
        return closure()

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(failing)
    for p, q in zip(params(model), before_params, strict=True):
        assert torch.equal(p, q)
    after_state = opt.state_dict()
    assert after_state["state"].keys() == before_state["state"].keys()
    for key, value in before_state["state"][0].items():
        other = after_state["state"][0][key]
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other), key
        elif isinstance(value, list):
            assert len(value) == len(other), key
            assert all(torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v for u, v in zip(value, other)), key
        else:
            assert value == other, key

    # and the next step is the one that would have run
    reference = run(descend.LBFGS, 3, **kw)
    loss = opt.step(closure).item()
    assert loss == reference[3][2]
    for p, q in zip(model.parameters(), reference[0].parameters(), strict=True):
        assert torch.equal(p, q)


# --- non-finite values ------------------------------------------------------------------------


def x_minus_log_x():
    """f(x) = x − log x: minimum 1 at x = 1, NaN for x < 0."""
    x = nn.Parameter(torch.tensor([5.0], dtype=torch.float64))
    seen = []

    def make_closure(opt):
        def closure():
            opt.zero_grad()
            seen.append(x.detach().clone())
            loss = (x - torch.log(x)).sum()
            loss.backward()
            return loss

        return closure

    return x, seen, make_closure


def test_torch_goes_nan_where_descend_steps_back():
    x, seen, make_closure = x_minus_log_x()
    opt = torch.optim.LBFGS([x], lr=10, line_search_fn="strong_wolfe")
    opt.step(make_closure(opt))
    assert math.isnan(x.item()) or x.item() < 0  # torch ends outside the domain, where f is NaN

    x, seen, make_closure = x_minus_log_x()
    opt = descend.LBFGS([x], lr=10, line_search_fn="strong_wolfe", max_iter=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a finite point exists: no warning
        opt.step(make_closure(opt))
    assert x.item() == pytest.approx(1.0, abs=1e-6)
    assert all(torch.isfinite(s).all() for s in seen)  # every trial point had finite parameters
    assert any(s.item() < 0 for s in seen)  # and one of them was in the NaN region


def test_fixed_steps_halve_on_non_finite_values():
    x, seen, make_closure = x_minus_log_x()
    opt = descend.LBFGS([x], lr=10, max_iter=30, max_eval=60)
    opt.step(make_closure(opt))
    assert math.isfinite(x.item())
    assert x.item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_no_finite_point_restores_the_parameters_and_warns(line_search_fn):
    x = nn.Parameter(torch.tensor([5.0, 1.0], dtype=torch.float64))
    start = x.detach().clone()
    opt = descend.LBFGS([x], line_search_fn=line_search_fn, max_iter=5)

    def closure():
        opt.zero_grad()
        loss = ((x - 1) ** 2).sum()
        if not torch.equal(x.detach(), start):
            loss = loss * float("nan")  # finite only where the step began
        loss.backward()
        return loss

    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(closure)
    assert torch.equal(x.detach(), start)
    assert opt.last_stop == "nonfinite"


# --- known minima -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", TEST_PROBLEMS)
def test_standard_problems_reach_their_minima(name):
    problem = by_name(name)
    x = nn.Parameter(problem.start())
    opt = descend.LBFGS([x], line_search_fn="strong_wolfe", max_iter=3000, max_eval=6000, tolerance_grad=1e-9,
                        tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        loss = problem(x)
        loss.backward()
        return loss

    opt.step(closure)
    f = problem(x.detach()).item()
    assert f == pytest.approx(problem.f_min, abs=1e-8 * max(1.0, abs(problem.f_min)) + 1e-10)
    if problem.x_min is not None:
        expected = torch.tensor(problem.x_min, dtype=torch.float64)
        # singular minimizers (Powell) are flat to 4th order: f ≈ 1e-10 means |x| ≈ 1e-2.5
        tol = 3e-3 if "powell" in name else 1e-4
        torch.testing.assert_close(x.detach(), expected, atol=tol, rtol=tol)


def test_real_module_in_float32_reaches_least_squares_solution():
    torch.manual_seed(0)
    x = torch.randn(200, 6)
    y = x @ torch.randn(6, 1) + 0.3 + 0.01 * torch.randn(200, 1)
    model = nn.Linear(6, 1)
    opt = descend.LBFGS(model.parameters(), line_search_fn="strong_wolfe", max_iter=100)

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


@pytest.mark.parametrize("cls", [descend.LBFGS, descend.ConjugateGradient])
def test_process_group_option_is_checked(cls):
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="process_group"):
        cls([p], process_group="everyone")
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        with pytest.raises(ValueError, match="process_group=True needs an initialized default process group"):
            cls([p], process_group=True)
    assert cls([p], process_group=None)._loss_groups == []


# --- groups without parameters ----------------------------------------------------------------

EMPTY_ALLOWED = r"\(allowed: at least one parameter: LBFGS runs one solver over the parameters of all groups"


@pytest.mark.parametrize("groups, shown", [
    ([], "[]"),
    (iter([]), "[]"),  # an exhausted generator, as model.parameters() of a model without any
    ([{"params": []}], "[[]]"),
    ([{"params": []}, {"params": [], "weight_decay": 0.1}], "[[], []]"),
])
def test_empty_set_of_groups_is_refused_at_construction(groups, shown):
    # torch.optim.LBFGS takes [{"params": []}] and fails at the first step with an IndexError
    with pytest.raises(ValueError, match=r"^Invalid params: " + re.escape(shown) + " " + EMPTY_ALLOWED):
        descend.LBFGS(groups, line_search_fn="strong_wolfe")


def _empty_groups_run(groups_of, steps=3):
    """LBFGS over the mlp's weights (decayed) and biases, with the groups ``groups_of`` makes of them."""
    model, x, y = mlp()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = descend.LBFGS(groups_of(weights, biases), line_search_fn="strong_wolfe", max_iter=5, history_size=3)
    closure = Counter(opt, model, x, y)
    losses = [opt.step(closure).item() for _ in range(steps)]
    return model, opt, losses, closure.calls


def _state_tensors(opt, model):
    """Every state tensor, by parameter and key, in a fixed order (history lists flattened)."""
    out = []
    for p in model.parameters():
        for key, value in sorted(opt.state[p].items()):
            for i, v in enumerate(value if isinstance(value, list) else [value]):
                out.append((key, i, v))
    return out


@pytest.mark.parametrize("where", ["first", "between", "last", "two"])
def test_empty_group_beside_others_is_accepted_and_changes_nothing(where):
    """torch.optim.LBFGS refuses any second group, so it has no rule here; like every other torch
    optimizer, descend accepts a group without parameters beside others (descend.param_groups
    of a model without biases, say). The run is bit for bit the run without it."""
    def plain(w, b):
        return [{"params": w, "weight_decay": 0.2}, {"params": b}]

    def with_empty(w, b):
        groups, empty = plain(w, b), {"params": [], "weight_decay": 0.7}
        return {"first": [empty, *groups], "between": [groups[0], empty, groups[1]], "last": [*groups, empty],
                "two": [empty, groups[0], dict(empty), groups[1]]}[where]

    model_a, opt_a, losses_a, calls_a = _empty_groups_run(plain)
    model_b, opt_b, losses_b, calls_b = _empty_groups_run(with_empty)
    assert losses_a == losses_b and calls_a == calls_b
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)
    state_a, state_b = _state_tensors(opt_a, model_a), _state_tensors(opt_b, model_b)
    assert len(state_a) == len(state_b) > 0
    for (ka, ia, a), (kb, ib, b) in zip(state_a, state_b, strict=True):
        assert (ka, ia) == (kb, ib)
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    # and it saves and loads like any other group
    loaded = descend.LBFGS(with_empty(*[[p for n, p in model_b.named_parameters() if n.endswith(s)]
                                        for s in ("weight", "bias")]), line_search_fn="strong_wolfe", max_iter=5,
                           history_size=3)
    loaded.load_state_dict(copy.deepcopy(opt_b.state_dict()))
    assert [len(g["params"]) for g in loaded.param_groups] == [len(g["params"]) for g in opt_b.param_groups]


def test_empty_group_added_with_add_param_group():
    model, opt, _, _ = _empty_groups_run(lambda w, b: [{"params": w + b}], steps=1)
    before = [p.detach().clone() for p in model.parameters()]
    opt.add_param_group({"params": [], "weight_decay": 0.5})  # accepted beside the parameters there
    assert [len(g["params"]) for g in opt.param_groups] == [4, 0]
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))

    # groups emptied by hand: a new empty group is refused (and not added), and so is a step
    opt.param_groups[0]["params"] = []
    with pytest.raises(ValueError, match=r"^Invalid params: \[\[\], \[\], \[\]\] " + EMPTY_ALLOWED):
        opt.add_param_group({"params": []})
    assert len(opt.param_groups) == 2
    with pytest.raises(ValueError, match=r"^Invalid params: \[\[\], \[\]\] " + EMPTY_ALLOWED):
        opt.step(lambda: torch.zeros(()))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
