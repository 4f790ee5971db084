"""The :class:`SalienceTracker`: hooks, streaming windows, EMA, publication.

How a micro-batch is observed (see DESIGN.md for the mathematics):

* A forward hook on each site reads its input H (and, for head / neuron sites, its output,
  the sub-layer's write to the residual stream), reduces it at once to O(channels)
  statistics (``sum |H|`` over tokens, streaming moments) and registers a hook on that
  very tensor. Only when the gradient of that tensor arrives are the forward statistics
  and ``sum |dL/dH|`` put into the pending micro-batch together, so a forward whose
  gradient never comes (a re-computation under gradient checkpointing, an evaluation
  forward with gradients on) never counts.
* The pending micro-batch is committed when the next micro-batch's first forward starts
  or at ``step()``. If any statistic of it is non-finite (fp16 overflow), all of it is
  dropped and counted; no host synchronisation happens in any hook.
* ``step()`` closes the optimizer step: per-channel products ``A_t * B_t`` (or the signed
  Taylor sums), reduced to blocks, are added to the window; every ``update_frequency``
  steps the window is folded into the EMA and a reading is published.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .architectures import Site, find_sites, linear_weight
from .config import ConfigLike, SalienceConfig, load_config
from .moments import (Moments, _moments_and_abs_sum, _prod_sum, batch_moments, kurtosis_from_moments,
                      merge_moments, pool_moments, shift_moments)
from .scores import BlockScores, SalienceScores

__all__ = ["SalienceTracker", "attach", "SalienceWarning", "TrackerStateError"]

logger = logging.getLogger("apt_salience")

_STATE_VERSION = 1


class SalienceWarning(UserWarning):
    """Something the tracker could not observe or had to drop."""


class TrackerStateError(RuntimeError):
    """The tracker was used out of order (no reading yet, detached, incompatible state)."""


_MaskState = Tuple[Tuple[int, ...], Dict[torch.device, Tensor]]  # (mask shape, kept-token indices per device)


def _in_backward() -> bool:
    fn = getattr(torch._C, "_current_graph_task_id", None)
    return fn is not None and fn() != -1


@dataclass
class _Probe:
    """Statistics of one observed tensor stream: a site's input (``in``) or output (``out``)."""

    site: Site
    side: str
    channels: int
    block_size: int
    device: torch.device
    step_a: Optional[Tensor] = None  # float32 [C]: sum |H| of this step's committed micro-batches
    step_b: Optional[Tensor] = None  # float32 [C]: sum |dL/dH|
    step_t: Optional[Tensor] = None  # float32 [C]: sum H * dL/dH (taylor / fisher)
    moments: Optional[Moments] = None  # float64 window moments (order 4) or mean (order 1)
    order: int = 0
    warned: bool = False
    decoder: bool = False  # under a module path component named "decoder" (takes token_mask's decoder_mask)

    @property
    def key(self) -> str:
        return f"{self.site.name}:{self.side}"

    def tensors(self) -> Dict[str, Tensor]:
        out = {k: v for k, v in (("step_a", self.step_a), ("step_b", self.step_b), ("step_t", self.step_t)) if v is not None}
        if self.moments is not None:
            out.update({f"mom_{k}": v for k, v in self.moments._asdict().items()})
        return out


class _Entry:
    """Statistics of one observed tensor of the pending micro-batch (forward + its gradient)."""

    __slots__ = ("probe", "a", "b", "t", "mom", "ok")

    def __init__(self, probe: _Probe, a: Optional[Tensor], b: Optional[Tensor], t: Optional[Tensor],
                 mom: Optional[Moments], ok: Tensor):
        self.probe, self.a, self.b, self.t, self.mom, self.ok = probe, a, b, t, mom, ok


class _Hooks:
    """Owns every hook handle the tracker registers; ``remove()`` is idempotent."""

    def __init__(self) -> None:
        self._handles: List[RemovableHandle] = []

    def add(self, handle: RemovableHandle) -> None:
        self._handles.append(handle)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)


def _first_tensor(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[Tensor]:
    for v in args:
        if isinstance(v, Tensor):
            return v
    for v in kwargs.values():
        if isinstance(v, Tensor):
            return v
    return None


class SalienceTracker:
    """Streams APT salience, kurtosis and density of heads, neurons, hidden dims and adapter ranks.

    Create it with :func:`attach` (or ``SalienceTracker.attach``); call :meth:`step` once per
    optimizer step; read :meth:`scores` when ``step()`` returns True; :meth:`detach` at the end
    (or use it as a context manager).

    Example:
        >>> import torch, apt_salience
        >>> from torch import nn
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__(); self.o = nn.Linear(8, 8); self.up = nn.Linear(8, 16); self.down = nn.Linear(16, 8)
        ...     def forward(self, x): return self.down(torch.relu(self.up(self.o(x))))
        >>> model = nn.Sequential(Block(), Block())
        >>> cfg = {"architecture": "custom", "sites": {"heads": r".*\\.o", "neurons": r".*\\.down", "head_dim": 4}}
        >>> with apt_salience.attach(model, cfg) as tracker:
        ...     for _ in range(2):
        ...         model(torch.randn(3, 5, 8, requires_grad=True)).pow(2).mean().backward()
        ...         published = tracker.step()
        ...     scores = tracker.scores()
        >>> len(scores.head.salience), len(scores.neuron.salience), len(scores.hidden.salience)
        (4, 32, 8)
    """

    def __init__(self, model: nn.Module, config: ConfigLike = None, *, scaler: Any = None):
        cfg = load_config(config)
        if scaler is not None and not hasattr(scaler, "get_scale"):
            raise TypeError(f"scaler must be a torch.amp.GradScaler (or None), got {type(scaler).__name__}")
        sites, arch = find_sites(model, cfg)  # every validation error is raised here, before any hook
        self.config: SalienceConfig = cfg
        self.architecture: str = arch
        self._model = model
        self._scaler = scaler
        self._hooks = _Hooks()
        self._attached = False
        self._paused = 0
        self._mask: Optional[Tuple[_MaskState, Optional[_MaskState]]] = None  # (mask, decoder mask)
        self._recompute_mask: Optional[Tuple[_MaskState, Optional[_MaskState]]] = None
        self._pending: List[_Entry] = []
        self._scores: Optional[SalienceScores] = None
        self._steps = 0
        self._publications = 0
        self._warned_dropped = 0
        self._sync_checked = False
        self._build(sites)
        self._register()

    # ------------------------------------------------------------------ construction

    @classmethod
    def attach(cls, model: nn.Module, config: ConfigLike = None, *, scaler: Any = None) -> "SalienceTracker":
        """Validate, find the sites and register the hooks (same as :func:`apt_salience.attach`)."""
        return cls(model, config, scaler=scaler)

    def _build(self, sites: List[Site]) -> None:
        cfg = self.config
        self.sites = sites
        self._home = sites[0].device if sites else torch.device("cpu")
        mode = cfg.salience.mode
        kurt = cfg.kurtosis.enabled
        in_order = (4 if cfg.kurtosis.source == "activation" else 1) if kurt else 0
        out_order = 4 if (kurt and cfg.kurtosis.source == "activation") else 0
        self._probes: Dict[str, Tuple[_Probe, Optional[_Probe]]] = {}
        for s in sites:
            pin = self._new_probe(s, "in", s.in_features, s.block_size, in_order, mode)
            pout = self._new_probe(s, "out", s.out_features, 1, out_order, mode) if s.writes_hidden else None
            self._probes[s.name] = (pin, pout)
        self.d_model = next((s.out_features for s in sites if s.writes_hidden), 0)
        f64: Dict[str, Any] = dict(dtype=torch.float64, device=self._home)
        self._counts = {k: n for k in ("head", "neuron", "adapter") if (n := sum(s.num_blocks for s in sites if s.kind == k))}
        if self.d_model:
            self._counts["hidden"] = self.d_model
        self._win = {k: torch.zeros(n, **f64) for k, n in self._counts.items()}
        ema_fields = ("salience", "outlier_aware") + (("uncertainty",) if cfg.uncertainty_beta is not None else ())
        self._ema = {k: {f: torch.zeros(n, **f64) for f in ema_fields} for k, n in self._counts.items()}
        self._win_steps = torch.zeros((), **f64)
        self._dropped = torch.zeros((), dtype=torch.int64, device=self._home)
        self._committed = torch.zeros((), dtype=torch.int64, device=self._home)
        self._step_seen = torch.zeros((), dtype=torch.bool, device=self._home)
        self._fingerprint = self._layout_fingerprint()

    def _new_probe(self, site: Site, side: str, channels: int, block: int, order: int, mode: str) -> _Probe:
        f32: Dict[str, Any] = dict(dtype=torch.float32, device=site.device)
        p = _Probe(site, side, channels, block, site.device, order=order, decoder="decoder" in site.name.split("."))
        if mode == "compressed":
            p.step_a = torch.zeros(channels, **f32)
            p.step_b = torch.zeros(channels, **f32)
        else:
            p.step_t = torch.zeros(channels, **f32)
        if order:
            z = torch.zeros(channels, dtype=torch.float64, device=site.device)
            p.moments = Moments(torch.zeros((), dtype=torch.float64, device=site.device), z, z.clone(), z.clone(), z.clone())
        return p

    def _layout_fingerprint(self) -> str:
        text = "|".join(f"{s.name},{s.kind},{s.in_features},{s.out_features},{s.block_size}" for s in self.sites)
        text += f"|mode={self.config.salience.mode}|kurt={self.config.kurtosis.enabled},{self.config.kurtosis.source}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _register(self) -> None:
        try:
            for s in self.sites:
                self._hooks.add(s.module.register_forward_hook(self._make_forward_hook(s), with_kwargs=True))
        except BaseException:
            self._hooks.remove()
            raise
        self._attached = True

    def _make_forward_hook(self, site: Site) -> Callable[..., None]:
        pin, pout = self._probes[site.name]

        def hook(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> None:
            if not self._attached:
                return
            if not _in_backward():
                if self._pending:
                    # a forward outside backward starts a new micro-batch: the previous one is complete (this
                    # also holds for the gradient-free first pass of reentrant checkpointing)
                    self._commit()
                # re-computations inside backward (checkpointing) run outside the token_mask block: they use
                # the mask of the last forward
                self._recompute_mask = self._mask
            if self._paused or not torch.is_grad_enabled():
                return
            if self.config.sample_every > 1 and self._steps % self.config.sample_every:
                return
            x = _first_tensor(args, kwargs)
            if x is not None:
                self._observe(pin, x)
            if pout is not None:
                y = output[0] if isinstance(output, (tuple, list)) else output
                if isinstance(y, Tensor):
                    self._observe(pout, y)

        return hook

    # ------------------------------------------------------------------ observation

    def _token_index(self, t: Tensor, probe: _Probe) -> Optional[Tensor]:
        masks = self._mask
        if masks is None and self._recompute_mask is not None and _in_backward():
            masks = self._recompute_mask
        if masks is None:
            return None
        state = masks[1] if (probe.decoder and masks[1] is not None) else masks[0]
        shape, by_device = state
        tokens = tuple(t.shape[:-1])
        if len(shape) > 1 and tokens == shape[:1]:
            return None  # a pooled, per-sequence tensor (e.g. a pooler on [CLS]): no padding positions in it
        if tokens != shape and not (len(tokens) == 1 and tokens[0] == math.prod(shape)):
            raise ValueError(
                f"token_mask shape {shape} does not match the tokens {tokens} seen at site '{probe.site.name}' "
                f"(tensor shape {tuple(t.shape)}); pass a mask of shape [batch, sequence] for this forward, "
                "or run this forward outside the token_mask context"
            )
        idx = by_device.get(t.device)
        if idx is None:
            idx = next(iter(by_device.values())).to(t.device, non_blocking=True)
            by_device[t.device] = idx
        return idx

    def _observe(self, probe: _Probe, t: Tensor) -> None:
        if not t.requires_grad:
            if not probe.warned:
                probe.warned = True
                warnings.warn(
                    f"apt_salience: the {probe.side}put of site '{probe.site.name}' does not require grad, so its "
                    "gradient is never seen and the site is not scored. If the layers below it are frozen, call "
                    "model.enable_input_require_grads() (Hugging Face) or make the embedding output require grad.",
                    SalienceWarning,
                    stacklevel=4,
                )
            return
        if t.shape[-1] != probe.channels:
            raise ValueError(
                f"site '{probe.site.name}' {probe.side}put has {t.shape[-1]} channels but the tracker expects "
                f"{probe.channels}; call tracker.refresh() after changing the model's shapes"
            )
        idx = self._token_index(t, probe)
        with torch.no_grad():
            x2 = t.detach().reshape(-1, probe.channels)
            # sum |H| and the moments in one sweep over cache-sized row chunks (masked rows selected per
            # chunk): no converted, masked or power temporaries of activation size
            mom, a = _moments_and_abs_sum(x2, order=probe.order, index=idx, abs_sum=probe.step_a is not None)
        # taylor / fisher need H when dL/dH arrives: a view of the activation, never a copy
        keep = x2 if probe.step_t is not None else None
        t.register_hook(self._make_grad_hook(probe, a, mom, keep, idx))

    def _make_grad_hook(self, probe: _Probe, a: Optional[Tensor], mom: Optional[Moments], keep: Optional[Tensor],
                        idx: Optional[Tensor]) -> Callable[[Tensor], None]:
        def grad_hook(g: Tensor) -> None:
            if not self._attached:
                return
            with torch.no_grad():
                g2 = g.detach().reshape(-1, probe.channels)
                scale = self._inv_scale(g.device)
                checks: List[Tensor] = []
                b = t = None
                if a is not None:
                    _, b = _moments_and_abs_sum(g2, order=0, index=idx, abs_sum=True)
                    assert b is not None
                    if scale is not None:
                        b = b * scale
                    checks += [a, b]
                if keep is not None:
                    t = _prod_sum(keep, g2, idx)
                    if scale is not None:
                        t = t * scale
                    checks.append(t)
                if mom is not None:
                    checks.append(mom.mean)
                    if probe.order > 1:
                        checks.append(mom.m4)
                ok = torch.stack([torch.isfinite(c).all() for c in checks]).all() if checks else torch.ones((), dtype=torch.bool, device=g.device)
            self._pending.append(_Entry(probe, a, b, t, mom, ok))

        return grad_hook

    def _inv_scale(self, device: torch.device) -> Optional[Tensor]:
        sc = self._scaler
        if sc is None or not sc.is_enabled():
            return None
        scale = getattr(sc, "_scale", None)
        if scale is None:  # before the first scaler.scale(): the scaler would use init_scale
            return torch.tensor(1.0 / sc.get_scale(), device=device)
        return scale.to(device=device, dtype=torch.float32).reciprocal()

    def _commit(self) -> None:
        """Fold the pending micro-batch into the step, or drop it whole if anything is non-finite."""
        entries, self._pending = self._pending, []
        if not entries:
            return
        with torch.no_grad():
            ok = torch.stack([e.ok.to(self._home) for e in entries]).all()
            ok_on: Dict[torch.device, Tensor] = {self._home: ok}
            for e in entries:
                p = e.probe
                okd = ok_on.get(p.device)
                if okd is None:
                    okd = ok_on[p.device] = ok.to(p.device)
                if e.a is not None and p.step_a is not None and p.step_b is not None and e.b is not None:
                    p.step_a.add_(torch.where(okd, e.a, 0.0))
                    p.step_b.add_(torch.where(okd, e.b, 0.0))
                if e.t is not None and p.step_t is not None:
                    p.step_t.add_(torch.where(okd, e.t, 0.0))
                if e.mom is not None and p.moments is not None:
                    merged = merge_moments(p.moments, e.mom)
                    p.moments = Moments(*(torch.where(okd, new, old) for new, old in zip(merged, p.moments)))
            self._dropped += (~ok).long()
            self._committed += ok.long()
            self._step_seen |= ok

    # ------------------------------------------------------------------ public API

    @property
    def attached(self) -> bool:
        """True between attach and :meth:`detach`."""
        return self._attached

    @property
    def model(self) -> nn.Module:
        """The model the tracker was attached to."""
        return self._model

    @property
    def steps(self) -> int:
        """Optimizer steps seen (calls to :meth:`step`)."""
        return self._steps

    @property
    def dropped_microbatches(self) -> int:
        """Micro-batches dropped whole because a statistic was not finite (synchronises the device)."""
        return int(self._dropped.item())

    @property
    def observed_microbatches(self) -> int:
        """Micro-batches committed into the statistics (synchronises the device)."""
        return int(self._committed.item())

    @contextlib.contextmanager
    def token_mask(self, mask: Tensor, decoder_mask: Optional[Tensor] = None) -> Iterator["SalienceTracker"]:
        """Exclude the tokens where ``mask`` is 0/False (padding) from the forwards inside the block.

        ``mask`` has shape ``[batch, sequence]`` (e.g. a Hugging Face ``attention_mask``). For
        encoder-decoder models (T5) ``decoder_mask`` applies to the sites under a module named
        ``decoder`` (e.g. the ``decoder_attention_mask``); without it ``mask`` applies everywhere.
        A site whose tokens have another shape raises ``ValueError`` naming the site; a pooled
        ``[batch, channels]`` tensor (a pooler on [CLS]) has no padding and is taken whole.

        Example:
            >>> # with tracker.token_mask(batch["attention_mask"]):
            >>> #     loss = model(**batch).loss
        """
        states: List[Optional[_MaskState]] = []
        for name, m in (("mask", mask), ("decoder_mask", decoder_mask)):
            if m is None and name == "decoder_mask":
                states.append(None)
                continue
            if not isinstance(m, Tensor):
                raise TypeError(f"token_mask: {name} must be a torch.Tensor, got {type(m).__name__}")
            if m.dim() == 0:
                raise ValueError(f"token_mask: {name} must be a [batch, sequence] tensor, got a scalar")
            flat = m.detach().reshape(-1)
            keep = flat if flat.dtype == torch.bool else flat != 0
            idx = keep.nonzero().squeeze(1)  # one synchronisation here, none in the hooks
            states.append((tuple(m.shape), {idx.device: idx}))
        prev = self._mask
        assert states[0] is not None
        self._mask = (states[0], states[1])
        try:
            yield self
        finally:
            self._mask = prev

    @contextlib.contextmanager
    def paused(self) -> Iterator["SalienceTracker"]:
        """Suspend observation inside the block (e.g. an auxiliary forward/backward)."""
        self._paused += 1
        try:
            yield self
        finally:
            self._paused -= 1

    def step(self) -> bool:
        """Close one optimizer step; return True when a reading was published (see :meth:`scores`)."""
        self._check_attached()
        self._commit()
        self._sync_step()
        mode = self.config.salience.mode
        with torch.no_grad():
            starts = {k: 0 for k in self._counts}
            hidden_step = torch.zeros(self.d_model, dtype=torch.float64, device=self._home) if self.d_model else None
            for pin, pout in self._probes.values():
                kind = pin.site.kind
                per_ch = self._step_channel_values(pin)
                blocks = per_ch.view(-1, pin.block_size).sum(-1, dtype=torch.float64) if pin.block_size > 1 else per_ch.double()
                blocks = self._finish_blocks(blocks, mode)
                n = blocks.numel()
                self._win[kind][starts[kind] : starts[kind] + n] += blocks.to(self._home)
                starts[kind] += n
                if pout is not None and hidden_step is not None:
                    hidden_step += self._step_channel_values(pout).double().to(self._home)
                for p in (pin, pout):
                    if p is not None:
                        for t in (p.step_a, p.step_b, p.step_t):
                            if t is not None:
                                t.zero_()
            if hidden_step is not None:
                self._win["hidden"] += self._finish_blocks(hidden_step, mode)
            self._win_steps += self._step_seen.double()
            self._step_seen.zero_()
        self._steps += 1
        if self._steps % self.config.update_frequency == 0:
            return self._publish()
        return False

    @staticmethod
    def _finish_blocks(blocks: Tensor, mode: str) -> Tensor:
        if mode == "taylor":
            return blocks.abs()
        if mode == "fisher":
            return blocks.square()
        return blocks

    @staticmethod
    def _step_channel_values(p: _Probe) -> Tensor:
        if p.step_t is not None:
            return p.step_t
        assert p.step_a is not None and p.step_b is not None
        return p.step_a * p.step_b

    def scores(self) -> SalienceScores:
        """The latest published reading; ``TrackerStateError`` before the first one."""
        if self._scores is None:
            raise TrackerStateError(
                f"no reading has been published yet: {self._steps} step(s) seen, a reading comes every "
                f"update_frequency={self.config.update_frequency} step(s) that observed at least one micro-batch "
                "(call tracker.step() once per optimizer step, after backward)"
            )
        return self._scores

    def detach(self) -> None:
        """Remove every hook; safe to call twice. The published scores stay readable."""
        self._hooks.remove()
        self._attached = False
        self._pending = []
        self._mask = self._recompute_mask = None

    def refresh(self) -> None:
        """Re-read the sites and parameter counts from the current module shapes (after pruning).

        If the channel layout changed, the statistics and the EMA start again from zero.
        """
        self._check_attached()
        sites, arch = find_sites(self._model, self.config)
        old_fp = self._fingerprint
        self._hooks.remove()
        self._attached = False
        if [(s.name, s.kind, s.in_features, s.out_features) for s in sites] == [
            (s.name, s.kind, s.in_features, s.out_features) for s in self.sites
        ]:
            for old, new in zip(self.sites, sites):
                old.block_param_count = new.block_param_count
                old.module = new.module
        else:
            self._build(sites)
            self._scores = None
            logger.info("apt_salience: layout changed on refresh (%s -> %s); statistics restarted", old_fp, self._fingerprint)
        self.architecture = arch
        self._register()

    def state_bytes(self) -> int:
        """Bytes held by the tracker's persistent tensors (independent of batch and sequence length)."""
        total = 0
        for pin, pout in self._probes.values():
            for p in (pin, pout):
                if p is not None:
                    total += sum(t.numel() * t.element_size() for t in p.tensors().values())
        for k in self._win:
            total += self._win[k].numel() * 8 + sum(t.numel() * t.element_size() for t in self._ema[k].values())
        return total

    @property
    def tracked_channels(self) -> int:
        """Number of observed channels (site inputs plus head/neuron outputs)."""
        return sum(pin.channels + (pout.channels if pout else 0) for pin, pout in self._probes.values())

    def __enter__(self) -> "SalienceTracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def __repr__(self) -> str:
        kinds = ", ".join(f"{k}={n}" for k, n in self._counts.items())
        return (f"SalienceTracker(architecture={self.architecture!r}, sites={len(self.sites)}, blocks: {kinds}, "
                f"steps={self._steps}, attached={self._attached})")

    def _check_attached(self) -> None:
        if not self._attached:
            raise TrackerStateError("the tracker is detached; attach a new one with apt_salience.attach(model, config)")

    # ------------------------------------------------------------------ distributed

    def _dist(self) -> Any:
        if self.config.sync == "off":
            return None
        try:
            import torch.distributed as dist
        except ImportError:  # pragma: no cover
            return None
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        return dist

    def _sync_step(self) -> None:
        """Sum this step's per-channel statistics over ranks: one flat all-reduce, issued here, never in a hook."""
        dist = self._dist()
        if dist is None:
            return
        if self.config.sample_every > 1 and self._steps % self.config.sample_every:
            return  # no rank observed anything in this step (the same decision on every rank)
        layout = self._sync_layout_key()
        if getattr(self, "_synced_layout", None) != layout:
            self._check_layouts(dist)  # a small fixed-size collective first: differing layouts never hang
            self._synced_layout = layout
            self._sync_checked = True
        parts: List[Tensor] = []
        for pin, pout in self._probes.values():
            for p in (pin, pout):
                if p is not None:
                    parts += [t for t in (p.step_a, p.step_b, p.step_t) if t is not None]
        parts.append(self._step_seen.float().reshape(1))
        flat = torch.cat([x.to(self._home) for x in parts])
        dist.all_reduce(flat)
        self._step_seen.copy_(flat[-1] > 0)
        offset = 0
        for x in parts[:-1]:
            x.copy_(flat[offset : offset + x.numel()])
            offset += x.numel()

    def _sync_layout_key(self) -> str:
        """What every rank must agree on: the block layout, plus the settings that decide when collectives run."""
        return f"{self._fingerprint}|uf={self.config.update_frequency}|se={self.config.sample_every}"

    def _layout_summary(self) -> List[Tuple[str, int]]:
        out: List[Tuple[str, int]] = [("update_frequency", self.config.update_frequency),
                                      ("sample_every", self.config.sample_every)]
        for pin, pout in self._probes.values():
            out += [(p.key, p.channels) for p in (pin, pout) if p is not None]
        return out

    def _check_layouts(self, dist: Any) -> None:
        """All ranks must track the same layout; otherwise every rank raises ``TrackerStateError`` (no hang)."""
        key = self._sync_layout_key()
        h = int(hashlib.sha256(key.encode()).hexdigest()[:12], 16)
        t = torch.tensor([h, -h], dtype=torch.int64, device=self._home)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if int(t[0]) == -int(t[1]):
            return
        # every rank saw the mismatch, so every rank takes part in this gather (small, only on the error path)
        rank = dist.get_rank()
        detail = ""
        try:
            layouts: List[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(layouts, self._layout_summary())
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
            f"fingerprint {self._fingerprint}); every rank must attach to the same model architecture with the same "
            "config (sites, salience mode, kurtosis, update_frequency, sample_every)"
        )

    def _sync_moments(self, dist: Any) -> None:
        """Exact merge of every probe's window moments across ranks (counts, means, then shifted moments)."""
        probes = [p for pair in self._probes.values() for p in pair if p is not None and p.moments is not None]
        if not probes:
            return
        moms = [p.moments for p in probes if p.moments is not None]
        ns = torch.stack([m.n.to(self._home) for m in moms])
        sums = torch.cat([(m.mean * m.n).to(self._home) for m in moms])
        flat = torch.cat([ns, sums])
        dist.all_reduce(flat)
        n_g, sum_g = flat[: len(probes)], flat[len(probes):]
        shifted: List[Tensor] = []
        means: List[Tensor] = []
        off = 0
        for i, p in enumerate(probes):
            m = p.moments
            assert m is not None
            c = m.mean.numel()
            ng = n_g[i].to(p.device)
            mg = torch.where(ng > 0, sum_g[off : off + c].to(p.device) / torch.clamp(ng, min=1), torch.zeros_like(m.mean))
            off += c
            means.append(mg)
            if p.order < 2:
                continue  # only the mean is used (kurtosis source 'output')
            # each rank's M_k about the global mean; their sum over ranks is the union's M_k
            shifted += [t.to(self._home) for t in shift_moments(m.n, m.mean, m.m2, m.m3, m.m4, mg)]
        flat2 = torch.cat(shifted) if shifted else None
        if flat2 is not None:
            dist.all_reduce(flat2)
        off = 0
        for i, p in enumerate(probes):
            m = p.moments
            assert m is not None
            if p.order < 2 or flat2 is None:
                p.moments = Moments(n_g[i].to(p.device), means[i], torch.zeros_like(m.m2), torch.zeros_like(m.m3),
                                    torch.zeros_like(m.m4))
                continue
            c = p.channels
            m2, m3, m4 = (flat2[off + j * c : off + (j + 1) * c].to(p.device) for j in range(3))
            off += 3 * c
            p.moments = Moments(n_g[i].to(p.device), means[i], m2, m3, m4)

    # ------------------------------------------------------------------ publication

    def _publish(self) -> bool:
        dist = self._dist()
        if dist is not None:
            counters = torch.stack([self._dropped.double(), self._committed.double()])
            # counters are per rank; the global totals are reported
            dist.all_reduce(counters)
            dropped_total = int(counters[0].item())
            self._sync_moments(dist)
        else:
            dropped_total = int(self._dropped.item())
        if dropped_total > self._warned_dropped:
            warnings.warn(
                f"apt_salience: {dropped_total - self._warned_dropped} micro-batch(es) with non-finite activations or "
                f"gradients were dropped from the statistics ({dropped_total} in total so far); usual under fp16 "
                "loss-scale overflow",
                SalienceWarning,
                stacklevel=3,
            )
            self._warned_dropped = dropped_total
        n_steps = float(self._win_steps.item())
        if n_steps == 0:
            logger.info("apt_salience: window ending at step %d observed nothing; no reading", self._steps)
            self._reset_window()
            return False
        self._scores = self._compute_reading(n_steps)
        self._publications += 1
        self._reset_window()
        return True

    def _reset_window(self) -> None:
        for w in self._win.values():
            w.zero_()
        self._win_steps.zero_()
        for pin, pout in self._probes.values():
            for p in (pin, pout):
                if p is not None and p.moments is not None:
                    p.moments = Moments(*(torch.zeros_like(t) for t in p.moments))

    def _block_kurtosis(self) -> Tuple[Dict[str, Tensor], Optional[Tensor], Optional[Tensor]]:
        """Per-kind block kurtosis, and for hidden: (sum over sites of sqrt K, mean over sites of K)."""
        cfg = self.config.kurtosis
        per_kind: Dict[str, List[Tensor]] = {k: [] for k in ("head", "neuron", "adapter")}
        hid_sqrt = hid_mean = None
        if self.d_model:
            hid_sqrt = torch.zeros(self.d_model, dtype=torch.float64, device=self._home)
            hid_mean = torch.zeros_like(hid_sqrt)
        n_hidden_sites = 0
        with torch.no_grad():
            for pin, pout in self._probes.values():
                site = pin.site
                if cfg.source == "activation":
                    assert pin.moments is not None
                    k_in = kurtosis_from_moments(pool_moments(pin.moments, pin.block_size), excess=cfg.excess)
                    k_out = (kurtosis_from_moments(pout.moments, excess=cfg.excess)
                             if pout is not None and pout.moments is not None else None)
                else:
                    assert pin.moments is not None
                    w = linear_weight(site.module).detach().float()
                    vals = w * pin.moments.mean.float().to(w.device)  # [out, in]: W[o, c] * mean(X_c)
                    k_in = kurtosis_from_moments(pool_moments(batch_moments(vals), pin.block_size), excess=cfg.excess)
                    k_out = kurtosis_from_moments(batch_moments(vals.t()), excess=cfg.excess) if pout is not None else None
                per_kind[site.kind].append(k_in.to(self._home))
                if k_out is not None and hid_sqrt is not None and hid_mean is not None:
                    k_out = k_out.to(self._home)
                    hid_sqrt += k_out.sqrt()
                    hid_mean += k_out
                    n_hidden_sites += 1
        if hid_mean is not None and n_hidden_sites:
            hid_mean /= n_hidden_sites
        return {k: torch.cat(v) for k, v in per_kind.items() if v}, hid_sqrt, hid_mean

    def _compute_reading(self, n_steps: float) -> SalienceScores:
        cfg = self.config
        beta = cfg.ema_beta
        kinds_k: Dict[str, Tensor] = {}
        hid_sqrt = hid_mean = None
        if cfg.kurtosis.enabled:
            kinds_k, hid_sqrt, hid_mean = self._block_kurtosis()
        site_lists: Dict[str, List[Tuple[str, int]]] = {k: [] for k in ("head", "neuron", "adapter")}
        counts: Dict[str, List[float]] = {k: [] for k in ("head", "neuron", "adapter")}
        for s in self.sites:
            site_lists[s.kind].append((s.name, s.num_blocks))
            counts[s.kind] += [s.block_param_count] * s.num_blocks
        if self.d_model:
            hidden_count = sum(s.num_blocks * s.block_param_count for s in self.sites if s.writes_hidden) / self.d_model
            counts["hidden"] = [hidden_count] * self.d_model
            site_lists["hidden"] = [("hidden", self.d_model)]
        result: Dict[str, BlockScores] = {}
        with torch.no_grad():
            for kind in self._counts:
                s_win = self._win[kind] / n_steps
                if cfg.kurtosis.enabled:
                    if kind == "hidden":
                        assert hid_sqrt is not None and hid_mean is not None
                        sqrt_k, k_info = hid_sqrt, hid_mean
                    else:
                        k_info = kinds_k[kind]
                        sqrt_k = k_info.sqrt()
                    s_hat = s_win + self._outlier_term(s_win, sqrt_k, site_lists[kind])
                else:
                    k_info = torch.zeros_like(s_win)
                    s_hat = s_win
                ema = self._ema[kind]
                ema["salience"].mul_(beta).add_((1 - beta) * s_win)
                ema["outlier_aware"].mul_(beta).add_((1 - beta) * s_hat)
                if cfg.uncertainty_beta is not None:  # AdaLoRA: U <- b2 U + (1 - b2) |I - I_bar| (updated I_bar)
                    b2 = cfg.uncertainty_beta
                    ema["uncertainty"].mul_(b2).add_((1 - b2) * (s_hat - ema["outlier_aware"]).abs())
                result[kind] = BlockScores.build(
                    salience=ema["salience"], kurtosis=k_info, outlier_aware=ema["outlier_aware"],
                    param_count=torch.tensor(counts[kind], dtype=torch.float64), sites=site_lists[kind],
                )
        meta = {
            "architecture": self.architecture,
            "config": cfg.to_dict(),
            "window_steps": n_steps,
            "layers": {s.name: s.layer for s in self.sites},
            "block_size": {s.name: s.block_size for s in self.sites},
            "fingerprint": self._fingerprint,
        }
        return SalienceScores(step=self._steps, d_model=self.d_model, meta=meta, **result)

    def _outlier_term(self, s_win: Tensor, sqrt_k: Tensor, sites: List[Tuple[str, int]]) -> Tensor:
        if self.config.kurtosis.combine == "add":
            return sqrt_k
        # scaled: the site's mean salience times the block's kurtosis relative to the site's mean
        out = torch.zeros_like(s_win)
        start = 0
        for _, n in sites:
            sl = slice(start, start + n)
            mk = sqrt_k[sl].mean()
            if float(mk) > 0:
                out[sl] = s_win[sl].mean() * sqrt_k[sl] / mk
            start += n
        return out

    def uncertainty(self) -> Dict[str, Tensor]:
        """AdaLoRA-style uncertainty ``U`` per kind (``uncertainty_beta`` set), for the score ``S_bar * U``."""
        if self.config.uncertainty_beta is None:
            raise TrackerStateError("uncertainty is off: set 'uncertainty_beta' in the config")
        return {k: v["uncertainty"].float().cpu() for k, v in self._ema.items()}

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume exactly: EMA, open window, counters, config, layout fingerprint.

        No collective is issued (safe to call on one rank only). Under torch.distributed the open
        window's statistics and the drop counters are this rank's own: save one state per rank
        and load each into the same rank (the EMA and the published scores are the same on all ranks).
        """
        self._commit()
        dist = self._dist()
        probes = {}
        for pin, pout in self._probes.values():
            for p in (pin, pout):
                if p is not None:
                    probes[p.key] = {k: v.detach().cpu().clone() for k, v in p.tensors().items()}
        return {
            "version": _STATE_VERSION,
            "fingerprint": self._fingerprint,
            "config": self.config.to_dict(),
            "steps": self._steps,
            "publications": self._publications,
            "warned_dropped": self._warned_dropped,
            "counters": {k: getattr(self, f"_{k}").detach().cpu().clone() for k in ("win_steps", "dropped", "committed", "step_seen")},
            "window": {k: v.detach().cpu().clone() for k, v in self._win.items()},
            "ema": {k: {f: t.detach().cpu().clone() for f, t in d.items()} for k, d in self._ema.items()},
            "probes": probes,
            "scores": self._scores.to_dict() if self._scores is not None else None,
            # informational: under torch.distributed the open window and the drop counters are this rank's own
            "rank": dist.get_rank() if dist is not None else 0,
            "world_size": dist.get_world_size() if dist is not None else 1,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; a different block layout is a ``TrackerStateError`` naming the mismatch."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise TrackerStateError(f"not an apt_salience tracker state (version {state.get('version') if isinstance(state, dict) else None!r})")
        if state["fingerprint"] != self._fingerprint:
            mine = [(p.key, p.channels) for pair in self._probes.values() for p in pair if p is not None]
            theirs = [(k, int(next(iter(v.values())).numel()) if v else -1) for k, v in state["probes"].items()]
            i = next((j for j, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
            if i < max(len(mine), len(theirs)):
                here = f"site '{mine[i][0]}' with {mine[i][1]} channels" if i < len(mine) else "no further site"
                there = f"site '{theirs[i][0]}' with {theirs[i][1]} channels" if i < len(theirs) else "no further site"
                detail = f"first mismatch at tracked stream #{i}: this model has {here}, the state has {there}"
            else:
                cfg_now, cfg_then = self.config.to_dict(), state.get("config") or {}
                detail = (f"the salience mode or kurtosis settings differ: this tracker has salience "
                          f"{cfg_now.get('salience')}, kurtosis {cfg_now.get('kurtosis')}; the state has salience "
                          f"{cfg_then.get('salience')}, kurtosis {cfg_then.get('kurtosis')}")
            raise TrackerStateError(f"tracker state does not fit this model's block layout ({detail}); load it into "
                                    "a tracker attached to the same architecture with the same sites and config")
        saved_cfg = state.get("config") or {}
        mine_cfg = self.config.to_dict()
        changed = sorted(k for k in set(saved_cfg) | set(mine_cfg) if saved_cfg.get(k) != mine_cfg.get(k))
        if changed:
            warnings.warn(
                "apt_salience: the loaded tracker state was saved with a different config for "
                + ", ".join(f"{k} ({saved_cfg.get(k)!r} -> {mine_cfg.get(k)!r})" for k in changed)
                + "; this tracker keeps its own config",
                SalienceWarning,
                stacklevel=2,
            )
        dist = self._dist()
        world = dist.get_world_size() if dist is not None else 1
        saved_world = int(state.get("world_size", 1))
        if saved_world != world and float(state["counters"]["win_steps"]) > 0:
            warnings.warn(
                f"apt_salience: this tracker state was saved by a run with {saved_world} process(es) and is loaded into "
                f"one with {world}: the open window's moments are per rank, so the next reading's kurtosis is approximate "
                "(the EMA, the published scores and the window's salience sums are exact). Save and resume with the "
                "same world size, or save right after a reading (then the window is empty).",
                SalienceWarning,
                stacklevel=2,
            )
        dev = self._home
        self._steps = int(state["steps"])
        self._publications = int(state["publications"])
        self._warned_dropped = int(state["warned_dropped"])
        for k in ("win_steps", "dropped", "committed", "step_seen"):
            getattr(self, f"_{k}").copy_(state["counters"][k])
        for k, v in state["window"].items():
            self._win[k].copy_(v.to(dev))
        for k, d in state["ema"].items():
            for f, t in d.items():
                if f in self._ema[k]:  # 'uncertainty' only when uncertainty_beta is set on both sides
                    self._ema[k][f].copy_(t.to(dev))
        for pin, pout in self._probes.values():
            for p in (pin, pout):
                if p is None:
                    continue
                saved = state["probes"][p.key]
                for name in ("step_a", "step_b", "step_t"):
                    cur = getattr(p, name)
                    if cur is not None:
                        cur.copy_(saved[name].to(p.device))
                if p.moments is not None:
                    p.moments = Moments(*(saved[f"mom_{f}"].to(p.device, torch.float64).clone() for f in Moments._fields))
        self._scores = SalienceScores.from_dict(state["scores"]) if state.get("scores") else None
        self._pending = []


def attach(model: nn.Module, config: ConfigLike = None, *, scaler: Any = None) -> SalienceTracker:
    """Attach a :class:`SalienceTracker` to ``model`` (config: None, a YAML path, a dict or a SalienceConfig).

    ``scaler``: the ``torch.amp.GradScaler`` of an fp16 run; its current scale is divided out of
    the gradients inside the backward hooks (the scale in force when each gradient was computed),
    so the scores do not jump when the scaler changes its scale.

    Example:
        >>> import apt_salience, torch
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=4, intermediate_size=64, vocab_size=100))
        >>> tracker = apt_salience.attach(model, {"update_frequency": 1})
        >>> out = model(input_ids=torch.randint(0, 100, (2, 7)), labels=torch.tensor([0, 1]))
        >>> out.loss.backward(); tracker.step()
        True
        >>> tracker.scores().head.salience.shape
        torch.Size([8])
        >>> tracker.detach()
    """
    return SalienceTracker(model, config, scaler=scaler)
