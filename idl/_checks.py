"""Argument checks shared by idl's modules: each says which argument is wrong
and what was expected (a TypeError for the wrong kind of value, a ValueError
for a value out of range)."""
import math
import operator

import torch

from .functional import as_float


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
