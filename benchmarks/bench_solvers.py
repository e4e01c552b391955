"""Fixed-point solvers side by side: idl (Picard, Anderson) vs torchidl 0.0.4
vs TorchDEQ 0.1.0 (fixed-point iteration, Anderson), one process, same map.

Every contender solves X = relu(X Aᵀ + U Bᵀ) for the same A, B, U and
differentiates it implicitly; we time the forward solve and the backward
(X.backward(G) for a fixed G), count iterations, and compare the forward time
with the GEMM bound: iterations x the time of one X·Aᵀ product of that shape.

    pip install --no-deps torchidl==0.0.4 torchdeq==0.1.0   # keeps the pinned torch
    python benchmarks/bench_solvers.py                        # the table in benchmarks/README.md
    python benchmarks/bench_solvers.py --hidden 100 --batch 64 --kappa 0.99 --plot solvers.png

Stopping rules: idl and torchidl stop when every sample's ||ΔX||_inf <= tol;
TorchDEQ when every sample's ||ΔX||_2 <= tol, which implies the former (so its
rule is the stricter one, by at most a factor sqrt(hidden) in the norm).
Weights: "random" rows on the kappa-sphere (a random A projected onto the ball);
"trained": an ImplicitModel trained briefly on scikit-learn's digits at that
kappa, whose A is far harder for Picard (its spectral radius nears kappa).
"""
import argparse
import statistics
import time
import warnings

import torch
from sklearn.datasets import load_digits

import idl

INPUT_DIM = 64  # the digits' 8x8 pixels


def digits(batch):
    images, labels = load_digits(return_X_y=True)
    return torch.tensor(images[:batch] / 16.0, dtype=torch.float32), torch.tensor(labels)


def random_weights(n, kappa):
    A = idl.project_linf(torch.randn(n, n), kappa)
    B = torch.randn(n, INPUT_DIM) / n
    return A, B


def trained_weights(n, kappa, steps=60, batch=128):
    """A and B of an ImplicitModel after `steps` Adam steps on digits."""
    images, labels = load_digits(return_X_y=True)
    U, y = torch.tensor(images / 16.0, dtype=torch.float32), torch.tensor(labels)
    model = idl.ImplicitModel(INPUT_DIM, 10, n, kappa=kappa, solver="anderson", mitr=500, grad_mitr=500)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", idl.ImplicitFunctionWarning)
        for step in range(steps):
            rows = torch.randint(0, len(U), (batch,))
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(U[rows]), y[rows]).backward()
            optimizer.step()
    return model.effective_A().detach(), model.B.detach()


# ---- the contenders: prepare(A, B) -> run(U) -> (X, forward iterations) -------
# Set-up (building a model, copying weights) stays outside the timed run.


def idl_solver(method, max_iter, tol):
    def prepare(A, B):
        model = idl.ImplicitModel(INPUT_DIM, 1, A.shape[0], solver=method, mitr=max_iter, grad_mitr=max_iter,
                                  tol=tol, grad_tol=tol, kappa=1.0)
        with torch.no_grad():
            model.A.copy_(A)
            model.B.copy_(B)

        def run(U):
            model.zero_grad(set_to_none=True)
            return model.implicit_state(U), model.last_stats.forward["iterations"]

        return run

    return prepare


def torchidl_solver(max_iter, tol):
    import torchidl.implicit_function as upstream

    class Counted(upstream.ImplicitFunctionInf):
        calls = 0

        @staticmethod
        def phi(X):
            Counted.calls += 1
            return torch.clamp(X, min=0)

    def prepare(A, B):
        A, B = A.clone().requires_grad_(True), B.clone().requires_grad_(True)

        def run(U):
            A.grad = B.grad = None
            Counted.set_parameters(mitr=max_iter, grad_mitr=max_iter, tol=tol, grad_tol=tol, kappa=1.0)
            Counted.calls = 0
            X = Counted.apply(A, B, torch.zeros(A.shape[0], U.shape[0]), U.t()).t()
            return X, Counted.calls

        return run

    return prepare


def torchdeq_solver(method, max_iter, tol):
    from torchdeq import get_deq

    name = {"picard": "fixed_point_iter", "anderson": "anderson"}[method]
    deq = get_deq(f_solver=name, b_solver=name, f_max_iter=max_iter, b_max_iter=max_iter,
                  f_tol=tol, b_tol=tol, ift=True)

    def prepare(A, B):
        A, B = A.clone().requires_grad_(True), B.clone().requires_grad_(True)

        def run(U):
            A.grad = B.grad = None
            injection = U @ B.t()
            z_out, info = deq(lambda z: torch.relu(z @ A.t() + injection), torch.zeros(U.shape[0], A.shape[0]))
            return z_out[-1], int(info["nstep"].max())

        return run

    return prepare


def contenders(max_iter, tol):
    found = {
        "idl picard": idl_solver("picard", max_iter, tol),
        "idl anderson": idl_solver("anderson", max_iter, tol),
    }
    try:
        found["torchidl"] = torchidl_solver(max_iter, tol)
    except ImportError:
        print("torchidl not installed: skipped")
    try:
        found["torchdeq picard"] = torchdeq_solver("picard", max_iter, tol)
        found["torchdeq anderson"] = torchdeq_solver("anderson", max_iter, tol)
    except ImportError:
        print("torchdeq not installed: skipped")
    return found


# ---- measuring ------------------------------------------------------------------


def median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_seconds(batch, n, repeats=20):
    X, A = torch.randn(batch, n), torch.randn(n, n)
    torch.mm(X, A.t())
    return median_seconds(lambda: torch.mm(X, A.t()), repeats)


def measure(run, U, G, repeats):
    """Median forward and backward seconds, and forward iterations."""
    forward, backward, iterations = [], [], 0
    for _ in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        X, iterations = run(U)
        middle = time.perf_counter()
        X.backward(G)
        end = time.perf_counter()
        forward.append(middle - start)
        backward.append(end - middle)
    return statistics.median(forward[1:]), statistics.median(backward[1:]), iterations


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[100, 512, 2048])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--kappa", type=float, nargs="+", default=[0.5, 0.9, 0.99])
    parser.add_argument("--weights", nargs="+", default=["random", "trained"], choices=["random", "trained"])
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--max-iter", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plot", help="write a bar chart of forward times to this file")
    args = parser.parse_args()

    torch.manual_seed(0)
    solvers = contenders(args.max_iter, args.tol)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, tol {args.tol}, "
          f"max_iter {args.max_iter}, median of {args.repeats}\n")
    print("| hidden | batch | kappa | weights | solver | fwd it | fwd ms | bwd ms | fwd / GEMM bound |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for n in args.hidden:
        for kind in args.weights:
            for kappa in args.kappa:
                A, B = (random_weights if kind == "random" else trained_weights)(n, kappa)
                for batch in args.batch:
                    U = digits(batch)[0]
                    G = torch.randn(batch, n)
                    gemm = gemm_seconds(batch, n)
                    for name, prepare in solvers.items():
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            fwd, bwd, its = measure(prepare(A, B), U, G, args.repeats)
                        bound = fwd / (its * gemm) if its else float("nan")
                        rows.append((n, batch, kappa, kind, name, its, fwd, bwd))
                        print(f"| {n} | {batch} | {kappa} | {kind} | {name} | {its} | {1e3 * fwd:.2f} "
                              f"| {1e3 * bwd:.2f} | {bound:.2f} |", flush=True)
    if args.plot:
        plot(rows, args.plot)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({row[:4] for row in rows})
    names = list(dict.fromkeys(row[4] for row in rows))
    fig, ax = plt.subplots(figsize=(max(8, len(cases) * 0.9), 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        times = {row[:4]: row[6] + row[7] for row in rows if row[4] == name}
        ax.bar([c + i * width for c in range(len(cases))], [1e3 * times.get(case, 0) for case in cases],
               width, label=name)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))])
    ax.set_xticklabels([f"n={n}\nb={b}\nκ={k}\n{w}" for n, b, k, w in cases], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("forward + backward, ms (log)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
