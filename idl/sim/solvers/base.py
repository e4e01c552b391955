"""The solver interface of SIM, and what every built-in solver shares.

A solver fits the implicit model to the states of an explicit network:

    [A B] from  Z ≈ X Aᵀ + U Bᵀ   with ||A||_inf <= kappa (well-posedness)
    [C D] from  Y ≈ X Cᵀ + U Dᵀ

Every state matrix is batch-first: X, Z (m, n), U (m, p), Y (m, q) for m
samples, hidden layers stacked last-layer-first. Row i of [A B] only involves
column i of Z, so each weight matrix is a set of independent row problems.
"""
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Dict, Tuple

import numpy as np
import torch

from ... import functional as F
from ..fitted import implicit_model_from_weights, inf_norm

logger = logging.getLogger(__name__)

#: What a solver finds in ``model_config`` when SIM gives none of a key.
DEFAULT_MODEL_CONFIG = {
    "activation_fn": torch.nn.functional.relu,
    "device": "cpu",
    "dtype": torch.float32,
    "atol": 1e-6,
    "kappa": 0.99,
    "max_iter": 50_000,
}


class BaseSolver(ABC):
    r"""Base class of SIM solvers; a custom solver subclasses it and implements
    :meth:`solve`, then is passed to ``SIM.train(solver=...)``."""

    @abstractmethod
    def solve(
        self,
        X: torch.Tensor,
        U: torch.Tensor,
        Z: torch.Tensor,
        Y: torch.Tensor,
        model_config: Dict[str, Any],
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fit the implicit model's weights to the states.

        Args:
            X: post-activations, (n_samples, hidden_dim).
            U: inputs, (n_samples, input_dim).
            Z: pre-activations, (n_samples, hidden_dim).
            Y: outputs, (n_samples, output_dim).
            model_config: the SIM's settings, a dict with
                ``activation_fn`` (φ, a callable), ``device`` and ``dtype`` (of
                the fitted model), ``atol`` (tolerance of its fixed-point
                solve), ``kappa`` (the well-posedness bound ||A||_inf <= kappa)
                and ``max_iter`` (iteration cap of its fixed-point solve).

        Returns:
            A (hidden_dim, hidden_dim), B (hidden_dim, input_dim),
            C (output_dim, hidden_dim), D (output_dim, input_dim): tensors or
            NumPy arrays (SIM converts them).
        """


# ---- helpers for the built-in solvers ----------------------------------------


def resolve_config(model_config) -> Dict[str, Any]:
    """``model_config`` with the defaults filled in, checked."""
    if model_config is None:
        model_config = {}
    if not isinstance(model_config, dict):
        raise TypeError(f"model_config must be a dict, got {type(model_config).__name__}")
    config = {**DEFAULT_MODEL_CONFIG, **model_config}
    F.check_kappa(config["kappa"])
    return config


def as_state_tensors(X, U, Z, Y) -> Tuple[torch.Tensor, ...]:
    """X, U, Z, Y as 2-D tensors with a common number of rows (samples)."""
    tensors = []
    for name, value in zip("XUZY", (X, U, Z, Y)):
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(value).__name__}")
        if value.dim() != 2:
            raise ValueError(f"{name} must be 2-D (n_samples, features), got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {value.dtype}")
        tensors.append(value)
    X, U, Z, Y = tensors
    m = X.shape[0]
    for name, value in zip("UZY", (U, Z, Y)):
        if value.shape[0] != m:
            raise ValueError(f"{name} has {value.shape[0]} samples (rows) but X has {m}")
    if Z.shape[1] != X.shape[1]:
        raise ValueError(f"Z has {Z.shape[1]} features but X has {X.shape[1]}: both are hidden states")
    if m == 0:
        raise ValueError("the states hold no sample")
    return X, U, Z, Y


def into_ball(A: torch.Tensor, kappa: float, dtype: torch.dtype) -> torch.Tensor:
    """A in ``dtype`` with ||A||_inf <= kappa exactly (row sums of the stored
    values, in float64). Rows outside get the exact projection onto the l1 ball;
    the radius is lowered by a few ulps when rounding to ``dtype`` would push a
    projected row back over kappa."""
    out = A.to(dtype)
    eps = torch.finfo(dtype).eps
    for attempt in range(8):
        if inf_norm(out) <= kappa:
            return out
        radius = kappa * (1.0 - 4.0 * eps * 4**attempt)
        out = F.project_linf(A.to(torch.float64), radius).to(dtype)
    raise RuntimeError(f"could not bring ||A||_inf below kappa={kappa}")  # unreachable


def zero_small(W: torch.Tensor, tol: float) -> torch.Tensor:
    """W with entries of magnitude <= tol set to exactly 0."""
    return torch.where(W.abs() <= tol, torch.zeros((), dtype=W.dtype, device=W.device), W)


@torch.no_grad()
def regenerate_states(A: torch.Tensor, B: torch.Tensor, U: torch.Tensor, config) -> torch.Tensor:
    """The equilibrium X = φ(X Aᵀ + U Bᵀ) of the fitted A, B on inputs U."""
    n, p = A.shape[0], B.shape[1]
    model = implicit_model_from_weights(
        A, B, A.new_zeros(1, n), A.new_zeros(1, p), config["activation_fn"],
        config["kappa"], config["atol"], config["max_iter"],
    )
    return model.implicit_state(U.to(device=A.device, dtype=A.dtype))


@dataclass(frozen=True)
class Stage:
    """One of the two fits. ``hidden``: [A B] from Z (with the ball on the
    first ``ball_cols`` columns) or, if False, [C D] from Y."""

    hidden: bool
    ball_cols: int
    radius: float

    @property
    def name(self) -> str:
        return "A, B" if self.hidden else "C, D"


def check_nonnegative(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (value >= 0 and np.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


class StagedSolver(BaseSolver):
    """A solver that fits [A B], then (on regenerated states if
    ``regen_states``) [C D], each by :meth:`fit`, and zeroes entries of
    magnitude <= ``tol``. With ``well_pose``, ||A||_inf <= kappa holds exactly
    in the returned dtype."""

    regen_states: bool = False
    tol: float = 1e-6
    well_pose: bool = True

    @abstractmethod
    def fit(self, features: torch.Tensor, targets: torch.Tensor, stage: Stage, config) -> torch.Tensor:
        """The rows W (targets' columns x features' columns) with
        targets ≈ features Wᵀ, under the stage's constraint."""

    def solve(self, X, U, Z, Y, model_config):
        X, U, Z, Y = as_state_tensors(X, U, Z, Y)
        config = resolve_config(model_config)
        n = X.shape[1]
        kappa = config["kappa"]
        hidden = Stage(True, n, kappa if self.well_pose else float("inf"))
        logger.info("solving for A, B (%d rows of %d weights)", n, n + U.shape[1])
        AB = self.fit(torch.cat([X, U], dim=1), Z, hidden, config)
        A, B = self._finish_hidden(AB[:, :n], AB[:, n:], config)
        if self.regen_states:
            logger.info("regenerating the states X with the fitted A, B")
            X = regenerate_states(A, B, U.to(A.device), config).to(device=X.device, dtype=X.dtype)
        logger.info("solving for C, D (%d rows of %d weights)", Y.shape[1], n + U.shape[1])
        CD = self.fit(torch.cat([X, U], dim=1), Y, Stage(False, 0, float("inf")), config)
        C, D = (zero_small(W, self.tol).to(config["dtype"]) for W in (CD[:, :n], CD[:, n:]))
        return A, B, C, D

    def _finish_hidden(self, A, B, config):
        dtype, kappa = config["dtype"], config["kappa"]
        A, B = zero_small(A, self.tol), zero_small(B, self.tol).to(dtype)
        A = into_ball(A, kappa, dtype) if self.well_pose else A.to(dtype)
        logger.info("||A||_inf = %.6g (kappa = %g)", inf_norm(A), kappa)
        return A, B
