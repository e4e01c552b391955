"""Progress bars for SIM's long loops (state capture, row blocks, iterations)."""
from typing import Optional

import torch.distributed as dist
from tqdm.auto import tqdm


def progress_bar(iterable=None, *, progress: Optional[bool] = None, **kwargs):
    """A tqdm bar. ``progress=None`` shows it only on a terminal (tqdm's own
    rule), True always, False never; in a multi-process run only rank 0 shows it."""
    disable = None if progress is None else not progress
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        disable = True
    return tqdm(iterable, disable=disable, leave=False, **kwargs)
