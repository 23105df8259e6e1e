"""One rank of the distributed tests: run by tests/test_distributed.py, one process per rank.

    python tests/_distributed_worker.py JOB --rank R --world W --port P --out DIR [--shared DIR]

joins a gloo process group whose TCPStore the launcher holds on 127.0.0.1:P, runs the
checks of JOB and writes ``DIR/JOB-rank{R}.json``: one record per check (rewritten after each
check, so a hang loses nothing already measured). A record holds the measured numbers with
their tolerances, ``ok``, and the traceback of a check that raised.

Every check trains a tiny float64 model (4 → 8 → LayerNorm → 1) for a few steps on a global
batch of 8 that the ranks split, and compares with the oracle: the same descend optimizer in
one process on the whole batch (and torch.optim where it is the same algorithm). The last
layer, Linear(8, 1), leaves rank 1 with empty shards under FSDP2 on purpose.

Jobs:
    train   (2 ranks): DDP, ZeroRedundancyOptimizer, FSDP2, names and explain on a sharded
            model, saving a distributed checkpoint; the closure solvers (L-BFGS, CG) under
            FSDP2 and under DDP with process_group, torch's L-BFGS drifting, ZeRO refused.
    resume  (2 ranks, fresh processes): load those checkpoints (an L-BFGS one too),
            continue, compare; then a non-finite gradient in one rank's shard under FSDP2.
    resume1 (1 rank): load it into one process (world size 2 → 1), plain and FSDP2 models.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import astuple
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import descend

F64 = torch.float64
GLOBAL_BATCH = 8
N_STEPS = 4  # steps before a checkpoint / consolidation
M_STEPS = 3  # steps after it
TOL64 = 1e-10  # float64, absolute, against the single-process run
REL32 = 1e-5  # float32, relative, against the single-process run
PG_TIMEOUT = datetime.timedelta(seconds=60)

JOB = ""
RANK = 0
WORLD = 1


# --- the model, the data and the reference run ---------------------------------------


def make_model(dtype: torch.dtype = F64, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 1)).to(dtype)


def make_batches(steps: int, dtype: torch.dtype = F64, seed: int = 1234) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(GLOBAL_BATCH, 4, generator=g).to(dtype), torch.randn(GLOBAL_BATCH, 1, generator=g).to(dtype))
            for _ in range(steps)]


def local(batch: tuple[Tensor, Tensor], rank: int, world: int) -> tuple[Tensor, Tensor]:
    """This rank's equal share of a global batch (the mean of the ranks' means is the global mean)."""
    n = GLOBAL_BATCH // world
    x, y = batch
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def schedule(step: int) -> float:
    return 0.5**step


def train(model: nn.Module, opt: torch.optim.Optimizer, batches: list[tuple[Tensor, Tensor]],
          sched: Any = None) -> list[float]:
    losses = []
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(float(loss.detach()))
    return losses


def param_dict(model: nn.Module) -> dict[str, Tensor]:
    """Full (unsharded) parameters by name; a collective for DTensor parameters."""
    out = {}
    for name, p in descend.groups.unwrap(model).named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[descend.groups.canonical_name(name)] = full.detach().clone()
    return out


def max_abs_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def max_rel_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """max over tensors of ‖a − b‖∞ / ‖b‖∞."""
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max().clamp_min(1e-30))
               for k in a)


def ranks_differ_by(model: nn.Module) -> float:
    """max |θ_rank − θ_rank0| over every parameter entry (0 when all ranks hold the same bits)."""
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    return max(float((g - gathered[0]).abs().max()) for g in gathered)


def zeros(model: nn.Module) -> int:
    return sum(int((p.full_tensor() if hasattr(p, "full_tensor") else p).eq(0).sum()) for p in model.parameters())


# --- optimizer specs: every decay mode and L1 appear ---------------------------------


SPECS: dict[str, dict[str, Any]] = {
    # coupled (L2) decay through Nesterov momentum; groups and names from descend.param_groups
    "SGD-nesterov-coupled": dict(cls=descend.SGD, named=True, wd=1e-2,
                                 kw=dict(lr=0.05, momentum=0.9, nesterov=True)),
    # coupled decay and coupled L1 divided by Adam's √v
    "Adam-coupled-L1": dict(cls=descend.Adam, kw=dict(lr=1e-2, weight_decay=1e-2, l1=1e-3)),
    # torch's AdamW rule with AMSGrad
    "AdamW-decoupled-amsgrad": dict(cls=descend.AdamW, kw=dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    # the AdamW paper's decay (lr/lr₀)·λ and an L1 prox under a schedule; lr₀ must survive
    "AdamW-independent-L1-schedule": dict(cls=descend.AdamW, named=True, wd=0.1, schedule=True,
                                          kw=dict(lr=2e-2, l1=2e-2, decay="independent")),
    # decoupled decay with momentum and dampening, decoupled L1 prox
    "SGD-decoupled-L1": dict(cls=descend.SGD, kw=dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2,
                                                      l1=2e-2, decay="decoupled")),
    # the tutorials' θ·(1 − λ) and a fixed L1 threshold
    "SGD-fixed-L1": dict(cls=descend.SGD, kw=dict(lr=0.05, momentum=0.5, weight_decay=1e-3, l1=1e-3,
                                                  decay="fixed")),
}


def build(spec: dict[str, Any], model: nn.Module, **extra: Any) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer of a spec over ``model`` (its LR scheduler too, or None)."""
    kw = {**spec["kw"], **extra}
    if spec.get("named"):
        params: Any = descend.param_groups(model, spec["wd"], l1=kw.pop("l1", 0.0))
    else:
        params = model.parameters()
    opt = spec["cls"](params, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule) if spec.get("schedule") else None
    return opt, sched


def reference(spec: dict[str, Any], batches: list[tuple[Tensor, Tensor]], dtype: torch.dtype = F64,
              **extra: Any) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """The oracle: the same optimizer in one process on the whole batch."""
    model = make_model(dtype)
    opt, sched = build(spec, model, **extra)
    train(model, opt, batches, sched)
    return model, opt, sched


# --- recording ------------------------------------------------------------------------


class Check:
    """Measured numbers of one check, each with its tolerance, and plain conditions."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, Any]] = []
        self.info: dict[str, Any] = {}

    def within(self, what: str, value: float, tol: float) -> None:
        self.metrics.append({"what": what, "value": value, "tol": tol, "ok": bool(value <= tol)})

    def expect(self, what: str, condition: bool, detail: Any = None) -> None:
        self.metrics.append({"what": what, "ok": bool(condition), "detail": None if condition else repr(detail)})


class Recorder:
    def __init__(self, out: Path) -> None:
        self.path = out / f"{JOB}-rank{RANK}.json"
        self.records: dict[str, Any] = {}

    def run(self, name: str, fn: Callable[[Check], None]) -> None:
        check = Check()
        start = time.perf_counter()
        try:
            fn(check)
            error = None
        except Exception:
            error = traceback.format_exc()
        self.records[name] = {
            "ok": error is None and bool(check.metrics) and all(m["ok"] for m in check.metrics),
            "metrics": check.metrics, "info": check.info, "error": error,
            "seconds": round(time.perf_counter() - start, 3),
        }
        print(f"[{JOB} rank {RANK}] {name}: {json.dumps(self.records[name])}", flush=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.records, indent=1))
        tmp.replace(self.path)


# --- DDP --------------------------------------------------------------------------------


def check_ddp(spec: dict[str, Any], dtype: torch.dtype = F64) -> Callable[[Check], None]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    def run(c: Check) -> None:
        batches = make_batches(N_STEPS, dtype)
        ddp = DDP(make_model(dtype))
        opt, sched = build(spec, ddp)
        losses = train(ddp, opt, [local(b, RANK, WORLD) for b in batches], sched)
        ref_model, ref_opt, _ = reference(spec, batches, dtype)
        if dtype == F64:
            c.within("max |θ_ddp − θ_single|", max_abs_diff(param_dict(ddp), param_dict(ref_model)), TOL64)
        else:
            c.within("max ‖θ_ddp − θ_single‖∞/‖θ_single‖∞", max_rel_diff(param_dict(ddp), param_dict(ref_model)),
                     REL32)
        c.within("max |θ_rank − θ_rank0|", ranks_differ_by(ddp), 0.0)
        if spec.get("named"):  # names without DDP's "module."
            names = [g["param_names"] for g in opt.param_groups]
            c.expect("param names as in the plain model", names == [g["param_names"] for g in ref_opt.param_groups],
                     names)
        c.info.update(local_losses=losses, zeros=zeros(ddp))

    return run


def check_ddp_torch_oracle(c: Check) -> None:
    """descend.AdamW under DDP equals torch.optim.AdamW in one process (an oracle nobody here wrote)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    batches = make_batches(N_STEPS)
    ddp = DDP(make_model())
    train(ddp, descend.AdamW(ddp.parameters(), lr=1e-2, weight_decay=0.1), [local(b, RANK, WORLD) for b in batches])
    ref = make_model()
    train(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1), batches)
    c.within("max |θ_ddp(descend) − θ_single(torch.optim)|", max_abs_diff(param_dict(ddp), param_dict(ref)), TOL64)


# --- ZeroRedundancyOptimizer -------------------------------------------------------------


def compare_state_dicts(c: Check, got: dict[str, Any], want: dict[str, Any], what: str) -> None:
    """Same per-parameter state (tensors to TOL64) and the same group options."""
    c.expect(f"{what}: same parameter indices", sorted(got["state"]) == sorted(want["state"]),
             (sorted(got["state"]), sorted(want["state"])))
    worst = 0.0
    for index, state in want["state"].items():
        other = got["state"].get(index, {})
        c.expect(f"{what}: state keys of parameter {index}", sorted(other) == sorted(state), (sorted(other), sorted(state)))
        for key, value in state.items():
            if isinstance(value, Tensor) and key in other:
                worst = max(worst, float((other[key].double() - value.double()).abs().max()) if value.numel() else 0.0)
    c.within(f"{what}: max |state − state_single|", worst, TOL64)
    options = [{k: v for k, v in g.items() if k not in ("params", "param_names", "initial_lr")} for g in want["param_groups"]]
    got_options = [{k: g.get(k) for k in o} for g, o in zip(got["param_groups"], options)]
    c.expect(f"{what}: group options", got_options == options, (got_options, options))


def check_zero(name: str, spec: dict[str, Any], scratch: Path) -> Callable[[Check], None]:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    def make(model: nn.Module) -> tuple[Any, Any]:
        kw = dict(spec["kw"])
        params: Any = model.parameters()
        if spec.get("named"):
            # torch's ZeRO takes tensors only, not the (name, tensor) pairs of param_groups
            groups = descend.param_groups(model, spec["wd"], l1=kw.pop("l1", 0.0))
            params = [{**g, "params": [p for _, p in g["params"]]} for g in groups]
        zero = ZeroRedundancyOptimizer(params, optimizer_class=spec["cls"], **kw)
        sched = torch.optim.lr_scheduler.LambdaLR(zero, schedule) if spec.get("schedule") else None
        return zero, sched

    def run(c: Check) -> None:
        batches = make_batches(N_STEPS + M_STEPS)
        first, rest = batches[:N_STEPS], batches[N_STEPS:]
        ddp = DDP(make_model())
        zero, sched = make(ddp)
        c.info["local_optimizer"] = type(zero.optim).__name__
        if spec.get("named"):
            try:
                ZeroRedundancyOptimizer(descend.param_groups(ddp, 0.1), optimizer_class=spec["cls"])
                c.info["ZeRO with (name, tensor) pairs"] = "accepted"
            except Exception as e:  # a torch limitation, said in docs/distributed.md
                c.info["ZeRO with (name, tensor) pairs"] = f"{type(e).__name__}: {e}"
        train(ddp, zero, [local(b, RANK, WORLD) for b in first], sched)
        ref_model, ref_opt, ref_sched = reference(spec, first)
        c.within(f"after {N_STEPS} steps: max |θ_zero − θ_single|", max_abs_diff(param_dict(ddp), param_dict(ref_model)),
                 TOL64)
        c.within("max |θ_rank − θ_rank0|", ranks_differ_by(ddp), 0.0)

        zero.consolidate_state_dict(to=0)
        path = scratch / f"zero-{name}.pt"
        if RANK == 0:
            torch.save(zero.state_dict(), path)
        dist.barrier()
        consolidated = torch.load(path, weights_only=False)
        compare_state_dicts(c, consolidated, ref_opt.state_dict(), "consolidated")

        # uninterrupted single-process run
        train(ref_model, ref_opt, rest, ref_sched)
        want = param_dict(ref_model)
        sched_state = sched.state_dict() if sched is not None else None

        # resume a fresh ZeRO optimizer (and model) from the consolidated state dict
        model2 = make_model()
        model2.load_state_dict(descend.groups.unwrap(ddp).state_dict())
        ddp2 = DDP(model2)
        zero2, sched2 = make(ddp2)
        zero2.load_state_dict(copy.deepcopy(consolidated))
        if sched2 is not None:
            sched2.load_state_dict(sched_state)
        train(ddp2, zero2, [local(b, RANK, WORLD) for b in rest], sched2)
        c.within(f"resumed ZeRO, after {N_STEPS}+{M_STEPS} steps: max |θ − θ_uninterrupted|",
                 max_abs_diff(param_dict(ddp2), want), TOL64)

        # and an unsharded descend optimizer in one process from the same state dict
        model3 = make_model()
        model3.load_state_dict(descend.groups.unwrap(ddp).state_dict())
        opt3, sched3 = build(spec, model3)
        opt3.load_state_dict(copy.deepcopy(consolidated))
        if sched3 is not None:
            sched3.load_state_dict(sched_state)
        train(model3, opt3, rest, sched3)
        c.within(f"consolidated → unsharded optimizer, after {N_STEPS}+{M_STEPS} steps: max |θ − θ_uninterrupted|",
                 max_abs_diff(param_dict(model3), want), TOL64)

    return run


def check_zero_nonfinite(c: Check) -> None:
    """A limitation of ZeRO, said in docs/distributed.md: each rank's optimizer sees only the
    gradients of its own partition, so ``nonfinite="skip"`` skips only the partition that holds
    the NaN, where one process would skip the whole step."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(make_model())
    zero = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=descend.AdamW, lr=1e-2, nonfinite="skip")
    x, y = local(make_batches(1)[0], RANK, WORLD)
    F.mse_loss(ddp(x), y).backward()
    params = list(ddp.parameters())
    owners = [zero._param_to_rank[p] for p in params]
    c.expect("both ranks own parameters", sorted(set(owners)) == list(range(WORLD)), owners)
    nan_param = owners.index(0)
    params[nan_param].grad.view(-1)[0] = float("nan")  # as after an all-reduce: on every rank
    before = [p.detach().clone() for p in params]
    zero.step()
    moved = [bool((p != b).any()) for p, b in zip(params, before)]
    c.info.update(owners=owners, moved=moved, skipped_steps=zero.optim.skipped_steps)
    c.expect("rank 0 skipped its partition", moved == [o != 0 for o in owners], moved)
    c.expect("skipped_steps counts per rank", zero.optim.skipped_steps == (1 if RANK == 0 else 0),
             zero.optim.skipped_steps)


# --- FSDP2 ---------------------------------------------------------------------------------


def shard(model: nn.Module, mesh: Any = None) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def check_fsdp(spec: dict[str, Any], **extra: Any) -> Callable[[Check], None]:
    def run(c: Check) -> None:
        from torch.distributed.tensor import DTensor

        batches = make_batches(N_STEPS)
        model = shard(make_model())
        c.expect("parameters are DTensors", all(isinstance(p, DTensor) for p in model.parameters()))
        c.info["local shapes"] = [tuple(p.to_local().shape) for p in model.parameters()]
        opt, sched = build(spec, model, **extra)
        losses = train(model, opt, [local(b, RANK, WORLD) for b in batches], sched)
        c.info["implementation"] = [b.implementation for b in opt._prepare()]  # DTensors: never fused
        ref_model, ref_opt, _ = reference(spec, batches, **extra)
        c.within("max |θ_fsdp2 − θ_single|", max_abs_diff(param_dict(model), param_dict(ref_model)), TOL64)
        c.info.update(local_losses=losses, zeros=zeros(model), zeros_single=zeros(ref_model))
        if spec.get("named"):
            names = [g["param_names"] for g in opt.param_groups]
            c.expect("param names as in the plain model", names == [g["param_names"] for g in ref_opt.param_groups],
                     names)

    return run


def check_fsdp_names(c: Check) -> None:
    """param_groups and explain on a sharded model: the plain model's names, groups and global shapes."""
    plain = make_model()
    sharded = shard(make_model())
    got = descend.param_groups(sharded, 0.05, decay="independent", lr=1e-3)
    want = descend.param_groups(plain, 0.05, decay="independent", lr=1e-3)
    names = [[n for n, _ in g["params"]] for g in got]
    c.expect("param_groups names and split", names == [[n for n, _ in g["params"]] for g in want], names)
    c.expect("param_groups options", [{k: v for k, v in g.items() if k != "params"} for g in got]
             == [{k: v for k, v in g.items() if k != "params"} for g in want])
    rows = [astuple(r) for r in descend.explain(descend.AdamW(got))]
    c.expect("explain rows (names, global shapes, factors)",
             rows == [astuple(r) for r in descend.explain(descend.AdamW(want))], rows)
    text = str(descend.explain(descend.AdamW(got)))
    c.expect("explain text names 1 regularized weight of shape 1×8", "3.weight  1×8" in text, text)
    # activation checkpointing inside FSDP2 adds "_checkpoint_wrapped_module." to names
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    wrapped = make_model()
    wrapped[0] = checkpoint_wrapper(wrapped[0])
    wrapped = shard(nn.Sequential(*wrapped))
    raw = [n for n, _ in wrapped.named_parameters()]
    names = [[n for n, _ in g["params"]] for g in descend.param_groups(wrapped, 0.05)]
    c.expect("names without _checkpoint_wrapped_module.",
             names == [[n for n, _ in g["params"]] for g in descend.param_groups(plain, 0.05)], (raw, names))


def check_fsdp_nonfinite(mode: str, group: Any) -> Callable[[Check], None]:
    """A NaN in rank 0's shard only: every rank must skip (or raise) alike, as one process would."""

    def run(c: Check) -> None:
        from torch.distributed.device_mesh import DeviceMesh

        # named: an unnamed mesh over the same ranks is taken for the default one, and its
        # collectives then run on the default group (with the default group's timeout)
        mesh = DeviceMesh.from_group(group, "cpu", mesh_dim_names=(f"nonfinite-{mode}",))
        model = shard(make_model(), mesh=mesh)
        before = param_dict(model)
        opt = descend.AdamW(model.parameters(), lr=1e-2, nonfinite=mode)
        x, y = local(make_batches(1)[0], RANK, WORLD)
        F.mse_loss(model(x), y).backward()
        first = next(iter(model.parameters()))
        if RANK == 0:
            first.grad.to_local().view(-1)[0] = float("nan")
        c.info["local grad shapes"] = [tuple(p.grad.to_local().shape) for p in model.parameters()]
        outcome = "stepped"
        try:
            opt.step()
            if opt.skipped_steps:
                outcome = "skipped"
        except FloatingPointError as e:
            outcome = "raised FloatingPointError"
            c.expect("the error names the parameter", "parameter 0 of group 0" in str(e), str(e))
        except Exception as e:
            outcome = f"raised {type(e).__name__}: {str(e)[:300]}"
        c.info["outcome"] = outcome
        expected = "skipped" if mode == "skip" else "raised FloatingPointError"
        c.expect(f"outcome on rank {RANK}", outcome == expected, outcome)
        if outcome == expected:
            c.within("parameters changed by", max_abs_diff(param_dict(model), before), 0.0)
            c.expect("no optimizer state", len(opt.state) == 0, len(opt.state))

    return run



# --- closure solvers (L-BFGS, conjugate gradient) -------------------------------------------


#: (class, options): a strong Wolfe line search, so the loss values decide the step lengths
CLOSURE_SOLVERS: dict[str, tuple[Any, dict[str, Any]]] = {
    "LBFGS": (descend.LBFGS, dict(lr=1, max_iter=6, history_size=4, line_search_fn="strong_wolfe",
                                  weight_decay=1e-3)),
    "CG": (descend.ConjugateGradient, dict(max_iter=6, weight_decay=1e-3)),
}
CLOSURE_STEPS = 3


def train_closure(model: nn.Module, opt: torch.optim.Optimizer, batches: list[tuple[Tensor, Tensor]]) -> list[float]:
    """``step(closure)`` per batch; the closure is single-process code on this rank's batch."""
    losses = []
    for x, y in batches:
        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            return loss

        losses.append(float(opt.step(closure).detach()))
    return losses


def closure_reference(name: str, batches: list[tuple[Tensor, Tensor]]) -> nn.Module:
    cls, kw = CLOSURE_SOLVERS[name]
    model = make_model()
    train_closure(model, cls(model.parameters(), **kw), batches)
    return model


def check_closure_fsdp(name: str) -> Callable[[Check], None]:
    """L-BFGS / CG on a fully_shard-ed model: the loss is averaged over the mesh, the dot
    products are DTensor reductions, so every rank takes the single process's decisions."""

    def run(c: Check) -> None:
        cls, kw = CLOSURE_SOLVERS[name]
        batches = make_batches(CLOSURE_STEPS)
        model = shard(make_model())
        opt = cls(model.parameters(), **kw)
        losses = train_closure(model, opt, [local(b, RANK, WORLD) for b in batches])
        ref = closure_reference(name, batches)
        c.within("max |θ_fsdp2 − θ_single|", max_abs_diff(param_dict(model), param_dict(ref)), TOL64)
        c.info.update(local_losses=losses, last_stop=opt.last_stop)

    return run


def check_closure_ddp(name: str) -> Callable[[Check], None]:
    """Under DDP with process_group=True: ranks stay identical and equal the single process."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    def run(c: Check) -> None:
        cls, kw = CLOSURE_SOLVERS[name]
        batches = make_batches(CLOSURE_STEPS)
        ddp = DDP(make_model())
        opt = cls(ddp.parameters(), process_group=True, **kw)
        losses = train_closure(ddp, opt, [local(b, RANK, WORLD) for b in batches])
        ref = closure_reference(name, batches)
        c.within("max |θ_ddp − θ_single|", max_abs_diff(param_dict(ddp), param_dict(ref)), TOL64)
        c.within("max |θ_rank − θ_rank0|", ranks_differ_by(ddp), 0.0)
        c.info.update(local_losses=losses)

    return run


def check_torch_lbfgs_ddp_drifts(c: Check) -> None:
    """Why process_group exists: torch's L-BFGS under DDP gets the averaged gradient but each
    rank's own loss, so its line searches decide differently and the ranks drift apart. (Under
    real DDP the ranks then also run different numbers of backward passes, and DDP's all-reduce
    hangs; here the closure computes the global-batch gradient itself, as DDP would give it,
    so that the ranks can drift without a collective.)"""
    batches = make_batches(CLOSURE_STEPS)
    model = make_model()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=6, history_size=4, line_search_fn="strong_wolfe")
    for batch in batches:
        x, y = local(batch, RANK, WORLD)

        def closure(batch: tuple[Tensor, Tensor] = batch, x: Tensor = x, y: Tensor = y) -> Tensor:
            opt.zero_grad()
            F.mse_loss(model(batch[0]), batch[1]).backward()  # DDP's averaged gradient
            with torch.no_grad():
                return F.mse_loss(model(x), y)  # this rank's own loss

        opt.step(closure)
    drift = ranks_differ_by(model)
    c.info["evaluations"] = opt.state[next(iter(model.parameters()))]["func_evals"]
    c.info["max |θ_rank − θ_rank0| (torch.optim.LBFGS)"] = drift
    c.expect("torch.optim.LBFGS ranks differ", drift > 1e-6, drift)


def check_closure_zero(c: Check) -> None:
    """ZeroRedundancyOptimizer partitions the parameters: each rank would run its own L-BFGS on
    its partition (another algorithm), so the closure solvers refuse to be its local optimizer."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(make_model())
    for name, (cls, kw) in CLOSURE_SOLVERS.items():
        try:
            ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=cls, **kw)
            outcome = "accepted"
        except TypeError as e:
            outcome = f"TypeError: {e}"
        c.info[name] = outcome
        c.expect(f"{name} under ZeRO: a clear TypeError", outcome.startswith("TypeError") and
                 "ZeroRedundancyOptimizer" in outcome, outcome)


def check_closure_dtensor_placements(c: Check) -> None:
    """DTensor parameters made by hand: one sharded, one replicated, weight decay on one group,
    a loss that is itself a DTensor (already global: averaging it must change nothing); L-BFGS
    and CG to convergence equal the same run on plain tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 3, generator=g, dtype=F64)
    b = torch.randn(4, generator=g, dtype=F64)
    for name, cls, kw in [("LBFGS", descend.LBFGS, dict(line_search_fn="strong_wolfe")),
                          ("CG", descend.ConjugateGradient, {})]:
        out = []
        for distributed in (False, True):
            w, v, ta, tb = torch.zeros(8, 3, dtype=F64), torch.zeros(4, dtype=F64), a, b
            if distributed:
                w, ta = distribute_tensor(w, mesh, [Shard(0)]), distribute_tensor(a, mesh, [Shard(0)])
                v, tb = distribute_tensor(v, mesh, [Replicate()]), distribute_tensor(b, mesh, [Replicate()])
            w, v = nn.Parameter(w), nn.Parameter(v)
            opt = cls([{"params": [w], "weight_decay": 0.1}, {"params": [v]}], max_iter=40, max_eval=200, **kw)

            def closure(w: Tensor = w, v: Tensor = v, ta: Tensor = ta, tb: Tensor = tb, opt: Any = opt) -> Tensor:
                opt.zero_grad()
                loss = ((w - ta) ** 4).sum() + ((v - tb) ** 2).sum()
                loss.backward()
                return loss

            opt.step(closure)
            out.append({n: (t.full_tensor() if distributed else t).detach() for n, t in (("w", w), ("v", v))})
        c.within(f"{name}: max |θ_dtensor − θ_plain|", max_abs_diff(out[1], out[0]), TOL64)


# --- closure solvers: collectives per reduction (issue 14) ------------------------------------
# A block of its own: the counting mode and its check. Registered in job_train as
# "closure/collectives-{LBFGS,CG}".


def _collective_kind(func: Any) -> str | None:
    """"all_reduce", "all_gather", or another collective's name, for a c10d or c10d functional op."""
    namespace, name = func.namespace, func.__name__.split(".")[0].lstrip("_").replace("allreduce", "all_reduce")
    if namespace not in ("c10d", "_c10d_functional", "c10d_functional", "_dtensor"):
        return None
    name = name.replace("allgather", "all_gather").rstrip("_")
    if name.startswith("all_reduce"):
        return "all_reduce"
    if name.startswith("all_gather"):
        return "all_gather"
    other = ("reduce_scatter", "broadcast", "all_to_all", "reduce", "gather", "scatter", "send", "recv")
    return next((kind for kind in other if name.startswith(kind)), None)  # not waits, barriers, wrappers


class CollectiveCounter:
    """Counts the collectives dispatched while it is on (c10d ops, and the functional ones
    DTensor uses), per kind, except while ``paused`` (the closure's own forward and backward)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                kind = _collective_kind(func)
                if kind is not None and not counter.paused:
                    counter.counts[kind] = counter.counts.get(kind, 0) + 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.counts: dict[str, int] = {}
        self.paused = False


#: the reductions of descend.solvers.closure: each must cost exactly one collective on DTensors
_REDUCTIONS = ("dot", "max_abs", "abs_sum")


def check_closure_collectives(name: str) -> Callable[[Check], None]:
    """L-BFGS / CG (2 iterations) on a fully_shard-ed model of 6 parameters: one collective per
    global reduction of the solver (each dot product, max-abs, abs-sum: one all-reduce over all
    parameters; each evaluation: one for the loss and the weight-decay penalty together), not
    one per parameter; and the same result as one process."""

    def run(c: Check) -> None:
        from descend.solvers import closure as vec

        cls, kw = CLOSURE_SOLVERS[name]
        kw = {**kw, "max_iter": 2, "max_eval": 10}
        batch = make_batches(1)[0]
        x, y = local(batch, RANK, WORLD)
        model = shard(make_model())
        opt = cls(model.parameters(), **kw)
        counter = CollectiveCounter()
        calls = dict.fromkeys(_REDUCTIONS, 0)
        evaluations = 0

        def closure() -> Tensor:
            nonlocal evaluations
            evaluations += 1
            counter.paused = True  # FSDP2's own all-gathers and reduce-scatters are not the solver's
            try:
                opt.zero_grad()
                loss = F.mse_loss(model(x), y)
                loss.backward()
            finally:
                counter.paused = False
            return loss

        def counted(fn_name: str) -> Callable[..., Any]:
            fn = getattr(vec, fn_name)

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                calls[fn_name] += 1
                return fn(*args, **kwargs)

            return wrapper

        originals = {n: getattr(vec, n) for n in _REDUCTIONS}
        try:
            for n in _REDUCTIONS:
                setattr(vec, n, counted(n))
            with counter.mode:
                opt.step(closure)
        finally:
            for n, fn in originals.items():
                setattr(vec, n, fn)
        # per evaluation: the loss, and the weight-decay penalty of the (DTensor) parameters
        reductions = sum(calls.values()) + evaluations * (2 if kw.get("weight_decay") else 1)
        params = len(list(model.parameters()))
        c.info.update(collectives=counter.counts, reduction_calls=calls, evaluations=evaluations,
                      parameters=params, last_stop=opt.last_stop)
        total = sum(counter.counts.values())
        c.expect("one collective per reduction (dot, max-abs, abs-sum; loss, penalty)", total == reductions,
                 f"{counter.counts} for {calls} and {evaluations} evaluations")
        c.expect("all-gathers only for the loss (one per evaluation)",
                 counter.counts.get("all_gather", 0) <= evaluations, counter.counts)
        ref_model = make_model()
        ref_opt = cls(ref_model.parameters(), **kw)

        def ref_closure() -> Tensor:
            ref_opt.zero_grad()
            loss = F.mse_loss(ref_model(batch[0]), batch[1])
            loss.backward()
            return loss

        ref_opt.step(ref_closure)
        c.within("max |θ_fsdp2 − θ_single|", max_abs_diff(param_dict(model), param_dict(ref_model)), TOL64)

    return run


def check_closure_nonfinite_fsdp2(c: Check) -> None:
    """L-BFGS with nonfinite="skip" on a fully_shard-ed model, a NaN in rank 0's shard only:
    every rank skips (nothing changes), and the guard costs one collective for all the
    gradients. Its own process group (a rank that decided alone would block the other in a
    collective until that group's timeout)."""
    from torch.distributed.device_mesh import DeviceMesh

    group = dist.new_group(list(range(WORLD)), timeout=datetime.timedelta(seconds=10))
    mesh = DeviceMesh.from_group(group, "cpu", mesh_dim_names=("closure-nonfinite",))
    model = shard(make_model(), mesh=mesh)
    before = param_dict(model)
    cls, kw = CLOSURE_SOLVERS["LBFGS"]
    opt = cls(model.parameters(), nonfinite="skip", **kw)
    x, y = local(make_batches(1)[0], RANK, WORLD)
    first = next(iter(model.parameters()))
    counter = CollectiveCounter()

    def closure() -> Tensor:
        counter.paused = True
        try:
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            if RANK == 0:
                first.grad.to_local().view(-1)[0] = float("nan")
        finally:
            counter.paused = False
        return loss

    with counter.mode:
        opt.step(closure)
    c.info.update(collectives=counter.counts, last_stop=opt.last_stop)
    c.expect(f"rank {RANK} skipped", opt.last_stop == "skipped" and opt.skipped_steps == 1,
             (opt.last_stop, opt.skipped_steps))
    c.expect("the guard: one all-reduce for all gradients", counter.counts == {"all_reduce": 1}, counter.counts)
    c.within("parameters changed by", max_abs_diff(param_dict(model), before), 0.0)


# --- end of the block: closure solvers' collectives ---------------------------------------


# --- distributed checkpoints -------------------------------------------------------------


#: checkpointed specs: lr₀ and a schedule must survive (independent decay); and "fixed" decay,
#: which shrinks θ even at lr = 0, the lr of the step DCP takes to create a fresh optimizer's state
DCP_SPECS = ("AdamW-independent-L1-schedule", "SGD-fixed-L1")


def dcp_state(model: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    if sched is not None:
        state["scheduler"] = sched.state_dict()
    return state


def check_dcp_save(name: str, shared: Path) -> Callable[[Check], None]:
    spec = SPECS[name]

    def run(c: Check) -> None:
        import torch.distributed.checkpoint as dcp

        batches = make_batches(N_STEPS + M_STEPS)
        model = shard(make_model())
        opt, sched = build(spec, model)
        train(model, opt, [local(b, RANK, WORLD) for b in batches[:N_STEPS]], sched)
        state = dcp_state(model, opt, sched)
        dcp.save(state, checkpoint_id=str(shared / f"ckpt-{name}"))
        c.info["saved optimizer keys"] = sorted(state["optim"]["state"])
        c.info["saved group options"] = [{k: v for k, v in g.items() if k != "params"}
                                         for g in state["optim"]["param_groups"]]
        saved = {"lr": [g["lr"] for g in opt.param_groups], "base_lr": [g["base_lr"] for g in opt.param_groups],
                 "state": [sorted(opt.state[p]) for g in opt.param_groups for p in g["params"]]}
        # the uninterrupted run
        train(model, opt, [local(b, RANK, WORLD) for b in batches[N_STEPS:]], sched)
        final = param_dict(model)
        if RANK == 0:
            torch.save({"params": final, **saved}, shared / f"uninterrupted-{name}.pt")
        ref_model, _, _ = reference(spec, batches)
        c.within("uninterrupted FSDP2 run: max |θ − θ_single|", max_abs_diff(final, param_dict(ref_model)), TOL64)
        c.expect("checkpoint written", (shared / f"ckpt-{name}" / ".metadata").is_file())

    return run


def check_dcp_resume(name: str, shared: Path, sharded: bool) -> Callable[[Check], None]:
    """Fresh processes: build model and optimizer, load the checkpoint the DCP way, continue."""
    spec = SPECS[name]

    def run(c: Check) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        batches = make_batches(N_STEPS + M_STEPS)
        model = make_model(seed=99)  # other initial values: everything must come from the checkpoint
        if sharded:
            model = shard(model)
        opt, sched = build(spec, model)
        state = dcp_state(model, opt, sched)  # the template DCP loads into, resharded as needed
        dcp.load(state, checkpoint_id=str(shared / f"ckpt-{name}"))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        saved = torch.load(shared / f"uninterrupted-{name}.pt", weights_only=False)
        c.expect("lr restored", [g["lr"] for g in opt.param_groups] == saved["lr"],
                 [g["lr"] for g in opt.param_groups])
        c.expect("base_lr (lr₀ of independent decay) restored",
                 [g["base_lr"] for g in opt.param_groups] == saved["base_lr"], [g["base_lr"] for g in opt.param_groups])
        state_keys = [sorted(opt.state[p]) for g in opt.param_groups for p in g["params"]]
        c.expect("state keys restored", state_keys == saved["state"], state_keys)
        if "step" in saved["state"][0]:
            c.expect("Adam step restored", all(float(s["step"]) == N_STEPS for s in opt.state.values()),
                     [float(s["step"]) for s in opt.state.values()])
        if not sharded and spec["kw"].get("decay") == "fixed":
            # the caveat of docs/distributed.md: a state-dict template made for a fresh optimizer
            # after the weights are in place moves them (DCP's lr = 0 step still decays θ·(1 − λ))
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            other = make_model()
            other.load_state_dict(model.state_dict())
            get_optimizer_state_dict(other, build(spec, other)[0])
            c.info["fixed decay: template made after loading weights moves θ by"] = max_abs_diff(
                param_dict(other), param_dict(model))
        train(model, opt, [local(b, RANK, WORLD) for b in batches[N_STEPS:]], sched)
        got = param_dict(model)
        c.within(f"after {N_STEPS}+{M_STEPS} steps: max |θ_resumed − θ_uninterrupted (2-rank FSDP2)|",
                 max_abs_diff(got, saved["params"]), TOL64)
        ref_model, _, _ = reference(spec, batches)
        c.within(f"after {N_STEPS}+{M_STEPS} steps: max |θ_resumed − θ_single|",
                 max_abs_diff(got, param_dict(ref_model)), TOL64)

    return run


# --- distributed checkpoints of a closure solver -------------------------------------------


def check_closure_dcp_save(shared: Path) -> Callable[[Check], None]:
    """L-BFGS on FSDP2: DCP's get_optimizer_state_dict and save work (the history lists are
    flattened to keys ``state.<param>.old_dirs.<i>``); then the uninterrupted run."""

    def run(c: Check) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        cls, kw = CLOSURE_SOLVERS["LBFGS"]
        batches = make_batches(CLOSURE_STEPS + 1)
        model = shard(make_model())
        opt = cls(model.parameters(), **kw)
        train_closure(model, opt, [local(b, RANK, WORLD) for b in batches[:2]])
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=str(shared / "ckpt-closure-LBFGS"))
        train_closure(model, opt, [local(b, RANK, WORLD) for b in batches[2:]])
        final = param_dict(model)
        if RANK == 0:
            torch.save(final, shared / "uninterrupted-closure-LBFGS.pt")
        c.within("uninterrupted FSDP2 run: max |θ − θ_single|",
                 max_abs_diff(final, param_dict(closure_reference("LBFGS", batches))), TOL64)

    return run


def closure_state_template(model: nn.Module, path: str) -> dict[str, dict[str, Any]]:
    """The optimizer-state template DCP loads into, from the checkpoint's metadata: a closure
    solver's state cannot come from a fresh optimizer (below), and its history length is data."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    named = dict(model.named_parameters())
    state: dict[str, dict[str, Any]] = {}
    for key, meta in dcp.FileSystemReader(path).read_metadata().state_dict_metadata.items():
        if not key.startswith("optim.state."):
            continue
        rest = key[len("optim.state."):]
        fqn = next(n for n in named if rest.startswith(n + "."))
        entry, (name, *index) = state.setdefault(fqn, {}), rest[len(fqn) + 1:].split(".")
        if not isinstance(meta, TensorStorageMetadata):
            value: Any = None
        elif name in ("d", "prev_flat_grad", "old_dirs", "old_stps"):
            value = torch.zeros_like(named[fqn].detach())  # a DTensor sharded like the parameter
        else:
            value = torch.zeros(meta.size, dtype=meta.properties.dtype)
        if index:
            items = entry.setdefault(name, [])
            items.extend([None] * (int(index[0]) + 1 - len(items)))
            items[int(index[0])] = value
        else:
            entry[name] = value
    return state


def check_closure_dcp_resume(shared: Path) -> Callable[[Check], None]:
    def run(c: Check) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
        )

        cls, kw = CLOSURE_SOLVERS["LBFGS"]
        batches = make_batches(CLOSURE_STEPS + 1)
        path = str(shared / "ckpt-closure-LBFGS")
        model = shard(make_model(seed=99))
        # the torch limitation: DCP makes a fresh optimizer's state by step(closure=None) at lr = 0
        probe = cls(model.parameters(), **kw)
        try:
            get_optimizer_state_dict(model, probe)
            outcome = "accepted"
        except ValueError as e:
            outcome = f"ValueError: {e}"
        c.info["template from a fresh LBFGS"] = outcome
        c.expect("a fresh LBFGS gives DCP no template (step needs a closure)", "needs a closure" in outcome, outcome)
        c.expect("and DCP's failed attempt leaves lr = 0", probe.param_groups[0]["lr"] == 0, probe.param_groups)
        for p in model.parameters():
            p.grad = None  # (DCP's attempt also left zero gradients)
        opt = cls(model.parameters(), **kw)
        model_sd = get_model_state_dict(model)
        template = {"model": model_sd, "optim": {"state": closure_state_template(model, path)}}
        dcp.load(template, checkpoint_id=path)
        set_model_state_dict(model, template["model"])
        named = dict(model.named_parameters())
        for fqn, entry in template["optim"]["state"].items():
            opt.state[named[fqn]] = entry
        train_closure(model, opt, [local(b, RANK, WORLD) for b in batches[2:]])
        want = torch.load(shared / "uninterrupted-closure-LBFGS.pt", weights_only=False)
        c.within("resumed in fresh ranks: max |θ − θ_uninterrupted|", max_abs_diff(param_dict(model), want), TOL64)

    return run


# --- the examples -------------------------------------------------------------------------


REPO = Path(__file__).resolve().parents[1]


def check_example(name: str) -> Callable[[Check], None]:
    """Run examples/NAME.py in this job's ranks, as torchrun would (its process group is
    this one), and read the claims it prints (``...: True``): all must hold."""

    def run(c: Check) -> None:
        import io
        import re
        import runpy

        env = {"RANK": str(RANK), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(RANK),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}
        saved_env = {k: os.environ.get(k) for k in env}
        init, destroy = dist.init_process_group, dist.destroy_process_group
        out = io.StringIO()
        try:
            os.environ.update(env)
            dist.init_process_group = lambda *a, **k: None  # type: ignore[assignment]
            dist.destroy_process_group = lambda *a, **k: None  # type: ignore[assignment]
            with contextlib.redirect_stdout(out):
                runpy.run_path(str(REPO / "examples" / f"{name}.py"), run_name="__main__")
        finally:
            dist.init_process_group, dist.destroy_process_group = init, destroy  # type: ignore[assignment]
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        text = out.getvalue()
        c.info["output"] = text[-1500:]
        claims = re.findall(r"^(.*): (True|False)\b", text, flags=re.M)
        if RANK == 0:
            c.expect("prints at least 3 claims", len(claims) >= 3, text)
        else:
            c.expect("only rank 0 prints", not claims, text)
        for claim, verdict in claims:
            c.expect(claim, verdict == "True", text)

    return run


# --- jobs -------------------------------------------------------------------------------


def job_train(rec: Recorder, shared: Path) -> None:
    for name in ("SGD-nesterov-coupled", "Adam-coupled-L1", "AdamW-independent-L1-schedule", "SGD-decoupled-L1"):
        rec.run(f"ddp/{name}", check_ddp(SPECS[name]))
    rec.run("ddp/AdamW-float32", check_ddp(dict(cls=descend.AdamW, kw=dict(lr=1e-2, weight_decay=0.1)), torch.float32))
    rec.run("ddp/torch-oracle-AdamW", check_ddp_torch_oracle)
    for name in ("Adam-coupled-L1", "AdamW-independent-L1-schedule", "SGD-fixed-L1"):
        rec.run(f"zero/{name}", check_zero(name, SPECS[name], shared))
    rec.run("zero/nonfinite-skip-per-partition", check_zero_nonfinite)
    rec.run("fsdp2/SGD-nesterov-coupled", check_fsdp(SPECS["SGD-nesterov-coupled"]))
    rec.run("fsdp2/Adam-coupled-L1-foreach", check_fsdp(SPECS["Adam-coupled-L1"], foreach=True))
    rec.run("fsdp2/AdamW-decoupled-amsgrad", check_fsdp(SPECS["AdamW-decoupled-amsgrad"]))
    rec.run("fsdp2/AdamW-independent-L1-schedule-foreach",
            check_fsdp(SPECS["AdamW-independent-L1-schedule"], foreach=True))
    rec.run("fsdp2/SGD-decoupled-L1", check_fsdp(SPECS["SGD-decoupled-L1"]))
    rec.run("fsdp2/SGD-fixed-L1-foreach", check_fsdp(SPECS["SGD-fixed-L1"], foreach=True))
    rec.run("fsdp2/param_groups-explain", check_fsdp_names)
    for name in DCP_SPECS:
        rec.run(f"dcp/save-2-ranks-{name}", check_dcp_save(name, shared))
    for name in ("ddp", "fsdp2"):
        rec.run(f"examples/{name}", check_example(name))
    for name in CLOSURE_SOLVERS:
        rec.run(f"closure/fsdp2-{name}", check_closure_fsdp(name))
        rec.run(f"closure/ddp-{name}", check_closure_ddp(name))
    rec.run("closure/torch-LBFGS-ddp-drifts", check_torch_lbfgs_ddp_drifts)
    rec.run("closure/zero-refused", check_closure_zero)
    rec.run("closure/dtensor-shard-replicate", check_closure_dtensor_placements)
    rec.run("closure/dcp-save-LBFGS", check_closure_dcp_save(shared))
    for name in CLOSURE_SOLVERS:  # the closure solvers' collectives (issue 14)
        rec.run(f"closure/collectives-{name}", check_closure_collectives(name))


def job_resume(rec: Recorder, shared: Path) -> None:
    # a group of its own for each non-finite check: a rank that fails there alone blocks the
    # other in a collective until that group's timeout and leaves the group unusable
    groups = {mode: dist.new_group(list(range(WORLD)), timeout=datetime.timedelta(seconds=10))
              for mode in ("skip", "raise")}
    for name in DCP_SPECS:
        rec.run(f"dcp/resume-2-ranks-{name}", check_dcp_resume(name, shared, sharded=True))
    rec.run("closure/dcp-resume-LBFGS", check_closure_dcp_resume(shared))
    for mode, group in groups.items():  # last: nothing after them needs the ranks in step
        rec.run(f"fsdp2/nonfinite-{mode}", check_fsdp_nonfinite(mode, group))
    rec.run("closure/nonfinite-skip-fsdp2", check_closure_nonfinite_fsdp2)  # issue 14: one collective


def job_resume1(rec: Recorder, shared: Path) -> None:
    for name in DCP_SPECS:
        rec.run(f"dcp/resume-1-rank-plain-model-{name}", check_dcp_resume(name, shared, sharded=False))
        rec.run(f"dcp/resume-1-rank-fsdp2-{name}", check_dcp_resume(name, shared, sharded=True))


JOBS = {"train": job_train, "resume": job_resume, "resume1": job_resume1}


def main() -> None:
    global JOB, RANK, WORLD
    parser = argparse.ArgumentParser()
    parser.add_argument("job", choices=sorted(JOBS))
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shared", type=Path, required=True)
    args = parser.parse_args()
    JOB, RANK, WORLD = args.job, args.rank, args.world
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", args.port, is_master=False, timeout=PG_TIMEOUT)
    dist.init_process_group("gloo", store=store, rank=RANK, world_size=WORLD, timeout=PG_TIMEOUT)
    try:
        JOBS[args.job](Recorder(args.out), args.shared)
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    print(f"[{JOB} rank {RANK}] done", flush=True)
    sys.stdout.flush()
    os._exit(0)  # a broken gloo group must not hang the interpreter's exit


if __name__ == "__main__":
    main()
