"""Property-based tests (hypothesis) of the projection, the fixed-point solve
and its gradient, over random shapes (1x1, zero rows, empty batches), kappa,
activations, dtypes, magnitudes from tiny to huge, and memory layouts
(non-contiguous, transposed).

Hypothesis draws the structure (shapes, kappa, scale, layout, a seed); the
values come from a seeded generator, so they are continuous and stay away from
the measure-zero kinks where derivatives are ambiguous. The default profile is
derandomized (the same examples every run, as CI wants); run with
HYPOTHESIS_PROFILE=soak for many more, random ones.
"""
import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import idl
from reference import implicit_vjp, phi, picard, project_rows_l1, project_scale

settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("soak", max_examples=1000, deadline=None, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DTYPES = {"float32": torch.float32, "float64": torch.float64}
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps}
LAYOUTS = ("contiguous", "transposed", "strided", "padded")

kappas = st.floats(min_value=0.01, max_value=1.0)
seeds = st.integers(0, 2**31 - 1)
layouts = st.sampled_from(LAYOUTS)
activations = st.sampled_from(idl.ACTIVATIONS)


def random_values(shape, seed, dtype, scale=1.0, zeros=False):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if zeros:  # exact zeros in about a third of the places
        values[torch.rand(shape, generator=g) < 1 / 3] = 0
    return values.to(dtype)


def laid_out(values, layout):
    """The same matrix in another memory layout (a view, never contiguous
    unless the shape makes it so)."""
    rows, cols = values.shape
    if layout == "transposed":
        return values.t().contiguous().t()
    if layout == "strided":
        wide = values.new_full((rows, 2 * cols), float("nan"))
        wide[:, ::2] = values
        return wide[:, ::2]
    if layout == "padded":
        wide = values.new_full((rows, cols + 3), float("nan"))
        wide[:, :cols] = values
        return wide[:, :cols]
    return values


# ---- projection ------------------------------------------------------------


@given(
    # magnitudes up to 1e12: far beyond, kappa is lost to rounding next to the
    # entries (see test_projection_of_huge_rows_is_finite)
    rows=st.integers(0, 9), cols=st.integers(0, 9), kappa=kappas,
    log_scale=st.floats(-30, 12), dtype=st.sampled_from(list(DTYPES)),
    mode=st.sampled_from(idl.PROJECTIONS), layout=layouts, zeros=st.booleans(), seed=seeds,
)
@example(rows=1, cols=1, kappa=0.5, log_scale=1.0, dtype="float64", mode="exact",
         layout="contiguous", zeros=False, seed=0)
@example(rows=0, cols=4, kappa=0.5, log_scale=0.0, dtype="float32", mode="exact",
         layout="transposed", zeros=False, seed=0)
def test_projection_matches_reference_and_is_feasible(rows, cols, kappa, log_scale, dtype, mode,
                                                      layout, zeros, seed):
    dtype = DTYPES[dtype]
    A = random_values((rows, cols), seed, dtype, 10.0**log_scale, zeros)
    P = idl.project_linf(laid_out(A, layout), kappa, mode)
    assert P.shape == A.shape and P.dtype == dtype and P.is_contiguous()
    reference = project_rows_l1 if mode == "exact" else project_scale
    want = reference(A.double(), kappa) if A.numel() else A.double()
    size = A.abs().max().item() if A.numel() else 0.0
    atol = 8 * EPS[dtype] * (size + kappa) * max(cols, 1)
    torch.testing.assert_close(P.double(), want, atol=atol, rtol=0)
    assert torch.isfinite(P).all()
    # inside the ball, to rounding errors of the size of the entries
    assert (P.double().abs().sum(1) <= kappa + atol).all()
    assert (P * A >= 0).all()  # no sign ever flips
    # a projected matrix is a fixed point of the projection
    torch.testing.assert_close(idl.project_linf(P, kappa, mode), P, atol=atol, rtol=0)


@given(
    rows=st.integers(1, 6), cols=st.integers(1, 6), kappa=kappas,
    log_scale=st.floats(-3, 3), mode=st.sampled_from(idl.PROJECTIONS), layout=layouts,
    zeros=st.booleans(), seed=seeds,
)
@example(rows=1, cols=1, kappa=0.3, log_scale=1.0, mode="exact", layout="contiguous",
         zeros=False, seed=1)
def test_projection_gradient_matches_autograd_of_reference(rows, cols, kappa, log_scale, mode,
                                                           layout, zeros, seed):
    A = random_values((rows, cols), seed, torch.float64, 10.0**log_scale, zeros)
    G = random_values((rows, cols), seed + 1, torch.float64)
    a = laid_out(A, layout).requires_grad_(True)
    (got,) = torch.autograd.grad((idl.project_linf(a, kappa, mode) * G).sum(), a)
    a_ref = A.clone().requires_grad_(True)
    reference = project_rows_l1 if mode == "exact" else project_scale
    (want,) = torch.autograd.grad((reference(a_ref, kappa) * G).sum(), a_ref)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_projection_of_huge_rows_is_finite(dtype):
    A = torch.tensor([[1e30, -1e30, 5e29, 1.0], [1e17, 3.0, 0.0, -2.0]], dtype=dtype)
    P = idl.project_linf(A, 0.5)
    assert torch.isfinite(P).all() and (P.double().abs().sum(1) <= 0.5 * (1 + 1e-6)).all()


# ---- fixed-point solve -----------------------------------------------------


def contraction(n, kappa, seed, dtype, layout="contiguous"):
    A = random_values((n, n), seed, torch.float64)
    return laid_out(project_rows_l1(A * 10, kappa).to(dtype), layout)


def largest(t):
    return t.abs().max().item() if t.numel() else 0.0


def fixed_point_residual(A, C0, X, activation, slope):
    """||X - φ(X Aᵀ + C0)||_inf per sample, in float64."""
    A, C0, X = A.double(), C0.double(), X.double()
    return (X - phi(activation, X @ A.T + C0, slope)).abs().amax(1)


@given(
    m=st.integers(0, 7), n=st.integers(1, 6), kappa=st.floats(0.05, 0.95),
    activation=activations, slope=st.floats(0.0, 1.0), log_scale=st.floats(-30, 30),
    dtype=st.sampled_from(list(DTYPES)), a_layout=layouts, c_layout=layouts,
    warm=st.booleans(), seed=seeds,
)
@example(m=1, n=1, kappa=0.5, activation="relu", slope=0.0, log_scale=0.0, dtype="float64",
         a_layout="contiguous", c_layout="contiguous", warm=False, seed=0)
@example(m=0, n=3, kappa=0.9, activation="tanh", slope=0.0, log_scale=0.0, dtype="float32",
         a_layout="transposed", c_layout="strided", warm=True, seed=0)
def test_solve_reaches_the_fixed_point(m, n, kappa, activation, slope, log_scale, dtype, a_layout,
                                       c_layout, warm, seed):
    dtype = DTYPES[dtype]
    if dtype == torch.float32:
        log_scale = max(min(log_scale, 15.0), -15.0)  # inside float32's range, bound included
    scale = 10.0**log_scale
    A = contraction(n, kappa, seed, dtype, a_layout)
    C0 = laid_out(random_values((m, n), seed + 1, dtype, scale), c_layout)
    X0 = laid_out(random_values((m, n), seed + 2, dtype, scale), c_layout) if warm else None
    # |X| <= (|φ(0)| + |C0|) / (1 - kappa); the tolerance is a few rounding
    # errors of that size, which the iteration can always reach
    bound = (1 + largest(C0)) / (1 - kappa)
    tol = 16 * n * EPS[dtype] * bound
    X, Z, stats = torch.ops.idl.fixed_point(A, C0, X0, activation, slope, 100_000, tol, 10, tol)
    iterations, residual, converged = stats.tolist()
    assert converged == 1.0 and residual <= tol and iterations < 100_000
    assert X.shape == (m, n) and X.dtype == dtype and torch.isfinite(X).all()
    # X is the fixed point to within the contraction's error bound
    limit = 2 * tol / (1 - kappa) + 64 * n * EPS[dtype] * bound
    assert (fixed_point_residual(A, C0, X, activation, slope) <= limit).all()
    torch.testing.assert_close(Z.double(), X.double() @ A.double().T + C0.double(),
                               atol=limit, rtol=0)
    # samples are independent: a sample solved alone lands on the same point
    if m:
        alone, _, _ = torch.ops.idl.fixed_point(A, C0[-1:].contiguous(), None, activation, slope,
                                                100_000, tol, 10, tol)
        torch.testing.assert_close(alone[0].double(), X[-1].double(), atol=2 * limit, rtol=0)


@given(
    m=st.integers(0, 5), n=st.integers(1, 5), kappa=st.floats(0.05, 0.9), activation=activations,
    log_scale=st.floats(-2, 2), a_layout=layouts, c_layout=layouts, seed=seeds,
)
@example(m=1, n=1, kappa=0.5, activation="relu", log_scale=0.0, a_layout="contiguous",
         c_layout="contiguous", seed=0)
@example(m=0, n=2, kappa=0.5, activation="sigmoid", log_scale=0.0, a_layout="transposed",
         c_layout="transposed", seed=0)
def test_solve_gradient_matches_dense_implicit_differentiation(m, n, kappa, activation, log_scale,
                                                                a_layout, c_layout, seed):
    A = contraction(n, kappa, seed, torch.float64, a_layout).requires_grad_(True)
    C0 = laid_out(random_values((m, n), seed + 1, torch.float64, 10.0**log_scale),
                  c_layout).requires_grad_(True)
    G = random_values((m, n), seed + 2, torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", idl.ImplicitFunctionWarning)
        X, _, _ = torch.ops.idl.fixed_point(A, C0, None, activation, 0.1, 100_000, 1e-14,
                                            100_000, 1e-14)
        grad_A, grad_C0 = torch.autograd.grad((X * G).sum(), (A, C0))
    want_C0, want_A = implicit_vjp(A.detach(), X.detach(), C0.detach(), G, activation, 0.1)
    atol = 1e-11 / (1 - kappa) * (1 + largest(G))
    torch.testing.assert_close(grad_C0, want_C0, atol=atol, rtol=1e-9)
    torch.testing.assert_close(grad_A, want_A, atol=atol * (1 + largest(X)), rtol=1e-9)


# ---- the model end to end --------------------------------------------------


@given(
    batch=st.integers(0, 5), p=st.integers(1, 4), q=st.integers(1, 3), n=st.integers(1, 5),
    kappa=st.floats(0.05, 0.95), activation=activations, projection=st.sampled_from(idl.PROJECTIONS),
    bias=st.booleans(), no_D=st.booleans(), transposed_input=st.booleans(), seed=seeds,
)
@example(batch=0, p=1, q=1, n=1, kappa=0.5, activation="relu", projection="exact", bias=False,
         no_D=False, transposed_input=False, seed=0)
def test_model_output_matches_reference(batch, p, q, n, kappa, activation, projection, bias, no_D,
                                        transposed_input, seed):
    torch.manual_seed(seed)
    model = idl.ImplicitModel(p, q, n, kappa=kappa, activation=activation, negative_slope=0.1,
                              projection=projection, bias=bias, no_D=no_D, mitr=100_000,
                              tol=1e-13).double()
    with torch.no_grad():
        model.A.mul_(10)
    U = random_values((batch, p), seed + 1, torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", idl.ImplicitFunctionWarning)
        out = model(laid_out(U, "transposed") if transposed_input else U)
    reference = project_rows_l1 if projection == "exact" else project_scale
    A = reference(model.A.detach(), kappa)
    C0 = U @ model.B.detach().T + (model.bias_hidden.detach() if bias else 0)
    X = picard(A, C0, activation, slope=0.1) if batch else C0
    want = X @ model.C.detach().T + U @ model.D.detach().T + (model.bias_out.detach() if bias else 0)
    assert out.shape == (batch, q)
    torch.testing.assert_close(out.detach(), want, atol=1e-10 / (1 - kappa), rtol=1e-9)
