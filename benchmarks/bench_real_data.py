"""Real data: MNIST and Fashion-MNIST, read offline by benchmarks/real_data.py
(set them up once with scripts/get_data.sh).

mnist rows: upstream's MNIST recipe for ImplicitModel: hidden 100, Adam, batch
64, 10 epochs, inputs scaled to [-1, 1], cross-entropy; train on the 60,000
training images, test accuracy on the 10,000 test images, at each --lrs. Models:

  MLP                  784-100-10 ReLU network (nn.Linear's init, biases)
  idl                  idl.ImplicitModel(784, 10, 100), every setting default
  idl, torchidl init   the same model with torchidl's initialisation (every
                       weight randn / hidden_dim): what idl did before
  torchidl 0.0.4       torchidl.ImplicitModel(784, 10, 100), where installed
                       (pip install --no-deps torchidl==0.0.4; it imports as
                       `torchidl`, no clash with `idl`)

"active" is the fraction of hidden units that are positive for at least one
test image after training (dead ReLUs are never active).

sim rows: the upstream SIM tutorial on Fashion-MNIST: a bias-free
784-64-32-16-10 ReLU teacher (Adam 0.01, CrossEntropyLoss(reduction="sum"),
CosineAnnealingLR(T_max=5, eta_min=1e-4), batch 128, 5 epochs, pixels in
[0, 1]), then SIM on 2,000 random training images in batches of 1,000, with the
default solver and with CVXSolver(regen_states=True) (minutes; --skip-cvx).
Times are the SIM fit (state capture included).

    python benchmarks/bench_real_data.py                       # everything
    python benchmarks/bench_real_data.py --only mnist --lrs 1e-3 --epochs 2
    python benchmarks/bench_real_data.py --only sim --skip-cvx

Prints a markdown table: medians over --seeds runs (accuracy, with the range
of the runs; active units; seconds), and the ratio of each accuracy to the
MLP's (or the teacher's) at the same setting.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_data  # noqa: E402

import idl  # noqa: E402

try:
    import torchidl
except ImportError:  # the row is left out
    torchidl = None

HIDDEN = 100


def seeds(args):
    return range(args.first_seed, args.first_seed + args.seeds)


# -- MNIST, upstream's ImplicitModel recipe --------------------------------------

def mnist_data():
    (train, train_y), (test, test_y) = real_data.load_mnist("train"), real_data.load_mnist("test")
    return (train.flatten(1) * 2 - 1, train_y), (test.flatten(1) * 2 - 1, test_y)


def torchidl_init(model: idl.ImplicitModel) -> idl.ImplicitModel:
    """torchidl's initialisation, which idl used before: every weight randn / n,
    drawn in torchidl's order."""
    with torch.no_grad():
        for name in ("A", "B", "C", "D"):
            weight = getattr(model, name)
            weight.copy_(torch.randn(weight.shape) / model.hidden_dim)
        model.d_scale = 1.0  # and torchidl's parametrisation of D
    return model


def make_model(kind: str):
    if kind == "MLP":
        return nn.Sequential(nn.Linear(784, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))
    if kind == "idl":
        return idl.ImplicitModel(784, 10, HIDDEN)
    if kind == "idl, no_D":  # not in the default rows: what the U Dᵀ path costs
        return idl.ImplicitModel(784, 10, HIDDEN, no_D=True)
    if kind == "idl, torchidl init":
        return torchidl_init(idl.ImplicitModel(784, 10, HIDDEN))
    if kind == "torchidl 0.0.4":
        return torchidl.ImplicitModel(input_dim=784, output_dim=10, hidden_dim=HIDDEN)
    raise ValueError(kind)


def hidden_state(model, U):
    if isinstance(model, nn.Sequential):
        return torch.relu(model[0](U))
    if isinstance(model, idl.ImplicitModel):
        return model.implicit_state(U)
    # torchidl: the same fixed point, solved by idl (torchidl rescales A)
    twin = idl.ImplicitModel(784, 10, HIDDEN, projection="scale", kappa=0.99)  # torchidl's default
    twin.load_state_dict({k: model.state_dict()[k] for k in ("A", "B", "C", "D")})
    return twin.implicit_state(U)


def evaluate(model, U, y, batch=1000):
    hits, active = 0, None
    with torch.no_grad():
        for i in range(0, len(U), batch):
            hits += (model(U[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
            on = (hidden_state(model, U[i:i + batch]) > 0).any(0)
            active = on if active is None else active | on
    return hits / len(U), active.float().mean().item()


def mnist_run(kind, lr, epochs, seed, data, batch=64):
    (U, y), (U_test, y_test) = data
    torch.manual_seed(seed)
    model = make_model(kind)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(U), generator=order)
        for i in range(0, len(U), batch):
            rows = perm[i:i + batch]
            optimizer.zero_grad()
            F.cross_entropy(model(U[rows]), y[rows]).backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    accuracy, active = evaluate(model, U_test, y_test)
    return {"accuracy": accuracy, "active": active, "seconds": seconds}


def mnist_rows(args):
    reason = real_data.missing("mnist")
    if reason:
        print(f"mnist rows skipped: {reason}", file=sys.stderr)
        return []
    data = mnist_data()
    kinds = args.kinds or ["MLP", "idl", "idl, torchidl init"] + (["torchidl 0.0.4"] if torchidl else [])
    if torchidl is None:
        print("torchidl not installed (pip install --no-deps torchidl==0.0.4): its rows are left out",
              file=sys.stderr)
    rows = []
    for lr in args.lrs:
        for kind in kinds:
            runs = [mnist_run(kind, lr, args.epochs, seed, data) for seed in seeds(args)]
            row = {"dataset": "MNIST", "model": kind, "setting": f"Adam {lr:g}, {args.epochs} ep",
                   **{k: statistics.median(r[k] for r in runs) for k in runs[0]},
                   "range": (min(r["accuracy"] for r in runs), max(r["accuracy"] for r in runs))}
            rows.append(row)
            each = " ".join(f"{100 * r['accuracy']:.2f}" for r in runs)
            print(f"  {row['model']:>20} lr {lr:g}: {100 * row['accuracy']:.2f}% (runs: {each}) "
                  f"active {100 * row['active']:.0f}% {row['seconds']:.0f} s", file=sys.stderr, flush=True)
    return rows


# -- Fashion-MNIST, the SIM tutorial ---------------------------------------------

def fashion_teacher(epochs, seed, data):
    """The upstream tutorial's teacher, trained as it is there (no shuffling)."""
    (U, y), _ = data
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(784, 64, bias=False), nn.ReLU(), nn.Linear(64, 32, bias=False), nn.ReLU(),
                        nn.Linear(32, 16, bias=False), nn.ReLU(), nn.Linear(16, 10, bias=False))
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=5, eta_min=1e-4)
    for _ in range(epochs):
        for i in range(0, len(U), 128):
            optimizer.zero_grad()
            loss_fn(net(U[i:i + 128]), y[i:i + 128]).backward()
            optimizer.step()
        scheduler.step()
    return net.eval()


def sim_fit(teacher, data, solver, seed, samples=2000):
    """SIM as the tutorial runs it; returns (test accuracy, seconds)."""
    from torch.utils.data import DataLoader, Subset, TensorDataset
    from idl.sim import SIM
    (U, y), (U_test, y_test) = data
    g = torch.Generator().manual_seed(seed)
    subset = Subset(TensorDataset(U, y), torch.randperm(len(U), generator=g)[:samples].tolist())
    loader = DataLoader(subset, batch_size=1000, shuffle=True, generator=g)
    sim = SIM(activation_fn=F.relu, device="cpu", dtype=torch.float32)
    start = time.perf_counter()
    sim.train(solver=solver, model=teacher, dataloader=loader)
    seconds = time.perf_counter() - start
    return sim.evaluate(DataLoader(TensorDataset(U_test, y_test), batch_size=1000)), seconds


def sim_rows(args):
    """SIM on Fashion-MNIST: the teacher, the default solver, and (unless
    --skip-cvx) CVXSolver(regen_states=True). Numbers move with SIM's default."""
    reason = real_data.missing("fashion-mnist")
    if reason:
        print(f"sim rows skipped: {reason}", file=sys.stderr)
        return []
    (U, y), (U_test, y_test) = (real_data.load_fashion_mnist(s) for s in ("train", "test"))
    data = (U.flatten(1), y), (U_test.flatten(1), y_test)
    epochs = min(args.epochs, 5)
    solvers = {"SIM, default solver": lambda: None}
    if not args.skip_cvx:
        from idl.sim.solvers import CVXSolver
        solvers["SIM, CVXSolver(regen_states=True)"] = lambda: CVXSolver(regen_states=True)
    results = {"teacher 784-64-32-16-10": [], **{name: [] for name in solvers}}
    for seed in seeds(args):
        start = time.perf_counter()
        teacher = fashion_teacher(epochs, seed, data)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            accuracy = (teacher(data[1][0]).argmax(1) == data[1][1]).float().mean().item()
        results["teacher 784-64-32-16-10"].append({"accuracy": accuracy, "seconds": seconds})
        for name, solver in solvers.items():
            accuracy, seconds = sim_fit(teacher, data, solver(), seed)
            results[name].append({"accuracy": accuracy, "seconds": seconds})
            print(f"  {name}: {100 * accuracy:.2f}% {seconds:.0f} s", file=sys.stderr, flush=True)
    setting = {"teacher 784-64-32-16-10": f"Adam 0.01 cosine, {epochs} ep"}
    return [{"dataset": "Fashion-MNIST", "model": name, "setting": setting.get(name, "2,000 samples"),
             "accuracy": statistics.median(r["accuracy"] for r in runs), "active": None,
             "seconds": statistics.median(r["seconds"] for r in runs)}
            for name, runs in results.items()]


# -- the table -----------------------------------------------------------------

def table(rows):
    lines = ["| dataset | model | setting | test accuracy | vs MLP / teacher | active units | seconds |",
             "|---|---|---|---:|---:|---:|---:|"]
    reference = {}
    for row in rows:
        if row["model"] == "MLP" or row["model"].startswith("teacher"):
            reference[(row["dataset"], row["setting"] if row["model"] == "MLP" else None)] = row["accuracy"]
        ref = reference.get((row["dataset"], row["setting"]), reference.get((row["dataset"], None)))
        ratio = f"{row['accuracy'] / ref:.3f}" if ref else ""
        active = "" if row["active"] is None else f"{100 * row['active']:.0f}%"
        spread = row.get("range")
        accuracy = f"{100 * row['accuracy']:.2f}%"
        if spread and spread[0] != spread[1]:
            accuracy += f" ({100 * spread[0]:.2f}–{100 * spread[1]:.2f})"
        lines.append(f"| {row['dataset']} | {row['model']} | {row['setting']} | {accuracy} "
                     f"| {ratio} | {active} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=["mnist", "sim"],
                        help="rows to run (repeatable; default: all)")
    parser.add_argument("--skip-cvx", action="store_true", help="leave out the CVXSolver row (minutes)")
    parser.add_argument("--epochs", type=int, default=10, help="MNIST epochs (the teacher: at most 5)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[5e-3, 1e-3])
    parser.add_argument("--seeds", type=int, default=1, help="runs per row; the table shows medians")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed, first-seed + 1, ...")
    parser.add_argument("--kinds", nargs="+", help="MNIST models to run (default: all of MLP, idl, "
                        "'idl, torchidl init', 'torchidl 0.0.4')")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    only = set(args.only or ["mnist", "sim"])
    rows = []
    if "mnist" in only:
        rows += mnist_rows(args)
    if "sim" in only:
        rows += sim_rows(args)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.seeds} seed(s)")
    print(table(rows))


if __name__ == "__main__":
    main()
