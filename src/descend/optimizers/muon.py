r"""Muon (Keller Jordan 2024; Moonshot AI 2025, "Muon is Scalable for LLM Training") for hidden weight
matrices, and AdamW for every other parameter, in one optimizer.

A group's ``algorithm`` says which rule steps it: ``"muon"`` (the default) or ``"adamw"``.
Muon, on each matrix θ (A × B) of a group:

.. math::
   \begin{aligned}
   &g_t \leftarrow \pm\nabla f(\theta_{t-1}) \quad(\text{minus when maximizing})\\
   &\textbf{coupled: } g_t \leftarrow g_t + \lambda\theta_{t-1} + \lambda_1\,\mathrm{sgn}(\theta_{t-1})
    \qquad \textbf{decoupled modes: } \theta_{t-1} \leftarrow \theta_{t-1}(1 - s\lambda)\\
   &B_t \leftarrow \mu B_{t-1} + (1-\mu)\,g_t \qquad(\text{an average of the gradients})\\
   &\tilde B_t \leftarrow (1-\mu)\,g_t + \mu B_t\ (\text{nesterov}), \qquad \tilde B_t \leftarrow B_t\ (\text{otherwise})\\
   &O_t \leftarrow \mathrm{NS}^{(a,b,c)}_K(\tilde B_t;\ \varepsilon)\quad(\text{bfloat16: } \texttt{descend.orthogonalize})\\
   &\theta_t \leftarrow \theta_{t-1} - \gamma\,r(A, B)\,O_t\\
   &\textbf{decoupled L1: } \theta_t \leftarrow \mathrm{sgn}(\theta_t)\max(|\theta_t| - s\lambda_1, 0)
   \end{aligned}

with γ = lr, μ = ``momentum``, B = ``momentum_buffer`` (zeros at first), s the decoupled scale of
:mod:`descend.regularization` and r the ``adjust_lr_fn`` ratio: √max(1, A/B) for ``None`` and
``"original"`` (Keller Jordan's: the update's RMS as if the matrix were square), 0.2·√max(A, B)
for ``"match_rms_adamw"`` (Moonlight's: the update's RMS is about 0.2, AdamW's typical RMS, so
AdamW's lr and λ carry over).

**Which lr scales the decay.** Every decay mode takes γ, the group's lr, never the adjusted γ·r:
``decay="decoupled"`` (the default) is torch's θ·(1 − γλ), and it is also Moonlight's recipe,
W ← W − η(0.2·√max(A, B)·O + λW): the update scaled to AdamW's RMS, the decay η·λ at the
unadjusted η. So Moonlight is ``adjust_lr_fn="match_rms_adamw"`` with the default decay, and the
lr and λ tuned for AdamW (the AdamW groups then default to the same lr and λ: see ``adamw``).
``"independent"`` (γ/γ₀·λ), ``"fixed"`` (λ), ``"corrected"`` (γ²/γ₀·λ) and ``"coupled"`` (λθ in the
gradient before the momentum: L2 in the loss, orthogonalized with the rest) and L1 are the same
for Muon as for every rule.

**Matrices.** A 2-D parameter is one matrix. A parameter of 3 or more dimensions is either
flattened to (out, in·kh·kw…) (``matrix="flatten"``, the default: convolutions, as Keller
Jordan's Muon does) or a stack of matrices over its last two dimensions, each orthogonalized on
its own (``matrix="stack"``: mixture-of-experts weights [E, out, in]); A × B is then the matrix,
not the tensor. A parameter of fewer than 2 dimensions in a Muon group is a ValueError: route
it to AdamW, in a group with ``algorithm="adamw"``.

**Batched.** All matrices of a group that have the same shape are orthogonalized together, in one
stack of at most :data:`STACK_ELEMENTS` elements, with batched products up to 512 × 512
(:func:`descend.orthogonalize.batched`); each result is bit for bit the one a matrix gets alone.
(768 × 3072 and 3072 × 768 are not stacked together: torch orthogonalizes a tall matrix as a
transposed view, and the products' rounding can depend on that layout.)

**A deliberate difference from torch 2.13.** ``torch.optim.Muon`` with bfloat16 parameters and
``nesterov=False`` normalizes its momentum buffer in place (``buf.bfloat16()`` is ``buf``
itself, and the iteration divides it by its norm), so the buffer stops being an average of the
gradients. descend orthogonalizes a copy: the buffer stays B_t above. On float32 and float64
parameters, and with nesterov, the two agree.

**Beyond one machine.** Under FSDP2 (DTensor parameters) each matrix is orthogonalized whole,
not per shard (that would be other math: about 70% off in the tests): each matrix is assigned to
one rank (largest first, to the least loaded), one all-to-all brings it its shards, it runs the
same batched iteration as one process, and a second all-to-all sends each rank its shard of the
result; the momentum stays sharded. Replicated parameters (DDP) need nothing.

AdamW groups are :mod:`descend.optimizers.adam`'s rule (its functional kernels, with the same
regularization pipeline): ``exp_avg``, ``exp_avg_sq`` and ``step`` in their state, ``betas`` and
``eps`` among their options. One ``state_dict`` holds both kinds.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, cast

import torch
from torch import Tensor

from descend import dispatch
from descend.optimizer import GroupBatch, RegularizedOptimizer
from descend.optimizers.adam import adam, check_betas
from descend.orthogonalize import (
    DEFAULT_COEFFICIENTS,
    DEFAULT_EPS,
    DEFAULT_STEPS,
    batched,
    check_coefficients,
    newton_schulz_oriented_,
)
from descend.regularization import DECAY_MODES
from descend.state import SCALAR, Entry, StateSpec
from descend.tensors import DTYPE, IS_CPU, is_dtensor
from descend.validation import check_choice, check_int, check_number, invalid, scalar_value

__all__ = ["Muon", "muon", "ALGORITHMS", "ADJUST_LR_FNS", "MATRIX_MODES", "adjusted_lr", "matrix_shape"]

ALGORITHMS = ("muon", "adamw")
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
MATRIX_MODES = ("flatten", "stack")
#: the options an ``adamw=`` dict may set for the AdamW groups
ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay", "decay", "l1")
#: AdamW groups' defaults: Keller Jordan's MuonWithAuxAdam (lr 3e-4, betas (0.9, 0.95), eps 1e-10, no decay)
KELLER_ADAMW: dict[str, Any] = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0)
#: ... and with adjust_lr_fn="match_rms_adamw", Moonlight's: Muon's own lr and λ, betas (0.9, 0.95), eps 1e-8
MOONLIGHT_ADAMW: dict[str, Any] = dict(betas=(0.9, 0.95), eps=1e-8)
#: the most elements one batched Newton–Schulz stack holds (bfloat16: 32 MiB, and its temporaries)
STACK_ELEMENTS = 1 << 24
_SIXTEEN_BIT = frozenset((torch.bfloat16, torch.float16))


def _is_muon(param: Tensor, group: dict[str, Any]) -> bool:
    return group.get("algorithm", "muon") == "muon"


def _is_adamw(param: Tensor, group: dict[str, Any]) -> bool:
    return group.get("algorithm", "muon") == "adamw"


STATE = StateSpec((
    Entry("momentum_buffer", when=_is_muon),
    # an AdamW group's, as descend.Adam keeps them (the count on the host, float32)
    Entry("step", SCALAR, low=0, device="cpu", when=_is_adamw),
    Entry("exp_avg", when=_is_adamw),
    Entry("exp_avg_sq", low=0, when=_is_adamw),
))


def matrix_shape(shape: torch.Size | tuple[int, ...], matrix: str = "flatten") -> tuple[int, int, int]:
    """(count, A, B): how many A × B matrices a Muon parameter of ``shape`` is."""
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    if matrix == "stack":
        return math.prod(shape[:-2]), shape[-2], shape[-1]
    return 1, shape[0], math.prod(shape[1:])


def adjusted_lr(lr: float | Tensor, adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    """γ·r(A, B): the lr the orthogonalized update of an A × B matrix is applied with (for a
    tensor lr computed in its dtype, as torch's Muon does, then read once)."""
    if adjust_lr_fn == "match_rms_adamw":
        ratio = 0.2 * math.sqrt(max(rows, cols))
    else:  # None, "original"
        ratio = math.sqrt(max(1, rows / cols)) if cols else 1.0
    return float(lr * ratio)


def muon(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], *, lr: float | Tensor,
         momentum: float, nesterov: bool, ns_coefficients: tuple[float, float, float] = DEFAULT_COEFFICIENTS,
         ns_steps: int = DEFAULT_STEPS, eps: float = DEFAULT_EPS, adjust_lr_fn: str | None = None,
         matrix: str = "flatten") -> None:
    """Functional Muon over lists of tensors (the rule alone: regularization and maximize are the
    pipeline's; the buffers are updated in place)."""
    if not params:
        return
    if any(map(is_dtensor, params)):  # FSDP2: each matrix orthogonalized whole, on one rank
        plain = [i for i, p in enumerate(params) if not is_dtensor(p)]
        sharded = [i for i, p in enumerate(params) if is_dtensor(p)]
        options: dict[str, Any] = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_coefficients=ns_coefficients,
                       ns_steps=ns_steps, eps=eps, adjust_lr_fn=adjust_lr_fn, matrix=matrix)
        if plain:
            muon([params[i] for i in plain], [grads[i] for i in plain], [momentum_buffers[i] for i in plain],
                 **options)
        _muon_dtensors([params[i] for i in sharded], [grads[i] for i in sharded],
                       [momentum_buffers[i] for i in sharded], **options)
        return
    for (g, m), _ in dispatch.grouped([grads, momentum_buffers]):
        torch._foreach_lerp_(m, g, 1 - momentum)
    coefficients = cast("tuple[float, float, float]", tuple(float(x) for x in ns_coefficients))
    # every parameter's matrices by (device, shape); tall and wide ones apart, since torch
    # orthogonalizes a tall matrix as a transposed view, and the products' rounding can depend on it
    by_shape: dict[tuple[torch.device, int, int], list[int]] = defaultdict(list)
    counts = []
    for i, p in enumerate(params):
        count, rows, cols = matrix_shape(p.shape, matrix) if p.dim() > 2 else (0, *p.shape)
        counts.append(count)
        by_shape[(p.device, rows, cols)].append(i)
    for (device, rows, cols), members in by_shape.items():
        matrices = sum(counts[i] or 1 for i in members)
        alpha = -adjusted_lr(lr, adjust_lr_fn, rows, cols)  # (a flattened parameter's matrix is rows × cols too)
        if not batched(rows, cols, matrices):
            for i in members:  # one at a time, as torch's Muon: no more memory than one matrix's temporaries
                update = _bfloat16_update(grads[i], momentum_buffers[i], momentum, nesterov)
                mats = update.reshape(counts[i] or 1, rows, cols)
                out = newton_schulz_oriented_(mats.mT if rows > cols else mats, coefficients, ns_steps, eps)
                result = out if isinstance(out, Tensor) else torch.stack(out)
                # (the add reads the bfloat16 update, widening it exactly, as torch's Muon does)
                params[i].add_((result.mT if rows > cols else result).reshape(params[i].shape), alpha=alpha)
            continue
        per_stack = max(1, STACK_ELEMENTS // max(1, rows * cols))
        chunk: list[int] = []
        size = 0
        for i in members:
            if chunk and size + (counts[i] or 1) > per_stack:
                _step_stack(chunk, size, device, rows, cols, params, grads, momentum_buffers, counts, momentum,
                            nesterov, alpha, coefficients, ns_steps, eps)
                chunk, size = [], 0
            chunk.append(i)
            size += counts[i] or 1
        _step_stack(chunk, size, device, rows, cols, params, grads, momentum_buffers, counts, momentum, nesterov,
                    alpha, coefficients, ns_steps, eps)


def _bfloat16_update(grad: Tensor, buf: Tensor, momentum: float, nesterov: bool) -> Tensor:
    """The update of one parameter as a new bfloat16 tensor in its layout: g.lerp(B, μ) with
    nesterov, else B (a copy: the buffer is never normalized in place). Rounded once, as
    ``torch.optim.Muon``'s ``.bfloat16()`` of the float update, without the float temporary."""
    out = torch.empty_like(grad, dtype=torch.bfloat16)
    if nesterov:
        torch.lerp(grad, buf, momentum, out=out)
    else:
        out.copy_(buf)
    return out


def _step_stack(members: list[int], size: int, device: torch.device, rows: int, cols: int, params: list[Tensor],
                grads: list[Tensor], bufs: list[Tensor], counts: list[int], momentum: float, nesterov: bool,
                alpha: float, coefficients: tuple[float, float, float], ns_steps: int, eps: float) -> None:
    """Orthogonalize the matrices of ``members`` in one batched stack, and apply each to its parameter."""
    if nesterov:
        updates = list(torch._foreach_lerp([grads[i] for i in members], [bufs[i] for i in members], momentum))
    else:
        updates = [bufs[i] for i in members]  # read only: copied into the stack
    stack = torch.empty(size, rows, cols, dtype=torch.bfloat16, device=device)
    # every matrix rounded to bfloat16 in one call
    if all(counts[i] == 0 for i in members):
        torch.stack(updates, out=stack)
    else:
        torch.cat([u.reshape(counts[i] or 1, rows, cols) for i, u in zip(members, updates)], out=stack)
    del updates
    tall = rows > cols
    out = newton_schulz_oriented_(stack.mT if tall else stack, coefficients, ns_steps, eps)
    stacked = out if isinstance(out, Tensor) else torch.stack(out)  # (a chunk of one matrix runs alone)
    result = stacked.mT if tall else stacked
    # one conversion of the stack to each parameter dtype and one add per dtype, not a conversion
    # inside each of many small adds (the same numbers: bfloat16 widens exactly)
    widened: dict[torch.dtype, tuple[Tensor, tuple[Tensor, ...]]] = {}
    adds: dict[torch.dtype, tuple[list[Tensor], list[Tensor]]] = {}
    at = 0
    for i in members:
        p = params[i]
        if p.dtype not in widened:
            whole = result.to(p.dtype)
            widened[p.dtype] = (whole, whole.unbind(0))
            adds[p.dtype] = ([], [])
        whole, each = widened[p.dtype]
        n = counts[i]
        update = each[at] if n == 0 else whole[at:at + n].reshape(p.shape)
        at += n or 1
        adds[p.dtype][0].append(p)
        adds[p.dtype][1].append(update)
    for targets, updates_ in adds.values():
        torch._foreach_add_(targets, updates_, alpha=alpha)


# --- DTensor parameters (FSDP2) ------------------------------------------------------------


def _muon_dtensors(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], *, lr: float, momentum: float,
                   nesterov: bool, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float,
                   adjust_lr_fn: str | None, matrix: str) -> None:
    """:func:`muon` on DTensor parameters, with the result of one process on the whole matrices.

    The element-wise part (the momentum, the update and its rounding to bfloat16, the add) runs on
    each rank's shards; the buffers stay sharded. The orthogonalization needs whole matrices (per
    shard it is other math): a parameter sharded on one dimension over one mesh dimension (FSDP2's
    ``Shard(0)``) is assigned to one rank along that mesh dimension (the largest first, each to the
    rank with the least work so far), which receives its shards from every rank in one all-to-all
    for all such parameters, orthogonalizes its matrices (same-shape ones batched, as in one process) and sends
    each rank its shard of the result in a second all-to-all (HSDP: the same within each replica).
    A replicated parameter, or a stack (``matrix="stack"``) sharded on its stack dimensions only,
    holds whole matrices on each rank, and each rank orthogonalizes its own. Any other layout
    (sharded over several mesh dimensions, strided shards) is gathered whole on every rank,
    orthogonalized there, and each rank keeps its shard."""
    coefficients = cast("tuple[float, float, float]", tuple(float(x) for x in ns_coefficients))
    local_p, local_g, local_m = [], [], []
    for p, g, m in zip(params, grads, bufs):
        if not is_dtensor(m) or m.placements != p.placements:  # type: ignore[attr-defined]
            raise RuntimeError(
                f"Muon: the momentum buffer of a DTensor parameter of shape {tuple(p.shape)} is "
                f"{'a DTensor with placements ' + str(m.placements) if is_dtensor(m) else 'a plain tensor'}, "  # type: ignore[attr-defined]
                f"not sharded as the parameter ({p.placements}); load a sharded model's optimizer state with "  # type: ignore[attr-defined]
                "torch.distributed.checkpoint.state_dict.set_optimizer_state_dict, which shards it")
        if not is_dtensor(g):
            raise RuntimeError(f"Muon: a DTensor parameter of shape {tuple(p.shape)} has a gradient that is not one")
        if g.placements != p.placements:  # type: ignore[attr-defined]
            g = g.redistribute(p.device_mesh, p.placements)  # type: ignore[attr-defined]
        local_p.append(p.to_local())  # type: ignore[attr-defined]
        local_g.append(g.to_local())  # type: ignore[attr-defined]
        local_m.append(m.to_local())  # type: ignore[attr-defined]
    for (g_, m_), _ in dispatch.grouped([local_g, local_m]):
        torch._foreach_lerp_(m_, g_, 1 - momentum)
    updates = [_bfloat16_update(g_, m_, momentum, nesterov) for g_, m_ in zip(local_g, local_m)]
    shapes = [matrix_shape(p.shape, matrix) if p.dim() > 2 else (0, p.shape[0], p.shape[1]) for p in params]
    alphas = [-adjusted_lr(lr, adjust_lr_fn, rows, cols) for _, rows, cols in shapes]
    owned: dict[int, tuple[Any, list[tuple[int, int, list[int]]]]] = {}
    gathered, whole = [], []
    for i, p in enumerate(params):
        if _holds_whole_matrices(p, matrix):
            if updates[i].numel():  # (an empty shard of a stack: no matrix here)
                whole.append(i)
            continue
        layout = _one_dim_shards(p)
        if layout is None:
            gathered.append(i)
        else:
            group, dim, sizes = layout
            owned.setdefault(id(group), (group, []))[1].append((i, dim, sizes))
    if whole:  # each rank orthogonalizes the matrices it holds: no communication
        local_shapes = [matrix_shape(updates[i].shape, matrix) for i in whole]
        for i, out in zip(whole, _orthogonalized([updates[i] for i in whole], local_shapes, coefficients, ns_steps,
                                                 eps)):
            local_p[i].add_(out, alpha=alphas[i])
    for group, members in owned.values():
        _owner_orthogonalizes(group, members, params, updates, shapes, alphas, local_p, coefficients, ns_steps, eps)
    if gathered:
        from torch.distributed.tensor import DTensor, Replicate

        fulls = [DTensor.from_local(updates[i], params[i].device_mesh, params[i].placements,  # type: ignore[attr-defined]
                                    run_check=False, shape=params[i].shape, stride=params[i].stride()).full_tensor()
                 for i in gathered]
        results = _orthogonalized(fulls, [shapes[i] for i in gathered], coefficients, ns_steps, eps)
        for i, out in zip(gathered, results):
            mesh = params[i].device_mesh  # type: ignore[attr-defined]
            replicated = DTensor.from_local(out, mesh, [Replicate()] * mesh.ndim, run_check=False)
            local_p[i].add_(replicated.redistribute(mesh, params[i].placements).to_local(),  # type: ignore[attr-defined]
                            alpha=alphas[i])


def _holds_whole_matrices(p: Any, matrix: str) -> bool:
    """Whether each rank's shard of DTensor ``p`` is whole matrices: replicated, or a stack
    (``matrix="stack"``) sharded only on its leading (stack) dimensions."""
    for placement in p.placements:
        if placement.is_replicate():
            continue
        if (type(placement).__name__ == "Shard" and matrix == "stack" and p.dim() > 2
                and placement.dim % p.dim() < p.dim() - 2):
            continue
        return False
    return True


def _one_dim_shards(p: Any) -> tuple[Any, int, list[int]] | None:
    """(process group, dim, each rank's length along dim) of a DTensor sharded on one dimension
    over one mesh dimension and replicated over any others, as ``torch.chunk`` splits it (FSDP2's
    ``Shard(0)``, HSDP's ``(Replicate(), Shard(0))``, uneven and empty shards too); the group is
    that mesh dimension's (each replica computes alike). None for any other layout."""
    mesh = p.device_mesh
    sharded = [d for d, placement in enumerate(p.placements) if not placement.is_replicate()]
    if len(sharded) != 1:
        return None
    (mesh_dim,) = sharded
    placement = p.placements[mesh_dim]
    if type(placement).__name__ != "Shard":  # (_StridedShard, a subclass, lays shards out otherwise; Partial)
        return None
    dim = placement.dim % p.dim()
    world = mesh.size(mesh_dim)
    n = p.shape[dim]
    chunk = -(-n // world)
    sizes = [max(0, min(n, (r + 1) * chunk) - r * chunk) for r in range(world)]
    expected = list(p.shape)
    expected[dim] = sizes[mesh.get_local_rank(mesh_dim)]
    if list(p.to_local().shape) != expected:  # (never seen: a layout this function does not know)
        return None
    return mesh.get_group(mesh_dim), dim, sizes


def _owner_orthogonalizes(group: Any, members: list[tuple[int, int, list[int]]], params: list[Tensor],
                          updates: list[Tensor], shapes: list[tuple[int, int, int]], alphas: list[float],
                          local_p: list[Tensor], coefficients: tuple[float, float, float], ns_steps: int,
                          eps: float) -> None:
    """The owner-computes step of :func:`_muon_dtensors` for the parameters of one mesh:
    ``members`` are (index, sharded dim, each rank's length along it)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    me = dist.get_rank(group)

    def cost(k: int) -> int:
        count, rows, cols = shapes[members[k][0]]
        return (count or 1) * rows * cols * min(rows, cols)

    load = [0] * world
    owner = [0] * len(members)
    for k in sorted(range(len(members)), key=lambda k: (-cost(k), k)):  # the same on every rank
        owner[k] = min(range(world), key=lambda r: (load[r], r))
        load[owner[k]] += cost(k)
    by_owner: list[list[int]] = [[] for _ in range(world)]
    for k, r in enumerate(owner):
        by_owner[r].append(k)

    def shard_shape(k: int, rank: int) -> list[int]:
        i, dim, sizes = members[k]
        shape = list(params[i].shape)
        shape[dim] = sizes[rank]
        return shape

    def numel(k: int, rank: int) -> int:
        return math.prod(shard_shape(k, rank))

    device = updates[members[0][0]].device
    send_splits = [sum(numel(k, me) for k in by_owner[r]) for r in range(world)]
    recv_splits = [sum(numel(k, r) for k in by_owner[me]) for r in range(world)]
    # 1. every rank sends each owner its shards of the owner's matrices
    send = _flat([updates[members[k][0]] for r in range(world) for k in by_owner[r]], device)
    received = torch.empty(sum(recv_splits), dtype=torch.bfloat16, device=device)
    dist.all_to_all_single(received, send, recv_splits, send_splits, group=group)
    del send
    pieces: dict[int, list[Tensor]] = {k: [] for k in by_owner[me]}
    at = 0
    for r in range(world):
        for k in by_owner[me]:
            n = numel(k, r)
            pieces[k].append(received[at:at + n].view(shard_shape(k, r)))
            at += n
    mine = by_owner[me]
    fulls = [torch.cat(pieces[k], dim=members[k][1]) for k in mine]  # row-major, as one process's update
    del pieces, received
    # 2. the owner orthogonalizes them whole
    results = _orthogonalized(fulls, [shapes[members[k][0]] for k in mine], coefficients, ns_steps, eps)
    del fulls
    # 3. and sends every rank its shard of each result
    outgoing = []
    for r in range(world):
        for k, out in zip(mine, results):
            _, dim, sizes = members[k]
            outgoing.append(out.narrow(dim, sum(sizes[:r]), sizes[r]))
    send = _flat(outgoing, device)
    del outgoing, results
    back = torch.empty(sum(send_splits), dtype=torch.bfloat16, device=device)
    dist.all_to_all_single(back, send, send_splits, recv_splits, group=group)
    at = 0
    for r in range(world):
        for k in by_owner[r]:
            i = members[k][0]
            n = numel(k, me)
            # (the add reads the bfloat16 update, widening it exactly, as in one process)
            local_p[i].add_(back[at:at + n].view(local_p[i].shape), alpha=alphas[i])
            at += n


def _flat(tensors: list[Tensor], device: torch.device) -> Tensor:
    """The elements of ``tensors`` (bfloat16) in one new 1-D tensor, in order."""
    if not tensors:
        return torch.empty(0, dtype=torch.bfloat16, device=device)
    return torch.cat([t.reshape(-1) for t in tensors])


def _orthogonalized(updates: list[Tensor], shapes: list[tuple[int, int, int]],
                    coefficients: tuple[float, float, float], ns_steps: int, eps: float) -> list[Tensor]:
    """NS of whole bfloat16 updates (each of its parameter's shape; ``shapes``: (count, A, B), count 0
    for a 2-D one), grouped, batched and oriented as :func:`muon` does; each result in its update's shape."""
    results: list[Tensor | None] = [None] * len(updates)
    by_shape: dict[tuple[torch.device, int, int], list[int]] = defaultdict(list)
    for i, (u, (_, rows, cols)) in enumerate(zip(updates, shapes)):
        by_shape[(u.device, rows, cols)].append(i)
    for (_, rows, cols), members in by_shape.items():
        total = sum(shapes[i][0] or 1 for i in members)
        chunks: list[list[int]] = []
        if not batched(rows, cols, total):
            chunks = [[i] for i in members]
        else:
            per_stack = max(1, STACK_ELEMENTS // max(1, rows * cols))
            size = 0
            for i in members:
                n = shapes[i][0] or 1
                if not chunks or size + n > per_stack:
                    chunks.append([])
                    size = 0
                chunks[-1].append(i)
                size += n
        tall = rows > cols
        for chunk in chunks:
            stack = torch.cat([updates[i].reshape(shapes[i][0] or 1, rows, cols) for i in chunk])
            out = newton_schulz_oriented_(stack.mT if tall else stack, coefficients, ns_steps, eps)
            stacked = out if isinstance(out, Tensor) else torch.stack(out)
            result = stacked.mT if tall else stacked
            at = 0
            for i in chunk:
                n = shapes[i][0] or 1
                results[i] = result[at:at + n].reshape(updates[i].shape)
                at += n
    return cast("list[Tensor]", results)


def _describe(group: dict[str, Any], index: int, p: Tensor) -> str:
    names = group.get("param_names")
    if names is not None and index < len(names):
        return f"parameter {names[index]!r} of shape {tuple(p.shape)}"
    return f"parameter {index} of the group (shape {tuple(p.shape)})"


class Muon(RegularizedOptimizer):
    r"""Muon for hidden weight matrices, AdamW for the rest, and descend's regularization.

    Args:
        params: tensors, parameter-group dicts, or ``(name, tensor)`` pairs. A group's
            ``algorithm`` (``"muon"``, the default, or ``"adamw"``) says which rule steps it;
            groups with ``algorithm="adamw"`` are stepped by the AdamW inside (``adamw=``).
        lr: learning rate γ (default 1e-3, torch's).
        weight_decay: λ ≥ 0 (default 0.1, torch's); see ``decay``.
        momentum: μ in [0, 1] (default 0.95).
        nesterov: use Nesterov momentum (default True).
        ns_coefficients: (a, b, c) of the Newton–Schulz polynomial (default (3.4445, −4.775, 2.0315)).
        eps: ε ≥ 0, the least norm the iteration divides by (default 1e-7).
        ns_steps: Newton–Schulz steps K, an integer ≥ 1 (default 5).
        adjust_lr_fn: ``None`` or ``"original"`` (√max(1, A/B)), or ``"match_rms_adamw"`` (0.2·√max(A, B)).
        decay: ``"decoupled"`` (default: torch's θ·(1 − lr·λ), at the unadjusted lr),
            ``"independent"``, ``"fixed"``, ``"corrected"`` or ``"coupled"``.
        l1: λ₁ ≥ 0, L1 regularization (default 0).
        maximize: maximize the objective (torch's Muon has no such option).
        nonfinite, warn: as for :class:`descend.SGD`.
        adamw: the defaults of the AdamW groups, a dict with keys among ``lr``, ``betas``, ``eps``,
            ``weight_decay``, ``decay`` and ``l1``; what it leaves out is Keller Jordan's
            MuonWithAuxAdam's choice (lr 3e-4, betas (0.9, 0.95), eps 1e-10, weight_decay 0), or
            with ``adjust_lr_fn="match_rms_adamw"`` Moonlight's (this optimizer's lr and
            weight_decay, betas (0.9, 0.95), eps 1e-8). A group's own options win over both.

    A group may also set ``matrix`` (``"flatten"``, the default, or ``"stack"``) for its
    parameters of 3 or more dimensions. The update rule, the decay and what differs from
    ``torch.optim.Muon`` are in the docstring of :mod:`descend.optimizers.muon`.
    ``descend.param_groups(model, weight_decay, muon=True)`` builds the groups from a model: Muon
    for its hidden weight matrices, AdamW for the rest (the rule is :mod:`descend.routing`'s).
    """

    state_spec = STATE
    # the AdamW groups' multi-tensor form (Muon groups have one form: see _implementation)
    _fast_paths = ("foreach",)
    # a tensor lr stays one for the decay: torch's θ·(1 − γλ) is then computed in γ's dtype
    _tensor_lr_paths = ("single", "foreach")
    _steps_complex = False
    _group_keys = ("momentum", "ns_coefficients", "ns_steps")

    def __init__(self, params: Any, lr: float | Tensor = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = DEFAULT_COEFFICIENTS,
                 eps: float = DEFAULT_EPS, ns_steps: int = DEFAULT_STEPS, adjust_lr_fn: str | None = None, *,
                 decay: str = "decoupled", l1: float = 0, maximize: bool = False, nonfinite: str = "ignore",
                 adamw: dict[str, Any] | None = None, warn: bool = True) -> None:
        check_choice("adjust_lr_fn", adjust_lr_fn, ADJUST_LR_FNS)
        if adjust_lr_fn == "match_rms_adamw":
            base = dict(MOONLIGHT_ADAMW, lr=lr, weight_decay=weight_decay)
        else:
            base = dict(KELLER_ADAMW)
        self._adamw_defaults = {**base, **_checked_adamw(adamw)}
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
                        l1=l1, decay=decay, maximize=maximize, algorithm="muon", matrix="flatten")
        super().__init__(params, defaults, nonfinite=nonfinite, warn=warn)

    @property
    def adamw_defaults(self) -> dict[str, Any]:
        """The options an AdamW group gets where it sets none of its own."""
        return dict(self._adamw_defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``; an AdamW group first takes :attr:`adamw_defaults`, and a
        Muon group's parameters must be matrices (a ValueError names the first that is not)."""
        if isinstance(param_group, dict):
            algorithm = param_group.get("algorithm", "muon")
            check_choice("algorithm", algorithm, ALGORITHMS)
            if algorithm == "adamw":
                param_group = {**self.__dict__.get("_adamw_defaults", KELLER_ADAMW), **param_group}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_matrices(group)
        except ValueError:
            self.param_groups.pop()  # nothing half-applied: the optimizer is as it was
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_adamw_defaults", dict(KELLER_ADAMW))

    def _check_group(self, group: dict[str, Any]) -> None:
        check_choice("algorithm", group["algorithm"], ALGORITHMS)
        if group["algorithm"] == "adamw":
            check_betas(group.get("betas"))
            check_number("eps", group["eps"], low=0)
            return
        check_number("momentum", group["momentum"], low=0, high=1, high_open=False)
        check_coefficients(group["ns_coefficients"])
        check_number("eps", group["eps"], low=0)
        check_int("ns_steps", group["ns_steps"], 1)
        check_choice("adjust_lr_fn", group["adjust_lr_fn"], ADJUST_LR_FNS)
        check_choice("matrix", group["matrix"], MATRIX_MODES)
        if "params" in group:
            _check_matrices(group)

    def _implementation(self, batch: GroupBatch) -> str:
        # A Muon group has one form (batched); on 16-bit parameters its decay runs per tensor, as torch's
        # θ.mul_(1 − lr·λ): torch 2.13's _foreach_mul_ rounds the factor to their dtype first, mul_ does not
        if batch.group["algorithm"] == "muon":
            return "single" if _SIXTEEN_BIT & set(map(DTYPE, batch.params)) else "foreach"
        return super()._implementation(batch)

    def _update(self, batch: GroupBatch, implementation: str) -> None:
        group = batch.group
        if group["algorithm"] == "adamw":
            self._adamw_update(batch, implementation)
            return
        lr = group["lr"]  # (a tensor lr stays one: torch scales it by r in its own dtype)
        muon(batch.params, batch.grads, batch.state_list("momentum_buffer"),
             lr=lr if isinstance(lr, Tensor) else scalar_value(lr),
             momentum=float(group["momentum"]), nesterov=group["nesterov"], ns_coefficients=group["ns_coefficients"],
             ns_steps=group["ns_steps"], eps=float(group["eps"]), adjust_lr_fn=group["adjust_lr_fn"],
             matrix=group["matrix"])

    def _adamw_update(self, batch: GroupBatch, implementation: str) -> None:
        group = batch.group
        steps = batch.state_list("step")
        if not all(map(IS_CPU, steps)):
            for state in batch.states:  # a count loaded onto a device: back to the host once
                if not state["step"].is_cpu:
                    state["step"] = state["step"].to(device="cpu", dtype=torch.float32)
            steps = batch.state_list("step")
        beta1, beta2 = group["betas"]
        adam(batch.params, batch.grads, batch.state_list("exp_avg"), batch.state_list("exp_avg_sq"), [], steps,
             lr=scalar_value(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"], amsgrad=False,
             implementation="foreach" if implementation == "foreach" else "single")


def _check_matrices(group: dict[str, Any]) -> None:
    """Raise ValueError for a parameter of a Muon group that cannot be a matrix (ndim < 2)."""
    if group.get("algorithm", "muon") != "muon":
        return
    for i, p in enumerate(group["params"]):
        if p.dim() < 2:
            # (torch's words first: "Muon only supports 2D parameters")
            raise ValueError(f"Muon only supports 2D parameters (and stacks of them); {_describe(group, i, p)} "
                             f"has size {tuple(p.size())} (allowed: matrices of 2 or more dimensions in a Muon "
                             "group; step it with AdamW, in a group with algorithm='adamw')")


def _checked_adamw(adamw: Any) -> dict[str, Any]:
    """The ``adamw=`` dict, checked: known keys, valid values."""
    if adamw is None:
        return {}
    if not isinstance(adamw, dict) or not all(isinstance(k, str) for k in adamw):
        raise invalid("adamw", adamw, f"None or a dict with keys among {', '.join(ADAMW_KEYS)}")
    unknown = sorted(set(adamw) - set(ADAMW_KEYS))
    if unknown:
        raise invalid("adamw", adamw, f"a dict with keys among {', '.join(ADAMW_KEYS)} (not {', '.join(unknown)})")
    for key, value in adamw.items():
        name = f"adamw['{key}']"
        if key == "betas":
            try:
                check_betas(value)
            except ValueError:
                raise invalid(name, value, "a pair (beta1, beta2), each in [0, 1)") from None
        elif key == "decay":
            check_choice(name, value, DECAY_MODES)
        else:
            check_number(name, value, low=0)
    return dict(adamw)
