"""State capture for SIM: run an explicit network on data and record, with
forward hooks on its activation modules, the pre-activations Z and
post-activations X of every hidden layer, with the inputs U and outputs Y.

Layout is batch-first: U (m, p), X and Z (m, n), Y (m, q) for m samples. The
hidden layers are stacked last-layer-first, as in the implicit embedding of a
feedforward network: for y = W_L φ(... φ(W_1 u)) the states
X = [x_{L-1}, ..., x_1] satisfy X = φ(X Aᵀ + U Bᵀ) with a strictly upper block
triangular A, and Y = X Cᵀ + U Dᵀ.
"""
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import List, Optional, Union

import torch
from torch import nn

from ._progress import progress_bar

logger = logging.getLogger(__name__)

FORMAT = "idl.sim.states/1"

#: The modules whose calls are hidden layers: elementwise activations. Softmax
#: and its kin are not elementwise (X = φ(Z) would not hold entry by entry), and
#: a call whose output shape differs from its input's is not recorded.
ACTIVATION_TYPES = (
    nn.CELU, nn.ELU, nn.GELU, nn.Hardshrink, nn.Hardsigmoid, nn.Hardswish, nn.Hardtanh,
    nn.LeakyReLU, nn.LogSigmoid, nn.Mish, nn.PReLU, nn.ReLU, nn.ReLU6, nn.RReLU, nn.SELU,
    nn.Sigmoid, nn.SiLU, nn.Softplus, nn.Softshrink, nn.Softsign, nn.Tanh, nn.Tanhshrink,
    nn.Threshold,
)


@dataclass
class States:
    """The states of an explicit network on m samples, batch-first.

    Attributes:
        U: inputs, (m, p), flattened from dim 1 (a 1-D batch is (m, 1)).
        X: post-activations, (m, n), hidden layers last-layer-first.
        Z: pre-activations, (m, n), same layout as X.
        Y: outputs, (m, q), flattened from dim 1 (a 1-D batch is (m, 1)).
        layer_sizes: widths of the captured hidden layers, in the column order
            of X and Z (last layer first); they sum to n.
    """

    U: torch.Tensor
    X: torch.Tensor
    Z: torch.Tensor
    Y: torch.Tensor
    layer_sizes: List[int] = field(default_factory=list)

    def __post_init__(self):
        for name in ("U", "X", "Z", "Y"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.dim() != 2:
                raise ValueError(f"states: {name} must be a 2-D tensor (samples, features)")
        m = self.U.shape[0]
        for name in ("X", "Z", "Y"):
            if getattr(self, name).shape[0] != m:
                raise ValueError(
                    f"states: {name} has {getattr(self, name).shape[0]} samples but U has {m}"
                )
        if self.Z.shape != self.X.shape:
            raise ValueError(
                f"states: Z has shape {tuple(self.Z.shape)} but X has {tuple(self.X.shape)}"
            )
        if self.layer_sizes and sum(self.layer_sizes) != self.X.shape[1]:
            raise ValueError(
                f"states: layer_sizes {self.layer_sizes} do not add up to the {self.X.shape[1]} "
                "hidden features of X"
            )

    @property
    def num_samples(self) -> int:
        return self.U.shape[0]

    def to(self, device=None, dtype=None) -> "States":
        """A copy on ``device`` and/or in ``dtype``."""
        move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return States(move(self.U), move(self.X), move(self.Z), move(self.Y), list(self.layer_sizes))


def save_states(states: States, path: Union[str, os.PathLike]) -> None:
    """Write ``states`` to ``path`` (a torch.save file, loadable with
    ``weights_only=True``)."""
    torch.save(
        {
            "format": FORMAT,
            "U": states.U.cpu(), "X": states.X.cpu(), "Z": states.Z.cpu(), "Y": states.Y.cpu(),
            "layer_sizes": list(states.layer_sizes),
        },
        path,
    )


def load_states(path: Union[str, os.PathLike], device=None, dtype=None) -> States:
    """Read states written by :func:`save_states` (optionally moved to
    ``device``/``dtype``). Raises ValueError if the file holds something else."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not an idl SIM states file (format {FORMAT})")
    missing = [key for key in ("U", "X", "Z", "Y", "layer_sizes") if key not in payload]
    if missing:
        raise ValueError(f"{os.fspath(path)!r} lacks {missing}")
    states = States(payload["U"], payload["X"], payload["Z"], payload["Y"],
                    [int(size) for size in payload["layer_sizes"]])
    return states.to(device=device, dtype=dtype)


# ---- which activation modules to hook --------------------------------------


def _activations_in(module: nn.Module) -> List[nn.Module]:
    """Activation modules under ``module`` (itself included), in definition order."""
    return [m for m in module.modules() if isinstance(m, ACTIVATION_TYPES)]


def _block_activations(module: nn.Module, block_threshold: int) -> List[nn.Module]:
    """The activations kept by ``skip_layers=block_threshold``: a module with
    more than that many children is a sequence of blocks, and each child
    contributes only its last activation; a smaller module is searched
    recursively."""
    children = list(module.children())
    if not children:
        return [module] if isinstance(module, ACTIVATION_TYPES) else []
    if len(children) <= block_threshold:
        return [m for child in children for m in _block_activations(child, block_threshold)]
    kept = []
    for child in children:
        inside = _activations_in(child)
        if inside:
            kept.append(inside[-1])
    return kept


def hooked_activations(model: nn.Module, skip_layers: Optional[int] = None) -> List[nn.Module]:
    """The activation modules whose calls are recorded as hidden layers.

    ``skip_layers=None`` hooks every activation module; an int keeps only the
    last activation of each block (see :class:`idl.sim.SIM`). Raises ValueError
    when there is none: functional activations (``F.relu`` in ``forward``) are
    invisible to hooks."""
    if skip_layers is None:
        found = _activations_in(model)
    else:
        found = _block_activations(model, skip_layers)
    unique = list(dict.fromkeys(found))
    if not unique:
        raise ValueError(
            f"model ({type(model).__name__}) has no activation module: SIM records hidden "
            "states with forward hooks on activation modules such as nn.ReLU, so an "
            "activation called as a function (F.relu) is not seen; use the module form"
        )
    return unique


class _Recorder:
    """Hooks that record (input, output) of each activation call, in call
    order; a module called twice records two layers. The input is copied by a
    pre-hook, before the call: an in-place activation (nn.ReLU(inplace=True))
    overwrites it."""

    def __init__(self):
        self.pre, self.post, self.modules = [], [], []
        self._inputs = {}

    def before(self, module, inputs):
        if inputs and isinstance(inputs[0], torch.Tensor):
            self._inputs[id(module)] = inputs[0].detach().clone()

    def after(self, module, inputs, output):
        pre = self._inputs.pop(id(module), None)
        if pre is not None and isinstance(output, torch.Tensor) and pre.shape == output.shape:
            self.pre.append(as_rows(pre, "a hidden state"))
            self.post.append(as_rows(output.detach(), "a hidden state"))
            self.modules.append(module)

    def clear(self):
        self.pre.clear()
        self.post.clear()
        self.modules.clear()
        self._inputs.clear()


@contextmanager
def _recording(modules):
    recorder = _Recorder()
    handles = []
    for module in modules:
        handles.append(module.register_forward_pre_hook(recorder.before))
        handles.append(module.register_forward_hook(recorder.after))
    try:
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


def as_rows(t: torch.Tensor, what: str) -> torch.Tensor:
    """``t`` as (batch, features): flattened from dim 1, a 1-D batch of
    scalars as (batch, 1)."""
    if t.dim() == 0:
        raise ValueError(f"{what} is a 0-d tensor: expected a batch, (batch, features...) or (batch,)")
    return t.reshape(t.shape[0], -1)


def _check_finite(name: str, t: torch.Tensor, batch: int):
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise ValueError(
            f"SIM states: {name} has {bad} non-finite value(s) (NaN or inf) in batch {batch}; "
            "the solvers need finite states: check the data and the network"
        )


def _batch_inputs(batch):
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(
        "dataloader must yield tensors or (inputs, targets, ...) tuples/lists whose first "
        f"element is a tensor, got {type(batch).__name__}"
    )


def _model_device(model: nn.Module, fallback) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device(fallback)


@torch.no_grad()
def capture_states(
    model: nn.Module,
    dataloader,
    skip_layers: Optional[int] = None,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    progress: Optional[bool] = None,
) -> States:
    """Run ``model`` (in eval mode, restored afterwards) on every batch of
    ``dataloader`` and return its states on ``device`` in ``dtype``.

    The inputs of a batch are its first element (or the batch itself when it
    is a tensor); they are moved to the model's device. Inputs, outputs and
    states are flattened from dim 1 (a 1-D batch is (batch, 1)). Raises
    ValueError, naming the layer, on a non-finite state.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modules = hooked_activations(model, skip_layers)
    names = {module: name or type(module).__name__ for name, module in model.named_modules()}
    model_device = _model_device(model, device)
    was_training = model.training
    model.eval()
    parts = {"U": [], "X": [], "Z": [], "Y": []}
    layer_sizes = None
    try:
        with _recording(modules) as recorder:
            for index, batch in enumerate(progress_bar(dataloader, desc="SIM states", progress=progress)):
                inputs = _batch_inputs(batch).to(model_device)
                recorder.clear()
                outputs = model(inputs)
                if not isinstance(outputs, torch.Tensor):
                    raise TypeError(
                        f"model must return a tensor, got {type(outputs).__name__}"
                    )
                if not recorder.pre:
                    raise ValueError(
                        "no activation module was called in the model's forward pass "
                        f"(hooked: {[type(m).__name__ for m in modules]})"
                    )
                sizes = [z.shape[1] for z in reversed(recorder.pre)]
                if layer_sizes is None:
                    layer_sizes = sizes
                elif sizes != layer_sizes:
                    raise ValueError(
                        f"hidden layer sizes changed between batches: {layer_sizes} then {sizes}"
                    )
                inputs, outputs = as_rows(inputs, "the inputs"), as_rows(outputs, "the model's output")
                _check_finite("the inputs U", inputs, index)
                for layer, (module, pre, post) in enumerate(zip(recorder.modules, recorder.pre, recorder.post)):
                    where = f"hidden layer {layer} ({names.get(module, type(module).__name__)})"
                    _check_finite(f"the pre-activation Z of {where}", pre, index)
                    _check_finite(f"the post-activation X of {where}", post, index)
                _check_finite("the outputs Y", outputs, index)
                keep = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
                parts["U"].append(keep(inputs))
                parts["Y"].append(keep(outputs))
                parts["Z"].append(keep(torch.cat(recorder.pre[::-1], dim=1)))
                parts["X"].append(keep(torch.cat(recorder.post[::-1], dim=1)))
    finally:
        model.train(was_training)
    if layer_sizes is None:
        raise ValueError("dataloader yielded no batch")
    states = States(**{name: torch.cat(chunks) for name, chunks in parts.items()},
                    layer_sizes=layer_sizes)
    logger.info(
        "captured states: %d samples, U %s, X/Z %s (layers %s, last first), Y %s",
        states.num_samples, tuple(states.U.shape), tuple(states.X.shape), layer_sizes,
        tuple(states.Y.shape),
    )
    return states

