"""The batched row problem behind SIM's fast solvers.

For targets T (m, r) and features F (m, d), row i of W (r, d) solves

    min_w  ½‖t_i − F w‖² + l1·‖w‖₁ + ½·ridge·‖w‖²   s.t. ‖w[:ball_cols]‖₁ <= radius

(regularized), or, for exact matching,

    min_w  l1·‖w‖₁ + ½·ridge·‖w‖²   s.t. w minimizes ‖t_i − F w‖, ‖w[:ball_cols]‖₁ <= radius

(the least-squares solution set is {F w = t_i} whenever that system has a
solution). Everything the iterations need is in the Gram matrix G = FᵀF (d, d)
and the cross products H = TᵀF (r, d), computed once: the gradient of the
smooth part for all rows at once is W G − H + ridge·W, one GEMM.
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Optional

import torch

from .._prox_ops import prox_l1_ball


@contextmanager
def serial_lapack():
    """torch's intra-op threads set to 1 for the block (restored after).
    For the eigen-decompositions of the Gram matrices: MKL's threaded syevd
    on a machine whose cores are busy with other work took 15-35 s on an
    896 x 896 matrix with 2 threads, against 1.9 s with 1."""
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


def symmetric_eigh(G: torch.Tensor):
    """torch.linalg.eigh(G), serial on the CPU (see serial_lapack)."""
    if G.device.type != "cpu":
        return torch.linalg.eigh(G)
    with serial_lapack():
        return torch.linalg.eigh(G)


@dataclass(frozen=True)
class RowProblem:
    gram: torch.Tensor       # G = FᵀF, (d, d)
    cross: torch.Tensor      # H = TᵀF, (r, d)
    target_sq: torch.Tensor  # ‖t_i‖², (r,)
    l1: float
    ridge: float
    ball_cols: int
    radius: float            # math.inf: no ball

    @classmethod
    def from_data(cls, features, targets, l1, ridge, ball_cols, radius, dtype=torch.float64):
        F = features.to(dtype)
        T = targets.to(dtype)
        return cls(F.t() @ F, T.t() @ F, (T * T).sum(dim=0), float(l1), float(ridge),
                   int(ball_cols), float(radius))

    @property
    def num_rows(self) -> int:
        return self.cross.shape[0]

    def rows(self, index) -> "RowProblem":
        """The same problem restricted to rows ``index`` (a slice or indices)."""
        return replace(self, cross=self.cross[index], target_sq=self.target_sq[index])

    def smooth_gradient(self, W: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
        """W G − H + ridge·W for rows W whose slice of H is ``cross``."""
        grad = W @ self.gram - cross
        return grad.add_(W, alpha=self.ridge) if self.ridge else grad

    def duality_gap(self, W, WG, cross, target_sq):
        """The duality gap per row of the regularized problem at W, given
        WG = W G and the rows' slices of ``cross`` and ``target_sq``: a bound
        on how far the row's objective is from its optimum.

        The dual (Fenchel, θ = −s·r for the residual r = t − F w) is
        D(s) = −½s²‖r‖² + s rᵀt − g*(s Fᵀr), with g = l1‖·‖₁ + ½ridge‖·‖² +
        ball; s in [0, s_max] keeps g* finite when ridge = 0 (‖s Fᵀr‖∞ <= l1
        off the ball columns), and the best of a few candidate s is used (any
        feasible s gives a valid bound). Residual norms come from the Gram
        matrix, so the gap also gets a rounding floor.
        """
        wq = (W * WG).sum(dim=1)
        wh = (W * cross).sum(dim=1)
        residual_sq = (wq - 2 * wh + target_sq).clamp_min(0)
        residual_dot_target = target_sq - wh
        correlation = cross - WG  # Fᵀ r
        primal = 0.5 * residual_sq + self.l1 * W.abs().sum(dim=1)
        if self.ridge:
            primal = primal + 0.5 * self.ridge * (W * W).sum(dim=1)
            dual = 0.5 * (-residual_sq) + residual_dot_target - self._ridge_conjugate(correlation)
        else:
            dual = self._best_scaled_dual(residual_sq, residual_dot_target, correlation)
        floor = 16 * torch.finfo(W.dtype).eps * (wq.abs() + 2 * wh.abs() + target_sq)
        return (primal - dual - floor).clamp_min(0)

    def _ball_cols(self) -> int:
        return self.ball_cols if math.isfinite(self.radius) else 0

    def _ridge_conjugate(self, V):
        """g*(v) row by row for ridge > 0: <v, w*> − g(w*) at the maximiser
        w* = prox of g/ridge at v/ridge."""
        w = prox_l1_ball(V / self.ridge, self.l1 / self.ridge, self.radius, self._ball_cols())
        return (V * w).sum(dim=1) - self.l1 * w.abs().sum(dim=1) - 0.5 * self.ridge * (w * w).sum(dim=1)

    def _best_scaled_dual(self, residual_sq, residual_dot_target, correlation):
        k = self._ball_cols()
        inf = torch.full_like(residual_sq, math.inf)
        free = correlation[:, k:]
        free_max = free.abs().amax(dim=1) if free.shape[1] else torch.zeros_like(residual_sq)
        ball_max = correlation[:, :k].abs().amax(dim=1) if k else torch.zeros_like(residual_sq)
        s_max = torch.where(free_max > 0, self.l1 / free_max.clamp_min(torch.finfo(free_max.dtype).tiny), inf)
        curvature = residual_sq.clamp_min(torch.finfo(residual_sq.dtype).tiny)
        candidates = (
            torch.ones_like(residual_sq),
            residual_dot_target / curvature,
            (residual_dot_target - self.radius * ball_max) / curvature if k else inf,
        )
        best = torch.full_like(residual_sq, -math.inf)
        for s in candidates:
            s = torch.minimum(s.clamp_min(0), s_max)
            s = torch.where(torch.isfinite(s), s, 0.0)
            ball_term = self.radius * (s * ball_max - self.l1).clamp_min(0) if k else 0.0
            value = -0.5 * s * s * residual_sq + s * residual_dot_target - ball_term
            best = torch.maximum(best, value)
        return best


def certifiable(problem: RowProblem) -> bool:
    """Whether the duality gap can certify the rows: with neither l1 nor ridge,
    the dual needs Fᵀr = 0 exactly off the ball columns, so the gap stays at
    the objective and solvers stop on first-order residuals instead."""
    return problem.l1 > 0 or problem.ridge > 0


@dataclass
class RowSolve:
    """The outcome of a batched row solve: the rows W, the iterations run, and
    how many rows stopped at the iteration limit before meeting the tolerance."""

    W: torch.Tensor
    iterations: int
    unconverged: int
    pending: Optional[torch.Tensor] = None  # indices of the unconverged rows


class ActiveRows:
    """The rows still iterating, and their per-row state: once a row
    converges its final value goes to the result and it leaves the batch, so
    the GEMMs shrink as rows finish."""

    def __init__(self, result: torch.Tensor, **state: torch.Tensor):
        self.result = result
        self.index = torch.arange(result.shape[0], device=result.device)
        self.state = state

    def __len__(self):
        return self.index.numel()

    def __getattr__(self, name):
        try:
            return self.__dict__["state"][name]
        except KeyError:
            raise AttributeError(name) from None

    def update(self, **state: torch.Tensor):
        self.state.update(state)

    def retire(self, done: torch.Tensor, final: torch.Tensor):
        """Rows where ``done`` (over the active rows) end with value ``final``."""
        if not done.any():
            return
        self.result[self.index[done]] = final[done]
        keep = ~done
        self.index = self.index[keep]
        self.state = {name: value[keep] for name, value in self.state.items()}

    def finish(self, final: torch.Tensor) -> torch.Tensor:
        """The result, with the rows still active set to ``final``."""
        self.result[self.index] = final
        return self.result
