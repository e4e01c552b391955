"""What a solve did, and what happens when it did not converge: the one
channel through which every solve of idl reports.

A solve's stats are data: a float64 tensor of shape (2, 3) that the op (or the
Python-driven solve) returns, row 0 for the forward solve and row 1 for the
backward (adjoint) solve, each [iterations, residual, converged]. The
converged column is a code (``CRITERIA``): 0 not converged, 1 every sample met
the absolute test (residual <= tol), 2 some sample stopped on the relative
part of the test (tol < residual <= tol + rtol ||x||_inf), 3 a fixed number of
steps with no test to meet (the "phantom" and "jfb" backward modes); row 1 is
[-1, 0, 0] (no iterations: not run) until the backward pass has run and
written it. ``SolveStats`` reads that tensor. :func:`report_solve` warns
(``ImplicitFunctionWarning``) or raises (``SolveNotConverged``) for a row
whose solve did not converge, as the caller asked: idl::implicit_layer calls
it from C++ for its own two solves, and only then; for the Python-driven
solves :func:`watch` reports the forward row at once and the backward row
when the backward pass of the solve's outputs has run.
"""
import math
import warnings
from typing import Iterable, List, Optional

import torch

NONCONVERGENCE_POLICIES = ("warn", "raise")


class ImplicitFunctionWarning(RuntimeWarning):
    """A fixed-point solve (forward or backward) stopped before converging."""


class SolveNotConverged(RuntimeError):
    """A fixed-point solve stopped before converging, and the caller asked for
    an error rather than a warning (``on_nonconvergence="raise"``). ``stats``:
    the stats tensor of the solve (None where the reporter had none), so that
    a module that raised still says what its solve did."""

    def __init__(self, message: str, stats: Optional[torch.Tensor] = None) -> None:
        super().__init__(message)
        self.stats = stats


#: The row of a solve that has not run (-1 iterations). Not NaN: NaN would
#: never compare equal, and a residual of NaN already means a NaN iterate.
NOT_RUN = (-1.0, 0.0, 0.0)


def new_stats(like: torch.Tensor) -> torch.Tensor:
    """A stats tensor of two solves not run yet, on ``like``'s device."""
    return torch.tensor([NOT_RUN, NOT_RUN], dtype=torch.float64, device=like.device)


def is_traced(t: torch.Tensor) -> bool:
    """Whether t is being traced (torch.compile, torch.export, AOTAutograd,
    FakeTensorMode) rather than holding data. A backward does not write its
    stats into a traced tensor: a compiled graph reports none, and the write
    would be a mutation of a forward output."""
    return (torch.compiler.is_compiling() or type(t) is not torch.Tensor
            or torch._is_functional_tensor(t))


def _has_values(stats: torch.Tensor) -> bool:
    """False while a graph is being traced or on the meta device: there is no
    value to read."""
    return not (is_traced(stats) or stats.is_meta)


#: What ended a solve, by the code in the converged column.
CRITERIA = {0: None, 1: "tol", 2: "rtol", 3: "steps"}


def _record(values) -> Optional[dict]:
    iterations, residual, converged = values
    if iterations < 0:  # not run
        return None
    return {"iterations": int(iterations), "residual": residual, "converged": bool(converged),
            "criterion": CRITERIA.get(int(converged), None)}


def report_solve(row: torch.Tensor, what: str, on_nonconvergence: str,
                 stats: Optional[torch.Tensor] = None) -> Optional[dict]:
    """Read one row of stats [iterations, residual, converged] (``what`` is
    "forward" or "backward") and warn or raise if that solve did not converge;
    ``stats``, the whole stats tensor the row belongs to, goes with the
    exception. Returns the row's record, None when there is nothing to read."""
    if not _has_values(row):
        return None
    record = _record(row.tolist())
    if record is None or record["converged"]:
        return record
    residual = record["residual"]
    if not math.isfinite(residual):
        reason = "the iterate stopped being finite (NaN or Inf)"
    else:
        reason = "the iteration limit was reached"
    message = (
        f"idl: {what} fixed-point solve did not converge: {reason}; "
        f"iterations={record['iterations']}, residual={residual:.3e}"
    )
    if on_nonconvergence == "raise":
        raise SolveNotConverged(message, stats)
    warnings.warn(message, ImplicitFunctionWarning, stacklevel=4)
    return record


def watch(stats: torch.Tensor, on_nonconvergence: str, output: Optional[torch.Tensor]) -> None:
    """Report the forward solve of ``stats`` now, and its backward solve once
    the backward pass through ``output`` (an output of the solve) has run.
    ``output`` None: the solve's backward reports itself. (idl::implicit_layer
    reports both of its solves itself, calling report_solve only for one that
    did not converge: reading the forward row here cost ~3 us a step, and a
    hook on the autograd node ~25 us.)"""
    report_solve(stats[0], "forward", on_nonconvergence, stats)
    node = None if output is None else output.grad_fn
    if node is None or not _has_values(stats):
        return

    def report_backward(grad_inputs, grad_outputs):  # returns None: grads unchanged
        report_solve(stats[1], "backward", on_nonconvergence, stats)

    node.register_hook(report_backward)


def _merged_criterion(criteria):
    """None if any solve did not converge, else the loosest test that ended one."""
    if any(c is None for c in criteria):
        return None
    for loosest in ("steps", "rtol"):
        if loosest in criteria:
            return loosest
    return "tol"


class SolveStats:
    """What the last solves of a module did: ``forward`` and ``backward`` are
    dicts with ``iterations``, ``residual`` (the largest final per-sample
    residual; NaN or Inf when an iterate stopped being finite), ``converged``
    and ``criterion``: what ended it, ``"tol"`` (every sample met the absolute
    tolerance), ``"rtol"`` (some sample stopped on the relative part),
    ``"steps"`` (a phantom/JFB backward: a fixed number of steps, no test) or
    None (not converged); ``backward`` is None until a backward pass has run.

    It reads the stats tensors of one or more solves (merged: the most
    iterations any took, the largest residual, whether all converged; the
    backward is known once every solve has run its backward pass)."""

    def __init__(self, stats: Iterable[torch.Tensor]) -> None:
        self.tensors: List[torch.Tensor] = list(stats)

    def _row(self, index: int) -> Optional[dict]:
        if not all(_has_values(t) for t in self.tensors):
            return None
        records = [_record(t[index].tolist()) for t in self.tensors]
        if not records or any(r is None for r in records):
            return None
        return {
            "iterations": max(r["iterations"] for r in records),
            "residual": max((r["residual"] for r in records),
                            key=lambda x: math.inf if math.isnan(x) else x),
            "converged": all(r["converged"] for r in records),
            "criterion": _merged_criterion([r["criterion"] for r in records]),
        }

    @property
    def forward(self) -> Optional[dict]:
        return self._row(0)

    @property
    def backward(self) -> Optional[dict]:
        return self._row(1)

    def __repr__(self) -> str:
        return f"SolveStats(forward={self.forward}, backward={self.backward})"

    def __eq__(self, other) -> bool:
        if not isinstance(other, SolveStats):
            return NotImplemented
        return (self.forward, self.backward) == (other.forward, other.backward)


def merge_stats(parts: Iterable[Optional[SolveStats]]) -> Optional[SolveStats]:
    """One SolveStats over the solves of several (None for none, or when any
    part went unreported, as in a compiled graph)."""
    parts = list(parts)
    if not parts or any(p is None for p in parts):
        return None
    return SolveStats(t for p in parts for t in p.tensors)
