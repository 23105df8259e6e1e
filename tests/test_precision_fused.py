"""Adam and AdamW on low-precision storage in one compiled pass (descend.precision_fused):
equal to the general low-precision path to rounding, taken exactly where it applies, the
closed-form decay on bfloat16 parameters, bit-exact resume, and the general path where no
compiler works."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

import descend
from descend import precision, precision_fused, regularization
from descend.optimizer import GroupBatch

pytestmark = pytest.mark.skipif(precision.COMPILE_NUMEL == 0, reason="DESCEND_COMPILE=0")

BIG = (256, 300)  # at least precision.COMPILE_NUMEL elements, whole 8-bit blocks: the compiled pass
SMALL = (10,)  # the general path
LR, STEPS = 1e-3, 6

CASES: dict[str, tuple[Callable[..., torch.optim.Optimizer], dict[str, Any], torch.dtype]] = {
    "AdamW, float32 params, bfloat16 state": (descend.AdamW, dict(weight_decay=0.1, state_dtype=torch.bfloat16),
                                              torch.float32),
    "Adam coupled, float32 params, bfloat16 state": (descend.Adam, dict(weight_decay=0.1,
                                                                        state_dtype=torch.bfloat16), torch.float32),
    "AdamW independent, float16 state": (descend.AdamW, dict(weight_decay=1e-4, decay="independent",
                                                             state_dtype=torch.float16), torch.float32),
    "AdamW, bfloat16 params, compensated": (descend.AdamW, dict(weight_decay=0.1, rounding="compensated"),
                                            torch.bfloat16),
    "AdamW, bfloat16 params, compensated, float32 state": (
        descend.AdamW, dict(weight_decay=0.1, rounding="compensated", state_dtype=torch.float32), torch.bfloat16),
    "AdamW, bfloat16 params, nearest, float32 state": (descend.AdamW, dict(weight_decay=0.1,
                                                                           state_dtype=torch.float32), torch.bfloat16),
    "AdamW, float32 params, 8bit state": (descend.AdamW, dict(weight_decay=0.1, state_dtype="8bit"), torch.float32),
    "Adam coupled, float32 params, 8bit state": (descend.Adam, dict(weight_decay=0.1, state_dtype="8bit"),
                                                 torch.float32),
    "AdamW, bfloat16 params, compensated, 8bit state": (
        descend.AdamW, dict(weight_decay=0.1, rounding="compensated", state_dtype="8bit"), torch.bfloat16),
}


def _params(dtype: torch.dtype, shapes: tuple[tuple[int, ...], ...] = (BIG, SMALL)) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _grads(params: list[torch.nn.Parameter], step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(p.dtype)


def _run(make: Callable[..., torch.optim.Optimizer], kw: dict[str, Any], dtype: torch.dtype, *, flat: bool = False,
         steps: int = STEPS, shapes: tuple[tuple[int, ...], ...] = (BIG, SMALL)
         ) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    params = _params(dtype, shapes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (decay erased by rounding: the point of some cases)
        opt = make(params, lr=LR, flat=flat, **kw)
    for step in range(steps):
        _grads(params, step)
        opt.step()
    return params, opt


class _Spy:
    """Counts the tensors the compiled passes stepped and the calls of each pass, and notes
    whether each asked for emulated 16-bit rounding, and in which lanes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.exact_casts: set[bool] = set()
        self.lanes: set[torch.dtype | None] = set()
        kernel = precision._kernel

        self.calls_by_fn: dict[str, int] = {}
        singles = (precision_fused._adam_pass, precision_fused._adam_8bit_pass)
        chunks = (precision_fused._adam_passes, precision_fused._adam_8bit_passes)

        def spying(fn: Callable[..., Any], numel: int, *, exact_casts: bool = True,
                   lanes: torch.dtype | None = None) -> Callable[..., Any]:
            compiled = kernel(fn, numel, exact_casts=exact_casts, lanes=lanes)
            if fn not in singles + chunks:
                return compiled
            self.exact_casts.add(exact_casts)
            self.lanes.add(lanes)

            def counting(*args: Any) -> Any:
                self.calls += len(args[0]) if fn in chunks else 1  # (the tensors stepped)
                self.calls_by_fn[fn.__name__] = self.calls_by_fn.get(fn.__name__, 0) + 1
                return compiled(*args)

            return counting

        monkeypatch.setattr(precision, "_kernel", spying)


@pytest.fixture
def general_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[bool], None]]:
    def use(general: bool) -> None:
        monkeypatch.setattr(precision_fused, "ENABLED", not general)

    yield use


def _stored_ulp(x: Tensor) -> Tensor:
    """The spacing of x's dtype at each |x| (for 16-bit: 2^(exponent − mantissa bits))."""
    info = torch.finfo(x.dtype)
    mag = x.float().abs().clamp(min=info.tiny)
    return torch.exp2(torch.floor(torch.log2(mag)) - (-math.log2(info.eps)))


@pytest.mark.parametrize(("case", "flat"), [(c, f) for c in CASES for f in (False, True)
                                            if not (f and CASES[c][1].get("state_dtype") == "8bit")])  # (refused)
def test_equals_the_general_path_to_rounding(case: str, flat: bool, general_path: Callable[[bool], None],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    make, kw, dtype = CASES[case]
    general_path(True)
    ref, ref_opt = _run(make, kw, dtype, flat=flat)
    general_path(False)
    spy = _Spy(monkeypatch)
    got, opt = _run(make, kw, dtype, flat=flat)
    assert spy.calls >= STEPS - 1  # (the big tensor, or the flat buffer, from the second step on at least)
    # Kahan's remainder w − rn(w) needs rounding as eager torch rounds; a pass that casts to
    # 16 bits only to store goes without the emulation (and its cost)
    assert spy.exact_casts == {kw.get("rounding") == "compensated" and dtype != torch.float32}
    # the loops of a 16-bit pass run in its 16-bit lanes (descend.lanes); an 8-bit pass's as inductor decides
    state_dtype = kw.get("state_dtype") or dtype
    assert spy.lanes == {None if state_dtype == "8bit" else state_dtype if state_dtype != torch.float32 else dtype}
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == b.dtype
        # a float32 difference can round a 16-bit stored moment to its other neighbour: a
        # step then differs by at most a few percent of lr
        assert (a.detach().double() - b.detach().double()).abs().max().item() <= 0.05 * LR * STEPS
    for p_a, p_b in zip(got, ref, strict=True):
        sa, sb = opt.state[p_a], ref_opt.state[p_b]
        assert sa.keys() == sb.keys()
        for key in sa:
            x, y = sa[key], sb[key]
            assert x.dtype == y.dtype, key
            if key == "step":
                assert torch.equal(x, y)
            elif key == precision.COMPENSATION:
                # the rounding remainder: what must agree is the value θ + c it completes
                value_a, value_b = p_a.detach().float() + x.float(), p_b.detach().float() + y.float()
                assert (value_a - value_b).abs().max().item() <= 0.05 * LR * STEPS
            elif x.dtype == torch.uint8:
                # 8-bit codes: a float32 difference can land a value on the neighbouring level
                apart = (x.int() - y.int()).abs()
                assert apart.max().item() <= 1 and apart.count_nonzero().item() <= 1e-3 * apart.numel(), key
            elif x.dtype in (torch.bfloat16, torch.float16):
                # (near zero, where the spacing vanishes, a float32 difference of the inputs shows)
                bound = 2 * _stored_ulp(y) + 1e-6 * y.float().abs().max()
                assert ((x.float() - y.float()).abs() <= bound).all(), key
            else:
                assert torch.allclose(x.double(), y.double(), rtol=1e-3, atol=1e-6), key


OFF_PATH = {
    "8bit state, a ragged last block": dict(state_dtype="8bit", shape=(301, 300)),
    "l1": dict(state_dtype=torch.bfloat16, l1=1e-4),
    "amsgrad": dict(state_dtype=torch.bfloat16, amsgrad=True),
    "foreach": dict(state_dtype=torch.bfloat16, foreach=True),
    "for-loop": dict(state_dtype=torch.bfloat16, foreach=False),
    "tensor lr": dict(state_dtype=torch.bfloat16, lr=torch.tensor(LR)),
    "maximize": dict(state_dtype=torch.bfloat16, maximize=True),
    "float32 everything": dict(),
}


@pytest.mark.parametrize("case", list(OFF_PATH))
def test_not_taken_where_the_step_is_more_than_its_formula(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    kw = dict(OFF_PATH[case])
    lr = kw.pop("lr", LR)
    spy = _Spy(monkeypatch)
    params = _params(torch.float32, (kw.pop("shape", BIG), SMALL))
    opt = descend.AdamW(params, lr=lr, weight_decay=0.1, **kw)
    for step in range(3):
        _grads(params, step)
        opt.step()
    assert spy.calls == 0


def test_stochastic_rounding_and_small_tensors_take_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _Spy(monkeypatch)
    _run(descend.AdamW, dict(rounding="stochastic"), torch.bfloat16)
    _run(descend.AdamW, dict(state_dtype=torch.bfloat16), torch.float32, shapes=(SMALL, (100, 100)))
    assert spy.calls == 0


@pytest.mark.parametrize(("kw", "shapes", "per_step"), [
    (dict(state_dtype=torch.bfloat16), (BIG, SMALL, (1,)), 2),  # (a single element: the general path)
    (dict(rounding="compensated"), (BIG, SMALL), 2),
    (dict(state_dtype="8bit"), (BIG, (512,), (256,), SMALL), 2),  # (two whole blocks at least)
])
def test_small_tensors_ride_along_with_a_large_one(kw: dict[str, Any], shapes: tuple[tuple[int, ...], ...],
                                                   per_step: int, monkeypatch: pytest.MonkeyPatch,
                                                   general_path: Callable[[bool], None]) -> None:
    dtype = torch.bfloat16 if "rounding" in kw else torch.float32
    general_path(True)
    ref, _ = _run(descend.AdamW, dict(weight_decay=0.1, **kw), dtype, shapes=shapes)
    general_path(False)
    spy = _Spy(monkeypatch)
    got, _ = _run(descend.AdamW, dict(weight_decay=0.1, **kw), dtype, shapes=shapes)
    assert spy.calls in (per_step * STEPS, per_step * (STEPS - 1))  # (every step, or all but the first)
    for a, b in zip(got, ref, strict=True):
        assert (a.detach().double() - b.detach().double()).abs().max().item() <= 0.05 * LR * STEPS


@pytest.mark.parametrize("case", ["AdamW, float32 params, bfloat16 state", "AdamW, bfloat16 params, compensated",
                                  "AdamW, float32 params, 8bit state"])
def test_tensors_go_in_fours_and_the_rest_one_by_one(case: str, monkeypatch: pytest.MonkeyPatch,
                                                     general_path: Callable[[bool], None]) -> None:
    """Six tensors that the pass takes: one call steps four of them, two calls the others, and
    the result is the general path's to rounding."""
    make, kw, dtype = CASES[case]
    shapes = (BIG, (512,), (1024,), (768,), (256, 4), (2, 256))
    assert precision_fused.CHUNK == 4
    general_path(True)
    ref, _ = _run(make, kw, dtype, shapes=shapes)
    general_path(False)
    spy = _Spy(monkeypatch)
    got, _ = _run(make, kw, dtype, shapes=shapes)
    passes = ("_adam_8bit_passes", "_adam_8bit_pass") if kw.get("state_dtype") == "8bit" else ("_adam_passes", "_adam_pass")
    counted = [spy.calls_by_fn.get(name, 0) for name in passes]
    assert counted in ([STEPS, 2 * STEPS], [STEPS - 1, 2 * (STEPS - 1)])  # (every step, or all but the first)
    assert spy.calls == 6 * counted[0]
    for a, b in zip(got, ref, strict=True):
        assert (a.detach().double() - b.detach().double()).abs().max().item() <= 0.05 * LR * STEPS


def test_a_call_never_mixes_devices_or_dtypes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tensors of one compiled call share device and dtype, and a device other than the
    CPU gets its scalars as floats (a CPU tensor of scalars would be a host argument of a
    device kernel); checked with the kernels replaced by a recorder, on CPU and meta tensors."""
    calls: list[tuple[str, list[tuple[Tensor | None, ...]], Any]] = []

    def recording(fn: Callable[..., Any], numel: int, **kw: Any) -> Callable[..., Any]:
        def record(*args: Any) -> None:
            together = fn in (precision_fused._adam_passes, precision_fused._adam_8bit_passes)
            calls.append((fn.__name__, list(args[0]) if together else [args[:-2]], args[-2]))
        return record

    monkeypatch.setattr(precision, "_kernel", recording)
    cases = [("8bit", [torch.float32, torch.bfloat16] * 4, ["cpu"] * 8),
             (torch.bfloat16, [torch.float32, torch.float16] * 4, ["cpu"] * 8),
             (torch.bfloat16, [torch.float32] * 8, ["cpu", "meta"] * 4)]
    for state_dtype, dtypes, devices in cases:
        calls.clear()
        params = [torch.nn.Parameter(torch.zeros(BIG, dtype=dtype, device=device))
                  for dtype, device in zip(dtypes, devices, strict=True)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = descend.AdamW(params, lr=LR, weight_decay=0.1, state_dtype=state_dtype)
        if "meta" in devices:
            # (a step takes no fused form on meta; a group of CPU and CUDA tensors would, so the
            # batch is built here as the step builds one for such a group)
            group = opt.param_groups[0]
            states = [{"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p, dtype=state_dtype),
                       "exp_avg_sq": torch.zeros_like(p, dtype=state_dtype)} for p in params]
            batch = GroupBatch(group, params, [torch.zeros_like(p) for p in params], states, implementation="fused")
            assert precision_fused.adam_stored_step(opt, batch, LR, regularization.plan(group, LR)) is None
        else:
            for p in params:
                p.grad = torch.zeros_like(p)
            opt.step()
        stepped = [args for _, together, _ in calls for args in together]
        assert len(stepped) == len(params)  # (every tensor, in calls of four: two per dtype or device)
        assert [name for name, _, _ in calls].count(precision_fused._passes(opt._precision).__name__) == 2
        for _, together, scalars in calls:
            assert len({(args[0].dtype, args[0].device) for args in together}) == 1
            assert isinstance(scalars, Tensor) == (together[0][0].device.type == "cpu")


def test_without_a_working_compiler_the_general_path_runs(monkeypatch: pytest.MonkeyPatch,
                                                          general_path: Callable[[bool], None]) -> None:
    make, kw, dtype = CASES["AdamW, bfloat16 params, compensated"]
    general_path(True)
    ref, _ = _run(make, kw, dtype)
    general_path(False)
    monkeypatch.setitem(precision._COMPILED, (precision_fused._adam_pass, True, torch.bfloat16), None)  # (compiling it failed)
    spy = _Spy(monkeypatch)
    got, _ = _run(make, kw, dtype)
    assert spy.calls == 0
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_decay_alone_on_bfloat16_parameters_follows_the_closed_form() -> None:
    """Zero gradients: Adam's update is 0/(0 + ε) = 0, and AdamW's decoupled decay alone
    leaves θ_T = θ_0·(1 − lr·λ)^T; compensated, the bfloat16 parameter plus its buffer
    follows it to 0.1% after 2,000 steps (the buffer itself is bfloat16: θ + c holds about 16
    bits, and each step's remainder is rounded into it; the general path ends on the same
    value), where nearest rounding loses every step of it (each is below half an ulp)."""
    lr, wd, steps = 1e-3, 1e-2, 2000
    expected = (1 - lr * wd) ** steps
    norms = {}
    for rounding in ("nearest", "compensated"):
        p = torch.nn.Parameter(torch.randn(BIG, generator=torch.Generator().manual_seed(1)).bfloat16())
        start = p.detach().float().norm().item()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = descend.AdamW([p], lr=lr, weight_decay=wd, rounding=rounding)
        p.grad = torch.zeros_like(p)
        for _ in range(steps):
            opt.step()
        value = p.detach().float() + (opt.state[p][precision.COMPENSATION].float() if rounding == "compensated" else 0)
        norms[rounding] = value.norm().item() / start
    assert norms["nearest"] == 1.0
    assert norms["compensated"] == pytest.approx(expected, rel=1e-3)
    assert abs(norms["compensated"] - expected) < 0.05 * (1 - expected)  # (95% of the decay kept)


@pytest.mark.parametrize("case", ["AdamW, float32 params, bfloat16 state", "AdamW, bfloat16 params, compensated",
                                  "AdamW, bfloat16 params, compensated, 8bit state"])
def test_resume_is_bit_exact(case: str) -> None:
    make, kw, dtype = CASES[case]
    whole, _ = _run(make, kw, dtype, steps=8)
    params, opt = _run(make, kw, dtype, steps=4)
    saved = copy.deepcopy(opt.state_dict())
    again = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = make(again, lr=LR, **kw)
    resumed.load_state_dict(saved)
    for step in range(4, 8):
        _grads(again, step)
        resumed.step()
    assert all(torch.equal(a, b) for a, b in zip(again, whole))
