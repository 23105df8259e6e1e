"""descend: PyTorch optimizers in which regularization is explicit, correct and fast.

SGD, Adam and AdamW share one regularization vocabulary (``weight_decay``, ``l1`` and
``decay`` in {"coupled", "decoupled", "independent", "fixed"}), per parameter group; see
:mod:`descend.regularization` for the formulas. :func:`param_groups` builds groups from a
model by rule and :func:`explain` shows what each parameter gets.
"""

from descend.explain import Explanation, GroupSummary, ParamRow, explain
from descend.groups import param_groups
from descend.optimizer import RegularizedOptimizer
from descend.optimizers.adadelta import Adadelta
from descend.optimizers.adafactor import Adafactor
from descend.optimizers.adagrad import Adagrad
from descend.optimizers.adam import Adam, AdamW
from descend.optimizers.adamax import Adamax
from descend.optimizers.asgd import ASGD
from descend.optimizers.lion import Lion
from descend.optimizers.muon import Muon
from descend.optimizers.nadam import NAdam
from descend.optimizers.radam import RAdam
from descend.optimizers.rmsprop import RMSprop
from descend.optimizers.rprop import Rprop
from descend.optimizers.sgd import SGD
from descend.optimizers.sparse_adam import SparseAdam
from descend.regularization import DECAY_MODES, l1_penalty, l2_penalty
from descend.solvers.cg import CG, ConjugateGradient
from descend.solvers.lbfgs import LBFGS
from descend.solvers.minimize import MinimizeResult, minimize
from descend.timescale import normalized_weight_decay, timescale, weight_decay_for_timescale

__version__ = "0.1.0"

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "Adafactor",
    "Lion",
    "Muon",
    "RMSprop",
    "Adagrad",
    "Adadelta",
    "Adamax",
    "NAdam",
    "RAdam",
    "ASGD",
    "Rprop",
    "SparseAdam",
    "LBFGS",
    "ConjugateGradient",
    "CG",
    "minimize",
    "MinimizeResult",
    "RegularizedOptimizer",
    "param_groups",
    "explain",
    "Explanation",
    "ParamRow",
    "GroupSummary",
    "timescale",
    "weight_decay_for_timescale",
    "normalized_weight_decay",
    "l1_penalty",
    "l2_penalty",
    "DECAY_MODES",
    "__version__",
]
