"""One rank of the distributed Muon tests: run by tests/test_muon_distributed.py, one process per rank.

    python tests/_muon_distributed_worker.py JOB --rank R --world W --port P --out DIR --shared DIR

joins a gloo process group whose TCPStore the launcher holds on 127.0.0.1:P, runs the checks
of JOB and writes ``DIR/JOB-rank{R}.json``: one record per check (rewritten after each check,
so a hang loses nothing already measured), with the measured numbers and their tolerances.

The model is a float64 MLP 6 → 16 → 16 → 16 → 7 → 1 with tanh: the weights of its four hidden
Linear layers (16×6 tall, two 16×16 batched together, 7×16 wide with uneven shards 4 + 3) in a
Muon group, the biases and the head (1×7: rank 1's shard is empty) in an AdamW group. Its
oracle is descend.Muon in one process on the global batch of 8 that the ranks split. Muon's
Newton–Schulz iteration runs in bfloat16, so a gradient that differs from the single process's
in its last float64 bit (FSDP2's reduce-scatter, DDP's all-reduce) can round to another
bfloat16: the runs agree to a relative 1e-3, not to float64's precision.

Jobs:
    train  (2 ranks): FSDP2 against one process (and against a deliberately per-shard
           orthogonalization, which must be far off), the collectives of a step, hand-made
           DTensors in other layouts (Shard(1), Replicate, a 2-D mesh, stacks) against plain
           tensors, DDP against one process, and a distributed checkpoint saved mid-run.
    resume (2 fresh ranks): load that checkpoint into a fresh model and optimizer, continue,
           compare with the uninterrupted run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import descend
from descend.optimizers import muon as muon_module

F64 = torch.float64
GLOBAL_BATCH = 8
N_STEPS = 3  # steps before the checkpoint
M_STEPS = 2  # steps after it
REL = 1e-3  # relative, against the single-process run (bfloat16 Newton–Schulz)
PER_SHARD_AT_LEAST = 0.3  # how far off a per-shard orthogonalization's Δθ must be, relative
RESUME_TOL = 1e-12  # absolute: a resumed run against the uninterrupted one (same ranks, same math)
PG_TIMEOUT = datetime.timedelta(seconds=60)
HIDDEN = (0, 2, 4, 6)  # the Linear layers whose weights Muon steps

JOB = ""
RANK = 0
WORLD = 1


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 7), nn.Tanh(), nn.Linear(7, 1)).to(F64)


def make_batches(steps: int, seed: int = 1234) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=F64), torch.randn(GLOBAL_BATCH, 1, generator=g, dtype=F64))
            for _ in range(steps)]


def local(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    n = GLOBAL_BATCH // WORLD
    x, y = batch
    return x[RANK * n:(RANK + 1) * n], y[RANK * n:(RANK + 1) * n]


SPECS: dict[str, dict[str, Any]] = {
    "nesterov-decoupled": dict(lr=0.02, momentum=0.95, weight_decay=0.1),
    "plain-momentum-match_rms_adamw-coupled-L1": dict(lr=0.01, momentum=0.9, nesterov=False,
                                                      adjust_lr_fn="match_rms_adamw", decay="coupled",
                                                      weight_decay=1e-2, l1=1e-4),
}


def groups(model: nn.Module) -> list[dict[str, Any]]:
    """Hidden Linear weights to Muon, the rest (biases, the head) to AdamW, by hand."""
    layers = descend.groups.unwrap(model)
    hidden = [layers[i].weight for i in HIDDEN]
    rest = [p for p in layers.parameters() if all(p is not h for h in hidden)]
    return [{"params": hidden, "algorithm": "muon"}, {"params": rest, "algorithm": "adamw", "lr": 1e-2}]


def build(model: nn.Module, spec: str) -> descend.Muon:
    return descend.Muon(groups(model), **SPECS[spec])


def train(model: nn.Module, opt: torch.optim.Optimizer, batches: list[tuple[Tensor, Tensor]]) -> None:
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        opt.step()


def reference(spec: str, batches: list[tuple[Tensor, Tensor]]) -> nn.Module:
    model = make_model()
    train(model, build(model, spec), batches)
    return model


def param_dict(model: nn.Module) -> dict[str, Tensor]:
    out = {}
    for name, p in descend.groups.unwrap(model).named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[descend.groups.canonical_name(name)] = full.detach().clone()
    return out


def max_rel_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """max over tensors of ‖a − b‖∞ / ‖b‖∞."""
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)) for k in a)


def moved(params: dict[str, Tensor], start: dict[str, Tensor]) -> dict[str, Tensor]:
    """Δθ = θ − θ₀ of the Muon weights (what the orthogonalized updates added up to)."""
    return {k: params[k] - start[k] for k in (f"{i}.weight" for i in HIDDEN)}


def max_abs_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k] - b[k]).abs().max()) if a[k].numel() else 0.0 for k in a)


def ranks_differ_by(model: nn.Module) -> float:
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    return max(float((g - gathered[0]).abs().max()) for g in gathered)


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


# --- recording ----------------------------------------------------------------------------


class Check:
    def __init__(self) -> None:
        self.metrics: list[dict[str, Any]] = []
        self.info: dict[str, Any] = {}

    def within(self, what: str, value: float, tol: float) -> None:
        self.metrics.append({"what": what, "value": value, "tol": tol, "ok": bool(value <= tol)})

    def at_least(self, what: str, value: float, low: float) -> None:
        self.metrics.append({"what": what, "value": value, "low": low, "ok": bool(value >= low)})

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


# --- FSDP2 --------------------------------------------------------------------------------


@contextlib.contextmanager
def per_shard_orthogonalization() -> Any:
    """The wrong math, on purpose: each rank orthogonalizes its own shards (plain Muon on the
    local tensors) instead of the whole matrices."""
    original = muon_module._muon_dtensors

    def per_shard(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], **options: Any) -> None:
        keep = [i for i, p in enumerate(params) if p.to_local().numel()]  # type: ignore[attr-defined]
        muon_module.muon([params[i].to_local() for i in keep], [grads[i].to_local() for i in keep],  # type: ignore[attr-defined]
                         [bufs[i].to_local() for i in keep], **options)  # type: ignore[attr-defined]

    muon_module._muon_dtensors = per_shard
    try:
        yield
    finally:
        muon_module._muon_dtensors = original


@contextlib.contextmanager
def counted_all_to_all() -> Any:
    calls: list[int] = []
    original = dist.all_to_all_single

    def counting(output: Tensor, input: Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(input.numel())
        return original(output, input, *args, **kwargs)

    dist.all_to_all_single = counting  # type: ignore[assignment]
    try:
        yield calls
    finally:
        dist.all_to_all_single = original


def check_fsdp(spec: str) -> Callable[[Check], None]:
    def run(c: Check) -> None:
        from torch.distributed.tensor import DTensor

        batches = make_batches(N_STEPS + M_STEPS)
        model = shard(make_model())
        c.expect("parameters are DTensors", all(isinstance(p, DTensor) for p in model.parameters()))
        c.info["local shapes"] = [tuple(p.to_local().shape) for p in model.parameters()]
        opt = build(model, spec)
        with counted_all_to_all() as calls:
            train(model, opt, [local(b) for b in batches])
        c.info["all-to-all elements sent per call"] = calls
        c.expect("two all-to-alls per step (shards to owners, results back)",
                 len(calls) == 2 * len(batches), len(calls))
        got = param_dict(model)
        want = param_dict(reference(spec, batches))
        start = param_dict(make_model())
        c.within("max ‖θ_fsdp2 − θ_single‖∞/‖θ_single‖∞", max_rel_diff(got, want), REL)
        c.within("max ‖Δθ_fsdp2 − Δθ_single‖∞/‖Δθ_single‖∞ (Δθ = θ − θ₀)",
                 max_rel_diff(moved(got, start), moved(want, start)), REL)
        bufs = [opt.state[p]["momentum_buffer"] for p in opt.param_groups[0]["params"]]
        c.expect("momentum buffers stay sharded like their parameters",
                 all(isinstance(b, DTensor) and b.placements == p.placements
                     for b, p in zip(bufs, opt.param_groups[0]["params"])))

        model2 = shard(make_model())
        opt2 = build(model2, spec)
        with per_shard_orthogonalization():
            train(model2, opt2, [local(b) for b in batches])
        c.at_least("per-shard orthogonalization is far off: max ‖Δθ − Δθ_single‖∞/‖Δθ_single‖∞",
                   max_rel_diff(moved(param_dict(model2), start), moved(want, start)), PER_SHARD_AT_LEAST)

    return run


def check_owners(c: Check) -> None:
    """Both ranks orthogonalize matrices (the largest first, to the least-loaded rank), and a
    rank receives the shards of its own matrices only."""
    model = shard(make_model())
    opt = build(model, "nesterov-decoupled")
    x, y = local(make_batches(1)[0])
    F.mse_loss(model(x), y).backward()
    sizes: list[int] = []
    original = muon_module._orthogonalized

    def spy(updates: list[Tensor], shapes: Any, *args: Any) -> list[Tensor]:
        sizes.extend(tuple(u.shape) for u in updates)  # type: ignore[misc]
        return original(updates, shapes, *args)

    muon_module._orthogonalized = spy  # type: ignore[assignment]
    try:
        opt.step()
    finally:
        muon_module._orthogonalized = original
    everyone: list[Any] = [None] * WORLD
    dist.all_gather_object(everyone, sizes)
    c.info["whole matrices orthogonalized by each rank"] = everyone
    c.expect("each rank orthogonalizes some", all(everyone), everyone)
    together = sorted(s for rank in everyone for s in rank)
    c.expect("each matrix exactly once, whole", together == sorted([(16, 6), (16, 16), (16, 16), (7, 16)]), together)


def check_layouts(c: Check) -> None:
    """Hand-made DTensors: Shard(1), Replicate, a 1×2 mesh (Replicate, Shard(0) as HSDP has it;
    Shard(1), Shard(0): gathered on every rank), 3-D stacks (sharded across or between their matrices) and a flattened 4-D
    tensor; gradients distributed from the plain run's, so the math is the same throughout: the
    result must be the plain tensors' to the last bit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    mesh2 = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard"))
    g = torch.Generator().manual_seed(7)
    cases: list[tuple[str, tuple[int, ...], Any, list[Any], str]] = [
        ("Shard(0) uneven", (5, 9), mesh, [Shard(0)], "flatten"),
        ("Shard(1)", (6, 11), mesh, [Shard(1)], "flatten"),
        ("Replicate", (8, 4), mesh, [Replicate()], "flatten"),
        ("2-D mesh (Replicate, Shard(0)), as HSDP", (9, 6), mesh2, [Replicate(), Shard(0)], "flatten"),
        ("2-D mesh (Shard(1), Shard(0)): gathered", (9, 6), mesh2, [Shard(1), Shard(0)], "flatten"),
        ("stack [3, 6, 5] Shard(1)", (3, 6, 5), mesh, [Shard(1)], "stack"),
        ("flattened [6, 2, 3, 3] Shard(0)", (6, 2, 3, 3), mesh, [Shard(0)], "flatten"),
        # whole matrices on each rank: orthogonalized where they are, no all-to-all
        ("stack [3, 6, 5] Shard(0)", (3, 6, 5), mesh, [Shard(0)], "stack"),
        ("stack [1, 6, 5] Shard(0), rank 1 empty", (1, 6, 5), mesh, [Shard(0)], "stack"),
        ("2-D mesh stack [3, 6, 5]", (3, 6, 5), mesh2, [Replicate(), Shard(0)], "stack"),
    ]
    #: two all-to-alls per step where an owner orthogonalizes (1-D mesh, matrices sharded)
    owner_computes = {"Shard(0) uneven", "Shard(1)", "stack [3, 6, 5] Shard(1)", "flattened [6, 2, 3, 3] Shard(0)",
                      "2-D mesh (Replicate, Shard(0)), as HSDP"}
    for name, shape, m, placements, matrix in cases:
        full = torch.randn(shape, generator=g, dtype=F64)
        grads = [torch.randn(shape, generator=g, dtype=F64) for _ in range(3)]
        plain = full.clone().requires_grad_()
        dt = nn.Parameter(distribute_tensor(full.clone(), m, placements))
        opts = [descend.Muon([{"params": [t], "matrix": matrix}], lr=0.05, weight_decay=0.1) for t in (plain, dt)]
        with counted_all_to_all() as calls:
            for grad in grads:
                plain.grad = grad.clone()
                dt.grad = distribute_tensor(grad.clone(), m, placements)
                for o in opts:
                    o.step()
        want = 2 * len(grads) if name in owner_computes else 0
        c.expect(f"{name}: {want} all-to-alls", len(calls) == want, len(calls))
        diff = float((dt.full_tensor() - plain.detach()).abs().max())
        c.within(f"{name}: max |θ_dtensor − θ_plain|", diff, 0.0)
        moved = float((plain.detach() - full).abs().max())
        c.expect(f"{name}: the parameter moved", moved > 1e-3, moved)


# --- DDP ---------------------------------------------------------------------------------------


def check_ddp(spec: str) -> Callable[[Check], None]:
    def run(c: Check) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        batches = make_batches(N_STEPS + M_STEPS)
        ddp = DDP(make_model())
        train(ddp, build(ddp, spec), [local(b) for b in batches])
        c.within("max ‖θ_ddp − θ_single‖∞/‖θ_single‖∞", max_rel_diff(param_dict(ddp), param_dict(reference(spec, batches))),
                 REL)
        c.within("max |θ_rank − θ_rank0|", ranks_differ_by(ddp), 0.0)

    return run


# --- distributed checkpoints ---------------------------------------------------------------------


DCP_SPEC = "nesterov-decoupled"


def dcp_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    return {"model": model_sd, "optim": optim_sd}


def check_dcp_save(shared: Path) -> Callable[[Check], None]:
    def run(c: Check) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.tensor import DTensor

        batches = make_batches(N_STEPS + M_STEPS)
        model = shard(make_model())
        opt = build(model, DCP_SPEC)
        train(model, opt, [local(b) for b in batches[:N_STEPS]])
        state = dcp_state(model, opt)
        bufs = {k: v["momentum_buffer"] for k, v in state["optim"]["state"].items() if "momentum_buffer" in v}
        c.expect("4 momentum buffers, saved sharded (DTensors)",
                 len(bufs) == 4 and all(isinstance(b, DTensor) for b in bufs.values()), sorted(bufs))
        dcp.save(state, checkpoint_id=str(shared / "ckpt-muon"))
        train(model, opt, [local(b) for b in batches[N_STEPS:]])
        final = param_dict(model)
        if RANK == 0:
            torch.save({"params": final, "state": [sorted(opt.state[p]) for g in opt.param_groups for p in g["params"]]},
                       shared / "uninterrupted-muon.pt")
        c.within("uninterrupted FSDP2 run: max ‖θ − θ_single‖∞/‖θ_single‖∞",
                 max_rel_diff(final, param_dict(reference(DCP_SPEC, batches))), REL)
        c.expect("checkpoint written", (shared / "ckpt-muon" / ".metadata").is_file())

    return run


def check_dcp_resume(shared: Path) -> Callable[[Check], None]:
    def run(c: Check) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        batches = make_batches(N_STEPS + M_STEPS)
        model = shard(make_model(seed=99))  # other initial values: everything must come from the checkpoint
        opt = build(model, DCP_SPEC)
        state = dcp_state(model, opt)  # (a fresh optimizer: DCP makes its state with an lr = 0 step)
        dcp.load(state, checkpoint_id=str(shared / "ckpt-muon"))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        saved = torch.load(shared / "uninterrupted-muon.pt", weights_only=False)
        keys = [sorted(opt.state[p]) for g in opt.param_groups for p in g["params"]]
        c.expect("state keys restored", keys == saved["state"], keys)
        steps = [float(opt.state[p]["step"]) for p in opt.param_groups[1]["params"]]
        c.expect("AdamW steps restored", steps == [float(N_STEPS)] * len(steps), steps)
        train(model, opt, [local(b) for b in batches[N_STEPS:]])
        got = param_dict(model)
        c.within(f"after {N_STEPS}+{M_STEPS} steps: max |θ_resumed − θ_uninterrupted|",
                 max_abs_diff(got, saved["params"]), RESUME_TOL)
        c.within(f"after {N_STEPS}+{M_STEPS} steps: max ‖θ_resumed − θ_single‖∞/‖θ_single‖∞",
                 max_rel_diff(got, param_dict(reference(DCP_SPEC, batches))), REL)

    return run


# --- jobs -------------------------------------------------------------------------------------------


def job_train(rec: Recorder, shared: Path) -> None:
    for spec in SPECS:
        rec.run(f"fsdp2/{spec}", check_fsdp(spec))
    rec.run("fsdp2/owners", check_owners)
    rec.run("dtensor/layouts", check_layouts)
    for spec in SPECS:
        rec.run(f"ddp/{spec}", check_ddp(spec))
    rec.run("dcp/save", check_dcp_save(shared))


def job_resume(rec: Recorder, shared: Path) -> None:
    rec.run("dcp/resume", check_dcp_resume(shared))


JOBS = {"train": job_train, "resume": job_resume}


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
