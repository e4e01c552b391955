"""Differentiable primitives: the projection onto the inf-norm ball and the
fixed-point solve, for built-in activations (compiled) and for activations a
user writes in Python (same algorithm, driven from Python)."""
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.autograd.function import once_differentiable

from ._ops import ops, report_solve

ACTIVATIONS = ("relu", "leaky_relu", "tanh", "hardtanh", "sigmoid", "softplus", "identity")
PROJECTIONS = ("exact", "scale")
NONCONVERGENCE_POLICIES = ("warn", "raise")


def project_linf(A: torch.Tensor, kappa: float, mode: str = "exact") -> torch.Tensor:
    """Projection of ``A`` onto ``{A : ||A||_inf <= kappa}``, differentiable.

    ``mode="exact"`` (default) is the Euclidean projection: every row is
    projected onto the l1 ball of radius kappa, rows already inside unchanged.
    ``mode="scale"`` is the upstream torchidl rule, ``A * kappa / ||A||_inf``
    when ``||A||_inf > kappa``.
    """
    check_kappa(kappa)
    if mode not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {mode!r}")
    return ops.project_linf(A, float(kappa), mode)


def check_kappa(kappa):
    if isinstance(kappa, bool) or not isinstance(kappa, (int, float)):
        raise TypeError(f"kappa must be a float in (0, 1], got {type(kappa).__name__}")
    if not 0.0 < kappa <= 1.0:
        raise ValueError(f"kappa must be in (0, 1], got {kappa}")


@dataclass(frozen=True)
class SolverOptions:
    """How the forward and backward fixed-point solves stop, and what happens
    when they do not converge (``"warn"``: ImplicitFunctionWarning, or
    ``"raise"``: SolveNotConverged)."""

    max_iter: int = 300
    tol: float = 3e-6
    grad_max_iter: int = 300
    grad_tol: float = 3e-6
    on_nonconvergence: str = "warn"

    def __post_init__(self):
        for name in ("max_iter", "grad_max_iter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if not 1 <= value < 2**63:  # the compiled solve counts in int64
                raise ValueError(f"{name} must be in [1, 2**63), got {value}")
        for name in ("tol", "grad_tol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a float, got {type(value).__name__}")
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.on_nonconvergence not in NONCONVERGENCE_POLICIES:
            raise ValueError(
                f"on_nonconvergence must be one of {NONCONVERGENCE_POLICIES}, "
                f"got {self.on_nonconvergence!r}"
            )


def fixed_point(
    A: torch.Tensor,
    C0: torch.Tensor,
    X0: Optional[torch.Tensor],
    activation: str,
    slope: float,
    options: SolverOptions,
    sink=None,
) -> torch.Tensor:
    """X solving X = φ(X Aᵀ + C0) for a built-in activation, in compiled code.

    Differentiable in A and C0 by implicit differentiation. ``sink(what,
    record)`` receives the stats of the forward and, later, backward solve.
    """
    X, _Z, stats = ops.fixed_point(
        A, C0, X0, activation, float(slope),
        options.max_iter, float(options.tol), options.grad_max_iter, float(options.grad_tol),
    )
    report_solve(stats, "forward", options.on_nonconvergence, sink)
    return X


# ---- the Python-driven path, for user-defined phi/dphi ----------------------


def iterate_rows(start, matmul, step, max_iter, tol):
    """The loop of the compiled solver (csrc/cpu/fixed_point.inc), in torch:
    x <- step(x M, rows) per sample, a sample leaving the working set once its
    residual ||Δx||_inf is <= tol. Returns (X, stats tensor)."""
    out = start.clone()
    work, rows = start, torch.arange(start.shape[0], device=start.device)
    iterations, finished_worst, active_worst = 0, 0.0, 0.0
    while rows.numel() > 0 and iterations < max_iter:
        new = step(matmul(work), rows)
        iterations += 1
        residual = (new - work).abs().amax(dim=1) if new.shape[1] else new.new_zeros(len(rows))
        if not torch.isfinite(residual).all():
            out[rows] = new
            active_worst = float("nan") if torch.isnan(residual).any() else float("inf")
            break
        done = residual <= tol
        out[rows[done]] = new[done]
        if done.any():
            finished_worst = max(finished_worst, residual[done].max().item())
        active_worst = residual[~done].max().item() if (~done).any() else 0.0
        work, rows = new[~done], rows[~done]
    else:
        out[rows] = work
    converged = rows.numel() == 0
    worst = active_worst if not math.isfinite(active_worst) else max(finished_worst, active_worst)
    stats = torch.tensor([iterations, worst, float(converged)], dtype=torch.float64)
    return out, stats


class _CustomActivationSolve(torch.autograd.Function):
    """Fixed point and implicit backward for a Python φ, φ'."""

    @staticmethod
    def forward(ctx, A, C0, X0, phi, dphi, options, sink):
        Z = torch.empty_like(C0)

        def step(P, rows):
            Z[rows] = P + C0[rows]
            return phi(Z[rows])

        X, stats = iterate_rows(X0, lambda W: W @ A.t(), step, options.max_iter, options.tol)
        report_solve(stats, "forward", options.on_nonconvergence, sink)
        ctx.save_for_backward(A, X, Z)
        ctx.dphi, ctx.options, ctx.sink = dphi, options, sink
        return X

    @staticmethod
    @once_differentiable  # its second derivative would miss the implicit part
    def backward(ctx, grad_X):
        A, X, Z = ctx.saved_tensors
        D = ctx.dphi(Z)
        V, stats = iterate_rows(
            torch.zeros_like(grad_X), lambda W: W @ A,
            lambda P, rows: D[rows] * (P + grad_X[rows]),
            ctx.options.grad_max_iter, ctx.options.grad_tol,
        )
        report_solve(stats, "backward", ctx.options.on_nonconvergence, ctx.sink)
        return V.t() @ X, V, None, None, None, None, None


def fixed_point_custom(
    A: torch.Tensor,
    C0: torch.Tensor,
    X0: Optional[torch.Tensor],
    phi: Callable,
    dphi: Callable,
    options: SolverOptions,
    sink=None,
) -> torch.Tensor:
    """As :func:`fixed_point`, for an activation given as Python callables."""
    if X0 is None:
        X0 = torch.zeros_like(C0)
    return _CustomActivationSolve.apply(A, C0, X0.detach(), phi, dphi, options, sink)
