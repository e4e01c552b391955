"""idl: Implicit Deep Learning for PyTorch.

Implicit layers find their hidden state by solving X = φ(X Aᵀ + U Bᵀ); the
solves and the projection that keeps them well-posed run in a compiled core
(torch.ops.idl), with implicit differentiation for the backward pass.
"""
from ._ops import ImplicitFunctionWarning, SolveNotConverged
from .functional import ACTIVATIONS, PROJECTIONS, SolverOptions, project_linf
from .implicit import (
    ImplicitFunction,
    ImplicitFunctionInf,
    ImplicitFunctionTriu,
    ImplicitModel,
    SolveStats,
)

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "PROJECTIONS",
    "ImplicitFunction",
    "ImplicitFunctionInf",
    "ImplicitFunctionTriu",
    "ImplicitFunctionWarning",
    "ImplicitModel",
    "SolveNotConverged",
    "SolveStats",
    "SolverOptions",
    "project_linf",
]
