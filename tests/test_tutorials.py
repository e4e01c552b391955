"""The upstream tutorials' examples (../shared/seeds/), as written for torchidl
with `idl` in place of it, on CPU.

The tests check that the losses fall, not the values upstream printed: idl
initialises ImplicitModel differently from torchidl (nn.Linear-like B and C,
D = 0, a small A; torchidl draws every weight as randn / n, under which hidden
ReLUs die on real data) and applies D scaled by d_scale = 1/sqrt(input_dim)
(benchmarks/README.md, "Real data"), so the same seed gives other weights,
another training path and other losses."""
import torch
import torch.nn as nn
import torch.optim as optim

from idl import ImplicitFunctionInf, ImplicitModel


def train(model, x, y, epochs=10):
    criterion = nn.MSELoss()
    optimizer = optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_regression_loss_falls():
    torch.manual_seed(0)
    x, y = torch.randn(5, 64), torch.randn(5, 10)
    model = ImplicitModel(input_dim=64, output_dim=10, hidden_dim=128)
    losses = train(model, x, y)
    assert losses[-1] < 0.2 * losses[0]
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 64)).shape == (1, 10)


class ImplicitFunctionInfSiLU(ImplicitFunctionInf):
    """An implicit function that uses the SiLU nonlinearity."""

    @staticmethod
    def phi(X):
        return X * torch.sigmoid(X)

    @staticmethod
    def dphi(X):
        grad = X.clone().detach()
        sigmoid = torch.sigmoid(grad)
        return sigmoid * (1 + grad * (1 - sigmoid))


def test_custom_silu_activation_trains():
    torch.manual_seed(0)
    model = ImplicitModel(input_dim=64, output_dim=10, hidden_dim=128, f=ImplicitFunctionInfSiLU)
    assert model.f.python_activation
    x, y = torch.randn(5, 64), torch.randn(5, 10)
    losses = train(model, x, y)
    assert losses[-1] < 0.5 * losses[0]
    X = model.implicit_state(x)
    residual = X - ImplicitFunctionInfSiLU.phi(X @ model.effective_A().T + x @ model.B.T)
    assert residual.abs().max() < 1e-4


class MLPWithImplicit(nn.Module):
    def __init__(self, input_dim, hidden_dim, implicit_hidden_dim, output_dim):
        super(MLPWithImplicit, self).__init__()
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.implicit_layer = ImplicitModel(input_dim=hidden_dim, output_dim=output_dim, hidden_dim=implicit_hidden_dim)
        self.activation = nn.ReLU()

    def forward(self, x):
        x = self.activation(self.fc1(x))
        x = self.implicit_layer(x)
        return x


def test_implicit_model_as_a_layer():
    torch.manual_seed(0)
    x, y = torch.randn(5, 64), torch.randn(5, 10)
    model = MLPWithImplicit(input_dim=64, hidden_dim=128, implicit_hidden_dim=64, output_dim=10)
    before = model.fc1.weight.detach().clone()
    losses = train(model, x, y)
    assert losses[-1] < 0.2 * losses[0]
    assert not torch.equal(model.fc1.weight, before)  # gradients reach the layers below
