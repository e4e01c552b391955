"""One training step (forward + backward) of idl vs torchidl 0.0.4, side by side.

Both packages get the same weights, data, iteration limits and tolerances; the
runs are interleaved so that machine noise hits both alike. Prints the median
time of each and the ratio, and checks that the losses agree.

    pip install --no-deps torchidl==0.0.4      # keeps the pinned torch
    python benchmarks/bench_training_step.py [--repeats 30]

Weights: "init" is torchidl's initialisation (||A||_inf ~ 0.8, so neither
projection changes A); "boundary" scales A to ||A||_inf = 2 so the projection is
active; "trained" are the weights after a few epochs of training (with idl, on
the digits upsampled to the config's input size), where the fixed point is
harder to reach. idl runs with projection="scale" to solve exactly torchidl's
problem, and with its default exact projection for reference. "explicit" is
the same network with A = 0 and no solve (ExplicitTwin): a floor for the step,
and "max speed-up" = torchidl / explicit, the most any implicit model could
gain over torchidl at that row.
"""
import argparse
import statistics
import time

import torch
import torchidl
from sklearn.datasets import load_digits

import idl

CONFIGS = [  # (input, hidden, output, batch)
    (784, 100, 10, 128),
    (64, 128, 10, 5),
]
SETTINGS = dict(mitr=300, grad_mitr=300, tol=3e-6, grad_tol=3e-6, kappa=0.99)


def digits(p):
    """scikit-learn's digits, upsampled from 8x8 to p pixels when p > 64."""
    images, labels = load_digits(return_X_y=True)
    U = torch.tensor(images / 16.0, dtype=torch.float32)
    side = int(round(p ** 0.5))
    if p != 64:
        U = torch.nn.functional.interpolate(U.view(-1, 1, 8, 8), size=(side, side), mode="bilinear")
    return U.reshape(len(U), -1), torch.tensor(labels)


def train_briefly(model, p, epochs=3, batch=64):
    U, y = digits(p)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(epochs):
        for i in range(0, len(U), batch):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(U[i:i + batch]), y[i:i + batch]).backward()
            optimizer.step()


def make_pair(p, n, q, regime, seed=0):
    torch.manual_seed(seed)
    upstream = torchidl.ImplicitModel(input_dim=p, output_dim=q, hidden_dim=n, **SETTINGS)
    if regime == "boundary":
        with torch.no_grad():
            upstream.A.mul_(2.0 / upstream.A.abs().sum(1).max())
    if regime == "trained":
        trainer = idl.ImplicitModel(input_dim=p, output_dim=q, hidden_dim=n, projection="scale", **SETTINGS)
        trainer.load_state_dict(upstream.state_dict())
        train_briefly(trainer, p)
        with torch.no_grad():  # bake the projection in, so both start inside the ball
            trainer.A.copy_(trainer.effective_A())
        # (the trainer's d_scale is 1, loaded from torchidl's state dict, which has none)
        upstream.load_state_dict({k: v for k, v in trainer.state_dict().items() if k != "d_scale"})
    ours = {
        mode: idl.ImplicitModel(input_dim=p, output_dim=q, hidden_dim=n, projection=mode, **SETTINGS)
        for mode in ("scale", "exact")
    }
    for model in ours.values():
        model.load_state_dict(upstream.state_dict())
    return upstream, ours


class ExplicitTwin(torch.nn.Module):
    """relu(U Bᵀ) Cᵀ + U Dᵀ with a model's B, C, D: the implicit model with
    A = 0, solved in one step. Its training step is a floor for any implicit
    one of that shape (the same input and readout products, no solve)."""

    def __init__(self, model):
        super().__init__()
        self.B, self.C, self.D = (torch.nn.Parameter(getattr(model, n).detach().clone()) for n in "BCD")

    def forward(self, U):
        return torch.relu(U @ self.B.t()) @ self.C.t() + U @ self.D.t()


def step(model, U, y):
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(U), y)
    loss.backward()
    return loss.item()


def timed(model, U, y):
    start = time.perf_counter()
    loss = step(model, U, y)
    return time.perf_counter() - start, loss


def bench(p, n, q, batch, regime, repeats):
    upstream, ours = make_pair(p, n, q, regime)
    U, y = digits(p)
    U, y = U[-batch:], y[-batch:]
    contenders = {"torchidl": upstream, "idl (scale)": ours["scale"], "idl (exact)": ours["exact"],
                  "explicit": ExplicitTwin(upstream)}
    times = {name: [] for name in contenders}
    losses = {}
    for model in contenders.values():  # warm up
        step(model, U, y)
    for _ in range(repeats):
        for name, model in contenders.items():
            seconds, losses[name] = timed(model, U, y)
            times[name].append(seconds)
    medians = {name: statistics.median(t) for name, t in times.items()}
    iterations = ours["scale"].last_stats
    return medians, losses, iterations


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} steps\n")
    header = (f"| {'p->n->q':>12} | {'batch':>5} | {'weights':>8} | {'torchidl ms':>11} | {'idl scale ms':>12} "
              f"| {'speed-up':>8} | {'idl exact ms':>12} | {'explicit ms':>11} | {'max speed-up':>12} "
              f"| {'loss gap':>8} | {'fwd/bwd it':>10} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for p, n, q, batch in CONFIGS:
        for regime in ("init", "boundary", "trained"):
            medians, losses, stats = bench(p, n, q, batch, regime, args.repeats)
            ratio = medians["torchidl"] / medians["idl (scale)"]
            ceiling = medians["torchidl"] / medians["explicit"]
            loss_gap = abs(losses["torchidl"] - losses["idl (scale)"])
            its = f"{stats.forward['iterations']}/{stats.backward['iterations']}"
            print(f"| {f'{p}->{n}->{q}':>12} | {batch:>5} | {regime:>8} | {1e3 * medians['torchidl']:>11.3f} "
                  f"| {1e3 * medians['idl (scale)']:>12.3f} | {ratio:>7.1f}x | {1e3 * medians['idl (exact)']:>12.3f} "
                  f"| {1e3 * medians['explicit']:>11.3f} | {ceiling:>11.1f}x | {loss_gap:>8.1e} | {its:>10} |")


if __name__ == "__main__":
    main()
