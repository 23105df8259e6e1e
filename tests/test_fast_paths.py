"""The default step takes the fastest correct path, and every fast path gives the reference's numbers.

Oracles: the per-tensor reference implementation (``foreach=False``), itself held to
torch.optim by tests/test_parity.py, and torch.optim's own implementations. Speed is not
tested here (see ``descend bench``); what is tested is that each shortcut taken for speed
(fused kernels for every decoupled mode, small tensors on one thread, the layout guard)
changes no number. Tolerance: float64 <= 1e-12 absolute after 30 steps, the parity tests'
bound; fused and reference differ by rounding only (the fused kernel divides by the
bias-corrected denominator in one expression).
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch

import descend
from descend import dispatch as base
from tests.helpers import loss_fn, make_params, max_abs_diff, train

SETTINGS = [
    (descend.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.05)),
    (descend.SGD, dict(lr=0.05, momentum=0.9, dampening=0.2, weight_decay=0.05, decay="independent", l1=0.01)),
    (descend.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.05, decay="fixed", maximize=True)),
    (descend.Adam, dict(lr=0.01, weight_decay=0.05, l1=0.01)),
    (descend.AdamW, dict(lr=0.01, weight_decay=0.05)),
    (descend.AdamW, dict(lr=0.01, weight_decay=0.05, decay="independent", amsgrad=True)),
    (descend.AdamW, dict(lr=0.01, weight_decay=0.05, decay="fixed", l1=0.01)),
]
IDS = [f"{cls.__name__}-{kw.get('decay', 'default')}-{i}" for i, (cls, kw) in enumerate(SETTINGS)]


def _implementations(opt: torch.optim.Optimizer) -> list[str]:
    return [b.implementation for b in opt._prepare() if b.params]  # type: ignore[attr-defined]


@pytest.mark.parametrize(("cls", "kw"), SETTINGS, ids=IDS)
def test_default_is_fused_and_equals_the_reference(cls: type, kw: dict) -> None:
    """With no flag, float CPU parameters take torch's fused kernel, in every decay mode
    (independent and fixed decay are decoupled decay with a rescaled coefficient)."""
    params = make_params()
    opt = cls(params, **kw)
    loss_fn(params, 0).backward()
    assert _implementations(opt) == ["fused"]
    reference, _ = train(lambda p: cls(p, foreach=False, **kw), steps=30)
    default, _ = train(lambda p: cls(p, **kw), steps=30)
    assert max_abs_diff(default, reference) <= 1e-12


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_default_equals_torch_fused_bit_for_bit(name: str) -> None:
    """descend's default step is torch's fused step, not merely close to it."""
    kw = dict(lr=0.01, weight_decay=0.05, **({"momentum": 0.9} if name == "SGD" else {}))
    ours, _ = train(lambda p: getattr(descend, name)(p, **kw), steps=20, dtype=torch.float32)
    theirs, _ = train(lambda p: getattr(torch.optim, name)(p, fused=True, **kw), steps=20, dtype=torch.float32)
    assert max_abs_diff(ours, theirs) == 0.0


def _big_and_small(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(40_000,), (7,), (300, 200), (3, 5), (1,)]  # above and below base.SERIAL_NUMEL
    return [torch.randn(s, generator=g).requires_grad_() for s in shapes]


def _run_big_and_small(make, steps: int = 6) -> list[torch.Tensor]:
    params = _big_and_small()
    opt = make(params)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.fixture
def two_threads():  # type: ignore[no-untyped-def]
    """tests/conftest.py runs the suite on one thread; the serial path needs several."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        if not base.can_serialize():
            pytest.skip("not the OpenMP backend: nothing is serialized")
        yield 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_small_tensors_on_one_thread_change_no_bit(name: str, monkeypatch: pytest.MonkeyPatch,
                                                   two_threads: int) -> None:
    """Small tensors of a fused step run on one thread, large ones on all: the same numbers as
    torch's fused step over all of them, and the thread count is restored."""
    threads = two_threads
    kw = dict(lr=0.01, weight_decay=0.05, **({"momentum": 0.9} if name == "SGD" else {}))
    calls: list[int] = []
    real_update = getattr(descend, name)._update

    def spy(self, batch, implementation):  # type: ignore[no-untyped-def]
        calls.append(torch.get_num_threads())
        real_update(self, batch, implementation)

    monkeypatch.setattr(getattr(descend, name), "_update", spy)
    ours = _run_big_and_small(lambda p: getattr(descend, name)(p, **kw))
    assert calls[:2] == [1, threads]  # the small tensors, then the large ones
    assert torch.get_num_threads() == threads
    theirs = _run_big_and_small(lambda p: getattr(torch.optim, name)(p, fused=True, **kw))
    assert max_abs_diff(ours, theirs) == 0.0


def test_thread_count_is_restored_when_the_update_raises(monkeypatch: pytest.MonkeyPatch, two_threads: int) -> None:
    threads = two_threads

    def boom(self, batch, implementation):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    monkeypatch.setattr(descend.AdamW, "_update", boom)
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="boom"):
        descend.AdamW([p]).step()
    assert torch.get_num_threads() == threads


def _mismatched_layout_run(make, steps: int = 5) -> list[torch.Tensor]:
    """A contiguous parameter given transposed (non-contiguous) gradients by hand."""
    g = torch.Generator().manual_seed(0)
    p = torch.randn(4, 6, generator=g, dtype=torch.float64).requires_grad_()
    opt = make([p])
    for _ in range(steps):
        p.grad = torch.randn(6, 4, generator=g, dtype=torch.float64).t()
        opt.step()
    return [p.detach().clone()]


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_mismatched_layouts_leave_the_fused_path(name: str) -> None:
    """torch's fused CPU kernels walk raw memory: with a transposed gradient of a contiguous
    parameter they update the wrong elements. The default takes foreach there (and equals
    the reference); fused=True refuses instead of computing garbage."""
    kw = dict(lr=0.01, weight_decay=0.05, **({"momentum": 0.9} if name == "SGD" else {}))
    cls = getattr(descend, name)
    reference = _mismatched_layout_run(lambda p: cls(p, foreach=False, **kw))
    default = _mismatched_layout_run(lambda p: cls(p, **kw))
    assert max_abs_diff(default, reference) <= 1e-12
    torch_fused = _mismatched_layout_run(lambda p: getattr(torch.optim, name)(p, fused=True, **kw))
    assert max_abs_diff(torch_fused, reference) > 1e-3  # the hazard is real
    p = torch.zeros(4, 6, requires_grad=True)
    p.grad = torch.ones(6, 4).t()
    opt = cls([p], fused=True, **kw)
    with pytest.raises(RuntimeError, match="one dense memory layout"):
        opt.step()
    assert torch.equal(p.detach(), torch.zeros(4, 6)) and p not in opt.state


def test_matching_non_contiguous_layouts_stay_fused() -> None:
    """A transposed parameter with a gradient of the same strides (what autograd gives) is fine."""
    p = torch.randn(6, 4).t().requires_grad_()
    (p * torch.arange(24.0).view(4, 6)).sum().backward()
    assert p.grad is not None and p.grad.stride() == p.stride()
    assert _implementations(descend.AdamW([p])) == ["fused"]


@pytest.mark.parametrize(("flags", "expected"), [
    ({}, "fused"), ({"foreach": True}, "foreach"), ({"foreach": False}, "single"), ({"fused": True}, "fused")])
def test_flags_force_a_path(flags: dict, expected: str) -> None:
    p = torch.ones(3, requires_grad=True)
    p.grad = torch.ones(3)
    assert _implementations(descend.Adam([p], **flags)) == [expected]


def test_complex_parameters_fall_back_and_match_the_reference() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, dtype=torch.complex128, generator=g)

    def run(flags: dict) -> list[torch.Tensor]:
        p = z.clone().requires_grad_()
        opt = descend.AdamW([p], lr=0.05, **flags)
        for step in range(10):
            opt.zero_grad()
            (p.abs() ** 2 * (step + 1)).sum().backward()
            opt.step()
        return [p.detach()]

    p = z.clone().requires_grad_()
    p.grad = torch.ones_like(z)
    assert _implementations(descend.AdamW([p])) == ["single"]
    with pytest.raises(RuntimeError, match="fused=True needs floating-point"):
        descend.AdamW([p], fused=True).step()
    assert max_abs_diff(run({}), run({"foreach": False})) == 0.0


def test_sparse_gradients_are_refused_before_anything_changes() -> None:
    dense = torch.ones(3, requires_grad=True)
    dense.grad = torch.ones(3)
    sparse = torch.ones(4, requires_grad=True)
    sparse.grad = torch.sparse_coo_tensor([[1]], [1.0], (4,), check_invariants=True)
    opt = descend.AdamW([dense, sparse])
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert torch.equal(dense.detach(), torch.ones(3)) and not opt.state


@pytest.mark.parametrize("flat", [False, True])
def test_skip_nonfinite_steps_change_nothing(flat: bool) -> None:
    """nonfinite="skip" (whose cost ``descend bench`` reports) leaves parameters and state
    as they were, and the next finite step goes on as if the bad one never happened."""
    def run(bad: bool) -> list[torch.Tensor]:
        params = make_params()
        opt = descend.AdamW(params, lr=0.01, nonfinite="skip", flat=flat)
        for step in range(8):
            opt.zero_grad()
            loss_fn(params, step).backward()
            opt.step()
            if bad and step == 3:
                params[0].grad.view(-1)[2] = float("nan")  # type: ignore[union-attr]
                before = [p.detach().clone() for p in params]
                opt.step()
                assert opt.skipped_steps == 1
                assert max_abs_diff([p.detach() for p in params], before) == 0.0
        return [p.detach().clone() for p in params]

    assert max_abs_diff(run(True), run(False)) == 0.0


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize(("value", "dtype", "skipped"), [
    (float("nan"), torch.float32, True), (float("inf"), torch.float32, True), (float("-inf"), torch.float64, True),
    (1e30, torch.float32, False),   # finite, but its square overflows: the norm test must not skip it
    (6e4, torch.float16, False),    # ditto in float16, whose norms are accumulated in float32
    (float("inf"), torch.float16, True),
])
def test_nonfinite_guard_is_exact(value: float, dtype: torch.dtype, skipped: bool, flat: bool) -> None:
    """The guard reads each gradient once (its 2-norm) and confirms a non-finite norm entry
    by entry, so huge finite gradients are stepped and every NaN or ±inf is caught."""
    p = torch.zeros(5, dtype=dtype, requires_grad=True)
    q = torch.zeros(3, dtype=dtype, requires_grad=True)
    opt = descend.SGD([p, q], lr=1e-40 if dtype != torch.float16 else 1e-3, nonfinite="skip", flat=flat)
    p.grad = torch.tensor([0, value, value, 0, 0], dtype=dtype)
    q.grad = torch.ones(3, dtype=dtype)
    opt.step()
    assert opt.skipped_steps == int(skipped)
    assert (q.detach() != 0).all().item() is not skipped


# --- the benchmark's fixed facts (its timings are not tested: see ``descend bench``) ------


def test_bench_parameter_sets_have_the_models_shapes() -> None:
    from descend.cli import bench

    def count(shapes: list[tuple[int, ...]]) -> tuple[int, int]:
        return len(shapes), sum(math.prod(s) for s in shapes)

    assert count(bench.param_shapes("resnet50")[1]) == (161, 25_557_032)  # torchvision resnet50
    assert count(bench.param_shapes("gpt2")[1]) == (148, 124_439_808)  # Hugging Face gpt2, lm_head tied
    assert count(bench.param_shapes("many-small")[1]) == (2000, 2_000_000)
    assert count(bench.param_shapes("one-50m")[1]) == (1, 50_000_000)


def test_bench_step_memory_counts_temporaries() -> None:
    from descend.cli import bench

    x = torch.zeros(1 << 20)  # 4 MiB
    assert bench.step_peak_bytes(lambda: x.add_(1)) < 1024  # (the scalar 1 becomes a tiny tensor)
    peak = bench.step_peak_bytes(lambda: (x + 1).sum())  # one 4 MiB temporary
    assert 4 << 20 <= peak < 5 << 20


def test_bench_runs_end_to_end(capsys: pytest.CaptureFixture[str], tmp_path: Any,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    from descend.cli import bench

    monkeypatch.setattr(bench, "param_shapes", lambda name, quick=False: ("tiny", [(300,), (20, 30), (7,)]))
    out = tmp_path / "bench.json"
    code = bench.main(["--sets", "many-small", "--optimizers", "sgd", "--steps", "1", "--warmup", "1",
                       "--triad-mb", "8", "--threads", "1", "--min-seconds", "0", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    for label in ("torch loop (torch's default)", "torch foreach", "torch fused", "descend (default)",
                  "descend flat=True", "descend independent", "descend flat decoupled + L1"):
        assert f"| {label} |" in text
    rows = json.loads(out.read_text())["rows"]
    fused = next(r for r in rows if r["label"] == "torch fused")
    assert fused["vs_fastest"] <= 1.0 + 1e-12 and fused["gbps"] > 0
    assert bench.main(["--sets", "nope"]) == 2


@pytest.mark.parametrize("flat", [False, True])
def test_a_state_that_does_not_fit_is_refused_before_anything_changes(flat: bool) -> None:
    """The per-step check of state shapes (done in bulk on the fast path) still names the culprit."""
    params = make_params()
    opt = descend.AdamW(params, lr=0.01, flat=flat)
    loss_fn(params, 0).backward()
    opt.step()
    opt.state[params[2]]["exp_avg"] = torch.zeros(6, 3, dtype=torch.float64)
    if flat:
        opt._flat._dirty = True  # a hand-made state is seen at the next rebuild (see descend.flat)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"state 'exp_avg' of parameter 2 of group 0 \(shape \(3, 6\)\)"):
        opt.step()
    assert max_abs_diff([p.detach() for p in params], before) == 0.0


def _mixed_dtypes(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.float64, torch.float32, torch.float64, torch.float64]
    return [torch.randn(5, 3, generator=g, dtype=torch.float64).to(dt).requires_grad_() for dt in dtypes]


@pytest.mark.parametrize("impl", [{"foreach": True}, {"fused": True}, {}])
@pytest.mark.parametrize(("cls", "kw"), SETTINGS, ids=IDS)
def test_a_group_of_several_dtypes_is_stepped_per_dtype(cls: type, kw: dict, impl: dict) -> None:
    """float32 and float64 parameters in one group (and a float64-only group): the
    multi-tensor paths bucket them by dtype (torch's grouping, or one bucket when all share
    one dtype on the CPU) and give the reference's numbers: float64 entries to 1e-12,
    float32 entries to float32 rounding."""

    def run(options: dict) -> list[torch.Tensor]:
        params = _mixed_dtypes()
        opt = cls([{"params": params[:4]}, {"params": params[4:]}], **kw, **options)
        g = torch.Generator().manual_seed(1)
        for _ in range(8):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            opt.step()
        return [p.detach().clone() for p in params]

    reference, fast = run({"foreach": False}), run(impl)
    for r, f in zip(reference, fast, strict=True):
        assert f.dtype == r.dtype
        torch.testing.assert_close(f, r, rtol=0, atol=1e-12 if r.dtype == torch.float64 else 2e-6)


def test_ab_step_script_runs() -> None:
    """benchmarks/ab_step.py (the two-candidate A/B the docs quote) still runs."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "ab_step.py"
    done = subprocess.run([sys.executable, str(script), "--set", "many-small", "--optimizer", "sgd", "--flat",
                           "--rounds", "4", "--threads", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "sgd flat=True, 4 rounds" in done.stdout and "speed-up of descend (paired median)" in done.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_counts_advance_by_exactly_one_in_their_own_dtype(dtype: torch.dtype) -> None:
    """count_step_ adds a CPU tensor 1 (not a Python 1 wrapped per tensor): the counts must
    still be t + 1 exactly, keep their dtype, and work off the CPU (meta) and up to 2**24."""
    from descend.tensors import count_step_

    steps = [torch.tensor(v, dtype=dtype) for v in (0.0, 41.0, 2.0**24 - 1)]
    count_step_(steps)
    assert [s.item() for s in steps] == [1.0, 42.0, 2.0**24]
    assert {s.dtype for s in steps} == {dtype}
    meta = [torch.zeros((), dtype=dtype, device="meta") for _ in range(3)]
    count_step_(meta)  # the Python 1: no CPU tensor enters a meta-device list
    assert all(s.device.type == "meta" for s in meta)
    params = make_params(torch.float64, seed=3)
    opt = descend.AdamW(params, lr=0.01)
    for _ in range(3):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    assert {float(opt.state[p]["step"]) for p in params} == {3.0}
