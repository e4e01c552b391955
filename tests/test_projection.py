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
