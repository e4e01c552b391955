"""The compiled idl:: ops: loading, fake (meta) kernels and autograd formulas.

The ops themselves are registered in C++ (csrc/ops.cpp). This module adds what
torch needs around them: shape-only fake kernels (for torch.compile and meta
tensors) and the backward formulas, so each op is differentiable on its own.
"""
import contextvars
import warnings

import torch
from torch._subclasses.fake_tensor import is_fake

from . import _C  # noqa: F401  (loading the library registers torch.ops.idl)

ops = torch.ops.idl


class ImplicitFunctionWarning(RuntimeWarning):
    """A fixed-point solve (forward or backward) stopped before converging."""


class SolveNotConverged(RuntimeError):
    """A fixed-point solve stopped before converging, and the caller asked for
    an error rather than a warning (``on_nonconvergence="raise"``)."""


def report_solve(stats, what, on_nonconvergence, sink=None):
    """Read a solve's stats tensor [iterations, residual, converged], hand it to
    ``sink`` (a callable, or None) and warn or raise if it did not converge.
    While a graph is being traced (torch.compile, fake tensors) there is no
    value to read yet, and nothing is reported."""
    if torch.compiler.is_compiling() or is_fake(stats):
        return None
    iterations, residual, converged = stats.tolist()
    record = {"iterations": int(iterations), "residual": residual, "converged": bool(converged)}
    if sink is not None:
        sink(what, record)
    if not record["converged"]:
        if residual != residual or residual in (float("inf"), float("-inf")):
            reason = "the iterate stopped being finite (NaN or Inf)"
        else:
            reason = "the iteration limit was reached"
        message = (
            f"idl: {what} fixed-point solve did not converge: {reason}; "
            f"iterations={record['iterations']}, residual={residual:.3e}"
        )
        if on_nonconvergence == "raise":
            raise SolveNotConverged(message)
        warnings.warn(message, ImplicitFunctionWarning, stacklevel=3)
    return record


# Where the backward of the solve currently being recorded reports its stats
# and how it treats non-convergence. A model sets it around its forward call;
# the autograd context captures it, so the report reaches the right model even
# when several models run at once in different threads.
backward_reporting = contextvars.ContextVar("idl_backward_reporting", default=(None, "warn"))


# ---- projection ------------------------------------------------------------


@torch.library.register_fake("idl::project_linf")
def _(A, kappa, mode):
    return torch.empty_like(A, memory_format=torch.contiguous_format)


@torch.library.register_fake("idl::project_linf_backward")
def _(grad, A, kappa, mode):
    return torch.empty_like(A, memory_format=torch.contiguous_format)


def _project_setup(ctx, inputs, output):
    A, kappa, mode = inputs
    ctx.save_for_backward(A)
    ctx.kappa, ctx.mode = kappa, mode


def _project_backward(ctx, grad):
    (A,) = ctx.saved_tensors
    return ops.project_linf_backward(grad, A, ctx.kappa, ctx.mode), None, None


torch.library.register_autograd("idl::project_linf", _project_backward, setup_context=_project_setup)


# ---- fixed-point solve -----------------------------------------------------


def _stats_like(t):
    return t.new_empty(3, dtype=torch.float64)


@torch.library.register_fake("idl::fixed_point")
def _(A, C0, X0, activation, slope, max_iter, tol, grad_max_iter, grad_tol, method="picard", memory=5):
    return torch.empty_like(C0), torch.empty_like(C0), _stats_like(C0)


@torch.library.register_fake("idl::fixed_point_adjoint")
def _(A, Z, G, activation, slope, max_iter, tol, method="picard", memory=5):
    return torch.empty_like(Z), _stats_like(Z)


def _solve_setup(ctx, inputs, output):
    A, _C0, _X0, activation, slope, _mi, _tol, grad_max_iter, grad_tol, method, memory = inputs
    X, Z, _stats = output
    ctx.save_for_backward(A, X, Z)
    ctx.settings = (activation, slope, grad_max_iter, grad_tol, method, memory)
    ctx.reporting = backward_reporting.get()
    ctx.mark_non_differentiable(Z, _stats)


def _solve_backward(ctx, grad_X, _grad_Z, _grad_stats):
    """Implicit differentiation: with V = φ'(Z) ⊙ (V A + dL/dX), dL/dC0 = V and
    dL/dA = Vᵀ X. No iterate of the forward solve is needed."""
    A, X, Z = ctx.saved_tensors
    V, stats = ops.fixed_point_adjoint(A, Z, grad_X, *ctx.settings)
    sink, on_nonconvergence = ctx.reporting
    report_solve(stats, "backward", on_nonconvergence, sink)
    grad_A = V.t() @ X if ctx.needs_input_grad[0] else None
    return grad_A, V, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("idl::fixed_point", _solve_backward, setup_context=_solve_setup)
