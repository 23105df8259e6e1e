"""DTensor (FSDP2) parameters on torch's fused kernels, and the non-finite guard's collectives.

One process, a one-rank gloo group and a one-device mesh: DTensor's dispatch (sharding rules,
redistribution, collectives) runs as it does on many ranks; tests/test_distributed.py runs two.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist

import descend

tensor_api = pytest.importorskip("torch.distributed.tensor", reason="DTensor is torch.distributed.tensor (torch >= 2.4)")


@pytest.fixture(scope="module")
def mesh() -> Iterator[Any]:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def run(mesh: Any, cls: type, steps: int | list[int] = 4, nan_at: int | None = None,
        **kw: Any) -> tuple[list[torch.Tensor], Any]:
    torch.manual_seed(0)
    shard = [tensor_api.Shard(0)]
    params = [torch.nn.Parameter(tensor_api.distribute_tensor(torch.randn(8, 4, dtype=torch.float64), mesh, shard))
              for _ in range(3)]
    opt = cls(params, lr=1e-2, **kw)
    for step in (range(steps) if isinstance(steps, int) else steps):
        for i, p in enumerate(params):
            g = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(10 * step + i))
            if step == nan_at and i == 1:
                g[2, 2] = float("nan")
            p.grad = tensor_api.distribute_tensor(g, mesh, shard)
        opt.step()
    return [p.full_tensor() for p in params], opt


@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_dtensor_parameters_take_the_fused_kernel_as_torch_does(mesh: Any, cls: str) -> None:
    theirs, _ = run(mesh, getattr(torch.optim, cls), fused=True, weight_decay=0.1)
    ours, _ = run(mesh, getattr(descend, cls), fused=True, weight_decay=0.1)
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours))


def test_dtensor_default_stays_torchs_foreach(mesh: Any) -> None:
    theirs, _ = run(mesh, torch.optim.AdamW, foreach=True)
    ours, _ = run(mesh, descend.AdamW)
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours))


def test_fused_sgd_on_dtensors_is_refused_with_the_reason(mesh: Any) -> None:
    with pytest.raises(RuntimeError, match="no DTensor"):
        run(mesh, descend.SGD, fused=True, momentum=0.9)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_nonfinite_over_dtensors_is_one_collective_per_step(mesh: Any, fused: bool,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    all_reduce = dist.all_reduce

    def counting(*args: Any, **kw: Any) -> Any:
        calls.append(1)
        return all_reduce(*args, **kw)
    monkeypatch.setattr(dist, "all_reduce", counting)
    flags = dict(fused=True) if fused else dict(foreach=True)
    skipped, opt = run(mesh, descend.AdamW, nonfinite="skip", nan_at=2, steps=4, **flags)
    assert opt.skipped_steps == 1
    assert len(calls) == 4  # one per step, for all three gradients (was one per gradient)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    without, _ = run(mesh, descend.AdamW, steps=[0, 1, 3], **flags)  # as if step 2 had never happened
    assert all(torch.equal(a, b) for a, b in zip(skipped, without))
