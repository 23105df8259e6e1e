"""Reads of device values per AdamW step, path by path.

Parameters on the meta device have no data: every read of a value from them (``.item()``,
``bool()``, a copy to the host) is intercepted here, counted and answered with a dummy, so a
step that reads goes on and is counted. Host scalars read (Adam's step counts, kept on the
host as torch keeps them) are counted apart: they cost no sync. Steps 2–4, 20 parameters.

    .venv/bin/python benchmarks/host_reads.py
    PYTHONPATH=<an older checkout>/src .venv/bin/python benchmarks/host_reads.py   # before/after

tests/test_host_syncs.py asserts the zero-read paths and the once-per-step tensor lr.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import descend

aten = torch.ops.aten


class CountReads(TorchDispatchMode):
    """Counts reads of meta tensors' values (``device``, answered with a dummy) and of host
    tensors' values (``host``)."""

    def __init__(self) -> None:
        super().__init__()
        self.device = 0
        self.host = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if func is aten._local_scalar_dense.default and first is not None:
            if not first.is_meta:
                self.host += 1
            else:
                self.device += 1
                return True if first.dtype == torch.bool else (1.0 if first.dtype.is_floating_point else 1)
        if first is not None and first.is_meta:
            to_host = (func is aten._to_copy.default and kwargs.get("device") is not None
                       and torch.device(kwargs["device"]).type == "cpu")
            if to_host:
                self.device += 1
                return torch.zeros(first.shape, dtype=kwargs.get("dtype") or first.dtype)
        if func is aten.copy_.default and args[0].device.type == "cpu" and args[1].is_meta:
            self.device += 1
            return args[0]
        return func(*args, **kwargs)


def meta_params(n: int = 20) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.empty(8, 8, device="meta")) for _ in range(n)]
    for p in params:
        p.grad = torch.empty_like(p)
    return params


PATHS: dict[str, dict[str, Any]] = {
    "default": {}, "foreach=True": dict(foreach=True), "foreach=False": dict(foreach=False),
    "flat=True": dict(flat=True), "tensor lr (on the device)": dict(lr=torch.tensor(1e-3, device="meta")),
    "l1=1e-4": dict(l1=1e-4), "l1=1e-4, foreach": dict(l1=1e-4, foreach=True),
    "decay=independent": dict(decay="independent"),
    "nonfinite=skip": dict(nonfinite="skip"), "nonfinite=skip, foreach": dict(nonfinite="skip", foreach=True),
}


def main() -> None:
    print("| AdamW path | device reads per step | host scalars read per step (no sync) |")
    print("|---|--:|--:|")
    warnings.simplefilter("ignore")  # (implausible-decay warnings of these settings)
    for name, kw in PATHS.items():
        try:
            with CountReads():  # (construction and the first step may read: not counted)
                opt = descend.AdamW(meta_params(), **kw)
                opt.step()
            with CountReads() as mode:
                for _ in range(3):
                    opt.step()
            row = f"{mode.device / 3:g} | {mode.host / 3:g}"
        except Exception as e:  # an older checkout's path that cannot step here
            row = f"error: {type(e).__name__}: {str(e).splitlines()[0][:70]} |"
        print(f"| {name} | {row} |")


if __name__ == "__main__":
    main()
