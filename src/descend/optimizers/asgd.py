r"""ASGD (Polyak & Juditsky 1992, "Acceleration of Stochastic Approximation by Averaging"): SGD with
a decaying step, and the running average of its iterates.

.. math::
   \begin{aligned}
   &g_t \leftarrow \pm\nabla f(\theta_{t-1}) \quad(\text{minus when maximizing})\\
   &\textbf{coupled: } g_t \leftarrow g_t + \lambda\theta_{t-1} + \lambda_1\,\mathrm{sgn}(\theta_{t-1})
    \qquad \textbf{decoupled modes: } \theta_{t-1} \leftarrow \theta_{t-1}(1 - s\lambda)\\
   &\theta_t \leftarrow \theta_{t-1}(1 - \lambda_d\eta_{t-1}) - \eta_{t-1} g_t\\
   &\bar\theta_t \leftarrow \bar\theta_{t-1} + \mu_{t-1}(\theta_t - \bar\theta_{t-1})\\
   &\eta_t \leftarrow \gamma/(1 + \lambda_d\gamma t)^{\alpha}, \qquad \mu_t \leftarrow 1/\max(1, t - t_0)\\
   &\textbf{decoupled L1: } \theta_t \leftarrow \mathrm{sgn}(\theta_t)\max(|\theta_t| - s\lambda_1, 0)
   \end{aligned}

with γ = lr, λ_d = ``lambd``, η = ``eta`` (γ at first), μ = ``mu`` (1 at first), θ̄ = ``ax`` (zeros
at first), t = ``step`` and s the decoupled scale of :mod:`descend.regularization`. The step
η_t decays as t^−α (α = 3/4: slower than 1/t, as averaging needs), and the average starts at
t₀: until then μ = 1 and θ̄ just follows θ, after it θ̄ is the mean of the iterates since t₀.
θ̄ is what the method returns; the optimizer steps θ and keeps θ̄ in its state.

``lambd`` is the rule's own shrink of θ by 1 − λ_d·η (part of the algorithm, applied by the rule in
every decay mode), not descend's ``weight_decay``: torch's ``weight_decay`` adds λθ to the gradient
after the sign of ``maximize``, ``decay="coupled"``, the pipeline's coupled term.

η, μ and t are scalars on θ's device, float32 (float64 under a float64 default dtype), as torch
keeps them. The per-tensor form shrinks θ and then subtracts η·g, the foreach form subtracts
η·(g + λ_dθ) (the same math, rounded otherwise), and the foreach form computes η_t in the dtype of
the step count; each does as torch's same form.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from descend import dispatch
from descend.optimizer import GroupBatch, RegularizedOptimizer
from descend.optimizers.nadam import check_torch_only_flags, scalar_dtype
from descend.state import SCALAR, Entry, StateSpec
from descend.tensors import count_step_
from descend.validation import check_number, scalar_value

__all__ = ["ASGD", "asgd"]

STATE = StateSpec((
    Entry("step", SCALAR, low=0),
    # η starts at lr and μ at 1: made by the class (_new_state)
    Entry("eta", SCALAR, init=None, low=0),
    Entry("mu", SCALAR, init=None, low=0),
    Entry("ax"),
))


def asgd(params: list[Tensor], grads: list[Tensor], axs: list[Tensor], mus: list[Tensor], etas: list[Tensor],
         steps: list[Tensor], *, lr: float | Tensor, lambd: float, alpha: float, t0: float,
         implementation: str = "single") -> None:
    """Functional ASGD over lists of tensors (the rule alone: regularization and maximize are the
    pipeline's; state updated in place, ``steps`` incremented)."""
    impl = {"single": _single_tensor_asgd, "foreach": _multi_tensor_asgd}[implementation]
    # a tensor lr stays one (as a scalar): torch computes η_t with it, in its dtype
    lr = lr.reshape(()) if isinstance(lr, Tensor) else float(lr)
    impl(params, grads, axs, mus, etas, steps, lr=lr, lambd=float(lambd), alpha=float(alpha), t0=float(t0))


def _single_tensor_asgd(params: list[Tensor], grads: list[Tensor], axs: list[Tensor], mus: list[Tensor],
                        etas: list[Tensor], steps: list[Tensor], *, lr: float | Tensor, lambd: float,
                        alpha: float, t0: float) -> None:
    """The reference: one tensor at a time, each line a line of the math above."""
    for param, grad, ax, mu, eta, step_t in zip(params, grads, axs, mus, etas, steps, strict=True):
        if torch.is_complex(param):
            param, grad, ax = torch.view_as_real(param), torch.view_as_real(grad), torch.view_as_real(ax)
        step_t += 1
        eta_value = float(eta.item())
        param.mul_(1 - lambd * eta_value)
        param.add_(grad, alpha=-eta_value)
        if mu.item() != 1:
            ax.add_(param.sub(ax).mul_(mu))
        else:
            ax.copy_(param)  # (exactly θ while μ = 1: no rounding of θ̄ + (θ − θ̄))
        step = float(step_t.item())
        eta.copy_(torch.as_tensor(lr / ((1 + lambd * lr * step) ** alpha)))
        mu.copy_(torch.as_tensor(1 / max(1, step - t0)))


def _multi_tensor_asgd(params: list[Tensor], grads: list[Tensor], axs: list[Tensor], mus: list[Tensor],
                       etas: list[Tensor], steps: list[Tensor], *, lr: float | Tensor, lambd: float,
                       alpha: float, t0: float) -> None:
    """The same rule with torch's multi-tensor (foreach) kernels, per device and dtype (never complex)."""
    for (p, g, ax, mu, eta, t), _ in dispatch.grouped([params, grads, axs, mus, etas, steps]):
        device = p[0].device
        count_step_(t)
        direction = torch._foreach_add(g, p, alpha=lambd)
        torch._foreach_addcmul_(p, direction, eta, value=-1)
        del direction
        towards = torch._foreach_sub(p, ax)
        torch._foreach_addcmul_(ax, towards, mu)
        del towards
        # η_t from the count as a tensor (its dtype's rounding), μ_t from its value: as torch's foreach
        new_etas = [torch.as_tensor(lr / ((1 + lambd * lr * s) ** alpha), device=device) for s in t]
        new_mus = [torch.as_tensor(1 / max(1, float(s.item()) - t0), device=device) for s in t]
        torch._foreach_copy_(eta, new_etas)
        torch._foreach_copy_(mu, new_mus)


class ASGD(RegularizedOptimizer):
    r"""Averaged SGD, maximize, and descend's regularization.

    Args:
        params: tensors, parameter-group dicts, or ``(name, tensor)`` pairs.
        lr: learning rate γ (default 1e-2).
        lambd: λ_d ≥ 0, the rule's decay term in η and in θ's shrink (default 1e-4).
        alpha: α ≥ 0, the power of η's decay (default 0.75).
        t0: the step at which averaging starts (default 1e6).
        weight_decay: λ ≥ 0 (default 0); see ``decay``.
        decay: ``"coupled"`` (default: torch's L2 ``weight_decay``), ``"decoupled"``,
            ``"independent"``, ``"fixed"`` or ``"corrected"``; see :mod:`descend.regularization`.
        capturable, differentiable: only False (torch's defaults).
        foreach, maximize, l1, nonfinite, flat, warn: as for :class:`descend.SGD` (no fused form).

    The averaged parameters θ̄ are ``optimizer.state[p]["ax"]``. The update rule is in the
    docstring of :mod:`descend.optimizers.asgd`.
    """

    state_spec = STATE
    _fast_paths = ("foreach",)
    _tensor_lr_paths = ("single", "foreach")  # (η_t is computed with a tensor lr, as torch does)
    _group_keys = ("lambd", "alpha", "t0")

    def __init__(self, params: Any, lr: float | Tensor = 1e-2, lambd: float = 1e-4, alpha: float = 0.75,
                 t0: float = 1e6, weight_decay: float = 0, foreach: bool | None = None, maximize: bool = False,
                 differentiable: bool = False, capturable: bool = False, *, decay: str = "coupled", l1: float = 0,
                 nonfinite: str = "ignore", flat: bool = False, warn: bool = True) -> None:
        defaults = dict(lr=lr, lambd=lambd, alpha=alpha, t0=t0, weight_decay=weight_decay, l1=l1, decay=decay,
                        foreach=foreach, maximize=maximize, differentiable=differentiable, capturable=capturable)
        super().__init__(params, defaults, nonfinite=nonfinite, warn=warn, flat=flat)

    def _new_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = super()._new_state(param, group)
        dtype, device = scalar_dtype(), param.device
        return {"step": torch.zeros((), dtype=dtype, device=device),
                "eta": torch.tensor(scalar_value(group["lr"]), dtype=dtype, device=device),
                "mu": torch.ones((), dtype=dtype, device=device), "ax": state["ax"]}

    def _check_group(self, group: dict[str, Any]) -> None:
        check_number("lambd", group["lambd"], low=0)
        check_number("alpha", group["alpha"], low=0)
        check_number("t0", group["t0"], low=-math.inf)
        check_torch_only_flags(group, "ASGD")

    def _update(self, batch: GroupBatch, implementation: str) -> None:
        group = batch.group
        asgd(batch.params, batch.grads, batch.state_list("ax"), batch.state_list("mu"), batch.state_list("eta"),
             batch.state_list("step"), lr=group["lr"], lambd=group["lambd"], alpha=group["alpha"], t0=group["t0"],
             implementation=implementation)
