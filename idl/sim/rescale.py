"""Function-preserving rescaling of a ReLU network, so that SIM can embed it
exactly with ||A||_inf <= kappa. (SIM does this itself, on a copy, by
default: see idl.sim.teacher.)"""
import math

import torch
from torch import nn

# Activations with φ(c·z) = c·φ(z) for c > 0: a factor passes through them.
HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Identity)


@torch.no_grad()
def balance_hidden_norms(model: nn.Sequential, kappa: float = 0.9) -> nn.Sequential:
    """Scale, in place, every hidden-to-hidden ``nn.Linear`` of ``model`` to
    ||W||_inf = kappa, and the last ``nn.Linear`` by the inverse of the product
    of the factors; the bias of hidden layer k, whose output is scaled by the
    product c_k of the factors up to k, is scaled by c_k too. The network
    computes the same function (the activations are positively homogeneous),
    and its
    implicit embedding (hidden layers stacked, A made of the hidden-to-hidden
    weights) then has ||A||_inf = kappa.

    Args:
        model: an ``nn.Sequential`` of ``nn.Linear`` layers and
            ``nn.ReLU`` / ``nn.LeakyReLU`` / ``nn.Identity`` modules.
        kappa: the target norm, > 0.

    Returns:
        ``model``.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be an nn.Sequential, got {type(model).__name__}")
    if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or not 0 < kappa < math.inf:
        raise ValueError(f"kappa must be a finite number > 0, got {kappa!r}")
    linears = []
    for module in model:
        if isinstance(module, nn.Linear):
            linears.append(module)
        elif not isinstance(module, HOMOGENEOUS):
            raise ValueError(
                f"model has a {type(module).__name__}: only Linear layers and positively "
                "homogeneous activations (ReLU, LeakyReLU, Identity) can be rescaled"
            )
    if len(linears) < 3:
        return model  # no hidden-to-hidden layer
    total = 1.0
    for linear in linears[1:-1]:
        if linear.bias is not None:
            linear.bias.mul_(total)  # the layers below scaled this layer's input by total
        norm = torch.linalg.matrix_norm(linear.weight.double(), ord=math.inf).item()
        if norm == 0:
            continue
        linear.weight.mul_(kappa / norm)
        if linear.bias is not None:
            linear.bias.mul_(kappa / norm)
        total *= kappa / norm
    linears[-1].weight.div_(total)
    return model
