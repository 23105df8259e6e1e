r"""Adafactor (Shazeer & Stern 2018) as torch.optim.Adafactor computes it: a second moment
kept as row and column factors for matrices, a step size relative to the parameter's RMS.

.. math::
   \begin{aligned}
   &g_t \leftarrow \pm\nabla f(\theta_{t-1})\ (\text{minus when maximizing}),\qquad
    \textbf{coupled: } g_t \leftarrow g_t + \lambda\theta_{t-1} + \lambda_1\,\mathrm{sgn}(\theta_{t-1})\\
   &\hat\beta_{2,t} = 1 - t^{\tau},\qquad \rho_t = \min(\gamma, 1/\sqrt t),\qquad
    \alpha_t = \max(\epsilon_2, \mathrm{RMS}(\theta_{t-1}))\,\rho_t\\
   &\textbf{decoupled modes: } \theta_{t-1} \leftarrow \theta_{t-1}(1 - s\lambda)\\
   &\dim\theta > 1:\ R_t \leftarrow \hat\beta_{2,t}R_{t-1} + (1-\hat\beta_{2,t})\,\mathrm{mean}_{-1}(g_t^2),\quad
    C_t \leftarrow \hat\beta_{2,t}C_{t-1} + (1-\hat\beta_{2,t})\,\mathrm{mean}_{-2}(g_t^2),\quad
    \hat V_t = \frac{R_t C_t}{\max(\mathrm{mean}_{-2}(R_t), \epsilon_1)}\\
   &\dim\theta \le 1:\ \hat V_t \leftarrow \hat\beta_{2,t}\hat V_{t-1} + (1-\hat\beta_{2,t})\,g_t^2\\
   &U_t = g_t / \sqrt{\max(\hat V_t, \epsilon_1^2)},\qquad
    \theta_t \leftarrow \theta_{t-1} - \frac{\alpha_t}{\max(1, \mathrm{RMS}(U_t)/d)}\,U_t\\
   &\textbf{decoupled L1: } \theta_t \leftarrow \mathrm{sgn}(\theta_t)\max(|\theta_t| - s\lambda_1, 0)
   \end{aligned}

with γ = lr, τ = ``beta2_decay``, (ε₁, ε₂) = ``eps`` (ε₁ = None: the machine epsilon of θ's
dtype), d the clipping threshold and s the decoupled scale of :mod:`descend.regularization`.
R_t C_t is a (batched) outer product over θ's last two dimensions. ``decay="decoupled"``, the
default, is torch's θ·(1 − lr·λ). α_t is taken at θ_{t-1} *before* decay shrinks it, as torch
does: :meth:`Adafactor._inspect` reads RMS(θ_{t-1}) before the pipeline's "regularize before".

Departures from torch, where torch fails or depends on parameter order: a parameter with no
elements only counts its step (torch divides by its size, 0), and ε₁ = None takes each
parameter's own dtype (torch takes the first parameter's for the whole group).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import Tensor

from descend.optimizer import GroupBatch, RegularizedOptimizer
from descend.state import COL_FACTOR, ROW_FACTOR, SCALAR, Entry, StateSpec
from descend.tensors import count_step_, grouped_by_device_and_dtype
from descend.validation import check_number, invalid

__all__ = ["Adafactor", "adafactor"]


def _factored(param: Tensor, group: dict[str, Any]) -> bool:
    return param.dim() > 1


STATE = StateSpec((
    Entry("step", SCALAR, device="cpu", low=0),  # on the CPU, as torch keeps it
    Entry("row_var", ROW_FACTOR, when=_factored, low=0),
    Entry("col_var", COL_FACTOR, when=_factored, low=0),
    Entry("variance", when=lambda p, g: not _factored(p, g), low=0),
))


def adafactor(params: list[Tensor], grads: list[Tensor], row_vars: list[Tensor | None], col_vars: list[Tensor | None],
              variances: list[Tensor | None], steps: list[Tensor], rms: list[float], *, lr: float | Tensor,
              beta2_decay: float, eps1: float | None, eps2: float, d: float, implementation: str = "single") -> None:
    """Functional Adafactor over lists of tensors (the rule alone: regularization is the pipeline's);
    ``rms`` holds RMS(θ_{t-1}) of each parameter, taken before decay; state updated in place.
    A tensor lr stays a tensor, as in torch (ρ_t and α_t are then tensors in its dtype)."""
    if isinstance(lr, Tensor) and lr.dim() != 0:
        lr = lr.reshape(())
    keep = [p.numel() > 0 for p in params]
    for step, kept in zip(steps, keep, strict=True):
        if not kept:
            step.add_(1)  # nothing to update, and no RMS to divide by
    lists: list[list[Any]] = [params, grads, row_vars, col_vars, variances, steps, rms]
    if not all(keep):
        lists = [list(itertools.compress(xs, keep)) for xs in lists]
    impl = {"single": _single_tensor_adafactor, "foreach": _multi_tensor_adafactor}[implementation]
    impl(*lists, lr=lr, beta2_decay=beta2_decay, eps1=eps1, eps2=eps2, d=d)


def _single_tensor_adafactor(params: list[Tensor], grads: list[Tensor], row_vars: list[Tensor],
                             col_vars: list[Tensor], variances: list[Tensor], steps: list[Tensor], rms: list[float],
                             *, lr: float | Tensor, beta2_decay: float, eps1: float | None, eps2: float,
                             d: float) -> None:
    """The reference: one tensor at a time, each line a line of the math above."""
    for i, param in enumerate(params):
        grad = grads[i]
        steps[i] += 1
        t = steps[i].item()
        one_minus_beta2 = t**beta2_decay
        alpha = max(eps2, rms[i]) * min(lr, 1 / t**0.5)
        e1 = torch.finfo(param.dtype).eps if eps1 is None else eps1
        if grad.dim() > 1:
            row_var, col_var = row_vars[i], col_vars[i]
            # mean(g², dim) as a norm, without a θ-sized g² (as torch)
            row_var.lerp_(torch.norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1)), one_minus_beta2)
            col_var.lerp_(torch.norm(grad, dim=-2, keepdim=True).square_().div_(grad.size(-2)), one_minus_beta2)
            v = (row_var @ col_var).div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=e1))
        else:
            v = variances[i].lerp_(grad * grad, one_minus_beta2).clone()
        update = v.clamp_(min=e1 * e1).rsqrt_().mul_(grad)
        clip = max(1.0, update.norm(2).item() / (update.numel() ** 0.5 * d))
        param.add_(update, alpha=-alpha / clip)


def _multi_tensor_adafactor(params: list[Tensor], grads: list[Tensor], row_vars: list[Tensor],
                            col_vars: list[Tensor], variances: list[Tensor], steps: list[Tensor], rms: list[float],
                            *, lr: float | Tensor, beta2_decay: float, eps1: float | None, eps2: float,
                            d: float) -> None:
    """The same rule with torch's multi-tensor (foreach) kernels, per device, dtype and factoring."""
    for (p_all, g_all, s_all), indices in grouped_by_device_and_dtype([params, grads, steps]):
        for factored in (True, False):
            pick = [j for j, g in enumerate(g_all) if (g.dim() > 1) == factored]
            if not pick:
                continue
            p, g, s = [p_all[j] for j in pick], [g_all[j] for j in pick], [s_all[j] for j in pick]
            where = [indices[j] for j in pick]
            count_step_(s)
            ts = [x.item() for x in s]
            one_minus_beta2 = [t**beta2_decay for t in ts]
            alphas = [max(eps2, rms[i]) * min(lr, 1 / t**0.5) for i, t in zip(where, ts)]
            e1 = torch.finfo(p[0].dtype).eps if eps1 is None else eps1
            if factored:
                rows, cols = [row_vars[i] for i in where], [col_vars[i] for i in where]
                for factor, dim in ((rows, -1), (cols, -2)):
                    means = [torch.norm(x, dim=dim, keepdim=True) for x in g]
                    torch._foreach_mul_(means, means)
                    torch._foreach_div_(means, [x.size(dim) for x in g])
                    torch._foreach_lerp_(factor, means, one_minus_beta2)
                v = [r @ c for r, c in zip(rows, cols)]
                row_means = [r.mean(dim=-2, keepdim=True) for r in rows]
                torch._foreach_clamp_min_(row_means, e1)
                torch._foreach_div_(v, row_means)
            else:
                var = [variances[i] for i in where]
                torch._foreach_lerp_(var, torch._foreach_mul(g, g), one_minus_beta2)
                v = [x.clone() for x in var]
            torch._foreach_clamp_min_(v, e1 * e1)
            torch._foreach_rsqrt_(v)
            torch._foreach_mul_(v, g)
            torch._foreach_mul_(v, [-a / max(1.0, u.norm(2).item() / (u.numel() ** 0.5 * d))
                                    for a, u in zip(alphas, v)])
            torch._foreach_add_(p, v)


class Adafactor(RegularizedOptimizer):
    r"""Adafactor with descend's regularization; ``torch.optim.Adafactor`` with the defaults.

    Args:
        params: tensors, parameter-group dicts, or ``(name, tensor)`` pairs; real only.
        lr: γ ≥ 0, the largest relative step size ρ_t and the scale of decoupled decay (default 1e-2).
        beta2_decay: τ ≤ 0, with 1 − β̂₂,t = t^τ (default -0.8).
        eps: (ε₁, ε₂): ε₁ None (θ's machine epsilon) or ≥ 0 bounds the second moment below;
            ε₂ ≥ 0 the RMS the step size is relative to (default (None, 1e-3)).
        d: the update clipping threshold, ≥ 1 (default 1).
        weight_decay: λ ≥ 0 (default 0); see ``decay``.
        foreach: True for the multi-tensor form; by default (None), or False, the per-tensor
            one, as torch, whose foreach form holds θ-sized temporaries for every tensor at once.
        maximize: maximize the objective instead of minimizing it.
        decay: ``"decoupled"`` (default, torch's), ``"coupled"``, ``"independent"``, ``"fixed"``
            or ``"corrected"``; see :mod:`descend.regularization`.
        l1: λ₁ ≥ 0, L1 regularization (default 0).
        nonfinite, warn: as for :class:`descend.SGD`.

    No fused form and no flat storage: the factored moments are not one value per element.
    The update rule is in the docstring of :mod:`descend.optimizers.adafactor`.
    """

    state_spec = STATE
    _fast_paths = ("foreach",)
    _tensor_lr_paths = ("single", "foreach")  # torch computes ρ_t, α_t and 1 − lr·λ with a tensor lr
    _group_keys = ("beta2_decay", "eps", "d")
    _steps_complex = False

    def __init__(self, params: Any, lr: float | Tensor = 1e-2, beta2_decay: float = -0.8,
                 eps: tuple[float | None, float] = (None, 1e-3), d: float = 1.0, weight_decay: float = 0.0, *,
                 foreach: bool | None = None, maximize: bool = False, decay: str = "decoupled", l1: float = 0,
                 nonfinite: str = "ignore", warn: bool = True) -> None:
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay, foreach=foreach,
                        maximize=maximize, decay=decay, l1=l1)
        super().__init__(params, defaults, nonfinite=nonfinite, warn=warn)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_number("beta2_decay", group["beta2_decay"], low=-math.inf, high=0, high_open=False)
        eps = group["eps"]
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise invalid("eps", eps, "a pair (eps1, eps2)")
        # (torch's words: "epsilon1 should be >= 0 but is: -1e-30")
        try:
            if eps[0] is not None:
                check_number("eps[0]", eps[0], low=0)
        except ValueError:
            raise invalid("eps[0]", eps[0], "None or a number >= 0") from None
        check_number("eps[1]", eps[1], low=0)
        check_number("d", group["d"], low=1)

    def _prepare(self) -> list[GroupBatch]:
        batches = super()._prepare()
        for batch in batches:  # a parameter made complex since it was added: refused before anything changes
            for p in batch.params:
                if p.is_complex():
                    raise RuntimeError(f"Adafactor does not support complex parameters ({self._describe_param(p)} "
                                       f"is complex); nothing was changed")
        return batches

    def _implementation(self, batch: GroupBatch) -> str:
        if batch.group.get("foreach") is None:
            return "single"  # torch's default for Adafactor, which is used where memory is short
        return super()._implementation(batch)

    def _inspect(self, batch: GroupBatch) -> None:
        batch.inspected = [p.norm(2).item() / p.numel() ** 0.5 if p.numel() else 0.0 for p in batch.params]

    def _update(self, batch: GroupBatch, implementation: str) -> None:
        group = batch.group
        eps1, eps2 = group["eps"]
        adafactor(batch.params, batch.grads, batch.state_list("row_var"), batch.state_list("col_var"),
                  batch.state_list("variance"), batch.state_list("step"), batch.inspected,
                  lr=group["lr"], beta2_decay=group["beta2_decay"], eps1=eps1, eps2=eps2, d=group["d"],
                  implementation=implementation)
