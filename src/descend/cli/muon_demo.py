"""descend muon-demo: a small character-level transformer trained with AdamW and with Muon+AdamW.

The text is Python's own: the source of a fixed list of standard-library modules, read from
``sysconfig.get_paths()["stdlib"]`` (nothing is downloaded); the first 90% of each file is
training text, the last 10% validation text, so the split is fixed. The model is a GPT-style
decoder (:data:`LAYERS` blocks of width :data:`WIDTH`, :data:`HEADS` heads, context
:data:`CONTEXT`; pre-norm, learned position embeddings, an untied head).

Two runs, from the same initial weights, on the same minibatches in the same order, with the
same learning-rate schedule (linear warm-up, cosine decay to a tenth), stepped in lockstep (one
step of each in turn, the order alternating) so that both see the same load on a shared machine:

- ``adamw``: ``descend.AdamW(descend.param_groups(model, weight_decay=λ), lr, betas=(0.9, 0.95))``:
  weight matrices decayed; embeddings, norms and biases not;
- ``muon``: ``descend.Muon`` with the blocks' hidden matrices (attention and MLP weights) in a
  Muon group and the rest (embeddings, head, norms, biases) in ``algorithm="adamw"`` groups, with
  ``adjust_lr_fn="match_rms_adamw"`` (Moonlight's recipe: the update scaled to AdamW's RMS); the
  AdamW groups get the run's lr, betas (0.9, 0.95) and the same decay as in the other run.

Each run has its own peak lr (``--lr``, ``--muon-lr``), its best of a small sweep at 300 steps
(see :data:`LR`): Moonlight's claim that AdamW's lr carries over did not hold here.

It prints the routing (which rule steps which parameter, then ``descend.explain``), the train and
validation loss (cross-entropy in nats per character, on fixed windows) at checkpoints against
steps and against training wall time (evaluation excluded), and a summary. With ``--out DIR``
it writes ``muon_demo.png`` (validation and train loss against steps and against wall time) and
``results.json`` there (matplotlib: the ``descend[demo]`` extra).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import math
import os
import shlex
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import descend
from descend.cli import digits, options
from descend.cli.options import CommandError

HELP = "train a small character-level transformer with AdamW and with Muon+AdamW; compare the losses"

# --- settings ----------------------------------------------------------------------------

#: standard-library modules whose source is the text (those missing from an installation are skipped)
SOURCES = ("argparse", "textwrap", "functools", "dataclasses", "enum", "inspect", "typing", "collections",
           "contextlib", "random", "string", "heapq", "fractions", "statistics", "shutil", "tempfile",
           "calendar", "difflib", "ast", "tokenize", "pprint", "json", "csv", "logging", "configparser")
MIN_CHARS = 50_000  # less text than this: the installation ships no sources (an error)
VALIDATION_SHARE = 0.1  # the last tenth of each file
LAYERS, WIDTH, HEADS, CONTEXT = 2, 128, 4, 64
BATCH_SIZE = 32
STEPS, QUICK_STEPS = 600, 80
CHECKPOINTS = 10  # evaluations besides the one before training
EVAL_WINDOWS = 256  # fixed windows of CONTEXT characters, from the training and from the validation text
#: each run's best of 1e-3, 3e-3, 1e-2, 3e-2 after 300 steps (validation loss: AdamW 2.07, 2.12, 2.43, 2.54;
#: Muon + AdamW 2.17, 1.79, 1.48, 1.50): AdamW's lr does not carry over to Muon at this scale
LR = 1e-3  # the AdamW run
MUON_LR = 1e-2  # the Muon run (its AdamW groups too)
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)
WARMUP_SHARE = 0.05
FINAL_LR_SHARE = 0.1
RUNS = ("adamw", "muon")
COLORS = {"adamw": "C1", "muon": "C0"}
LABELS = {"adamw": "AdamW", "muon": "Muon + AdamW"}
OUTPUTS = ("muon_demo.png", "results.json")


# --- data --------------------------------------------------------------------------------


@dataclass
class Text:
    """The character data: training and validation ids (int64), the vocabulary and where it came from."""

    train: Tensor
    val: Tensor
    vocab: list[str]
    files: list[str]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def _source_file(stdlib: str, module: str) -> str | None:
    for path in (os.path.join(stdlib, f"{module}.py"), os.path.join(stdlib, module, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


def load_text(modules: tuple[str, ...] = SOURCES) -> Text:
    """The standard library's source as character ids, split 90/10 within each file."""
    stdlib = sysconfig.get_paths()["stdlib"]
    train_parts, val_parts, files = [], [], []
    for module in modules:
        path = _source_file(stdlib, module)
        if path is None:
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        cut = int(len(text) * (1 - VALIDATION_SHARE))
        train_parts.append(text[:cut])
        val_parts.append(text[cut:])
        files.append(os.path.relpath(path, stdlib))
    train, val = "\n\n".join(train_parts), "\n\n".join(val_parts)
    if len(train) + len(val) < MIN_CHARS:
        raise CommandError(f"found only {len(train) + len(val):,} characters of standard-library source under "
                           f"{stdlib} (this installation ships too few .py files)")
    vocab = sorted(set(train) | set(val))
    index = {c: i for i, c in enumerate(vocab)}

    def encode(s: str) -> Tensor:
        return torch.tensor([index[c] for c in s], dtype=torch.int64)

    return Text(encode(train), encode(val), vocab, files)


def windows(ids: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
    """Inputs and next-character targets of the CONTEXT-long windows at ``starts``."""
    offsets = torch.arange(CONTEXT + 1)
    chunk = ids[starts[:, None] + offsets]
    return chunk[:, :-1], chunk[:, 1:]


def eval_starts(ids: Tensor, count: int = EVAL_WINDOWS) -> Tensor:
    """``count`` evenly spaced window starts over ``ids`` (the same every run)."""
    last = len(ids) - CONTEXT - 1
    return torch.linspace(0, last, min(count, last + 1)).long()


# --- the model ---------------------------------------------------------------------------


class Block(nn.Module):
    """A pre-norm transformer block: causal self-attention and a 4× MLP, each a residual branch."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln_2(x))))


class CharTransformer(nn.Module):
    """A GPT-style character model: token and position embeddings, blocks, a final norm, a head."""

    def __init__(self, vocab_size: int, layers: int = LAYERS, width: int = WIDTH, heads: int = HEADS,
                 context: int = CONTEXT) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)
        for name, p in self.named_parameters():  # GPT-2's initialization
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, x: Tensor) -> Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))


def loss_of(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


# --- the two optimizers --------------------------------------------------------------------


def is_hidden_matrix(name: str, param: Tensor) -> bool:
    """The rule of the Muon run: the weight matrices of the blocks' Linear layers."""
    return name.startswith("blocks.") and name.endswith(".weight") and param.dim() == 2


def _has_muon_routing() -> bool:
    return "muon" in inspect.signature(descend.param_groups).parameters


def muon_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The Muon run's groups: hidden matrices → ``algorithm="muon"``, the rest → ``"adamw"``,
    each with the decay the AdamW run gives it.

    ``descend.param_groups(model, weight_decay, muon=True)`` makes such groups where this
    descend has it; otherwise they are made here, by :func:`is_hidden_matrix` over the groups of
    ``descend.param_groups(model, weight_decay)`` (which decide the decay)."""
    if _has_muon_routing():
        groups: list[dict[str, Any]] = descend.param_groups(model, weight_decay, muon=True)  # type: ignore[call-arg]
        return groups
    # Until descend.param_groups routes to Muon itself: split its groups by the explicit rule.
    out: list[dict[str, Any]] = []
    for group in descend.param_groups(model, weight_decay):
        hidden = [(n, p) for n, p in group["params"] if is_hidden_matrix(n, p)]
        rest = [(n, p) for n, p in group["params"] if not is_hidden_matrix(n, p)]
        options_ = {k: v for k, v in group.items() if k != "params"}
        if hidden:
            out.append({**options_, "params": hidden, "algorithm": "muon"})
        if rest:
            out.append({**options_, "params": rest, "algorithm": "adamw"})
    return sorted(out, key=lambda g: g["algorithm"] != "muon")  # the Muon group first


def make_optimizer(name: str, model: nn.Module, lr: float = LR, weight_decay: float = WEIGHT_DECAY) -> Any:
    if name == "adamw":
        return descend.AdamW(descend.param_groups(model, weight_decay), lr=lr, betas=BETAS)
    return descend.Muon(muon_groups(model, weight_decay), lr=lr, weight_decay=weight_decay,
                        adjust_lr_fn="match_rms_adamw", adamw=dict(betas=BETAS))


def optimizer_call(name: str, lr: float, weight_decay: float) -> str:
    if name == "adamw":
        return f"descend.AdamW(descend.param_groups(model, {weight_decay:g}), lr={lr:g}, betas={BETAS})"
    groups = (f"descend.param_groups(model, {weight_decay:g}, muon=True)" if _has_muon_routing()
              else "[hidden matrices: algorithm='muon'; the rest: algorithm='adamw']")
    return (f"descend.Muon({groups}, lr={lr:g}, weight_decay={weight_decay:g}, adjust_lr_fn='match_rms_adamw', "
            f"adamw=dict(betas={BETAS}))")


def schedule(steps: int) -> Callable[[int], float]:
    """The lr factor after ``step`` steps: linear warm-up, then cosine decay to FINAL_LR_SHARE."""
    warmup = max(1, round(WARMUP_SHARE * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return FINAL_LR_SHARE + (1 - FINAL_LR_SHARE) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return factor


def routing(optimizer: Any) -> list[tuple[str, tuple[int, ...], str, int]]:
    """(name, shape, algorithm, group) per parameter of ``optimizer``, group by group."""
    out = []
    for i, group in enumerate(optimizer.param_groups):
        names = group.get("param_names") or [f"#{j}" for j in range(len(group["params"]))]
        for n, p in zip(names, group["params"]):
            out.append((n, tuple(p.shape), group.get("algorithm", "adamw"), i))
    return out


# --- training ------------------------------------------------------------------------------


@dataclass
class Curve:
    """One run's checkpoints: steps done, training seconds so far (evaluation excluded), losses."""

    name: str
    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    step_seconds: float = 0.0  # optimizer.step() alone, summed
    minibatch_loss: list[float] = field(default_factory=list)  # every step's training minibatch loss

    def record(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Comparison:
    text: Text
    parameters: int
    curves: dict[str, Curve]
    routing: list[tuple[str, tuple[int, ...], str, int]]
    explanation: str
    settings: dict[str, Any]


@torch.no_grad()
def evaluate(model: nn.Module, ids: Tensor, starts: Tensor, batch: int = 64) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(starts), batch):
        x, y = windows(ids, starts[i:i + batch])
        total += float(loss_of(model, x, y)) * len(x)
    model.train()
    return total / len(starts)


def compare(steps: int, *, seed: int = 0, lr: float = LR, muon_lr: float | None = None,
            weight_decay: float = WEIGHT_DECAY,
            checkpoints: int | None = None, layers: int = LAYERS, width: int = WIDTH, heads: int = HEADS,
            eval_windows: int | None = None, text: Text | None = None,
            log: Callable[[str], None] = lambda msg: None) -> Comparison:
    """Train the two runs in lockstep for ``steps`` steps; evaluate before training and at
    ``checkpoints`` evenly spaced steps (the last one included). ``muon_lr``: the Muon run's lr
    (default: :data:`MUON_LR`). ``checkpoints`` and ``eval_windows`` default to
    :data:`CHECKPOINTS` and :data:`EVAL_WINDOWS`."""
    checkpoints = CHECKPOINTS if checkpoints is None else checkpoints
    eval_windows = EVAL_WINDOWS if eval_windows is None else eval_windows
    lrs = {"adamw": lr, "muon": MUON_LR if muon_lr is None else muon_lr}
    text = text or load_text()
    torch.manual_seed(seed)
    base = CharTransformer(text.vocab_size, layers, width, heads)
    models = {name: copy.deepcopy(base) for name in RUNS}  # the same initial weights
    optimizers = {name: make_optimizer(name, models[name], lrs[name], weight_decay) for name in RUNS}
    schedulers = {name: torch.optim.lr_scheduler.LambdaLR(optimizers[name], schedule(steps)) for name in RUNS}
    g = torch.Generator().manual_seed(seed)
    batches = torch.randint(0, len(text.train) - CONTEXT - 1, (steps, BATCH_SIZE), generator=g)  # one data order
    train_eval, val_eval = eval_starts(text.train, eval_windows), eval_starts(text.val, eval_windows)
    at = sorted({round(steps * k / checkpoints) for k in range(1, checkpoints + 1)} - {0})
    curves = {name: Curve(name) for name in RUNS}
    clock = dict.fromkeys(RUNS, 0.0)

    def checkpoint(step: int) -> None:
        for name in RUNS:
            c = curves[name]
            c.steps.append(step)
            c.seconds.append(clock[name])
            c.train_loss.append(evaluate(models[name], text.train, train_eval))
            c.val_loss.append(evaluate(models[name], text.val, val_eval))
        log(f"  step {step:5d}: " + "; ".join(f"{LABELS[n]} train {curves[n].train_loss[-1]:.3f} "
                                              f"val {curves[n].val_loss[-1]:.3f} ({clock[n]:.1f} s)" for n in RUNS))

    checkpoint(0)
    for step in range(steps):
        x, y = windows(text.train, batches[step])
        for name in (RUNS if step % 2 == 0 else RUNS[::-1]):  # the order alternates: neither always goes first
            model, opt = models[name], optimizers[name]
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_of(model, x, y)
            loss.backward()
            stepped = time.perf_counter()
            opt.step()
            done = time.perf_counter()
            schedulers[name].step()
            clock[name] += done - start
            curves[name].step_seconds += done - stepped
            curves[name].minibatch_loss.append(float(loss.detach()))
        if step + 1 in at:
            checkpoint(step + 1)
    explanation = descend.explain(optimizers["muon"], model=models["muon"]).format(width=200)
    settings = {"steps": steps, "seed": seed, "lr": lrs, "weight_decay": weight_decay, "betas": list(BETAS),
                "layers": layers, "width": width, "heads": heads, "context": CONTEXT, "batch_size": BATCH_SIZE,
                "warmup_share": WARMUP_SHARE, "final_lr_share": FINAL_LR_SHARE, "eval_windows": eval_windows,
                "optimizers": {n: optimizer_call(n, lrs[n], weight_decay) for n in RUNS},
                "routing": "descend.param_groups(muon=True)" if _has_muon_routing() else "muon_demo.is_hidden_matrix",
                "threads": torch.get_num_threads()}
    return Comparison(text, sum(p.numel() for p in base.parameters()), curves, routing(optimizers["muon"]),
                      explanation, settings)


# --- output --------------------------------------------------------------------------------


def checkpoint_table(curves: dict[str, Curve]) -> str:
    a, m = curves["adamw"], curves["muon"]
    rows = [["step", "AdamW train", "AdamW val", "AdamW s", "Muon train", "Muon val", "Muon s", "val Muon − AdamW"]]
    for i, step in enumerate(a.steps):
        rows.append([str(step), f"{a.train_loss[i]:.4f}", f"{a.val_loss[i]:.4f}", f"{a.seconds[i]:.1f}",
                     f"{m.train_loss[i]:.4f}", f"{m.val_loss[i]:.4f}", f"{m.seconds[i]:.1f}",
                     f"{m.val_loss[i] - a.val_loss[i]:+.4f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def first_reaching(curve: Curve, target: float) -> tuple[int, float] | None:
    """The first checkpoint (step, seconds) at which ``curve``'s validation loss is at most ``target``."""
    for step, seconds, v in zip(curve.steps, curve.seconds, curve.val_loss):
        if v <= target:
            return step, seconds
    return None


def summary(result: Comparison) -> str:
    a, m = result.curves["adamw"], result.curves["muon"]
    steps = a.steps[-1]
    lines = []
    for c in (a, m):
        lines.append(f"{LABELS[c.name]:>12}: final val loss {c.val_loss[-1]:.4f}, train loss {c.train_loss[-1]:.4f}; "
                     f"{c.seconds[-1]:.1f} s of training ({1e3 * c.seconds[-1] / max(1, steps):.0f} ms a step, "
                     f"of which optimizer.step() {1e3 * c.step_seconds / max(1, steps):.1f} ms)")
    reach = first_reaching(m, a.val_loss[-1])
    if reach is not None:
        lines.append(f"Muon + AdamW reached AdamW's final val loss ({a.val_loss[-1]:.4f}) by step {reach[0]} "
                     f"({reach[1]:.1f} s; AdamW: step {steps}, {a.seconds[-1]:.1f} s)")
    else:
        reach = first_reaching(a, m.val_loss[-1])
        where = f"by step {reach[0]} ({reach[1]:.1f} s)" if reach else "at the end"
        lines.append(f"AdamW reached Muon + AdamW's final val loss ({m.val_loss[-1]:.4f}) {where}")
    return "\n".join(lines)


def plot(path: str, result: Comparison, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    for ax, key, xlabel in ((axes[0], "steps", "steps"), (axes[1], "seconds", "training wall time, s")):
        for name, c in result.curves.items():
            x = getattr(c, key)
            ax.plot(x, c.val_loss, color=COLORS[name], marker="o", markersize=3, label=f"{LABELS[name]}, validation")
            ax.plot(x, c.train_loss, color=COLORS[name], linestyle="--", alpha=0.7, label=f"{LABELS[name]}, train")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("cross-entropy, nats per character")
        ax.grid(True, alpha=0.3)
        finals = [v for c in result.curves.values() for v in c.val_loss[1:]]
        if finals:
            low, high = min(finals), max(finals)
            ax.set_ylim(low - 0.05 * (high - low + 0.1), high + 0.3 * (high - low + 0.1))
    axes[0].legend(fontsize=9)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)



# --- the command ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="write muon_demo.png and results.json into DIR (default: print only)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps instead of {STEPS}")
    parser.add_argument("--steps", type=options.positive_int, metavar="N",
                        help=f"training steps of each run (default: {STEPS}; {QUICK_STEPS} with --quick)")
    parser.add_argument("--lr", type=options.nonnegative_float, default=LR,
                        help=f"peak learning rate of the AdamW run (default: {LR:g})")
    parser.add_argument("--muon-lr", type=options.nonnegative_float, default=MUON_LR,
                        help=f"peak learning rate of the Muon run, its AdamW groups included (default: {MUON_LR:g})")
    parser.add_argument("--weight-decay", type=options.nonnegative_float, default=WEIGHT_DECAY,
                        help=f"λ of the weight matrices in both runs (default: {WEIGHT_DECAY:g})")
    parser.add_argument("--seed", type=options.seed, default=0, metavar="N",
                        help="initial weights and minibatch order (default: 0)")
    parser.add_argument("--threads", type=options.int_in(1, 1024), default=None,
                        help="intra-op threads (default: torch's)")


def run(args: argparse.Namespace) -> int:
    out = options.check_output_dir(args.out, OUTPUTS) if args.out else None
    if out:
        digits.require("matplotlib")
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    started = time.perf_counter()
    muon_lr = f" (AdamW run), {args.muon_lr:g} (Muon run)"
    with digits.torch_threads(args.threads or torch.get_num_threads()):
        text = load_text()
        print(f"Text: {len(text.files)} standard-library files ({', '.join(text.files[:6])}, …): "
              f"{len(text.train):,} training and {len(text.val):,} validation characters (the last "
              f"{VALIDATION_SHARE:.0%} of each file), {text.vocab_size} distinct characters.", flush=True)
        print(f"Model: {LAYERS} blocks, width {WIDTH}, {HEADS} heads, context {CONTEXT}; batch {BATCH_SIZE}; "
              f"{steps} steps; lr {args.lr:g}{muon_lr} (warm-up {WARMUP_SHARE:.0%}, cosine to {FINAL_LR_SHARE:g}×), "
              f"weight decay {args.weight_decay:g}; seed {args.seed}; {torch.get_num_threads()} threads.", flush=True)
        result = compare(steps, seed=args.seed, lr=args.lr, muon_lr=args.muon_lr, weight_decay=args.weight_decay,
                         text=text,
                         log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(f"Parameters: {result.parameters:,}.\n")
    for name in RUNS:
        print(f"{LABELS[name]}: {result.settings['optimizers'][name]}")
    print("\nRouting of the Muon run (hidden matrices to Muon; embeddings, head, norms and biases to AdamW):")
    print(routing_summary(result.routing))
    print("\ndescend.explain(optimizer, model=model) of the Muon run, after training (lr: the schedule's last):\n")
    print(result.explanation)
    print(f"\nLoss (cross-entropy, nats per character, on {result.settings['eval_windows']} fixed windows of each split) at "
          "checkpoints; s: training wall time so far (evaluation excluded; the runs alternate step by step):\n")
    print(checkpoint_table(result.curves))
    print()
    print(summary(result))
    if out:
        argv = getattr(args, "argv", None)
        doc = {"command": "descend " + shlex.join(argv) if argv is not None else None,
               "descend_version": descend.__version__, "torch_version": torch.__version__,
               "files": result.text.files, "train_chars": len(result.text.train), "val_chars": len(result.text.val),
               "vocab_size": result.text.vocab_size, "parameters": result.parameters, **result.settings,
               "routing": [dict(name=n, shape=list(s), algorithm=a, group=g) for n, s, a, g in result.routing],
               "runs": {n: c.record() for n, c in result.curves.items()}}
        digits.write_json(os.path.join(out, "results.json"), doc)
        plot(os.path.join(out, "muon_demo.png"), result,
             f"descend muon-demo: {LAYERS}-block char transformer (width {WIDTH}) on stdlib source, "
             f"{steps} steps, lr {args.lr:g} / {args.muon_lr:g}, seed {args.seed}")
        print(f"\nwrote {out}/muon_demo.png, results.json ({time.perf_counter() - started:.0f} s)")
    return 0


def routing_summary(rows: list[tuple[str, tuple[int, ...], str, int]]) -> str:
    """One line per algorithm: how many parameters and elements, and their names."""
    lines = []
    for algorithm in ("muon", "adamw"):
        mine = [(n, s) for n, s, a, _ in rows if a == algorithm]
        elements = sum(math.prod(s) for _, s in mine)
        lines.append(f"  {algorithm}: {len(mine)} parameters, {elements:,} elements: {', '.join(n for n, _ in mine)}")
    return "\n".join(lines)
