"""The tracker's tensor state: pending micro-batch, step sums, window, EMA and counters.

Layout. The probes on one device form a :class:`_Group` that keeps its statistics in a few
flat tensors, so that every per-micro-batch and per-step operation is a handful of tensor
operations for all sites together, not a loop of small ones per site:

* pending (the micro-batch being observed): each probe owns two *sink* tensors, leaves (one
  stored element each) whose ``.grad`` holds the sums emitted since the last commit
  (``[streams * C + 1]`` float32: the recipe's streams and a count; ``[order + 1, C]`` float64:
  power sums about the window's mean). Eager hooks write ``.grad``; a compiled graph returns
  the same sums as the gradients of the sinks and autograd adds them, which needs no mutation
  inside a compiled backward. The pending sums exist only between a backward and the next
  commit, which sets ``.grad`` back to None.
* step: ``[streams, L]`` float32, the committed sums of the current optimizer step;
* window moments: ``[4, Lm]`` float64, the power sums ``sum (x - c)^k`` (k = 1..4; only k = 1,
  the mean, for kurtosis from outputs) about a per-channel centre ``c`` (float32), and one count
  per probe. The centre is set from the probe's first forward and moved to the window's mean at
  each reading, so it stays within a few standard deviations of the data and the sums are well
  conditioned whatever ``|mean| / std`` (the error of a sum about a centre ``d`` away from the
  mean grows like ``(d / std)^4`` times float64's rounding). Sums about one centre merge by
  addition, which is exact; the centre never changes between a forward and the commit of its
  sums, so a commit may happen anywhere in a forward. Central moments are formed only when a
  reading is published (:meth:`_Group.window_moments`).

:meth:`Accumulator.commit` folds the pending micro-batch into the step, or drops it whole (and
counts it) when any of its sums is not finite; :meth:`Accumulator.close_step` turns the step
into per-block salience (one ``index_add_`` into a flat vector of every block slot: heads,
neurons, adapter ranks, then the hidden dimensions) added to the window.

Example:
    >>> import torch
    >>> from apt_salience.tracker.accumulate import Accumulator
    >>> Accumulator.__name__
    'Accumulator'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..architectures import Site
from ..moments import Moments, central_from_power_sums, shift_moments
from .errors import TrackerStateError
from .statistics import Recipe

__all__ = ["Probe", "Accumulator", "BLOCK_KINDS"]

#: State-file names of the recipe streams (format version 1).
_V1_NAMES = {"abs_in": "step_a", "abs_grad": "step_b", "prod": "step_t"}

#: Block kinds with slots in the flat window, in slot order.
BLOCK_KINDS = ("head", "neuron", "adapter", "hidden")


@dataclass(eq=False)
class Probe:
    """One observed tensor stream: a site's input (``side='in'``) or output (``'out'``)."""

    site: Site
    side: str
    channels: int
    block_size: int
    order: int  # moments: 0 none, 1 mean only, 4 up to M4
    decoder: bool  # under a module path component named "decoder" (takes token_mask's decoder_mask)
    device: torch.device
    sink_sum: Tensor = field(repr=False, default=None)  # type: ignore[assignment]
    sink_mom: Optional[Tensor] = field(repr=False, default=None)
    group: "_Group" = field(repr=False, default=None)  # type: ignore[assignment]
    off: int = 0  # channel offset in the group's stream layout
    moff: int = -1  # channel offset in the group's moment layout (-1: no moments)
    mpos: int = -1  # index among the group's probes with moments
    centre_ok: bool = False  # the centre of the power sums has been set (from the first forward)

    @property
    def key(self) -> str:
        return f"{self.site.name}:{self.side}"

    @property
    def kind(self) -> str:
        return "hidden" if self.side == "out" else self.site.kind

    @property
    def centre(self) -> Tensor:
        """The point the power sums of this probe are taken about (a view, float32)."""
        return self.group.centre[self.moff : self.moff + self.channels]

    def emit(self, sums: Tensor, mom: Optional[Tensor]) -> None:
        """Eager: add one emission (``[streams * C + 1]`` float32, power sums) to the pending sums."""
        for sink, value in ((self.sink_sum, sums), (self.sink_mom, mom)):
            if sink is None or value is None:
                continue
            if sink.grad is None:
                sink.grad = value.to(sink.dtype).clone()
            else:
                sink.grad.add_(value)


def _sink(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A leaf that only receives gradients: one stored element expanded to ``shape``."""
    return torch.zeros(1, dtype=dtype, device=device).expand(shape).requires_grad_()


class _Group:
    """The probes on one device and their flat step and window tensors.

    Persistent per channel: the step sums (float32, one row per recipe stream), the window's
    power sums about the centre (float64, 4 rows; 1 for kurtosis from outputs), the centre
    (float32) and the block slot of the channel (int32); per probe with moments: the window
    count. The pending sums live in the sinks' ``.grad`` only between a backward and the next commit.
    """

    def __init__(self, device: torch.device, probes: List[Probe], recipe: Recipe, mom_rows: int,
                 slot_of: Dict[str, Tensor]):
        self.device = device
        self.probes = probes
        self.k = len(recipe.streams)
        self.L = sum(p.channels for p in probes)
        self.mprobes = [p for p in probes if p.order]
        self.Lm = sum(p.channels for p in self.mprobes)
        self.mom_rows = mom_rows  # rows of win: 4 (sums of powers 1..4) or 1 (the first power only)
        off = moff = 0
        for p in probes:
            p.group, p.off = self, off
            off += p.channels
        for i, p in enumerate(self.mprobes):
            p.moff, p.mpos = moff, i
            moff += p.channels
        self.step = torch.zeros(self.k, self.L, dtype=torch.float32, device=device)
        self.win = torch.zeros(mom_rows, self.Lm, dtype=torch.float64, device=device)
        self.win_n = torch.zeros(len(self.mprobes), dtype=torch.float64, device=device)
        self.centre = torch.zeros(self.Lm, dtype=torch.float32, device=device)
        self.centre_set = torch.zeros(len(self.mprobes), dtype=torch.bool, device=device)  # (compiled graphs)
        self.win_seen = torch.zeros(len(probes), dtype=torch.float32, device=device)  # gradients per probe, window
        self.msizes = torch.tensor([p.channels for p in self.mprobes], dtype=torch.long, device=device)
        self.mstarts = torch.tensor([p.moff for p in self.mprobes], dtype=torch.long, device=device)
        self.dest = (torch.cat([slot_of[p.key] for p in probes]) if probes else torch.zeros(0, dtype=torch.long)).to(
            device, torch.int32)
        for p in probes:
            p.sink_sum = _sink((recipe.width(p.channels),), torch.float32, device)
            p.sink_mom = _sink((p.order + 1, p.channels), torch.float64, device) if p.order else None

    def pending_cat(self) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """(stream sums ``[k, L]``, counts ``[P]``, power sums ``[order + 1, Lm]`` or None) of the pending micro-batch."""
        k = self.k
        gs = [p.sink_sum.grad if p.sink_sum.grad is not None else torch.zeros_like(p.sink_sum) for p in self.probes]
        flat = torch.cat([g[j * p.channels : (j + 1) * p.channels] for j in range(k) for g, p in zip(gs, self.probes)]
                         + [g[k * p.channels :] for g, p in zip(gs, self.probes)])
        mom = None
        if self.mprobes:
            ms = []
            for p in self.mprobes:
                assert p.sink_mom is not None
                ms.append(p.sink_mom.grad if p.sink_mom.grad is not None else torch.zeros_like(p.sink_mom))
            mom = torch.cat(ms, dim=1)
        return flat[: k * self.L].view(k, self.L), flat[k * self.L :], mom

    def clear_pending(self, keep: bool = False) -> None:
        """Release the pending sums (``keep``: zero them in place instead, so that a compiled graph
        keeps seeing tensors and is not compiled a second time for ``.grad is None``)."""
        if keep:
            grads = [t.grad for p in self.probes for t in (p.sink_sum, p.sink_mom) if t is not None and t.grad is not None]
            if grads:
                torch._foreach_zero_(grads)
            return
        for p in self.probes:
            p.sink_sum.grad = None
            if p.sink_mom is not None:
                p.sink_mom.grad = None

    def window_n(self) -> Tensor:
        """The window count of every channel with moments (``[Lm]``)."""
        return self.win_n.repeat_interleave(self.msizes, output_size=self.Lm)

    def central_moments(self) -> Moments:
        """The window's central moments of every channel with moments (flat ``[Lm]`` tensors)."""
        n = self.window_n()
        return central_from_power_sums(torch.cat([n.unsqueeze(0), self.win]), self.centre.double())

    def window_moments(self, p: Probe) -> Moments:
        """The probe's central window moments (per channel) and its count ``n`` (a scalar)."""
        sl = slice(p.moff, p.moff + p.channels)
        n = self.win_n[p.mpos]
        m = central_from_power_sums(torch.cat([n.expand(1, p.channels), self.win[:, sl]]), self.centre[sl].double())
        return Moments(n, m.mean, m.m2, m.m3, m.m4)

    def set_central(self, m: Moments, n_probe: Tensor) -> None:
        """Replace the window by central moments ``m`` (flat) with counts ``n_probe``, re-centred at their means."""
        self.centre.copy_(torch.where(m.n > 0, m.mean, self.centre.double()).float())
        self.win.copy_(_sums_about(m, self.centre.double(), self.mom_rows))
        self.win_n.copy_(n_probe)


def _sums_about(m: Moments, centre: Tensor, rows: int) -> Tensor:
    """The power sums ``sum (x - c)^k``, k = 1..rows, of samples with central moments ``m`` (exact shift)."""
    d = m.mean - centre
    return torch.stack([m.n * d, *shift_moments(m.n, m.mean, m.m2, m.m3, m.m4, centre)][:rows])


class Accumulator:
    """Pure tensor state of a tracker (no hooks): see the module docstring for the layout."""

    def __init__(self, probes: Sequence[Probe], recipe: Recipe, counts: Dict[str, int], home: torch.device):
        self.recipe = recipe
        self.home = home
        self.probes = list(probes)
        self.counts = dict(counts)  # kind -> number of blocks (hidden: d_model)
        self.kind_offset: Dict[str, int] = {}
        off = 0
        for k in BLOCK_KINDS:
            if k in self.counts:
                self.kind_offset[k] = off
                off += self.counts[k]
        self.slots = off
        slot_of = self._slot_map()
        orders = {p.order for p in self.probes if p.order}
        if len(orders) > 1:
            raise AssertionError(f"probes with moments must share one order, got {sorted(orders)}")
        mom_rows = 4 if 4 in orders else 1
        by_dev: Dict[torch.device, List[Probe]] = {}
        for p in self.probes:
            by_dev.setdefault(p.device, []).append(p)
        self.groups = [_Group(d, ps, recipe, mom_rows, slot_of) for d, ps in by_dev.items()]
        f64: Dict[str, Any] = dict(dtype=torch.float64, device=home)
        self.win_blocks = torch.zeros(self.slots, **f64)
        self.win_steps = torch.zeros((), **f64)
        self.dropped = torch.zeros((), dtype=torch.int64, device=home)
        self.committed = torch.zeros((), dtype=torch.int64, device=home)
        self.step_seen = torch.zeros((), dtype=torch.bool, device=home)
        self.ema: Dict[str, Dict[str, Tensor]] = {}

    def _slot_map(self) -> Dict[str, Tensor]:
        """Per probe, the block slot of each of its channels."""
        starts = dict(self.kind_offset)
        out: Dict[str, Tensor] = {}
        for p in self.probes:
            if p.side == "out":
                out[p.key] = self.kind_offset["hidden"] + torch.arange(p.channels)
            else:
                kind = p.site.kind
                out[p.key] = starts[kind] + torch.arange(p.channels) // p.block_size
                starts[kind] += p.channels // p.block_size
        return out

    def init_ema(self, fields: Sequence[str]) -> None:
        f64: Dict[str, Any] = dict(dtype=torch.float64, device=self.home)
        self.ema = {k: {f: torch.zeros(n, **f64) for f in fields} for k, n in self.counts.items()}

    def kind_slice(self, kind: str) -> slice:
        o = self.kind_offset[kind]
        return slice(o, o + self.counts[kind])

    # ------------------------------------------------------------------ per micro-batch

    def commit(self, keep_pending: bool = False) -> None:
        """Fold the pending micro-batch into the step, or drop it whole if any sum is not finite.

        ``keep_pending``: zero the pending tensors instead of releasing them (compiled graphs).
        """
        if not self.groups:
            return
        with torch.no_grad():
            cats = [g.pending_cat() for g in self.groups]
            finite = [torch.isfinite(s).all() & (torch.isfinite(m).all() if m is not None else True) for s, _, m in cats]
            seen = [c.sum() > 0 for _, c, _ in cats]
            ok = finite[0].to(self.home)
            anyseen = seen[0].to(self.home)
            for f, s in zip(finite[1:], seen[1:]):
                ok = ok & f.to(self.home)
                anyseen = anyseen | s.to(self.home)
            for g, (sums, seen_counts, mom) in zip(self.groups, cats):
                okd = ok if g.device == self.home else ok.to(g.device)
                g.step.add_(torch.where(okd, sums, 0.0))
                g.win_seen.add_(torch.where(okd, seen_counts, 0.0))
                if mom is not None:  # power sums about the same centre: they add up
                    g.win.add_(torch.where(okd, mom[1:], 0.0))
                    g.win_n.add_(torch.where(okd, mom[0].index_select(0, g.mstarts), 0.0))
                g.clear_pending(keep_pending)
            self.dropped += (anyseen & ~ok).long()
            self.committed += (anyseen & ok).long()
            self.step_seen |= anyseen & ok

    # ------------------------------------------------------------------ per optimizer step

    def close_step(self) -> None:
        """Per-block salience of the finished step, added to the window; the step sums restart."""
        with torch.no_grad():
            blocks = torch.zeros(self.slots, dtype=torch.float64, device=self.home)
            for g in self.groups:
                vals = self.recipe.channel_value(g.step)
                part = torch.zeros(self.slots, dtype=torch.float64, device=g.device).index_add_(0, g.dest, vals.double())
                blocks += part.to(self.home)
                g.step.zero_()
            self.win_blocks += self.recipe.finish(blocks)
            self.win_steps += self.step_seen.double()
            self.step_seen.zero_()

    def reset_window(self) -> None:
        """Start a new window; each centre moves to the finished window's mean (where it saw data)."""
        self.win_blocks.zero_()
        self.win_steps.zero_()
        for g in self.groups:
            if g.Lm:
                m = g.central_moments()
                g.centre.copy_(torch.where(m.n > 0, m.mean, g.centre.double()).float())
            g.win.zero_()
            g.win_n.zero_()
            g.win_seen.zero_()

    # ------------------------------------------------------------------ views for publication / sync

    def window_moments(self, p: Probe) -> Moments:
        return p.group.window_moments(p)

    def seen_in_window(self) -> Dict[str, bool]:
        """``{probe key: whether a gradient reached it in the open window}`` (synchronises the device)."""
        out: Dict[str, bool] = {}
        for g in self.groups:
            for p, v in zip(g.probes, g.win_seen.tolist()):
                out[p.key] = v > 0
        return out

    def step_sums(self, p: Probe) -> Tensor:
        """``[streams, C]`` view of the probe's committed step sums."""
        return p.group.step[:, p.off : p.off + p.channels]

    def state_bytes(self) -> int:
        """Bytes of every persistent tensor (independent of batch and sequence length)."""
        ts: List[Tensor] = [self.win_blocks, self.win_steps, self.dropped, self.committed, self.step_seen]
        for g in self.groups:
            ts += [g.step, g.win, g.win_n, g.centre, g.centre_set, g.win_seen, g.msizes, g.mstarts, g.dest]
        for p in self.probes:
            for s in (p.sink_sum, p.sink_mom):
                if s is not None:
                    ts += [s, s.grad] if s.grad is not None else [s]
        for d in self.ema.values():
            ts += list(d.values())
        # storage bytes, each storage once (a sink stores one element, expanded to its shape)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts if t.numel()}
        return sum(storages.values())

    # ------------------------------------------------------------------ state

    def state_dict(self) -> Dict[str, Any]:
        """Counters, window, EMA and per-probe step sums / window moments (CPU copies; the format of version 1)."""
        probes: Dict[str, Dict[str, Tensor]] = {}
        for p in self.probes:
            d: Dict[str, Tensor] = {}
            sums = self.step_sums(p)
            for j, name in enumerate(self.recipe.streams):
                d[_V1_NAMES[name]] = sums[j].detach().cpu().clone()
            if p.order:
                m = self.window_moments(p)
                d["mom_n"] = m.n.detach().cpu().clone()
                for f in ("mean", "m2", "m3", "m4"):
                    d[f"mom_{f}"] = getattr(m, f).detach().cpu().clone()
            probes[p.key] = d
        return {
            "counters": {"win_steps": self.win_steps.detach().cpu().clone(), "dropped": self.dropped.detach().cpu().clone(),
                         "committed": self.committed.detach().cpu().clone(), "step_seen": self.step_seen.detach().cpu().clone()},
            "window": {k: self.win_blocks[self.kind_slice(k)].detach().cpu().clone() for k in self.counts},
            "ema": {k: {f: t.detach().cpu().clone() for f, t in d.items()} for k, d in self.ema.items()},
            "probes": probes,
        }

    def check_state(self, state: Any) -> List[str]:
        """Everything wrong with ``state`` for this layout (empty when :meth:`load_state_dict` will succeed)."""
        problems: List[str] = []

        def tensor_at(path: str, value: Any, numel: Optional[int]) -> None:
            if not isinstance(value, Tensor):
                problems.append(f"'{path}' must be a tensor, got {type(value).__name__}")
            elif numel is not None and value.numel() != numel:
                problems.append(f"'{path}' has {value.numel()} values, this tracker needs {numel}")
            elif value.is_floating_point() and not bool(torch.isfinite(value).all()):
                problems.append(f"'{path}' holds non-finite values")

        def section(name: str) -> Dict[str, Any]:
            v = state.get(name)
            if not isinstance(v, dict):
                problems.append(f"'{name}' is missing" if v is None else f"'{name}' must be a dict, got {type(v).__name__}")
                return {}
            return v

        counters = section("counters")
        for k in ("win_steps", "dropped", "committed", "step_seen"):
            if counters and k not in counters:
                problems.append(f"'counters.{k}' is missing")
            elif k in counters:
                tensor_at(f"counters.{k}", counters[k], 1)
        window = section("window")
        ema = section("ema")
        for k, n in self.counts.items():
            if window and k not in window:
                problems.append(f"'window.{k}' is missing")
            elif k in window:
                tensor_at(f"window.{k}", window[k], n)
            e = ema.get(k) if ema else None
            if ema and not isinstance(e, dict):
                problems.append(f"'ema.{k}' is missing")
            elif isinstance(e, dict):
                for f in self.ema.get(k, {}):
                    if f not in e and f != "uncertainty":
                        problems.append(f"'ema.{k}.{f}' is missing")
                    elif f in e:
                        tensor_at(f"ema.{k}.{f}", e[f], n)
        probes = section("probes")
        for p in self.probes:
            if not probes:
                break
            d = probes.get(p.key)
            if not isinstance(d, dict):
                problems.append(f"'probes.{p.key}' is missing")
                continue
            names = [_V1_NAMES[s] for s in self.recipe.streams]
            if p.order:
                names += ["mom_mean", "mom_m2", "mom_m3", "mom_m4"]
            for name in names:
                if name not in d:
                    problems.append(f"'probes.{p.key}.{name}' is missing")
                else:
                    tensor_at(f"probes.{p.key}.{name}", d[name], p.channels)
            if p.order:
                if "mom_n" not in d:
                    problems.append(f"'probes.{p.key}.mom_n' is missing")
                else:
                    tensor_at(f"probes.{p.key}.mom_n", d["mom_n"], 1)
        return problems

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; raises ``TrackerStateError`` and changes nothing if anything is wrong."""
        problems = self.check_state(state)
        if problems:
            raise TrackerStateError("tracker state is incomplete or malformed: " + "; ".join(problems[:5])
                                    + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
        c = state["counters"]
        self.win_steps.copy_(c["win_steps"].reshape(()))
        self.dropped.copy_(c["dropped"].reshape(()))
        self.committed.copy_(c["committed"].reshape(()))
        self.step_seen.copy_(c["step_seen"].reshape(()))
        for k in self.counts:
            self.win_blocks[self.kind_slice(k)] = state["window"][k].to(self.home, torch.float64)
            for f, t in state["ema"][k].items():
                if f in self.ema[k]:  # 'uncertainty' only when uncertainty_beta is set on both sides
                    self.ema[k][f].copy_(t.to(self.home))
        for p in self.probes:
            d = state["probes"][p.key]
            sums = self.step_sums(p)
            for j, name in enumerate(self.recipe.streams):
                sums[j].copy_(d[_V1_NAMES[name]].to(p.device))
            if p.order:
                g = p.group
                sl = slice(p.moff, p.moff + p.channels)
                n = float(d["mom_n"])
                z = torch.zeros(p.channels, dtype=torch.float64)
                m = Moments(torch.full((p.channels,), n, dtype=torch.float64), d["mom_mean"].double(),
                            *((d[f"mom_{f}"].double() if g.mom_rows == 4 else z) for f in ("m2", "m3", "m4")))
                c = torch.where(m.n > 0, m.mean, g.centre[sl].double().cpu()).float()
                g.centre[sl] = c.to(p.device)
                g.win[:, sl] = _sums_about(m, c.double(), g.mom_rows).to(p.device)
                g.win_n[p.mpos] = n
                p.centre_ok = p.centre_ok or n > 0
                g.centre_set[p.mpos] = p.centre_ok
        for g in self.groups:
            g.clear_pending()

    def tensors(self) -> Iterator[Tensor]:
        yield from (self.win_blocks, self.win_steps, self.dropped, self.committed, self.step_seen)
        for g in self.groups:
            yield from (g.step, g.win, g.win_n, g.centre)
