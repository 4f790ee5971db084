"""Multi-process training: every rank publishes the scores of one process that saw all the batches.

* each optimizer step, the step's per-channel sums are summed over ranks with one flat
  all-reduce (issued from ``step()``, never from a hook);
* at each reading, the window moments are merged exactly: counts and sums first (the global
  mean), then every rank's central moments shifted to the global mean and summed;
* before the first collective of a layout, a small fixed-size all-reduce checks that every
  rank tracks the same layout and settings, so that mismatched ranks raise
  :class:`TrackerStateError` naming the first difference instead of hanging.
"""

from __future__ import annotations

import hashlib
from typing import Any, List, Optional, Tuple

import torch

from ..moments import Moments, shift_moments
from .accumulate import Accumulator
from .errors import TrackerStateError

__all__ = ["DistributedSync", "process_group"]


def _offsets(sizes: List[int]) -> List[int]:
    out, o = [], 0
    for n in sizes:
        out.append(o)
        o += n
    return out


def process_group(sync: str) -> Any:
    """``torch.distributed`` when it is initialised with more than one process (and ``sync`` is not off)."""
    if sync == "off":
        return None
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return None
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return dist


class DistributedSync:
    """The collectives of one tracker (see the module docstring)."""

    def __init__(self, acc: Accumulator, layout_key: str, summary: List[Tuple[str, int]], fingerprint: str):
        self.acc = acc
        self.layout_key = layout_key
        self.summary = summary
        self.fingerprint = fingerprint
        self._checked: Optional[str] = None

    def sync_step(self, dist: Any) -> None:
        """Sum this step's per-channel sums over ranks: one flat all-reduce."""
        acc = self.acc
        if self._checked != self.layout_key:
            self.check_layouts(dist)  # a small fixed-size collective first: differing layouts never hang
            self._checked = self.layout_key
        parts = [g.step.reshape(-1) for g in acc.groups] + [acc.step_seen.float().reshape(1)]
        flat = torch.cat([p.to(acc.home) for p in parts])
        dist.all_reduce(flat)
        acc.step_seen.copy_(flat[-1] > 0)
        off = 0
        for g in acc.groups:
            n = g.step.numel()
            g.step.copy_(flat[off : off + n].view_as(g.step))
            off += n

    def reduce_counters(self, dist: Any) -> Tuple[int, int]:
        """Global (dropped, committed) micro-batch counts (the counters themselves stay per rank)."""
        counters = torch.stack([self.acc.dropped.double(), self.acc.committed.double()])
        dist.all_reduce(counters)
        return int(counters[0].item()), int(counters[1].item())

    def sync_moments(self, dist: Any) -> None:
        """Exact merge of the window moments of every rank (counts, means, then shifted moments)."""
        acc = self.acc
        groups = [g for g in acc.groups if g.Lm]
        if not groups:
            return
        home = acc.home
        mine = [g.central_moments() for g in groups]
        n_probe = torch.cat([g.win_n.to(home) for g in groups])
        n_ch = torch.cat([m.n.to(home) for m in mine])
        mean = torch.cat([m.mean.to(home) for m in mine])
        flat = torch.cat([n_probe, n_ch * mean])
        dist.all_reduce(flat)
        n_g, sum_g = flat[: n_probe.numel()], flat[n_probe.numel():]
        n_g_ch = torch.cat([n_g[o : o + len(g.mprobes)].to(g.device).repeat_interleave(g.msizes, output_size=g.Lm).to(home)
                            for o, g in zip(_offsets([len(g.mprobes) for g in groups]), groups)])
        mean_g = torch.where(n_g_ch > 0, sum_g / n_g_ch.clamp_min(1), mean)
        zero = torch.zeros_like(mean_g)
        m2 = m3 = m4 = zero
        if groups[0].mom_rows == 4:
            m2_, m3_, m4_ = (torch.cat([getattr(m, f).to(home) for m in mine]) for f in ("m2", "m3", "m4"))
            # each rank's M_k about the global mean; their sum over ranks is the union's M_k
            flat2 = torch.stack(shift_moments(n_ch, mean, m2_, m3_, m4_, mean_g))
            dist.all_reduce(flat2)
            m2, m3, m4 = flat2.unbind(0)
        off = pos = 0
        for g in groups:
            sl = slice(off, off + g.Lm)
            merged = Moments(*(t[sl].to(g.device) for t in (n_g_ch, mean_g, m2, m3, m4)))
            g.set_central(merged, n_g[pos : pos + len(g.mprobes)].to(g.device))
            off += g.Lm
            pos += len(g.mprobes)

    def check_layouts(self, dist: Any) -> None:
        """All ranks must track the same layout; otherwise every rank raises ``TrackerStateError`` (no hang)."""
        h = int(hashlib.sha256(self.layout_key.encode()).hexdigest()[:12], 16)
        t = torch.tensor([h, -h], dtype=torch.int64, device=self.acc.home)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if int(t[0]) == -int(t[1]):
            return
        # every rank saw the mismatch, so every rank takes part in this gather (small, only on the error path)
        rank = dist.get_rank()
        detail = ""
        try:
            layouts: List[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(layouts, self.summary)
            mine = dict(layouts[rank])
            for other, theirs_list in enumerate(layouts):
                if other == rank or theirs_list == layouts[rank]:
                    continue
                theirs = dict(theirs_list)
                first = next((k for k in mine if theirs.get(k) != mine[k]), None) or next(
                    (k for k in theirs if k not in mine), None)
                detail = (f"; first mismatch with rank {other} at '{first}': this rank has "
                          f"{mine.get(first, 'no such site')}, rank {other} has {theirs.get(first, 'no such site')}")
                break
        except Exception as exc:  # pragma: no cover - the message only loses its detail
            detail = f" (could not gather the layouts for details: {exc})"
        raise TrackerStateError(
            f"rank {rank}: the tracked block layout or sync settings differ across ranks{detail} (this rank's "
            f"fingerprint {self.fingerprint}); every rank must attach to the same model architecture with the same "
            "config (sites, salience mode, kurtosis, update_frequency, sample_every)"
        )
