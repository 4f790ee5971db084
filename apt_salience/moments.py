"""Streaming per-channel moments (n, mean, M2, M3, M4) with exact merges.

A batch is reduced in float32 (or better) *after shifting by its own mean*, so the
power sums are well conditioned even when |mean| >> std; the central moments are
then formed and merged in float64 with the Chan / Pebay parallel formulas.
Naive power sums (sum x, sum x^2, ...) are never used.

``M_p = sum_i (x_i - mean)^p``; kurtosis (Pearson) ``= n * M4 / M2^2``.

Example:
    >>> import torch
    >>> from apt_salience.moments import StreamingMoments
    >>> torch.manual_seed(0) is not None
    True
    >>> x = torch.randn(1000, 3) + 1e4
    >>> acc = StreamingMoments(3)
    >>> acc.update(x[:300]); acc.update(x[300:])
    >>> bool(((acc.kurtosis() - 3).abs() < 0.5).all())
    True
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Iterator, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["Moments", "StreamingMoments", "batch_moments", "merge_moments", "pool_moments", "kurtosis_from_moments",
           "power_sums", "central_from_power_sums", "abs_sum_rows", "prod_sum_rows"]


class Moments(NamedTuple):
    """Central-moment summary; ``n`` broadcasts against the per-channel tensors."""

    n: Tensor
    mean: Tensor
    m2: Tensor
    m3: Tensor
    m4: Tensor


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def batch_moments(x: Tensor, order: int = 4, out_dtype: torch.dtype = torch.float64) -> Moments:
    """Moments of each column of ``x`` ([N, C]); ``order`` 1 fills only n and mean (the rest zero).

    The reduction runs in float32 (float64 for float64 input) over ``x - mean_f32``;
    the small residual mean is corrected exactly in ``out_dtype``. Rows are processed in
    cache-sized chunks, so the temporaries stay O(chunk x C) whatever N is.

    Args:
        x: ``[N, C]`` samples (rows) of C channels.
        order: 4 (all moments) or 1 (count and mean).
        out_dtype: the dtype of the returned moments.
    """
    if x.dim() != 2:
        raise ValueError(f"batch_moments expects a 2-D [tokens, channels] tensor, got shape {tuple(x.shape)}")
    mom, _ = _moments_and_abs_sum(x, order=1 if order == 1 else 4, out_dtype=out_dtype)
    assert mom is not None
    return mom


#: Rows per chunk are chosen so that one float32 chunk is about this many bytes (cache-resident).
_CHUNK_BYTES = 1 << 20


def _chunk_rows(channels: int, itemsize: int) -> int:
    return max(1, _CHUNK_BYTES // max(1, itemsize * channels))


def _row_chunks(x: Tensor, index: Optional[Tensor], rows: int, dtype: torch.dtype) -> Iterator[Tensor]:
    """Row chunks of ``x`` (the rows listed in ``index`` when given), converted to ``dtype``."""
    num = x.shape[0] if index is None else index.numel()
    for i in range(0, num, rows):
        c = x[i : i + rows] if index is None else x.index_select(0, index[i : i + rows])
        yield c if c.dtype == dtype else c.to(dtype)


def _column_mean(x: Tensor, index: Optional[Tensor], rows: int, acc: torch.dtype, num: int) -> Tensor:
    """The mean of the (selected) rows of ``x`` in ``acc``: the shift the power sums are formed about."""
    if index is None and x.dtype == acc:
        return x.mean(dim=0)
    tot = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for c in _row_chunks(x, index, rows, acc):
        tot += c.sum(dim=0)
    return (tot / num).to(acc)


def _moments_and_abs_sum(
    x: Tensor,
    order: int = 4,
    out_dtype: torch.dtype = torch.float64,
    index: Optional[Tensor] = None,
    abs_sum: bool = False,
) -> Tuple[Optional[Moments], Optional[Tensor]]:
    """Per-column moments (``order`` 0: none, 1: mean only, else up to M4) and, with ``abs_sum``,
    ``sum |x|`` (float32), of the rows of ``x`` [N, C] (only the rows in ``index`` when given).

    One pass for the shift (the float32 column mean), then one pass over cache-sized row chunks
    that forms ``d = x - shift`` and its power sums (and ``|x|``) while the chunk is in cache;
    chunk sums are accumulated in float64. Never materialises a converted or masked copy of ``x``.
    """
    num = x.shape[0] if index is None else int(index.numel())
    channels = x.shape[1]
    dev = x.device
    acc = _acc_dtype(x)
    rows = _chunk_rows(channels, torch.finfo(acc).bits // 8)
    a64 = torch.zeros(channels, dtype=torch.float64, device=dev) if abs_sum else None
    if not order:
        if a64 is None:
            return None, None
        for c in _row_chunks(x, index, rows, x.dtype):
            a64 += c.abs().sum(dim=0, dtype=acc)
        return None, a64.float()
    n = torch.tensor(float(num), dtype=out_dtype, device=dev)
    if num == 0:
        z = torch.zeros(channels, dtype=out_dtype, device=dev)
        return Moments(n, z, z.clone(), z.clone(), z.clone()), (a64.float() if a64 is not None else None)
    shift = _column_mean(x, index, rows, acc, num)
    full = order != 1
    s = torch.zeros(4 if full else 1, channels, dtype=torch.float64, device=dev)
    for c in _row_chunks(x, index, rows, acc):
        if a64 is not None:
            a64 += c.abs().sum(dim=0)
        d = c - shift
        s[0] += d.sum(dim=0)
        if full:
            d2 = d.square()
            s[1] += d2.sum(dim=0)
            s[2] += d.mul_(d2).sum(dim=0)  # d is not needed after this: d^3 in place
            s[3] += d2.square_().sum(dim=0)
            del d2
        del d
    a = a64.float() if a64 is not None else None
    s1 = s[0].to(out_dtype)
    c1 = s1 / num  # residual offset of the true mean from the float32 shift
    mean = shift.to(out_dtype) + c1
    if not full:
        z = torch.zeros_like(mean)
        return Moments(n, mean, z, z.clone(), z.clone()), a
    s2, s3, s4 = (s[i].to(out_dtype) for i in (1, 2, 3))
    m2 = (s2 - s1 * c1).clamp_min(0)
    m3 = s3 - 3 * c1 * s2 + 2 * num * c1**3
    m4 = (s4 - 4 * c1 * s3 + 6 * c1 * c1 * s2 - 3 * num * c1**4).clamp_min(0)
    return Moments(n, mean, m2, m3, m4), a


def _prod_sum(x: Tensor, g: Tensor, index: Optional[Tensor] = None) -> Tensor:
    """``sum_rows x * g`` per column (float32; float64 inputs summed in float64), in cache-sized chunks."""
    acc = torch.float64 if torch.float64 in (x.dtype, g.dtype) else torch.float32
    channels = x.shape[1]
    rows = _chunk_rows(channels, torch.finfo(acc).bits // 8)
    out = torch.zeros(channels, dtype=torch.float64, device=x.device)
    for cx, cg in zip(_row_chunks(x, index, rows, acc), _row_chunks(g, index, rows, acc)):
        out += (cx * cg).sum(dim=0)
    return out.float()


def _use_chunks(x: Tensor) -> bool:
    """Cache-sized row chunks pay on the CPU in eager mode; a compiled graph or an accelerator wants whole-tensor ops."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


#: ``_BINOM[k - 1, j] = C(k, j)`` and ``_EPOW[k - 1, j] = k - j`` for j <= k (zero weight above), k = 1..4.
_BINOM = torch.tensor([[float(math.comb(k, j)) if j <= k else 0.0 for j in range(5)] for k in range(1, 5)],
                      dtype=torch.float64)
_EPOW = torch.tensor([[max(k - j, 0) for j in range(5)] for k in range(1, 5)], dtype=torch.long).reshape(-1)


def _recentre(n: Tensor, shift: Tensor, d: Tensor, centre: Tensor) -> Tensor:
    """Power sums about ``centre`` from the sums ``d[k-1] = sum (x - shift)^k`` (k = 1..4), exactly.

    ``sum (x - c)^k = sum_j C(k, j) e^(k-j) sum (x - shift)^j`` with ``e = shift - c`` (float64),
    as one small batched product (a handful of operations whatever the number of channels).
    """
    e = shift.to(torch.float64) - centre
    nvec = n.expand_as(e).unsqueeze(0)
    epow = torch.cat([torch.ones_like(nvec), e.expand(4, -1).cumprod(0)])  # e^0 .. e^4, [5, C]
    dall = torch.cat([nvec, d])  # sum (x - shift)^j, j = 0..4
    binom = _BINOM.to(e.device)
    s = (binom.unsqueeze(-1) * epow.index_select(0, _EPOW.to(e.device)).view(4, 5, -1) * dall.unsqueeze(0)).sum(1)
    return torch.cat([nvec, s])


def _recentre_expanded(n: Tensor, shift: Tensor, d: Tensor, centre: Tensor) -> Tensor:
    """:func:`_recentre` written out term by term, with no constant tensor (for graphs traced under a fake
    tensor mode, where a compiler fuses the terms anyway)."""
    e = shift.to(torch.float64) - centre
    n = n.expand_as(e)
    e2 = e * e
    return torch.stack([n, d[0] + e * n, d[1] + 2 * e * d[0] + e2 * n,
                        d[2] + 3 * e * d[1] + 3 * e2 * d[0] + e2 * e * n,
                        d[3] + 4 * e * d[2] + 6 * e2 * d[1] + 4 * e2 * e * d[0] + e2 * e2 * n])


def power_sums(x: Tensor, centre: Optional[Tensor], order: int, *, index: Optional[Tensor] = None,
               keep: Optional[Tensor] = None, abs_sum: bool = False) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``sum |x|`` and the power sums of ``x`` about ``centre``, per column of ``x`` [N, C].

    Args:
        x: the observations, ``[N, C]`` (any float dtype; reduced in float32, float64 for float64 input).
        centre: float64 ``[C]``, the point the sums are taken about (needed when ``order`` > 0).
        order: 0 (no moments), 1 (``n`` and ``sum (x - c)``) or 4 (up to ``sum (x - c)^4``).
        index: rows to use (long), or ``keep``: a bool ``[N]`` row mask; neither: all rows.
        abs_sum: also return ``sum |x|`` (float32 ``[C]``).

    Returns ``(abs_sum or None, sums or None)``, ``sums`` float64 ``[order + 1, C]`` with rows
    ``n, sum (x - c), ..., sum (x - c)^order``. Sums about a common centre add up over batches,
    so they can be accumulated by plain addition (even by autograd); :func:`central_from_power_sums`
    turns them back into central moments. Internally the powers are formed about the batch's own
    float32 mean (well conditioned whatever ``|mean| / std``) and moved to ``centre`` exactly in float64.

    Example:
        >>> x = torch.tensor([[1.0], [2.0], [6.0]])
        >>> _, p = power_sums(x, torch.zeros(1, dtype=torch.float64), 4)
        >>> p[:, 0].tolist()
        [3.0, 9.0, 41.0, 225.0, 1313.0]
    """
    if order not in (0, 1, 4):
        raise ValueError(f"order must be 0, 1 or 4, got {order!r}")
    if order and centre is None:
        raise ValueError("power_sums needs a centre when order > 0")
    if _use_chunks(x):
        if keep is not None and index is None:
            index = keep.nonzero().squeeze(1)
        return _power_sums_chunked(x, centre, order, index, abs_sum)
    a, sums, _ = _power_sums_whole(x, centre, order, index, keep, abs_sum)
    return a, sums


def _power_sums_chunked(x: Tensor, centre: Optional[Tensor], order: int, index: Optional[Tensor],
                        abs_sum: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    if order == 0:
        _, a = _moments_and_abs_sum(x, order=0, index=index, abs_sum=abs_sum)
        return a, None
    assert centre is not None
    num = x.shape[0] if index is None else int(index.numel())
    channels = x.shape[1]
    dev = x.device
    acc = _acc_dtype(x)
    rows = _chunk_rows(channels, torch.finfo(acc).bits // 8)
    n = torch.tensor(float(num), dtype=torch.float64, device=dev)
    a64 = torch.zeros(channels, dtype=torch.float64, device=dev) if abs_sum else None
    if order == 1:
        tot = torch.zeros(channels, dtype=torch.float64, device=dev)
        for c in _row_chunks(x, index, rows, acc):
            tot += c.sum(dim=0)
            if a64 is not None:
                a64 += c.abs().sum(dim=0)
        return (a64.float() if a64 is not None else None), torch.stack([n.expand_as(tot), tot - n * centre])
    if num == 0:
        return (a64.float() if a64 is not None else None), torch.zeros(5, channels, dtype=torch.float64, device=dev)
    if num <= rows:  # one cache-sized chunk: select / convert it once and reduce it directly
        c = next(_row_chunks(x, index, rows, acc))
        shift = c.mean(dim=0)
        dc = c - shift
        d2 = dc.square()
        sums = torch.stack([dc.sum(dim=0), d2.sum(dim=0), (dc * d2).sum(dim=0), d2.square_().sum(dim=0)])
        a = c.abs().sum(dim=0).float() if abs_sum else None
        return a, _recentre(n, shift, sums.to(torch.float64), centre)
    shift = _column_mean(x, index, rows, acc, num)
    d = torch.zeros(4, channels, dtype=torch.float64, device=dev)
    for c in _row_chunks(x, index, rows, acc):
        if a64 is not None:
            a64 += c.abs().sum(dim=0)
        dc = c - shift
        d[0] += dc.sum(dim=0)
        d2 = dc.square()
        d[1] += d2.sum(dim=0)
        d[2] += dc.mul_(d2).sum(dim=0)
        d[3] += d2.square_().sum(dim=0)
        del d2, dc
    return (a64.float() if a64 is not None else None), _recentre(n, shift, d, centre)


def _power_sums_whole(x: Tensor, centre: Optional[Tensor], order: int, index: Optional[Tensor], keep: Optional[Tensor],
                      abs_sum: bool, centre_set: Optional[Tensor] = None, expanded: bool = False
                      ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """The same sums as whole-tensor expressions (a compiler fuses them into one or two passes).

    With ``centre_set`` (a bool scalar), an unset centre is replaced by the batch's own mean
    (rounded to float32, as it is stored); the centre used is returned third. ``expanded``: recentre
    with :func:`_recentre_expanded` (no constant tensor).
    """
    acc = _acc_dtype(x)
    if index is not None:
        x = x.index_select(0, index)
        keep = None
    xa = x.to(acc)
    if keep is not None:
        xa = torch.where(keep.unsqueeze(1), xa, 0.0)  # masked rows contribute exactly nothing (NaN-safe)
        n = keep.sum(dtype=torch.float64)
    else:
        n = torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device)
    a = xa.abs().sum(dim=0, dtype=torch.float32) if abs_sum else None
    if order == 0:
        return a, None, None
    assert centre is not None
    # reductions in the data's float32 (a compiled kernel accumulates in registers of that width), results in float64
    tot = xa.sum(dim=0).to(torch.float64)
    mean = tot / n.clamp_min(1)
    if centre_set is not None:
        centre = torch.where(centre_set, centre.float(), mean.float())
    c64 = centre.double()
    if order == 1:
        return a, torch.stack([n.expand_as(tot), tot - n * c64]), centre
    shift = mean.to(acc)
    dc = xa - shift
    if keep is not None:
        dc = torch.where(keep.unsqueeze(1), dc, 0.0)
    d2 = dc * dc
    d = torch.stack([dc.sum(0), d2.sum(0), (d2 * dc).sum(0), (d2 * d2).sum(0)]).to(torch.float64)
    return a, (_recentre_expanded if expanded else _recentre)(n, shift, d, c64), centre


def power_sums_first_centre(x: Tensor, centre: Tensor, centre_set: Tensor, order: int, *, keep: Optional[Tensor] = None,
                            abs_sum: bool = False) -> Tuple[Optional[Tensor], Tensor, Tensor]:
    """:func:`power_sums` as whole-tensor expressions, about ``centre`` or, where ``centre_set`` is
    False, about the batch's own mean (float32). Returns ``(sum |x| or None, sums, centre used)``.

    Used inside compiled graphs, where the first forward cannot be told apart by a Python flag
    without compiling a second graph.
    """
    a, sums, used = _power_sums_whole(x, centre, order, None, keep, abs_sum, centre_set)
    assert sums is not None and used is not None
    return a, sums, used


def abs_sum_rows(g: Tensor, *, index: Optional[Tensor] = None, keep: Optional[Tensor] = None) -> Tensor:
    """``sum |g|`` per column (float32) of the rows selected like :func:`power_sums`.

    Args:
        g: ``[N, C]`` rows.
        index: the rows to sum (None: ``keep`` or all).
        keep: a boolean row mask (None: all rows).
    """
    if _use_chunks(g):
        if keep is not None and index is None:
            index = keep.nonzero().squeeze(1)
        _, a = _moments_and_abs_sum(g, order=0, index=index, abs_sum=True)
        assert a is not None
        return a
    a, _, _ = _power_sums_whole(g, None, 0, index, keep, True)
    assert a is not None
    return a


def prod_sum_rows(x: Tensor, g: Tensor, *, index: Optional[Tensor] = None, keep: Optional[Tensor] = None) -> Tensor:
    """``sum x * g`` per column (float32) of the rows selected like :func:`power_sums`.

    Args:
        x: ``[N, C]`` rows.
        g: ``[N, C]`` rows, multiplied element-wise with ``x``.
        index: the rows to sum (None: ``keep`` or all).
        keep: a boolean row mask (None: all rows).
    """
    if _use_chunks(g):
        if keep is not None and index is None:
            index = keep.nonzero().squeeze(1)
        return _prod_sum(x, g, index)
    if index is not None:
        x, g = x.index_select(0, index), g.index_select(0, index)
    return _prod_sum_whole(x, g, keep)


def _prod_sum_whole(x: Tensor, g: Tensor, keep: Optional[Tensor]) -> Tensor:
    """``sum x * g`` per column (float32) of the kept rows, as whole-tensor expressions."""
    acc = torch.float64 if torch.float64 in (x.dtype, g.dtype) else torch.float32
    p = x.to(acc) * g.to(acc)
    if keep is not None:
        p = torch.where(keep.unsqueeze(1), p, 0.0)
    return p.sum(dim=0).float()


def central_from_power_sums(p: Tensor, centre: Tensor) -> Moments:
    """Central moments (per column) from the power sums about ``centre`` of :func:`power_sums`.

    ``p`` is float64 ``[2, C]`` (n, S1) or ``[5, C]`` (n, S1..S4); columns with ``n = 0`` give zeros.

    Args:
        p: the count and power sums.
        centre: the per-column centre they were taken about.
    """
    n = p[0]
    safe = torch.where(n > 0, n, torch.ones_like(n))
    e = p[1] / safe
    mean = torch.where(n > 0, centre + e, torch.zeros_like(e))
    if p.shape[0] < 5:
        z = torch.zeros_like(mean)
        return Moments(n, mean, z, z.clone(), z.clone())
    s2, s3, s4 = p[2], p[3], p[4]
    e2 = e * e
    m2 = (s2 - n * e2).clamp_min(0)
    m3 = s3 - 3 * e * s2 + 2 * n * e2 * e
    m4 = (s4 - 4 * e * s3 + 6 * e2 * s2 - 3 * n * e2 * e2).clamp_min(0)
    return Moments(n, mean, m2, m3, m4)


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Exact merge of two summaries of disjoint samples (Chan et al. / Pebay 2008).

    Args:
        a: moments of one sample set.
        b: moments of a disjoint one (same shape).
    """
    n = a.n + b.n
    safe = torch.where(n > 0, n, torch.ones_like(n))
    na, nb = a.n, b.n
    delta = b.mean - a.mean
    mean = a.mean + delta * (nb / safe)
    d2 = delta * delta
    nanb = na * nb
    m2 = a.m2 + b.m2 + d2 * nanb / safe
    m3 = a.m3 + b.m3 + delta * d2 * nanb * (na - nb) / safe**2 + 3 * delta * (na * b.m2 - nb * a.m2) / safe
    m4 = (
        a.m4
        + b.m4
        + d2 * d2 * nanb * (na * na - nanb + nb * nb) / safe**3
        + 6 * d2 * (na * na * b.m2 + nb * nb * a.m2) / safe**2
        + 4 * delta * (na * b.m3 - nb * a.m3) / safe
    )
    return Moments(n, mean, m2, m3, m4)


def pool_moments(m: Moments, group_size: int) -> Moments:
    """Pool contiguous groups of ``group_size`` channels (same count each) into one distribution each.

    Args:
        m: per-channel moments.
        group_size: channels per group (dividing C).
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if group_size == 1:
        return m
    channels = m.mean.shape[-1]
    if channels % group_size:
        raise ValueError(f"cannot pool {channels} channels into groups of {group_size}")
    shape = m.mean.shape[:-1] + (channels // group_size, group_size)
    mean_i, m2_i, m3_i, m4_i = (t.reshape(shape) for t in (m.mean, m.m2, m.m3, m.m4))
    n_i = m.n.unsqueeze(-1) if m.n.dim() else m.n
    pooled_mean = mean_i.mean(dim=-1, keepdim=True)
    m2, m3, m4 = shift_moments(n_i, mean_i, m2_i, m3_i, m4_i, pooled_mean)
    return Moments(m.n * group_size, pooled_mean.squeeze(-1), m2.sum(-1), m3.sum(-1), m4.sum(-1))


def shift_moments(n: Tensor, mean: Tensor, m2: Tensor, m3: Tensor, m4: Tensor,
                  center: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``M2, M3, M4`` taken about ``center`` instead of ``mean`` (exact binomial expansion).

    Summing shifted moments of groups about a common centre is how groups are pooled
    (:func:`pool_moments`) and how ranks are merged (the tracker's distributed sync).
    """
    d = mean - center
    d2 = d * d
    return (m2 + n * d2, m3 + 3 * d * m2 + n * d2 * d, m4 + 4 * d * m3 + 6 * d2 * m2 + n * d2 * d2)


def kurtosis_from_moments(m: Moments, excess: bool = False, rel_tol: Optional[float] = None) -> Tensor:
    """Pearson kurtosis ``n * M4 / M2^2`` (``excess``: minus 3, clamped at 0).

    Channels with fewer than two values or (numerically) zero variance give 0; never NaN.
    Zero variance means ``var <= (rel_tol * |mean|)^2``. ``rel_tol`` defaults to 1e-8 for
    float64 moments (a constant float32 channel leaves a rounding residue near
    ``var ~ 1e-20 mean^2``, while any float32 data with two distinct values in a fair
    share of its samples has ``std / |mean| > 1e-8``) and 1e-6 for float32 moments.

    Args:
        m: per-channel moments.
        excess: subtract 3 and clamp at 0.
        rel_tol: the relative variance below which a channel counts as constant (default by dtype).
    """
    if rel_tol is None:
        rel_tol = 1e-8 if m.m2.dtype == torch.float64 else 1e-6
    n = m.n
    var = m.m2 / torch.where(n > 0, n, torch.ones_like(n))
    tiny = torch.finfo(m.m2.dtype).tiny
    degenerate = (n < 2) | (var <= (rel_tol * m.mean.abs()) ** 2 + tiny) | ~torch.isfinite(var)
    safe_m2 = torch.where(degenerate, torch.ones_like(m.m2), m.m2)
    k = n * m.m4 / (safe_m2 * safe_m2)
    if excess:
        k = (k - 3).clamp_min(0)
    k = torch.where(degenerate | ~torch.isfinite(k), torch.zeros_like(k), k)
    return k


class StreamingMoments:
    """Accumulator of per-channel moments over a stream of batches, on any device.

    ``update(x)`` folds a batch in (``x`` is ``[..., C]`` or has its channel axis at
    ``channel_dim``); ``merge(other)`` folds in another accumulator exactly;
    ``pooled(g)`` pools contiguous groups of ``g`` channels (e.g. the d_head channels
    of an attention head); ``kurtosis()`` reads the Pearson kurtosis.

    Args:
        num_channels: C, the number of channels.
        device: where the moments live (default CPU).
        dtype: their dtype (float64 by default).

    Example:
        >>> a, b = StreamingMoments(2), StreamingMoments(2)
        >>> a.update(torch.tensor([[1., 2.], [3., 4.]])); b.update(torch.tensor([[5., 6.]]))
        >>> a.merge(b); a.mean.tolist(), a.count
        ([3.0, 4.0], 3.0)
    """

    def __init__(self, num_channels: int, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float64):
        z = torch.zeros(num_channels, dtype=dtype, device=device)
        self._m = Moments(torch.zeros((), dtype=dtype, device=device), z, z.clone(), z.clone(), z.clone())

    @classmethod
    def from_moments(cls, m: Moments) -> "StreamingMoments":
        """An accumulator holding ``m``.

        Args:
            m: the moments to start from.
        """
        out = cls.__new__(cls)
        out._m = m
        return out

    @property
    def moments(self) -> Moments:
        """The accumulated ``(n, mean, M2, M3, M4)``."""
        return self._m

    @property
    def count(self) -> float:
        """Samples folded in so far."""
        return float(self._m.n)

    @property
    def mean(self) -> Tensor:
        """The per-channel mean."""
        return self._m.mean

    @property
    def num_channels(self) -> int:
        """C, the number of channels."""
        return int(self._m.mean.shape[-1])

    def update(self, x: Tensor, channel_dim: int = -1) -> None:
        """Fold a batch in; every position other than ``channel_dim`` is one sample.

        Args:
            x: a batch of samples.
            channel_dim: its channel axis.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"StreamingMoments.update needs a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0:
            raise ValueError("StreamingMoments.update needs at least a 1-D tensor")
        if not -x.dim() <= channel_dim < x.dim():
            raise ValueError(
                f"channel_dim={channel_dim} is out of range for a tensor with {x.dim()} dimensions "
                f"(allowed: {-x.dim()} <= channel_dim < {x.dim()})"
            )
        x2 = x.movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim])
        if x2.shape[1] != self.num_channels:
            raise ValueError(f"batch has {x2.shape[1]} channels, accumulator has {self.num_channels}")
        b = batch_moments(x2.to(self._m.mean.device), out_dtype=self._m.mean.dtype)
        self._m = merge_moments(self._m, b)

    def merge(self, other: "StreamingMoments") -> None:
        """Fold in another accumulator (disjoint samples, same channels).

        Args:
            other: the other accumulator.
        """
        if other.num_channels != self.num_channels:
            raise ValueError(f"cannot merge {other.num_channels} channels into {self.num_channels}")
        o = Moments(*(t.to(self._m.mean.device, self._m.mean.dtype) for t in other._m))
        self._m = merge_moments(self._m, o)

    def pooled(self, group_size: int) -> "StreamingMoments":
        """A new accumulator whose channels are contiguous groups of ``group_size`` channels.

        Args:
            group_size: channels per group (dividing C).
        """
        return StreamingMoments.from_moments(pool_moments(self._m, group_size))

    def kurtosis(self, excess: bool = False) -> Tensor:
        """Per-channel Pearson kurtosis (:func:`kurtosis_from_moments`).

        Args:
            excess: subtract 3 and clamp at 0.
        """
        return kurtosis_from_moments(self._m, excess=excess)

    def reset(self) -> None:
        """Forget every sample."""
        self._m = Moments(*(torch.zeros_like(t) for t in self._m))

    def state_dict(self) -> Dict[str, Tensor]:
        """The moments as ``{n, mean, m2, m3, m4}`` (copies)."""
        return {k: v.clone() for k, v in self._m._asdict().items()}

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict`; a missing or misshapen entry is an error naming it.

        Args:
            state: what :meth:`state_dict` returned.
        """
        missing = set(Moments._fields) - set(state)
        if missing:
            raise KeyError(f"moment state lacks {sorted(missing)}")
        for k in Moments._fields:
            if not isinstance(state[k], Tensor):
                raise TypeError(f"moment state '{k}' must be a tensor, got {type(state[k]).__name__}")
        want = {"n": self._m.n.shape, **{k: self._m.mean.shape for k in Moments._fields[1:]}}
        for k, shape in want.items():
            if state[k].shape != shape:
                raise ValueError(
                    f"moment state '{k}' has shape {tuple(state[k].shape)}, this accumulator needs {tuple(shape)}"
                )
        dev, dt = self._m.mean.device, self._m.mean.dtype
        self._m = Moments(*(state[k].to(dev, dt).clone() for k in Moments._fields))


def merge_all(parts: Iterable[Moments]) -> Moments:
    """Merge an iterable of summaries left to right."""
    it = iter(parts)
    acc = next(it)
    for p in it:
        acc = merge_moments(acc, p)
    return acc
