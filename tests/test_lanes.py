"""descend.lanes: the 16-bit pass's C++ loops run in 16-bit lanes where inductor alone would
pick float32 lanes (a float32 parameter's copy-back moves float32 only), and nothing changes
where inductor lacks the function the hint wraps."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

from descend import lanes, precision, precision_fused

pytest.importorskip("torch._inductor.codegen.cpp")
from torch._inductor import cpu_vec_isa  # noqa: E402
from torch._inductor.utils import run_and_get_code  # noqa: E402

N = 1 << 16


def _step_of_loops(hint: torch.dtype | None) -> set[int]:
    """The strides of the vectorized loops inductor writes for the one-pass AdamW step on a
    float32 parameter with bfloat16 moments, compiled afresh (no cache) with or without the hint."""
    options: dict[str, Any] = {"emulate_precision_casts": False, "fx_graph_cache": False,
                               "post_grad_custom_post_pass": lanes.cache_key()}
    compiled = torch.compile(precision_fused._adam_pass, dynamic=True, options=options)
    fn = lanes.hinted(compiled, hint) if hint is not None else compiled
    gen = torch.Generator().manual_seed(0)
    p, g = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    m, v = torch.randn(N, generator=gen).bfloat16(), torch.rand(N, generator=gen).bfloat16()
    scalars = precision_fused._scalars(1e-3, 0.9, 0.999, 1e-8, 0.1, 0.1, 0.03, device=torch.device("cpu"))
    torch._dynamo.reset()
    _, sources = run_and_get_code(fn, p, g, m, v, None, scalars, True)
    return {int(s) for code in sources for s in re.findall(r"x0\+=static_cast<int64_t>\((\d+)L\)", code)}


@pytest.mark.skipif(not precision.COMPILE_NUMEL, reason="DESCEND_COMPILE=0: no compiled kernels")
def test_the_hint_turns_float32_lanes_into_16_bit_lanes() -> None:
    isa = cpu_vec_isa.pick_vec_isa()
    if not isa:
        pytest.skip("inductor has no vector instruction set on this CPU")
    assert lanes.installed()
    # inductor alone: float32 lanes, the bfloat16 moments stored by half-register masked stores
    assert _step_of_loops(None) == {isa.nelements(torch.float)}
    # with the hint: bfloat16 lanes, float32 values in pairs of registers
    assert _step_of_loops(torch.bfloat16) == {isa.nelements(torch.bfloat16)}
    # and the hint ends with the call
    assert getattr(lanes._HINT, "dtype", None) is None


def test_where_inductor_lacks_the_function_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._inductor.codegen import cpp

    monkeypatch.setattr(lanes, "_INSTALLED", None)
    monkeypatch.delattr(cpp, "get_loop_body_lowp_fp")
    assert not lanes.installed()

    def fn(x: torch.Tensor) -> torch.Tensor:
        return x + 1

    assert lanes.hinted(fn, torch.bfloat16) is fn
    assert lanes.cache_key().uuid() == ("descend.lanes", 1, False)


def test_only_bodies_that_move_data_count_as_moving() -> None:
    class Node:
        def __init__(self, op: str, target: str) -> None:
            self.op, self.target = op, target

    class Block:
        def __init__(self, *targets: str) -> None:
            nodes = [Node("placeholder", "ops")] + [Node("call_method", t) for t in targets] + [Node("output", "output")]
            self.graph = type("Graph", (), {"nodes": nodes})()

    class Body:
        def __init__(self, *targets: str, sub: tuple[str, ...] = ()) -> None:
            self.root_block = Block(*targets)
            self.subblocks = {"s": Block(*sub)} if sub else {}

    assert lanes._moves_only(Body("get_index", "load", "get_index", "store"))
    assert not lanes._moves_only(Body("get_index", "load", "to_dtype", "store"))
    assert not lanes._moves_only(Body("load", "store", sub=("load", "mul")))
    assert not lanes._moves_only(object())  # (a loop body of another shape: no hint)
