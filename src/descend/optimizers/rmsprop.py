r"""RMSprop (Hinton's lecture 6e; centered: Graves 2013), with momentum.

.. math::
   \begin{aligned}
   &g_t \leftarrow \pm\nabla f(\theta_{t-1}) \quad(\text{minus when maximizing})\\
   &\textbf{coupled: } g_t \leftarrow g_t + \lambda\theta_{t-1} + \lambda_1\,\mathrm{sgn}(\theta_{t-1})
    \qquad \textbf{decoupled modes: } \theta_{t-1} \leftarrow \theta_{t-1}(1 - s\lambda)\\
   &v_t \leftarrow \alpha v_{t-1} + (1-\alpha) g_t^2\\
   &\bar g_t \leftarrow \alpha \bar g_{t-1} + (1-\alpha) g_t, \qquad
    \tilde v_t \leftarrow v_t - \bar g_t^2 \ (\text{centered}), \qquad \tilde v_t \leftarrow v_t\ (\text{otherwise})\\
   &d_t \leftarrow g_t / (\sqrt{\tilde v_t} + \epsilon)\\
   &b_t \leftarrow \mu b_{t-1} + d_t,\quad \theta_t \leftarrow \theta_{t-1} - \gamma b_t \ (\mu > 0), \qquad
    \theta_t \leftarrow \theta_{t-1} - \gamma d_t \ (\text{otherwise})\\
   &\textbf{decoupled L1: } \theta_t \leftarrow \mathrm{sgn}(\theta_t)\max(|\theta_t| - s\lambda_1, 0)
   \end{aligned}

with γ = lr, v = ``square_avg``, ḡ = ``grad_avg`` (centered only), b = ``momentum_buffer``
(μ > 0 only), all zeros at first, and s the decoupled scale of :mod:`descend.regularization`.
ε is added after the square root (TensorFlow adds it inside). With ``decay="coupled"`` (the
default) this is ``torch.optim.RMSprop``: torch adds λθ to the gradient after negating it for
maximize and before the square average, which is the pipeline's coupled term, so the rule
never sees λ. A complex parameter is stepped as its real and imaginary parts, as torch does.

Unlike torch, a group that turns momentum or centering on after its first step gets a buffer
of zeros (torch fails on the missing entry); its ``step`` count is kept as torch keeps it
(float32, on the host), though the rule does not read it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from descend import dispatch
from descend.optimizer import GroupBatch, RegularizedOptimizer
from descend.state import SCALAR, Entry, StateSpec
from descend.tensors import count_step_
from descend.validation import check_flag, check_number, invalid

__all__ = ["RMSprop", "rmsprop"]


def _has_momentum(param: Tensor, group: dict[str, Any]) -> bool:
    return bool(group["momentum"] > 0)


def _centered(param: Tensor, group: dict[str, Any]) -> bool:
    return bool(group["centered"])


STATE = StateSpec((
    Entry("step", SCALAR, low=0, device="cpu"),
    Entry("square_avg", low=0),
    Entry("momentum_buffer", required=False, when=_has_momentum),
    Entry("grad_avg", required=False, when=_centered),
))


def rmsprop(params: list[Tensor], grads: list[Tensor], square_avgs: list[Tensor], grad_avgs: list[Tensor],
            momentum_buffers: list[Tensor], steps: list[Tensor], *, lr: float | Tensor, alpha: float, eps: float,
            momentum: float, centered: bool, implementation: str = "single") -> None:
    """Functional RMSprop over lists of tensors (the rule alone: regularization and maximize are the
    pipeline's; state updated in place, ``steps`` incremented). ``grad_avgs`` is read only when
    ``centered``, ``momentum_buffers`` only when ``momentum > 0``."""
    impl: Callable[..., None] = {"single": _single_tensor_rmsprop, "foreach": _multi_tensor_rmsprop}[implementation]
    if not (implementation == "foreach" and isinstance(lr, Tensor) and dispatch.compiling()):
        lr = float(lr)  # torch's γ·x with a tensor γ is γ's value as a number: the same result
    impl(params, grads, square_avgs, grad_avgs, momentum_buffers, steps, lr=lr, alpha=float(alpha),
         eps=float(eps), momentum=float(momentum), centered=centered)


def _single_tensor_rmsprop(params: list[Tensor], grads: list[Tensor], square_avgs: list[Tensor],
                           grad_avgs: list[Tensor], momentum_buffers: list[Tensor], steps: list[Tensor], *,
                           lr: float, alpha: float, eps: float, momentum: float, centered: bool) -> None:
    """The reference: one tensor at a time, each line a line of the math above."""
    for i, param in enumerate(params):
        grad, square_avg = grads[i], square_avgs[i]
        grad_avg = grad_avgs[i] if centered else None
        buf = momentum_buffers[i] if momentum > 0 else None
        steps[i] += 1
        if torch.is_complex(param):
            param, grad, square_avg = torch.view_as_real(param), torch.view_as_real(grad), torch.view_as_real(square_avg)
            grad_avg = torch.view_as_real(grad_avg) if grad_avg is not None else None
            buf = torch.view_as_real(buf) if buf is not None else None
        square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
        if grad_avg is not None:
            grad_avg.lerp_(grad, 1 - alpha)
            avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
        else:
            avg = square_avg.sqrt()
        avg.add_(eps)
        if buf is not None:
            buf.mul_(momentum).addcdiv_(grad, avg)
            param.add_(buf, alpha=-lr)
        else:
            param.addcdiv_(grad, avg, value=-lr)


def _multi_tensor_rmsprop(params: list[Tensor], grads: list[Tensor], square_avgs: list[Tensor],
                          grad_avgs: list[Tensor], momentum_buffers: list[Tensor], steps: list[Tensor], *,
                          lr: float | Tensor, alpha: float, eps: float, momentum: float, centered: bool) -> None:
    """The same rule with torch's multi-tensor (foreach) kernels, per device and dtype (never complex)."""
    lists: list[list[Any]] = [params, grads, square_avgs, steps]
    if centered:
        lists.append(grad_avgs)
    if momentum > 0:
        lists.append(momentum_buffers)
    for tensors, _ in dispatch.grouped(lists):
        p, g, v, t = tensors[:4]
        count_step_(t)
        torch._foreach_mul_(v, alpha)
        torch._foreach_addcmul_(v, g, g, value=1 - alpha)
        if centered:
            g_avg = tensors[4]
            torch._foreach_lerp_(g_avg, g, 1 - alpha)
            avg = torch._foreach_addcmul(v, g_avg, g_avg, value=-1)
            torch._foreach_sqrt_(avg)
        else:
            avg = torch._foreach_sqrt(v)
        torch._foreach_add_(avg, eps)
        if momentum > 0:
            buf = tensors[-1]
            torch._foreach_mul_(buf, momentum)
            torch._foreach_addcdiv_(buf, g, avg)
            if isinstance(lr, Tensor):  # only while torch.compile traces the step (alpha takes a number)
                torch._foreach_add_(p, torch._foreach_mul(buf, -lr))
            else:
                torch._foreach_add_(p, buf, alpha=-lr)
        elif isinstance(lr, Tensor):
            torch._foreach_div_(avg, -lr)
            torch._foreach_addcdiv_(p, g, avg)
        else:
            torch._foreach_addcdiv_(p, g, avg, value=-lr)


class RMSprop(RegularizedOptimizer):
    r"""RMSprop, centered or not, with momentum, maximize, and descend's regularization.

    Args:
        params: tensors, parameter-group dicts, or ``(name, tensor)`` pairs.
        lr: learning rate γ (default 1e-2).
        alpha: α in [0, 1], the smoothing constant of the square average (default 0.99).
        eps: ε ≥ 0 added to the root of the square average (default 1e-8).
        weight_decay: λ ≥ 0 (default 0); see ``decay``.
        momentum: μ in [0, 1) (default 0).
        centered: divide by an estimate of the gradient's variance instead of its second moment.
        capturable: only False: descend keeps step counts on the host (no CUDA-graph capture).
        foreach, maximize, l1, nonfinite, flat, warn: as for :class:`descend.SGD` (no fused form).
        decay: ``"coupled"`` (default: torch's L2 ``weight_decay``), ``"decoupled"``,
            ``"independent"``, ``"fixed"`` or ``"corrected"``; see :mod:`descend.regularization`.

    The update rule is in the docstring of :mod:`descend.optimizers.rmsprop`.
    """

    state_spec = STATE
    _fast_paths = ("foreach",)
    _group_keys = ("alpha", "momentum", "centered")

    def __init__(self, params: Any, lr: float | Tensor = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0, momentum: float = 0, centered: bool = False, capturable: bool = False,
                 foreach: bool | None = None, maximize: bool = False, *, decay: str = "coupled", l1: float = 0,
                 nonfinite: str = "ignore", flat: bool = False, warn: bool = True) -> None:
        if capturable is not False:
            raise invalid("capturable", capturable, "False: descend's RMSprop keeps step counts on the host")
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                        centered=centered, l1=l1, decay=decay, maximize=maximize, foreach=foreach)
        super().__init__(params, defaults, nonfinite=nonfinite, warn=warn, flat=flat)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_number("alpha", group["alpha"], low=0, high=1, high_open=False)
        check_number("eps", group["eps"], low=0)
        check_number("momentum", group["momentum"], low=0, high=1)
        check_flag("centered", group["centered"])

    def _update(self, batch: GroupBatch, implementation: str) -> None:
        group = batch.group
        momentum, centered = group["momentum"], group["centered"]
        for state in batch.states:  # momentum or centering switched on after the first step
            if momentum > 0 and "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(state["square_avg"])
            if centered and "grad_avg" not in state:
                state["grad_avg"] = torch.zeros_like(state["square_avg"])
        rmsprop(batch.params, batch.grads, batch.state_list("square_avg"),
                batch.state_list("grad_avg") if centered else [],
                batch.state_list("momentum_buffer") if momentum > 0 else [], batch.state_list("step"),
                lr=group["lr"], alpha=group["alpha"], eps=group["eps"], momentum=momentum, centered=centered,
                implementation=implementation)
