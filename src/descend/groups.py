"""Parameter groups built from a model by rule: what is decayed and what is not.

Weight decay (and L1) is meant for the weights that multiply inputs. Biases, the scales
and shifts of normalization layers, and embedding tables are conventionally left alone
(timm, Hugging Face, nanoGPT all exclude them), but ``model.parameters()`` hands every
tensor to the optimizer with the same ``weight_decay``. :func:`param_groups` splits them:

- excluded by default: parameters with ``ndim <= 1`` (biases, norm scales), every parameter
  of a normalization layer or of ``nn.Embedding`` / ``nn.EmbeddingBag`` (their weights are
  2-D, so the ndim rule alone would miss them), and timm's two conventions, honoured on the
  model and on every submodule: the names (or ``fnmatch`` patterns) its ``no_weight_decay()``
  returns and the parameters whose names contain one of the substrings its
  ``no_weight_decay_keywords()`` returns, both relative to that submodule (``encoder``'s
  ``{"pos_embed"}`` excludes ``encoder.pos_embed``);
- ``no_decay``: name patterns (``fnmatch``) added to that rule, each matched against the name
  both with and without wrapper prefixes (so ``"*.fc.*"`` written for the DDP name
  ``module.fc.weight`` and ``"fc.*"`` written for the plain one both match), or a callable
  ``(name, param) -> bool`` that replaces the rule and sees the plain name;
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


def _matches(names: Iterable[str], patterns: Iterable[str]) -> bool:
    return any(name == pat or fnmatch.fnmatchcase(name, pat) for pat in patterns for name in names)


def _strip_leading_wrappers(name: str) -> str:
    while True:
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        else:
            return name


def _spellings(raw_name: str) -> tuple[str, ...]:
    """A parameter's name without any wrapper prefix (:func:`canonical_name`, first), as the
    wrapped model spells it, and without the leading prefixes only (the unwrapped model's name)."""
    return tuple(dict.fromkeys((canonical_name(raw_name), raw_name, _strip_leading_wrappers(raw_name))))


def _hook_names(module: nn.Module, hook: str) -> list[str]:
    method = getattr(module, hook, None)
    return [str(n) for n in method()] if callable(method) else []


def _default_no_decay(model: nn.Module, patterns: Iterable[str]) -> Callable[[tuple[str, ...], torch.Tensor], bool]:
    """The default rule over a parameter's spellings (:func:`_spellings`); ``model`` is unwrapped."""
    excluded_ids = {
        id(p)
        for module in model.modules()
        if isinstance(module, NO_DECAY_MODULES)
        for p in module.parameters(recurse=False)
    }
    names = list(patterns)
    hooked: list[str] = []  # no_weight_decay() of every submodule, as full (canonical) name patterns
    keywords: list[tuple[str, str]] = []  # (submodule prefix, substring) of no_weight_decay_keywords()
    for path, module in model.named_modules():
        prefix = f"{canonical_name(path)}." if canonical_name(path) else ""
        hooked += [prefix + n for n in _hook_names(module, "no_weight_decay")]
        keywords += [(prefix, k) for k in _hook_names(module, "no_weight_decay_keywords")]

    def rule(spellings: tuple[str, ...], param: torch.Tensor) -> bool:
        name = spellings[0]  # the canonical name
        return (param.ndim <= 1 or id(param) in excluded_ids or _matches(spellings, names)
                or _matches((name,), hooked)
                or any(name.startswith(prefix) and k in name[len(prefix):] for prefix, k in keywords))

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
        no_decay: extra name patterns to exclude (``fnmatch``, e.g. ``"*.pos_embed"``), matched
            against the name with and without wrapper prefixes (``module.fc.weight`` and
            ``fc.weight``), or a callable ``(name, param) -> bool`` that replaces the default
            rule and is given the name without prefixes.
        **group_options: other options set on both groups (``lr``, ``decay``, …).

    Returns:
        A list of parameter-group dicts whose ``params`` are ``(name, parameter)`` pairs:
        first the decayed group, then the not-decayed one (an empty group is left out).

    Example::

        opt = descend.AdamW(descend.param_groups(model, weight_decay=0.05), lr=3e-4)
    """
    rule: Callable[[tuple[str, ...], torch.Tensor], bool]
    if callable(no_decay):
        replaced = no_decay
        rule = lambda spellings, param: bool(replaced(spellings[0], param))  # noqa: E731 - the plain name
    else:
        patterns = [no_decay] if isinstance(no_decay, str) else list(no_decay or [])
        rule = _default_no_decay(unwrap(model), patterns)
    decayed: list[tuple[str, nn.Parameter]] = []
    kept: list[tuple[str, nn.Parameter]] = []
    # the wrapped model's names (module.fc.weight), for the patterns; tied parameters are reported once
    for raw_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        spellings = _spellings(raw_name)
        name = spellings[0]
        (kept if rule(spellings, param) else decayed).append((name, param))
    groups = []
    if decayed:
        groups.append({"params": decayed, "weight_decay": weight_decay, "l1": l1, **group_options})
    if kept:
        groups.append({"params": kept, "weight_decay": 0.0, "l1": 0.0, **group_options})
    return groups
