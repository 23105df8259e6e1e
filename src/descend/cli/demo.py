"""descend demo: what L2, coupled and decoupled weight decay, L1 and the closure solvers do.

Trains a small MLP (60 → 64 → ReLU → 10) on scikit-learn's bundled digits (1,347 training
and 450 test images, a fixed stratified split) with minibatch SGD and Adam under each kind
of regularization, and fits an L2-regularized logistic regression with the full-batch
solvers (L-BFGS, and nonlinear conjugate gradient where descend has it). Every run starts
from the same weights and sees the same minibatches (``--seed``), in float64, so runs that
are mathematically the same end with the same weights, to rounding:

- SGD on loss + c·Σw² and SGD with ``weight_decay=2c`` (coupled decay is L2);
- plain SGD with coupled and with decoupled decay (without momentum they are one rule);
- AdamW with ``weight_decay=λ`` and the AdamW paper's ``decay="independent"`` with
  ``weight_decay=lr₀·λ``;

and runs that are not do not: coupled and decoupled decay with momentum, Adam+L2 and AdamW.

Writes into ``--out``: ``demo.png`` (train loss, test accuracy, ‖θ‖ and the share of weights
that are exactly 0, over training, one line per run), ``results.json`` (everything, curves
included), ``results.csv`` (the table) and ``weights.pt`` (the final parameters of each run,
flattened). Results are written after each run, so an interrupted demo keeps the runs it
finished.

Then a low-precision section (:mod:`descend.cli.lowprec`; ``--only lowprec`` runs it alone, any
other ``--only`` skips it): AdamW in float32, with bfloat16 and 8-bit state, and on bfloat16
parameters rounded to nearest, compensated and stochastically, 20 epochs, 3 seeds (``--quick``:
1); its table is printed and ``lowprec.png`` and ``lowprec.json`` are written into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import descend
from descend.cli import digits, lowprec, options
from descend.cli.digits import Digits, History

HELP = "train on the digits data under each kind of regularization; write a figure, a table, JSON and CSV"

# --- the story's settings ---------------------------------------------------------------

HIDDEN = 64
BATCH_SIZE = 64
EPOCHS = 60
QUICK_EPOCHS = 8
SGD_LR = 0.2  # plain SGD
SGDM_LR = 0.05  # SGD with momentum
MOMENTUM = 0.9
SGD_WD = 1e-2  # λ for the SGD rows: the loss term is λ/2·Σw², i.e. c = 5e-3 in the tutorials' c·Σw²
ADAM_LR = 2e-3
ADAM_WD = 0.1  # the same λ for Adam+L2 and AdamW: the point is that it does not mean the same
L1 = 1e-2  # λ₁ of the proximal (decoupled) L1 run
LOGISTIC_L2 = 1e-2  # full batch: minimize cross-entropy + λ/2·Σw²
FULL_BATCH_MAX_ITER = 5  # solver iterations per step(closure)
FULL_BATCH_PASSES = 60  # gradient evaluations each full-batch solver may spend (they cost little)


@dataclass(frozen=True)
class Config:
    """One run of the demo."""

    name: str  # short id, used on the command line (--only) and in the files
    label: str  # what the table says
    optimizer: str  # the call, as a user would write it
    build: Callable[[nn.Module], torch.optim.Optimizer]
    penalty: float = 0.0  # c in loss + c·Σw² (w: the weight matrices)
    full_batch: bool = False
    color: str = "C0"
    linestyle: str = "-"
    linewidth: float = 1.6


def _decayed(model: nn.Module, **options: Any) -> list[dict[str, Any]]:
    """Weight matrices decayed, biases not (descend.param_groups)."""
    return descend.param_groups(model, **options)


def _lbfgs() -> tuple[Callable[..., torch.optim.Optimizer], str]:
    cls = getattr(descend, "LBFGS", None)
    if cls is not None:
        return cls, "descend.LBFGS"
    return torch.optim.LBFGS, "torch.optim.LBFGS"  # until descend.LBFGS exists


def _full_batch_config(name: str, label: str, solver: Callable[..., torch.optim.Optimizer], solver_name: str,
                       options: dict[str, Any], color: str) -> Config:
    """A closure solver on the L2-regularized logistic regression. descend's solvers take the
    L2 term as ``weight_decay`` (part of the objective their line search sees); torch's
    L-BFGS, the stand-in until descend has one, gets it as a term of the closure's loss."""
    opts = {**options, "max_iter": FULL_BATCH_MAX_ITER, "line_search_fn": "strong_wolfe"}
    shown = ", ".join(f"{k}={v!r}" for k, v in opts.items())
    if solver_name.startswith("descend."):
        return Config(name, label, f"{solver_name}(param_groups(model, weight_decay={LOGISTIC_L2:g}), {shown})",
                      lambda m: solver(descend.param_groups(m, weight_decay=LOGISTIC_L2), **opts),
                      full_batch=True, color=color, linestyle="--")
    return Config(name, label, f"{solver_name}(model.parameters(), {shown}) on loss + "
                  f"{LOGISTIC_L2 / 2:g}*l2_penalty(weights)",
                  lambda m: solver(m.parameters(), **opts), penalty=LOGISTIC_L2 / 2,
                  full_batch=True, color=color, linestyle="--")


def configurations() -> list[Config]:
    """The runs, in the order the story tells them."""
    c = SGD_WD / 2
    paper_wd = ADAM_LR * ADAM_WD  # the AdamW paper's λ for the same decay
    lbfgs, lbfgs_name = _lbfgs()
    configs = [
        Config("sgdm", "SGD+momentum, no regularization", f"SGD(lr={SGDM_LR}, momentum={MOMENTUM})",
               lambda m: descend.SGD(m.parameters(), lr=SGDM_LR, momentum=MOMENTUM), color="0.45"),
        Config("sgd-l2-loss", f"SGD, loss + {c:g}·Σw²",
               f"SGD(lr={SGD_LR}) on loss + {c:g}*l2_penalty(weights)",
               lambda m: descend.SGD(m.parameters(), lr=SGD_LR), penalty=c, color="C0", linewidth=3.2),
        Config("sgd-wd", f"SGD, weight_decay={SGD_WD:g}",
               f"SGD(param_groups(model, weight_decay={SGD_WD:g}), lr={SGD_LR})",
               lambda m: descend.SGD(_decayed(m, weight_decay=SGD_WD), lr=SGD_LR),
               color="C9", linestyle=":", linewidth=1.6),
        Config("sgd-decoupled", f"SGD, decoupled wd={SGD_WD:g}",
               f'SGD(param_groups(model, weight_decay={SGD_WD:g}), lr={SGD_LR}, decay="decoupled")',
               lambda m: descend.SGD(_decayed(m, weight_decay=SGD_WD), lr=SGD_LR, decay="decoupled"),
               color="navy", linestyle="--", linewidth=1.2),
        Config("sgdm-coupled", f"SGD+momentum, coupled wd={SGD_WD:g}",
               f"SGD(param_groups(model, weight_decay={SGD_WD:g}), lr={SGDM_LR}, momentum={MOMENTUM})",
               lambda m: descend.SGD(_decayed(m, weight_decay=SGD_WD), lr=SGDM_LR, momentum=MOMENTUM),
               color="C2"),
        Config("sgdm-decoupled", f"SGD+momentum, decoupled wd={SGD_WD:g}",
               f'SGD(param_groups(model, weight_decay={SGD_WD:g}), lr={SGDM_LR}, momentum={MOMENTUM}, '
               f'decay="decoupled")',
               lambda m: descend.SGD(_decayed(m, weight_decay=SGD_WD), lr=SGDM_LR, momentum=MOMENTUM,
                                     decay="decoupled"),
               color="C8"),
        Config("adam", "Adam, no regularization", f"Adam(lr={ADAM_LR:g})",
               lambda m: descend.Adam(m.parameters(), lr=ADAM_LR), color="k"),
        Config("adam-l2", f"Adam+L2, coupled wd={ADAM_WD:g}",
               f"Adam(param_groups(model, weight_decay={ADAM_WD:g}), lr={ADAM_LR:g})",
               lambda m: descend.Adam(_decayed(m, weight_decay=ADAM_WD), lr=ADAM_LR), color="C3"),
        Config("adamw", f"AdamW, decoupled wd={ADAM_WD:g}",
               f"AdamW(param_groups(model, weight_decay={ADAM_WD:g}), lr={ADAM_LR:g})",
               lambda m: descend.AdamW(_decayed(m, weight_decay=ADAM_WD), lr=ADAM_LR),
               color="C1", linewidth=3.2),
        Config("adamw-independent", f"AdamW, independent wd={paper_wd:g}",
               f'AdamW(param_groups(model, weight_decay={paper_wd:g}), lr={ADAM_LR:g}, decay="independent")',
               lambda m: descend.AdamW(_decayed(m, weight_decay=paper_wd), lr=ADAM_LR, decay="independent"),
               color="gold", linestyle=":"),
        Config("l1", f"SGD+momentum, decoupled L1={L1:g}",
               f'SGD(param_groups(model, weight_decay=0, l1={L1:g}), lr={SGDM_LR}, momentum={MOMENTUM}, '
               f'decay="decoupled")',
               lambda m: descend.SGD(_decayed(m, weight_decay=0.0, l1=L1), lr=SGDM_LR, momentum=MOMENTUM,
                                     decay="decoupled"),
               color="C4"),
        _full_batch_config("lbfgs", "L-BFGS, full batch, logistic+L2", lbfgs, lbfgs_name, {}, color="C5"),
    ]
    if hasattr(descend, "CG"):
        configs.append(_full_batch_config("cg", "CG (PR+), full batch, logistic+L2", descend.CG, "descend.CG",
                                          {"beta": "PR+"}, color="C6"))
    return configs


#: pairs of runs compared weight by weight, and whether they should end equal.
COMPARISONS = [
    ("sgd-l2-loss", "sgd-wd", True, "an L2 term in the loss is coupled weight decay (weight_decay = 2c)"),
    ("sgd-wd", "sgd-decoupled", True, "without momentum, θ − lr·(g + λθ) = θ·(1 − lr·λ) − lr·g"),
    ("sgdm-coupled", "sgdm-decoupled", False, "with momentum, coupled decay goes through the buffer"),
    ("adam-l2", "adamw", False, "Adam divides the L2 gradient by sqrt(v); AdamW does not"),
    ("adamw", "adamw-independent", True, "the paper's decay with λ_paper = lr₀·λ is torch's AdamW"),
]


# --- running ---------------------------------------------------------------------------


@dataclass
class Run:
    config: Config
    history: History
    final: Tensor  # the flattened parameters at the end
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        last = self.history.snapshots[-1]
        return {
            "name": self.config.name,
            "label": self.config.label,
            "optimizer": self.config.optimizer,
            "model": "logistic regression" if self.config.full_batch else f"MLP {HIDDEN} hidden",
            "train_loss": last.train_loss,
            "test_acc": last.test_acc,
            "norm": last.norm,
            "zero_share": last.zero_share,
            "steps": self.history.steps,
            "passes": self.history.passes[-1],
            "time_s": self.history.seconds,
            **self.extra,
            "curves": self.history.curves(),
        }


class _Progress:
    """One tqdm bar per run (stderr); or, without bars, one line per finished run."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def bar(self, desc: str, total: int) -> Any:
        from tqdm.auto import tqdm

        # disable=None: tqdm switches itself off when stderr is not a terminal
        return tqdm(total=total, desc=desc, file=sys.stderr, leave=True, unit="pass",
                    disable=None if self.enabled else True, dynamic_ncols=True)


def _train_mlp(config: Config, data: Digits, epochs: int, seed: int, progress: _Progress) -> Run:
    model = digits.make_mlp(data, HIDDEN, seed)
    optimizer = config.build(model)
    w = digits.weights(model)
    penalty = None
    if config.penalty:
        coefficient = config.penalty

        def penalty() -> Tensor:
            return coefficient * descend.l2_penalty(w)

    with progress.bar(config.name, epochs) as bar:

        def on_epoch(epoch: int, snap: digits.Snapshot) -> None:
            bar.set_postfix(loss=f"{snap.train_loss:.3g}", acc=f"{snap.test_acc:.3f}", refresh=False)
            bar.update(1)

        history = digits.train_minibatch(model, optimizer, data, epochs=epochs, batch_size=BATCH_SIZE, seed=seed,
                                          penalty=penalty, on_epoch=on_epoch)
    return Run(config, history, digits.flat_params(model))


def _logistic_objective(model: nn.Module, data: Digits) -> Tensor:
    """What the full-batch runs minimize: cross-entropy + λ/2·Σw² (λ = LOGISTIC_L2)."""
    loss = nn.functional.cross_entropy(model(data.x_train), data.y_train)
    return loss + LOGISTIC_L2 / 2 * descend.l2_penalty(digits.weights(model))


def _train_full_batch(config: Config, data: Digits, budget: int, seed: int, progress: _Progress) -> Run:
    """step(closure) until ``budget`` gradient evaluations (passes) are spent or the
    solver stops moving."""
    model = digits.make_logistic(data, seed)
    optimizer = config.build(model)
    evaluations = 0

    w = digits.weights(model)

    def closure() -> Any:  # the loss tensor; typed Any because torch types step(closure) as returning float
        nonlocal evaluations
        evaluations += 1
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(data.x_train), data.y_train)
        if config.penalty:
            loss = loss + config.penalty * descend.l2_penalty(w)
        loss.backward()
        return loss

    history = History(passes=[0.0], snapshots=[digits.measure(model, data)])
    with progress.bar(config.name, budget) as bar:
        while evaluations < budget:
            before = digits.flat_params(model)
            start = time.perf_counter()
            optimizer.step(closure)
            history.seconds += time.perf_counter() - start
            history.steps += 1
            snap = digits.measure(model, data)
            history.passes.append(float(evaluations))
            history.snapshots.append(snap)
            bar.set_postfix(loss=f"{snap.train_loss:.3g}", acc=f"{snap.test_acc:.3f}", refresh=False)
            bar.update(min(evaluations, budget) - bar.n)
            if torch.equal(before, digits.flat_params(model)):
                break  # converged: the solver's own tolerances stopped it
    with torch.no_grad():
        objective = float(_logistic_objective(model, data))
    return Run(config, history, digits.flat_params(model), extra={"objective": objective})


def logistic_optimum(data: Digits) -> float:
    """The minimum of the full-batch objective, from scipy's L-BFGS-B (an outside oracle)."""
    import numpy as np
    from scipy.optimize import minimize

    model = digits.make_logistic(data, 0)  # its values are replaced; only the shapes matter
    params = list(model.parameters())

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(torch.from_numpy(x).to(data.x_train.dtype), params)
        for p in params:
            p.grad = None
        loss = _logistic_objective(model, data)
        loss.backward()
        grad = torch.nn.utils.parameters_to_vector([p.grad for p in params if p.grad is not None])
        return float(loss.detach()), grad.double().numpy()

    x0 = np.zeros(sum(p.numel() for p in params))
    result = minimize(fun, x0, jac=True, method="L-BFGS-B", options={"maxiter": 10000, "ftol": 1e-15, "gtol": 1e-12})
    return float(result.fun)


def compare(runs: dict[str, Run]) -> list[dict[str, Any]]:
    """Max |Δθ| between the paired runs that both ran."""
    out = []
    for a, b, expected_equal, why in COMPARISONS:
        if a not in runs or b not in runs:
            continue
        ta, tb = runs[a].final, runs[b].final
        diff = float((ta - tb).abs().max())
        out.append({"a": a, "b": b, "expected_equal": expected_equal, "why": why, "max_abs_diff": diff,
                    "rel_diff": float((ta - tb).norm() / max(float(ta.norm()), 1e-300))})
    return out


# --- output ----------------------------------------------------------------------------

COLUMNS = [
    ("name", "run", "{}"),
    ("label", "what", "{}"),
    ("train_loss", "train loss", "{:.4f}"),
    ("test_acc", "test acc", "{:.2%}"),
    ("norm", "‖θ‖", "{:.3f}"),
    ("zero_share", "zeros", "{:.1%}"),
    ("steps", "steps", "{}"),
    ("passes", "passes", "{:g}"),
    ("time_s", "time s", "{:.1f}"),
]


def _cell(fmt: str, value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan"
    return fmt.format(value)


def format_table(records: list[dict[str, Any]]) -> str:
    rows = [[title for _, title, _ in COLUMNS]]
    rows += [[_cell(fmt, r[key]) for key, _, fmt in COLUMNS] for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    left = {"name", "label"}

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if COLUMNS[i][0] in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join([line(rows[0]), line(["-" * w for w in widths])] + [line(r) for r in rows[1:]])



def write_results(out: str, meta: dict[str, Any], runs: list[Run], comparisons: list[dict[str, Any]]) -> None:
    records = [r.record() for r in runs]
    doc = {**meta, "runs": records, "comparisons": comparisons}
    digits.write_json(f"{out}/results.json", doc)
    buf = io.StringIO()
    keys = ["name", "label", "optimizer", "model", "train_loss", "test_acc", "norm", "zero_share", "steps",
            "passes", "time_s"]
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for rec in records:
        writer.writerow(rec)
    digits.atomic_write_text(f"{out}/results.csv", buf.getvalue())
    tmp = f"{out}/weights.pt.tmp-{os.getpid()}"
    try:
        torch.save({r.config.name: r.final for r in runs}, tmp)
        os.replace(tmp, f"{out}/weights.pt")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def plot(path: str, runs: list[Run], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 2, figsize=(13, 10), constrained_layout=True)
    axes = list(grid.flat)
    panels = [("train_loss", "train loss (cross-entropy, log scale)"), ("test_acc", "test accuracy"),
              ("norm", "‖θ‖ (all parameters)"), ("zero_share", "share of weights exactly 0")]
    for ax, (key, ylabel) in zip(axes, panels):
        for run in runs:
            c = run.config
            curves = run.history.curves()
            ax.plot(curves["passes"], curves[key], label=f"{c.name}: {c.label}", color=c.color,
                    linestyle=c.linestyle, linewidth=c.linewidth, alpha=0.9)
        ax.set_xlabel("passes over the training set")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    axes[0].set_yscale("log")
    finals = [r.history.snapshots[-1].test_acc for r in runs]
    axes[1].set_ylim(max(0.0, min(finals) - 0.1), 1.0)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=9, frameon=False)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the command -----------------------------------------------------------------------

#: what the demo writes into ``--out`` (checked before the work starts)
OUTPUTS = ("demo.png", "results.json", "results.csv", "weights.pt", *lowprec.OUTPUTS)
#: the name of the low-precision section in ``--only``
LOWPREC = "lowprec"


def _run_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    known = [c.name for c in configurations()] + [LOWPREC]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown run {', '.join(map(repr, unknown)) or repr(text)} "
                                         f"(choose from {', '.join(known)})")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="DIR", default="descend-demo",
                        help="output directory (default: ./descend-demo/)")
    parser.add_argument("--seed", type=options.seed, default=0, metavar="N",
                        help="initial weights and minibatch order (default: 0; any integer torch.manual_seed "
                        "takes)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_EPOCHS} epochs instead of {EPOCHS} (well under 30 s)")
    parser.add_argument("--epochs", type=options.positive_int, metavar="N",
                        help=f"epochs of each minibatch run (default: {EPOCHS}; the full-batch runs always get "
                        f"{FULL_BATCH_PASSES} gradient evaluations)")
    parser.add_argument("--only", type=_run_names, metavar="RUN[,RUN...]",
                        help=f"run only these (names as in the table: {', '.join(c.name for c in configurations())}; "
                        f"{LOWPREC}: the low-precision section)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    out = options.check_output_dir(args.out, OUTPUTS)
    digits.require("sklearn", "matplotlib", "tqdm", "scipy")
    epochs = args.epochs or (QUICK_EPOCHS if args.quick else EPOCHS)
    configs = [c for c in configurations() if args.only is None or c.name in args.only]
    if not configs:  # --only lowprec
        return _lowprec(out, args)
    progress = _Progress(enabled=not args.no_progress)
    argv = getattr(args, "argv", None)
    meta: dict[str, Any] = {
        "command": "descend " + shlex.join(argv) if argv is not None else None,
        "seed": args.seed, "epochs": epochs, "batch_size": BATCH_SIZE, "hidden": HIDDEN, "dtype": "float64",
        "data": "sklearn.datasets.load_digits, stratified 75/25 split (random_state=0), 60 non-constant pixels",
        "descend_version": descend.__version__, "torch_version": torch.__version__,
        "lbfgs": _lbfgs()[1],
    }
    start = time.perf_counter()
    runs: list[Run] = []
    interrupted = False
    with digits.torch_threads(1):
        data = digits.load_digits(torch.float64)
        if any(c.full_batch for c in configs):
            meta["logistic_optimum"] = logistic_optimum(data)
        try:
            for i, config in enumerate(configs, 1):
                if config.full_batch:
                    result = _train_full_batch(config, data, FULL_BATCH_PASSES, args.seed, progress)
                    result.extra["objective_gap"] = result.extra["objective"] - meta["logistic_optimum"]
                else:
                    result = _train_mlp(config, data, epochs, args.seed, progress)
                runs.append(result)
                if args.no_progress or not sys.stderr.isatty():
                    print(f"[{i}/{len(configs)}] {config.name}: {result.history.seconds:.1f} s", file=sys.stderr)
                meta["total_time_s"] = time.perf_counter() - start
                write_results(out, meta, runs, compare({r.config.name: r for r in runs}))
        except KeyboardInterrupt:
            interrupted = True
    if runs:
        plot(f"{out}/demo.png", runs, f"descend demo: MLP on digits, {epochs} epochs, seed {args.seed} "
             "(full batch: logistic regression, one pass = one gradient evaluation)")
    comparisons = compare({r.config.name: r for r in runs})
    print(format_table([r.record() for r in runs]))
    print()
    for comp in comparisons:
        verdict = "equal" if comp["max_abs_diff"] <= 1e-9 * max(1.0, float(runs[0].final.abs().max())) else "differ"
        print(f"{comp['a']} vs {comp['b']}: max |Δθ| = {comp['max_abs_diff']:.3g} ({verdict}; {comp['why']})")
    fulls = [r for r in runs if r.config.full_batch]
    if fulls:
        gaps = ", ".join(f"{r.config.name} {r.extra['objective_gap']:.2g}" for r in fulls)
        print(f"full batch: objective − scipy L-BFGS-B optimum {meta['logistic_optimum']:.6f}: {gaps}")
    print(f"\nwrote {out}/demo.png, results.json, results.csv, weights.pt "
          f"({time.perf_counter() - start:.0f} s)")
    if interrupted:
        print(f"descend demo: interrupted; kept the {len(runs)} finished runs in {out}", file=sys.stderr)
        return 130
    if args.only is None or LOWPREC in args.only:
        return _lowprec(out, args)
    return 0


def _lowprec(out: str, args: argparse.Namespace) -> int:
    """The low-precision section (:func:`descend.cli.lowprec.section`)."""
    try:
        lowprec.section(out, args.seed, args.quick, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except KeyboardInterrupt:
        print("descend demo: interrupted in the low-precision section", file=sys.stderr)
        return 130
    return 0

