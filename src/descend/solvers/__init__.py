"""The closure solvers: the parameters as one vector with global reductions and the
objective with its decay term (:mod:`~descend.solvers.closure`), the strong Wolfe line
search and the descent loop both solvers share (:mod:`~descend.solvers.linesearch`),
L-BFGS, nonlinear conjugate gradient and the scipy-like :func:`~descend.solvers.minimize.minimize`."""
