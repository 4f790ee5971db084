"""The tracker's reductions as single operators for compiled graphs.

Inside a ``torch.compile`` graph on the CPU, the per-probe reductions (``sum |H|``, the power sums,
``sum |G|``, ``sum H * G``) are called as opaque custom operators (``apt_salience::...``) that run the
same cache-blocked kernels as eager mode: the compiler sees one node per reduction instead of tens,
compiles faster, and the compiled step pays what the eager step pays. On other devices the graph
traces the whole-tensor expressions of :mod:`apt_salience.moments`, which a compiler fuses. Set
``CPU_OPS = False`` to trace the expressions on the CPU as well.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..moments import abs_sum_rows, power_sums, power_sums_first_centre, prod_sum_rows

__all__ = ["forward_sums", "grad_abs_sum", "grad_prod_sum", "CPU_OPS"]

#: Use the custom operators for CPU tensors in compiled graphs (False: trace the expressions).
CPU_OPS = hasattr(torch.library, "custom_op")


def _rows(keep: Optional[Tensor]) -> Optional[Tensor]:
    return keep.nonzero().squeeze(1) if keep is not None else None


if CPU_OPS:
    @torch.library.custom_op("apt_salience::forward_sums", mutates_args=())
    def _forward_sums_op(x: Tensor, centre: Tensor, centre_set: Tensor, keep: Optional[Tensor], order: int,
                         abs_sum: bool) -> Tuple[Tensor, Tensor, Tensor]:
        index = _rows(keep)
        c = centre
        if order and not bool(centre_set):  # the probe's first forward: its mean becomes the centre
            _, first = power_sums(x, torch.zeros(x.shape[1], dtype=torch.float64, device=x.device), 1, index=index)
            assert first is not None
            c = (first[1] / first[0].clamp_min(1)).float()
        a, sums = power_sums(x, c.double(), order, index=index, abs_sum=abs_sum)
        empty32 = x.new_empty(0, dtype=torch.float32)
        return (a if a is not None else empty32, sums if sums is not None else x.new_empty(0, dtype=torch.float64),
                c.clone())

    @_forward_sums_op.register_fake
    def _(x: Tensor, centre: Tensor, centre_set: Tensor, keep: Optional[Tensor], order: int,
          abs_sum: bool) -> Tuple[Tensor, Tensor, Tensor]:
        c = x.shape[1]
        return (x.new_empty(c if abs_sum else 0, dtype=torch.float32),
                x.new_empty((order + 1, c) if order else (0,), dtype=torch.float64), centre.new_empty(c))

    @torch.library.custom_op("apt_salience::grad_abs_sum", mutates_args=())
    def _grad_abs_sum_op(g: Tensor, keep: Optional[Tensor]) -> Tensor:
        return abs_sum_rows(g, index=_rows(keep))

    @_grad_abs_sum_op.register_fake
    def _(g: Tensor, keep: Optional[Tensor]) -> Tensor:
        return g.new_empty(g.shape[1], dtype=torch.float32)

    @torch.library.custom_op("apt_salience::grad_prod_sum", mutates_args=())
    def _grad_prod_sum_op(x: Tensor, g: Tensor, keep: Optional[Tensor]) -> Tensor:
        return prod_sum_rows(x, g, index=_rows(keep))

    @_grad_prod_sum_op.register_fake
    def _(x: Tensor, g: Tensor, keep: Optional[Tensor]) -> Tensor:
        return g.new_empty(g.shape[1], dtype=torch.float32)


def _ops_for(t: Tensor) -> bool:
    return CPU_OPS and t.device.type == "cpu"


def forward_sums(x: Tensor, centre: Optional[Tensor], centre_set: Optional[Tensor], keep: Optional[Tensor], order: int,
                 abs_sum: bool) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(sum |x| or None, power sums or None, centre used or None)`` of one probe in a compiled graph.

    The centre is ``centre`` where ``centre_set`` holds, else the batch's own mean (the probe's first forward).
    """
    if order and (centre is None or centre_set is None):
        raise ValueError("forward_sums needs a centre and its flag when order > 0")
    if _ops_for(x):
        zero_c = centre if centre is not None else x.new_zeros(x.shape[1], dtype=torch.float32)
        flag = centre_set if centre_set is not None else torch.ones((), dtype=torch.bool, device=x.device)
        a, sums, used = _forward_sums_op(x, zero_c, flag, keep, order, abs_sum)
        return (a if abs_sum else None), (sums if order else None), (used if order else None)
    if order:
        assert centre is not None and centre_set is not None
        return power_sums_first_centre(x, centre, centre_set, order, keep=keep, abs_sum=abs_sum)
    a, _ = power_sums(x, None, 0, keep=keep, abs_sum=abs_sum)
    return a, None, None


def grad_abs_sum(g: Tensor, keep: Optional[Tensor]) -> Tensor:
    """``sum |g|`` per column (float32) of the kept rows, in a compiled graph."""
    return _grad_abs_sum_op(g, keep) if _ops_for(g) else abs_sum_rows(g, keep=keep)


def grad_prod_sum(x: Tensor, g: Tensor, keep: Optional[Tensor]) -> Tensor:
    """``sum x * g`` per column (float32) of the kept rows, in a compiled graph."""
    return _grad_prod_sum_op(x, g, keep) if _ops_for(g) else prod_sum_rows(x, g, keep=keep)
