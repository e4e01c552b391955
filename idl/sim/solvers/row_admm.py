"""ADMM on every row of a RowProblem at once (the engine of BatchedProxSolver
and ADMMSolver).

Splitting W = V with the data term on W and the prox term (l1 + l1 ball) on V,
scaled dual Λ:

    W ← argmin f(W) + ρ/2‖W − V + Λ‖²     (one linear solve, all rows)
    V ← prox_{g/ρ}(W + Λ)                 (compiled prox kernel)
    Λ ← Λ + W − V

G = Q diag(e) Qᵀ is diagonalised once, so every W-update is two GEMMs whatever
ρ is: W = ((H + ρ(V − Λ)) Q) / (e + ridge + ρ) Qᵀ for the regularized problem;
for exact matching it is the projection onto the least-squares solution set,
where the eigen-directions of G with e > 0 are fixed by the data and the others
follow V. Each row has its own ρ, rebalanced from its primal and dual
residuals (Boyd et al. 2011, §3.4.1) at ever sparser iterations, so rows are
independent problems: the result does not depend on which rows are solved
together. The returned rows are V, which satisfy the ball constraint exactly.

A row stops when its duality gap (rows.RowProblem.duality_gap) is
<= rtol·‖t_i‖² (regularized problem with l1 or ridge > 0), else when its
primal residual ‖W − V‖ is <= rtol relative to ‖W‖, ‖V‖ and its dual residual
ρ‖ΔV‖ is <= rtol·‖h_i‖.
"""
import math

import torch

from .._progress import progress_bar
from .._prox_ops import prox_l1_ball
from .rows import ActiveRows, RowProblem, RowSolve, certifiable, symmetric_eigh

# Every this many iterations the rows are checked for convergence, and ρ may
# be rebalanced: by RHO_STEP when one residual is RHO_RATIO times the other,
CHECK_EVERY = 10
RHO_RATIO = 10.0
RHO_STEP = 2.0
# ... at iterations spaced by this growing factor.
RHO_SPACING = 1.5


def default_rho(eigenvalues: torch.Tensor) -> float:
    """A starting ρ: the geometric mean of G's eigenvalues above 1e-10 of the
    largest (for a quadratic, ρ near sqrt(e_min·e_max) is the classic best
    choice); the rebalancing moves each row's ρ from there."""
    top = eigenvalues.max().item() if eigenvalues.numel() else 0.0
    if top <= 0:
        return 1.0
    kept = eigenvalues[eigenvalues > 1e-10 * top]
    return math.exp(kept.log().mean().item())


class _LinearStep:
    """The W-update for all active rows, in G's eigenbasis."""

    def __init__(self, problem: RowProblem, exact: bool):
        eigenvalues, self.basis = symmetric_eigh(problem.gram)
        self.eigenvalues = eigenvalues.clamp_min(0)
        self.ridge, self.exact = problem.ridge, exact
        cross = problem.cross @ self.basis
        if exact:
            # Directions in G's null space (up to rounding) are not fixed by the data.
            eps = torch.finfo(eigenvalues.dtype).eps
            cutoff = self.eigenvalues.max() * self.eigenvalues.numel() * eps
            self.fixed = self.eigenvalues > cutoff
            cross = torch.where(self.fixed, cross / torch.where(self.fixed, self.eigenvalues, 1), 0)
        self.cross = cross  # H Q, or for exact matching the data-fixed coordinates

    def least_squares(self, problem: RowProblem) -> torch.Tensor:
        """The (ridge) least-squares rows, minimum-norm: H G⁺ from G's
        eigen-decomposition, eigenvalues below eps·d·max treated as 0."""
        values = self.eigenvalues + self.ridge
        cutoff = self.eigenvalues.max() * self.eigenvalues.numel() * torch.finfo(values.dtype).eps
        inverse = torch.where(values > cutoff, 1.0 / values.clamp_min(torch.finfo(values.dtype).tiny),
                              torch.zeros_like(values))
        return ((problem.cross @ self.basis) * inverse) @ self.basis.t()

    def __call__(self, cross, anchor, rho):
        """W for the active rows (their slice ``cross`` of self.cross), given
        anchor = V − Λ and per-row ρ (a column)."""
        pulled = anchor @ self.basis
        if self.exact:
            solved = torch.where(self.fixed, cross, pulled * (rho / (rho + self.ridge)))
        else:
            solved = (cross + rho * pulled) / (self.eigenvalues + (self.ridge + rho))
        return solved @ self.basis.t()


def _norm(t):
    return t.norm(dim=1)


@torch.no_grad()
def admm(problem: RowProblem, rtol: float, max_iter: int, rho=None, exact: bool = False,
         adaptive_rho: bool = True, progress=None, desc="ADMM", start=None,
         gap_scale=None) -> RowSolve:
    """``start``: candidate rows (regularized problem only), or
    ``"least_squares"`` for the least-squares rows; those whose
    duality gap already meets rtol are returned as they are, the others
    start from 0. ``gap_scale``: per row, what the
    duality gap is compared with (times rtol); default ‖t_i‖²."""
    rows, cols = problem.cross.shape
    V = problem.cross.new_zeros(rows, cols)
    if rows == 0 or cols == 0:
        return RowSolve(V, 0, 0)
    use_gap = certifiable(problem) and not exact
    if isinstance(start, torch.Tensor) and use_gap:
        # Rows given and all optimal already: no decomposition of G needed.
        start = start.to(V.dtype)
        gap = problem.duality_gap(start, start @ problem.gram, problem.cross, problem.target_sq)
        scale = problem.target_sq if gap_scale is None else gap_scale.to(V.dtype)
        if bool((gap <= rtol * scale).all()):
            return RowSolve(start.clone(), 0, 0, start.new_zeros(0, dtype=torch.long))
    linear = _LinearStep(problem, exact)
    rho0 = default_rho(linear.eigenvalues) if rho is None else float(rho)
    tiny = torch.finfo(V.dtype).tiny
    scale_sq = problem.target_sq if gap_scale is None else gap_scale.to(V.dtype)
    V0, dual0 = V.clone(), V.clone()
    if isinstance(start, str):
        if start != "least_squares":
            raise ValueError(f"start must be rows or 'least_squares', got {start!r}")
        start = linear.least_squares(problem)
    if start is not None and not exact:
        V0 = start.to(V.dtype).clone()
    active = ActiveRows(
        V, V=V0, dual=dual0, eig_cross=linear.cross, cross=problem.cross,
        target_sq=problem.target_sq, scale_sq=scale_sq, rho=V.new_full((rows, 1), rho0),
        scale=_norm(problem.cross),
    )
    if start is not None and not exact and use_gap:
        # A start that is already optimal to rtol is kept as it is. The other
        # rows start from 0, as without a start: one ADMM step from a start
        # that is not optimal can move far (the prox amplifies its first-order
        # error by 1/ρ), and ADMM from 0 is the known quantity.
        gap = problem.duality_gap(V0, V0 @ problem.gram, problem.cross, problem.target_sq)
        active.retire(gap <= rtol * scale_sq, V0)
        active.update(V=torch.zeros_like(active.V), dual=torch.zeros_like(active.dual))
    iteration, next_rebalance = 0, CHECK_EVERY
    with progress_bar(total=max_iter, desc=desc, progress=progress) as bar:
        while iteration < max_iter and len(active):
            iteration += 1
            rho, V_old = active.rho, active.V
            W = linear(active.eig_cross, V_old - active.dual, rho)
            V = prox_l1_ball(W + active.dual, (problem.l1 / rho).squeeze(1), problem.radius,
                             problem.ball_cols)
            dual = active.dual + W - V
            active.update(V=V, dual=dual)
            if iteration % CHECK_EVERY and iteration < max_iter:
                continue
            primal_res, dual_res = _norm(W - V), rho.squeeze(1) * _norm(V - V_old)
            if use_gap:
                gap = problem.duality_gap(V, V @ problem.gram, active.cross, active.target_sq)
                done = gap <= rtol * active.scale_sq
            else:
                size = torch.maximum(_norm(W), _norm(V)).clamp_min(tiny)
                done = (primal_res <= rtol * size) & (dual_res <= rtol * active.scale)
            if adaptive_rho and iteration >= next_rebalance:
                # Ever sparser: ADMM converges for a fixed ρ, not a ρ that keeps moving.
                next_rebalance = CHECK_EVERY * math.ceil(RHO_SPACING * iteration / CHECK_EVERY)
                factor = torch.where(primal_res > RHO_RATIO * dual_res, RHO_STEP,
                                     torch.where(dual_res > RHO_RATIO * primal_res, 1 / RHO_STEP, 1.0))
                # The scaled dual Λ = y/ρ is rescaled to keep the dual y.
                active.update(rho=rho * factor.unsqueeze(1), dual=dual / factor.unsqueeze(1))
            active.retire(done, V)
            bar.update(CHECK_EVERY)
            bar.set_postfix(rows_left=len(active), refresh=False)
    unconverged, pending = len(active), active.index.clone()
    return RowSolve(active.finish(active.V), iteration, unconverged, pending)
