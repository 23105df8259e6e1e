"""Parameter groups built from a model by rule: what is decayed and what is not.

Weight decay (and L1) is meant for the weights that multiply inputs. Biases, the scales
and shifts of normalization layers, and embedding tables are conventionally left alone
(timm, Hugging Face, nanoGPT all exclude them), but ``model.parameters()`` hands every
tensor to the optimizer with the same ``weight_decay``. :func:`param_groups` splits them:

- excluded by default: parameters with ``ndim <= 1`` (biases, norm scales), every parameter
  of a normalization layer or of ``nn.Embedding`` / ``nn.EmbeddingBag`` (their weights are
  2-D, so the ndim rule alone would miss them), and the names the model's
  ``no_weight_decay()`` returns (timm's convention);
- ``no_decay``: name patterns (``fnmatch``) added to that rule, or a callable
  ``(name, param) -> bool`` that replaces it;
- frozen parameters (``requires_grad=False``) are left out, tied parameters appear once,
  and the names are those of the model itself, with the ``module.`` of DDP and the
  ``_orig_mod.`` of ``torch.compile`` removed.

The groups carry the parameter names, so any optimizer (torch's too) and
:func:`descend.explain` can show them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["param_groups", "NO_DECAY_MODULES", "unwrap", "canonical_name"]

#: module types none of whose parameters are decayed by default.
NO_DECAY_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.Embedding,
    nn.EmbeddingBag,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def canonical_name(name: str) -> str:
    """A parameter name without the prefixes that wrappers add anywhere along it."""
    parts = [p for p in name.split(".") if f"{p}." not in _WRAPPER_PREFIXES]
    return ".".join(parts)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == pat or fnmatch.fnmatchcase(name, pat) for pat in patterns)


def _default_no_decay(model: nn.Module, patterns: Iterable[str]) -> Callable[[str, torch.Tensor], bool]:
    excluded_ids = {
        id(p)
        for module in model.modules()
        if isinstance(module, NO_DECAY_MODULES)
        for p in module.parameters(recurse=False)
    }
    names = list(patterns)
    hook = getattr(model, "no_weight_decay", None)
    if callable(hook):
        names.extend(str(n) for n in hook())

    def rule(name: str, param: torch.Tensor) -> bool:
        return param.ndim <= 1 or id(param) in excluded_ids or _matches(name, names)

    return rule


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    l1: float = 0.0,
    no_decay: Iterable[str] | Callable[[str, torch.Tensor], bool] | None = None,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into a decayed and a not-decayed group.

    Args:
        model: the model (DDP- and ``torch.compile``-wrapped models are unwrapped).
        weight_decay: λ for the decayed group; the other group gets 0.
        l1: λ₁ for the decayed group; the other group gets 0.
        no_decay: extra name patterns to exclude (``fnmatch``, e.g. ``"*.pos_embed"``), or
            a callable ``(name, param) -> bool`` that replaces the default rule.
        **group_options: other options set on both groups (``lr``, ``decay``, …).

    Returns:
        A list of parameter-group dicts whose ``params`` are ``(name, parameter)`` pairs:
        first the decayed group, then the not-decayed one (an empty group is left out).

    Example::

        opt = descend.AdamW(descend.param_groups(model, weight_decay=0.05), lr=3e-4)
    """
    inner = unwrap(model)
    if callable(no_decay):
        rule = no_decay
    else:
        patterns = [no_decay] if isinstance(no_decay, str) else list(no_decay or [])
        rule = _default_no_decay(inner, patterns)
    decayed: list[tuple[str, nn.Parameter]] = []
    kept: list[tuple[str, nn.Parameter]] = []
    for raw_name, param in inner.named_parameters():  # tied parameters are reported once
        if not param.requires_grad:
            continue
        name = canonical_name(raw_name)
        (kept if rule(name, param) else decayed).append((name, param))
    groups = []
    if decayed:
        groups.append({"params": decayed, "weight_decay": weight_decay, "l1": l1, **group_options})
    if kept:
        groups.append({"params": kept, "weight_decay": 0.0, "l1": 0.0, **group_options})
    return groups
