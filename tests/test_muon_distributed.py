"""descend.Muon beyond one process: FSDP2 (each matrix orthogonalized whole, by one rank), DDP
and distributed checkpoints.

The ranks run tests/_muon_distributed_worker.py (its docstring says what each check trains and
compares); here we launch them, as tests/test_distributed.py does, and assert their records:
gloo on 127.0.0.1, this process holding the TCPStore on a port the OS picks, two launches
(``train``, then ``resume`` in fresh processes, which loads train's checkpoint), each bounded
by a deadline at which its processes are killed and the test fails with their logs. Under
pytest-xdist each launch runs once per session (a file lock in the shared temp dir).
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

WORKER = Path(__file__).with_name("_muon_distributed_worker.py")
REPO = Path(__file__).resolve().parents[1]
WORLD = 2
TIMEOUT_S = {"train": 90, "resume": 60}
NEEDS = {"resume": "train"}


def _loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in names if n.startswith("lo")), "lo")


def _env() -> dict[str, str]:
    return {**os.environ, "GLOO_SOCKET_IFNAME": _loopback_interface(), "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


def launch(job: str, out: Path, shared: Path) -> dict[str, Any]:
    """Run the ranks of a job to completion or to its deadline; return their records and logs."""
    out.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    start = time.monotonic()
    timed_out = False
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    try:
        for rank in range(WORLD):
            with open(out / f"{job}-rank{rank}.log", "w") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, str(WORKER), job, "--rank", str(rank), "--world", str(WORLD),
                     "--port", str(store.port), "--out", str(out), "--shared", str(shared)],
                    stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=REPO))
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, start + TIMEOUT_S[job] - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
    finally:
        for proc in procs:  # only the processes started here
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        del store
    ranks = []
    for rank, proc in enumerate(procs):
        path = out / f"{job}-rank{rank}.json"
        ranks.append({"records": json.loads(path.read_text()) if path.is_file() else {},
                      "returncode": proc.returncode, "log": str(out / f"{job}-rank{rank}.log")})
    return {"timed_out": timed_out, "seconds": round(time.monotonic() - start, 1), "ranks": ranks}


class Jobs:
    """Each launch once per test session, shared by the xdist workers through a file lock."""

    def __init__(self, base: Path) -> None:
        root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
        self.shared = root / "descend-muon-distributed"
        self.cache: dict[str, dict[str, Any]] = {}

    def get(self, job: str) -> dict[str, Any]:
        if job in self.cache:
            return self.cache[job]
        if job in NEEDS:
            self.get(NEEDS[job])
        self.shared.mkdir(exist_ok=True)
        result = self.shared / f"{job}.result.json"
        with FileLock(str(self.shared / f"{job}.lock")):
            if result.is_file():
                outcome = json.loads(result.read_text())
            else:
                outcome = launch(job, self.shared / job, self.shared)
                result.write_text(json.dumps(outcome))
        self.cache[job] = outcome
        return outcome


@pytest.fixture(scope="session")
def muon_jobs(tmp_path_factory: pytest.TempPathFactory) -> Jobs:
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
        elif "low" in m:
            parts.append(f"  {mark} {m['what']}: {m['value']:.3g} (at least {m['low']:.0g})")
        else:
            parts.append(f"  {mark} {m['what']}" + ("" if m["ok"] else f": {m['detail']}"))
    if record.get("info"):
        parts.append(f"  info: {record['info']}")
    if record.get("error"):
        parts.append(record["error"])
    return "\n".join(parts)


def assert_check(jobs: Jobs, job: str, check: str) -> None:
    outcome = jobs.get(job)
    problems = []
    for rank, proc in enumerate(outcome["ranks"]):
        record = proc["records"].get(check)
        if record is None:
            why = f"timed out after {outcome['seconds']} s" if outcome["timed_out"] else \
                f"exit code {proc['returncode']}"
            problems.append(f"rank {rank}: no record of {check!r} ({why}); log tail:\n{_tail(proc['log'])}")
        elif not record["ok"]:
            problems.append(f"rank {rank}:\n{_describe(record)}")
    assert not problems, f"{job}: {check} failed\n" + "\n".join(problems)


SPECS = ["nesterov-decoupled", "plain-momentum-match_rms_adamw-coupled-L1"]


@pytest.mark.parametrize("spec", SPECS)
def test_fsdp2_muon_matches_single_process_and_per_shard_does_not(muon_jobs: Jobs, spec: str) -> None:
    """Hidden weights to Muon, biases and head to AdamW, 5 steps: one process's result to a
    relative 1e-3 (bfloat16 Newton–Schulz), with two all-to-alls per step; orthogonalizing each
    rank's shards instead moves the Muon weights more than 30% off."""
    assert_check(muon_jobs, "train", f"fsdp2/{spec}")


def test_fsdp2_muon_each_matrix_orthogonalized_once_whole_by_one_rank(muon_jobs: Jobs) -> None:
    assert_check(muon_jobs, "train", "fsdp2/owners")


def test_muon_on_dtensors_of_other_layouts_equals_plain_tensors_bit_for_bit(muon_jobs: Jobs) -> None:
    """Shard(1), Replicate, a 2-D mesh, stacks and flattened 4-D tensors, uneven shards."""
    assert_check(muon_jobs, "train", "dtensor/layouts")


@pytest.mark.parametrize("spec", SPECS)
def test_ddp_muon_matches_single_process(muon_jobs: Jobs, spec: str) -> None:
    assert_check(muon_jobs, "train", f"ddp/{spec}")


def test_distributed_checkpoint_of_fsdp2_muon_resumes_in_fresh_processes(muon_jobs: Jobs) -> None:
    """Saved after 3 steps (momentum buffers sharded), loaded into a fresh model and optimizer
    in fresh ranks, 2 more steps: the uninterrupted run's parameters."""
    assert_check(muon_jobs, "train", "dcp/save")
    assert_check(muon_jobs, "resume", "dcp/resume")
