"""The CUDA side of idl.

Everywhere (nvcc is enough, no GPU): every csrc/cuda/*.cu compiles with plain
nvcc for sm_80 and sm_90 plus PTX, without torch headers, and the build refuses
IDL_CUDA=1 with a torch that has no CUDA. Marked slow: the CUDA glue passes a
syntax check against the installed torch's headers.

Where a CUDA device is present (marked ``cuda``, skipped elsewhere): every op
on the GPU matches the CPU op in float64 (values and solve stats, Picard and
Anderson, for any IDL_CUDA_CHECK_EVERY including 0), the host-wait counters,
the TF32 policy, gradcheck and opcheck on CUDA, autocast, streams, and an
ImplicitModel training run on the GPU that follows the CPU run. The
assertions the CPU tests make are made on the GPU too by the tests that take
tests/devices.py's DEVICES (test_fixed_point.py, test_projection.py,
test_sim_prox.py).
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

import pytest
import torch

import idl
from idl import functional as F

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CU_FILES = sorted((CSRC / "cuda").glob("*.cu"))
GENCODE = [
    "-gencode", "arch=compute_80,code=sm_80",
    "-gencode", "arch=compute_90,code=[sm_90,compute_90]",
]
ops = torch.ops.idl


def find_nvcc():
    for candidate in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


# ---- compile checks: run wherever nvcc is ------------------------------------------


def test_every_kernel_file_is_checked():
    assert {p.name for p in CU_FILES} >= {"projection.cu", "fixed_point.cu", "phantom.cu", "prox.cu"}


@needs_nvcc
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_cu_file_compiles_with_plain_nvcc(source, tmp_path):
    """Plain nvcc, only csrc/ on the include path: a kernel file that needs
    torch's headers, or any CUDA compile error or warning, fails here."""
    obj = tmp_path / (source.stem + ".o")
    result = subprocess.run(
        [NVCC, "-c", "-std=c++17", "-O3", "-I", str(CSRC), "--Werror", "all-warnings",
         *GENCODE, "-o", str(obj), str(source)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert obj.stat().st_size > 0


def cuda_include_dir():
    """The toolkit's include directory, as nvcc itself reports it (nvcc on
    PATH may be a wrapper script far from the toolkit)."""
    dry = subprocess.run([NVCC, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True)
    candidates = re.findall(r'-I"?([^"\s]+)', dry.stdout + dry.stderr)
    candidates.append(str(Path(NVCC).resolve().parent.parent / "include"))
    return next((c for c in candidates if (Path(c) / "cuda_runtime.h").exists()), None)


def torch_include_flags():
    from torch.utils.cpp_extension import include_paths

    flags = [f"-isystem{path}" for path in include_paths()]
    flags.append(f"-isystem{sysconfig.get_paths()['include']}")
    generated = Path(include_paths()[0]) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not generated.exists():  # absent from CPU-only wheels; it only sets export macros
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return flags


@needs_nvcc
@pytest.mark.slow
def test_cuda_glue_compiles_against_torch_headers():
    """The glue cannot be built without a CUDA torch, but its C++ can be
    checked against the installed torch's headers (c10/cuda ships with every
    wheel) and the CUDA toolkit of nvcc."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    cuda_include = cuda_include_dir()
    assert cuda_include is not None, "nvcc reports no include directory with cuda_runtime.h"
    result = subprocess.run(
        [compiler, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
         *torch_include_flags(), f"-isystem{cuda_include}", f"-I{CSRC}",
         str(CSRC / "cuda" / "ops_cuda.cpp")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(torch.version.cuda is not None, reason="torch has CUDA here")
def test_build_refuses_forced_cuda_without_cuda_torch():
    result = subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=ROOT, env=dict(os.environ, IDL_CUDA="1"),
        capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert "IDL_CUDA=1" in result.stderr and "torch.version.cuda is None" in result.stderr


# ---- on a CUDA device ------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = "cuda"
ACTIVATIONS = F.ACTIVATIONS


def has_cuda_kernels():
    return torch._C._dispatch_has_kernel_for_dispatch_key("idl::fixed_point", "CUDA")


@pytest.mark.cuda
@gpu
def test_cuda_kernels_are_built_where_cuda_is_available():
    if os.environ.get("IDL_CUDA", "").lower() in ("0", "false", "no", "off"):
        pytest.skip("built with IDL_CUDA=0")
    assert has_cuda_kernels(), "torch has CUDA but idl._C was built without its CUDA kernels"


def problem(m, n, kappa=0.8, seed=0, dtype=torch.float64):
    """A well-posed A and a C0 whose samples have very different scales, so
    that they converge at very different iterations."""
    g = torch.Generator().manual_seed(seed)
    A = ops.project_linf(torch.randn(n, n, generator=g, dtype=dtype), kappa, "exact")
    scales = torch.logspace(-3, 1, m, dtype=dtype)[torch.randperm(m, generator=g)]
    C0 = torch.randn(m, n, generator=g, dtype=dtype) * scales[:, None]
    return A, C0


def on_gpu(*tensors):
    return [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in tensors]


def assert_same_stats(gpu_stats, cpu_stats, residual_atol=1e-13):
    assert gpu_stats.device.type == "cuda" and gpu_stats.dtype == torch.float64
    got, want = gpu_stats.cpu().tolist(), cpu_stats.tolist()
    assert got[0] == want[0], f"iterations: {got} vs {want}"
    assert got[2] == want[2], f"converged: {got} vs {want}"
    if want[1] != want[1]:
        assert got[1] != got[1]
    else:
        assert got[1] == pytest.approx(want[1], abs=residual_atol)


def assert_close_to_cpu(gpu_tensor, cpu_tensor, rtol=1e-10, atol=1e-12):
    assert gpu_tensor.device.type == "cuda"
    torch.testing.assert_close(gpu_tensor.cpu(), cpu_tensor, rtol=rtol, atol=atol)


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("mode", ["exact", "scale"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (40, 33), (3, 3000), (300, 64)])
def test_projection_matches_cpu(mode, shape):
    g = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    A = torch.randn(*shape, generator=g, dtype=torch.float64) * 0.5
    A[0] *= 1e-3  # a row already inside the ball
    grad = torch.randn(*shape, generator=g, dtype=torch.float64)
    for kappa in (0.3, 0.99, 1.0):
        assert_close_to_cpu(ops.project_linf(A.to(DEVICE), kappa, mode), ops.project_linf(A, kappa, mode))
        assert_close_to_cpu(
            ops.project_linf_backward(grad.to(DEVICE), A.to(DEVICE), kappa, mode),
            ops.project_linf_backward(grad, A, kappa, mode),
        )


@pytest.mark.cuda
@gpu
def test_projection_of_a_non_contiguous_matrix():
    A = torch.randn(20, 30, dtype=torch.float64)[:, ::2]
    assert_close_to_cpu(ops.project_linf(A.to(DEVICE), 0.7, "exact"), ops.project_linf(A, 0.7, "exact"))


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("check_every", ["1", "3", "8", "1000"])
def test_solves_match_cpu(activation, check_every, monkeypatch):
    """Forward and adjoint: same X, Z, V and the same stats, for any cadence
    of the host's convergence checks."""
    monkeypatch.setenv("IDL_CUDA_CHECK_EVERY", check_every)
    A, C0 = problem(m=45, n=37)
    X0 = torch.randn_like(C0) * 0.1
    for start in (None, X0):
        args = (activation, 0.05, 1000, 1e-10, 1000, 1e-10)
        cpu = ops.fixed_point(A, C0, start, *args)
        gpu = ops.fixed_point(*on_gpu(A, C0, start), *args)
        for got, want in zip(gpu[:2], cpu[:2]):
            assert_close_to_cpu(got, want)
        assert_same_stats(gpu[2], cpu[2])
    X, Z, _ = cpu
    G = torch.randn_like(Z)
    cpu_v = ops.fixed_point_adjoint(A, Z, G, activation, 0.05, 1000, 1e-10)
    gpu_v = ops.fixed_point_adjoint(*on_gpu(A, Z, G), activation, 0.05, 1000, 1e-10)
    assert_close_to_cpu(gpu_v[0], cpu_v[0])
    assert_same_stats(gpu_v[1], cpu_v[1])


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("activation", ["tanh", "relu", "identity"])
@pytest.mark.parametrize("memory", [1, 3, 5, 16])
@pytest.mark.parametrize("check_every", ["0", "1", "8"])
def test_anderson_matches_cpu(activation, memory, check_every, monkeypatch):
    """The same algorithm as csrc/cpu/anderson.inc, per sample: the same fixed
    point, and the same iteration counts give or take rounding (cuBLAS and the
    CPU GEMM round differently, and mixing weights amplify it a little)."""
    monkeypatch.setenv("IDL_CUDA_CHECK_EVERY", check_every)
    A, C0 = problem(m=40, n=33, kappa=0.97)
    args = (activation, 0.05, 2000, 1e-11, 2000, 1e-11, "anderson", memory)
    cpu = ops.fixed_point(A, C0, None, *args)
    gpu = ops.fixed_point(*on_gpu(A, C0), None, *args)
    assert gpu[2][2].item() == cpu[2][2].item() == 1.0
    assert abs(gpu[2][0].item() - cpu[2][0].item()) <= 2
    assert_close_to_cpu(gpu[0], cpu[0], rtol=1e-9, atol=1e-9)
    X, Z, _ = cpu
    G = torch.randn_like(Z)
    cpu_v = ops.fixed_point_adjoint(A, Z, G, activation, 0.05, 2000, 1e-11, "anderson", memory)
    gpu_v = ops.fixed_point_adjoint(*on_gpu(A, Z, G), activation, 0.05, 2000, 1e-11, "anderson",
                                    memory)
    assert gpu_v[1][2].item() == cpu_v[1][2].item() == 1.0
    assert abs(gpu_v[1][0].item() - cpu_v[1][0].item()) <= 2
    assert_close_to_cpu(gpu_v[0], cpu_v[0], rtol=1e-9, atol=1e-9)


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("method", ["picard", "anderson"])
def test_unconverged_anderson_and_picard_give_g_of_the_last_iterate(method):
    """Stopped by max_iter: X = φ(Z) exactly, and Z as on CPU."""
    A, C0 = problem(m=30, n=16, kappa=0.95)
    args = ("tanh", 0.0, 6, 1e-14, 6, 1e-14, method, 4)
    cpu = ops.fixed_point(A, C0, None, *args)
    X, Z, stats = ops.fixed_point(*on_gpu(A, C0), None, *args)
    assert torch.equal(X, torch.tanh(Z)) or torch.allclose(X, torch.tanh(Z), rtol=1e-15, atol=0)
    assert_close_to_cpu(Z, cpu[1], rtol=1e-12, atol=1e-12)
    assert_same_stats(stats, cpu[2])


@pytest.mark.cuda
@gpu
def test_host_waits_are_counted_and_fixed_iteration_mode_has_none(monkeypatch):
    """idl::cuda_sync_counts: [solves, host waits, checks]. A solve checks at
    most once per IDL_CUDA_CHECK_EVERY passes; with 0 it never waits."""
    A, C0 = on_gpu(*problem(m=64, n=48))
    args = ("tanh", 0.0, 200, 1e-12, 200, 1e-12)
    monkeypatch.setenv("IDL_CUDA_CHECK_EVERY", "4")
    before = ops.cuda_sync_counts()
    iterations = ops.fixed_point(A, C0, None, *args)[2][0].item()
    after = ops.cuda_sync_counts()
    assert after[0] == before[0] + 1
    assert after[1] - before[1] <= after[2] - before[2] + 1
    assert after[2] - before[2] <= iterations // 4 + 2
    monkeypatch.setenv("IDL_CUDA_CHECK_EVERY", "0")
    before = ops.cuda_sync_counts()
    X, _, stats = ops.fixed_point(A, C0, None, *args)
    after = ops.cuda_sync_counts()
    assert after[1:] == before[1:]
    assert stats[0].item() == iterations and stats[2].item() == 1.0


@pytest.mark.cuda
@gpu
def test_float32_solves_ignore_tf32_unless_asked(monkeypatch):
    """torch's TF32 switch on, the solve's GEMMs still run in fp32 (the result
    matches the fp32 solve with TF32 off bit for bit); IDL_ALLOW_TF32=1 lets
    the switch apply; torch's setting is left as the user set it."""
    A, C0 = on_gpu(*problem(m=256, n=512, dtype=torch.float32))
    args = ("tanh", 0.0, 300, 1e-6, 300, 1e-6)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        fp32 = ops.fixed_point(A, C0, None, *args)[0]
        torch.set_float32_matmul_precision("high")
        monkeypatch.delenv("IDL_ALLOW_TF32", raising=False)
        assert torch.equal(ops.fixed_point(A, C0, None, *args)[0], fp32)
        assert torch.get_float32_matmul_precision() == "high"
        monkeypatch.setenv("IDL_ALLOW_TF32", "1")
        tf32 = ops.fixed_point(A, C0, None, *args)[0]
        if torch.cuda.get_device_capability()[0] >= 8:  # TF32 exists from Ampere on
            assert not torch.equal(tf32, fp32)
        torch.testing.assert_close(tf32, fp32, rtol=0, atol=1e-2)
        monkeypatch.delenv("IDL_ALLOW_TF32")
        torch.set_float32_matmul_precision("highest")
        matmul = torch.backends.cuda.matmul
        if hasattr(matmul, "fp32_precision"):  # the per-backend switch alone
            matmul.fp32_precision = "tf32"
            assert torch.equal(ops.fixed_point(A, C0, None, *args)[0], fp32)
            assert matmul.fp32_precision == "tf32"
            matmul.fp32_precision = "ieee"
    finally:
        torch.set_float32_matmul_precision(previous)


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prox_matches_cpu_on_large_rows(dtype):
    """Rows longer than a block, thresholds per row and broadcast."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(37, 3000, generator=g, dtype=torch.float64).to(dtype)
    W[3, 100] = float("inf")
    t = torch.rand(37, generator=g, dtype=torch.float64).to(dtype) * 0.5
    for threshold in (t, t[:1].expand(37)):
        for radius, ball_cols in ((5.0, 1000), (0.0, 3000), (float("inf"), 10), (2.0, 0)):
            want = ops.prox_l1_ball(W, threshold, radius, ball_cols)
            got = ops.prox_l1_ball(W.to(DEVICE), threshold.to(DEVICE), radius, ball_cols)
            tol = 1e-10 if dtype == torch.float64 else 1e-5
            assert_close_to_cpu(got, want, rtol=tol, atol=tol)
            assert got[3].isnan().all()


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("max_iter", [1, 7, 20])
def test_unconverged_solves_match_cpu(max_iter):
    """Stopped by max_iter: every sample's last iterate and the worst residual
    (finished samples included) as on CPU."""
    A, C0 = problem(m=30, n=16, kappa=0.95)
    args = ("tanh", 0.0, max_iter, 1e-12, 10, 1e-12)
    cpu = ops.fixed_point(A, C0, None, *args)
    gpu = ops.fixed_point(*on_gpu(A, C0), None, *args)
    assert cpu[2][2] == 0.0
    assert_close_to_cpu(gpu[0], cpu[0])
    assert_same_stats(gpu[2], cpu[2])


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_iterate_stops_the_solve(bad):
    A, C0 = problem(m=9, n=12)
    C0[4, 3] = bad
    args = ("relu", 0.0, 500, 1e-10, 500, 1e-10)
    cpu = ops.fixed_point(A, C0, None, *args)
    iterations, residual, converged = ops.fixed_point(*on_gpu(A, C0), None, *args)[2].tolist()
    assert converged == 0.0
    assert iterations == cpu[2][0].item() < 500
    assert (residual != residual) if bad != bad else residual == float("inf")


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("m, n", [(0, 5), (4, 0), (0, 0), (1, 1)])
def test_empty_and_tiny_solves(m, n):
    A = torch.full((n, n), 0.1, dtype=torch.float64) / max(n, 1)
    C0 = torch.randn(m, n, dtype=torch.float64)
    args = ("sigmoid", 0.0, 100, 1e-12, 100, 1e-12)
    cpu = ops.fixed_point(A, C0, None, *args)
    gpu = ops.fixed_point(*on_gpu(A, C0), None, *args)
    assert_close_to_cpu(gpu[0], cpu[0])
    assert_same_stats(gpu[2], cpu[2])


@pytest.mark.cuda
@gpu
def test_solve_on_a_side_stream_matches_cpu():
    A, C0 = problem(m=50, n=40)
    args = ("softplus", 0.0, 1000, 1e-10, 1000, 1e-10)
    cpu = ops.fixed_point(A, C0, None, *args)
    a, c0 = on_gpu(A, C0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        X, _, stats = ops.fixed_point(a, c0, None, *args)
    torch.cuda.current_stream().wait_stream(side)
    assert_close_to_cpu(X, cpu[0])
    assert_same_stats(stats, cpu[2])


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_solve_on_the_second_device():
    A, C0 = problem(m=10, n=8)
    args = ("tanh", 0.0, 500, 1e-10, 500, 1e-10)
    cpu = ops.fixed_point(A, C0, None, *args)
    X, _, stats = ops.fixed_point(A.to("cuda:1"), C0.to("cuda:1"), None, *args)
    assert X.device == stats.device == torch.device("cuda:1")
    torch.testing.assert_close(X.cpu(), cpu[0], rtol=1e-10, atol=1e-12)


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("method", ["picard", "anderson"])
@pytest.mark.parametrize("check_every", ["1", "8"])
def test_relative_tolerance_matches_cpu(method, check_every, monkeypatch):
    """fixed_point_rel and fixed_point_adjoint_rel: a sample stops at
    ||ΔX||∞ <= tol + rtol ||g(x)||∞, as on the CPU: the same answers, the same
    iterations (Picard), and the stats' code 2 where a sample stopped on the
    relative part."""
    monkeypatch.setenv("IDL_CUDA_CHECK_EVERY", check_every)
    A, C0 = problem(m=40, n=33, kappa=0.97)
    args = ("tanh", 0.0, 2000, 1e-12, 1e-4, method, 4)
    cpu = ops.fixed_point_rel(A, C0, None, *args)
    gpu = ops.fixed_point_rel(*on_gpu(A, C0), None, *args)
    assert cpu[2][2].item() == 2.0
    # Picard stops at the same pass as the CPU; Anderson within 2 passes, and
    # its answer then within the (loose) relative stopping threshold
    close = dict(rtol=1e-9, atol=1e-9) if method == "picard" else dict(rtol=1e-2, atol=1e-6)
    assert_close_to_cpu(gpu[0], cpu[0], **close)
    G = torch.randn_like(cpu[1])
    cpu_v = ops.fixed_point_adjoint_rel(A, cpu[1], G, *args)
    gpu_v = ops.fixed_point_adjoint_rel(*on_gpu(A, cpu[1], G), *args)
    assert_close_to_cpu(gpu_v[0], cpu_v[0], **close)
    for got, want in ((gpu[2], cpu[2]), (gpu_v[1], cpu_v[1])):
        got = got.cpu()
        assert got[2].item() == want[2].item()
        if method == "picard":
            assert got[0].item() == want[0].item()
        else:  # rounding moves mixing weights a little (test_anderson_matches_cpu)
            assert abs(got[0].item() - want[0].item()) <= 2


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("check_every", ["0", "1", "8"])
def test_auto_matches_cpu(check_every, monkeypatch):
    """solver="auto": a slow sample (identity φ, contraction 0.97) switches
    to Anderson and a fast one does not, as on the CPU: the same fixed point,
    iterations within rounding of the CPU's, and the fast sample's answer
    Picard's."""
    monkeypatch.setenv("IDL_CUDA_CHECK_EVERY", check_every)
    n = 6
    A = torch.full((n, n), 0.97 / n, dtype=torch.float64)
    C0 = torch.randn(2, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64).abs() + 1
    C0[1] = -10.0
    C0[1, 0] = 1.0
    args = ("relu", 0.0, 2000, 1e-10, 0.0, "auto", 5)
    cpu = ops.fixed_point_rel(A, C0, None, *args)
    gpu = ops.fixed_point_rel(*on_gpu(A, C0), None, *args)
    picard = ops.fixed_point_rel(A, C0, None, "relu", 0.0, 2000, 1e-10, 0.0, "picard", 5)
    assert cpu[2][0] < picard[2][0] / 3  # the slow sample switched on the CPU
    assert abs(gpu[2][0].item() - cpu[2][0].item()) <= 2 and gpu[2][2].item() == 1.0
    assert_close_to_cpu(gpu[0], cpu[0], rtol=1e-8, atol=1e-8)
    assert_close_to_cpu(gpu[0][1], picard[0][1])
    G = torch.randn_like(C0)
    cpu_v = ops.fixed_point_adjoint_rel(A, cpu[1], G, *args)
    gpu_v = ops.fixed_point_adjoint_rel(*on_gpu(A, cpu[1], G), *args)
    assert abs(gpu_v[1][0].item() - cpu_v[1][0].item()) <= 2
    assert_close_to_cpu(gpu_v[0], cpu_v[0], rtol=1e-8, atol=1e-8)
    model = idl.ImplicitModel(4, 2, 4, solver="auto", rtol=1e-3, grad_rtol=1e-3).to(DEVICE)
    model(torch.randn(3, 4, device=DEVICE)).sum().backward()
    assert model.last_stats.forward["converged"] and model.A.grad is not None


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("steps, tau", [(1, 1.0), (5, 0.5), (40, 0.8)])
def test_phantom_adjoint_matches_cpu(steps, tau):
    """The phantom (and, at 1 step of tau 1, JFB) adjoint: the same V and
    stats as the CPU's kernel; a NaN in G stops it after its first step, as
    on the CPU."""
    A, C0 = problem(m=45, n=37)
    _, Z, _ = ops.fixed_point(A, C0, None, "tanh", 0.0, 1000, 1e-12, 1000, 1e-12)
    G = torch.randn_like(Z)
    cpu = ops.phantom_adjoint(A, Z, G, "tanh", 0.0, steps, tau)
    gpu = ops.phantom_adjoint(*on_gpu(A, Z, G), "tanh", 0.0, steps, tau)
    assert_close_to_cpu(gpu[0], cpu[0])
    assert_same_stats(gpu[1], cpu[1])
    G[3, 4] = float("nan")
    cpu = ops.phantom_adjoint(A, Z, G, "tanh", 0.0, steps, tau)
    gpu = ops.phantom_adjoint(*on_gpu(A, Z, G), "tanh", 0.0, steps, tau)
    assert cpu[1][0].item() == 1.0
    assert_same_stats(gpu[1], cpu[1])
    empty = torch.zeros(0, 37, dtype=Z.dtype)
    assert ops.phantom_adjoint(*on_gpu(A, empty, empty), "tanh", 0.0, steps, tau)[1].tolist() == [0.0, 0.0, 3.0]


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("backward", ["phantom", "jfb"])
def test_inexact_backward_modes_train_on_cuda_as_on_cpu(backward):
    torch.manual_seed(0)
    cpu = idl.ImplicitModel(6, 3, 8, backward=backward, bias=True).double()
    gpu = idl.ImplicitModel(6, 3, 8, backward=backward, bias=True).double().to(DEVICE)
    gpu.load_state_dict(cpu.state_dict())
    U = torch.randn(5, 6, dtype=torch.float64)
    cpu(U).square().sum().backward()
    gpu(U.to(DEVICE)).square().sum().backward()
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-9, atol=1e-12, msg=name)
    assert gpu.last_stats.backward["criterion"] == "steps"


@pytest.mark.cuda
@gpu
def test_cuda_only_errors(monkeypatch):
    """Devices mixed, dtypes mixed, a bad kappa, a bad IDL_CUDA_CHECK_EVERY
    (the CPU's errors are the device-parametrised tests of
    test_fixed_point.py and test_sim_prox.py)."""
    A, C0 = problem(m=3, n=4)
    with pytest.raises(ValueError, match="C0 is on cpu but A is on cuda"):
        ops.fixed_point(A.to(DEVICE), C0, None, "tanh", 0.0, 10, 1e-6, 10, 1e-6)
    with pytest.raises(TypeError, match="C0 has dtype Float but A has Double"):
        ops.fixed_point(A.to(DEVICE), C0.float().to(DEVICE), None, "tanh", 0.0, 10, 1e-6, 10, 1e-6)
    with pytest.raises(ValueError, match="kappa must be in"):
        ops.project_linf(A.to(DEVICE), 1.5, "exact")
    monkeypatch.setenv("IDL_CUDA_CHECK_EVERY", "-1")
    with pytest.raises(ValueError, match="IDL_CUDA_CHECK_EVERY"):
        ops.fixed_point(*on_gpu(A, C0), None, "tanh", 0.0, 10, 1e-6, 10, 1e-6)


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("mode", ["exact", "scale"])
def test_gradcheck_projection_on_cuda(mode):
    A = torch.randn(6, 9, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: ops.project_linf(a, 0.9, mode), (A,))


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("activation", ["tanh", "softplus", "leaky_relu"])
def test_gradcheck_solve_on_cuda(activation):
    A, C0 = on_gpu(*problem(m=4, n=6))
    A.requires_grad_(True)
    C0.requires_grad_(True)

    def solve(a, c0):
        return ops.fixed_point(a, c0, None, activation, 0.1, 2000, 1e-13, 2000, 1e-13)[0]

    with warnings.catch_warnings():
        warnings.simplefilter("error", idl.ImplicitFunctionWarning)
        assert torch.autograd.gradcheck(solve, (A, C0))


@pytest.mark.cuda
@gpu
def test_opcheck_on_cuda():
    A, C0 = on_gpu(*problem(m=3, n=4))
    torch.library.opcheck(ops.project_linf.default, (A.clone().requires_grad_(True), 0.5, "exact"))
    torch.library.opcheck(ops.project_linf_backward.default, (torch.randn_like(A), A, 0.5, "scale"))
    torch.library.opcheck(ops.fixed_point.default, (A, C0, None, "tanh", 0.0, 500, 1e-12, 500, 1e-12))
    _, Z, _ = ops.fixed_point(A, C0, None, "tanh", 0.0, 500, 1e-12, 500, 1e-12)
    torch.library.opcheck(
        ops.fixed_point_adjoint.default, (A, Z, torch.randn_like(Z), "tanh", 0.0, 500, 1e-12)
    )


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("low_precision", [torch.float16, torch.bfloat16])
def test_autocast_solves_in_float32(low_precision):
    torch.manual_seed(0)
    model = idl.ImplicitModel(12, 3, 32, tol=1e-6, grad_tol=1e-6).to(DEVICE)
    U = torch.randn(16, 12, device=DEVICE)
    with torch.autocast("cuda", dtype=low_precision):
        X = model.implicit_state(U)
        loss = model(U).float().square().mean()
    assert X.dtype == torch.float32
    C0 = (U.to(low_precision) @ model.B.t().to(low_precision)).float()
    want = ops.fixed_point(model.effective_A().detach(), C0, None, "relu", 0.01, 300, 1e-6, 300, 1e-6)[0]
    torch.testing.assert_close(X.detach(), want, rtol=0, atol=1e-4)
    loss.backward()
    assert model.A.grad is not None and torch.isfinite(model.A.grad).all()
    assert model.B.grad is not None and torch.isfinite(model.B.grad).all()


def digits_problem(dtype):
    load_digits = pytest.importorskip("sklearn.datasets").load_digits

    images, labels = load_digits(return_X_y=True)
    U = torch.tensor(images[:256] / 16.0, dtype=dtype)
    return U, torch.tensor(labels[:256])


def train(device, dtype, tol, steps=6):
    """A few Adam steps of a small ImplicitModel on the digits; the losses,
    the final parameters and the solve stats of the last step."""
    torch.manual_seed(0)
    model = idl.ImplicitModel(64, 10, 40, activation="tanh", bias=True, kappa=0.9, tol=tol,
                              grad_tol=tol, mitr=3000, grad_mitr=3000).to(dtype)
    model.to(device)
    U, labels = (t.to(device) for t in digits_problem(dtype))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(U), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    params = {name: p.detach().cpu() for name, p in model.named_parameters()}
    return losses, params, model.last_stats


@pytest.mark.cuda
@gpu
def test_training_on_gpu_follows_cpu_float64():
    cpu_losses, cpu_params, cpu_stats = train("cpu", torch.float64, tol=1e-12)
    gpu_losses, gpu_params, gpu_stats = train(DEVICE, torch.float64, tol=1e-12)
    assert gpu_losses == pytest.approx(cpu_losses, rel=1e-9)
    for name, value in cpu_params.items():
        torch.testing.assert_close(gpu_params[name], value, rtol=1e-8, atol=1e-9, msg=name)
    assert gpu_stats.forward["iterations"] == cpu_stats.forward["iterations"]
    assert gpu_stats.backward["iterations"] == cpu_stats.backward["iterations"]
    assert gpu_losses[-1] < gpu_losses[0]


@pytest.mark.cuda
@gpu
def test_training_on_gpu_follows_cpu_float32():
    cpu_losses, _, _ = train("cpu", torch.float32, tol=1e-5)
    gpu_losses, _, _ = train(DEVICE, torch.float32, tol=1e-5)
    assert gpu_losses == pytest.approx(cpu_losses, rel=1e-3)


@pytest.mark.cuda
@pytest.mark.slow
@gpu
def test_projection_of_more_rows_than_a_grid_holds():
    """One block per row would need more than 2^31 - 1 blocks: the grid is
    capped and the kernels loop over rows (the grid size once wrapped)."""
    rows = 2**31 + 5
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GiB of device memory")
    A = torch.full((rows, 1), 2.0, device=DEVICE)
    P = ops.project_linf(A, 0.5, "exact")
    del A
    assert (P[:3] == 0.5).all() and (P[-3:] == 0.5).all()
    assert P.min().item() == P.max().item() == 0.5
