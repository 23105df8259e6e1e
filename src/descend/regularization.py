r"""Weight decay and L1: the only place in descend where their math lives.

Every optimizer takes ``weight_decay`` (λ ≥ 0), ``l1`` (λ₁ ≥ 0) and ``decay``, which says
how both are applied. With lr the group's current learning rate and lr₀ = ``group["base_lr"]``
the learning rate the group had when it was given to the optimizer:

=================  ==============================  =========================================
``decay=``         weight decay                    L1
=================  ==============================  =========================================
``"coupled"``      g ← g + λ·θ (before the rule)   g ← g + λ₁·sgn(θ)
``"decoupled"``    θ ← θ·(1 − lr·λ)                θ ← sgn(θ)·max(|θ| − lr·λ₁, 0)
``"independent"``  θ ← θ·(1 − (lr/lr₀)·λ)          threshold (lr/lr₀)·λ₁
``"fixed"``        θ ← θ·(1 − λ)                   threshold λ₁
``"corrected"``    θ ← θ·(1 − λ·lr²/lr₀)           threshold λ₁·lr²/lr₀
=================  ==============================  =========================================

Coupled decay is L2 regularization: ``weight_decay=λ`` is the gradient of
λ/2·‖θ‖² (:func:`l2_penalty`), so a loss term ``c·‖θ‖²`` corresponds to ``weight_decay=2c``,
and ``l1=λ₁`` is the (sub)gradient of λ₁·‖θ‖₁ (:func:`l1_penalty`).

The decoupled modes differ only in the *scale* s that multiplies λ and λ₁:
s = lr ("decoupled", torch's AdamW), s = lr/lr₀ ("independent", the AdamW paper's schedule
multiplier η_t; MosaicML's DecoupledAdamW), s = 1 ("fixed"; 0 at lr = 0, so that a step at
lr = 0 is no step in every mode, which torch's distributed checkpoint relies on when it creates
optimizer state) and s = lr²/lr₀ ("corrected": AdamC, Defazio et al. 2025, "Why Gradients
Rapidly Increase Near the End of Training"; timm's, HeavyBall's and pytorch-optimizer's
corrected variants). AdamC decays by λ·γ_t²/γ_max, γ_max the largest lr of the schedule, so
that the steady-state weight norm follows the schedule instead of growing as lr falls; descend
takes γ_max = lr₀, the lr the group was given, which is the peak of every decaying schedule
(cosine, linear, step) and of warmup-then-decay schedules whose warmup starts below it. Shrinking happens before the
update rule, as in torch's AdamW and line 12 of the paper's Algorithm 2, where the decay term
λ·θ_{t-1} is taken at the old parameters. L1 is applied after the update as a proximal step
(soft-thresholding), so weights that the update brings within the threshold become exactly 0.

Because every decoupled mode is θ ← θ·(1 − s·λ), each is torch's own decoupled rule with the
coefficient s·λ/lr: :func:`torch_decoupled_coefficient` gives it, which is how the fused
kernels serve all three modes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from descend.tensors import DTYPE, by_device_and_dtype
from descend.validation import check_number, invalid, scalar_value

DECAY_MODES = ("coupled", "decoupled", "independent", "fixed", "corrected")
DECOUPLED_MODES = ("decoupled", "independent", "fixed", "corrected")


_scalar = scalar_value


def check_regularization(group: dict[str, Any]) -> None:
    """Raise ValueError for a bad weight_decay, l1 or decay in a group (or the defaults)."""
    check_number("weight_decay", group["weight_decay"], low=0)
    check_number("l1", group["l1"], low=0)
    decay = group["decay"]
    if not isinstance(decay, str) or decay not in DECAY_MODES:
        raise invalid("decay", decay, ", ".join(repr(m) for m in DECAY_MODES))
    if decay == "fixed" and _scalar(group["weight_decay"]) >= 1:
        raise invalid("weight_decay", group["weight_decay"],
                      'a number in [0, 1) with decay="fixed", which multiplies θ by 1 - weight_decay')


def decoupled_scale(decay: str, lr: float | Tensor, base_lr: float) -> float:
    """The scale s that multiplies λ (and λ₁) in a decoupled mode: lr, lr/lr₀, 1 or lr²/lr₀."""
    if decay == "decoupled":
        return _scalar(lr)
    if decay == "independent":
        # lr₀ = 0 only for a group that never moves; no decay follows its (zero) schedule.
        return _scalar(lr) / base_lr if base_lr != 0 else 0.0
    if decay == "fixed":
        # A step at lr = 0 is no step in every mode: torch's distributed checkpoint creates
        # optimizer state by stepping at lr = 0 on zero gradients, and relies on that.
        return 1.0 if _scalar(lr) != 0 else 0.0
    if decay == "corrected":
        value = _scalar(lr)
        return value * value / base_lr if base_lr != 0 else 0.0
    raise ValueError(f"decoupled_scale: decay={decay!r} is not a decoupled mode {DECOUPLED_MODES}")


def decay_factor(decay: str, lr: float | Tensor, base_lr: float, weight_decay: float) -> float:
    """The factor θ is multiplied by in one step: 1 − s·λ (1 for coupled decay, where
    λ·θ goes into the gradient instead of multiplying θ)."""
    if decay == "coupled" or weight_decay == 0:
        return 1.0
    return 1.0 - decoupled_scale(decay, lr, base_lr) * weight_decay


def decay_factor_as_torch(decay: str, lr: float | Tensor, base_lr: float, weight_decay: float) -> float | Tensor:
    """:func:`decay_factor`, except that torch's decoupled rule with a tensor lr computes
    1 − lr·λ as a tensor in lr's dtype (float32 for ``torch.tensor(0.01)``); the reference
    implementations use this to reproduce torch to the last bit."""
    if decay == "decoupled" and weight_decay != 0 and isinstance(lr, Tensor):
        return 1 - lr * weight_decay
    return decay_factor(decay, lr, base_lr, weight_decay)


def l1_threshold(decay: str, lr: float | Tensor, base_lr: float, l1: float) -> float:
    """The soft-threshold of the L1 proximal step, s·λ₁ (0 for coupled L1)."""
    if decay == "coupled" or l1 == 0:
        return 0.0
    return decoupled_scale(decay, lr, base_lr) * l1


def torch_decoupled_coefficient(
    decay: str, lr: float | Tensor, base_lr: float, weight_decay: float
) -> float | None:
    """The ``weight_decay`` that torch's decoupled rule θ·(1 − lr·c) needs to apply
    this mode's factor 1 − s·λ: c = s·λ/lr. None where no such c exists (lr = 0 with a
    non-zero factor), in which case the caller multiplies θ itself."""
    if decay == "decoupled":
        return weight_decay  # exactly torch's coefficient, so the kernel computes 1 − lr·λ bit for bit
    lr_value = _scalar(lr)
    scaled = decoupled_scale(decay, lr, base_lr) * weight_decay
    if scaled == 0:
        return 0.0
    if lr_value == 0 or not math.isfinite(scaled / lr_value):
        return None
    return scaled / lr_value


#: the per-step shrink above which a setting warns: 1% of every weight at every step
IMPLAUSIBLE_SHRINK = 0.01


def check_factor(group: dict[str, Any], *, base_lr: float) -> None:
    """Raise ValueError if a decoupled mode would multiply θ by a factor ≤ 0 at the group's
    current lr (lr·λ ≥ 1, or a schedule that raised lr/lr₀ far enough): θ would flip sign or
    vanish. Checked at construction and before every step, so a step that would do it
    changes nothing."""
    decay, wd = group["decay"], group["weight_decay"]
    if decay == "coupled" or wd == 0:
        return
    factor = _scalar(decay_factor(decay, group["lr"], base_lr, wd))
    if factor <= 0:
        raise invalid("weight_decay", wd,
                      f"a λ whose factor 1 − s·λ stays above 0: with decay={decay!r}, lr={_scalar(group['lr']):g} "
                      f"and lr₀={base_lr:g} θ would be multiplied by {factor:g}; nothing was changed")


def warn_if_implausible(group: dict[str, Any], label: str) -> None:
    """One UserWarning for a decoupled setting that shrinks the weights by more than 1% per
    step at the group's lr: it names the group, the factor and the timescale (steps in which
    decay alone shrinks θ by e), and for "independent" the λ of torch's AdamW it amounts to."""
    decay, wd, lr, base_lr = group["decay"], group["weight_decay"], _scalar(group["lr"]), group["base_lr"]
    if decay == "coupled" or wd == 0:
        return
    from descend.timescale import timescale_of_factor  # (it imports this module)

    factor = decay_factor(decay, lr, base_lr, wd)
    if 1 - factor <= IMPLAUSIBLE_SHRINK:
        return
    message = (f"{label}: decay={decay!r} with weight_decay={wd:g} multiplies the weights by {factor:.4g} at every "
               f"step at lr={lr:g} (timescale {timescale_of_factor(factor):.3g} steps)")
    if decay == "independent" and base_lr > 0:
        message += (f"; 'independent' takes the AdamW paper's λ, per step at lr₀: this is torch's AdamW with "
                    f"weight_decay={wd / base_lr:.4g}, and torch's weight_decay={wd:g} is weight_decay={wd * base_lr:.3g}"
                    f" here")
    warnings.warn(message + ". Pass warn=False to the optimizer to silence this.", UserWarning,
                  stacklevel=_caller_stacklevel())


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside descend and torch.optim: the user's line that
    built the optimizer or added the group, however deep the constructors are."""
    import sys

    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (name == "descend" or name.startswith(("descend.", "torch.optim", "torch.utils"))):
            return level
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return level


# --- the plan of one step, and where the pipeline applies it -------------------------


@dataclass(frozen=True)
class DecayPlan:
    """What a group's regularization does in one step, for every implementation of every rule.

    - ``grad_weight_decay``, ``grad_l1``: λ and λ₁ of the coupled terms g ← g + λ·θ + λ₁·sgn(θ)
      (0 in the decoupled modes);
    - ``factor``: θ ← θ·factor before the rule (1 for coupled decay); a tensor where torch's
      own rule computes 1 − lr·λ from a tensor lr;
    - ``threshold``: the soft-threshold of the L1 prox after the rule (0 for coupled L1);
    - ``kernel_coefficient``: the c with 1 − lr·c = factor, which lets a kernel that decays
      decoupled by 1 − lr·c (torch's fused AdamW) serve every decoupled mode; None where no c
      exists (lr = 0 with a non-zero factor), and then the pipeline multiplies θ itself.
    """

    grad_weight_decay: float
    grad_l1: float
    factor: float | Tensor
    threshold: float
    kernel_coefficient: float | None

    @property
    def shrinks(self) -> bool:
        return isinstance(self.factor, Tensor) or self.factor != 1.0

    def applied_by(self, absorbs: Absorbs, *, maximize: bool) -> bool:
        """Whether a kernel that ``absorbs`` these terms applies all of this plan itself, so
        that nothing is done around it (what a kernel that skips a step on a device flag needs)."""
        return ((not maximize or absorbs.maximize) and self.grad_l1 == 0 and self.threshold == 0
                and (self.grad_weight_decay == 0 or absorbs.coupled)
                and (not self.shrinks or (absorbs.decoupled and self.kernel_coefficient is not None)))


def plan(group: dict[str, Any], lr: float | Tensor | None = None) -> DecayPlan:
    """The :class:`DecayPlan` of a group at its current lr (or at ``lr``, the lr as the
    implementation sees it: a tensor lr stays a tensor where torch's rule keeps it one)."""
    decay, wd, l1, base_lr = group["decay"], group["weight_decay"], group["l1"], group["base_lr"]
    lr = group["lr"] if lr is None else lr
    if decay == "coupled":
        return DecayPlan(float(wd), float(l1), 1.0, 0.0, 0.0)
    coefficient = torch_decoupled_coefficient(decay, lr, base_lr, wd) if wd != 0 else 0.0
    return DecayPlan(0.0, 0.0, decay_factor_as_torch(decay, lr, base_lr, wd), l1_threshold(decay, lr, base_lr, l1),
                     coefficient)


@dataclass(frozen=True)
class Absorbs:
    """What an implementation's kernel applies itself, so that the pipeline does not:
    the sign flip of ``maximize``, coupled weight decay (the kernel's ``weight_decay`` as
    g + c·θ) and decoupled weight decay (the kernel's ``weight_decay`` as θ·(1 − lr·c))."""

    maximize: bool = False
    coupled: bool = False
    decoupled: bool = False


NOTHING = Absorbs()


@dataclass(frozen=True)
class KernelTerms:
    """What the pipeline leaves to the kernel (all neutral for an implementation that absorbs
    nothing): whether it negates the gradient, and its ``weight_decay`` argument, coupled or
    decoupled."""

    maximize: bool = False
    weight_decay: float = 0.0
    decoupled: bool = False


def regularize_before(params: list[Tensor], grads: list[Tensor], p: DecayPlan, *, maximize: bool,
                      absorbs: Absorbs = NOTHING, foreach: bool = True) -> tuple[list[Tensor], KernelTerms]:
    """The half of a step before the update rule: the gradients the rule sees, and θ shrunk.

    g ← −g when maximizing, then g ← g + λ·θ + λ₁·sgn(θ) (coupled), as torch's rules do
    (new gradient tensors; the caller's are not changed); θ ← θ·factor (decoupled modes).
    Whatever the kernel ``absorbs`` is left to it and described by the returned terms; a
    coupled term the kernel does not take is added with the sign the kernel's own negation
    will flip back."""
    negate = maximize and not absorbs.maximize
    if negate:
        grads = [-g for g in grads] if not foreach else list(torch._foreach_neg(grads))
    wd, kernel_wd, decoupled = p.grad_weight_decay, 0.0, False
    if absorbs.coupled and wd != 0:
        wd, kernel_wd = 0.0, wd
    sign = -1.0 if (maximize and absorbs.maximize) else 1.0
    if wd != 0 or p.grad_l1 != 0:
        if foreach:
            grads = coupled_gradients_(params, grads, sign * wd, sign * p.grad_l1)
        else:
            grads = [coupled_gradient(t, g, sign * wd, sign * p.grad_l1) for t, g in zip(params, grads)]
    if p.shrinks:
        if absorbs.decoupled and p.kernel_coefficient is not None:
            kernel_wd, decoupled = p.kernel_coefficient, True
        elif foreach:
            decay_(params, p.factor)
        else:
            for t in params:
                t.mul_(p.factor)
    return grads, KernelTerms(maximize and absorbs.maximize, kernel_wd, decoupled)


def regularize_after(params: list[Tensor], p: DecayPlan) -> None:
    """The half of a step after the update rule: the L1 prox, θ ← sgn(θ)·max(|θ| − t, 0)."""
    prox_l1_foreach_(params, p.threshold)


# --- coupled: terms added to the gradient ---------------------------------------------


def coupled_gradient(param: Tensor, grad: Tensor, weight_decay: float, l1: float) -> Tensor:
    """g + λ·θ + λ₁·sgn(θ), as a new tensor (the caller's gradient is not modified)."""
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    if l1 != 0:
        grad = grad.add(torch.sgn(param), alpha=l1)
    return grad


def coupled_gradients_(params: list[Tensor], grads: list[Tensor], weight_decay: float, l1: float) -> list[Tensor]:
    """Multi-tensor :func:`coupled_gradient`: returns g + λ·θ + λ₁·sgn(θ) for each tensor.

    The returned list holds new tensors; the inputs are not modified."""
    if weight_decay != 0:
        grads = list(torch._foreach_add(grads, params, alpha=weight_decay))
    if l1 != 0:
        signs = torch._foreach_sign(params)
        if weight_decay != 0:
            torch._foreach_add_(grads, signs, alpha=l1)
        else:
            grads = list(torch._foreach_add(grads, signs, alpha=l1))
    return grads


# --- decoupled: shrinking θ and the L1 proximal step ----------------------------------


def decay_(params: list[Tensor], factor: float | Tensor) -> None:
    """θ ← θ·factor for every tensor (nothing to do when factor is 1)."""
    if (isinstance(factor, Tensor) or factor != 1.0) and params:
        torch._foreach_mul_(params, factor)


def prox_l1_(param: Tensor, threshold: float) -> None:
    """Soft-threshold in place: θ ← sgn(θ)·max(|θ| − t, 0), the proximal map of t·‖θ‖₁.

    For a complex θ, sgn(θ) = θ/|θ|, which shrinks the modulus and keeps the phase."""
    if threshold == 0:
        return
    if not param.is_complex():
        # torch's softshrink written into θ itself: one read and one write of θ, where
        # θ − clamp(θ, −t, t) costs three of each and a temporary (the public
        # F.softshrink has no in-place form; the out= overload is missing from torch's stubs)
        torch._C._nn.softshrink(param, threshold, out=param)  # type: ignore[call-arg]
        return
    magnitude = (param.abs() - threshold).clamp_(min=0)
    param.copy_(torch.sgn(param) * magnitude)


def prox_l1_foreach_(params: list[Tensor], threshold: float) -> None:
    """:func:`prox_l1_` over a list of tensors.

    torch has no multi-tensor soft-threshold; a foreach clamp-and-subtract would read and
    write θ three times and allocate a copy, so one in-place :func:`prox_l1_` per tensor
    costs less on all but the smallest tensors (and flat storage makes it a single call)."""
    if threshold == 0:
        return
    if params and not params[0].is_cpu and sum(map(Tensor.numel, params)) < FOREACH_PROX_NUMEL * len(params):
        # on an accelerator a launch per tensor costs more than the extra passes over small tensors
        prox_l1_multi_tensor_(params, threshold)
        return
    if any(dtype.is_complex for dtype in set(map(DTYPE, params))):
        for param in params:
            prox_l1_(param, threshold)
        return
    shrink = torch._C._nn.softshrink  # prox_l1_'s real case, inlined: this loop runs at every step
    for param in params:
        shrink(param, threshold, out=param)  # type: ignore[call-arg]


#: below this mean number of elements per tensor, off the CPU, the prox is multi-tensor
FOREACH_PROX_NUMEL = 65536


def prox_l1_multi_tensor_(params: list[Tensor], threshold: float) -> None:
    """:func:`prox_l1_` in three multi-tensor launches, whatever the number of tensors:
    sgn(θ)·max(|θ| − t, 0) = θ − clamp(θ, −t, t) (exactly, in float32 and float64: θ − θ = 0
    inside the threshold, and the same single rounding of θ ∓ t outside it)."""
    for group in by_device_and_dtype(params):
        # no complex clamp (the phase-keeping form, per tensor); and a 16-bit clamp would round t to
        # θ's dtype, where softshrink subtracts it in float32: per tensor too
        if group[0].dtype not in (torch.float32, torch.float64):
            for param in group:
                prox_l1_(param, threshold)
            continue
        inside = torch._foreach_clamp_max(group, threshold)
        torch._foreach_clamp_min_(inside, -threshold)
        torch._foreach_sub_(group, inside)


# --- the loss-term route ---------------------------------------------------------------


def _tensors(params: Iterable[Tensor] | torch.nn.Module) -> list[Tensor]:
    if isinstance(params, torch.nn.Module):
        return list(params.parameters())
    return [p for p in params]


def _squared_sum(t: Tensor) -> Tensor:
    if t.is_complex():
        return t.real.pow(2).sum() + t.imag.pow(2).sum()
    return t.pow(2).sum()


def l2_penalty(params: Iterable[Tensor] | torch.nn.Module) -> Tensor:
    r"""Σ θ² over all tensors (the squared L2 norm, differentiable).

    ``loss + λ/2 · l2_penalty(params)`` under plain SGD or Adam equals
    ``weight_decay=λ`` with ``decay="coupled"``; the tutorials' ``λ·Σθ²`` is
    ``weight_decay=2λ``."""
    tensors = _tensors(params)
    if not tensors:
        return torch.zeros(())
    return torch.stack([_squared_sum(t) for t in tensors]).sum()


def l1_penalty(params: Iterable[Tensor] | torch.nn.Module) -> Tensor:
    r"""Σ |θ| over all tensors (the L1 norm, differentiable away from 0).

    ``loss + λ₁ · l1_penalty(params)`` equals ``l1=λ₁`` with ``decay="coupled"``."""
    tensors = _tensors(params)
    if not tensors:
        return torch.zeros(())
    return torch.stack([t.abs().sum() for t in tensors]).sum()


def describe(group: dict[str, Any]) -> str:
    """One line saying what a group's regularization does to θ, for :func:`descend.explain`."""
    decay, wd, l1 = group.get("decay", "coupled"), group.get("weight_decay", 0), group.get("l1", 0)
    if wd == 0 and l1 == 0:
        return "none"
    parts = []
    if decay == "coupled":
        if wd:
            parts.append(f"g += {wd:g}·θ")
        if l1:
            parts.append(f"g += {l1:g}·sgn(θ)")
    else:
        scale = {"decoupled": "lr", "independent": "(lr/lr₀)", "fixed": "", "corrected": "(lr²/lr₀)"}[decay]
        if wd:
            parts.append(f"θ *= 1 − {scale}{'·' if scale else ''}{wd:g}")
        if l1:
            parts.append(f"prox L1 {scale}{'·' if scale else ''}{l1:g}")
    return "; ".join(parts)
