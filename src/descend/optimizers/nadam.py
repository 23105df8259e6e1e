r"""NAdam (Dozat 2016, "Incorporating Nesterov Momentum into Adam"): Adam with a Nesterov look-ahead.

.. math::
   \begin{aligned}
   &g_t \leftarrow \pm\nabla f(\theta_{t-1}) \quad(\text{minus when maximizing})\\
   &\textbf{coupled: } g_t \leftarrow g_t + \lambda\theta_{t-1} + \lambda_1\,\mathrm{sgn}(\theta_{t-1})
    \qquad \textbf{decoupled modes: } \theta_{t-1} \leftarrow \theta_{t-1}(1 - s\lambda)\\
   &\mu_t \leftarrow \beta_1\bigl(1 - \tfrac12\,0.96^{t\psi}\bigr), \qquad
    \mu_{t+1} \leftarrow \beta_1\bigl(1 - \tfrac12\,0.96^{(t+1)\psi}\bigr), \qquad
    \Pi_t \leftarrow \Pi_{t-1}\,\mu_t\\
   &m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
    v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2\\
   &d_t \leftarrow \sqrt{v_t/(1-\beta_2^t)} + \epsilon\\
   &\theta_t \leftarrow \theta_{t-1} - \gamma\,\frac{1-\mu_t}{1-\Pi_t}\,\frac{g_t}{d_t}
    - \gamma\,\frac{\mu_{t+1}}{1-\Pi_t\,\mu_{t+1}}\,\frac{m_t}{d_t}\\
   &\textbf{decoupled L1: } \theta_t \leftarrow \mathrm{sgn}(\theta_t)\max(|\theta_t| - s\lambda_1, 0)
   \end{aligned}

with γ = lr, ψ = ``momentum_decay``, Π = ``mu_product`` (1 at first), m = ``exp_avg`` and
v = ``exp_avg_sq`` (zeros at first), t = ``step`` and s the decoupled scale of
:mod:`descend.regularization`. The momentum coefficient μ_t warms up from β₁/2 towards β₁ (the
schedule of Dozat's paper), and Π_t, the product of all of them, is the bias correction of the
first moment. The update mixes the current gradient (weight 1 − μ_t) with the momentum seen one
step ahead (weight μ_{t+1}): Nesterov's look-ahead written without a second gradient.

torch's ``decoupled_weight_decay=True`` multiplies θ by 1 − γλ before the update: that is
``decay="decoupled"``, and either spelling is accepted. Its default (False) adds λθ to the
gradient after the sign of ``maximize``: ``decay="coupled"``, the pipeline's coupled term.
Π and t are float32 host scalars (float64 under a float64 default dtype), as torch keeps them; the
per-tensor form divides v by 1 − β₂ᵗ before the square root, the foreach form divides √v by
√(1 − β₂ᵗ), each as torch's same form does. A complex parameter is stepped as its real and
imaginary parts, as torch does.
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
from descend.validation import check_flag, check_number, invalid

__all__ = ["NAdam", "nadam", "TorchDecoupledFlag", "scalar_dtype"]

STATE = StateSpec((
    Entry("step", SCALAR, low=0, device="cpu"),
    # Π starts at 1, not 0: made by the class (_new_state)
    Entry("mu_product", SCALAR, init=None, low=0, device="cpu"),
    Entry("exp_avg"),
    Entry("exp_avg_sq", low=0),
))


def scalar_dtype() -> torch.dtype:
    """The dtype torch.optim keeps scalar state in: float64 under a float64 default dtype, else float32."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def nadam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
          mu_products: list[Tensor], steps: list[Tensor], *, lr: float | Tensor, beta1: float, beta2: float,
          eps: float, momentum_decay: float, implementation: str = "single") -> None:
    """Functional NAdam over lists of tensors (the rule alone: regularization and maximize are the
    pipeline's; state updated in place, ``steps`` incremented, ``mu_products`` multiplied by μ_t)."""
    impl = {"single": _single_tensor_nadam, "foreach": _multi_tensor_nadam}[implementation]
    # a tensor lr stays one (as a scalar): torch's per-tensor form computes its step sizes with it
    lr = lr.reshape(()) if isinstance(lr, Tensor) else float(lr)
    impl(params, grads, exp_avgs, exp_avg_sqs, mu_products, steps, lr=lr, beta1=float(beta1),
         beta2=float(beta2), eps=float(eps), momentum_decay=float(momentum_decay))


def _momentum_coefficient(beta1: float, step: float, momentum_decay: float) -> float:
    """μ_t = β₁(1 − ½·0.96^{tψ})."""
    return beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))


def _single_tensor_nadam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                         exp_avg_sqs: list[Tensor], mu_products: list[Tensor], steps: list[Tensor], *,
                         lr: float | Tensor, beta1: float, beta2: float, eps: float, momentum_decay: float) -> None:
    """The reference: one tensor at a time, each line a line of the math above (a tensor lr makes the
    two step sizes 0-dim tensors in its dtype, as torch's)."""
    for param, grad, exp_avg, exp_avg_sq, mu_product, step_t in zip(
            params, grads, exp_avgs, exp_avg_sqs, mu_products, steps, strict=True):
        if torch.is_complex(param):
            param, grad = torch.view_as_real(param), torch.view_as_real(grad)
            exp_avg, exp_avg_sq = torch.view_as_real(exp_avg), torch.view_as_real(exp_avg_sq)
        step_t += 1
        step = float(step_t.item())
        bias_correction2 = 1 - beta2**step
        mu = _momentum_coefficient(beta1, step, momentum_decay)
        mu_next = _momentum_coefficient(beta1, step + 1, momentum_decay)
        mu_product *= mu  # in the scalar's dtype, as torch
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = exp_avg_sq.div(bias_correction2).sqrt().add_(eps)
        product = float(mu_product.item())
        param.addcdiv_(grad, denom, value=-lr * (1.0 - mu) / (1.0 - product))  # type: ignore[arg-type]
        param.addcdiv_(exp_avg, denom, value=(-lr * mu_next) / (1.0 - product * mu_next))  # type: ignore[arg-type]


def _multi_tensor_nadam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                        exp_avg_sqs: list[Tensor], mu_products: list[Tensor], steps: list[Tensor], *,
                        lr: float | Tensor, beta1: float, beta2: float, eps: float, momentum_decay: float) -> None:
    """The same rule with torch's multi-tensor (foreach) kernels, per device and dtype (never complex;
    a tensor lr read as a number, as torch's foreach form reads it for the step sizes)."""
    lr = float(lr)
    for (p, g, m, v, products, t), _ in dispatch.grouped([params, grads, exp_avgs, exp_avg_sqs, mu_products, steps]):
        count_step_(t)
        torch._foreach_lerp_(m, g, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, 1 - beta2)
        denom = torch._foreach_sqrt(v)
        step_values = [float(s.item()) for s in t]
        mus = [_momentum_coefficient(beta1, s, momentum_decay) for s in step_values]
        mu_nexts = [_momentum_coefficient(beta1, s + 1, momentum_decay) for s in step_values]
        torch._foreach_mul_(products, mus)
        torch._foreach_div_(denom, [(1 - beta2**s) ** 0.5 for s in step_values])
        torch._foreach_add_(denom, eps)
        product_values = [float(x.item()) for x in products]
        grad_sizes = [(lr * (1.0 - mu) / (1.0 - pv)) * -1 for mu, pv in zip(mus, product_values, strict=True)]
        momentum_sizes = [(lr * mu_next / (1.0 - pv * mu_next)) * -1
                          for mu_next, pv in zip(mu_nexts, product_values, strict=True)]
        torch._foreach_addcdiv_(p, g, denom, grad_sizes)  # type: ignore[arg-type]
        torch._foreach_addcdiv_(p, m, denom, momentum_sizes)  # type: ignore[arg-type]


def check_torch_only_flags(group: dict[str, Any], kind: str) -> None:
    """torch's ``capturable`` and ``differentiable``: accepted as False only (descend keeps its
    step counts on the host and steps under no_grad)."""
    for flag in ("capturable", "differentiable"):
        if flag in group and group[flag] is not False:
            raise invalid(flag, group[flag], f"False: descend's {kind} has no {flag} form")


class TorchDecoupledFlag(RegularizedOptimizer):
    """torch's ``decoupled_weight_decay`` beside descend's ``decay`` (NAdam, RAdam): True is
    ``decay="decoupled"``, False is ``"coupled"``. Every group keeps both keys (torch's loaders read
    the flag); descend reads ``decay``, and a flag True beside another decay is refused."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict):
            # a group's own key wins over the defaults, and the other key follows it
            if "decoupled_weight_decay" in param_group and "decay" not in param_group:
                flag = param_group["decoupled_weight_decay"]
                check_flag("decoupled_weight_decay", flag)
                param_group["decay"] = "decoupled" if flag else "coupled"
            elif "decay" in param_group and "decoupled_weight_decay" not in param_group:
                param_group["decoupled_weight_decay"] = param_group["decay"] == "decoupled"
        super().add_param_group(param_group)

    def _fill_group(self, group: dict[str, Any]) -> None:
        # a group saved by torch has the flag and no decay: the flag says which (not the defaults)
        if "decay" not in group and "decoupled_weight_decay" in group:
            group["decay"] = "decoupled" if group["decoupled_weight_decay"] else "coupled"
        super()._fill_group(group)

    def _check_group(self, group: dict[str, Any]) -> None:
        flag = group.get("decoupled_weight_decay", False)
        check_flag("decoupled_weight_decay", flag)
        if flag and group["decay"] != "decoupled":
            raise invalid("decoupled_weight_decay", flag,
                          f"False with decay={group['decay']!r} (decoupled_weight_decay=True is torch's "
                          f"spelling of decay='decoupled')")
        check_torch_only_flags(group, type(self).__name__)


def resolve_decay(decoupled_weight_decay: Any, decay: str | None) -> str:
    """descend's decay from torch's flag and an explicit ``decay`` (None: the flag's)."""
    check_flag("decoupled_weight_decay", decoupled_weight_decay)
    if decay is None:
        return "decoupled" if decoupled_weight_decay else "coupled"
    if decoupled_weight_decay and decay != "decoupled":
        raise invalid("decoupled_weight_decay", decoupled_weight_decay,
                      f"False with decay={decay!r} (decoupled_weight_decay=True is torch's spelling of "
                      f"decay='decoupled')")
    return decay


class NAdam(TorchDecoupledFlag):
    r"""NAdam, maximize, and descend's regularization.

    Args:
        params: tensors, parameter-group dicts, or ``(name, tensor)`` pairs.
        lr: learning rate γ (default 2e-3).
        betas: (β₁, β₂), each in [0, 1) (default (0.9, 0.999)).
        eps: ε ≥ 0 added to the denominator (default 1e-8).
        weight_decay: λ ≥ 0 (default 0); see ``decay``.
        momentum_decay: ψ ≥ 0, how fast μ_t warms up to β₁ (default 4e-3).
        decoupled_weight_decay: torch's spelling of ``decay="decoupled"`` (default False: coupled).
        decay: ``"coupled"``, ``"decoupled"``, ``"independent"``, ``"fixed"`` or ``"corrected"``
            (default: what ``decoupled_weight_decay`` says); see :mod:`descend.regularization`.
        capturable, differentiable: only False (torch's defaults).
        foreach, maximize, l1, nonfinite, flat, warn: as for :class:`descend.SGD` (no fused form).

    The update rule is in the docstring of :mod:`descend.optimizers.nadam`.
    """

    state_spec = STATE
    _fast_paths = ("foreach",)
    # a tensor lr stays one: torch's decoupled factor 1 − γλ is then a tensor in both forms
    _tensor_lr_paths = ("single", "foreach")
    _group_keys = ("betas", "eps", "momentum_decay")

    def __init__(self, params: Any, lr: float | Tensor = 2e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, momentum_decay: float = 4e-3,
                 decoupled_weight_decay: bool = False, *, foreach: bool | None = None, maximize: bool = False,
                 capturable: bool = False, differentiable: bool = False, decay: str | None = None, l1: float = 0,
                 nonfinite: str = "ignore", flat: bool = False, warn: bool = True) -> None:
        decay = resolve_decay(decoupled_weight_decay, decay)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum_decay=momentum_decay,
                        decoupled_weight_decay=decay == "decoupled", l1=l1, decay=decay, maximize=maximize,
                        foreach=foreach, capturable=capturable, differentiable=differentiable)
        super().__init__(params, defaults, nonfinite=nonfinite, warn=warn, flat=flat)

    def _new_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = super()._new_state(param, group)
        return {"step": torch.tensor(0.0, dtype=scalar_dtype()), "mu_product": torch.tensor(1.0, dtype=scalar_dtype()),
                "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_betas(group["betas"])
        check_number("eps", group["eps"], low=0)
        check_number("momentum_decay", group["momentum_decay"], low=0)

    def _update(self, batch: GroupBatch, implementation: str) -> None:
        group = batch.group
        beta1, beta2 = group["betas"]
        nadam(batch.params, batch.grads, batch.state_list("exp_avg"), batch.state_list("exp_avg_sq"),
              batch.state_list("mu_product"), batch.state_list("step"), lr=group["lr"], beta1=beta1, beta2=beta2,
              eps=group["eps"], momentum_decay=group["momentum_decay"], implementation=implementation)
