"""descend beyond one process: DDP, ZeroRedundancyOptimizer, FSDP2 and distributed checkpoints.

The ranks run tests/_distributed_worker.py (read its docstring for what each check trains
and compares). Here we launch them and assert their records:

- gloo on 127.0.0.1 only: this process holds the TCPStore on a port the OS picks (port 0),
  so parallel runs (pytest-xdist) never race for a port; gloo binds the loopback interface.
- two launches: ``train`` (2 ranks: every check that needs no fresh process, the closure
  solvers included), then side by side ``resume`` (2 fresh ranks load train's checkpoints,
  then the non-finite checks, last because a failure there stalls a rank until its group
  times out) and ``resume1`` (1 rank loads the checkpoint). Under xdist each launch runs once per session (a file lock in the
  shared temp dir) and every worker reads its records.
- each launch is bounded: its processes are killed at the deadline and the test fails with
  their logs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
from filelock import FileLock

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORKER = Path(__file__).with_name("_distributed_worker.py")
REPO = Path(__file__).resolve().parents[1]
#: a launch runs process groups side by side: (worker job, world size) for each
LAUNCHES = {"train": [("train", 2)], "resume": [("resume", 2), ("resume1", 1)]}
TIMEOUT_S = {"train": 180, "resume": 120}
NEEDS = {"resume": "train"}


def _loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in names if n.startswith("lo")), "lo")


def _env() -> dict[str, str]:
    return {**os.environ, "GLOO_SOCKET_IFNAME": _loopback_interface(), "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


def launch(launch_name: str, out: Path, shared: Path) -> dict[str, Any]:
    """Run the ranks of a launch to completion or to its deadline; return their records and logs."""
    out.mkdir(parents=True, exist_ok=True)
    timeout = TIMEOUT_S[launch_name]
    stores = []
    procs: list[tuple[str, int, subprocess.Popen[bytes]]] = []
    start = time.monotonic()
    timed_out = False
    try:
        for job, world in LAUNCHES[launch_name]:
            # this process serves the group's TCPStore on a port the OS picks: no race for ports
            store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
            stores.append(store)
            for rank in range(world):
                with open(out / f"{job}-rank{rank}.log", "w") as log:
                    proc = subprocess.Popen(
                        [sys.executable, str(WORKER), job, "--rank", str(rank), "--world", str(world),
                         "--port", str(store.port), "--out", str(out), "--shared", str(shared)],
                        stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
                procs.append((job, rank, proc))
        for _, _, proc in procs:
            try:
                proc.wait(timeout=max(0.0, start + timeout - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
    finally:
        for _, _, proc in procs:  # only the processes started here
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        del stores
    ranks: dict[str, list[dict[str, Any]]] = {}
    for job, rank, proc in procs:
        path = out / f"{job}-rank{rank}.json"
        ranks.setdefault(job, []).append({
            "records": json.loads(path.read_text()) if path.is_file() else {},
            "returncode": proc.returncode, "log": str(out / f"{job}-rank{rank}.log")})
    return {"timed_out": timed_out, "seconds": round(time.monotonic() - start, 1), "jobs": ranks}


class Jobs:
    """Each launch once per test session, shared by the xdist workers through a file lock."""

    def __init__(self, base: Path) -> None:
        root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
        self.shared = root / "descend-distributed"
        self.cache: dict[str, dict[str, Any]] = {}

    def get(self, launch_name: str) -> dict[str, Any]:
        if launch_name in self.cache:
            return self.cache[launch_name]
        if launch_name in NEEDS:
            self.get(NEEDS[launch_name])
        self.shared.mkdir(exist_ok=True)
        result = self.shared / f"{launch_name}.result.json"
        with FileLock(str(self.shared / f"{launch_name}.lock")):
            if result.is_file():
                outcome = json.loads(result.read_text())
            else:
                outcome = launch(launch_name, self.shared / launch_name, self.shared)
                result.write_text(json.dumps(outcome))
        self.cache[launch_name] = outcome
        return outcome


@pytest.fixture(scope="session")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> Jobs:
    return Jobs(tmp_path_factory.getbasetemp())


def _tail(path: str, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _describe(record: dict[str, Any]) -> str:
    parts = []
    for m in record.get("metrics", []):
        mark = "ok  " if m["ok"] else "FAIL"
        if "tol" in m:
            parts.append(f"  {mark} {m['what']}: {m['value']:.3g} (tolerance {m['tol']:.0g})")
        else:
            parts.append(f"  {mark} {m['what']}" + ("" if m["ok"] else f": {m['detail']}"))
    if record.get("info"):
        parts.append(f"  info: {record['info']}")
    if record.get("error"):
        parts.append(record["error"])
    return "\n".join(parts)


def assert_check(jobs: Jobs, launch_name: str, job: str, check: str) -> None:
    outcome = jobs.get(launch_name)
    problems = []
    for rank, proc in enumerate(outcome["jobs"][job]):
        record = proc["records"].get(check)
        if record is None:
            why = f"timed out after {outcome['seconds']} s" if outcome["timed_out"] else \
                f"exit code {proc['returncode']}"
            problems.append(f"rank {rank}: no record of {check!r} ({why}); log tail:\n{_tail(proc['log'])}")
        elif not record["ok"]:
            problems.append(f"rank {rank}:\n{_describe(record)}")
    assert not problems, f"{job}: {check} failed\n" + "\n".join(problems)


DDP_CHECKS = ["ddp/SGD-nesterov-coupled", "ddp/Adam-coupled-L1", "ddp/AdamW-independent-L1-schedule",
              "ddp/SGD-decoupled-L1", "ddp/AdamW-float32", "ddp/torch-oracle-AdamW"]
ZERO_CHECKS = ["zero/Adam-coupled-L1", "zero/AdamW-independent-L1-schedule", "zero/SGD-fixed-L1"]
FSDP_CHECKS = ["fsdp2/SGD-nesterov-coupled", "fsdp2/Adam-coupled-L1-foreach", "fsdp2/AdamW-decoupled-amsgrad",
               "fsdp2/AdamW-independent-L1-schedule-foreach", "fsdp2/SGD-decoupled-L1", "fsdp2/SGD-fixed-L1-foreach"]
DCP_SPECS = ["AdamW-independent-L1-schedule", "SGD-fixed-L1"]


@pytest.mark.parametrize("check", DDP_CHECKS)
def test_ddp_matches_single_process_and_ranks_agree(jobs: Jobs, check: str) -> None:
    assert_check(jobs, "train", "train", check)


@pytest.mark.parametrize("check", ZERO_CHECKS)
def test_zero_redundancy_optimizer_matches_unsharded_and_resumes(jobs: Jobs, check: str) -> None:
    assert_check(jobs, "train", "train", check)


def test_zero_nonfinite_skip_is_decided_per_partition(jobs: Jobs) -> None:
    """A documented limitation (docs/distributed.md), checked so the docs stay true."""
    assert_check(jobs, "train", "train", "zero/nonfinite-skip-per-partition")


@pytest.mark.parametrize("check", FSDP_CHECKS)
def test_fsdp2_matches_single_process(jobs: Jobs, check: str) -> None:
    assert_check(jobs, "train", "train", check)


def test_param_groups_and_explain_on_fsdp2_model_use_original_names(jobs: Jobs) -> None:
    assert_check(jobs, "train", "train", "fsdp2/param_groups-explain")


@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_fsdp2_nonfinite_gradient_in_one_shard_is_seen_by_every_rank(jobs: Jobs, mode: str) -> None:
    assert_check(jobs, "resume", "resume", f"fsdp2/nonfinite-{mode}")


@pytest.mark.parametrize("spec", DCP_SPECS)
def test_distributed_checkpoint_resumes_in_fresh_processes(jobs: Jobs, spec: str) -> None:
    assert_check(jobs, "train", "train", f"dcp/save-2-ranks-{spec}")
    assert_check(jobs, "resume", "resume", f"dcp/resume-2-ranks-{spec}")


@pytest.mark.parametrize("model", ["plain-model", "fsdp2"])
@pytest.mark.parametrize("spec", DCP_SPECS)
def test_distributed_checkpoint_from_two_ranks_loads_into_one(jobs: Jobs, spec: str, model: str) -> None:
    assert_check(jobs, "resume", "resume1", f"dcp/resume-1-rank-{model}-{spec}")


@pytest.mark.parametrize("example", ["ddp", "fsdp2"])
def test_examples_run_in_two_ranks_and_their_claims_hold(jobs: Jobs, example: str) -> None:
    """examples/ddp.py and examples/fsdp2.py in two ranks (the group torchrun would make)."""
    assert_check(jobs, "train", "train", f"examples/{example}")


CLOSURE_SOLVERS = ["LBFGS", "CG"]


@pytest.mark.parametrize("solver", CLOSURE_SOLVERS)
def test_closure_solver_on_fsdp2_matches_single_process(jobs: Jobs, solver: str) -> None:
    """Each rank's closure returns its own loss; the solver averages it over the mesh."""
    assert_check(jobs, "train", "train", f"closure/fsdp2-{solver}")


@pytest.mark.parametrize("solver", CLOSURE_SOLVERS)
def test_closure_solver_under_ddp_with_process_group_matches_single_process(jobs: Jobs, solver: str) -> None:
    assert_check(jobs, "train", "train", f"closure/ddp-{solver}")


def test_torch_lbfgs_with_local_losses_lets_ranks_drift_apart(jobs: Jobs) -> None:
    """The oracle for why process_group exists (torch.optim.LBFGS, the global-batch gradient,
    each rank's own loss)."""
    assert_check(jobs, "train", "train", "closure/torch-LBFGS-ddp-drifts")


def test_closure_solvers_refuse_to_be_zero_local_optimizers(jobs: Jobs) -> None:
    assert_check(jobs, "train", "train", "closure/zero-refused")


def test_closure_solver_distributed_checkpoint_resumes_in_fresh_ranks(jobs: Jobs) -> None:
    """L-BFGS on FSDP2: DCP saves its state; fresh ranks cannot get a template from a fresh
    optimizer (DCP's step(closure=None), a torch limitation, checked), load into one made
    from the checkpoint's metadata, and continue exactly as the uninterrupted run."""
    assert_check(jobs, "train", "train", "closure/dcp-save-LBFGS")
    assert_check(jobs, "resume", "resume", "closure/dcp-resume-LBFGS")


def test_closure_solvers_on_dtensors_sharded_and_replicated(jobs: Jobs) -> None:
    """Hand-made DTensors (Shard and Replicate), a DTensor loss: the plain-tensor run's result."""
    assert_check(jobs, "train", "train", "closure/dtensor-shard-replicate")


# --- closure solvers: collectives per reduction (issue 14) --------------------------------


@pytest.mark.parametrize("solver", CLOSURE_SOLVERS)
def test_closure_solver_on_fsdp2_makes_one_collective_per_reduction(jobs: Jobs, solver: str) -> None:
    """Counted in a 2-iteration step over the 6 sharded parameters: each dot product, max-abs
    and abs-sum is one all-reduce for all parameters; each evaluation one all-gather for the
    loss and one all-reduce for the weight-decay penalty; and the result is one process's."""
    assert_check(jobs, "train", "train", f"closure/collectives-{solver}")


def test_closure_solver_nonfinite_guard_on_fsdp2_is_one_collective(jobs: Jobs) -> None:
    """A NaN in one rank's shard: every rank skips, after one all-reduce for all gradients."""
    assert_check(jobs, "resume", "resume", "closure/nonfinite-skip-fsdp2")
