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
from torch.optim.optimizer import _get_capturable_supported_devices

from descend import dispatch, precision_fused, regularization
from descend.optimizer import GroupBatch, RegularizedOptimizer
from descend.regularization import Absorbs
from descend.state import SCALAR, Entry, StateSpec
from descend.tensors import IS_CPU, count_step_, grouped_by_device_and_dtype
from descend.validation import check_flag, check_number, invalid

__all__ = ["Adam", "AdamW", "adam"]


def _amsgrad(param: Tensor, group: dict[str, Any]) -> bool:
    return bool(group["amsgrad"])


STATE = StateSpec((
    # float32 on the host, as torch keeps it for its foreach and for-loop steps: their bias
    # corrections are host numbers, and a count on the device would be read back (a host-device
    # sync) for every parameter at every step. A fused step moves it to θ's device once (its
    # kernel reads the count there), and a non-fused step moves such a count back once.
    Entry("step", SCALAR, low=0, device="cpu"),
    Entry("exp_avg"),
    Entry("exp_avg_sq", low=0),
    # made when amsgrad is on; a group that switches it on later starts it from v
    Entry("max_exp_avg_sq", required=False, when=_amsgrad, low=0),
))


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
    maximize: bool = False,
    weight_decay: float = 0.0,
    decoupled: bool = False,
    implementation: str = "single",
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    capturable: bool = False,
) -> None:
    """Functional Adam over lists of tensors (the rule alone: regularization is the pipeline's;
    state updated in place; ``steps`` are float32 scalar tensors, incremented here).
    ``maximize`` and ``weight_decay`` (coupled, or ``decoupled``) are the fused kernels' own terms,
    and so are ``grad_scale`` (the gradients are divided by it) and ``found_inf`` (where nonzero,
    nothing changes, step counts included), which only the fused form takes."""
    if implementation != "fused" and (grad_scale is not None or found_inf is not None):
        raise ValueError("grad_scale and found_inf are the fused kernels' (other forms: unscale and skip first)")
    impl = {"single": _single_tensor_adam, "foreach": _multi_tensor_adam, "fused": _fused_adam}[implementation]
    if capturable and implementation != "fused":
        impl = {"single": _single_tensor_adam_capturable, "foreach": _multi_tensor_adam_capturable}[implementation]
    if isinstance(lr, Tensor) and lr.dim() != 0:
        lr = lr.reshape(())  # a 1-element tensor lr, as a scalar (same value and dtype)
    # A tensor lr stays a tensor where torch keeps it one (its step size is then computed in the
    # tensor's dtype, float32 for torch.tensor(0.01)): parity includes that rounding.
    # So do tensor betas in the reference, as in torch's for-loop Adam (its bias corrections are
    # then computed in the tensors' dtype); torch's other forms take them as numbers.
    keep_betas = implementation == "single"
    beta1, beta2 = (b.reshape(()) if keep_betas and isinstance(b, Tensor) else float(b) for b in (beta1, beta2))
    if implementation == "single" and not capturable:
        # the for-loop form hands each parameter's step size to addcdiv_ as a number: from a tensor
        # on a device that is one read (a sync) per parameter. One copy to the host per step
        # instead; the host's IEEE arithmetic rounds the step sizes exactly as the device's would
        lr, beta1, beta2 = (_on_host(x) for x in (lr, beta1, beta2))
    extra = dict(grad_scale=grad_scale, found_inf=found_inf) if implementation == "fused" else {}
    impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr=lr, beta1=beta1,
         beta2=beta2, eps=eps, amsgrad=amsgrad, maximize=maximize, weight_decay=weight_decay,
         decoupled=decoupled, **extra)


def _on_host(x: Any) -> Any:
    return x.cpu() if isinstance(x, Tensor) and not x.is_cpu else x


def _single_tensor_adam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                        exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], steps: list[Tensor], *,
                        lr: float | Tensor, beta1: float | Tensor, beta2: float | Tensor, eps: float, amsgrad: bool,
                        maximize: bool, weight_decay: float, decoupled: bool) -> None:
    """The reference: one tensor at a time, each line a line of the math above."""
    assert not maximize and weight_decay == 0, "the pipeline applies these for the reference"
    for i, param in enumerate(params):
        grad = grads[i]
        exp_avg, exp_avg_sq = exp_avgs[i], exp_avg_sqs[i]
        max_exp_avg_sq = max_exp_avg_sqs[i] if amsgrad else None
        steps[i] += 1
        if torch.is_complex(param):
            # the moments of a complex parameter are those of its real and imaginary parts
            param, grad = torch.view_as_real(param), torch.view_as_real(grad)
            exp_avg, exp_avg_sq = torch.view_as_real(exp_avg), torch.view_as_real(exp_avg_sq)
            if max_exp_avg_sq is not None:
                max_exp_avg_sq = torch.view_as_real(max_exp_avg_sq)
        # (a tensor β₁ is cast to θ's dtype and device for lerp's weight, as torch does)
        exp_avg.lerp_(grad, 1 - (beta1.to(device=param.device, dtype=param.dtype) if isinstance(beta1, Tensor)
                                 else beta1))
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # type: ignore[arg-type]
        step = float(steps[i].item())
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        if max_exp_avg_sq is not None:
            torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            denom = (max_exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        else:
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)  # type: ignore[arg-type]


def _multi_tensor_adam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                       exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], steps: list[Tensor], *,
                       lr: float | Tensor, beta1: float, beta2: float, eps: float, amsgrad: bool, maximize: bool,
                       weight_decay: float, decoupled: bool) -> None:
    """The same rule with torch's multi-tensor (foreach) kernels, per device and dtype."""
    assert not maximize and weight_decay == 0, "the pipeline applies these for foreach"
    # While torch.compile traces the step, lr and the step counts stay tensors: reading them
    # (float(), .item()) would break the graph and recompile it at every step.
    traced = dispatch.compiling()
    if not traced:
        lr = float(lr)
    lists: list[list[Any]] = [params, grads, exp_avgs, exp_avg_sqs, steps]
    if amsgrad:
        lists.append(max_exp_avg_sqs)
    for tensors, _ in dispatch.grouped(lists):
        p, g, m, v, t = tensors[:5]
        count_step_(t)
        torch._foreach_lerp_(m, g, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, 1 - beta2)
        if traced:  # the same sizes as 0-dim tensors
            neg_step_sizes: Any = [-lr / (1 - beta1**s) for s in t]
            bias_correction2_sqrts: Any = [(1 - beta2**s) ** 0.5 for s in t]
        else:
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
        if traced:  # (the overload with a tensor of scalars has no fake kernel off the GPU)
            torch._foreach_div_(denom, neg_step_sizes)
            torch._foreach_addcdiv_(p, m, denom)
        else:
            torch._foreach_addcdiv_(p, m, denom, neg_step_sizes)


def _single_tensor_adam_capturable(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                                   exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], steps: list[Tensor], *,
                                   lr: float | Tensor, beta1: float | Tensor, beta2: float | Tensor, eps: float,
                                   amsgrad: bool, maximize: bool, weight_decay: float, decoupled: bool) -> None:
    """The reference with ``capturable=True``: the counts stay on θ's device and the bias
    corrections are device tensors, so the step reads nothing on the host and a CUDA graph
    can capture it (torch's capturable for-loop Adam, step for step, for parity)."""
    assert not maximize and weight_decay == 0, "the pipeline applies these for the reference"
    for i, param in enumerate(params):
        grad, exp_avg, exp_avg_sq, step = grads[i], exp_avgs[i], exp_avg_sqs[i], steps[i]
        max_exp_avg_sq = max_exp_avg_sqs[i] if amsgrad else None
        if torch.is_complex(param):
            param, grad = torch.view_as_real(param), torch.view_as_real(grad)
            exp_avg, exp_avg_sq = torch.view_as_real(exp_avg), torch.view_as_real(exp_avg_sq)
            if max_exp_avg_sq is not None:
                max_exp_avg_sq = torch.view_as_real(max_exp_avg_sq)
        step += 1
        exp_avg.lerp_(grad, 1 - beta1)  # type: ignore[arg-type]
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # type: ignore[arg-type]
        step_size_neg = (lr / (1 - beta1**step)).neg()
        bias_correction2_sqrt = (1 - beta2**step).sqrt()  # type: ignore[union-attr]
        if max_exp_avg_sq is not None:
            max_exp_avg_sq.copy_(torch.maximum(max_exp_avg_sq, exp_avg_sq))
            second = max_exp_avg_sq
        else:
            second = exp_avg_sq
        # (the step size folded into the denominator: addcdiv_ takes a number, not a tensor)
        denom = (second.sqrt() / (bias_correction2_sqrt * step_size_neg)).add_(eps / step_size_neg)
        param.addcdiv_(exp_avg, denom)


def _multi_tensor_adam_capturable(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                                  exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], steps: list[Tensor], *,
                                  lr: float | Tensor, beta1: float, beta2: float, eps: float, amsgrad: bool,
                                  maximize: bool, weight_decay: float, decoupled: bool) -> None:
    """The foreach form with ``capturable=True``: −lr/(1 − β₁ᵗ) and √(1 − β₂ᵗ) computed as
    device tensors from the device counts (torch's capturable foreach Adam, for parity)."""
    assert not maximize and weight_decay == 0, "the pipeline applies these for foreach"
    lists: list[list[Any]] = [params, grads, exp_avgs, exp_avg_sqs, steps]
    if amsgrad:
        lists.append(max_exp_avg_sqs)
    for tensors, _ in dispatch.grouped(lists):
        p, g, m, v, t = tensors[:5]
        if p and torch.is_complex(p[0]):
            p, g, m, v = ([torch.view_as_real(x) for x in xs] for xs in (p, g, m, v))
        count_step_(t)
        torch._foreach_lerp_(m, g, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, 1 - beta2)
        step_size = torch._foreach_pow(beta1, t)  # becomes −lr/(1 − β₁ᵗ) ...
        bias_correction2_sqrt = torch._foreach_pow(beta2, t)  # ... and √(1 − β₂ᵗ)
        torch._foreach_sub_(step_size, 1)
        torch._foreach_sub_(bias_correction2_sqrt, 1)
        torch._foreach_neg_(bias_correction2_sqrt)
        torch._foreach_div_(step_size, lr)
        torch._foreach_reciprocal_(step_size)
        torch._foreach_sqrt_(bias_correction2_sqrt)
        if amsgrad:
            vmax = tensors[5]
            if torch.is_complex(vmax[0]):
                vmax = [torch.view_as_real(x) for x in vmax]
            torch._foreach_maximum_(vmax, v)
            denom = torch._foreach_sqrt(vmax)
        else:
            denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_div_(denom, step_size)
        torch._foreach_addcdiv_(p, m, denom)


def _fused_adam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], steps: list[Tensor], *,
                lr: float | Tensor, beta1: float, beta2: float, eps: float, amsgrad: bool, maximize: bool,
                weight_decay: float, decoupled: bool, grad_scale: Tensor | None = None,
                found_inf: Tensor | None = None) -> None:
    """torch's fused kernels: Adam's, whose ``weight_decay`` is coupled, or AdamW's, whose
    ``weight_decay`` c multiplies θ by 1 − lr·c (every decoupled mode, with c from the plan).
    The kernel divides the gradients by ``grad_scale`` and changes nothing where ``found_inf``
    is nonzero, and then the step counts do not advance either."""
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
    lists: list[list[Any]] = [params, grads, exp_avgs, exp_avg_sqs, steps]
    if amsgrad:
        lists.append(max_exp_avg_sqs)
    for tensors, _ in grouped_by_device_and_dtype(lists):
        p, g, m, v, t = tensors[:5]
        vmax = tensors[5] if amsgrad else []
        device = p[0].device
        scale = grad_scale.to(device, non_blocking=True) if grad_scale is not None else None
        skip = found_inf.to(device, non_blocking=True) if found_inf is not None else None
        count_step_(t)
        kernel(p, g, m, v, vmax, t, amsgrad=amsgrad, lr=lr, beta1=beta1, beta2=beta2,
               weight_decay=weight_decay, eps=eps, maximize=maximize, grad_scale=scale, found_inf=skip)
        if skip is not None:
            # a skipped step does not count (a list of the flag: the overload taking one tensor
            # reads it on the host)
            torch._foreach_sub_(t, [skip] * len(t))


def check_betas(betas: Any) -> None:
    """Raise ValueError unless ``betas`` is a pair (β₁, β₂), each in [0, 1) (Adam's, Lion's),
    in torch's words ("Invalid beta parameter at index 0: 1.0")."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise invalid("betas", betas, "a pair (beta1, beta2)")
    for i in (0, 1):
        if isinstance(betas[i], Tensor) and betas[i].numel() != 1:
            raise ValueError(f"Tensor betas[{i}] must be 1-element, not of shape {tuple(betas[i].shape)} "
                             "(betas; allowed: a number or a 1-element tensor)")
        check_number(f"betas[{i}]", betas[i], low=0, high=1)


def check_tensor_options(group: dict[str, Any]) -> None:
    """torch's rules for tensor hyperparameters of Adam and AdamW, in its words: a tensor lr,
    and betas as two tensors (not one), except with ``foreach=True``, whose kernels take them
    as numbers (``capturable=True`` lifts that, as in torch)."""
    lr, betas, foreach = group["lr"], group["betas"], group.get("foreach") and not group.get("capturable")
    if isinstance(lr, Tensor) and foreach:
        raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True "
                         "(lr; allowed: a number with foreach=True, or a tensor with foreach None or False)")
    tensors = [isinstance(b, Tensor) for b in betas]
    if any(tensors) and not all(tensors):
        raise ValueError(f"betas must be either both floats or both Tensors (betas; allowed: two numbers or two "
                         f"1-element tensors, not {betas!r})")
    if all(tensors) and foreach:
        raise ValueError("betas[0] as a Tensor is not supported for capturable=False and foreach=True "
                         "(betas; allowed: numbers with foreach=True, or tensors with foreach None or False)")


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
        maximize, foreach, fused, nonfinite, flat, warn, rounding, state_dtype: as for :class:`descend.SGD`.
        capturable: as torch's: the step counts on θ's device, and a tensor lr (on that
            device) used as one, so that a step reads no device value on the host and a CUDA
            graph can capture it and replay it with a changing lr. Only on devices torch's
            capturable Adam supports (CUDA, XPU, HPU, ...); on the CPU the step raises as torch's
            does. Fused or foreach kernels (or the per-tensor reference); decoupled L1 and
            ``nonfinite`` other than "ignore" read the lr or the gradients on the host, so a
            captured step can have neither.

    The update rule is in the docstring of :mod:`descend.optimizers.adam`.
    """

    state_spec = STATE
    _absorbs = {"fused": Absorbs(maximize=True, coupled=True, decoupled=True)}
    _tensor_lr_paths = ("single", "fused")
    _amp_fused = True
    _fused_dtensor = True  # (torch registers its fused Adam/AdamW kernels with DTensor; not SGD's)
    _group_keys = ("betas", "eps", "amsgrad")

    def __init__(self, params: Any, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, amsgrad: bool = False, *, l1: float = 0,
                 decay: str = "coupled", maximize: bool = False, foreach: bool | None = None,
                 fused: bool | None = None, nonfinite: str = "ignore", flat: bool = False,
                 warn: bool = True, rounding: str = "nearest",
                 state_dtype: Any = None, capturable: bool = False) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, l1=l1,
                        decay=decay, maximize=maximize, foreach=foreach, fused=fused, capturable=capturable)
        super().__init__(params, defaults, nonfinite=nonfinite, warn=warn, flat=flat, rounding=rounding,
                         state_dtype=state_dtype)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_betas(group["betas"])
        check_tensor_options(group)
        check_number("eps", group["eps"], low=0)
        check_flag("capturable", group["capturable"])
        if group["capturable"] and group["l1"] != 0 and group["decay"] not in ("coupled", "fixed"):
            raise invalid("l1", group["l1"], f"0 with capturable=True and decay={group['decay']!r} (the prox "
                                             "threshold depends on the lr, and a captured step cannot read it)")

    def _implementation(self, batch: GroupBatch) -> str:
        group = batch.group
        if group.get("capturable") and not dispatch.compiling():
            supported = _get_capturable_supported_devices()
            if not all(p.device.type in supported for p in batch.params):
                # torch's check and words (it raises them from inside the step; here nothing has changed)
                raise AssertionError(
                    f"If capturable=True, params and state_steps must be on supported devices: {supported}.")
        if isinstance(group["betas"][0], Tensor) and group.get("foreach") is None and group.get("fused") is None:
            return "single"  # torch's default with tensor betas: the form that computes with them as tensors
        return super()._implementation(batch)

    def _stored_precision_step(self, batch: GroupBatch, lr: float | Tensor,
                               plan: regularization.DecayPlan) -> GroupBatch | None:
        return precision_fused.adam_stored_step(self, batch, lr, plan)

    def _update(self, batch: GroupBatch, implementation: str) -> None:
        group = batch.group
        if group["amsgrad"]:
            for state in batch.states:
                if "max_exp_avg_sq" not in state:  # amsgrad switched on later
                    state["max_exp_avg_sq"] = state["exp_avg_sq"].clone()
        steps = batch.state_list("step")
        capturable = bool(group.get("capturable"))
        if implementation == "fused" or (capturable and not dispatch.compiling()):
            # fused kernels read the counts on the parameter's device (compared in bulk: .device
            # builds an object per call)
            if not (all(map(IS_CPU, batch.params)) and all(map(IS_CPU, steps))):
                for p, state in zip(batch.params, batch.states, strict=True):
                    if state["step"].device != p.device:
                        state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
        elif not dispatch.compiling() and not all(map(IS_CPU, steps)):
            # counts a fused step (or a capturable torch.optim) left on a device: back to the host
            # once, rather than one read per parameter at every step from now on
            for state in batch.states:
                if not state["step"].is_cpu:
                    state["step"] = state["step"].to(device="cpu", dtype=torch.float32)
        beta1, beta2 = group["betas"]
        adam(batch.params, batch.grads, batch.state_list("exp_avg"), batch.state_list("exp_avg_sq"),
             batch.state_list("max_exp_avg_sq") if group["amsgrad"] else [], batch.state_list("step"),
             lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], amsgrad=group["amsgrad"],
             maximize=batch.terms.maximize, weight_decay=batch.terms.weight_decay, decoupled=batch.terms.decoupled,
             implementation=implementation, grad_scale=batch.grad_scale, found_inf=batch.found_inf,
             capturable=capturable)


class AdamW(Adam):
    r"""Adam with decoupled weight decay: ``descend.Adam`` with defaults
    ``weight_decay=1e-2, decay="decoupled"`` (``torch.optim.AdamW``). Use
    ``decay="independent"`` for the AdamW paper's schedule-multiplier decay."""

    def __init__(self, params: Any, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, l1: float = 0,
                 decay: str = "decoupled", maximize: bool = False, foreach: bool | None = None,
                 fused: bool | None = None, nonfinite: str = "ignore", flat: bool = False,
                 warn: bool = True, rounding: str = "nearest",
                 state_dtype: Any = None, capturable: bool = False) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, l1=l1,
                         decay=decay, maximize=maximize, foreach=foreach, fused=fused, nonfinite=nonfinite,
                         flat=flat, warn=warn, rounding=rounding, state_dtype=state_dtype, capturable=capturable)
