"""Argument checks shared by idl's modules: each says which argument is wrong
and what was expected (a TypeError for the wrong kind of value, a ValueError
for a value out of range)."""
import math
import operator
import warnings

import torch

from .functional import PROJECTIONS, as_float, check_kappa


def as_int(name, value) -> int:
    """``value`` as an int: any integer (numpy's too, as nn.Linear takes them),
    not a bool or a float."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def check_positive_int(name, value, allow_zero=False) -> int:
    value = as_int(name, value)
    if value < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '>= 1'}, got {value}")
    return value


def check_finite_float(name, value) -> float:
    value = as_float(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def autocasting(t: torch.Tensor) -> bool:
    if not torch._C._is_any_autocast_enabled():  # the common case, quickly
        return False
    device = t.device.type
    return torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)


def check_like(t: torch.Tensor, param: torch.Tensor, name: str) -> None:
    if not t.is_floating_point():
        raise TypeError(
            f"{name} has dtype {t.dtype}, but an implicit model computes in floating point; "
            f"convert it (e.g. {name}.to({param.dtype}))"
        )
    if t.dtype != param.dtype and not autocasting(t):
        raise TypeError(
            f"{name} has dtype {t.dtype} but the model's parameters are {param.dtype}; "
            f"convert one of them (e.g. model.to({t.dtype}))"
        )
    if t.device != param.device:
        raise ValueError(
            f"{name} is on {t.device} but the model's parameters are on {param.device}; "
            f"move one of them (e.g. model.to({str(t.device)!r}))"
        )


def check_well_posedness(kappa, projection, is_low_rank, rank, max_rank, max_rank_text):
    """Checks the settings that keep A well-posed (shared by every implicit
    layer): kappa in (0, 1], a known projection, and with is_low_rank a rank
    in [1, max_rank] (``max_rank_text`` says in the message what bounds it).
    A rank without is_low_rank is ignored, as torchidl does, with a warning.
    Returns kappa and rank as a float and an int (or None)."""
    kappa = check_kappa(kappa)
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if rank is not None and not is_low_rank:
        warnings.warn(f"rank={rank} is ignored: A is full rank unless is_low_rank=True",
                      UserWarning, stacklevel=3)
    if is_low_rank:
        if rank is None:
            raise ValueError("rank is required when is_low_rank=True")
        rank = check_positive_int("rank", rank)
        if rank > max_rank:
            raise ValueError(f"rank must be <= {max_rank_text}, got {rank}")
    return kappa, rank


def refuse_function_transforms(who: str) -> None:
    """A clear error under torch.func's transforms (vmap, grad, jacrev, jvp,
    ...), which the solves' autograd (a C++ autograd function, and Python
    ones without vmap rules) cannot serve: rather than torch's own message
    about C++ functions or data pointers."""
    if torch.compiler.is_compiling():  # dynamo runs transforms its own way
        return
    interpreter = torch._C._functorch.peek_interpreter_stack()
    if interpreter is None:
        return
    transform = str(interpreter.key()).rsplit(".", 1)[-1].lower()
    raise NotImplementedError(
        f"idl: {who} does not support torch.func transforms yet (called under torch.func's "
        f"{transform}): use torch.autograd.grad for gradients, and a loop over samples instead "
        "of vmap (an implicit layer is row-wise: a batch is already a loop over samples)"
    )
