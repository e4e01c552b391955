"""From fitted weights A, B, C, D to an :class:`idl.ImplicitModel`, and the
map from SIM's ``activation_fn`` (a callable) to the model's activation."""
import copyreg
import logging

import torch
from torch import nn
from torch.nn import functional as F

from ..implicit import ImplicitFunction, ImplicitFunctionInf, ImplicitModel

logger = logging.getLogger(__name__)

# Callables that are an activation built into idl's compiled solver, by name.
_BUILT_IN_FUNCTIONS = {
    F.relu: "relu", torch.relu: "relu",
    F.leaky_relu: "leaky_relu",
    F.tanh: "tanh", torch.tanh: "tanh",
    F.hardtanh: "hardtanh",
    F.sigmoid: "sigmoid", torch.sigmoid: "sigmoid",
    F.softplus: "softplus",
}


def built_in_activation(activation_fn):
    """(name, negative_slope) of the compiled activation equal to
    ``activation_fn``, or None when it has to run as Python code."""
    if isinstance(activation_fn, nn.Identity):
        return "identity", 0.01
    if type(activation_fn) is nn.ReLU:
        return "relu", 0.01
    if type(activation_fn) is nn.LeakyReLU:
        return "leaky_relu", float(activation_fn.negative_slope)
    if type(activation_fn) is nn.Tanh:
        return "tanh", 0.01
    if type(activation_fn) is nn.Sigmoid:
        return "sigmoid", 0.01
    if type(activation_fn) is nn.Hardtanh and (activation_fn.min_val, activation_fn.max_val) == (-1.0, 1.0):
        return "hardtanh", 0.01
    if type(activation_fn) is nn.Softplus and activation_fn.beta == 1:
        return "softplus", 0.01
    try:
        name = _BUILT_IN_FUNCTIONS.get(activation_fn)
    except TypeError:  # unhashable callable
        name = None
    return None if name is None else (name, 0.01)


def _elementwise_derivative(phi):
    """φ' of an elementwise φ, by autograd (the derivative of Σ φ(z))."""

    def dphi(Z):
        with torch.enable_grad():
            Z = Z.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(phi(Z).sum(), Z)
        return grad

    return dphi


class _SIMFunctionType(type):
    """The metaclass of the ImplicitFunction subclasses made for a Python
    activation: pickled (with torch.save too) as the recipe (base, activation)
    instead of by name, since they are made at run time."""


def _rebuild_function(well_posed: bool, activation_fn):
    return implicit_function_for(activation_fn, well_posed)


copyreg.pickle(_SIMFunctionType,
               lambda cls: (_rebuild_function, (cls._sim_well_posed, cls._sim_activation)))

# One class per (base, activation), so a model pickled twice shares it.
_FUNCTION_CLASSES = {}


def implicit_function_for(activation_fn, well_posed: bool):
    """The ImplicitFunction class for a model with φ = ``activation_fn``:
    ImplicitFunctionInf when A is inside the ball, else ImplicitFunction (A used
    as it is); subclassed with Python phi/dphi for a non-built-in φ. The
    subclass pickles as long as ``activation_fn`` does (a module such as
    ``nn.GELU()`` or a module-level function)."""
    base = ImplicitFunctionInf if well_posed else ImplicitFunction
    if built_in_activation(activation_fn) is not None:
        return base
    try:
        key = (well_posed, activation_fn)
        cached = _FUNCTION_CLASSES.get(key)
    except TypeError:  # unhashable activation
        key, cached = None, None
    if cached is not None:
        return cached
    cls = _SIMFunctionType(
        f"{base.__name__}SIM",
        (base,),
        {"phi": staticmethod(activation_fn), "dphi": staticmethod(_elementwise_derivative(activation_fn)),
         "_sim_activation": activation_fn, "_sim_well_posed": bool(well_posed),
         "__module__": __name__},
    )
    if key is not None:
        _FUNCTION_CLASSES[key] = cls
    return cls


def inf_norm(A: torch.Tensor) -> float:
    """||A||_inf, the largest absolute row sum, accumulated in float64."""
    return A.abs().sum(dim=1, dtype=torch.float64).max().item() if A.numel() else 0.0


def implicit_model_from_weights(A, B, C, D, activation_fn, kappa: float, atol: float,
                                max_iter: int, bias_hidden=None, bias_out=None) -> ImplicitModel:
    """An ImplicitModel holding A, B, C, D (tensors, on their device and dtype),
    and the biases when given (both, or neither: ``ImplicitModel(bias=True)``).

    When ||A||_inf <= kappa the model projects onto that ball, which leaves A
    unchanged (the exact projection is the identity inside the ball); otherwise
    (e.g. from LeastSquareSolver) it uses A as it is, with a warning that it
    may not be well-posed.
    """
    n, p, q = A.shape[0], B.shape[1], C.shape[0]
    norm = inf_norm(A)
    well_posed = norm <= kappa
    if not well_posed:
        logger.warning(
            "fitted A has ||A||_inf = %.6g > kappa = %g: the implicit model uses A as it is "
            "and may not be well-posed%s", norm, kappa,
            "" if norm < 1 else " (the fixed-point iteration may diverge)",
        )
    built_in = built_in_activation(activation_fn)
    activation, slope = built_in if built_in is not None else ("relu", 0.01)
    model = ImplicitModel(
        input_dim=p, output_dim=q, hidden_dim=n,
        f=implicit_function_for(activation_fn, well_posed),
        kappa=kappa, mitr=max_iter, grad_mitr=max_iter, tol=atol, grad_tol=atol,
        activation=activation, negative_slope=slope, bias=bias_hidden is not None,
        d_scale=1.0,  # self.D is the fitted D
    ).to(device=A.device, dtype=A.dtype)
    with torch.no_grad():
        for name, value in zip("ABCD", (A, B, C, D)):
            getattr(model, name).copy_(value)
        if bias_hidden is not None:
            model.bias_hidden.copy_(bias_hidden)
            model.bias_out.copy_(bias_out)
    return model

