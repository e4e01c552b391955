"""idl::fixed_point and idl::fixed_point_adjoint against whole-batch Picard and
dense implicit-gradient references."""
import re
import warnings

import pytest
import torch

import idl
from idl import _C
from idl import functional as F
from devices import DEVICES
from reference import dphi, implicit_vjp, phi, picard, project_rows_l1

ACTIVATIONS = list(idl.ACTIVATIONS)
TIGHT = F.SolverOptions(max_iter=10_000, tol=1e-13, grad_max_iter=10_000, grad_tol=1e-13)


def problem(m=6, n=5, kappa=0.9, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = project_rows_l1(torch.randn(n, n, generator=g, dtype=dtype), kappa)
    C0 = torch.randn(m, n, generator=g, dtype=dtype)
    return A, C0


def solve(A, C0, activation="relu", X0=None, slope=0.01, max_iter=10_000, tol=1e-13, method="picard", memory=5,
          device="cpu"):
    """The solve on `device`, its (X, Z, stats) back on the CPU."""
    on = [t.to(device) if t is not None else None for t in (A, C0, X0)]
    out = torch.ops.idl.fixed_point(*on, activation, slope, max_iter, tol, 100, 1e-10, method, memory)
    assert all(t.device.type == device for t in out)
    return tuple(t.cpu() for t in out)


def hard_problem(m=16, n=40, kappa=0.99, dtype=torch.float64):
    """A nonnegative A on the boundary of the ball: spectral radius ~ kappa, so
    Picard contracts slowly, as with trained weights."""
    g = torch.Generator().manual_seed(3)
    A = torch.rand(n, n, generator=g, dtype=dtype)
    A = kappa * A / A.sum(1, keepdim=True)
    return A, torch.randn(m, n, generator=g, dtype=dtype)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("device", DEVICES)
def test_forward_matches_picard_reference(activation, device):
    A, C0 = problem()
    X, Z, stats = solve(A, C0, activation, slope=0.1, device=device)
    torch.testing.assert_close(X, picard(A, C0, activation, slope=0.1), atol=1e-11, rtol=0)
    torch.testing.assert_close(Z, X @ A.T + C0, atol=1e-11, rtol=0)
    iterations, residual, converged = stats.tolist()
    assert converged == 1.0 and residual <= 1e-13 and 1 <= iterations < 10_000


@pytest.mark.parametrize("device", DEVICES)
def test_float32_close_to_float64(device):
    A, C0 = problem(m=40, n=30)
    X64, _, _ = solve(A, C0, tol=1e-12, device=device)
    X32, _, stats = solve(A.float(), C0.float(), tol=1e-6, device=device)
    assert stats[2] == 1.0
    torch.testing.assert_close(X32.double(), X64, atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_each_sample_stops_at_its_own_tolerance(device):
    A, C0 = problem(m=8)
    C0[:4] = 0  # these samples sit at X = 0 from the first iteration
    X, _, stats = solve(A, C0, tol=1e-10, device=device)
    assert (X[:4] == 0).all()
    torch.testing.assert_close(X, picard(A, C0, "relu"), atol=1e-9, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_warm_start_at_the_fixed_point_takes_one_iteration(device):
    A, C0 = problem()
    X, _, _ = solve(A, C0, device=device)
    X2, _, stats = solve(A, C0, X0=X, tol=1e-12, device=device)
    assert stats[0] == 1 and stats[2] == 1
    torch.testing.assert_close(X2, X, atol=1e-12, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_iteration_limit_reports_not_converged(device):
    A, C0 = problem(kappa=0.99)
    _, _, stats = solve(A, C0, "identity", max_iter=3, tol=0.0, device=device)
    iterations, residual, converged = stats.tolist()
    assert (iterations, converged) == (3, 0.0) and residual > 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["A", "C0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_stops_immediately(bad, where, dtype, device):
    A, C0 = (t.to(dtype) for t in problem())
    (A if where == "A" else C0)[2, 1] = bad
    X, _, stats = solve(A, C0, "identity", max_iter=500, device=device)
    iterations, residual, converged = stats.tolist()
    assert iterations == 0 and converged == 0.0  # found in the inputs, before iterating
    assert residual != residual and X.isnan().all()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    A, _ = problem()
    X, Z, stats = solve(A, torch.empty(0, 5, dtype=torch.float64), device=device)
    assert X.shape == (0, 5) and stats[2] == 1.0


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("device", DEVICES)
def test_anderson_reaches_the_same_fixed_point(activation, device):
    A, C0 = problem()
    X, Z, stats = solve(A, C0, activation, slope=0.1, method="anderson", device=device)
    torch.testing.assert_close(X, picard(A, C0, activation, slope=0.1), atol=1e-11, rtol=0)
    assert stats[2] == 1.0 and stats[1] <= 1e-13
    torch.testing.assert_close(Z, X @ A.T + C0, atol=1e-11, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_anderson_with_memory_one_is_picard(device):
    A, C0 = hard_problem()
    X1, _, s1 = solve(A, C0, "tanh", tol=1e-10, device=device)
    X2, _, s2 = solve(A, C0, "tanh", tol=1e-10, method="anderson", memory=1, device=device)
    torch.testing.assert_close(X1, X2, atol=0, rtol=0)
    assert s1.tolist() == s2.tolist()


# float32 carries ~7 digits and these states reach ~100: 1e-4 is its 1e-6
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("activation", ["identity", "tanh", "relu"])
@pytest.mark.parametrize("device", DEVICES)
def test_anderson_needs_at_most_half_of_picards_iterations(activation, dtype, tol, device):
    A, C0 = hard_problem(dtype=dtype)
    X_picard, _, picard_stats = solve(A, C0, activation, tol=tol, device=device)
    X_anderson, _, anderson_stats = solve(A, C0, activation, tol=tol, method="anderson", device=device)
    assert picard_stats[2] == 1.0 and anderson_stats[2] == 1.0
    assert anderson_stats[0] <= picard_stats[0] / 2
    # both residuals are <= tol; the fixed points then agree to tol / (1 - kappa)
    torch.testing.assert_close(X_anderson, X_picard, atol=tol / (1 - 0.99) * 2, rtol=0)


@pytest.mark.parametrize("method", ["picard", "anderson"])
@pytest.mark.parametrize("device", DEVICES)
def test_adjoint_methods_agree(method, device):
    A, C0 = hard_problem()
    X, Z, _ = solve(A, C0, "tanh", device=device)
    G = torch.randn_like(X)
    V, stats = (t.cpu() for t in torch.ops.idl.fixed_point_adjoint(
        A.to(device), Z.to(device), G.to(device), "tanh", 0.0, 10_000, 1e-12, method, 5))
    V_ref, _ = implicit_vjp(A, X, X @ A.T * 0 + (Z - X @ A.T), G, "tanh")
    torch.testing.assert_close(V, V_ref, atol=1e-9, rtol=0)
    assert stats[2] == 1.0


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_adjoint_matches_dense_solve(activation):
    A, C0 = problem()
    X, Z, _ = solve(A, C0, activation, slope=0.1)
    G = torch.randn_like(X)
    V, stats = torch.ops.idl.fixed_point_adjoint(A, Z, G, activation, 0.1, 10_000, 1e-13)
    V_ref, _ = implicit_vjp(A, X, C0, G, activation, slope=0.1)
    torch.testing.assert_close(V, V_ref, atol=1e-10, rtol=0)
    assert stats[2] == 1.0


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dphi_matches_torch_autograd(activation):
    # the adjoint with A = 0 and G = 1 returns φ'(Z) itself
    Z = torch.tensor([[-25.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 25.0]], dtype=torch.float64)
    A = torch.zeros(9, 9, dtype=torch.float64)
    V, _ = torch.ops.idl.fixed_point_adjoint(A, Z, torch.ones_like(Z), activation, 0.1, 5, 0.0)
    torch.testing.assert_close(V, dphi(activation, Z, 0.1))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_of_the_solve(activation):
    A, C0 = problem(m=3, n=4)
    A.requires_grad_(True)
    C0.requires_grad_(True)

    def f(A, C0):
        return torch.ops.idl.fixed_point(A, C0, None, activation, 0.1, *TIGHT.forward_args())[0]

    assert torch.autograd.gradcheck(f, (A, C0))


@pytest.mark.parametrize("method", ["picard", "anderson"])
def test_opcheck(method):
    A, C0 = problem(m=3, n=4)
    args = (A.requires_grad_(True), C0.requires_grad_(True), None, "tanh", 0.0, 500, 1e-12, 500, 1e-12, method, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", idl.ImplicitFunctionWarning)
        torch.library.opcheck(torch.ops.idl.fixed_point.default, args)
    X, Z, _ = solve(A.detach(), C0.detach(), "tanh")
    torch.library.opcheck(
        torch.ops.idl.fixed_point_adjoint.default,
        (A.detach(), Z, torch.randn_like(Z), "tanh", 0.0, 500, 1e-12, method, 3),
    )


@pytest.mark.parametrize("method", ["picard", "anderson"])
def test_python_path_matches_compiled_path(method):
    """A Python φ takes the Python-driven loop: same fixed point, same stats,
    same gradients as the compiled solve of the same activation."""
    A, C0 = hard_problem(m=7, n=6)
    options = F.SolverOptions(max_iter=500, tol=1e-10, grad_max_iter=500, grad_tol=1e-10, method=method)
    results = []
    for path in ("compiled", "python"):
        a, c0 = A.clone().requires_grad_(True), C0.clone().requires_grad_(True)
        if path == "compiled":
            X, _Z, forward = torch.ops.idl.fixed_point(a, c0, None, "tanh", 0.0, *options.forward_args())
            stats = torch.stack((forward, forward))  # its backward row: from the adjoint below
        else:
            X, stats = F.fixed_point_custom(a, c0, None, torch.tanh, lambda z: 1 - torch.tanh(z) ** 2, options)
        (X * torch.arange(6.0, dtype=X.dtype)).sum().backward()
        if path == "compiled":
            Z = X.detach() @ A.T + C0
            weights = torch.arange(6.0, dtype=X.dtype).expand_as(X).contiguous()
            _V, stats[1] = torch.ops.idl.fixed_point_adjoint(A, Z, weights, "tanh", 0.0, 500, 1e-10, method, 5)
        records = dict(zip(("forward", "backward"), (idl._stats._record(r) for r in stats.tolist())))
        results.append((X.detach(), a.grad, c0.grad, records))
    (X1, gA1, gC1, r1), (X2, gA2, gC2, r2) = results
    torch.testing.assert_close(X1, X2, atol=1e-11, rtol=0)
    torch.testing.assert_close(gA1, gA2, atol=1e-11, rtol=0)
    torch.testing.assert_close(gC1, gC2, atol=1e-11, rtol=0)
    for what in ("forward", "backward"):
        assert r1[what]["iterations"] == r2[what]["iterations"]
        assert r1[what]["converged"] and r2[what]["converged"]
        assert abs(r1[what]["residual"] - r2[what]["residual"]) < 1e-11


@pytest.mark.parametrize(
    "args, error, words",
    [
        ((torch.randn(4, 3), torch.randn(2, 4)), ValueError, "square"),
        ((torch.randn(4, 4), torch.randn(2, 3)), ValueError, "columns"),
        ((torch.randn(4, 4), torch.randn(2, 4, dtype=torch.float64)), TypeError, "dtype"),
        ((torch.randn(4, 4), torch.randn(2, 4).int()), TypeError, "float32 or float64"),
        ((torch.randn(4, 4), torch.randn(4)), ValueError, "2-D"),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_bad_input(args, error, words, device):
    with pytest.raises(error, match=words):
        torch.ops.idl.fixed_point(*(t.to(device) for t in args), None, "relu", 0.0, 10, 1e-6, 10, 1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_settings(device):
    A, C0 = problem()
    with pytest.raises(ValueError, match="unknown activation"):
        solve(A, C0, "gelu", device=device)
    with pytest.raises(ValueError, match="max_iter"):
        solve(A, C0, max_iter=0, device=device)
    with pytest.raises(ValueError, match="tol"):
        solve(A, C0, tol=-1.0, device=device)
    with pytest.raises(ValueError, match="X0 must have shape"):
        solve(A, C0, X0=torch.zeros(2, 5, dtype=torch.float64), device=device)
    with pytest.raises(ValueError, match="method"):
        solve(A, C0, method="newton", device=device)
    with pytest.raises(ValueError, match="memory"):
        solve(A, C0, method="anderson", memory=0, device=device)
    with pytest.raises(ValueError, match="memory"):
        solve(A, C0, method="anderson", memory=17, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_one_solver_registry(device):
    """The method names and Anderson's limits are csrc/idl.h's, which idl._C
    exposes and idl.functional takes; the Python options and the compiled op
    accept and refuse the same methods and memories, in the same words."""
    assert F.METHODS == _C.SOLVER_METHODS == ("picard", "anderson", "auto")
    for name in ("ANDERSON_MAX_MEMORY", "ANDERSON_REGULARIZATION", "ANDERSON_MAX_RESTARTS",
                 "AUTO_SWITCH_RATIO", "AUTO_SWITCH_PATIENCE"):
        assert getattr(F, name) == getattr(_C, name)
    A, C0 = problem()
    refusal = re.escape(f"must be one of {_C.SOLVER_METHODS}, got 'newton'")
    with pytest.raises(ValueError, match="^solver " + refusal):
        F.SolverOptions(method="newton")
    with pytest.raises(ValueError, match="^idl: method " + refusal):
        solve(A, C0, method="newton", device=device)
    most = _C.ANDERSON_MAX_MEMORY
    for method in _C.SOLVER_METHODS:
        F.SolverOptions(method=method, memory=most)
        assert solve(A, C0, method=method, memory=most, device=device)[2][2] == 1.0
        with pytest.raises(ValueError, match=f"memory must be <= {most}, got {most + 1}"):
            F.SolverOptions(method=method, memory=most + 1)
        if method != "picard":  # the op reads memory only where it mixes
            with pytest.raises(ValueError, match=re.escape(f"memory must be in [1, {most}], got {most + 1}")):
                solve(A, C0, method=method, memory=most + 1, device=device)


@pytest.mark.parametrize("method", ["picard", "anderson"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("device", DEVICES)
def test_unconverged_solve_still_has_x_equal_phi_of_z(activation, method, device):
    """Stopped by max_iter, X = φ(Z) still holds (idl.h): Anderson's next
    iterate is a mix whose Z was never formed, so it is not the answer."""
    A, C0 = problem(m=8, n=10, kappa=0.95)
    X, Z, stats = solve(A, C0, activation, slope=0.1, max_iter=5, tol=1e-12, method=method,
                        device=device)
    assert stats.tolist()[::2] == [5.0, 0.0]
    torch.testing.assert_close(X, phi(activation, Z, 0.1), rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_width_solve_takes_no_iteration(device):
    A = torch.empty(0, 0, dtype=torch.float64, device=device)
    C0 = torch.empty(4, 0, dtype=torch.float64, device=device)
    X, Z, stats = torch.ops.idl.fixed_point(A, C0, None, "tanh", 0.0, 100, 1e-10, 100, 1e-10)
    assert X.shape == Z.shape == (4, 0)
    assert stats.tolist() == [0.0, 0.0, 1.0]
    V, stats = torch.ops.idl.fixed_point_adjoint(A, Z, torch.empty_like(Z), "tanh", 0.0, 100, 1e-10)
    assert V.shape == (4, 0)
    assert stats.tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("device", DEVICES)
def test_nan_in_A_is_found_before_the_forward_and_in_the_adjoints_second_iteration(device):
    """The forward solve looks at A before iterating (0 iterations, NaN out);
    the adjoint, whose A the forward has seen, skips its first product from
    zero (one GEMM fewer), so a NaN shows in its second iteration. The same on
    every device."""
    A, C0 = problem(m=5, n=6)
    _, Z, _ = solve(A, C0, "tanh")
    A[1, 2] = float("nan")
    A, C0, Z = A.to(device), C0.to(device), Z.to(device)
    X, _, stats = torch.ops.idl.fixed_point(A, C0, None, "tanh", 0.0, 100, 1e-10, 100, 1e-10)
    iterations, residual, converged = stats.tolist()
    assert (iterations, converged) == (0.0, 0.0) and residual != residual and X.isnan().all()
    _, stats = torch.ops.idl.fixed_point_adjoint(A, Z, torch.ones_like(Z), "tanh", 0.0, 100, 1e-10)
    iterations, residual, converged = stats.tolist()
    assert (iterations, converged) == (2.0, 0.0) and residual != residual


@pytest.fixture
def failing_cpu_gemm():
    """aten::mm.out on CPU, which the solves' GEMM calls, replaced by one that
    raises on its third call; yields the list of the calls' row counts."""
    calls = []

    def mm_out(self, mat2, *, out):
        calls.append(self.shape[0])
        if len(calls) == 3:
            raise RuntimeError("GEMM failed on purpose")
        return out.copy_(torch.mm(self, mat2))

    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        lib.impl("mm.out", mm_out, "CPU")
    try:
        yield calls
    finally:
        lib._destroy()


@pytest.mark.parametrize("method", ["picard", "anderson"])
def test_gemm_error_inside_a_solve_is_raised_once_and_stops_it(failing_cpu_gemm, method):
    """The exception crosses no C frame: it is kept, the solve stops at once,
    and the op raises it. (40 x 20 x 20: large enough for ATen's GEMM; the
    smallest products never call it, see the next test.)"""
    A, C0 = problem(m=40, n=20)
    with pytest.raises(RuntimeError, match="GEMM failed on purpose"):
        solve(A, C0, "tanh", X0=torch.zeros_like(C0), method=method)
    assert len(failing_cpu_gemm) == 3
    failing_cpu_gemm.clear()
    with pytest.raises(RuntimeError, match="GEMM failed on purpose"):
        torch.ops.idl.fixed_point_adjoint(A, C0, C0, "tanh", 0.0, 100, 1e-12, method, 5)
    assert len(failing_cpu_gemm) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_products_are_computed_in_c_and_match_atens_for_any_strides(failing_cpu_gemm, dtype):
    """Products of at most 2^12 multiply-adds (aten_matmul.h) are
    idl_small_matmul's: no ATen GEMM is called, and the forward (Aᵀ, a view
    the glue copies row-major once per solve), the adjoint (A, row-major) and
    a strided A agree with torch.mm's iterations."""
    A, C0 = problem(m=8, n=9, dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    big = torch.zeros(18, 27, dtype=dtype)
    big[::2, ::3] = A
    strided = big[::2, ::3]
    assert strided.stride() == (54, 3)
    for a in (A, strided, A.t().contiguous().t()):
        X, Z, stats = torch.ops.idl.fixed_point(a, C0, None, "tanh", 0.0, 500, tol, 500, tol)
        V, _ = torch.ops.idl.fixed_point_adjoint(a, Z, C0, "tanh", 0.0, 500, tol)
        assert stats[2] == 1.0
        Xr = torch.zeros_like(C0)
        for _ in range(int(stats[0])):
            Xr = torch.tanh(torch.mm(Xr, A.t()) + C0)
        Vr = torch.zeros_like(C0)
        for _ in range(500):
            Vr = (1 - torch.tanh(Z) ** 2) * (torch.mm(Vr, A) + C0)
        torch.testing.assert_close(X, Xr)
        torch.testing.assert_close(V, Vr)
    # the ops never called ATen's mm.out (the reference calls torch.mm)
    assert len(failing_cpu_gemm) == 0


def test_bare_solve_backward_warns_when_its_adjoint_does_not_converge():
    """idl::fixed_point's autograd (C++, the layer's adjoint_of) has no stats
    of a caller to fill: an adjoint stopped by grad_max_iter is a warning."""
    g = torch.Generator().manual_seed(0)
    A = project_rows_l1(torch.randn(6, 6, generator=g, dtype=torch.float64), 0.95).requires_grad_()
    C0 = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    X, _Z, stats = torch.ops.idl.fixed_point(A, C0, None, "tanh", 0.0, 500, 1e-12, 2, 1e-12)
    assert stats[2] == 1.0
    with pytest.warns(idl.ImplicitFunctionWarning, match=r"backward.*iterations=2"):
        X.sum().backward()
    assert A.grad is not None and C0.grad is not None
