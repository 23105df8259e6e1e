r"""Adam and AdamW: one update rule, two sets of defaults.

.. math::
   \begin{aligned}
   &g_t \leftarrow \pm\nabla f(\theta_{t-1}) \quad(\text{minus when maximizing})\\
   &\textbf{coupled: } g_t \leftarrow g_t + \lambda\theta_{t-1} + \lambda_1\,\mathrm{sgn}(\theta_{t-1})
    \qquad \textbf{decoupled modes: } \theta_{t-1} \leftarrow \theta_{t-1}(1 - s\lambda)\\
   &m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
    v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2\\
   &\hat v_t \leftarrow \max(\hat v_{t-1}, v_t)\ (\text{amsgrad}), \qquad \hat v_t \leftarrow v_t\ (\text{otherwise})\\
   &\theta_t \leftarrow \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}\,
      \frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}\\
   &\textbf{decoupled L1: } \theta_t \leftarrow \mathrm{sgn}(\theta_t)\max(|\theta_t| - s\lambda_1, 0)
   \end{aligned}

with s the decoupled scale of :mod:`descend.regularization` (lr, lr/lr₀ or 1).

- ``Adam`` (``decay="coupled"``) is ``torch.optim.Adam``: L2 regularization, whose
  λθ term is divided by √v̂ like the rest of the gradient, so weights with large gradients
  are decayed less. That is why Adam+L2 is not AdamW.
- ``AdamW`` (``decay="decoupled"``, ``weight_decay=1e-2``) is ``torch.optim.AdamW``.
- The AdamW paper (Loshchilov & Hutter, Algorithm 2) decays by η_t·λ with η_t the schedule
  multiplier, not by α·η_t·λ: that is ``decay="independent"`` with the paper's λ, and equals
  torch's AdamW with ``weight_decay = λ/lr₀``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from descend import regularization
from descend.optimizer import (
    _IS_CPU,
    GroupBatch,
    RegularizedOptimizer,
    _allowed,
    check_flag,
    check_number,
    grouped_by_device_and_dtype,
)

__all__ = ["Adam", "AdamW", "adam"]


def adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    amsgrad: bool,
    maximize: bool,
    weight_decay: float,
    l1: float,
    decay: str,
    base_lr: float,
    implementation: str = "single",
) -> None:
    """Functional Adam over lists of tensors (state updated in place; ``steps`` are
    float32 scalar tensors, incremented here)."""
    impl = {"single": _single_tensor_adam, "foreach": _multi_tensor_adam, "fused": _fused_adam}[implementation]
    # A tensor lr stays a tensor where torch keeps it one (its step size is then computed in the
    # tensor's dtype, float32 for torch.tensor(0.01)): parity includes that rounding.
    impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr=lr, beta1=float(beta1),
         beta2=float(beta2), eps=eps, amsgrad=amsgrad, maximize=maximize, weight_decay=weight_decay, l1=l1,
         decay=decay, base_lr=base_lr)


def _single_tensor_adam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                        exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], steps: list[Tensor], *,
                        lr: float | Tensor, beta1: float, beta2: float, eps: float, amsgrad: bool, maximize: bool,
                        weight_decay: float, l1: float, decay: str, base_lr: float) -> None:
    """The reference: one tensor at a time, each line a line of the math above."""
    factor = regularization.decay_factor_as_torch(decay, lr, base_lr, weight_decay)
    threshold = regularization.l1_threshold(decay, lr, base_lr, l1)
    for i, original in enumerate(params):
        param = original
        grad = grads[i] if not maximize else -grads[i]
        exp_avg, exp_avg_sq = exp_avgs[i], exp_avg_sqs[i]
        max_exp_avg_sq = max_exp_avg_sqs[i] if amsgrad else None
        steps[i] += 1
        if decay == "coupled":
            grad = regularization.coupled_gradient(param, grad, weight_decay, l1)
        elif isinstance(factor, Tensor) or factor != 1.0:
            param.mul_(factor)
        if torch.is_complex(param):
            # the moments of a complex parameter are those of its real and imaginary parts
            param, grad = torch.view_as_real(param), torch.view_as_real(grad)
            exp_avg, exp_avg_sq = torch.view_as_real(exp_avg), torch.view_as_real(exp_avg_sq)
            if max_exp_avg_sq is not None:
                max_exp_avg_sq = torch.view_as_real(max_exp_avg_sq)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = float(steps[i].item())
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        if max_exp_avg_sq is not None:
            torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            denom = (max_exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        else:
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)  # type: ignore[arg-type]
        regularization.prox_l1_(original, threshold)


def _multi_tensor_adam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                       exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], steps: list[Tensor], *,
                       lr: float | Tensor, beta1: float, beta2: float, eps: float, amsgrad: bool, maximize: bool,
                       weight_decay: float, l1: float, decay: str, base_lr: float) -> None:
    """The same rule with torch's multi-tensor (foreach) kernels, per device and dtype."""
    lr = float(lr)
    factor = regularization.decay_factor(decay, lr, base_lr, weight_decay)
    threshold = regularization.l1_threshold(decay, lr, base_lr, l1)
    lists: list[list[Any]] = [params, grads, exp_avgs, exp_avg_sqs, steps]
    if amsgrad:
        lists.append(max_exp_avg_sqs)
    for tensors, _ in grouped_by_device_and_dtype(lists):
        p, g, m, v, t = tensors[:5]
        torch._foreach_add_(t, 1)
        if maximize:
            g = list(torch._foreach_neg(g))
        if decay == "coupled":
            g = regularization.coupled_gradients_(p, g, weight_decay, l1)
        else:
            regularization.decay_(p, factor)
        torch._foreach_lerp_(m, g, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, 1 - beta2)
        step_values = [float(s.item()) for s in t]
        neg_step_sizes = [-lr / (1 - beta1**s) for s in step_values]
        bias_correction2_sqrts = [(1 - beta2**s) ** 0.5 for s in step_values]
        if amsgrad:
            vmax = tensors[5]
            torch._foreach_maximum_(vmax, v)
            denom = torch._foreach_sqrt(vmax)
        else:
            denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bias_correction2_sqrts)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(p, m, denom, neg_step_sizes)
        regularization.prox_l1_foreach_(p, threshold)


def _fused_adam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], steps: list[Tensor], *,
                lr: float | Tensor, beta1: float, beta2: float, eps: float, amsgrad: bool, maximize: bool,
                weight_decay: float, l1: float, decay: str, base_lr: float) -> None:
    """torch's fused Adam/AdamW kernels. Coupled decay is the Adam kernel's own; every
    decoupled mode is the AdamW kernel's θ·(1 − lr·c) with c from
    :func:`descend.regularization.torch_decoupled_coefficient`."""
    threshold = regularization.l1_threshold(decay, lr, base_lr, l1)
    lists: list[list[Any]] = [params, grads, exp_avgs, exp_avg_sqs, steps]
    if amsgrad:
        lists.append(max_exp_avg_sqs)
    for tensors, _ in grouped_by_device_and_dtype(lists):
        p, g, m, v, t = tensors[:5]
        vmax = tensors[5] if amsgrad else []
        torch._foreach_add_(t, 1)
        if decay == "coupled":
            kernel = torch._fused_adam_
            coefficient = weight_decay
            if l1 != 0:
                # the kernel negates the gradient when maximizing; pre-negate the L1 term to match
                g = list(torch._foreach_add(g, torch._foreach_sign(p), alpha=-l1 if maximize else l1))
        else:
            kernel = torch._fused_adamw_
            c = regularization.torch_decoupled_coefficient(decay, lr, base_lr, weight_decay)
            if c is None:  # lr = 0: the kernel cannot express the factor, so apply it here
                regularization.decay_(p, regularization.decay_factor(decay, lr, base_lr, weight_decay))
                c = 0.0
            coefficient = c
        kernel(p, g, m, v, vmax, t, amsgrad=amsgrad, lr=lr, beta1=beta1, beta2=beta2,
               weight_decay=coefficient, eps=eps, maximize=maximize, grad_scale=None, found_inf=None)
        regularization.prox_l1_foreach_(p, threshold)


class Adam(RegularizedOptimizer):
    r"""Adam (Kingma & Ba), AMSGrad, maximize, and descend's regularization.

    Args:
        params: tensors, parameter-group dicts, or ``(name, tensor)`` pairs.
        lr: learning rate γ (default 1e-3).
        betas: (β₁, β₂), each in [0, 1) (default (0.9, 0.999)).
        eps: ε ≥ 0 added to the denominator (default 1e-8).
        weight_decay: λ ≥ 0 (default 0 for Adam, 1e-2 for AdamW); see ``decay``.
        amsgrad: use the running maximum of v (AMSGrad).
        l1: λ₁ ≥ 0, L1 regularization (default 0).
        decay: ``"coupled"`` (Adam's default: L2, torch's Adam), ``"decoupled"`` (AdamW's
            default: torch's AdamW), ``"independent"`` (the AdamW paper) or ``"fixed"``.
        maximize, foreach, fused, nonfinite, flat: as for :class:`descend.SGD`.

    The update rule is in the docstring of :mod:`descend.adam`.
    """

    _state_keys = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _group_keys = ("betas", "eps", "amsgrad")
    _required_state = ("step", "exp_avg", "exp_avg_sq")

    def __init__(self, params: Any, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, amsgrad: bool = False, *, l1: float = 0,
                 decay: str = "coupled", maximize: bool = False, foreach: bool | None = None,
                 fused: bool | None = None, nonfinite: str = "ignore", flat: bool = False) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, l1=l1,
                        decay=decay, maximize=maximize, foreach=foreach, fused=fused)
        check_flag("flat", flat)
        super().__init__(params, defaults, nonfinite=nonfinite)
        if flat:
            self._use_flat_storage()

    def _check_group(self, group: dict[str, Any]) -> None:
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise _allowed("betas", betas, "a pair (beta1, beta2)")
        for i in (0, 1):
            try:
                check_number(f"beta{i + 1}", betas[i], low=0, high=1)
            except ValueError:
                raise _allowed("betas", betas, f"beta{i + 1} = betas[{i}] a number in [0, 1)") from None
        check_number("eps", group["eps"], low=0)

    def _new_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = {
            # float32 on the parameter's device, as torch's fused Adam keeps it
            "step": torch.zeros((), dtype=torch.float32, device=param.device),
            "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
        }
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for entry in self.state.values():
            # torch < 1.12 saved the step count as a number; torch converts it on load, so do we
            if "step" in entry and not torch.is_tensor(entry["step"]):
                entry["step"] = torch.tensor(float(entry["step"]), dtype=torch.float32)

    def _update(self, batch: GroupBatch, implementation: str) -> None:
        group = batch.group
        if group["amsgrad"]:
            for state in batch.states:
                if "max_exp_avg_sq" not in state:  # amsgrad switched on later
                    state["max_exp_avg_sq"] = state["exp_avg_sq"].clone()
        if implementation == "fused":
            # torch's load_state_dict leaves step counts on the CPU; fused kernels want them
            # on the parameter's device (compared in bulk: .device builds an object per call)
            steps = batch.state_list("step")
            if not (all(map(_IS_CPU, batch.params)) and all(map(_IS_CPU, steps))):
                for p, state in zip(batch.params, batch.states, strict=True):
                    if state["step"].device != p.device:
                        state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
        beta1, beta2 = group["betas"]
        adam(batch.params, batch.grads, batch.state_list("exp_avg"), batch.state_list("exp_avg_sq"),
             batch.state_list("max_exp_avg_sq") if group["amsgrad"] else [], batch.state_list("step"),
             lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], amsgrad=group["amsgrad"],
             maximize=group["maximize"], weight_decay=group["weight_decay"], l1=group["l1"],
             decay=group["decay"], base_lr=group["base_lr"], implementation=implementation)


class AdamW(Adam):
    r"""Adam with decoupled weight decay: ``descend.Adam`` with defaults
    ``weight_decay=1e-2, decay="decoupled"`` (``torch.optim.AdamW``). Use
    ``decay="independent"`` for the AdamW paper's schedule-multiplier decay."""

    def __init__(self, params: Any, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, l1: float = 0,
                 decay: str = "decoupled", maximize: bool = False, foreach: bool | None = None,
                 fused: bool | None = None, nonfinite: str = "ignore", flat: bool = False) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, l1=l1,
                         decay=decay, maximize=maximize, foreach=foreach, fused=fused, nonfinite=nonfinite,
                         flat=flat)
