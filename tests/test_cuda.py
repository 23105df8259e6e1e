"""descend on a CUDA device (every test here is skipped where there is none; scripts/gpu-check.sh
runs them on a GPU machine).

- parity: every path of SGD, Adam, AdamW and Lion (default, which is fused on CUDA, foreach,
  fused, the per-tensor reference, flat, a tensor lr on the host or on the device, L1, every
  decay mode) against torch.optim (lion-pytorch for Lion) on the same device, float32 within
  1e-6 relative; the decay modes and L1 against their closed forms (regularization.py's table)
  applied around torch's step without decay;
- no host–device synchronization in a warmed step, under
  ``torch.cuda.set_sync_debug_mode("error")`` (which raises on any, ``.item()`` and blocking
  copies included), on each of those paths, and with ``nonfinite="skip"`` on the fused ones
  (only fused kernels take the skip as a device flag);
- bfloat16 and float16 parameters through the fused SGD and Adam kernels: bit for bit torch's;
- decoupled L1 (an in-place soft-threshold) equals ``softshrink`` of the step's result;
- ``GradScaler("cuda")`` with float16 autocast, an overflowing step included: bit for bit
  torch's fused AdamW and SGD;
- a warmed step captured in a CUDA graph (``capturable=True`` with the lr a device tensor, as
  torch's) and replayed equals the same steps run eagerly.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

import descend

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

DEV = "cuda"
SHAPES = [(64, 32), (32,), (7, 5), (1,), (4096,)]
STEPS = 8
REL = 1e-6  # float32, relative to the largest |θ| of each tensor


# --- a problem: parameters and a fixed sequence of gradients -----------------------------


def make_params(dtype: torch.dtype = torch.float32, seed: int = 0, device: str = DEV) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)  # drawn on the host: the same numbers everywhere
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype).requires_grad_() for s in SHAPES]


def make_grads(steps: int = STEPS, dtype: torch.dtype = torch.float32, seed: int = 1,
               device: str = DEV) -> list[list[Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g).mul_(0.5).to(device=device, dtype=dtype) for s in SHAPES]
            for _ in range(steps)]


def lr_at(lr0: float, step: int) -> float:
    """A decaying schedule, so that the decay modes (which differ in how they follow lr) differ."""
    return lr0 / (1 + 0.25 * step)


def run(make: Callable[[list[Tensor]], torch.optim.Optimizer], *, steps: int = STEPS,
        dtype: torch.dtype = torch.float32, schedule: bool = False,
        before: Callable[[list[Tensor], float], None] | None = None,
        after: Callable[[list[Tensor], float], None] | None = None) -> tuple[list[Tensor], Any]:
    """``steps`` steps over the fixed gradients; ``before``/``after`` (params, lr) run around each
    step (the oracles' closed-form regularization). Returns the parameters and the optimizer."""
    params, grads = make_params(dtype), make_grads(steps, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make(params)
    lr0 = float(opt.param_groups[0]["lr"])
    for t in range(steps):
        lr = lr_at(lr0, t) if schedule else lr0
        if schedule:
            opt.param_groups[0]["lr"] = lr
        for p, g in zip(params, grads[t]):
            p.grad = g.clone()
        with torch.no_grad():
            if before is not None:
                before(params, lr)
            opt.step()
            if after is not None:
                after(params, lr)
    torch.cuda.synchronize()
    return [p.detach().clone() for p in params], opt


def assert_rel(ours: list[Tensor], theirs: list[Tensor], rel: float = REL) -> None:
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a.device.type == b.device.type == "cuda"
        err = (a.double() - b.double()).abs().max().item()
        scale = b.double().abs().max().item()
        assert err <= rel * scale, f"parameter {i}: max |difference| {err:.3g} > {rel:g} × {scale:.3g}"


def assert_moved(params: list[Tensor], dtype: torch.dtype = torch.float32) -> None:
    start = make_params(dtype)
    assert all(not torch.equal(a, b.detach()) for a, b in zip(params, start))  # a run that did something


# --- the rules and their oracles ---------------------------------------------------------

LR = {"SGD": 0.05, "Adam": 1e-2, "AdamW": 1e-2, "Lion": 3e-3}


def ours(rule: str, **kw: Any) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    kw.setdefault("lr", LR[rule])
    if rule == "SGD":
        kw.setdefault("momentum", 0.9)
    return lambda p: getattr(descend, rule)(p, **kw)


def theirs(rule: str, **kw: Any) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    """torch.optim's rule (lion-pytorch's Lion, which has no implementation flags)."""
    kw.setdefault("lr", LR[rule])
    if rule == "Lion":
        import lion_pytorch

        kw = {k: v for k, v in kw.items() if k not in ("foreach", "fused")}
        return lambda p: lion_pytorch.Lion(p, **kw)
    if rule == "SGD":
        kw.setdefault("momentum", 0.9)
    return lambda p: getattr(torch.optim, rule)(p, **kw)


#: descend's flags and torch's for each path (torch's default on CUDA is foreach; descend's is fused)
PATHS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "default": ({}, {}),
    "foreach": ({"foreach": True}, {"foreach": True}),
    "fused": ({"fused": True}, {"fused": True}),
    "single": ({"foreach": False}, {"foreach": False}),
    "flat": ({"flat": True}, {}),
}
#: each rule's own decay setting, as torch names it (the rule's default decay mode)
DECAY = {"SGD": dict(weight_decay=1e-3), "Adam": dict(weight_decay=0.1), "AdamW": dict(weight_decay=0.05),
         "Lion": dict(weight_decay=0.3)}
RULES = ("SGD", "Adam", "AdamW", "Lion")


def _skip_unsupported(rule: str, path: str) -> None:
    if rule == "Lion" and path == "fused":
        pytest.skip("Lion has no fused form")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rule", RULES)
def test_every_path_equals_torch(rule: str, path: str) -> None:
    _skip_unsupported(rule, path)
    flags, torch_flags = PATHS[path]
    got, opt = run(ours(rule, **DECAY[rule], **flags))
    expected, _ = run(theirs(rule, **DECAY[rule], **torch_flags))
    assert_rel(got, expected)
    assert_moved(got)
    assert opt.flat == (path == "flat")


@pytest.mark.parametrize("rule", ("SGD", "Adam", "AdamW"))
@pytest.mark.parametrize("where", ["cpu", "cuda"])
def test_a_tensor_lr_equals_torch_fused_with_it(rule: str, where: str) -> None:
    """torch's fused kernels take the lr as a tensor on the host (read there) or on the device."""
    flags = {} if where == "cpu" else {"fused": True}
    got, _ = run(ours(rule, lr=torch.tensor(LR[rule], device=where), **DECAY[rule], **flags))
    expected, _ = run(theirs(rule, lr=torch.tensor(LR[rule], device=where), fused=True, **DECAY[rule]))
    assert_rel(got, expected)
    assert_moved(got)


@pytest.mark.parametrize("rule", ("Adam", "AdamW"))
def test_a_device_tensor_lr_on_the_for_loop_form_equals_torch_s_bit_for_bit(rule: str) -> None:
    """descend copies the lr to the host once per step where torch reads it per parameter."""
    got, _ = run(ours(rule, lr=torch.tensor(LR[rule], device=DEV), foreach=False, **DECAY[rule]))
    expected, _ = run(theirs(rule, lr=torch.tensor(LR[rule], device=DEV), foreach=False, **DECAY[rule]))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_a_host_tensor_lr_on_the_foreach_path_equals_a_number() -> None:
    got, _ = run(ours("AdamW", lr=torch.tensor(1e-2), foreach=True))
    expected, _ = run(theirs("AdamW", lr=1e-2, foreach=True))
    assert_rel(got, expected)


def _decay_scale(mode: str, lr: float, lr0: float) -> float:
    """s of regularization.py's table: λ and λ₁ act as s·λ, s·λ₁."""
    return {"decoupled": lr, "independent": lr / lr0, "fixed": 1.0, "corrected": lr * lr / lr0}[mode]


def _closed_form(mode: str, wd: float, l1: float, lr0: float) -> tuple[Callable[[list[Tensor], float], None],
                                                                        Callable[[list[Tensor], float], None]]:
    """(before, after) the oracle's step: coupled terms join the gradient, decoupled decay
    shrinks θ before the step, decoupled L1 soft-thresholds θ after it."""
    def before(params: list[Tensor], lr: float) -> None:
        for p in params:
            if mode == "coupled":
                p.grad.add_(p, alpha=wd).add_(torch.sign(p), alpha=l1)
            else:
                p.mul_(1 - _decay_scale(mode, lr, lr0) * wd)

    def after(params: list[Tensor], lr: float) -> None:
        if mode != "coupled" and l1:
            t = _decay_scale(mode, lr, lr0) * l1
            for p in params:
                p.copy_(torch.sign(p) * torch.clamp(p.abs() - t, min=0))

    return before, after


@pytest.mark.parametrize("l1", [0.0, 1e-2], ids=["no-l1", "l1"])
@pytest.mark.parametrize("mode", descend.DECAY_MODES)
@pytest.mark.parametrize("path", ["default", "foreach", "flat"])
@pytest.mark.parametrize("rule", RULES)
def test_every_decay_mode_and_l1_equal_their_closed_form(rule: str, path: str, mode: str, l1: float) -> None:
    wd = 0.05
    flags, torch_flags = PATHS[path]
    before, after = _closed_form(mode, wd, l1, LR[rule])
    got, _ = run(ours(rule, weight_decay=wd, l1=l1, decay=mode, **flags), schedule=True)
    expected, _ = run(theirs(rule, weight_decay=0.0, **torch_flags), schedule=True, before=before, after=after)
    assert_rel(got, expected)
    assert_moved(got)


# --- no host–device synchronization in a warmed step ----------------------------------------


@contextlib.contextmanager
def sync_errors() -> Iterator[None]:
    """Any synchronization with the device (``.item()``, ``bool()``, a blocking copy) raises."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def steps_without_syncs(make: Callable[[list[Tensor]], torch.optim.Optimizer], *, warm: int = 2, steps: int = 3,
                        nan_at: int | None = None) -> tuple[torch.optim.Optimizer, list[list[Tensor]]]:
    """``warm`` steps (which create state), then ``steps`` steps under :func:`sync_errors`, each
    with new gradient tensors (as after ``zero_grad()``), made on the device beforehand. Returns
    the optimizer and the parameters before each synchronized step."""
    params, grads = make_params(), make_grads(warm + steps)
    if nan_at is not None:
        grads[warm + nan_at][0][1, 1] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make(params)
    for t in range(warm):
        for p, g in zip(params, grads[t]):
            p.grad = g
        opt.step()
    snapshots = []
    torch.cuda.synchronize()
    for t in range(warm, warm + steps):
        snapshots.append([p.detach().clone() for p in params])
        for p, g in zip(params, grads[t]):
            p.grad = g
        with sync_errors():
            opt.step()
    torch.cuda.synchronize()
    snapshots.append([p.detach().clone() for p in params])
    return opt, snapshots


def test_torch_steps_without_syncs() -> None:
    """The premise: torch's own foreach and fused AdamW do."""
    steps_without_syncs(theirs("AdamW", foreach=True))
    steps_without_syncs(theirs("AdamW", fused=True))
    steps_without_syncs(theirs("AdamW", lr=torch.tensor(1e-2), fused=True))


SYNC_PATHS: dict[str, dict[str, Any]] = {
    "default": {},
    "foreach": dict(foreach=True),
    "flat": dict(flat=True),
    "tensor-lr-host": dict(lr=torch.tensor(1e-2)),
    "tensor-lr-host-foreach": dict(lr=torch.tensor(1e-2), foreach=True),
    "tensor-lr-device-fused": dict(lr="device", fused=True),
    "l1": dict(l1=1e-3),
    "l1-foreach": dict(l1=1e-3, foreach=True),
    **{f"decay-{mode}": dict(decay=mode, weight_decay=1e-3) for mode in descend.DECAY_MODES},
    **{f"decay-{mode}-foreach": dict(decay=mode, weight_decay=1e-3, foreach=True) for mode in descend.DECAY_MODES},
    "skip": dict(nonfinite="skip"),
    "skip-fused": dict(nonfinite="skip", fused=True),
}
SYNC_RULES = ("SGD", "Adam", "AdamW", "Adam-amsgrad", "Lion")


def _sync_optimizer(rule: str, path: str) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    kw = dict(SYNC_PATHS[path])
    if kw.get("lr") == "device":
        kw["lr"] = torch.tensor(1e-2, device=DEV)
    if rule == "Adam-amsgrad":
        return ours("Adam", amsgrad=True, **kw)
    return ours(rule, **kw)


@pytest.mark.parametrize("path", SYNC_PATHS)
@pytest.mark.parametrize("rule", SYNC_RULES)
def test_a_warmed_step_does_not_synchronize(rule: str, path: str) -> None:
    if rule == "Lion" and (SYNC_PATHS[path].get("fused") or "nonfinite" in SYNC_PATHS[path]):
        pytest.skip("Lion has no fused form (only fused kernels take the skip as a device flag)")
    opt, snapshots = steps_without_syncs(_sync_optimizer(rule, path))
    assert not torch.equal(snapshots[0][0], snapshots[-1][0])  # the steps did something


@pytest.mark.parametrize("rule", ["SGD", "Adam", "AdamW"])
def test_capturable_adam_and_a_fused_step_do_not_synchronize(rule: str) -> None:
    if rule == "SGD":
        make = ours("SGD", lr=torch.tensor(0.05, device=DEV), fused=True)
    else:
        make = ours(rule, lr=torch.tensor(1e-2, device=DEV), capturable=True)
    steps_without_syncs(make)


@pytest.mark.parametrize("flags", [{}, {"fused": True}], ids=["default", "fused"])
@pytest.mark.parametrize("rule", ["SGD", "Adam", "AdamW"])
def test_skip_decides_on_the_device_in_fused_steps(rule: str, flags: dict[str, Any]) -> None:
    """nonfinite="skip" with a NaN gradient (descend's default on CUDA is fused): no
    synchronization, and the step changes nothing."""
    opt, snapshots = steps_without_syncs(ours(rule, nonfinite="skip", **flags), nan_at=1)
    assert all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2]))  # the NaN step
    assert not torch.equal(snapshots[0][0], snapshots[1][0]) and not torch.equal(snapshots[2][0], snapshots[3][0])
    assert opt.skipped_steps == 1


# --- half precision through the fused kernels ------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("rule", ["SGD", "Adam", "AdamW"])
def test_half_precision_fused_steps_are_torch_bit_for_bit(rule: str, dtype: torch.dtype) -> None:
    got, opt = run(ours(rule, fused=True, **DECAY[rule]), dtype=dtype)
    expected, ref = run(theirs(rule, fused=True, **DECAY[rule]), dtype=dtype)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert_moved(got, dtype)
    for p_d, p_t in zip(opt.param_groups[0]["params"], ref.param_groups[0]["params"]):
        for key, value in ref.state[p_t].items():
            assert torch.equal(value.cpu(), opt.state[p_d][key].cpu()), key


# --- decoupled L1: the soft-threshold -------------------------------------------------------


@pytest.mark.parametrize("flags", [{}, {"foreach": True}, {"foreach": False}, {"flat": True}],
                         ids=["default", "foreach", "single", "flat"])
@pytest.mark.parametrize("rule", ["SGD", "AdamW", "Lion"])
def test_decoupled_l1_is_softshrink(rule: str, flags: dict[str, Any]) -> None:
    """With a zero gradient the update is 0 (SGD without momentum, Adam's first step, Lion's
    sign of 0), so the step is the prox alone: θ ← softshrink(θ, lr·λ₁)."""
    lr, l1 = 0.1, 0.5
    params = make_params()
    start = [p.detach().clone() for p in params]
    kw: dict[str, Any] = dict(lr=lr, l1=l1, decay="decoupled", weight_decay=0.0, **flags)
    opt = getattr(descend, rule)(params, **kw)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, p0 in zip(params, start):
        expected = torch.nn.functional.softshrink(p0, lr * l1)
        torch.testing.assert_close(p.detach(), expected, rtol=2e-7, atol=0)  # (≤ 1 ulp: the threshold's rounding)
        assert torch.equal(p.detach() == 0, expected == 0)
    assert any((p.detach() == 0).any() for p in params)  # the threshold zeroed some


# --- GradScaler with float16 autocast ---------------------------------------------------------


def scaled_run(make: Callable[[Any], torch.optim.Optimizer], steps: int = 7,
               inf_at: int = 3) -> tuple[list[Tensor], torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(DEV)
    opt = make(model.parameters())
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12, growth_interval=2)
    g = torch.Generator().manual_seed(5)
    data = [torch.randn(64, 16, generator=g).to(DEV) for _ in range(steps)]
    for step in range(steps):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(data[step]).float().pow(2).mean()
        scaler.scale(loss).backward()
        if step == inf_at:
            model[2].weight.grad[0, 3] = float("inf")
        scaler.step(opt)
        scaler.update()
    torch.cuda.synchronize()
    return [p.detach().clone() for p in model.parameters()], opt


SCALED = {
    "AdamW-fused": (lambda p: descend.AdamW(p, lr=1e-2, fused=True), lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True)),
    "AdamW-default": (lambda p: descend.AdamW(p, lr=1e-2), lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True)),
    "Adam-l2": (lambda p: descend.Adam(p, lr=1e-2, weight_decay=0.1, fused=True),
                lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1, fused=True)),
    "SGD-fused": (lambda p: descend.SGD(p, lr=1e-2, momentum=0.9, weight_decay=1e-3, fused=True),
                  lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, weight_decay=1e-3, fused=True)),
}


@pytest.mark.parametrize("name", SCALED)
def test_grad_scaler_with_fp16_autocast_is_torch_fused_bit_for_bit(name: str) -> None:
    make_ours, make_theirs = SCALED[name]
    got, opt = scaled_run(make_ours)
    expected, ref = scaled_run(make_theirs)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    for p_d, p_t in zip(opt.param_groups[0]["params"], ref.param_groups[0]["params"]):
        for key, value in ref.state[p_t].items():
            assert torch.equal(value.cpu(), opt.state[p_d][key].cpu()), key
    if not name.startswith("SGD"):  # the overflowed step did not count
        assert all(float(s["step"]) == 6 for s in opt.state.values())


# --- CUDA graphs ------------------------------------------------------------------------------


def graphed_run(make: Callable[[list[Tensor], Tensor], torch.optim.Optimizer], *, graph: bool, warm: int = 3,
                steps: int = 5) -> tuple[list[Tensor], torch.optim.Optimizer]:
    """``warm`` eager steps, then ``steps`` steps either replayed from one captured step
    (``graph``) or run eagerly, the lr (a device tensor) changing every step."""
    params, grads = make_params(), make_grads(warm + steps)
    lr = torch.tensor(1e-2, device=DEV)
    static = [torch.zeros_like(p) for p in params]
    for p, s in zip(params, static):
        p.grad = s  # the graph reads the gradients from these buffers
    opt = make(params, lr)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph's documentation asks
        for t in range(warm):
            for s, g in zip(static, grads[t]):
                s.copy_(g)
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    step: Callable[[], Any] = opt.step
    if graph:
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            opt.step()
        step = captured.replay
    for t in range(warm, warm + steps):
        for s, g in zip(static, grads[t]):
            s.copy_(g)
        lr.fill_(lr_at(1e-2, t))
        step()
    torch.cuda.synchronize()
    return [p.detach().clone() for p in params], opt


GRAPHED: dict[str, Callable[[list[Tensor], Tensor], torch.optim.Optimizer]] = {
    "AdamW-capturable": lambda p, lr: descend.AdamW(p, lr=lr, capturable=True),
    "AdamW-capturable-foreach": lambda p, lr: descend.AdamW(p, lr=lr, capturable=True, foreach=True),
    "AdamW-capturable-fused": lambda p, lr: descend.AdamW(p, lr=lr, capturable=True, fused=True),
    "Adam-capturable-amsgrad": lambda p, lr: descend.Adam(p, lr=lr, amsgrad=True, weight_decay=0.1, capturable=True),
    "AdamW-capturable-independent": lambda p, lr: descend.AdamW(p, lr=lr, decay="independent", capturable=True),
    "SGD-fused": lambda p, lr: descend.SGD(p, lr=lr, momentum=0.9, fused=True),
}


@pytest.mark.parametrize("name", GRAPHED)
def test_a_captured_step_replays_as_eager_steps(name: str) -> None:
    replayed, opt = graphed_run(GRAPHED[name], graph=True)
    eager, ref = graphed_run(GRAPHED[name], graph=False)
    assert all(torch.equal(a, b) for a, b in zip(replayed, eager))
    assert_moved(replayed)
    for p_d, p_e in zip(opt.param_groups[0]["params"], ref.param_groups[0]["params"]):
        for key, value in ref.state[p_e].items():
            assert torch.equal(torch.as_tensor(value).cpu(), torch.as_tensor(opt.state[p_d][key]).cpu()), key
    if name.startswith("Adam"):
        assert all(float(s["step"]) == 8 for s in opt.state.values())  # each replay counted


@pytest.mark.parametrize("impl", [{}, {"foreach": True}, {"fused": True}], ids=["default", "foreach", "fused"])
def test_capturable_adamw_equals_torchs(impl: dict[str, Any]) -> None:
    got, _ = graphed_run(lambda p, lr: descend.AdamW(p, lr=lr, capturable=True, **impl), graph=True)
    expected, _ = graphed_run(lambda p, lr: torch.optim.AdamW(p, lr=lr, capturable=True, **impl), graph=True)
    assert_rel(got, expected)


# --- descend bench on the GPU -----------------------------------------------------------------


def test_bench_runs_on_the_gpu(tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from descend.cli import bench

    shapes = bench.param_shapes
    monkeypatch.setattr(bench, "param_shapes",
                        lambda name, quick=False: ("tiny", [(300,), (20, 30)]) if name == "gpt2" else shapes(name, quick))
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cuda", "--sets", "gpt2,overhead", "--optimizers", "adamw", "--steps", "2",
                       "--warmup", "1", "--min-seconds", "0", "--triad-mb", "8", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| tiny | AdamW | torch foreach (torch's default) |" in text  # torch's default on CUDA
    assert "| 150 tiny tensors | AdamW | descend (default) |" in text
    doc = json.loads(out.read_text())
    assert doc["machine"]["gpu"] and {r["device"] for r in doc["rows"]} == {"cuda"}
    assert all(r["ms"] > 0 for r in doc["rows"])


@pytest.mark.parametrize("kw", [dict(state_dtype=torch.bfloat16), dict(rounding="compensated")],
                         ids=["bf16-state", "compensated"])
def test_the_one_pass_low_precision_step_follows_the_general_path_without_syncs(kw: dict[str, Any]) -> None:
    """descend.precision_fused on a GPU (a Triton kernel): the general path's values to rounding,
    step counts kept on the host, and no host read of a device value in a warmed step."""
    from descend import precision_fused

    dtype = torch.bfloat16 if kw.get("rounding") == "compensated" else torch.float32
    results = []
    for enabled in (False, True):
        precision_fused.ENABLED = enabled
        try:
            gen = torch.Generator(device=DEV).manual_seed(0)
            p = torch.nn.Parameter(torch.randn(512, 512, device=DEV, generator=gen).to(dtype))
            opt = descend.AdamW([p], lr=1e-3, weight_decay=0.1, **kw)
            for step in range(6):
                p.grad = (torch.randn(p.shape, device=DEV, generator=gen) * 1e-2).to(dtype)
                if step == 5 and enabled:
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    opt.step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            if enabled:
                assert opt.state[p]["step"].is_cpu  # (the bias corrections are computed on the host)
            results.append(p.detach().double())
        finally:
            precision_fused.ENABLED = True
    assert (results[0] - results[1]).abs().max().item() <= 0.05 * 1e-3 * 6
