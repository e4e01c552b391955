"""Solvers that fit SIM's implicit weights to the states of an explicit network.

``BatchedProxSolver`` is the default (every row at once, ADMM or FISTA on Gram
matrices with a compiled prox). ``CVXSolver`` is the exact convex reference
(cvxpy), ``ADMMSolver`` and ``ProjectedGDLowRankSolver`` follow torchidl's
options, ``LeastSquareSolver`` ignores well-posedness. Subclass ``BaseSolver``
for a custom one.
"""
from .admm import ADMMSolver
from .base import BaseSolver
from .batched import BatchedProxSolver
from .cvx import CVXSolver
from .least_squares import LeastSquareSolver
from .projected_gd_lowrank import ProjectedGDLowRankSolver

__all__ = [
    "ADMMSolver",
    "BaseSolver",
    "BatchedProxSolver",
    "CVXSolver",
    "LeastSquareSolver",
    "ProjectedGDLowRankSolver",
]
