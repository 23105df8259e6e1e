"""Nothing lost: the non-finite gradient guard (``nonfinite="ignore" | "skip" | "raise"``),
``torch.amp.GradScaler``, and atomic steps (a step that raises changes nothing).

Oracles: the optimizer itself before the step (``torch.equal`` on every parameter and every
state tensor), a run in which the bad step never happened (a skipped step must be exactly
that), an unscaled run (GradScaler with power-of-two scales unscales exactly), and
torch.optim for the default ``"ignore"`` (NaN propagates exactly as torch propagates it).

The problem: a small two-layer network whose parameters are named and split into two
groups; ``sometimes`` gets a gradient only on even steps (None after ``zero_grad()``) and
has 17 elements, so fused kernels run their vectorized and their scalar loops.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

import descend

NAMES = ("w1", "b1", "w2", "b2", "sometimes")
SHAPES = {"w1": (8, 4), "b1": (8,), "w2": (3, 8), "b2": (3,), "sometimes": (17,)}

IMPLS: dict[str, dict[str, Any]] = {
    "single": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "flat": {"flat": True},
}

KINDS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "SGD": lambda groups, **kw: descend.SGD(groups, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2, **kw),
    "Adam": lambda groups, **kw: descend.Adam(groups, lr=0.01, weight_decay=1e-2, amsgrad=True, **kw),
    "AdamW": lambda groups, **kw: descend.AdamW(groups, lr=0.01, l1=1e-3, decay="independent", **kw),
}


# --- the problem ------------------------------------------------------------------------


def make_params(dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(SHAPES[n], generator=g, dtype=dtype) * 0.5).requires_grad_() for n in NAMES}


def groups(params: dict[str, Tensor], named: bool = True) -> list[dict[str, Any]]:
    """Two groups: the weights (and ``sometimes``), then the biases without weight decay."""
    layout = [("w1", "w2", "sometimes"), ("b1", "b2")]
    out = []
    for i, names in enumerate(layout):
        group: dict[str, Any] = {"params": [(n, params[n]) if named else params[n] for n in names]}
        if i == 1:
            group["weight_decay"] = 0.0
        out.append(group)
    return out


def loss_at(params: dict[str, Tensor], step: int) -> Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    dtype = params["w1"].dtype
    x = torch.randn(16, 4, generator=g, dtype=dtype)
    y = torch.randn(16, 3, generator=g, dtype=dtype)
    hidden = torch.tanh(x @ params["w1"].t() + params["b1"])
    loss = ((hidden @ params["w2"].t() + params["b2"] - y) ** 2).mean()
    if step % 2 == 0:
        loss = loss + ((params["sometimes"] - 1.0) ** 2).mean()
    return loss


def grads_at(opt: torch.optim.Optimizer, params: dict[str, Tensor], step: int) -> None:
    opt.zero_grad()
    loss_at(params, step).backward()


def poison(params: dict[str, Tensor], name: str, value: float, index: int = 0) -> None:
    """Put one non-finite value into the gradient of ``name``."""
    params[name].grad.view(-1)[index] = value  # type: ignore[union-attr]


# --- comparing everything ---------------------------------------------------------------


def _same_value(a: Any, b: Any, path: str) -> None:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        assert isinstance(a, Tensor) and isinstance(b, Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, (path, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(a, b) or bool(((a == b) | (a.isnan() & b.isnan())).all()), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (path, a.keys(), getattr(b, "keys", lambda: b)())
        for k in a:
            _same_value(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same_value(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b and type(a) is type(b), (path, a, b)


def snapshot(opt: torch.optim.Optimizer, params: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Values of every parameter and a deep copy of the optimizer's state dict."""
    return {n: p.detach().clone() for n, p in params.items()}, copy.deepcopy(opt.state_dict())


def assert_unchanged(before: tuple[dict[str, Tensor], dict[str, Any]], opt: torch.optim.Optimizer,
                     params: dict[str, Tensor], skipped: int = 0) -> None:
    """Every parameter and the whole state dict as ``before``, but for ``skipped`` more skipped steps."""
    values, sd = before
    if skipped:
        sd = {**sd, "skipped_steps": sd["skipped_steps"] + skipped}
    _same_value((values, sd), snapshot(opt, params), "")


# --- nonfinite="skip" -----------------------------------------------------------------------


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_skip_changes_nothing_and_is_as_if_the_step_never_happened(kind: str, impl: str, bad: float) -> None:
    make = KINDS[kind]
    params = make_params()
    opt = make(groups(params), nonfinite="skip", **IMPLS[impl])
    schedule = [0, 1, 2, 3, 4, 5]
    for step in schedule[:3]:
        grads_at(opt, params, step)
        opt.step()
    # the bad batch: one element of one gradient (in the second group) is non-finite
    grads_at(opt, params, 99)
    poison(params, "b2", bad, index=2)
    before = snapshot(opt, params)
    opt.step()
    assert_unchanged(before, opt, params, skipped=1)
    assert opt.skipped_steps == 1
    assert opt.state_dict()["skipped_steps"] == 1
    for step in schedule[3:]:
        grads_at(opt, params, step)
        opt.step()

    # the same run without the bad batch at all
    clean = make_params()
    clean_opt = make(groups(clean), nonfinite="skip", **IMPLS[impl])
    for step in schedule:
        grads_at(clean_opt, clean, step)
        clean_opt.step()
    assert clean_opt.skipped_steps == 0
    ours, theirs = snapshot(opt, params), snapshot(clean_opt, clean)
    _same_value(ours[0], theirs[0], "params")
    _same_value({k: v for k, v in ours[1].items() if k != "skipped_steps"},
                {k: v for k, v in theirs[1].items() if k != "skipped_steps"}, "state_dict")


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_skip_on_the_first_step_creates_no_state(kind: str, impl: str) -> None:
    params = make_params()
    opt = KINDS[kind](groups(params), nonfinite="skip", **IMPLS[impl])
    grads_at(opt, params, 0)
    poison(params, "w1", math.nan)
    before = snapshot(opt, params)
    opt.step()
    assert_unchanged(before, opt, params, skipped=1)
    assert opt.state_dict()["state"] == {}
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("kind", list(KINDS))
def test_skipped_steps_count_is_saved_and_restored(kind: str) -> None:
    params = make_params()
    opt = KINDS[kind](groups(params), nonfinite="skip")
    for step in range(5):
        grads_at(opt, params, step)
        if step in (1, 3):
            poison(params, "w2", math.inf)
        opt.step()
    assert opt.skipped_steps == 2
    sd = opt.state_dict()
    assert sd["skipped_steps"] == 2
    fresh = KINDS[kind](groups(make_params()), nonfinite="skip")
    fresh.load_state_dict(sd)
    assert fresh.skipped_steps == 2
    # a state dict without the key (saved by torch.optim, or by a run that never skipped) means 0
    del sd["skipped_steps"]
    fresh.load_state_dict(sd)
    assert fresh.skipped_steps == 0


def test_torch_optim_loads_a_state_dict_that_counts_skipped_steps() -> None:
    params = make_params()
    opt = descend.SGD(list(params.values()), lr=0.05, momentum=0.9, nonfinite="skip")
    for step in range(3):
        grads_at(opt, params, step)
        if step == 1:
            poison(params, "b1", math.nan)
        opt.step()
    theirs = torch.optim.SGD(list(params.values()), lr=0.05, momentum=0.9)
    theirs.load_state_dict(opt.state_dict())
    for ours_state, their_state in zip(opt.state.values(), theirs.state.values()):
        assert torch.equal(ours_state["momentum_buffer"], their_state["momentum_buffer"])


# --- nonfinite="raise" ----------------------------------------------------------------------


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_raise_names_the_first_offending_parameter_and_changes_nothing(kind: str, impl: str) -> None:
    params = make_params()
    opt = KINDS[kind](groups(params), nonfinite="raise", **IMPLS[impl])
    for step in range(2):
        grads_at(opt, params, step)
        opt.step()
    grads_at(opt, params, 2)
    poison(params, "b1", math.inf, index=3)
    poison(params, "sometimes", math.nan, index=16)  # group 0 comes first: this one is named
    before = snapshot(opt, params)
    with pytest.raises(FloatingPointError, match=r"parameter 'sometimes'.*nothing was changed"):
        opt.step()
    assert_unchanged(before, opt, params)
    assert opt.skipped_steps == 0
    # only the bias is bad now
    params["sometimes"].grad.nan_to_num_(0.0)  # type: ignore[union-attr]
    with pytest.raises(FloatingPointError, match=r"parameter 'b1'"):
        opt.step()
    assert_unchanged(before, opt, params)


@pytest.mark.parametrize("impl", ["single", "fused"])
def test_raise_without_names_gives_group_and_index(impl: str) -> None:
    params = make_params()
    opt = descend.Adam(groups(params, named=False), nonfinite="raise", **IMPLS[impl])
    grads_at(opt, params, 0)
    poison(params, "b2", -math.inf)
    before = snapshot(opt, params)
    with pytest.raises(FloatingPointError, match=r"parameter 1 of group 1 \(shape \(3,\)\)"):
        opt.step()
    assert_unchanged(before, opt, params)
    assert opt.state_dict()["state"] == {}


# --- nonfinite="ignore" (the default): torch's behaviour, NaN included ------------------------


TORCH_PAIRS = {
    "SGD": (lambda p, **kw: descend.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2, **kw),
            lambda p, **kw: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2, **kw)),
    "Adam": (lambda p, **kw: descend.Adam(p, lr=0.01, weight_decay=1e-2, amsgrad=True, **kw),
             lambda p, **kw: torch.optim.Adam(p, lr=0.01, weight_decay=1e-2, amsgrad=True, **kw)),
    "AdamW": (lambda p, **kw: descend.AdamW(p, lr=0.01, **kw), lambda p, **kw: torch.optim.AdamW(p, lr=0.01, **kw)),
}


@pytest.mark.parametrize("impl", ["single", "foreach", "fused"])
@pytest.mark.parametrize("kind", list(TORCH_PAIRS))
def test_ignore_is_the_default_and_propagates_nan_exactly_as_torch(kind: str, impl: str) -> None:
    ours_make, theirs_make = TORCH_PAIRS[kind]
    results = []
    for make in (ours_make, theirs_make):
        params = make_params()
        opt = make(list(params.values()), **IMPLS[impl])
        for step in range(4):
            grads_at(opt, params, step)
            if step == 2:
                poison(params, "w1", math.nan, index=5)
            opt.step()
        results.append(snapshot(opt, params))
    ours, theirs = results
    assert ours[0]["w1"].view(-1)[5].isnan()  # the NaN reached the parameter, as in torch
    _same_value(ours[0], theirs[0], "params")
    _same_value(ours[1]["state"], theirs[1]["state"], "state")


def test_nonfinite_default_is_ignore() -> None:
    for make in KINDS.values():
        opt = make(groups(make_params()))
        assert opt.nonfinite == "ignore"  # type: ignore[attr-defined]


# --- GradScaler --------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_grad_scaler_skips_an_overflowed_step_and_scaled_steps_match_unscaled(kind: str, impl: str) -> None:
    make = KINDS[kind]
    params, plain = make_params(), make_params()
    # nonfinite="raise": the scaler sees the inf first and never calls step, so nothing raises
    opt = make(groups(params), nonfinite="raise", **IMPLS[impl])
    plain_opt = make(groups(plain), **IMPLS[impl])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)

    def scaled_step(step: int) -> None:
        opt.zero_grad()
        scaler.scale(loss_at(params, step)).backward()
        scaler.step(opt)
        scaler.update()

    for step in range(3):
        scaled_step(step)
        grads_at(plain_opt, plain, step)
        plain_opt.step()
    # power-of-two scaling is exact: the scaled run is the unscaled run, bit for bit
    _same_value(snapshot(opt, params), snapshot(plain_opt, plain), "")

    scaler.update(new_scale=2.0**127)  # the largest float32 power of two: the scaled loss overflows
    before = snapshot(opt, params)
    opt.zero_grad()
    scaler.scale(loss_at(params, 3) * 2.0**8).backward()  # a spiky batch
    assert not all(bool(p.grad.isfinite().all()) for p in params.values() if p.grad is not None)
    scaler.step(opt)
    scaler.update()
    assert_unchanged(before, opt, params)
    assert scaler.get_scale() == 2.0**126  # backed off
    assert opt.skipped_steps == 0  # type: ignore[attr-defined]  # the scaler skipped it, not the guard

    scaler.update(new_scale=2.0**10)
    for step in range(4, 6):
        scaled_step(step)
        grads_at(plain_opt, plain, step)
        plain_opt.step()
    _same_value(snapshot(opt, params), snapshot(plain_opt, plain), "")


# --- atomic steps: a step that raises changes nothing ---------------------------------------------


def _trained(kind: str, impl: str, steps: int = 2) -> tuple[torch.optim.Optimizer, dict[str, Tensor]]:
    params = make_params(torch.float64)
    opt = KINDS[kind](groups(params), **IMPLS[impl])
    for step in range(steps):
        grads_at(opt, params, step)
        opt.step()
    grads_at(opt, params, steps)
    return opt, params


@pytest.mark.parametrize("impl", ["single", "foreach", "fused"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_state_of_the_wrong_shape_in_the_last_group_changes_nothing(kind: str, impl: str) -> None:
    # (flat storage reads hand-replaced state only at its next rebuild, as documented in descend.flat)
    opt, params = _trained(kind, impl)
    key = "momentum_buffer" if kind == "SGD" else "exp_avg"
    opt.state[params["b2"]][key] = torch.zeros(4, dtype=torch.float64)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=rf"state '{key}' of parameter 'b2' has shape \(4,\)"):
        opt.step()
    assert_unchanged(before, opt, params)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("edit", ["lr", "weight_decay", "decay", "own"])
def test_invalid_option_edited_into_the_last_group_changes_nothing(kind: str, impl: str, edit: str) -> None:
    opt, params = _trained(kind, impl)
    own = ("momentum", 1.5) if kind == "SGD" else ("betas", (0.9, 1.0))
    name, value = {"lr": ("lr", -0.1), "weight_decay": ("weight_decay", math.nan), "decay": ("decay", "L2"),
                   "own": own}[edit]
    opt.param_groups[1][name] = value
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=name):
        opt.step()
    assert_unchanged(before, opt, params)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_sparse_gradient_in_the_last_group_changes_nothing(kind: str, impl: str) -> None:
    opt, params = _trained(kind, impl)
    params["b2"].grad = params["b2"].grad.to_sparse()  # type: ignore[union-attr]
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="sparse gradients.*'b2'.*nothing was changed"):
        opt.step()
    assert_unchanged(before, opt, params)


@pytest.mark.parametrize("kind", list(KINDS))
def test_fused_group_that_cannot_be_fused_changes_nothing(kind: str) -> None:
    params = make_params(torch.float64)
    z = torch.randn(3, dtype=torch.complex128, generator=torch.Generator().manual_seed(5)).requires_grad_()
    opt = KINDS[kind](groups(params) + [{"params": [("z", z)], "fused": True}])
    for step in range(2):
        grads_at(opt, params, step)
        opt.step()  # z has no gradient yet: its group is empty
    grads_at(opt, params, 2)
    z.grad = torch.ones_like(z)
    all_params = {**params, "z": z}
    before = snapshot(opt, all_params)
    with pytest.raises(RuntimeError, match="fused=True needs"):
        opt.step()
    assert_unchanged(before, opt, all_params)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_closure_that_throws_changes_nothing(kind: str, impl: str) -> None:
    opt, params = _trained(kind, impl)

    def closure() -> Tensor:
        loss = loss_at(params, 7)
        loss.backward()
        raise KeyError("data loader failed")

    before = snapshot(opt, params)
    with pytest.raises(KeyError, match="data loader failed"):
        opt.step(closure)
    # the closure's backward accumulated into .grad (the caller's business); nothing else changed
    assert_unchanged(before, opt, params)


@pytest.mark.parametrize("impl", ["single", "foreach", "fused"])
@pytest.mark.parametrize("damage", ["missing", "missing-alone", "dtype"])
def test_adam_state_with_a_missing_entry_or_wrong_dtype_changes_nothing(impl: str, damage: str) -> None:
    """A state entry deleted, or replaced by one of another dtype, in the last group: the step
    raises before any group changes. ("missing-alone": the last group has one parameter.)"""
    params = make_params(torch.float64)
    layout = groups(params)
    if damage == "missing-alone":
        layout = [layout[0], {**layout[1], "params": layout[1]["params"][:1]},
                  {**layout[1], "params": layout[1]["params"][1:]}]
    opt = KINDS["Adam"](layout, **IMPLS[impl])
    for step in range(3):
        grads_at(opt, params, step)
        if step < 2:
            opt.step()
    state = opt.state[params["b2"]]
    if damage == "dtype":
        state["exp_avg"] = state["exp_avg"].float()
    else:
        del state["exp_avg"]
    before = snapshot(opt, params)
    with pytest.raises((ValueError, RuntimeError, TypeError, AttributeError)):
        opt.step()
    assert_unchanged(before, opt, params)


@pytest.mark.parametrize("impl", ["single", "foreach"])
def test_sgd_momentum_buffer_of_another_dtype_is_rejected(impl: str) -> None:
    opt, params = _trained("SGD", impl)
    state = opt.state[params["b2"]]
    state["momentum_buffer"] = state["momentum_buffer"].float()
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="momentum_buffer.*dtype"):
        opt.step()
    assert_unchanged(before, opt, params)


# --- the closure solvers ----------------------------------------------------------------------------


def _quadratic_params() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"a": torch.randn(4, 3, generator=g, dtype=torch.float64).requires_grad_(),
            "b": torch.randn(5, generator=g, dtype=torch.float64).requires_grad_()}


_M = torch.randn(5, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
_A = _M @ _M.t() + torch.eye(5, dtype=torch.float64)

SOLVERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "LBFGS": lambda p, **kw: descend.LBFGS(p, lr=1, max_iter=4, history_size=3, **kw),
    "LBFGS-wolfe": lambda p, **kw: descend.LBFGS(p, lr=1, max_iter=4, history_size=3,
                                                 line_search_fn="strong_wolfe", **kw),
    "CG": lambda p, **kw: descend.CG(p, max_iter=4, **kw),
    "CG-FR-fixed": lambda p, **kw: descend.CG(p, lr=0.05, beta="FR", line_search_fn=None, max_iter=4, **kw),
}


class Closure:
    """f = Σ(a − 1)⁴ + bᵀAb + 0.1·Σ sin(a); raises at evaluation ``fail_at`` (1-based) if set."""

    def __init__(self, opt: torch.optim.Optimizer, params: dict[str, Tensor], fail_at: int | None = None,
                 poison_grad: str | None = None) -> None:
        self.opt, self.params, self.fail_at, self.poison_grad = opt, params, fail_at, poison_grad
        self.calls = 0

    def __call__(self) -> Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyError(f"evaluation {self.calls} failed")
        self.opt.zero_grad()
        a, b = self.params["a"], self.params["b"]
        loss = ((a - 1) ** 4).sum() + b @ _A @ b + 0.1 * a.sin().sum()
        loss.backward()
        if self.poison_grad is not None:
            self.params[self.poison_grad].grad.view(-1)[1] = math.nan  # type: ignore[union-attr]
        return loss


def _solver_groups(params: dict[str, Tensor]) -> list[dict[str, Any]]:
    return [{"params": [("a", params["a"])], "weight_decay": 0.01}, {"params": [("b", params["b"])]}]


def _solver_run(solver: str, fail_at: int | None) -> tuple[Any, int]:
    """Two calls of step(closure); if ``fail_at``, a call whose closure raises at that evaluation
    in between. Returns the final snapshot and the evaluations of the last call."""
    params = _quadratic_params()
    opt = SOLVERS[solver](_solver_groups(params))
    opt.step(Closure(opt, params))  # history, direction and step length exist now
    if fail_at is not None:
        before = snapshot(opt, params)
        with pytest.raises(KeyError, match=f"evaluation {fail_at} failed"):
            opt.step(Closure(opt, params, fail_at=fail_at))
        assert_unchanged(before, opt, params)
    closure = Closure(opt, params)
    opt.step(closure)
    return snapshot(opt, params), closure.calls


@pytest.mark.parametrize("when", ["first", "second", "third", "last"])
@pytest.mark.parametrize("solver", list(SOLVERS))
def test_closure_solver_whose_closure_throws_changes_nothing(solver: str, when: str) -> None:
    clean, evaluations = _solver_run(solver, None)
    assert evaluations >= 4, evaluations  # so that "third" is not "last"
    fail_at = {"first": 1, "second": 2, "third": 3, "last": evaluations}[when]
    failed, _ = _solver_run(solver, fail_at)
    # the failed call left no trace: the run continues as if it had never been made
    _same_value(failed, clean, "")


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_closure_solver_state_that_does_not_fit_changes_nothing(solver: str) -> None:
    params = _quadratic_params()
    opt = SOLVERS[solver](_solver_groups(params))
    opt.step(Closure(opt, params))
    opt.state[params["a"]]["d"] = [torch.zeros(3, dtype=torch.float64)]
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="'d'.*does not belong to these parameters; nothing was changed"):
        opt.step(Closure(opt, params))
    assert_unchanged(before, opt, params)


_NO_NONFINITE = ("LBFGS and ConjugateGradient do not accept nonfinite= (ClosureSolver.__init__, LBFGS.__init__ "
                 "and ConjugateGradient.__init__ have no such argument, so RegularizedOptimizer gets the default "
                 "'ignore'): TypeError: unexpected keyword argument 'nonfinite'")


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_closure_solver_skip_changes_nothing_and_counts(solver: str) -> None:
    params = _quadratic_params()
    opt = SOLVERS[solver](_solver_groups(params), nonfinite="skip")
    opt.step(Closure(opt, params))
    before = snapshot(opt, params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skip is counted, not warned about
        opt.step(Closure(opt, params, poison_grad="b"))
    assert_unchanged(before, opt, params, skipped=1)
    assert opt.skipped_steps == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_closure_solver_raise_names_the_parameter_and_changes_nothing(solver: str) -> None:
    params = _quadratic_params()
    opt = SOLVERS[solver](_solver_groups(params), nonfinite="raise")
    opt.step(Closure(opt, params))
    before = snapshot(opt, params)
    with pytest.raises(FloatingPointError, match="parameter 'b'"):
        opt.step(Closure(opt, params, poison_grad="b"))
    assert_unchanged(before, opt, params)
