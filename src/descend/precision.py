r"""Low precision without losing the decay: rounding of 16-bit parameters, and optimizer state
in 16 bits or 8 bits.

**Why.** A bfloat16 number has 8 significant bits, so θ·(1 − δ) rounds back to θ whenever δ
is below half a unit in the last place, 2⁻⁹ to 2⁻⁸ of θ: AdamW's decay lr·λ = 1e-5 does
nothing, and neither do updates smaller than half an ulp. Two roundings keep them:

- ``rounding="compensated"`` (Kahan summation, as in optimi): each 16-bit parameter θ has a
  16-bit buffer c of what rounding dropped. A step computes in float32 on w = θ + c, then
  writes back

  .. math:: \theta \leftarrow \mathrm{rn}(w), \qquad c \leftarrow \mathrm{rn}(w - \theta)

  so that θ + c carries about twice the 16-bit precision and a change smaller than half an
  ulp of θ accumulates in c until it moves θ.
- ``rounding="stochastic"`` (as torchao's bfloat16 stochastic rounding): w rounded down or up
  to its 16-bit neighbours θ₋ ≤ w ≤ θ₊ with probability of its distance,

  .. math:: P(\theta \leftarrow \theta_+) = \frac{w - \theta_-}{\theta_+ - \theta_-},

  so that E[θ] = w: a small change survives in expectation. For bfloat16 (the top half of a
  float32) this is exact: add 16 random bits to the low half of w's bit pattern and cut them
  off. For float16 the same with 13 bits where w is a normal float16; below (subnormals,
  spacing 2⁻²⁴) w + u·2⁻²⁴, u uniform in (−½, ½), rounded to nearest. The random bits come from
  the optimizer's own generator (one per device, seeded from ``torch.initial_seed()`` when the
  optimizer is built, its state in the optimizer's state dict): the same seed gives the same
  run, and a resumed run is bit-exact whatever the global generator does meanwhile.
- ``rounding="nearest"`` (default) is torch's behaviour, bit for bit. float32 and float64
  parameters ignore ``rounding``.

**State dtype.** ``state_dtype`` stores the rule's θ-shaped state (moments, momentum buffers)
in float32, bfloat16, float16 or 8 bits; ``None`` keeps θ's dtype (torch's behaviour). Each
step dequantizes the state into working tensors of the computing dtype (float32 for 16-bit
parameters, else θ's), runs the rule unchanged, and stores it back (rounded to nearest).
Step counts and other scalars are never touched.

``"8bit"`` is block-wise quantization: a tensor, flattened, is cut into blocks of
:data:`BLOCK` = 256 elements; each block keeps its largest magnitude a (float32, in the entry
``<name>_absmax``) and each element one byte, a small floating-point number standing for x/a:

.. math::
   \text{signed (momenta): } \pm 2^{e}\,(1 + f/8),\ e = -16..0; \qquad
   \text{unsigned (second moments): } 2^{e}\,(1 + f/8),\ e = -32..0

with 3 fraction bits f (8 levels per octave) and the exponent e in the remaining 4 (signed, whose
top bit is the sign) or 5 bits (unsigned), code 0 standing for 0. These are exactly the top bits
of the float32 number x/a: encoding rounds its bit pattern to 3 fraction bits (to nearest,
relative error at most 2⁻⁴/(1 + 2⁻⁴) ≈ 5.9% at the bottom of an octave, 3.1% at its top) and decoding shifts the code back,
so both are integer operations, with no table or logarithm (they cost no more than the
arithmetic of the step they sit in, and compiled and eager forms give the same bits). Levels are
spaced by a ratio, not a difference, so small values are as precise, relative to themselves, as
large ones. That matters for the second moment v, whose square root divides the update: a
linear code would put most of a block's small v at 0 and turn m/(√v + ε) into m/ε. For the same
reason a positive v is never stored as 0 (below the smallest level, 1.25·2⁻³² of its block's
maximum, it becomes that level: a slightly *smaller* update, never a huge one); a momentum below
1.25·2⁻¹⁶ of its block's maximum is stored as 0. Which entries are second moments comes from the
state declaration: those that may not be negative (``low=0``). Memory: 1 byte per element plus 4
bytes per 256, 2.03 bytes per parameter for Adam's two moments instead of 8 in float32.

(bitsandbytes and torchao use a "dynamic" code of the same idea, fraction bits after an
exponent written in unary, decoded through a table; torchao's FP8 state is the same float
format with one scale per tensor or block.)
"""

from __future__ import annotations

import math
import operator
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from descend import lanes as descend_lanes
from descend.state import LIKE_PARAM, SCALAR, Entry, StateSpec
from descend.validation import invalid

if TYPE_CHECKING:
    from descend.optimizer import GroupBatch, RegularizedOptimizer

__all__ = ["ROUNDINGS", "STATE_DTYPES", "BLOCK", "Precision", "quantize", "quantize_into_", "dequantize",
           "stochastic_round", "stored_spec", "absmax_key", "COMPENSATION"]

ROUNDINGS = ("nearest", "compensated", "stochastic")
STATE_DTYPES: tuple[Any, ...] = (None, torch.float32, torch.bfloat16, torch.float16, "8bit")
SIXTEEN_BIT = (torch.bfloat16, torch.float16)
#: elements per quantization block (one float32 scale each)
BLOCK = 256
#: the state entry of compensated rounding
COMPENSATION = "compensation"
#: fraction bits of the 8-bit code, and octaves below a block's maximum that its signed and
#: unsigned forms reach
FRACTION_BITS = 3
SIGNED_OCTAVES, UNSIGNED_OCTAVES = 16, 32
#: float32 bits dropped by the code: a code is (bit pattern of x/a) >> _SHIFT, minus an offset
_SHIFT = 23 - FRACTION_BITS
#: (bit pattern of 1.0) >> _SHIFT: the code's top level, a block's maximum
_ONE = 127 << FRACTION_BITS
#: what a code adds to its magnitude to give the shifted bit pattern (its top magnitude is _ONE)
_SIGNED_OFFSET, _UNSIGNED_OFFSET = _ONE - 127, _ONE - 255


def absmax_key(name: str) -> str:
    """The state entry holding the per-block scales of the 8-bit entry ``name``."""
    return f"{name}_absmax"


def QUANT_BLOCKS(shape: torch.Size) -> tuple[int, ...]:  # noqa: N802 - a shape, named as state.py's
    """One value per block of :data:`BLOCK` elements of θ (the 8-bit scales)."""
    return (-(-math.prod(shape) // BLOCK),)


# --- the 8-bit code --------------------------------------------------------------------
# Element-wise halves of the code, shared by the eager conversions below and the compiled
# one-pass steps of descend.precision_fused (so both give the same bits).


def code_values(codes: Tensor, signed: bool) -> Tensor:
    """The float32 values that 8-bit ``codes`` stand for, relative to their block's maximum."""
    c = codes.to(torch.int32)
    if signed:
        magnitude = c & 127
        bits = torch.where(magnitude == 0, 0, (magnitude + _SIGNED_OFFSET) << _SHIFT) | ((c & 128) << 24)
    else:
        bits = torch.where(c == 0, 0, (c + _UNSIGNED_OFFSET) << _SHIFT)
    return bits.view(torch.float32)


def codes_of(x: Tensor, inverse_absmax: Tensor, signed: bool) -> Tensor:
    """The 8-bit codes of float32 ``x`` in a block whose largest magnitude is 1/``inverse_absmax``:
    the bit pattern of |x|/absmax rounded to :data:`FRACTION_BITS` fraction bits (module docstring)."""
    scaled = x.abs() * inverse_absmax
    level = ((scaled.view(torch.int32) + (1 << (_SHIFT - 1))) >> _SHIFT)
    if signed:
        magnitude = (level - _SIGNED_OFFSET).clamp(0, 127)
        # (the sign bit from a bool shifted in int32: torch.where(..., 128, 0) would be int64)
        return (magnitude | (((x < 0) & (magnitude > 0)).to(torch.int32) << 7)).to(torch.uint8)
    # a positive second moment is never 0 (see the module docstring): at least level 1
    return torch.where(scaled > 0, (level - _UNSIGNED_OFFSET).clamp(1, 255), 0).to(torch.uint8)


def inverse(absmax: Tensor) -> Tensor:
    """1/absmax per block, 1 where a block is all zeros (its codes are 0 whatever the scale)."""
    return 1 / torch.where(absmax > 0, absmax, 1.0)


def _blocked(x: Tensor) -> Tensor:
    """x flattened and zero-padded to whole blocks, as a (blocks, BLOCK) matrix."""
    flat = x.reshape(-1)
    pad = -flat.numel() % BLOCK
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, BLOCK)


def _encode(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """(codes as a (blocks, BLOCK) uint8 matrix, absmax per block) of x."""
    blocks = _blocked(x.float())
    absmax = blocks.abs().amax(dim=1)
    return codes_of(blocks, inverse(absmax).unsqueeze(1), signed), absmax


def quantize(x: Tensor, *, signed: bool) -> tuple[Tensor, Tensor]:
    """(codes: uint8 of x's shape, absmax: float32 per block) such that
    :func:`dequantize` gives x to within the code's relative error. Non-finite values are not
    representable (the non-finite guard of the step keeps them out)."""
    codes, absmax = _kernel(_encode, x.numel())(x, signed)
    return codes.reshape(-1)[: x.numel()].view(x.shape), absmax


def quantize_into_(codes: Tensor, absmax: Tensor, x: Tensor, *, signed: bool) -> None:
    """:func:`quantize` written into existing ``codes`` and ``absmax`` (views into flat buffers stay views)."""
    new_codes, new_absmax = _kernel(_encode, x.numel())(x, signed)
    codes.copy_(new_codes.reshape(-1)[: x.numel()].view(codes.shape))
    absmax.copy_(new_absmax)


def _decode(codes: Tensor, absmax: Tensor, signed: bool, dtype: torch.dtype) -> Tensor:
    # whole blocks as a matrix, the ragged last block apart: the result is a tensor of its own
    # (a slice of a padded buffer, updated in place by a rule inside torch.compile, lost its tail)
    n = codes.numel()
    flat = codes.reshape(-1)
    whole = n - n % BLOCK
    out = torch.empty(n, dtype=dtype, device=codes.device)
    scales = absmax.float()
    out[:whole] = (code_values(flat[:whole], signed).view(-1, BLOCK) * scales[: whole // BLOCK].unsqueeze(1)).reshape(-1)
    if whole < n:
        out[whole:] = code_values(flat[whole:], signed) * scales[-1]
    return out.view(codes.shape)


def dequantize(codes: Tensor, absmax: Tensor, *, signed: bool, dtype: torch.dtype = torch.float32) -> Tensor:
    """The values that ``codes`` and their blocks' ``absmax`` stand for, in ``dtype``."""
    return _kernel(_decode, codes.numel())(codes, absmax, signed, dtype)  # type: ignore[no-any-return]


# --- compiled forms ---------------------------------------------------------------------------

#: tensors of at least this many elements are converted by kernels that torch.compile generates
#: (one pass each instead of one per operation: for 8 bits, 113 → 7 ms to quantize 4M values on
#: one CPU core); smaller ones stay eager, where the compile (seconds, once per process and
#: kernel) would not pay. ``DESCEND_COMPILE=0`` in the environment, or 0 here, turns it off.
COMPILE_NUMEL = 1 << 16 if os.environ.get("DESCEND_COMPILE", "1") != "0" else 0
#: the compiled form of each (function, exact_casts, lanes), None where compiling it failed
_COMPILED: dict[tuple[Callable[..., Any], bool, torch.dtype | None], Callable[..., Any] | None] = {}


def _compile_failed(fn: Callable[..., Any]) -> bool:
    """Whether compiling ``fn`` (in any of the forms of :func:`_kernel`) has failed in this process."""
    return any(compiled is None for (f, *_), compiled in _COMPILED.items() if f is fn)


def _kernel(fn: Callable[..., Any], numel: int, *, exact_casts: bool = True,
            lanes: torch.dtype | None = None) -> Callable[..., Any]:
    """``fn`` compiled by torch.compile for a tensor of ``numel`` elements where that pays and
    works; else ``fn`` itself. Where compiling fails (no C++ compiler on the CPU, no Triton on
    a GPU), the first call says why in a warning, and every later call runs ``fn`` eagerly:
    importing or using descend never needs a compiler. Compiled and eager forms compute the
    same operations; while torch.compile traces the user's whole step, ``fn`` is traced with it.

    ``exact_casts``: a 16-bit value that ``fn`` casts and reads again is rounded as eager torch
    rounds it. Inductor otherwise keeps 16-bit intermediates in float32 and drops a cast pair
    such as ``w.to(bfloat16).float()``: Kahan's w − rn(w) needs the rounding. Pass False only
    where ``fn`` casts to 16 bits just to store: the emulation is slow on a CPU (``descend bench
    --sets precision``, AdamW with bfloat16 state: 2.83–3.18× → 1.85–1.92× torch's fused step
    on a 2-core AMD EPYC).

    ``lanes``: the 16-bit float type whose vector lanes inductor's C++ loops should use where
    a statement only moves float32 data (:mod:`descend.lanes`); None: inductor decides."""
    if not COMPILE_NUMEL or numel < COMPILE_NUMEL:
        return fn
    from descend import dispatch

    if dispatch.compiling():
        return fn
    key = (fn, exact_casts, lanes)
    if key not in _COMPILED:
        options: dict[str, Any] = {"emulate_precision_casts": exact_casts}
        cache_key = descend_lanes.cache_key() if lanes is not None else None
        if cache_key is not None:
            options["post_grad_custom_post_pass"] = cache_key
        compiled = torch.compile(fn, dynamic=True, options=options)
        if lanes is not None and cache_key is not None:  # (no cache key: a torch without the hint)
            compiled = descend_lanes.hinted(compiled, lanes)

        def first_call(*args: Any) -> Any:
            try:
                result = compiled(*args)
            except Exception as e:  # the compiler, not the math: the eager form decides
                warnings.warn(f"descend.precision: torch.compile of {fn.__name__} failed ({type(e).__name__}: "
                              f"{str(e)[:200]}); low-precision state and rounding run eagerly (slower)",
                              RuntimeWarning, stacklevel=3)
                _COMPILED[key] = None
                return fn(*args)
            _COMPILED[key] = compiled
            return result

        return first_call
    return _COMPILED[key] or fn


# --- rounding ---------------------------------------------------------------------------


def stochastic_round(x: Tensor, dtype: torch.dtype, generator: torch.Generator) -> Tensor:
    """x (float32) rounded to ``dtype`` (bfloat16 or float16) down or up with the probability
    of its distance (module docstring); non-finite values as rounding to nearest does."""
    x = x.float().contiguous()
    bits = torch.randint(0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32)
    return _kernel(_round_with_bits, x.numel())(x, bits, dtype)  # type: ignore[no-any-return]


def _round_with_bits(x: Tensor, bits: Tensor, dtype: torch.dtype) -> Tensor:
    pattern = x.view(torch.int32)
    if dtype == torch.bfloat16:
        rounded = ((pattern + bits) & ~0xFFFF).view(torch.float32)
    else:
        normal = ((pattern + (bits >> 3)) & ~0x1FFF).view(torch.float32)
        spacing = 2.0 ** -24  # float16's subnormal spacing, constant below 2⁻¹⁴
        noise = ((bits.float() + 0.5) * (1.0 / 65536) - 0.5) * spacing
        rounded = torch.where(x.abs() >= 2.0 ** -14, normal, x + noise)
    return torch.where(torch.isfinite(x), rounded, x).to(dtype)


class Generators:
    """The random streams of stochastic rounding: one ``torch.Generator`` per device, each
    seeded with ``seed``; their states are saved in and loaded from the state dict."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.by_device: dict[str, torch.Generator] = {}

    def on(self, device: torch.device) -> torch.Generator:
        key = str(device)
        g = self.by_device.get(key)
        if g is None:
            g = self.by_device[key] = torch.Generator(device=device)
            g.manual_seed(self.seed)
        return g

    def state(self) -> dict[str, Any]:
        return {"seed": self.seed, "states": {k: g.get_state() for k, g in self.by_device.items()}}

    @staticmethod
    def check(saved: Any) -> None:
        """ValueError unless ``saved`` is what :meth:`state` returns (checked before a load changes anything)."""
        if not isinstance(saved, dict) or not isinstance(saved.get("states"), dict) \
                or not isinstance(saved.get("seed"), int):
            raise ValueError(f"the state dict's 'rounding_generators' is {saved!r:.80}, not a dict with the seed "
                             f"and the state of each device's generator")
        for device, state in saved["states"].items():
            if not isinstance(device, str) or not isinstance(state, Tensor) or state.dtype != torch.uint8:
                raise ValueError(f"the saved state of the rounding generator on {device!r} is not a uint8 tensor")

    def load(self, saved: dict[str, Any]) -> None:
        self.seed = saved["seed"]
        self.by_device = {}
        for device, state in saved["states"].items():
            self.on(torch.device(device)).set_state(state.cpu())


# --- the configuration, and the state declaration it implies ----------------------------


def _is_16bit(dtype: torch.dtype) -> bool:
    return dtype in SIXTEEN_BIT


def _converted(e: Entry) -> bool:
    """Whether ``state_dtype`` applies to an entry: a tensor of θ's dtype that is not a scalar."""
    return e.tensor and e.dtype is None and e.shape is not SCALAR


def _has_16bit(param: Tensor, group: dict[str, Any]) -> bool:
    return _is_16bit(param.dtype)


def stored_spec(spec: StateSpec, state_dtype: Any, rounding: str, kind: str) -> StateSpec:
    """The state declaration of a rule (``spec``) with its θ-dtype entries stored in
    ``state_dtype`` (8 bits: codes, and an ``_absmax`` entry beside each) and, for
    ``rounding="compensated"``, the compensation of every 16-bit parameter. ValueError where a
    rule's state cannot be quantized (entries shaped otherwise than θ, or not tensors)."""
    entries: list[Entry] = []
    for e in spec.entries:
        if state_dtype is None or not _converted(e):
            entries.append(e)
        elif state_dtype == "8bit":
            if e.shape is not LIKE_PARAM:
                raise invalid("state_dtype", state_dtype,
                              f"None or a float dtype for {kind}, whose state {e.name!r} is not shaped like its "
                              f"parameter (8 bits quantize θ-shaped state only)")
            entries.append(replace(e, dtype=torch.uint8))
            entries.append(Entry(absmax_key(e.name), QUANT_BLOCKS, torch.float32, init=e.init,
                                 required=e.required, when=e.when, low=0))
        else:
            entries.append(replace(e, dtype=state_dtype))
    if state_dtype == "8bit" and not any(e.dtype == torch.uint8 for e in entries):
        raise invalid("state_dtype", state_dtype, f"None for {kind}, which keeps no state that 8 bits can hold")
    if rounding == "compensated":
        entries.append(Entry(COMPENSATION, LIKE_PARAM, None, when=_has_16bit))
    return StateSpec(tuple(entries))


@dataclass
class Precision:
    """An optimizer's ``rounding`` and ``state_dtype``, and what follows from them."""

    rounding: str = "nearest"
    state_dtype: Any = None
    #: names of the entries stored in ``state_dtype``, and whether each is signed (8-bit code)
    converted: dict[str, bool] = field(default_factory=dict)
    generators: Generators | None = None

    @classmethod
    def of(cls, rounding: Any, state_dtype: Any) -> Precision:
        if not isinstance(rounding, str) or rounding not in ROUNDINGS:
            raise invalid("rounding", rounding, ", ".join(repr(r) for r in ROUNDINGS))
        if not any(state_dtype is d or (isinstance(state_dtype, str) and state_dtype == d) for d in STATE_DTYPES):
            raise invalid("state_dtype", state_dtype,
                          "None (the parameter's dtype), torch.float32, torch.bfloat16, torch.float16 or '8bit'")
        generators = Generators(torch.initial_seed()) if rounding == "stochastic" else None
        prec = cls(rounding, state_dtype, generators=generators)
        if prec.active and "torch._dynamo" in sys.modules:  # (else no step can be traced yet: made when needed)
            _outside_graph(Precision._begin)
            _outside_graph(Working._commit)
        return prec

    @property
    def active(self) -> bool:
        return self.rounding != "nearest" or self.state_dtype is not None

    def declare(self, spec: StateSpec, kind: str) -> StateSpec:
        """The stored form of the rule's declaration (:func:`stored_spec`); remembers its entries."""
        self.converted = {e.name: e.low is None for e in spec.entries if _converted(e)}
        if not self.active:
            return spec
        return stored_spec(spec, self.state_dtype, self.rounding, kind)

    def check_param(self, param: Tensor, label: str) -> None:
        """ValueError for a parameter this configuration cannot hold (complex with a state dtype)."""
        if self.state_dtype is not None and param.is_complex():
            raise invalid("state_dtype", self.state_dtype,
                          f"None for complex parameters ({label} has dtype {param.dtype})")

    def working_dtype(self, param: Tensor) -> torch.dtype:
        """The dtype a step computes in: float32 for a 16-bit θ that is rounded otherwise than
        to nearest or whose state is stored in another dtype; else θ's own."""
        dtype = param.dtype
        if _is_16bit(dtype) and (self.rounding != "nearest" or self.state_dtype not in (None, dtype)):
            return torch.float32
        return dtype

    def stored_form(self, param: Tensor) -> Any:
        """The dtype (or "8bit") of a converted entry of ``param``'s state."""
        return param.dtype if self.state_dtype is None else self.state_dtype

    # --- a step ---------------------------------------------------------------------------

    def begin(self, batch: GroupBatch) -> Working | None:
        """Working tensors for one batch (None where nothing differs from a plain step):
        ``batch.params``, ``batch.grads`` and the converted state entries are replaced by
        them until :meth:`Working.commit`."""
        if not self.active:
            return None
        from descend import dispatch

        if dispatch.compiling():
            return _outside_graph(Precision._begin)(self, batch)  # type: ignore[no-any-return]
        return self._begin(batch)

    def _begin(self, batch: GroupBatch) -> Working | None:
        params = batch.params
        dtypes = set(map(_DTYPE, params))
        if self.state_dtype is None and not any(map(_is_16bit, dtypes)):
            return None  # rounding applies to 16-bit parameters only
        work = Working(self, batch, params, batch.grads)
        batch.params, batch.grads = list(params), list(batch.grads)  # (the originals are restored)
        compensated = self.rounding == "compensated"
        for i, p in enumerate(params):
            wdt = self.working_dtype(p)
            state = batch.states[i]
            if wdt != p.dtype:
                w = _kernel(_join, p.numel())(p, state[COMPENSATION]) if compensated else p.to(wdt)
                work.rounded.append((i, p, w))
                batch.params[i] = w
                batch.grads[i] = batch.grads[i].to(wdt)
            if self.state_dtype is None and wdt == p.dtype:
                continue  # the state is θ's dtype, and so is the computation
            work.converting.append(i)
            for key, signed in self.converted.items():
                stored = state.get(key)
                if stored is None:
                    continue
                if self.state_dtype == "8bit":
                    state[key] = dequantize(stored, state[absmax_key(key)], signed=signed, dtype=wdt)
                elif stored.dtype != wdt:
                    state[key] = stored.to(wdt)
                else:
                    continue  # used as it is
                work.entries.append((state, key, stored))
        return work


_DTYPE = operator.attrgetter("dtype")
_EAGER: dict[Callable[..., Any], Callable[..., Any]] = {}


def _outside_graph(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run eagerly while torch.compile traces the user's step (a graph break on each side).
    Inside one graph, inductor fused the 8-bit block reduction with the store of the codes and
    lost the last block, and it drops the cast pair of Kahan's w − rn(w); the rule itself is
    still traced. (Made before tracing: :meth:`Precision.of` prepares both.)"""
    wrapped = _EAGER.get(fn)
    if wrapped is None:
        wrapped = _EAGER[fn] = torch.compiler.disable(fn)
    return wrapped


def _join(param: Tensor, compensation: Tensor) -> Tensor:
    """θ + c in float32: the value a compensated parameter stands for."""
    return param.float() + compensation.float()


def _split(w: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(rn(w), rn(w − rn(w))) in ``dtype``: Kahan's write-back."""
    new = w.to(dtype)
    return new, (w - new.float()).to(dtype)


def _split_into(w: Tensor, param: Tensor, compensation: Tensor) -> None:
    """:func:`_split` written into ``param`` and ``compensation``: compiled, one pass over w and no
    16-bit intermediates (8% off a compensated AdamW step on 4M bfloat16 parameters, one CPU core)."""
    new = w.to(param.dtype)
    compensation.copy_((w - new.float()).to(param.dtype))
    param.copy_(new)


@dataclass
class Working:
    """The working tensors of one batch's step, and how each goes back."""

    precision: Precision
    batch: GroupBatch
    params: list[Tensor]
    grads: list[Tensor]
    #: (index, parameter, working copy) for each parameter computed in float32
    rounded: list[tuple[int, Tensor, Tensor]] = field(default_factory=list)
    #: (state dict, key, stored tensor) for each entry replaced by a working tensor
    entries: list[tuple[dict[str, Any], str, Tensor]] = field(default_factory=list)
    #: indices of the parameters whose state entries are stored otherwise than computed
    converting: list[int] = field(default_factory=list)

    def commit(self) -> None:
        """Write every working tensor back into its stored form: θ rounded as configured, the
        state stored in its dtype (nearest) or quantized; entries the rule made (SGD's first
        momentum, AMSGrad's maximum) are converted too."""
        from descend import dispatch

        if dispatch.compiling():
            _outside_graph(Working._commit)(self)
        else:
            self._commit()

    def _commit(self) -> None:
        prec, batch = self.precision, self.batch
        rounding = prec.rounding
        for i, p, w in self.rounded:
            if rounding == "compensated":
                _kernel(_split_into, p.numel())(w, p, batch.states[i][COMPENSATION])
            elif rounding == "stochastic":
                assert prec.generators is not None
                p.copy_(stochastic_round(w, p.dtype, prec.generators.on(p.device)))
            else:
                p.copy_(w)
        if self.converting:
            replaced = {(id(state), key): stored for state, key, stored in self.entries}
            for i in self.converting:
                state, form = batch.states[i], prec.stored_form(self.params[i])
                for key, signed in prec.converted.items():
                    value = state.get(key)
                    if value is None:
                        continue
                    stored = replaced.get((id(state), key))
                    if stored is value:
                        continue
                    if form == "8bit":
                        if stored is None and value.dtype == torch.uint8:
                            continue  # already stored (not touched this step)
                        if stored is not None:
                            quantize_into_(stored, state[absmax_key(key)], value, signed=signed)
                            state[key] = stored
                        else:
                            state[key], state[absmax_key(key)] = quantize(value, signed=signed)
                    elif stored is not None:
                        stored.copy_(value)
                        state[key] = stored
                    elif value.dtype != form:
                        state[key] = value.to(form)
        batch.params, batch.grads = self.params, self.grads


# --- the warning where rounding erases decay ----------------------------------------------


def half_ulp(dtype: torch.dtype) -> float:
    """The least half unit in the last place relative to the value (at the top of a binade,
    a quarter of ``finfo.eps``): a factor 1 − δ with δ below it leaves every normal value of
    ``dtype`` unchanged when rounded to nearest (2⁻⁹ for bfloat16, 2⁻¹² for float16)."""
    return torch.finfo(dtype).eps / 4


def erased_decay(group: dict[str, Any]) -> list[str]:
    """What rounding to nearest erases in a group's 16-bit parameters at its current lr: the
    decay factor if 1 − factor is below half an ulp, the L1 threshold if it is below half an ulp
    of the parameters' mean magnitude. One phrase per finding (empty if none)."""
    from descend.regularization import decay_factor, l1_threshold
    from descend.validation import scalar_value

    decay = group.get("decay", "coupled")
    if decay == "coupled":
        return []
    lr = scalar_value(group["lr"])
    base_lr = group.get("base_lr", lr)
    found = []
    for dtype in SIXTEEN_BIT:
        params = [p for p in group["params"] if isinstance(p, Tensor) and p.dtype == dtype]
        if not params:
            continue
        shrink = 1 - decay_factor(decay, lr, base_lr, group.get("weight_decay", 0.0))
        if 0 < shrink < half_ulp(dtype):
            found.append(f"decay={decay!r} multiplies its {dtype} weights by 1 - {shrink:.3g} per step, closer to 1 "
                         f"than half an ulp ({half_ulp(dtype):.3g})")
        threshold = l1_threshold(decay, lr, base_lr, group.get("l1", 0.0))
        if threshold > 0:
            with torch.no_grad():
                sizes = [float(p.detach().abs().float().mean()) for p in params if p.numel()]
            typical = sum(sizes) / len(sizes) if sizes else 0.0
            if typical > 0 and threshold < half_ulp(dtype) * typical:
                found.append(f"its L1 threshold {threshold:.3g} per step is below half an ulp of its typical "
                             f"{dtype} weight ({typical:.3g})")
    return found


def account(optimizer: torch.optim.Optimizer, param: Tensor, group: dict[str, Any]) -> tuple[str, str, str, str]:
    """What :func:`descend.explain` shows of one parameter's precision: its dtype, the dtype its
    state is stored in, its rounding ("nearest" for torch.optim and for float32/64), and what
    rounding to nearest erases of its decay ("" if nothing)."""
    prec = getattr(optimizer, "_precision", None) or Precision()
    short = str(param.dtype).removeprefix("torch.")
    form = prec.stored_form(param)
    stored = form if isinstance(form, str) else str(form).removeprefix("torch.")
    rounding = prec.rounding if _is_16bit(param.dtype) else "nearest"
    erased = ""
    if rounding == "nearest" and _is_16bit(param.dtype):
        erased = "decay rounds away" if erased_decay({**group, "params": [param]}) else ""
    return short, stored, rounding, erased


def warn_if_decay_erased(optimizer: RegularizedOptimizer, group: dict[str, Any], label: str) -> None:
    """One UserWarning, with ``rounding="nearest"``, for decay that rounding erases (:func:`erased_decay`)."""
    if optimizer.rounding != "nearest":
        return
    found = erased_decay(group)
    if not found:
        return
    from descend.regularization import _caller_stacklevel

    warnings.warn(f"{label}: {'; '.join(found)}, so rounding to nearest leaves them unchanged and the decay does "
                  f"nothing. Pass rounding='compensated' (or 'stochastic') to keep it, or warn=False to silence "
                  f"this.", UserWarning, stacklevel=_caller_stacklevel())


# --- loading ------------------------------------------------------------------------------


def plain_state(state: dict[str, Any], spec: StateSpec) -> dict[str, Any]:
    """A saved parameter state with every 8-bit entry (codes and ``_absmax``) dequantized to
    float32, and the compensation dropped: the form every configuration converts from."""
    out = dict(state)
    out.pop(COMPENSATION, None)
    for key in list(out):
        if key not in out:
            continue  # the scales of an entry dequantized already
        absmax = out.get(absmax_key(key))
        value = out[key]
        if absmax is None or not isinstance(value, Tensor):
            continue
        entry = spec.by_name.get(key)
        if value.dtype != torch.uint8 or not isinstance(absmax, Tensor) or \
                tuple(absmax.shape) != QUANT_BLOCKS(value.shape) or not absmax.is_floating_point():
            raise ValueError(f"state {key!r} with {absmax_key(key)!r} is not an 8-bit entry (uint8 codes and one "
                             f"float scale per {BLOCK} elements)")
        signed = entry is None or entry.low is None
        out[key] = dequantize(value, absmax, signed=signed)
        del out[absmax_key(key)]
    return out


def stored_state(prec: Precision, param: Tensor, state: dict[str, Any]) -> dict[str, Any]:
    """A saved state (already checked in plain form) in this configuration's stored form.
    Entries already in that form are kept as they are (bit-exact resume); others are cast
    (to nearest) or quantized; a compensation is kept if this configuration keeps one."""
    out: dict[str, Any] = {}
    compensation = state.get(COMPENSATION)
    for key, value in state.items():
        if key == COMPENSATION or key.endswith("_absmax") and key[: -len("_absmax")] in state:
            continue
        if key in prec.converted and isinstance(value, Tensor) and (value.is_floating_point()
                                                                      or value.dtype == torch.uint8):
            form = prec.stored_form(param)
            absmax = state.get(absmax_key(key))
            if form == "8bit":
                if value.dtype == torch.uint8 and isinstance(absmax, Tensor):
                    out[key], out[absmax_key(key)] = value, absmax
                else:
                    out[key], out[absmax_key(key)] = quantize(value, signed=prec.converted[key])
                continue
            if value.dtype == torch.uint8 and isinstance(absmax, Tensor):
                value = dequantize(value, absmax, signed=prec.converted[key])
            out[key] = value if value.dtype == form else value.to(form)
            continue
        out[key] = value
    if prec.rounding == "compensated" and _is_16bit(param.dtype):
        if isinstance(compensation, Tensor) and compensation.dtype == param.dtype \
                and compensation.shape == param.shape:
            out[COMPENSATION] = compensation
        else:
            out[COMPENSATION] = torch.zeros_like(param)
    return out


def state_bytes_per_parameter(optimizer: torch.optim.Optimizer) -> float:
    """Bytes of optimizer state per parameter element (scales included, step counts excluded):
    8 for Adam in float32, 4 in bfloat16, 2.03 in 8 bits (for ``descend bench``)."""
    elements = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    held = sum(v.numel() * v.element_size() for s in optimizer.state.values() if isinstance(s, dict)
               for k, v in s.items() if isinstance(v, Tensor) and v.dim() > 0)
    return held / elements if elements else 0.0
