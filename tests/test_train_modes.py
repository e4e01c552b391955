"""Relative tolerances, the "auto" solver and the inexact backward modes
("phantom", "jfb"), in the compiled solve and the Python-driven one."""
import warnings

import pytest
import torch

import idl
from idl import functional as F
from idl._stats import SolveStats

from devices import DEVICES

ops = torch.ops.idl


# ---- relative tolerance ----------------------------------------------------------


def halving_problem(big=1000.0, small=1e-3):
    """X = X (0.5 I) + C0 with identity φ: Picard from 0 has residual
    c 0.5^(k-1) at iteration k, and ||x_k|| -> 2c. One large sample, one small."""
    A = 0.5 * torch.eye(2, dtype=torch.float64)
    C0 = torch.tensor([[big, big], [small, small]], dtype=torch.float64)
    return A, C0


def first_stop(c, tol, rtol):
    """The iteration at which a sample of offset c meets tol + rtol ||g(x)||."""
    x, k = 0.0, 0
    while True:
        k += 1
        gx = 0.5 * x + c
        if abs(gx - x) <= tol + rtol * abs(gx):
            return k, gx
        x = gx


@pytest.mark.parametrize("device", DEVICES)
def test_rtol_stops_a_sample_that_meets_only_the_relative_test(device):
    A, C0 = (t.to(device) for t in halving_problem())
    tol, rtol = 1e-6, 1e-4
    k_big, x_big = first_stop(1000.0, tol, rtol)
    k_small, _ = first_stop(1e-3, tol, rtol)
    assert k_big < first_stop(1000.0, tol, 0.0)[0]  # the relative part decides
    X, Z, stats = ops.fixed_point_rel(A, C0, None, "identity", 0.0, 100, tol, rtol, "picard", 5)
    iterations, residual, code = stats.tolist()
    assert iterations == max(k_big, k_small)
    assert code == 2  # converged, a sample on the relative part
    assert residual > tol
    assert X[0, 0].item() == pytest.approx(x_big, rel=1e-15)


@pytest.mark.parametrize("device", DEVICES)
def test_a_sample_meeting_neither_test_does_not_stop(device):
    A, C0 = (t.to(device) for t in halving_problem())
    tol, rtol = 1e-6, 1e-4
    k_big, _ = first_stop(1000.0, tol, rtol)
    X, Z, stats = ops.fixed_point_rel(A, C0, None, "identity", 0.0, k_big - 1, tol, rtol, "picard", 5)
    assert stats.tolist()[2] == 0  # not converged: the big sample met neither test
    # and without rtol the same budget is not enough either
    stats0 = ops.fixed_point_rel(A, C0, None, "identity", 0.0, k_big, tol, 0.0, "picard", 5)[2]
    assert stats0.tolist()[2] == 0


def test_rtol_zero_is_the_absolute_test():
    A, C0 = halving_problem()
    old = ops.fixed_point(A, C0, None, "identity", 0.0, 100, 1e-9, 10, 1e-9)
    new = ops.fixed_point_rel(A, C0, None, "identity", 0.0, 100, 1e-9, 0.0, "picard", 5)
    assert torch.equal(old[0], new[0]) and torch.equal(old[2], new[2])
    assert new[2].tolist()[2] == 1  # converged on the absolute test


def test_rtol_in_the_python_driven_loop():
    A, C0 = halving_problem()
    tol, rtol = 1e-6, 1e-4
    k_big, x_big = first_stop(1000.0, tol, rtol)

    def step(P, rows):
        return P + C0[rows]

    X, stats = F.iterate_rows(torch.zeros_like(C0), lambda W: W @ A.t(), step, 100, tol, rtol=rtol)
    compiled = ops.fixed_point_rel(A, C0, None, "identity", 0.0, 100, tol, rtol, "picard", 5)
    assert stats.tolist() == compiled[2].tolist()
    assert torch.equal(X, compiled[0])
    X, stats = F.iterate_rows(torch.zeros_like(C0), lambda W: W @ A.t(), step, k_big - 1, tol, rtol=rtol)
    assert stats.tolist()[2] == 0


def test_model_reports_the_criterion():
    torch.manual_seed(0)
    U = torch.randn(32, 8)
    model = idl.ImplicitModel(8, 3, 20, rtol=1e-2, grad_rtol=1e-2)
    model(U).sum().backward()
    assert model.last_stats.forward["criterion"] == "rtol"
    assert model.last_stats.backward["criterion"] in ("rtol", "tol")
    exact = idl.ImplicitModel(8, 3, 20)
    exact.load_state_dict(model.state_dict())
    exact(U).sum().backward()
    assert exact.last_stats.forward["criterion"] == "tol"
    assert exact.last_stats.forward["iterations"] > model.last_stats.forward["iterations"]
    assert model.rtol == 1e-2 and model.grad_rtol == 1e-2


def test_criterion_merges():
    rows = {"tol": [3, 1e-7, 1], "rtol": [3, 1e-3, 2], "none": [3, 1.0, 0]}
    stats = {k: torch.tensor([v, [-1, 0, 0]], dtype=torch.float64) for k, v in rows.items()}
    assert SolveStats([stats["tol"]]).forward["criterion"] == "tol"
    assert SolveStats([stats["tol"], stats["rtol"]]).forward["criterion"] == "rtol"
    merged = SolveStats([stats["rtol"], stats["none"]]).forward
    assert merged["criterion"] is None and not merged["converged"]


# ---- auto ----------------------------------------------------------------------------


def cycle_problem(rho=0.97, n=6):
    """A = rho 11ᵀ/n: with identity φ (or ReLU, all units active) the residual
    shrinks by about rho per Picard step (slow: the sample switches); with ReLU
    and an offset very negative but in one place, the sample is done in a few
    steps."""
    A = rho * torch.full((n, n), 1.0 / n, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    return A, torch.randn(4, n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("device", DEVICES)
def test_auto_switches_a_slow_sample_and_not_a_fast_one(device):
    A, C0 = (t.to(device) for t in cycle_problem())
    solve = lambda act, method, c0: ops.fixed_point_rel(A, c0, None, act, 0.0, 2000, 1e-10, 0.0, method, 5)
    # slow: identity φ, contraction exactly 0.97 -> auto takes Anderson's road
    picard, anderson, auto = (solve("identity", m, C0) for m in ("picard", "anderson", "auto"))
    it = {k: v[2][0].item() for k, v in zip(("picard", "anderson", "auto"), (picard, anderson, auto))}
    assert it["auto"] < it["picard"] / 3
    assert it["auto"] <= it["anderson"] + F.AUTO_SWITCH_PATIENCE + 1
    torch.testing.assert_close(auto[0], picard[0], atol=1e-8, rtol=0)
    # fast: every sample contracts at once -> auto is Picard, to the bit
    fast = torch.full_like(C0, -10.0)
    fast[:, 0] = 1.0
    p, a = solve("relu", "picard", fast), solve("relu", "auto", fast)
    assert torch.equal(p[0], a[0]) and torch.equal(p[2], a[2])


@pytest.mark.parametrize("device", DEVICES)
def test_auto_per_sample_in_one_batch(device):
    """One batch, one slow sample (identity-like row) and a fast one: the fast
    one's answer is Picard's to the bit (it never mixed)."""
    A, C0 = (t.to(device) for t in cycle_problem())
    c0 = torch.stack([torch.full((6,), -10.0, dtype=torch.float64, device=device), C0[0].abs() + 1])
    c0[0, 0] = 1.0
    p = ops.fixed_point_rel(A, c0, None, "relu", 0.0, 2000, 1e-10, 0.0, "picard", 5)
    a = ops.fixed_point_rel(A, c0, None, "relu", 0.0, 2000, 1e-10, 0.0, "auto", 5)
    assert torch.equal(p[0][0], a[0][0])
    assert a[2][0] < p[2][0] / 3  # the slow one (all units active) mixed
    torch.testing.assert_close(a[0][1], p[0][1], atol=1e-8, rtol=0)


@pytest.mark.parametrize("max_iter", [1, 2, 3, 4, 7])
def test_auto_before_its_first_possible_switch_is_picard_to_the_bit(max_iter):
    """Until a sample can have had AUTO_SWITCH_PATIENCE slow steps, auto takes
    its Picard steps in place: the unconverged answer g(x) after max_iter
    passes, the forward's Z and the adjoint's V are Picard's, to the bit,
    wherever the stop falls against the in-place schedule; past it the slow
    samples mix."""
    A, C0 = cycle_problem()
    p = ops.fixed_point_rel(A, C0, None, "identity", 0.0, max_iter, 0.0, 0.0, "picard", 5)
    a = ops.fixed_point_rel(A, C0, None, "identity", 0.0, max_iter, 0.0, 0.0, "auto", 5)
    G = torch.randn_like(C0)
    pv = ops.fixed_point_adjoint_rel(A, p[1], G, "identity", 0.0, max_iter, 0.0, 0.0, "picard", 5)
    av = ops.fixed_point_adjoint_rel(A, a[1], G, "identity", 0.0, max_iter, 0.0, 0.0, "auto", 5)
    # the first pass only sets the baseline residual: the earliest switch is
    # at pass patience + 1, and it changes the iterates after that pass
    if max_iter <= F.AUTO_SWITCH_PATIENCE + 1:
        assert torch.equal(p[0], a[0]) and torch.equal(p[1], a[1]) and torch.equal(pv[0], av[0])
    else:
        assert not torch.equal(p[0], a[0])


def test_auto_python_twin_matches_compiled():
    A, C0 = cycle_problem()

    def step(P, rows):
        return P + C0[rows]

    X, stats = F.iterate_rows(torch.zeros_like(C0), lambda W: W @ A.t(), step, 2000, 1e-10, "auto", 5)
    compiled = ops.fixed_point_rel(A, C0, None, "identity", 0.0, 2000, 1e-10, 0.0, "auto", 5)
    assert stats[0] == compiled[2][0]
    torch.testing.assert_close(X, compiled[0], atol=1e-9, rtol=0)


def test_auto_model_trains_and_matches_picard():
    torch.manual_seed(0)
    U = torch.randn(16, 8, dtype=torch.float64)
    a = idl.ImplicitModel(8, 3, 12, solver="auto", tol=1e-12, grad_tol=1e-12, mitr=3000,
                          grad_mitr=3000).double()
    p = idl.ImplicitModel(8, 3, 12, tol=1e-12, grad_tol=1e-12, mitr=3000, grad_mitr=3000).double()
    p.load_state_dict(a.state_dict())
    for m in (a, p):
        m(U).square().sum().backward()
    for x, y in zip(a.parameters(), p.parameters()):
        torch.testing.assert_close(x.grad, y.grad, atol=1e-9, rtol=1e-9)


# ---- phantom and JFB ---------------------------------------------------------------


def phantom_reference(A, Z, G, dphi, steps, tau):
    D = dphi(Z)
    V = torch.zeros_like(G)
    for _ in range(steps):
        V = (1 - tau) * V + tau * D * (V @ A + G)
    return V


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("mode, steps, tau", [("phantom", 5, 0.5), ("phantom", 3, 0.8), ("jfb", 1, 1.0)])
@pytest.mark.parametrize("device", DEVICES)
def test_inexact_backward_matches_float64_reference(activation, mode, steps, tau, device):
    torch.manual_seed(1)
    m, p, q, n = 7, 5, 3, 6
    model = idl.ImplicitModel(p, q, n, f=idl.ImplicitFunction, activation=activation, backward=mode,
                              phantom_steps=steps, phantom_tau=tau, tol=1e-13, mitr=5000,
                              bias=True).double().to(device)
    with torch.no_grad():
        model.A.copy_(idl.project_linf(torch.randn(n, n, dtype=torch.float64), 0.9))
    U = torch.randn(m, p, dtype=torch.float64).to(device)
    W = torch.randn(m, q, dtype=torch.float64).to(device)
    Y, X = model.forward_with_state(U)
    (Y * W).sum().backward()
    A, B, C = model.A.detach(), model.B.detach(), model.C.detach()
    Z = X.detach() @ A.t() + U @ B.t() + model.bias_hidden.detach()
    dphi = {"relu": lambda z: (z > 0).double(), "tanh": lambda z: 1 - torch.tanh(z) ** 2}[activation]
    V = phantom_reference(A, Z, W @ C, dphi, steps, tau)
    torch.testing.assert_close(model.A.grad, V.t() @ X.detach(), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(model.B.grad, V.t() @ U, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(model.bias_hidden.grad, V.sum(0), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(model.C.grad, W.t() @ X.detach(), atol=1e-12, rtol=1e-10)
    back = model.last_stats.backward
    assert back["iterations"] == steps and back["criterion"] == "steps" and back["converged"]


def test_phantom_approaches_implicit_with_many_steps():
    torch.manual_seed(2)
    U = torch.randn(10, 5, dtype=torch.float64)
    exact = idl.ImplicitModel(5, 2, 8, tol=1e-13, grad_tol=1e-13, mitr=5000, grad_mitr=5000).double()
    phantom = idl.ImplicitModel(5, 2, 8, backward="phantom", phantom_steps=400, phantom_tau=1.0,
                                tol=1e-13, mitr=5000).double()
    phantom.load_state_dict(exact.state_dict())
    for m in (exact, phantom):
        m(U).square().sum().backward()
    for x, y in zip(exact.parameters(), phantom.parameters()):
        torch.testing.assert_close(x.grad, y.grad, atol=1e-10, rtol=1e-8)


class PythonRelu(idl.ImplicitFunctionInf):
    @staticmethod
    def phi(X):
        return torch.relu(X)

    @staticmethod
    def dphi(X):
        return (X > 0).to(X.dtype)


@pytest.mark.parametrize("mode", ["implicit", "phantom", "jfb"])
def test_python_activation_backward_modes_match_compiled(mode):
    torch.manual_seed(3)
    U = torch.randn(9, 5, dtype=torch.float64)
    kw = dict(backward=mode, phantom_steps=4, phantom_tau=0.6, tol=1e-12, grad_tol=1e-12)
    compiled = idl.ImplicitModel(5, 2, 8, **kw).double()
    python = idl.ImplicitModel(5, 2, 8, f=PythonRelu, **kw).double()
    python.load_state_dict(compiled.state_dict())
    for m in (compiled, python):
        m(U).square().sum().backward()
    for x, y in zip(compiled.parameters(), python.parameters()):
        torch.testing.assert_close(x.grad, y.grad, atol=1e-10, rtol=1e-8)
    assert compiled.last_stats.backward["iterations"] == python.last_stats.backward["iterations"]


def test_rnn_cell_takes_the_backward_mode():
    torch.manual_seed(4)
    rnn = idl.ImplicitRNN(3, 2, 6, 5, backward="jfb")
    rnn(torch.randn(4, 7, 3)).sum().backward()
    assert rnn.last_stats.backward["criterion"] == "steps"


def test_gradcheck_implicit_only():
    torch.manual_seed(5)
    model = idl.ImplicitModel(3, 2, 4, tol=1e-13, grad_tol=1e-13, mitr=5000, grad_mitr=5000).double()
    U = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(model, (U,))
    model.options = F.SolverOptions(5000, 1e-13, 5000, 1e-13, backward="jfb")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not torch.autograd.gradcheck(model, (U,), raise_exception=False)


@pytest.mark.parametrize("kw, error, match", [
    (dict(backward="exact"), ValueError, "backward"),
    (dict(phantom_tau=0.0), ValueError, "phantom_tau"),
    (dict(phantom_tau=1.5), ValueError, "phantom_tau"),
    (dict(phantom_steps=0), ValueError, "phantom_steps"),
    (dict(rtol=-1.0), ValueError, "rtol"),
    (dict(grad_rtol=float("nan")), ValueError, "grad_rtol"),
    (dict(solver="newton"), ValueError, "solver"),
])
def test_bad_settings(kw, error, match):
    with pytest.raises(error, match=match):
        idl.ImplicitModel(3, 2, 4, **kw)


def test_op_checks_settings():
    A, C0 = halving_problem()
    with pytest.raises(ValueError, match="rtol"):
        ops.fixed_point_rel(A, C0, None, "identity", 0.0, 10, 1e-6, -1.0, "picard", 5)
    with pytest.raises(ValueError, match="phantom_tau"):
        ops.phantom_adjoint(A, C0, C0, "identity", 0.0, 3, 0.0)
