r"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): the sign of a momentum.

.. math::
   \begin{aligned}
   &g_t \leftarrow \pm\nabla f(\theta_{t-1}) \quad(\text{minus when maximizing})\\
   &\textbf{coupled: } g_t \leftarrow g_t + \lambda\theta_{t-1} + \lambda_1\,\mathrm{sgn}(\theta_{t-1})
    \qquad \textbf{decoupled modes: } \theta_{t-1} \leftarrow \theta_{t-1}(1 - s\lambda)\\
   &c_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t\\
   &\theta_t \leftarrow \theta_{t-1} - \gamma\,\mathrm{sign}(c_t)\\
   &m_t \leftarrow \beta_2 m_{t-1} + (1-\beta_2) g_t\\
   &\textbf{decoupled L1: } \theta_t \leftarrow \mathrm{sgn}(\theta_t)\max(|\theta_t| - s\lambda_1, 0)
   \end{aligned}

with γ = lr, m = ``exp_avg`` (zeros at first) and s the decoupled scale of :mod:`descend.regularization`.
The step interpolates with β₁, the memory with β₂ (the paper: β₂ > β₁). Each element moves by γ, or not at all
where c = 0 (sign(0) = 0: a zero gradient on zero momentum leaves θ to the regularization alone).
A complex parameter is stepped as its real and imaginary parts (``torch.view_as_real``), as torch.optim
steps complex parameters: the sign is per part (lion-pytorch's ``sgn_`` would take c/|c|).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from descend import dispatch
from descend.optimizer import GroupBatch, RegularizedOptimizer
from descend.optimizers.adam import check_betas
from descend.state import Entry, StateSpec

__all__ = ["Lion", "lion"]

STATE = StateSpec((Entry("exp_avg"),))


def lion(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], *, lr: float, beta1: float,
         beta2: float, implementation: str = "single") -> None:
    """Functional Lion over lists of tensors (the rule alone: regularization and maximize are the pipeline's)."""
    impl = {"single": _single_tensor_lion, "foreach": _multi_tensor_lion}[implementation]
    if not (implementation == "foreach" and isinstance(lr, Tensor) and dispatch.compiling()):
        lr = float(lr)  # (traced, a tensor lr stays one: float() of it would break the graph)
    impl(params, grads, exp_avgs, lr=lr, beta1=float(beta1), beta2=float(beta2))


def _single_tensor_lion(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], *, lr: float,
                        beta1: float, beta2: float) -> None:
    """The reference: one tensor at a time, each line a line of the math above."""
    for param, grad, exp_avg in zip(params, grads, exp_avgs, strict=True):
        if torch.is_complex(param):
            param, grad, exp_avg = torch.view_as_real(param), torch.view_as_real(grad), torch.view_as_real(exp_avg)
        update = torch.mul(exp_avg, beta1).add_(grad, alpha=1 - beta1).sign_()
        param.add_(update, alpha=-lr)
        exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)


def _multi_tensor_lion(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], *, lr: float | Tensor,
                       beta1: float, beta2: float) -> None:
    """The same rule with torch's multi-tensor (foreach) kernels, per device and dtype (never complex)."""
    for (p, g, m), _ in dispatch.grouped([params, grads, exp_avgs]):
        update = torch._foreach_mul(m, beta1)
        torch._foreach_add_(update, g, alpha=1 - beta1)
        torch._foreach_sign_(update)
        if isinstance(lr, Tensor):  # only while torch.compile traces the step (alpha takes a number)
            torch._foreach_mul_(update, -lr)
            torch._foreach_add_(p, update)
        else:
            torch._foreach_add_(p, update, alpha=-lr)
        torch._foreach_mul_(m, beta2)
        torch._foreach_add_(m, g, alpha=1 - beta2)


class Lion(RegularizedOptimizer):
    r"""Lion (EvoLved Sign Momentum), maximize, and descend's regularization.

    Args:
        params: tensors, parameter-group dicts, or ``(name, tensor)`` pairs.
        lr: learning rate γ (default 1e-4).
        betas: (β₁, β₂), each in [0, 1) (default (0.9, 0.99)).
        weight_decay: λ ≥ 0 (default 0); see ``decay``.
        l1: λ₁ ≥ 0, L1 regularization (default 0).
        decay: ``"decoupled"`` (default), ``"independent"``, ``"fixed"``, ``"corrected"`` or ``"coupled"``.
        maximize, foreach, nonfinite, flat, warn, rounding, state_dtype: as for :class:`descend.SGD`
            (no fused form).

    lion-pytorch's default decay, θ·(1 − lr·λ), is ``decay="decoupled"``; its
    ``decoupled_weight_decay=True``, θ·(1 − (lr/lr₀)·λ), is ``decay="independent"``. Since a sign
    update is larger in norm than Adam's, the paper advises an lr 3–10× smaller than AdamW's and
    a λ 3–10× larger, so that the decoupled decay lr·λ stays about the same.

    The update rule is in the docstring of :mod:`descend.optimizers.lion`.
    """

    state_spec = STATE
    _fast_paths = ("foreach",)
    _group_keys = ("betas",)

    def __init__(self, params: Any, lr: float | Tensor = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, decay: str = "decoupled", l1: float = 0, maximize: bool = False,
                 foreach: bool | None = None, nonfinite: str = "ignore", flat: bool = False,
                 warn: bool = True, rounding: str = "nearest",
                 state_dtype: Any = None) -> None:
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, l1=l1, decay=decay, maximize=maximize,
                        foreach=foreach)
        super().__init__(params, defaults, nonfinite=nonfinite, warn=warn, flat=flat, rounding=rounding,
                         state_dtype=state_dtype)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_betas(group["betas"])

    def _update(self, batch: GroupBatch, implementation: str) -> None:
        beta1, beta2 = batch.group["betas"]
        lion(batch.params, batch.grads, batch.state_list("exp_avg"), lr=batch.group["lr"], beta1=beta1,
             beta2=beta2, implementation=implementation)
