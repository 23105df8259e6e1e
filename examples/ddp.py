"""descend under DistributedDataParallel, on CPU with the gloo backend.

    torchrun --nproc-per-node 2 examples/ddp.py

Each rank trains on its share of every batch (DistributedSampler); DDP averages the
gradients, so every rank takes the same step with the same descend optimizer, and the model
is the one a single process would train on the whole batch. The script prints the loss and
then checks both claims: the ranks hold identical parameters, and they match a single-process
run of the same optimizer on the whole batch (up to float32 rounding of the gradient average).
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import descend

STEPS_PER_EPOCH, EPOCHS, GLOBAL_BATCH = 8, 6, 64


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights everywhere (DDP would broadcast rank 0's anyway)
    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 1))


def make_data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS_PER_EPOCH * GLOBAL_BATCH, 8, generator=g)
    y = torch.sin(x @ torch.randn(8, 1, generator=g) / 2) + 0.1 * torch.randn(len(x), 1, generator=g)
    return TensorDataset(x, y)


def make_optimizer(model: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    # decay the weight matrices only; the paper's AdamW decay, which follows the schedule (lr/lr₀)·λ
    groups = descend.param_groups(model, weight_decay=0.1, decay="independent")
    opt = descend.AdamW(groups, lr=3e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS_PER_EPOCH * EPOCHS)
    return opt, sched


def train(model: nn.Module, loader: DataLoader, sampler: DistributedSampler | None = None) -> list[float]:
    opt, sched = make_optimizer(model)
    if dist.get_rank() == 0 and sampler is not None:
        print(descend.explain(opt))  # names as in the model: no "module." from DDP
    losses = []
    for epoch in range(EPOCHS):
        if sampler is not None:
            sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = F.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    return losses


def main() -> None:
    if "RANK" not in os.environ:  # `python examples/ddp.py`: a world of one process
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    data = make_data()
    # shuffle=False: rank r's t-th batch is its share of the t-th global batch of the reference
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(data, batch_size=GLOBAL_BATCH // world, sampler=sampler)
    model = DDP(make_model())
    losses = train(model, loader, sampler)
    local_loss = torch.tensor(losses)
    dist.all_reduce(local_loss)  # the mean over ranks of each rank's mean: the global batch loss
    global_loss = (local_loss / world).tolist()

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(everyone, flat)
    rank_spread = max((t - everyone[0]).abs().max().item() for t in everyone)

    if rank == 0:
        epochs = [sum(global_loss[i:i + STEPS_PER_EPOCH]) / STEPS_PER_EPOCH
                  for i in range(0, len(global_loss), STEPS_PER_EPOCH)]
        for epoch, loss in enumerate(epochs):
            print(f"epoch {epoch}  mean loss {loss:.4f}")
        reference = make_model()
        train(reference, DataLoader(data, batch_size=GLOBAL_BATCH, shuffle=False))
        ref = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
        gap = ((flat - ref).abs().max() / ref.abs().max()).item()
        print(f"loss fell from {epochs[0]:.4f} to {epochs[-1]:.4f}: {epochs[-1] < epochs[0]}")
        print(f"ranks agree: {rank_spread == 0.0} (max |θ_rank - θ_rank0| = {rank_spread:.1e} over {world} ranks)")
        print(f"matches one process on the whole batch: {gap < 1e-4} (max relative difference {gap:.1e})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
