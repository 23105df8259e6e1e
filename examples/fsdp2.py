"""descend under FSDP2 (``fully_shard``) with a distributed checkpoint, on CPU with gloo.

    torchrun --nproc-per-node 2 examples/fsdp2.py

``fully_shard`` turns every parameter into a DTensor that each rank holds a slice of; a
descend optimizer updates the slices (and keeps its state sliced the same way) with the same
math as on whole tensors. :func:`descend.param_groups` and :func:`descend.explain` see the
model's own names and full shapes. The script trains, saves model and optimizer with
``torch.distributed.checkpoint``, loads them into a fresh model and optimizer, and prints
what a user can check: the loss fell, the reloaded state equals the saved one, and the
sharded model matches one process training on the whole batch.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import descend

STEPS_PER_EPOCH, EPOCHS, GLOBAL_BATCH = 8, 6, 64


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 1))


def shard(model: nn.Module) -> nn.Module:
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)  # each Linear gathers its own weights in forward and backward
    fully_shard(model)  # the rest (the LayerNorm) with the root
    return model


def make_data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS_PER_EPOCH * GLOBAL_BATCH, 8, generator=g)
    y = torch.sin(x @ torch.randn(8, 1, generator=g) / 2) + 0.1 * torch.randn(len(x), 1, generator=g)
    return TensorDataset(x, y)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # weight matrices decayed (torch's AdamW rule), with L1 on them too; biases and norms left alone
    return descend.AdamW(descend.param_groups(model, weight_decay=0.1, l1=1e-4), lr=3e-2)


def train(model: nn.Module, opt: torch.optim.Optimizer, loader: DataLoader, epochs: int) -> list[float]:
    losses = []
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = F.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor from a DTensor (a collective: every rank calls it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main() -> None:
    if "RANK" not in os.environ:  # `python examples/fsdp2.py`: a world of one process
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    data = make_data()
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(data, batch_size=GLOBAL_BATCH // world, sampler=sampler)
    model = shard(make_model())
    opt = make_optimizer(model)
    if rank == 0:
        local = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()}
        print(f"rank 0 holds slices {local}")
        print(descend.explain(opt))  # the model's names, full shapes
    losses = train(model, opt, loader, EPOCHS)
    loss = torch.tensor(losses)
    dist.all_reduce(loss)
    epochs = (loss / world).reshape(EPOCHS, STEPS_PER_EPOCH).mean(dim=1).tolist()

    # save with torch.distributed.checkpoint: every rank writes its own slices
    path = [tempfile.mkdtemp(prefix="descend-fsdp2-") if rank == 0 else ""]
    dist.broadcast_object_list(path)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path[0])

    # load into a fresh model and optimizer: a template of the right shape, filled in place
    fresh = shard(make_model())
    fresh_opt = make_optimizer(fresh)
    model_sd2, optim_sd2 = get_state_dict(fresh, fresh_opt)
    state = {"model": model_sd2, "optim": optim_sd2}
    dcp.load(state, checkpoint_id=path[0])
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    gap = 0.0
    for p, q in zip(model.parameters(), fresh.parameters()):
        gap = max(gap, (full(p) - full(q)).abs().max().item())
        for key in ("exp_avg", "exp_avg_sq", "step"):
            gap = max(gap, (full(opt.state[p][key]) - full(fresh_opt.state[q][key])).abs().max().item())

    params = [full(p).detach() for p in model.parameters()]  # collectives: on every rank
    dist.barrier()
    if rank == 0:
        shutil.rmtree(path[0])
    if rank == 0:
        for epoch, value in enumerate(epochs):
            print(f"epoch {epoch}  mean loss {value:.4f}")
        reference = make_model()
        train(reference, make_optimizer(reference), DataLoader(data, batch_size=GLOBAL_BATCH, shuffle=False), EPOCHS)
        diff = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(params, reference.parameters()))
        print(f"loss fell from {epochs[0]:.4f} to {epochs[-1]:.4f}: {epochs[-1] < epochs[0]}")
        print(f"checkpoint saved, reloaded into a fresh model and optimizer: state equal: {gap == 0.0}")
        print(f"matches one process on the whole batch: {diff < 1e-4} (max relative difference {diff:.1e})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
