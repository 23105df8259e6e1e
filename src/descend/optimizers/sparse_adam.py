r"""SparseAdam: Adam for sparse gradients, whose moments and parameters move only where the gradient has entries.

.. math::
   \begin{aligned}
   &g_t \leftarrow \pm\nabla f(\theta_{t-1}) \quad(\text{minus when maximizing; sparse: entries at } I_t)\\
   &\text{for } i \in I_t:\quad m_{t,i} \leftarrow \beta_1 m_{t-1,i} + (1-\beta_1) g_{t,i}, \qquad
    v_{t,i} \leftarrow \beta_2 v_{t-1,i} + (1-\beta_2) g_{t,i}^2\\
   &\phantom{\text{for } i \in I_t:}\quad \theta_{t,i} \leftarrow \theta_{t-1,i} -
    \frac{\gamma\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,\frac{m_{t,i}}{\sqrt{v_{t,i}} + \epsilon}\\
   &\text{elsewhere } m, v \text{ and } \theta \text{ keep their values}
   \end{aligned}

with γ = lr, m = ``exp_avg`` and v = ``exp_avg_sq`` (zeros at first) and t = ``step``, one count
per parameter (a plain int, as torch keeps it), advanced at every step in which the parameter has
a gradient, even one with no entries. Duplicate indices are summed first (the update is not
linear in g). This is the masked approximation of Adam that ``nn.Embedding(sparse=True)`` is for:
a row that no example touched keeps its moments, where Adam would decay them.

No regularization: ``weight_decay`` and ``l1`` must be 0 (torch's SparseAdam has neither). A coupled
term λθ is dense, so the gradient would no longer be sparse, and a decoupled shrink or an L1 prox
would touch every row at every step: the dense pass over the whole table that sparse gradients
exist to avoid. For that, use :class:`descend.Adam` or :class:`descend.AdamW` with dense gradients.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from descend.optimizer import GroupBatch, RegularizedOptimizer
from descend.optimizers.adam import check_betas
from descend.state import SCALAR, Entry, StateSpec
from descend.validation import check_number, invalid, scalar_value

__all__ = ["SparseAdam", "sparse_adam"]

STATE = StateSpec((
    # an int on the host, as torch keeps it (its step size is a host number); made by the class
    Entry("step", SCALAR, init=None, low=0, device="cpu", tensor=False),
    Entry("exp_avg"),
    Entry("exp_avg_sq", low=0),
))

DENSE_GRADIENT = "SparseAdam does not support dense gradients, please consider Adam instead"


def sparse_adam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                steps: list[int], *, lr: float | Tensor, beta1: float, beta2: float, eps: float,
                implementation: str = "single") -> None:
    """Functional SparseAdam over lists of tensors (sparse gradients; ``steps`` already advanced, as
    torch's functional form takes them; maximize is the pipeline's). One form: the reference."""
    if implementation != "single":
        raise ValueError(f"Invalid implementation: {implementation!r} (allowed: 'single': SparseAdam has no other form)")
    # a tensor lr stays one: torch's step size is then a 0-dim tensor in its dtype
    lr = lr.reshape(()) if isinstance(lr, Tensor) else float(lr)
    beta1, beta2, eps = float(beta1), float(beta2), float(eps)
    for param, grad, exp_avg, exp_avg_sq, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        grad = grad.coalesce()
        indices, values = grad._indices(), grad._values()
        if values.numel() == 0:
            continue
        size = grad.size()

        def at_indices(v: Tensor, indices: Tensor = indices, size: torch.Size = size) -> Tensor:
            return torch.sparse_coo_tensor(indices, v, size, check_invariants=False)  # (a coalesced gradient's)

        # m ← m + (1 − β₁)(g − m) at the gradient's entries (the moments as values there)
        old_exp_avg = exp_avg.sparse_mask(grad)._values()
        exp_avg_update = values.sub(old_exp_avg).mul_(1 - beta1)
        exp_avg.add_(at_indices(exp_avg_update))
        old_exp_avg_sq = exp_avg_sq.sparse_mask(grad)._values()
        exp_avg_sq_update = values.pow(2).sub_(old_exp_avg_sq).mul_(1 - beta2)
        exp_avg_sq.add_(at_indices(exp_avg_sq_update))
        # m_t and v_t at those entries again, from the values at hand (no second sparse_mask)
        numer = exp_avg_update.add_(old_exp_avg)
        denom = exp_avg_sq_update.add_(old_exp_avg_sq).sqrt_().add_(eps)
        step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        param.add_(at_indices(-step_size * numer.div_(denom)))


def _values_only(batch: GroupBatch) -> GroupBatch:
    """The batch with each sparse gradient's stored values in its place (what finiteness reads)."""
    grads = [g._values() if g.is_sparse else g for g in batch.grads]
    return GroupBatch(batch.group, batch.params, grads, batch.states)


class SparseAdam(RegularizedOptimizer):
    r"""SparseAdam: Adam's moments and steps at the entries of sparse gradients only.

    Args:
        params: dense tensors whose gradients are sparse (``nn.Embedding(sparse=True)``),
            parameter-group dicts, or ``(name, tensor)`` pairs; real, not complex.
        lr: learning rate γ > 0 (default 1e-3).
        betas: (β₁, β₂), each in [0, 1) (default (0.9, 0.999)).
        eps: ε > 0 added to the denominator (default 1e-8).
        maximize: maximize the objective (default False).
        weight_decay, l1: only 0 (see :mod:`descend.optimizers.sparse_adam` for why); ``decay`` is
            accepted for the shared vocabulary and changes nothing.
        nonfinite, warn: as for :class:`descend.SGD` (no foreach, fused or flat form).

    A dense gradient is refused at the step, as torch does. The update rule is in the docstring
    of :mod:`descend.optimizers.sparse_adam`.
    """

    state_spec = STATE
    _fast_paths = ()
    _tensor_lr_paths = ("single",)
    _steps_complex = False
    _sparse_grads = True
    _group_keys = ("betas", "eps")

    def __init__(self, params: Any, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, maximize: bool = False, *, weight_decay: float = 0, l1: float = 0,
                 decay: str = "coupled", nonfinite: str = "ignore", warn: bool = True) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, maximize=maximize, weight_decay=weight_decay, l1=l1,
                        decay=decay)
        super().__init__(params, defaults, nonfinite=nonfinite, warn=warn)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict):
            params = param_group.get("params")
            params = [params] if isinstance(params, Tensor) else params
            if isinstance(params, (list, tuple)):
                index = len(self.param_groups)
                tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]
                sparse = [[index, i] for i, t in enumerate(tensors) if isinstance(t, Tensor) and t.is_sparse]
                if sparse:  # (torch's words first)
                    raise ValueError(f"Sparse params at indices {sparse}: SparseAdam requires dense parameter "
                                     "tensors (params; allowed: dense tensors, whose gradients are sparse)")
        super().add_param_group(param_group)

    def _new_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        return {"step": 0, **super()._new_state(param, group)}

    def _check_group(self, group: dict[str, Any]) -> None:
        check_number("lr", group["lr"], low=0, low_open=True)
        check_betas(group["betas"])
        check_number("eps", group["eps"], low=0, low_open=True)
        why = ("a coupled term λθ is dense (the gradient would not be sparse), a decoupled shrink or an L1 prox "
               "touches every row at every step; use Adam or AdamW with dense gradients")
        for key in ("weight_decay", "l1"):
            if scalar_value(group[key]) != 0:
                raise invalid(key, group[key], f"0: SparseAdam has no regularization ({why})")

    def _check_grads(self, params: list[Tensor], grads: list[Tensor]) -> list[torch.Size]:
        for p, g in zip(params, grads, strict=True):
            if not g.is_sparse:
                raise RuntimeError(f"{DENSE_GRADIENT} ({self._describe_param(p)} has a dense gradient; "
                                   "nothing was changed)")
        return super()._check_grads(params, grads)

    # the non-finite guard reads the gradients' stored values (a sparse tensor has no norm kernel)
    def _grads_are_finite(self, batches: list[GroupBatch]) -> bool:
        return super()._grads_are_finite([_values_only(b) for b in batches])

    def _first_nonfinite(self, batches: list[GroupBatch]) -> Tensor:
        return super()._first_nonfinite([_values_only(b) for b in batches])

    def _update(self, batch: GroupBatch, implementation: str) -> None:
        group = batch.group
        for state in batch.states:
            state["step"] += 1
        beta1, beta2 = group["betas"]
        sparse_adam(batch.params, batch.grads, batch.state_list("exp_avg"), batch.state_list("exp_avg_sq"),
                    batch.state_list("step"), lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                    implementation=implementation)
