"""Row split of a SIM fit across torch.distributed ranks.

Every rank holds all the states; the rows of a weight matrix are independent
problems, so rank r solves a contiguous slice of them and the slices are summed
into the full matrix on every rank (each entry comes from exactly one rank, the
others contribute zeros, so the sum is exact). Use gloo for CPU tensors, nccl
for CUDA tensors (one device per rank).
"""
from typing import Optional

import torch
import torch.distributed as dist


def active_group(distributed: Optional[bool], group=None):
    """The process group to split rows over, or None to solve every row here.

    ``distributed=None`` splits when torch.distributed is initialized with more
    than one rank; True requires it; False never splits."""
    ready = dist.is_available() and dist.is_initialized()
    if distributed is None:
        distributed = ready and dist.get_world_size(group) > 1
    if not distributed:
        return None
    if not ready:
        raise RuntimeError(
            "distributed=True needs torch.distributed to be initialized "
            "(torch.distributed.init_process_group) before the solve"
        )
    return dist.group.WORLD if group is None else group


def local_rows(num_rows: int, group) -> slice:
    """This rank's contiguous share of ``num_rows`` rows (balanced split)."""
    if group is None:
        return slice(0, num_rows)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    base, extra = divmod(num_rows, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def assemble_rows(local: torch.Tensor, rows: slice, num_rows: int, group) -> torch.Tensor:
    """The full (num_rows, cols) matrix from every rank's ``local`` rows."""
    if group is None:
        return local
    full = local.new_zeros(num_rows, local.shape[1])
    full[rows] = local
    dist.all_reduce(full, op=dist.ReduceOp.SUM, group=group)
    return full
