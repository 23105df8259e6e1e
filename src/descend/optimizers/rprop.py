r"""Rprop (Riedmiller & Braun 1993, "A Direct Adaptive Method for Faster Backpropagation Learning"):
a step size per element, grown while the gradient keeps its sign and cut when it flips.

.. math::
   \begin{aligned}
   &g_t \leftarrow \pm\nabla f(\theta_{t-1}) \quad(\text{minus when maximizing})\\
   &\textbf{coupled: } g_t \leftarrow g_t + \lambda\theta_{t-1} + \lambda_1\,\mathrm{sgn}(\theta_{t-1})
    \qquad \textbf{decoupled modes: } \theta_{t-1} \leftarrow \theta_{t-1}(1 - s\lambda)\\
   &\eta_t \leftarrow \mathrm{clamp}\bigl(\eta_{t-1}\cdot
    \begin{cases}\eta_+ & g_t\,g_{t-1} > 0\\ \eta_- & g_t\,g_{t-1} < 0\\ 1 & \text{otherwise}\end{cases},
    \ \Gamma_{\min},\ \Gamma_{\max}\bigr)\\
   &g_t \leftarrow 0 \ \text{where}\ g_t\,g_{t-1} < 0\\
   &\theta_t \leftarrow \theta_{t-1} - \eta_t\,\mathrm{sign}(g_t), \qquad g_{\mathrm{prev}} \leftarrow g_t\\
   &\textbf{decoupled L1: } \theta_t \leftarrow \mathrm{sgn}(\theta_t)\max(|\theta_t| - s\lambda_1, 0)
   \end{aligned}

with (η₋, η₊) = ``etas``, (Γ_min, Γ_max) = ``step_sizes``, η = ``step_size`` (lr at the first step,
per element), g_prev = ``prev`` (zeros at first), t = ``step`` and s the decoupled scale of
:mod:`descend.regularization`. Only the sign of the gradient moves θ; its size is ignored. An
element whose gradient just flipped sign takes no step and forgets its gradient (g_prev = 0), so
that its next step neither grows nor cuts its step size (Rprop⁻ with backtracking left out).

lr is read once, as the initial step size; later changes to it (LR schedulers) change only
the decoupled decay modes' scale s. torch's Rprop has no weight decay: descend's
``weight_decay=0`` with ``decay="coupled"`` (the defaults) is torch's Rprop exactly, and with a
λ the coupled term λθ changes the gradient's sign where it is small. A complex parameter is
stepped as its real and imaginary parts, as torch does.
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
from descend.validation import check_number, invalid, scalar_value

__all__ = ["Rprop", "rprop"]

STATE = StateSpec((
    Entry("step", SCALAR, low=0, device="cpu"),
    Entry("prev"),
    # the lr at the first step, not zeros: made by the class (_new_state)
    Entry("step_size", init=None, low=0),
))


def rprop(params: list[Tensor], grads: list[Tensor], prevs: list[Tensor], step_sizes: list[Tensor],
          steps: list[Tensor], *, etaminus: float, etaplus: float, step_size_min: float, step_size_max: float,
          implementation: str = "single") -> None:
    """Functional Rprop over lists of tensors (the rule alone: regularization and maximize are the
    pipeline's; state updated in place, ``steps`` incremented)."""
    impl = {"single": _single_tensor_rprop, "foreach": _multi_tensor_rprop}[implementation]
    impl(params, grads, prevs, step_sizes, steps, etaminus=float(etaminus), etaplus=float(etaplus),
         step_size_min=float(step_size_min), step_size_max=float(step_size_max))


def _factors_(signs: Tensor, etaminus: float, etaplus: float) -> None:
    """sign(g_t·g_{t−1}) in place → η₊ where +1, η₋ where −1, 1 where 0."""
    signs[signs.gt(0)] = etaplus
    signs[signs.lt(0)] = etaminus
    signs[signs.eq(0)] = 1


def _single_tensor_rprop(params: list[Tensor], grads: list[Tensor], prevs: list[Tensor], step_sizes: list[Tensor],
                         steps: list[Tensor], *, etaminus: float, etaplus: float, step_size_min: float,
                         step_size_max: float) -> None:
    """The reference: one tensor at a time, each line a line of the math above."""
    for param, grad, prev, step_size, step in zip(params, grads, prevs, step_sizes, steps, strict=True):
        step += 1
        if torch.is_complex(param):
            param, grad = torch.view_as_real(param), torch.view_as_real(grad)
            prev, step_size = torch.view_as_real(prev), torch.view_as_real(step_size)
        factors = grad.mul(prev).sign()
        _factors_(factors, etaminus, etaplus)
        step_size.mul_(factors).clamp_(step_size_min, step_size_max)
        grad = grad.clone(memory_format=torch.preserve_format)  # (never the caller's gradient)
        grad[factors.eq(etaminus)] = 0
        param.addcmul_(grad.sign(), step_size, value=-1)
        prev.copy_(grad)


def _multi_tensor_rprop(params: list[Tensor], grads: list[Tensor], prevs: list[Tensor], step_sizes: list[Tensor],
                        steps: list[Tensor], *, etaminus: float, etaplus: float, step_size_min: float,
                        step_size_max: float) -> None:
    """The same rule with torch's multi-tensor (foreach) kernels, per device and dtype (never complex).
    g_t is written into g_prev at once, and zeroed there where its sign flipped."""
    for (p, g, prev, sizes, t), _ in dispatch.grouped([params, grads, prevs, step_sizes, steps]):
        count_step_(t)
        factors = torch._foreach_mul(g, prev)
        torch._foreach_copy_(prev, g)
        torch._foreach_sign_(factors)
        for f in factors:
            _factors_(f, etaminus, etaplus)
        torch._foreach_mul_(sizes, factors)
        for size in sizes:
            size.clamp_(step_size_min, step_size_max)
        for f, kept in zip(factors, prev, strict=True):
            kept.copy_(torch.where(f.eq(etaminus), 0, kept))
        del factors
        torch._foreach_addcmul_(p, [kept.sign() for kept in prev], sizes, value=-1)


def check_etas(etas: Any) -> None:
    """0 < η₋ < 1 < η₊, in torch's words ("Invalid eta values: 1.0, 0.5")."""
    if not isinstance(etas, (tuple, list)) or len(etas) != 2:
        raise invalid("etas", etas, "a pair (etaminus, etaplus)")
    for i in (0, 1):
        check_number(f"etas[{i}]", etas[i], low=-math.inf)  # a real number; its range in torch's words below
    if not 0.0 < scalar_value(etas[0]) < 1.0 < scalar_value(etas[1]):
        raise invalid("etas", etas, "a pair (etaminus, etaplus) with 0 < etaminus < 1 < etaplus")


def check_step_sizes(step_sizes: Any) -> None:
    """0 ≤ Γ_min ≤ Γ_max (torch does not check them; a clamp with min > max would pin every step size to max)."""
    if not isinstance(step_sizes, (tuple, list)) or len(step_sizes) != 2:
        raise invalid("step_sizes", step_sizes, "a pair (min, max)")
    for i in (0, 1):
        check_number(f"step_sizes[{i}]", step_sizes[i], low=0)
    if scalar_value(step_sizes[0]) > scalar_value(step_sizes[1]):
        raise invalid("step_sizes", step_sizes, "a pair (min, max) with 0 <= min <= max")


class Rprop(RegularizedOptimizer):
    r"""Rprop (resilient backpropagation), maximize, and descend's regularization.

    Args:
        params: tensors, parameter-group dicts, or ``(name, tensor)`` pairs.
        lr: the initial step size of every element (default 1e-2).
        etas: (η₋, η₊) with 0 < η₋ < 1 < η₊, the factors that cut and grow step sizes (default (0.5, 1.2)).
        step_sizes: (Γ_min, Γ_max), the bounds of the step sizes (default (1e-6, 50)).
        weight_decay: λ ≥ 0 (default 0: torch's Rprop, which has none); see ``decay``.
        decay: ``"coupled"`` (default), ``"decoupled"``, ``"independent"``, ``"fixed"`` or
            ``"corrected"``; see :mod:`descend.regularization`.
        capturable, differentiable: only False (torch's defaults).
        foreach, maximize, l1, nonfinite, flat, warn: as for :class:`descend.SGD` (no fused form).

    The update rule is in the docstring of :mod:`descend.optimizers.rprop`.
    """

    state_spec = STATE
    _fast_paths = ("foreach",)
    _group_keys = ("etas", "step_sizes")

    def __init__(self, params: Any, lr: float | Tensor = 1e-2, etas: tuple[float, float] = (0.5, 1.2),
                 step_sizes: tuple[float, float] = (1e-6, 50), *, capturable: bool = False,
                 foreach: bool | None = None, maximize: bool = False, differentiable: bool = False,
                 weight_decay: float = 0, decay: str = "coupled", l1: float = 0, nonfinite: str = "ignore",
                 flat: bool = False, warn: bool = True) -> None:
        defaults = dict(lr=lr, etas=etas, step_sizes=step_sizes, weight_decay=weight_decay, l1=l1, decay=decay,
                        foreach=foreach, maximize=maximize, differentiable=differentiable, capturable=capturable)
        super().__init__(params, defaults, nonfinite=nonfinite, warn=warn, flat=flat)

    def _new_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = super()._new_state(param, group)
        lr = scalar_value(group["lr"])
        return {"step": torch.tensor(0.0, dtype=scalar_dtype()), "prev": state["prev"],
                "step_size": torch.full_like(param, complex(lr, lr) if param.is_complex() else lr,
                                             memory_format=torch.preserve_format)}

    def _check_group(self, group: dict[str, Any]) -> None:
        check_etas(group["etas"])
        check_step_sizes(group["step_sizes"])
        check_torch_only_flags(group, "Rprop")

    def _update(self, batch: GroupBatch, implementation: str) -> None:
        group = batch.group
        etaminus, etaplus = group["etas"]
        step_size_min, step_size_max = group["step_sizes"]
        rprop(batch.params, batch.grads, batch.state_list("prev"), batch.state_list("step_size"),
              batch.state_list("step"), etaminus=etaminus, etaplus=etaplus, step_size_min=step_size_min,
              step_size_max=step_size_max, implementation=implementation)
