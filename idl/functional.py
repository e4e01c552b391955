"""Differentiable primitives: the projection onto the inf-norm ball and the
fixed-point solve, for built-in activations (compiled) and for activations a
user writes in Python (same algorithm, driven from Python)."""
import math
import operator
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.autograd.function import once_differentiable

from ._C import ANDERSON_MAX_MEMORY, ANDERSON_MAX_RESTARTS, ANDERSON_REGULARIZATION
from ._C import AUTO_SWITCH_PATIENCE, AUTO_SWITCH_RATIO
from ._C import SOLVER_METHODS as METHODS
from ._ops import ops
from ._stats import NONCONVERGENCE_POLICIES, is_traced, new_stats

ACTIVATIONS = ("relu", "leaky_relu", "tanh", "hardtanh", "sigmoid", "softplus", "identity")
PROJECTIONS = ("exact", "scale")


def project_linf(A: torch.Tensor, kappa: float, mode: str = "exact") -> torch.Tensor:
    """Projection of ``A`` onto ``{A : ||A||_inf <= kappa}``, differentiable.

    ``mode="exact"`` (default) is the Euclidean projection: every row is
    projected onto the l1 ball of radius kappa, rows already inside unchanged.
    ``mode="scale"`` is the upstream torchidl rule, ``A * kappa / ||A||_inf``
    when ``||A||_inf > kappa``.
    """
    kappa = check_kappa(kappa)
    if mode not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {mode!r}")
    return ops.project_linf(A, kappa, mode)


def as_float(name, value) -> float:
    """``value`` as a float: any real number (numpy's too), not a bool, a
    string or a tensor."""
    if isinstance(value, (bool, str, torch.Tensor)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}") from None


def check_kappa(kappa) -> float:
    """kappa as a float in (0, 1], or a TypeError/ValueError naming it."""
    if isinstance(kappa, (bool, str, torch.Tensor)) or not hasattr(kappa, "__float__"):
        raise TypeError(f"kappa must be a float in (0, 1], got {type(kappa).__name__}")
    kappa = float(kappa)
    if not 0.0 < kappa <= 1.0:
        raise ValueError(f"kappa must be in (0, 1], got {kappa}")
    return kappa


# METHODS, ANDERSON_* and AUTO_SWITCH_* (imported above) are the solver
# registry of csrc/idl.h, which idl._C exposes: the method names, Anderson's
# memory limit, ridge and restarts, and "auto"'s switching rule, defined there
# once for the compiled solver, its argument checks and this module alike.
BACKWARDS = ("implicit", "phantom", "jfb")


@dataclass(frozen=True)
class SolverOptions:
    """How the forward and backward fixed-point solves iterate and stop, and
    what happens when they do not converge.

    Each sample stops once its residual ||g(x) - x||_inf is
    <= tol + rtol * ||g(x)||_inf (grad_tol, grad_rtol for the backward), or
    at max_iter (grad_max_iter) iterations; rtol = 0 (default) is the
    absolute test alone. ``method`` is ``"picard"`` (x <- g(x)),
    ``"anderson"`` (Anderson acceleration over the last ``memory`` iterates
    of each sample, falling back to a Picard step where a step increased that
    sample's residual) or ``"auto"`` (Picard, each sample switching to
    Anderson for good once its residual has shrunk by less than a factor
    AUTO_SWITCH_RATIO per iteration for AUTO_SWITCH_PATIENCE iterations in a
    row); both solves use it. ``on_nonconvergence`` is ``"warn"``
    (ImplicitFunctionWarning) or ``"raise"`` (SolveNotConverged).

    ``backward`` is how gradients are computed:

    - ``"implicit"`` (default): the adjoint solve V = φ'(Z) ⊙ (V A + G) to
      grad_tol/grad_rtol: the exact gradient of the fixed point, up to the
      solves' tolerances (the one torch.autograd.gradcheck applies to).
    - ``"phantom"``: ``phantom_steps`` damped adjoint steps from V = 0,
      V <- (1 - tau) V + tau φ'(Z) ⊙ (V A + G), tau = ``phantom_tau`` (the
      phantom gradient of Geng et al. 2021, as in TorchDEQ): an
      approximation, cheaper than the solve, not the gradient of anything
      the forward computes; with tau = 1 and k steps it is the gradient of
      the last k Picard steps taken from the fixed point.
    - ``"jfb"``: Jacobian-free backprop (Fung et al. 2022), V = φ'(Z) ⊙ G,
      one step and no product with A: a descent direction under conditions
      on A, not the gradient.

    Neither inexact mode passes gradcheck, and grad_max_iter, grad_tol and
    grad_rtol do not apply to them."""

    max_iter: int = 300
    tol: float = 3e-6
    grad_max_iter: int = 300
    grad_tol: float = 3e-6
    on_nonconvergence: str = "warn"
    method: str = "picard"
    memory: int = 5
    rtol: float = 0.0
    grad_rtol: float = 0.0
    backward: str = "implicit"
    phantom_steps: int = 5
    phantom_tau: float = 0.5

    def __post_init__(self):
        for name in ("max_iter", "grad_max_iter", "memory", "phantom_steps"):
            value = getattr(self, name)
            if isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got bool")
            try:
                value = operator.index(value)  # numpy's integers too
            except TypeError:
                raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
            if not 1 <= value < 2**63:  # the compiled solve counts in int64
                raise ValueError(f"{name} must be in [1, 2**63), got {value}")
            object.__setattr__(self, name, value)
        if self.memory > ANDERSON_MAX_MEMORY:
            raise ValueError(f"memory must be <= {ANDERSON_MAX_MEMORY}, got {self.memory}")
        for name in ("tol", "grad_tol", "rtol", "grad_rtol"):
            value = as_float(name, getattr(self, name))
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
            object.__setattr__(self, name, value)
        if self.on_nonconvergence not in NONCONVERGENCE_POLICIES:
            raise ValueError(
                f"on_nonconvergence must be one of {NONCONVERGENCE_POLICIES}, "
                f"got {self.on_nonconvergence!r}"
            )
        if self.method not in METHODS:
            raise ValueError(f"solver must be one of {METHODS}, got {self.method!r}")
        if self.backward not in BACKWARDS:
            raise ValueError(f"backward must be one of {BACKWARDS}, got {self.backward!r}")
        tau = as_float("phantom_tau", self.phantom_tau)
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"phantom_tau must be in (0, 1], got {tau}")
        object.__setattr__(self, "phantom_tau", tau)

    def forward_args(self):
        """The solver arguments of idl::fixed_point after activation/slope."""
        return (self.max_iter, float(self.tol), self.grad_max_iter, float(self.grad_tol),
                self.method, self.memory)

    def layer_args(self):
        """The solver arguments of idl::implicit_layer after activation/slope:
        those of idl::fixed_point, then the relative tolerances, the
        backward mode and what a backward solve that did not converge does."""
        return self.forward_args() + (float(self.rtol), float(self.grad_rtol), self.backward,
                                      self.phantom_steps, float(self.phantom_tau),
                                      self.on_nonconvergence)


# ---- the Python-driven path, for user-defined phi/dphi ----------------------


class _Anderson:
    """Anderson mixing for the working rows of :func:`iterate_rows`, the torch
    twin of csrc/cpu/anderson.inc: per row, the last ``memory`` pairs
    (f = g(x) - x, g(x)) in slots 0..count-1, x <- Σ α_j g_j with α minimising
    ||Σ α_j f_j|| subject to Σ α = 1, a fresh start (one Picard step) where a
    row's residual did not shrink, and plain iteration for a row after more than
    ANDERSON_MAX_RESTARTS of those."""

    def __init__(self, rows, n, memory, like, auto=False):
        self.memory, self.auto = memory, auto
        # auto: slow Picard steps in a row, -1 once a row mixes (csrc/cpu/anderson.inc)
        self.slow = torch.full((rows,), 0 if auto else -1, dtype=torch.long, device=like.device)
        self.F = like.new_zeros(rows, memory, n)
        self.G = like.new_zeros(rows, memory, n)
        self.count = torch.zeros(rows, dtype=torch.long, device=like.device)
        self.next = torch.zeros_like(self.count)
        self.last = torch.full((rows,), math.inf, dtype=torch.float64, device=like.device)
        self.restarts = torch.zeros_like(self.count)

    def keep(self, rows):
        for name in ("F", "G", "count", "next", "last", "restarts", "slow"):
            setattr(self, name, getattr(self, name)[rows])

    def step(self, x, gx, residual):
        """The next iterate of every row; for "auto", rows on Picard steps
        take g(x) and keep their history untouched until they switch."""
        if not self.auto:
            return self._mix(x, gx, residual)
        on = self.slow >= 0
        slow = torch.where(on & (residual > AUTO_SWITCH_RATIO * self.last), self.slow + 1,
                           torch.where(on, 0, self.slow))
        switch = on & (slow >= AUTO_SWITCH_PATIENCE)
        self.slow = torch.where(switch, -1, slow)
        picard = on & ~switch
        self.last = torch.where(picard, residual, self.last)
        self.count[switch], self.next[switch], self.last[switch] = 0, 0, math.inf
        if not picard.any():
            return self._mix(x, gx, residual)
        names = ("F", "G", "count", "next", "last", "restarts")
        saved = {name: getattr(self, name)[picard].clone() for name in names}
        mixed = self._mix(x, gx, residual)
        for name in names:
            getattr(self, name)[picard] = saved[name]
        return torch.where(picard[:, None], gx, mixed)

    def _mix(self, x, gx, residual):
        stalled = residual >= self.last
        self.count[stalled], self.next[stalled] = 0, 0
        self.restarts += stalled
        plain = self.restarts > ANDERSON_MAX_RESTARTS
        self.last = torch.where(plain, self.last, residual)
        at = torch.arange(len(x), device=x.device)
        self.F[at, self.next] = gx - x
        self.G[at, self.next] = gx
        self.next = (self.next + 1) % self.memory
        self.count = torch.clamp(self.count + 1, max=self.memory)
        valid = torch.arange(self.memory, device=x.device)[None, :] < self.count[:, None]
        pair = valid[:, :, None] & valid[:, None, :]
        gram = (self.F.double() @ self.F.double().transpose(1, 2)) * pair
        trace = gram.diagonal(dim1=1, dim2=2).sum(1)
        ridge = ANDERSON_REGULARIZATION * trace / self.count
        eye = torch.eye(self.memory, dtype=torch.float64, device=x.device)
        system = gram + eye * torch.where(valid, ridge[:, None], 1.0)[:, None, :]
        y, info = torch.linalg.solve_ex(system, valid.double())
        alpha = y / y.sum(1, keepdim=True)
        mixed = torch.einsum("rm,rmn->rn", alpha.to(x.dtype), self.G)
        usable = (self.count > 1) & (info == 0) & torch.isfinite(alpha).all(1) & ~plain
        failed = (self.count > 1) & ~usable & ~plain
        self.count[failed], self.next[failed], self.last[failed] = 0, 0, math.inf
        return torch.where(usable[:, None], mixed, gx)


def iterate_rows(start, matmul, step, max_iter, tol, method="picard", memory=5, inputs=(),
                 rtol=0.0):
    """The loop of the compiled solver (csrc/cpu/fixed_point.inc), in torch:
    x <- g(x) = step(x M, rows) per sample (mixed by Anderson, or by "auto"
    once a sample contracts slowly, if asked), a sample leaving the working
    set with answer g(x) once its residual ||g(x) - x||_inf is
    <= tol + rtol ||g(x)||_inf; a sample that never gets there ends at its
    last g(x) too (not at a mixed iterate, which the step did not map).
    NaN or Inf in any of ``inputs`` (the map's matrix and offsets) stops the
    solve before it starts, with NaN for X and residual: a saturating φ could
    otherwise hide them. On the meta device, where there is no value to
    iterate on, X is the shape alone. Returns (X, stats tensor)."""
    if start.is_meta:
        return torch.empty_like(start), torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64)
    for t in inputs:
        if not torch.isfinite(t).all():
            nan = float("nan")
            return torch.full_like(start, nan), torch.tensor([0.0, nan, 0.0], dtype=torch.float64)
    out = start.clone()
    work, rows = start, torch.arange(start.shape[0], device=start.device)
    anderson = (_Anderson(len(rows), start.shape[1], memory, start, auto=method == "auto")
                if method in ("anderson", "auto") else None)
    iterations, finished_worst, active_worst, relative = 0, 0.0, 0.0, False
    mapped = work  # g of the working rows' last iterate
    while rows.numel() > 0 and iterations < max_iter:
        new = step(matmul(work), rows)
        iterations += 1
        residual = (new - work).abs().amax(dim=1) if new.shape[1] else new.new_zeros(len(rows))
        if not torch.isfinite(residual).all():
            mapped = new
            active_worst = float("nan") if torch.isnan(residual).any() else float("inf")
            break
        threshold = tol
        if rtol > 0:
            size = new.abs().amax(dim=1) if new.shape[1] else new.new_zeros(len(rows))
            threshold = tol + rtol * size.double()
        done = residual.double() <= threshold
        relative = relative or bool((done & (residual > tol)).any())
        out[rows[done]] = new[done]
        if done.any():
            finished_worst = max(finished_worst, residual[done].max().item())
        active_worst = residual[~done].max().item() if (~done).any() else 0.0
        mapped = new[~done]
        if anderson is not None:
            new = anderson.step(work, new, residual.double())
            anderson.keep(~done)
        work, rows = new[~done], rows[~done]
    out[rows] = mapped
    converged = rows.numel() == 0
    worst = active_worst if not math.isfinite(active_worst) else max(finished_worst, active_worst)
    code = (2.0 if relative else 1.0) if converged else 0.0  # see idl/_stats.py
    stats = torch.tensor([iterations, worst, code], dtype=torch.float64)
    return out, stats


def phantom_rows(G, matmul, D, steps, tau):
    """The phantom adjoint (csrc/cpu/fixed_point.inc) in torch: ``steps``
    damped steps V <- (1 - tau) V + tau D ⊙ (V M + G) from V = 0. Returns V and
    its stats [steps, max |ΔV| of the last step, 3] (3: a fixed number of
    steps, no test; see idl/_stats.py)."""
    V = tau * D * G
    change = V.abs().amax().item() if V.numel() else 0.0
    for _ in range(steps - 1):
        new = (1 - tau) * V + tau * D * (matmul(V) + G)
        change = (new - V).abs().amax().item() if V.numel() else 0.0
        V = new
    return V, torch.tensor([steps, change, 3.0], dtype=torch.float64)


class _CustomActivationSolve(torch.autograd.Function):
    """Fixed point and implicit backward for a Python φ, φ'."""

    @staticmethod
    def forward(ctx, A, C0, X0, phi, dphi, options, stats):
        Z = torch.empty_like(C0)

        def step(P, rows):
            Z[rows] = P + C0[rows]
            return phi(Z[rows])

        X, stats[0] = iterate_rows(
            X0, lambda W: W @ A.t(), step, options.max_iter, options.tol, options.method, options.memory,
            inputs=(A, C0), rtol=options.rtol,
        )
        ctx.save_for_backward(A, X, Z)
        ctx.dphi, ctx.options, ctx.stats = dphi, options, stats
        return X

    @staticmethod
    @once_differentiable  # its second derivative would miss the implicit part
    def backward(ctx, grad_X):
        A, X, Z = ctx.saved_tensors
        D = ctx.dphi(Z)
        options = ctx.options
        if options.backward == "implicit":
            V, stats = iterate_rows(
                torch.zeros_like(grad_X), lambda W: W @ A,
                lambda P, rows: D[rows] * (P + grad_X[rows]),
                options.grad_max_iter, options.grad_tol, options.method, options.memory,
                rtol=options.grad_rtol,
            )
        else:
            steps, tau = (1, 1.0) if options.backward == "jfb" else (options.phantom_steps,
                                                                     options.phantom_tau)
            V, stats = phantom_rows(grad_X, lambda W: W @ A, D, steps, tau)
        if not is_traced(ctx.stats):
            ctx.stats[1] = stats
        return V.t() @ X, V, None, None, None, None, None


def fixed_point_custom(
    A: torch.Tensor,
    C0: torch.Tensor,
    X0: Optional[torch.Tensor],
    phi: Callable,
    dphi: Callable,
    options: SolverOptions,
):
    """X solving X = φ(X Aᵀ + C0) for φ = ``phi`` given as a Python callable
    (``dphi`` its derivative), by the algorithm of the compiled solve, driven
    from Python, and differentiable in A and C0 by implicit differentiation.
    Returns X and its stats tensor (see idl/_stats.py), whose backward row
    the backward pass fills."""
    if X0 is None:
        X0 = torch.zeros_like(C0)
    stats = new_stats(C0)
    return _CustomActivationSolve.apply(A, C0, X0.detach(), phi, dphi, options, stats), stats
