"""The cells of the tutorial notebooks, as (kind, source) pairs: "md" for
markdown, "code" for code. notebooks/make_notebooks.py writes and runs them."""

SETUP = r"""
import os
import time
import warnings

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.optim as optim
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import idl

QUICK = os.environ.get("IDL_NOTEBOOK_QUICK") == "1"  # the tests run small
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.manual_seed(0)
print("idl", idl.__version__, "| torch", torch.__version__, "| device", device)
"""

DIGITS = r"""
images, labels = load_digits(return_X_y=True)
U = torch.tensor(images / 16.0, dtype=torch.float32)
y = torch.tensor(labels)
U_train, U_test, y_train, y_test = train_test_split(U, y, test_size=0.25, random_state=0, stratify=y)
U_train, U_test, y_train, y_test = (t.to(device) for t in (U_train, U_test, y_train, y_test))
print("digits:", tuple(U_train.shape), "train,", tuple(U_test.shape), "test")
"""

IMPLICIT_MODELS = [
    ("md", r"""
# Implicit models with `idl`

An implicit model finds its hidden state by solving a fixed-point equation
instead of stacking layers. For a batch of inputs $U$ (batch × p), batch-first
as everywhere in PyTorch:

$$
X = \phi(X A^\top + U B^\top), \qquad \hat Y = X C^\top + U D^\top .
$$

$X$ (batch × n) is the equilibrium state; $A, B, C, D$ are learnt. The model is
**well-posed** (one fixed point for every input, found by Picard iteration
$X_{k+1} = \phi(X_k A^\top + U B^\top)$) when $\phi$ is 1-Lipschitz and
$\|A\|_\infty < 1$, the largest absolute row sum. `idl` keeps that true by
projecting $A$ onto the ball $\{\|A\|_\infty \le \kappa\}$ before every solve,
and trains by implicit differentiation: the backward pass solves
$V = \phi'(Z) \odot (V A + \partial L / \partial X)$, without storing any
iterate of the forward solve.

This notebook covers: the projection, `ImplicitModel` on a regression task and
on digits, Picard against Anderson acceleration, your own activation, and an
implicit model as a layer of a larger network.
"""),
    ("code", SETUP),
    ("md", r"""
## Keeping A well-posed: exact projection or rescaling

The ball $\{\|A\|_\infty \le \kappa\}$ is a product of $\ell_1$ balls, one per row,
so its Euclidean projection works row by row: rows inside are unchanged, rows
outside are soft-thresholded onto the sphere. The upstream `torchidl` instead
rescales the whole matrix by $\kappa / \|A\|_\infty$. Both land in the ball;
the projection moves $A$ the least.
"""),
    ("code", r"""
A = torch.randn(6, 6)
A[:3] *= 0.05                      # three rows already inside the ball
kappa = 0.9
exact = idl.project_linf(A, kappa, "exact")
scale = idl.project_linf(A, kappa, "scale")
print("row sums |A|      ", A.abs().sum(1).numpy().round(3))
print("row sums, exact   ", exact.abs().sum(1).numpy().round(3))
print("row sums, scale   ", scale.abs().sum(1).numpy().round(3))
print(f"distance to A: exact {torch.dist(exact, A):.3f}, scale {torch.dist(scale, A):.3f}")
"""),
    ("md", r"""
## `ImplicitModel` on a regression task

`ImplicitModel` is a drop-in `nn.Module`: forward and backward are packaged,
any optimizer trains it. This is the upstream tutorial's example, unchanged,
but its printed losses are not upstream's (which fell from about 1 to 0.69):
`idl` initialises the weights differently from torchidl (B and C as
`nn.Linear`'s, D = 0 and a small A, where torchidl draws every weight as
randn / n), because under torchidl's initialisation most hidden ReLUs die in
training on real data; and it applies the skip matrix as `d_scale` · D with
`d_scale` = 1/√input_dim, so that Adam's steps on D do not add up over
inputs into large jumps of the output (`d_scale=1` is torchidl's
parametrisation; benchmarks/README.md, "Real data", has the measurements).
"""),
    ("code", r"""
x = torch.randn(5, 64).to(device)  # (batch_size=5, input_dim=64)
y = torch.randn(5, 10).to(device)  # (batch_size=5, output_dim=10)

model = idl.ImplicitModel(input_dim=64, output_dim=10, hidden_dim=128).to(device)
criterion = nn.MSELoss()
optimizer = optim.Adam(model.parameters(), lr=0.01)

losses = []
for epoch in range(10):
    optimizer.zero_grad()
    loss = criterion(model(x), y)
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
    print(f"Epoch [{epoch + 1}/10], Loss: {loss.item():.4f}")
print(model.last_stats)
"""),
    ("md", r"""
`model.last_stats` tells what the last solves did: iterations, the largest
final per-sample residual $\|X_{k+1} - X_k\|_\infty$, and whether every sample
converged, for the forward and the backward solve. A solve that stops at its
iteration limit warns (`idl.ImplicitFunctionWarning`) or, with
`on_nonconvergence="raise"`, raises.

## Classifying digits

scikit-learn ships 1797 8×8 images of handwritten digits. An implicit model with
100 hidden states against an MLP with about as many parameters. The implicit
model trains with Anderson acceleration (`solver="anderson"`, see below).
"""),
    ("code", DIGITS),
    ("code", r"""
def train_classifier(model, epochs, lr=5e-3, batch=64):
    optimizer = optim.Adam(model.parameters(), lr=lr)
    history = []
    for epoch in range(epochs):
        order = torch.randperm(len(U_train), device=device)
        for i in range(0, len(order), batch):
            rows = order[i:i + batch]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(U_train[rows]), y_train[rows]).backward()
            optimizer.step()
        with torch.no_grad():
            history.append((model(U_test).argmax(1) == y_test).float().mean().item())
    return history

epochs = 3 if QUICK else 25
implicit = idl.ImplicitModel(64, 10, 100, bias=True, solver="anderson").to(device)
mlp = nn.Sequential(nn.Linear(64, 240), nn.ReLU(), nn.Linear(240, 10)).to(device)
count = lambda m: sum(p.numel() for p in m.parameters())
curves = {}
for name, net in [("ImplicitModel", implicit), ("MLP", mlp)]:
    start = time.perf_counter()
    curves[name] = train_classifier(net, epochs)
    print(f"{name:14s} {count(net):6d} parameters, test accuracy {100 * curves[name][-1]:.2f}%, "
          f"{time.perf_counter() - start:.1f} s")

for name, curve in curves.items():
    plt.plot(range(1, epochs + 1), curve, label=name)
plt.xlabel("epoch"); plt.ylabel("test accuracy"); plt.title("digits"); plt.legend(); plt.show()
"""),
    ("md", r"""
## Picard or Anderson

After training, the rows of $A$ sit on the sphere of radius κ and Picard
contracts slowly. Anderson acceleration (`solver="anderson"`) mixes the last
few iterates of each sample by a small least-squares problem: same fixed point,
same stopping rule, far fewer iterations. Below, the residual after k
iterations for the trained model (the solve stopped after k iterations, with
tol 0).
"""),
    ("code", r"""
A = implicit.effective_A().detach()
C0 = (U_test @ implicit.B.T + implicit.bias_hidden).detach()
steps = range(1, 41 if QUICK else 121)
for method in ("picard", "anderson"):
    residuals = [torch.ops.idl.fixed_point(A, C0, None, "relu", 0.0, k, 0.0, 1, 0.0, method, 5)[2][1].item()
                 for k in steps]
    plt.semilogy(list(steps), residuals, label=method)
plt.xlabel("iteration"); plt.ylabel("max per-sample residual"); plt.legend(); plt.title("forward solve")
plt.show()

for method in ("picard", "anderson"):
    _, _, stats = torch.ops.idl.fixed_point(A, C0, None, "relu", 0.0, 1000, 1e-6, 1, 0.0, method, 5)
    print(f"{method:9s} reaches tol 1e-6 in {int(stats[0])} iterations")
"""),
    ("md", r"""
## Your own activation

Subclass an implicit function and override the static methods `phi` and
`dphi` (its derivative). Built-in activations (`activation="relu"`, `"tanh"`,
`"leaky_relu"`, `"sigmoid"`, `"softplus"`, `"hardtanh"`, `"identity"`) run in
compiled code; a Python `phi` takes a Python-driven path with the same
algorithm, stats and gradients. SiLU is not 1-Lipschitz (its slope reaches
1.1), so keep κ a little lower.
"""),
    ("code", r"""
class ImplicitFunctionInfSiLU(idl.ImplicitFunctionInf):
    @staticmethod
    def phi(X):
        return X * torch.sigmoid(X)

    @staticmethod
    def dphi(X):
        s = torch.sigmoid(X)
        return s * (1 + X * (1 - s))

silu_model = idl.ImplicitModel(64, 10, 100, f=ImplicitFunctionInfSiLU, kappa=0.8, bias=True).to(device)
curve = train_classifier(silu_model, 2 if QUICK else 10)
print(f"SiLU implicit model: test accuracy {100 * curve[-1]:.2f}%")
"""),
    ("md", r"""
## An implicit model as a layer

`ImplicitModel` composes like any module; gradients flow through it to the
layers before it.
"""),
    ("code", r"""
class MLPWithImplicit(nn.Module):
    def __init__(self, input_dim, hidden_dim, implicit_hidden_dim, output_dim):
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.implicit_layer = idl.ImplicitModel(hidden_dim, output_dim, implicit_hidden_dim)
        self.activation = nn.ReLU()

    def forward(self, x):
        return self.implicit_layer(self.activation(self.fc1(x)))

layered = MLPWithImplicit(64, 128, 64, 10).to(device)
curve = train_classifier(layered, 2 if QUICK else 10)
print(f"MLP + implicit layer: test accuracy {100 * curve[-1]:.2f}%")
"""),
]

RNN_AND_ATTENTION = [
    ("md", r"""
# Implicit RNNs and implicit attention

**ImplicitRNN.** The recurrence of an RNN is an implicit model: at step t,

$$
X_t = \phi(X_t A^\top + [u_t, h_{t-1}] B^\top + b_X), \qquad h_t = X_t C^\top + s\,[u_t, h_{t-1}] D^\top + b_h ,
$$

with biases $b_X, b_h$ by default, as in `nn.RNN` (`bias=False` is torchidl's
cell) and $s$ = `d_scale`, each step's solve warm-started from the previous equilibrium and differentiated
implicitly; backpropagation through time runs across steps, never through
solver iterations. A linear map of the last $h$ gives the output.

**Implicit attention.** Per token the state is $[k, q, v, \mathrm{out}]$; a
sequence's states solve $X = \Phi(X A^\top + U B^\top)$ where Φ keeps $k, q, v$
and sets out = causal attention of $q$ over $k, v$ (softmax, or a Lipschitz
variant). With $A = 0$ it is an ordinary attention head.
"""),
    ("code", SETUP),
    ("md", "## ImplicitRNN: the upstream tutorial's example"),
    ("code", r"""
x = torch.randn(50, 20, 1).to(device)  # (batch_size=50, seq_len=20, input_dim=1)
y = torch.randn(50, 1).to(device)      # (batch_size=50, output_dim=1)

model = idl.ImplicitRNN(input_dim=1, output_dim=1, hidden_dim=10, implicit_hidden_dim=10).to(device)
criterion = nn.MSELoss()
optimizer = optim.Adam(model.parameters(), lr=0.01)
for epoch in range(10):
    optimizer.zero_grad()
    loss = criterion(model(x), y)
    loss.backward()
    optimizer.step()
    print(f"Epoch [{epoch + 1}/10], Loss: {loss.item():.4f}")
"""),
    ("md", r"""
## Extrapolation: a rolling mean outside the training range

Predict the mean of the last 5 of 20 values. Training inputs lie in [-1, 1];
the test also draws them from [-4, 4]. An LSTM of about the same size
saturates outside the range it saw; the implicit RNN, whose recurrence is
piecewise linear, carries on.
"""),
    ("code", r"""
def rolling_mean(count, scale, generator):
    x = scale * (2 * torch.rand(count, 20, 1, generator=generator) - 1)
    return x.to(device), x[:, -5:, 0].mean(1, keepdim=True).to(device)

class LSTMRegressor(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.lstm, self.linear = nn.LSTM(1, hidden, batch_first=True), nn.Linear(hidden, 1)

    def forward(self, x):
        return self.linear(self.lstm(x)[1][0][-1])

g = torch.Generator().manual_seed(0)
x_train, y_train = rolling_mean(2000, 1.0, g)
tests = {"inputs in [-1, 1]": rolling_mean(500, 1.0, g), "inputs in [-4, 4]": rolling_mean(500, 4.0, g)}
steps = 60 if QUICK else 600
models = {"ImplicitRNN": idl.ImplicitRNN(1, 1, hidden_dim=16, implicit_hidden_dim=16),
          "LSTM": LSTMRegressor(15)}
curves = {}
for name, net in models.items():
    net.to(device)
    optimizer = optim.Adam(net.parameters(), lr=1e-2)
    curves[name] = []
    for step in range(steps):
        rows = torch.randint(0, len(x_train), (128,), generator=g).to(device)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(net(x_train[rows]), y_train[rows])
        loss.backward()
        optimizer.step()
        curves[name].append(loss.item())
    with torch.no_grad():
        errors = {k: nn.functional.mse_loss(net(xt), yt).item() for k, (xt, yt) in tests.items()}
    params = sum(p.numel() for p in net.parameters())
    print(f"{name:12s} {params:5d} parameters | test MSE " +
          ", ".join(f"{k}: {v:.5f}" for k, v in errors.items()))

for name, curve in curves.items():
    plt.semilogy(curve, label=name)
plt.xlabel("step"); plt.ylabel("training MSE"); plt.legend(); plt.title("rolling mean"); plt.show()
"""),
    ("md", r"""
## An implicit attention head in a small transformer block

`idl.ImplicitMultiHeadAttention` takes the place of the attention of a
GPT-style block: input and output (batch, T, n_embd), causal.
"""),
    ("code", r"""
class Block(nn.Module):
    def __init__(self, n_embd, heads, block_size):
        super().__init__()
        self.attention = idl.ImplicitMultiHeadAttention(n_embd, heads, block_size)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.ReLU(), nn.Linear(4 * n_embd, n_embd))
        self.norm1, self.norm2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))

block = Block(n_embd=16, heads=2, block_size=8).to(device)
tokens = torch.randn(4, 8, 16, device=device)
out = block(tokens)
out.square().mean().backward()
print("output", tuple(out.shape), "| solves:", block.attention.last_stats)
"""),
]

SIM_CELLS = [
    ("md", r"""
# State-driven Implicit Modeling (SIM)

SIM fits an implicit model to a *trained explicit network*: run the network on
some inputs, record its internal states (inputs $U$, pre-activations $Z$,
post-activations $X$ of every hidden layer, stacked last layer first, and
outputs $Y$), then find weights that reproduce them,

$$
\min_{A,B} \tfrac12\|Z - X A^\top - U B^\top\|^2 + \lambda \|[A\ B]\|_1
\ \text{ s.t. } \|A\|_\infty \le \kappa, \qquad
\min_{C,D} \tfrac12\|Y - X C^\top - U D^\top\|^2 + \lambda \|[C\ D]\|_1 .
$$

Both problems are convex and split by rows. The ℓ1 penalty makes the fitted
weights sparse; the constraint keeps the model well-posed. The result is an
`idl.ImplicitModel`. This notebook follows the upstream SIM tutorial on
scikit-learn's digits in place of FashionMNIST.
"""),
    ("code", SETUP),
    ("code", r"""
from torch.utils.data import DataLoader, Subset, TensorDataset
from idl.sim import SIM, balance_hidden_norms
from idl.sim.solvers import BatchedProxSolver, CVXSolver, LeastSquareSolver

images, labels = load_digits(return_X_y=True)
dataset = TensorDataset(torch.tensor(images / 16.0, dtype=torch.float32), torch.tensor(labels))
order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
train_set, test_set = Subset(dataset, order[:1300]), Subset(dataset, order[1300:])
train_loader = DataLoader(train_set, batch_size=128, shuffle=True)
test_loader = DataLoader(test_set, batch_size=512)

teacher = nn.Sequential(nn.Linear(64, 64, bias=False), nn.ReLU(), nn.Linear(64, 32, bias=False), nn.ReLU(),
                        nn.Linear(32, 16, bias=False), nn.ReLU(), nn.Linear(16, 10, bias=False))
optimizer = optim.Adam(teacher.parameters(), lr=1e-2)
for epoch in range(5 if QUICK else 30):
    for u, t in train_loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(teacher(u), t).backward()
        optimizer.step()

def accuracy(model, loader):
    with torch.no_grad():
        return sum((model(u).argmax(1) == t).sum().item() for u, t in loader) / len(loader.dataset)

print(f"teacher test accuracy: {100 * accuracy(teacher, test_loader):.2f}%")
"""),
    ("md", r"""
An exact, well-posed implicit embedding of a feedforward network exists when its
hidden-to-hidden weights have $\|W\|_\infty \le \kappa$. A bias-free ReLU network
can be rescaled to that without changing the function it computes:
"""),
    ("code", r"""
balance_hidden_norms(teacher, 0.9)
print(f"same function after rescaling: test accuracy {100 * accuracy(teacher, test_loader):.2f}%")
"""),
    ("md", r"""
## Fitting with the default solver

`sim.train` captures the states with forward hooks and fits every row of
$[A\ B]$ and $[C\ D]$ in one batched solve (ADMM on Gram matrices plus a
compiled prox: soft-threshold, then projection onto the $\ell_1$ ball).
"""),
    ("code", r"""
states_loader = DataLoader(Subset(train_set, range(600 if QUICK else 1300)), batch_size=500)
sim = SIM(activation_fn=torch.nn.functional.relu, kappa=0.99, device=device, dtype=torch.float32)
start = time.perf_counter()
sim.train(solver=BatchedProxSolver(), model=teacher, dataloader=states_loader, save_states_path="sim_states.pt")
print(f"default solver: {time.perf_counter() - start:.2f} s, test accuracy {100 * sim.evaluate(test_loader):.2f}%")
A = sim.implicit_model.A.detach()
print(f"||A||_inf = {A.abs().sum(1).max():.4f}, zeros in A: {100 * (A == 0).float().mean():.1f}%")
"""),
    ("md", r"""
The default penalty is tiny ($\lambda = 10^{-6}$): the zeros above are mostly
whole columns, hidden units that never fire on these inputs. A larger
`lambda_z`, and a zeroing tolerance `tol` below which entries are set to 0, buy
a much sparser A at the same accuracy:
"""),
    ("code", r"""
sparse = SIM(activation_fn=torch.nn.functional.relu, kappa=0.99, device=device)
sparse.train(solver=BatchedProxSolver(lambda_z=1e-2, tol=1e-3), states_data_path="sim_states.pt")
A_sparse = sparse.implicit_model.A.detach()
print(f"lambda_z=1e-2: test accuracy {100 * sparse.evaluate(test_loader):.2f}%, "
      f"zeros in A: {100 * (A_sparse == 0).float().mean():.1f}%")

fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
for ax, matrix, title in [(axes[0], A, "default (lambda_z=1e-6)"), (axes[1], A_sparse, "lambda_z=1e-2, tol=1e-3")]:
    ax.spy(matrix.cpu().numpy(), markersize=1)
    ax.set_title(f"fitted A, {title}", fontsize=10)
plt.tight_layout(); plt.show()
"""),
    ("md", r"""
## Other solvers

`CVXSolver` solves the same convex problems with cvxpy (Clarabel or SCS, MOSEK
if installed): the exact reference, and far slower. `LeastSquareSolver` drops
the constraint and the penalty, and warns that the result need not be
well-posed. The saved states are reused, so no network runs again.
"""),
    ("code", r"""
rows = {}
solvers = {"CVXSolver": CVXSolver(), "LeastSquareSolver": LeastSquareSolver()}
if QUICK:
    solvers.pop("CVXSolver")  # about a minute on 1300 samples
for name, solver in solvers.items():
    other = SIM(activation_fn=torch.nn.functional.relu, kappa=0.99, device=device)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        other.train(solver=solver, states_data_path="sim_states.pt")
    A_other = other.implicit_model.A.detach()
    print(f"{name:18s} {time.perf_counter() - start:7.2f} s, test accuracy {100 * other.evaluate(test_loader):.2f}%, "
          f"||A||_inf = {A_other.abs().sum(1).max():.3f}" + (f"  (warned: {caught[0].message})" if caught else ""))
os.remove("sim_states.pt")
"""),
    ("md", r"""
`sim.implicit_model` is an ordinary `idl.ImplicitModel`: it can be fine-tuned
by gradient descent like any other module.
"""),
    ("code", r"""
implicit = sim.implicit_model
print(implicit)
print(f"fitted implicit model: test accuracy {100 * accuracy(implicit, test_loader):.2f}%")
"""),
]

NOTEBOOKS = {
    "01_implicit_models.ipynb": IMPLICIT_MODELS,
    "02_rnn_and_attention.ipynb": RNN_AND_ATTENTION,
    "03_sim.ipynb": SIM_CELLS,
}
