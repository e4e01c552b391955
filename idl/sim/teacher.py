"""Preparing a teacher network for SIM, on a copy: BatchNorm (eval mode)
folded into the neighbouring Linear, and a function-preserving rescale of the
hidden layers so that an exact well-posed implicit embedding exists.

For y = W_L φ(... φ(W_1 u + b_1) ...) + b_L with a positively homogeneous φ
(φ(c z) = c φ(z) for c > 0: ReLU, LeakyReLU, Identity), scaling hidden layer
k's weights by f_k and its bias by c_k = f_2···f_k scales its output by c_k;
dividing the last layer's weights by c_{L-1} gives back the same function. With
every hidden-to-hidden layer scaled to ||W_k||_inf = target <= kappa, the
implicit embedding (hidden layers stacked, A made of those weights) has
||A||_inf = target: a solver can then match the teacher exactly.
"""
import copy
import logging
import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

from .states import ACTIVATION_TYPES

logger = logging.getLogger(__name__)

#: Activations a scale factor passes through (φ(c z) = c φ(z), c > 0).
HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Identity)
#: Modules that are the identity in eval mode.
_IDENTITIES = (nn.Identity, nn.Dropout, nn.AlphaDropout)
#: The hidden-to-hidden norm of a prepared teacher, as a share of kappa.
TARGET_SHARE = 0.9


@dataclass
class PreparedTeacher:
    """What :func:`prepare_teacher` did.

    Attributes:
        model: the network to capture states from: a prepared copy, or the
            user's model itself when nothing was changed.
        has_bias: the teacher has biases or BatchNorm (affine terms).
        activations: type names of the teacher's activation modules.
        mismatched: those whose function is not SIM's ``activation_fn``: the
            implicit model cannot reproduce them exactly.
        folded: how many BatchNorm layers were folded into a Linear.
        rescaled: hidden-to-hidden layers were rescaled (to ``target``).
        target: their ||W||_inf after the rescale.
        embeddable: an exact embedding with ||A||_inf <= kappa exists (known
            only for plain Sequential networks; False when unknown).
    """

    model: nn.Module
    has_bias: bool = False
    activations: List[str] = field(default_factory=list)
    mismatched: List[str] = field(default_factory=list)
    folded: int = 0
    rescaled: bool = False
    target: float = math.nan
    embeddable: bool = False

    def describe(self) -> str:
        parts = []
        if self.folded:
            parts.append(f"{self.folded} BatchNorm folded")
        if self.rescaled:
            parts.append(f"hidden layers rescaled to ||W||_inf={self.target:.3g} (on a copy)")
        if self.mismatched:
            parts.append(f"activations {sorted(set(self.mismatched))} differ from activation_fn")
        return ", ".join(parts) if parts else "teacher used as is"


def has_affine_terms(model: nn.Module) -> bool:
    """Whether ``model`` has a bias or a BatchNorm anywhere."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return True
        if isinstance(getattr(module, "bias", None), torch.Tensor):
            return True
    return False


@torch.no_grad()
def same_function(module: nn.Module, activation_fn) -> bool:
    """Whether the activation ``module`` computes ``activation_fn`` (compared
    on a grid of points, in float64)."""
    z = torch.linspace(-6.0, 6.0, 241, dtype=torch.float64)
    try:
        module = copy.deepcopy(module).to(torch.float64).eval()
        expected = module(z.clone())
        got = activation_fn(z.clone())
    except Exception:  # noqa: BLE001 - any failure means "not the same"
        return False
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return False
    return torch.allclose(got.to(torch.float64), expected, rtol=1e-6, atol=1e-9)


def _leaves(module: nn.Module) -> Optional[List[nn.Module]]:
    """The modules of a (nested) nn.Sequential in call order, or None when
    ``module`` is not made of Sequentials and leaf modules."""
    if isinstance(module, nn.Sequential):
        out = []
        for child in module:
            inner = _leaves(child)
            if inner is None:
                return None
            out.extend(inner)
        return out
    if list(module.children()):
        return None
    return [module]


def _is_flatten(node) -> bool:
    """torch.flatten(x, 1), x.flatten(1), x.view(-1, k) / x.reshape(-1, k)
    (x.view(x.size(0), -1) is read in _traced_chain)."""
    args = node.args[1:]
    if node.op == "call_function" and node.target is torch.flatten:
        return tuple(args) == (1,) or node.kwargs == {"start_dim": 1}
    if node.op == "call_method" and node.target == "flatten":
        return tuple(args) == (1,) or node.kwargs == {"start_dim": 1}
    if node.op == "call_method" and node.target in ("view", "reshape"):
        return len(args) == 2 and args[0] == -1 and isinstance(args[1], int)
    return False


def _traced_chain(model: nn.Module) -> Optional[List[nn.Module]]:
    """The modules of ``model`` in call order when its forward is a plain
    chain (each call on the previous one's output) of modules and flattens,
    as torch.fx traces it; else None."""
    try:
        import torch.fx

        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - not traceable: not a chain we can read
        return None
    modules = dict(model.named_modules())
    chain, previous, batch = [], None, None
    for node in graph.nodes:
        if node.op == "placeholder":
            if previous is not None:
                return None
            previous = node
        elif node.op == "output":
            return chain if node.args and node.args[0] is previous and chain else None
        elif (node.op == "call_method" and node.target == "size" and node.args[1:] == (0,)
              and node.all_input_nodes == [previous]):
            batch = node  # x.size(0), for x.view(x.size(0), -1)
        elif (batch is not None and node.op == "call_method" and node.target in ("view", "reshape")
              and node.args[1:] == (batch, -1)):
            chain.append(nn.Flatten())
            previous, batch = node, None
        elif node.all_input_nodes != [previous] or previous is None:
            return None
        elif node.op == "call_module" and not list(modules[node.target].children()):
            chain.append(modules[node.target])
            previous = node
        elif _is_flatten(node):
            chain.append(nn.Flatten())
            previous = node
        else:
            return None
    return None


def _affine_batchnorm(bn) -> bool:
    return (isinstance(bn, nn.BatchNorm1d) and bn.track_running_stats
            and bn.running_mean is not None and bn.running_var is not None)


def _bn_scale_shift(bn):
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.affine:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        shift = shift + bn.bias.double()
    return scale, shift


def _float_linear(linear: nn.Linear) -> nn.Linear:
    """A float64 copy of ``linear`` with a bias (zero when it had none)."""
    out = nn.Linear(linear.in_features, linear.out_features, bias=True,
                    device=linear.weight.device, dtype=torch.float64)
    out.weight.copy_(linear.weight.double())
    out.bias.copy_(linear.bias.double() if linear.bias is not None else torch.zeros_like(out.bias))
    return out


@torch.no_grad()
def _fold(leaves: List[nn.Module]) -> Optional[tuple]:
    """(layers, folded): the leaves with identities dropped, Linear layers as
    float64 copies with biases and each BatchNorm1d folded into the Linear
    before it (else after it); None when a BatchNorm has no Linear to go to,
    or a module is not a Linear, BatchNorm1d, Flatten or identity-in-eval."""
    layers, pending, folded = [], [], 0
    for module in leaves:
        if isinstance(module, _IDENTITIES):
            continue
        if isinstance(module, nn.Flatten):
            if (module.start_dim, module.end_dim) != (1, -1):
                return None
            layers.append(module)
            continue
        if isinstance(module, nn.Linear):
            linear = _float_linear(module)
            for bn in pending:  # BatchNorm on this layer's input: W (s x + t) + b
                scale, shift = _bn_scale_shift(bn)
                linear.bias.add_(linear.weight @ shift)
                linear.weight.mul_(scale)
                folded += 1
            pending = []
            layers.append(linear)
            continue
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if not _affine_batchnorm(module):
                return None
            if layers and isinstance(layers[-1], nn.Linear):  # s (W x + b) + t
                scale, shift = _bn_scale_shift(module)
                layers[-1].weight.mul_(scale.unsqueeze(1))
                layers[-1].bias.mul_(scale).add_(shift)
                folded += 1
            else:
                pending.append(module)
            continue
        layers.append(copy.deepcopy(module))
    if pending:
        return None
    return layers, folded


@torch.no_grad()
def prepare_teacher(model: nn.Module, activation_fn, kappa: float,
                    rescale: bool = True) -> PreparedTeacher:
    """Prepare ``model`` (never modified) for SIM's state capture.

    When ``model`` is a (nested) ``nn.Sequential``, or a module whose forward
    is such a chain (read with torch.fx), of Linear layers, eval-mode
    BatchNorm1d, Flatten, Dropout and activation modules that are all
    positively homogeneous and equal to ``activation_fn``, and ``rescale`` is
    True, returns a float64 copy with every BatchNorm folded into a Linear
    and the hidden-to-hidden layers rescaled to ||W||_inf = 0.9·kappa (biases
    by the cumulative factor, the last layer by its inverse): the same
    function, with an exact embedding ||A||_inf < kappa. Otherwise the model is
    returned as it is, with what was found (biases, activations that
    ``activation_fn`` does not reproduce).
    """
    activations = [m for m in model.modules() if isinstance(m, ACTIVATION_TYPES)]
    result = PreparedTeacher(
        model=model, has_bias=has_affine_terms(model),
        activations=[type(m).__name__ for m in activations],
        mismatched=[type(m).__name__ for m in activations if not same_function(m, activation_fn)],
    )
    if not rescale or result.mismatched or not activations:
        return result
    if not all(torch.isfinite(t).all() for t in list(model.parameters()) + list(model.buffers())
               if t.is_floating_point()):
        return result  # the state capture names the layer where it goes wrong
    leaves = _leaves(model)
    if leaves is None:
        leaves = _traced_chain(model)
    if leaves is None or not all(isinstance(m, HOMOGENEOUS) for m in leaves
                                 if isinstance(m, ACTIVATION_TYPES)):
        return result
    folded = _fold(leaves)
    if folded is None:
        return result
    layers, result.folded = folded
    # The pattern [Flatten] Linear (act Linear)+: one activation between Linears.
    body = layers[1:] if layers and isinstance(layers[0], nn.Flatten) else layers
    if (len(body) < 3 or len(body) % 2 == 0
            or not all(isinstance(m, nn.Linear) for m in body[0::2])
            or not all(isinstance(m, ACTIVATION_TYPES) for m in body[1::2])):
        return result
    linears = body[0::2]
    target = TARGET_SHARE * kappa
    total = 1.0
    for linear in linears[1:-1]:
        linear.bias.mul_(total)  # the cumulative factor of the layers below
        norm = torch.linalg.matrix_norm(linear.weight, ord=math.inf).item()
        factor = target / norm if norm > 0 else 1.0
        linear.weight.mul_(factor)
        linear.bias.mul_(factor)
        total *= factor
    linears[-1].weight.div_(total)
    device = next(iter(model.parameters()), torch.empty(0)).device
    prepared = nn.Sequential(*layers).to(device).eval()
    dtype = next(iter(model.parameters()), torch.empty(0, dtype=torch.float32)).dtype
    if dtype.is_floating_point:
        prepared = prepared.to(dtype)
    result.model, result.rescaled, result.target, result.embeddable = prepared, True, target, True
    return result
