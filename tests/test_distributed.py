"""DistributedDataParallel: two CPU processes (gloo) training a network with an
ImplicitModel compute the gradients, and take the steps, of one process that
sees the whole batch."""
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import idl

WORLD = 2
BATCH = 8  # split evenly, so the mean of the local mean losses is the global mean
STEPS = 3
LR = 0.2
TIMEOUT_S = 120

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def make_network():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 6),
        idl.ImplicitModel(6, 3, 7, bias=True, activation="tanh",
                          tol=1e-13, grad_tol=1e-13, mitr=5000, grad_mitr=5000),
    ).double()


def data():
    g = torch.Generator().manual_seed(1)
    U = torch.randn(STEPS, BATCH, 5, generator=g, dtype=torch.float64)
    target = torch.randn(STEPS, BATCH, 3, generator=g, dtype=torch.float64)
    return U, target


def train(net, batches, targets):
    """SGD on mean squared error; the gradients of the first step, and the
    parameters after the last."""
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    first_grads = None
    for U, target in zip(batches, targets):
        opt.zero_grad()
        (net(U) - target).square().mean().backward()
        if first_grads is None:
            first_grads = [p.grad.clone() for p in net.parameters()]
        opt.step()
    return first_grads, [p.detach().clone() for p in net.parameters()]


def worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        net = torch.nn.parallel.DistributedDataParallel(make_network())
        U, target = data()
        share = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        grads, params = train(net, U[:, share], target[:, share])
        torch.save({"grads": grads, "params": params}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(out_dir):
    context = mp.spawn(worker, args=(free_port(), out_dir), nprocs=WORLD, join=False)
    try:
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=TIMEOUT_S)
        while not context.join(timeout=1):  # raises if a worker failed
            if datetime.datetime.now() > deadline:
                raise TimeoutError(f"DDP workers still running after {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    U, target = data()
    want_grads, want_params = train(make_network(), U, target)
    run_workers(str(tmp_path))
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for g, w in zip(got["grads"], want_grads):
            torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)
        for p, w in zip(got["params"], want_params):
            torch.testing.assert_close(p, w, atol=1e-12, rtol=1e-10)
