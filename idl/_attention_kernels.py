"""The attention ops' kernels, in Python, and what they compute with.

idl/_ops.py declares the ops idl::attention_solve, idl::attention_adjoint,
idl::attention_value_solve and idl::attention_value_adjoint from the four
kernels at the end of this module, with their fake kernels and autograd; the
modules of idl/attention.py call them. Here also: Φ (the attention math, which
idl.attention re-exports) and the batched solver the kernels iterate with.
"""
import math
import os
from typing import Callable, Optional

import torch

# functional imports _ops, which imports this module to declare the ops: F's
# attributes are read when a kernel runs, never while importing.
from . import functional as F
from ._stats import new_stats

ATTENTIONS = ("softmax", "lipschitz")

# The Lipschitz variant divides by (LIPSCHITZ_OFFSET + row sum of weights): the
# offset keeps the division bounded when every weight is tiny.
LIPSCHITZ_OFFSET = 0.25


def no_key_rows(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Where a query may attend no key: (..., T_q, 1), True there (None for
    no mask)."""
    return None if mask is None else ~mask.any(-1, keepdim=True)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: Optional[torch.Tensor]) -> torch.Tensor:
    """softmax(q kᵀ / √hs, masked) v for q, k, v (..., T, hs) and a boolean
    mask (broadcastable to (..., T_q, T_k)) that is True where token i may
    attend to token j (None: everywhere). A query with no key allowed gets 0."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if mask is None:
        return torch.softmax(scores, dim=-1) @ v
    # a finite fill: a row with no allowed key stays finite (and is zeroed)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    out = torch.softmax(scores, dim=-1) @ v
    return out.masked_fill(no_key_rows(mask), 0.0)


def lipschitz_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Σ_j w_ij ṽ_j / (0.25 + Σ_j w_ij) with w_ij = exp(-||q_i - k_j||²) where
    ``mask`` allows it (0 elsewhere) and ṽ = v / √(1 + v²) elementwise.

    Each output row is a combination of ṽ rows with total weight below 1, so
    the output is bounded by 1 and 1-Lipschitz in v; its slope in q and k is
    bounded too (||d|| exp(-||d||²) is), unlike softmax's."""
    squared_distance = (
        q.square().sum(-1, keepdim=True) + k.square().sum(-1).unsqueeze(-2) - 2 * (q @ k.transpose(-2, -1))
    )
    weights = torch.exp(-squared_distance)
    if mask is not None:
        weights = weights.masked_fill(~mask, 0.0)
    squashed = squash(v)
    return (weights @ squashed) / (LIPSCHITZ_OFFSET + weights.sum(-1, keepdim=True))


def squash(x: torch.Tensor) -> torch.Tensor:
    """x / √(1 + x²): 1-Lipschitz, into (-1, 1)."""
    return x / torch.sqrt(1 + x.square())


_ATTENTION_FUNCTIONS = {"softmax": softmax_attention, "lipschitz": lipschitz_attention}



def attention_activation(Z: torch.Tensor, attention: Callable, mask: Optional[torch.Tensor],
                         bounded: bool = False) -> torch.Tensor:
    """Φ: pre-activations [z_k, z_q, z_v] (..., T, 3·hs) to states
    [k, q, v, out] (..., T, 4·hs), with k, q, v kept and out = attention(q, k, v)
    (of the squashed q, k, v when ``bounded``)."""
    k, q, v = Z.chunk(3, dim=-1)
    if bounded:
        k, q = squash(k), squash(q)
        if attention is softmax_attention:  # the Lipschitz variant squashes v itself
            v = squash(v)
    return torch.cat((Z, attention(q, k, v, mask)), dim=-1)


def build_mask(T: int, causal: bool, mask: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    """The allowed-pairs mask: causal (j <= i) and ``mask`` (True = allowed)."""
    if causal:
        tril = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        return tril if mask is None else mask & tril
    return mask


def attention_phi(attention: str, T: int, device, mask: Optional[torch.Tensor], causal: bool,
                  bounded: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """Φ with ``attention`` ("softmax" or "lipschitz") for sequences of
    length T, under ``mask`` and, if ``causal``, the causal mask."""
    full_mask = build_mask(T, causal, mask, device)
    fn = _ATTENTION_FUNCTIONS[attention]
    return lambda Z: attention_activation(Z, fn, full_mask, bounded)


# ---- the batched solver ----------------------------------------------------------


class _Anderson:
    """Anderson mixing over whole sequences (rows), in place: ring buffers of
    the last ``memory`` residuals f = g(x) - x and images g(x) per row, and
    their Gram matrix updated by one new row and column per iteration (no
    history copied or recast). A row whose residual did not shrink starts
    afresh (one Picard step); after ANDERSON_MAX_RESTARTS of those it iterates
    plainly. The same rules as idl.functional's (and the compiled solver's)."""

    def __init__(self, rows, n, memory, like):
        self.memory = memory
        self.F = like.new_zeros(rows, memory, n)
        self.G = like.new_zeros(rows, memory, n)
        self.gram = torch.zeros(rows, memory, memory, dtype=torch.float64, device=like.device)
        self.count = torch.zeros(rows, dtype=torch.long, device=like.device)
        self.next = torch.zeros_like(self.count)
        self.last = torch.full((rows,), math.inf, dtype=torch.float64, device=like.device)
        self.restarts = torch.zeros_like(self.count)
        self.at = torch.arange(rows, device=like.device)
        self.slots = torch.arange(memory, device=like.device)
        self.eye = torch.eye(memory, dtype=torch.float64, device=like.device)

    def step(self, x, gx, residual):
        stalled = residual >= self.last
        self.count.masked_fill_(stalled, 0)
        self.next.masked_fill_(stalled, 0)
        self.restarts += stalled
        plain = self.restarts > F.ANDERSON_MAX_RESTARTS
        self.last = torch.where(plain, self.last, residual)
        f = gx - x
        at, slot = self.at, self.next
        self.F[at, slot] = f
        self.G[at, slot] = gx
        dots = (self.F @ f.unsqueeze(-1)).squeeze(-1).double()  # (rows, memory)
        self.gram[at, slot] = dots
        self.gram[at, :, slot] = dots
        self.next = (self.next + 1) % self.memory
        self.count = torch.clamp(self.count + 1, max=self.memory)
        valid = self.slots[None, :] < self.count[:, None]
        pair = valid[:, :, None] & valid[:, None, :]
        gram = self.gram * pair
        trace = gram.diagonal(dim1=1, dim2=2).sum(1)
        ridge = F.ANDERSON_REGULARIZATION * trace / self.count
        system = gram + self.eye * torch.where(valid, ridge[:, None], 1.0)[:, None, :]
        y, info = torch.linalg.solve_ex(system, valid.double())
        alpha = y / y.sum(1, keepdim=True)
        mixed = (alpha.to(x.dtype).unsqueeze(1) @ self.G).squeeze(1)
        usable = (self.count > 1) & (info == 0) & torch.isfinite(alpha).all(1) & ~plain
        failed = (self.count > 1) & ~usable & ~plain
        self.count.masked_fill_(failed, 0)
        self.next.masked_fill_(failed, 0)
        self.last = self.last.masked_fill(failed, math.inf)
        return torch.where(usable[:, None], mixed, gx)


def _stats_row(iterations, residual, converged):
    """One solve's row of stats (idl/_stats.py): [iterations, residual, converged]."""
    return torch.tensor([float(iterations), residual, float(converged)], dtype=torch.float64)


def check_every(device: torch.device) -> int:
    """How often a solve reads its residual back: every iteration on the CPU;
    on a GPU every IDL_CUDA_CHECK_EVERY iterations (default 8, as the compiled
    CUDA solves; 0 = never, max_iter iterations), since each read waits for
    the device to drain its queue."""
    if device.type != "cuda":
        return 1
    text = os.environ.get("IDL_CUDA_CHECK_EVERY", "") or "8"
    if not text.isdigit():
        raise ValueError(f"idl: IDL_CUDA_CHECK_EVERY must be an integer >= 0, got {text!r}")
    return int(text)


def solve_sequences(g, start, max_iter, tol, method="picard", memory=5, inputs=(), every=None):
    """x <- g(x) (Anderson-mixed if asked) for every row of ``start`` (rows:
    whole sequences, flattened) until every row's residual ||g(x) - x||_inf is
    <= tol or max_iter; every row iterates until all are done (no rows are
    gathered or copied). The residual is read back every ``every`` iterations
    (default: check_every(start.device); 0: only after max_iter), so a solve
    may run up to every - 1 iterations past the first one that met tol.
    Returns (the last g(x), stats row [iterations, worst residual,
    converged]). NaN or Inf in ``inputs`` stops it at once."""
    if start.is_meta:
        return torch.empty_like(start), torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64)
    if start.numel() == 0:
        return start.clone(), _stats_row(0, 0.0, True)
    for t in inputs:
        if t is not None and not torch.isfinite(t).all():
            nan = float("nan")
            return torch.full_like(start, nan), _stats_row(0, nan, False)
    every = check_every(start.device) if every is None else every
    x = start
    anderson = _Anderson(start.shape[0], start.shape[1], memory, start) if method == "anderson" else None
    gx, worst = start, 0.0
    for iteration in range(1, max_iter + 1):
        gx = g(x)
        residual = (gx - x).abs().amax(dim=1)
        if iteration == max_iter or (every and iteration % every == 0):
            worst = residual.max().item()
            if not math.isfinite(worst):
                return gx, _stats_row(iteration, worst, False)
            if worst <= tol:
                return gx, _stats_row(iteration, worst, True)
        x = gx if anderson is None else anderson.step(x, gx, residual.double())
    return gx, _stats_row(max_iter, worst, False)


# ---- the kernels of the solve and its adjoint ------------------------------------
#
# A is (3·hs, 4·hs) or (heads, 3·hs, 4·hs); C0 (batch, T, 3·hs) or
# (batch, heads, T, 3·hs); mask (True = may attend) broadcasts to
# (batch[, heads], T, T). The solves run in the inputs' dtype whatever autocast
# says (a bfloat16 iteration cannot meet the tolerance).


def check_op_args(tensors: dict, attention: str, max_iter: int, tol: float, method: str,
                   memory: int, mask: Optional[torch.Tensor] = None) -> None:
    """What the ops check of theirs: one dtype and one device for every tensor
    (a meta one among real ones would give uninitialised memory), and valid
    settings."""
    (first_name, first), *rest = tensors.items()
    for name, t in rest:
        torch._check_type(t.dtype == first.dtype,
                          lambda: f"idl: {name} has dtype {t.dtype} but {first_name} has {first.dtype}")
        torch._check_value(t.device == first.device,
                           lambda: f"idl: {name} is on {t.device} but {first_name} is on {first.device}")
    if mask is not None:
        torch._check_type(mask.dtype == torch.bool, lambda: f"idl: mask must be bool, got {mask.dtype}")
        torch._check_value(mask.device == first.device,
                           lambda: f"idl: mask is on {mask.device} but {first_name} is on {first.device}")
    if attention not in ATTENTIONS:
        raise ValueError(f"idl: attention must be one of {ATTENTIONS}, got {attention!r}")
    F.SolverOptions(max_iter, tol, method=method, memory=memory)


def _map(A, C0, attention, mask, causal, bounded):
    """F(X) = Φ(X Aᵀ + C0) on states (batch[, heads], T, 4·hs). For softmax
    the mask is an additive bias built once (-1e9 where not allowed: finite,
    so a query with no allowed key stays finite until it is zeroed), the
    scale is applied to q: per iteration, the same function as
    softmax_attention with fewer passes over the scores."""
    At = A.transpose(-2, -1)
    if attention != "softmax":
        phi = attention_phi(attention, C0.shape[-2], C0.device, mask, causal, bounded)
        return lambda X: phi(X @ At + C0)
    allowed = build_mask(C0.shape[-2], causal, mask, C0.device)
    bias = None if allowed is None else torch.zeros((), dtype=C0.dtype, device=C0.device).masked_fill(
        ~allowed, -1e9)
    empty = no_key_rows(mask if mask is None else allowed)
    scale = 1.0 / math.sqrt(A.shape[-1] // 4)

    def fn(X):
        Z = X @ At + C0
        k, q, v = Z.chunk(3, dim=-1)
        if bounded:
            k, q, v = squash(k), squash(q), squash(v)
        scores = (q * scale) @ k.transpose(-2, -1)
        if bias is not None:
            scores = scores + bias
        out = torch.softmax(scores, dim=-1) @ v
        if empty is not None:
            out = out.masked_fill(empty, 0.0)
        return torch.cat((Z, out), dim=-1)

    return fn


def _no_autocast(device):
    """A context in which autocast is off for ``device`` (for CPU where the
    device type has no autocast)."""
    return torch.autocast(device.type, enabled=False) if torch.amp.is_autocast_available(device.type) \
        else torch.autocast("cpu", enabled=False)


def attention_solve(A: torch.Tensor, C0: torch.Tensor, attention: str, max_iter: int, tol: float,
                    grad_max_iter: int, grad_tol: float, method: str, memory: int,
                    mask: Optional[torch.Tensor] = None, causal: bool = True,
                    bounded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """X (…, T, 4·hs) solving X = Φ(X Aᵀ + C0), and the solve's stats
    (idl/_stats.py: the backward fills row 1). grad_max_iter and grad_tol are
    for its backward (attention_adjoint)."""
    check_op_args({"A": A, "C0": C0}, attention, max_iter, tol, method, memory, mask)
    F.SolverOptions(grad_max_iter=grad_max_iter, grad_tol=grad_tol)
    shape = C0.shape[:-1] + (A.shape[-1],)
    sequences = math.prod(C0.shape[:-2])
    with _no_autocast(C0.device):
        fn = _map(A, C0, attention, mask, causal, bounded)
        stats = new_stats(torch.empty(0))
        size = math.prod(shape[-2:])
        X, stats[0] = solve_sequences(lambda X: fn(X.view(shape)).reshape(sequences, size),
                                      C0.new_zeros(sequences, math.prod(shape[-2:])),
                                      max_iter, tol, method, memory, inputs=(A, C0))
    return X.view(shape), stats



def attention_adjoint(A: torch.Tensor, C0: torch.Tensor, X: torch.Tensor, G: torch.Tensor, attention: str,
                      max_iter: int, tol: float, method: str, memory: int,
                      mask: Optional[torch.Tensor] = None, causal: bool = True,
                      bounded: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Implicit differentiation of the solve at X for G = dL/dX: with
    F(X, A, C0) = Φ(X Aᵀ + C0), solve W = G + (∂F/∂X)ᵀ W; then dL/dA =
    (∂F/∂A)ᵀ W and dL/dC0 = (∂F/∂C0)ᵀ W. Returns those and the solve's stats.

    A diverged adjoint (its residual non-finite, or larger at the end than
    at the first iteration) returns zero gradients: the stats say it did not
    converge, and the module warns (or raises) that this layer's gradient was
    dropped. (torch.func, since an op's kernel runs below autograd.)"""
    check_op_args({"A": A, "C0": C0, "X": X, "G": G}, attention, max_iter, tol, method, memory, mask)
    sequences = math.prod(X.shape[:-2])
    with _no_autocast(X.device):
        fn = _map(A, C0, attention, mask, causal, bounded)
        mapped, vjp_X = torch.func.vjp(fn, X)
        size = math.prod(X.shape[-2:])
        G_rows = G.reshape(sequences, size)
        first = G_rows.abs().amax().item() if G_rows.numel() else 0.0

        def adjoint_step(W):
            (vjp,) = vjp_X(W.view_as(mapped))
            return G_rows + vjp.reshape(sequences, size)

        W, stats = solve_sequences(adjoint_step, torch.zeros_like(G_rows), max_iter, tol, method, memory)
        residual = stats[1].item()
        if not math.isfinite(residual) or (not stats[2].item() and residual > first):
            return A.new_zeros(A.shape), C0.new_zeros(C0.shape), stats
        _, vjp_A_C0 = torch.func.vjp(lambda A, C0: _map(A, C0, attention, mask, causal, bounded)(X), A, C0)
        grad_A, grad_C0 = vjp_A_C0(W.view_as(mapped))
    return grad_A.contiguous(), grad_C0.contiguous(), stats



# ---- feedback="values": only v is implicit -----------------------------------------
#
# With k, q reading only k, q, they solve a linear system of their own: [k, q]
# = [k, q] Mᵀ + C0_kq, so [k, q] = C0_kq (I - M)⁻ᵀ exactly (M = A's k, q block,
# ||M||_inf <= kappa < 1), and the attention weights Wt follow from k, q
# explicitly (one softmax, differentiated by autograd). What remains implicit
# is v alone:
#
#     v = h(v) = C' + v A_vvᵀ + (Wt f(v)) A_voᵀ,     out = Wt f(v)
#
# (C' = C0_v + [k, q] A_v,kqᵀ; f the identity for softmax, the squash for the
# Lipschitz variant). Its Picard map contracts at rate kappa (Wt's rows sum to
# at most 1, f is 1-Lipschitz), and one iteration costs two small products
# and Wt f(v), not a whole attention. The fixed point is the same as the full
# state's; the adjoint is its own small solve, written out below.


def attention_value_solve(Avv: torch.Tensor, Avo: torch.Tensor, Cp: torch.Tensor, Wt: torch.Tensor,
                          squashed: bool, max_iter: int, tol: float, grad_max_iter: int, grad_tol: float,
                          method: str, memory: int) -> tuple[torch.Tensor, torch.Tensor]:
    """v (batch, heads, T, hs) solving v = Cp + v Avvᵀ + (Wt f(v)) Avoᵀ, and
    the stats (the backward fills row 1)."""
    check_op_args({"Avv": Avv, "Avo": Avo, "Cp": Cp, "Wt": Wt}, "softmax", max_iter, tol, method, memory)
    F.SolverOptions(grad_max_iter=grad_max_iter, grad_tol=grad_tol)
    shape = Cp.shape
    sequences, size = math.prod(shape[:-2]), math.prod(shape[-2:])
    with _no_autocast(Cp.device):
        f = squash if squashed else (lambda v: v)
        # [v, out] @ A_t: one product, A_t expanded once to the batch (no broadcast copy per iteration)
        A_t = torch.cat((Avv, Avo), dim=-1).transpose(-2, -1).expand(*shape[:-2], -1, -1).contiguous()
        Cp = Cp.contiguous()

        def h(v):
            v = v.view(shape)
            return torch.add(Cp, torch.cat((v, Wt @ f(v)), dim=-1) @ A_t).reshape(sequences, size)

        stats = new_stats(torch.empty(0))
        v, stats[0] = solve_sequences(h, Cp.new_zeros(sequences, size), max_iter, tol, method, memory,
                                      inputs=(Avv, Avo, Cp, Wt))
    return v.view(shape), stats



def attention_value_adjoint(Avv: torch.Tensor, Avo: torch.Tensor, Wt: torch.Tensor, v: torch.Tensor,
                            G: torch.Tensor, squashed: bool, max_iter: int, tol: float, method: str,
                            memory: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor]:
    """For G = dL/dv: u = G + J_hᵀ u with J_hᵀ u = u Avv + f'(v) ⊙ (Wtᵀ (u Avo));
    then dL/dCp = u, dL/dAvv = Σ uᵀ v, dL/dAvo = Σ uᵀ (Wt f(v)), dL/dWt =
    (u Avo) f(v)ᵀ. Returns (dAvv, dAvo, dCp, dWt, stats); zeros where the
    adjoint diverged (see attention_adjoint)."""
    check_op_args({"Avv": Avv, "Avo": Avo, "Wt": Wt, "v": v, "G": G}, "softmax", max_iter, tol, method, memory)
    shape = v.shape
    sequences, size = math.prod(shape[:-2]), math.prod(shape[-2:])
    with _no_autocast(v.device):
        fv = squash(v) if squashed else v
        slope = (1 + v.square()).pow(-1.5) if squashed else None
        WtT = Wt.transpose(-2, -1)
        G_rows = G.reshape(sequences, size)
        first = G_rows.abs().amax().item() if G_rows.numel() else 0.0

        hs = shape[-1]
        A_both = torch.cat((Avv, Avo), dim=-1).expand(*shape[:-2], -1, -1).contiguous()  # u @ [Avv | Avo]

        def step(u):
            u_vv, u_vo = (u.view(shape) @ A_both).split(hs, dim=-1)
            back = WtT @ u_vo
            if slope is not None:
                back = back * slope
            return G_rows + (u_vv + back).reshape(sequences, size)

        u, stats = solve_sequences(step, torch.zeros_like(G_rows), max_iter, tol, method, memory)
        residual = stats[1].item()
        if not math.isfinite(residual) or (not stats[2].item() and residual > first):
            return (Avv.new_zeros(Avv.shape), Avo.new_zeros(Avo.shape), v.new_zeros(shape), Wt.new_zeros(Wt.shape),
                    stats)
        u = u.view(shape)
        out = Wt @ fv
        heads_sum = (lambda t: t.sum(0)) if Avv.dim() == 3 else (lambda t: t.sum((0, 1)))
        grad_Avv = heads_sum(u.transpose(-2, -1) @ v)
        grad_Avo = heads_sum(u.transpose(-2, -1) @ out)
        grad_Wt = (u @ Avo) @ fv.transpose(-2, -1)
    return grad_Avv.contiguous(), grad_Avo.contiguous(), u.contiguous(), grad_Wt.contiguous(), stats

