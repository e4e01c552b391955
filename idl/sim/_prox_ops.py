"""The prox operator of SIM's batched solvers: ``idl::prox_l1_ball``.

The op is registered in C++ (csrc/sim_ops.cpp) with a CPU kernel in C
(csrc/cpu/prox.c) and a CUDA kernel (csrc/cuda/prox.cu). This module adds its
fake kernel (for torch.compile and meta tensors) and the entry point the
solvers call.
"""
import torch

from .. import _ops  # noqa: F401  (loads idl._C, which registers the op)

OP_NAME = "idl::prox_l1_ball"


@torch.library.register_fake(OP_NAME)
def _(W, threshold, radius, ball_cols):
    torch._check(threshold.dim() == 1 and threshold.shape[0] == W.shape[0])
    return torch.empty_like(W, memory_format=torch.contiguous_format)


def prox_l1_ball(W: torch.Tensor, threshold, radius: float, ball_cols: int) -> torch.Tensor:
    """Row-wise prox of ``t_i * ||w||_1 + indicator(||w[:ball_cols]||_1 <= radius)``.

    Row i is soft-thresholded by ``t_i`` (``threshold``: a float for every row,
    or a tensor with one value per row); then its first ``ball_cols`` entries
    are projected onto the l1 ball of ``radius`` (``math.inf`` or
    ``ball_cols=0``: no ball). A row of W holding NaN or Inf comes out all
    NaN, so that the solver sees it. Returns a new contiguous tensor.
    """
    if not isinstance(threshold, torch.Tensor):
        threshold = torch.full((1,), float(threshold), dtype=W.dtype, device=W.device)
        threshold = threshold.expand(W.shape[0])
    return torch.ops.idl.prox_l1_ball(W, threshold, float(radius), int(ball_cols))
