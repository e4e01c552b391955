"""idl::prox_l1_ball, the row-wise prox of SIM's batched solvers, against
independent references (NumPy in float64, and cvxpy for the prox of the sum),
and the l1-ball projection it shares with idl::project_linf."""
import math

import numpy as np
import pytest
import torch

import idl
from idl.sim._prox_ops import prox_l1_ball

from devices import DEVICES

def l1_ball_reference(v, radius):
    """Euclidean projection of a vector onto {||x||_1 <= radius}: sort-based
    (Duchi et al. 2008), written here independently of the library."""
    if np.abs(v).sum() <= radius:
        return v.copy()
    if radius == 0:
        return np.zeros_like(v)
    u = np.sort(np.abs(v))[::-1]
    cumulative = np.cumsum(u)
    k = np.arange(1, len(u) + 1)
    rho = np.nonzero(u * k > cumulative - radius)[0][-1]
    theta = (cumulative[rho] - radius) / (rho + 1)
    return np.sign(v) * np.maximum(np.abs(v) - theta, 0)


def prox_reference(W, thresholds, radius, ball_cols):
    out = np.sign(W) * np.maximum(np.abs(W) - thresholds[:, None], 0)
    if ball_cols and math.isfinite(radius):
        for i in range(out.shape[0]):
            out[i, :ball_cols] = l1_ball_reference(out[i, :ball_cols], radius)
    return out


CASES = [
    # rows, cols, ball_cols, radius
    (7, 12, 5, 0.7),
    (3, 9, 9, 0.2),     # the whole row is the A part
    (5, 8, 0, 0.5),     # no ball: soft-threshold only
    (4, 6, 3, math.inf),
    (6, 10, 4, 0.0),    # radius 0: the A part vanishes
    (0, 5, 2, 1.0),     # no rows
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows,cols,ball_cols,radius", CASES)
def test_matches_reference(rows, cols, ball_cols, radius, dtype, device):
    generator = torch.Generator().manual_seed(rows * 100 + cols)
    W = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    thresholds = torch.rand(rows, generator=generator, dtype=torch.float64) * 0.3
    expected = prox_reference(W.numpy(), thresholds.numpy(), radius, ball_cols)
    got = prox_l1_ball(W.to(device, dtype), thresholds.to(device, dtype), radius, ball_cols)
    assert got.device.type == device
    got = got.cpu()
    tolerance = 1e-12 if dtype == torch.float64 else 2e-6
    np.testing.assert_allclose(got.double().numpy(), expected, atol=tolerance, rtol=0)
    if ball_cols and math.isfinite(radius) and rows:
        row_sums = got[:, :ball_cols].abs().sum(dim=1, dtype=torch.float64)
        assert row_sums.max().item() <= radius * (1 + 4 * torch.finfo(dtype).eps) + 1e-300


@pytest.mark.parametrize("device", DEVICES)
def test_scalar_threshold_applies_to_every_row(device):
    W = torch.randn(5, 7, dtype=torch.float64)
    got = prox_l1_ball(W.to(device), 0.25, 0.8, 4).cpu()
    expected = prox_reference(W.numpy(), np.full(5, 0.25), 0.8, 4)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_input(device):
    W = torch.randn(6, 16, dtype=torch.float64)[:, ::2]
    got = prox_l1_ball(W.to(device), 0.1, 0.5, 3).cpu()
    np.testing.assert_allclose(got.numpy(), prox_reference(W.numpy(), np.full(6, 0.1), 0.5, 3), atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_is_the_prox_of_the_sum(seed):
    """Soft-threshold then project is exactly argmin ½‖x − v‖² + t‖x‖₁ with
    ‖x_A‖₁ <= r, solved here by cvxpy."""
    cp = pytest.importorskip("cvxpy")
    rng = np.random.default_rng(seed)
    cols, ball_cols, t, r = 10, 6, 0.15, 0.6
    v = rng.standard_normal(cols)
    x = cp.Variable(cols)
    objective = 0.5 * cp.sum_squares(x - v) + t * cp.norm1(x)
    cp.Problem(cp.Minimize(objective), [cp.norm1(x[:ball_cols]) <= r]).solve(
        solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    got = prox_l1_ball(torch.from_numpy(v)[None], t, r, ball_cols)[0].numpy()
    np.testing.assert_allclose(got, x.value, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    W = torch.randn(6, 9, dtype=torch.float64, device=device)
    thresholds = torch.full((6,), 0.1, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.idl.prox_l1_ball, (W, thresholds, 0.5, 4))
    torch.library.opcheck(torch.ops.idl.prox_l1_ball, (W.float(), thresholds.float(), math.inf, 0))


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((torch.randn(3), torch.zeros(3), 1.0, 0), ValueError, "2-D"),
        ((torch.ones(3, 4, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), 1.0, 0), TypeError, "float32 or float64"),
        ((torch.randn(3, 4), torch.zeros(2), 1.0, 0), ValueError, "one entry per row"),
        ((torch.randn(3, 4), torch.zeros(3, dtype=torch.float64), 1.0, 0), TypeError, "dtype"),
        ((torch.randn(3, 4), torch.full((3,), -1.0), 1.0, 0), ValueError, "finite numbers >= 0"),
        ((torch.randn(3, 4), torch.tensor([0.0, 0.1, math.nan]), 1.0, 0), ValueError, "got nan for row 2"),
        ((torch.randn(3, 4), torch.zeros(3), -1.0, 2), ValueError, "radius"),
        ((torch.randn(3, 4), torch.zeros(3), 1.0, 5), ValueError, "ball_cols"),
        ((torch.randn(3, 4), torch.zeros(3), 1.0, -1), ValueError, "ball_cols"),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_bad_input(args, error, match, device):
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    with pytest.raises(error, match=match):
        torch.ops.idl.prox_l1_ball(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_projection_still_exact_after_sharing_the_row_code(dtype):
    """idl::project_linf uses the same l1-ball row functions (l1_ball.inc)."""
    A = torch.randn(8, 13, dtype=torch.float64) * 0.3
    A[0] *= 0.01  # a row already inside the ball
    kappa = 0.9
    got = idl.project_linf(A.to(dtype), kappa)
    expected = np.stack([l1_ball_reference(row, kappa) for row in A.numpy()])
    tolerance = 1e-12 if dtype == torch.float64 else 2e-6
    np.testing.assert_allclose(got.double().numpy(), expected, atol=tolerance)
    assert torch.equal(got[0], A[0].to(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ball_cols, radius", [(4, 0.5), (4, math.inf), (0, 0.5), (8, 0.0)])
def test_rows_holding_nan_or_inf_come_out_all_nan(device, dtype, ball_cols, radius):
    """NaN in, NaN out, on every device: a row with a NaN or Inf entry anywhere
    (ball part or not) is all NaN, so that the solver sees it; the other rows
    are as usual."""
    generator = torch.Generator().manual_seed(5)
    W = torch.randn(7, 8, generator=generator, dtype=torch.float64)
    W[0, 1] = math.nan
    W[1, 6] = math.inf
    W[2, 0] = -math.inf
    W[3, 7] = math.nan
    W[4] = math.inf
    thresholds = torch.full((7,), 0.1, dtype=torch.float64)
    got = torch.ops.idl.prox_l1_ball(W.to(device, dtype), thresholds.to(device, dtype), radius,
                                     ball_cols).cpu()
    assert torch.isnan(got[:5]).all(), got[:5]
    expected = prox_reference(W[5:].numpy(), thresholds[5:].numpy(), radius, ball_cols)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-6
    np.testing.assert_allclose(got[5:].double().numpy(), expected, atol=tolerance, rtol=0)
