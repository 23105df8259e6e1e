"""descend.Muon against torch.optim.Muon (the oracle: torch's own OptimizerInfo inputs, every
adjust_lr_fn with and without nesterov), its AdamW groups against torch's AdamW, closed forms of
every decay mode, batched orthogonalization against torch's per-matrix iteration, resume, and
validation."""

from __future__ import annotations

import copy
import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.optim._muon import _zeropower_via_newtonschulz as torch_newton_schulz

import descend.optimizers.muon as muon_module
from descend.optimizers.adam import AdamW
from descend.optimizers.muon import Muon
from descend.orthogonalize import DEFAULT_COEFFICIENTS, newton_schulz

# the large decays of the closed forms are meant: no "implausible decay" warnings
pytestmark = pytest.mark.filterwarnings("ignore:group .* of Muon:UserWarning")

RTOL = 1e-6
#: 2-D shapes: square, wide, tall, repeated (batched together), and a tall one transposed into a wide one's stack
SHAPES: list[tuple[int, ...]] = [(8, 8), (8, 8), (12, 8), (8, 12), (12, 8), (5, 3), (3, 5)]


def make_params(shapes: Sequence[tuple[int, ...]] = SHAPES, dtype: torch.dtype = torch.float32,
                seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_() for s in shapes]


def loss_fn(params: list[Tensor], step: int) -> Tensor:
    """A smooth loss whose gradients depend on the parameters (so that trajectories can drift apart)."""
    g = torch.Generator().manual_seed(100 + step)
    loss = torch.zeros((), dtype=torch.float64)
    for p in params:
        target = torch.randn(p.shape, generator=g, dtype=torch.float64)
        loss = loss + ((p.double() - target) ** 2).sum() + (p.double().sin() * target).sum()
    return loss


def train(opt: torch.optim.Optimizer, params: list[Tensor], steps: int = 6, start: int = 0,
          scheduler: Callable[[torch.optim.Optimizer], Any] | None = None, sign: float = 1.0) -> None:
    sched = scheduler(opt) if scheduler else None
    for step in range(start, start + steps):
        opt.zero_grad()
        (sign * loss_fn(params, step)).backward()
        opt.step()
        if sched is not None:
            sched.step()


def run(make: Callable[[list[Tensor]], torch.optim.Optimizer], shapes: Sequence[tuple[int, ...]] = SHAPES,
        dtype: torch.dtype = torch.float32, steps: int = 6, **kw: Any) -> tuple[list[Tensor], torch.optim.Optimizer]:
    params = make_params(shapes, dtype)
    opt = make(params)
    train(opt, params, steps, **kw)
    return params, opt


def max_rel(a: list[Tensor], b: list[Tensor]) -> float:
    return max(((x.double() - y.double()).abs().max() / y.double().abs().max().clamp(min=1e-30)).item()
               for x, y in zip(a, b, strict=True))


def assert_close_run(ours: tuple[list[Tensor], Any], theirs: tuple[list[Tensor], Any], key: str = "momentum_buffer",
                     rtol: float = RTOL) -> None:
    (p1, o1), (p2, o2) = ours, theirs
    assert max_rel(p1, p2) <= rtol
    assert max_rel([o1.state[p][key] for p in p1], [o2.state[p][key] for p in p2]) <= rtol


def moved(params: list[Tensor], dtype: torch.dtype = torch.float32) -> float:
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(params, make_params(dtype=dtype)))


# --- batched Newton–Schulz ---------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 7), (7, 5), (16, 16), (40, 24), (24, 40), (1024, 300), (300, 1024)])
def test_batched_newton_schulz_is_torchs_per_matrix_iteration_bit_for_bit(shape: tuple[int, int]) -> None:
    # (matrices above 512 × 512 elements run one by one: descend.orthogonalize.batched)
    g = torch.Generator().manual_seed(0)
    count = 6 if shape[0] * shape[1] < 10_000 else 2
    stack = torch.randn(count, *shape, generator=g)
    got = newton_schulz(stack)
    assert got.dtype == torch.bfloat16 and got.shape == stack.shape
    for i in range(count):
        assert torch.equal(got[i], torch_newton_schulz(stack[i], DEFAULT_COEFFICIENTS, 5, 1e-7))
    # B = 1 and a plain matrix alike
    assert torch.equal(newton_schulz(stack[0]), torch_newton_schulz(stack[0], DEFAULT_COEFFICIENTS, 5, 1e-7))
    other = newton_schulz(stack, (3.4, -4.7, 2.0), 7, 1e-6)
    assert torch.equal(other[1], torch_newton_schulz(stack[1], (3.4, -4.7, 2.0), 7, 1e-6))


def test_newton_schulz_orthogonalizes_and_leaves_its_input_alone() -> None:
    g = torch.Generator().manual_seed(1)
    stack = torch.randn(4, 16, 32, generator=g).bfloat16()
    before = stack.clone()
    out = newton_schulz(stack)
    assert torch.equal(stack, before)  # a bfloat16 input is not normalized in place (torch's Muon does)
    singular = torch.linalg.svdvals(out.double())
    assert singular.min().item() > 0.5 and singular.max().item() < 1.3  # the quintic's band around 1
    assert torch.equal(newton_schulz(torch.zeros(2, 3, 4)), torch.zeros(2, 3, 4, dtype=torch.bfloat16))


# --- parity with torch.optim.Muon ----------------------------------------------------------


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw"])
def test_equals_torch_muon(adjust_lr_fn: str | None, nesterov: bool) -> None:
    kw: dict[str, Any] = dict(lr=0.02, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    theirs = run(lambda p: torch.optim.Muon(p, **kw))
    ours = run(lambda p: Muon(p, **kw))
    assert_close_run(ours, theirs)
    assert moved(ours[0]) > 0.05  # the run did something to compare
    # on this CPU it is bit for bit (the batched products compute each matrix as mm does)
    assert all(torch.equal(a, b) for a, b in zip(ours[0], theirs[0]))


def test_equals_torch_muon_on_large_and_mixed_shapes() -> None:
    # large matrices (one by one), mid-size ones (batched), wide and tall of one size
    shapes: list[tuple[int, ...]] = [(1024, 300), (300, 1024), (1024, 300), (96, 200), (200, 96), (96, 200)]

    def make(opt_cls: Any) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
        return lambda p: opt_cls(p, lr=0.02, adjust_lr_fn="match_rms_adamw")

    theirs = run(make(torch.optim.Muon), shapes=shapes, steps=2)
    ours = run(make(Muon), shapes=shapes, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(ours[0], theirs[0]))


def test_equals_torch_muon_on_transposed_parameters() -> None:
    def make() -> list[Tensor]:
        g = torch.Generator().manual_seed(0)
        shapes = [(1024, 300), (1024, 300), (40, 24), (24, 40), (30, 30)]
        return [torch.randn(s, generator=g).t().requires_grad_() if i % 2 else torch.randn(s, generator=g)
                .requires_grad_() for i, s in enumerate(shapes)]

    finals = []
    for opt_cls in (torch.optim.Muon, Muon):
        params = make()
        opt = opt_cls(params, lr=0.02)
        g = torch.Generator().manual_seed(1)
        for _ in range(2):
            for p in params:  # gradients in their parameter's layout
                p.grad = torch.randn(p.shape[::-1], generator=g).t() if not p.is_contiguous() else torch.randn(
                    p.shape, generator=g)
            opt.step()
        finals.append(params)
    assert [p.is_contiguous() for p in finals[1]] == [True, False, True, False, True]
    assert all(torch.equal(a, b) for a, b in zip(*finals))


@functools.cache
def torch_info() -> Any:
    """The Muon OptimizerInfo of torch's optim_db (its module imports ``expecttest``)."""
    from torch.testing._internal.common_optimizers import optim_db

    (info,) = [i for i in optim_db if i.optim_cls is torch.optim.Muon]
    return info


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_torch_on_optim_db_inputs(dtype: torch.dtype) -> None:
    inputs = torch_info().optim_inputs_func(device="cpu")
    assert len(inputs) == 7  # torch 2.13: default, lr, tensor lr, weight_decay, momentum, ns_steps, coefficients
    for oi in inputs:
        assert oi.params is None
        kw: dict[str, Any] = oi.kwargs
        theirs = run(functools.partial(torch.optim.Muon, **kw), dtype=dtype)
        ours = run(functools.partial(Muon, **kw), dtype=dtype)
        assert_close_run(ours, theirs)


def test_resumes_a_torch_muon_state_dict() -> None:
    params, theirs = run(lambda p: torch.optim.Muon(p, lr=0.02), steps=3)
    twin = [p.detach().clone().requires_grad_() for p in params]
    ours = Muon(twin, lr=0.02)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))  # (torch loads the very tensors)
    train(theirs, params, 3, start=3)
    train(ours, twin, 3, start=3)
    assert max_rel(twin, params) <= RTOL


def test_bfloat16_buffer_stays_the_average_of_the_gradients() -> None:
    # torch 2.13 with bfloat16 and nesterov=False divides the buffer by its norm in place; descend does not
    mu, steps = 0.9, 4
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(6, 10, generator=g, dtype=torch.float64) for _ in range(steps)]
    p = torch.zeros(6, 10, dtype=torch.bfloat16, requires_grad=True)
    opt = Muon([p], lr=0.01, momentum=mu, nesterov=False, weight_decay=0)
    average = torch.zeros(6, 10, dtype=torch.float64)
    for grad in grads:
        p.grad = grad.bfloat16()
        opt.step()
        average = mu * average + (1 - mu) * grad.bfloat16().double()
    buf = opt.state[p]["momentum_buffer"].double()
    assert (buf - average).abs().max().item() <= 0.02 * average.abs().max().item()  # bfloat16's rounding
    assert abs(buf.norm().item() - average.norm().item()) <= 0.02 * average.norm().item()
    assert abs(buf.norm().item() - 1.0) > 0.3  # not normalized (torch 2.13's buffer has norm 1)


def test_bfloat16_with_nesterov_equals_torch() -> None:
    theirs = run(lambda p: torch.optim.Muon(p, lr=0.02), dtype=torch.bfloat16, steps=3)
    ours = run(lambda p: Muon(p, lr=0.02), dtype=torch.bfloat16, steps=3)
    assert all(torch.equal(a, b) for a, b in zip(ours[0], theirs[0]))


def test_maximize_is_minimizing_the_negation() -> None:
    expected = run(lambda p: Muon(p, lr=0.02))
    got = run(lambda p: Muon(p, lr=0.02, maximize=True), sign=-1.0)
    assert all(torch.equal(a, b) for a, b in zip(got[0], expected[0]))


# --- matrices of more than 2 dimensions -------------------------------------------------------


@pytest.mark.parametrize("nesterov", [True, False])
def test_a_stack_of_matrices_is_each_matrix_alone(nesterov: bool) -> None:
    g = torch.Generator().manual_seed(2)
    experts = torch.randn(4, 12, 6, generator=g).requires_grad_()  # [E, out, in], tall: each transposed
    alone = [experts[e].detach().clone().requires_grad_() for e in range(4)]
    ours = Muon([{"params": [experts], "matrix": "stack"}], lr=0.02, nesterov=nesterov,
                adjust_lr_fn="match_rms_adamw")
    theirs = torch.optim.Muon(alone, lr=0.02, nesterov=nesterov, adjust_lr_fn="match_rms_adamw")
    for _ in range(4):
        grads = torch.randn(4, 12, 6, generator=g)
        experts.grad = grads.clone()
        for e in range(4):
            alone[e].grad = grads[e].clone()
        ours.step()
        theirs.step()
    for e in range(4):
        assert torch.equal(experts[e], alone[e])  # the adjusted lr is each matrix's, 0.2·√12
    assert (experts - experts.detach().clone()).abs().max().item() == 0  # (a real tensor)


def test_a_convolution_is_flattened_by_default() -> None:
    g = torch.Generator().manual_seed(3)
    conv = torch.randn(4, 3, 3, 3, generator=g).requires_grad_()
    flat = conv.detach().reshape(4, 27).clone().requires_grad_()
    ours = Muon([conv], lr=0.02)
    theirs = torch.optim.Muon([flat], lr=0.02)
    for _ in range(3):
        grad = torch.randn(4, 3, 3, 3, generator=g)
        conv.grad, flat.grad = grad.clone(), grad.reshape(4, 27).clone()
        ours.step()
        theirs.step()
    assert ours.param_groups[0]["matrix"] == "flatten"
    assert torch.equal(conv.detach().reshape(4, 27), flat.detach())


def test_stacks_split_into_chunks_give_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    shapes: list[tuple[int, ...]] = [*[(6, 6)] * 9, (6, 10), (10, 6)]
    whole = run(lambda p: Muon(p, lr=0.02), shapes=shapes)
    monkeypatch.setattr(muon_module, "STACK_ELEMENTS", 100)  # 2 matrices of 6 × 6, 1 of 6 × 10 per stack
    chunked = run(lambda p: Muon(p, lr=0.02), shapes=shapes)
    assert all(torch.equal(a, b) for a, b in zip(whole[0], chunked[0]))
    theirs = run(lambda p: torch.optim.Muon(p, lr=0.02), shapes=shapes)
    assert all(torch.equal(a, b) for a, b in zip(whole[0], theirs[0]))


def test_a_vector_in_a_muon_group_is_a_value_error_naming_it() -> None:
    w, b = torch.zeros(3, 4, requires_grad=True), torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=re.escape("Muon only supports 2D parameters (and stacks of them); "
                                                   "parameter 'fc.bias' of shape (3,)") + ".*algorithm='adamw'"):
        Muon([("fc.weight", w), ("fc.bias", b)])
    opt = Muon([w])
    with pytest.raises(ValueError, match="parameter 0 of the group \\(shape \\(3,\\)\\)"):
        opt.add_param_group({"params": [b]})
    assert len(opt.param_groups) == 1  # nothing half-added
    opt.add_param_group({"params": [b], "algorithm": "adamw"})  # where it belongs
    scalar = torch.zeros((), requires_grad=True)
    opt.param_groups[0]["params"].append(scalar)  # a group edited by hand: refused before the step
    scalar.grad = torch.ones(())
    with pytest.raises(ValueError, match="Muon only supports 2D parameters.*parameter 1 of the group \\(shape \\(\\)\\)"):
        opt.step()


# --- AdamW groups --------------------------------------------------------------------------


def _hybrid(p: list[Tensor], **kw: Any) -> Muon:
    return Muon([{"params": p[:5]}, {"params": p[5:], "algorithm": "adamw"}], lr=0.02, **kw)


ADAMW: dict[str, Any] = dict(lr=3e-3, betas=(0.8, 0.9), eps=1e-8, weight_decay=0.05)


def test_adamw_groups_equal_descend_and_torch_adamw() -> None:
    shapes: list[tuple[int, ...]] = SHAPES + [(7,), (), (3, 4, 2)]
    ours, opt = run(lambda p: Muon([{"params": p[:5]}, {"params": p[5:], "algorithm": "adamw"}], lr=0.02,
                                   adamw=ADAMW), shapes=shapes)
    muon_alone, _ = run(lambda p: torch.optim.Muon(p[:5], lr=0.02), shapes=shapes)
    adamw_alone, d_opt = run(lambda p: AdamW(p[5:], foreach=True, **ADAMW), shapes=shapes)
    torch_adamw, t_opt = run(lambda p: torch.optim.AdamW(p[5:], **ADAMW), shapes=shapes)
    assert all(torch.equal(a, b) for a, b in zip(ours[:5], muon_alone[:5]))
    assert all(torch.equal(a, b) for a, b in zip(ours[5:], adamw_alone[5:]))
    assert max_rel(ours[5:], torch_adamw[5:]) <= RTOL
    for a, b in zip(ours[5:], torch_adamw[5:]):
        assert set(opt.state[a]) == {"step", "exp_avg", "exp_avg_sq"} == set(t_opt.state[b])
        assert float(opt.state[a]["step"]) == 6.0
    assert opt.param_groups[1]["algorithm"] == "adamw" and opt.param_groups[0]["algorithm"] == "muon"
    assert opt.param_groups[1]["lr"] == 3e-3 and opt.param_groups[1]["betas"] == (0.8, 0.9)


def test_adamw_defaults_are_keller_jordans_or_moonlights() -> None:
    p = make_params()
    keller = _hybrid(p)
    assert {k: keller.param_groups[1][k] for k in ("lr", "betas", "eps", "weight_decay")} == dict(
        lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0)
    assert keller.param_groups[0]["eps"] == 1e-7  # Muon's own ε is not the AdamW groups'
    moon = _hybrid(make_params(), adjust_lr_fn="match_rms_adamw", weight_decay=0.1)
    assert {k: moon.param_groups[1][k] for k in ("lr", "betas", "eps", "weight_decay")} == dict(
        lr=0.02, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    own = Muon([{"params": p[:5]}, {"params": p[5:], "algorithm": "adamw", "lr": 0.5}], adamw={"eps": 1e-6})
    assert own.param_groups[1]["lr"] == 0.5 and own.param_groups[1]["eps"] == 1e-6
    assert own.param_groups[1]["base_lr"] == 0.5  # lr₀ of the AdamW group is its own lr


def test_resume_is_bit_exact() -> None:
    shapes: list[tuple[int, ...]] = SHAPES + [(7,), (3, 4, 2)]
    straight, _ = run(lambda p: _hybrid(p, weight_decay=0.1, decay="independent"), shapes=shapes, steps=6)
    params, opt = run(lambda p: _hybrid(p, weight_decay=0.1, decay="independent"), shapes=shapes, steps=3)
    saved = copy.deepcopy(opt.state_dict())
    twin = [p.detach().clone().requires_grad_() for p in params]
    resumed = _hybrid(twin, weight_decay=0.1, decay="independent")
    resumed.load_state_dict(saved)
    train(resumed, twin, 3, start=3)
    assert all(torch.equal(a, b) for a, b in zip(twin, straight))
    kinds = {k for s in saved["state"].values() for k in s}
    assert kinds == {"momentum_buffer", "step", "exp_avg", "exp_avg_sq"}  # one state dict holds both


# --- the decay vocabulary -----------------------------------------------------------------


def _schedule(opt: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + 0.5 * s))


@pytest.mark.parametrize("decay", ["decoupled", "independent", "fixed", "corrected"])
@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
def test_decoupled_modes_closed_form_on_zero_gradients(decay: str, adjust_lr_fn: str | None) -> None:
    # a zero gradient orthogonalizes to 0: only the decay moves θ, by the unadjusted lr in every mode
    lr0, wd, steps = 0.5, 0.3, 4
    params = make_params()
    start = [p.detach().clone() for p in params]
    opt = Muon(params, lr=lr0, weight_decay=wd, decay=decay, adjust_lr_fn=adjust_lr_fn)
    sched = _schedule(opt)
    factor = 1.0
    for _ in range(steps):
        lr = opt.param_groups[0]["lr"]
        scale = {"decoupled": lr, "independent": lr / lr0, "fixed": 1.0, "corrected": lr * lr / lr0}[decay]
        factor *= 1 - scale * wd
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        sched.step()
    for p, s in zip(params, start):
        torch.testing.assert_close(p.detach().double(), s.double() * factor, rtol=1e-6, atol=0)
    assert factor < 0.95


def test_coupled_decay_is_lambda_theta_added_to_the_gradient_before_the_momentum() -> None:
    wd = 0.7
    ours_p, theirs_p = make_params(), make_params()
    ours = Muon(ours_p, lr=0.02, weight_decay=wd, decay="coupled")
    theirs = torch.optim.Muon(theirs_p, lr=0.02, weight_decay=0.0)
    for step in range(5):
        ours.zero_grad()
        loss_fn(ours_p, step).backward()
        ours.step()
        theirs.zero_grad()
        loss_fn(theirs_p, step).backward()
        for p in theirs_p:
            p.grad.add_(p.detach(), alpha=wd)  # type: ignore[union-attr]
        theirs.step()
    assert all(torch.equal(a, b) for a, b in zip(ours_p, theirs_p))
    decoupled, _ = run(lambda p: Muon(p, lr=0.02, weight_decay=wd), steps=5)
    assert max_rel(ours_p, decoupled) > 1e-3  # a different rule


def test_coupled_decay_is_l2_in_the_loss() -> None:
    wd = 0.7
    penalized = make_params()
    opt = Muon(penalized, lr=0.02, weight_decay=0.0)
    for step in range(5):
        opt.zero_grad()
        (loss_fn(penalized, step) + wd / 2 * sum((p.double() ** 2).sum() for p in penalized)).backward()
        opt.step()
    coupled, _ = run(lambda p: Muon(p, lr=0.02, weight_decay=wd, decay="coupled"), steps=5)
    # the bfloat16 iteration can turn a last-bit difference of the gradient into one bfloat16 ulp
    assert max_rel(coupled, penalized) <= 1e-2


@pytest.mark.parametrize("decay", ["decoupled", "coupled"])
def test_l1(decay: str) -> None:
    l1, lr = 0.05, 0.02
    ours_p, theirs_p = make_params(), make_params()
    ours = Muon(ours_p, lr=lr, weight_decay=0.0, l1=l1, decay=decay)
    theirs = torch.optim.Muon(theirs_p, lr=lr, weight_decay=0.0)
    for step in range(5):
        ours.zero_grad()
        loss_fn(ours_p, step).backward()
        ours.step()
        theirs.zero_grad()
        loss_fn(theirs_p, step).backward()
        if decay == "coupled":
            for p in theirs_p:
                p.grad.add_(torch.sign(p.detach()), alpha=l1)  # type: ignore[union-attr]
        theirs.step()
        if decay == "decoupled":  # the proximal step after the update: soft-thresholding by lr·λ₁
            with torch.no_grad():
                for p in theirs_p:
                    p.copy_(torch.sign(p) * (p.abs() - lr * l1).clamp(min=0))
    assert max_rel(ours_p, theirs_p) <= RTOL
    if decay == "decoupled":
        assert sum(int((p == 0).sum()) for p in ours_p) > 0  # the prox makes exact zeros


# --- validation ---------------------------------------------------------------------------


def assert_invalid(error: pytest.ExceptionInfo[ValueError], name: str, value: str, allowed: str) -> None:
    """descend's format: the argument's name, its value and what is allowed (torch.optim's own words
    may come first, "Invalid learning rate: -1.0 (lr; allowed: ...)", as descend.validation keeps them)."""
    message = str(error.value)
    assert name in message and value in message and f"allowed: {allowed}" in message, message


@pytest.mark.parametrize(("kwargs", "name", "value", "allowed"), [
    (dict(ns_steps=0), "ns_steps", "0", "an integer >= 1"),
    (dict(ns_steps=2.0), "ns_steps", "2.0", "an integer >= 1"),
    (dict(ns_steps=True), "ns_steps", "True", "an integer >= 1"),
    (dict(ns_coefficients=(1.0, 2.0)), "ns_coefficients", "(1.0, 2.0)", "a tuple of 3 finite floats"),
    (dict(ns_coefficients=(1.0, 2.0, math.inf)), "ns_coefficients", "(1.0, 2.0, inf)", "a tuple of 3 finite"),
    (dict(ns_coefficients="abc"), "ns_coefficients", "abc", "a tuple of 3 finite floats"),
    (dict(adjust_lr_fn="rms"), "adjust_lr_fn", "rms", "None, 'original', 'match_rms_adamw'"),
    (dict(momentum=-0.1), "momentum", "-0.1", "a number in [0, 1]"),
    (dict(momentum=1.5), "momentum", "1.5", "a number in [0, 1]"),
    (dict(eps=-1.0), "eps", "-1.0", "a number in [0, inf)"),
    (dict(lr=-1.0), "lr", "-1.0", "a number in [0, inf)"),
    (dict(weight_decay=-1.0), "weight_decay", "-1.0", "a number in [0, inf)"),
    (dict(decay="l2"), "decay", "'l2'", "'coupled', 'decoupled'"),
    (dict(adamw={"momentum": 0.9}), "adamw", "{'momentum': 0.9}", "a dict with keys among lr, betas"),
    (dict(adamw=[("lr", 1)]), "adamw", "[('lr', 1)]", "None or a dict"),
    (dict(adamw={"lr": -1}), "adamw['lr']", "-1", "a number in [0, inf)"),
    (dict(adamw={"betas": (0.9, 1.5)}), "adamw['betas']", "(0.9, 1.5)", "a pair (beta1, beta2)"),
    (dict(adamw={"decay": "l2"}), "adamw['decay']", "'l2'", "'coupled', 'decoupled'"),
])
def test_bad_options_are_value_errors(kwargs: dict[str, Any], name: str, value: str, allowed: str) -> None:
    with pytest.raises(ValueError) as error:
        Muon(make_params(), **kwargs)
    assert_invalid(error, name, value, allowed)


@pytest.mark.parametrize(("group", "name", "value", "allowed"), [
    ({"algorithm": "sgd"}, "algorithm", "'sgd'", "'muon', 'adamw'"),
    ({"matrix": "rows"}, "matrix", "'rows'", "'flatten', 'stack'"),
    ({"algorithm": "adamw", "betas": (0.9,)}, "betas", "(0.9,)", "a pair (beta1, beta2)"),
    ({"ns_steps": -2}, "ns_steps", "-2", "an integer >= 1"),
])
def test_bad_group_options_are_value_errors(group: dict[str, Any], name: str, value: str, allowed: str) -> None:
    opt = Muon(make_params()[:2])
    with pytest.raises(ValueError) as error:
        opt.add_param_group({"params": make_params()[2:4], **group})
    assert_invalid(error, name, value, allowed)
    assert len(opt.param_groups) == 1


def test_an_edited_group_is_checked_before_the_step_changes_anything() -> None:
    params, opt = run(lambda p: Muon(p, lr=0.02), steps=2)
    before = [p.detach().clone() for p in params]
    opt.param_groups[0]["ns_steps"] = 0
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError) as error:
        opt.step()
    assert_invalid(error, "ns_steps", "0", "an integer >= 1")
    assert all(torch.equal(a, b) for a, b in zip(params, before))


def test_a_parameter_without_gradient_is_not_touched() -> None:
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = _hybrid(params, weight_decay=0.5)
    for p in params[1:]:
        p.grad = torch.ones_like(p)
    opt.step()
    assert torch.equal(params[0], before[0]) and params[0] not in opt.state
    assert all(not torch.equal(a, b) for a, b in zip(params[1:], before[1:]))


# --- the benchmark's sets (its timings are for descend bench, not for tests) --------------------


def test_benchmark_sets() -> None:
    from descend.cli.bench_muon import muon_shapes

    label, shapes = muon_shapes("gpt2-matrices")
    assert len(shapes) == 48 and sum(math.prod(s) for s in shapes) == 84_934_656  # GPT-2 small's hidden matrices
    assert len(muon_shapes("gpt2-matrices", quick=True)[1]) == 8
    assert muon_shapes("many-small-matrices")[1] == [(64, 64)] * 256
    with pytest.raises(ValueError, match=re.escape("Invalid set: 'resnet'")):
        muon_shapes("resnet")
