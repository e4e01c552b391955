"""idl: Implicit Deep Learning for PyTorch.

Implicit layers find their hidden state by solving X = φ(X Aᵀ + U Bᵀ); the
solves and the projection that keeps them well-posed run in a compiled core
(torch.ops.idl), with implicit differentiation for the backward pass.
"""
from ._stats import ImplicitFunctionWarning, SolveNotConverged, SolveStats
from .attention import ATTENTIONS, ImplicitAttentionHead, ImplicitMultiHeadAttention
from .functional import ACTIVATIONS, PROJECTIONS, SolverOptions, project_linf
from .implicit import (
    ImplicitFunction,
    ImplicitFunctionInf,
    ImplicitFunctionTriu,
    ImplicitModel,
)
from .rnn import ImplicitRNN, ImplicitRNNCell

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "ATTENTIONS",
    "PROJECTIONS",
    "ImplicitAttentionHead",
    "ImplicitFunction",
    "ImplicitFunctionInf",
    "ImplicitFunctionTriu",
    "ImplicitFunctionWarning",
    "ImplicitModel",
    "ImplicitMultiHeadAttention",
    "ImplicitRNN",
    "ImplicitRNNCell",
    "SolveNotConverged",
    "SolveStats",
    "SolverOptions",
    "project_linf",
]
