"""No device value read on the host during a step, and GradScaler's fused path.

On a GPU, reading a device value (``.item()``, ``bool()``, ``.cpu()``) makes the host wait for
the device. Two ways to see such reads without a GPU:

- parameters on the meta device have no data, so any read raises: every path that steps on
  meta parameters reads nothing (torch's own foreach AdamW steps there);
- a dispatch mode counts ``aten._local_scalar_dense`` (what every read of a tensor's value
  into a Python number becomes) during a step on CPU tensors.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import descend


class _CountReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def counting_reads() -> Iterator[_CountReads]:
    with _CountReads() as mode:
        yield mode


def meta_params() -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.empty(3, 4, device="meta")), torch.nn.Parameter(torch.empty(5, device="meta")),
              torch.nn.Parameter(torch.empty(0, device="meta"))]
    for p in params:
        p.grad = torch.empty_like(p)
    return params


def two_steps(make: Callable[..., torch.optim.Optimizer], **kw: Any) -> torch.optim.Optimizer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (implausible-decay warnings of the settings below)
        opt = make(meta_params(), **kw)
    opt.step()
    opt.step()
    return opt


def test_torch_foreach_adamw_steps_on_meta_parameters() -> None:
    """The premise: where this runs, descend's paths must run too."""
    two_steps(torch.optim.AdamW, foreach=True)


PATHS = {
    "default": {},
    "foreach": dict(foreach=True),
    "single": dict(foreach=False),
    "flat": dict(flat=True),
    "tensor-lr": dict(lr=torch.tensor(0.01)),
    "tensor-lr-single": dict(lr=torch.tensor(0.01), foreach=False),
    "l1": dict(l1=1e-3),
    "l1-foreach": dict(l1=1e-3, foreach=True),
    **{f"decay-{mode}": dict(decay=mode, weight_decay=1e-3) for mode in descend.DECAY_MODES},
}
RULES = {
    "AdamW": descend.AdamW,
    "Adam": descend.Adam,
    "Adam-amsgrad": lambda p, **kw: descend.Adam(p, amsgrad=True, **kw),
    "SGD": lambda p, **kw: descend.SGD(p, lr=kw.pop("lr", 0.1), momentum=0.9, **kw),
    "Lion": descend.Lion,
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rule", RULES)
def test_every_path_steps_on_meta_parameters(rule: str, path: str) -> None:
    opt = two_steps(RULES[rule], **PATHS[path])
    if rule.startswith("Adam"):
        steps = [s["step"] for s in opt.state.values()]
        assert steps and all(t.device.type == "cpu" for t in steps)  # counts kept on the host, as torch's


def cpu_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1))


def backward(model: torch.nn.Module, step: int, scaler: torch.amp.GradScaler | None = None) -> None:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 6, generator=g)
    loss = model(x).pow(2).mean()
    (scaler.scale(loss) if scaler is not None else loss).backward()


FUSED = {
    "AdamW": lambda p, **kw: descend.AdamW(p, lr=1e-2, fused=True, **kw),
    "Adam-l2": lambda p, **kw: descend.Adam(p, lr=1e-2, weight_decay=0.1, fused=True, **kw),
    "AdamW-independent": lambda p, **kw: descend.AdamW(p, lr=1e-2, decay="independent", weight_decay=1e-3,
                                                       fused=True, **kw),
    "SGD": lambda p, **kw: descend.SGD(p, lr=1e-2, momentum=0.9, weight_decay=1e-3, fused=True, **kw),
    "SGD-default": lambda p, **kw: descend.SGD(p, lr=1e-2, momentum=0.9, **kw),
    "AdamW-default": lambda p, **kw: descend.AdamW(p, lr=1e-2, **kw),
}


@pytest.mark.parametrize("rule", FUSED)
def test_a_fused_step_reads_nothing_on_the_host(rule: str) -> None:
    model = cpu_model()
    opt = FUSED[rule](model.parameters())
    backward(model, 0)
    opt.step()  # (the first step makes state)
    for step in range(1, 3):
        opt.zero_grad()
        backward(model, step)
        with counting_reads() as mode:
            opt.step()
        assert mode.reads == 0


@pytest.fixture
def device_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    """The accelerators' path on the CPU: there the skip is decided on the host (a read is free)."""
    monkeypatch.setattr(descend.RegularizedOptimizer, "_skip_on_device_on_cpu", True)


@pytest.mark.parametrize("rule", FUSED)
def test_nonfinite_skip_decides_on_the_device_in_fused_steps(rule: str, device_decides: None) -> None:
    model, plain = cpu_model(), cpu_model()
    opt = FUSED[rule](model.parameters(), nonfinite="skip")
    ref = FUSED[rule](plain.parameters())
    for step in range(5):
        for m, o in ((model, opt), (plain, ref)):
            o.zero_grad()
            backward(m, step)
        if step == 2:  # a NaN: descend skips; the reference simply does not step
            model[0].weight.grad[1, 1] = float("nan")
            before = [p.detach().clone() for p in model.parameters()]
            state = {k: v.clone() for s in opt.state.values() for k, v in s.items() if torch.is_tensor(v)}
            with counting_reads() as mode:
                opt.step()
            assert mode.reads == 0
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            after = {k: v for s in opt.state.values() for k, v in s.items() if torch.is_tensor(v)}
            assert all(torch.equal(state[k], after[k]) for k in state)
            continue
        with counting_reads() as mode:
            opt.step()
        assert mode.reads == (0 if step else mode.reads)  # (a first step may read: it must make no state on a skip)
        ref.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))


def scaled_run(make: Callable[..., torch.optim.Optimizer], *, steps: int = 7, inf_at: int = 3,
               count: bool = False) -> tuple[list[torch.Tensor], torch.optim.Optimizer, int]:
    model = cpu_model()
    opt = make(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    reads = 0
    for step in range(steps):
        opt.zero_grad()
        backward(model, step, scaler)  # (the scale is a power of 2: exact)
        if step == inf_at:
            model[2].weight.grad[0, 3] = float("inf")
        with counting_reads() as mode:
            scaler.step(opt)
        reads += mode.reads if step else 0
        scaler.update()
    return [p.detach().clone() for p in model.parameters()], opt, reads


SCALED = {
    "AdamW": (dict(lr=1e-2), {}),
    "Adam": (dict(lr=1e-2, weight_decay=0.1), {}),
    "Adam-amsgrad-maximize": (dict(lr=1e-2, amsgrad=True, maximize=True), {}),
    "SGD": (dict(lr=1e-2, momentum=0.9, weight_decay=1e-3), {}),
    "SGD-nesterov": (dict(lr=1e-2, momentum=0.9, nesterov=True), {}),
    "SGD-plain": (dict(lr=1e-2), {}),
}


@pytest.mark.parametrize("name", SCALED)
@pytest.mark.parametrize("impl", ["fused", "foreach", "single"])
def test_grad_scaler_equals_torch_bit_for_bit(name: str, impl: str) -> None:
    """GradScaler hands descend's fused kernels its scale and its found_inf (no host-side
    unscale, no host read); the other paths unscale and skip as GradScaler does for torch's."""
    kw, _ = SCALED[name]
    cls = name.split("-")[0]
    flags = {"fused": dict(fused=True), "foreach": dict(foreach=True), "single": dict(foreach=False)}[impl]
    theirs, topt, _ = scaled_run(lambda p: getattr(torch.optim, cls)(p, **kw, **flags))
    ours, dopt, reads = scaled_run(lambda p: getattr(descend, cls)(p, **kw, **flags))
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours))
    for p_t, p_d in zip(topt.param_groups[0]["params"], dopt.param_groups[0]["params"]):
        for key, value in topt.state[p_t].items():
            assert torch.equal(value.cpu(), dopt.state[p_d][key].cpu()), key
    if impl == "fused":
        assert reads == 0
        if cls != "SGD":  # the skipped step did not advance the counts
            assert all(float(s["step"]) == 6 for s in dopt.state.values())


def test_grad_scaler_with_l1_takes_the_host_path_and_skips_the_overflowed_step() -> None:
    """L1's prox runs outside the kernel, so the skip is decided on the host: the overflowed
    step changes nothing, and the other steps equal the unscaled run."""
    scaled, opt, _ = scaled_run(lambda p: descend.AdamW(p, lr=1e-2, l1=1e-3, fused=True), steps=5, inf_at=4)
    model = cpu_model()
    plain = descend.AdamW(model.parameters(), lr=1e-2, l1=1e-3, fused=True)
    for step in range(4):
        plain.zero_grad()
        backward(model, step)
        plain.step()
    assert all(torch.equal(a, b) for a, b in zip(scaled, model.parameters()))
    assert all(float(s["step"]) == 4 for s in opt.state.values())


def test_grad_scaler_after_unscale_for_clipping() -> None:
    """``scaler.unscale_(opt)`` before the step (gradient clipping): the kernel gets no scale,
    only found_inf; the run equals torch's fused AdamW under the same calls."""
    def run(make: Callable[..., torch.optim.Optimizer]) -> list[torch.Tensor]:
        model = cpu_model()
        opt = make(model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        for step in range(4):
            opt.zero_grad()
            backward(model, step, scaler)
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            scaler.step(opt)
            scaler.update()
        return [p.detach().clone() for p in model.parameters()]

    theirs = run(lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True))
    ours = run(lambda p: descend.AdamW(p, lr=1e-2, fused=True))
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours))


# --- capturable=True ---------------------------------------------------------------------------


def test_capturable_on_the_cpu_raises_as_torch_does_and_changes_nothing() -> None:
    for cls in (torch.optim.AdamW, descend.AdamW):
        model = cpu_model()
        opt = cls(model.parameters(), lr=1e-2, capturable=True, foreach=True)
        backward(model, 0)
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(AssertionError, match="If capturable=True, params and state_steps must be on supported"):
            opt.step()
        if cls is descend.AdamW:  # (torch's has already advanced its counts)
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and not opt.state


@pytest.fixture
def capturable_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let torch's and descend's capturable Adam run on the CPU, to compare their math here."""
    import importlib

    def devices(supports_xla: bool = True) -> list[str]:
        return ["cpu"]
    for module in ("torch.optim.adam", "descend.optimizers.adam"):
        monkeypatch.setattr(importlib.import_module(module), "_get_capturable_supported_devices", devices)


CAPTURABLE = {
    "AdamW-tensor-lr": (torch.optim.AdamW, descend.AdamW, dict(lr=torch.tensor(1e-2))),
    "AdamW-float-lr": (torch.optim.AdamW, descend.AdamW, dict(lr=1e-2)),
    "Adam-l2-amsgrad": (torch.optim.Adam, descend.Adam, dict(lr=torch.tensor(1e-2), weight_decay=0.1, amsgrad=True)),
    "AdamW-maximize": (torch.optim.AdamW, descend.AdamW, dict(lr=torch.tensor(1e-2), maximize=True)),
}


@pytest.mark.usefixtures("capturable_on_cpu")
@pytest.mark.parametrize("case", CAPTURABLE)
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
def test_capturable_equals_torch_and_reads_nothing(case: str, foreach: bool) -> None:
    theirs_cls, ours_cls, kw = CAPTURABLE[case]
    results = []
    for cls in (theirs_cls, ours_cls):
        model = cpu_model()
        options = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in kw.items()}
        opt = cls(model.parameters(), capturable=True, foreach=foreach, **options)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.9**t)
        for step in range(5):
            opt.zero_grad()
            backward(model, step)
            with counting_reads() as mode:
                opt.step()
            if cls is ours_cls and step and isinstance(kw["lr"], torch.Tensor):
                assert mode.reads == 0
            scheduler.step()
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("fresh_grads", [False, True], ids=["grads-in-buffer", "after-zero_grad"])
@pytest.mark.parametrize("rule", ["AdamW-default", "SGD-default"])
def test_a_flat_step_reads_no_step_counts_once_they_are_known_equal(rule: str, fresh_grads: bool,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """flat=True groups a segment's parameters into one run when their step counts are equal;
    after a step that stepped them all together they still are, and are not read again
    (``tolist`` reads without ``_local_scalar_dense``, so it is counted apart)."""
    tolist_calls = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: tolist_calls.append(t.shape) or tolist(t))
    model, plain = cpu_model(), cpu_model()
    opt = FUSED[rule](model.parameters(), flat=True)
    ref = FUSED[rule](plain.parameters())
    for step in range(4):
        for m, o in ((model, opt), (plain, ref)):
            if fresh_grads or step == 0:
                o.zero_grad()
                backward(m, step)
            else:  # the same gradient objects: backward accumulates into the buffer's views
                for p in m.parameters():
                    p.grad.zero_()
                backward(m, step)
        tolist_calls.clear()
        with counting_reads() as mode:
            opt.step()
        ref.step()
        if step >= 1:
            assert mode.reads == 0 and tolist_calls == []
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # (flat vs non-flat: to rounding)


def test_a_flat_step_splits_runs_again_when_a_parameter_had_no_gradient() -> None:
    """The counts are read again after a step that left a parameter out: it has one step fewer."""
    model, plain = cpu_model(), cpu_model()
    opt = descend.AdamW(model.parameters(), lr=1e-2, flat=True)
    ref = descend.AdamW(plain.parameters(), lr=1e-2)
    for step in range(4):
        for m, o in ((model, opt), (plain, ref)):
            o.zero_grad()
            backward(m, step)
            if step == 1:
                m[0].bias.grad = None
            o.step()
    steps = [int(opt.state[p]["step"]) for p in model.parameters()]
    assert steps == [4, 3, 4, 4]
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("rule", ["AdamW-default", "SGD-default"])
def test_on_the_cpu_the_skip_is_decided_on_the_host_with_the_same_results(rule: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """One read of the flag (free on the CPU) instead of the kernels that keep it on the device;
    parameters, state and skipped_steps as with the device's decision."""
    def run(on_device: bool) -> tuple[list[torch.Tensor], int, list[int]]:
        monkeypatch.setattr(descend.RegularizedOptimizer, "_skip_on_device_on_cpu", on_device)
        model = cpu_model()
        opt = FUSED[rule](model.parameters(), nonfinite="skip")
        reads = []
        for step in range(5):
            opt.zero_grad()
            backward(model, step)
            if step == 2:
                model[0].weight.grad[0, 0] = float("inf")
            with counting_reads() as mode:
                opt.step()
            reads.append(mode.reads)
        return [p.detach().clone() for p in model.parameters()], opt.skipped_steps, reads

    host, device = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(host[0], device[0]))
    assert host[1] == device[1] == 1
    assert host[2][1:] == [1, 1, 1, 1] and device[2][1:] == [0, 0, 0, 0]


class _AnswerMetaReads(TorchDispatchMode):
    """Counts the reads of values of meta tensors (a device without data) and answers each with
    a dummy, so that a step that reads can go on and be counted."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if first is not None and first.is_meta:
            if func is torch.ops.aten._local_scalar_dense.default:
                self.reads += 1
                return 1.0
            if func is torch.ops.aten._to_copy.default and kwargs.get("device") == torch.device("cpu"):
                self.reads += 1
                return torch.full(first.shape, 1e-3, dtype=kwargs.get("dtype") or first.dtype)
        return func(*args, **kwargs)


@pytest.mark.parametrize("rule", ["Adam", "AdamW", "Adam-amsgrad"])
def test_a_device_tensor_lr_on_the_for_loop_form_is_read_once_per_step(rule: str) -> None:
    """torch's for-loop Adam reads a tensor lr once per parameter (addcdiv_ takes the step size
    as a number); descend copies it to the host once per step, with the same step sizes."""
    with _AnswerMetaReads():
        opt = RULES[rule](meta_params() + meta_params() + meta_params(), lr=torch.tensor(1e-3, device="meta"), foreach=False)
        opt.step()
    with _AnswerMetaReads() as mode:
        opt.step()
    assert mode.reads == 1
