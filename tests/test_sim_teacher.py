"""SIM on teachers as users build them: biases, BatchNorm, weights that
violate kappa, activations an implicit model cannot reproduce; and SIM's
defects (dtype, train(mode=...), 1-D batches, NaN states, pickling)."""
import copy
import io
import logging
import math
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from idl.sim import SIM
from idl.sim.solvers import BatchedProxSolver, CVXSolver
from idl.sim.teacher import prepare_teacher


def loader(U, batch_size=100):
    return DataLoader(TensorDataset(U, torch.zeros(len(U), dtype=torch.long)), batch_size=batch_size)


def mlp(sizes, seed=0, bias=True, act=nn.ReLU, batchnorm=False, scale=1.0):
    """A random MLP; ``scale`` multiplies every weight (scale 3: hidden
    ||W||_inf far above kappa)."""
    torch.manual_seed(seed)
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = nn.Linear(fan_in, fan_out, bias=bias)
        with torch.no_grad():
            linear.weight.mul_(scale)
        layers.append(linear)
        if i < len(sizes) - 2:
            if batchnorm:
                bn = nn.BatchNorm1d(fan_out)
                with torch.no_grad():  # running statistics and affine terms far from identity
                    bn.running_mean.uniform_(-1, 1)
                    bn.running_var.uniform_(0.2, 3)
                    bn.weight.uniform_(0.5, 2)
                    bn.bias.uniform_(-1, 1)
                layers.append(bn)
            layers.append(act())
    return nn.Sequential(*layers).eval()


def relative_error(sim, teacher, U):
    with torch.no_grad():
        expected = teacher(U)
        return ((sim(U) - expected).norm() / expected.norm()).item()


def inf_norms(model):
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return [torch.linalg.matrix_norm(m.weight.double(), ord=math.inf).item() for m in linears[1:-1]]


# ---- the preparation ----------------------------------------------------------------


@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("act", [nn.ReLU, lambda: nn.LeakyReLU(0.1)])
def test_prepared_teacher_computes_the_same_function_and_the_user_model_is_untouched(batchnorm, act):
    teacher = mlp([6, 16, 12, 8, 3], seed=1, batchnorm=batchnorm, act=act, scale=3.0).double()
    original = copy.deepcopy(teacher.state_dict())
    prepared = prepare_teacher(teacher, act(), 0.99)
    assert prepared.rescaled and prepared.embeddable and prepared.model is not teacher
    assert prepared.folded == (3 if batchnorm else 0)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in prepared.model.modules())
    for norm in inf_norms(prepared.model):
        assert norm == pytest.approx(0.9 * 0.99)
    U = torch.randn(200, 6, dtype=torch.float64)
    with torch.no_grad():
        expected, got = teacher(U), prepared.model(U)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-6
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, original[name])


def test_prepare_only_homogeneous_matching_sequentials():
    relu = nn.functional.relu
    tanh_net = mlp([4, 5, 5, 2], act=nn.Tanh)
    assert not prepare_teacher(tanh_net, torch.tanh, 0.99).rescaled  # tanh(c z) != c tanh(z)
    gelu_net = mlp([4, 5, 5, 2], act=nn.GELU)
    prepared = prepare_teacher(gelu_net, relu, 0.99)
    assert prepared.model is gelu_net and prepared.mismatched == ["GELU", "GELU"]
    assert prepare_teacher(mlp([4, 5, 5, 2]), relu, 0.99, rescale=False).model is not None
    assert not prepare_teacher(mlp([4, 5, 5, 2]), relu, 0.99, rescale=False).rescaled
    leaky = mlp([4, 5, 5, 2], act=lambda: nn.LeakyReLU(0.2))
    assert prepare_teacher(leaky, relu, 0.99).mismatched  # slope 0.2 is not relu
    assert prepare_teacher(leaky, nn.LeakyReLU(0.2), 0.99).rescaled


# ---- SIM's default fit ---------------------------------------------------------------


def test_default_fit_matches_a_teacher_whose_raw_weights_violate_kappa():
    teacher = mlp([8, 16, 12, 8, 3], seed=2, bias=False, scale=3.0)
    assert max(inf_norms(teacher)) > 2
    U = torch.randn(400, 8, generator=torch.Generator().manual_seed(2))
    sim = SIM().train(model=teacher, dataloader=loader(U))
    assert sim.fit_info["relative_error"] < 1e-2
    V = torch.randn(300, 8, generator=torch.Generator().manual_seed(3))
    assert relative_error(sim, teacher, V) < 2e-2
    with torch.no_grad():
        agree = (sim(V).argmax(1) == teacher(V).argmax(1)).float().mean().item()
    assert agree > 0.97
    assert max(inf_norms(teacher)) > 2  # the user's model is not rescaled


def test_biased_teacher_is_fitted_exactly():
    """Biases were dropped: 68% relative error on this net before."""
    teacher = mlp([6, 16, 16, 3], seed=3)
    U = torch.randn(400, 6, generator=torch.Generator().manual_seed(4))
    sim = SIM().train(model=teacher, dataloader=loader(U))
    assert sim.implicit_model.bias and sim.fit_info["bias"]
    assert set(sim.weights) == {"A", "B", "C", "D", "bias_hidden", "bias_out"}
    assert sim.weights["B"].shape == (32, 6) and sim.weights["D"].shape == (3, 6)
    assert relative_error(sim, teacher, torch.randn(200, 6)) < 1e-2
    with pytest.warns(UserWarning, match="differ from the teacher's"):
        without = SIM(fit_bias=False).train(model=teacher, dataloader=loader(U))
    assert not without.implicit_model.bias
    assert relative_error(without, teacher, U) > 0.1


def test_batchnorm_teacher_is_fitted_exactly():
    """152% relative error before (BatchNorm's shift is a bias)."""
    teacher = mlp([6, 16, 16, 3], seed=5, batchnorm=True, scale=2.0)
    U = torch.randn(400, 6, generator=torch.Generator().manual_seed(5))
    sim = SIM().train(model=teacher, dataloader=loader(U))
    assert "2 BatchNorm folded" in sim.fit_info["teacher"]
    assert relative_error(sim, teacher, torch.randn(200, 6)) < 1e-2
    assert not teacher.training  # the user's model kept its mode and its BatchNorm
    assert any(isinstance(m, nn.BatchNorm1d) for m in teacher.modules())


def test_other_solvers_get_the_same_preparation():
    teacher = mlp([4, 6, 5, 2], seed=6, scale=3.0)
    U = torch.randn(80, 4, generator=torch.Generator().manual_seed(6))
    sim = SIM().train(CVXSolver(regen_states=True, progress=False), teacher, loader(U))
    assert sim.implicit_model.bias
    assert relative_error(sim, teacher, U) < 1e-2


@pytest.mark.parametrize("act", [nn.GELU, nn.SiLU])
def test_teacher_that_cannot_be_embedded_warns_with_the_residual(act):
    teacher = mlp([6, 16, 16, 3], seed=7, act=act)
    U = torch.randn(300, 6, generator=torch.Generator().manual_seed(7))
    with pytest.warns(UserWarning, match=rf"differ from the teacher's by [0-9.]+% .*{act.__name__}"):
        sim = SIM().train(model=teacher, dataloader=loader(U))
    assert sim.fit_info["mismatched_activations"] == [act.__name__] * 2
    assert sim.fit_info["relative_error"] > 0


def test_one_log_line_says_what_was_captured_and_how_well_it_matched(caplog):
    teacher = mlp([6, 16, 16, 3], seed=8, scale=3.0)
    with caplog.at_level(logging.INFO, logger="idl.sim"):
        SIM().train(model=teacher, dataloader=loader(torch.randn(200, 6)))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SIM fit in")]
    assert len(lines) == 1
    line = lines[0]
    for part in ("regen_states=True", "hidden layers [16, 16]", "biases fitted", "rescaled",
                 "relative error"):
        assert part in line, line


def test_preparation_and_regeneration_can_be_turned_off(monkeypatch):
    teacher = mlp([6, 8, 8, 3], seed=9, bias=False, scale=3.0)
    U = torch.randn(150, 6)
    seen = []
    original = BatchedProxSolver.solve

    def spy(self, X, U_, Z, Y, config):
        seen.append((self.regen_states, U_.shape[1], Z.abs().max().item()))
        return original(self, X, U_, Z, Y, config)

    monkeypatch.setattr(BatchedProxSolver, "solve", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        SIM().train(model=teacher, dataloader=loader(U))
        SIM(prepare_teacher=False).train(BatchedProxSolver(progress=False), teacher, loader(U))
    (regen_on, p_on, _), (regen_off, p_off, _) = seen
    assert regen_on and not regen_off and p_on == p_off == 6


# ---- defects ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "float16", torch.int64])
def test_low_precision_dtype_is_rejected_at_construction(dtype):
    with pytest.raises(TypeError, match=r"dtype must be torch.float32 or torch.float64"):
        SIM(dtype=dtype)
    with pytest.raises(TypeError, match="dtype"):
        SIM().to(torch.float16)


def test_train_mode_keyword_is_nn_module_train():
    sim = SIM()
    assert sim.train(mode=False) is sim and not sim.training
    assert sim.train(mode=True) is sim and sim.training
    with pytest.raises(TypeError, match="mode"):
        sim.train(model=nn.Linear(2, 2), mode=True)


class Scalar(nn.Module):
    """1-D inputs (batch,) and 1-D outputs (batch,)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, u):
        return self.net(u.unsqueeze(1)).squeeze(1)


def test_one_dimensional_inputs_and_outputs():
    torch.manual_seed(10)
    teacher = Scalar().eval()
    u = torch.linspace(-2, 2, 200)
    sim = SIM().train(model=teacher, dataloader=DataLoader(TensorDataset(u), batch_size=50))
    assert sim.implicit_model.input_dim == 1 and sim.implicit_model.output_dim == 1
    with torch.no_grad():
        torch.testing.assert_close(sim(u).squeeze(1), teacher(u), atol=1e-2, rtol=1e-2)


def test_nan_states_name_the_layer():
    teacher = mlp([4, 5, 5, 2], seed=11)
    with torch.no_grad():
        teacher[2].weight[0, 0] = math.nan  # the second Linear: NaN from hidden layer 1 on
    with pytest.raises(ValueError, match=r"pre-activation Z of hidden layer 1 \(3\).*batch 0"):
        SIM().train(model=teacher, dataloader=loader(torch.randn(20, 4)))
    U = torch.randn(20, 4)
    U[15, 2] = math.inf
    with pytest.raises(ValueError, match=r"inputs U .*batch 1"):
        SIM().train(model=mlp([4, 5, 5, 2]), dataloader=loader(U, batch_size=10))


def test_sim_with_a_python_activation_pickles_and_saves(tmp_path):
    teacher = mlp([4, 6, 6, 2], seed=12, act=nn.GELU)
    U = torch.randn(100, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = SIM(activation_fn=nn.GELU()).train(model=teacher, dataloader=loader(U))
    assert sim.implicit_model.f.python_activation and not sim.fit_info["mismatched_activations"]
    with torch.no_grad():
        expected = sim(U)
    again = pickle.loads(pickle.dumps(sim))
    buffer = io.BytesIO()
    torch.save(sim, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (again, loaded):
        assert other.implicit_model.f.python_activation
        with torch.no_grad():
            torch.testing.assert_close(other(U), expected)


# ---- rows whose ball is active ------------------------------------------------------


def digits_states(scale=3.0, seed=0):
    """States of a random bias-free 64-64-32-16-10 ReLU net on digits pixels
    (near-constant border pixels: a badly conditioned Gram matrix), its
    weights scaled so that the hidden-to-hidden layers violate kappa."""
    from sklearn.datasets import load_digits

    from idl.sim import capture_states

    U = torch.tensor(load_digits().data[:1200] / 16.0, dtype=torch.float32)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 64, bias=False), nn.ReLU(), nn.Linear(64, 32, bias=False), nn.ReLU(),
                        nn.Linear(32, 16, bias=False), nn.ReLU(), nn.Linear(16, 10, bias=False))
    with torch.no_grad():
        for module in net:
            if isinstance(module, nn.Linear):
                module.weight.mul_(scale)
    return capture_states(net, loader(U, batch_size=1200))


def test_rows_with_an_active_ball_converge(caplog):
    """Before the warm start, 20-50 of these 112 rows stopped at max_iter."""
    states = digits_states()
    solver = BatchedProxSolver(progress=False, max_iter=1000, tol=0.0)
    with caplog.at_level(logging.INFO, logger="idl.sim"):
        A, B, C, D = solver.solve(states.X, states.U, states.Z, states.Y, {"kappa": 0.99, "dtype": torch.float64})
    messages = [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], messages
    assert any("warm start" in m for m in messages)  # the ball is active on some rows
    assert A.abs().sum(dim=1, dtype=torch.float64).max().item() <= 0.99
    # the same rows as the exact solver (CVX) would give: the optimality conditions
    from idl.sim.solvers.rows import RowProblem

    features = torch.cat([states.X, states.U], dim=1)
    problem = RowProblem.from_data(features, states.Z, 1e-6, 0.0, states.X.shape[1], 0.99)
    W = torch.cat([A, B], dim=1).double()
    gap = problem.duality_gap(W, W @ problem.gram, problem.cross, problem.target_sq)
    assert (gap <= 1e-5 * problem.target_sq).all()


class CustomMLP(nn.Module):
    """A teacher as users write them: its own forward, one ReLU module used
    twice, a flatten by view."""

    def __init__(self, same_batch_view=False):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 10), nn.Linear(10, 8), nn.Linear(8, 3)
        self.act = nn.ReLU()
        self.same_batch_view = same_batch_view

    def forward(self, x):
        x = x.view(x.size(0), -1) if self.same_batch_view else torch.flatten(x, 1)
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


@pytest.mark.parametrize("same_batch_view", [False, True])
def test_custom_module_teacher_is_read_as_a_chain(same_batch_view):
    torch.manual_seed(13)
    teacher = CustomMLP(same_batch_view).eval()
    with torch.no_grad():
        teacher.fc2.weight.mul_(4)  # ||W||_inf beyond kappa
    prepared = prepare_teacher(teacher, nn.functional.relu, 0.99)
    assert prepared.rescaled
    U = torch.randn(300, 3, 4)
    with torch.no_grad():
        torch.testing.assert_close(prepared.model(U), teacher(U), atol=1e-5, rtol=1e-5)
    sim = SIM().train(model=teacher, dataloader=loader(U))
    assert relative_error(sim, teacher, torch.randn(100, 3, 4)) < 1e-2
