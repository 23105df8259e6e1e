r"""Orthogonalization by a quintic Newton–Schulz iteration, for a whole stack of matrices at once.

Muon replaces each update matrix G (m × n) by an approximation of its orthogonal polar factor
U·Vᵀ (G = U·Σ·Vᵀ): the nearest semi-orthogonal matrix. Keller Jordan's iteration, as
``torch.optim.Muon`` runs it, in bfloat16:

.. math::
   \begin{aligned}
   &X_0 \leftarrow \mathrm{bf16}(G)\ (\text{or } \mathrm{bf16}(G)^\top \text{ when } m > n),
     \qquad X_0 \leftarrow X_0 / \max(\lVert X_0\rVert_F,\ \varepsilon)\\
   &\textbf{for } k = 1 \ldots K:\quad A \leftarrow X X^\top,\quad
     B \leftarrow b\,A + c\,A A,\quad X \leftarrow a\,X + B X\\
   &O \leftarrow X_K\ (\text{transposed back when } m > n)
   \end{aligned}

Each step applies p(σ) = aσ + bσ³ + cσ⁵ to every singular value σ of X (the singular vectors
stay): dividing by the Frobenius norm puts all σ in [0, 1], and the coefficients (a, b, c) =
(3.4445, −4.775, 2.0315) make p's slope at 0 as steep as possible while 5 steps still bring every
σ into roughly [0.7, 1.2], not exactly to 1: an update whose directions are balanced, which is all
Muon needs, in 5 steps instead of the ~20 a convergent cubic iteration takes. Tall matrices are
transposed so that the Gram matrix A is the smaller one, min(m, n)².

:func:`newton_schulz` takes a stack [..., m, n] of same-shape matrices and runs every step on
all of them with batched products (``bmm``/``baddbmm``): on a CPU the 3·K products of a small
matrix cost more in dispatch than in arithmetic, so 256 matrices of 64 × 64 take one batched
iteration instead of 256. The result of each matrix of a stack is the same as on its own,
bit for bit, and the same as ``torch.optim.Muon``'s per-matrix iteration: the Frobenius norm is
a reduction over the matrix's own elements, and the batched products compute each matrix's
product with the same kernel as ``mm``/``addmm`` (measured: torch 2.13 on x86-64 CPU with
AVX-512 BF16, 1 and 2 threads, shapes from 5 × 7 to 768 × 3072; ``tests/test_muon.py`` holds it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from descend.validation import check_int, check_number, invalid

__all__ = ["newton_schulz", "DEFAULT_COEFFICIENTS", "DEFAULT_STEPS", "DEFAULT_EPS", "check_coefficients"]

#: (a, b, c) of p(σ) = aσ + bσ³ + cσ⁵ (Keller Jordan's, torch's defaults)
DEFAULT_COEFFICIENTS = (3.4445, -4.775, 2.0315)
DEFAULT_STEPS = 5
DEFAULT_EPS = 1e-7


def check_coefficients(coefficients: object) -> None:
    """Raise ValueError unless ``coefficients`` are three finite real numbers (a, b, c)."""
    if not isinstance(coefficients, (tuple, list)) or len(coefficients) != 3:
        raise invalid("ns_coefficients", coefficients, "a tuple of 3 finite floats (a, b, c)")
    for x in coefficients:
        try:
            check_number("ns_coefficients", x, low=-float("inf"))
        except ValueError:
            raise invalid("ns_coefficients", coefficients, "a tuple of 3 finite floats (a, b, c)") from None


def newton_schulz(matrices: Tensor, coefficients: tuple[float, float, float] = DEFAULT_COEFFICIENTS,
                  steps: int = DEFAULT_STEPS, eps: float = DEFAULT_EPS) -> Tensor:
    """The iteration of the module docstring on each matrix of ``matrices`` ([..., m, n]).

    Returns a new bfloat16 tensor of the same shape (``matrices`` itself is never written, even
    when it is already bfloat16: torch 2.13's Muon normalizes such an input in place)."""
    if matrices.dim() < 2:
        raise invalid("matrices", f"a tensor of shape {tuple(matrices.shape)}", "a matrix or a stack [..., m, n]")
    check_coefficients(coefficients)
    check_int("ns_steps", steps, 1)
    check_number("eps", eps, low=0)
    *lead, m, n = matrices.shape
    # a bfloat16 copy in the input's layout (a bfloat16 input is copied too: it is normalized in place)
    stack = matrices.reshape(-1, m, n).to(torch.bfloat16, copy=True)
    tall = m > n
    out = newton_schulz_oriented_(stack.mT if tall else stack, tuple(float(x) for x in coefficients),  # type: ignore[arg-type]
                                  steps, eps)
    result = out if isinstance(out, Tensor) else torch.stack(out)
    return (result.mT if tall else result).reshape(*lead, m, n)


def batched(rows: int, cols: int, count: int) -> bool:
    """Whether ``count`` matrices of rows × cols are faster as one batched iteration than one by one:
    up to 512 × 512, where a product costs less than calling it (measured on this project's CPU,
    1 and 2 threads: 256 of 64 × 64 over 10× faster batched, 8 of 512 × 512 about 10%; from
    768 × 768 on, ``bmm`` was 0–10% slower than ``mm`` per matrix)."""
    return count > 1 and rows * cols <= BATCHED_ELEMENTS


#: the largest matrix (elements) that :func:`batched` stacks
BATCHED_ELEMENTS = 512 * 512


def newton_schulz_oriented_(stack: Tensor, coefficients: tuple[float, float, float], steps: int,
                            eps: float) -> Tensor | list[Tensor]:
    """:func:`newton_schulz` on a bfloat16 stack [B, m, n] with m ≤ n that the caller made for it
    (a tall matrix as torch's Muon has it: a transposed view of a row-major copy, since the
    products' rounding can depend on the layout): no checks, normalized in place. Returns the
    stack of results when it ran batched (:func:`batched`), else the list of each matrix's."""
    a, b, c = coefficients
    count, rows, cols = stack.shape
    x = stack.div_(torch.linalg.vector_norm(stack, dim=(-2, -1), keepdim=True).clamp_(min=eps))
    if batched(rows, cols, count):
        for _ in range(steps):
            gram = torch.bmm(x, x.mT)
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.baddbmm(x, poly, x, beta=a)
        return x
    results = []
    for y in x.unbind(0):
        for _ in range(steps):
            gram = torch.mm(y, y.T)
            poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            y = torch.addmm(y, poly, y, beta=a)
        results.append(y)
    return results
