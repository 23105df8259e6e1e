"""The low-precision rows of ``descend bench``: what ``state_dtype`` and ``rounding`` save in
memory, and what they cost in step time, against torch's fused AdamW.

Memory: bytes of optimizer state per parameter element, counting every tensor in
``optimizer.state`` (moments, 8-bit codes and their per-block scales, the compensation buffer
of ``rounding="compensated"``, step counts) and the state of the generators of
``rounding="stochastic"``, amortized over the parameters. Adam and AdamW keep 8 bytes per
parameter in float32; the targets are at most 4.1 with ``state_dtype=torch.bfloat16`` and at
most 2.1 with ``state_dtype="8bit"`` (scales included).

Speed: AdamW steps on about 4M parameters (``quick``: 0.26M) in the shapes of an MLP block
(two matrices and their biases), timed as ``descend bench`` times everything
(:func:`descend.cli.bench.measure`): every candidate in one process, stepped once per round
in a new random order, warm-up rounds first (where the conversion kernels are compiled), and
each row's time reported as the median over rounds of its time over its reference's in the
same round. The references are torch's fused AdamW on float32 parameters (for the state
dtypes) and on bfloat16 parameters (for the roundings, whose state torch keeps in bfloat16
too). Targets: 8-bit state at most 2×, bfloat16 state at most 1.3×, bfloat16 parameters
with compensated rounding at most 1.5× (stochastic rounding and descend's own float32 and
nearest rows are there for comparison).

``descend bench --sets precision`` runs these rows (they are among its default sets); alone::

    python -m descend.cli.bench_precision [--quick] [--threads N] [--json PATH]

:func:`precision_rows` leaves the number of threads as it finds it (``descend bench`` sets it).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

import descend
from descend.cli import bench, options
from descend.cli.digits import atomic_write_text

__all__ = ["PrecisionRow", "precision_rows", "precision_table", "state_bytes", "shapes", "main",
           "BYTES_TARGETS", "TIME_TARGETS"]

Shapes = list[tuple[int, ...]]
SETTINGS: dict[str, Any] = dict(lr=1e-4, weight_decay=1e-2)
REF_FP32 = "torch fused AdamW, float32"
REF_BF16 = "torch fused AdamW, bf16 params"
#: bytes of state per parameter, at most (None: no target)
BYTES_TARGETS: dict[str, float] = {"bf16 state": 4.1, "8bit state": 2.1}
#: step time over the reference's, at most
TIME_TARGETS: dict[str, float] = {"8bit state": 2.0, "bf16 state": 1.3, "bf16 params compensated": 1.5}


def shapes(quick: bool = False) -> Shapes:
    """An MLP block with its biases: 1024 → 2048 → 1024 (4,197,376 parameters); ``quick``:
    256 → 512 → 256 (262,912). Each matrix is large enough
    for the compiled conversion kernels (:data:`descend.precision.COMPILE_NUMEL`), each bias not."""
    d, h = (256, 512) if quick else (1024, 2048)
    return [(h, d), (h,), (d, h), (d,)]


@dataclass
class PrecisionRow:
    """One low-precision configuration: its memory and its step time against its reference."""

    label: str
    optimizer: str  # the call, as a user would write it
    param_dtype: str
    reference: str | None  # the row its time is compared with (None: a reference itself)
    bytes_per_param: float  # every tensor in optimizer.state, and generator states, over the parameters
    element_bytes_per_param: float  # the tensors with at least one dimension only (no step counts, generators)
    bytes_target: float | None
    ms: float  # median step time
    ratio: float | None  # median over rounds of this time over the reference's in the same round
    ratio_target: float | None
    spread: float  # interquartile range of the step times over their median
    rounds: int
    numel: int
    device: str = "cpu"

    @property
    def bytes_met(self) -> bool | None:
        return None if self.bytes_target is None else self.bytes_per_param <= self.bytes_target

    @property
    def ratio_met(self) -> bool | None:
        if self.ratio_target is None or self.ratio is None:
            return None
        return self.ratio <= self.ratio_target

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "bytes_met": self.bytes_met, "ratio_met": self.ratio_met}


def state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes an optimizer keeps besides the parameters: ``elements`` (the state tensors with at
    least one dimension: moments, 8-bit codes and scales, compensation), ``scalars`` (0-dim
    tensors: step counts), ``generators`` (the states of the random streams of stochastic
    rounding) and ``params`` (the parameter elements they serve)."""
    elements = scalars = 0
    for state in optimizer.state.values():
        if not isinstance(state, dict):
            continue
        for value in state.values():
            if isinstance(value, Tensor):
                size = value.numel() * value.element_size()
                if value.dim() > 0:
                    elements += size
                else:
                    scalars += size
    generators = 0
    prec = getattr(optimizer, "_precision", None)
    streams = getattr(prec, "generators", None)
    if streams is not None:
        for g in streams.by_device.values():
            state = g.get_state()
            generators += state.numel() * state.element_size()
    params = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    return {"elements": elements, "scalars": scalars, "generators": generators, "params": params}


def _on(dtype: torch.dtype, make: Callable[[list[Tensor]], torch.optim.Optimizer]
        ) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    """``make`` on the benchmark's parameters and gradients converted to ``dtype`` (in place:
    :func:`bench.measure` builds them in float32)."""
    if dtype == torch.float32:
        return make

    def build(params: list[Tensor]) -> torch.optim.Optimizer:
        with torch.no_grad():
            for p in params:
                g, p.grad = p.grad, None
                p.data = p.data.to(dtype)
                p.grad = None if g is None else g.to(dtype)
        return make(params)

    return build


def _descend(**kw: Any) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    def make(params: list[Tensor]) -> torch.optim.Optimizer:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (nearest on bfloat16: the decay rounds away, as it does in torch)
            return descend.AdamW(params, **SETTINGS, **kw)
    return make


def _fused(params: list[Tensor]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, fused=True, **SETTINGS)


def configurations() -> list[tuple[str, str, torch.dtype, str | None, Callable[[list[Tensor]], torch.optim.Optimizer]]]:
    """(label, call, parameter dtype, reference, make) of each row."""
    kw = ", ".join(f"{k}={v:g}" for k, v in SETTINGS.items())
    bf16 = torch.bfloat16
    return [
        (REF_FP32, f"torch.optim.AdamW(params, {kw}, fused=True)", torch.float32, None, _fused),
        ("descend AdamW, float32", f"descend.AdamW(params, {kw})", torch.float32, REF_FP32, _descend()),
        ("bf16 state", f"descend.AdamW(params, {kw}, state_dtype=torch.bfloat16)", torch.float32, REF_FP32,
         _descend(state_dtype=torch.bfloat16)),
        ("8bit state", f'descend.AdamW(params, {kw}, state_dtype="8bit")', torch.float32, REF_FP32,
         _descend(state_dtype="8bit")),
        (REF_BF16, f"torch.optim.AdamW(bf16 params, {kw}, fused=True)", bf16, None, _fused),
        ("bf16 params nearest", f"descend.AdamW(bf16 params, {kw})", bf16, REF_BF16, _descend()),
        ("bf16 params compensated", f'descend.AdamW(bf16 params, {kw}, rounding="compensated")', bf16, REF_BF16,
         _descend(rounding="compensated")),
        ("bf16 params stochastic", f'descend.AdamW(bf16 params, {kw}, rounding="stochastic")', bf16, REF_BF16,
         _descend(rounding="stochastic")),
    ]


def precision_rows(quick: bool = False, *, param_shapes: Shapes | None = None, steps: int | None = None,
                   warmup: int = 2, min_seconds: float | None = None, seed: int = 0, device: str = "cpu",
                   log: Callable[[str], None] | None = None) -> list[PrecisionRow]:
    """Measure every row (module docstring): ``steps`` timed rounds at least (default 10, 4
    with ``quick``) and at least ``min_seconds`` of them (default 5, 1 with ``quick``; at most
    200 rounds), after ``warmup`` rounds. ``param_shapes`` replaces :func:`shapes` (tests)."""
    log = log or (lambda msg: None)
    sizes = param_shapes if param_shapes is not None else shapes(quick)
    steps = steps if steps is not None else (4 if quick else 10)
    min_seconds = min_seconds if min_seconds is not None else (1.0 if quick else 5.0)
    configs = configurations()
    candidates = [bench.Candidate(label, _on(dtype, make), 7, baseline=ref)
                  for label, _, dtype, ref, make in configs]
    numel = sum(math.prod(s) for s in sizes)
    log(f"low precision: AdamW on {len(sizes)} tensors, {numel / 1e6:.2f}M parameters, on {device}")
    # every candidate has its own parameters (measure shares them only above bench.SHARE_ABOVE,
    # and these are converted in place): keep it so
    assert numel <= bench.SHARE_ABOVE
    bench.measure(candidates, sizes, steps=steps, warmup=warmup, triad=None, seed=seed, memory=False, log=log,
                  min_seconds=min_seconds, device=device)
    by_label = {c.label: c for c in candidates}
    rows = []
    for (label, call, dtype, ref, _), c in zip(configs, candidates):
        counted = state_bytes(c.optimizer)
        total = counted["elements"] + counted["scalars"] + counted["generators"]
        q1, _, q3 = statistics.quantiles(c.times, n=4) if len(c.times) > 1 else (c.median, 0, c.median)
        rows.append(PrecisionRow(
            label, call, str(dtype).removeprefix("torch."), ref, total / counted["params"],
            counted["elements"] / counted["params"], BYTES_TARGETS.get(label), c.median * 1e3,
            bench.paired_ratio(c, by_label[ref]) if ref else None, TIME_TARGETS.get(label),
            (q3 - q1) / c.median, len(c.times), numel, device))
    bench.release(candidates)
    return rows


def _verdict(value: float | None, target: float | None, met: bool | None, unit: str) -> str:
    if target is None or value is None:
        return ""
    return f"≤ {target:g}{unit}: " + ("met" if met else "missed")


def precision_table(rows: list[PrecisionRow]) -> str:
    """The rows as a Markdown table."""
    lines = ["| configuration | params | state bytes/param | target | step ms (median) | spread "
             "| time vs reference | target | reference |",
             "|---|---|--:|---|--:|--:|--:|---|---|"]
    for r in rows:
        ratio = "1.00×" if r.ratio is None else f"{r.ratio:.2f}×"
        lines.append(f"| {r.label} | {r.param_dtype} | {r.bytes_per_param:.2f} | "
                     f"{_verdict(r.bytes_per_param, r.bytes_target, r.bytes_met, '')} | {r.ms:.2f} | "
                     f"{r.spread:.0%} | {ratio} | {_verdict(r.ratio, r.ratio_target, r.ratio_met, '×')} | "
                     f"{r.reference or '(reference)'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m descend.cli.bench_precision",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="0.26M parameters instead of 4.2M, fewer rounds")
    parser.add_argument("--steps", type=options.positive_int, default=None,
                        help="timed rounds at least (default 10, 4 with --quick)")
    parser.add_argument("--warmup", type=options.positive_int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--min-seconds", type=options.nonnegative_float, default=None,
                        help="more rounds (up to 200) until the timed ones took this long (default 5, 1 with --quick)")
    parser.add_argument("--threads", type=options.int_in(1, bench.MAX_THREADS), default=2,
                        help="intra-op threads (default 2, as descend bench)")
    parser.add_argument("--device", choices=bench.DEVICES, default="cpu")
    parser.add_argument("--json", metavar="PATH", help="also write the rows and the machine to PATH")
    parser.add_argument("--seed", type=options.seed, default=0)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_precision: error: --device cuda: no CUDA device is available", file=sys.stderr)
        return 1
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        rows = precision_rows(args.quick, steps=args.steps, warmup=args.warmup, min_seconds=args.min_seconds,
                              seed=args.seed, device=args.device,
                              log=lambda msg: print(msg, file=sys.stderr, flush=True))
    finally:
        torch.set_num_threads(threads)
    info = bench.machine(args.device)
    info["threads"], info["minutes"] = args.threads, round((time.perf_counter() - started) / 60, 1)
    print(f"Machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}, {args.threads} threads; "
          f"device {args.device}; load average {info['load_average']}; {info['date']}; {info['minutes']} min.\n")
    print(f"AdamW on {rows[0].numel:,} parameters ({len(shapes(args.quick))} tensors); time vs reference: median over "
          f"{min(r.rounds for r in rows)}+ rounds of the ratio of the two times in the same round.\n")
    print(precision_table(rows))
    if args.json:
        doc = {"machine": info, "args": vars(args), "rows": [r.record() for r in rows]}
        try:
            atomic_write_text(args.json, json.dumps(doc, indent=1, default=str))
        except OSError as e:
            print(f"bench_precision: error: cannot write {args.json!r}: {e.strerror or e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
