"""solver="auto" against Picard and Anderson on the problems of
bench_solvers.py (random weights on the kappa-sphere: easy; weights trained
briefly on digits: hard for Picard), idl alone. Forward and backward
milliseconds (median of --repeats) and iterations, and the ratios the rule is
judged by: auto / Picard on easy rows, auto / Anderson on hard rows.

    python benchmarks/bench_auto_solver.py                  # the table in benchmarks/README.md
    python benchmarks/bench_auto_solver.py --hidden 100 --batch 64 --repeats 5
"""
import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # bench_solvers, and this checkout's idl
import torch  # noqa: E402

import bench_solvers as bs  # noqa: E402
import idl  # noqa: E402

METHODS = ("picard", "anderson", "auto")


def model_for(method, A, B, tol, max_iter):
    model = idl.ImplicitModel(bs.INPUT_DIM, 1, A.shape[0], solver=method, mitr=max_iter,
                              grad_mitr=max_iter, tol=tol, grad_tol=tol, kappa=1.0)
    with torch.no_grad():
        model.A.copy_(A)
        model.B.copy_(B)
    return model


def once(model, U, G):
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    X = model.implicit_state(U)
    middle = time.perf_counter()
    X.backward(G)
    return middle - start, time.perf_counter() - middle


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[100, 512])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--kappa", type=float, nargs="+", default=[0.5, 0.9, 0.99])
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--max-iter", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, tol {args.tol}, "
          f"median of {args.repeats}, runs of the three solvers interleaved\n")
    print("| hidden | batch | κ | weights | Picard | Anderson | auto | auto / Picard | auto / Anderson |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.hidden:
        for kind in ("random", "trained"):
            for kappa in args.kappa:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    A, B = (bs.random_weights if kind == "random" else bs.trained_weights)(n, kappa)
                for batch in args.batch:
                    U, _ = bs.digits(batch)
                    G = torch.randn(batch, n)
                    models = {m: model_for(m, A, B, args.tol, args.max_iter) for m in METHODS}
                    times = {m: [] for m in METHODS}
                    for m in METHODS:  # warm-up
                        once(models[m], U, G)
                    for _ in range(args.repeats):
                        for m in METHODS:
                            times[m].append(sum(once(models[m], U, G)))
                    ms = {m: 1e3 * statistics.median(t) for m, t in times.items()}
                    its = {m: (models[m].last_stats.forward["iterations"],
                               models[m].last_stats.backward["iterations"]) for m in METHODS}
                    cells = " | ".join(f"{its[m][0]}/{its[m][1]} it, {ms[m]:.2f}" for m in METHODS)
                    print(f"| {n} | {batch} | {kappa} | {kind} | {cells} | "
                          f"{ms['auto'] / ms['picard']:.2f} | {ms['auto'] / ms['anderson']:.2f} |",
                          flush=True)


if __name__ == "__main__":
    main()
