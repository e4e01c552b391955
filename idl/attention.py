r"""Implicit attention: one head's keys, queries, values and output are the
fixed point of an implicit model whose activation is attention.

Per token the state is x = [k, q, v, out] (4 × head_size). For a sequence, the
states X (T, 4·hs) solve

    Z = X Aᵀ + U Bᵀ (+ b)            Z = [z_k, z_q, z_v]  (T, 3·hs)
    X = Φ(Z) = [z_k, z_q, z_v, attention(z_q, z_k, z_v)]

so k, q and v may depend on each other and on the attention output, and the
head's output is ``out``. With A = 0 it is the usual (explicit) attention head
with key/query/value weights B. Φ never reads a pre-activation for ``out``
(it replaces it), so A and B hold only the 3·hs rows that Φ uses.

Unlike ImplicitModel's solve, Φ couples the tokens of a sequence (attention
mixes them), so a sequence is solved as a whole, here in torch: Picard
iteration or Anderson acceleration with no gradient recorded, then implicit
differentiation (an adjoint fixed point driven by vector–Jacobian products of
one application of the map), never backpropagation through the iterations.
"""
import math
from functools import partial
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import functional as F
from ._ops import not_differentiable
from ._stats import SolveStats, is_traced, merge_stats, new_stats, watch
from .implicit import (
    ImplicitFunctionInf,
    _check_like,
    _check_positive_int,
    check_well_posedness,
    refuse_function_transforms,
)

ATTENTIONS = ("softmax", "lipschitz")
FEEDBACKS = ("values", "full")

# The Lipschitz variant divides by (LIPSCHITZ_OFFSET + row sum of weights): the
# offset keeps the division bounded when every weight is tiny.
LIPSCHITZ_OFFSET = 0.25


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √hs, masked) v for q, k, v (..., T, hs) and a boolean
    mask (T, T) that is True where token i may attend to token j."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def lipschitz_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_j w_ij ṽ_j / (0.25 + Σ_j w_ij) with w_ij = exp(-||q_i - k_j||²) where
    ``mask`` allows it (0 elsewhere) and ṽ = v / √(1 + v²) elementwise.

    Each output row is a combination of ṽ rows with total weight below 1, so
    the output is bounded by 1 and 1-Lipschitz in v; its slope in q and k is
    bounded too (||d|| exp(-||d||²) is), unlike softmax's."""
    squared_distance = (
        q.square().sum(-1, keepdim=True) + k.square().sum(-1).unsqueeze(-2) - 2 * (q @ k.transpose(-2, -1))
    )
    weights = torch.exp(-squared_distance).masked_fill(~mask, 0.0)
    squashed = v / torch.sqrt(1 + v.square())
    return (weights @ squashed) / (LIPSCHITZ_OFFSET + weights.sum(-1, keepdim=True))


_ATTENTION_FUNCTIONS = {"softmax": softmax_attention, "lipschitz": lipschitz_attention}


def attention_activation(Z: torch.Tensor, attention: Callable, mask: torch.Tensor) -> torch.Tensor:
    """Φ: pre-activations [z_k, z_q, z_v] (..., T, 3·hs) to states
    [k, q, v, out] (..., T, 4·hs), with k, q, v kept and out = attention(q, k, v)."""
    k, q, v = Z.chunk(3, dim=-1)
    return torch.cat((Z, attention(q, k, v, mask)), dim=-1)


def causal_activation(attention: str, T: int, device) -> Callable[[torch.Tensor], torch.Tensor]:
    """Φ with ``attention`` ("softmax" or "lipschitz") under a causal mask, for
    sequences of length T (pre-activations (..., T, 3·hs) to states (..., T, 4·hs))."""
    mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    return partial(attention_activation, attention=_ATTENTION_FUNCTIONS[attention], mask=mask)


# ---- the solve and its adjoint, as ops ------------------------------------------
#
# Custom ops, so that torch.compile(fullgraph=True) sees one opaque call per
# solve (the loops inside stop on data) and traces around it from the fake
# kernels. Rows of the solver loop (idl.functional.iterate_rows) are whole
# flattened sequences: attention couples a sequence's tokens.


def _solve_rows(fn, start, max_iter, tol, method, memory, inputs=()):
    return F.iterate_rows(start, lambda X: X, fn, max_iter, tol, method, memory, inputs)


def _check_op_args(tensors: dict, attention: str, max_iter: int, tol: float, method: str,
                   memory: int) -> None:
    """What the compiled ops check of theirs: one dtype and one device for
    every tensor (a meta one among real ones would give uninitialised memory),
    and valid settings."""
    (first_name, first), *rest = tensors.items()
    for name, t in rest:
        torch._check_type(t.dtype == first.dtype,
                          lambda: f"idl: {name} has dtype {t.dtype} but {first_name} has {first.dtype}")
        torch._check_value(t.device == first.device,
                           lambda: f"idl: {name} is on {t.device} but {first_name} is on {first.device}")
    if attention not in ATTENTIONS:
        raise ValueError(f"idl: attention must be one of {ATTENTIONS}, got {attention!r}")
    F.SolverOptions(max_iter, tol, method=method, memory=memory)


@torch.library.custom_op("idl::attention_solve", mutates_args=())
def attention_solve(A: torch.Tensor, C0: torch.Tensor, attention: str, max_iter: int, tol: float,
                    grad_max_iter: int, grad_tol: float, method: str,
                    memory: int) -> tuple[torch.Tensor, torch.Tensor]:
    """X (batch, T, 4·hs) solving X = Φ(X Aᵀ + C0), and the solve's stats
    (idl/_stats.py: the backward fills row 1). grad_max_iter and grad_tol are
    for its backward (attention_adjoint)."""
    _check_op_args({"A": A, "C0": C0}, attention, max_iter, tol, method, memory)
    F.SolverOptions(grad_max_iter=grad_max_iter, grad_tol=grad_tol)
    batch, T, _ = C0.shape
    width = A.shape[1]
    phi = causal_activation(attention, T, C0.device)

    def step(X, rows):
        return phi(X.view(len(rows), T, width) @ A.t() + C0[rows]).flatten(1)

    stats = new_stats(torch.empty(0))
    X, stats[0] = _solve_rows(step, C0.new_zeros(batch, T * width), max_iter, tol, method, memory,
                              inputs=(A, C0))
    return X.view(batch, T, width), stats


@attention_solve.register_fake
def _(A, C0, attention, max_iter, tol, grad_max_iter, grad_tol, method, memory):
    _check_op_args({"A": A, "C0": C0}, attention, max_iter, tol, method, memory)
    batch, T, _ = C0.shape
    return C0.new_empty(batch, T, A.shape[1]), torch.empty(2, 3, dtype=torch.float64)


@torch.library.custom_op("idl::attention_adjoint", mutates_args=())
def attention_adjoint(A: torch.Tensor, C0: torch.Tensor, X: torch.Tensor, G: torch.Tensor, attention: str,
                      max_iter: int, tol: float, method: str,
                      memory: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Implicit differentiation of the solve at X for G = dL/dX: with
    F(X, A, C0) = Φ(X Aᵀ + C0), solve W = G + (∂F/∂X)ᵀ W; then dL/dA =
    (∂F/∂A)ᵀ W and dL/dC0 = (∂F/∂C0)ᵀ W. Returns those and the solve's stats.
    (torch.func, since an op's kernel runs below autograd.)"""
    _check_op_args({"A": A, "C0": C0, "X": X, "G": G}, attention, max_iter, tol, method, memory)
    phi = causal_activation(attention, X.shape[1], X.device)
    mapped, vjp_X = torch.func.vjp(lambda X: phi(X @ A.t() + C0), X)
    G_rows = G.reshape(X.shape[0], X.shape[1] * X.shape[2])  # batch 0 too

    def adjoint_step(W, rows):
        if len(rows) < G_rows.shape[0]:  # sequences are independent: others get 0
            W = G_rows.new_zeros(G_rows.shape).index_copy_(0, rows, W)
        (vjp,) = vjp_X(W.view_as(mapped))
        return G_rows[rows] + vjp.flatten(1)[rows]

    W, stats = _solve_rows(adjoint_step, torch.zeros_like(G_rows), max_iter, tol, method, memory)
    _, vjp_A_C0 = torch.func.vjp(lambda A, C0: phi(X @ A.t() + C0), A, C0)
    grad_A, grad_C0 = vjp_A_C0(W.view_as(mapped))
    return grad_A, grad_C0, stats


@attention_adjoint.register_fake
def _(A, C0, X, G, attention, max_iter, tol, method, memory):
    _check_op_args({"A": A, "C0": C0, "X": X, "G": G}, attention, max_iter, tol, method, memory)
    return torch.empty_like(A), torch.empty_like(C0), torch.empty(3, dtype=torch.float64)


def _solve_setup(ctx, inputs, output):
    A, C0, attention, _max_iter, _tol, grad_max_iter, grad_tol, method, memory = inputs
    X, stats = output
    ctx.save_for_backward(A, C0, X)
    ctx.settings = (attention, grad_max_iter, grad_tol, method, memory)
    ctx.stats = stats
    ctx.mark_non_differentiable(stats)


def _solve_backward(ctx, grad_X, _grad_stats):
    A, C0, X = ctx.saved_tensors
    grad_A, grad_C0, stats = attention_adjoint(A, C0, X, grad_X, *ctx.settings)
    if not is_traced(ctx.stats):
        ctx.stats[1] = stats
    return grad_A, grad_C0, None, None, None, None, None, None, None


attention_solve.register_autograd(_solve_backward, setup_context=_solve_setup)
attention_adjoint.register_autograd(not_differentiable("idl::attention_adjoint"))


# ---- modules -------------------------------------------------------------------


class ImplicitAttentionHead(nn.Module):
    r"""One causal self-attention head in implicit form.

    Per token the state is [k, q, v, out] (4 × head_size); a sequence's states
    X (T, 4·hs) solve X = Φ(X Aᵀ + U Bᵀ (+ b)), where Φ keeps k, q, v and sets
    out = attention(q, k, v) (see the module docstring). The head returns out.
    With A = 0 it is an ordinary attention head whose key, query and value
    weights are the three blocks of B.

    ``attention="softmax"``: softmax(q kᵀ / √hs) v with a causal mask.
    ``attention="lipschitz"``: weights exp(-||q_i - k_j||²) for j <= i,
    divided by 0.25 + their row sum, applied to v / √(1 + v²).

    Convergence. A is projected onto {||A||_inf <= kappa} before every solve
    (as ImplicitFunctionInf does), so the linear part of the map contracts;
    what can break convergence is attention's sensitivity to q and k, which
    for softmax has no global bound. ``feedback`` chooses how the state feeds
    back:

    - ``"values"`` (default): k and q read only k and q (A's k, q rows are 0
      in the v and out columns); v reads everything. The solve always
      converges: k, q solve a linear system whose Picard map contracts at rate
      kappa, and with k, q fixed both attentions are 1-Lipschitz in v (each
      row of weights sums to at most 1; v / √(1 + v²) is 1-Lipschitz), so the
      (v, out) map contracts at rate kappa too.
    - ``"full"``: every part reads every part. Converges when
      max_i(||row i of A_kqv||₁ + L ||row i of A_out||₁) < 1, L being the
      Lipschitz constant of attention on the iterates: true for small A (the
      initialisation has ||A||_inf about 0.4), more robustly for the
      Lipschitz variant (its slope in q, k is bounded) than for softmax,
      which may oscillate. ``solver="anderson"`` or a smaller kappa help.

    Every solve stops after mitr (grad_mitr) iterations and then warns or
    raises, so it never hangs.

    Args:
        n_embd: features per token of the input.
        head_size: hs, size of each of k, q, v and the output.
        block_size: the longest sequence accepted (the causal mask's size).
        attention: ``"softmax"`` or ``"lipschitz"``.
        feedback: ``"values"`` (default) or ``"full"``, see Convergence.
        bias: add a learnt bias b (3·hs) to the pre-activations.
        kappa: radius of the inf-norm ball A is projected onto, in (0, 1].
        is_low_rank, rank: A = L Rᵀ, L (3·hs, rank), R (4·hs, rank), each
            factor projected onto the ball of radius √kappa.
        projection: ``"exact"`` (Euclidean, default) or ``"scale"``.
        solver: ``"picard"`` (default) or ``"anderson"`` (Anderson
            acceleration, memory 5) for both the forward and adjoint solves.
        mitr, grad_mitr: iteration limits of the forward and adjoint solves.
        tol, grad_tol: absolute tolerances on each sequence's inf-norm
            residual ||F(X) - X||_inf. In float32 keep tol above the state's
            round-off (about 1e-7 × its largest entry), or the solve cannot
            meet it.
        on_nonconvergence: ``"warn"`` (ImplicitFunctionWarning) or ``"raise"``
            (SolveNotConverged).

    Shapes: input (batch, T, n_embd) with 1 <= T <= block_size; output
    (batch, T, head_size). ``state(x)`` returns the whole equilibrium
    (batch, T, 4·hs). After a call ``last_stats`` (SolveStats) tells what the
    solves did. Gradients are first order (no double backward). Attention
    dropout is not offered: a random map has no fixed point.
    """

    def __init__(
        self,
        n_embd: int,
        head_size: int,
        block_size: int,
        attention: str = "softmax",
        feedback: str = "values",
        bias: bool = False,
        kappa: float = 0.99,
        is_low_rank: bool = False,
        rank: Optional[int] = None,
        projection: str = "exact",
        solver: str = "picard",
        mitr: int = 300,
        grad_mitr: int = 300,
        tol: float = 3e-6,
        grad_tol: float = 3e-6,
        on_nonconvergence: str = "warn",
    ) -> None:
        super().__init__()
        _check_positive_int("n_embd", n_embd)
        _check_positive_int("head_size", head_size)
        _check_positive_int("block_size", block_size)
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if feedback not in FEEDBACKS:
            raise ValueError(f"feedback must be one of {FEEDBACKS}, got {feedback!r}")
        rows, width = 3 * head_size, 4 * head_size
        check_well_posedness(kappa, projection, is_low_rank, rank, rows, f"3 * head_size = {rows}")
        self.options = F.SolverOptions(mitr, tol, grad_mitr, grad_tol, on_nonconvergence, method=solver)
        self.n_embd, self.head_size, self.block_size = n_embd, head_size, block_size
        self.attention, self.feedback, self.bias = attention, feedback, bias
        self.kappa, self.projection = float(kappa), projection
        self.is_low_rank, self.rank = is_low_rank, rank

        # Where A may be non-zero (None: everywhere).
        mask = None
        if feedback == "values":
            mask = torch.ones(rows, width, dtype=torch.bool)
            mask[: 2 * head_size, 2 * head_size :] = False
        self.register_buffer("feedback_mask", mask, persistent=False)
        # A starts small (||A||_inf about 0.4), so the head starts close to an
        # explicit one; B as nn.Linear would initialise the k, q, v weights.
        if is_low_rank:
            self.L = nn.Parameter(torch.randn(rows, rank) * (0.5 / math.sqrt(rank)))
            self.R = nn.Parameter(torch.randn(width, rank) * (0.5 / width))
        else:
            A = torch.randn(rows, width) * (0.5 / width)
            self.A = nn.Parameter(A if mask is None else A.masked_fill(~mask, 0.0))
        bound = 1.0 / math.sqrt(n_embd)
        self.B = nn.Parameter(torch.empty(rows, n_embd).uniform_(-bound, bound))
        if bias:
            self.bias_hidden = nn.Parameter(torch.empty(rows).uniform_(-bound, bound))
        self.last_stats: Optional[SolveStats] = None

    def effective_A(self) -> torch.Tensor:
        """The well-posed A (3·hs, 4·hs) the solves use (differentiable):
        projected, and zero where ``feedback`` forbids (masking the full A
        before projecting spends the row budget on the allowed entries only;
        masking L Rᵀ after can only shrink its rows)."""
        mask = self.feedback_mask
        if self.is_low_rank:
            A = ImplicitFunctionInf.well_posed_low_rank(self.L, self.R, self.kappa, self.projection)
            return A if mask is None else A.masked_fill(~mask, 0.0)
        A = self.A if mask is None else self.A.masked_fill(~mask, 0.0)
        return ImplicitFunctionInf.well_posed(A, self.kappa, self.projection)

    def activation(self, T: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """Φ for sequences of length T (pre-activations (..., T, 3·hs) to
        states (..., T, 4·hs))."""
        return causal_activation(self.attention, T, self.B.device)

    def _check_input(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[2] != self.n_embd:
            raise ValueError(f"x must have shape (batch, T, n_embd={self.n_embd}), got shape {tuple(x.shape)}")
        if not 1 <= x.shape[1] <= self.block_size:
            raise ValueError(f"x has T={x.shape[1]} tokens; expected 1 <= T <= block_size={self.block_size}")
        _check_like(x, self.B, "x")

    def state(self, x: torch.Tensor) -> torch.Tensor:
        """The equilibrium [k, q, v, out] (batch, T, 4·hs) for x (differentiable)."""
        refuse_function_transforms(type(self).__name__)
        self._check_input(x)
        C0 = x @ self.B.t()
        if self.bias:
            C0 = C0 + self.bias_hidden
        o = self.options
        settings = (self.attention, o.max_iter, float(o.tol), o.grad_max_iter, float(o.grad_tol), o.method, o.memory)
        X, stats = attention_solve(self.effective_A(), C0, *settings)
        if torch.compiler.is_compiling():  # a compiled graph cannot read stats
            self.last_stats = None
        else:
            self.last_stats = SolveStats([stats])
            watch(stats, o.on_nonconvergence, X)
        return X

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.state(x)[..., 3 * self.head_size :]

    def extra_repr(self) -> str:
        parts = [
            f"n_embd={self.n_embd}, head_size={self.head_size}, block_size={self.block_size}",
            f"attention={self.attention!r}, feedback={self.feedback!r}, solver={self.options.method!r}",
            f"kappa={self.kappa}, projection={self.projection!r}",
        ]
        if self.is_low_rank:
            parts.append(f"rank={self.rank}")
        return ", ".join(parts)


class ImplicitMultiHeadAttention(nn.Module):
    r"""Causal multi-head self-attention from implicit heads: the heads'
    outputs are concatenated, mapped back to n_embd by a linear projection,
    then dropout. A drop-in for the attention of a small (GPT-style)
    transformer block: (batch, T, n_embd) -> (batch, T, n_embd). It is
    self-attention only, with one input, unlike nn.MultiheadAttention's
    (query, key, value) call.

    Args:
        n_embd: features per token.
        num_heads: number of :class:`ImplicitAttentionHead`.
        block_size: the longest sequence accepted.
        head_size: per head; n_embd // num_heads if None.
        attention: ``"softmax"`` or ``"lipschitz"``, for every head.
        dropout: dropout probability after the projection.
        **head_kwargs: passed to every head (kappa, solver, mitr, tol, ...).

    ``last_stats`` summarises the heads' solves (see :func:`idl.implicit.merge_stats`).
    """

    def __init__(
        self,
        n_embd: int,
        num_heads: int,
        block_size: int,
        head_size: Optional[int] = None,
        attention: str = "softmax",
        dropout: float = 0.0,
        **head_kwargs: Any,
    ) -> None:
        super().__init__()
        _check_positive_int("n_embd", n_embd)
        _check_positive_int("num_heads", num_heads)
        if head_size is None:
            if n_embd % num_heads:
                raise ValueError(
                    f"n_embd={n_embd} is not divisible by num_heads={num_heads}; pass head_size explicitly"
                )
            head_size = n_embd // num_heads
        self.heads = nn.ModuleList(
            ImplicitAttentionHead(n_embd, head_size, block_size, attention, **head_kwargs) for _ in range(num_heads)
        )
        self.proj = nn.Linear(num_heads * head_size, n_embd)
        self.dropout = nn.Dropout(dropout)

    @property
    def last_stats(self) -> Optional[SolveStats]:
        return merge_stats([head.last_stats for head in self.heads if head.last_stats is not None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(torch.cat([head(x) for head in self.heads], dim=-1)))
