r"""Adamax (Kingma & Ba 2015, section 7.1): Adam with the infinity norm in place of the second moment.

.. math::
   \begin{aligned}
   &g_t \leftarrow \pm\nabla f(\theta_{t-1}) \quad(\text{minus when maximizing})\\
   &\textbf{coupled: } g_t \leftarrow g_t + \lambda\theta_{t-1} + \lambda_1\,\mathrm{sgn}(\theta_{t-1})
    \qquad \textbf{decoupled modes: } \theta_{t-1} \leftarrow \theta_{t-1}(1 - s\lambda)\\
   &m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t\\
   &u_t \leftarrow \max(\beta_2 u_{t-1},\ |g_t| + \epsilon)\\
   &\theta_t \leftarrow \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}\,\frac{m_t}{u_t}\\
   &\textbf{decoupled L1: } \theta_t \leftarrow \mathrm{sgn}(\theta_t)\max(|\theta_t| - s\lambda_1, 0)
   \end{aligned}

with γ = lr, m = ``exp_avg`` and u = ``exp_inf`` (both zeros at first), t = ``step`` and s the
decoupled scale of :mod:`descend.regularization`. u needs no bias correction (a maximum is not
biased towards its zero start), and ε inside the maximum keeps u > 0. With ``decay="coupled"``
(the default) this is ``torch.optim.Adamax``: torch adds λθ to the gradient after negating it
for maximize, the pipeline's coupled term. A complex parameter is stepped as its real and
imaginary parts (the maximum and |g| per part), as torch does.

torch's per-tensor form divides a tensor lr by 1 − β₁ᵗ in the tensor's dtype (float32 for
``torch.tensor(0.01)``), its foreach form in double precision; each form here does as torch's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from descend import dispatch
from descend.optimizer import GroupBatch, RegularizedOptimizer
from descend.optimizers.adam import check_betas
from descend.state import SCALAR, Entry, StateSpec
from descend.tensors import count_step_
from descend.validation import check_number, invalid

__all__ = ["Adamax", "adamax"]

STATE = StateSpec((
    Entry("step", SCALAR, low=0, device="cpu"),
    Entry("exp_avg"),
    Entry("exp_inf", low=0),
))


def adamax(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_infs: list[Tensor],
           steps: list[Tensor], *, lr: float | Tensor, beta1: float, beta2: float, eps: float,
           implementation: str = "single") -> None:
    """Functional Adamax over lists of tensors (the rule alone: regularization and maximize are the
    pipeline's; state updated in place, ``steps`` incremented)."""
    impl = {"single": _single_tensor_adamax, "foreach": _multi_tensor_adamax}[implementation]
    if isinstance(lr, Tensor):
        if implementation == "single" or dispatch.compiling():
            lr = lr.reshape(())  # a 1-element tensor lr as a scalar (same value and dtype)
        else:
            lr = float(lr)
    impl(params, grads, exp_avgs, exp_infs, steps, lr=lr, beta1=float(beta1), beta2=float(beta2), eps=float(eps))


def _single_tensor_adamax(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                          exp_infs: list[Tensor], steps: list[Tensor], *, lr: float | Tensor, beta1: float,
                          beta2: float, eps: float) -> None:
    """The reference: one tensor at a time, each line a line of the math above."""
    for param, grad, exp_avg, exp_inf, step in zip(params, grads, exp_avgs, exp_infs, steps, strict=True):
        step += 1
        if torch.is_complex(param):
            param, grad = torch.view_as_real(param), torch.view_as_real(grad)
            exp_avg, exp_inf = torch.view_as_real(exp_avg), torch.view_as_real(exp_inf)
        exp_avg.lerp_(grad, 1 - beta1)
        torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps), out=exp_inf)
        step_size = lr / (1 - beta1 ** float(step.item()))
        param.addcdiv_(exp_avg, exp_inf, value=-step_size)  # type: ignore[arg-type]


def _multi_tensor_adamax(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                         exp_infs: list[Tensor], steps: list[Tensor], *, lr: float | Tensor, beta1: float,
                         beta2: float, eps: float) -> None:
    """The same rule with torch's multi-tensor (foreach) kernels, per device and dtype (never complex)."""
    traced = dispatch.compiling()
    for (p, g, m, u, t), _ in dispatch.grouped([params, grads, exp_avgs, exp_infs, steps]):
        count_step_(t)
        torch._foreach_lerp_(m, g, 1 - beta1)
        torch._foreach_mul_(u, beta2)
        bound = torch._foreach_abs(g)
        torch._foreach_add_(bound, eps)
        torch._foreach_maximum_(u, bound)
        if traced:  # lr and the counts stay tensors: reading them would break the graph
            denom = torch._foreach_mul(u, [(beta1**s - 1) / lr for s in t])
            torch._foreach_addcdiv_(p, m, denom)
        else:
            step_sizes = [-lr / (1 - beta1 ** float(s.item())) for s in t]
            torch._foreach_addcdiv_(p, m, u, step_sizes)  # type: ignore[arg-type]


class Adamax(RegularizedOptimizer):
    r"""Adamax, maximize, and descend's regularization.

    Args:
        params: tensors, parameter-group dicts, or ``(name, tensor)`` pairs.
        lr: learning rate γ (default 2e-3).
        betas: (β₁, β₂), each in [0, 1) (default (0.9, 0.999)).
        eps: ε ≥ 0 inside the maximum (default 1e-8).
        weight_decay: λ ≥ 0 (default 0); see ``decay``.
        capturable: only False: descend keeps step counts on the host (no CUDA-graph capture).
        foreach, maximize, l1, nonfinite, flat, warn: as for :class:`descend.SGD` (no fused form).
        decay: ``"coupled"`` (default: torch's L2 ``weight_decay``), ``"decoupled"``,
            ``"independent"``, ``"fixed"`` or ``"corrected"``; see :mod:`descend.regularization`.

    The update rule is in the docstring of :mod:`descend.optimizers.adamax`.
    """

    state_spec = STATE
    _fast_paths = ("foreach",)
    _tensor_lr_paths = ("single",)
    _group_keys = ("betas", "eps")

    def __init__(self, params: Any, lr: float | Tensor = 2e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, foreach: bool | None = None, *,
                 maximize: bool = False, capturable: bool = False, decay: str = "coupled", l1: float = 0,
                 nonfinite: str = "ignore", flat: bool = False, warn: bool = True) -> None:
        if capturable is not False:
            raise invalid("capturable", capturable, "False: descend's Adamax keeps step counts on the host")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, l1=l1, decay=decay,
                        maximize=maximize, foreach=foreach)
        super().__init__(params, defaults, nonfinite=nonfinite, warn=warn, flat=flat)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_betas(group["betas"])
        check_number("eps", group["eps"], low=0)

    def _update(self, batch: GroupBatch, implementation: str) -> None:
        group = batch.group
        beta1, beta2 = group["betas"]
        adamax(batch.params, batch.grads, batch.state_list("exp_avg"), batch.state_list("exp_inf"),
               batch.state_list("step"), lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
               implementation=implementation)
