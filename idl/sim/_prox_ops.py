"""The prox operator of SIM's batched solvers: ``idl::prox_l1_ball``.

The op is registered in C++ (csrc/sim_ops.cpp) with a CPU kernel in C
(csrc/cpu/prox.c). This module adds its fake kernel and the entry point the
solvers call, which runs the compiled kernel where the device has one and the
same algorithm in torch elsewhere (e.g. on a GPU build without the CUDA kernel).
"""
import math

import torch

from .. import _ops  # noqa: F401  (loads idl._C, which registers the op)

OP_NAME = "idl::prox_l1_ball"


@torch.library.register_fake(OP_NAME)
def _(W, threshold, radius, ball_cols):
    torch._check(threshold.dim() == 1 and threshold.shape[0] == W.shape[0])
    return torch.empty_like(W, memory_format=torch.contiguous_format)


def _has_compiled_kernel(device: torch.device) -> bool:
    key = "CPU" if device.type == "cpu" else device.type.upper()
    return torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, key)


def _soft_threshold(W: torch.Tensor, theta) -> torch.Tensor:
    return W.sign() * (W.abs() - theta).clamp_min(0)


def _l1_ball_torch(W: torch.Tensor, radius: float) -> torch.Tensor:
    """Rows of W projected onto the l1 ball, sort-based (Duchi et al. 2008)."""
    magnitude = W.abs()
    outside = magnitude.sum(dim=1) > radius
    if not outside.any():
        return W
    sorted_desc = magnitude[outside].sort(dim=1, descending=True).values
    cumulative = sorted_desc.cumsum(dim=1) - radius
    ranks = torch.arange(1, W.shape[1] + 1, device=W.device, dtype=W.dtype)
    # The support size: the last k with sorted_k > (cumsum_k - radius) / k.
    support = (sorted_desc * ranks > cumulative).sum(dim=1, keepdim=True)
    support = support.clamp_min(1)  # radius 0: theta is the largest entry
    theta = cumulative.gather(1, support - 1) / support.to(W.dtype)
    out = W.clone()
    out[outside] = _soft_threshold(W[outside], theta)
    return out


def _prox_torch(W, threshold, radius, ball_cols):
    out = _soft_threshold(W, threshold.unsqueeze(1))
    # As the C kernel: a row holding NaN or Inf comes out all NaN (the ball
    # part below then sees only finite rows).
    bad = ~torch.isfinite(W).all(dim=1)
    out[bad] = math.nan
    if ball_cols > 0 and math.isfinite(radius):
        out[:, :ball_cols] = _l1_ball_torch(out[:, :ball_cols], radius)
    return out


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
    if _has_compiled_kernel(W.device):
        return torch.ops.idl.prox_l1_ball(W, threshold, float(radius), int(ball_cols))
    return _prox_torch(W, threshold, radius, ball_cols)
