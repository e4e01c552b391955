"""idl::project_linf and its backward against the sort-based reference and the
projection's optimality conditions."""
import pytest
import torch

import idl
from reference import project_rows_l1, project_scale

torch.manual_seed(0)


def mixed_matrix(rows=7, cols=9, dtype=torch.float64):
    """Rows well outside, well inside, and exactly zero."""
    A = torch.randn(rows, cols, dtype=dtype)
    A[0] *= 5
    A[1] *= 0.01
    A[2] = 0
    return A


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kappa", [0.3, 0.99, 1.0])
def test_exact_matches_sort_based_reference(dtype, kappa):
    A = mixed_matrix(dtype=dtype)
    got = idl.project_linf(A, kappa)
    want = project_rows_l1(A.double(), kappa).to(dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_exact_satisfies_optimality_conditions():
    A = mixed_matrix(rows=20, cols=15)
    kappa = 0.9
    P = idl.project_linf(A, kappa)
    outside = A.abs().sum(1) > kappa
    # projected rows land on the sphere, rows inside are untouched
    torch.testing.assert_close(P[outside].abs().sum(1), torch.full((int(outside.sum()),), kappa, dtype=A.dtype))
    torch.testing.assert_close(P[~outside], A[~outside])
    # P = sign(a) max(|a| - θ, 0) with one θ > 0 per projected row: on the support
    # |a| - |p| is that θ, and off it |a| <= θ
    for a, p in zip(A[outside], P[outside]):
        support = p != 0
        theta = (a.abs() - p.abs())[support]
        assert theta.min() > 0
        torch.testing.assert_close(theta, theta.mean().expand_as(theta))
        assert (a.abs()[~support] <= theta.mean() + 1e-12).all()
        assert (torch.sign(p[support]) == torch.sign(a[support])).all()


def test_exact_is_the_closest_point_among_feasible_perturbations():
    A = mixed_matrix(rows=4, cols=6)
    kappa = 0.5
    P = idl.project_linf(A, kappa)
    best = (P - A).norm()
    for _ in range(200):
        Q = idl.project_linf(P + 0.05 * torch.randn_like(P), kappa)  # feasible
        assert (Q - A).norm() >= best - 1e-12


def test_scale_mode_matches_upstream_rule():
    A = mixed_matrix()
    torch.testing.assert_close(idl.project_linf(A, 0.7, "scale"), project_scale(A, 0.7))
    small = 0.01 * A
    torch.testing.assert_close(idl.project_linf(small, 0.7, "scale"), small)


@pytest.mark.parametrize("mode", ["exact", "scale"])
def test_backward_matches_autograd_of_reference(mode):
    A = mixed_matrix().requires_grad_(True)
    G = torch.randn_like(A)
    (got,) = torch.autograd.grad(idl.project_linf(A, 0.8, mode), A, G)
    reference = project_rows_l1 if mode == "exact" else project_scale
    (want,) = torch.autograd.grad(reference(A, 0.8), A, G)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("mode", ["exact", "scale"])
def test_gradcheck(mode):
    A = mixed_matrix(rows=4, cols=5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: idl.project_linf(a, 0.8, mode), (A,))


def test_non_contiguous_input():
    A = mixed_matrix(rows=9, cols=7)
    torch.testing.assert_close(idl.project_linf(A.t(), 0.5), project_rows_l1(A.t().contiguous(), 0.5))


@pytest.mark.parametrize("mode", ["exact", "scale"])
def test_opcheck(mode):
    A = mixed_matrix(rows=4, cols=5).requires_grad_(True)
    torch.library.opcheck(torch.ops.idl.project_linf.default, (A, 0.8, mode))
    G = torch.randn(4, 5, dtype=torch.float64)
    torch.library.opcheck(torch.ops.idl.project_linf_backward.default, (G, A.detach(), 0.8, mode))


@pytest.mark.parametrize(
    "args, error, words",
    [
        ((torch.randn(3, 3), 0.0), ValueError, "kappa"),
        ((torch.randn(3, 3), 1.5), ValueError, "kappa"),
        ((torch.randn(3, 3), "big"), TypeError, "kappa"),
        ((torch.randn(3), 0.5), ValueError, "2-D"),
        ((torch.randn(3, 3).int(), 0.5), TypeError, "float32 or float64"),
        ((torch.randn(3, 3), 0.5, "clip"), ValueError, "projection"),
    ],
)
def test_bad_input(args, error, words):
    with pytest.raises(error, match=words):
        idl.project_linf(*args)


# ---- exactness where ||row||_1 / kappa is huge, against rational arithmetic ----

from fractions import Fraction  # noqa: E402

from devices import DEVICES  # noqa: E402


def exact_projection(row, kappa):
    """The Euclidean projection of a row onto the l1 ball of radius kappa, and
    its support S, in exact rational arithmetic (sort-based)."""
    a = [Fraction(v) for v in row]
    k = Fraction(kappa)
    if sum(abs(v) for v in a) <= k:
        return a, set(range(len(a)))
    partial, theta = Fraction(0), None
    for rank, v in enumerate(sorted((abs(v) for v in a), reverse=True), 1):
        partial += v
        candidate = (partial - k) / rank
        if v > candidate:
            theta = candidate
    out = [(1 if v > 0 else -1) * max(abs(v) - theta, Fraction(0)) for v in a]
    return out, {j for j, v in enumerate(a) if abs(v) > theta}


def exact_vjp(row, support, grad):
    """J^T grad with J = diag(1_S) - s_S s_S^T / |S|, exactly."""
    sign = [1 if v > 0 else -1 for v in row]
    g = [Fraction(v) for v in grad]
    mean = sum(sign[j] * g[j] for j in support) / len(support)
    return [g[j] - sign[j] * mean if j in support else Fraction(0) for j in range(len(row))]


HUGE_RATIO_ROWS = [
    ([1e20, 1e20], 1.0),  # -> [0.5, 0.5]
    ([3e16, 1.0], 1.0),  # -> [1, 0]
    ([1e300, -1e300, 5.0], 0.5),  # -> [0.25, -0.25, 0]
    ([1.0, 1.0, 1.0], 1e-17),  # -> [k/3, k/3, k/3]
    ([1e17, 3.0, -1e17 + 16, 5.0, -2e16], 0.3),
    ([-7e200, 7e200 * (1 - 2**-50), 1e190, -3.0], 1.0),
    ([1.5, -1.0 + 2**-40, 1.0, 1e-300], 1e-12),
    ([0.5, 0.5, 0.0, -0.0, 0.0], 1 - 2**-53),  # barely outside: zeros stay zeros
    ([0.3, 0.0, 0.2, 0.0, 0.5 + 2**-40], 1.0),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("row, kappa", HUGE_RATIO_ROWS, ids=range(len(HUGE_RATIO_ROWS)))
def test_exact_projection_keeps_kappa_when_the_row_is_huge(row, kappa, device):
    """The value and the VJP match the exact projection to rounding, where the
    textbook threshold |a| - theta would cancel to all zeros."""
    A = torch.tensor([row], dtype=torch.float64, device=device)
    want, support = exact_projection(row, kappa)
    got = idl.project_linf(A, kappa)[0].cpu().tolist()
    scale = float(max(abs(v) for v in want))
    assert scale > 0
    bound = 8 * len(row) * 2.0**-52 * scale
    for g, w in zip(got, want):
        assert abs(Fraction(g) - w) <= bound, (got, [float(v) for v in want])
    assert [j for j, g in enumerate(got) if g != 0] == sorted(support)
    grad = torch.linspace(-1.0, 2.0, len(row), dtype=torch.float64)
    got_vjp = torch.ops.idl.project_linf_backward(grad[None].to(device), A, kappa, "exact")
    want_vjp = exact_vjp(row, support, grad.tolist())
    for g, w in zip(got_vjp[0].cpu().tolist(), want_vjp):
        assert abs(Fraction(g) - w) <= 8 * len(row) * 2.0**-52 * 2, (got_vjp, want_vjp)


@pytest.mark.parametrize("device", DEVICES)
def test_exact_projection_keeps_rows_holding_nan_or_inf(device):
    """Such rows reach the solve, which reports them; the other rows are
    projected, and the VJP passes the gradient of kept rows through."""
    nan, inf = float("nan"), float("inf")
    A = torch.tensor(
        [[nan, 1.0, 2.0], [inf, 0.0, 1.0], [-inf, 5.0, nan], [3.0, -4.0, 5.0], [0.1, 0.1, 0.1]],
        dtype=torch.float64,
    )
    P = idl.project_linf(A.to(device), 0.5).cpu()
    torch.testing.assert_close(P[:3], A[:3], equal_nan=True)
    torch.testing.assert_close(P[3:], project_rows_l1(A[3:], 0.5))
    G = torch.randn_like(A)
    grad = torch.ops.idl.project_linf_backward(G.to(device), A.to(device), 0.5, "exact").cpu()
    torch.testing.assert_close(grad[:3], G[:3])
    torch.testing.assert_close(grad[4], G[4])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("magnitude", [1e150, 1e200, 1e300])
def test_scale_backward_does_not_overflow_for_huge_norms(magnitude, device):
    """P(cA) = P(A) for c > 0 outside the ball, so the VJP at cA is the VJP at
    A over c; <G, A> / ||A||^2 unscaled overflows beyond norms of 1e154."""
    A = mixed_matrix(rows=5, cols=6)
    G = torch.randn_like(A)
    want = torch.ops.idl.project_linf_backward(G, A, 0.7, "scale") / magnitude
    got = torch.ops.idl.project_linf_backward(G.to(device), (A * magnitude).to(device), 0.7, "scale")
    torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=0)
