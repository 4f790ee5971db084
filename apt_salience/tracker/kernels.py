"""The tracker's reductions as single operators for compiled graphs.

Inside a ``torch.compile`` graph on the CPU, the per-probe reductions (``sum |H|``, the power sums,
``sum |G|``, ``sum H * G``) are called as custom operators (``apt_salience::...``). What runs depends on
the backend:

- **inductor** (the default backend): each operator is decomposed into the whole-tensor expressions of
  :mod:`apt_salience.moments`, which inductor fuses into one generated loop per reduction (one read of the
  activation for all power sums), the fastest form on the CPU (measured in BENCHMARKS.md);
- **any other backend** (``aot_eager``, ``eager``, third-party ones): the operators stay opaque and run the
  same cache-blocked kernels as eager mode, so the compiled scores equal the eager ones bit for bit.

On other devices the graph traces the whole-tensor expressions, which a compiler fuses. Set ``CPU_OPS =
False`` to trace the expressions on the CPU whatever the backend, ``INDUCTOR_DECOMPOSE = False`` to keep
the opaque operators under inductor too (both are read when a graph is traced).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from ..moments import _power_sums_whole, _prod_sum_whole, abs_sum_rows, power_sums, power_sums_first_centre, prod_sum_rows

__all__ = ["forward_sums", "grad_abs_sum", "grad_prod_sum", "CPU_OPS", "INDUCTOR_DECOMPOSE"]

#: Use the custom operators for CPU tensors in compiled graphs (False: trace the expressions).
CPU_OPS = hasattr(torch.library, "custom_op")
#: Under inductor, decompose the operators into fused whole-tensor expressions (False: keep them opaque;
#: read whenever dynamo traces a graph that calls them).
INDUCTOR_DECOMPOSE = True
def _sync_inductor_decompositions() -> None:
    """Put the operators' decompositions in inductor's table, or take them out, as ``INDUCTOR_DECOMPOSE`` says.

    Called from the operators' fake kernels, which run while dynamo traces a graph that uses them, so
    before any backend compiles it (importing inductor's table then costs nothing: a compile is about to
    run). Other backends never read inductor's table.
    """
    try:
        from torch._inductor import decomposition
    except Exception:  # no inductor in this build: the operators stay opaque  # pragma: no cover
        return
    table: Dict[Any, Any] = decomposition.decompositions
    ops = torch.ops.apt_salience
    changed = False
    for op, fn in ((ops.forward_sums.default, _forward_sums_traced), (ops.grad_abs_sum.default, _grad_abs_sum_traced),
                   (ops.grad_prod_sum.default, _grad_prod_sum_traced)):
        if INDUCTOR_DECOMPOSE and table.get(op) is not fn:
            table[op], changed = fn, True
        elif not INDUCTOR_DECOMPOSE and op in table:
            del table[op]
            changed = True
    cached: Any = getattr(decomposition, "fast_random_decomps", None)  # inductor caches a copy of its table
    if changed and hasattr(cached, "cache_clear"):
        cached.cache_clear()


# The decompositions: the operators as whole-tensor expressions (the same outputs' shapes and dtypes).

def _forward_sums_traced(x: Tensor, centre: Tensor, centre_set: Tensor, keep: Optional[Tensor], order: int,
                         abs_sum: bool) -> Tuple[Tensor, Tensor, Tensor]:
    a, sums, used = _power_sums_whole(x, centre if order else None, order, None, keep, abs_sum,
                                      centre_set if order else None, expanded=True)
    return (a if a is not None else x.new_empty(0, dtype=torch.float32),
            sums if sums is not None else x.new_empty(0, dtype=torch.float64),
            used if used is not None else centre.clone())


def _grad_abs_sum_traced(g: Tensor, keep: Optional[Tensor]) -> Tensor:
    a, _, _ = _power_sums_whole(g, None, 0, None, keep, True)
    assert a is not None
    return a


def _grad_prod_sum_traced(x: Tensor, g: Tensor, keep: Optional[Tensor]) -> Tensor:
    return _prod_sum_whole(x, g, keep)


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
        _sync_inductor_decompositions()
        c = x.shape[1]
        return (x.new_empty(c if abs_sum else 0, dtype=torch.float32),
                x.new_empty((order + 1, c) if order else (0,), dtype=torch.float64), centre.new_empty(c))

    @torch.library.custom_op("apt_salience::grad_abs_sum", mutates_args=())
    def _grad_abs_sum_op(g: Tensor, keep: Optional[Tensor]) -> Tensor:
        return abs_sum_rows(g, index=_rows(keep))

    @_grad_abs_sum_op.register_fake
    def _(g: Tensor, keep: Optional[Tensor]) -> Tensor:
        _sync_inductor_decompositions()
        return g.new_empty(g.shape[1], dtype=torch.float32)

    @torch.library.custom_op("apt_salience::grad_prod_sum", mutates_args=())
    def _grad_prod_sum_op(x: Tensor, g: Tensor, keep: Optional[Tensor]) -> Tensor:
        return prod_sum_rows(x, g, index=_rows(keep))

    @_grad_prod_sum_op.register_fake
    def _(x: Tensor, g: Tensor, keep: Optional[Tensor]) -> Tensor:
        _sync_inductor_decompositions()
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
