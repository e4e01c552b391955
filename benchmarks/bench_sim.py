"""SIM on scikit-learn's digits: the default BatchedProxSolver against
CVXSolver (cvxpy), time and test accuracy, with the teacher's accuracy.

The teacher is a bias-free 64-64-32-16-10 ReLU network trained on 70% of the
digits, rescaled without changing its function (idl.sim.balance_hidden_norms)
so that an exact well-posed embedding exists. States are captured once; each
solver is timed on ``sim.train(solver, states_data_path=...)`` (solve and model
construction; capture excluded), median of --repeats runs (CVXSolver: --cvx-repeats).

    PYTHONPATH=. python benchmarks/bench_sim.py [--threads 1] [--repeats 5] [--cvx-repeats 1]
"""
import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

from idl.sim import SIM, balance_hidden_norms, save_states
from idl.sim.solvers import BatchedProxSolver, CVXSolver


def digits_teacher(epochs, seed):
    digits = load_digits()
    U = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    labels = torch.tensor(digits.target)
    train, test = train_test_split(np.arange(len(labels)), test_size=0.3, random_state=seed,
                                   stratify=digits.target)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 64, bias=False), nn.ReLU(), nn.Linear(64, 32, bias=False),
                        nn.ReLU(), nn.Linear(32, 16, bias=False), nn.ReLU(),
                        nn.Linear(16, 10, bias=False))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(epochs):
        optimizer.zero_grad()
        F.cross_entropy(net(U[train]), labels[train]).backward()
        optimizer.step()
    dataset = TensorDataset(U, labels)
    return balance_hidden_norms(net, 0.9), Subset(dataset, train.tolist()), Subset(dataset, test.tolist())


def accuracy(model, loader):
    with torch.no_grad():
        hits = sum((model(u).argmax(1) == y).sum().item() for u, y in loader)
    return hits / sum(len(y) for _, y in loader)


def ab_objective(sim, states, lam):
    """½‖Z − X Aᵀ − U Bᵀ‖² + λ‖[A B]‖₁ in float64 (the [A B] fit's objective)."""
    W = torch.cat([sim.weights["A"], sim.weights["B"]], 1).double()
    F_ = torch.cat([states.X, states.U], 1).double()
    return (0.5 * (states.Z.double() - F_ @ W.t()).square().sum() + lam * W.abs().sum()).item()


def run(name, make_solver, path, test_loader, states, repeats):
    times, sim = [], None
    for _ in range(repeats):
        sim = SIM()
        start = time.perf_counter()
        sim.train(make_solver(), states_data_path=path)
        times.append(time.perf_counter() - start)
    return {"solver": name, "time_s": statistics.median(times), "accuracy": accuracy(sim, test_loader),
            "objective_ab": ab_objective(sim, states, 1e-6)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: cvxpy's solvers are single-threaded)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cvx-repeats", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=150, help="teacher training epochs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.ERROR)

    teacher, train, test = digits_teacher(args.epochs, args.seed)
    test_loader = DataLoader(test, batch_size=len(test))
    teacher_accuracy = accuracy(teacher, test_loader)
    states = SIM().get_states(teacher, DataLoader(train, batch_size=256), progress=False)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "states.pt"
        save_states(states, path)
        rows = [
            run("BatchedProxSolver (ADMM, default)", lambda: BatchedProxSolver(progress=False),
                path, test_loader, states, args.repeats),
            run("BatchedProxSolver (ADMM, rtol=1e-8)",
                lambda: BatchedProxSolver(rtol=1e-8, max_iter=5000, progress=False),
                path, test_loader, states, args.repeats),
            run("BatchedProxSolver (FISTA)", lambda: BatchedProxSolver(method="fista", progress=False),
                path, test_loader, states, args.repeats),
            run("CVXSolver (Clarabel)", lambda: CVXSolver(progress=False),
                path, test_loader, states, args.cvx_repeats),
        ]
    cvx_time = rows[-1]["time_s"]
    print(f"digits: {states.num_samples} training states, hidden {states.X.shape[1]}, "
          f"input {states.U.shape[1]}, output {states.Y.shape[1]}; torch threads {torch.get_num_threads()}")
    print(f"teacher test accuracy: {100 * teacher_accuracy:.2f}%\n")
    print("| solver | time (s) | speed-up vs CVX | test accuracy | [A B] objective |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['solver']} | {row['time_s']:.3f} | {cvx_time / row['time_s']:.0f}x | "
              f"{100 * row['accuracy']:.2f}% | {row['objective_ab']:.4g} |")


if __name__ == "__main__":
    main()
