"""Independent float64 oracles in plain PyTorch: no code shared with idl.

Each follows the textbook method, not idl's: a sort-based projection (Duchi et
al. 2008), a plain Picard loop over the whole batch, and the implicit gradient
from a dense linear solve per sample.
"""
import torch

PHI = {
    "identity": lambda z: z,
    "relu": torch.relu,
    "leaky_relu": lambda z, slope=0.01: torch.nn.functional.leaky_relu(z, slope),
    "tanh": torch.tanh,
    "hardtanh": torch.nn.functional.hardtanh,
    "sigmoid": torch.sigmoid,
    "softplus": torch.nn.functional.softplus,
}


def phi(name, z, slope=0.01):
    return PHI[name](z, slope) if name == "leaky_relu" else PHI[name](z)


def dphi(name, z, slope=0.01):
    """φ'(z) by autograd of the torch activation itself."""
    z = z.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(phi(name, z, slope).sum(), z)
    return grad


def project_rows_l1(A, kappa):
    """Euclidean projection of each row of A onto the l1 ball of radius kappa,
    by sorting |a| (Duchi et al.). Differentiable by autograd."""
    magnitude = A.abs()
    sorted_desc, _ = magnitude.sort(dim=1, descending=True)
    excess = sorted_desc.cumsum(dim=1) - kappa
    ranks = torch.arange(1, A.shape[1] + 1, dtype=A.dtype, device=A.device)
    support = (sorted_desc - excess / ranks) > 0
    rho = support.to(torch.int64).cumsum(dim=1).argmax(dim=1, keepdim=True)  # last True
    theta = excess.gather(1, rho) / (rho + 1).to(A.dtype)
    inside = magnitude.sum(dim=1, keepdim=True) <= kappa
    return torch.where(inside, A, torch.sign(A) * torch.clamp(magnitude - theta, min=0))


def project_scale(A, kappa):
    norm = A.abs().sum(dim=1).max()
    return A * (kappa / norm) if norm > kappa else A


def picard(A, C0, activation, slope=0.01, X0=None, tol=1e-13, max_iter=100_000):
    """Whole-batch Picard iteration to a tight tolerance."""
    X = torch.zeros_like(C0) if X0 is None else X0.clone()
    for _ in range(max_iter):
        new = phi(activation, X @ A.T + C0, slope)
        if (new - X).abs().max() <= tol:
            return new
        X = new
    raise AssertionError("reference Picard did not converge")


def implicit_vjp(A, X, C0, G, activation, slope=0.01):
    """dL/dC0 (= V) and dL/dA for L with dL/dX = G at the fixed point, from
    (I - diag(d) Aᵀ) vᵀ = diag(d) gᵀ solved densely for every sample."""
    d = dphi(activation, X @ A.T + C0, slope)
    n = A.shape[0]
    eye = torch.eye(n, dtype=A.dtype)
    V = torch.stack([
        torch.linalg.solve(eye - d_i[:, None] * A.T, d_i * g_i) for d_i, g_i in zip(d, G)
    ]) if len(G) else torch.zeros_like(G)
    return V, V.T @ X
