"""Function-preserving rescaling of a bias-free ReLU network, so that SIM can
embed it exactly with ||A||_inf <= kappa."""
import math

import torch
from torch import nn

# Activations with φ(c·z) = c·φ(z) for c > 0: a factor passes through them.
HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Identity)


@torch.no_grad()
def balance_hidden_norms(model: nn.Sequential, kappa: float = 0.9) -> nn.Sequential:
    """Scale, in place, every hidden-to-hidden ``nn.Linear`` of ``model`` to
    ||W||_inf = kappa, and the last ``nn.Linear`` by the inverse of the product
    of the factors. The network computes exactly the same function (the
    activations are positively homogeneous and there are no biases), and its
    implicit embedding (hidden layers stacked, A made of the hidden-to-hidden
    weights) then has ||A||_inf = kappa.

    Args:
        model: an ``nn.Sequential`` of bias-free ``nn.Linear`` layers and
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
            if module.bias is not None:
                raise ValueError("model has a Linear layer with a bias: rescaling would change its function")
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
        norm = torch.linalg.matrix_norm(linear.weight.double(), ord=math.inf).item()
        if norm == 0:
            continue
        linear.weight.mul_(kappa / norm)
        total *= kappa / norm
    linears[-1].weight.div_(total)
    return model
