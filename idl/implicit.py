"""Implicit functions (how A is kept well-posed, which activation) and
ImplicitModel, the drop-in nn.Module."""
import math
from typing import Optional, Type

import torch
from torch import nn

from . import functional as F
from ._checks import (
    autocasting,
    check_finite_float,
    check_like,
    check_positive_int,
    check_well_posedness,
    refuse_function_transforms,
)
from ._ops import ops
from ._stats import SolveNotConverged, SolveStats, watch


class ImplicitFunction:
    """The fixed point X = φ(X Aᵀ + U Bᵀ) with A used as it is: no well-posedness
    guarantee. φ is ReLU unless a subclass overrides the static methods ``phi``
    and ``dphi`` (its derivative), which then run on a Python-driven path with
    the same algorithm; built-in activations are picked by name with
    ``ImplicitModel(activation=...)`` and run in compiled code.

    Two class attributes say what a model built on the class needs, and are
    set for subclasses by themselves:

    - ``well_posedness``: how the compiled layer makes A well-posed itself:
      ``"none"`` (A as it is), ``"triu"`` or ``"projection"`` (onto the
      inf-norm ball, in the model's projection mode). A subclass that defines
      its own ``well_posed`` gets None: the model then computes
      ``well_posed(A)`` in Python and hands the layer that matrix, autograd
      carrying the gradient back to the parameters.
    - ``python_activation``: True for a subclass that overrides ``phi`` and
      ``dphi``.
    """

    well_posedness: Optional[str] = "none"
    python_activation: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = vars(cls)
        if ("well_posed" in own or "well_posed_low_rank" in own) and "well_posedness" not in own:
            cls.well_posedness = None
        if ("phi" in own or "dphi" in own) and "python_activation" not in own:
            cls.python_activation = True

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
    def check_activation(cls) -> None:
        """A Python activation needs both phi and its derivative dphi."""
        if (cls.phi is ImplicitFunction.phi) != (cls.dphi is ImplicitFunction.dphi):
            raise TypeError(
                f"f={cls.__name__} overrides only one of phi and dphi: override both, "
                "dphi being the derivative of phi"
            )


class ImplicitFunctionInf(ImplicitFunction):
    """Keeps the model well-posed: A is projected onto {||A||_inf <= kappa}
    before every solve (``projection="exact"``: Euclidean projection, row by
    row onto the l1 ball; ``"scale"``: the upstream rescaling). Gradients flow
    through the projection to the raw parameter."""

    well_posedness = "projection"

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

    well_posedness = "triu"

    @classmethod
    def well_posed(cls, A, kappa, projection):
        return torch.triu(A, diagonal=1)


class ImplicitModel(nn.Module):
    r"""An implicit layer: Ŷ = X Cᵀ + U Dᵀ with X = φ(X Aᵀ + U Bᵀ), where the
    skip matrix is D = d_scale · ``self.D`` (see ``d_scale``).

    Batch-first: U is (batch, input_dim) (more dims are flattened from dim 1),
    X is (batch, hidden_dim), the output (batch, output_dim). The forward solve
    runs until every sample's residual ||X_{k+1} - X_k||_inf is <= tol; the
    backward is implicit differentiation, its own solve with grad_mitr and
    grad_tol. B and C are initialised as nn.Linear's weights, D = 0 and A
    small (not torchidl's randn / hidden_dim, under which ReLUs die in training).
    (Each choice, measured on real MNIST: benchmarks/README.md, "Real data".)

    Args:
        input_dim, output_dim, hidden_dim: p, q and n.
        f: how A is kept well-posed, and optionally a Python activation:
            ImplicitFunctionInf (default; projection onto the inf-norm ball),
            ImplicitFunction (A as is), ImplicitFunctionTriu (strictly upper
            triangular A), or a subclass overriding ``phi``/``dphi``.
        no_D: drop the U Dᵀ term.
        d_scale: the skip path's multiplier: the model applies
            D = d_scale · ``self.D``, so an optimizer's step on ``self.D``
            moves D d_scale times as far. Default 1 / sqrt(input_dim), as a
            Linear's init bounds its weights: with d_scale = 1, Adam moves every
            entry of D by about lr per step, and on inputs that share a
            constant background (MNIST's -1 pixels) those moves add up across
            hundreds of inputs into one large jump of the output, which kills
            hidden units (at Adam lr 5e-3 the 784-100-10 model ended 1 point
            below the MLP). ``d_scale=1`` is torchidl's parametrisation;
            ``effective_D()`` is the D the model applies. A state dict
            without ``d_scale`` (torchidl's, or one saved before idl had it)
            loads with d_scale = 1.
        bias: add learnt biases to the hidden pre-activation and the output.
        mitr, grad_mitr: iteration limits of the forward and backward solves.
        tol, grad_tol: absolute tolerances of the per-sample inf-norm residual.
        rtol, grad_rtol: relative tolerances of the forward and backward solves:
            a sample stops once ||X_{k+1} - X_k||_inf <= tol + rtol ||X_{k+1}||_inf
            (grad_tol + grad_rtol ||V_{k+1}||_inf for the backward). Default 0:
            the absolute test alone. ``last_stats`` says which test ended a
            solve (``criterion``). CPU and CUDA.
        kappa: radius of the inf-norm ball, in (0, 1].
        is_low_rank, rank: A = L Rᵀ with L, R of shape (hidden_dim, rank).
        activation: built-in φ by name: one of ``idl.ACTIVATIONS``.
        negative_slope: slope of ``"leaky_relu"`` for negative inputs, in [-1, 1].
        projection: ``"exact"`` (Euclidean, default) or ``"scale"`` (torchidl's).
        on_nonconvergence: ``"warn"`` (ImplicitFunctionWarning) or ``"raise"``
            (SolveNotConverged) when a solve stops before reaching its tolerance.
        solver: ``"picard"`` (X <- φ(X Aᵀ + U Bᵀ)), ``"anderson"`` (Anderson
            acceleration, same fixed point in fewer iterations when ||A||_inf is
            close to 1) or ``"auto"`` (Picard; a sample whose residual shrinks by
            less than a factor 0.7 per iteration for 3 iterations in a row
            switches to Anderson for the rest of the solve: Picard's cost where
            Picard is fast, close to Anderson's where it is slow); used by the
            forward and the backward solve.
        anderson_memory: how many past iterates Anderson mixes, 1 to 16.
        backward: how the gradient is computed. ``"implicit"`` (default): the
            adjoint solve to grad_tol, the exact gradient of the fixed point
            (up to the tolerances; the only mode gradcheck applies to).
            ``"phantom"``: ``phantom_steps`` damped adjoint steps from 0,
            V <- (1 - phantom_tau) V + phantom_tau φ'(Z) ⊙ (V A + G) (Geng et
            al. 2021; TorchDEQ's phantom gradient): an approximation, cheaper
            than the solve. ``"jfb"``: Jacobian-free backprop (Fung et al.
            2022), V = φ'(Z) ⊙ G, no product with A: a descent direction
            under conditions on A, not the gradient. The inexact modes ignore
            grad_mitr/grad_tol/grad_rtol; ``last_stats.backward`` reports their
            steps (``criterion`` "steps"). CPU and CUDA.
        phantom_steps, phantom_tau: k >= 1 and tau in (0, 1] of ``"phantom"``.

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
        rtol: float = 0.0,
        grad_rtol: float = 0.0,
        backward: str = "implicit",
        phantom_steps: int = 5,
        phantom_tau: float = 0.5,
        d_scale: Optional[float] = None,
    ) -> None:
        super().__init__()
        input_dim = check_positive_int("input_dim", input_dim)
        output_dim = check_positive_int("output_dim", output_dim)
        hidden_dim = check_positive_int("hidden_dim", hidden_dim)
        if not (isinstance(f, type) and issubclass(f, ImplicitFunction)):
            raise TypeError(f"f must be a subclass of idl.ImplicitFunction, got {f!r}")
        f.check_activation()
        if activation not in F.ACTIVATIONS:
            raise ValueError(f"activation must be one of {F.ACTIVATIONS}, got {activation!r}")
        if f.python_activation and activation != "relu":
            raise ValueError(
                f"activation={activation!r} conflicts with f={f.__name__}, which defines its own phi"
            )
        kappa, rank = check_well_posedness(kappa, projection, is_low_rank, rank, hidden_dim,
                                           f"hidden_dim={hidden_dim}")
        negative_slope = check_finite_float("negative_slope", negative_slope)
        if activation == "leaky_relu" and abs(negative_slope) > 1:
            # ||A||_inf < 1 makes the fixed point unique only for a 1-Lipschitz φ
            raise ValueError(
                f"negative_slope must be in [-1, 1] (leaky_relu must be 1-Lipschitz for the "
                f"model to be well-posed), got {negative_slope}"
            )
        d_scale = 1.0 / math.sqrt(input_dim) if d_scale is None else check_finite_float("d_scale", d_scale)
        if d_scale <= 0:
            raise ValueError(f"d_scale must be > 0, got {d_scale}")
        mitr = check_positive_int("mitr", mitr)  # named as the user wrote them;
        grad_mitr = check_positive_int("grad_mitr", grad_mitr)  # SolverOptions checks the rest
        self.options = F.SolverOptions(
            mitr, tol, grad_mitr, grad_tol, on_nonconvergence, method=solver, memory=anderson_memory,
            rtol=rtol, grad_rtol=grad_rtol, backward=backward, phantom_steps=phantom_steps,
            phantom_tau=phantom_tau,
        )

        self.input_dim, self.output_dim, self.hidden_dim = input_dim, output_dim, hidden_dim
        self.f = f
        self.no_D, self.bias, self.is_low_rank, self.rank = no_D, bias, is_low_rank, rank
        self.kappa, self.projection = float(kappa), projection
        self.activation, self.negative_slope = activation, float(negative_slope)

        # Not torchidl's randn / hidden_dim: there B's entries (~0.01 at n = 100)
        # are about the size of Adam's first steps, which shift every hidden
        # pre-activation far past its spread and kill the ReLUs (benchmarks/
        # README.md, "Real data"). B, C and the biases as nn.Linear's (uniform
        # in ±1/sqrt(fan_in)); D = 0 and a small A (entries ~ 0.1 / n,
        # ||A||_inf ~ 0.08), so a new model is close to the explicit network
        # relu(U Bᵀ) Cᵀ that it generalises.
        def uniform(*shape, fan_in):
            bound = 1.0 / math.sqrt(fan_in)
            return torch.empty(*shape).uniform_(-bound, bound)

        a_std = 0.1 / hidden_dim
        if is_low_rank:  # entries of L Rᵀ with std a_std
            factor = math.sqrt(a_std / math.sqrt(rank))
            self.L = nn.Parameter(torch.randn(hidden_dim, rank) * factor)
            self.R = nn.Parameter(torch.randn(hidden_dim, rank) * factor)
        else:
            self.A = nn.Parameter(torch.randn(hidden_dim, hidden_dim) * a_std)
        self.B = nn.Parameter(uniform(hidden_dim, input_dim, fan_in=input_dim))
        self.C = nn.Parameter(uniform(output_dim, hidden_dim, fan_in=hidden_dim))
        if no_D:
            self.register_buffer("D", torch.zeros(output_dim, input_dim), persistent=False)
        else:
            self.D = nn.Parameter(torch.zeros(output_dim, input_dim))
        self.d_scale = 1.0 if no_D else d_scale
        if bias:
            self.bias_hidden = nn.Parameter(uniform(hidden_dim, fan_in=input_dim))
            self.bias_out = nn.Parameter(uniform(output_dim, fan_in=hidden_dim))
        self.last_stats: Optional[SolveStats] = None

    # -- pieces ------------------------------------------------------------

    # torchidl spelled the iteration settings this way; they live in options.
    mitr = property(lambda self: self.options.max_iter)
    grad_mitr = property(lambda self: self.options.grad_max_iter)
    tol = property(lambda self: self.options.tol)
    grad_tol = property(lambda self: self.options.grad_tol)
    rtol = property(lambda self: self.options.rtol)
    grad_rtol = property(lambda self: self.options.grad_rtol)

    def effective_D(self) -> torch.Tensor:
        """The D the model applies, d_scale · self.D (differentiable)."""
        return self.D * self.d_scale

    # A state dict says how to read its D: it holds d_scale as a 0-dim tensor
    # beside D. On the module, d_scale is a float (the op and compiled graphs
    # take it as a constant), so it is saved and loaded by hand.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.no_D:
            destination[prefix + "d_scale"] = torch.tensor(self.d_scale, dtype=torch.float64)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if not self.no_D and prefix + "D" in state_dict:
            # torchidl's state dicts (and idl's before d_scale) hold the D they apply
            self.d_scale = float(state_dict.pop(prefix + "d_scale", 1.0))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
        check_like(U, self.B, "U")
        if X0 is not None:
            if not isinstance(X0, torch.Tensor):
                raise TypeError(f"X0 must be a torch.Tensor or None, got {type(X0).__name__}")
            expected = (U.shape[0], self.hidden_dim)
            if tuple(X0.shape) != expected:
                raise ValueError(f"X0 must have shape {expected}, got {tuple(X0.shape)}")
            check_like(X0, self.B, "X0")
        return U

    def forward(self, U: torch.Tensor, X0: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_with_state(U, X0)[0]

    def implicit_state(self, U: torch.Tensor, X0: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The equilibrium X (batch, hidden_dim) for input U (differentiable)."""
        return self._layer(self._check_input(U, X0), X0, readout=False)[1]

    def forward_with_state(self, U: torch.Tensor, X0: Optional[torch.Tensor] = None):
        """(output, equilibrium X) for input U, from one solve (both
        differentiable): what a recurrent cell needs, its X being the next
        step's warm start."""
        return self._layer(self._check_input(U, X0), X0, readout=True)

    def readout(self, U: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """Ŷ = X Cᵀ + U Dᵀ (+ bias) for input U and its equilibrium X."""
        U = U.flatten(1) if U.dim() > 2 else U
        Y = X @ self.C.t()
        if not self.no_D:
            Y = Y + U @ self.effective_D().t()
        if self.bias:
            Y = Y + self.bias_out
        return Y

    def _layer(self, U: torch.Tensor, X0: Optional[torch.Tensor], readout: bool):
        """(Y, X): the whole layer, one solve. Under autocast it runs in the
        parameters' dtype (the solve's tolerance needs it), whatever lower
        precision autocast gave U."""
        refuse_function_transforms(type(self).__name__)
        if autocasting(U):
            device = U.device.type
            with torch.autocast(device, enabled=False):
                dtype = self.B.dtype
                Y, X = self._layer(U.to(dtype), None if X0 is None else X0.to(dtype), readout)
            # the output in autocast's precision, as a float32 Linear's would be
            if Y is not None and Y.dtype == torch.float32:
                Y = Y.to(torch.get_autocast_dtype(device))
            return Y, X
        try:
            if self.f.python_activation:
                Y, X, stats = self._python_layer(U, X0, readout)
                # the op reports its own solves; the Python-driven one is watched
                watch(stats, self.options.on_nonconvergence, X)
            else:
                Y, X, stats = self._compiled_layer(U, X0, readout)
        except SolveNotConverged as error:  # raised: last_stats still says what the solve did
            self._keep_stats(error.stats)
            raise
        self._keep_stats(stats)
        return Y, X

    def _keep_stats(self, stats: Optional[torch.Tensor]) -> None:
        # a compiled graph cannot read stats; a plain attribute, since
        # nn.Module.__setattr__ would look for a parameter first
        keep = stats is not None and not torch.compiler.is_compiling()
        self.__dict__["last_stats"] = SolveStats([stats]) if keep else None

    def op_A(self):
        """(A, well_posed) as the compiled ops (idl::implicit_layer,
        idl::implicit_rnn) take them: the parameter A and how to make it
        well-posed, where the ImplicitFunction says how; else the effective A
        (low rank, or a user's well_posed) with "none", autograd carrying the
        gradient back to L, R or the user's parameters."""
        well_posedness = self.f.well_posedness
        if self.is_low_rank or well_posedness is None:
            return self.effective_A(), "none"
        return self.A, self.projection if well_posedness == "projection" else well_posedness

    def _compiled_layer(self, U, X0, readout):
        """idl::implicit_layer, which makes A well-posed itself where the
        ImplicitFunction says how (else it is handed the effective A), and
        runs the whole forward as one op with its backward in C++."""
        A, well_posed = self.op_A()
        if readout:
            C, D = self.C, None if self.no_D else self.D
            bias_out = self.bias_out if self.bias else None
        else:  # no output wanted: q = 0
            C, D, bias_out = self.B.new_empty(0, self.hidden_dim), None, None
        return ops.implicit_layer(
            U, A, self.B, C, D, self.bias_hidden if self.bias else None, bias_out, X0,
            well_posed, self.kappa, self.activation, self.negative_slope, *self.options.layer_args(),
            d_scale=self.d_scale,
        )

    def _python_layer(self, U, X0, readout):
        """The same layer for a Python phi/dphi: the solve driven from Python."""
        C0 = U @ self.B.t()
        if self.bias:
            C0 = C0 + self.bias_hidden
        X, stats = F.fixed_point_custom(self.effective_A(), C0, X0, self.f.phi, self.f.dphi, self.options)
        return (self.readout(U, X) if readout else None), X, stats

    def extra_repr(self) -> str:
        parts = [
            f"input_dim={self.input_dim}, output_dim={self.output_dim}, hidden_dim={self.hidden_dim}",
            f"f={self.f.__name__}",
            f"activation={'custom' if self.f.python_activation else self.activation}",
            f"kappa={self.kappa}, projection={self.projection!r}, solver={self.options.method!r}",
        ]
        if self.is_low_rank:
            parts.append(f"rank={self.rank}")
        return ", ".join(parts)
