"""FISTA on every row of a RowProblem at once.

Each iteration is one GEMM (the gradient W G − H for all rows) and one call of
the compiled prox (soft-threshold, then projection of the A part onto the l1
ball). Step 1/L with L the largest eigenvalue of G (+ ridge). Momentum restarts
per row when it points uphill (O'Donoghue & Candès 2015, gradient scheme),
which recovers linear convergence on strongly convex rows. A row stops, and
leaves the batch, once its duality gap is <= rtol·‖t_i‖² (with l1 or
ridge > 0), else once its gradient mapping L·‖prox(y − ∇f(y)/L) − y‖ is
<= rtol·‖h_i‖ (‖h_i‖ = ‖∇f(0)‖ of that row).

FISTA needs about sqrt(L/μ) iterations per digit of accuracy; SIM's Gram
matrices are often singular or nearly so (dead units, correlated layers), where
ADMM (row_admm.py) converges much faster.
"""
import torch

from .._progress import progress_bar
from .._prox_ops import prox_l1_ball
from .rows import ActiveRows, RowProblem, RowSolve, certifiable, serial_lapack

# Every this many iterations the rows are checked for convergence.
CHECK_EVERY = 10


def lipschitz_constant(problem: RowProblem) -> float:
    """L of the smooth part: the largest eigenvalue of G, plus the ridge."""
    if not problem.gram.numel():
        return problem.ridge
    with serial_lapack():
        top = torch.linalg.eigvalsh(problem.gram)[-1].item()
    return max(top, 0.0) + problem.ridge


@torch.no_grad()
def fista(problem: RowProblem, rtol: float, max_iter: int, progress=None, desc="FISTA") -> RowSolve:
    rows, cols = problem.cross.shape
    W = problem.cross.new_zeros(rows, cols)
    L = lipschitz_constant(problem)
    if rows == 0 or L == 0.0:  # no data: the prox of 0 is 0
        return RowSolve(W, 0, 0)
    step = 1.0 / L
    threshold = problem.l1 * step
    use_gap = certifiable(problem)
    active = ActiveRows(
        W, current=W.clone(), extrapolated=W.clone(), cross=problem.cross,
        target_sq=problem.target_sq, tolerance=rtol * problem.cross.norm(dim=1),
        momentum=torch.ones(rows, dtype=W.dtype, device=W.device),
    )
    iteration = 0
    with progress_bar(total=max_iter, desc=desc, progress=progress) as bar:
        while iteration < max_iter and len(active):
            iteration += 1
            y, previous = active.extrapolated, active.current
            new = prox_l1_ball(y - step * problem.smooth_gradient(y, active.cross), threshold,
                               problem.radius, problem.ball_cols)
            move = new - y
            uphill = (move * (new - previous)).sum(dim=1) < 0
            momentum = active.momentum
            grown = (1 + torch.sqrt(1 + 4 * momentum * momentum)) / 2
            beta = torch.where(uphill, 0.0, (momentum - 1) / grown)
            active.update(
                extrapolated=new + beta.unsqueeze(1) * (new - previous),
                current=new, momentum=torch.where(uphill, 1.0, grown),
            )
            if iteration % CHECK_EVERY and iteration < max_iter:
                continue
            if use_gap:
                gap = problem.duality_gap(new, new @ problem.gram, active.cross,
                                                     active.target_sq)
                done = gap <= rtol * active.target_sq
            else:
                done = move.norm(dim=1).mul_(L) <= active.tolerance
            active.retire(done, new)
            bar.update(CHECK_EVERY)
            bar.set_postfix(rows_left=len(active), refresh=False)
    unconverged = len(active)
    return RowSolve(active.finish(active.current), iteration, unconverged)
