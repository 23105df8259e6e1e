"""Standard unconstrained test problems with known minima, as torch functions of any dtype.

Shared by the closure-solver tests and ``benchmarks/closure_solvers.py`` (one copy). Each
:class:`Problem` is f(x) = Σ f_i(x)² (or a plain function) from a standard starting point, with
the minimum value the literature reports and, where unique, the minimizer.

Sources:
- MGH: J. J. Moré, B. S. Garbow, K. E. Hillstrom, "Testing unconstrained optimization
  software", ACM TOMS 7(1), 1981, problem numbers as there; minima from its appendix.
- Chained Rosenbrock: Σ_{i<n} 100(x_{i+1} − x_i²)² + (1 − x_i)² (the form of
  ``scipy.optimize.rosen``), from x = (−1.2, 1, −1.2, 1, …).
- Convex quadratics ½xᵀAx − bᵀx with A = Q·diag(λ)·Qᵀ, Q a seeded random orthogonal matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = ["Problem", "PROBLEMS", "TEST_PROBLEMS", "by_name", "quadratic"]


@dataclass(frozen=True)
class Problem:
    name: str
    x0: tuple[float, ...]
    f: Callable[[Tensor], Tensor]
    f_min: float  #: the minimum value (of the minimizer the solvers reach from x0)
    x_min: tuple[float, ...] | None = None  #: the minimizer, where the literature gives a unique one
    source: str = "MGH"
    #: data a function closes over (kept for repr only)
    notes: str = field(default="", compare=False)

    @property
    def n(self) -> int:
        return len(self.x0)

    def start(self, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> Tensor:
        return torch.tensor(self.x0, dtype=dtype, device=device)

    def __call__(self, x: Tensor) -> Tensor:
        return self.f(x)


def _const(values: Sequence[float], like: Tensor) -> Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)


def _sum_squares(r: Tensor) -> Tensor:
    return (r * r).sum()


# --- two variables --------------------------------------------------------------------------


def rosenbrock(x: Tensor) -> Tensor:  # MGH 1
    return _sum_squares(torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]]))


def freudenstein_roth(x: Tensor) -> Tensor:  # MGH 2
    f1 = -13 + x[0] + ((5 - x[1]) * x[1] - 2) * x[1]
    f2 = -29 + x[0] + ((x[1] + 1) * x[1] - 14) * x[1]
    return _sum_squares(torch.stack([f1, f2]))


def powell_badly_scaled(x: Tensor) -> Tensor:  # MGH 3
    f1 = 1e4 * x[0] * x[1] - 1
    f2 = torch.exp(-x[0]) + torch.exp(-x[1]) - 1.0001
    return _sum_squares(torch.stack([f1, f2]))


def brown_badly_scaled(x: Tensor) -> Tensor:  # MGH 4
    return _sum_squares(torch.stack([x[0] - 1e6, x[1] - 2e-6, x[0] * x[1] - 2]))


def beale(x: Tensor) -> Tensor:  # MGH 5
    y = _const([1.5, 2.25, 2.625], x)
    i = _const([1.0, 2.0, 3.0], x)
    return _sum_squares(y - x[0] * (1 - x[1] ** i))


def jennrich_sampson(x: Tensor) -> Tensor:  # MGH 6, m = 10
    i = torch.arange(1, 11, dtype=x.dtype, device=x.device)
    return _sum_squares(2 + 2 * i - (torch.exp(i * x[0]) + torch.exp(i * x[1])))


# --- three and four variables -----------------------------------------------------------------


def helical_valley(x: Tensor) -> Tensor:  # MGH 7
    theta = torch.atan(x[1] / x[0]) / (2 * math.pi) + 0.5 * (x[0] < 0).to(x.dtype)
    f1 = 10 * (x[2] - 10 * theta)
    f2 = 10 * (torch.sqrt(x[0] ** 2 + x[1] ** 2) - 1)
    return _sum_squares(torch.stack([f1, f2, x[2]]))


_BARD_Y = [0.14, 0.18, 0.22, 0.25, 0.29, 0.32, 0.35, 0.39, 0.37, 0.58, 0.73, 0.96, 1.34, 2.10, 4.39]


def bard(x: Tensor) -> Tensor:  # MGH 8
    u = torch.arange(1, 16, dtype=x.dtype, device=x.device)
    v = 16 - u
    w = torch.minimum(u, v)
    return _sum_squares(_const(_BARD_Y, x) - (x[0] + u / (v * x[1] + w * x[2])))


_GAUSS_Y = [0.0009, 0.0044, 0.0175, 0.0540, 0.1295, 0.2420, 0.3521, 0.3989,
            0.3521, 0.2420, 0.1295, 0.0540, 0.0175, 0.0044, 0.0009]


def gaussian(x: Tensor) -> Tensor:  # MGH 9
    t = (8 - torch.arange(1, 16, dtype=x.dtype, device=x.device)) / 2
    return _sum_squares(x[0] * torch.exp(-x[1] * (t - x[2]) ** 2 / 2) - _const(_GAUSS_Y, x))


def box_3d(x: Tensor) -> Tensor:  # MGH 12, m = 10
    t = 0.1 * torch.arange(1, 11, dtype=x.dtype, device=x.device)
    r = torch.exp(-t * x[0]) - torch.exp(-t * x[1]) - x[2] * (torch.exp(-t) - torch.exp(-10 * t))
    return _sum_squares(r)


def powell_singular(x: Tensor) -> Tensor:  # MGH 13 (and 22 for n = 4k)
    b = x.reshape(-1, 4)
    r = torch.stack([b[:, 0] + 10 * b[:, 1], math.sqrt(5) * (b[:, 2] - b[:, 3]),
                     (b[:, 1] - 2 * b[:, 2]) ** 2, math.sqrt(10) * (b[:, 0] - b[:, 3]) ** 2])
    return _sum_squares(r)


def wood(x: Tensor) -> Tensor:  # MGH 14
    r = torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0], math.sqrt(90) * (x[3] - x[2] ** 2), 1 - x[2],
                     math.sqrt(10) * (x[1] + x[3] - 2), (x[1] - x[3]) / math.sqrt(10)])
    return _sum_squares(r)


_KO_Y = [0.1957, 0.1947, 0.1735, 0.1600, 0.0844, 0.0627, 0.0456, 0.0342, 0.0323, 0.0235, 0.0246]
_KO_U = [4.0, 2.0, 1.0, 0.5, 0.25, 0.167, 0.125, 0.1, 0.0833, 0.0714, 0.0625]


def kowalik_osborne(x: Tensor) -> Tensor:  # MGH 15
    u = _const(_KO_U, x)
    return _sum_squares(_const(_KO_Y, x) - x[0] * (u**2 + u * x[1]) / (u**2 + u * x[2] + x[3]))


def brown_dennis(x: Tensor) -> Tensor:  # MGH 16, m = 20
    t = torch.arange(1, 21, dtype=x.dtype, device=x.device) / 5
    r = (x[0] + t * x[1] - torch.exp(t)) ** 2 + (x[2] + x[3] * torch.sin(t) - torch.cos(t)) ** 2
    return _sum_squares(r)


_OSBORNE1_Y = [0.844, 0.908, 0.932, 0.936, 0.925, 0.908, 0.881, 0.850, 0.818, 0.784, 0.751, 0.718, 0.685, 0.658,
               0.628, 0.603, 0.580, 0.558, 0.538, 0.522, 0.506, 0.490, 0.478, 0.467, 0.457, 0.448, 0.438, 0.431,
               0.424, 0.420, 0.414, 0.411, 0.406]


def osborne1(x: Tensor) -> Tensor:  # MGH 17
    t = 10 * torch.arange(33, dtype=x.dtype, device=x.device)
    model = x[0] + x[1] * torch.exp(-t * x[3]) + x[2] * torch.exp(-t * x[4])
    return _sum_squares(_const(_OSBORNE1_Y, x) - model)


def biggs_exp6(x: Tensor) -> Tensor:  # MGH 18, m = 13
    t = 0.1 * torch.arange(1, 14, dtype=x.dtype, device=x.device)
    y = torch.exp(-t) - 5 * torch.exp(-10 * t) + 3 * torch.exp(-4 * t)
    r = x[2] * torch.exp(-t * x[0]) - x[3] * torch.exp(-t * x[1]) + x[5] * torch.exp(-t * x[4]) - y
    return _sum_squares(r)


def watson(x: Tensor) -> Tensor:  # MGH 20
    n = x.numel()
    t = torch.arange(1, 30, dtype=x.dtype, device=x.device) / 29
    j = torch.arange(n, dtype=x.dtype, device=x.device)
    powers = t[:, None] ** j[None, :]  # t_i^(j-1) for j = 1..n
    s1 = (j[1:] * x[1:] * powers[:, :-1]).sum(1)
    s2 = (x * powers).sum(1)
    r = torch.cat([s1 - s2**2 - 1, x[:1], (x[1] - x[0] ** 2 - 1)[None]])
    return _sum_squares(r)


# --- n variables ----------------------------------------------------------------------------


def extended_rosenbrock(x: Tensor) -> Tensor:  # MGH 21
    b = x.reshape(-1, 2)
    return _sum_squares(torch.stack([10 * (b[:, 1] - b[:, 0] ** 2), 1 - b[:, 0]]))


def penalty1(x: Tensor) -> Tensor:  # MGH 23
    a = 1e-5
    return _sum_squares(math.sqrt(a) * (x - 1)) + ((x * x).sum() - 0.25) ** 2


def penalty2(x: Tensor) -> Tensor:  # MGH 24
    n = x.numel()
    a = 1e-5
    i = torch.arange(2, n + 1, dtype=x.dtype, device=x.device)
    y = torch.exp(i / 10) + torch.exp((i - 1) / 10)
    r2 = math.sqrt(a) * (torch.exp(x[1:] / 10) + torch.exp(x[:-1] / 10) - y)
    r3 = math.sqrt(a) * (torch.exp(x[1:] / 10) - math.exp(-1 / 10))
    weights = torch.arange(n, 0, -1, dtype=x.dtype, device=x.device)
    r4 = (weights * x * x).sum() - 1
    return (x[0] - 0.2) ** 2 + _sum_squares(r2) + _sum_squares(r3) + r4**2


def variably_dimensioned(x: Tensor) -> Tensor:  # MGH 25
    j = torch.arange(1, x.numel() + 1, dtype=x.dtype, device=x.device)
    s = (j * (x - 1)).sum()
    return _sum_squares(x - 1) + s**2 + s**4


def trigonometric(x: Tensor) -> Tensor:  # MGH 26
    n = x.numel()
    i = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)
    return _sum_squares(n - torch.cos(x).sum() + i * (1 - torch.cos(x)) - torch.sin(x))


def broyden_tridiagonal(x: Tensor) -> Tensor:  # MGH 30
    zero = x.new_zeros(1)
    left = torch.cat([zero, x[:-1]])
    right = torch.cat([x[1:], zero])
    return _sum_squares((3 - 2 * x) * x - left - 2 * right + 1)


def broyden_banded(x: Tensor) -> Tensor:  # MGH 31
    n = x.numel()
    i = torch.arange(n, device=x.device)
    # J_i = {j ≠ i : max(1, i−5) ≤ j ≤ min(n, i+1)}
    mask = ((i[None, :] >= i[:, None] - 5) & (i[None, :] <= i[:, None] + 1) & (i[None, :] != i[:, None])).to(x.dtype)
    return _sum_squares(x * (2 + 5 * x * x) + 1 - mask @ (x * (1 + x)))


def chebyquad(x: Tensor) -> Tensor:  # MGH 35, m = n
    n = x.numel()
    z = 2 * x - 1  # shifted to [-1, 1]
    t_prev, t = torch.ones_like(z), z
    residuals = []
    for k in range(1, n + 1):
        exact = 0.0 if k % 2 else -1.0 / (k * k - 1)
        residuals.append(t.mean() - exact)
        t_prev, t = t, 2 * z * t - t_prev
    return _sum_squares(torch.stack(residuals))


def chained_rosenbrock(x: Tensor) -> Tensor:
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def quadratic(n: int, condition: float, seed: int = 0) -> tuple[Callable[[Tensor], Tensor], np.ndarray, np.ndarray]:
    """½xᵀAx − bᵀx with eigenvalues of A spread geometrically over [1, condition]; returns
    (f, A, x*) with A and the minimizer x* = A⁻¹b as float64 arrays."""
    rng = np.random.RandomState(seed)
    q, _ = np.linalg.qr(rng.randn(n, n))
    eigenvalues = np.geomspace(1.0, condition, n)
    a = (q * eigenvalues) @ q.T
    a = (a + a.T) / 2
    b = rng.randn(n)
    x_star = np.linalg.solve(a, b)

    def f(x: Tensor) -> Tensor:
        a_t, b_t = torch.as_tensor(a, dtype=x.dtype, device=x.device), torch.as_tensor(b, dtype=x.dtype, device=x.device)
        return 0.5 * x @ (a_t @ x) - b_t @ x

    return f, a, x_star


def _quadratic_problem(name: str, n: int, condition: float, seed: int) -> Problem:
    f, a, x_star = quadratic(n, condition, seed)
    b = a @ x_star
    return Problem(name, tuple([0.0] * n), f, float(-0.5 * b @ x_star), tuple(float(v) for v in x_star),
                   source="convex quadratic", notes=f"condition number {condition:g}")


def _tile(block: Sequence[float], n: int) -> tuple[float, ...]:
    return tuple(float(block[i % len(block)]) for i in range(n))


PROBLEMS: list[Problem] = [
    Problem("rosenbrock", (-1.2, 1.0), rosenbrock, 0.0, (1.0, 1.0)),
    Problem("freudenstein_roth", (0.5, -2.0), freudenstein_roth, 48.98425367924, None,
            notes="the local minimum near (11.41, -0.8968) every gradient method reaches; the global one is 0"),
    Problem("powell_badly_scaled", (0.0, 1.0), powell_badly_scaled, 0.0, (1.098159e-5, 9.106146)),
    Problem("brown_badly_scaled", (1.0, 1.0), brown_badly_scaled, 0.0, (1e6, 2e-6)),
    Problem("beale", (1.0, 1.0), beale, 0.0, (3.0, 0.5)),
    Problem("jennrich_sampson", (0.3, 0.4), jennrich_sampson, 124.362182355, (0.2578252, 0.2578252)),
    Problem("helical_valley", (-1.0, 0.0, 0.0), helical_valley, 0.0, (1.0, 0.0, 0.0)),
    Problem("bard", (1.0, 1.0, 1.0), bard, 8.21487730657e-3),
    Problem("gaussian", (0.4, 1.0, 0.0), gaussian, 1.12793276961e-8),
    Problem("box_3d", (0.0, 10.0, 20.0), box_3d, 0.0, (1.0, 10.0, 1.0)),
    Problem("powell_singular", (3.0, -1.0, 0.0, 1.0), powell_singular, 0.0, (0.0, 0.0, 0.0, 0.0)),
    Problem("wood", (-3.0, -1.0, -3.0, -1.0), wood, 0.0, (1.0, 1.0, 1.0, 1.0)),
    Problem("kowalik_osborne", (0.25, 0.39, 0.415, 0.39), kowalik_osborne, 3.07505603849e-4),
    Problem("brown_dennis", (25.0, 5.0, -5.0, -1.0), brown_dennis, 85822.2016263563),
    Problem("osborne1", (0.5, 1.5, -1.0, 0.01, 0.02), osborne1, 5.46489469748e-5),
    Problem("biggs_exp6", (1.0, 2.0, 1.0, 1.0, 1.0, 1.0), biggs_exp6, 5.65565e-3,
            notes="a local minimum; the global minimum 0 is at (1, 10, 1, 5, 4, 3)"),
    Problem("watson", (0.0,) * 6, watson, 2.28767005355e-3),
    Problem("penalty1", tuple(float(j) for j in range(1, 11)), penalty1, 7.08765146709e-5),
    Problem("penalty2", (0.5,) * 10, penalty2, 2.93660531664e-4),
    Problem("variably_dimensioned", tuple(1 - j / 10 for j in range(1, 11)), variably_dimensioned, 0.0, (1.0,) * 10),
    Problem("trigonometric", (0.1,) * 10, trigonometric, 0.0,
            notes="from this start solvers may reach the local minimum 2.79506e-5 instead"),
    Problem("broyden_tridiagonal", (-1.0,) * 10, broyden_tridiagonal, 0.0),
    Problem("broyden_banded", (-1.0,) * 10, broyden_banded, 0.0),
    Problem("chebyquad", tuple(j / 9 for j in range(1, 9)), chebyquad, 3.51687029e-3),
    Problem("extended_rosenbrock", _tile((-1.2, 1.0), 100), extended_rosenbrock, 0.0, (1.0,) * 100),
    Problem("extended_powell", _tile((3.0, -1.0, 0.0, 1.0), 100), powell_singular, 0.0, (0.0,) * 100),
    Problem("chained_rosenbrock", _tile((-1.2, 1.0), 100), chained_rosenbrock, 0.0, (1.0,) * 100,
            source="chained Rosenbrock"),
    _quadratic_problem("quadratic_well", 50, 10.0, seed=0),
    _quadratic_problem("quadratic_ill", 100, 1e4, seed=1),
]

#: the problems the unit tests assert on (the rest are in the benchmark)
TEST_PROBLEMS = ["rosenbrock", "chained_rosenbrock", "beale", "helical_valley", "powell_singular", "wood",
                 "brown_badly_scaled", "extended_powell", "quadratic_well"]


def by_name(name: str) -> Problem:
    for p in PROBLEMS:
        if p.name == name:
            return p
    raise KeyError(name)
