"""opcheck for ops that return a stats tensor (idl/_stats.py) whose backward
row their backward pass writes. A compiled graph reports no stats, so under
AOTAutograd that row alone differs from eager: the AOT check runs here with a
comparison that leaves it out; everything else is opcheck's own."""
import torch
from torch.testing._internal.optests import aot_autograd_check


def opcheck_with_stats(op, args, stats_index):
    """opcheck ``op`` on ``args``; its output ``stats_index`` is the stats (or
    its outputs, for a tuple of indices: stats of shape (..., 2, 3), as
    idl::implicit_rnn's merged and per-step stats)."""
    torch.library.opcheck(op, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    indices = (stats_index,) if isinstance(stats_index, int) else tuple(stats_index)

    def is_stats(t):
        return tuple(getattr(t, "shape", ()))[-2:] == (2, 3)

    def equal_but_backward_stats(got, want, msg=None):
        if isinstance(want, tuple) and all(is_stats(want[i]) for i in indices):
            got, want = list(got), list(want)  # outputs, rather than gradients
            for i in indices:
                got[i], want[i] = got[i][..., 0, :], want[i][..., 0, :]
        torch.testing.assert_close(got, want, msg=msg)

    aot_autograd_check(op, args, {}, dynamic=True, assert_equals_fn=equal_but_backward_stats)
