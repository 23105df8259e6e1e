r"""Adagrad (Duchi, Hazan & Singer 2011, "Adaptive Subgradient Methods"), with lr decay.

.. math::
   \begin{aligned}
   &g_t \leftarrow \pm\nabla f(\theta_{t-1}) \quad(\text{minus when maximizing})\\
   &\textbf{coupled: } g_t \leftarrow g_t + \lambda\theta_{t-1} + \lambda_1\,\mathrm{sgn}(\theta_{t-1})
    \qquad \textbf{decoupled modes: } \theta_{t-1} \leftarrow \theta_{t-1}(1 - s\lambda)\\
   &\tilde\gamma_t \leftarrow \gamma / (1 + (t-1)\eta)\\
   &G_t \leftarrow G_{t-1} + g_t^2\\
   &\theta_t \leftarrow \theta_{t-1} - \tilde\gamma_t\, \frac{g_t}{\sqrt{G_t} + \epsilon}\\
   &\textbf{decoupled L1: } \theta_t \leftarrow \mathrm{sgn}(\theta_t)\max(|\theta_t| - s\lambda_1, 0)
   \end{aligned}

with γ = lr, η = ``lr_decay``, t = ``step``, G = ``sum`` (starting at ``initial_accumulator_value``
τ ≥ 0; for a complex θ at τ + τi) and s the decoupled scale of :mod:`descend.regularization`
(s uses the group's lr, not γ̃). Each element's step shrinks as its squared gradients add up,
so rarely-seen features keep large steps. With ``decay="coupled"`` (the default) this is
``torch.optim.Adagrad``: torch adds λθ to the gradient after negating it for maximize, the
pipeline's coupled term; torch's fused kernel (``torch._fused_adagrad_``) takes both itself,
and its fused form here is handed them too, so that it computes what torch's does bit for bit.

As torch's Adagrad does, the optimizer makes every parameter's state when it is built (``step``
0 and ``sum`` = τ), so that its state dict is torch's from the start; parameters added later
with ``add_param_group`` get theirs at their first step, as in torch. Each group's own τ is used
(torch takes the constructor's τ for every group). A complex parameter is stepped as its real
and imaginary parts, as torch does, by the reference (torch's fused kernel takes no complex tensors).

Sparse gradients (``nn.Embedding(sparse=True)``) are stepped as torch steps them, by the
reference: G and θ change only where the gradient has entries. Coupled weight decay and L1 would
make such a gradient dense, so they are refused with one, as torch refuses weight decay; the
decoupled modes apply (they shrink all of θ), and flat storage keeps no sparse gradient.

Each form runs the operations of torch's form of the same name, in its order: the reference and
the foreach form agree to the bit, the fused kernel rounds otherwise (a few ulps). A tensor lr
is divided by 1 + (t − 1)η in its own dtype (float32 for ``torch.tensor(0.01)``) by the reference
and the foreach form, in double precision by the fused kernel, as in torch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from descend import dispatch
from descend.optimizer import GroupBatch, RegularizedOptimizer
from descend.regularization import Absorbs
from descend.state import SCALAR, Entry, StateSpec
from descend.tensors import IS_CPU, count_step_, grouped_by_device_and_dtype
from descend.validation import check_flag, check_number

__all__ = ["Adagrad", "adagrad"]

STATE = StateSpec((
    # float32 on the host, as torch keeps it (a fused step moves it to θ's device once: its kernel reads it there)
    Entry("step", SCALAR, low=0, device="cpu"),
    # made by the optimizer (it starts at initial_accumulator_value, not at zeros)
    Entry("sum", init=None, low=0),
))


def adagrad(params: list[Tensor], grads: list[Tensor], state_sums: list[Tensor], steps: list[Tensor], *,
            lr: float | Tensor, lr_decay: float, eps: float, maximize: bool = False, weight_decay: float = 0.0,
            implementation: str = "single", grad_scale: Tensor | None = None,
            found_inf: Tensor | None = None) -> None:
    """Functional Adagrad over lists of tensors (the rule alone: regularization is the pipeline's;
    state updated in place, ``steps`` incremented). ``maximize`` and the coupled ``weight_decay`` are
    the fused kernel's own terms, and so are ``grad_scale`` (the gradients are divided by it) and
    ``found_inf`` (where nonzero, nothing changes, step counts included), which only it takes."""
    if implementation != "fused" and (grad_scale is not None or found_inf is not None):
        raise ValueError("grad_scale and found_inf are the fused kernel's (other forms: unscale and skip first)")
    if implementation != "fused" and (maximize or weight_decay != 0):
        raise ValueError("maximize and weight_decay are the fused kernel's (other forms: the pipeline applies them)")
    if isinstance(lr, Tensor) and lr.dim() != 0:
        lr = lr.reshape(())  # a 1-element tensor lr as a scalar (same value and dtype)
    if implementation == "fused":
        _fused_adagrad(params, grads, state_sums, steps, lr=lr, lr_decay=float(lr_decay), eps=float(eps),
                       maximize=maximize, weight_decay=float(weight_decay), grad_scale=grad_scale, found_inf=found_inf)
        return
    impl = {"single": _single_tensor_adagrad, "foreach": _multi_tensor_adagrad}[implementation]
    impl(params, grads, state_sums, steps, lr=lr, lr_decay=float(lr_decay), eps=float(eps))


def _single_tensor_adagrad(params: list[Tensor], grads: list[Tensor], state_sums: list[Tensor],
                           steps: list[Tensor], *, lr: float | Tensor, lr_decay: float, eps: float) -> None:
    """The reference: one tensor at a time, each line a line of the math above."""
    for param, grad, state_sum, step in zip(params, grads, state_sums, steps, strict=True):
        step += 1
        decayed_lr = lr / (1 + (float(step.item()) - 1) * lr_decay)
        if grad.is_sparse:
            _sparse_step(param, grad, state_sum, decayed_lr, eps)
            continue
        if torch.is_complex(param):
            param, grad, state_sum = torch.view_as_real(param), torch.view_as_real(grad), torch.view_as_real(state_sum)
        state_sum.addcmul_(grad, grad, value=1)
        std = state_sum.sqrt().add_(eps)
        param.addcdiv_(grad, std, value=-decayed_lr)  # type: ignore[arg-type]


def _sparse_step(param: Tensor, grad: Tensor, state_sum: Tensor, decayed_lr: float | Tensor, eps: float) -> None:
    """The update of the elements a sparse gradient holds, and of no other (G and θ elsewhere stay)."""
    grad = grad.coalesce()  # the update is not linear in g: each index once
    indices, values = grad._indices(), grad._values()
    state_sum.add_(torch.sparse_coo_tensor(indices, values.pow(2), grad.size()))
    std_values = state_sum.sparse_mask(grad)._values().sqrt_().add_(eps)
    param.add_(torch.sparse_coo_tensor(indices, values / std_values, grad.size()), alpha=-decayed_lr)  # type: ignore[arg-type]


def _multi_tensor_adagrad(params: list[Tensor], grads: list[Tensor], state_sums: list[Tensor],
                          steps: list[Tensor], *, lr: float | Tensor, lr_decay: float, eps: float) -> None:
    """The same rule with torch's multi-tensor (foreach) kernels, per device and dtype (never complex)."""
    traced = dispatch.compiling()
    for (p, g, G, t), _ in dispatch.grouped([params, grads, state_sums, steps]):
        count_step_(t)
        if traced:  # the counts stay tensors: reading them would break the graph
            neg_decayed_lrs: Any = [-lr / (1 + (s - 1) * lr_decay) for s in t]
        else:
            neg_decayed_lrs = [-lr / (1 + (float(s.item()) - 1) * lr_decay) for s in t]
        torch._foreach_addcmul_(G, g, g, value=1)
        std = torch._foreach_sqrt(G)
        torch._foreach_add_(std, eps)
        numerator = torch._foreach_mul(g, neg_decayed_lrs)
        torch._foreach_addcdiv_(p, numerator, std)


def _fused_adagrad(params: list[Tensor], grads: list[Tensor], state_sums: list[Tensor], steps: list[Tensor], *,
                   lr: float | Tensor, lr_decay: float, eps: float, maximize: bool, weight_decay: float,
                   grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    """torch's fused kernel, which negates the gradient (``maximize``) and adds the coupled
    ``weight_decay`` term itself, divides the gradients by ``grad_scale`` and changes nothing
    where ``found_inf`` is nonzero; the counts it was handed already advanced are taken back by it."""
    for tensors, _ in grouped_by_device_and_dtype([params, grads, state_sums, steps]):
        p, g, G, t = tensors
        device = p[0].device
        scale = grad_scale.to(device, non_blocking=True) if grad_scale is not None else None
        skip = found_inf.to(device, non_blocking=True) if found_inf is not None else None
        device_lr = lr.to(device, non_blocking=True) if isinstance(lr, Tensor) and lr.device != device else lr
        count_step_(t)
        torch._fused_adagrad_(p, g, G, t, lr=device_lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
                              maximize=maximize, grad_scale=scale, found_inf=skip)
        if skip is not None:
            torch._foreach_sub_(t, [skip] * len(t))


class Adagrad(RegularizedOptimizer):
    r"""Adagrad with lr decay, maximize, and descend's regularization.

    Args:
        params: tensors, parameter-group dicts, or ``(name, tensor)`` pairs.
        lr: learning rate γ (default 1e-2).
        lr_decay: η ≥ 0: the step at count t is γ/(1 + (t − 1)η) (default 0).
        weight_decay: λ ≥ 0 (default 0); see ``decay``.
        initial_accumulator_value: τ ≥ 0, where the sum of squared gradients starts (default 0).
        eps: ε ≥ 0 added to its root (default 1e-10).
        foreach, fused: force the multi-tensor or the fused implementation (``foreach=False`` forces
            the per-tensor reference); by default the fastest one that applies.
        maximize, l1, nonfinite, flat, warn: as for :class:`descend.SGD`.
        decay: ``"coupled"`` (default: torch's L2 ``weight_decay``), ``"decoupled"``,
            ``"independent"``, ``"fixed"`` or ``"corrected"``; see :mod:`descend.regularization`.

    The update rule is in the docstring of :mod:`descend.optimizers.adagrad`.
    """

    state_spec = STATE
    _sparse_grads = True
    _absorbs = {"fused": Absorbs(maximize=True, coupled=True)}
    _tensor_lr_paths = ("single", "foreach", "fused")
    _amp_fused = True
    _group_keys = ("lr_decay", "initial_accumulator_value")

    def __init__(self, params: Any, lr: float | Tensor = 1e-2, lr_decay: float = 0, weight_decay: float = 0,
                 initial_accumulator_value: float = 0, eps: float = 1e-10, foreach: bool | None = None, *,
                 maximize: bool = False, fused: bool | None = None, decay: str = "coupled", l1: float = 0,
                 nonfinite: str = "ignore", flat: bool = False, warn: bool = True) -> None:
        check_flag("flat", flat)
        defaults = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, eps=eps, l1=l1, decay=decay,
                        maximize=maximize, foreach=foreach, fused=fused)
        super().__init__(params, defaults, nonfinite=nonfinite, warn=warn, flat=False)
        # torch makes the state of every parameter here: its state dict has it before any step
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state.get(p):
                    self.state[p] = self._new_state(p, group)
        if flat:  # after the state, so that the flat buffers start with it
            self._use_flat_storage()

    def _new_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = super()._new_state(param, group)
        value = group["initial_accumulator_value"]
        state["sum"] = torch.full_like(param, complex(value, value) if param.is_complex() else value,
                                       memory_format=torch.preserve_format)
        return state

    def _check_group(self, group: dict[str, Any]) -> None:
        check_number("lr_decay", group["lr_decay"], low=0)
        check_number("initial_accumulator_value", group["initial_accumulator_value"], low=0)
        check_number("eps", group["eps"], low=0)

    def _implementation(self, batch: GroupBatch) -> str:
        """The per-tensor reference for a group with a sparse gradient (nn.Embedding(sparse=True)),
        as torch: only it has the sparse update. Coupled terms would make such a gradient dense,
        so they are refused, as torch refuses them, and before anything changes."""
        if not any(g.is_sparse for g in batch.grads):
            return super()._implementation(batch)
        group = batch.group
        if group.get("fused"):
            raise RuntimeError("fused=True does not support sparse gradients; nothing was changed")
        if group["decay"] == "coupled" and (group["weight_decay"] != 0 or group["l1"] != 0):
            raise RuntimeError("weight_decay and l1 with decay='coupled' would make a sparse gradient dense "
                               "(a decoupled mode would not); nothing was changed")
        return "single"

    def _update(self, batch: GroupBatch, implementation: str) -> None:
        group, terms = batch.group, batch.terms
        steps = batch.state_list("step")
        if implementation == "fused" and not (all(map(IS_CPU, batch.params)) and all(map(IS_CPU, steps))):
            # the fused kernel reads the counts on the parameter's device
            for p, state in zip(batch.params, batch.states, strict=True):
                if state["step"].device != p.device:
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
            steps = batch.state_list("step")
        adagrad(batch.params, batch.grads, batch.state_list("sum"), steps, lr=group["lr"],
                lr_decay=group["lr_decay"], eps=group["eps"], maximize=terms.maximize,
                weight_decay=terms.weight_decay, implementation=implementation, grad_scale=batch.grad_scale,
                found_inf=batch.found_inf)
