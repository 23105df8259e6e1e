r"""L-BFGS without torch's limits: parameter groups, weight decay, maximize, non-finite values.

One call of ``step(closure)`` runs up to ``max_iter`` iterations of limited-memory BFGS on

.. math::
   \phi(\theta) = s\,f(\theta) + \sum_g \tfrac{\lambda_g}{2}\lVert\theta_g\rVert^2,
   \qquad s = -1 \text{ when maximizing, else } 1,

where f is the closure's loss and λ_g the ``weight_decay`` of group g. Each iteration k, with
g_k = ∇φ(θ_k), s_i = θ_{i+1} − θ_i and y_i = g_{i+1} − g_i for the last m = ``history_size``
pairs with y_iᵀs_i > 10⁻¹⁰ (Nocedal & Wright, *Numerical Optimization*, Alg. 7.4):

.. math::
   \begin{aligned}
   &q \leftarrow -g_k;\quad \text{for } i = k-1, \dots, k-m:\ \
      \alpha_i \leftarrow \rho_i s_i^\top q,\ q \leftarrow q - \alpha_i y_i
      \qquad (\rho_i = 1 / y_i^\top s_i)\\
   &r \leftarrow \gamma_k q,\quad \gamma_k = \frac{s_{k-1}^\top y_{k-1}}{y_{k-1}^\top y_{k-1}};\quad
     \text{for } i = k-m, \dots, k-1:\ \ \beta \leftarrow \rho_i y_i^\top r,\
      r \leftarrow r + (\alpha_i - \beta) s_i\\
   &d_k \leftarrow r \quad (d_k = -g_k \text{ on the first iteration}),\qquad
     \theta_{k+1} \leftarrow \theta_k + t_k d_k
   \end{aligned}

with t_k from the strong Wolfe line search of :mod:`descend.solvers.linesearch` (``line_search_fn=
"strong_wolfe"``), or t_k = lr (and lr·min(1, 1/‖g_0‖₁) on the very first iteration) without
one. A call stops when ``max_iter`` iterations or ``max_eval`` evaluations are spent, when
‖g‖_∞ ≤ ``tolerance_grad``, when g_kᵀd_k > −``tolerance_change``, or when ‖t_k d_k‖_∞ or
|φ_{k+1} − φ_k| fall below ``tolerance_change``. The next call continues with the memory.

With one parameter group, no weight decay and no maximize, this is ``torch.optim.LBFGS``
operation for operation, bit for bit, quirks included: without a line search the last
iteration of a call does not evaluate the closure at its new point, and the first trial step
of the first iteration is lr·min(1, 1/‖g‖₁) also with the line search.

Differences from torch:

- Several parameter groups, which must agree on every solver setting; ``weight_decay`` may
  differ per group (the usual "no decay on biases"), and is part of φ, so the line search
  sees the penalty as well as the gradient. Only ``decay="coupled"`` is meaningful; ``l1``
  must be 0 (φ must be smooth).
- ``maximize``; parameters on several devices or of several dtypes; DTensor parameters
  (reductions are global, see :mod:`descend.solvers.closure`).
- ``c1`` and ``c2`` of the line search are arguments.
- The state is per parameter (each keeps its slices of d, the last gradient and the history,
  shaped like itself; the scalars are with the first parameter), so descend's checkpoint
  checks and distributed checkpoints apply; torch keeps flat vectors with its first parameter,
  so the two do not load each other's state dicts.
- A non-finite value at a trial point makes the line search step back (torch would make the
  parameters NaN). Without a line search, a non-finite value after a step halves the step
  until the value is finite. If no finite point is found, the parameters stay where the
  iteration began, a ``RuntimeWarning`` says so, and the next call starts afresh from steepest
  descent. (Without a line search the last step of a call is not evaluated, as in torch, so it
  cannot be checked.)
- A call that raises (the closure throws) leaves the parameters and the state as they were.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from descend.solvers import closure as vec
from descend.solvers.closure import ClosureSolver, IterationCallback, Objective, Outcome, Scalar, Vector
from descend.solvers.linesearch import iterate
from descend.state import StateSpec
from descend.validation import check_int

__all__ = ["LBFGS", "lbfgs"]


def _two_loop(grad: Vector, old_dirs: list[Vector], old_stps: list[Vector], ro: list[Tensor],
              H_diag: Scalar) -> Vector:
    """−H_k g_k by the two-loop recursion (y_i are ``old_dirs``, s_i ``old_stps``)."""
    num_old = len(old_dirs)
    al: list[Any] = [None] * num_old
    q = vec.neg(grad)
    for i in range(num_old - 1, -1, -1):
        al[i] = vec.dot(old_stps[i], q) * ro[i]
        vec.add_(q, old_dirs[i], -al[i])
    r = vec.mul(q, H_diag)
    for i in range(num_old):
        be_i = vec.dot(old_dirs[i], r) * ro[i]
        vec.add_(r, old_stps[i], al[i] - be_i)
    return r


class LBFGSRule:
    """The L-BFGS direction: update the memory with the last (s, y) pair, then the two-loop
    recursion. State entries: ``old_dirs`` (the y_i), ``old_stps`` (the s_i), ``ro`` (1/y_iᵀs_i)
    and ``H_diag`` (γ_k), as ``torch.optim.LBFGS`` names them."""

    def __init__(self, history_size: int) -> None:
        self.history_size = history_size

    def direction(self, state: dict[str, Any], grad: Vector, first: bool) -> Vector:
        if first:
            state.update(old_dirs=[], old_stps=[], ro=[], H_diag=1)
            return vec.neg(grad)
        old_dirs, old_stps, ro = list(state["old_dirs"]), list(state["old_stps"]), list(state["ro"])
        H_diag = state["H_diag"]
        y = vec.sub(grad, state["prev_flat_grad"])
        s = vec.mul(state["d"], state["t"])
        ys = vec.dot(y, s)
        if ys > 1e-10:  # keep the pair only where the curvature is positive: H stays positive definite
            if len(old_dirs) == self.history_size:
                del old_dirs[0], old_stps[0], ro[0]
            old_dirs.append(y)
            old_stps.append(s)
            ro.append(1.0 / ys)
            H_diag = ys / vec.dot(y, y)
        state.update(old_dirs=old_dirs, old_stps=old_stps, ro=ro, H_diag=H_diag)
        return _two_loop(grad, old_dirs, old_stps, ro, H_diag)

    def initial_step(self, state: dict[str, Any], grad: Vector, gtd: Tensor, value: float, first: bool,
                     lr: float) -> Scalar:
        return vec.first_step(grad, lr) if first else lr

    def stalled(self, state: dict[str, Any]) -> bool:
        return False  # torch's L-BFGS stops


def lbfgs(objective: Objective, state: dict[str, Any], *, lr: float, max_iter: int, max_eval: int,
          tolerance_grad: float, tolerance_change: float, history_size: int, line_search_fn: str | None,
          c1: float = 1e-4, c2: float = 0.9, callback: IterationCallback | None = None,
          name: str = "LBFGS") -> tuple[dict[str, Any], Outcome]:
    """Functional L-BFGS: up to ``max_iter`` iterations on ``objective``, from ``state``.

    ``state`` is not modified; the new state is returned with the :class:`~descend.solvers.closure.Outcome`.
    Its keys are those of ``torch.optim.LBFGS`` (vectors as lists of pieces): ``func_evals``,
    ``n_iter``, ``d``, ``t``, ``old_dirs``, ``old_stps``, ``ro``, ``H_diag``, ``prev_flat_grad``,
    ``prev_loss``; and ``restart`` after a failure on non-finite values.
    """
    return iterate(objective, state, LBFGSRule(history_size), lr=lr, max_iter=max_iter, max_eval=max_eval,
                   tolerance_grad=tolerance_grad, tolerance_change=tolerance_change, line_search_fn=line_search_fn,
                   c1=c1, c2=c2, callback=callback, name=name)


class LBFGS(ClosureSolver):
    r"""L-BFGS over any number of parameter groups, with weight decay and maximize.

    Args:
        params: tensors, parameter-group dicts, or ``(name, tensor)`` pairs.
        lr: the step length (the first trial step of each line search; default 1).
        max_iter: most iterations per ``step`` (default 20).
        max_eval: most closure evaluations per ``step`` (default ``max_iter * 5 // 4``).
        tolerance_grad: stop when every gradient component is at most this in size (default 1e-7).
        tolerance_change: stop when the step or the change in objective is below this (default 1e-9).
        history_size: the number m of correction pairs kept (default 100).
        line_search_fn: ``None`` (fixed steps of lr) or ``"strong_wolfe"``.
        c1, c2: the constants of the strong Wolfe conditions (default 1e-4 and 0.9, torch's).
        weight_decay: λ ≥ 0, per group: the objective gains λ/2·‖θ‖² (default 0).
        decay: ``"coupled"`` only (weight decay is part of the objective).
        maximize: maximize the closure's loss instead of minimizing it.
        nonfinite: ``"ignore"`` (default), ``"skip"`` or ``"raise"`` for a non-finite gradient at
            the step's starting point (see :class:`~descend.solvers.closure.ClosureSolver`).
        process_group: DDP: None (default, no reduction), True or ``"default"`` (the default
            group) or a process group: the closure's loss is averaged over it, so the ranks take
            the same decisions. DTensor (FSDP2) parameters need nothing: the loss is averaged
            over their mesh.

    ``step(closure)`` needs a closure that clears the gradients, computes the loss, calls
    ``backward()`` and returns the loss; it returns the loss of its first evaluation. The
    algorithm, and how it relates to ``torch.optim.LBFGS``, is in the docstring of
    :mod:`descend.solvers.lbfgs`.
    """

    _shared = ClosureSolver._shared + ("history_size",)
    _vector_keys = ("d", "prev_flat_grad")
    _history_keys = ("old_dirs", "old_stps")
    state_spec = StateSpec.untyped("func_evals", "n_iter", "d", "t", "old_dirs", "old_stps", "ro", "H_diag", "prev_flat_grad",
                   "prev_loss", "restart")
    _group_keys = ("history_size", "max_iter", "line_search_fn")

    def __init__(self, params: Any, lr: float | Tensor = 1, max_iter: int = 20, max_eval: int | None = None,
                 tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9, history_size: int = 100,
                 line_search_fn: str | None = None, *, c1: float = 1e-4, c2: float = 0.9, weight_decay: float = 0,
                 decay: str = "coupled", l1: float = 0, maximize: bool = False,
                 nonfinite: str = "ignore", process_group: Any = None) -> None:
        defaults = dict(lr=lr, max_iter=max_iter, max_eval=max_eval, tolerance_grad=tolerance_grad,
                        tolerance_change=tolerance_change, history_size=history_size, line_search_fn=line_search_fn,
                        c1=c1, c2=c2, weight_decay=weight_decay, decay=decay, l1=l1, maximize=maximize)
        super().__init__(params, defaults, nonfinite=nonfinite, process_group=process_group)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_int("history_size", group["history_size"], 1)

    def _solve(self, objective: Objective, state: dict[str, Any], settings: dict[str, Any],
               callback: Callable[..., Any] | None) -> tuple[dict[str, Any], Outcome]:
        return lbfgs(objective, state, lr=settings["lr"], max_iter=settings["max_iter"],
                     max_eval=settings["max_eval"], tolerance_grad=settings["tolerance_grad"],
                     tolerance_change=settings["tolerance_change"], history_size=settings["history_size"],
                     line_search_fn=settings["line_search_fn"], c1=settings["c1"], c2=settings["c2"],
                     callback=callback, name=type(self).__name__)

