"""descend sweep: learning rate × weight decay, Adam+L2 against AdamW, on the digits data.

For every learning rate and weight decay of a log2-spaced grid, trains the demo's MLP (same
initial weights and minibatches everywhere, cosine learning-rate schedule) with

- Adam + L2: ``descend.Adam(..., weight_decay=λ)`` (coupled: λ·θ is added to the gradient,
  then divided by √v̂ like the rest of it), and
- AdamW as the paper has it: ``descend.AdamW(..., weight_decay=λ, decay="independent")``
  (θ ← θ·(1 − η_t·λ), η_t the schedule multiplier, not multiplied by the learning rate),

and draws the two test-error heatmaps side by side, as in Figure 2 of Loshchilov & Hutter,
"Decoupled Weight Decay Regularization". The paper's claim is that with AdamW the best
learning rate does not move when the weight decay changes (the good region is aligned with
the axes: the two are separable) while with Adam+L2 it does. Each heatmap draws the best
learning rate for each weight decay as a line, so you can check the claim on this problem:
a horizontal line means separable. ``--methods`` adds torch's AdamW (``decay="decoupled"``,
θ ← θ·(1 − lr_t·λ)) as a third heatmap.

Cells run in parallel, one process per core (each with one torch thread). Each finished cell
is appended to ``sweep.jsonl`` in ``--out`` at once; running the same command again skips
the cells already there, so an interrupted sweep (Ctrl-C) loses nothing and recomputes
nothing. A damaged line (cut short, not UTF-8, not a record, or a test error that is not a
number in [0, 1]) is dropped from the file, with one line on stderr saying so, and its cell is
computed again. The figure is ``sweep.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass
from typing import Any

import torch

import descend
from descend.cli import digits, options

HELP = "learning rate × weight decay grid for Adam+L2 and AdamW; draws the two test-error heatmaps"

HIDDEN = 64
BATCH_SIZE = 64
EPOCHS = 20
MAX_AXIS = 1000  # learning rates, weight decays
RESULTS = "sweep.jsonl"
FIGURE = "sweep.png"

#: method → (title, what its weight decay λ is)
METHODS = {
    "adam-l2": ("Adam + L2", "L2 factor λ (coupled weight_decay)"),
    "adamw": ("AdamW (paper, decay=\"independent\")", "weight decay λ (θ ← θ·(1 − η_t·λ))"),
    "adamw-decoupled": ("AdamW (torch, decay=\"decoupled\")", "weight decay λ (θ ← θ·(1 − lr_t·λ))"),
}
DEFAULT_METHODS = ["adam-l2", "adamw"]


@dataclass(frozen=True)
class Cell:
    """One training run of the grid; everything that determines its result."""

    method: str
    lr: float
    weight_decay: float
    epochs: int
    batch_size: int
    hidden: int
    seed: int

    @property
    def key(self) -> str:
        return json.dumps([self.method, self.lr, self.weight_decay, self.epochs, self.batch_size, self.hidden,
                           self.seed])


def log2_grid(low: float, high: float, n: int) -> list[float]:
    """2**e for n exponents evenly spaced from low to high (one value, 2**low, if n = 1)."""
    if n == 1:
        return [2.0**low]
    return [2.0 ** (low + i * (high - low) / (n - 1)) for i in range(n)]


def make_optimizer(cell: Cell, model: torch.nn.Module) -> torch.optim.Optimizer:
    groups = descend.param_groups(model, weight_decay=cell.weight_decay)  # biases are not decayed
    if cell.method == "adam-l2":
        return descend.Adam(groups, lr=cell.lr)
    if cell.method == "adamw":
        return descend.AdamW(groups, lr=cell.lr, decay="independent")
    if cell.method == "adamw-decoupled":
        return descend.AdamW(groups, lr=cell.lr, decay="decoupled")
    raise ValueError(f"unknown method {cell.method!r}")


_DATA: digits.Digits | None = None


def _data() -> digits.Digits:
    global _DATA
    if _DATA is None:
        _DATA = digits.load_digits(torch.float64)
    return _DATA


def train_cell(cell: Cell) -> dict[str, Any]:
    """Train one cell; returns its record (the line appended to ``sweep.jsonl``)."""
    data = _data()
    model = digits.make_mlp(data, cell.hidden, cell.seed)
    optimizer = make_optimizer(cell, model)
    history = digits.train_minibatch(model, optimizer, data, epochs=cell.epochs, batch_size=cell.batch_size,
                                      seed=cell.seed, measure_every_epoch=False)
    last = history.snapshots[-1]
    return {"key": cell.key, **asdict(cell), "test_error": 1.0 - last.test_acc,
            "train_loss": last.train_loss if math.isfinite(last.train_loss) else None,
            "norm": last.norm if math.isfinite(last.norm) else None, "time_s": history.seconds}


def _init_worker() -> None:
    # Ctrl-C goes to the whole process group: the parent handles it, workers just stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


# --- the results file ------------------------------------------------------------------


def _problem(line: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(the record, None) for a sound line of the results file, (None, what is wrong) otherwise."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None, "bytes that are not UTF-8"
    try:
        rec = json.loads(text)
    except ValueError:
        return None, "not JSON (a write cut short?)"
    if not isinstance(rec, dict) or not isinstance(rec.get("key"), str) or "test_error" not in rec:
        return None, "not a cell's record"
    error = rec["test_error"]
    if isinstance(error, bool) or not isinstance(error, (int, float)):
        return None, f"test_error {error!r} is not a number"
    if not (math.isfinite(error) and 0 <= error <= 1):
        return None, f"test_error {error!r} is outside [0, 1]"
    return rec, None


def scan_results(path: str) -> tuple[dict[str, dict[str, Any]], list[bytes], list[tuple[int, str]]]:
    """Read ``path``: the sound records by key (a later line wins), the sound lines as they are,
    and the damaged ones as (line number, what is wrong). A missing file is an empty one."""
    records: dict[str, dict[str, Any]] = {}
    sound: list[bytes] = []
    damaged: list[tuple[int, str]] = []
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return records, sound, damaged
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        rec, problem = _problem(line)
        if rec is None:
            damaged.append((number, problem or "damaged"))
            continue
        records[rec["key"]] = rec
        sound.append(line)
    return records, sound, damaged


def read_results(path: str) -> dict[str, dict[str, Any]]:
    """The sound records in ``path`` by key; damaged lines (see :func:`repair_results`) are
    left out."""
    return scan_results(path)[0]


def repair_results(path: str) -> dict[str, dict[str, Any]]:
    """The sound records in ``path`` by key, after rewriting the file without its damaged
    lines (a line that does not parse, holds bytes that are not UTF-8, or whose test_error is
    not a number in [0, 1]), so that their cells are computed again; says so in one line on
    stderr. The rewrite is atomic: an interruption leaves the old file or the new one."""
    records, sound, damaged = scan_results(path)
    if not damaged:
        return records
    number, problem = damaged[0]
    more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
    try:
        digits.atomic_write_text(path, "".join(line.decode("utf-8") + "\n" for line in sound))
    except OSError as e:
        raise options.CommandError(f"cannot rewrite {path!r} without its damaged lines: {e.strerror or e}") from None
    print(f"descend sweep: {path}: dropped {len(damaged)} damaged line{'s' if len(damaged) > 1 else ''} "
          f"(line {number}: {problem}{more}); the cells they held are computed again", file=sys.stderr)
    return records


class ResultsFile:
    """Appends one JSON line per finished cell, on disk at once.

    Each line goes out in one ``os.write`` on a file opened with O_APPEND: Ctrl-C is handled
    between Python operations, so a line is either written whole or not at all."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        size = os.fstat(self.fd).st_size
        if size > 0 and os.pread(self.fd, 1, size - 1) != b"\n":  # a line cut short: start a fresh one
            os.write(self.fd, b"\n")

    def append(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record) + "\n").encode()
        written = os.write(self.fd, data)
        if written != len(data):  # not seen for small writes to regular files; finish the line anyway
            os.write(self.fd, data[written:])
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


# --- running the grid ------------------------------------------------------------------


def _context() -> multiprocessing.context.BaseContext:
    """fork where it is safe and cheap (Linux): the workers inherit the imported modules and
    the loaded data instead of importing torch and scikit-learn again, which takes seconds
    each. Elsewhere spawn. The parent has run no parallel torch work when it forks, and each
    worker sets one torch thread."""
    if sys.platform == "linux" and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _run_cells(cells: list[Cell], workers: int) -> Generator[dict[str, Any], None, None]:
    """Yield each cell's record as it finishes, in a pool of ``workers`` processes (in this
    process when ``workers`` is 1). Closing the generator (Ctrl-C) stops the workers."""
    if workers <= 1 or len(cells) <= 1:
        with digits.torch_threads(1):
            for cell in cells:
                yield train_cell(cell)
        return
    _data()  # loaded once, here: forked workers inherit it
    # torch imports parts of itself (torch._dynamo) when the first optimizer is built: do it
    # here once, not in every worker
    descend.Adam(torch.nn.Linear(1, 1).parameters())
    pool = _context().Pool(processes=min(workers, len(cells)), initializer=_init_worker)
    try:
        yield from pool.imap_unordered(train_cell, cells, chunksize=1)
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def sweep(cells: list[Cell], out: str, workers: int, progress: bool) -> tuple[dict[str, dict[str, Any]], int]:
    """Run the cells of ``cells`` that ``out/sweep.jsonl`` does not hold yet; returns all
    records of the grid and how many were computed now."""
    path = os.path.join(out, RESULTS)
    done = repair_results(path)
    pending = [c for c in cells if c.key not in done]
    skipped = len(cells) - len(pending)
    if skipped:
        print(f"{skipped} of {len(cells)} cells already in {path}: skipping them", file=sys.stderr)
    if not pending:
        return done, 0
    from tqdm.auto import tqdm

    results = ResultsFile(path)
    computed = 0
    bar = tqdm(total=len(pending), desc="sweep", unit="cell", file=sys.stderr, disable=None if progress else True,
               dynamic_ncols=True)
    cells_run = _run_cells(pending, workers)
    try:
        for record in cells_run:
            results.append(record)
            done[record["key"]] = record
            computed += 1
            bar.set_postfix(method=record["method"], lr=f"{record['lr']:.2g}", wd=f"{record['weight_decay']:.2g}",
                            err=f"{record['test_error']:.3f}", refresh=False)
            bar.update(1)
    finally:
        cells_run.close()
        bar.close()
        results.close()
    return done, computed


# --- reading the grid ------------------------------------------------------------------


def error_grid(records: dict[str, dict[str, Any]], method: str, lrs: list[float], wds: list[float],
               template: Cell) -> list[list[float]]:
    """Test error by [lr index][wd index] (NaN where the cell has not run)."""
    grid = []
    for lr in lrs:
        row = []
        for wd in wds:
            key = Cell(method, lr, wd, template.epochs, template.batch_size, template.hidden, template.seed).key
            rec = records.get(key)
            row.append(float(rec["test_error"]) if rec is not None else math.nan)
        grid.append(row)
    return grid


def _exponent(x: float) -> str:
    return f"{math.log2(x):.3g}"


def format_grid(title: str, grid: list[list[float]], lrs: list[float], wds: list[float]) -> str:
    head = "log2 lr \\ log2 wd"
    width = max(6, *(len(_exponent(w)) for w in wds))
    lines = [title, head.ljust(18) + "".join(_exponent(w).rjust(width + 1) for w in wds)]
    for lr, row in zip(lrs, grid):
        cells = "".join(("-" if math.isnan(e) else f"{100 * e:.1f}").rjust(width + 1) for e in row)
        lines.append(_exponent(lr).ljust(18) + cells)
    return "\n".join(lines)


def best(grid: list[list[float]], lrs: list[float], wds: list[float]) -> tuple[float, float, float] | None:
    cells = [(e, lrs[i], wds[j]) for i, row in enumerate(grid) for j, e in enumerate(row) if not math.isnan(e)]
    return min(cells) if cells else None


def plot(path: str, grids: dict[str, list[list[float]]], lrs: list[float], wds: list[float], subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array([grids[m] for m in grids], dtype=float) * 100
    finite = values[np.isfinite(values)]
    vmin = float(finite.min()) if finite.size else 0.0
    # the colour scale stops at 4× the best error, so the good region is resolved, as in the paper
    vmax = float(min(finite.max(), max(4 * vmin, vmin + 5))) if finite.size else 100.0
    fig, axes = plt.subplots(1, len(grids), figsize=(5.2 * len(grids) + 1, 0.45 * len(lrs) + 3),
                             constrained_layout=True, squeeze=False)
    image = None
    for ax, (method, grid) in zip(axes[0], grids.items()):
        data = np.array(grid, dtype=float) * 100
        image = ax.imshow(data, origin="lower", cmap="viridis_r", vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(wds)), [_exponent(w) for w in wds])
        ax.set_yticks(range(len(lrs)), [_exponent(lr) for lr in lrs])
        ax.set_xlabel(f"log2 {METHODS[method][1]}")
        ax.set_ylabel("log2 learning rate")
        ax.set_title(f"{METHODS[method][0]}: test error %")
        finite_cells = np.argwhere(np.isfinite(data))
        order = sorted(finite_cells.tolist(), key=lambda ij: data[ij[0], ij[1]])
        top = order[: max(1, round(len(order) / 5))]  # the best fifth of the cells circled
        for i, j in finite_cells.tolist():
            e = data[i, j]
            ax.text(j, i, f"{e:.1f}", ha="center", va="center", fontsize=7,
                    color="black" if e < (vmin + vmax) / 2 else "white")
        ax.scatter([j for _, j in top], [i for i, _ in top], s=380, facecolors="none", edgecolors="k",
                   linewidths=1.3)
        if top:
            ax.scatter([top[0][1]], [top[0][0]], s=380, facecolors="none", edgecolors="red", linewidths=2)
        # the best learning rate for each weight decay: a horizontal line means "separable"
        col_best = [(int(np.nanargmin(data[:, j])), j) for j in range(data.shape[1]) if np.isfinite(data[:, j]).any()]
        if col_best:
            ax.plot([j for _, j in col_best], [i for i, _ in col_best], color="red", linewidth=1, alpha=0.6)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), label="test error % (colour scale clipped)")
    fig.suptitle(f"descend sweep: Adam+L2 vs AdamW on digits ({subtitle}); circles: best fifth, red: best; "
                 "line: best lr per weight decay", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the command -----------------------------------------------------------------------


def _exponent_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid log2 exponent: {text!r}") from None
    if not (math.isfinite(value) and -60 <= value <= 10):
        raise argparse.ArgumentTypeError(f"log2 exponent must be in [-60, 10], got {text}")
    return value


def _methods(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method {', '.join(map(repr, unknown)) or repr(text)} "
                                         f"(choose from {', '.join(METHODS)})")
    return list(dict.fromkeys(names))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="DIR", default="descend-sweep",
                        help=f"output directory, holding {RESULTS} and {FIGURE} (default: ./descend-sweep/)")
    parser.add_argument("--lr", nargs=2, type=_exponent_arg, metavar=("LO", "HI"), default=[-12.0, -4.0],
                        help="log2 of the smallest and largest learning rate (default: -12 -4)")
    parser.add_argument("--wd", nargs=2, type=_exponent_arg, metavar=("LO", "HI"), default=[-16.0, -2.0],
                        help="log2 of the smallest and largest weight decay, for every method (default: -16 -2)")
    parser.add_argument("--n-lr", type=options.int_in(1, MAX_AXIS), default=9, metavar="N",
                        help=f"number of learning rates (default: 9, at most {MAX_AXIS})")
    parser.add_argument("--n-wd", type=options.int_in(1, MAX_AXIS), default=8, metavar="N",
                        help=f"number of weight decays (default: 8, at most {MAX_AXIS})")
    parser.add_argument("--epochs", type=options.positive_int, default=EPOCHS, metavar="N",
                        help=f"epochs per cell (default: {EPOCHS})")
    parser.add_argument("--seed", type=options.seed, default=0, metavar="N",
                        help="initial weights and minibatch order (default: 0)")
    parser.add_argument("--workers", type=options.positive_int, default=os.cpu_count() or 1, metavar="N",
                        help="worker processes (default: all cores, here %(default)s)")
    parser.add_argument("--methods", type=_methods, default=DEFAULT_METHODS, metavar="M[,M...]",
                        help=f"what to compare, one heatmap each (default: {','.join(DEFAULT_METHODS)}; "
                        f"choose from {', '.join(METHODS)})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_args(args: argparse.Namespace) -> None:
    """What no single option's type can see (a usage error, raised as ArgumentTypeError)."""
    for option, (low, high), n in (("--lr", args.lr, args.n_lr), ("--wd", args.wd, args.n_wd)):
        if low == high and n > 1:
            raise argparse.ArgumentTypeError(f"{option} {low:g} {high:g} with --n-{option[2:]} {n}: the same "
                                             f"value {n} times (give two different exponents, or --n-{option[2:]} 1)")


def cells_of(args: argparse.Namespace) -> tuple[list[Cell], list[float], list[float]]:
    lrs = log2_grid(args.lr[0], args.lr[1], args.n_lr)
    wds = log2_grid(args.wd[0], args.wd[1], args.n_wd)
    cells = [Cell(method, lr, wd, args.epochs, BATCH_SIZE, HIDDEN, args.seed)
             for method in args.methods for lr in lrs for wd in wds]
    return cells, lrs, wds


def run(args: argparse.Namespace) -> int:
    out = options.check_output_dir(args.out, (RESULTS, FIGURE))
    digits.require("sklearn", "matplotlib", "tqdm")
    cells, lrs, wds = cells_of(args)
    start = time.perf_counter()
    interrupted = False
    records: dict[str, dict[str, Any]] = {}
    computed = 0
    try:
        records, computed = sweep(cells, out, args.workers, progress=not args.no_progress)
    except KeyboardInterrupt:
        interrupted = True
        records = read_results(os.path.join(out, RESULTS))
    grids = {m: error_grid(records, m, lrs, wds, cells[0]) for m in args.methods}
    finished = sum(not math.isnan(e) for g in grids.values() for row in g for e in row)
    for method, grid in grids.items():
        print(format_grid(f"{METHODS[method][0]}: test error % after {args.epochs} epochs", grid, lrs, wds))
        b = best(grid, lrs, wds)
        if b is not None:
            print(f"best: {100 * b[0]:.2f} % at lr = 2^{_exponent(b[1])}, weight decay = 2^{_exponent(b[2])}\n")
    if interrupted:  # no figure: leave at once; the next run draws it
        print(f"{finished} of {len(cells)} cells in {os.path.join(out, RESULTS)}")
        print(f"descend sweep: interrupted; {finished} finished cells kept in {os.path.join(out, RESULTS)}; "
              "run the same command again to do the rest", file=sys.stderr)
        return 130
    plot(os.path.join(out, FIGURE), grids, lrs, wds, f"{args.epochs} epochs, seed {args.seed}")
    elapsed = time.perf_counter() - start
    print(f"{finished} of {len(cells)} cells in {os.path.join(out, RESULTS)} ({computed} computed now, "
          f"{elapsed:.0f} s, {args.workers} workers); figure {os.path.join(out, FIGURE)}")
    return 0

