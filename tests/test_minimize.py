"""descend.minimize against scipy.optimize.minimize and closed forms; DTensor parameters."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.optimize
import torch

import descend
from tests.problems import by_name


def rosenbrock(x):
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


def scipy_fun(f):
    def fun(z):
        t = torch.tensor(z, dtype=torch.float64, requires_grad=True)
        value = f(t)
        value.backward()
        return value.item(), t.grad.numpy()

    return fun


@pytest.mark.parametrize("method,scipy_method", [("lbfgs", "L-BFGS-B"), ("cg", "CG")])
def test_same_minimizer_as_scipy(method, scipy_method):
    for name in ("rosenbrock", "beale", "wood"):
        problem = by_name(name)
        ref = scipy.optimize.minimize(scipy_fun(problem), np.array(problem.x0), jac=True, method=scipy_method,
                                      options=dict(gtol=1e-10) if scipy_method == "CG" else dict(gtol=1e-10, ftol=0))
        # tol bounds the gradient; tolerance_change=0 turns off the other stopping tests
        res = descend.minimize(problem, problem.start(), method=method, tol=1e-10, tolerance_change=0)
        assert res.success, (name, res.message)
        np.testing.assert_allclose(res.x.numpy(), ref.x, atol=1e-6)
        assert res.fun == pytest.approx(ref.fun, abs=1e-10)
        assert res.fun == pytest.approx(problem(res.x).item(), abs=0)
        torch.testing.assert_close(res.grad, torch.func.grad(problem)(res.x))


def test_result_fields_count_what_happened():
    calls = []

    def f(x):
        calls.append(1)
        return rosenbrock(x)

    x0 = torch.tensor([-1.2, 1.0], dtype=torch.float64)
    res = descend.minimize(f, x0)
    assert res.nfev == len(calls)  # every evaluation of fun is counted, including the first
    assert 0 < res.nit < res.nfev
    assert res.success and res.status in ("tolerance_grad", "tolerance_change", "no_descent")
    assert res.grad.abs().max() <= 1e-5 or res.status != "tolerance_grad"
    assert torch.equal(x0, torch.tensor([-1.2, 1.0], dtype=torch.float64))  # x0 is not modified
    assert res["x"] is res.x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_shape_are_kept(dtype):
    target = torch.arange(6, dtype=dtype).reshape(2, 3)
    res = descend.minimize(lambda x: ((x - target) ** 2).sum() + (x**4).sum() * 1e-3, torch.zeros(2, 3, dtype=dtype))
    assert res.x.dtype == dtype and res.x.shape == (2, 3) and res.grad.shape == (2, 3)
    # the minimizer solves 2(x − t) + 4e-3·x³ = 0 elementwise: the residual is the gradient, ≤ tol
    residual = 2 * (res.x.double() - target.double()) + 4e-3 * res.x.double() ** 3
    assert residual.abs().max().item() <= (1e-4 if dtype == torch.float32 else 1e-5)
    assert res.success


def test_complex_variables():
    center = torch.tensor([1 + 2j, -0.5j], dtype=torch.complex128)
    res = descend.minimize(lambda z: ((z - center).abs() ** 2).sum(), torch.zeros(2, dtype=torch.complex128),
                           method="cg")
    assert res.x.dtype == torch.complex128
    torch.testing.assert_close(res.x, center)


def test_callback_sees_iterations_and_can_stop():
    seen = []

    def callback(intermediate):
        seen.append((intermediate.nit, intermediate.nfev, intermediate.fun))
        return intermediate.nit == 5

    res = descend.minimize(rosenbrock, torch.tensor([-1.2, 1.0], dtype=torch.float64), callback=callback)
    assert [s[0] for s in seen] == [1, 2, 3, 4, 5]
    assert all(a[2] >= b[2] for a, b in zip(seen, seen[1:]))  # accepted points only go down
    assert not res.success and res.status == "callback" and res.nit == 5

    def stop(intermediate):
        raise StopIteration

    res = descend.minimize(rosenbrock, torch.tensor([-1.2, 1.0], dtype=torch.float64), method="cg", callback=stop)
    assert res.nit == 1 and res.status == "callback"


def test_iteration_limit_is_not_success():
    res = descend.minimize(rosenbrock, torch.tensor([-1.2, 1.0], dtype=torch.float64), max_iter=3)
    assert not res.success and res.status == "max_iter" and res.nit == 3
    assert "max_iter" in res.message


def test_fixed_steps_evaluate_the_result():
    """Without a line search the last iteration is not evaluated (torch's economy), so the
    result costs one more evaluation; the path is torch.optim.LBFGS's."""
    x = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    reference = torch.optim.LBFGS([x], lr=0.25, max_iter=4)

    def closure():
        reference.zero_grad()
        loss = (x**2).sum() + x[0] ** 4
        loss.backward()
        return loss

    reference.step(closure)
    res = descend.minimize(lambda z: (z**2).sum() + z[0] ** 4, torch.ones(3, dtype=torch.float64),
                           line_search_fn=None, lr=0.25, max_iter=4)
    assert torch.equal(res.x, x.detach())
    assert res.fun == closure().item()
    assert res.nfev == 5  # 4 by the solver (none after the last step), 1 for the result
    assert res.nit == 4 and not res.success


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(method="bfgs"), ValueError, "method"),
    (dict(weight_decay=0.1), ValueError, "weight_decay"),
    (dict(maximize=True), ValueError, "maximize"),
    (dict(beta="XX", method="cg"), ValueError, "beta"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        descend.minimize(rosenbrock, torch.zeros(2, dtype=torch.float64), **kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="x0"):
        descend.minimize(rosenbrock, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="scalar"):
        descend.minimize(lambda x: x * 2, torch.zeros(2))
    with pytest.raises(TypeError, match="differentiable"):
        descend.minimize(lambda x: torch.tensor(1.0), torch.zeros(2))


# --- DTensor parameters -----------------------------------------------------------------------


DTENSOR_SCRIPT = textwrap.dedent("""
    import os, sys, tempfile
    import torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    import descend

    def run(rank, world, init):
        dist.init_process_group("gloo", rank=rank, world_size=world, init_method=init)
        mesh = init_device_mesh("cpu", (world,))
        g = torch.Generator().manual_seed(0)
        a = torch.randn(8, 3, generator=g, dtype=torch.float64)
        b = torch.randn(4, generator=g, dtype=torch.float64)
        results = {}
        for name, cls, kw in [("lbfgs", descend.LBFGS, dict(line_search_fn="strong_wolfe")), ("cg", descend.CG, {})]:
            out = []
            for distributed in (False, True):
                w = torch.zeros(8, 3, dtype=torch.float64)
                v = torch.zeros(4, dtype=torch.float64)
                if distributed:  # one sharded, one replicated parameter
                    w, v = distribute_tensor(w, mesh, [Shard(0)]), distribute_tensor(v, mesh, [Replicate()])
                w, v = torch.nn.Parameter(w), torch.nn.Parameter(v)
                opt = cls([{"params": [w], "weight_decay": 0.1}, {"params": [v]}], max_iter=40, max_eval=200, **kw)

                def closure():
                    opt.zero_grad()
                    loss = ((w - a if not distributed else w - distribute_tensor(a, mesh, [Shard(0)])) ** 4).sum()
                    loss = loss + ((v - b if not distributed else v - distribute_tensor(b, mesh, [Replicate()])) ** 2).sum()
                    loss.backward()
                    return loss

                opt.step(closure)
                full = [t.full_tensor() if distributed else t.detach() for t in (w, v)]
                out.append(full)
            (w0, v0), (w1, v1) = out
            torch.testing.assert_close(w1, w0, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(v1, v0, rtol=1e-9, atol=1e-12)
        dist.destroy_process_group()
        if rank == 0:
            print("DTENSOR-OK")

    if __name__ == "__main__":
        world = int(sys.argv[1])
        init = "file://" + tempfile.mktemp()
        if world == 1:
            run(0, 1, init)
        else:
            torch.multiprocessing.spawn(run, args=(world, init), nprocs=world)
""")


def _run_dtensor_script(tmp_path, world):
    script = tmp_path / "dtensor_solvers.py"
    script.write_text(DTENSOR_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, str(script), str(world)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert "DTENSOR-OK" in done.stdout, done.stdout + done.stderr


def test_dtensor_parameters_on_a_one_process_mesh(tmp_path):
    """Sharded and replicated DTensor parameters (with per-group decay) reach the same point as
    plain tensors: every dot product and norm goes through DTensor's reductions."""
    pytest.importorskip("torch.distributed.tensor")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    _run_dtensor_script(tmp_path, 1)

# (over two processes: tests/test_distributed.py::test_closure_solvers_on_dtensors_sharded_and_replicated)
