"""Low precision (descend.precision): rounding of 16-bit parameters, state in 16 and 8 bits,
their checkpoints, and the warning where rounding erases decay.

Oracles: torch.optim (nearest rounding is torch's behaviour bit for bit; 16-bit state is
torch's float32 rule with the state rounded after each step), closed forms (the decay-only
runs: float32's norm is (1 − lr·λ)^N), exact arithmetic on the bit patterns of bfloat16 and
float16 (stochastic rounding), and the code's own error bound (8 bits)."""

from __future__ import annotations

import io
import math
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor

import descend
from descend import precision
from tests.helpers import load_benchmark

pytestmark = pytest.mark.filterwarnings("ignore:group .* of (SGD|Adam|AdamW|Lion):UserWarning")

RULES: dict[str, Any] = {
    "AdamW": (descend.AdamW, torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    "Adam": (descend.Adam, torch.optim.Adam, {"lr": 1e-2, "weight_decay": 0.1}),
    "SGD": (descend.SGD, torch.optim.SGD, {"lr": 1e-1, "momentum": 0.9, "weight_decay": 0.1}),
    "Lion": (descend.Lion, None, {"lr": 1e-3, "weight_decay": 0.1}),
}
STATE_DTYPES = [None, torch.float32, torch.bfloat16, torch.float16, "8bit"]
ROUNDINGS = ["nearest", "compensated", "stochastic"]


def _params(dtype: torch.dtype = torch.float32, seed: int = 0, sizes: tuple[int, ...] = (300, 7)) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).to(dtype).requires_grad_() for n in sizes]


def _grads(params: list[Tensor], step: int, scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        target = torch.randn(p.shape, generator=g)
        p.grad = ((p.detach().float() - target) * scale).to(p.dtype)


def _run(opt: torch.optim.Optimizer, params: list[Tensor], steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        _grads(params, t)
        opt.step()


def _roundtrip(sd: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # type: ignore[no-any-return]


# --- options ------------------------------------------------------------------------------


def test_bad_values_name_the_allowed_ones() -> None:
    p = _params()
    with pytest.raises(ValueError, match=r"Invalid rounding: 'up' \(allowed: 'nearest', 'compensated', 'stochastic'\)"):
        descend.AdamW(p, rounding="up")
    with pytest.raises(ValueError, match=r"Invalid state_dtype: torch.float64 \(allowed: None .*'8bit'\)"):
        descend.SGD(p, state_dtype=torch.float64)
    with pytest.raises(ValueError, match="Invalid state_dtype: '4bit'"):
        descend.Lion(p, state_dtype="4bit")
    z = [torch.zeros(4, dtype=torch.complex64, requires_grad=True)]
    for dtype in ("8bit", torch.bfloat16):
        with pytest.raises(ValueError, match="Invalid state_dtype.*complex parameters"):
            descend.Adam(z, state_dtype=dtype)
    with pytest.raises(ValueError, match="Invalid flat: True.*8bit"):
        descend.AdamW(p, state_dtype="8bit", flat=True)


def test_8bit_needs_state_shaped_like_the_parameter() -> None:
    # Adafactor's factored second moment is not θ-shaped: 8 bits cannot hold it
    spec = descend.Adafactor.state_spec
    with pytest.raises(ValueError, match="Invalid state_dtype: '8bit'.*not shaped like its parameter"):
        precision.stored_spec(spec, "8bit", "nearest", "Adafactor")
    assert precision.stored_spec(spec, torch.bfloat16, "nearest", "Adafactor").by_name["row_var"].dtype \
        == torch.bfloat16


# --- nearest: torch's behaviour, bit for bit -------------------------------------------------


@pytest.mark.parametrize("name", ["AdamW", "Adam", "SGD"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nearest_on_16_bit_parameters_is_torch(name: str, dtype: torch.dtype) -> None:
    ours, theirs, kw = RULES[name]
    a, b = _params(dtype), _params(dtype)
    _run(ours(a, **kw, warn=False, foreach=False), a, 10)
    _run(theirs(b, **kw, foreach=False), b, 10)
    c = _params(dtype)
    _run(ours(c, **kw, warn=False, foreach=True), c, 10)
    d = _params(dtype)
    _run(theirs(d, **kw, foreach=True), d, 10)
    for x, y in zip(a + c, b + d):  # (float16 with eps=1e-8 makes the same NaN in both: 0/0)
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("name", list(RULES))
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_float32_parameters_ignore_rounding_and_a_float32_state_is_the_default(name: str, rounding: str) -> None:
    ours, _, kw = RULES[name]
    a, b = _params(), _params()
    opt_a = ours(a, **kw)
    opt_b = ours(b, **kw, rounding=rounding, state_dtype=torch.float32)
    _run(opt_a, a, 8)
    _run(opt_b, b, 8)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert "compensation" not in opt_b.state[b[0]]


# --- 16-bit state: torch's float32 rule with the state rounded after each step ------------------


class _RoundedStateTorch:
    """torch's float32 optimizer whose θ-shaped state is rounded to ``dtype`` after every step."""

    def __init__(self, opt: torch.optim.Optimizer, dtype: torch.dtype) -> None:
        self.opt, self.dtype = opt, dtype

    def step(self) -> None:
        self.opt.step()
        for state in self.opt.state.values():
            for key, v in state.items():
                if key != "step" and isinstance(v, Tensor):
                    v.copy_(v.to(self.dtype))


@pytest.mark.parametrize("name", ["AdamW", "Adam", "SGD"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("flat", [False, True])
def test_16_bit_state_is_torch_with_the_state_rounded(name: str, dtype: torch.dtype, flat: bool) -> None:
    ours, theirs, kw = RULES[name]
    a, b = _params(), _params()
    opt = ours(a, **kw, state_dtype=dtype, foreach=False, flat=flat)
    _run(opt, a, 10)
    _run(_RoundedStateTorch(theirs(b, **kw, foreach=False), dtype), b, 10)  # type: ignore[arg-type]
    for x, y in zip(a, b):
        assert torch.equal(x.detach(), y.detach())
    key = "momentum_buffer" if name == "SGD" else "exp_avg"
    assert opt.state[a[0]][key].dtype == dtype


# --- the 8-bit code ---------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
def test_8bit_code_error_is_bounded_relative_to_each_value(signed: bool) -> None:
    g = torch.Generator().manual_seed(0)
    # values over 12 decades in one tensor, blocks of mixed magnitudes, and a ragged last block
    x = torch.exp(torch.empty(10_007).uniform_(-14, 14, generator=g))
    if signed:
        x = x * torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0)
    x[::97] = 0
    codes, absmax = precision.quantize(x, signed=signed)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert absmax.shape == (math.ceil(x.numel() / precision.BLOCK),)
    y = precision.dequantize(codes, absmax, signed=signed)
    blocks = torch.nn.functional.pad(x.abs(), (0, -x.numel() % 256)).view(-1, 256).amax(1)
    assert torch.equal(absmax, blocks)  # the scale is each block's largest magnitude
    # to the nearest of 8 levels per octave: y/x within [1/(1 + 2⁻⁴), (1 + 2⁻³)/(1 + 2⁻⁴)]
    low, high = 1 / (1 + 2**-4), (1 + 2**-3) / (1 + 2**-4)
    reach = 2.0 ** -(precision.SIGNED_OCTAVES if signed else precision.UNSIGNED_OCTAVES)
    block_max = blocks.repeat_interleave(256)[: x.numel()]
    inside = x.abs() >= block_max * reach * 1.25  # (the smallest level)
    ratio = y[inside] / x[inside]
    assert float(ratio.min()) >= low * (1 - 1e-6) and float(ratio.max()) <= high * (1 + 1e-6)
    assert float(ratio.min()) < 0.95 and float(ratio.max()) > 1.05  # (12 decades reach both ends)
    assert torch.equal(y[x == 0], torch.zeros_like(y[x == 0]))
    assert bool((torch.sign(y[inside]) == torch.sign(x[inside])).all())
    if not signed:  # a positive second moment is never stored as 0 (its root divides the update)
        assert bool((y[x > 0] > 0).all())
    # the same codes stored in place give the same values (flat buffers keep their views)
    c2, a2 = torch.zeros_like(codes), torch.zeros_like(absmax)
    precision.quantize_into_(c2, a2, x, signed=signed)
    assert torch.equal(c2, codes) and torch.equal(a2, absmax)


@pytest.mark.parametrize("signed", [True, False])
def test_every_8bit_code_is_the_closed_form_float_and_encodes_back_to_itself(signed: bool) -> None:
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    values = precision.code_values(codes, signed)
    # the closed form, in float64: code c (magnitude c & 127 when signed) is 2^e (1 + f/8) for
    # its fraction f = c mod 8 and exponent e counted down from the top level (= 1.0)
    expected = []
    for c in range(256):
        magnitude, top = (c & 127, 127) if signed else (c, 255)
        if magnitude == 0:
            expected.append(0.0)
            continue
        level = magnitude - top + 8 * 127  # float32 bits >> 20 of the value
        e, f = level // 8 - 127, level % 8
        expected.append((-1.0 if signed and c & 128 else 1.0) * 2.0**e * (1 + f / 8))
    assert values.abs().tolist() == [abs(v) for v in expected]
    assert torch.equal(torch.sign(values), torch.tensor(expected).sign().float())
    nonzero = [c for c in range(256) if c & (127 if signed else 255)]
    back = precision.codes_of(values, torch.tensor(1.0), signed)
    assert back[nonzero].tolist() == nonzero  # each level is its own code
    magnitudes = values[1:128] if signed else values[1:]
    assert bool((magnitudes[1:] > magnitudes[:-1]).all())  # ordered, none repeated
    assert float(magnitudes[0]) == 1.25 * 2.0 ** -(precision.SIGNED_OCTAVES if signed else precision.UNSIGNED_OCTAVES)


def test_8bit_state_takes_about_2_bytes_per_parameter_for_adam() -> None:
    p = [torch.zeros(4096 * 8, requires_grad=True)]
    opt = descend.AdamW(p, state_dtype="8bit")
    _run(opt, p, 1)
    state = opt.state[p[0]]
    per_param = sum(v.numel() * v.element_size() for k, v in state.items() if k != "step") / p[0].numel()
    assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg_sq_absmax"].dtype == torch.float32
    assert per_param <= 2.1
    bf = descend.AdamW(p, state_dtype=torch.bfloat16)
    _run(bf, p, 1)
    assert sum(v.numel() * v.element_size() for k, v in bf.state[p[0]].items() if k != "step") / p[0].numel() <= 4.1


@pytest.mark.parametrize("name", list(RULES))
def test_8bit_state_follows_the_float32_run(name: str) -> None:
    ours, _, kw = RULES[name]
    a, b = _params(sizes=(3000,)), _params(sizes=(3000,))
    opt = ours(a, **kw, state_dtype="8bit")
    _run(ours(b, **kw), b, 30)
    _run(opt, a, 30)
    start = _params(sizes=(3000,))[0].detach()
    moved = float((b[0].detach() - start).norm())
    assert moved > 0.1
    # the 8-bit run moves the same way; its error is a small part of the distance moved
    assert float((a[0] - b[0]).detach().norm()) < 0.1 * moved
    key = "momentum_buffer" if name == "SGD" else "exp_avg"
    assert opt.state[a[0]][key].dtype == torch.uint8


def test_8bit_amsgrad_makes_its_maximum_in_8_bits() -> None:
    p = _params()
    opt = descend.Adam(p, lr=1e-2, state_dtype="8bit")
    _run(opt, p, 3)
    opt.param_groups[0]["amsgrad"] = True
    _run(opt, p, 2, start=3)
    state = opt.state[p[0]]
    assert state["max_exp_avg_sq"].dtype == torch.uint8 and "max_exp_avg_sq_absmax" in state
    vmax = precision.dequantize(state["max_exp_avg_sq"], state["max_exp_avg_sq_absmax"], signed=False)
    v = precision.dequantize(state["exp_avg_sq"], state["exp_avg_sq_absmax"], signed=False)
    assert bool((vmax >= v * (1 - 0.05)).all())


# --- rounding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_picks_a_neighbour_with_the_probability_of_its_distance(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    # normal values of both signs, and float16 subnormals
    base = torch.tensor([1.0, -3.0, 0.01, 2.0 ** -20, -(2.0 ** -22), 1000.0]).to(dtype)
    up = torch.nextafter(base.float(), torch.full_like(base.float(), math.inf)).to(dtype)
    # nextafter in float32 is not the next 16-bit value: step by one unit of the 16-bit pattern
    bits = base.view(torch.int16)
    up = torch.where(base > 0, bits + 1, bits - 1).view(dtype)
    frac = torch.tensor([0.25, 0.5, 0.9, 0.3, 0.7, 0.1])
    x = base.float() + frac * (up.float() - base.float())
    n = 20_000
    rounded = precision.stochastic_round(x.repeat(n, 1), dtype, g)
    is_up = rounded == up
    assert bool(((rounded == base) | is_up).all())  # only the two neighbours
    p_up = is_up.float().mean(0)
    assert torch.allclose(p_up, frac, atol=4 * (0.25 / n) ** 0.5)
    special = torch.tensor([math.inf, -math.inf, math.nan, 0.0])
    out = precision.stochastic_round(special, dtype, g)
    assert out[0] == math.inf and out[1] == -math.inf and math.isnan(out[2]) and out[3] == 0


DECAY_STEPS = 3000


decay_only = load_benchmark("decay_only").decay_only


def _decay_only(dtype: torch.dtype, **kw: Any) -> float:
    """AdamW (lr 1e-3, weight_decay 0.01) on gradients so small that only the decay acts:
    the norm after DECAY_STEPS steps over the norm before (benchmarks/decay_only.py)."""
    return float(decay_only(dtype, DECAY_STEPS, kw.pop("make", descend.AdamW), **kw))


def test_decay_only_nearest_loses_the_decay_compensated_and_stochastic_keep_it() -> None:
    exact = (1 - 1e-3 * 0.01) ** DECAY_STEPS  # 0.970
    assert _decay_only(torch.float32) == pytest.approx(exact, rel=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _decay_only(torch.bfloat16, make=torch.optim.AdamW) == pytest.approx(1, abs=1e-3)  # torch loses it
        assert _decay_only(torch.bfloat16) == pytest.approx(1, abs=1e-3)  # and so does nearest
    compensated = _decay_only(torch.bfloat16, rounding="compensated")
    stochastic = _decay_only(torch.bfloat16, rounding="stochastic")
    # the decay happened: within 5% of its amount (1 − 0.970), where nearest kept none of it
    assert abs(compensated - exact) < 0.05 * (1 - exact)
    assert abs(stochastic - exact) < 0.05 * (1 - exact)
    assert abs(_decay_only(torch.float16, rounding="compensated") - exact) < 0.05 * (1 - exact)


@pytest.mark.parametrize("name", list(RULES))
def test_compensated_parameter_plus_buffer_follows_float32(name: str) -> None:
    """θ + c of a bfloat16 run tracks the float32 run from the same start far closer than
    bfloat16's own rounding; nearest rounding does not."""
    ours, _, kw = RULES[name]
    kw = {**kw, "lr": kw["lr"] / 10}
    ref = [p.detach().float().requires_grad_() for p in _params(torch.bfloat16)]
    comp, near = _params(torch.bfloat16), _params(torch.bfloat16)
    opt_ref = ours(ref, **kw)
    opt_comp = ours(comp, **kw, rounding="compensated", state_dtype=torch.float32)
    opt_near = ours(near, **kw, state_dtype=torch.float32)
    for t in range(40):
        for ps, o in ((ref, opt_ref), (comp, opt_comp), (near, opt_near)):
            _grads(ps, t)
            if ps is not ref:  # the same gradient for every run: the reference's, rounded
                for p, r in zip(ps, ref):
                    p.grad = r.grad.to(p.dtype)
            o.step()
    for r, c, n in zip(ref, comp, near):
        carried = c.detach().float() + opt_comp.state[c]["compensation"].float()
        err_comp = float((carried - r.detach()).abs().max())
        err_near = float((n.detach().float() - r.detach()).abs().max())
        assert err_comp < err_near / 4, (err_comp, err_near)
        assert opt_comp.state[c]["compensation"].dtype == torch.bfloat16


def test_stochastic_rounding_is_reproducible_and_owns_its_generator() -> None:
    def run(seed: int, disturb: bool) -> list[Tensor]:
        torch.manual_seed(seed)
        p = _params(torch.bfloat16)
        opt = descend.AdamW(p, lr=1e-3, rounding="stochastic")
        for t in range(5):
            if disturb:
                torch.rand(100)  # the global generator moves; the optimizer's does not
            _grads(p, t)
            opt.step()
        return [x.detach().clone() for x in p]

    a, b, c = run(1, False), run(1, True), run(2, False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


# --- checkpoints ------------------------------------------------------------------------------


CONFIGS = [(s, r) for s in STATE_DTYPES for r in ROUNDINGS]


@pytest.mark.parametrize("name", ["AdamW", "SGD", "Lion"])
@pytest.mark.parametrize("state_dtype,rounding", CONFIGS)
def test_resume_is_bit_exact_and_keeps_the_state_dtypes(name: str, state_dtype: Any, rounding: str) -> None:
    ours, _, kw = RULES[name]
    p = _params(torch.bfloat16, sizes=(300, 7)) + _params(torch.float32, seed=1, sizes=(40,))
    opt = ours(p, **kw, state_dtype=state_dtype, rounding=rounding)
    _run(opt, p, 4)
    sd = _roundtrip(opt.state_dict())
    q = [x.detach().clone().requires_grad_() for x in p]
    resumed = ours(q, **kw, state_dtype=state_dtype, rounding=rounding)
    resumed.load_state_dict(sd)
    for x, y in zip(p, q):
        for key, v in opt.state[x].items():
            assert resumed.state[y][key].dtype == v.dtype and torch.equal(resumed.state[y][key], v), key
    torch.rand(10)  # the global generator moves between save and resume
    _run(opt, p, 4, start=4)
    _run(resumed, q, 4, start=4)
    for x, y in zip(p, q):
        assert torch.equal(x, y)
        for key, v in opt.state[x].items():
            assert torch.equal(resumed.state[y][key], v), key


def test_float32_state_dicts_load_into_low_precision_and_back() -> None:
    p = _params()
    theirs = torch.optim.AdamW(p, lr=1e-2)
    _run(theirs, p, 3)
    sd = _roundtrip(theirs.state_dict())
    v = sd["state"][0]["exp_avg_sq"]
    q8 = descend.AdamW([x.detach().clone().requires_grad_() for x in p], lr=1e-2, state_dtype="8bit")
    q8.load_state_dict(sd)
    s8 = q8.state[q8.param_groups[0]["params"][0]]
    assert s8["exp_avg_sq"].dtype == torch.uint8
    codes, absmax = precision.quantize(v, signed=False)
    assert torch.equal(s8["exp_avg_sq"], codes) and torch.equal(s8["exp_avg_sq_absmax"], absmax)
    qb = descend.AdamW([x.detach().clone().requires_grad_() for x in p], lr=1e-2, state_dtype=torch.bfloat16)
    qb.load_state_dict(sd)
    assert torch.equal(qb.state[qb.param_groups[0]["params"][0]]["exp_avg"], sd["state"][0]["exp_avg"].bfloat16())
    # and back: the 8-bit state dequantized into a plain float32 optimizer (descend's or torch's)
    plain = descend.AdamW([x.detach().clone().requires_grad_() for x in p], lr=1e-2)
    plain.load_state_dict(_roundtrip(q8.state_dict()))
    got = plain.state[plain.param_groups[0]["params"][0]]
    assert got["exp_avg_sq"].dtype == torch.float32 and set(got) == {"step", "exp_avg", "exp_avg_sq"}
    assert torch.equal(got["exp_avg_sq"], precision.dequantize(codes, absmax, signed=False))
    plain_b = descend.AdamW([x.detach().clone().requires_grad_() for x in p], lr=1e-2)
    plain_b.load_state_dict(_roundtrip(qb.state_dict()))
    assert plain_b.state[plain_b.param_groups[0]["params"][0]]["exp_avg"].dtype == torch.float32
    # without a declared precision a dtype mismatch stays an error (torch would cast silently)
    with pytest.raises(ValueError, match="dtype torch.float32.*torch.float64"):
        descend.AdamW([x.detach().double().requires_grad_() for x in p]).load_state_dict(sd)


def test_bad_low_precision_state_is_rejected_and_changes_nothing() -> None:
    p = _params()
    opt = descend.AdamW(p, lr=1e-2, state_dtype="8bit", rounding="stochastic")
    _run(opt, p, 2)
    good = opt.state_dict()
    before = {k: v.clone() for k, v in opt.state[p[0]].items()}

    def broken(edit: Any) -> dict[str, Any]:
        sd = _roundtrip(good)
        edit(sd)
        return sd

    def short_scales(sd: dict[str, Any]) -> None:
        sd["state"][0]["exp_avg_absmax"] = sd["state"][0]["exp_avg_absmax"][:1]

    def float_codes(sd: dict[str, Any]) -> None:
        sd["state"][0]["exp_avg_sq"] = sd["state"][0]["exp_avg_sq"].float() - 300
        del sd["state"][0]["exp_avg_sq_absmax"]

    def bad_generator(sd: dict[str, Any]) -> None:
        sd["rounding_generators"] = {"seed": 1, "states": {"cpu": torch.zeros(3)}}

    for edit, message in ((short_scales, "exp_avg.*8-bit entry"), (float_codes, "exp_avg_sq.*below 0"),
                          (bad_generator, "rounding generator on 'cpu'")):
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(broken(edit))
        for k, v in before.items():
            assert torch.equal(opt.state[p[0]][k], v)


# --- with the rest of the pipeline ----------------------------------------------------------------


@pytest.mark.parametrize("decay", ["coupled", "decoupled", "independent", "fixed", "corrected"])
@pytest.mark.parametrize("state_dtype,rounding", [(torch.bfloat16, "nearest"), ("8bit", "compensated"),
                                                  (None, "stochastic")])
def test_every_decay_mode_and_l1(decay: str, state_dtype: Any, rounding: str) -> None:
    kw = {"lr": 1e-2, "weight_decay": 0.05, "l1": 1e-3, "decay": decay}
    dtype = torch.float32 if rounding == "nearest" else torch.bfloat16
    ref = [p.detach().float().requires_grad_() for p in _params(dtype)]
    low = _params(dtype)
    opt_ref, opt_low = descend.AdamW(ref, **kw), descend.AdamW(low, **kw, state_dtype=state_dtype, rounding=rounding)
    for t in range(20):
        _grads(ref, t)
        _grads(low, t)
        opt_ref.step()
        opt_low.step()
    moved = float((ref[0].detach() - _params()[0].float()).norm())
    assert float((low[0].detach().float() - ref[0].detach()).norm()) < 0.1 * moved


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, "8bit"])
def test_nonfinite_skip_schedulers_and_grad_scaler(state_dtype: Any) -> None:
    p = _params()
    opt = descend.AdamW(p, lr=1e-2, state_dtype=state_dtype, nonfinite="skip")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _run(opt, p, 2)
    before = [x.detach().clone() for x in p]
    state = {k: v.clone() for k, v in opt.state[p[0]].items()}
    _grads(p, 5)
    p[0].grad[3] = math.nan
    opt.step()  # skipped: nothing changed
    assert opt.skipped_steps == 1
    assert all(torch.equal(x, y) for x, y in zip(p, before))
    assert all(torch.equal(opt.state[p[0]][k], v) for k, v in state.items())
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)
    # GradScaler: the scaled gradients are unscaled before the step, as for torch's optimizers
    q = [x.detach().clone().requires_grad_() for x in p]
    twin = descend.AdamW(q, lr=5e-3, state_dtype=state_dtype)
    twin.load_state_dict(_roundtrip(opt.state_dict()))  # (a state dict holds the optimizer's own tensors)
    twin.param_groups[0]["lr"] = opt.param_groups[0]["lr"]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))  # (the scaler's scale is made by its first use)
    _grads(p, 6)
    opt.step()
    _grads(q, 6)
    for x in q:
        x.grad = x.grad * 1024
    scaler.step(twin)
    scaler.update()
    for x, y in zip(p, q):
        assert torch.allclose(x, y, rtol=0, atol=1e-6)


@pytest.mark.parametrize("state_dtype,rounding", [(torch.bfloat16, "nearest"), (None, "compensated"),
                                                  (torch.float16, "stochastic")])
def test_flat_storage_equals_per_tensor(state_dtype: Any, rounding: str) -> None:
    a, b = _params(torch.bfloat16), _params(torch.bfloat16)
    opts = [descend.AdamW(ps, lr=1e-2, foreach=True, flat=flat, state_dtype=state_dtype, rounding=rounding)
            for ps, flat in ((a, False), (b, True))]
    for t in range(6):
        for ps, o in zip((a, b), opts):
            _grads(ps, t)
            o.step()
    if rounding == "stochastic":  # the random stream follows the layout: the same in distribution only
        assert float((a[0].float() - b[0].float()).abs().max()) < 0.1
        return
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        for k, v in opts[0].state[x].items():
            assert torch.equal(opts[1].state[y][k], v) and opts[1].state[y][k].dtype == v.dtype


# --- the warning ---------------------------------------------------------------------------------


def test_warns_once_where_rounding_erases_the_decay() -> None:
    bf = _params(torch.bfloat16)
    with pytest.warns(UserWarning, match=r"1 - 1e-05.*rounding='compensated'") as record:
        descend.AdamW(bf, lr=1e-3, weight_decay=0.01)
    assert len([w for w in record if "ulp" in str(w.message)]) == 1
    assert record[0].filename == __file__  # the user's line
    with pytest.warns(UserWarning, match=r"L1 threshold 1e-06.*rounding='compensated'"):
        descend.SGD(bf, lr=1e-3, l1=1e-3, decay="decoupled")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        descend.AdamW(bf, lr=1e-3, weight_decay=0.01, rounding="compensated")
        descend.AdamW(bf, lr=1e-3, weight_decay=0.01, rounding="stochastic")
        descend.AdamW(bf, lr=1e-3, weight_decay=0.01, warn=False)
        descend.AdamW(_params(), lr=1e-3, weight_decay=0.01)  # float32 keeps it
        descend.AdamW(bf, lr=1e-1, weight_decay=0.05)  # 1 − 0.005: bfloat16 keeps it
        descend.Adam(bf, lr=1e-3, weight_decay=0.01)  # coupled: no factor to round away


# --- compiled kernels ----------------------------------------------------------------------------


def test_compiled_conversions_equal_the_eager_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    n = precision.COMPILE_NUMEL or 1 << 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n + 77, generator=g) * torch.exp(torch.randn(n + 77, generator=g) * 3)
    w = torch.randn(n + 77, generator=g)
    bits = torch.randint(0, 1 << 16, x.shape, generator=g, dtype=torch.int32)

    def every_kernel() -> list[Tensor]:
        codes, absmax = precision.quantize(x.abs(), signed=False)
        return [codes, absmax, precision.dequantize(codes, absmax, signed=False),
                *precision._kernel(precision._split, x.numel())(w, torch.bfloat16),
                precision._kernel(precision._round_with_bits, x.numel())(w, bits, torch.float16),
                precision._kernel(precision._decode, x.numel())(codes, absmax, True, torch.float32)]

    monkeypatch.setattr(precision, "COMPILE_NUMEL", 1 << 16)
    compiled = every_kernel()
    monkeypatch.setattr(precision, "COMPILE_NUMEL", 0)
    eager = every_kernel()
    for a, b in zip(compiled, eager):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_without_a_compiler_the_eager_form_runs_after_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compiler(fn: Any, **kwargs: Any) -> Any:
        def fails(*args: Any) -> Any:
            raise RuntimeError("no C++ compiler found")
        return fails

    monkeypatch.setattr(torch, "compile", no_compiler)
    monkeypatch.setattr(precision, "COMPILE_NUMEL", 1 << 16)
    monkeypatch.setattr(precision, "_COMPILED", {})
    x = torch.randn(1 << 16)
    with pytest.warns(RuntimeWarning, match="torch.compile of _encode failed.*no C\\+\\+ compiler.*eagerly"):
        codes, absmax = precision.quantize(x, signed=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again, _ = precision.quantize(x, signed=True)  # no second warning: eager from now on
    monkeypatch.setattr(precision, "COMPILE_NUMEL", 0)
    assert torch.equal(again, codes) and torch.equal(precision.quantize(x, signed=True)[0], codes)


@pytest.mark.parametrize("state_dtype,rounding", [(torch.bfloat16, "compensated"), (torch.float16, "stochastic")])
def test_flat_storage_resumes_bit_exact(state_dtype: Any, rounding: str) -> None:
    p = _params(torch.bfloat16)
    opt = descend.AdamW(p, lr=1e-2, flat=True, state_dtype=state_dtype, rounding=rounding)
    _run(opt, p, 3)
    q = [x.detach().clone().requires_grad_() for x in p]
    resumed = descend.AdamW(q, lr=1e-2, flat=True, state_dtype=state_dtype, rounding=rounding)
    resumed.load_state_dict(_roundtrip(opt.state_dict()))
    _run(opt, p, 3, start=3)
    _run(resumed, q, 3, start=3)
    for x, y in zip(p, q):
        assert torch.equal(x, y)
        assert resumed.state[y]["exp_avg"].dtype == state_dtype
        assert torch.equal(resumed.state[y]["compensation" if rounding == "compensated" else "exp_avg"],
                           opt.state[x]["compensation" if rounding == "compensated" else "exp_avg"])


@pytest.mark.parametrize("options", [{"nesterov": True}, {"maximize": True}, {"dampening": 0.5}])
def test_sgd_options_with_8bit_momentum(options: dict[str, Any]) -> None:
    kw = {"lr": 0.05, "momentum": 0.9, **options}
    a, b = _params(sizes=(3000,)), _params(sizes=(3000,))
    opt = descend.SGD(a, **kw, state_dtype="8bit")
    _run(descend.SGD(b, **kw), b, 20)
    _run(opt, a, 20)
    moved = float((b[0].detach() - _params(sizes=(3000,))[0]).norm())
    assert float((a[0] - b[0]).detach().norm()) < 0.05 * moved
    assert opt.state[a[0]]["momentum_buffer"].dtype == torch.uint8


def test_a_compiled_step_keeps_the_low_precision_right() -> None:
    """torch.compile of opt.step(): the conversions run outside the graph (inside it, inductor
    lost the last 8-bit block and Kahan's remainder); the rule is traced."""
    torch._dynamo.reset()
    p = _params(torch.bfloat16, sizes=(300,))
    q = [x.detach().clone().requires_grad_() for x in p]
    eager = descend.AdamW(p, lr=1e-2, state_dtype="8bit", rounding="compensated")
    traced = descend.AdamW(q, lr=1e-2, state_dtype="8bit", rounding="compensated")
    step = torch.compile(traced.step)
    for t in range(3):
        _grads(p, t)
        for x, y in zip(p, q):
            y.grad = x.grad.clone()
        eager.step()
        step()
    for x, y in zip(p, q):
        a, b = eager.state[x], traced.state[y]
        carried_a = x.detach().float() + a["compensation"].float()
        carried_b = y.detach().float() + b["compensation"].float()
        # (the traced rule rounds its float32 arithmetic otherwise, which can move an 8-bit code
        # across a level: 0.05% of the 3e-2 the parameters moved)
        assert float((carried_a - carried_b).abs().max()) < 1e-4
        va = precision.dequantize(a["exp_avg_sq"], a["exp_avg_sq_absmax"], signed=False)
        vb = precision.dequantize(b["exp_avg_sq"], b["exp_avg_sq_absmax"], signed=False)
        assert bool(((vb - va).abs() <= 0.1 * va).all())  # every block, the last one included
