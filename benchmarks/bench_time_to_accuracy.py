"""Time to accuracy on real MNIST: idl (each backward mode and solver) vs
torchidl 0.0.4 vs TorchDEQ 0.1.0 (its solvers and phantom gradients), the
same implicit model and training recipe for all.

Recipe: ImplicitModel(784, 10, 100) (ReLU, A projected onto the inf-norm ball
of radius 0.99 before each solve), Adam (lr 1e-3), batch 64, inputs in [-1, 1],
one fixed shuffle of the 60,000 training images per seed. The clock runs over
training steps only; test accuracy (all 10,000 test images) is measured every
--eval-every steps with the clock stopped. The contenders take turns of
--eval-every steps (so that drifting load on a shared machine falls on all of
them alike). Each contender trains until its
test accuracy reaches --target (0.95) or its --budget of training seconds is
spent; for the final-accuracy comparison, it trains on after the target to
--final-steps steps in all (or --extra seconds), within the budget.

    pip install --no-deps torchidl==0.0.4 torchdeq==0.1.0   # keeps the pinned torch
    scripts/get_data.sh mnist                                 # data/mnist.pkl.gz
    python benchmarks/bench_time_to_accuracy.py               # the table in benchmarks/README.md
    python benchmarks/bench_time_to_accuracy.py --quick       # a few contenders, short budget
    python benchmarks/bench_time_to_accuracy.py --only "idl jfb" torchidl --plot curves.png

Tolerances: idl and torchidl stop each sample at ||ΔX||_inf <= 3e-6 (their
default), TorchDEQ at ||ΔX||_2 <= 3e-6 over the batch (its "abs" rule), which
is stricter; max 300 iterations everywhere.
"""
import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # real_data, and this checkout's idl
import real_data  # noqa: E402

import idl  # noqa: E402

IN, OUT, HIDDEN = 784, 10, 100
TOL, MAX_ITER = 3e-6, 300


# ---- contenders: make(seed) -> nn.Module mapping (batch, 784) to logits --------


def idl_model(solver="picard", backward="implicit", **kw):
    def make():
        return idl.ImplicitModel(IN, OUT, HIDDEN, solver=solver, backward=backward, tol=TOL,
                                 grad_tol=TOL, mitr=MAX_ITER, grad_mitr=MAX_ITER, **kw)
    return make


def mlp_model():
    """The explicit network of the same shape (784-100-10 ReLU MLP, nn.Linear
    layers): not a contender but the floor, one layer's products, autograd and
    Adam with no solve at all."""
    def make():
        return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, OUT))
    return make


def torchidl_model():
    import torchidl

    def make():
        return torchidl.ImplicitModel(IN, OUT, HIDDEN, mitr=MAX_ITER, grad_mitr=MAX_ITER, tol=TOL,
                                      grad_tol=TOL, kappa=0.99)
    return make


class DEQModel(torch.nn.Module):
    """The same implicit map X = relu(X Āᵀ + U Bᵀ), Ā = A projected onto the
    inf-norm ball (idl.project_linf, differentiable), solved and
    differentiated by TorchDEQ; Y = X Cᵀ + U Dᵀ."""

    def __init__(self, deq):
        super().__init__()
        scale = 1.0 / HIDDEN  # torchidl's (and idl's) initialisation
        self.A = torch.nn.Parameter(torch.randn(HIDDEN, HIDDEN) * scale)
        self.B = torch.nn.Parameter(torch.randn(HIDDEN, IN) * scale)
        self.C = torch.nn.Parameter(torch.randn(OUT, HIDDEN) * scale)
        self.D = torch.nn.Parameter(torch.randn(OUT, IN) * scale)
        self.deq = deq

    def forward(self, U):
        A = idl.project_linf(self.A, 0.99)
        injection = U @ self.B.t()
        z_out, _info = self.deq(lambda z: torch.relu(z @ A.t() + injection),
                                torch.zeros(U.shape[0], HIDDEN, dtype=U.dtype))
        return z_out[-1] @ self.C.t() + U @ self.D.t()


def torchdeq_model(solver, grad):
    """grad: "ift" (implicit differentiation), or (k, tau) for the phantom
    gradient of k unrolled damped steps."""
    from torchdeq import get_deq

    name = {"picard": "fixed_point_iter", "anderson": "anderson"}[solver]
    kw = dict(f_solver=name, b_solver=name, f_max_iter=MAX_ITER, b_max_iter=MAX_ITER,
              f_tol=TOL, b_tol=TOL)
    if grad == "ift":
        kw["ift"] = True
    else:
        kw["grad"], kw["tau"] = grad

    def make():
        return DEQModel(get_deq(**kw))
    return make


def contenders():
    found = {
        "idl implicit picard": idl_model("picard"),
        "idl implicit anderson": idl_model("anderson"),
        "idl implicit auto": idl_model("auto"),
        "idl implicit picard rtol1e-3": idl_model("picard", rtol=1e-3, grad_rtol=1e-3),
        "idl phantom(5,0.5) picard": idl_model("picard", "phantom"),
        "idl phantom(5,0.5) auto": idl_model("auto", "phantom"),
        "idl jfb picard": idl_model("picard", "jfb"),
        "idl phantom(5,0.5) picard rtol1e-3": idl_model("picard", "phantom", rtol=1e-3),
        "idl jfb picard rtol1e-3": idl_model("picard", "jfb", rtol=1e-3),
        "idl jfb picard rtol1e-2": idl_model("picard", "jfb", rtol=1e-2),
        "explicit MLP (floor)": mlp_model(),
    }
    try:
        import torchidl  # noqa: F401
        found["torchidl"] = torchidl_model()
    except ImportError:
        print("torchidl not installed: skipped")
    try:
        import torchdeq  # noqa: F401
        found["torchdeq picard ift"] = torchdeq_model("picard", "ift")
        found["torchdeq anderson ift"] = torchdeq_model("anderson", "ift")
        found["torchdeq picard phantom(5,0.5)"] = torchdeq_model("picard", (5, 0.5))
        found["torchdeq anderson phantom(5,0.5)"] = torchdeq_model("anderson", (5, 0.5))
    except ImportError:
        print("torchdeq not installed: skipped")
    return found


QUICK = ["idl implicit picard", "idl phantom(5,0.5) picard rtol1e-3", "idl jfb picard rtol1e-3",
         "idl jfb picard rtol1e-2", "explicit MLP (floor)", "torchidl", "torchdeq picard phantom(5,0.5)"]


# ---- training --------------------------------------------------------------------


def accuracy(model, U, y, chunk=2000):
    with torch.no_grad():
        hits = sum((model(U[i:i + chunk]).argmax(1) == y[i:i + chunk]).sum().item()
                   for i in range(0, len(U), chunk))
    return hits / len(U)


class Run:
    """One contender's training, advanced --eval-every steps at a time, so
    that the contenders can take turns (load on a shared machine drifts; taking
    turns spreads it over all of them)."""

    def __init__(self, make, data, args, seed):
        self.data, self.args = data, args
        torch.manual_seed(seed)  # the same initial weights for the same recipe
        self.model = make()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=args.lr, fused=args.fused_adam or None)
        self.order = torch.randperm(len(data[0]), generator=torch.Generator().manual_seed(seed))
        self.clock, self.step, self.reached, self.done = 0.0, 0, None, False
        self.curve = [(0.0, 0, accuracy(self.model, data[2], data[3]))]

    def advance(self):
        U_train, y_train, U_test, y_test = self.data
        args = self.args
        start = time.perf_counter()
        for _ in range(args.eval_every):
            at = (self.step * args.batch) % len(U_train)
            rows = self.order[at:at + args.batch]
            self.optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(self.model(U_train[rows]), y_train[rows])
            loss.backward()
            self.optimizer.step()
            self.step += 1
        self.clock += time.perf_counter() - start
        acc = accuracy(self.model, U_test, y_test)
        self.curve.append((self.clock, self.step, acc))
        if self.reached is None and acc >= args.target:
            self.reached = self.clock
        if self.clock >= args.budget:
            self.done = True
        elif self.reached is not None:
            self.done = (self.step >= args.final_steps if args.final_steps
                         else self.clock >= self.reached + args.extra)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="contenders by name (default: all found)")
    parser.add_argument("--quick", action="store_true",
                        help=f"only {QUICK}, budget 60 s, target 0.95")
    parser.add_argument("--budget", type=float, default=240.0, help="training seconds per run")
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--extra", type=float, default=0.0,
                        help="train on this many seconds after the target (final accuracy)")
    parser.add_argument("--final-steps", type=int, default=0,
                        help="after the target, train on to this many steps (within the budget)")
    parser.add_argument("--eval-every", type=int, default=100, help="steps between evaluations")
    parser.add_argument("--fused-adam", action="store_true",
                        help="Adam(fused=True) for every contender (one kernel instead of a dozen per step)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--plot", help="write accuracy-vs-time curves to this PNG")
    parser.add_argument("--json", help="write the curves to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.only or (QUICK if args.quick else None)
    if args.quick:
        args.budget = min(args.budget, 60.0)

    images, labels = real_data.load_mnist("train")
    test_images, test_labels = real_data.load_mnist("test")
    data = (images.flatten(1) * 2 - 1, labels, test_images.flatten(1) * 2 - 1, test_labels)
    found = contenders()
    names = [n for n in (names or found) if n in found]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"lr {args.lr}{', fused Adam' if args.fused_adam else ''}, target {args.target}, "
          f"budget {args.budget:.0f} s, seeds {args.seeds}\n")
    print("| contender | seed | s to target | steps to target | ms / step | best acc | final acc |")
    print("|---|---|---|---|---|---|---|")
    runs = {}
    for name in names:
        for seed in args.seeds:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                runs[(name, seed)] = Run(found[name], data, args, seed)
    while not all(r.done for r in runs.values()):
        for run in runs.values():  # one turn each
            if not run.done:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    run.advance()
    results = {}
    for (name, seed), run in runs.items():
        curve, reached = run.curve, run.reached
        steps_at = next((s for t, s, a in curve if a >= args.target), None)
        ms = 1000 * curve[-1][0] / max(curve[-1][1], 1)
        best = max(a for _, _, a in curve)
        print(f"| {name} | {seed} | {'-' if reached is None else f'{reached:.1f}'} | "
              f"{'-' if steps_at is None else steps_at} | {ms:.2f} | {best:.4f} | "
              f"{curve[-1][2]:.4f} |", flush=True)
        results[f"{name} / seed {seed}"] = {"curve": curve, "reached": reached}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.target, args.plot)


def plot(results, target, path):
    """Accuracy against training seconds, one line per contender (20
    distinguishable colours, dashed past the first 10); log time, since the
    contenders span two orders of magnitude."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    colours = plt.get_cmap("tab20").colors
    for i, (label, r) in enumerate(results.items()):
        t, _, a = zip(*[point for point in r["curve"] if point[0] > 0])
        ax.plot(t, a, label=label, marker=".", ms=3, color=colours[(2 * i) % 20 + (i >= 10)],
                ls="--" if i >= 10 else "-")
    ax.axhline(target, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("training seconds (evaluation excluded, log scale)")
    ax.set_ylabel("MNIST test accuracy")
    ax.set_ylim(0.85, 0.97)
    ax.set_title("ImplicitModel(784, 10, 100), Adam, batch 64")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
