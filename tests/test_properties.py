"""Property-based tests (hypothesis): random valid hyperparameters, shapes, dtypes (float32,
float64, bfloat16 parameters) and group layouts.

1. Every fast implementation (foreach, fused, flat storage, the default choice) equals the
   per-tensor reference (``foreach=False``).
2. descend equals torch.optim with the same implementation flag wherever torch has the
   setting (coupled decay for SGD and Adam, decoupled for AdamW, no L1): bit for bit.
3. Every invalid value of every argument (numbers out of range or not numbers, unknown
   modes, non-boolean flags, options invalid only together) raises ValueError naming the
   argument, at construction, in ``add_param_group`` and in a step after the group was
   edited by hand; it is never silently accepted, and a rejected value changes nothing.
4. A random sequence of step / zero_grad / state_dict / load_state_dict / add_param_group
   calls never leaves an optimizer inconsistent: a fast implementation tracks the reference
   through the whole sequence, rejected loads change nothing, and the final state dict,
   saved and loaded with ``weights_only=True`` into a fresh optimizer, continues bit for bit.

Tolerances (fast vs reference), with ε the dtype's machine epsilon (2⁻⁵², 2⁻²³, 2⁻⁷):

- foreach (and flat storage with the reference rule) vs reference, float32 and float64:
  exact, over the whole run (the same operations, one kernel per list).
- Everything else is compared one step at a time from the reference's parameters and
  state, per element: |Δ| ≤ C·ε·S, S = |θ_{t−1}| + |θ_t − θ_{t−1}| + s, where s is the
  update's sensitivity to a rounding of the effective gradient g + λθ + λ₁·sgn(θ)
  (lr·(|g_eff| + μ|b|) for SGD, 2·lr·|g_eff|/(√v̂ + eps) for Adam; see ``sensitivity``).
  A fused kernel evaluates the update in one expression (in float32 registers for a
  bfloat16 parameter, with fused multiply-adds), the reference one rounded operation at a
  time; so each step differs by a few roundings of θ, of the update and of what goes into
  it. In bfloat16 even foreach differs: torch's ``_foreach_mul_`` and ``Tensor.mul_`` by a
  Python scalar round differently for small bfloat16 tensors on CPU (torch 2.13: ~20% of
  the elements of 2–100-element tensors differ by an ulp). The term s matters where the
  update is ill-conditioned: Adam with β₂ = 0 and eps = 1e-10 is sign descent, and where
  g + λθ is exactly 0 in the bfloat16 reference but not in the fused kernel's float32, one
  step leaves θ where it was and the other moves it by lr (hypothesis found this:
  150·ε·(|θ| + |Δθ|)).
  Measured with hypothesis's target-directed search for the largest ratio: max |Δ|/(ε·S) =
  0.9 in float64, 0.6 in float32, 1.6 in bfloat16 (900 examples per optimizer, each with
  one of the fast implementations, up to 4 steps). C = 4.
  Whole runs are not compared this way: a step can amplify an earlier rounding difference
  without bound (the same Adam divides by |g + λθ|; the search found 30·ε·S after three
  bfloat16 steps), so such a bound would test the problem's conditioning, not the
  implementation.

Example counts are set per test and scaled by the hypothesis profile (tests/conftest.py);
the suite runs derandomized in CI. ``pytest --hypothesis-show-statistics`` reports them.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, note, settings, target
from hypothesis import strategies as st
from torch import Tensor

import descend
from descend.regularization import DECAY_MODES

SCALE = settings.default.max_examples / 100


def examples(n: int) -> int:
    return max(1, round(n * SCALE))


DTYPES = [torch.float32, torch.float64, torch.bfloat16]
EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7}
C_FUSED = {torch.float64: 4.0, torch.float32: 4.0, torch.bfloat16: 4.0}
FIRST_ORDER = ("SGD", "Adam", "AdamW")
CLASSES: dict[str, type[torch.optim.Optimizer]] = {"SGD": descend.SGD, "Adam": descend.Adam,
                                                     "AdamW": descend.AdamW, "LBFGS": descend.LBFGS,
                                                     "CG": descend.CG}
TORCH_CLASSES = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}
IMPL_FLAGS: dict[str, dict[str, Any]] = {"single": {"foreach": False}, "foreach": {"foreach": True},
                                         "fused": {"fused": True}, "default": {}}
FAST = ("foreach", "fused", "flat", "flat-single", "default")


def _fused_sgd_refused(kind: str, dtype: torch.dtype, impl: str) -> bool:
    """torch 2.13's CPU fused SGD kernel leaves the vectorized blocks of a bfloat16 (or float16)
    parameter unchanged (pytorch/pytorch#191763), so descend refuses ``fused=True`` there and its
    default takes foreach; see test_sgd_bf16_default_updates_every_element."""
    return kind == "SGD" and dtype == torch.bfloat16 and impl == "fused"


# --- strategies ----------------------------------------------------------------------------------

shapes = st.one_of(
    st.lists(st.integers(0, 5), max_size=3).map(tuple),  # scalars and zero-size included
    st.tuples(st.integers(16, 40)),  # a fused kernel's vectorized loop and its remainder
    st.tuples(st.integers(2, 4), st.integers(8, 12)),
)
lrs = st.one_of(st.just(0.0), st.floats(1e-4, 0.3))
weight_decays = st.one_of(st.just(0.0), st.floats(0.0, 0.5))
l1s = st.one_of(st.just(0.0), st.floats(0.0, 0.05))


@st.composite
def sgd_options(draw: st.DrawFn, torch_compatible: bool = False) -> dict[str, Any]:
    momentum = draw(st.one_of(st.just(0.0), st.just(0.9), st.floats(0.0, 0.99)))
    dampening = draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0)))
    options = dict(lr=draw(lrs), momentum=momentum, dampening=dampening,
                   nesterov=momentum > 0 and dampening == 0 and draw(st.booleans()),
                   weight_decay=draw(weight_decays), maximize=draw(st.booleans()))
    if not torch_compatible:
        options.update(l1=draw(l1s), decay=draw(st.sampled_from(DECAY_MODES)))
    return options


@st.composite
def adam_options(draw: st.DrawFn, torch_compatible: bool = False) -> dict[str, Any]:
    options = dict(lr=draw(lrs), betas=(draw(st.floats(0.0, 0.99)), draw(st.floats(0.0, 0.9999))),
                   eps=draw(st.floats(1e-10, 1e-3)), weight_decay=draw(weight_decays),
                   amsgrad=draw(st.booleans()), maximize=draw(st.booleans()))
    if not torch_compatible:
        options.update(l1=draw(l1s), decay=draw(st.sampled_from(DECAY_MODES)))
    return options


def options_for(kind: str, torch_compatible: bool = False) -> st.SearchStrategy[dict[str, Any]]:
    return sgd_options(torch_compatible) if kind == "SGD" else adam_options(torch_compatible)


@st.composite
def problems(draw: st.DrawFn, kind: str, torch_compatible: bool = False,
             dtypes: list[torch.dtype] = DTYPES) -> dict[str, Any]:
    """Parameters, their groups (each with its own options) and the gradients of each step."""
    dtype = draw(st.sampled_from(dtypes))
    param_shapes = draw(st.lists(shapes, min_size=1, max_size=4))
    n = len(param_shapes)
    assignment = draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    layout = [[i for i in range(n) if assignment[i] == g] for g in sorted(set(assignment))]
    group_options = [draw(options_for(kind, torch_compatible)) for _ in layout]
    steps = draw(st.integers(1, 4))
    missing = draw(st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=steps, max_size=steps))
    seed = draw(st.integers(0, 2**31 - 1))
    grad_scale = draw(st.sampled_from([1e-3, 1.0, 10.0]))
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in param_shapes]
    grads = [[None if missing[t][i] and t % 2 else (torch.randn(s, generator=g, dtype=torch.float64) * grad_scale
                                                    ).to(dtype)
              for i, s in enumerate(param_shapes)] for t in range(steps)]
    return dict(dtype=dtype, params=params, layout=layout, options=group_options, grads=grads)


def setup(make: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
          problem: dict[str, Any]) -> tuple[list[Tensor], torch.optim.Optimizer]:
    params = [p.clone().requires_grad_() for p in problem["params"]]
    groups = [{"params": [params[i] for i in idx], **opts} for idx, opts in zip(problem["layout"], problem["options"])]
    return params, make(groups)


def step_with(params: list[Tensor], opt: torch.optim.Optimizer, grads: list[Tensor | None]) -> None:
    for p, grad in zip(params, grads):
        p.grad = None if grad is None else grad.clone()
    opt.step()


def run(make: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
        problem: dict[str, Any]) -> tuple[list[Tensor], torch.optim.Optimizer]:
    """Every step of ``problem``; the final parameters and the optimizer."""
    params, opt = setup(make, problem)
    for grads in problem["grads"]:
        step_with(params, opt, grads)
    return [p.detach().clone() for p in params], opt


def make_descend(kind: str, impl: str, **kwargs: Any) -> Callable[[list[dict[str, Any]]], torch.optim.Optimizer]:
    cls = CLASSES[kind]
    if impl.startswith("flat"):
        flags = {"flat": True, **({"foreach": False} if impl == "flat-single" else {})}
        return lambda groups: cls(groups, **flags, **kwargs)
    return lambda groups: cls([{**g, **IMPL_FLAGS[impl]} for g in groups], **kwargs)


def same(a: Tensor, b: Tensor) -> bool:
    """Bit for bit, NaN equal to NaN."""
    return a.dtype == b.dtype and a.shape == b.shape and (
        torch.equal(a, b) or bool(((a == b) | (a.isnan() & b.isnan())).all()))


def sensitivity(kind: str, problem: dict[str, Any], ref_opt: torch.optim.Optimizer, ref_params: list[Tensor],
                before: list[Tensor], grads: list[Tensor | None]) -> list[Tensor]:
    """Per element, how far a rounding of the effective gradient g + λθ + λ₁·sgn(θ) can move the
    update (both paths round it differently): lr times its size for SGD (and the momentum
    buffer's, which it joins), and 2·lr·|g_eff| / (√v̂ + eps) for Adam, whose update divides by
    √v̂ + eps. Where v̂ is tiny this is large, and rightly so: with β₂ = 0 and a small eps the
    update is lr·sgn(g) (sign descent), which a rounding of g ≈ 0 can flip."""
    options = {i: o for idx, o in zip(problem["layout"], problem["options"]) for i in idx}
    out = []
    for i, (p, theta, grad) in enumerate(zip(ref_params, before, grads)):
        if grad is None:
            out.append(torch.zeros_like(theta))
            continue
        o, state = options[i], ref_opt.state.get(p, {})
        coupled = o["decay"] == "coupled"
        g = grad.double().abs() + ((o["weight_decay"] * theta.abs() + o["l1"]) if coupled else 0.0)
        if kind == "SGD":
            buf = state.get("momentum_buffer")
            out.append(o["lr"] * (g + (o["momentum"] * buf.double().abs() if buf is not None else 0.0)))
        else:
            v_hat = state["exp_avg_sq"].double() / (1 - o["betas"][1] ** float(state["step"]))
            out.append(2 * o["lr"] * g / (v_hat.sqrt() + o["eps"]))
    return out


def excess(ours: list[Tensor], ref: list[Tensor], before: list[Tensor], extra: list[Tensor],
           dtype: torch.dtype) -> float:
    """max |Δ| / (ε·S) over every element, S = |θ_{t−1}| + |θ_t − θ_{t−1}| + the update's
    sensitivity to a rounding of its gradient (:func:`sensitivity`), in the reference; 0 when equal."""
    worst = 0.0
    for a, b, b0, e in zip(ours, ref, before, extra):
        if a.numel() == 0:
            continue
        a64, b64 = a.detach().double(), b.detach().double()
        diff = torch.where(a64.isnan() & b64.isnan(), 0.0, (a64 - b64).abs())
        size = b0.abs() + (b64 - b0).abs() + e
        worst = max(worst, (diff / (EPS[dtype] * size).clamp_min(1e-300)).max().item())
    return worst


def state_tensors(opt: torch.optim.Optimizer) -> list[tuple[str, Tensor]]:
    out = []
    for index, entry in sorted(opt.state_dict()["state"].items()):
        for key, value in sorted(entry.items()):
            if isinstance(value, Tensor):
                out.append((f"{index}.{key}", value))
    return out


# --- 1. fast implementations equal the reference --------------------------------------------------


@pytest.mark.parametrize("kind", FIRST_ORDER)
@settings(max_examples=examples(60))
@given(data=st.data())
def test_fast_implementation_equals_reference(kind: str, data: st.DataObject) -> None:
    problem = data.draw(problems(kind), label="problem")
    dtype = problem["dtype"]
    impl = data.draw(st.sampled_from([i for i in FAST if not _fused_sgd_refused(kind, dtype, i)]), label="impl")
    exact = impl in ("foreach", "flat-single") and dtype != torch.bfloat16
    ref_params, ref_opt = setup(make_descend(kind, "single"), problem)
    params, opt = setup(make_descend(kind, impl), problem)
    largest = 0.0
    for t, grads in enumerate(problem["grads"]):
        if not exact and t:
            # each step from the reference's parameters and state: rounding differences of earlier
            # steps are not carried (a step can amplify them without bound, e.g. Adam with β₂ = 0
            # divides by |g + λθ|, which cancels)
            with torch.no_grad():
                for p, q in zip(params, ref_params):
                    p.copy_(q)
            opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
        before = [q.detach().to(torch.float64, copy=True) for q in ref_params]
        step_with(ref_params, ref_opt, grads)
        step_with(params, opt, grads)
        ours_state, ref_state = state_tensors(opt), state_tensors(ref_opt)
        assert [k for k, _ in ours_state] == [k for k, _ in ref_state]
        for (key, a), (_, b) in zip(ours_state, ref_state):
            assert a.shape == b.shape and a.dtype == b.dtype, key
        if exact:
            for a, b in zip(params, ref_params):
                assert same(a.detach(), b.detach())
            for (key, a), (_, b) in zip(ours_state, ref_state):
                assert same(a, b), key
            continue
        extra = sensitivity(kind, problem, ref_opt, ref_params, before, grads)
        worst = excess(params, ref_params, before, extra, dtype)
        note(f"step {t}, {impl} {dtype}: max |Δ|/(ε·S) = {worst:.3g}")
        assert worst <= C_FUSED[dtype], worst
        largest = max(largest, worst)
        for (key, a), (_, b) in zip(ours_state, ref_state):
            if key.endswith(".step"):
                assert torch.equal(a, b), key
            elif a.numel():
                scale = b.double().abs().max().item() + a.double().abs().max().item()
                assert (a.double() - b.double()).abs().max().item() <= 16 * EPS[dtype] * scale, key
    if not exact:
        target(largest, label=f"|Δ|/(ε·S) {dtype}")  # steer the search towards the largest differences


# --- 2. torch parity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FIRST_ORDER)
@settings(max_examples=examples(60))
@given(data=st.data())
def test_equals_torch_with_the_same_implementation(kind: str, data: st.DataObject) -> None:
    problem = data.draw(problems(kind, torch_compatible=True), label="problem")
    impl = data.draw(st.sampled_from([i for i in ("single", "foreach", "fused")
                                      if not _fused_sgd_refused(kind, problem["dtype"], i)]), label="impl")
    ours, opt = run(make_descend(kind, impl), problem)
    torch_cls = TORCH_CLASSES[kind]
    theirs, their_opt = run(lambda groups: torch_cls([{**g, **IMPL_FLAGS[impl]} for g in groups]), problem)
    for a, b in zip(ours, theirs):
        assert same(a, b)
    ours_state, their_state = state_tensors(opt), state_tensors(their_opt)
    assert [k for k, _ in ours_state] == [k for k, _ in their_state]
    for (key, a), (_, b) in zip(ours_state, their_state):
        assert same(a, b), key


# --- regressions found by the properties above -------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("flat", [False, True])
def test_sgd_16bit_default_updates_every_element(flat: bool, dtype: torch.dtype) -> None:
    """torch 2.13's fused SGD kernel on the CPU leaves every complete SIMD block of a 16-bit
    parameter unchanged (pytorch/pytorch#191763, fixed upstream by pytorch/pytorch#192545);
    descend's default must not pick it, and fused=True must refuse it rather than not train."""
    p = torch.ones(64, dtype=dtype, requires_grad=True)
    p.grad = torch.ones(64, dtype=dtype)
    descend.SGD([p], lr=0.25, momentum=0.5, flat=flat).step()
    assert torch.equal(p.detach(), torch.full((64,), 0.75, dtype=dtype))
    q = torch.ones(64, dtype=dtype, requires_grad=True)
    q.grad = torch.ones(64, dtype=dtype)
    opt = descend.SGD([q], lr=0.25, fused=True)
    with pytest.raises(RuntimeError, match="fused=True"):
        opt.step()
    assert torch.equal(q.detach(), torch.ones(64, dtype=dtype)) and not opt.state


def test_sgd_foreach_momentum_equals_torch_in_bf16() -> None:
    """descend's foreach SGD once updated momentum buffers one tensor at a time, torch's with
    _foreach_mul_/_foreach_add_, which round differently for small bfloat16 tensors."""
    grads = [torch.tensor([-0.0021820068359375, 0.000568389892578125], dtype=torch.bfloat16),
             torch.tensor([-0.0010833740234375, -0.00139617919921875], dtype=torch.bfloat16)]
    buffers = []
    for cls in (descend.SGD, torch.optim.SGD):
        p = torch.tensor([1.5, -0.25], dtype=torch.bfloat16, requires_grad=True)
        opt = cls([p], lr=0.0, momentum=0.9, foreach=True)
        for grad in grads:
            p.grad = grad.clone()
            opt.step()
        buffers.append(opt.state[p]["momentum_buffer"])
    assert torch.equal(buffers[0], buffers[1]), buffers


# --- 3. invalid values raise ValueError ------------------------------------------------------------------

not_numbers = st.one_of(st.text(max_size=3), st.none(), st.booleans(), st.just([0.1]), st.just(1j),
                        st.just(torch.tensor([0.1, 0.2])))
non_finite = st.sampled_from([math.nan, math.inf, -math.inf])
negative = st.floats(max_value=-1e-300, allow_infinity=False, allow_nan=False)
not_a_mode = st.text(max_size=8)


def at_least_one(low: float, high_exclusive: bool = True) -> st.SearchStrategy[float]:
    return st.floats(min_value=low, exclude_min=not high_exclusive, allow_nan=False, allow_infinity=False)


def bad_ints(low: int) -> st.SearchStrategy[Any]:
    """Not an integer >= low (None is not here: it is valid for max_eval and restart_every)."""
    return st.one_of(st.integers(max_value=low - 1), st.floats(allow_nan=True), st.booleans(), st.text(max_size=2))


#: for each optimizer: argument → strategy of invalid values (options that are invalid only in
#: combination are given as several arguments at once, as a dict)
INVALID: dict[str, dict[str, st.SearchStrategy[Any]]] = {}
_common: dict[str, st.SearchStrategy[Any]] = {
    "lr": st.one_of(negative, non_finite, not_numbers),
    "weight_decay": st.one_of(negative, non_finite, not_numbers),
    "l1": st.one_of(negative, non_finite, not_numbers),
    "decay": not_a_mode.filter(lambda s: s not in DECAY_MODES),
    "nonfinite": st.one_of(st.text(max_size=6).filter(lambda s: s not in ("ignore", "skip", "raise")), st.none()),
}
not_a_flag = st.one_of(st.text(max_size=3), st.integers(), st.floats(allow_nan=False), st.just([True]))
_flags: dict[str, st.SearchStrategy[Any]] = {
    "maximize": st.one_of(not_a_flag, st.none()),
    "foreach": not_a_flag,  # None is valid: choose
    "fused": not_a_flag,
    "flat": st.one_of(not_a_flag, st.none()),
}
INVALID["SGD"] = {
    **_common,
    **_flags,
    "nesterov+momentum": st.builds(lambda v: {"nesterov": v, "momentum": 0.9}, st.one_of(not_a_flag, st.none())),
    "momentum": st.one_of(negative, at_least_one(1.0), non_finite, not_numbers),
    "dampening": st.one_of(negative, at_least_one(1.0, high_exclusive=False), non_finite, not_numbers),
    "nesterov": st.one_of(st.builds(lambda d: {"nesterov": True, "momentum": 0.9, "dampening": d},
                                    st.floats(1e-6, 1.0)),
                          st.just({"nesterov": True, "momentum": 0.0})),
    "weight_decay+fixed": st.builds(lambda wd: {"weight_decay": wd, "decay": "fixed"}, at_least_one(1.0)),
}
INVALID["Adam"] = INVALID["AdamW"] = {
    **_common,
    **_flags,
    "amsgrad": st.one_of(not_a_flag, st.none()),
    "betas": st.one_of(
        st.builds(lambda b: (b, 0.999), st.one_of(negative, at_least_one(1.0), non_finite, not_numbers)),
        st.builds(lambda b: (0.9, b), st.one_of(negative, at_least_one(1.0), non_finite, not_numbers)),
        st.sampled_from([(0.9,), (0.9, 0.99, 0.999), 0.9, "ab", None])),
    "eps": st.one_of(negative, non_finite, not_numbers),
    "weight_decay+fixed": st.builds(lambda wd: {"weight_decay": wd, "decay": "fixed"}, at_least_one(1.0)),
}
_closure: dict[str, st.SearchStrategy[Any]] = {
    "lr": st.one_of(negative, non_finite, not_numbers),
    "weight_decay": st.one_of(negative, non_finite, not_numbers),
    "max_iter": st.one_of(bad_ints(1), st.none()),
    "max_eval": bad_ints(1),
    "tolerance_grad": st.one_of(negative, non_finite, not_numbers),
    "tolerance_change": st.one_of(negative, non_finite, not_numbers),
    "line_search_fn": st.text(max_size=12).filter(lambda s: s != "strong_wolfe"),
    "c1": st.one_of(st.floats(max_value=0.0), at_least_one(1.0), non_finite, not_numbers),
    "c2": st.one_of(st.floats(-1.0, 1e-4), at_least_one(1.0), non_finite, not_numbers),
    "l1": st.one_of(st.floats(1e-6, 1.0), negative, non_finite),
    "decay": st.one_of(st.sampled_from([m for m in DECAY_MODES if m != "coupled"]), not_a_mode),
    "maximize": st.one_of(st.integers(), st.text(max_size=3), st.none()),
}
INVALID["LBFGS"] = {**_closure, "history_size": st.one_of(bad_ints(1), st.none())}
INVALID["CG"] = {
    **_closure,
    "beta": st.one_of(st.text(max_size=4).filter(lambda s: s not in descend.solvers.cg.BETAS), st.none()),
    "restart": st.text(max_size=8).filter(lambda s: s != "powell"),
    "restart_every": bad_ints(1),
}
CASES = [(kind, arg) for kind, table in INVALID.items() for arg in table]


def _closure_for(params: list[Tensor]) -> Callable[[], Tensor]:
    def closure() -> Tensor:
        for p in params:
            p.grad = None
        loss = sum(((p - 1.0) ** 2).sum() for p in params)
        loss.backward()  # type: ignore[union-attr]
        return loss  # type: ignore[return-value]

    return closure


def _step(opt: torch.optim.Optimizer, params: list[Tensor], closure_solver: bool) -> None:
    if closure_solver:
        opt.step(_closure_for(params))
    else:
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()


@pytest.mark.parametrize(("kind", "arg"), CASES, ids=[f"{k}-{a}" for k, a in CASES])
@settings(max_examples=examples(15))
@given(data=st.data())
def test_invalid_value_raises_value_error_and_changes_nothing(kind: str, arg: str, data: st.DataObject) -> None:
    value = data.draw(INVALID[kind][arg], label=arg)
    options = dict(value) if isinstance(value, dict) else {arg: value}
    name = arg.split("+")[0]
    cls = CLASSES[kind]
    closure_solver = kind in ("LBFGS", "CG")
    params = [torch.randn(3, dtype=torch.float64).requires_grad_(), torch.randn(2, dtype=torch.float64).requires_grad_()]
    with pytest.raises(ValueError, match=name):
        cls(params, **options)
    if name in ("nonfinite", "flat"):
        return  # optimizer-wide arguments, not group options
    opt = cls(params[:1])
    groups_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    with pytest.raises(ValueError, match=name):
        opt.add_param_group({"params": params[1:], **options})
    assert len(opt.param_groups) == 1
    assert repr([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]) == repr(groups_before)
    # a group edited by hand is checked again before each step, and the step changes nothing
    opt = cls([{"params": params[:1]}, {"params": params[1:]}])
    _step(opt, params, closure_solver)
    opt.param_groups[-1].update(options)
    values = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict()["state"])
    with pytest.raises(ValueError, match=name):
        _step(opt, params, closure_solver)
    assert all(torch.equal(v, p) for v, p in zip(values, params))
    assert repr(opt.state_dict()["state"]) == repr(state)


# --- 4. random sequences of calls ----------------------------------------------------------------------

OPERATIONS = ("step", "step", "step", "step_nonfinite", "zero_grad", "zero_grad_keep", "state_dict",
              "load_first", "load_last", "round_trip", "add_param_group")


def _closure_loss(params: list[Tensor], seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros((), dtype=torch.float64)
    for p in params:
        target = torch.randn(p.shape, generator=g, dtype=torch.float64)
        total = total + ((p - target) ** 2).sum() + 0.1 * (p**4).sum()
    return total


class Twin:
    """An optimizer over its own copy of the parameters, driven by a sequence of operations."""

    def __init__(self, kind: str, impl: str, options: dict[str, Any], shapes: list[tuple[int, ...]]) -> None:
        self.kind, self.impl, self.closure_solver = kind, impl, kind in ("LBFGS", "CG")
        g = torch.Generator().manual_seed(0)
        self.params = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]
        # first-order optimizers skip non-finite steps, so that a poisoned step is part of the sequence
        self.make = (make_descend(kind, impl, nonfinite="skip") if not self.closure_solver
                     else (lambda gr: CLASSES[kind](gr, max_iter=3)))
        self.options = options
        self.opt = self.make([{"params": list(self.params), **options}])
        self.snapshots: list[dict[str, Any]] = []

    def step(self, seed: int, poison: bool = False) -> None:
        if self.closure_solver:
            def closure() -> Tensor:
                self.opt.zero_grad()
                loss = _closure_loss(self.params, seed)
                loss.backward()
                return loss

            self.opt.step(closure)
            return
        g = torch.Generator().manual_seed(seed)
        for i, p in enumerate(self.params):
            if (seed + i) % 3 == 0:
                continue  # this parameter's gradient is left as it is (None after zero_grad())
            grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.grad = grad if p.grad is None else p.grad + grad
        if poison:
            target = self.params[seed % len(self.params)]
            if target.numel():
                if target.grad is None:
                    target.grad = torch.zeros_like(target)
                target.grad.view(-1)[0] = math.nan
        self.opt.step()

    def add_param_group(self, shape: tuple[int, ...], options: dict[str, Any]) -> None:
        p = torch.randn(shape, generator=torch.Generator().manual_seed(len(self.params)),
                        dtype=torch.float64).requires_grad_()
        self.params.append(p)
        self.opt.add_param_group({"params": [p], **options})

    def load(self, sd: dict[str, Any]) -> str:
        """'ok', or 'rejected' (ValueError) having checked that the rejection changed nothing."""
        before = copy.deepcopy(self.opt.state_dict())
        try:
            self.opt.load_state_dict(copy.deepcopy(sd))
        except ValueError:
            assert repr(self.opt.state_dict()) == repr(before)
            return "rejected"
        return "ok"

    def check_consistent(self) -> None:
        """Every state entry belongs to a parameter of a group and fits it."""
        known = {id(p) for g in self.opt.param_groups for p in g["params"]}
        for p, state in self.opt.state.items():
            assert id(p) in known
            if self.closure_solver:
                continue
            allowed = type(self.opt).state_spec.keys  # type: ignore[attr-defined]
            assert set(state) <= set(allowed), state.keys()
            for key, value in state.items():
                assert isinstance(value, Tensor), key
                if key == "step":
                    assert value.dim() == 0 and value.dtype == torch.float32
                else:
                    assert value.shape == p.shape and value.dtype == p.dtype, key


def _group_options(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    if kind in ("LBFGS", "CG"):
        return st.builds(lambda wd: {"weight_decay": wd}, st.one_of(st.just(0.0), st.floats(0.0, 0.1)))
    if kind == "SGD":
        return sgd_options()
    return adam_options()


@pytest.mark.parametrize("kind", list(CLASSES))
@settings(max_examples=examples(25))
@given(data=st.data())
def test_random_call_sequences_never_leave_the_optimizer_inconsistent(kind: str, data: st.DataObject) -> None:
    closure_solver = kind in ("LBFGS", "CG")
    impl = "single" if closure_solver else data.draw(st.sampled_from(FAST), label="impl")
    first_shapes = data.draw(st.lists(st.lists(st.integers(0, 4), max_size=2).map(tuple), min_size=1, max_size=3),
                             label="shapes")
    options = data.draw(_group_options(kind), label="options")
    if closure_solver and not any(math.prod(s) for s in first_shapes):
        first_shapes = [*first_shapes, (2,)]  # a closure solver over no numbers at all fails in max() (as torch's)
    ops = data.draw(st.lists(st.sampled_from(OPERATIONS), min_size=1, max_size=12), label="operations")
    subject, reference = Twin(kind, impl, options, first_shapes), Twin(kind, "single", options, first_shapes)
    for i, op in enumerate(ops):
        seed = 17 * i + 3
        if op in ("step", "step_nonfinite"):
            for t in (subject, reference):
                t.step(seed, poison=op == "step_nonfinite" and not closure_solver)
        elif op in ("zero_grad", "zero_grad_keep"):
            for t in (subject, reference):
                t.opt.zero_grad(set_to_none=op == "zero_grad")
        elif op == "state_dict":
            for t in (subject, reference):
                t.snapshots.append(copy.deepcopy(t.opt.state_dict()))
        elif op in ("load_first", "load_last"):
            if not subject.snapshots:
                continue
            k = 0 if op == "load_first" else -1
            outcomes = {t.load(t.snapshots[k]) for t in (subject, reference)}
            assert len(outcomes) == 1, outcomes  # both accept, or both reject
        elif op == "round_trip":
            for t in (subject, reference):
                buffer = io.BytesIO()
                torch.save(t.opt.state_dict(), buffer)
                buffer.seek(0)
                assert t.load(torch.load(buffer, weights_only=True)) == "ok"
        elif op == "add_param_group":
            shape = data.draw(st.lists(st.integers(0, 4), max_size=2).map(tuple), label="new shape")
            group = data.draw(_group_options(kind), label="new group")
            for t in (subject, reference):
                t.add_param_group(shape, group)
        for t in (subject, reference):
            t.check_consistent()
        assert subject.opt.skipped_steps == reference.opt.skipped_steps  # type: ignore[attr-defined]
        for a, b in zip(subject.params, reference.params):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12, equal_nan=True)

    # the final state, saved and loaded (weights only) into a fresh optimizer, continues bit for bit
    buffer = io.BytesIO()
    torch.save(subject.opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    # (built over copies of the shapes: a closure solver without parameters is refused)
    fresh = Twin(kind, subject.impl, dict(subject.options), [tuple(p.shape) for p in subject.params])
    fresh.params = [p.detach().clone().requires_grad_() for p in subject.params]
    index = {id(p): i for i, p in enumerate(subject.params)}
    groups = [{**{k: v for k, v in g.items() if k not in ("params", "base_lr", "initial_lr")},
               "params": [fresh.params[index[id(p)]] for p in g["params"]]}
              for g in subject.opt.param_groups]
    fresh.opt = fresh.make(groups)
    fresh.opt.load_state_dict(saved)
    for t in (subject, fresh):
        t.opt.zero_grad()
        t.step(10_001)
    for a, b in zip(subject.params, fresh.params):
        assert same(a.detach(), b.detach())
    assert [k for k, _ in state_tensors(subject.opt)] == [k for k, _ in state_tensors(fresh.opt)]
    for (key, a), (_, b) in zip(state_tensors(subject.opt), state_tensors(fresh.opt)):
        assert same(a, b), key
