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
All heads of :class:`ImplicitMultiHeadAttention` are one solve: heads are a
batch dimension (A is (heads, 3·hs, 4·hs), the states (batch, heads, T, 4·hs)).

Well-posedness. ``feedback="values"``: k, q read only k, q, and attention is
1-Lipschitz in v, so with ||A||_inf <= kappa < 1 the map contracts.
``feedback="full"``: q, k, v are squashed (x / √(1 + x²), 1-Lipschitz, into
(-1, 1)) before attention, which bounds attention's Lipschitz constant in the
inf-norm over the whole sequence by ``L = lipschitz_bound(attention, hs)``
(1 + 2√hs for softmax, 1 + 16·hs for the Lipschitz variant); A's ``out``
columns are divided by L after the projection. Then every row i has
||A_kqv,i||₁ + L ||A_out,i||₁ <= kappa, and the map is a kappa-contraction in
the norm max(||X_kqv||_inf, ||X_out||_inf / L): one fixed point, Picard
converges at rate kappa, and so does the adjoint (its norm is the dual one).
"""
import math
from typing import Callable, Optional

import torch
from torch import nn

from . import functional as F
from ._attention_kernels import (  # noqa: F401  (the attention math is idl.attention's, defined with the kernels)
    ATTENTIONS,
    LIPSCHITZ_OFFSET,
    attention_activation,
    attention_phi,
    build_mask,
    lipschitz_attention,
    no_key_rows,
    softmax_attention,
    solve_sequences,
    squash,
)
from ._checks import (
    autocasting,
    check_like,
    check_positive_int,
    check_well_posedness,
    refuse_function_transforms,
)
from ._ops import attention_solve, attention_value_solve
from ._stats import SolveStats, watch

FEEDBACKS = ("values", "full")


def lipschitz_bound(attention: str, head_size: int) -> float:
    """L such that, with q, k, v squashed into (-1, 1) (feedback="full"),
    ||attention(Z) - attention(Z')||_inf <= L ||Z - Z'||_inf over a whole
    sequence. Softmax: the v part gives 1; a score moves by at most
    2·hs/√hs·δ = 2√hs·δ, and the weights' change moves an output by at most the
    mean absolute deviation of the score changes (<= their largest size) times
    max|ṽ| <= 1: L = 1 + 2√hs. Lipschitz variant: dw_j = -2 w_j d_j·(dq - dk_j)
    with ||d_j||₁ <= 2·hs, |ṽ_j - out| <= 2, so 1 + 2·(2·2·hs·2) = 1 + 16·hs."""
    if attention == "softmax":
        return 1.0 + 2.0 * math.sqrt(head_size)
    return 1.0 + 16.0 * head_size


def causal_activation(attention: str, T: int, device, bounded: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """Φ with ``attention`` ("softmax" or "lipschitz") under a causal mask, for
    sequences of length T (pre-activations (..., T, 3·hs) to states (..., T, 4·hs))."""
    return attention_phi(attention, T, device, None, True, bounded)


# ---- feedback="values": k, q and the weights explicitly, v implicitly --------------
#
# (the derivation is with idl::attention_value_solve's kernel, in
# idl/_attention_kernels.py)


def attention_weights(q, k, attention, mask):
    """The weights Wt (…, Tq, Tk) with out = Wt f(v) (differentiable): softmax
    rows (0 for a query with no allowed key), or the Lipschitz variant's
    w / (0.25 + Σ w)."""
    if attention == "softmax":
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        if mask is None:
            return torch.softmax(scores, dim=-1)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        return torch.softmax(scores, dim=-1).masked_fill(no_key_rows(mask), 0.0)
    squared_distance = (
        q.square().sum(-1, keepdim=True) + k.square().sum(-1).unsqueeze(-2) - 2 * (q @ k.transpose(-2, -1))
    )
    weights = torch.exp(-squared_distance)
    if mask is not None:
        weights = weights.masked_fill(~mask, 0.0)
    return weights / (LIPSCHITZ_OFFSET + weights.sum(-1, keepdim=True))


def values_feedback_state(A, C0, attention, mask, causal, o):
    """The equilibrium [k, q, v, out] for feedback="values" (A (heads, 3·hs,
    4·hs) with its k, q rows zero in the v, out columns; C0 (batch, heads, T,
    3·hs)): k, q exactly, the weights explicitly, v by
    idl::attention_value_solve. Returns (X, stats, v), v being the solve's own output (what a
    backward report hooks on)."""
    hs = A.shape[-1] // 4
    M = A[..., : 2 * hs, : 2 * hs]
    eye = torch.eye(2 * hs, dtype=A.dtype, device=A.device)
    kq = C0[..., : 2 * hs] @ torch.linalg.inv(eye - M).transpose(-2, -1).unsqueeze(0)
    k, q = kq[..., :hs], kq[..., hs:]
    Wt = attention_weights(q, k, attention, build_mask(C0.shape[-2], causal, mask, C0.device))
    Cp = (C0[..., 2 * hs :] + kq @ A[..., 2 * hs :, : 2 * hs].transpose(-2, -1).unsqueeze(0)).contiguous()
    Avv, Avo = A[..., 2 * hs :, 2 * hs : 3 * hs], A[..., 2 * hs :, 3 * hs :]
    squashed = attention == "lipschitz"
    v, stats = attention_value_solve(Avv, Avo, Cp, Wt, squashed, o.max_iter, float(o.tol), o.grad_max_iter,
                                     float(o.grad_tol), o.method, o.memory)
    out = Wt @ (squash(v) if squashed else v)
    return torch.cat((k, q, v, out), dim=-1), stats, v


# ---- modules -------------------------------------------------------------------


def _check_tensor(t, name, who):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")


class _ImplicitAttention(nn.Module):
    """Shared by the head and the multi-head module: the parameters of
    ``num_heads`` heads stacked (a leading heads dimension unless
    ``stacked`` is False, as for a single head), and one batched solve."""

    def __init__(self, n_embd, head_size, num_heads, block_size, attention, feedback, bias, kappa,
                 is_low_rank, rank, projection, solver, anderson_memory, mitr, grad_mitr, tol, grad_tol,
                 on_nonconvergence, causal, batch_first, stacked, device, dtype):
        super().__init__()
        who = type(self).__name__
        check_positive_int("n_embd", n_embd)
        check_positive_int("head_size", head_size)
        if block_size is not None:
            check_positive_int("block_size", block_size)
        if attention not in ATTENTIONS:
            raise ValueError(f"{who}: attention must be one of {ATTENTIONS}, got {attention!r}")
        if feedback not in FEEDBACKS:
            raise ValueError(f"{who}: feedback must be one of {FEEDBACKS}, got {feedback!r}")
        rows, width = 3 * head_size, 4 * head_size
        check_well_posedness(kappa, projection, is_low_rank, rank, rows, f"3 * head_size = {rows}")
        mitr = check_positive_int("mitr", mitr)
        grad_mitr = check_positive_int("grad_mitr", grad_mitr)
        self.options = F.SolverOptions(mitr, tol, grad_mitr, grad_tol, on_nonconvergence, method=solver,
                                       memory=anderson_memory)
        self.n_embd, self.head_size, self.num_heads, self.block_size = n_embd, head_size, num_heads, block_size
        self.attention, self.feedback, self.bias = attention, feedback, bias
        self.kappa, self.projection = float(kappa), projection
        self.is_low_rank, self.rank = is_low_rank, rank
        self.causal, self.batch_first, self._stacked = bool(causal), bool(batch_first), stacked
        lead = (num_heads,) if stacked else ()

        # Where A may be non-zero (None: everywhere).
        mask = None
        if feedback == "values":
            mask = torch.ones(rows, width, dtype=torch.bool)
            mask[: 2 * head_size, 2 * head_size :] = False
        self.register_buffer("feedback_mask", mask, persistent=False)
        # full feedback: the out columns of A are divided by L (see the module docstring)
        self.lipschitz = lipschitz_bound(attention, head_size) if feedback == "full" else None
        # A starts small (||A||_inf about 0.4), so the head starts close to an
        # explicit one; B as nn.Linear would initialise the k, q, v weights.
        if is_low_rank:
            self.L = nn.Parameter(torch.randn(*lead, rows, rank) * (0.5 / math.sqrt(rank)))
            self.R = nn.Parameter(torch.randn(*lead, width, rank) * (0.5 / width))
        else:
            A = torch.randn(*lead, rows, width) * (0.5 / width)
            self.A = nn.Parameter(A if mask is None else A.masked_fill(~mask, 0.0))
        bound = 1.0 / math.sqrt(n_embd)
        self.B = nn.Parameter(torch.empty(*lead, rows, n_embd).uniform_(-bound, bound))
        if bias:
            self.bias_hidden = nn.Parameter(torch.empty(*lead, rows).uniform_(-bound, bound))
        self.last_stats: Optional[SolveStats] = None
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def effective_A(self) -> torch.Tensor:
        """The well-posed A ((heads,) 3·hs, 4·hs) the solves use
        (differentiable): projected onto {||A||_inf <= kappa} row by row, zero
        where ``feedback`` forbids (masking the full A before projecting spends
        the row budget on the allowed entries only; masking L Rᵀ after can only
        shrink its rows), and with feedback="full" its out columns divided by
        the attention's Lipschitz bound."""
        mask = self.feedback_mask
        if self.is_low_rank:
            radius = math.sqrt(self.kappa)
            L = F.project_linf(self.L.reshape(-1, self.L.shape[-1]), radius, self.projection).view_as(self.L)
            Rt = self.R.transpose(-2, -1)
            Rt = F.project_linf(Rt.reshape(-1, Rt.shape[-1]), radius, self.projection).view_as(Rt)
            A = L @ Rt
            if mask is not None:
                A = A.masked_fill(~mask, 0.0)
        else:
            A = self.A if mask is None else self.A.masked_fill(~mask, 0.0)
            A = F.project_linf(A.reshape(-1, A.shape[-1]), self.kappa, self.projection).view_as(A)
        if self.lipschitz is not None:
            split = 3 * self.head_size
            A = torch.cat((A[..., :split], A[..., split:] / self.lipschitz), dim=-1)
        return A

    def activation(self, T: int, causal: Optional[bool] = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """Φ for sequences of length T (pre-activations (..., T, 3·hs) to
        states (..., T, 4·hs)), causal unless the module is not (or ``causal``)."""
        causal = self.causal if causal is None else causal
        return attention_phi(self.attention, T, self.B.device, None, causal, self.feedback == "full")

    # -- inputs ------------------------------------------------------------

    def _to_batch_first(self, t, name):
        who = type(self).__name__
        _check_tensor(t, name, who)
        layout = "(batch, T, n_embd)" if self.batch_first else "(T, batch, n_embd)"
        if t.dim() != 3 or t.shape[2] != self.n_embd:
            hint = " (for one unbatched sequence add a batch dimension)" if t.dim() == 2 else ""
            raise ValueError(
                f"{who}: {name} must have shape {layout.replace('n_embd', f'n_embd={self.n_embd}')}, "
                f"got shape {tuple(t.shape)}{hint}"
            )
        if not self.batch_first:
            t = t.transpose(0, 1)
        if t.shape[1] < 1:
            raise ValueError(f"{who}: {name} has T=0 tokens; expected T >= 1")
        if self.block_size is not None and t.shape[1] > self.block_size:
            raise ValueError(
                f"{who}: {name} has T={t.shape[1]} tokens; expected 1 <= T <= block_size={self.block_size}"
            )
        check_like(t, self.B, name)
        return t

    def _masks(self, batch, Tq, Tk, attn_mask, key_padding_mask, device):
        """attn_mask (Tq, Tk) or (batch·heads, Tq, Tk) and key_padding_mask
        (batch, Tk), True (or -inf) where attending is NOT allowed, as in
        nn.MultiheadAttention, to one allowed-pairs mask (batch or 1, heads or
        1, Tq, Tk) (None for none)."""
        who = type(self).__name__
        H = self.num_heads
        allowed = None
        if attn_mask is not None:
            _check_tensor(attn_mask, "attn_mask", who)
            m = _as_blocked(attn_mask, "attn_mask", who)
            if m.shape == (Tq, Tk):
                m = m[None, None]
            elif m.dim() == 3 and m.shape == (batch * H, Tq, Tk):
                m = m.view(batch, H, Tq, Tk)
            else:
                raise ValueError(f"{who}: attn_mask must have shape ({Tq}, {Tk}) or "
                                 f"(batch * num_heads = {batch * H}, {Tq}, {Tk}), got {tuple(attn_mask.shape)}")
            allowed = ~m.to(device)
        if key_padding_mask is not None:
            _check_tensor(key_padding_mask, "key_padding_mask", who)
            m = _as_blocked(key_padding_mask, "key_padding_mask", who)
            if m.shape != (batch, Tk):
                raise ValueError(f"{who}: key_padding_mask must have shape (batch, T_key) = {(batch, Tk)}, "
                                 f"got {tuple(m.shape)}")
            m = ~m.to(device)[:, None, None, :]
            allowed = m if allowed is None else allowed & m
        return allowed

    def _solve(self, query, key=None, value=None, attn_mask=None, key_padding_mask=None, is_causal=None):
        """The equilibrium of the query tokens, (batch, heads, Tq, 4·hs) (no
        heads dimension for a single head), batch-first."""
        who = type(self).__name__
        refuse_function_transforms(who)
        cross = key is not None or value is not None
        query = self._to_batch_first(query, "query" if cross else "x")
        if cross:
            key = query if key is None else self._to_batch_first(key, "key")
            value = key if value is None else self._to_batch_first(value, "value")
            if key.shape[:2] != value.shape[:2] or key.shape[0] != query.shape[0]:
                raise ValueError(f"{who}: key {tuple(key.shape)} and value {tuple(value.shape)} must have the "
                                 f"batch size of query {tuple(query.shape)} and one length")
        causal = self.causal if is_causal is None else bool(is_causal)
        batch, Tq = query.shape[:2]
        Tk = key.shape[1] if cross else Tq
        allowed = self._masks(batch, Tq, Tk, attn_mask, key_padding_mask, query.device)
        o = self.options
        if autocasting(query):  # solve in the parameters' dtype, whatever autocast says
            with torch.autocast(query.device.type, enabled=False):
                dtype = self.B.dtype
                return self._solve_inputs(query.to(dtype), None if not cross else key.to(dtype),
                                          None if not cross else value.to(dtype), allowed, causal, o)
        return self._solve_inputs(query, key if cross else None, value if cross else None, allowed, causal, o)

    def _solve_inputs(self, query, key, value, allowed, causal, o):
        B = self.B if self._stacked else self.B.unsqueeze(0)
        bias = None
        if self.bias:
            bias = self.bias_hidden if self._stacked else self.bias_hidden.unsqueeze(0)
        hs = self.head_size

        def pre(x, rows):  # x (batch, T, n_embd) -> (batch, heads, T, rows), one product for all heads
            weights = B[:, rows]
            H, r = weights.shape[:2]
            Cx = (x @ weights.reshape(H * r, -1).t()).view(x.shape[0], x.shape[1], H, r).transpose(1, 2)
            return Cx if bias is None else Cx + bias[:, None, rows]

        if key is None:
            C0 = pre(query, slice(None))
            Tq = query.shape[1]
        else:
            # Cross-attention: one joint sequence, memory tokens first. A
            # memory token's pre-activation is [key B_k, 0, value B_v], a
            # query token's [0, query B_q, 0]; query tokens attend memory
            # tokens only, and memory tokens nothing (out = 0).
            Tk, Tq = key.shape[1], query.shape[1]
            Ck, Cv, Cq = pre(key, slice(0, hs)), pre(value, slice(2 * hs, 3 * hs)), pre(query, slice(hs, 2 * hs))
            memory = torch.cat((Ck, torch.zeros_like(Ck), Cv), dim=-1)
            queries = torch.cat((torch.zeros_like(Cq), Cq, torch.zeros_like(Cq)), dim=-1)
            C0 = torch.cat((memory, queries), dim=-2)
            block = torch.ones(Tq, Tk, dtype=torch.bool, device=query.device)
            if causal:
                block = block.tril()
            if allowed is not None:
                block = block & allowed
            T = Tk + Tq
            joint = torch.zeros(block.shape[:-2] + (T, T), dtype=torch.bool, device=query.device)
            joint[..., Tk:, :Tk] = block
            allowed, causal = joint, False
        A = self.effective_A()
        if not self._stacked:
            A = A.unsqueeze(0)
        if self.feedback == "values":
            X, stats, solved = values_feedback_state(A, C0, self.attention, allowed, causal, o)
        else:
            settings = (self.attention, o.max_iter, float(o.tol), o.grad_max_iter, float(o.grad_tol), o.method,
                        o.memory)
            X, stats = attention_solve(A, C0, *settings, allowed, causal, True)
            solved = X
        if torch.compiler.is_compiling():  # a compiled graph cannot read stats
            self.last_stats = None
        else:
            self.last_stats = SolveStats([stats])
            watch(stats, o.on_nonconvergence, solved)
        X = X[..., -Tq:, :]
        return X if self._stacked else X.squeeze(1)

    def _output_layout(self, y):
        return y if self.batch_first else y.transpose(0, 1)

    def _extra(self):
        parts = [
            f"attention={self.attention!r}, feedback={self.feedback!r}, solver={self.options.method!r}",
            f"kappa={self.kappa}, projection={self.projection!r}, causal={self.causal}",
        ]
        if self.is_low_rank:
            parts.append(f"rank={self.rank}")
        return parts


def _as_blocked(mask, name, who):
    """A mask, True (bool) or -inf (float) where attending is NOT allowed, as
    a bool tensor."""
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        if not torch.compiler.is_compiling() and not bool(((mask == 0) | (mask == -math.inf)).all()):
            raise ValueError(f"{who}: a float {name} may hold only 0 (attend) and -inf (do not attend)")
        return mask == -math.inf
    raise TypeError(f"{who}: {name} must be a bool or float tensor, got {mask.dtype}")


_HEAD_DOC_OPTIONS = r"""
        attention: ``"softmax"`` or ``"lipschitz"``.
        feedback: ``"values"`` (default) or ``"full"``, see Convergence.
        bias: add a learnt bias b (3·hs) to the pre-activations.
        kappa: radius of the inf-norm ball A is projected onto, in (0, 1].
        is_low_rank, rank: A = L Rᵀ, L (3·hs, rank), R (4·hs, rank), each
            factor projected onto the ball of radius √kappa.
        projection: ``"exact"`` (Euclidean, default) or ``"scale"``.
        solver: ``"picard"`` (default) or ``"anderson"`` (Anderson
            acceleration) for both the forward and adjoint solves.
        anderson_memory: how many past iterates Anderson mixes, 1 to 16.
        mitr, grad_mitr: iteration limits of the forward and adjoint solves.
        tol, grad_tol: absolute tolerances on each sequence's inf-norm
            residual ||F(X) - X||_inf. In float32 keep tol above the state's
            round-off (about 1e-7 × its largest entry), or the solve cannot
            meet it.
        on_nonconvergence: ``"warn"`` (ImplicitFunctionWarning) or ``"raise"``
            (SolveNotConverged). A diverged adjoint solve (non-finite, or its
            residual grown) never reaches the optimizer: the layer's gradient
            is zero for that step, with a warning (or the error).
        causal: attend to earlier tokens only (default True, the GPT use);
            ``forward(..., is_causal=...)`` overrides it per call.
        batch_first: inputs (batch, T, n_embd) (default) or (T, batch, n_embd).
        device, dtype: of the parameters.
"""


class ImplicitAttentionHead(_ImplicitAttention):
    __doc__ = r"""One self-attention head in implicit form (causal by default).

    Per token the state is [k, q, v, out] (4 × head_size); a sequence's states
    X (T, 4·hs) solve X = Φ(X Aᵀ + U Bᵀ (+ b)), where Φ keeps k, q, v and sets
    out = attention(q, k, v) (see the module docstring). The head returns out.
    With A = 0 it is an ordinary attention head whose key, query and value
    weights are the three blocks of B.

    ``attention="softmax"``: softmax(q kᵀ / √hs) v.
    ``attention="lipschitz"``: weights exp(-||q_i - k_j||²), divided by 0.25
    + their row sum, applied to v / √(1 + v²).

    Convergence. A is projected onto {||A||_inf <= kappa} before every solve.

    - ``"values"`` (default): k and q read only k and q; v reads everything.
      The solve always converges: k, q solve a linear system whose Picard map
      contracts at rate kappa, and with k, q fixed both attentions are
      1-Lipschitz in v, so the (v, out) map contracts at rate kappa too.
    - ``"full"``: every part reads every part, well-posed by construction:
      attention reads the squashed q, k, v (x / √(1 + x²)), which bounds its
      Lipschitz constant by L = :func:`lipschitz_bound` (1 + 2√hs for softmax,
      1 + 16·hs for the Lipschitz variant), and A's out columns are divided by
      L, so the map is a kappa-contraction (in the norm max(||kqv||_inf,
      ||out||_inf / L)); the forward and the adjoint solves converge.

    Every solve stops after mitr (grad_mitr) iterations and then warns or
    raises, so it never hangs.

    Args:
        n_embd: features per token of the input.
        head_size: hs, size of each of k, q, v and the output.
        block_size: the longest sequence accepted (None: any).""" + _HEAD_DOC_OPTIONS + r"""
    Shapes: ``forward(query, key=None, value=None, attn_mask=None,
    key_padding_mask=None, is_causal=None)``: query (batch, T, n_embd) with
    1 <= T <= block_size; output (batch, T, head_size). key/value given:
    cross-attention to them (see :class:`ImplicitMultiHeadAttention`).
    ``state(x)`` returns the whole equilibrium (batch, T, 4·hs). After a call
    ``last_stats`` (SolveStats) tells what the solves did. Gradients are first
    order (no double backward). Attention dropout is not offered: a random map
    has no fixed point. Under autocast the solve runs in the parameters' dtype.
    """

    def __init__(
        self,
        n_embd: int,
        head_size: int,
        block_size: Optional[int] = None,
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
        anderson_memory: int = 5,
        causal: bool = True,
        batch_first: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(n_embd, head_size, 1, block_size, attention, feedback, bias, kappa, is_low_rank, rank,
                         projection, solver, anderson_memory, mitr, grad_mitr, tol, grad_tol, on_nonconvergence,
                         causal, batch_first, False, device, dtype)

    def state(self, query, key=None, value=None, attn_mask=None, key_padding_mask=None, is_causal=None):
        """The equilibrium [k, q, v, out] (batch, T, 4·hs) of the query tokens
        (differentiable)."""
        return self._output_layout(self._solve(query, key, value, attn_mask, key_padding_mask, is_causal))

    def forward(self, query, key=None, value=None, attn_mask=None, key_padding_mask=None, is_causal=None):
        return self.state(query, key, value, attn_mask, key_padding_mask, is_causal)[..., 3 * self.head_size :]

    def extra_repr(self) -> str:
        return ", ".join([f"n_embd={self.n_embd}, head_size={self.head_size}, block_size={self.block_size}",
                          *self._extra()])


class ImplicitMultiHeadAttention(_ImplicitAttention):
    __doc__ = r"""Multi-head attention from implicit heads, all heads solved as
    one batched fixed point (heads are a batch dimension). The heads' outputs
    are concatenated, mapped back to n_embd by a linear projection, then
    dropout: (batch, T, n_embd) -> (batch, T, n_embd), a drop-in for the
    attention of a small (GPT-style) transformer block.

    As nn.MultiheadAttention: ``forward(query, key=None, value=None,
    attn_mask=None, key_padding_mask=None, is_causal=None)``. With key and
    value None it is self-attention on query; given, it is cross-attention:
    each memory token (of key/value) has its own implicit state [k, ·, v, ·]
    with pre-activations [key B_k, 0, value B_v], each query token
    [·, q, ·, out] with [0, query B_q, 0], solved jointly; query tokens attend
    the memory tokens only. Masks are True (bool) or -inf (float) where
    attending is NOT allowed: attn_mask (T_q, T_k) or (batch·heads, T_q, T_k),
    key_padding_mask (batch, T_k). ``is_causal`` (default: the constructor's
    ``causal``, True) masks j > i. Unlike nn.MultiheadAttention it returns
    the output alone (no attention weights) and is causal and batch-first by
    default; key and value have n_embd features (no kdim/vdim).

    Args:
        n_embd: features per token.
        num_heads: number of heads.
        block_size: the longest sequence accepted (None: any).
        head_size: per head; n_embd // num_heads if None.
        dropout: dropout probability after the projection.""" + _HEAD_DOC_OPTIONS + r"""
    ``last_stats`` tells what the (one) solve of the last call did. The
    parameters are stacked: A (num_heads, 3·hs, 4·hs), B (num_heads, 3·hs,
    n_embd); ``head_output(x)`` gives the heads' outputs (batch, heads, T, hs).
    """

    def __init__(
        self,
        n_embd: int,
        num_heads: int,
        block_size: Optional[int] = None,
        head_size: Optional[int] = None,
        attention: str = "softmax",
        dropout: float = 0.0,
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
        anderson_memory: int = 5,
        causal: bool = True,
        batch_first: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        check_positive_int("n_embd", n_embd)
        check_positive_int("num_heads", num_heads)
        if head_size is None:
            if n_embd % num_heads:
                raise ValueError(
                    f"ImplicitMultiHeadAttention: n_embd={n_embd} is not divisible by num_heads={num_heads}; "
                    "pass head_size explicitly"
                )
            head_size = n_embd // num_heads
        super().__init__(n_embd, head_size, num_heads, block_size, attention, feedback, bias, kappa, is_low_rank,
                         rank, projection, solver, anderson_memory, mitr, grad_mitr, tol, grad_tol,
                         on_nonconvergence, causal, batch_first, True, None, None)
        self.proj = nn.Linear(num_heads * head_size, n_embd)
        self.dropout = nn.Dropout(dropout)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before the heads were stacked: heads.{i}.{A, L, R, B, bias_hidden}
        if f"{prefix}heads.0.B" in state_dict:
            for name in ("A", "L", "R", "B", "bias_hidden"):
                keys = [f"{prefix}heads.{i}.{name}" for i in range(self.num_heads)]
                if all(key in state_dict for key in keys):
                    state_dict[prefix + name] = torch.stack([state_dict.pop(key) for key in keys])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def head_output(self, query, key=None, value=None, attn_mask=None, key_padding_mask=None, is_causal=None):
        """Every head's output (batch, heads, T, hs), batch-first."""
        return self._solve(query, key, value, attn_mask, key_padding_mask, is_causal)[..., 3 * self.head_size :]

    def forward(self, query, key=None, value=None, attn_mask=None, key_padding_mask=None, is_causal=None):
        out = self.head_output(query, key, value, attn_mask, key_padding_mask, is_causal)
        out = out.transpose(1, 2).flatten(2)  # (batch, T, heads·hs)
        return self._output_layout(self.dropout(self.proj(out)))

    def extra_repr(self) -> str:
        return ", ".join([f"n_embd={self.n_embd}, num_heads={self.num_heads}, head_size={self.head_size}, "
                          f"block_size={self.block_size}", *self._extra()])
