"""Recurrent networks whose recurrence is an implicit model.

At step t the cell solves, for its implicit state X_t,

    X_t = φ(X_t Aᵀ + [u_t, h_{t-1}] Bᵀ)
    h_t = X_t Cᵀ + [u_t, h_{t-1}] Dᵀ

with an :class:`idl.ImplicitModel` (input [u_t, h_{t-1}], output h_t). Each
step differentiates implicitly, and backpropagation through time chains the
steps (never through solver iterations). With a built-in activation a whole
layer is one op, idl::implicit_rnn (csrc/implicit_rnn.cpp), the loop over
time and its backward in C++; otherwise autograd chains the steps of a
Python loop.

Conventions follow nn.RNN / nn.LSTM / nn.GRU where they can, with one
difference kept from torchidl: ``batch_first=True`` is the default (input
(batch, seq_len, input_dim)). Pass ``batch_first=False`` for
(seq_len, batch, input_dim). Like nn.LSTM, nothing can tell a (seq_len,
batch, input_dim) tensor from a batch-first one of the same shape: say which
with ``batch_first``; tensors whose dimensions do not fit are refused.
"""
import inspect
from typing import Any, List, Optional, Tuple, Union

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from ._ops import ops
from ._stats import SolveNotConverged, SolveStats, merge_stats
from ._checks import autocasting, check_like, check_positive_int, refuse_function_transforms
from .implicit import ImplicitModel

# The keyword arguments a cell forwards to ImplicitModel.
_IMPLICIT_KWARGS = tuple(
    name for name in inspect.signature(ImplicitModel.__init__).parameters
    if name not in ("self", "input_dim", "output_dim", "hidden_dim")
)


def _check_kwargs(who: str, kwargs: dict) -> None:
    for name in kwargs:
        if name not in _IMPLICIT_KWARGS:
            raise TypeError(
                f"{who}.__init__() got an unexpected keyword argument {name!r} "
                f"(it takes the sizes, its own options and ImplicitModel's: {', '.join(_IMPLICIT_KWARGS)})"
            )


def _layout(batch_first: bool) -> str:
    return "(batch, seq_len, input_dim={})" if batch_first else "(seq_len, batch, input_dim={})"


def _check_sequence(who, x, input_dim: int, batch_first: bool, like: torch.Tensor) -> torch.Tensor:
    """x as a batch-first tensor, or an error naming ``who``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who}: x must be a torch.Tensor or a PackedSequence, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[2] != input_dim:
        hint = " (for one unbatched sequence add a batch dimension)" if x.dim() == 2 else ""
        raise ValueError(
            f"{who}: x must have shape {_layout(batch_first).format(input_dim)} "
            f"(batch_first={batch_first}), got shape {tuple(x.shape)}{hint}"
        )
    if not batch_first:
        x = x.transpose(0, 1)
    if x.shape[1] == 0:
        raise ValueError(f"{who}: x must hold at least one time step (seq_len >= 1), got seq_len=0")
    check_like(x, like, "x")
    return x


def _check_lengths(who, lengths, batch: int, T: int, device) -> Optional[torch.Tensor]:
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths)
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.shape != (batch,):
        raise ValueError(f"{who}: lengths must be {batch} integers (one per sequence), got {lengths!r}")
    if bool((lengths < 1).any()) or bool((lengths > T).any()):
        raise ValueError(f"{who}: every length must be in [1, seq_len={T}], got {lengths.tolist()}")
    lengths = lengths.to(device=device, dtype=torch.long)
    return None if bool((lengths == T).all()) else lengths


def reverse_padded(x: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """Each sequence of x (batch, T, ...) reversed within its length (the
    padding stays at the end, zero)."""
    if lengths is None:
        return x.flip(1)
    T = x.shape[1]
    index = lengths[:, None] - 1 - torch.arange(T, device=x.device)[None, :]
    valid = index >= 0
    index = index.clamp(min=0).view(x.shape[0], T, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index) * valid.view(x.shape[0], T, *([1] * (x.dim() - 2))).to(x.dtype)


class ImplicitRNNCell(nn.Module):
    r"""A vanilla RNN layer whose recurrence is an implicit model; it runs a
    whole sequence (like nn.RNN with one layer, not nn.RNNCell).

    ``self.layer`` is an :class:`idl.ImplicitModel` with input_dim =
    input_dim + hidden_dim, output_dim = hidden_dim and hidden_dim =
    implicit_hidden_dim; at each step it maps [u_t, h_{t-1}] to h_t. Its solve
    at step t starts from the equilibrium of step t-1 (a warm start: the result
    is the same fixed point, usually reached in fewer iterations).

    Args (the order of :class:`ImplicitRNN` without output_dim; before
    version 0.2 the cell took (input_dim, implicit_hidden_dim, hidden_dim):
    pass sizes by keyword to be safe with both):
        input_dim: features per time step (p).
        hidden_dim: size of the recurrent hidden state h_t.
        implicit_hidden_dim: size of the implicit state X_t of the inner model.
        batch_first: x is (batch, seq_len, input_dim) (default, as torchidl)
            or, if False, (seq_len, batch, input_dim).
        device, dtype: of the parameters.
        bias: the inner model's two biases, b_hidden in the solve and b_out
            in h_t (default True, as nn.RNN/nn.LSTM; torchidl's cell had
            none: pass bias=False to load its state dicts).
        **implicit_kwargs: passed to :class:`idl.ImplicitModel` (activation,
            kappa, mitr, tol, grad_mitr, grad_tol, no_D, is_low_rank,
            rank, f, projection, on_nonconvergence, solver, anderson_memory).

    Shapes:
        forward(x, h0=None, lengths=None): x as batch_first says, h0 (batch,
        hidden_dim) or None for zeros, lengths (batch,) integers or None (all
        seq_len). Returns (outputs, h): outputs holds h_1..h_T in x's layout
        (zeros past a sequence's length), h (batch, hidden_dim) is each
        sequence's last h. Both have the dtype and device of x (which must
        match the parameters', autocast aside).

    After a call, ``step_stats`` holds every step's SolveStats and
    ``last_stats`` summarises them (the most iterations, the largest residual);
    after a call that raised SolveNotConverged (``on_nonconvergence="raise"``),
    they are the failed run's (from the op: one record, its steps merged;
    from the Python loop: the steps run, the failed one last).

    With a built-in activation the whole recurrence is one op,
    idl::implicit_rnn (the loop over time and backpropagation through time in
    C++); a model whose ImplicitFunction defines phi/dphi in Python, and
    autocast, take a Python loop over the steps, with the same results.
    """

    def __init__(self, input_dim: int, hidden_dim: int, implicit_hidden_dim: int, batch_first: bool = True,
                 device=None, dtype=None, bias: bool = True, **implicit_kwargs: Any) -> None:
        super().__init__()
        who = type(self).__name__
        _check_kwargs(who, implicit_kwargs)
        check_positive_int("input_dim", input_dim)
        check_positive_int("implicit_hidden_dim", implicit_hidden_dim)
        check_positive_int("hidden_dim", hidden_dim)
        self.input_dim, self.hidden_dim, self.batch_first = input_dim, hidden_dim, bool(batch_first)
        self.layer = ImplicitModel(
            input_dim=input_dim + hidden_dim,
            output_dim=hidden_dim,
            hidden_dim=implicit_hidden_dim,
            bias=bias,
            **implicit_kwargs,
        )
        self.step_stats: List[SolveStats] = []
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @property
    def implicit_hidden_dim(self) -> int:
        return self.layer.hidden_dim

    # The stats of the last run: from the op, its stats tensors (step_stats
    # made a list of SolveStats when read); from the Python loop, each step's
    # SolveStats.
    @property
    def step_stats(self) -> List[SolveStats]:
        steps = self.__dict__.get("_step_stats", [])
        if isinstance(steps, torch.Tensor):  # the op's (T, 2, 3): its rows are views
            steps = self.__dict__["_step_stats"] = [SolveStats([row]) for row in steps.unbind(0)]
        return steps

    @step_stats.setter
    def step_stats(self, stats: List[SolveStats]) -> None:
        self.__dict__["_step_stats"], self.__dict__["_merged_stats"] = stats, None

    @property
    def last_stats(self) -> Optional[SolveStats]:
        """Summary of the last forward's per-step solves (and, once it has run,
        their backward solves)."""
        merged = self.__dict__.get("_merged_stats")
        return merge_stats(self.step_stats) if merged is None else SolveStats([merged])

    def _check_h0(self, h0, batch):
        who = type(self).__name__
        if h0 is None:
            return None
        if not isinstance(h0, torch.Tensor):
            raise TypeError(f"{who}: h0 must be a torch.Tensor or None, got {type(h0).__name__}")
        expected = (batch, self.hidden_dim)
        if tuple(h0.shape) != expected:
            raise ValueError(f"{who}: h0 must have shape (batch, hidden_dim) = {expected}, got {tuple(h0.shape)}")
        check_like(h0, self.layer.B, "h0")
        return h0

    def run(self, x: torch.Tensor, h0: Optional[torch.Tensor], lengths: Optional[torch.Tensor],
            reverse: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """The recurrence on a checked batch-first x (lengths None or a long
        tensor); ``reverse`` runs each sequence backwards within its length
        (outputs in the original order). Returns (outputs, h) batch-first."""
        if reverse:
            x = reverse_padded(x, lengths)
        if self._op_applies(x):
            outputs = self._recurrence(x, h0, lengths)
            # each sequence's last h: its output at its last step
            h = outputs[:, -1] if lengths is None else outputs[torch.arange(x.shape[0]), lengths - 1]
            return (reverse_padded(outputs, lengths) if reverse else outputs), h
        h = x.new_zeros(x.shape[0], self.hidden_dim) if h0 is None else h0
        state = None
        outputs, stats = [], []
        for t in range(x.shape[1]):
            U = torch.cat((x[:, t], h.to(x.dtype)), dim=1)
            # The warm start only picks where the solve begins: no gradient
            # flows through it, the implicit backward of each step is exact.
            start = None if state is None else state.detach()
            try:
                new, state = self.layer.forward_with_state(U, start)
            except SolveNotConverged:  # the steps run so far, the failed one last
                self.step_stats = stats + [self.layer.last_stats]
                raise
            stats.append(self.layer.last_stats)
            if lengths is not None:
                active = (t < lengths)[:, None]
                outputs.append(torch.where(active, new, new.new_zeros(())))
                h = torch.where(active, new, h.to(new.dtype))
            else:
                outputs.append(new)
                h = new
        self.step_stats = stats
        outputs = torch.stack(outputs, dim=1)
        if reverse:
            outputs = reverse_padded(outputs, lengths)
        return outputs, h

    def _op_applies(self, x: torch.Tensor) -> bool:
        """Whether idl::implicit_rnn runs the sequence (else the Python loop)."""
        return not self.layer.f.python_activation and not autocasting(x)

    def _recurrence(self, x: torch.Tensor, h0: Optional[torch.Tensor],
                    lengths: Optional[torch.Tensor]) -> torch.Tensor:
        """The outputs (batch, T, hidden_dim) of a batch-first x, by
        idl::implicit_rnn: the layer's parameters as ImplicitModel hands them
        to idl::implicit_layer."""
        layer = self.layer
        refuse_function_transforms(type(layer).__name__)
        A, well_posed = layer.op_A()
        biases = (layer.bias_hidden, layer.bias_out) if layer.bias else (None, None)
        try:
            outputs, stats, steps = ops.implicit_rnn(
                x, h0, A, layer.B, layer.C, None if layer.no_D else layer.D, *biases, lengths, well_posed,
                layer.kappa, layer.activation, layer.negative_slope, *layer.options.layer_args(),
                d_scale=layer.d_scale,
            )
        except SolveNotConverged as error:
            # raised: the stats say what this run did (its steps merged into
            # one record: the op raises before handing the per-step rows back)
            self.step_stats = [] if error.stats is None else [SolveStats([error.stats])]
            raise
        if torch.compiler.is_compiling():  # a compiled graph cannot read stats
            self.step_stats = []
        else:
            self.__dict__["_step_stats"], self.__dict__["_merged_stats"] = steps, stats
        return outputs

    def forward(self, x: torch.Tensor, h0: Optional[torch.Tensor] = None,
                lengths=None) -> Tuple[torch.Tensor, torch.Tensor]:
        who = type(self).__name__
        x = _check_sequence(who, x, self.input_dim, self.batch_first, self.layer.B)
        h0 = self._check_h0(h0, x.shape[0])
        lengths = _check_lengths(who, lengths, x.shape[0], x.shape[1], x.device)
        outputs, h = self.run(x, h0, lengths)
        return (outputs if self.batch_first else outputs.transpose(0, 1)), h

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.input_dim}, hidden_dim={self.hidden_dim}, "
            f"implicit_hidden_dim={self.implicit_hidden_dim}, batch_first={self.batch_first}"
        )


class ImplicitRNN(nn.Module):
    r"""Implicit RNN layers (:class:`ImplicitRNNCell`) followed by a linear
    map of the last hidden state: x -> (batch, output_dim).

    The size arguments are (input_dim, output_dim, hidden_dim,
    implicit_hidden_dim), as in :class:`idl.ImplicitModel`. torchidl's
    positional order was (input_dim, output_dim, implicit_hidden_dim,
    hidden_dim); code that passes them by keyword (as its tutorial does) works
    with both.

    Args:
        input_dim: features per time step (p).
        output_dim: features of the prediction (q).
        hidden_dim: size of the recurrent hidden state h_t.
        implicit_hidden_dim: size of the implicit state of each cell's model.
        num_layers: stacked layers, each reading the previous one's outputs
            (as nn.LSTM's num_layers).
        bidirectional: each layer also runs the sequence backwards; its
            outputs are the two directions' h concatenated, and the readout
            reads both directions' final h (2·hidden_dim features).
        dropout: dropout on each layer's outputs but the last's (as nn.LSTM).
        batch_first: x is (batch, seq_len, input_dim) (default, as torchidl;
            nn.LSTM's default is False) or (seq_len, batch, input_dim).
        device, dtype: of the parameters.
        bias: every cell's biases (default True, as nn.LSTM; see
            :class:`ImplicitRNNCell`; bias=False is torchidl's cell).
        **implicit_kwargs: passed to every cell's :class:`idl.ImplicitModel`
            (kappa, activation, solver, anderson_memory, tol, ...).

    ``forward(x, h0=None, lengths=None, return_state=False)``: x a tensor in
    the layout batch_first says, or a PackedSequence; lengths (batch,)
    integers for padded sequences of different lengths (each one's last valid
    step is read); h0 (num_layers·D, batch, hidden_dim) as nn.LSTM's (D = 2 if
    bidirectional else 1), or (batch, hidden_dim) for one layer, one
    direction, or None for zeros. Returns (batch, output_dim); with
    ``return_state=True``, (output, h_n) with h_n (num_layers·D, batch,
    hidden_dim) the final hidden states (h0's layout, whatever batch_first).
    ``sequence(x, ...)`` returns the top layer's outputs at every step and
    h_n, as nn.LSTM's forward does. ``recurrent`` is the first cell, ``cells``
    all of them (layer by layer, forward then backward), ``linear`` the
    readout; ``last_stats`` merges every cell's.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        hidden_dim: int,
        implicit_hidden_dim: int,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        batch_first: bool = True,
        device=None,
        dtype=None,
        bias: bool = True,
        **implicit_kwargs: Any,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        _check_kwargs(who, implicit_kwargs)
        check_positive_int("input_dim", input_dim)
        check_positive_int("output_dim", output_dim)
        check_positive_int("hidden_dim", hidden_dim)
        check_positive_int("implicit_hidden_dim", implicit_hidden_dim)
        num_layers = check_positive_int("num_layers", num_layers)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
            raise ValueError(f"{who}: dropout must be a probability in [0, 1], got {dropout!r}")
        self.input_dim, self.output_dim, self.hidden_dim = input_dim, output_dim, hidden_dim
        self.num_layers, self.bidirectional = num_layers, bool(bidirectional)
        self.batch_first, self.dropout = bool(batch_first), float(dropout)
        directions = 2 if bidirectional else 1
        cells = [
            ImplicitRNNCell(input_dim if layer == 0 else hidden_dim * directions, hidden_dim, implicit_hidden_dim,
                            bias=bias, **implicit_kwargs)
            for layer in range(num_layers) for _ in range(directions)
        ]
        # the first cell keeps its torchidl name (state_dict keys recurrent.*)
        self.recurrent = cells[0]
        self.more_cells = nn.ModuleList(cells[1:])
        self.linear = nn.Linear(hidden_dim * directions, output_dim)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @property
    def cells(self) -> List[ImplicitRNNCell]:
        return [self.recurrent, *self.more_cells]

    @property
    def implicit_hidden_dim(self) -> int:
        return self.recurrent.implicit_hidden_dim

    @property
    def last_stats(self) -> Optional[SolveStats]:
        return merge_stats(cell.last_stats for cell in self.cells if cell.step_stats)

    def _initial_state(self, h0, batch):
        who = type(self).__name__
        count = self.num_layers * (2 if self.bidirectional else 1)
        if h0 is None:
            return [None] * count
        if not isinstance(h0, torch.Tensor):
            raise TypeError(f"{who}: h0 must be a torch.Tensor or None, got {type(h0).__name__}")
        if h0.dim() == 2 and count == 1:
            h0 = h0.unsqueeze(0)
        expected = (count, batch, self.hidden_dim)
        if tuple(h0.shape) != expected:
            also = " or (batch, hidden_dim)" if count == 1 else ""
            raise ValueError(f"{who}: h0 must have shape (num_layers * directions, batch, hidden_dim) = "
                             f"{expected}{also}, got {tuple(h0.shape)}")
        check_like(h0, self.recurrent.layer.B, "h0")
        return list(h0.unbind(0))

    def sequence(self, x: Union[torch.Tensor, PackedSequence], h0: Optional[torch.Tensor] = None, lengths=None):
        """(outputs, h_n): the top layer's outputs at every step (x's layout,
        D·hidden_dim features, zeros past each length; a PackedSequence for a
        PackedSequence) and the final hidden states (num_layers·D, batch,
        hidden_dim)."""
        outputs, h_n, packed = self._run(x, h0, lengths)
        if packed is not None:
            return torch.nn.utils.rnn.pack_padded_sequence(outputs, packed[0], batch_first=True,
                                                           enforce_sorted=False), h_n
        return (outputs if self.batch_first else outputs.transpose(0, 1)), h_n

    def _run(self, x, h0, lengths):
        who = type(self).__name__
        packed = None
        if isinstance(x, PackedSequence):
            if lengths is not None:
                raise ValueError(f"{who}: pass lengths or a PackedSequence, not both")
            x, lengths = pad_packed_sequence(x, batch_first=True)
            packed = (lengths,)
            x = _check_sequence(who, x, self.input_dim, True, self.recurrent.layer.B)
        else:
            x = _check_sequence(who, x, self.input_dim, self.batch_first, self.recurrent.layer.B)
        batch, T = x.shape[:2]
        lengths = _check_lengths(who, lengths, batch, T, x.device)
        states = self._initial_state(h0, batch)
        cells, finals = self.cells, []
        directions = 2 if self.bidirectional else 1
        layer_input = x
        for layer in range(self.num_layers):
            outs = []
            for d in range(directions):
                index = layer * directions + d
                out, h = cells[index].run(layer_input, states[index], lengths, reverse=d == 1)
                outs.append(out)
                finals.append(h)
            layer_input = outs[0] if directions == 1 else torch.cat(outs, dim=2)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = nn.functional.dropout(layer_input, self.dropout, True)
        return layer_input, torch.stack(finals, dim=0), packed

    def forward(self, x: Union[torch.Tensor, PackedSequence], h0: Optional[torch.Tensor] = None, lengths=None,
                return_state: bool = False):
        _, h_n, _ = self._run(x, h0, lengths)
        directions = 2 if self.bidirectional else 1
        last = torch.cat(tuple(h_n[-directions:]), dim=1)  # the top layer's directions
        y = self.linear(last)
        return (y, h_n) if return_state else y

    def extra_repr(self) -> str:
        return (f"input_dim={self.input_dim}, output_dim={self.output_dim}, hidden_dim={self.hidden_dim}, "
                f"implicit_hidden_dim={self.implicit_hidden_dim}, num_layers={self.num_layers}, "
                f"bidirectional={self.bidirectional}, dropout={self.dropout}, batch_first={self.batch_first}")
