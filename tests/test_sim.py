"""SIM end to end: state capture with hooks, states files, the SIM module and
its fitted ImplicitModel, accuracy on scikit-learn's digits."""
import logging
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

import idl
from idl.sim import SIM, States, balance_hidden_norms, capture_states, load_states, save_states
from idl.sim.solvers import BaseSolver, BatchedProxSolver, CVXSolver, LeastSquareSolver


def relu_teacher(sizes, seed=0, hidden_norm=0.8):
    """A random bias-free ReLU network whose hidden-to-hidden layers have
    ||W||_inf = hidden_norm, so an exact well-posed implicit embedding exists."""
    torch.manual_seed(seed)
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out, bias=False), nn.ReLU()]
    return balance_hidden_norms(nn.Sequential(*layers[:-1]), hidden_norm)


def loader(U, labels=None, batch_size=64):
    labels = torch.zeros(len(U), dtype=torch.long) if labels is None else labels
    return DataLoader(TensorDataset(U, labels), batch_size=batch_size)


def embedding(teacher):
    """The implicit weights of a bias-free feedforward network, built by hand:
    hidden layers stacked last first, A strictly upper block triangular."""
    weights = [m.weight.detach().double() for m in teacher if isinstance(m, nn.Linear)]
    hidden = [w.shape[0] for w in weights[:-1]][::-1]  # last layer first
    n, p, q = sum(hidden), weights[0].shape[1], weights[-1].shape[0]
    offsets = np.cumsum([0] + hidden)
    A, B = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, p, dtype=torch.float64)
    for k in range(len(hidden)):  # block k holds layer L-1-k
        layer = len(hidden) - 1 - k
        rows = slice(offsets[k], offsets[k + 1])
        if layer == 0:
            B[rows] = weights[0]
        else:
            A[rows, offsets[k + 1]:offsets[k + 2]] = weights[layer]
    C = torch.zeros(q, n, dtype=torch.float64)
    C[:, :hidden[0]] = weights[-1]
    return A, B, C, torch.zeros(q, p, dtype=torch.float64)


# ---- state capture --------------------------------------------------------------


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3, bias=False)
        self.act = nn.Tanh()

    def forward(self, x):
        return self.act(self.linear(x))


def test_states_of_a_nested_network():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4, bias=False), nn.ReLU(), Block(), nn.Linear(3, 2, bias=False))
    U = torch.randn(30, 5)
    states = capture_states(net, loader(U, batch_size=7), progress=False)
    assert states.layer_sizes == [3, 4]  # last hidden layer first
    z1 = U @ net[0].weight.t()
    z2 = torch.relu(z1) @ net[2].linear.weight.t()
    torch.testing.assert_close(states.Z, torch.cat([z2, z1], 1))
    torch.testing.assert_close(states.X, torch.cat([torch.tanh(z2), torch.relu(z1)], 1))
    torch.testing.assert_close(states.U, U)
    torch.testing.assert_close(states.Y, net(U).detach())


def test_states_satisfy_the_implicit_embedding():
    teacher = relu_teacher([6, 5, 4, 3, 2])
    U = torch.randn(50, 6, dtype=torch.float64)
    states = capture_states(teacher.double(), loader(U), dtype=torch.float64, progress=False)
    A, B, C, D = embedding(teacher)
    torch.testing.assert_close(states.Z, states.X @ A.t() + states.U @ B.t())
    torch.testing.assert_close(states.Y, states.X @ C.t() + states.U @ D.t())


def test_capture_restores_training_mode_and_leaves_parameters_alone():
    teacher = relu_teacher([4, 3, 2]).train()
    capture_states(teacher, loader(torch.randn(8, 4)), progress=False)
    assert teacher.training
    assert all(p.requires_grad for p in teacher.parameters())


def test_skip_layers_keeps_the_last_activation_of_each_block():
    def block():
        return nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 4, bias=False), nn.ReLU())

    net = nn.Sequential(block(), block(), block(), block(), nn.Linear(4, 2, bias=False))
    data = loader(torch.randn(10, 4))
    assert len(capture_states(net, data, skip_layers=None, progress=False).layer_sizes) == 8
    # 5 children > 3: each child block gives its last activation
    assert len(capture_states(net, data, skip_layers=3, progress=False).layer_sizes) == 4
    # 5 children <= 10: searched recursively, every activation kept
    assert len(capture_states(net, data, skip_layers=10, progress=False).layer_sizes) == 8


def test_in_place_activation_keeps_its_pre_activation():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3, bias=False), nn.ReLU(inplace=True), nn.Linear(3, 2, bias=False))
    U = torch.randn(10, 4)
    states = capture_states(net, loader(U), progress=False)
    torch.testing.assert_close(states.Z, U @ net[0].weight.t().detach())
    torch.testing.assert_close(states.X, torch.relu(states.Z))


def test_an_activation_module_called_twice_is_two_layers():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3, bias=False), nn.Linear(3, 2, bias=False)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.b(self.act(self.a(x))))

    states = capture_states(Shared(), loader(torch.randn(5, 3)), progress=False)
    assert states.layer_sizes == [2, 3]


def test_network_without_activation_module_is_an_error():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, x):
            return F.relu(self.linear(x))

    with pytest.raises(ValueError, match="no activation module"):
        capture_states(Functional(), loader(torch.randn(4, 3)), progress=False)
    with pytest.raises(ValueError, match="no activation module"):
        SIM().train(model=nn.Linear(3, 2), dataloader=loader(torch.randn(4, 3)))


def test_bad_model_and_batches():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        capture_states(lambda x: x, loader(torch.randn(4, 3)))
    with pytest.raises(TypeError, match="dataloader must yield"):
        capture_states(relu_teacher([3, 2, 2]), [{"x": torch.randn(2, 3)}], progress=False)
    with pytest.raises(ValueError, match="no batch"):
        capture_states(relu_teacher([3, 2, 2]), [], progress=False)


def test_states_file_round_trip(tmp_path):
    teacher = relu_teacher([5, 4, 3, 2])
    states = capture_states(teacher, loader(torch.randn(20, 5)), progress=False)
    path = tmp_path / "states.pt"
    save_states(states, path)
    loaded = load_states(path)
    for name in "UXZY":
        assert torch.equal(getattr(loaded, name), getattr(states, name))
    assert loaded.layer_sizes == states.layer_sizes
    assert load_states(path, dtype=torch.float64).X.dtype == torch.float64


def test_bad_states_file_and_states(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not an idl SIM states file"):
        load_states(path)
    X = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="Z has shape"):
        States(U=torch.zeros(4, 2), X=X, Z=torch.zeros(4, 2), Y=torch.zeros(4, 1))
    with pytest.raises(ValueError, match="samples"):
        States(U=torch.zeros(3, 2), X=X, Z=X, Y=torch.zeros(4, 1))
    with pytest.raises(ValueError, match="layer_sizes"):
        States(U=torch.zeros(4, 2), X=X, Z=X, Y=torch.zeros(4, 1), layer_sizes=[2, 2])


def test_balance_hidden_norms_keeps_the_function():
    torch.manual_seed(9)
    net = nn.Sequential(nn.Linear(5, 6, bias=False), nn.ReLU(), nn.Linear(6, 4, bias=False),
                        nn.LeakyReLU(0.1), nn.Linear(4, 3, bias=False), nn.ReLU(),
                        nn.Linear(3, 2, bias=False)).double()
    U = torch.randn(20, 5, dtype=torch.float64)
    with torch.no_grad():
        before = net(U)
        balance_hidden_norms(net, 0.7)
        torch.testing.assert_close(net(U), before)
    for index in (2, 4):
        assert torch.linalg.matrix_norm(net[index].weight, ord=math.inf).item() == pytest.approx(0.7)
    biased = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3),
                           nn.ReLU(), nn.Linear(3, 2)).double()
    with torch.no_grad():
        biased[2].weight.mul_(5)
        before = biased(U)
        balance_hidden_norms(biased, 0.7)
        after = biased(U)
    assert ((after - before).norm() / before.norm()).item() < 1e-6
    with pytest.raises(ValueError, match="homogeneous"):
        balance_hidden_norms(nn.Sequential(nn.Linear(2, 2, bias=False), nn.Tanh()))
    with pytest.raises(TypeError, match="Sequential"):
        balance_hidden_norms(nn.Linear(2, 2))


# ---- the SIM module ------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted():
    """A SIM fitted to a small teacher whose embedding is exactly well-posed."""
    teacher = relu_teacher([8, 7, 6, 5, 3], seed=1)
    U = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
    sim = SIM(kappa=0.95).train(BatchedProxSolver(progress=False), teacher, loader(U))
    return sim, teacher


def test_sim_reproduces_the_teacher(fitted):
    sim, teacher = fitted
    U = torch.randn(100, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = teacher(U)
        torch.testing.assert_close(sim(U), expected, atol=1e-2 * expected.abs().max().item(), rtol=0)


def test_fitted_result_is_a_well_posed_implicit_model(fitted):
    sim, _ = fitted
    model = sim.implicit_model
    assert isinstance(model, idl.ImplicitModel) and isinstance(sim, nn.Module)
    A = model.A.detach()
    assert A.abs().sum(dim=1, dtype=torch.float64).max().item() <= 0.95
    assert model.kappa == 0.95 and model.f is idl.ImplicitFunctionInf
    assert torch.equal(model.effective_A().detach(), A)  # the projection leaves A as it is
    U = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.equal(sim(U), model(U))
    assert set(sim.weights) == {"A", "B", "C", "D"}
    assert "implicit_model.A" in sim.state_dict()


def test_evaluate_iterates_any_loader(fitted):
    sim, teacher = fitted
    U = torch.randn(120, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        labels = teacher(U).argmax(dim=1)
    dataset = TensorDataset(U, labels)
    subset = Subset(dataset, list(range(0, 120, 2)))
    with torch.no_grad():
        expected = (sim(U[::2]).argmax(1) == labels[::2]).float().mean().item()
    accuracy = sim.evaluate(DataLoader(subset, batch_size=16))
    assert isinstance(accuracy, float) and accuracy == pytest.approx(expected)
    assert accuracy > 0.95


def test_module_behaviour(fitted):
    sim, _ = fitted
    assert sim.eval() is sim and not sim.training
    assert sim.train() is sim and sim.training
    sim.train(False)
    assert not sim.training
    moved = SIM().train(BatchedProxSolver(progress=False), relu_teacher([4, 3, 2]),
                        loader(torch.randn(40, 4)))
    moved.to(torch.float64)
    assert moved.dtype == torch.float64 and moved.implicit_model.A.dtype == torch.float64
    assert moved(torch.randn(3, 4, dtype=torch.float64)).dtype == torch.float64


def test_default_solver_is_batched(monkeypatch):
    used = []
    original = BatchedProxSolver.solve

    def spy(self, *args):
        used.append(type(self))
        return original(self, *args)

    monkeypatch.setattr(BatchedProxSolver, "solve", spy)
    SIM().train(model=relu_teacher([4, 3, 2]), dataloader=loader(torch.randn(30, 4)))
    assert used == [BatchedProxSolver]


def test_upstream_style_call_with_cvx_solver():
    teacher = relu_teacher([4, 3, 3, 2], seed=4)
    U = torch.randn(60, 4, generator=torch.Generator().manual_seed(4))
    sim = SIM(activation_fn=torch.nn.functional.relu, device="cpu", dtype=torch.float32)
    sim.train(solver=CVXSolver(regen_states=True, progress=False), model=teacher, dataloader=loader(U))
    with torch.no_grad():
        torch.testing.assert_close(sim(U), teacher(U), atol=1e-3, rtol=1e-3)


def test_states_save_then_load_give_the_same_fit(tmp_path):
    teacher = relu_teacher([5, 4, 3, 2], seed=5)
    data = loader(torch.randn(80, 5))
    path = tmp_path / "states.pt"
    first = SIM().train(BatchedProxSolver(progress=False), teacher, data, save_states_path=path)
    second = SIM().train(BatchedProxSolver(progress=False), states_data_path=path)
    for name in "ABCD":
        assert torch.equal(first.weights[name], second.weights[name])


def test_standardize_applies_to_training_and_forward():
    teacher = relu_teacher([4, 3, 2], seed=6)
    U = 3 + 2 * torch.randn(50, 4)
    sim = SIM(standardize=True).train(BatchedProxSolver(progress=False), teacher, loader(U))
    torch.testing.assert_close(sim.input_mean, U.mean(0))
    V = torch.randn(6, 4)
    with torch.no_grad():
        torch.testing.assert_close(sim(V), sim.implicit_model((V - sim.input_mean) / sim.input_std))


def test_python_activation():
    """A φ with no compiled kernel runs as Python phi, with φ' by autograd."""
    torch.manual_seed(7)
    teacher = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Softsign(), nn.Linear(3, 2, bias=False))
    U = torch.randn(60, 4)
    sim = SIM(activation_fn=F.softsign).train(BatchedProxSolver(progress=False), teacher, loader(U))
    assert sim.implicit_model.f.python_activation
    with torch.no_grad():
        torch.testing.assert_close(sim(U), teacher(U), atol=1e-3, rtol=1e-3)
    Z = torch.linspace(-3, 3, 7)
    torch.testing.assert_close(sim.implicit_model.f.dphi(Z), 1 / (1 + Z.abs()) ** 2)


def test_least_squares_result_is_used_as_is(caplog):
    teacher = relu_teacher([4, 3, 3, 2], seed=8, hidden_norm=3.0)
    with caplog.at_level(logging.WARNING, logger="idl.sim"), pytest.warns(UserWarning):
        sim = SIM(prepare_teacher=False).train(LeastSquareSolver(), teacher, loader(torch.randn(40, 4)))
    assert sim.implicit_model.f is idl.ImplicitFunction
    assert any("may not be well-posed" in r.getMessage() for r in caplog.records)


def test_custom_solver_returning_arrays():
    class Zeros(BaseSolver):
        def solve(self, X, U, Z, Y, model_config):
            assert model_config["kappa"] == 0.5 and model_config["activation_fn"] is F.relu
            n, p, q = X.shape[1], U.shape[1], Y.shape[1]
            return np.zeros((n, n)), np.zeros((n, p)), np.ones((q, n)), np.zeros((q, p))

    with pytest.warns(UserWarning, match="differ from the teacher's by 100.0%"):
        sim = SIM(kappa=0.5).train(Zeros(), relu_teacher([4, 3, 2]), loader(torch.randn(10, 4)))
    assert torch.equal(sim(torch.randn(2, 4)), torch.zeros(2, 2))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(kappa=0.0), ValueError, "kappa"),
        (dict(kappa=1.5), ValueError, "kappa"),
        (dict(kappa="big"), TypeError, "kappa"),
        (dict(atol=-1.0), ValueError, "atol"),
        (dict(skip_layers=-1), ValueError, "skip_layers"),
        (dict(dtype=torch.int32), TypeError, "dtype"),
        (dict(activation_fn=3), TypeError, "activation_fn"),
        (dict(max_iter=0), ValueError, "max_iter"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SIM(**kwargs)


def test_bad_train_calls():
    teacher, data = relu_teacher([4, 3, 2]), loader(torch.randn(10, 4))
    with pytest.raises(ValueError, match="states_data_path"):
        SIM().train(BatchedProxSolver(), dataloader=data)
    with pytest.raises(ValueError, match="dataloader is required"):
        SIM().train(BatchedProxSolver(), model=teacher)
    with pytest.raises(TypeError, match="solver must be"):
        SIM().train("cvx", teacher, data)

    class WrongShape(BaseSolver):
        def solve(self, X, U, Z, Y, model_config):
            return torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1)

    with pytest.raises(ValueError, match="solver returned A with shape"):
        SIM().train(WrongShape(), teacher, data)
    with pytest.raises(RuntimeError, match="not fitted"):
        SIM()(torch.randn(2, 4))
    with pytest.raises(RuntimeError, match="not fitted"):
        SIM().evaluate(data)


# ---- digits --------------------------------------------------------------------------


def digits_teacher():
    """A 64-64-32-16-10 bias-free ReLU network trained on 70% of digits, then
    rescaled without changing its function (balance_hidden_norms), so that a
    well-posed exact embedding exists."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    U = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    labels = torch.tensor(digits.target)
    train, test = train_test_split(np.arange(len(labels)), test_size=0.3, random_state=0,
                                   stratify=digits.target)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64, bias=False), nn.ReLU(), nn.Linear(64, 32, bias=False),
                        nn.ReLU(), nn.Linear(32, 16, bias=False), nn.ReLU(),
                        nn.Linear(16, 10, bias=False))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        F.cross_entropy(net(U[train]), labels[train]).backward()
        optimizer.step()
    dataset = TensorDataset(U, labels)
    return balance_hidden_norms(net, 0.9), Subset(dataset, train.tolist()), Subset(dataset, test.tolist())


@pytest.mark.slow
def test_digits_accuracy_close_to_the_teacher():
    teacher, train, test = digits_teacher()
    test_loader = DataLoader(test, batch_size=256)
    with torch.no_grad():
        teacher_accuracy = np.mean([(teacher(u).argmax(1) == y).float().mean().item()
                                    for u, y in DataLoader(test, batch_size=len(test))])
    sim = SIM().train(model=teacher, dataloader=DataLoader(train, batch_size=256))
    accuracy = sim.evaluate(test_loader)
    assert teacher_accuracy > 0.9
    assert accuracy >= teacher_accuracy - 0.03
