"""Which parameters Muon steps and which the AdamW inside it does: the rule of
``descend.param_groups(model, ..., muon=True)``.

Muon orthogonalizes the update of a matrix that maps one hidden representation to another
(Keller Jordan: "Muon should only be used for hidden weight layers. The input embedding, final
output layer, and any internal gains or biases should be optimized using a standard method such
as AdamW"). Read off the modules that own each parameter, the rule is:

- **Muon** (``matrix="flatten"``): the ``weight`` of every ``nn.Linear`` and of every convolution
  (``nn.Conv*d``, ``nn.ConvTranspose*d``; flattened to (out, in·k…), as Keller Jordan's Muon
  does), and every other 2-D parameter that is a matrix (both sides longer than 1): the
  ``in_proj_weight`` of ``nn.MultiheadAttention``, recurrent weights, Hugging Face's ``Conv1D``;
- **Muon** (``matrix="stack"``): a parameter of 3 or more dimensions not owned by a convolution,
  e.g. mixture-of-experts weights [E, out, in]: a stack of matrices over its last two dimensions;
- **AdamW**: every parameter of fewer than 2 dimensions (biases, gains, norm scales); every
  parameter of an ``nn.Embedding`` / ``nn.EmbeddingBag`` (so also an output layer tied to one)
  and of a normalization layer; the **output layer**, i.e. the ``weight`` of the last
  ``nn.Linear`` or convolution in the model's module registration order (``lm_head``, ``fc``,
  ``head``: each of ``transformers``' ``*ForCausalLM``, timm's and torchvision's classifiers
  registers it last); a "matrix" with a side of 1 (``cls_token`` [1, D], weight norm's g,
  a ``Linear(d, 1)``), whose orthogonalization would only normalize it; and a parameter of a
  module of any other kind whose own name contains ``embed``, ``token`` or ``bias``
  (``pos_embed``, ``cls_token``, ``relative_position_bias_table``, per-expert biases named ``bias``).

**Limits.** The rule reads module types, registration order and a few names, not the forward
pass. An output layer that is not the last ``nn.Linear``/convolution registered (a model that
registers its head first, or has several heads) or that is no module at all (logits computed as
``x @ wte.weight.T``, where the last registered layer is then a hidden one and goes to AdamW) is
misjudged; so are embeddings kept as plain parameters under other names, and the input layer of
a model without an embedding (ViT's patch convolution, a ResNet stem), which goes to Muon as a
convolution. Pass ``muon=`` patterns or a callable to :func:`descend.param_groups` where the
rule is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["EMBEDDING_MODULES", "NORM_MODULES", "LAYER_MODULES", "NAME_KEYWORDS", "Routing"]

#: modules whose parameters are embeddings (AdamW)
EMBEDDING_MODULES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)
#: normalization layers (AdamW, whatever the shape of their parameters)
NORM_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
#: layers whose ``weight`` is a hidden matrix, and the last of which is the output layer
LAYER_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)
#: substrings of a parameter's own name that mark it as no hidden matrix (in modules of other kinds)
NAME_KEYWORDS = ("embed", "token", "bias")


def _matrix(shape: torch.Size, mode: str) -> tuple[int, int]:
    """The A × B of each matrix Muon makes of ``shape`` (as ``descend.optimizers.muon.matrix_shape``)."""
    if len(shape) == 2 or mode == "stack":
        return shape[-2], shape[-1]
    rest = 1
    for d in shape[1:]:
        rest *= d
    return shape[0], rest


@dataclass
class Routing:
    """The rule (module docstring) for the parameters of one (unwrapped) model."""

    model: nn.Module
    #: id of each parameter → (owning module, the parameter's own name), every owner of a tied one
    owners: dict[int, list[tuple[nn.Module, str]]] = field(init=False)
    #: ids of the output layer's weight
    output: set[int] = field(init=False)

    def __post_init__(self) -> None:
        self.owners = {}
        last: nn.Module | None = None
        for module in self.model.modules():
            for name, p in module.named_parameters(recurse=False):
                self.owners.setdefault(id(p), []).append((module, name))
            if isinstance(module, LAYER_MODULES):
                last = module
        weight = getattr(last, "weight", None) if last is not None else None
        self.output = {id(weight)} if isinstance(weight, torch.Tensor) else set()

    def _owned(self, param: torch.Tensor) -> list[tuple[nn.Module, str]]:
        return self.owners.get(id(param), [])

    def matrix(self, param: torch.Tensor) -> str:
        """``"flatten"`` for a convolution's weight and any 2-D parameter, ``"stack"`` for
        other parameters of 3 or more dimensions (the group option of ``descend.Muon``)."""
        if param.ndim <= 2 or any(isinstance(m, nn.modules.conv._ConvNd) for m, _ in self._owned(param)):
            return "flatten"
        return "stack"

    def default(self, param: torch.Tensor) -> str | None:
        """The rule: the ``matrix`` mode where Muon steps ``param``, ``None`` where AdamW does."""
        if param.ndim < 2 or id(param) in self.output:
            return None
        owned = self._owned(param)
        if any(isinstance(m, EMBEDDING_MODULES + NORM_MODULES) for m, _ in owned):
            return None
        layer = any(isinstance(m, LAYER_MODULES) and name == "weight" for m, name in owned)
        if not layer and any(k in name.lower() for _, name in owned for k in NAME_KEYWORDS):
            return None
        mode = self.matrix(param)
        if min(_matrix(param.shape, mode)) <= 1:
            return None  # a vector (or empty): orthogonalizing it would only normalize it
        return mode
