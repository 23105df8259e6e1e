r"""The strong Wolfe line search shared by :class:`descend.LBFGS` and :class:`descend.ConjugateGradient`.

Along a descent direction d from x, with φ(t) = f(x + t·d) and φ'(t) = ∇f(x + t·d)ᵀd,
it looks for a step t > 0 that satisfies the strong Wolfe conditions

.. math::
   \phi(t) \le \phi(0) + c_1\,t\,\phi'(0) \qquad\text{(sufficient decrease, Armijo)}\\
   |\phi'(t)| \le -c_2\,\phi'(0) \qquad\text{(curvature)}

with 0 < c₁ < c₂ < 1 (Nocedal & Wright, *Numerical Optimization*, 2nd ed., §3.1, Alg. 3.5
and 3.6). It runs in two phases:

1. **Bracketing.** Try t; if it violates sufficient decrease, or is no lower than the previous
   trial, or φ' has turned non-negative, the interval between the previous trial and t holds
   a Wolfe point. If t satisfies both conditions, stop. Otherwise extrapolate: the next trial is
   the minimizer of the cubic through the last two trials (values and slopes), clamped to
   [t + 0.01·(t − t_prev), 10·t].
2. **Zoom.** Shrink the bracket with cubic interpolation (moved to 0.1·width from an end when
   it lands too close to one twice in a row) until a trial satisfies both conditions, the
   bracket is shorter than ``tolerance_change`` (measured as width·‖d‖_∞), or the budget of
   ``max_ls`` evaluations is spent. The lowest point of the bracket is returned.

This is the algorithm of ``torch.optim.LBFGS`` (itself minFunc's and torch7's ``lswolfe``),
quirks included, so that L-BFGS with torch's settings reproduces torch's runs; the only
departure is for values that torch would turn into NaN parameters:

**Non-finite values.** A trial point where φ or φ' is inf or NaN is never accepted and never
interpolated through. During bracketing the search steps back to the midpoint between the
last finite trial and the failed one, and later extrapolations stay short of it; during zoom
the failed point becomes the upper end of the bracket and the next trial is the midpoint. If
the budget runs out without a finite improvement, the result is the last finite trial
(t = 0, the start, if there is none) and ``nonfinite`` counts the failures, so the caller
can warn.

With ``c2 < 1/2`` the strong Wolfe conditions make every Fletcher–Reeves direction a descent
direction (Nocedal & Wright, Lemma 5.6); :class:`descend.ConjugateGradient` uses ``c2=0.1``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from descend.solvers import closure as vec
from descend.solvers.closure import Scalar, Vector

__all__ = ["strong_wolfe", "cubic_minimizer", "LineSearchResult", "move", "iterate", "DirectionRule"]


def _finite(*values: Scalar) -> bool:
    return all(vec.is_finite(v) for v in values)


def _finite_point(f: float, g: Vector) -> bool:
    return vec.is_finite(f) and vec.is_finite(vec.max_abs(g))


def cubic_minimizer(x1: Scalar, f1: Scalar, g1: Scalar, x2: Scalar, f2: Scalar, g2: Scalar,
                    bounds: tuple[Scalar, Scalar] | None = None) -> Scalar:
    r"""The minimizer of the cubic through (x₁, f₁) and (x₂, f₂) with slopes g₁, g₂, clamped to ``bounds``.

    .. math::
       d_1 = g_1 + g_2 - 3\frac{f_1 - f_2}{x_1 - x_2},\quad d_2 = \sqrt{d_1^2 - g_1 g_2},\quad
       x = x_2 - (x_2 - x_1)\frac{g_2 + d_2 - d_1}{g_2 - g_1 + 2 d_2}

    (for x₁ ≤ x₂; symmetric otherwise). ``bounds`` default to [min(x₁, x₂), max(x₁, x₂)]; the
    midpoint of the bounds is returned when the cubic has no minimizer (d₁² < g₁g₂) or a
    value, or the result, is not finite.
    """
    if bounds is not None:
        lo, hi = bounds
    else:
        lo, hi = (x1, x2) if x1 <= x2 else (x2, x1)
    if not _finite(f1, g1, f2, g2):
        return (lo + hi) / 2.0
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1**2 - g1 * g2
    if not d2_square >= 0:
        return (lo + hi) / 2.0
    d2 = d2_square.sqrt() if isinstance(d2_square, Tensor) else math.sqrt(d2_square)
    if x1 <= x2:
        x = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
    else:
        x = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
    if not vec.is_finite(x):  # overflow in the terms (huge but finite values): bisect
        return (lo + hi) / 2.0
    return min(max(x, lo), hi)


@dataclass
class LineSearchResult:
    """The accepted step: φ(t), ∇f there, t, closure evaluations spent, non-finite trials met."""

    value: float
    grad: Vector
    t: Scalar
    evaluations: int
    nonfinite: int = 0


def strong_wolfe(phi: Callable[[Scalar], tuple[float, Vector]], t: Scalar, d: Vector, f: float, g: Vector,
                 gtd: Tensor, *, c1: float = 1e-4, c2: float = 0.9, tolerance_change: float = 1e-9,
                 max_ls: int = 25) -> LineSearchResult:
    """Strong Wolfe line search (see the module docstring).

    Args:
        phi: ``phi(t)`` returns (f(x + t·d), ∇f(x + t·d)) and leaves the parameters at x.
        t: the first trial step.
        d: the search direction (a descent direction: ``gtd < 0``).
        f, g, gtd: f(x), ∇f(x) and ∇f(x)ᵀd.
        c1, c2: the sufficient-decrease and curvature constants, 0 < c1 < c2 < 1.
        tolerance_change: the zoom phase stops when the bracket's width times ‖d‖_∞ is below it.
        max_ls: the most evaluations of ``phi`` to spend (at least 1).
    """
    d_norm = vec.max_abs(d)
    g = vec.clone(g)
    f_new, g_new = phi(t)
    evals = 1
    gtd_new = vec.dot(g_new, d)
    nonfinite = 0
    t_bad: Scalar | None = None  # the smallest step known to give a non-finite value

    t_prev: Scalar = 0
    f_prev, g_prev, gtd_prev = f, g, gtd
    done = False
    ls_iter = 0
    # step lengths and slopes are Python numbers or 0-dim tensors, as torch's arithmetic makes them
    bracket: list[Any] = []
    bracket_f: list[float] = []
    bracket_g: list[Vector] = []
    bracket_gtd: list[Any] = []
    while ls_iter < max_ls:
        if not _finite(f_new, gtd_new):
            # step back towards the last finite trial
            nonfinite += 1
            t_bad = t
            t = t_prev + (t - t_prev) / 2
        else:
            if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
                bracket, bracket_f = [t_prev, t], [f_prev, f_new]
                bracket_g, bracket_gtd = [g_prev, vec.clone(g_new)], [gtd_prev, gtd_new]
                break
            if abs(gtd_new) <= -c2 * gtd:
                bracket, bracket_f, bracket_g = [t], [f_new], [g_new]
                done = True
                break
            if gtd_new >= 0:
                bracket, bracket_f = [t_prev, t], [f_prev, f_new]
                bracket_g, bracket_gtd = [g_prev, vec.clone(g_new)], [gtd_prev, gtd_new]
                break
            # extrapolate
            min_step = t + 0.01 * (t - t_prev)
            max_step = t * 10
            if t_bad is not None:
                max_step = min(max_step, t + (t_bad - t) / 2)
            t_old = t
            t = cubic_minimizer(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(min_step, max_step))
            t_prev, f_prev, g_prev, gtd_prev = t_old, f_new, vec.clone(g_new), gtd_new
        f_new, g_new = phi(t)
        evals += 1
        gtd_new = vec.dot(g_new, d)
        ls_iter += 1

    if ls_iter == max_ls:
        if _finite(f_new, gtd_new):
            bracket, bracket_f, bracket_g = [0, t], [f, f_new], [g, g_new]
        else:  # out of budget at a non-finite point: fall back on the last finite trial
            nonfinite += 1
            bracket, bracket_f, bracket_g = [t_prev, t], [f_prev, math.inf], [g_prev, g_new]

    # zoom: refine the bracket until a point satisfies the strong Wolfe conditions
    insufficient_progress = False
    low, high = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:
        if abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:
            break
        t = cubic_minimizer(bracket[0], bracket_f[0], bracket_gtd[0], bracket[1], bracket_f[1], bracket_gtd[1])
        # keep trials away from the ends of the bracket: move to 0.1·width from the nearer end
        # when the interpolant lands at an end, or near one twice in a row
        b_max, b_min = max(bracket), min(bracket)
        eps = 0.1 * (b_max - b_min)
        if min(b_max - t, t - b_min) < eps:
            if insufficient_progress or t >= b_max or t <= b_min:
                t = b_max - eps if abs(t - b_max) < abs(t - b_min) else b_min + eps
                insufficient_progress = False
            else:
                insufficient_progress = True
        else:
            insufficient_progress = False

        f_new, g_new = phi(t)
        evals += 1
        gtd_new = vec.dot(g_new, d)
        ls_iter += 1

        if not _finite(f_new, gtd_new):
            nonfinite += 1
            bracket[high], bracket_f[high], bracket_g[high], bracket_gtd[high] = t, math.inf, g_new, math.nan
            low, high = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        elif f_new > (f + c1 * t * gtd) or f_new >= bracket_f[low]:
            # no sufficient decrease, or not below the low end: t is the new high end
            bracket[high], bracket_f[high], bracket_g[high], bracket_gtd[high] = t, f_new, vec.clone(g_new), gtd_new
            low, high = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True
            elif gtd_new * (bracket[high] - bracket[low]) >= 0:
                # the old low end becomes the high end
                bracket[high], bracket_f[high] = bracket[low], bracket_f[low]
                bracket_g[high], bracket_gtd[high] = bracket_g[low], bracket_gtd[low]
            # t is the new low end
            bracket[low], bracket_f[low], bracket_g[low], bracket_gtd[low] = t, f_new, vec.clone(g_new), gtd_new

    return LineSearchResult(bracket_f[low], bracket_g[low], bracket[low], evals, nonfinite)


@dataclass
class StepResult:
    """Where a move along d ended: φ and ∇φ there (``known`` False when not evaluated), the step
    length, the evaluations spent, and ``failed`` when no finite point was found (the parameters
    are then back where the move began)."""

    value: float
    grad: Vector
    t: Scalar
    evaluations: int
    known: bool = True
    failed: bool = False


def move(objective: vec.Objective, d: Vector, t: Scalar, f: float, g: Vector, gtd: Tensor, *,
         line_search_fn: str | None, c1: float, c2: float, tolerance_change: float, budget: int,
         evaluate: bool = True) -> StepResult:
    """θ ← θ + t·d, with t from :func:`strong_wolfe` (``line_search_fn="strong_wolfe"``) or fixed.

    A fixed step is evaluated at its end unless ``evaluate`` is False (torch's L-BFGS skips the
    evaluation on the last iteration of a call); where that value is not finite, the step is
    halved until it is or ``budget`` evaluations are spent.
    """
    space = objective.space
    x_init = space.save()
    if line_search_fn is not None:
        r = strong_wolfe(lambda step: objective.at(x_init, step, d), t, d, f, g, gtd, c1=c1, c2=c2,
                         tolerance_change=tolerance_change, max_ls=budget)
        failed = r.nonfinite > 0 and not r.t > 0
        if not failed:
            space.add_(r.t, d)
        return StepResult(r.value, r.grad, r.t, r.evaluations, failed=failed)
    space.add_(t, d)
    if not evaluate:
        return StepResult(f, g, t, 0, known=False)
    _, f_new, g_new = objective()
    evals = 1
    while not _finite_point(f_new, g_new) and evals < budget:
        t = t / 2  # step back
        space.restore(x_init)
        space.add_(t, d)
        _, f_new, g_new = objective()
        evals += 1
    if not _finite_point(f_new, g_new):
        space.restore(x_init)
        return StepResult(f, g, 0, evals, failed=True)
    return StepResult(f_new, g_new, t, evals)


# --- the descent loop shared by L-BFGS and conjugate gradient ----------------------------


def stop_reason(*, n_iter: int, max_iter: int, evals: int, max_eval: int, grad_max: Tensor, tolerance_grad: float,
                d: Vector, t: Scalar, value: float, prev_value: float, tolerance_change: float,
                known: bool) -> str | None:
    """The stopping tests of ``torch.optim.LBFGS``, in its order: why to stop, or None."""
    if n_iter == max_iter:
        return "tolerance_grad" if known and grad_max <= tolerance_grad else "max_iter"
    if evals >= max_eval:
        return "tolerance_grad" if known and grad_max <= tolerance_grad else "max_eval"
    if grad_max <= tolerance_grad:
        return "tolerance_grad"
    if vec.max_abs(vec.mul(d, t)) <= tolerance_change:
        return "tolerance_change" if t > 0 else "line_search"
    if abs(value - prev_value) < tolerance_change:
        return "tolerance_change"
    return None


class DirectionRule(Protocol):
    """What distinguishes one descent method from another in :func:`iterate`."""

    def direction(self, state: dict[str, Any], grad: Vector, first: bool) -> Vector:
        """The search direction at a point with gradient ``grad``. ``state`` still holds the
        previous iteration's ``d``, ``t``, ``prev_flat_grad`` and ``prev_loss``; the rule may keep
        its own entries there (replacing, never mutating, what it finds)."""

    def initial_step(self, state: dict[str, Any], grad: Vector, gtd: Tensor, value: float, first: bool,
                     lr: float) -> Scalar:
        """The first trial step along the direction (``state`` as for :meth:`direction`)."""

    def stalled(self, state: dict[str, Any]) -> bool:
        """The line search found no lower point along the direction: return True to go on
        (the rule then chooses another direction), False to stop."""


def iterate(objective: vec.Objective, state: dict[str, Any], rule: DirectionRule, *, lr: float, max_iter: int,
            max_eval: int, tolerance_grad: float, tolerance_change: float, line_search_fn: str | None,
            c1: float, c2: float, callback: vec.IterationCallback | None = None,
            name: str = "optimizer") -> tuple[dict[str, Any], vec.Outcome]:
    """Up to ``max_iter`` iterations of a line-search descent method, torch's L-BFGS loop.

    Evaluate at the current point; stop at once if ‖g‖_∞ ≤ ``tolerance_grad``. Then per
    iteration: d from ``rule``, stop if gᵀd > −``tolerance_change``, :func:`move` along d,
    then the tests of :func:`stop_reason`. ``state`` is not modified; the new state (with
    ``func_evals``, ``n_iter``, ``d``, ``t``, ``prev_flat_grad``, ``prev_loss``, the rule's own
    entries, and ``restart`` after a failure on non-finite values) is returned.
    """
    state = dict(state)
    state.setdefault("func_evals", 0)
    state.setdefault("n_iter", 0)

    orig_loss, loss, flat_grad = objective()
    current_evals = 1
    state["func_evals"] += 1
    grad_max = vec.max_abs(flat_grad)
    if not _finite_point(loss, flat_grad):
        warnings.warn(f"{name}: the closure returned a non-finite loss or gradient at the current parameters; "
                      "nothing was changed", RuntimeWarning, stacklevel=5)
        return state, vec.Outcome(orig_loss, "nonfinite", loss, flat_grad, 0, current_evals)
    if grad_max <= tolerance_grad:
        return state, vec.Outcome(orig_loss, "tolerance_grad", loss, flat_grad, 0, current_evals)

    fresh = bool(state.pop("restart", False)) or state.get("d") is None or state.get("prev_flat_grad") is None
    reason = "max_iter"
    known = True  # whether loss and flat_grad are those of the current parameters
    n_iter = 0
    while n_iter < max_iter:
        n_iter += 1
        state["n_iter"] += 1
        first = state["n_iter"] == 1 or fresh
        fresh = False
        d = rule.direction(state, flat_grad, first)
        gtd = vec.dot(flat_grad, d)
        t = rule.initial_step(state, flat_grad, gtd, loss, first, lr)
        state.update(d=d, t=t, prev_flat_grad=vec.clone(flat_grad), prev_loss=loss)
        prev_loss = loss
        if gtd > -tolerance_change:
            reason = "no_descent"
            break

        step = move(objective, d, t, loss, flat_grad, gtd, line_search_fn=line_search_fn, c1=c1, c2=c2,
                    tolerance_change=tolerance_change, budget=max_eval - current_evals, evaluate=n_iter != max_iter)
        current_evals += step.evaluations
        state["func_evals"] += step.evaluations
        loss, flat_grad, t, known = step.value, step.grad, step.t, step.known
        state["t"] = t
        if step.failed:
            state["restart"] = True
            reason = "nonfinite"
            warnings.warn(f"{name}: the closure returned a non-finite loss or gradient at every point tried along "
                          "the search direction; the parameters were left where the iteration began, and the next "
                          "step restarts from steepest descent", RuntimeWarning, stacklevel=5)
            break
        if known:
            grad_max = vec.max_abs(flat_grad)
        if callback is not None and callback(loss if known else None, flat_grad if known else None, n_iter,
                                            current_evals):
            reason = "callback"
            break
        stop = stop_reason(n_iter=n_iter, max_iter=max_iter, evals=current_evals, max_eval=max_eval,
                           grad_max=grad_max, tolerance_grad=tolerance_grad, d=d, t=t, value=loss,
                           prev_value=prev_loss, tolerance_change=tolerance_change, known=known)
        if stop == "line_search" and rule.stalled(state):
            continue
        if stop is not None:
            reason = stop
            break

    return state, vec.Outcome(orig_loss, reason, loss if known else None, flat_grad if known else None, n_iter,
                              current_evals)
