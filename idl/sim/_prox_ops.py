"""The entry point SIM's batched solvers call for their prox operator,
``idl::prox_l1_ball`` (registered in C++, csrc/sim_ops.cpp, with a CPU kernel
in C and a CUDA kernel; its fake kernel is in idl/_ops.py with the others)."""
import torch

from .._ops import ops


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
    return ops.prox_l1_ball(W, threshold, float(radius), int(ball_cols))
