r"""Nonlinear conjugate gradient: the optimizer torch.optim's documentation has promised since 2017.

One call of ``step(closure)`` runs up to ``max_iter`` iterations on the objective
φ(θ) = s·f(θ) + Σ_g λ_g/2·‖θ_g‖² of :mod:`descend.solvers.lbfgs` (s = −1 when maximizing). With
g_k = ∇φ(θ_k), y_k = g_{k+1} − g_k and d_k the last direction (Nocedal & Wright, *Numerical
Optimization*, 2nd ed., ch. 5):

.. math::
   d_0 = -g_0,\qquad d_{k+1} = -g_{k+1} + \beta_{k+1} d_k,\qquad \theta_{k+1} = \theta_k + t_k d_k

with t_k from the strong Wolfe line search of :mod:`descend.solvers.linesearch` and β by ``beta``:

========  ==================================================================  ==========================
``beta``  β_{k+1}                                                             reference
========  ==================================================================  ==========================
``"FR"``  ‖g_{k+1}‖² / ‖g_k‖²                                                  Fletcher & Reeves 1964
``"PR"``  g_{k+1}ᵀy_k / ‖g_k‖²                                                 Polak & Ribière 1969
``"PR+"`` max(β^PR, 0)                                                         Gilbert & Nocedal 1992
``"HS"``  g_{k+1}ᵀy_k / d_kᵀy_k                                                Hestenes & Stiefel 1952
``"DY"``  ‖g_{k+1}‖² / d_kᵀy_k                                                 Dai & Yuan 1999
``"HZ"``  max(β^N, η_k), β^N = (y_k − 2d_k‖y_k‖²/d_kᵀy_k)ᵀg_{k+1} / d_kᵀy_k,  Hager & Zhang 2005, 2006
          η_k = −1 / (‖d_k‖·min(0.01, ‖g_k‖))
========  ==================================================================  ==========================

(N&W §5.2; the ``"HZ"`` truncation is that of CG_DESCENT, Hager & Zhang 2006.)
On a strongly convex quadratic with exact line searches every rule is linear CG, which
reaches the minimizer in at most n iterations.

**Restarts** (d_{k+1} = −g_{k+1}): with ``restart="powell"`` when consecutive gradients are far
from orthogonal, |g_{k+1}ᵀg_k| ≥ 0.2·‖g_{k+1}‖² (Powell 1977; N&W §5.2); every
``restart_every`` iterations if set; and always when d_{k+1} is not a descent direction
(g_{k+1}ᵀd_{k+1} > −``tolerance_change``) or a denominator of β vanishes. A line search
that finds no lower point along a conjugate direction is retried along −g.

**Step lengths.** ``c2`` defaults to 0.1: with c₂ < 1/2 the strong Wolfe conditions make every
Fletcher–Reeves direction a descent direction (N&W Lemma 5.6). The first trial step of the
very first iteration is lr·min(1, 1/‖g‖₁), as in :class:`descend.LBFGS`; later ones
interpolate the last decrease, t = min(lr, 1.01·2(φ_k − φ_{k−1})/φ'(0)) (N&W §3.5, the
choice of ``scipy.optimize.minimize(method="CG")``), since a conjugate direction, unlike a
quasi-Newton one, has no natural unit step. Without a line search (``line_search_fn=None``)
every step is lr; consecutive gradients are then rarely near-orthogonal, Powell's test
restarts almost every iteration, and the method is close to gradient descent.

Stopping tests, the ``step(closure)`` contract (one call runs up to ``max_iter`` iterations and
returns the first loss; the next call continues with the saved direction and gradient),
weight decay, maximize, non-finite values and exceptions are as for :class:`descend.LBFGS`.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from descend.solvers import closure as vec
from descend.solvers.closure import ClosureSolver, IterationCallback, Objective, Outcome, Scalar, Vector
from descend.solvers.linesearch import iterate
from descend.state import StateSpec
from descend.validation import check_int, invalid

__all__ = ["ConjugateGradient", "CG", "conjugate_gradient", "cg_beta", "BETAS"]

BETAS = ("FR", "PR", "PR+", "HS", "DY", "HZ")
RESTARTS = ("powell", None)
#: Powell's restart threshold ν in |g_{k+1}ᵀg_k| ≥ ν‖g_{k+1}‖²
POWELL = 0.2
#: η of Hager & Zhang's truncation
HZ_ETA = 0.01


def cg_beta(rule: str, grad: Vector, prev_grad: Vector, prev_dir: Vector) -> Scalar | None:
    """β_{k+1} of ``rule`` (see the module docstring); None where its denominator is not positive."""
    y = vec.sub(grad, prev_grad)
    if rule in ("FR", "PR", "PR+"):
        denominator = vec.dot(prev_grad, prev_grad)
        numerator = vec.dot(grad, grad) if rule == "FR" else vec.dot(grad, y)
    else:
        denominator = vec.dot(prev_dir, y)
        numerator = vec.dot(grad, grad) if rule == "DY" else vec.dot(grad, y)
    if not denominator > 0 or not vec.is_finite(denominator):
        return None
    if rule == "HZ":
        numerator = numerator - 2 * vec.dot(y, y) * vec.dot(prev_dir, grad) / denominator
    beta = numerator / denominator
    if rule == "PR+":
        beta = beta.clamp(min=0)
    elif rule == "HZ":
        eta = -1 / (vec.dot(prev_dir, prev_dir).sqrt() * vec.dot(prev_grad, prev_grad).sqrt().clamp(max=HZ_ETA))
        beta = beta.maximum(eta.to(beta.dtype))
    return beta if vec.is_finite(beta) else None


class CGRule:
    """The conjugate gradient direction with its restarts. State entries: ``since_restart``
    (iterations since the last steepest-descent direction) and ``restarts`` (how many)."""

    def __init__(self, beta: str, restart: str | None, restart_every: int | None, tolerance_change: float) -> None:
        self.beta, self.restart, self.restart_every = beta, restart, restart_every
        self.tolerance_change = tolerance_change

    def direction(self, state: dict[str, Any], grad: Vector, first: bool) -> Vector:
        state.setdefault("restarts", 0)
        beta: Scalar | None = None
        if not first and not state.pop("force_restart", False):
            due = self.restart_every is not None and state.get("since_restart", 0) + 1 >= self.restart_every
            if not due:
                beta = cg_beta(self.beta, grad, state["prev_flat_grad"], state["d"])
            if beta is not None and self.restart == "powell":
                if abs(vec.dot(grad, state["prev_flat_grad"])) >= POWELL * vec.dot(grad, grad):
                    beta = None
        if beta is not None:
            d = vec.add_(vec.neg(grad), state["d"], beta)
            if vec.dot(grad, d) < -self.tolerance_change:  # a descent direction
                state["since_restart"] = state.get("since_restart", 0) + 1
                return d
        if not first:
            state["restarts"] += 1
        state["since_restart"] = 0
        return vec.neg(grad)

    def initial_step(self, state: dict[str, Any], grad: Vector, gtd: Tensor, value: float, first: bool,
                     lr: float) -> Scalar:
        if first:
            return vec.first_step(grad, lr)
        prev_value, prev_t = state.get("prev_loss"), state.get("t")
        if prev_value is not None:
            # the minimizer of the quadratic with φ(0), φ'(0) whose decrease is the last one (N&W §3.5)
            guess = 1.01 * 2 * (value - prev_value) / float(gtd)
            if math.isfinite(guess) and guess > 0:
                return min(lr, guess)
        return prev_t if prev_t is not None and prev_t > 0 else vec.first_step(grad, lr)

    def stalled(self, state: dict[str, Any]) -> bool:
        """The line search found no lower point: retry along −g unless d already was −g."""
        if state.get("since_restart", 0) == 0:
            return False
        state["force_restart"] = True
        return True


class _FixedStepCGRule(CGRule):
    """Without a line search, every step is lr (the first lr·min(1, 1/‖g‖₁))."""

    def initial_step(self, state: dict[str, Any], grad: Vector, gtd: Tensor, value: float, first: bool,
                     lr: float) -> Scalar:
        return vec.first_step(grad, lr) if first else lr


def conjugate_gradient(objective: Objective, state: dict[str, Any], *, lr: float, beta: str, max_iter: int,
                       max_eval: int, tolerance_grad: float, tolerance_change: float, line_search_fn: str | None,
                       restart: str | None = "powell", restart_every: int | None = None, c1: float = 1e-4,
                       c2: float = 0.1, callback: IterationCallback | None = None,
                       name: str = "ConjugateGradient") -> tuple[dict[str, Any], Outcome]:
    """Functional nonlinear CG: up to ``max_iter`` iterations on ``objective``, from ``state``.

    ``state`` is not modified; the new state is returned with the :class:`~descend.solvers.closure.Outcome`.
    Its keys: ``func_evals``, ``n_iter``, ``d``, ``t``, ``prev_flat_grad``, ``prev_loss``,
    ``since_restart``, ``restarts`` (and ``restart`` after a failure on non-finite values).
    """
    rule_type = CGRule if line_search_fn is not None else _FixedStepCGRule
    rule = rule_type(beta, restart, restart_every, tolerance_change)
    new_state, outcome = iterate(objective, state, rule, lr=lr, max_iter=max_iter, max_eval=max_eval,
                                 tolerance_grad=tolerance_grad, tolerance_change=tolerance_change,
                                 line_search_fn=line_search_fn, c1=c1, c2=c2, callback=callback, name=name)
    return new_state, outcome


class ConjugateGradient(ClosureSolver):
    r"""Nonlinear conjugate gradient with a strong Wolfe line search, over any parameter groups.

    Args:
        params: tensors, parameter-group dicts, or ``(name, tensor)`` pairs.
        lr: the first trial step's scale (lr·min(1, 1/‖g‖₁) on the first iteration) and the
            largest first trial step after it; the step of every iteration without a line search
            (default 1).
        beta: ``"FR"``, ``"PR"``, ``"PR+"`` (default), ``"HS"``, ``"DY"`` or ``"HZ"``.
        max_iter: most iterations per ``step`` (default 20).
        max_eval: most closure evaluations per ``step`` (default ``max_iter * 5 // 4``).
        tolerance_grad: stop when every gradient component is at most this in size (default 1e-7).
        tolerance_change: stop when the step or the change in objective is below this (default 1e-9).
        line_search_fn: ``"strong_wolfe"`` (default) or ``None`` (fixed steps of lr).
        restart: ``"powell"`` (default: restart when |g_{k+1}ᵀg_k| ≥ 0.2‖g_{k+1}‖²) or ``None``.
        restart_every: restart every this many iterations (default None: never on a count).
        c1, c2: the constants of the strong Wolfe conditions (default 1e-4 and 0.1).
        weight_decay: λ ≥ 0, per group: the objective gains λ/2·‖θ‖² (default 0).
        decay: ``"coupled"`` only (weight decay is part of the objective).
        maximize: maximize the closure's loss instead of minimizing it.
        nonfinite: ``"ignore"`` (default), ``"skip"`` or ``"raise"`` for a non-finite gradient at
            the step's starting point (see :class:`~descend.solvers.closure.ClosureSolver`).
        process_group: DDP: None (default, no reduction), True or ``"default"`` (the default
            group) or a process group: the closure's loss is averaged over it, so the ranks take
            the same decisions. DTensor (FSDP2) parameters need nothing: the loss is averaged
            over their mesh.

    The formulas, restarts and step rule are in the docstring of :mod:`descend.solvers.cg`.
    """

    _shared = ClosureSolver._shared + ("beta", "restart", "restart_every")
    _vector_keys = ("d", "prev_flat_grad")
    state_spec = StateSpec.untyped("func_evals", "n_iter", "d", "t", "prev_flat_grad", "prev_loss", "since_restart", "restarts",
                   "force_restart", "restart")
    _group_keys = ("beta", "restart", "max_iter", "line_search_fn")

    def __init__(self, params: Any, lr: float | Tensor = 1, beta: str = "PR+", max_iter: int = 20,
                 max_eval: int | None = None, tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9,
                 line_search_fn: str | None = "strong_wolfe", restart: str | None = "powell", *,
                 restart_every: int | None = None, c1: float = 1e-4, c2: float = 0.1, weight_decay: float = 0,
                 decay: str = "coupled", l1: float = 0, maximize: bool = False,
                 nonfinite: str = "ignore", process_group: Any = None) -> None:
        defaults = dict(lr=lr, beta=beta, max_iter=max_iter, max_eval=max_eval, tolerance_grad=tolerance_grad,
                        tolerance_change=tolerance_change, line_search_fn=line_search_fn, restart=restart,
                        restart_every=restart_every, c1=c1, c2=c2, weight_decay=weight_decay, decay=decay, l1=l1,
                        maximize=maximize)
        super().__init__(params, defaults, nonfinite=nonfinite, process_group=process_group)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        if group["beta"] not in BETAS:
            raise invalid("beta", group["beta"], ", ".join(repr(b) for b in BETAS))
        if group["restart"] not in RESTARTS:
            raise invalid("restart", group["restart"], "'powell' or None")
        if group["restart_every"] is not None:
            check_int("restart_every", group["restart_every"], 1)

    def _solve(self, objective: Objective, state: dict[str, Any], settings: dict[str, Any],
               callback: IterationCallback | None) -> tuple[dict[str, Any], Outcome]:
        return conjugate_gradient(objective, state, lr=settings["lr"], beta=settings["beta"],
                                  max_iter=settings["max_iter"], max_eval=settings["max_eval"],
                                  tolerance_grad=settings["tolerance_grad"],
                                  tolerance_change=settings["tolerance_change"],
                                  line_search_fn=settings["line_search_fn"], restart=settings["restart"],
                                  restart_every=settings["restart_every"], c1=settings["c1"], c2=settings["c2"],
                                  callback=callback, name=type(self).__name__)


#: short name
CG = ConjugateGradient
