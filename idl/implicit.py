"""Implicit functions (how A is kept well-posed, which activation) and
ImplicitModel, the drop-in nn.Module."""
import math
import warnings
from contextlib import contextmanager
from typing import Optional, Type

import torch
from torch import nn

from . import functional as F
from ._ops import backward_reporting, ops, report_solve, stats_record


class ImplicitFunction:
    """The fixed point X = φ(X Aᵀ + U Bᵀ) with A used as it is: no well-posedness
    guarantee. φ is ReLU unless a subclass overrides the static methods ``phi``
    and ``dphi`` (its derivative), which then run on a Python-driven path with
    the same algorithm; built-in activations are picked by name with
    ``ImplicitModel(activation=...)`` and run in compiled code."""

    @staticmethod
    def phi(X: torch.Tensor) -> torch.Tensor:
        return torch.relu(X)

    @staticmethod
    def dphi(X: torch.Tensor) -> torch.Tensor:
        return (X > 0).to(X.dtype)

    @classmethod
    def well_posed(cls, A: torch.Tensor, kappa: float, projection: str) -> torch.Tensor:
        """The matrix the solve uses in place of the parameter A."""
        return A

    @classmethod
    def well_posed_low_rank(cls, L, R, kappa: float, projection: str) -> torch.Tensor:
        """As :meth:`well_posed`, for A = L Rᵀ."""
        return cls.well_posed(L @ R.t(), kappa, projection)

    @classmethod
    def has_custom_activation(cls) -> bool:
        custom_phi = cls.phi is not ImplicitFunction.phi
        custom_dphi = cls.dphi is not ImplicitFunction.dphi
        if custom_phi != custom_dphi:
            raise TypeError(
                f"f={cls.__name__} overrides only one of phi and dphi: override both, "
                "dphi being the derivative of phi"
            )
        return custom_phi


class ImplicitFunctionInf(ImplicitFunction):
    """Keeps the model well-posed: A is projected onto {||A||_inf <= kappa}
    before every solve (``projection="exact"``: Euclidean projection, row by
    row onto the l1 ball; ``"scale"``: the upstream rescaling). Gradients flow
    through the projection to the raw parameter."""

    @classmethod
    def well_posed(cls, A, kappa, projection):
        return F.project_linf(A, kappa, projection)

    @classmethod
    def well_posed_low_rank(cls, L, R, kappa, projection):
        # ||L Rᵀ||_inf <= ||L||_inf ||Rᵀ||_inf <= sqrt(kappa)^2 = kappa
        radius = math.sqrt(kappa)
        L = F.project_linf(L, radius, projection)
        Rt = F.project_linf(R.t(), radius, projection)
        return L @ Rt


class ImplicitFunctionTriu(ImplicitFunction):
    """A restricted to its strict upper triangle: a feedforward network in
    implicit form (nilpotent A, so the solve ends in at most n iterations). The
    parameter itself is never edited; its gradient below the diagonal is 0."""

    @classmethod
    def well_posed(cls, A, kappa, projection):
        return torch.triu(A, diagonal=1)


class SolveStats:
    """What the last solves of a model did. ``forward`` and ``backward`` hold
    ``iterations``, ``residual`` (the largest final per-sample residual) and
    ``converged``; ``backward`` is None until a backward pass has run.

    ``backward_report`` is where a compiled backward (idl::implicit_layer)
    writes its stats [iterations, residual, converged], NaN until it has run."""

    def __init__(self, forward: dict, backward: Optional[dict] = None,
                 backward_report: Optional[torch.Tensor] = None) -> None:
        self.forward = forward
        self._backward = backward
        self._backward_report = backward_report

    @property
    def backward(self) -> Optional[dict]:
        if self._backward is None and self._backward_report is not None:
            values = self._backward_report.tolist()
            if not math.isnan(values[0]):
                self._backward = stats_record(values)
        return self._backward

    def record(self, what: str, record: dict) -> None:
        """Keep the record of the ``"forward"`` or ``"backward"`` solve (the
        ``sink`` that the solves report to)."""
        if what == "forward":
            self.forward = record
        else:
            self._backward = record

    def __repr__(self) -> str:
        return f"SolveStats(forward={self.forward}, backward={self.backward})"

    def __eq__(self, other) -> bool:
        if not isinstance(other, SolveStats):
            return NotImplemented
        return (self.forward, self.backward) == (other.forward, other.backward)


@contextmanager
def reported_solves(module: nn.Module, on_nonconvergence: str):
    """Where the solves of one call of ``module`` report: a fresh SolveStats
    in ``module.last_stats``, whose ``record`` is yielded as the forward
    solve's sink and reached by the backward through ``backward_reporting``
    (the autograd context captures it, so the report reaches the right module
    even when several run at once in different threads).

    A compiled graph can neither set a ContextVar nor call back into a Python
    sink: there its solves go unreported, ``last_stats`` is None and the sink
    yielded is None (docs/hardening.md)."""
    if torch.compiler.is_compiling():
        module.last_stats = None
        yield None
        return
    stats = module.last_stats = SolveStats(forward={})
    token = backward_reporting.set((stats.record, on_nonconvergence))
    try:
        yield stats.record
    finally:
        backward_reporting.reset(token)


def merge_stats(records: list) -> Optional[SolveStats]:
    """One SolveStats summarising several solves: the most iterations any solve
    took, the largest residual, and whether all converged. ``backward`` is None
    until every solve has run its backward pass. None for an empty list."""
    if not records:
        return None

    def merge(dicts):
        return {
            "iterations": max(d["iterations"] for d in dicts),
            "residual": max(d["residual"] for d in dicts),
            "converged": all(d["converged"] for d in dicts),
        }

    backwards = [r.backward for r in records]
    backward = None if any(b is None for b in backwards) else merge(backwards)
    return SolveStats(forward=merge([r.forward for r in records]), backward=backward)


def _check_positive_int(name, value, allow_zero=False):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '>= 1'}, got {value}")


def check_well_posedness(kappa, projection, is_low_rank, rank, max_rank, max_rank_text):
    """Checks the settings that keep A well-posed (shared by every implicit
    layer): kappa in (0, 1], a known projection, and with is_low_rank a rank
    in [1, max_rank] (``max_rank_text`` says in the message what bounds it).
    A rank without is_low_rank is ignored, as torchidl does, with a warning."""
    F.check_kappa(kappa)
    if projection not in F.PROJECTIONS:
        raise ValueError(f"projection must be one of {F.PROJECTIONS}, got {projection!r}")
    if rank is not None and not is_low_rank:
        warnings.warn(f"rank={rank} is ignored: A is full rank unless is_low_rank=True",
                      UserWarning, stacklevel=3)
    if is_low_rank:
        if rank is None:
            raise ValueError("rank is required when is_low_rank=True")
        _check_positive_int("rank", rank)
        if rank > max_rank:
            raise ValueError(f"rank must be <= {max_rank_text}, got {rank}")


def _check_finite_float(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


class ImplicitModel(nn.Module):
    r"""An implicit layer: Ŷ = X Cᵀ + U Dᵀ with X = φ(X Aᵀ + U Bᵀ).

    Batch-first: U is (batch, input_dim) (more dims are flattened from dim 1),
    X is (batch, hidden_dim), the output (batch, output_dim). The forward solve
    runs until every sample's residual ||X_{k+1} - X_k||_inf is <= tol; the
    backward is implicit differentiation, its own solve with grad_mitr and
    grad_tol. Parameters are initialised as in torchidl (randn / hidden_dim).

    Args:
        input_dim, output_dim, hidden_dim: p, q and n.
        f: how A is kept well-posed, and optionally a Python activation:
            ImplicitFunctionInf (default; projection onto the inf-norm ball),
            ImplicitFunction (A as is), ImplicitFunctionTriu (strictly upper
            triangular A), or a subclass overriding ``phi``/``dphi``.
        no_D: drop the U Dᵀ term.
        bias: add learnt biases to the hidden pre-activation and the output.
        mitr, grad_mitr: iteration limits of the forward and backward solves.
        tol, grad_tol: absolute tolerances of the per-sample inf-norm residual.
        kappa: radius of the inf-norm ball, in (0, 1].
        is_low_rank, rank: A = L Rᵀ with L, R of shape (hidden_dim, rank).
        activation: built-in φ by name: one of ``idl.ACTIVATIONS``.
        negative_slope: slope of ``"leaky_relu"`` for negative inputs, in [-1, 1].
        projection: ``"exact"`` (Euclidean, default) or ``"scale"`` (torchidl's).
        on_nonconvergence: ``"warn"`` (ImplicitFunctionWarning) or ``"raise"``
            (SolveNotConverged) when a solve stops before reaching its tolerance.
        solver: ``"picard"`` (X <- φ(X Aᵀ + U Bᵀ)) or ``"anderson"`` (Anderson
            acceleration, same fixed point in fewer iterations when ||A||_inf is
            close to 1); used by the forward and the backward solve.
        anderson_memory: how many past iterates Anderson mixes, 1 to 16.

    After a call, ``last_stats`` tells what the solves did (see SolveStats).
    Under ``torch.autocast`` the products around the solve follow autocast,
    and the solve itself runs in the parameters' dtype.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        hidden_dim: int,
        f: Type[ImplicitFunction] = ImplicitFunctionInf,
        no_D: bool = False,
        bias: bool = False,
        mitr: int = 300,
        grad_mitr: int = 300,
        tol: float = 3e-6,
        grad_tol: float = 3e-6,
        kappa: float = 0.99,
        is_low_rank: bool = False,
        rank: Optional[int] = None,
        activation: str = "relu",
        negative_slope: float = 0.01,
        projection: str = "exact",
        on_nonconvergence: str = "warn",
        solver: str = "picard",
        anderson_memory: int = 5,
    ) -> None:
        super().__init__()
        _check_positive_int("input_dim", input_dim)
        _check_positive_int("output_dim", output_dim)
        _check_positive_int("hidden_dim", hidden_dim)
        if not (isinstance(f, type) and issubclass(f, ImplicitFunction)):
            raise TypeError(f"f must be a subclass of idl.ImplicitFunction, got {f!r}")
        self.custom_activation = f.has_custom_activation()
        if activation not in F.ACTIVATIONS:
            raise ValueError(f"activation must be one of {F.ACTIVATIONS}, got {activation!r}")
        if self.custom_activation and activation != "relu":
            raise ValueError(
                f"activation={activation!r} conflicts with f={f.__name__}, which defines its own phi"
            )
        check_well_posedness(kappa, projection, is_low_rank, rank, hidden_dim, f"hidden_dim={hidden_dim}")
        _check_finite_float("negative_slope", negative_slope)
        if activation == "leaky_relu" and abs(negative_slope) > 1:
            # ||A||_inf < 1 makes the fixed point unique only for a 1-Lipschitz φ
            raise ValueError(
                f"negative_slope must be in [-1, 1] (leaky_relu must be 1-Lipschitz for the "
                f"model to be well-posed), got {negative_slope}"
            )
        _check_positive_int("mitr", mitr)  # named as the user wrote them; SolverOptions
        _check_positive_int("grad_mitr", grad_mitr)  # checks the rest
        self.options = F.SolverOptions(
            mitr, tol, grad_mitr, grad_tol, on_nonconvergence, method=solver, memory=anderson_memory
        )

        self.input_dim, self.output_dim, self.hidden_dim = input_dim, output_dim, hidden_dim
        self.f = f
        self.no_D, self.bias, self.is_low_rank, self.rank = no_D, bias, is_low_rank, rank
        self.kappa, self.projection = float(kappa), projection
        self.activation, self.negative_slope = activation, float(negative_slope)

        scale = 1.0 / hidden_dim
        if is_low_rank:
            self.L = nn.Parameter(torch.randn(hidden_dim, rank) * scale)
            self.R = nn.Parameter(torch.randn(hidden_dim, rank) * scale)
        else:
            self.A = nn.Parameter(torch.randn(hidden_dim, hidden_dim) * scale)
        self.B = nn.Parameter(torch.randn(hidden_dim, input_dim) * scale)
        self.C = nn.Parameter(torch.randn(output_dim, hidden_dim) * scale)
        if no_D:
            self.register_buffer("D", torch.zeros(output_dim, input_dim), persistent=False)
        else:
            self.D = nn.Parameter(torch.randn(output_dim, input_dim) * scale)
        if bias:
            self.bias_hidden = nn.Parameter(torch.randn(hidden_dim) * scale)
            self.bias_out = nn.Parameter(torch.randn(output_dim) * scale)
        self.last_stats: Optional[SolveStats] = None

    # -- pieces ------------------------------------------------------------

    # torchidl spelled the iteration settings this way; they live in options.
    mitr = property(lambda self: self.options.max_iter)
    grad_mitr = property(lambda self: self.options.grad_max_iter)
    tol = property(lambda self: self.options.tol)
    grad_tol = property(lambda self: self.options.grad_tol)

    def effective_A(self) -> torch.Tensor:
        """The well-posed A that the solves use (differentiable)."""
        if self.is_low_rank:
            return self.f.well_posed_low_rank(self.L, self.R, self.kappa, self.projection)
        return self.f.well_posed(self.A, self.kappa, self.projection)

    def _check_input(self, U: torch.Tensor, X0: Optional[torch.Tensor]) -> torch.Tensor:
        if not isinstance(U, torch.Tensor):
            raise TypeError(f"U must be a torch.Tensor, got {type(U).__name__}")
        if U.dim() < 2:
            raise ValueError(
                f"U must have shape (batch, input_dim={self.input_dim}), got shape {tuple(U.shape)}"
            )
        U = U.flatten(1) if U.dim() > 2 else U
        if U.shape[1] != self.input_dim:
            raise ValueError(
                f"U has {U.shape[1]} features per sample (after flattening), "
                f"expected input_dim={self.input_dim}"
            )
        _check_like(U, self.B, "U")
        if X0 is not None:
            if not isinstance(X0, torch.Tensor):
                raise TypeError(f"X0 must be a torch.Tensor or None, got {type(X0).__name__}")
            expected = (U.shape[0], self.hidden_dim)
            if tuple(X0.shape) != expected:
                raise ValueError(f"X0 must have shape {expected}, got {tuple(X0.shape)}")
            _check_like(X0, self.B, "X0")
        return U

    def implicit_state(self, U: torch.Tensor, X0: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The equilibrium X (batch, hidden_dim) for input U (differentiable)."""
        return self._state(self._check_input(U, X0), X0)

    def _state(self, U: torch.Tensor, X0: Optional[torch.Tensor]) -> torch.Tensor:
        C0 = U @ self.B.t()
        if self.bias:
            C0 = C0 + self.bias_hidden
        if not _autocasting(U):
            return self._solve(C0, X0)
        # The solve runs in the parameters' precision, which its tolerance
        # needs, whatever lower precision autocast gave U and C0.
        with torch.autocast(U.device.type, enabled=False):
            dtype = self.B.dtype
            return self._solve(C0.to(dtype), None if X0 is None else X0.to(dtype))

    def _solve(self, C0: torch.Tensor, X0: Optional[torch.Tensor]) -> torch.Tensor:
        A = self.effective_A()
        if self.custom_activation:  # its autograd.Function holds the sink itself
            stats = self.last_stats = SolveStats(forward={})
            return F.fixed_point_custom(A, C0, X0, self.f.phi, self.f.dphi, self.options, stats.record)
        with reported_solves(self, self.options.on_nonconvergence) as sink:
            return F.fixed_point(A, C0, X0, self.activation, self.negative_slope, self.options, sink)

    def readout(self, U: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """Ŷ = X Cᵀ + U Dᵀ (+ bias) for input U and its equilibrium X."""
        U = U.flatten(1) if U.dim() > 2 else U
        Y = X @ self.C.t()
        if not self.no_D:
            Y = Y + U @ self.D.t()
        if self.bias:
            Y = Y + self.bias_out
        return Y

    def forward(self, U: torch.Tensor, X0: Optional[torch.Tensor] = None) -> torch.Tensor:
        U = self._check_input(U, X0)
        well_posed = self._compiled_well_posed(U)
        if well_posed is None:
            return self.readout(U, self._state(U, X0))
        return self._compiled_forward(U, X0, well_posed)

    def _compiled_well_posed(self, U: torch.Tensor) -> Optional[str]:
        """How idl::implicit_layer is to make A well-posed ("none", "triu",
        "exact" or "scale"), or None where the layer is not one it computes:
        a Python activation, a user's own well_posed, low rank, autocast."""
        if self.custom_activation or self.is_low_rank or _autocasting(U):
            return None
        own = self.f.well_posed.__func__
        if own is ImplicitFunctionInf.well_posed.__func__:
            return self.projection
        if own is ImplicitFunctionTriu.well_posed.__func__:
            return "triu"
        return "none" if own is ImplicitFunction.well_posed.__func__ else None

    def _compiled_forward(self, U, X0, well_posed):
        """The whole forward as one op, with its backward in C++: at small
        sizes, per-op overhead would otherwise be most of a training step."""
        # A compiled graph cannot read stats: its solves go unreported.
        compiling = torch.compiler.is_compiling()
        report = None if compiling else torch.full((3,), math.nan, dtype=torch.float64)
        options = self.options
        params = self._parameters  # what self.A etc. look up, the long way round
        Y, stats = ops.implicit_layer(
            U, params["A"], params["B"], params["C"], None if self.no_D else params["D"],
            params["bias_hidden"] if self.bias else None, params["bias_out"] if self.bias else None,
            X0, well_posed, self.kappa, self.activation, self.negative_slope,
            *options.forward_args(), options.on_nonconvergence, report,
        )
        stats_now = None if compiling else SolveStats(forward={}, backward_report=report)
        # a plain attribute: nn.Module.__setattr__ would look for a parameter first
        self.__dict__["last_stats"] = stats_now
        if stats_now is not None:
            report_solve(stats, "forward", options.on_nonconvergence, stats_now.record)
        return Y

    def extra_repr(self) -> str:
        parts = [
            f"input_dim={self.input_dim}, output_dim={self.output_dim}, hidden_dim={self.hidden_dim}",
            f"f={self.f.__name__}",
            f"activation={'custom' if self.custom_activation else self.activation}",
            f"kappa={self.kappa}, projection={self.projection!r}, solver={self.options.method!r}",
        ]
        if self.is_low_rank:
            parts.append(f"rank={self.rank}")
        return ", ".join(parts)


def _autocasting(t: torch.Tensor) -> bool:
    if not torch._C._is_any_autocast_enabled():  # the common case, quickly
        return False
    device = t.device.type
    return torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)


def _check_like(t: torch.Tensor, param: torch.Tensor, name: str) -> None:
    if t.dtype != param.dtype and not (t.is_floating_point() and _autocasting(t)):
        raise TypeError(
            f"{name} has dtype {t.dtype} but the model's parameters are {param.dtype}; "
            f"convert one of them (e.g. model.to({t.dtype}))"
        )
    if t.device != param.device:
        raise ValueError(
            f"{name} is on {t.device} but the model's parameters are on {param.device}; "
            f"move one of them (e.g. model.to({str(t.device)!r}))"
        )
