"""SIM's solvers on small random problems: the batched solver against cvxpy's
optimum and the optimality conditions, the well-posedness bound, sparsity,
the torchidl-named solvers, the distributed row split, bad options."""
import logging
import math
import socket

import numpy as np
import pytest
import torch

from idl.sim.solvers import (
    ADMMSolver,
    BaseSolver,
    BatchedProxSolver,
    CVXSolver,
    LeastSquareSolver,
    ProjectedGDLowRankSolver,
)

pytest.importorskip("cvxpy")

KAPPA = 0.9
CONFIG64 = {"kappa": KAPPA, "dtype": torch.float64}


def random_states(m=40, n=6, p=5, q=3, seed=0, noise=0.1, scale=1.5):
    """States whose best fit has ||A||_inf > KAPPA, so the ball is active."""
    g = torch.Generator().manual_seed(seed)
    X = torch.relu(torch.randn(m, n, generator=g, dtype=torch.float64))
    U = torch.randn(m, p, generator=g, dtype=torch.float64)
    A = torch.randn(n, n, generator=g, dtype=torch.float64) * scale / n
    B = torch.randn(n, p, generator=g, dtype=torch.float64)
    C = torch.randn(q, n, generator=g, dtype=torch.float64)
    D = torch.randn(q, p, generator=g, dtype=torch.float64)
    Z = X @ A.t() + U @ B.t() + noise * torch.randn(m, n, generator=g, dtype=torch.float64)
    Y = X @ C.t() + U @ D.t() + noise * torch.randn(m, q, generator=g, dtype=torch.float64)
    return X, U, Z, Y


def objective(F, T, W, l1, ridge=0.0):
    """½‖T − F Wᵀ‖² + l1‖W‖₁ + ½ridge‖W‖², in NumPy float64."""
    F, T, W = (np.asarray(a, dtype=np.float64) for a in (F, T, W))
    residual = T - F @ W.T
    return 0.5 * (residual**2).sum() + l1 * np.abs(W).sum() + 0.5 * ridge * (W**2).sum()


def stage_objectives(states, weights, lam, ridge=0.0):
    X, U, Z, Y = (s.numpy() for s in states)
    A, B, C, D = (np.asarray(w, dtype=np.float64) for w in weights)
    F = np.hstack([X, U])
    return (objective(F, Z, np.hstack([A, B]), lam, ridge),
            objective(F, Y, np.hstack([C, D]), lam, ridge))


def cvx_reference(states, **options):
    return CVXSolver(progress=False, tol=0.0, **options).solve(*states, CONFIG64)


def assert_kkt(F, T, W, l1, ball_cols, radius, atol):
    """First-order optimality of each row of min ½‖t − F w‖² + l1‖w‖₁ with
    ‖w[:ball_cols]‖₁ <= radius: c = Fᵀ(t − F w) is a subgradient of the penalty."""
    correlation = (T - F @ W.T).T @ F
    for w, c in zip(W, correlation):
        a, ca = w[:ball_cols], c[:ball_cols]
        b, cb = w[ball_cols:], c[ball_cols:]
        nonzero = b != 0
        assert np.all(np.abs(cb[nonzero] - l1 * np.sign(b[nonzero])) <= atol)
        assert np.all(np.abs(cb[~nonzero]) <= l1 + atol)
        if not ball_cols:
            continue
        on_sphere = np.abs(a).sum() >= radius * (1 - 1e-9)
        active = a != 0
        mu = (ca[active] * np.sign(a[active]) - l1).mean() if on_sphere and active.any() else 0.0
        assert mu >= -atol
        assert np.all(np.abs(ca[active] - (l1 + mu) * np.sign(a[active])) <= atol)
        assert np.all(np.abs(ca[~active]) <= l1 + mu + atol)


@pytest.mark.parametrize("method", ["admm", "fista"])
@pytest.mark.parametrize("seed", [0, 1])
def test_reaches_cvx_objective(method, seed):
    states = random_states(seed=seed)
    lam = 0.05
    reference = stage_objectives(states, cvx_reference(states, lambda_z=lam, lambda_y=lam), lam)
    solver = BatchedProxSolver(lambda_z=lam, lambda_y=lam, method=method, rtol=1e-12,
                               max_iter=20000, tol=0.0, progress=False)
    weights = solver.solve(*states, CONFIG64)
    got = stage_objectives(states, weights, lam)
    for value, best in zip(got, reference):
        assert abs(value - best) <= 1e-4 * best


@pytest.mark.parametrize("method", ["admm", "fista"])
def test_optimality_conditions(method):
    states = random_states(seed=3)
    X, U, Z, Y = (s.numpy() for s in states)
    lam = 0.05
    solver = BatchedProxSolver(lambda_z=lam, lambda_y=lam, method=method, rtol=1e-14,
                               max_iter=50000, tol=0.0, progress=False)
    A, B, C, D = (w.numpy() for w in solver.solve(*states, CONFIG64))
    F = np.hstack([X, U])
    atol = 1e-6 * np.abs(F.T @ Z).max()
    assert_kkt(F, Z, np.hstack([A, B]), lam, X.shape[1], KAPPA, atol)
    assert_kkt(F, Y, np.hstack([C, D]), lam, 0, math.inf, atol)
    assert np.abs(A).sum(axis=1).max() == pytest.approx(KAPPA)  # the ball is active


def test_elastic_net_reaches_cvx_objective():
    states = random_states(seed=4)
    lam, ratio = 0.2, 0.3
    options = dict(lambda_z=lam, lambda_y=lam, elastic_net=True, l1_ratio=ratio)
    l1, ridge = lam * ratio, lam * (1 - ratio)
    reference = stage_objectives(states, cvx_reference(states, **options), l1, ridge)
    weights = BatchedProxSolver(rtol=1e-12, max_iter=20000, tol=0.0, progress=False,
                                **options).solve(*states, CONFIG64)
    for value, best in zip(stage_objectives(states, weights, l1, ridge), reference):
        assert abs(value - best) <= 1e-4 * best


def test_exact_matching_reaches_cvx_objective():
    """regularized=False: min ‖w‖₁ subject to F w = t (consistent data)."""
    g = torch.Generator().manual_seed(5)
    m, n, p, q = 8, 5, 6, 2  # fewer samples than weights: many exact fits
    X = torch.relu(torch.randn(m, n, generator=g, dtype=torch.float64))
    U = torch.randn(m, p, generator=g, dtype=torch.float64)
    Z = X @ (0.1 * torch.randn(n, n, generator=g, dtype=torch.float64)).t() + U @ torch.randn(n, p, generator=g, dtype=torch.float64).t()
    Y = X @ torch.randn(q, n, generator=g, dtype=torch.float64).t()
    states = (X, U, Z, Y)
    lam = 1.0
    reference = cvx_reference(states, regularized=False, lambda_z=lam, lambda_y=lam)
    weights = BatchedProxSolver(regularized=False, lambda_z=lam, lambda_y=lam, rtol=1e-10,
                                max_iter=20000, tol=0.0, progress=False).solve(*states, CONFIG64)
    F = torch.cat([X, U], 1)
    for got, best, target in ((weights[:2], reference[:2], Z), (weights[2:], reference[2:], Y)):
        W = torch.cat([torch.as_tensor(w) for w in got], 1)
        W_best = np.hstack(best)
        torch.testing.assert_close(F @ W.t(), target, atol=1e-5, rtol=0)
        assert W.abs().sum().item() == pytest.approx(np.abs(W_best).sum(), rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "make_solver",
    [
        lambda: BatchedProxSolver(progress=False),
        lambda: BatchedProxSolver(method="fista", max_iter=300, progress=False),
        lambda: BatchedProxSolver(regularized=False, max_iter=300, progress=False),
        lambda: ADMMSolver(num_epoch_ab=50, num_epoch_cd=20, progress=False),
        lambda: CVXSolver(progress=False),
        lambda: ProjectedGDLowRankSolver(rank=3, num_epoch=100, lr=1e-2, progress=False),
    ],
    ids=["batched-admm", "batched-fista", "batched-exact", "admm", "cvx", "lowrank"],
)
def test_well_posed_exactly(make_solver, dtype):
    """||A||_inf <= kappa in the returned dtype, row sums taken in float64,
    on a problem whose unconstrained fit is far outside the ball."""
    states = random_states(seed=6, scale=6.0)
    A, B, C, D = make_solver().solve(*states, {"kappa": KAPPA, "dtype": dtype})
    A = torch.as_tensor(A)
    assert A.dtype == dtype
    assert A.abs().sum(dim=1, dtype=torch.float64).max().item() <= KAPPA
    assert torch.linalg.matrix_norm(A.double(), ord=math.inf).item() <= KAPPA


def test_zeroing_gives_sparse_weights():
    """tol zeroes exactly the entries of magnitude <= tol, and nothing else."""
    states = random_states(seed=7, m=60, n=10, p=8)
    tol = 0.3
    dense = BatchedProxSolver(tol=0.0, progress=False).solve(*states, CONFIG64)
    sparse = BatchedProxSolver(tol=tol, progress=False).solve(*states, CONFIG64)
    for W_dense, W_sparse in zip(dense, sparse):
        expected = torch.where(W_dense.abs() <= tol, 0.0, W_dense)
        torch.testing.assert_close(W_sparse, expected, atol=1e-12, rtol=0)
    A, B = sparse[:2]
    assert (A == 0).float().mean().item() > 0.3
    assert (B == 0).float().mean().item() > 0.1


def test_l1_penalty_gives_sparse_weights():
    states = random_states(seed=8, m=60, n=10, p=8)
    A, B, _, _ = BatchedProxSolver(lambda_z=40.0, tol=0.0, progress=False).solve(*states, CONFIG64)
    assert (A == 0).float().mean().item() > 0.3
    assert (B == 0).float().mean().item() > 0.3


def test_well_pose_false_leaves_A_free():
    states = random_states(seed=6, scale=6.0)
    A, *_ = BatchedProxSolver(well_pose=False, progress=False).solve(*states, CONFIG64)
    assert A.abs().sum(dim=1).max().item() > KAPPA


def test_least_squares_warns_and_fits():
    states = random_states(seed=9, noise=0.0)
    X, U, Z, Y = states
    with pytest.warns(UserWarning, match="well-posedness"):
        A, B, C, D = LeastSquareSolver(tol=0.0).solve(*states, CONFIG64)
    F = torch.cat([X, U], 1)
    torch.testing.assert_close(F @ torch.cat([A, B], 1).t(), Z, atol=1e-8, rtol=0)
    torch.testing.assert_close(F @ torch.cat([C, D], 1).t(), Y, atol=1e-8, rtol=0)


def test_low_rank_solver_rank():
    states = random_states(seed=10, n=8)
    A, *_ = ProjectedGDLowRankSolver(rank=2, num_epoch=200, lr=1e-2, tol=0.0,
                                     progress=False).solve(*states, CONFIG64)
    assert torch.linalg.matrix_rank(A).item() <= 2


def test_regen_states_fits_output_on_the_implicit_states():
    """With regen_states, [C D] is fitted to the fixed point of the fitted A, B."""
    states = random_states(seed=11, noise=0.0, scale=0.5)

    class Recorder(BatchedProxSolver):
        def fit(self, features, targets, stage, config):
            self.seen = getattr(self, "seen", []) + [features]
            return super().fit(features, targets, stage, config)

    solver = Recorder(regen_states=True, progress=False)
    A, B, _, _ = solver.solve(*states, CONFIG64)
    X_regen = solver.seen[1][:, : A.shape[0]]
    U = states[1]
    torch.testing.assert_close(X_regen, torch.relu(X_regen @ A.t() + U @ B.t()), atol=1e-5, rtol=0)


def test_row_blocks_give_the_same_weights():
    states = random_states(seed=12, n=9)
    whole = BatchedProxSolver(rtol=1e-12, progress=False).solve(*states, CONFIG64)
    blocks = BatchedProxSolver(rtol=1e-12, row_block=4, progress=False).solve(*states, CONFIG64)
    for a, b in zip(whole, blocks):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_logs_on_idl_sim_logger(caplog):
    with caplog.at_level(logging.INFO, logger="idl.sim"):
        BatchedProxSolver(progress=False).solve(*random_states(seed=13), CONFIG64)
    assert any(r.name.startswith("idl.sim") and "A, B" in r.getMessage() for r in caplog.records)


def test_custom_solver_interface():
    class Ridge(BaseSolver):
        def solve(self, X, U, Z, Y, model_config):
            return (np.zeros((X.shape[1], X.shape[1])), np.zeros((X.shape[1], U.shape[1])),
                    np.zeros((Y.shape[1], X.shape[1])), np.zeros((Y.shape[1], U.shape[1])))

    A, B, C, D = Ridge().solve(*random_states(), CONFIG64)
    assert A.shape == (6, 6) and D.shape == (3, 5)
    with pytest.raises(TypeError):
        BaseSolver()


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: BatchedProxSolver(lambda_z=-1.0), ValueError, "lambda_z"),
        (lambda: BatchedProxSolver(lambda_y="big"), TypeError, "lambda_y"),
        (lambda: BatchedProxSolver(l1_ratio=1.5), ValueError, "l1_ratio"),
        (lambda: BatchedProxSolver(method="newton"), ValueError, "method"),
        (lambda: BatchedProxSolver(method="fista", regularized=False), ValueError, "exact matching"),
        (lambda: BatchedProxSolver(max_iter=0), ValueError, "max_iter"),
        (lambda: BatchedProxSolver(rho=0.0), ValueError, "rho"),
        (lambda: BatchedProxSolver(row_block=0), ValueError, "row_block"),
        (lambda: BatchedProxSolver(dtype=torch.int32), TypeError, "dtype"),
        (lambda: ADMMSolver(num_epoch_ab=0), ValueError, "num_epoch_ab"),
        (lambda: ADMMSolver(rho_cd=-1.0), ValueError, "rho_cd"),
        (lambda: ADMMSolver(method="fista"), TypeError, "method"),
        (lambda: CVXSolver(num_row=0), ValueError, "num_row"),
        (lambda: CVXSolver(solver="NOT_A_SOLVER"), ValueError, "not installed"),
        (lambda: ProjectedGDLowRankSolver(rank=0), ValueError, "rank"),
        (lambda: LeastSquareSolver(tol=-1.0), ValueError, "tol"),
    ],
)
def test_bad_options(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    "states,error,match",
    [
        (lambda X, U, Z, Y: (X[:, 0], U, Z, Y), ValueError, "X must be 2-D"),
        (lambda X, U, Z, Y: (X, U[:-1], Z, Y), ValueError, "U has 39 samples"),
        (lambda X, U, Z, Y: (X, U, Z[:, :-1], Y), ValueError, "hidden states"),
        (lambda X, U, Z, Y: (X, U, Z, [1, 2]), TypeError, "Y must be"),
        (lambda X, U, Z, Y: (X, U.long(), Z, Y), TypeError, "floating point"),
    ],
)
def test_bad_states(states, error, match):
    with pytest.raises(error, match=match):
        BatchedProxSolver(progress=False).solve(*states(*random_states()), CONFIG64)


def test_bad_kappa():
    with pytest.raises(ValueError, match="kappa"):
        BatchedProxSolver(progress=False).solve(*random_states(), {"kappa": 1.5})


# ---- distributed row split ----------------------------------------------------


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank, world_size, port, path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world_size)
    try:
        solver = BatchedProxSolver(lambda_z=0.05, lambda_y=0.05, rtol=1e-12, progress=False)
        weights = solver.solve(*random_states(seed=14, n=7), CONFIG64)
        if rank == 0:
            torch.save([w.clone() for w in weights], path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_give_the_same_weights(tmp_path):
    import torch.multiprocessing as mp

    path = tmp_path / "weights.pt"
    mp.spawn(_distributed_worker, args=(2, _free_port(), str(path)), nprocs=2, join=True)
    split = torch.load(path)
    single = BatchedProxSolver(lambda_z=0.05, lambda_y=0.05, rtol=1e-12, progress=False).solve(
        *random_states(seed=14, n=7), CONFIG64)
    for a, b in zip(split, single):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


# ---- the duality-gap certificate of the batched solvers -------------------------


@pytest.mark.parametrize("ridge", [0.0, 0.3])
def test_duality_gap_bounds_the_suboptimality(ridge):
    """For any W the gap is >= P(W) − P*, and it vanishes at the optimum."""
    from idl.sim.solvers.rows import RowProblem

    X, U, Z, _ = random_states(seed=15)
    F = torch.cat([X, U], 1)
    l1 = 0.05
    options = dict(lambda_z=l1 + ridge, lambda_y=l1 + ridge)
    if ridge:
        options.update(elastic_net=True, l1_ratio=l1 / (l1 + ridge))
    A, B, _, _ = cvx_reference((X, U, Z, Z[:, :1]), **options)
    W_best = torch.from_numpy(np.hstack([A, B]))
    problem = RowProblem.from_data(F, Z, l1, ridge, X.shape[1], KAPPA)

    def per_row_objective(W):
        residual = Z - F @ W.t()
        return (0.5 * residual.square().sum(0) + l1 * W.abs().sum(1)
                + 0.5 * ridge * W.square().sum(1))

    def gap(W):
        return problem.duality_gap(W, W @ problem.gram, problem.cross, problem.target_sq)

    best = per_row_objective(W_best)
    g = torch.Generator().manual_seed(0)
    for scale in (0.01, 0.3, 1.0):
        W = W_best + scale * torch.randn(W_best.shape, generator=g, dtype=torch.float64)
        W[:, : X.shape[1]] = torch.from_numpy(np.stack(
            [row if np.abs(row).sum() <= KAPPA else row * KAPPA / np.abs(row).sum()
             for row in W[:, : X.shape[1]].numpy()]))
        assert torch.all(gap(W) >= per_row_objective(W) - best - 1e-9)
    assert torch.all(gap(W_best) <= 1e-6 * problem.target_sq)
