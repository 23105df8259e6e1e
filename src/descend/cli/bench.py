"""``descend bench``: descend's optimizer step against torch.optim's, in one process.

An optimizer step reads and writes every parameter, gradient and state buffer, so it is
bound by memory bandwidth, or, on many small tensors, by per-tensor overhead. This
benchmark times descend's SGD (momentum, weight decay), Adam and AdamW against
torch.optim's for-loop, foreach and fused implementations on parameter sets shaped like
real models, and reports each step's share of the machine's measured bandwidth.

Method (what makes the ratios trustworthy on a noisy, shared machine):

- every candidate of a comparison lives in the same process and is stepped once per
  *round*, in a new random order each round; the STREAM-style triad (a = b + s·c over
  arrays far larger than the caches) is one more member of every round, so bandwidth is
  measured under the same conditions as the steps;
- the reported time is the median over rounds (after warm-up rounds that create state);
- bytes per step are the least traffic the update needs (Adam: read θ, g, m, v and write
  θ, m, v, 28 bytes per float32 parameter; SGD with momentum: 20), so GB/s is an effective
  bandwidth, comparable between implementations;
- "extra MB" is the peak of memory allocated during one step beyond what existed before
  it (temporaries), from torch's profiler at operator granularity;
- candidates that are not flat share one set of parameters and gradients on the two
  large sets (GPT-2 small, one 50M tensor: far larger than any cache) to bound memory;
  on the smaller sets each has its own copies, so none profits from another's cache.

Sets: ResNet-50 (161 tensors, 25.6M), GPT-2 small (148 tensors, 124.4M), a LoRA-style
many-small set (2,000 × 1,000) and one 50M tensor; ``--quick`` shrinks the two large ones
(on the CPU only: on a GPU their full size is cheap). Besides the torch comparison, per set it
times what descend's own modes cost: independent decay and decoupled L1 against decoupled
decay, ``nonfinite="skip"`` against no guard, and flat storage when each step brings new
gradient tensors (after ``zero_grad()``).

The "overhead" set is 150 tiny tensors (a small model's norms, biases and small matrices,
9,300 parameters), stepped on one thread, where the time of a step is what an implementation
spends per tensor and per step rather than what it moves: descend's AdamW (default, with
``l1``, with ``nonfinite="skip"``, flat) and torch's foreach AdamW against torch's fused AdamW,
each reported as the median over rounds of its time over torch fused's in the same round
(target: at most 1.25×). No triad there: the rounds are short and a pass over arrays far
larger than the caches would only add noise.

``--device cuda`` runs every set on the GPU: parameters, gradients and the triad's arrays
live there, and each step (and triad) is timed on the host clock between two
``torch.cuda.synchronize()`` calls, so a time includes the host's launch overhead, which
decides small steps.

The "precision" set is AdamW on about 4M parameters (``--quick``: 0.26M) with
``state_dtype`` float32, bfloat16 and 8-bit and on bfloat16 parameters with each ``rounding``:
bytes of optimizer state per parameter and step time against torch's fused AdamW in float32
(state dtypes) and bfloat16 (roundings); see :mod:`descend.cli.bench_precision`.

``--sets muon`` (not among the default sets: on a CPU its GPT-2 matrices take minutes) times
descend.Muon against torch.optim.Muon, interleaved the same way, on GPT-2 small's hidden
matrices and on 256 matrices of 64 × 64 (targets: at least 1× and 5×); see
:mod:`descend.cli.bench_muon`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import descend
from descend.cli import options
from descend.cli.digits import atomic_write_text

__all__ = ["add_arguments", "run", "main", "SETS", "param_shapes"]

Shapes = list[tuple[int, ...]]
OPTIMIZERS = ("sgd", "adam", "adamw")
SETS = ("resnet50", "gpt2", "many-small", "one-50m", "overhead", "precision")
#: sets run only when ``--sets`` names them: "muon" (descend.cli.bench_muon's rows)
OPT_IN_SETS = ("muon",)
DEVICES = ("cpu", "cuda")
#: the hyperparameters every candidate of an optimizer uses (torch's names).
SETTINGS: dict[str, dict[str, Any]] = {
    "sgd": dict(lr=1e-4, momentum=0.9, weight_decay=1e-4),
    "adam": dict(lr=1e-4),
    "adamw": dict(lr=1e-4, weight_decay=1e-2),
}
TORCH_CLASSES = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}
SHARE_ABOVE = 32_000_000  # elements: above this, non-flat candidates share parameters and gradients
OVERHEAD_TARGET = 1.25  # descend's steps on the overhead set: at most this × torch's fused AdamW
OVERHEAD_L1 = 1e-4
OVERHEAD_ROUNDS = 2000  # at most; a round of the overhead set takes about a millisecond


# --- parameter sets --------------------------------------------------------------------


def resnet50_shapes() -> Shapes:
    """torchvision's resnet50: 161 tensors, 25,557,032 parameters."""
    shapes: Shapes = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,), (planes, planes, 3, 3), (planes,), (planes,),
                       (planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if b == 0:
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]  # downsample
            inplanes = planes * 4
    return shapes + [(1000, 2048), (1000,)]


def gpt2_shapes(layers: int = 12, vocab: int = 50257, width: int = 768, context: int = 1024) -> Shapes:
    """Hugging Face's GPT-2 small (lm_head tied to wte): 148 tensors, 124,439,808 parameters."""
    d = width
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [(vocab, d), (context, d)] + block * layers + [(d,), (d,)]


def overhead_shapes() -> Shapes:
    """150 tiny tensors, 9,300 parameters: 25 blocks of a small model's norm weight and bias,
    a 16 × 16 matrix and its bias, and a 4 × 16 head and its bias."""
    return [(16,), (16,), (16, 16), (16,), (4, 16), (4,)] * 25


def param_shapes(name: str, quick: bool = False) -> tuple[str, Shapes]:
    """(label, shapes) of a parameter set."""
    if name == "resnet50":
        return "ResNet-50", resnet50_shapes()
    if name == "gpt2":
        if quick:
            return "GPT-2 small, 2 of 12 layers, vocab 8192", gpt2_shapes(layers=2, vocab=8192)
        return "GPT-2 small", gpt2_shapes()
    if name == "many-small":
        return "2,000 × 1,000 (LoRA-like)", [(1000,)] * 2000
    if name == "one-50m":
        return ("one 10M tensor" if quick else "one 50M tensor"), [(10_000_000 if quick else 50_000_000,)]
    if name == "overhead":
        return "150 tiny tensors", overhead_shapes()
    raise ValueError(f"Invalid set: {name!r} (allowed: {', '.join(SETS)})")


def _numel(shapes: Shapes) -> int:
    return sum(math.prod(s) for s in shapes)


# --- candidates ------------------------------------------------------------------------


@dataclass
class Candidate:
    """One optimizer configuration in a comparison."""

    label: str
    make: Callable[[list[Tensor]], torch.optim.Optimizer]
    arrays: int  # float arrays of parameter size the step must read or write (its least traffic)
    flat: bool = False
    fresh_grads: bool = False  # give new gradient tensors before each step (as after zero_grad())
    baseline: str | None = None  # the label this row is compared with, in "modes" comparisons
    torch_impl: str | None = None  # "loop" / "foreach" / "fused" for torch.optim's rows
    times: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    optimizer: Any = None
    params: list[Tensor] = field(default_factory=list)
    fresh: list[Tensor] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def _arrays(name: str, *, l1: bool = False, skip: bool = False, fresh: bool = False) -> int:
    base = 5 if name == "sgd" else 7  # SGD: θ, g, buf read, θ, buf written; Adam: θ, g, m, v read, θ, m, v written
    return base + 2 * l1 + skip + 2 * fresh


def _torch_default_impl(device: str = "cpu") -> str:
    """What torch.optim does without flags for parameters on ``device``."""
    from torch.optim.optimizer import _default_to_fused_or_foreach

    fused, foreach = _default_to_fused_or_foreach([torch.zeros(1, device=device)], differentiable=False,
                                                  use_fused=False)
    return "fused" if fused else "foreach" if foreach else "loop"


def main_candidates(name: str, device: str = "cpu") -> list[Candidate]:
    """torch.optim's three implementations against descend's default and flat steps."""
    kw = SETTINGS[name]
    torch_cls = getattr(torch.optim, TORCH_CLASSES[name])
    ours = getattr(descend, TORCH_CLASSES[name])
    n = _arrays(name)
    default = _torch_default_impl(device)
    flags = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    def make(flag: dict[str, bool]) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
        return lambda p: torch_cls(p, **flag, **kw)

    out = []
    for impl, f in flags.items():
        label = f"torch {impl}" + (" (torch's default)" if impl == default else "")
        out.append(Candidate(label, make(f), n, torch_impl=impl))
    out.append(Candidate("descend (default)", lambda p: ours(p, **kw), n))
    out.append(Candidate("descend flat=True", lambda p: ours(p, flat=True, **kw), n, flat=True))
    return out


def mode_candidates(name: str, flat: bool) -> list[Candidate]:
    """What descend's own modes cost, each against decoupled decay (the mode torch has)."""
    kw = dict(SETTINGS[name])
    kw.setdefault("weight_decay", 1e-2)
    ours = getattr(descend, TORCH_CLASSES[name])
    tag = "flat " if flat else ""
    base = f"descend {tag}decoupled"
    rows = [
        Candidate(base, lambda p: ours(p, decay="decoupled", flat=flat, **kw), _arrays(name), flat=flat),
        Candidate(f"descend {tag}independent", lambda p: ours(p, decay="independent", flat=flat, **kw),
                  _arrays(name), flat=flat, baseline=base),
        Candidate(f"descend {tag}decoupled + L1", lambda p: ours(p, decay="decoupled", l1=1e-6, flat=flat, **kw),
                  _arrays(name, l1=True), flat=flat, baseline=base),
    ]
    if flat:
        rows.append(Candidate("descend flat, new grad tensors", lambda p: ours(p, decay="decoupled", flat=True, **kw),
                              _arrays(name, fresh=True), flat=True, fresh_grads=True, baseline=base))
    else:
        rows.append(Candidate('descend nonfinite="skip"', lambda p: ours(p, decay="decoupled", nonfinite="skip", **kw),
                              _arrays(name, skip=True), baseline=base))
    return rows


def overhead_candidates() -> list[Candidate]:
    """The overhead set's rows: torch's fused AdamW (the reference), its foreach AdamW, and
    descend's AdamW by default, with L1, with the non-finite guard and flat."""
    kw = SETTINGS["adamw"]
    ref = "torch fused"
    return [
        Candidate(ref, lambda p: torch.optim.AdamW(p, fused=True, **kw), _arrays("adamw")),
        Candidate("torch foreach", lambda p: torch.optim.AdamW(p, foreach=True, **kw), _arrays("adamw"),
                  baseline=ref),
        Candidate("descend (default)", lambda p: descend.AdamW(p, **kw), _arrays("adamw"), baseline=ref),
        Candidate(f"descend l1={OVERHEAD_L1:g}", lambda p: descend.AdamW(p, l1=OVERHEAD_L1, **kw),
                  _arrays("adamw", l1=True), baseline=ref),
        Candidate('descend nonfinite="skip"', lambda p: descend.AdamW(p, nonfinite="skip", **kw),
                  _arrays("adamw", skip=True), baseline=ref),
        Candidate("descend flat=True", lambda p: descend.AdamW(p, flat=True, **kw), _arrays("adamw"), flat=True,
                  baseline=ref),
    ]


#: the overhead rows held to :data:`OVERHEAD_TARGET` (the others are there for comparison)
OVERHEAD_TARGETED = ("descend (default)", f"descend l1={OVERHEAD_L1:g}", 'descend nonfinite="skip"')


# --- measuring -------------------------------------------------------------------------


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work (on a GPU a step returns before its kernels end)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _master(shapes: Shapes, seed: int, device: str = "cpu") -> tuple[list[Tensor], list[Tensor]]:
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same numbers on every device
    data = [torch.randn(s, generator=g).mul_(0.02).to(device) for s in shapes]
    grads = [torch.randn(s, generator=g).mul_(1e-3).to(device) for s in shapes]
    return data, grads


def _params(data: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
    params: list[Tensor] = [torch.nn.Parameter(d.clone()) for d in data]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    return params


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """torch's profiler logs to file descriptor 2 on start and stop."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def step_peak_bytes(step: Callable[[], Any], device: str = "cpu") -> int:
    """Peak memory allocated during ``step()`` beyond what existed before it (CPU: from the
    profiler's per-operator allocation records, allocations at an operator's start, frees
    at its end; CUDA: the caching allocator's peak statistic)."""
    from torch.profiler import ProfilerActivity, profile

    if torch.device(device).type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return max(torch.cuda.max_memory_allocated(device) - before, 0)

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    deltas = []
    for event in prof.events():
        m = event.self_cpu_memory_usage
        if m:
            deltas.append((event.time_range.start if m > 0 else event.time_range.end, m))
    current = peak = 0
    for _, m in sorted(deltas):
        current += m
        peak = max(peak, current)
    return peak


class Triad:
    """STREAM's triad a = b + s·c in float32 over arrays of ``megabytes`` each: 12 bytes
    moved per element (STREAM's convention: the write-allocate read of a is not counted)."""

    def __init__(self, megabytes: int, device: str = "cpu") -> None:
        n = megabytes * 2**20 // 4
        self.device = device
        self.a, self.b, self.c = (torch.empty(n, device=device), torch.rand(n, device=device),
                                  torch.rand(n, device=device))
        self.bytes = 3 * 4 * n
        self.times: list[float] = []

    def run(self) -> None:
        synchronize(self.device)
        t = time.perf_counter()
        torch.add(self.b, self.c, alpha=0.5, out=self.a)
        synchronize(self.device)
        self.times.append(time.perf_counter() - t)

    @property
    def gbps(self) -> float:
        return self.bytes / statistics.median(self.times) / 1e9


def measure(candidates: list[Candidate], shapes: Shapes, *, steps: int, warmup: int, triad: Triad | None,
            seed: int, memory: bool, log: Callable[[str], None], min_seconds: float = 0.0,
            max_rounds: int = 200, device: str = "cpu") -> None:
    """Build every candidate on ``device``, then step them round by round in random order: at
    least ``steps`` timed rounds, more while they have taken less than ``min_seconds`` (cheap
    comparisons get more samples), at most ``max_rounds``. ``triad``: a member of every round
    (None: none). On a GPU each step is timed between two synchronizations."""
    data, grads = _master(shapes, seed, device)
    shared = _params(data, grads) if _numel(shapes) > SHARE_ABOVE else None
    for c in candidates:
        c.params = _params(data, grads) if c.flat or shared is None else shared
        c.optimizer = c.make(c.params)
        if c.fresh_grads:
            c.fresh = [g.clone() for g in grads]
    del data, grads
    rng = random.Random(seed)
    order: list[Candidate | None] = [*candidates, None] if triad is not None else [*candidates]  # None: the triad
    sync = torch.device(device).type == "cuda"
    r, timed_since = 0, 0.0
    while r < warmup + steps or (time.perf_counter() - timed_since < min_seconds and r < warmup + max_rounds):
        if r == warmup:
            if triad is not None:
                triad.times.clear()  # the triad's warm-up samples go too
            timed_since = time.perf_counter()
        rng.shuffle(order)
        for member in order:
            if member is None:
                if triad is not None:
                    triad.run()
                continue
            if member.fresh_grads:
                for p, g in zip(member.params, member.fresh):
                    p.grad = g
            if sync:
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            member.optimizer.step()
            if sync:
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - t
            if r >= warmup:
                member.times.append(elapsed)
        r += 1
    if memory:
        for c in candidates:
            if c.fresh_grads:
                for p, g in zip(c.params, c.fresh):
                    p.grad = g
            c.peak_bytes = step_peak_bytes(c.optimizer.step, device)
    unit, scale = ("µs", 1e6) if max(c.median for c in candidates) < 1e-3 else ("ms", 1e3)
    log(f"    {r - warmup} rounds: " + ", ".join(f"{c.label} {c.median * scale:.1f} {unit}" for c in candidates))


def release(candidates: list[Candidate]) -> None:
    for c in candidates:
        c.optimizer, c.params, c.fresh = None, [], []


# --- the report ------------------------------------------------------------------------


@dataclass
class Row:
    set: str
    optimizer: str
    label: str
    ms: float
    vs_fastest: float | None  # torch's fastest time / this time, per round (> 1: faster); median
    vs_default: float | None  # torch's default time / this time, per round; median
    vs_baseline: float | None  # this time / baseline time, per round (modes: the cost, 1.0 = free); median
    baseline: str | None
    gbps: float
    share: float | None  # of the triad's bandwidth measured in the same rounds (None: no triad)
    peak_mb: float | None
    spread: float  # interquartile range of the step times over their median
    rounds: int
    samples: list[float]
    kind: str = "main"  # "main" (torch.optim vs descend), "modes" or "overhead"
    device: str = "cpu"


def paired_ratio(numerator: Candidate, denominator: Candidate) -> float:
    """The median over rounds of one candidate's time over another's in the same round:
    steadier than a ratio of medians when the machine's load drifts during a comparison."""
    return statistics.median(a / b for a, b in zip(numerator.times, denominator.times))


def rows_for(set_label: str, name: str, candidates: list[Candidate], numel: int, triad_gbps: float | None,
             kind: str | None = None, device: str = "cpu") -> list[Row]:
    """The rows of one comparison; ``kind`` defaults to "main" where torch's rows are there,
    else "modes"."""
    torch_rows = {c.torch_impl: c for c in candidates if c.torch_impl}
    fastest = min(torch_rows.values(), key=lambda c: c.median) if torch_rows else None
    default = torch_rows.get(_torch_default_impl(device))
    kind = kind or ("main" if torch_rows else "modes")
    by_label = {c.label: c for c in candidates}
    out = []
    for c in candidates:
        gbps = c.arrays * 4 * numel / c.median / 1e9
        base = by_label.get(c.baseline) if c.baseline else None
        q1, _, q3 = statistics.quantiles(c.times, n=4) if len(c.times) > 1 else (c.median, 0, c.median)
        out.append(Row(set_label, TORCH_CLASSES[name], c.label, c.median * 1e3,
                       paired_ratio(fastest, c) if fastest else None, paired_ratio(default, c) if default else None,
                       paired_ratio(c, base) if base else None, c.baseline, gbps,
                       gbps / triad_gbps if triad_gbps else None,
                       c.peak_bytes / 2**20 if c.peak_bytes is not None else None, (q3 - q1) / c.median,
                       len(c.times), [t * 1e3 for t in c.times], kind, device))
    return out


def machine(device: str = "cpu") -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    memory = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo") as f:
            memory = int(f.readline().split()[1]) * 1024
    return {
        "cpu": model, "cores": os.cpu_count(), "memory_gib": round(memory / 2**30, 1) if memory else None,
        "torch": torch.__version__, "python": platform.python_version(), "descend": descend.__version__,
        "threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "gpu": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else None,
        "cuda": torch.version.cuda,
    }


def _f(x: float | None, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def table(rows: list[Row]) -> str:
    """The main comparison as a Markdown table."""
    lines = ["| set | optimizer | implementation | step ms (median) | spread | speed-up vs torch's fastest "
             "| speed-up vs torch's default | GB/s | % of triad | extra MB in step |",
             "|---|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        if r.kind != "main" or r.baseline is not None or r.vs_fastest is None:
            continue
        lines.append(f"| {r.set} | {r.optimizer} | {r.label} | {r.ms:.1f} | {r.spread:.0%} | {r.vs_fastest:.2f}× | "
                     f"{_f(r.vs_default, '.2f')}× | {r.gbps:.1f} | {_f(r.share, '.0%')} | {_f(r.peak_mb, '.1f')} |")
    return "\n".join(lines)


def modes_table(rows: list[Row]) -> str:
    """What descend's modes cost, as a Markdown table."""
    lines = ["| set | optimizer | configuration | step ms (median) | spread | time vs decoupled "
             "| GB/s | % of triad | extra MB in step |",
             "|---|---|---|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        if r.kind != "modes" or r.vs_fastest is not None:
            continue
        lines.append(f"| {r.set} | {r.optimizer} | {r.label} | {r.ms:.1f} | {r.spread:.0%} | "
                     f"{_f(r.vs_baseline, '.2f')} | {r.gbps:.1f} | {_f(r.share, '.0%')} | {_f(r.peak_mb, '.1f')} |")
    return "\n".join(lines)


def overhead_verdict(row: Row) -> str:
    """Whether an overhead row meets :data:`OVERHEAD_TARGET` ("" for rows not held to it)."""
    if row.label not in OVERHEAD_TARGETED or row.vs_baseline is None:
        return ""
    return f"≤ {OVERHEAD_TARGET:g}×: " + ("met" if row.vs_baseline <= OVERHEAD_TARGET else "missed")


def overhead_table(rows: list[Row]) -> str:
    """The overhead set as a Markdown table: each row's time over torch's fused AdamW."""
    lines = ["| set | optimizer | implementation | step µs (median) | spread | time vs torch fused | target |",
             "|---|---|---|--:|--:|--:|---|"]
    for r in rows:
        if r.kind != "overhead":
            continue
        ratio = 1.0 if r.baseline is None else r.vs_baseline
        lines.append(f"| {r.set} | {r.optimizer} | {r.label} | {r.ms * 1e3:.1f} | {r.spread:.0%} | "
                     f"{_f(ratio, '.2f')}× | {overhead_verdict(r)} |")
    return "\n".join(lines)


# --- command line ----------------------------------------------------------------------


MAX_THREADS = 1024
MAX_TRIAD_MB = 2**20  # 1 TiB per array; what the machine has is checked when the command runs


def _names_arg(allowed: tuple[str, ...], what: str) -> Callable[[str], str]:
    """argparse type: a comma-separated list of ``allowed`` names (kept as the text)."""

    def parse(text: str) -> str:
        try:
            _names(text, allowed, what)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text

    parse.__name__ = what
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``descend bench`` (also ``python benchmarks/step_speed.py``)."""
    parser.add_argument("--quick", action="store_true",
                        help="smaller GPT-2 and single-tensor sets and fewer rounds (about a minute)")
    parser.add_argument("--sets", default=",".join(SETS), type=_names_arg(SETS + OPT_IN_SETS, "--sets"),
                        help=f"comma-separated parameter sets (default: all of {', '.join(SETS)}; "
                             "muon: descend.Muon against torch.optim.Muon, only when named)")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), type=_names_arg(OPTIMIZERS, "--optimizers"),
                        help=f"comma-separated optimizers (default: {', '.join(OPTIMIZERS)})")
    parser.add_argument("--steps", type=options.positive_int, default=None,
                        help="timed rounds per comparison (default 10, 4 with --quick)")
    parser.add_argument("--warmup", type=options.positive_int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--min-seconds", type=options.nonnegative_float, default=None,
                        help="go on with more rounds (up to 200) until the timed ones took this long "
                             "(default 5, 1 with --quick): cheap comparisons get more samples")
    parser.add_argument("--threads", type=options.int_in(1, MAX_THREADS), default=2,
                        help="intra-op threads (default 2; the overhead set always runs on one)")
    parser.add_argument("--no-modes", action="store_true",
                        help="skip the cost of descend's modes (independent decay, L1, nonfinite, new grads)")
    parser.add_argument("--no-memory", action="store_true", help="skip the profiled step that measures memory")
    parser.add_argument("--triad-mb", type=options.int_in(1, MAX_TRIAD_MB), default=256,
                        help="size of each triad array in MiB (default 256)")
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="where parameters, gradients and the triad live (default cpu; cuda: the current GPU)")
    parser.add_argument("--json", metavar="PATH", help="also write every sample and the machine to PATH")
    parser.add_argument("--seed", type=options.seed, default=0)


def _names(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"Invalid {what}: {value!r} (allowed: comma-separated {', '.join(allowed)})")
    return names


def _physical_memory() -> int | None:
    with contextlib.suppress(AttributeError, OSError, ValueError):
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    return None


def check_resources(args: argparse.Namespace) -> None:
    """What the command will need, checked before any work: the triad's three arrays fit in
    this machine's (or the GPU's) memory, the ``--device`` is there, and the ``--json`` file can
    be written. :class:`CommandError` otherwise."""
    device = getattr(args, "device", "cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a build without CUDA"
            raise options.CommandError(f"--device cuda: no CUDA device is available (torch {torch.__version__}, "
                                       f"{built})")
        memory: int | None = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        where = "the GPU's"
    else:
        memory, where = _physical_memory(), "this machine's"
    if memory is not None and 3 * args.triad_mb * 2**20 > memory:
        raise options.CommandError(f"--triad-mb {args.triad_mb}: the triad's three arrays of {args.triad_mb} MiB "
                                   f"do not fit in {where} {memory / 2**30:.1f} GiB of memory")
    if args.json:
        options.check_output_file(args.json)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args``; print the tables; 0 on success."""
    try:
        sets = _names(args.sets, SETS + OPT_IN_SETS, "--sets")
        optimizers = _names(args.optimizers, OPTIMIZERS, "--optimizers")
    except ValueError as e:
        print(f"descend bench: {e}", file=sys.stderr)
        return 2
    steps = args.steps if args.steps is not None else (4 if args.quick else 10)
    min_seconds = args.min_seconds if args.min_seconds is not None else (1.0 if args.quick else 5.0)
    if steps < 1 or args.warmup < 1 or args.threads < 1:
        print("descend bench: --steps, --warmup and --threads must be positive", file=sys.stderr)
        return 2
    check_resources(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, sets, optimizers, steps, min_seconds)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, sets: list[str], optimizers: list[str], steps: int, min_seconds: float) -> int:
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    device = getattr(args, "device", "cpu")
    info = machine(device)
    triad: Triad | None = None  # made when a set needs it (the overhead set does not)
    triad_all: list[float] = []
    rows: list[Row] = []
    muon_rows: list[Any] = []  # descend.cli.bench_muon.MuonRow
    precision_rows: list[Any] = []  # descend.cli.bench_precision.PrecisionRow
    started = time.perf_counter()
    for set_name in sets:
        if set_name == "muon":
            from descend.cli import bench_muon

            muon_rows += bench_muon.bench_muon(quick=args.quick and device == "cpu", steps=args.steps,
                                               warmup=args.warmup, min_seconds=args.min_seconds, seed=args.seed,
                                               device=device, log=log)
            continue
        if set_name == "precision":
            from descend.cli import bench_precision

            precision_rows += bench_precision.precision_rows(args.quick and device == "cpu", steps=args.steps,
                                                             warmup=args.warmup, min_seconds=args.min_seconds,
                                                             seed=args.seed, device=device, log=log)
            continue
        label, shapes = param_shapes(set_name, args.quick and device == "cpu")
        numel = _numel(shapes)
        log(f"{label}: {len(shapes)} tensors, {numel / 1e6:.1f}M parameters, on {device}")
        if set_name == "overhead":
            rows += _overhead(args, label, shapes, steps, min_seconds, device, log)
            continue
        if triad is None:
            triad = Triad(args.triad_mb, device)
        for name in optimizers:
            comparisons = [("torch.optim vs descend", main_candidates(name, device))]
            if not args.no_modes and name in ("sgd", "adamw"):
                comparisons += [("modes", mode_candidates(name, flat=False)),
                                ("flat modes", mode_candidates(name, flat=True))]
            for what, candidates in comparisons:
                log(f"  {TORCH_CLASSES[name]}, {what}")
                triad.times.clear()
                measure(candidates, shapes, steps=steps, warmup=args.warmup, triad=triad, seed=args.seed,
                        memory=not args.no_memory, log=log, min_seconds=min_seconds, device=device)
                triad_all += triad.times
                rows += rows_for(label, name, candidates, numel, triad.gbps, device=device)
                release(candidates)
    info["load_average_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    info["triad_gbps_median"] = (round(3 * 4 * (args.triad_mb * 2**20 // 4) / statistics.median(triad_all) / 1e9, 2)
                                 if triad_all else None)
    info["minutes"] = round((time.perf_counter() - started) / 60, 1)
    command = "descend bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:])
    print(f"Command: `{command.strip()}`\n")
    gpu = f"; GPU {info['gpu']} (CUDA {info['cuda']})" if info["gpu"] else ""
    print(f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB{gpu}; torch {info['torch']}, "
          f"{args.threads} threads; device {device}; load average {info['load_average']} at start, "
          f"{info['load_average_end']} at end; {info['date']}; {info['minutes']} min.\n")
    if triad_all:
        print(f"Triad bandwidth (median over all rounds): {info['triad_gbps_median']} GB/s; "
              f"per comparison {args.warmup} warm-up rounds, then at least {steps} timed rounds and at least "
              f"{min_seconds:g} s of them (at most 200). Speed-ups and costs are medians over rounds of the "
              "ratio of two candidates' times in the same round; spread is the interquartile range over the "
              "median.\n")
        print(table(rows))
        if any(r.kind == "modes" for r in rows):
            print()
            print(modes_table(rows))
    if any(r.kind == "overhead" for r in rows):
        if triad_all:
            print()
        print(f"Per-step overhead on {len(overhead_shapes())} tiny tensors, one thread: each row's time over torch's "
              f"fused AdamW in the same round, median over rounds (at most {OVERHEAD_ROUNDS}); descend's default, "
              f"L1 and non-finite guard are held to {OVERHEAD_TARGET:g}×.\n")
        print(overhead_table(rows))
    if precision_rows:
        from descend.cli.bench_precision import precision_table

        if rows:
            print()
        print(f"Low precision: AdamW on {precision_rows[0].numel:,} parameters; bytes of optimizer state per "
              "parameter, and each row's step time over its reference's in the same round, median over rounds.\n")
        print(precision_table(precision_rows))
    if muon_rows:
        from descend.cli.bench_muon import muon_report

        if rows or precision_rows:
            print()
        print(muon_report(muon_rows))
    if args.json:
        doc = {"machine": info, "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
               "rows": [r.__dict__ for r in rows], "muon_rows": [r.__dict__ for r in muon_rows],
               "precision_rows": [r.record() for r in precision_rows]}
        try:
            atomic_write_text(args.json, json.dumps(doc, indent=1, default=str))
        except OSError as e:
            raise options.CommandError(f"cannot write {args.json!r}: {e.strerror or e}") from None
    return 0


def _overhead(args: argparse.Namespace, label: str, shapes: Shapes, steps: int, min_seconds: float, device: str,
              log: Callable[[str], None]) -> list[Row]:
    """The overhead set's comparison, on one thread (what a step costs per tensor, not in parallel)."""
    candidates = overhead_candidates()
    log("  AdamW, per-step overhead against torch fused")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        measure(candidates, shapes, steps=steps, warmup=args.warmup, triad=None, seed=args.seed, memory=False,
                log=log, min_seconds=min_seconds, max_rounds=OVERHEAD_ROUNDS, device=device)
    finally:
        torch.set_num_threads(threads)
    rows = rows_for(label, "adamw", candidates, _numel(shapes), None, kind="overhead", device=device)
    release(candidates)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="descend bench", description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a usage error (2) or --help (0), as a return value
        return e.code if isinstance(e.code, int) else 2
    try:
        return run(args)
    except options.CommandError as e:
        print(f"descend bench: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
