r"""``minimize``: ``scipy.optimize.minimize`` for torch tensors, with autograd gradients.

.. code-block:: python

    res = descend.minimize(lambda x: ((1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2),
                           torch.tensor([-1.2, 1.0], dtype=torch.float64), method="lbfgs")
    res.x, res.fun, res.nit, res.nfev, res.success, res.message

``fun`` takes a tensor shaped like ``x0`` and returns a real scalar tensor computed from it;
its gradient comes from autograd, so ``x0`` may have any floating or complex dtype and live
on any device (the minimization runs there, in that dtype). The solvers are
:class:`descend.LBFGS` and :class:`descend.ConjugateGradient` with a strong Wolfe line search,
run for up to ``max_iter`` iterations in one ``step``.

Differences from scipy: ``tol`` is the bound on the largest gradient component (scipy's
``gtol`` with ``norm=inf`` for CG, L-BFGS-B's ``pgtol``), and the other stopping tests are
``torch.optim.LBFGS``'s, on the change of f, of x and the predicted decrease gᵀd, with the
absolute ``tolerance_change``. Its default here is 1e-12 in double precision: torch's 1e-9
stops problems whose minimum is about 1e-4 at relative changes of 1e-5, far short of what
float64 resolves. In lower precision it stays 1e-9, since a tighter value would chase
rounding noise. ``callback`` receives the intermediate :class:`MinimizeResult` after
each iteration (scipy's ``intermediate_result``) and stops the solver by returning True or
raising ``StopIteration``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from descend.solvers.cg import ConjugateGradient
from descend.solvers.closure import STOP_MESSAGES, ClosureSolver, ParamSpace, Vector, loss_value
from descend.solvers.lbfgs import LBFGS
from descend.validation import invalid

__all__ = ["minimize", "MinimizeResult", "METHODS"]

METHODS: dict[str, Callable[..., ClosureSolver]] = {"lbfgs": LBFGS, "cg": ConjugateGradient}
#: reasons to stop that mean a minimizer was found (to the tolerances)
_CONVERGED = ("tolerance_grad", "tolerance_change", "no_descent")
#: options that change the objective, which ``minimize`` leaves to ``fun``
_OBJECTIVE_OPTIONS = ("weight_decay", "l1", "decay", "maximize")


@dataclass
class MinimizeResult:
    """What :func:`minimize` returns (the fields of scipy's ``OptimizeResult`` it shares)."""

    x: Tensor  #: the solution, shaped and typed like ``x0``
    fun: float  #: fun(x)
    grad: Tensor  #: ∇fun(x) (scipy's ``jac``)
    nit: int  #: iterations
    nfev: int  #: evaluations of fun (each with its gradient)
    success: bool  #: whether a tolerance, rather than a limit, stopped the solver
    message: str  #: why it stopped
    status: str = ""  #: the stop reason as a key (``"tolerance_grad"``, ``"max_iter"``, …)

    def __getitem__(self, key: str) -> Any:  # scipy's OptimizeResult is a dict
        return getattr(self, key)


def minimize(fun: Callable[[Tensor], Tensor], x0: Tensor, method: str = "lbfgs", *, tol: float = 1e-5,
             max_iter: int | None = None, callback: Callable[[MinimizeResult], Any] | None = None,
             **options: Any) -> MinimizeResult:
    """Minimize ``fun`` from ``x0`` with L-BFGS (``method="lbfgs"``) or nonlinear CG (``"cg"``).

    Args:
        fun: x ↦ a real scalar tensor, differentiable by autograd.
        x0: the starting point (not modified); any floating or complex dtype, any device.
        method: ``"lbfgs"`` or ``"cg"``.
        tol: stop when every gradient component is at most ``tol`` in size (default 1e-5).
        max_iter: most iterations (default 15000 for L-BFGS, scipy's L-BFGS-B default, and
            200·n for CG, scipy's CG default).
        callback: called with the intermediate result after each iteration; True (or raising
            ``StopIteration``) stops.
        options: passed to the solver: ``max_eval`` (default 2.5·max_iter), ``tolerance_change``
            (default 1e-12 for float64 and complex128 ``x0``, else 1e-9),
            ``history_size``, ``beta``, ``restart``, ``restart_every``, ``c1``, ``c2``, ``lr``,
            ``line_search_fn`` (default ``"strong_wolfe"``).
    """
    key = method.lower() if isinstance(method, str) else method
    if key not in METHODS:
        raise invalid("method", method, ", ".join(repr(m) for m in METHODS))
    if not isinstance(x0, Tensor) or not (x0.is_floating_point() or x0.is_complex()):
        raise invalid("x0", x0 if not isinstance(x0, Tensor) else f"a tensor of dtype {x0.dtype}",
                       "a floating-point or complex tensor")
    for name in _OBJECTIVE_OPTIONS:
        if name in options:
            raise ValueError(f"Invalid option {name}={options[name]!r} (allowed: none; minimize minimizes fun "
                             "itself: put a penalty or a sign in fun)")
    if max_iter is None:
        max_iter = 15000 if key == "lbfgs" else 200 * max(x0.numel(), 1)
    options.setdefault("line_search_fn", "strong_wolfe")
    options.setdefault("max_eval", max_iter * 5 // 2)
    options.setdefault("tolerance_change", 1e-12 if x0.dtype in (torch.float64, torch.complex128) else 1e-9)

    x = x0.detach().clone().requires_grad_(True)
    solver = METHODS[key]([x], max_iter=max_iter, tolerance_grad=tol, **options)
    space = ParamSpace([x])

    def closure() -> Tensor:
        x.grad = None
        value = fun(x)
        if not isinstance(value, Tensor) or value.numel() != 1 or value.is_complex():
            raise TypeError(f"fun must return a real scalar tensor, got {value!r}")
        if not value.requires_grad:
            raise TypeError("fun must return a tensor computed from x by differentiable torch operations")
        value.backward()
        return value

    def result(value: float, grad: Vector, reason: str, nit: int, nfev: int) -> MinimizeResult:
        return MinimizeResult(x.detach(), value, space.unflatten(grad)[0].detach(), nit, nfev,
                              reason in _CONVERGED, STOP_MESSAGES[reason], reason)

    on_iteration = None
    if callback is not None:
        user_callback = callback

        def on_iteration(value: float | None, grad: Vector | None, nit: int, nfev: int) -> bool:
            if value is None or grad is None:
                return False
            intermediate = result(value, grad, "max_iter", nit, nfev)
            intermediate.x = intermediate.x.clone()
            intermediate.grad = intermediate.grad.clone()
            intermediate.message, intermediate.status = "in progress", "in_progress"
            try:
                return bool(user_callback(intermediate))
            except StopIteration:
                return True

    outcome = solver._run(closure, callback=on_iteration)
    nfev = outcome.evaluations
    value, grad = outcome.value, outcome.grad
    if value is None or grad is None:  # a fixed step ended the run without evaluating there
        with torch.no_grad():
            closure_value = torch.enable_grad()(closure)()
        nfev += 1
        value = loss_value(closure_value)
        grad = space.gather([x.grad])
    return result(value, grad, outcome.reason, outcome.iterations, nfev)
