"""ImplicitModel: values against the float64 reference, gradcheck for every
variant, settings, stats, non-convergence policy, devices and dtypes."""
import threading
import warnings

import pytest
import torch
from torch.func import functional_call

import idl
from reference import picard, project_rows_l1, project_scale

TIGHT = dict(mitr=5000, grad_mitr=5000, tol=1e-13, grad_tol=1e-13)


def make_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    settings = dict(input_dim=3, output_dim=2, hidden_dim=4, **TIGHT)
    settings.update(kwargs)
    model = idl.ImplicitModel(**settings).double()
    with torch.no_grad():  # push A outside the ball so that the projection is active
        for name in ("A", "L", "R"):
            if hasattr(model, name):
                getattr(model, name).mul_(8 if name == "A" else 4)
    return model


def gradcheck_model(model, batch=3):
    U = torch.randn(batch, model.input_dim, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in model.named_parameters())

    def f(U, *params):
        return functional_call(model, dict(zip(names, params)), (U,))

    assert torch.autograd.gradcheck(f, (U, *params))


@pytest.mark.parametrize("activation", idl.ACTIVATIONS)
@pytest.mark.parametrize("projection", idl.PROJECTIONS)
def test_gradcheck_every_activation_and_projection(activation, projection):
    gradcheck_model(make_model(activation=activation, negative_slope=0.2, projection=projection))


class SiLU(idl.ImplicitFunctionInf):
    @staticmethod
    def phi(X):
        return X * torch.sigmoid(X)

    @staticmethod
    def dphi(X):
        s = torch.sigmoid(X)
        return s * (1 + X * (1 - s))


@pytest.mark.parametrize(
    "variant",
    [
        dict(is_low_rank=True, rank=2),
        dict(is_low_rank=True, rank=2, projection="scale"),
        dict(f=idl.ImplicitFunctionTriu),
        dict(f=idl.ImplicitFunction, kappa=0.5),
        dict(bias=True),
        dict(no_D=True, bias=True, activation="tanh"),
        dict(solver="anderson", activation="tanh"),
        dict(solver="anderson", f=SiLU, kappa=0.5, anderson_memory=3),
    ],
    ids=["low_rank", "low_rank_scale", "triu", "plain", "bias", "no_D", "anderson", "anderson_custom"],
)
def test_gradcheck_variants(variant):
    model = make_model(**variant)
    if variant.get("f") is idl.ImplicitFunction:
        with torch.no_grad():  # A as is must be a contraction on its own
            model.A.copy_(project_rows_l1(model.A, 0.8))
    gradcheck_model(model)


def test_gradcheck_custom_activation():
    # SiLU is not 1-Lipschitz (max slope 1.1), so keep A well inside the ball
    gradcheck_model(make_model(f=SiLU, kappa=0.5))


@pytest.mark.parametrize("projection", idl.PROJECTIONS)
def test_output_matches_reference(projection):
    model = make_model(activation="tanh", projection=projection, bias=True)
    U = torch.randn(5, 3, dtype=torch.float64)
    project = project_rows_l1 if projection == "exact" else project_scale
    A = project(model.A.detach(), model.kappa)
    C0 = U @ model.B.T + model.bias_hidden
    X = picard(A, C0, "tanh")
    want = X @ model.C.T + U @ model.D.T + model.bias_out
    torch.testing.assert_close(model(U), want, atol=1e-11, rtol=0)
    torch.testing.assert_close(model.implicit_state(U), X, atol=1e-11, rtol=0)


def test_anderson_and_picard_give_the_same_gradients():
    U = torch.randn(6, 3, dtype=torch.float64)
    grads = []
    for solver in ("picard", "anderson"):
        model = make_model(solver=solver, activation="tanh", kappa=0.99, hidden_dim=12)
        model(U).square().sum().backward()
        assert model.last_stats.forward["converged"] and model.last_stats.backward["converged"]
        grads.append([p.grad for p in model.parameters()])
    for picard_grad, anderson_grad in zip(*grads):
        torch.testing.assert_close(anderson_grad, picard_grad, atol=1e-10, rtol=0)


def test_low_rank_A_is_well_posed():
    model = make_model(hidden_dim=12, is_low_rank=True, rank=3, kappa=0.7)
    A = model.effective_A()
    assert A.abs().sum(1).max() <= 0.7 + 1e-12
    assert torch.linalg.matrix_rank(A) <= 3


def test_triu_never_edits_the_parameter():
    model = make_model(f=idl.ImplicitFunctionTriu)
    before = model.A.detach().clone()
    model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    assert torch.equal(model.A.detach(), before)
    assert torch.equal(model.A.grad.tril(), torch.zeros(4, 4, dtype=torch.float64))
    assert model.last_stats.forward["iterations"] <= 4 + 1  # nilpotent: exact after n steps


def test_input_with_more_dims_is_flattened():
    model = make_model(input_dim=6)
    U = torch.randn(2, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(model(U), model(U.reshape(2, 6)))


def test_warm_start():
    model = make_model()
    U = torch.randn(4, 3, dtype=torch.float64)
    X = model.implicit_state(U)
    cold = model.last_stats.forward["iterations"]
    torch.testing.assert_close(model(U, X0=X), model(U))
    model(U, X0=X)
    assert model.last_stats.forward["iterations"] < cold


def test_last_stats_forward_and_backward():
    model = make_model()
    out = model(torch.randn(4, 3, dtype=torch.float64))
    stats = model.last_stats
    assert stats.forward["converged"] and stats.forward["iterations"] >= 1
    assert stats.backward is None
    out.sum().backward()
    assert stats.backward["converged"] and stats.backward["residual"] <= 1e-13


def test_float32_training_matches_float64():
    torch.manual_seed(1)
    model32 = idl.ImplicitModel(8, 3, 16)
    model64 = idl.ImplicitModel(8, 3, 16).double()
    model64.load_state_dict({k: v.double() for k, v in model32.state_dict().items()})
    U = torch.randn(10, 8)
    out32, out64 = model32(U), model64(U.double())
    torch.testing.assert_close(out32.double(), out64, atol=1e-5, rtol=0)
    out32.square().sum().backward()
    out64.square().sum().backward()
    torch.testing.assert_close(model32.A.grad.double(), model64.A.grad, atol=1e-4, rtol=1e-3)


def test_to_moves_everything_including_no_D():
    model = idl.ImplicitModel(3, 2, 4, no_D=True).to(torch.float64)
    assert all(t.dtype == torch.float64 for t in model.state_dict().values())
    assert model.D.dtype == torch.float64
    assert model(torch.randn(2, 3, dtype=torch.float64)).dtype == torch.float64


def test_settings_belong_to_the_instance_and_threads_do_not_interfere():
    U = torch.randn(16, 3, dtype=torch.float64)
    models = [make_model(seed=s, mitr=m, tol=t) for s, m, t in [(0, 2, 1e-3), (1, 4000, 1e-12), (2, 50, 1e-6)]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", idl.ImplicitFunctionWarning)
        expected = [(m(U), m.last_stats.forward) for m in models]
        results = [None] * len(models)

        def run(i):
            for _ in range(20):
                results[i] = (models[i](U), models[i].last_stats.forward)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(models))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for (want, want_stats), (got, got_stats) in zip(expected, results):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        assert got_stats == want_stats


def test_nonconvergence_warns_with_residual_and_iterations():
    model = make_model(f=idl.ImplicitFunction, activation="identity", mitr=3, tol=0.0)
    with pytest.warns(idl.ImplicitFunctionWarning, match=r"forward.*iterations=3, residual="):
        model(torch.randn(2, 3, dtype=torch.float64))


def test_nonconvergence_can_raise():
    model = make_model(mitr=2, tol=0.0, on_nonconvergence="raise")
    with pytest.raises(idl.SolveNotConverged, match="iterations=2"):
        model(torch.randn(2, 3, dtype=torch.float64))


def test_backward_nonconvergence_warns():
    model = make_model(grad_mitr=1, grad_tol=0.0, activation="tanh")
    out = model(torch.randn(2, 3, dtype=torch.float64))
    with pytest.warns(idl.ImplicitFunctionWarning, match="backward"):
        out.sum().backward()
    assert not model.last_stats.backward["converged"]


def test_nan_input_stops_at_once():
    model = make_model(activation="identity")
    U = torch.randn(3, 3, dtype=torch.float64)
    U[1, 0] = float("nan")
    with pytest.warns(idl.ImplicitFunctionWarning, match="NaN or Inf"):
        Y = model(U)
    assert model.last_stats.forward["iterations"] == 0  # seen in the inputs, before iterating
    assert Y.isnan().all()


def test_unprojected_A_that_diverges_is_reported():
    model = make_model(f=idl.ImplicitFunction, activation="identity", mitr=10_000)
    with torch.no_grad():
        model.A.copy_(3 * torch.eye(4))
    with pytest.warns(idl.ImplicitFunctionWarning):
        model(torch.randn(2, 3, dtype=torch.float64))
    assert model.last_stats.forward["iterations"] < 10_000  # overflow to Inf stops it


def test_repr_names_the_settings():
    text = repr(idl.ImplicitModel(3, 2, 4, activation="tanh", projection="scale"))
    assert "activation=tanh" in text and "projection='scale'" in text
