"""A warm start for the rows of [A B] whose l1 ball is active.

Why those rows stall: row i of [A B] minimizes ½‖z_i − X a − U b‖² (+ a tiny
l1 term) with ‖a‖₁ <= kappa. When the teacher's own weights violate the ball,
the constraint is active, the fit is not exact, and the optimum balances the
ball against the data through every direction of the Gram matrix of [X U],
whose condition number on image inputs is huge (near-constant pixels, hidden
units that are functions of the pixels). ADMM on the full d = n + p
variables then moves along the badly conditioned directions at a rate set by
ρ: on Fashion-MNIST (d = 896) 2000 iterations left the objective 10x above
its optimum and |Uᵀr| in the hundreds where the optimum has it <= λ.

The free part b has no constraint, so it can be eliminated exactly:
b(a) = G_UU⁺ (h_U − G_UA a) (least squares for a given a), which leaves a
problem in a alone,

    min_a ½ aᵀ S a − sᵀ a + λ‖a‖₁   s.t. ‖a‖₁ <= kappa,
    S = G_AA − G_AU G_UU⁺ G_UA,  s = h_A − G_AU G_UU⁺ h_U,

of size n (112 there) instead of n + p: each ADMM iteration costs n² instead
of (n + p)² per row, so it can run to tight tolerance in a fraction of the
time. [a, b(a)] is then the starting point (with its consistent dual) of the
full problem's ADMM, which only has to add the l1 term on b. A start that
the duality gap already certifies is kept as it is.

The [C D] rows have no ball, but the same badly conditioned Gram matrix: when
the states do not fit Y exactly (regenerated states), ADMM from 0 needs
thousands of iterations to bring |[X U]ᵀr| down to λ. The least-squares
solution (k = 0 above) is certified at once in the usual case, λ‖w‖₁ being
far below rtol·‖t‖².
"""
import torch

from .rows import RowProblem, symmetric_eigh


def _pseudo_inverse(G: torch.Tensor) -> torch.Tensor:
    """G⁺ of a symmetric positive semi-definite G, eigenvalues below
    eps·d·max treated as 0."""
    if G.numel() == 0:
        return G.clone()
    values, vectors = symmetric_eigh(G)
    cutoff = values.max().clamp_min(0) * G.shape[0] * torch.finfo(G.dtype).eps
    inverse = torch.where(values > cutoff, 1.0 / values.clamp_min(torch.finfo(G.dtype).tiny),
                          torch.zeros_like(values))
    return (vectors * inverse) @ vectors.t()


def split_free_columns(problem: RowProblem, k: int):
    """(reduced, lift): the RowProblem in the first ``k`` (ball) columns
    alone, the other columns eliminated by (ridge) least squares, and
    lift(a) -> [a, b(a)] rows of the full problem. With k = 0 (no ball: the
    [C D] fit), lift of an empty a is the least-squares solution."""
    G, H = problem.gram, problem.cross
    G_aa, G_au, G_uu = G[:k, :k], G[:k, k:], G[k:, k:]
    if problem.ridge:  # ½ ridge ‖b‖² stays with b
        G_uu = G_uu + problem.ridge * torch.eye(G_uu.shape[0], dtype=G.dtype, device=G.device)
    pinv = _pseudo_inverse(G_uu)
    coupling = G_au @ pinv                      # G_AU G_UU⁺, (k, p)
    S = G_aa - coupling @ G_au.t()
    S = 0.5 * (S + S.t())
    H_a, H_u = H[:, :k], H[:, k:]
    s = H_a - H_u @ coupling.t()
    explained = (H_u @ pinv * H_u).sum(dim=1)   # h_Uᵀ G_UU⁺ h_U: what b alone fits
    reduced = RowProblem(S, s, (problem.target_sq - explained).clamp_min(0), problem.l1,
                         problem.ridge, k, problem.radius)

    def lift(A: torch.Tensor) -> torch.Tensor:
        B = (H_u - A @ G_au) @ pinv
        return torch.cat([A, B], dim=1)

    return reduced, lift
