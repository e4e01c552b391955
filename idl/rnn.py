"""Recurrent networks whose recurrence is an implicit model.

At step t the cell solves, for its implicit state X_t,

    X_t = φ(X_t Aᵀ + [u_t, h_{t-1}] Bᵀ)
    h_t = X_t Cᵀ + [u_t, h_{t-1}] Dᵀ

with an :class:`idl.ImplicitModel` (input [u_t, h_{t-1}], output h_t). Each
step differentiates implicitly; autograd chains the steps (backpropagation
through time across steps, never through solver iterations).
"""
from typing import Any, List, Optional, Tuple

import torch
from torch import nn

from ._stats import SolveStats, merge_stats
from .implicit import ImplicitModel, _check_like, _check_positive_int


def _check_sequence(x, h0, input_dim: int, hidden_dim: int, like: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[2] != input_dim:
        hint = " (for one unbatched sequence use x.unsqueeze(0))" if x.dim() == 2 else ""
        raise ValueError(
            f"x must have shape (batch, seq_len, input_dim={input_dim}), "
            f"got shape {tuple(x.shape)}{hint}"
        )
    if x.shape[1] == 0:
        raise ValueError("x must hold at least one time step (seq_len >= 1), got seq_len=0")
    _check_like(x, like, "x")
    if h0 is not None:
        if not isinstance(h0, torch.Tensor):
            raise TypeError(f"h0 must be a torch.Tensor or None, got {type(h0).__name__}")
        expected = (x.shape[0], hidden_dim)
        if tuple(h0.shape) != expected:
            raise ValueError(f"h0 must have shape (batch, hidden_dim) = {expected}, got {tuple(h0.shape)}")
        _check_like(h0, like, "h0")


class ImplicitRNNCell(nn.Module):
    r"""A vanilla RNN whose recurrence is an implicit model.

    ``self.layer`` is an :class:`idl.ImplicitModel` with input_dim =
    input_dim + hidden_dim, output_dim = hidden_dim and hidden_dim =
    implicit_hidden_dim; at each step it maps [u_t, h_{t-1}] to h_t. Its solve
    at step t starts from the equilibrium of step t-1 (a warm start: the result
    is the same fixed point, usually reached in fewer iterations).

    Batch-first. The hidden state is also the output at every step; for a
    low-dimensional target prefer a larger hidden state followed by a linear
    map, as :class:`ImplicitRNN` does.

    Args:
        input_dim: features per time step (p).
        implicit_hidden_dim: size of the implicit state X_t of the inner model.
        hidden_dim: size of the recurrent hidden state h_t.
        **implicit_kwargs: passed to :class:`idl.ImplicitModel` (activation,
            kappa, mitr, tol, grad_mitr, grad_tol, bias, no_D, is_low_rank,
            rank, f, projection, on_nonconvergence, ...).

    Shapes:
        forward(x, h0=None): x (batch, seq_len, input_dim), h0 (batch,
        hidden_dim) or None for zeros. Returns (outputs, h): outputs (batch,
        seq_len, hidden_dim) holds h_1..h_T, h (batch, hidden_dim) is h_T. Both
        have the dtype and device of x (which must match the parameters').

    After a call, ``step_stats`` holds every step's SolveStats and
    ``last_stats`` summarises them (the most iterations, the largest residual).
    """

    def __init__(self, input_dim: int, implicit_hidden_dim: int, hidden_dim: int, **implicit_kwargs: Any) -> None:
        super().__init__()
        _check_positive_int("input_dim", input_dim)
        _check_positive_int("implicit_hidden_dim", implicit_hidden_dim)
        _check_positive_int("hidden_dim", hidden_dim)
        self.input_dim, self.hidden_dim = input_dim, hidden_dim
        self.layer = ImplicitModel(
            input_dim=input_dim + hidden_dim,
            output_dim=hidden_dim,
            hidden_dim=implicit_hidden_dim,
            **implicit_kwargs,
        )
        self.step_stats: List[SolveStats] = []

    @property
    def implicit_hidden_dim(self) -> int:
        return self.layer.hidden_dim

    @property
    def last_stats(self) -> Optional[SolveStats]:
        """Summary of the last forward's per-step solves (and, once it has run,
        their backward solves)."""
        return merge_stats(self.step_stats)

    def forward(self, x: torch.Tensor, h0: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        _check_sequence(x, h0, self.input_dim, self.hidden_dim, self.layer.B)
        h = x.new_zeros(x.shape[0], self.hidden_dim) if h0 is None else h0
        state = None
        outputs, stats = [], []
        for t in range(x.shape[1]):
            U = torch.cat((x[:, t], h), dim=1)
            # The warm start only picks where the solve begins: no gradient
            # flows through it, the implicit backward of each step is exact.
            start = None if state is None else state.detach()
            h, state = self.layer.forward_with_state(U, start)
            stats.append(self.layer.last_stats)
            outputs.append(h)
        self.step_stats = stats
        return torch.stack(outputs, dim=1), h

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.input_dim}, implicit_hidden_dim={self.implicit_hidden_dim}, "
            f"hidden_dim={self.hidden_dim}"
        )


class ImplicitRNN(nn.Module):
    r"""An :class:`ImplicitRNNCell` followed by a linear map of its last hidden
    state: (batch, seq_len, input_dim) -> (batch, output_dim).

    Note the order of the size arguments, (input_dim, output_dim, hidden_dim,
    implicit_hidden_dim), as in :class:`idl.ImplicitModel`. torchidl's
    positional order was (input_dim, output_dim, implicit_hidden_dim,
    hidden_dim); code that passes them by keyword works with both.

    Args:
        input_dim: features per time step (p).
        output_dim: features of the prediction (q).
        hidden_dim: size of the recurrent hidden state h_t.
        implicit_hidden_dim: size of the implicit state of the inner model.
        **implicit_kwargs: passed to :class:`idl.ImplicitModel`.

    ``forward(x, h0=None)``: h0 (batch, hidden_dim) is the initial hidden
    state, zeros if None. ``recurrent`` is the cell, ``linear`` the readout;
    ``last_stats`` is the cell's.
    """

    def __init__(
        self, input_dim: int, output_dim: int, hidden_dim: int, implicit_hidden_dim: int, **implicit_kwargs: Any
    ) -> None:
        super().__init__()
        _check_positive_int("output_dim", output_dim)
        self.recurrent = ImplicitRNNCell(input_dim, implicit_hidden_dim, hidden_dim, **implicit_kwargs)
        self.linear = nn.Linear(hidden_dim, output_dim)

    @property
    def last_stats(self) -> Optional[SolveStats]:
        return self.recurrent.last_stats

    def forward(self, x: torch.Tensor, h0: Optional[torch.Tensor] = None) -> torch.Tensor:
        _, h = self.recurrent(x, h0)
        return self.linear(h)
