"""GPU benchmarks of idl's CUDA kernels (not a test).

1. Training step: idl.ImplicitModel against torchidl.ImplicitModel, same sizes,
   same initial parameters, same solver settings: median time of forward +
   backward + optimizer step, and the solves' iteration counts; idl with each
   projection, and with solver="auto", rtol 1e-3 and backward="jfb".
2. Forward solve against its GEMM bound: a Picard solve costs at least
   `iterations` products X·Aᵀ, so iterations × (time of one full-batch GEMM) is
   what a solver that does nothing but GEMMs would take. The ratio shows the
   cost of everything else (the fused step kernel, the convergence checks);
   per-sample freezing can take it below 1 when samples finish at different
   iterations. Also the host's waits and checks per solve
   (idl::cuda_sync_counts): with check_every = 0 (fixed iterations) there are
   none, and the solve runs max_iter passes.

Times are CUDA-event medians over --reps runs after --warmup runs. Usage:

    python benchmarks/bench_cuda.py                       # both, on cuda
    python benchmarks/bench_cuda.py --only bound --hidden 4096 --batch 4096
    python benchmarks/bench_cuda.py --torchidl-path /path/holding/torchidl
    python benchmarks/bench_cuda.py --device cpu --hidden 64 --batch 64   # smoke run

IDL_CUDA_CHECK_EVERY (default 8) sets how often the CUDA solves look at their
convergence counters; --check-every runs the bound benchmark for several values.
--summary FILE appends the headline numbers to FILE as tab-separated rows
(scripts/gpu_check.sh prints them in its table).
"""
import argparse
import os
import statistics
import sys
import time

import torch

import idl


def median_ms(fn, device, warmup, reps):
    """Median wall time of fn() in milliseconds: CUDA events on a GPU, the
    host clock on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


# ---- 1. training step ----------------------------------------------------------


def import_torchidl(path):
    if path:
        sys.path.insert(0, path)
    try:
        import torchidl
    except ImportError as error:
        return None, str(error)
    return torchidl, None


def summary_row(args, name, result, detail=""):
    """One tab-separated row for scripts/gpu_check.sh's table."""
    if args.summary:
        with open(args.summary, "a") as out:
            out.write(f"{name}\t{result}\t{detail}\n")


def copy_parameters(source, target):
    """Give `target` (idl) the parameters of `source` (torchidl)."""
    with torch.no_grad():
        for name in ("A", "B", "C", "D"):
            getattr(target, name).copy_(getattr(source, name))


def training_step(model, U, labels, optimizer):
    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(U), labels)
        loss.backward()
        optimizer.step()

    return step


def bench_training(args, device, dtype):
    torch.manual_seed(0)
    U = torch.randn(args.batch, args.input, device=device, dtype=dtype)
    labels = torch.randint(0, args.output, (args.batch,), device=device)
    settings = dict(mitr=args.max_iter, grad_mitr=args.max_iter, tol=args.tol, grad_tol=args.tol,
                    kappa=args.kappa)
    torchidl, why_not = import_torchidl(args.torchidl_path)
    reference = None
    if torchidl is not None:
        reference = torchidl.ImplicitModel(args.input, args.output, args.hidden, **settings)
        reference.to(device=device, dtype=dtype)
    shape = f"{args.input}->{args.hidden}->{args.output} batch {args.batch}"
    print(f"\n== training step: batch {args.batch}, input {args.input}, hidden {args.hidden}, "
          f"output {args.output}, {dtype}, tol {args.tol}, kappa {args.kappa}")
    # the default settings with each projection, then the other solver and
    # backward modes (scale projection)
    variants = {"idl (exact)": dict(projection="exact"), "idl (scale)": dict(projection="scale"),
                "idl (auto)": dict(projection="scale", solver="auto"),
                "idl (rtol 1e-3)": dict(projection="scale", rtol=1e-3, grad_rtol=1e-3),
                "idl (jfb)": dict(projection="scale", backward="jfb")}
    rows = {}
    for name, options in variants.items():
        model = idl.ImplicitModel(args.input, args.output, args.hidden, **options,
                                  **settings).to(device=device, dtype=dtype)
        if reference is not None:
            copy_parameters(reference, model)
        step = training_step(model, U, labels, torch.optim.SGD(model.parameters(), lr=1e-3))
        ms = median_ms(step, device, args.warmup, args.reps)
        stats = model.last_stats
        rows[name] = (ms, stats.forward["iterations"], stats.backward["iterations"])
    if reference is not None:
        step = training_step(reference, U, labels, torch.optim.SGD(reference.parameters(), lr=1e-3))
        rows["torchidl"] = (median_ms(step, device, args.warmup, args.reps), "-", "-")
    else:
        print(f"   torchidl not importable ({why_not}); pass --torchidl-path")
    print(f"   {'model':<16} {'ms/step':>10} {'fwd iters':>10} {'bwd iters':>10}")
    for name, (ms, forward, backward) in rows.items():
        print(f"   {name:<16} {ms:>10.3f} {forward!s:>10} {backward!s:>10}")
    idl_ms = rows["idl (scale)"][0]
    if reference is not None:
        torchidl_ms = rows["torchidl"][0]
        print(f"   speed-up of idl (scale) over torchidl: {torchidl_ms / idl_ms:.2f}x")
        summary_row(args, f"train step {shape}", f"{idl_ms:.2f} ms",
                    f"torchidl {torchidl_ms:.2f} ms: {torchidl_ms / idl_ms:.2f}x; "
                    f"jfb {rows['idl (jfb)'][0]:.2f}, auto {rows['idl (auto)'][0]:.2f} ms")
    else:
        summary_row(args, f"train step {shape}", f"{idl_ms:.2f} ms",
                    "torchidl not installed: no comparison")


# ---- 2. forward solve against the GEMM bound ----------------------------------------


def bound_problem(args, device, dtype):
    generator = torch.Generator().manual_seed(0)
    A = torch.randn(args.bound_hidden, args.bound_hidden, generator=generator, dtype=torch.float64)
    A = idl.project_linf(A, args.kappa).to(device=device, dtype=dtype)
    C0 = torch.randn(args.bound_batch, args.bound_hidden, generator=generator, dtype=torch.float64)
    return A, C0.to(device=device, dtype=dtype)


def bench_bound(args, device, dtype):
    A, C0 = bound_problem(args, device, dtype)
    ops = torch.ops.idl
    solve_args = (args.activation, 0.01, args.max_iter, args.tol, args.max_iter, args.tol)
    product = torch.empty_like(C0)
    At = A.t()
    gemm_ms = median_ms(lambda: torch.mm(C0, At, out=product), device, args.warmup, args.reps)
    flops = 2.0 * args.bound_batch * args.bound_hidden**2
    print(f"\n== forward solve vs GEMM bound: batch {args.bound_batch}, hidden {args.bound_hidden}, "
          f"{dtype}, {args.activation}, tol {args.tol}, kappa {args.kappa}")
    print(f"   one X·Aᵀ: {gemm_ms:.3f} ms ({flops / gemm_ms / 1e9:.1f} TFLOP/s)")
    print(f"   {'check_every':>11} {'iters':>6} {'solve ms':>10} {'bound ms':>10} {'solve/bound':>12} "
          f"{'waits/solve':>12} {'checks/solve':>13}")
    previous = os.environ.get("IDL_CUDA_CHECK_EVERY")
    counts = getattr(ops, "cuda_sync_counts", None) if device.type == "cuda" else None
    try:
        for every in args.check_every:
            os.environ["IDL_CUDA_CHECK_EVERY"] = str(every)
            before = counts() if counts else None
            solve_ms = median_ms(lambda: ops.fixed_point(A, C0, None, *solve_args), device,
                                 args.warmup, args.reps)
            waits = checks = float("nan")
            if counts:
                after = counts()
                solves = after[0] - before[0]
                waits = (after[1] - before[1]) / solves
                checks = (after[2] - before[2]) / solves
            iterations, residual, converged = ops.fixed_point(A, C0, None, *solve_args)[2].tolist()
            bound_ms = iterations * gemm_ms
            note = "" if converged else f"  (not converged, residual {residual:.2e})"
            print(f"   {every:>11} {int(iterations):>6} {solve_ms:>10.3f} {bound_ms:>10.3f} "
                  f"{solve_ms / bound_ms:>12.3f} {waits:>12.1f} {checks:>13.1f}{note}")
            summary_row(args, f"fwd solve {args.bound_hidden}x{args.bound_batch} check_every={every}",
                        f"{solve_ms / bound_ms:.2f}x GEMM bound",
                        f"{solve_ms:.1f} ms, {int(iterations)} iters x {gemm_ms:.2f} ms; "
                        f"host waits/solve {waits:.1f}, checks/solve {checks:.1f}")
    finally:
        if previous is None:
            os.environ.pop("IDL_CUDA_CHECK_EVERY", None)
        else:
            os.environ["IDL_CUDA_CHECK_EVERY"] = previous


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("training", "bound"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--batch", type=int, default=1024, help="training batch")
    parser.add_argument("--input", type=int, default=784)
    parser.add_argument("--hidden", type=int, default=1024, help="training hidden size")
    parser.add_argument("--output", type=int, default=10)
    parser.add_argument("--bound-batch", type=int, default=4096)
    parser.add_argument("--bound-hidden", type=int, default=4096)
    parser.add_argument("--activation", default="relu", choices=idl.ACTIVATIONS)
    parser.add_argument("--kappa", type=float, default=0.9)
    parser.add_argument("--tol", type=float, default=3e-6)
    parser.add_argument("--max-iter", type=int, default=300)
    parser.add_argument("--check-every", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--torchidl-path", help="directory to add to sys.path for torchidl")
    parser.add_argument("--summary", help="append the headline numbers to this file (TSV)")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: these benchmarks are for a GPU (--device cpu for a smoke run)")
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    if args.only in (None, "training"):
        bench_training(args, device, dtype)
    if args.only in (None, "bound"):
        bench_bound(args, device, dtype)


if __name__ == "__main__":
    main()
