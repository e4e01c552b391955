"""The main job: train an ImplicitModel on scikit-learn's bundled digits data
(8x8 images, 10 classes) and report test accuracy.

    python -m idl.demo [--epochs N] [--hidden N] [--seed N]
"""
import argparse
import time

import torch
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


def train_implicit(epochs, hidden, seed):
    torch.manual_seed(seed)
    train, test = digits_loaders(seed=seed)
    model = idl.ImplicitModel(input_dim=64, output_dim=10, hidden_dim=hidden, bias=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in tqdm(range(epochs), desc="ImplicitModel on digits", unit="epoch"):
        for U, y in train:
            optimizer.zero_grad()
            loss_fn(model(U), y).backward()
            optimizer.step()
    return model, accuracy(model, test)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    model, test_accuracy = train_implicit(args.epochs, args.hidden, args.seed)
    seconds = time.perf_counter() - start
    A = model.effective_A().detach()
    print(f"ImplicitModel (hidden {args.hidden}, {args.epochs} epochs): test accuracy {100 * test_accuracy:.2f}%")
    print(f"  ||A||_inf = {A.abs().sum(1).max():.4f} (kappa {model.kappa}), "
          f"last solve: {model.last_stats.forward['iterations']} forward iterations, "
          f"training took {seconds:.1f} s")


if __name__ == "__main__":
    main()
