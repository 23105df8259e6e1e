"""What ``descend demo`` and ``descend sweep`` share: the digits data, the models, one
training loop, and the optional dependencies of the ``descend[demo]`` extra.

The data is scikit-learn's bundled copy of the UCI handwritten digits (1,797 8×8 images,
10 classes; it ships with scikit-learn, so nothing is downloaded). The train/test split is
fixed (stratified, 25 % test, ``random_state=0``) whatever the seed; the seed chooses the
initial weights and the order of the minibatches. Features are standardized with the
training set's mean and standard deviation; the pixels that are blank in every training
image (they carry no information, and their weights would get no gradient) are dropped.

Nothing here imports scikit-learn, matplotlib or tqdm at module level: ``import descend``
must need only torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

# re-exported: what demo and sweep used from here before descend.cli.options held it
from descend.cli.options import CommandError as CommandError
from descend.cli.options import positive_int as positive_int

EXTRA_HINT = "pip install 'descend[demo]'"


def require(*modules: str) -> None:
    """Raise :class:`CommandError` naming the ``descend[demo]`` extra if a module is missing
    (found, not imported: importing matplotlib or scikit-learn takes seconds)."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise CommandError(f"this command needs {', '.join(missing)} (the demo extra): {EXTRA_HINT}")


def atomic_write_text(path: str, text: str) -> None:
    """Write a file so that an interrupted write never leaves half of it behind."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _json_ready(x: Any) -> Any:
    """JSON has no NaN or infinity: non-finite floats become null (tuples become lists)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    return x


def write_json(path: str, doc: Any) -> None:
    """Write ``doc`` as indented JSON, atomically, non-finite floats as null."""
    atomic_write_text(path, json.dumps(_json_ready(doc), indent=1, ensure_ascii=False) + "\n")


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``torch.set_num_threads(n)``, restoring the old value afterwards.

    The models here are tiny: one thread is faster than several, which would spend their
    time synchronizing (and fight over the cores with the sweep's worker processes)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# --- data -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Digits:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_classes(self) -> int:
        return 10


def load_digits(dtype: torch.dtype = torch.float64) -> Digits:
    """scikit-learn's digits, split 1347 / 450 (stratified, fixed), standardized; the
    pixels that are constant over the training set are dropped."""
    require("sklearn")
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    x, y = sk_load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    std = x_tr.std(axis=0)
    keep = std > 0
    x_tr, x_te, std = x_tr[:, keep], x_te[:, keep], std[keep]
    mean = x_tr.mean(axis=0)
    return Digits(
        x_train=torch.tensor((x_tr - mean) / std, dtype=dtype),
        y_train=torch.tensor(y_tr, dtype=torch.long),
        x_test=torch.tensor((x_te - mean) / std, dtype=dtype),
        y_test=torch.tensor(y_te, dtype=torch.long),
    )


# --- models ---------------------------------------------------------------------------


def make_mlp(data: Digits, hidden: int, seed: int) -> nn.Module:
    """features → hidden → ReLU → 10, initialized from ``seed`` (PyTorch's default init)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(data.n_features, hidden), nn.ReLU(), nn.Linear(hidden, data.n_classes))
    return model.to(data.x_train.dtype)


def make_logistic(data: Digits, seed: int) -> nn.Module:
    """Multinomial logistic regression, initialized from ``seed`` (PyTorch's default init)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Linear(data.n_features, data.n_classes)
    return model.to(data.x_train.dtype)


def weights(model: nn.Module) -> list[Tensor]:
    """The weight matrices (what is decayed); biases are left alone."""
    return [p for p in model.parameters() if p.ndim >= 2]


def flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# --- measuring ------------------------------------------------------------------------


@dataclass
class Snapshot:
    """What is measured after each epoch (or full-batch step)."""

    train_loss: float  # mean cross-entropy over the whole training set, no penalty
    test_acc: float
    norm: float  # ‖θ‖₂ over all parameters
    zero_share: float  # share of entries of the weight matrices that are exactly 0


@torch.no_grad()
def measure(model: nn.Module, data: Digits) -> Snapshot:
    train_loss = float(nn.functional.cross_entropy(model(data.x_train), data.y_train))
    test_acc = float((model(data.x_test).argmax(dim=1) == data.y_test).double().mean())
    flat = flat_params(model)
    w = torch.cat([p.detach().reshape(-1) for p in weights(model)])
    return Snapshot(
        train_loss=train_loss if math.isfinite(train_loss) else float("nan"),
        test_acc=test_acc,
        norm=float(flat.norm()),
        zero_share=float((w == 0).double().mean()),
    )


# --- one training loop ----------------------------------------------------------------


@dataclass
class History:
    passes: list[float]  # passes over the training set (epochs, or full-batch gradient evaluations)
    snapshots: list[Snapshot]
    steps: int = 0  # optimizer.step() calls
    seconds: float = 0.0  # training time, measurements excluded

    def curves(self) -> dict[str, list[float]]:
        return {
            "passes": list(self.passes),
            "train_loss": [s.train_loss for s in self.snapshots],
            "test_acc": [s.test_acc for s in self.snapshots],
            "norm": [s.norm for s in self.snapshots],
            "zero_share": [s.zero_share for s in self.snapshots],
        }


def train_minibatch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Digits,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    penalty: Callable[[], Tensor] | None = None,
    on_epoch: Callable[[int, Snapshot], Any] | None = None,
    measure_every_epoch: bool = True,
) -> History:
    """Minibatch training with a cosine learning-rate schedule (per step, to 0).

    The minibatch order comes from ``seed`` alone, so two runs with the same seed see the
    same batches in the same order. ``penalty()``, if given, is added to each batch loss.
    """
    n = data.x_train.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed((seed + 1) % 2**64)  # any seed torch takes, as torch maps it
    history = History(passes=[0.0], snapshots=[measure(model, data)])
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        order = torch.randperm(n, generator=generator)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            if penalty is not None:
                loss = loss + penalty()
            loss.backward()
            optimizer.step()
            scheduler.step()
            history.steps += 1
        history.seconds += time.perf_counter() - start
        if measure_every_epoch or epoch == epochs:
            snap = measure(model, data)
            history.passes.append(float(epoch))
            history.snapshots.append(snap)
            if on_epoch is not None:
                on_epoch(epoch, snap)
    return history

