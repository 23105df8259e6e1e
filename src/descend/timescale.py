r"""Weight decay as a timescale: how many steps decay alone takes to shrink the weights by e.

Every decoupled mode multiplies θ by a factor f = 1 − s·λ per step (:func:`descend.regularization.decay_factor`;
s = lr, lr/lr₀, 1 or lr²/lr₀). After τ steps at a constant lr decay alone has shrunk θ by f^τ, so

.. math::

    τ = -\frac{1}{\ln f} = -\frac{1}{\ln(1 - s·λ)} = \frac{1}{s·λ} - \frac{1}{2} + O(s·λ)

is the number of steps in which θ shrinks by a factor e (:func:`timescale`, and the ``timescale``
column of :func:`descend.explain`). It is ∞ without decay, and for coupled decay, whose λ·θ joins
the gradient and so has an effect that depends on the update rule rather than a fixed shrink.

Choosing λ from a timescale (Wang & Aitchison 2024, "How to set AdamW's weight decay as you scale
model and dataset size"). AdamW's decoupled update θ_t = (1 − η·λ)·θ_{t−1} − η·u_t unrolls to an
exponential moving average of the recent updates −u_t/λ with weight η·λ, so its memory is

.. math::

    τ_{iter} = \frac{1}{η·λ}\ \text{iterations}, \qquad
    τ_{epoch} = \frac{τ_{iter}}{M}\ \text{epochs}, \quad M = \text{iterations per epoch} = B/b,

with η the lr and λ torch's (``decay="decoupled"``) weight decay. Their finding is that the best
τ_epoch stays roughly constant as model and dataset size change, so one tuned τ_epoch carries over:

.. math::

    λ = \frac{1}{η·τ_{epoch}·M}.

As the dataset grows (M grows), λ falls; as the model grows with the μP rule that lr falls with width,
λ rises. In descend, ``weight_decay_for_timescale(tau_epoch * iterations_per_epoch, decay=..., lr=lr)``
gives this λ for any decoupled mode; it inverts the exact τ = −1/ln(1 − s·λ) rather than the
first-order 1/(s·λ), a difference of half a step.

The AdamW paper's normalized weight decay (Loshchilov & Hutter, "Decoupled Weight Decay
Regularization", appendix B) is the other rule for carrying λ across run lengths:
:func:`normalized_weight_decay`.
"""

from __future__ import annotations

import math
from typing import Any

from descend.regularization import DECAY_MODES, DECOUPLED_MODES, decay_factor, decoupled_scale
from descend.validation import check_int, check_number, invalid, scalar_value

__all__ = ["timescale", "timescale_of_factor", "weight_decay_for_timescale", "normalized_weight_decay"]


def _check_decay(decay: Any, modes: tuple[str, ...], why: str = "") -> None:
    if not isinstance(decay, str) or decay not in modes:
        raise invalid("decay", decay, ", ".join(repr(m) for m in modes) + why)


def timescale_of_factor(factor: float) -> float:
    r"""τ = −1/ln(f): the steps in which a per-step factor f shrinks θ by e, so that f^τ = 1/e.

    ∞ for f ≥ 1 (no shrink) and 0 for f ≤ 0 (θ zeroed, or its sign flipped, within one step)."""
    f = scalar_value(factor)
    if math.isnan(f):
        return math.nan
    if f >= 1:
        return math.inf
    if f <= 0:
        return 0.0
    return -1.0 / math.log(f)


def timescale(decay: str, *, weight_decay: float, lr: float, base_lr: float) -> float:
    r"""The steps in which decay alone shrinks θ by a factor e at learning rate ``lr``:
    τ = −1/ln(f) with f = 1 − s·λ the mode's per-step factor
    (:func:`descend.regularization.decay_factor`).

    ∞ for ``weight_decay=0``, at lr = 0, and for ``decay="coupled"`` (its λ·θ joins the gradient,
    so it is no fixed shrink). ``base_lr`` is lr₀, the lr the group was given (``group["base_lr"]``),
    which "independent" and "corrected" divide by. For small s·λ, τ ≈ 1/(s·λ) − 1/2."""
    _check_decay(decay, DECAY_MODES)
    check_number("weight_decay", weight_decay, low=0)
    check_number("lr", lr, low=0)
    check_number("base_lr", base_lr, low=0)
    return timescale_of_factor(decay_factor(decay, scalar_value(lr), scalar_value(base_lr), scalar_value(weight_decay)))


def weight_decay_for_timescale(steps: float, *, decay: str, lr: float, base_lr: float | None = None) -> float:
    r"""The ``weight_decay`` λ with which ``decay`` shrinks θ by a factor e in ``steps`` steps at ``lr``:
    the inverse of :func:`timescale`,

    .. math::

        λ = \frac{1 - e^{-1/τ}}{s}, \qquad s = lr,\ lr/lr₀,\ 1,\ lr²/lr₀
        \ \text{for "decoupled", "independent", "fixed", "corrected"},

    with lr₀ = ``base_lr`` (default: ``lr``, i.e. the λ to give an optimizer built at this lr).
    ``steps=math.inf`` gives 0. Coupled decay has no timescale (its effect depends on the update
    rule), so ``decay="coupled"`` is a ValueError, as are lr = 0 (no λ shrinks anything) and
    steps ≤ 0.

    Example: a timescale of 5 epochs of 1,000 iterations at lr 1e-3 with torch's AdamW
    (Wang & Aitchison's τ_epoch = 5) is ``weight_decay_for_timescale(5_000, decay="decoupled", lr=1e-3)``
    ≈ 0.2 (1/(lr·τ) = 0.2 to first order)."""
    _check_decay(decay, DECOUPLED_MODES,
                 " (coupled decay adds λ·θ to the gradient; its effect depends on the update rule, "
                 "so its λ has no timescale)")
    check_number("lr", lr, low=0, low_open=True)
    if base_lr is not None:
        check_number("base_lr", base_lr, low=0, low_open=True)
    if isinstance(steps, (int, float)) and not isinstance(steps, bool) and steps == math.inf:
        return 0.0
    check_number("steps", steps, low=0, low_open=True)
    lr_value = scalar_value(lr)
    lr0 = lr_value if base_lr is None else scalar_value(base_lr)
    shrink = -math.expm1(-1.0 / scalar_value(steps))  # s·λ = 1 − e^{−1/τ}
    weight_decay = shrink / decoupled_scale(decay, lr_value, lr0)
    if decay == "fixed" and weight_decay >= 1:
        raise invalid("steps", steps, 'a timescale for which decay="fixed" needs weight_decay < 1')
    return weight_decay


def normalized_weight_decay(lambda_norm: float, *, batch_size: int, dataset_size: int, epochs: float) -> float:
    r"""The AdamW paper's normalized weight decay (Loshchilov & Hutter, "Decoupled Weight Decay
    Regularization", appendix B):

    .. math::

        λ = λ_{norm}·\sqrt{\frac{b}{B·T}}

    with b the batch size, B the number of training examples and T the number of epochs, so that
    a λ_norm tuned for one run length carries over to another (the total decay over a run stays
    comparable as the number of steps B·T/b changes).

    The result is the paper's λ, which multiplies the schedule multiplier η_t and not the lr:

    - ``decay="independent"``: pass it as ``weight_decay`` unchanged (s = lr/lr₀ = η_t);
    - ``decay="decoupled"`` (torch's AdamW): divide by lr₀, ``weight_decay = λ / lr₀`` (s = lr = η_t·lr₀);
    - ``decay="corrected"``: also λ / lr₀, equal to "decoupled" at lr₀ (s = lr²/lr₀ = η_t²·lr₀; the
      decay falls with the square of the schedule instead);
    - ``decay="fixed"``: λ unchanged, the same per-step decay at lr₀ but not following the schedule;
    - ``decay="coupled"``: no equivalent (L2 through the update rule).
    """
    check_number("lambda_norm", lambda_norm, low=0)
    check_int("batch_size", batch_size, 1)
    check_int("dataset_size", dataset_size, 1)
    check_number("epochs", epochs, low=0, low_open=True)
    return scalar_value(lambda_norm) * math.sqrt(batch_size / (dataset_size * scalar_value(epochs)))
