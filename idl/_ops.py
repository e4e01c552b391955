"""The idl:: ops: loading, fake (meta) kernels and autograd formulas.

The compiled ops are registered in C++ (csrc/ops.cpp); the attention ops, whose
kernels are Python (idl/_attention_kernels.py), are declared here. This module
adds what torch needs around them all: shape-only fake kernels (for
torch.compile and meta tensors) and the backward formulas, so each op is
differentiable on its own.
"""
import math
import warnings

import torch

from . import _C  # noqa: F401  (loading the library registers torch.ops.idl)
from . import _attention_kernels as kernels
from ._attention_kernels import check_op_args
from ._stats import ImplicitFunctionWarning, is_traced

ops = torch.ops.idl


# ---- fake kernels ------------------------------------------------------------
#
# They run for meta and fake tensors, and whenever any argument is a meta
# tensor, so they check what the C++ glue checks (a mix of devices would
# otherwise return uninitialised CPU memory) and return what it returns:
# contiguous outputs, whatever the layout of the inputs.


def _check_matrix(t, name):
    torch._check_value(t.dim() == 2, lambda: f"idl: {name} must be a 2-D tensor, got {t.dim()}-D")
    torch._check_type(t.dtype in (torch.float32, torch.float64),
                      lambda: f"idl: {name} must be float32 or float64, got {t.dtype}")


def _check_same_kind(t, ref, name, ref_name):
    torch._check_type(t.dtype == ref.dtype,
                      lambda: f"idl: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")
    torch._check_value(t.device == ref.device,
                       lambda: f"idl: {name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_same(t, ref, name, ref_name):
    _check_same_kind(t, ref, name, ref_name)
    torch._check_value(t.shape == ref.shape,
                       lambda: f"idl: {name} must have shape {list(ref.shape)}, got {list(t.shape)}")


def _check_square_with(A, rows, rows_name):
    _check_matrix(A, "A")
    _check_matrix(rows, rows_name)
    _check_same_kind(rows, A, rows_name, "A")
    torch._check_value(A.shape[0] == A.shape[1], lambda: f"idl: A must be square, got {list(A.shape)}")
    torch._check_value(rows.shape[1] == A.shape[0], lambda: (
        f"idl: {rows_name} must have {A.shape[0]} columns (the hidden size), got {rows.shape[1]}"))


def _contiguous_like(t):
    return torch.empty_like(t, memory_format=torch.contiguous_format)


# ---- projection ------------------------------------------------------------


@torch.library.register_fake("idl::project_linf")
def _(A, kappa, mode):
    _check_matrix(A, "A")
    return _contiguous_like(A)


@torch.library.register_fake("idl::project_linf_backward")
def _(grad, A, kappa, mode):
    _check_matrix(A, "A")
    _check_same(grad, A, "grad", "A")
    return _contiguous_like(A)


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
    _check_square_with(A, C0, "C0")
    if X0 is not None:
        _check_same(X0, C0, "X0", "C0")
    return _contiguous_like(C0), _contiguous_like(C0), _stats_like(C0)


@torch.library.register_fake("idl::fixed_point_adjoint")
def _(A, Z, G, activation, slope, max_iter, tol, method="picard", memory=5):
    _check_square_with(A, Z, "Z")
    _check_same(G, Z, "G", "Z")
    return _contiguous_like(Z), _stats_like(Z)


@torch.library.register_fake("idl::fixed_point_rel")
def _(A, C0, X0, activation, slope, max_iter, tol, rtol, method, memory):
    _check_square_with(A, C0, "C0")
    if X0 is not None:
        _check_same(X0, C0, "X0", "C0")
    return _contiguous_like(C0), _contiguous_like(C0), _stats_like(C0)


@torch.library.register_fake("idl::fixed_point_adjoint_rel")
def _(A, Z, G, activation, slope, max_iter, tol, rtol, method, memory):
    _check_square_with(A, Z, "Z")
    _check_same(G, Z, "G", "Z")
    return _contiguous_like(Z), _stats_like(Z)


@torch.library.register_fake("idl::phantom_adjoint")
def _(A, Z, G, activation, slope, steps, tau):
    _check_square_with(A, Z, "Z")
    _check_same(G, Z, "G", "Z")
    return _contiguous_like(Z), _stats_like(Z)


# idl::fixed_point's autograd is C++ (csrc/implicit_layer.cpp, FixedPoint),
# the same implicit differentiation as idl::implicit_layer's backward.


# ---- SIM's prox (csrc/sim_ops.cpp) ---------------------------------------------


@torch.library.register_fake("idl::prox_l1_ball")
def _(W, threshold, radius, ball_cols):
    _check_matrix(W, "W")
    torch._check_value(threshold.dim() == 1 and threshold.shape[0] == W.shape[0], lambda: (
        f"idl: threshold must be a 1-D tensor with one entry per row of W ({W.shape[0]}), "
        f"got shape {list(threshold.shape)}"))
    _check_same_kind(threshold, W, "threshold", "W")
    return _contiguous_like(W)


# ---- attention (kernels: idl/_attention_kernels.py) ---------------------------
#
# Custom ops, so that torch.compile(fullgraph=True) sees one opaque call per
# solve (the loops inside stop on data) and traces around it from the fake
# kernels.


def _attention_op(name):
    """The op idl::``name`` of the kernel ``name``, its schema read from the
    kernel's annotations."""
    return torch.library.custom_op(f"idl::{name}", mutates_args=())(getattr(kernels, name))


attention_solve = _attention_op("attention_solve")
attention_adjoint = _attention_op("attention_adjoint")
attention_value_solve = _attention_op("attention_value_solve")
attention_value_adjoint = _attention_op("attention_value_adjoint")


@attention_solve.register_fake
def _(A, C0, attention, max_iter, tol, grad_max_iter, grad_tol, method, memory, mask=None, causal=True,
      bounded=False):
    check_op_args({"A": A, "C0": C0}, attention, max_iter, tol, method, memory, mask)
    return C0.new_empty(C0.shape[:-1] + (A.shape[-1],)), torch.empty(2, 3, dtype=torch.float64)


@attention_adjoint.register_fake
def _(A, C0, X, G, attention, max_iter, tol, method, memory, mask=None, causal=True, bounded=False):
    check_op_args({"A": A, "C0": C0, "X": X, "G": G}, attention, max_iter, tol, method, memory, mask)
    return A.new_empty(A.shape), C0.new_empty(C0.shape), torch.empty(3, dtype=torch.float64)


@attention_value_solve.register_fake
def _(Avv, Avo, Cp, Wt, squashed, max_iter, tol, grad_max_iter, grad_tol, method, memory):
    check_op_args({"Avv": Avv, "Avo": Avo, "Cp": Cp, "Wt": Wt}, "softmax", max_iter, tol, method, memory)
    return Cp.new_empty(Cp.shape), torch.empty(2, 3, dtype=torch.float64)


@attention_value_adjoint.register_fake
def _(Avv, Avo, Wt, v, G, squashed, max_iter, tol, method, memory):
    return (Avv.new_empty(Avv.shape), Avo.new_empty(Avo.shape), v.new_empty(v.shape), Wt.new_empty(Wt.shape),
            torch.empty(3, dtype=torch.float64))


def _report_adjoint(ctx, stats, grads):
    """The adjoint's stats into row 1 of the forward's, and a warning where it
    diverged and its kernel returned zero gradients (eager only: a traced
    solve's stats hold no values)."""
    if is_traced(ctx.stats):
        return
    ctx.stats[1] = stats
    residual = stats[1].item()
    if (not math.isfinite(residual) or not stats[2].item()) and not any(torch.any(g).item() for g in grads):
        warnings.warn(
            f"idl: the attention adjoint solve diverged (residual {residual:.3e}): this layer's "
            "gradient is set to zero for this step rather than handed to the optimizer",
            ImplicitFunctionWarning, stacklevel=3)


def _attention_setup(ctx, inputs, output):
    A, C0, attention, _max_iter, _tol, grad_max_iter, grad_tol, method, memory, mask, causal, bounded = inputs
    X, stats = output
    ctx.save_for_backward(A, C0, X)
    ctx.mask = mask
    ctx.settings = (attention, grad_max_iter, grad_tol, method, memory)
    ctx.flags = (causal, bounded)
    ctx.stats = stats
    ctx.mark_non_differentiable(stats)


def _attention_backward(ctx, grad_X, _grad_stats):
    A, C0, X = ctx.saved_tensors
    grad_A, grad_C0, stats = attention_adjoint(A, C0, X, grad_X, *ctx.settings, ctx.mask, *ctx.flags)
    _report_adjoint(ctx, stats, (grad_A, grad_C0))
    return grad_A, grad_C0, None, None, None, None, None, None, None, None, None, None


def _value_setup(ctx, inputs, output):
    Avv, Avo, Cp, Wt, squashed, _max_iter, _tol, grad_max_iter, grad_tol, method, memory = inputs
    v, stats = output
    ctx.save_for_backward(Avv, Avo, Wt, v)
    ctx.settings = (squashed, grad_max_iter, grad_tol, method, memory)
    ctx.stats = stats
    ctx.mark_non_differentiable(stats)


def _value_backward(ctx, grad_v, _grad_stats):
    Avv, Avo, Wt, v = ctx.saved_tensors
    grad_Avv, grad_Avo, grad_Cp, grad_Wt, stats = attention_value_adjoint(Avv, Avo, Wt, v, grad_v, *ctx.settings)
    _report_adjoint(ctx, stats, (grad_Avv, grad_Avo, grad_Cp, grad_Wt))
    return grad_Avv, grad_Avo, grad_Cp, grad_Wt, None, None, None, None, None, None, None


attention_solve.register_autograd(_attention_backward, setup_context=_attention_setup)
attention_value_solve.register_autograd(_value_backward, setup_context=_value_setup)


# ---- the backward ops themselves -------------------------------------------
#
# They are not differentiable. Saying so gives a clear error on a second
# derivative (and keeps their kernels below autograd, where ATen's GEMM does
# not object to inputs that require grad), where torch's fallback would warn
# and return no gradient at all.


def not_differentiable(name):
    """An autograd formula that refuses: for ops that are differentiable once."""
    def backward(ctx, *grads):
        raise NotImplementedError(
            f"{name} is not differentiable: idl's implicit backward is differentiable once"
        )

    return backward


# idl::fixed_point_rel is the forward solve of idl::implicit_layer (which
# differentiates it itself) when a relative tolerance or method "auto" is set.
for _name in ("project_linf_backward", "fixed_point_adjoint", "fixed_point_rel",
              "fixed_point_adjoint_rel", "phantom_adjoint", "attention_adjoint", "attention_value_adjoint"):
    torch.library.register_autograd(f"idl::{_name}", not_differentiable(f"idl::{_name}"))


# ---- the RNN recurrence (csrc/implicit_rnn.cpp) ------------------------------
#
# idl::implicit_rnn: a whole ImplicitRNNCell sequence as one op, its backward
# (backpropagation through time) in C++. The fake kernel checks what the C++
# glue checks before it solves: x (batch, T, input), h0 (batch, hidden),
# lengths (batch) int64, and the layer's matrices for a step input [x_t, h_{t-1}] of input + hidden
# columns.


def _check_shape(t, shape, name, what):
    torch._check_value(tuple(t.shape) == tuple(shape),
                       lambda: f"idl: {name} must have shape {list(shape)} ({what}), got {list(t.shape)}")


@torch.library.register_fake("idl::implicit_rnn")
def _(x, h0, A, B, C, D, bias_hidden, bias_out, lengths, well_posed, kappa, activation, slope, max_iter,
      tol, grad_max_iter, grad_tol, method, memory, rtol=0.0, grad_rtol=0.0, backward="implicit",
      phantom_steps=5, phantom_tau=0.5, on_nonconvergence="warn", d_scale=1.0):
    torch._check_value(x.dim() == 3, lambda: f"idl: x must be a 3-D tensor (batch, seq_len, input), got {x.dim()}-D")
    _check_matrix(A, "A")
    torch._check_value(A.shape[0] == A.shape[1], lambda: f"idl: A must be square, got {list(A.shape)}")
    batch, steps, inputs = x.shape
    n, hidden = A.shape[0], C.shape[0]
    torch._check_value(steps >= 1, lambda: "idl: x must hold at least one time step")
    _check_same_kind(x, A, "x", "A")
    for t, name, shape, what in ((B, "B", (n, inputs + hidden), "hidden size, input + hidden"),
                                 (C, "C", (hidden, n), "hidden, hidden size"),
                                 (D, "D", (hidden, inputs + hidden), "hidden, input + hidden"),
                                 (h0, "h0", (batch, hidden), "batch, hidden"),
                                 (bias_hidden, "bias_hidden", (n,), "hidden size"),
                                 (bias_out, "bias_out", (hidden,), "hidden")):
        if t is not None:
            _check_same_kind(t, A, name, "A")
            _check_shape(t, shape, name, what)
    if lengths is not None:
        torch._check_type(lengths.dtype == torch.int64, lambda: f"idl: lengths must be int64, got {lengths.dtype}")
        torch._check_value(lengths.device == x.device,
                           lambda: f"idl: lengths is on {lengths.device} but x is on {x.device}")
        _check_shape(lengths, (batch,), "lengths", "batch")
    return (x.new_empty(batch, steps, hidden), x.new_empty(2, 3, dtype=torch.float64),
            x.new_empty(steps, 2, 3, dtype=torch.float64))
