"""The main job, on scikit-learn's bundled digits (8x8 images, 10 classes):
train an ImplicitModel, then fit a SIM implicit model from a trained MLP, and
report test accuracies, the sparsity and inf-norm of each A, and the time each
step took.

    python -m idl.demo [--epochs N] [--hidden N] [--seed N]
"""
import argparse
import time

import torch
from torch import nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

import idl


def digits_loaders(batch_size=64, seed=0):
    """Train/test loaders of the digits, pixels scaled to [0, 1]."""
    images, labels = load_digits(return_X_y=True)
    U = torch.tensor(images / 16.0, dtype=torch.float32)
    y = torch.tensor(labels)
    U_train, U_test, y_train, y_test = train_test_split(U, y, test_size=0.25, random_state=seed, stratify=y)
    train = DataLoader(TensorDataset(U_train, y_train), batch_size=batch_size, shuffle=True)
    test = DataLoader(TensorDataset(U_test, y_test), batch_size=512)
    return train, test


@torch.no_grad()
def accuracy(model, loader):
    model.eval()
    correct = sum((model(U).argmax(1) == y).sum().item() for U, y in loader)
    model.train()
    return correct / len(loader.dataset)


def fit(model, train, epochs, description):
    """Adam on cross-entropy, with a progress bar."""
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in tqdm(range(epochs), desc=description, unit="epoch"):
        for U, y in train:
            optimizer.zero_grad()
            loss_fn(model(U), y).backward()
            optimizer.step()
    return model


def describe_A(A, kappa):
    """Sparsity and inf-norm of an implicit model's A, as printed."""
    zeros = (A == 0).float().mean().item()
    return f"A: {100 * zeros:.1f}% zeros, ||A||_inf = {A.abs().sum(1).max():.4f} (kappa {kappa})"


def implicit_step(train, test, epochs, hidden):
    model = idl.ImplicitModel(input_dim=64, output_dim=10, hidden_dim=hidden, bias=True, solver="anderson")
    fit(model, train, epochs, "ImplicitModel on digits")
    print(f"ImplicitModel (hidden {hidden}, {epochs} epochs, Anderson): "
          f"test accuracy {100 * accuracy(model, test):.2f}%")
    print(f"  {describe_A(model.effective_A().detach(), model.kappa)}; "
          f"last solve: {model.last_stats.forward['iterations']} forward iterations")


def sim_step(train, test, epochs):
    """A bias-free ReLU MLP, then SIM's implicit model fitted to its states."""
    from idl.sim import SIM, balance_hidden_norms

    teacher = nn.Sequential(nn.Linear(64, 64, bias=False), nn.ReLU(), nn.Linear(64, 32, bias=False), nn.ReLU(),
                            nn.Linear(32, 16, bias=False), nn.ReLU(), nn.Linear(16, 10, bias=False))
    start = time.perf_counter()
    fit(teacher, train, epochs, "MLP teacher on digits")
    print(f"MLP teacher (64-64-32-16-10, {epochs} epochs): test accuracy {100 * accuracy(teacher, test):.2f}%, "
          f"{time.perf_counter() - start:.1f} s")
    # the same function, rescaled so that a well-posed implicit embedding exists
    balance_hidden_norms(teacher, 0.9)
    start = time.perf_counter()
    sim = SIM(activation_fn=torch.nn.functional.relu, kappa=0.99)
    sim.train(model=teacher, dataloader=train)
    print(f"SIM (default solver) from the teacher's states: test accuracy {100 * sim.evaluate(test):.2f}%, "
          f"{time.perf_counter() - start:.1f} s")
    print(f"  {describe_A(sim.implicit_model.A.detach(), sim.kappa)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    train, test = digits_loaders(seed=args.seed)
    for name, step in [("ImplicitModel", lambda: implicit_step(train, test, args.epochs, args.hidden)),
                       ("SIM", lambda: sim_step(train, test, args.epochs))]:
        start = time.perf_counter()
        step()
        print(f"  [{name} step took {time.perf_counter() - start:.1f} s]")


if __name__ == "__main__":
    main()
