"""The low-precision section of ``descend demo``: the demo's MLP on the digits trained with
AdamW in float32, with its state in bfloat16 and in 8 bits, and with bfloat16 parameters
rounded to nearest (torch's behaviour), with compensation and stochastically.

Settings (those of ``tests/test_precision_quality.py``, which holds the claims): the MLP with
64 hidden units, AdamW with lr 3e-3 and weight_decay 0.01 (decoupled: lr·λ = 3e-5 per step,
far below half an ulp of bfloat16, 2⁻⁹), the demo's cosine schedule, 20 epochs of batches
of 32; 3 seeds (``--quick``: 1), each configuration's numbers the mean over the seeds. The
bfloat16 runs get bfloat16 data and compute their forward and backward passes in bfloat16.

What it shows (measured, 3 seeds): the bfloat16 and 8-bit state and the compensated and
stochastic roundings end with float32's test accuracy and a train loss within 0.8–1.1× of
float32's; bfloat16 rounded to nearest ends with 2.6× float32's train loss, because its decay
and its small updates round away (its test accuracy, on this small problem, does not suffer).

Writes ``lowprec.png`` (train loss and test accuracy over the epochs, mean over seeds, one
line per configuration) and ``lowprec.json`` into the demo's output directory.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import descend
from descend.cli import digits

__all__ = ["LowPrecConfig", "LowPrecResult", "CONFIGS", "OUTPUTS", "run_config", "run_all", "format_table",
           "plot", "section"]

HIDDEN = 64
LR = 3e-3
WEIGHT_DECAY = 0.01
BATCH_SIZE = 32
EPOCHS = 20
SEEDS = 3
QUICK_SEEDS = 1
#: what the section writes into the demo's ``--out``
OUTPUTS = ("lowprec.png", "lowprec.json")


@dataclass(frozen=True)
class LowPrecConfig:
    name: str
    label: str
    dtype: torch.dtype  # of the parameters (and the data)
    options: dict[str, Any]
    color: str
    linestyle: str = "-"


CONFIGS = (
    LowPrecConfig("float32", "float32 parameters and state", torch.float32, {}, "k"),
    LowPrecConfig("bf16-state", "state_dtype=torch.bfloat16", torch.float32, {"state_dtype": torch.bfloat16}, "C0",
                  "--"),
    LowPrecConfig("8bit-state", 'state_dtype="8bit"', torch.float32, {"state_dtype": "8bit"}, "C2", "--"),
    LowPrecConfig("bf16-nearest", "bfloat16 params, rounding nearest (torch)", torch.bfloat16, {}, "C3"),
    LowPrecConfig("bf16-compensated", 'bfloat16 params, rounding="compensated"', torch.bfloat16,
                  {"rounding": "compensated"}, "C1"),
    LowPrecConfig("bf16-stochastic", 'bfloat16 params, rounding="stochastic"', torch.bfloat16,
                  {"rounding": "stochastic"}, "C4", ":"),
)


@dataclass
class LowPrecResult:
    config: LowPrecConfig
    seeds: list[int]
    train_loss: float  # final, mean over the seeds
    test_acc: float
    state_bytes_per_param: float  # optimizer state (every tensor, generators included) per parameter
    seconds: float
    params: int  # parameter elements of the model
    curves: dict[str, list[float]] = field(default_factory=dict)  # epoch, and the means over seeds
    per_seed: list[dict[str, float]] = field(default_factory=list)

    def record(self, reference: LowPrecResult | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.config.name, "label": self.config.label,
            "dtype": str(self.config.dtype).removeprefix("torch."),
            "options": {k: str(v).removeprefix("torch.") for k, v in self.config.options.items()},
            "seeds": self.seeds, "train_loss": self.train_loss, "test_acc": self.test_acc,
            "state_bytes_per_param": self.state_bytes_per_param, "params": self.params, "time_s": self.seconds,
            "per_seed": self.per_seed, "curves": self.curves,
        }
        if reference is not None:
            out["loss_ratio"] = self.train_loss / reference.train_loss if reference.train_loss else math.nan
            out["acc_diff"] = self.test_acc - reference.test_acc
        return out


def _data_in(data: digits.Digits, dtype: torch.dtype) -> digits.Digits:
    if data.x_train.dtype == dtype:
        return data
    return digits.Digits(data.x_train.to(dtype), data.y_train, data.x_test.to(dtype), data.y_test)


def run_config(config: LowPrecConfig, data: digits.Digits, seeds: list[int], epochs: int = EPOCHS,
               batch_size: int = BATCH_SIZE, hidden: int = HIDDEN) -> LowPrecResult:
    """Train ``config`` once per seed (``data`` in float32, converted to the config's dtype)."""
    from descend.cli.bench_precision import state_bytes  # (here: the demo does not need the bench to import)

    data = _data_in(data, config.dtype)
    histories, bytes_per_param, params = [], [], 0
    start = time.perf_counter()
    for seed in seeds:
        model = digits.make_mlp(data, hidden, seed).to(config.dtype)
        # stochastic rounding's generator is seeded from torch.initial_seed(), random per process
        # unless set: the run's seed sets it, so that a seed gives the same run every time
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (nearest on bfloat16 warns that the decay rounds away: it does)
            opt = descend.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, **config.options)
        histories.append(digits.train_minibatch(model, opt, data, epochs=epochs, batch_size=batch_size, seed=seed))
        counted = state_bytes(opt)
        bytes_per_param.append((counted["elements"] + counted["scalars"] + counted["generators"]) / counted["params"])
        params = counted["params"]
    seconds = time.perf_counter() - start

    def mean(key: str, i: int) -> float:
        return statistics.fmean(getattr(h.snapshots[i], key) for h in histories)

    n = len(histories[0].snapshots)
    curves = {"epoch": list(histories[0].passes),
              "train_loss": [mean("train_loss", i) for i in range(n)],
              "test_acc": [mean("test_acc", i) for i in range(n)]}
    per_seed = [{"seed": s, "train_loss": h.snapshots[-1].train_loss, "test_acc": h.snapshots[-1].test_acc}
                for s, h in zip(seeds, histories)]
    return LowPrecResult(config, list(seeds), curves["train_loss"][-1], curves["test_acc"][-1],
                         statistics.fmean(bytes_per_param), seconds, params, curves, per_seed)


def run_all(seeds: list[int], epochs: int = EPOCHS, configs: tuple[LowPrecConfig, ...] = CONFIGS,
            log: Callable[[str], None] | None = None, data: digits.Digits | None = None) -> list[LowPrecResult]:
    """Every configuration, on one thread (the model is tiny)."""
    results = []
    with digits.torch_threads(1):
        data = data if data is not None else digits.load_digits(torch.float32)
        for config in configs:
            results.append(run_config(config, data, seeds, epochs))
            if log is not None:
                log(f"low precision {config.name}: {results[-1].seconds:.1f} s")
    return results


def format_table(results: list[LowPrecResult]) -> str:
    """The section's table (plain text, as the demo's): loss and accuracy ratios are to the
    float32 row (the first)."""
    ref = results[0] if results and results[0].config.name == "float32" else None
    head = ["run", "what", "train loss", "test acc", "loss / float32", "acc − float32", "state B/param"]
    rows = [head]
    for r in results:
        rec = r.record(ref)
        rows.append([r.config.name, r.config.label, f"{r.train_loss:.4f}", f"{r.test_acc:.2%}",
                     f"{rec['loss_ratio']:.2f}×" if ref else "", f"{100 * rec['acc_diff']:+.1f} pt" if ref else "",
                     f"{r.state_bytes_per_param:.2f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join([line(rows[0]), line(["-" * w for w in widths])] + [line(r) for r in rows[1:]])


def plot(path: str, results: list[LowPrecResult], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), constrained_layout=True)
    for r in results:
        c = r.config
        for ax, key in zip(axes, ("train_loss", "test_acc")):
            ax.plot(r.curves["epoch"], r.curves[key], label=f"{c.name}: {c.label}", color=c.color,
                    linestyle=c.linestyle, linewidth=2.4 if c.name == "float32" else 1.6, alpha=0.9)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("train loss (cross-entropy, log scale)")
    axes[1].set_ylabel("test accuracy")
    finals = [r.test_acc for r in results]
    axes[1].set_ylim(max(0.0, min(finals) - 0.1), 1.0)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=9, frameon=False)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section(out: str, seed: int, quick: bool, log: Callable[[str], None] | None = None,
            epochs: int = EPOCHS) -> list[LowPrecResult]:
    """The demo's low-precision section: train, print the table, write ``lowprec.png`` and
    ``lowprec.json`` into ``out``. Seeds ``seed``, ``seed + 1``, … (modulo 2⁶⁴, as torch takes them)."""
    seeds = [(seed + i) % 2**64 for i in range(QUICK_SEEDS if quick else SEEDS)]
    start = time.perf_counter()
    results = run_all(seeds, epochs, log=log)
    ref = results[0]
    doc = {"settings": {"model": f"MLP {HIDDEN} hidden", "optimizer": f"descend.AdamW(lr={LR:g}, "
                        f"weight_decay={WEIGHT_DECAY:g}, ...)", "batch_size": BATCH_SIZE, "epochs": epochs,
                        "seeds": seeds, "schedule": "cosine to 0, per step"},
           "runs": [r.record(ref) for r in results]}
    digits.write_json(f"{out}/lowprec.json", doc)
    seeds_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean of seeds {seeds[0]}..{seeds[-1]}"
    plot(f"{out}/lowprec.png", results, f"descend demo, low precision: AdamW (lr {LR:g}, weight_decay "
         f"{WEIGHT_DECAY:g}) on digits, {epochs} epochs, {seeds_text}")
    print(f"\nLow precision: AdamW(lr={LR:g}, weight_decay={WEIGHT_DECAY:g}), {epochs} epochs of batches of "
          f"{BATCH_SIZE}, {seeds_text}; bfloat16 rows train in bfloat16\n")
    print(format_table(results))
    print(f"\nstate B/param: every tensor in optimizer.state (step counts, 8-bit scales and the compensation "
          f"included) and the state of stochastic rounding's generator ({_generator_bytes()} bytes on the CPU), "
          f"over the model's {ref.params:,} parameters")
    print(f"\nwrote {out}/lowprec.png, lowprec.json ({time.perf_counter() - start:.0f} s)")
    return results


def _generator_bytes() -> int:
    return int(torch.Generator().get_state().numel())

