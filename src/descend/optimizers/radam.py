r"""RAdam (Liu et al. 2020, "On the Variance of the Adaptive Learning Rate and Beyond"): Adam whose
adaptive step is switched on only once the variance of its second moment is tractable, and rectified.

.. math::
   \begin{aligned}
   &g_t \leftarrow \pm\nabla f(\theta_{t-1}) \quad(\text{minus when maximizing})\\
   &\textbf{coupled: } g_t \leftarrow g_t + \lambda\theta_{t-1} + \lambda_1\,\mathrm{sgn}(\theta_{t-1})
    \qquad \textbf{decoupled modes: } \theta_{t-1} \leftarrow \theta_{t-1}(1 - s\lambda)\\
   &m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
    v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \qquad \hat m_t \leftarrow m_t/(1-\beta_1^t)\\
   &\rho_\infty \leftarrow 2/(1-\beta_2) - 1, \qquad
    \rho_t \leftarrow \rho_\infty - 2t\beta_2^t/(1-\beta_2^t)\\
   &\textbf{if } \rho_t > 5:\quad r_t \leftarrow
    \sqrt{\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}},\qquad
    \theta_t \leftarrow \theta_{t-1} - \gamma\,\hat m_t\, r_t\,\frac{\sqrt{1-\beta_2^t}}{\sqrt{v_t} + \epsilon}\\
   &\textbf{else:}\quad \theta_t \leftarrow \theta_{t-1} - \gamma\,\hat m_t\\
   &\textbf{decoupled L1: } \theta_t \leftarrow \mathrm{sgn}(\theta_t)\max(|\theta_t| - s\lambda_1, 0)
   \end{aligned}

with γ = lr, m = ``exp_avg`` and v = ``exp_avg_sq`` (zeros at first), t = ``step`` and s the
decoupled scale of :mod:`descend.regularization`. ρ_t is the length of the simple moving average
that v_t approximates; while it is short (ρ_t ≤ 5: the first few steps at β₂ = 0.999) the variance
of 1/√v is unbounded, and the step is plain bias-corrected momentum. After that, r_t scales the
adaptive step down to the variance it would have with ρ_∞ samples; r_t → 1 as t grows.

torch's ``decoupled_weight_decay=True`` multiplies θ by 1 − γλ before the update: that is
``decay="decoupled"``, and either spelling is accepted. Its default (False) adds λθ to the
gradient after the sign of ``maximize``: ``decay="coupled"``, the pipeline's coupled term. The
per-tensor form and the foreach form order their operations as torch's same forms do (the
foreach form builds the per-element factor √(1−β₂ᵗ)·r_t/(√v + ε) as a reciprocal). A complex
parameter is stepped as its real and imaginary parts, as torch does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from descend import dispatch
from descend.optimizer import GroupBatch
from descend.optimizers.adam import check_betas
from descend.optimizers.nadam import TorchDecoupledFlag, resolve_decay, scalar_dtype
from descend.state import SCALAR, Entry, StateSpec
from descend.tensors import count_step_
from descend.validation import check_number

__all__ = ["RAdam", "radam"]

STATE = StateSpec((
    Entry("step", SCALAR, low=0, device="cpu"),
    Entry("exp_avg"),
    Entry("exp_avg_sq", low=0),
))


def radam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
          steps: list[Tensor], *, lr: float | Tensor, beta1: float, beta2: float, eps: float,
          implementation: str = "single") -> None:
    """Functional RAdam over lists of tensors (the rule alone: regularization and maximize are the
    pipeline's; state updated in place, ``steps`` incremented)."""
    impl = {"single": _single_tensor_radam, "foreach": _multi_tensor_radam}[implementation]
    # a tensor lr stays one (as a scalar): torch's foreach form computes its step sizes with it
    lr = lr.reshape(()) if isinstance(lr, Tensor) else float(lr)
    impl(params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr, beta1=float(beta1), beta2=float(beta2),
         eps=float(eps))


def _rho(beta2: float, step: float) -> tuple[float, float]:
    """(ρ_∞, ρ_t)."""
    rho_inf = 2 / (1 - beta2) - 1
    return rho_inf, rho_inf - 2 * step * (beta2**step) / (1 - beta2**step)


def _rectification(rho_inf: float, rho_t: float) -> float:
    """r_t (for ρ_t > 5)."""
    return float(((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5)


def _single_tensor_radam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                         exp_avg_sqs: list[Tensor], steps: list[Tensor], *, lr: float | Tensor, beta1: float,
                         beta2: float, eps: float) -> None:
    """The reference: one tensor at a time, each line a line of the math above."""
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        if torch.is_complex(param):
            param, grad = torch.view_as_real(param), torch.view_as_real(grad)
            exp_avg, exp_avg_sq = torch.view_as_real(exp_avg), torch.view_as_real(exp_avg_sq)
        step_t += 1
        step = float(step_t.item())
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_corrected_exp_avg = exp_avg / (1 - beta1**step)
        bias_correction2 = 1 - beta2**step
        rho_inf, rho_t = _rho(beta2, step)
        if rho_t > 5.0:
            adaptive_lr = (bias_correction2**0.5) / exp_avg_sq.sqrt().add_(eps)
            param.add_(bias_corrected_exp_avg * lr * adaptive_lr * _rectification(rho_inf, rho_t), alpha=-1.0)
        else:
            param.add_(bias_corrected_exp_avg * lr, alpha=-1.0)


def _multi_tensor_radam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                        exp_avg_sqs: list[Tensor], steps: list[Tensor], *, lr: float | Tensor, beta1: float,
                        beta2: float, eps: float) -> None:
    """The same rule with torch's multi-tensor (foreach) kernels, per device and dtype (never complex).

    Per tensor, θ += m·(1/(√v + ε)/a + b) with a = −γ·r_t·√(1−β₂ᵗ)/(1−β₁ᵗ) and b = 0 once ρ_t > 5, and
    a = 0 (1/∞ = 0), b = −γ/(1−β₁ᵗ) before: one expression for both branches. A tensor lr makes a and b
    0-dim tensors in its dtype, as torch's."""
    for (p, g, m, v, t), _ in dispatch.grouped([params, grads, exp_avgs, exp_avg_sqs, steps]):
        count_step_(t)
        step_values = [float(s.item()) for s in t]
        rects = []
        for s in step_values:
            rho_inf, rho_t = _rho(beta2, s)
            rects.append(_rectification(rho_inf, rho_t) if rho_t > 5 else 0.0)
        torch._foreach_lerp_(m, g, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, 1 - beta2)
        bias_corrections1 = [1 - beta1**s for s in step_values]
        plain_sizes = [(lr * (0 if rect > 0 else 1.0) / bc) * -1 for rect, bc in zip(rects, bias_corrections1)]
        adaptive_sizes = [((1 - beta2**s) ** 0.5) * (lr * rect / bc) * -1
                          for s, rect, bc in zip(step_values, rects, bias_corrections1)]
        factor = torch._foreach_sqrt(v)
        torch._foreach_add_(factor, eps)
        torch._foreach_div_(factor, adaptive_sizes)  # type: ignore[arg-type]
        torch._foreach_reciprocal_(factor)
        torch._foreach_add_(factor, plain_sizes)  # type: ignore[arg-type]
        torch._foreach_addcmul_(p, m, factor)


class RAdam(TorchDecoupledFlag):
    r"""RAdam (rectified Adam), maximize, and descend's regularization.

    Args:
        params: tensors, parameter-group dicts, or ``(name, tensor)`` pairs.
        lr: learning rate γ (default 1e-3).
        betas: (β₁, β₂), each in [0, 1) (default (0.9, 0.999)).
        eps: ε ≥ 0 added to the denominator (default 1e-8).
        weight_decay: λ ≥ 0 (default 0); see ``decay``.
        decoupled_weight_decay: torch's spelling of ``decay="decoupled"`` (default False: coupled).
        decay: ``"coupled"``, ``"decoupled"``, ``"independent"``, ``"fixed"`` or ``"corrected"``
            (default: what ``decoupled_weight_decay`` says); see :mod:`descend.regularization`.
        capturable, differentiable: only False (torch's defaults).
        foreach, maximize, l1, nonfinite, flat, warn: as for :class:`descend.SGD` (no fused form).

    The update rule is in the docstring of :mod:`descend.optimizers.radam`.
    """

    state_spec = STATE
    _fast_paths = ("foreach",)
    # a tensor lr stays one: torch's decoupled factor 1 − γλ and foreach step sizes are then tensors
    _tensor_lr_paths = ("single", "foreach")
    _group_keys = ("betas", "eps")

    def __init__(self, params: Any, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, decoupled_weight_decay: bool = False, *,
                 foreach: bool | None = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, decay: str | None = None, l1: float = 0, nonfinite: str = "ignore",
                 flat: bool = False, warn: bool = True) -> None:
        decay = resolve_decay(decoupled_weight_decay, decay)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decay == "decoupled", l1=l1, decay=decay, maximize=maximize,
                        foreach=foreach, capturable=capturable, differentiable=differentiable)
        super().__init__(params, defaults, nonfinite=nonfinite, warn=warn, flat=flat)

    def _new_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = super()._new_state(param, group)
        state["step"] = torch.tensor(0.0, dtype=scalar_dtype())
        return state

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_betas(group["betas"])
        check_number("eps", group["eps"], low=0)

    def _update(self, batch: GroupBatch, implementation: str) -> None:
        group = batch.group
        beta1, beta2 = group["betas"]
        radam(batch.params, batch.grads, batch.state_list("exp_avg"), batch.state_list("exp_avg_sq"),
              batch.state_list("step"), lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
              implementation=implementation)
