"""Exact resume: N steps in one go, or k steps, a checkpoint (model + optimizer + LR scheduler,
``torch.save``), a fresh process that loads it with ``torch.load(..., weights_only=True)`` and
N − k more steps, end bit-identical: ``torch.equal`` on every parameter and every optimizer
state tensor (the closure solvers' histories included), and equal plain values everywhere
else (param groups, scheduler state, ``skipped_steps``).

The configurations (every optimizer; SGD, Adam and AdamW in each implementation and with
flat storage; a run with skipped non-finite steps on both sides of the checkpoint) are in
tests/_resume_worker.py, which is also the script the fresh process runs: one process
resumes every configuration, to keep the cost of starting Python and torch to one.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import descend
from tests._resume_worker import CONFIGS, build, checkpoint, train

WORKER = Path(__file__).with_name("_resume_worker.py")
PLAIN = (int, float, bool, str, type(None))


def assert_identical(a: Any, b: Any, path: str = "") -> None:
    """Bit-identical: tensors by torch.equal (and dtype and shape), the rest by ==, recursively."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), (path, type(a), type(b))
        assert a.dtype == b.dtype and a.shape == b.shape, (path, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(a, b), (path, (a.double() - b.double()).abs().max().item())
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(map(str, a)) == sorted(map(str, b)), (path, list(a), list(b))
        for key in a:
            assert_identical(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), (path, a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), (path, b)
    else:
        assert a == b, (path, a, b)


def tensors_and_plain_values_only(x: Any, path: str = "") -> None:
    """What ``torch.load(weights_only=True)`` accepts without allow-listing anything."""
    if isinstance(x, dict):
        for key, value in x.items():
            assert isinstance(key, (int, str)), (path, key)
            tensors_and_plain_values_only(value, f"{path}[{key!r}]")
    elif isinstance(x, (list, tuple)):
        for i, value in enumerate(x):
            tensors_and_plain_values_only(value, f"{path}[{i}]")
    else:
        assert type(x) is torch.Tensor or isinstance(x, PLAIN), (path, type(x))


def _run_everything(directory: Path) -> None:
    """Every configuration: uninterrupted and interrupted here, resumed in one fresh process."""
    for name, config in CONFIGS.items():
        model, opt, sched = build(config)
        train(config, model, opt, sched, 0, config.total)
        torch.save(checkpoint(model, opt, sched, config.total), directory / f"{name}.ref")

        model, opt, sched = build(config)
        train(config, model, opt, sched, 0, config.checkpoint)
        torch.save(checkpoint(model, opt, sched, config.checkpoint), directory / f"{name}.pt")
    done = subprocess.run([sys.executable, str(WORKER), str(directory)], capture_output=True, text=True,
                          timeout=300)
    (directory / "worker.log").write_text(f"exit code {done.returncode}\n{done.stdout}\n{done.stderr}")


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The runs of every configuration, made once per test session even under pytest-xdist
    (the first worker makes them, the others wait for it and read its files)."""
    from filelock import FileLock  # a dependency of torch

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's directory, shared by the workers
    directory = root / "descend-resume"
    directory.mkdir(exist_ok=True)
    with FileLock(str(directory) + ".lock"):
        if not (directory / "worker.log").exists():
            _run_everything(directory)
    out: dict[str, Any] = {"uninterrupted": {}, "saved": {}, "resumed": {}}
    log = (directory / "worker.log").read_text()
    for name in CONFIGS:
        out["uninterrupted"][name] = torch.load(directory / f"{name}.ref", weights_only=True)
        out["saved"][name] = torch.load(directory / f"{name}.pt", weights_only=True)
        err, result = directory / f"{name}.err", directory / f"{name}.out.pt"
        if err.exists():
            out["resumed"][name] = err.read_text()
        elif result.exists():
            out["resumed"][name] = torch.load(result, weights_only=True)
        else:
            out["resumed"][name] = f"no result from the worker: {log}"
    return out


def _without_torch_group_keys(sd: dict[str, Any]) -> dict[str, Any]:
    """The state dict without the group key that torch's ``__setstate__`` adds on loading
    (see test_loading_adds_no_group_keys)."""
    return {**sd, "param_groups": [{k: v for k, v in g.items() if k != "differentiable"}
                                   for g in sd["param_groups"]]}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_resumed_in_a_fresh_process_is_bit_identical(runs: dict[str, Any], name: str) -> None:
    resumed = runs["resumed"][name]
    assert not isinstance(resumed, str), resumed
    ours = runs["uninterrupted"][name]
    assert_identical(resumed["model"], ours["model"], "model")
    assert_identical(_without_torch_group_keys(resumed["optimizer"]), _without_torch_group_keys(ours["optimizer"]),
                     "optimizer")
    assert_identical(resumed["scheduler"], ours["scheduler"], "scheduler")


@pytest.mark.parametrize("name", ["SGD-fused", "Adam-flat"])
def test_loading_adds_no_group_keys(runs: dict[str, Any], name: str) -> None:
    resumed = runs["resumed"][name]
    assert not isinstance(resumed, str), resumed
    for ours, theirs in zip(resumed["optimizer"]["param_groups"], runs["uninterrupted"][name]["optimizer"]["param_groups"]):
        assert sorted(ours) == sorted(theirs)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_checkpoint_holds_only_tensors_and_plain_values(runs: dict[str, Any], name: str) -> None:
    tensors_and_plain_values_only(runs["saved"][name]["optimizer"])
    tensors_and_plain_values_only(runs["saved"][name]["scheduler"])


def test_the_runs_are_not_trivial(runs: dict[str, Any]) -> None:
    """The checkpoint is taken where the optimizer state matters: the parameters moved, the
    first-order optimizers have state, the closure solvers a history, skips were counted."""
    for name, config in CONFIGS.items():
        start, _, _ = build(config)
        end = runs["uninterrupted"][name]["model"]
        assert all(not torch.equal(p, end[n]) for n, p in start.state_dict().items()), name
        sd = runs["saved"][name]["optimizer"]
        assert sd["state"], name
        if name.startswith("LBFGS"):
            assert len(sd["state"][0]["old_dirs"]) >= 2, name
        if config.nan_steps:
            assert sd["skipped_steps"] == 1 and runs["uninterrupted"][name]["optimizer"]["skipped_steps"] == 2
        # the scheduler changed the learning rate before the checkpoint
        lr = sd["param_groups"][0]["lr"]
        initial = sd["param_groups"][0].get("initial_lr", sd["param_groups"][0]["base_lr"])
        assert lr != initial, (name, lr, initial)


@pytest.mark.parametrize("impl", ["single", "foreach", "fused"])
def test_adam_state_dict_with_integer_steps_continues_as_torch(impl: str) -> None:
    flags = {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[impl]
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(4, 3, generator=g), torch.randn(5, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) for p in start] for _ in range(3)]
    params = [p.clone().requires_grad_() for p in start]
    opt = torch.optim.Adam(params, lr=0.1)
    for p, grad in zip(params, grads[0]):
        p.grad = grad
    opt.step()
    sd = opt.state_dict()
    for entry in sd["state"].values():
        entry["step"] = int(entry["step"].item())  # as torch < 1.12 saved it
    finals = []
    for cls in (torch.optim.Adam, descend.Adam):
        ps = [p.detach().clone().requires_grad_() for p in params]
        o = cls(ps, lr=0.1, **flags)
        o.load_state_dict(copy.deepcopy(sd))
        for step_grads in grads[1:]:
            for p, grad in zip(ps, step_grads):
                p.grad = grad.clone()
            o.step()
        finals.append([p.detach() for p in ps])
    for a, b in zip(*finals):
        assert torch.equal(a, b)
