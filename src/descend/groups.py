"""Parameter groups built from a model by rule: what is decayed and what is not, and what Muon steps.

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

**What Muon steps.** With ``muon=True`` each group also gets an ``algorithm`` for
:class:`descend.Muon`: ``"muon"`` for the hidden weight matrices (the weights of ``nn.Linear``
layers and convolutions inside the network, flattened to 2-D, and stacks of matrices such as
mixture-of-experts weights [E, out, in], with ``matrix="stack"``), ``"adamw"`` for the rest:
embeddings, the output layer (a Linear tied to an embedding, and the last ``nn.Linear`` or
convolution the model registers), biases, norm parameters and every 0-D and 1-D tensor. The rule
and its limits are in :mod:`descend.routing`; ``muon=`` patterns or a callable replace it. Decay
is decided apart, by the rule above, so there are up to four groups: (Muon, AdamW) × (decayed,
not), and a Muon group of ``matrix="stack"`` parameters beside each Muon group that needs one.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from descend.routing import Routing
from descend.validation import invalid

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


#: what ``param_groups(muon=...)`` takes: the rule (True), none (False, None), patterns or a callable
MuonRule = bool | str | Iterable[str] | Callable[[str, torch.Tensor], bool] | None


def _muon_rule(model: nn.Module, muon: MuonRule) -> Callable[[tuple[str, ...], torch.Tensor], str | None]:
    """Over a parameter's spellings: the ``matrix`` mode where Muon steps it, ``None`` where AdamW
    does. ValueError for a ``muon=`` that is not a rule, and (at the call) for a parameter of
    fewer than 2 dimensions that patterns or a callable give to Muon."""
    routing = Routing(unwrap(model))
    if muon is True:
        return lambda spellings, param: routing.default(param)
    chosen: Callable[[tuple[str, ...], torch.Tensor], bool]
    if callable(muon):
        replaced = muon
        chosen = lambda spellings, param: bool(replaced(spellings[0], param))  # noqa: E731 - the plain name
    else:
        patterns = [muon] if isinstance(muon, str) else list(muon)  # type: ignore[arg-type]
        if not all(isinstance(p, str) for p in patterns):
            raise invalid("muon", muon, "True, False, name patterns (fnmatch) or a callable (name, param) -> bool")
        chosen = lambda spellings, param: _matches(spellings, patterns)  # noqa: E731

    def rule(spellings: tuple[str, ...], param: torch.Tensor) -> str | None:
        if not chosen(spellings, param):
            return None
        if param.ndim < 2:
            raise invalid("muon", muon, f"patterns or a callable that select parameters of 2 or more dimensions "
                                        f"only; it selects {spellings[0]!r} of shape {tuple(param.shape)}")
        return routing.matrix(param)

    return rule


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    l1: float = 0.0,
    no_decay: Iterable[str] | Callable[[str, torch.Tensor], bool] | None = None,
    muon: MuonRule = False,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into a decayed and a not-decayed group (and, with
    ``muon``, by what steps them).

    Args:
        model: the model (DDP- and ``torch.compile``-wrapped models are unwrapped).
        weight_decay: λ for the decayed group; the other group gets 0.
        l1: λ₁ for the decayed group; the other group gets 0.
        no_decay: extra name patterns to exclude (``fnmatch``, e.g. ``"*.pos_embed"``), matched
            against the name with and without wrapper prefixes (``module.fc.weight`` and
            ``fc.weight``), or a callable ``(name, param) -> bool`` that replaces the default
            rule and is given the name without prefixes.
        muon: groups for :class:`descend.Muon`: ``True`` sets each group's ``algorithm`` by the
            rule of :mod:`descend.routing` (``"muon"`` for hidden weight matrices, ``"adamw"``
            for embeddings, the output layer, biases, norms and 0-D/1-D tensors); name patterns
            (matched as ``no_decay``'s) or a callable ``(name, param) -> bool`` replace that rule:
            what they select is Muon's, the rest AdamW's, and selecting a parameter of fewer than
            2 dimensions is a ValueError that names it. A Muon group's ``matrix`` is
            ``"flatten"``, or ``"stack"`` for its parameters of 3 or more dimensions that are not
            convolution weights. ``False`` (the default): no ``algorithm``, two groups at most.
        **group_options: other options set on every group (``lr``, ``decay``, …). In Muon, an
            AdamW group takes the options it lacks from ``Muon(adamw=...)``; ``weight_decay`` and
            ``l1`` are always set here, by the decay rule.

    Returns:
        A list of parameter-group dicts whose ``params`` are ``(name, parameter)`` pairs:
        first the decayed group, then the not-decayed one (an empty group is left out). With
        ``muon``: Muon's groups (``matrix="flatten"``, then ``"stack"``) before AdamW's, each
        decayed before not decayed.

    Example::

        opt = descend.AdamW(descend.param_groups(model, weight_decay=0.05), lr=3e-4)
        opt = descend.Muon(descend.param_groups(model, 0.1, muon=True), lr=0.02, adamw=dict(lr=3e-4))
    """
    rule: Callable[[tuple[str, ...], torch.Tensor], bool]
    if callable(no_decay):
        replaced = no_decay
        rule = lambda spellings, param: bool(replaced(spellings[0], param))  # noqa: E731 - the plain name
    else:
        patterns = [no_decay] if isinstance(no_decay, str) else list(no_decay or [])
        rule = _default_no_decay(unwrap(model), patterns)
    routed = muon is not False and muon is not None
    if routed:
        if not (muon is True or callable(muon) or isinstance(muon, (str, Iterable))):
            raise invalid("muon", muon, "True, False, name patterns (fnmatch) or a callable (name, param) -> bool")
        clash = sorted({"algorithm", "matrix"} & set(group_options))
        if clash:
            raise invalid(clash[0], group_options[clash[0]], "no value of its own where muon= routes the parameters")
        route = _muon_rule(model, muon)
    # (algorithm, matrix, decayed) → the group's (name, parameter) pairs, in the order of the groups
    buckets: dict[tuple[str | None, str | None, bool], list[tuple[str, nn.Parameter]]] = {
        key: [] for key in ([(a, m, d) for a, m in (("muon", "flatten"), ("muon", "stack"), ("adamw", None))
                             for d in (True, False)] if routed else [(None, None, True), (None, None, False)])}
    # the wrapped model's names (module.fc.weight), for the patterns; tied parameters are reported once
    for raw_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        spellings = _spellings(raw_name)
        decayed = not rule(spellings, param)
        key: tuple[str | None, str | None, bool]
        if routed:
            mode = route(spellings, param)
            key = ("muon", mode, decayed) if mode is not None else ("adamw", None, decayed)
        else:
            key = (None, None, decayed)
        buckets[key].append((spellings[0], param))
    groups = []
    for (algorithm, matrix, decayed), params in buckets.items():
        if not params:
            continue
        group: dict[str, Any] = {"params": params, "weight_decay": weight_decay if decayed else 0.0,
                                 "l1": l1 if decayed else 0.0, **group_options}
        if algorithm is not None:
            group["algorithm"] = algorithm
        if matrix is not None:
            group["matrix"] = matrix
        groups.append(group)
    return groups
