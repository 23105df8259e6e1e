"""flat=True: parameters, gradients and state in contiguous buffers, with the same numbers.

Oracles: the per-tensor reference (``foreach=False``, held to torch.optim by
tests/test_parity.py), descend without flat storage, and torch.optim. The problem is
tests/helpers.py's (a parameter whose grad is None on odd steps, so its step count falls
behind its neighbours'; a zero-size and a non-contiguous parameter).

Tolerance: float64 <= 1e-12 absolute after 30 steps (the parity tests' bound). Flat and
non-flat run the same update functions, and where they run the same kernel on the same
elements they agree to the bit (asserted below for foreach=False and foreach=True); the
fused kernel rounds its vectorized body and its scalar tail differently, and flat storage
moves elements from a small tensor's tail into a buffer's body, hence rounding-level
differences for the default (fused) path.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch

import descend
from tests.helpers import loss_fn, make_params, max_abs_diff

SETTINGS = [
    (descend.SGD, dict(lr=0.05)),
    (descend.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.05)),
    (descend.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.05, decay="decoupled", l1=0.01)),
    (descend.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.05, decay="fixed", maximize=True)),
    (descend.Adam, dict(lr=0.01, weight_decay=0.05, l1=0.01)),
    (descend.Adam, dict(lr=0.01, amsgrad=True, maximize=True)),
    (descend.AdamW, dict(lr=0.01)),
    (descend.AdamW, dict(lr=0.01, weight_decay=0.05, decay="independent", l1=0.01)),
    (descend.AdamW, dict(lr=0.01, weight_decay=0.05, decay="fixed", amsgrad=True)),
]
IDS = [f"{cls.__name__}-{i}" for i, (cls, _) in enumerate(SETTINGS)]

Make = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def run(make: Make, *, steps: int = 30, set_to_none: bool = True, dtype: torch.dtype = torch.float64,
        params: list[torch.Tensor] | None = None,
        hook: Callable[[int, Any, list[torch.Tensor]], None] | None = None) -> tuple[list[torch.Tensor], Any]:
    """helpers.train with a choice of zero_grad and a hook before each step."""
    params = make_params(dtype) if params is None else params
    opt = make(params)
    for step in range(steps):
        opt.zero_grad(set_to_none=set_to_none)
        loss = loss_fn(params, step)
        if opt.param_groups[0].get("maximize"):
            loss = -loss
        loss.backward()
        if hook is not None:
            hook(step, opt, params)
        opt.step()
    return [p.detach().clone() for p in params], opt


@pytest.mark.parametrize(("cls", "kw"), SETTINGS, ids=IDS)
@pytest.mark.parametrize("set_to_none", [True, False], ids=["none", "zeros"])
def test_flat_equals_non_flat_and_the_reference(cls: type, kw: dict, set_to_none: bool) -> None:
    reference, _ = run(lambda p: cls(p, foreach=False, **kw), set_to_none=set_to_none)
    default, _ = run(lambda p: cls(p, **kw), set_to_none=set_to_none)
    flat, opt = run(lambda p: cls(p, flat=True, **kw), set_to_none=set_to_none)
    assert opt.flat
    assert max_abs_diff(flat, reference) <= 1e-12
    assert max_abs_diff(flat, default) <= 1e-12
    # The same kernels on the same elements, to rounding: a flat run steps consecutive parameters
    # as one tensor, so a parameter's last elements fall in a kernel's SIMD body rather than its
    # scalar tail, and on CPUs where the two round differently (AVX-512's FMA) the last bits differ.
    for flags in ({"foreach": False}, {"foreach": True}):
        a, _ = run(lambda p, f=flags: cls(p, flat=True, **f, **kw), set_to_none=set_to_none, steps=12)
        b, _ = run(lambda p, f=flags: cls(p, **f, **kw), set_to_none=set_to_none, steps=12)
        assert max_abs_diff(a, b) <= 1e-14, flags


def test_float32_flat_equals_non_flat() -> None:
    kw = dict(lr=0.01, weight_decay=0.05)
    a, _ = run(lambda p: descend.AdamW(p, flat=True, **kw), dtype=torch.float32)
    b, _ = run(lambda p: descend.AdamW(p, **kw), dtype=torch.float32)
    assert max(((x - y).abs().max().item() if x.numel() else 0.0) for x, y in zip(a, b)) <= 1e-6


def _storages(params: list[torch.Tensor]) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in params}


def test_parameters_share_one_buffer_and_stay_the_same_objects() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    objects = [id(p) for p in model.parameters()]
    opt = descend.AdamW(model.parameters(), lr=0.01, flat=True)
    params = list(model.parameters())
    assert [id(p) for p in params] == objects and all(isinstance(p, torch.nn.Parameter) for p in params)
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    assert len(_storages(params)) == 1
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    assert len(_storages([p.grad for p in params])) == 1  # adopted into the gradient buffer
    assert len(_storages([opt.state[p]["exp_avg"] for p in params])) == 1
    assert {opt.state[p]["step"].item() for p in params} == {1.0}
    assert all(opt.state[p]["exp_avg"].shape == p.shape for p in params)


def test_gradients_accumulate_in_place_after_zero_grad_set_to_none_false() -> None:
    model = torch.nn.Linear(3, 2)
    opt = descend.SGD(model.parameters(), lr=0.1, momentum=0.9, flat=True)
    x = torch.randn(4, 3)
    model(x).sum().backward()
    opt.step()
    grads = [p.grad for p in model.parameters()]
    opt.zero_grad(set_to_none=False)
    assert all(g is p.grad and not g.any() for g, p in zip(grads, model.parameters()))
    model(x).sum().backward()
    model(x).sum().backward()  # accumulates into the buffer's views
    assert all(g is p.grad for g, p in zip(grads, model.parameters()))
    expected = torch.autograd.grad(2 * model(x).sum(), list(model.parameters()))
    assert all(torch.allclose(g, e) for g, e in zip(grads, expected))
    opt.zero_grad()  # torch's default: None
    assert all(p.grad is None for p in model.parameters())


def test_a_hand_assigned_gradient_is_zeroed_in_place_like_torch() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = descend.SGD([p], lr=0.1, flat=True)
    mine = torch.full((3,), 2.0)
    p.grad = mine
    opt.zero_grad(set_to_none=False)
    assert p.grad is mine and not mine.any()


def test_params_without_gradient_are_not_touched_and_get_no_state() -> None:
    params = make_params()
    lonely = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = descend.AdamW(params + [lonely], lr=0.1, weight_decay=0.5, flat=True)
    for step in range(3):
        opt.zero_grad()
        loss_fn(params, step).backward()
        opt.step()
    assert torch.equal(lonely.detach(), torch.ones(3, dtype=torch.float64))
    assert lonely not in opt.state and lonely.grad is None
    steps = [opt.state[p]["step"].item() for p in params]
    assert steps == [3.0, 3.0, 3.0, 2.0, 3.0, 3.0]  # "sometimes" has a gradient on even steps only


def _torch_twin(name: str) -> Callable[..., torch.optim.Optimizer]:
    return getattr(torch.optim, name)


@pytest.mark.parametrize(("name", "kw"), [("SGD", dict(lr=0.05, momentum=0.9, weight_decay=0.05)),
                                          ("Adam", dict(lr=0.01, weight_decay=0.05)),
                                          ("AdamW", dict(lr=0.01, weight_decay=0.05, amsgrad=True))])
def test_state_dicts_move_between_flat_non_flat_and_torch(name: str, kw: dict) -> None:
    """Train 10 steps with one optimizer, save, load into another kind, train 10 more:
    every route ends where 20 uninterrupted torch.optim steps end."""
    cls = getattr(descend, name)
    kinds: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
        "flat": lambda p: cls(p, flat=True, **kw),
        "plain": lambda p: cls(p, **kw),
        "torch": lambda p: _torch_twin(name)(p, **kw),
    }
    straight, _ = run(kinds["torch"], steps=20)
    for first, second in [("flat", "torch"), ("torch", "flat"), ("flat", "plain"), ("plain", "flat"),
                          ("flat", "flat")]:
        params = make_params()
        _, opt = run(kinds[first], steps=10, params=params)
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        buffer.seek(0)
        saved = torch.load(buffer)
        resumed = kinds[second](params)
        resumed.load_state_dict(saved)
        for step in range(10, 20):
            resumed.zero_grad()
            loss_fn(params, step).backward()
            resumed.step()
        assert max_abs_diff([p.detach() for p in params], straight) <= 1e-12, (first, second)
        if second == "flat":
            assert len(_storages([resumed.state[p]["exp_avg" if name != "SGD" else "momentum_buffer"]
                                  for p in params if p in resumed.state])) == 1


def test_flat_state_dict_has_torchs_per_parameter_format() -> None:
    params = make_params()
    _, flat = run(lambda p: descend.AdamW(p, lr=0.01, flat=True), steps=3, params=params)
    params2 = make_params()
    _, plain = run(lambda p: descend.AdamW(p, lr=0.01), steps=3, params=params2)
    a, b = flat.state_dict(), plain.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert a["state"][i].keys() == b["state"][i].keys()
        for key, value in a["state"][i].items():
            other = b["state"][i][key]
            assert value.shape == other.shape and value.dtype == other.dtype, key
            assert torch.allclose(value, other, rtol=0, atol=1e-12), key


def test_add_param_group_joins_the_buffers() -> None:
    def make(flat: bool) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
        return lambda p: descend.AdamW(p[:3], lr=0.01, weight_decay=0.05, flat=flat)

    def hook(step: int, opt: Any, params: list[torch.Tensor]) -> None:
        if step == 5:
            opt.add_param_group({"params": params[3:], "lr": 0.02, "decay": "independent"})

    a, flat = run(make(True), hook=hook, steps=15)
    b, _ = run(make(False), hook=hook, steps=15)
    c, _ = run(lambda p: descend.AdamW(p[:3], lr=0.01, weight_decay=0.05, foreach=False), hook=hook, steps=15)
    assert max_abs_diff(a, b) <= 1e-12 and max_abs_diff(a, c) <= 1e-12
    params = [p for g in flat.param_groups for p in g["params"]]
    assert len(_storages(params)) == 1 and len(_storages([flat.state[p]["exp_avg"] for p in params])) == 1


@pytest.mark.parametrize("how", ["data", "to_dtype"])
def test_replacing_p_data_is_adopted_at_the_next_step(how: str) -> None:
    """``p.data = t`` (or model.double()): the next step copies t into the buffers, keeps
    (and converts) the state, and steps p from t, as a non-flat optimizer would."""
    def hook(step: int, opt: Any, params: list[torch.Tensor]) -> None:
        if step != 4:
            return
        if how == "data":
            params[0].data = torch.full_like(params[0], 0.25)
        else:
            for p in params:
                p.data = p.data.to(torch.float32)
                if p.grad is not None:
                    p.grad = p.grad.to(torch.float32)
            for state in opt.state.values():  # what a non-flat optimizer needs by hand
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key] = state[key].to(torch.float32)

    a, flat = run(lambda p: descend.Adam(p, lr=0.01, flat=True), hook=hook, steps=10)
    b, _ = run(lambda p: descend.Adam(p, lr=0.01), hook=hook, steps=10)
    assert max_abs_diff(a, b) <= (1e-12 if how == "data" else 1e-6)
    params = flat.param_groups[0]["params"]
    assert len(_storages(params)) == 1
    if how == "to_dtype":
        assert all(p.dtype == torch.float32 and flat.state[p]["exp_avg"].dtype == torch.float32 for p in params)


def test_in_place_changes_need_nothing() -> None:
    model = torch.nn.Linear(3, 2)
    opt = descend.SGD(model.parameters(), lr=0.1, flat=True)
    storage = _storages(list(model.parameters()))
    model.load_state_dict({"weight": torch.ones(2, 3), "bias": torch.zeros(2)})
    assert _storages(list(model.parameters())) == storage
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    assert torch.allclose(model.weight.detach(), torch.full((2, 3), 0.9))


def test_mixed_dtypes_get_one_buffer_each() -> None:
    a = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float32, requires_grad=True)
    c = torch.randn(2, dtype=torch.float64, requires_grad=True)
    twins = [t.detach().clone().requires_grad_() for t in (a, b, c)]
    opt, ref = descend.AdamW([a, b, c], lr=0.1, flat=True), descend.AdamW(twins, lr=0.1)
    for _ in range(5):
        for params, o in (([a, b, c], opt), (twins, ref)):
            o.zero_grad()
            sum((p.double() ** 2).sum() for p in params).backward()
            o.step()
    assert _storages([a]) == _storages([c]) != _storages([b])
    # to rounding, not bit for bit: the fused kernel takes its SIMD body (with fused multiply-adds)
    # over a padded flat slot where, on a lone 4- or 2-element tensor, it takes its scalar tail
    assert max_abs_diff([a, c], twins[::2]) <= 1e-15 and max_abs_diff([b], [twins[1]]) <= 1e-6


def test_complex_parameters() -> None:
    z = torch.randn(5, dtype=torch.complex128, generator=torch.Generator().manual_seed(0))

    def go(flat: bool) -> torch.Tensor:
        p = z.clone().requires_grad_()
        q = torch.ones(3, dtype=torch.complex128, requires_grad=True)
        opt = descend.AdamW([p, q], lr=0.05, flat=flat)
        for step in range(8):
            opt.zero_grad()
            ((p.abs() ** 2).sum() * (step + 1) + (q.abs() ** 2).sum()).backward()
            opt.step()
        return torch.cat([p.detach(), q.detach()])

    assert torch.equal(go(True), go(False))


def test_nonfinite_raise_names_the_parameter_and_changes_nothing() -> None:
    params = make_params()
    opt = descend.AdamW([{"params": params[:2]}, {"params": params[2:]}], lr=0.01, nonfinite="raise", flat=True)
    run(lambda p: opt, steps=2, params=params)
    before = copy.deepcopy(opt.state_dict())
    values = [p.detach().clone() for p in params]
    loss_fn(params, 2).backward()
    params[2].grad[1, 1] = float("inf")  # type: ignore[index]
    with pytest.raises(FloatingPointError, match=r"parameter 0 of group 1 \(shape \(3, 6\)\)"):
        opt.step()
    assert max_abs_diff([p.detach() for p in params], values) == 0.0
    after = opt.state_dict()
    assert all(torch.equal(after["state"][i][k], v) for i, s in before["state"].items() for k, v in s.items())


def test_sparse_gradient_is_refused_before_anything_changes() -> None:
    emb = torch.nn.Embedding(5, 2, sparse=True)
    dense = torch.nn.Parameter(torch.ones(2))
    opt = descend.SGD([dense, emb.weight], lr=0.1, flat=True)
    weight = emb.weight.detach().clone()
    (emb(torch.tensor([1, 2])).sum() + dense.sum()).backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert torch.equal(emb.weight.detach(), weight) and torch.equal(dense.detach(), torch.ones(2))


def test_flat_refuses_tensor_subclasses_at_construction() -> None:
    class Marked(torch.Tensor):
        pass

    p = torch.zeros(3).as_subclass(Marked).requires_grad_()
    with pytest.raises(ValueError, match="flat=True"):
        descend.SGD([p], lr=0.1, flat=True)


def test_reading_state_between_steps_sees_the_buffers() -> None:
    """State tensors are views: what the optimizer holds is what state_dict() shows."""
    p = torch.nn.Parameter(torch.ones(4))
    opt = descend.SGD([p], lr=0.1, momentum=0.5, flat=True)
    for _ in range(3):
        p.grad = torch.ones(4)
        opt.step()
    assert torch.allclose(opt.state[p]["momentum_buffer"], torch.full((4,), 1.75))
    assert torch.allclose(opt.state_dict()["state"][0]["momentum_buffer"], torch.full((4,), 1.75))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_results_do_not_depend_on_the_order_of_the_parameters(name: str, dtype: torch.dtype) -> None:
    """Each parameter's slot is padded to a multiple of 64 elements, so no parameter's elements
    fall in the scalar tail of a fused kernel (whose rounding differs from its SIMD body)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(37,), (5, 21), (3,), (40_001,), (130,), (2, 2, 2), (33_333,)]  # some above one thread's share
    values = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes] for _ in range(5)]
    kw = dict(lr=0.01, weight_decay=0.01, momentum=0.9) if name == "SGD" else dict(lr=0.01, weight_decay=0.01)

    def run(order: list[int]) -> list[torch.Tensor]:
        params = [values[i].clone().requires_grad_() for i in order]
        opt = getattr(descend, name)(params, flat=True, **kw)
        for step in grads:
            for p, i in zip(params, order):
                p.grad = step[i].clone()
            opt.step()
        by_index = dict(zip(order, params))
        return [by_index[i].detach() for i in range(len(shapes))]

    order = list(range(len(shapes)))
    forward, backward = run(order), run(order[::-1])
    for a, b in zip(forward, backward):
        assert torch.equal(a, b)
