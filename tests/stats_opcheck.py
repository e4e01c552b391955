"""opcheck for ops that return a stats tensor (idl/_stats.py) whose backward
row their backward pass writes. A compiled graph reports no stats, so under
AOTAutograd that row alone differs from eager: the AOT check runs here with a
comparison that leaves it out; everything else is opcheck's own."""
import torch
from torch.testing._internal.optests import aot_autograd_check


def opcheck_with_stats(op, args, stats_index):
    """opcheck ``op`` on ``args``; its output ``stats_index`` is the stats."""
    torch.library.opcheck(op, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))

    def equal_but_backward_stats(got, want, msg=None):
        if isinstance(want, tuple) and getattr(want[stats_index], "shape", None) == (2, 3):
            got, want = list(got), list(want)  # outputs, rather than gradients
            got[stats_index], want[stats_index] = got[stats_index][0], want[stats_index][0]
        torch.testing.assert_close(got, want, msg=msg)

    aot_autograd_check(op, args, {}, dynamic=True, assert_equals_fn=equal_but_backward_stats)
