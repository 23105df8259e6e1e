"""descend.Adafactor: equal to torch.optim.Adafactor, and descend's regularization around it.

Oracles: torch.optim.Adafactor on torch's own OptimizerInfo inputs (optim_db, which needs the
``expecttest`` package), closed forms on zero-gradient steps, and a per-step formula written
here from the paper's math (means of g², an outer product of the factors) rather than from
either implementation. Float64, 1e-12 absolute.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

import descend
from descend.flat import check_flat_params

ATOL = 1e-12
IMPLS = {"single": {"foreach": False}, "foreach": {"foreach": True}, "default": {}}
#: options of torch's OptimizerInputs that descend.Adafactor deliberately lacks, and why
LACKS = {
    "capturable": "CUDA-graph capture of the step count: descend keeps Adafactor's step on the CPU, as torch does",
    "differentiable": "autograd through the step: descend's steps run under no_grad",
    "fused": "torch has no fused Adafactor kernel",
}


@functools.cache
def torch_info() -> Any:
    """The Adafactor OptimizerInfo of torch's optim_db (its module imports ``expecttest``)."""
    from torch.testing._internal.common_optimizers import optim_db

    (info,) = [i for i in optim_db if i.optim_cls is torch.optim.Adafactor]
    return info


def make_params(seed: int = 0) -> list[Tensor]:
    """Matrices, a vector, a 3-D tensor, a 0-d scalar, a non-contiguous matrix, and a matrix
    and a vector whose grad is None on odd steps."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.5) -> Tensor:
        return torch.randn(shape, generator=g, dtype=torch.float64) * scale

    tensors = [r(5, 4), r(5, scale=0.1), r(3, 5), r(2, 3, 4), r(), r(4, 5).t(), r(4, 3), r(3, scale=1.0)]
    return [t.detach().requires_grad_() for t in tensors]


def loss_fn(params: list[Tensor], step: int) -> Tensor:
    w1, b1, w2, cube, scalar, transposed, sometimes_m, sometimes_v = params
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    y = torch.randn(16, 3, generator=g, dtype=torch.float64)
    loss = ((torch.tanh(x @ w1.t() + b1) @ w2.t() - y) ** 2).mean() + 0.1 * ((x @ transposed.t()) ** 2).mean()
    loss = loss + (cube.sin() ** 2).mean() + (scalar - 0.5) ** 2
    if step % 2 == 0:
        loss = loss + ((x[:, :3] @ sometimes_m.t()) ** 2).mean() + ((sometimes_v - 1.0) ** 2).sum()
    return loss


def train(opt: torch.optim.Optimizer, params: list[Tensor], steps: int = 10, start: int = 0) -> None:
    for step in range(start, start + steps):
        opt.zero_grad()
        loss = loss_fn(params, step)
        # maximizing -f walks the same well-conditioned path as minimizing f
        (-loss if opt.param_groups[0]["maximize"] else loss).backward()
        opt.step()


def run(make: Callable[[list[Tensor]], torch.optim.Optimizer], steps: int = 10) -> tuple[list[Tensor], Any]:
    params = make_params()
    opt = make(params)
    train(opt, params, steps)
    return params, opt


def max_diff(a: list[Tensor], b: list[Tensor]) -> float:
    return max(((x - y).abs().max().item() if x.numel() else 0.0) for x, y in zip(a, b, strict=True))


def assert_same(ours: tuple[list[Tensor], Any], theirs: tuple[list[Tensor], Any]) -> None:
    (p1, o1), (p2, o2) = ours, theirs
    assert max_diff(p1, p2) <= ATOL
    for a, b in zip(p1, p2, strict=True):
        s1, s2 = o1.state[a], o2.state[b]
        assert set(s1) == set(s2)
        for key in s1:
            assert s1[key].shape == s2[key].shape and s1[key].device == s2[key].device, key
            assert (s1[key].double() - s2[key].double()).abs().max().item() <= ATOL, key


def snapshot(params: list[Tensor], opt: torch.optim.Optimizer) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    return [p.detach().clone() for p in params], [{k: v.clone() for k, v in opt.state[p].items()} for p in params]


def assert_unchanged(before: tuple[list[Tensor], list[dict[str, Tensor]]], params: list[Tensor],
                     opt: torch.optim.Optimizer) -> None:
    old_params, old_states = before
    assert all(torch.equal(a, b) for a, b in zip(old_params, params, strict=True))
    for old, p in zip(old_states, params, strict=True):
        assert set(old) == set(opt.state[p])
        assert all(torch.equal(old[k], opt.state[p][k]) for k in old)


# --- torch's own inputs ----------------------------------------------------------------


def test_torch_inputs_are_covered() -> None:
    inputs = torch_info().optim_inputs_func(device="cpu")
    skipped = [i for i in inputs if set(i.kwargs) & set(LACKS)]
    assert len(inputs) == 5 and skipped == []  # torch 2.13: default, weight_decay, maximize, beta2_decay, d
    ours = set(inspect.signature(descend.Adafactor).parameters)
    assert all(set(i.kwargs) <= ours for i in inputs)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_matches_torch_on_optim_db_inputs(impl: str) -> None:
    flags = IMPLS[impl]
    covered = 0
    for oi in torch_info().optim_inputs_func(device="cpu"):
        if set(oi.kwargs) & set(LACKS):
            continue  # none in torch 2.13 (test_torch_inputs_are_covered)
        assert oi.params is None  # torch's inputs leave the parameters to the test
        theirs = run(lambda p, kw=oi.kwargs: torch.optim.Adafactor(p, **kw, **flags))
        ours = run(lambda p, kw=oi.kwargs: descend.Adafactor(p, **kw, **flags))
        assert_same(ours, theirs)
        covered += 1
    assert covered == 5


EXTRA = [
    dict(lr=torch.tensor(0.02), weight_decay=0.05),
    dict(lr=0.3, eps=(1e-6, 1e-2), d=1.2, beta2_decay=-0.5, weight_decay=0.05),
    dict(lr=0.0, weight_decay=0.5),
    dict(eps=(0.0, 0.0), maximize=True),
]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("kwargs", EXTRA, ids=["tensor-lr", "options", "lr0", "eps0-max"])
def test_matches_torch_beyond_optim_db(impl: str, kwargs: dict[str, Any]) -> None:
    theirs = run(lambda p: torch.optim.Adafactor(p, **kwargs, **IMPLS[impl]))
    ours = run(lambda p: descend.Adafactor(p, **kwargs, **IMPLS[impl], warn=False))
    assert_same(ours, theirs)


def test_matches_torch_with_a_one_element_lr() -> None:
    theirs = run(lambda p: torch.optim.Adafactor(p, lr=torch.tensor([0.02]), weight_decay=0.05))
    ours = run(lambda p: descend.Adafactor(p, lr=torch.tensor([0.02]), weight_decay=0.05))
    assert_same(ours, theirs)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_matches_torch_with_groups(impl: str) -> None:
    def groups(p: list[Tensor]) -> list[dict[str, Any]]:
        return [{"params": p[:3], "lr": 0.05, "weight_decay": 0.1}, {"params": p[3:], "d": 1.5, "eps": (1e-8, 1e-2)}]

    theirs = run(lambda p: torch.optim.Adafactor(groups(p), **IMPLS[impl]))
    ours = run(lambda p: descend.Adafactor(groups(p), **IMPLS[impl]))
    assert_same(ours, theirs)


def test_default_is_the_per_tensor_form_as_in_torch() -> None:
    default = run(lambda p: descend.Adafactor(p, weight_decay=0.1))
    single = run(lambda p: descend.Adafactor(p, weight_decay=0.1, foreach=False))
    assert all(torch.equal(a, b) for a, b in zip(default[0], single[0], strict=True))


def test_foreach_equals_the_reference_with_mixed_dtypes() -> None:
    """Buckets per dtype and factoring; ε₁ = None is each parameter's own machine epsilon in both forms."""
    def make() -> list[Tensor]:
        g = torch.Generator().manual_seed(3)
        shapes = [(4, 3), (3,), (2, 2, 3)]
        return [torch.randn(s, generator=g, dtype=dt).requires_grad_() for dt in (torch.float32, torch.float64)
                for s in shapes]

    finals = []
    for impl in ("single", "foreach"):
        params = make()
        opt = descend.Adafactor(params, weight_decay=0.1, **IMPLS[impl])
        for step in range(6):
            opt.zero_grad()
            sum(((p.double() - step / 6) ** 4).sum() for p in params).backward()
            opt.step()
        finals.append(params)
    for a, b in zip(*finals, strict=True):
        assert a.dtype == b.dtype
        assert (a - b).abs().max().item() <= (1e-6 if a.dtype == torch.float32 else ATOL)


def test_maximize_is_minimize_of_the_negation() -> None:
    params = make_params()
    opt = descend.Adafactor(params, weight_decay=0.1, maximize=True)
    for step in range(10):
        opt.zero_grad()
        (-loss_fn(params, step)).backward()  # ascent on -f is descent on f
        opt.step()
    theirs = run(lambda p: torch.optim.Adafactor(p, weight_decay=0.1))
    ours = run(lambda p: descend.Adafactor(p, weight_decay=0.1))
    assert max_diff(params, theirs[0]) <= ATOL
    assert all(torch.equal(a, b) for a, b in zip(params, ours[0], strict=True))  # -(-g) is g exactly
    assert max_diff(params, make_params()) > 1e-3


# --- regularization: closed forms and a per-step formula ---------------------------------

SCALE = {  # s with lr = 0.05 and lr₀ = 0.1
    "decoupled": 0.05, "independent": 0.5, "fixed": 1.0, "corrected": 0.025,
}


@pytest.mark.parametrize("impl", ["single", "foreach"])
@pytest.mark.parametrize("mode", list(SCALE))
def test_decoupled_modes_on_zero_gradient_steps(mode: str, impl: str) -> None:
    """g = 0 makes U = 0: a step is the decay θ·(1 − s·λ), then the prox with threshold s·λ₁."""
    params = make_params()[:4]
    wd, l1 = 0.2, 0.05
    opt = descend.Adafactor(params, lr=0.1, weight_decay=wd, l1=l1, decay=mode, **IMPLS[impl], warn=False)
    opt.param_groups[0]["lr"] = 0.05
    expected = [p.detach().clone() for p in params]
    for _ in range(3):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        s = SCALE[mode]
        expected = [torch.nn.functional.softshrink(e * (1 - s * wd), s * l1) for e in expected]
    assert max_diff(params, expected) <= 1e-15
    assert sum(int((p == 0).sum()) for p in params) > 0  # the prox makes exact zeros
    assert all(float(opt.state[p]["step"]) == 3 for p in params)


def hand_step(theta: Tensor, g: Tensor, st: dict[str, Any], *, lr: float, factor: float, threshold: float,
              tau: float = -0.8, eps1: float | None = None, eps2: float = 1e-3, d: float = 1.0) -> Tensor:
    """One Adafactor step written from the math: ᾱ from θ_{t-1}, then decay, update, prox."""
    st["t"] = st.get("t", 0) + 1
    t, e1 = st["t"], torch.finfo(theta.dtype).eps if eps1 is None else eps1
    b = t**tau  # 1 − β̂₂
    alpha = max(eps2, math.sqrt(float((theta**2).mean()))) * min(lr, 1 / math.sqrt(t))
    if theta.dim() > 1:
        st["R"] = (1 - b) * st.get("R", 0) + b * (g * g).mean(-1, keepdim=True)
        st["C"] = (1 - b) * st.get("C", 0) + b * (g * g).mean(-2, keepdim=True)
        v = st["R"] * st["C"] / st["R"].mean(-2, keepdim=True).clamp(min=e1)  # broadcast: the outer product
    else:
        st["V"] = v = (1 - b) * st.get("V", 0) + b * g * g
    u = g / v.clamp(min=e1 * e1).sqrt()
    theta = theta * factor - alpha / max(1.0, math.sqrt(float((u * u).mean())) / d) * u
    return torch.nn.functional.softshrink(theta, threshold) if threshold else theta


@pytest.mark.parametrize("impl", ["single", "foreach"])
@pytest.mark.parametrize("mode", ["coupled", *SCALE])
def test_every_decay_mode_against_the_per_step_formula(mode: str, impl: str) -> None:
    wd, l1, lrs = 0.1, 1e-3, [0.1, 0.08, 0.05, 0.05, 0.02, 0.01]
    params = make_params()
    opt = descend.Adafactor(params, lr=lrs[0], weight_decay=wd, l1=l1, decay=mode, **IMPLS[impl], warn=False)
    mine = [p.detach().clone().requires_grad_() for p in params]
    states: list[dict[str, Any]] = [{} for _ in params]
    for step, lr in enumerate(lrs):
        opt.param_groups[0]["lr"] = lr
        train(opt, params, steps=1, start=step)
        for m in mine:
            m.grad = None
        loss_fn(mine, step).backward()
        with torch.no_grad():
            s = {"coupled": 0.0, "decoupled": lr, "independent": lr / lrs[0], "fixed": 1.0,
                 "corrected": lr * lr / lrs[0]}[mode]
            for m, st in zip(mine, states, strict=True):
                if m.grad is None:
                    continue  # not touched, as in torch
                g = m.grad + wd * m + l1 * torch.sgn(m) if mode == "coupled" else m.grad
                m.copy_(hand_step(m, g, st, lr=lr, factor=1 - s * wd, threshold=s * l1))
    assert max_diff(params, mine) <= ATOL
    assert max_diff(params, make_params()) > 1e-3  # it moved


def test_step_size_is_taken_before_decay() -> None:
    """α = max(ε₂, RMS(θ_{t-1}))·ρ_t at the undecayed θ: with fixed decay λ = 0.5 the two
    readings differ by a factor 2 in α."""
    theta = torch.full((4,), 2.0, dtype=torch.float64, requires_grad=True)
    opt = descend.Adafactor([theta], lr=0.1, weight_decay=0.5, decay="fixed", warn=False)
    theta.grad = torch.ones(4, dtype=torch.float64)
    opt.step()
    # t = 1: V = g², U = 1, RMS(U) = 1, ρ = 0.1, α = 2·0.1 (RMS of θ₀ = 2)
    assert torch.allclose(theta.detach(), torch.full((4,), 2.0 * 0.5 - 0.2, dtype=torch.float64), rtol=0, atol=1e-15)


# --- state: factored, checked, portable -------------------------------------------------


def test_state_is_factored_for_matrices_only() -> None:
    params, opt = run(lambda p: descend.Adafactor(p))
    shapes = {tuple(p.shape): {k: tuple(v.shape) for k, v in opt.state[p].items()} for p in params[:5]}
    assert shapes[(5, 4)] == {"step": (), "row_var": (5, 1), "col_var": (1, 4)}
    assert shapes[(2, 3, 4)] == {"step": (), "row_var": (2, 3, 1), "col_var": (2, 1, 4)}
    assert shapes[(5,)] == {"step": (), "variance": (5,)}
    assert shapes[()] == {"step": (), "variance": ()}
    assert all(opt.state[p]["step"].device.type == "cpu" for p in params)
    assert float(opt.state[params[-1]]["step"]) == 5  # grad None on odd steps: 5 of 10


@pytest.mark.parametrize("bad_shape", [(5, 4), (4, 1), (1, 5), (5,)], ids=["theta", "transposed", "col", "flat"])
def test_load_refuses_a_wrong_row_var_and_changes_nothing(bad_shape: tuple[int, ...]) -> None:
    params, opt = run(lambda p: descend.Adafactor(p, weight_decay=0.1), steps=3)
    bad = copy.deepcopy(opt.state_dict())
    bad["state"][0]["row_var"] = torch.zeros(bad_shape, dtype=torch.float64)
    before = snapshot(params, opt)
    with pytest.raises(ValueError, match=r"row_var.*shape") as info:
        opt.load_state_dict(bad)
    assert "(5, 1)" in str(info.value)
    assert_unchanged(before, params, opt)
    twin = run(lambda p: descend.Adafactor(p, weight_decay=0.1), steps=3)
    train(opt, params, steps=2, start=3)
    train(twin[1], twin[0], steps=2, start=3)
    assert max_diff(params, twin[0]) == 0.0


def test_step_refuses_a_matrix_state_without_factors_and_changes_nothing() -> None:
    params, opt = run(lambda p: descend.Adafactor(p), steps=2)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0] = {"step": sd["state"][0]["step"], "variance": torch.zeros(5, 4, dtype=torch.float64)}
    with pytest.raises(ValueError, match="'variance' .* is not kept for a parameter of shape"):
        opt.load_state_dict(sd)  # the load refuses an entry the rule keeps for vectors only
    opt.state[params[0]] = {"step": sd["state"][0]["step"], "variance": torch.zeros(5, 4, dtype=torch.float64)}
    before = snapshot(params, opt)  # the same state set by hand: the step refuses it
    opt.zero_grad()
    loss_fn(params, 2).backward()
    with pytest.raises(ValueError, match=r"lacks \['row_var', 'col_var'\]; nothing was changed"):
        opt.step()
    assert_unchanged(before, params, opt)


@pytest.mark.parametrize("index,entry", [(1, "row_var"), (4, "col_var")], ids=["vector-row_var", "scalar-col_var"])
def test_load_refuses_factors_for_parameters_that_have_none(index: int, entry: str) -> None:
    params, opt = run(lambda p: descend.Adafactor(p), steps=2)
    bad = copy.deepcopy(opt.state_dict())
    bad["state"][index][entry] = torch.zeros(1, dtype=torch.float64)
    before = snapshot(params, opt)
    with pytest.raises(ValueError, match=entry):
        opt.load_state_dict(bad)
    assert_unchanged(before, params, opt)


@pytest.mark.parametrize("direction", ["torch-to-descend", "descend-to-torch"])
def test_state_dicts_move_between_torch_and_descend(direction: str) -> None:
    kwargs = dict(lr=0.02, weight_decay=0.1, d=1.5)
    first, second = ((torch.optim.Adafactor, descend.Adafactor) if direction == "torch-to-descend"
                     else (descend.Adafactor, torch.optim.Adafactor))
    reference = run(lambda p: torch.optim.Adafactor(p, **kwargs), steps=10)
    params, opt = run(lambda p: first(p, **kwargs), steps=4)
    sd = copy.deepcopy(opt.state_dict())
    moved = second(params, **kwargs)
    moved.load_state_dict(sd)
    assert all(moved.state[p]["step"].device.type == "cpu" for p in params)
    train(moved, params, steps=6, start=4)
    assert_same((params, moved), reference)


def test_legacy_number_steps_are_converted_on_load() -> None:
    params, opt = run(lambda p: descend.Adafactor(p), steps=3)
    sd = copy.deepcopy(opt.state_dict())
    for entry in sd["state"].values():
        entry["step"] = float(entry["step"])
    fresh = descend.Adafactor(params)
    fresh.load_state_dict(sd)
    assert all(torch.is_tensor(s["step"]) and s["step"].dtype == torch.float32 for s in fresh.state.values())
    train(fresh, params, steps=1, start=3)
    assert float(fresh.state[params[0]]["step"]) == 4


# --- what Adafactor refuses ------------------------------------------------------------

BAD = [  # (kwargs, how the message starts (torch's words where it has some), whether torch refuses it too)
    (dict(lr=-1e-3), "Invalid learning rate: ", True),
    (dict(lr=torch.tensor([1e-3, 1e-3])), "Tensor lr must be 1-element", True),
    (dict(beta2_decay=0.8), "beta2_decay should be <= 0 but is: ", True),
    (dict(beta2_decay=float("nan")), "beta2_decay should be <= 0 but is: ", True),
    (dict(eps=(-1e-30, 1e-3)), "epsilon1 should be >= 0 but is: ", True),
    (dict(eps=(None, -1.0)), "epsilon2 should be >= 0 but is: ", True),
    (dict(eps=1e-3), "Invalid epsilon value: ", False),
    (dict(eps=(None, 1e-3, 0.0)), "Invalid epsilon value: ", False),
    (dict(eps=("a", 1e-3)), "epsilon1 should be >= 0 but is: ", False),
    (dict(d=0.0), "Clipping threshold d should be >= 1 but is: ", True),
    (dict(d=0.999), "Clipping threshold d should be >= 1 but is: ", True),
    (dict(weight_decay=-0.1), "Invalid weight_decay value: ", True),
    (dict(l1=-1.0), "Invalid l1: ", False),
    (dict(decay="L2"), "Invalid decay: ", False),
    (dict(decay="fixed", weight_decay=1.0), "Invalid weight_decay value: ", False),
    (dict(foreach="yes"), "Invalid foreach: ", False),
    (dict(maximize="no"), "Invalid maximize: ", False),
]


@pytest.mark.parametrize("kwargs,start,torch_too", BAD, ids=[f"{list(k)[-1]}-{i}" for i, (k, _, _) in enumerate(BAD)])
def test_invalid_options_at_construction_and_in_add_param_group(kwargs: dict[str, Any], start: str,
                                                                 torch_too: bool) -> None:
    p, q = torch.zeros(2, 2, requires_grad=True), torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="^" + re.escape(start) + r".* \(([\w\[\]]+; )?allowed: "):
        descend.Adafactor([p], **kwargs)
    if torch_too:
        with pytest.raises(ValueError):
            torch.optim.Adafactor([p], **kwargs)
    opt = descend.Adafactor([p])
    with pytest.raises(ValueError, match="^" + re.escape(start)):
        opt.add_param_group({"params": [q], **kwargs})
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == [p]


def test_invalid_group_edit_is_refused_before_the_step_changes_anything() -> None:
    params, opt = run(lambda p: descend.Adafactor([{"params": p[:4]}, {"params": p[4:]}]), steps=2)
    opt.param_groups[1]["d"] = 0.5
    before = snapshot(params, opt)
    opt.zero_grad()
    loss_fn(params, 2).backward()
    with pytest.raises(ValueError, match=r"^Clipping threshold d should be >= 1 but is: 0\.5"):
        opt.step()
    assert_unchanged(before, params, opt)


def test_invalid_nonfinite_and_fused() -> None:
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"^Invalid nonfinite: 'maybe'"):
        descend.Adafactor([p], nonfinite="maybe")
    with pytest.raises(ValueError, match=r"^Invalid fused: True \(allowed: None or False"):
        descend.Adafactor([{"params": [p], "fused": True}])


def test_torch_error_inputs() -> None:
    """torch's optim_error_inputs for Adafactor: the same error type (messages in descend's
    format); the complex parameter that torch refuses at the first step is refused at construction."""
    from torch.testing._internal.common_optimizers import OptimizerErrorEnum

    checked = 0
    for ei in torch_info().optim_error_inputs_func(device="cpu", dtype=torch.float32):
        oi = ei.optimizer_error_input
        params = oi.params if oi.params is not None else [torch.nn.Parameter(torch.randn(1, 1))]
        if ei.error_type is UserWarning:
            with pytest.warns(UserWarning, match=ei.error_regex):
                descend.Adafactor(params, **oi.kwargs)
        elif ei.error_on == OptimizerErrorEnum.STEP_ERROR:
            with pytest.raises(ValueError, match="complex"):
                descend.Adafactor(params, **oi.kwargs)
        else:
            with pytest.raises(ei.error_type):
                descend.Adafactor(params, **oi.kwargs)
        checked += 1
    assert checked == 10


def test_complex_parameters_are_refused() -> None:
    real, z = torch.zeros(2, 2, requires_grad=True), torch.zeros(2, dtype=torch.complex128, requires_grad=True)
    with pytest.raises(ValueError, match=r"^Invalid params: 'parameter 1 of the group of dtype torch.complex128' .*does not support complex"):
        descend.Adafactor([real, z])
    opt = descend.Adafactor([real])
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group({"params": [z]})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match=r"^Invalid params: \"parameter 'z' of dtype torch.complex128\""):
        descend.Adafactor([("w", real), ("z", z)])


def test_a_parameter_made_complex_later_is_refused_before_anything_changes() -> None:
    params, late = make_params(), torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = descend.Adafactor([{"params": params}, {"params": [late]}], weight_decay=0.1)
    train(opt, params, steps=2)  # late has no gradient yet, and no state
    opt.zero_grad()
    loss_fn(params, 2).backward()
    late.data = torch.randn(3, dtype=torch.complex128)
    late.grad = torch.randn(3, dtype=torch.complex128)
    before = snapshot(params, opt)
    with pytest.raises(RuntimeError, match=r"does not support complex parameters \(parameter 0 of group 1 .*"
                                           r"nothing was changed"):
        opt.step()
    assert_unchanged(before, params, opt)
    assert late not in opt.state


def test_flat_storage_is_not_offered() -> None:
    assert "flat" not in inspect.signature(descend.Adafactor).parameters
    params = make_params()
    with pytest.raises(TypeError):
        descend.Adafactor(params, flat=True)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match=r"Invalid flat=True for Adafactor, whose state \['row_var', 'col_var'\]"):
        check_flat_params(descend.Adafactor(params))


# --- edge cases torch does not handle ----------------------------------------------------


@pytest.mark.parametrize("impl", ["single", "foreach"])
def test_empty_parameter_only_counts_its_step(impl: str) -> None:
    """torch divides by the size of an empty parameter (ZeroDivisionError); descend counts its step."""
    empty, empty_m = torch.zeros(0, dtype=torch.float64, requires_grad=True), torch.zeros(0, 3, requires_grad=True)
    params = make_params()
    opt = descend.Adafactor([*params, empty, empty_m], weight_decay=0.1, **IMPLS[impl])
    for step in range(4):
        opt.zero_grad()
        (loss_fn(params, step) + empty.sum() + empty_m.sum()).backward()
        opt.step()
    reference = run(lambda p: torch.optim.Adafactor(p, weight_decay=0.1, **IMPLS[impl]), steps=4)
    assert max_diff(params, reference[0]) <= ATOL
    assert float(opt.state[empty]["step"]) == 4 and float(opt.state[empty_m]["step"]) == 4
    with pytest.raises(ZeroDivisionError):
        torch.optim.Adafactor([empty]).step()


def test_nonfinite_skip_leaves_everything_as_it_was() -> None:
    params, opt = run(lambda p: descend.Adafactor(p, nonfinite="skip"), steps=2)
    opt.zero_grad()
    loss_fn(params, 2).backward()
    params[3].grad[0, 0, 0] = float("nan")
    before = snapshot(params, opt)
    opt.step()
    assert_unchanged(before, params, opt)
    assert opt.skipped_steps == 1
