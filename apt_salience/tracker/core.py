"""The :class:`SalienceTracker`: composes observation, accumulation, publication and the distributed merge.

Parts (each readable alone):

* :mod:`.statistics` - what is recorded per probe (pure functions, one :class:`~.statistics.Recipe` per salience mode);
* :mod:`.observe` - the per-forward work: token masks, checkpoint re-computations, eager tensor hooks or,
  under ``torch.compile``, an identity ``autograd.Function`` that hands the sums to autograd;
* :mod:`.hooks` - the hook objects on the model and the one object that owns their handles;
* :mod:`.accumulate` - the tensor state (pending, step, window, EMA, counters) in flat per-device tensors;
* :mod:`.publish` - window -> :class:`~apt_salience.SalienceScores`;
* :mod:`.distributed` - the collectives under ``torch.distributed``.

The tracker owns their lifecycle: it finds the sites (all validation before any hook), builds the
probes, registers the hooks, closes micro-batches and steps, publishes readings, saves and loads state.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import warnings
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..architectures import Site, find_sites
from ..config import ConfigLike, SalienceConfig, load_config
from ..layout import BlockLayout
from ..scores import SalienceScores
from .accumulate import BLOCK_KINDS, Accumulator, Probe
from .distributed import DistributedSync, process_group
from .errors import SalienceWarning, TrackerStateError
from .hooks import HookSet
from .observe import Observer, _in_backward
from .publish import publish_reading
from .statistics import RECIPES

__all__ = ["SalienceTracker", "attach"]

logger = logging.getLogger("apt_salience")

_STATE_VERSION = 1
_NOT_PICKLABLE = (
    "apt_salience: a SalienceTracker cannot be pickled or copied (it holds hooks on a live model); save "
    "tracker.state_dict() and load it into a tracker attached to the model with tracker.load_state_dict(state)"
)


class SalienceTracker:
    """Streams APT salience, kurtosis and density of heads, neurons, hidden dims and adapter ranks.

    Create it with :func:`attach` (or ``SalienceTracker.attach``); call :meth:`step` once per
    optimizer step; read :meth:`scores` when ``step()`` returns True; :meth:`remove` at the end
    (``detach`` is the same; or use it as a context manager). Works the same under
    ``torch.compile`` (no graph break). A reading (:class:`~apt_salience.SalienceScores`) carries
    everything its readers need: scores, uncertainty, the block layout, the config, the unobserved sites.

    Args:
        model: the model to observe (hooks go on its site modules and on the model itself, which is
            otherwise unchanged; :meth:`remove` takes them off).
        config: None, a YAML path, a dict or a :class:`~apt_salience.SalienceConfig`.
        scaler: the ``torch.amp.GradScaler`` of an fp16 run (see :func:`attach`).

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
        self._hooks = HookSet()
        self._scores: Optional[SalienceScores] = None
        self._steps = 0
        self._publications = 0
        self._warned_dropped = 0
        self._obs = Observer(RECIPES[cfg.salience.mode], [], scaler)
        self._build(sites)
        self._register()

    # ------------------------------------------------------------------ construction

    @classmethod
    def attach(cls, model: nn.Module, config: ConfigLike = None, *, scaler: Any = None) -> "SalienceTracker":
        """Validate, find the sites and register the hooks (same as :func:`apt_salience.attach`).

        Args:
            model: the model to observe (hooks go on its site modules and on the model itself).
            config: None, a YAML path, a dict or a :class:`~apt_salience.SalienceConfig`.
            scaler: the ``torch.amp.GradScaler`` of an fp16 run (see :func:`attach`).
        """
        return cls(model, config, scaler=scaler)

    def _build(self, sites: List[Site]) -> None:
        cfg = self.config
        self.sites = sites
        self._home = sites[0].device if sites else torch.device("cpu")
        kurt = cfg.kurtosis.enabled
        in_order = (4 if cfg.kurtosis.source == "activation" else 1) if kurt else 0
        out_order = 4 if (kurt and cfg.kurtosis.source == "activation") else 0
        self._pairs: List[Tuple[Probe, Optional[Probe]]] = []
        for s in sites:
            dec = "decoder" in s.name.split(".")
            pin = Probe(s, "in", s.in_features, s.block_size, in_order, dec, s.device)
            pout = Probe(s, "out", s.out_features, 1, out_order, dec, s.device) if s.writes_hidden else None
            self._pairs.append((pin, pout))
        layout = self.layout
        self.d_model = layout.d_model
        counts = {k: layout.num_blocks(k) for k in BLOCK_KINDS if k in layout.sites}
        probes = [p for pair in self._pairs for p in pair if p is not None]
        self._acc = Accumulator(probes, RECIPES[cfg.salience.mode], counts, self._home)
        self._acc.init_ema(("salience", "outlier_aware") + (("uncertainty",) if cfg.uncertainty_beta is not None else ()))
        self._obs.devices = sorted({p.device for p in probes}, key=str)
        self._fingerprint = self._layout_fingerprint()
        summary: List[Tuple[str, int]] = [("update_frequency", cfg.update_frequency), ("sample_every", cfg.sample_every)]
        summary += [(p.key, p.channels) for p in probes]
        key = f"{self._fingerprint}|uf={cfg.update_frequency}|se={cfg.sample_every}"
        self._sync = DistributedSync(self._acc, key, summary, self._fingerprint)

    def _layout_fingerprint(self) -> str:
        text = "|".join(f"{s.name},{s.kind},{s.in_features},{s.out_features},{s.block_size}" for s in self.sites)
        text += f"|mode={self.config.salience.mode}|kurt={self.config.kurtosis.enabled},{self.config.kurtosis.source}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _register(self) -> None:
        obs = self._obs
        try:
            for i, (pin, pout) in enumerate(self._pairs):
                module = pin.site.module
                observe_in = functools.partial(obs.observe, pin)
                # the first site (in model order) closes the previous micro-batch when a new forward reaches it
                self._hooks.add_input_hook(module, functools.partial(self._first_site, observe_in) if i == 0 else observe_in)
                if pout is not None:
                    self._hooks.add_output_hook(module, functools.partial(obs.observe, pout))
        except BaseException:
            self._hooks.remove()
            raise
        obs.attached = True

    # ------------------------------------------------------------------ micro-batches

    def _first_site(self, observe: Any, t: Any) -> Optional[Tensor]:
        """A forward reached the first site: the previous micro-batch (if its backward ran) is complete."""
        obs = self._obs
        if obs.attached:
            if torch.compiler.is_compiling():
                self._acc.commit(keep_pending=True)  # in the graph: a few fused operations for all sites
            elif obs.maybe_pending and not _in_backward():
                self._commit()
        return observe(t)

    def _commit(self) -> None:
        self._acc.commit(keep_pending=self._obs.compiled_seen)
        self._obs.maybe_pending = False

    # ------------------------------------------------------------------ public API

    @property
    def model(self) -> nn.Module:
        """The model the tracker was attached to."""
        return self._model

    @property
    def layout(self) -> BlockLayout:
        """The block layout of the tracked sites, from the current module shapes (built on each call; a
        reading carries the layout it was published with as ``scores.layout``)."""
        return BlockLayout.from_sites(self.sites, self.architecture)

    @property
    def attached(self) -> bool:
        """True between attach and :meth:`remove`."""
        return self._obs.attached

    @property
    def steps(self) -> int:
        """Optimizer steps seen (calls to :meth:`step`)."""
        return self._steps

    @property
    def dropped_microbatches(self) -> int:
        """Micro-batches dropped whole because a statistic was not finite (synchronises the device)."""
        return int(self._acc.dropped.item())

    @property
    def observed_microbatches(self) -> int:
        """Micro-batches committed into the statistics (synchronises the device)."""
        return int(self._acc.committed.item())

    @contextlib.contextmanager
    def token_mask(self, mask: Tensor, decoder_mask: Optional[Tensor] = None) -> Iterator["SalienceTracker"]:
        """Exclude the tokens where ``mask`` is 0/False (padding) from the forwards inside the block.

        ``mask`` has shape ``[batch, sequence]`` (e.g. a Hugging Face ``attention_mask``). For
        encoder-decoder models (T5) ``decoder_mask`` applies to the sites under a module named
        ``decoder``; without it ``mask`` applies everywhere. A site whose tokens have another
        shape raises ``ValueError`` naming the site; a pooled ``[batch, channels]`` tensor (a
        pooler on [CLS]) has no padding and is taken whole. The mask follows each forward into
        its gradient-checkpointing re-computation, also after the block has exited.

        Args:
            mask: ``[batch, sequence]``, 0/False at padding.
            decoder_mask: the decoder's mask for encoder-decoder models.

        Example:
            >>> # with tracker.token_mask(batch["attention_mask"]):
            >>> #     loss = model(**batch).loss
        """
        prev = self._obs.set_mask(mask, decoder_mask)
        try:
            yield self
        finally:
            self._obs.mask = prev

    @contextlib.contextmanager
    def paused(self) -> Iterator["SalienceTracker"]:
        """Suspend observation inside the block (e.g. an auxiliary forward/backward)."""
        self._obs.paused += 1
        try:
            yield self
        finally:
            self._obs.paused -= 1

    def step(self) -> bool:
        """Close one optimizer step; return True when a reading was published (see :meth:`scores`)."""
        self._check_attached()
        self._hooks.clean_copies()
        self._commit()
        cfg = self.config
        dist = process_group(cfg.sync)
        if dist is not None and not (cfg.sample_every > 1 and self._steps % cfg.sample_every):
            self._sync.sync_step(dist)
        self._acc.close_step()
        self._steps += 1
        self._obs.sampling = self._steps % cfg.sample_every == 0
        self._obs.warn_unobserved()
        if self._steps % cfg.update_frequency == 0:
            return self._publish()
        return False

    def _publish(self) -> bool:
        dist = process_group(self.config.sync)
        if dist is not None:
            dropped_total, _ = self._sync.reduce_counters(dist)
            self._sync.sync_moments(dist)
        else:
            dropped_total = int(self._acc.dropped.item())
        if dropped_total > self._warned_dropped:
            warnings.warn(
                f"apt_salience: {dropped_total - self._warned_dropped} micro-batch(es) with non-finite activations or "
                f"gradients were dropped from the statistics ({dropped_total} in total so far); usual under fp16 "
                "loss-scale overflow",
                SalienceWarning,
                stacklevel=3,
            )
            self._warned_dropped = dropped_total
        n_steps = float(self._acc.win_steps.item())
        if n_steps == 0:
            logger.info("apt_salience: window ending at step %d observed nothing; no reading", self._steps)
            self._acc.reset_window()
            return False
        self._scores = publish_reading(  # the layout of the current shapes (parameter counts after pruning)
            self._acc, self.layout, self._pairs, self.config, n_steps, self._steps, fingerprint=self._fingerprint,
            unobserved_sites=self._unobserved_sites())
        self._publications += 1
        self._acc.reset_window()
        return True

    def _unobserved_sites(self) -> List[str]:
        """Sites whose input never required grad and that received no gradient in this window."""
        if not self._obs.unobserved:
            return []
        seen = self._acc.seen_in_window()
        return sorted({k.rsplit(":", 1)[0] for k in self._obs.unobserved if not seen.get(k, False)})

    def scores(self) -> SalienceScores:
        """The latest published reading; ``TrackerStateError`` before the first one."""
        if self._scores is None:
            raise TrackerStateError(
                f"no reading has been published yet: {self._steps} step(s) seen, a reading comes every "
                f"update_frequency={self.config.update_frequency} step(s) that observed at least one micro-batch "
                "(call tracker.step() once per optimizer step, after backward)"
            )
        return self._scores

    def remove(self) -> None:
        """Remove every hook (also the inert ones on deep copies of the model); safe to call twice.

        The published scores stay readable. ``detach()`` is the same.
        """
        self._hooks.remove()
        self._obs.attached = False
        self._obs.mask = self._obs.last_mask = None
        for g in self._acc.groups:
            g.clear_pending()

    detach = remove

    def refresh(self) -> None:
        """Re-read the sites and parameter counts from the current module shapes (after pruning).

        If the channel layout changed, the statistics and the EMA start again from zero.
        """
        self._check_attached()
        sites, arch = find_sites(self._model, self.config)
        old_fp = self._fingerprint
        self._hooks.remove()
        self._obs.attached = False
        if [(s.name, s.kind, s.in_features, s.out_features) for s in sites] == [
            (s.name, s.kind, s.in_features, s.out_features) for s in self.sites
        ]:
            for old, new in zip(self.sites, sites):
                old.block_param_count = new.block_param_count
                old.module = new.module
        else:
            self.architecture = arch
            self._build(sites)
            self._scores = None
            logger.info("apt_salience: layout changed on refresh (%s -> %s); statistics restarted", old_fp, self._fingerprint)
        self.architecture = arch
        self._register()

    def uncertainty(self) -> Dict[str, Tensor]:
        """AdaLoRA-style uncertainty ``U`` per kind (``uncertainty_beta`` set), for the score ``S_bar * U``.

        The latest reading's ``BlockScores.uncertainty`` (zeros before the first reading); read it
        from the reading (``scores.head.uncertainty``, ``scores.uncertainty()``) rather than from here.
        """
        if self.config.uncertainty_beta is None:
            raise TrackerStateError("uncertainty is off: set 'uncertainty_beta' in the config")
        if self._scores is not None:
            return self._scores.uncertainty()
        return {k: torch.zeros(n) for k, n in self._acc.counts.items()}

    def state_bytes(self) -> int:
        """Bytes held by the tracker's persistent tensors (independent of batch and sequence length)."""
        return self._acc.state_bytes()

    @property
    def tracked_channels(self) -> int:
        """Number of observed channels (site inputs plus head/neuron outputs)."""
        return sum(p.channels for pair in self._pairs for p in pair if p is not None)

    def __enter__(self) -> "SalienceTracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        kinds = ", ".join(f"{k}={n}" for k, n in self._acc.counts.items())
        return (f"SalienceTracker(architecture={self.architecture!r}, sites={len(self.sites)}, blocks: {kinds}, "
                f"steps={self._steps}, attached={self.attached})")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(_NOT_PICKLABLE)

    def __deepcopy__(self, memo: Dict[int, Any]) -> Any:
        raise TypeError(_NOT_PICKLABLE)

    def _check_attached(self) -> None:
        if not self.attached:
            raise TrackerStateError("the tracker is detached; attach a new one with apt_salience.attach(model, config)")

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume exactly: EMA, open window, counters, config, layout fingerprint.

        No collective is issued (safe to call on one rank only). Under torch.distributed the open
        window's statistics and the drop counters are this rank's own: save one state per rank
        and load each into the same rank (the EMA and the published scores are the same on all ranks).
        """
        self._commit()
        dist = process_group(self.config.sync)
        return {
            "version": _STATE_VERSION,
            "fingerprint": self._fingerprint,
            "config": self.config.to_dict(),
            "steps": self._steps,
            "publications": self._publications,
            "warned_dropped": self._warned_dropped,
            **self._acc.state_dict(),
            "scores": self._scores.to_dict() if self._scores is not None else None,
            # informational: under torch.distributed the open window and the drop counters are this rank's own
            "rank": dist.get_rank() if dist is not None else 0,
            "world_size": dist.get_world_size() if dist is not None else 1,
        }

    def _layout_mismatch(self, state: Dict[str, Any]) -> str:
        mine = [(p.key, p.channels) for pair in self._pairs for p in pair if p is not None]
        raw = state.get("probes")
        probes: Dict[str, Any] = raw if isinstance(raw, dict) else {}
        theirs = []
        for k, v in probes.items():
            first = next(iter(v.values()), None) if isinstance(v, dict) else None
            theirs.append((k, int(first.numel()) if isinstance(first, Tensor) else -1))
        i = next((j for j, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        if i < max(len(mine), len(theirs)):
            here = f"site '{mine[i][0]}' with {mine[i][1]} channels" if i < len(mine) else "no further site"
            there = f"site '{theirs[i][0]}' with {theirs[i][1]} channels" if i < len(theirs) else "no further site"
            return f"first mismatch at tracked stream #{i}: this model has {here}, the state has {there}"
        cfg_now, cfg_then = self.config.to_dict(), state.get("config") or {}
        return (f"the salience mode or kurtosis settings differ: this tracker has salience "
                f"{cfg_now.get('salience')}, kurtosis {cfg_now.get('kurtosis')}; the state has salience "
                f"{cfg_then.get('salience')}, kurtosis {cfg_then.get('kurtosis')}")

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`. The whole state is checked first: a missing, malformed or
        incompatible part raises ``TrackerStateError`` naming it, and the tracker is left unchanged.

        Args:
            state: what :meth:`state_dict` returned (e.g. through ``torch.save`` / ``torch.load``).
        """
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            got = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise TrackerStateError(f"not an apt_salience tracker state (version {got!r}; this library reads "
                                    f"version {_STATE_VERSION})")
        missing = [k for k in ("fingerprint", "steps", "publications", "warned_dropped") if k not in state]
        if missing:
            raise TrackerStateError(f"tracker state is incomplete or malformed: {', '.join(repr(k) for k in missing)} "
                                    "missing")
        if state["fingerprint"] != self._fingerprint:
            raise TrackerStateError(f"tracker state does not fit this model's block layout ({self._layout_mismatch(state)}); "
                                    "load it into a tracker attached to the same architecture with the same sites and config")
        problems = self._acc.check_state(state)
        for k in ("steps", "publications", "warned_dropped"):
            if isinstance(state[k], bool) or not isinstance(state[k], int) or state[k] < 0:
                problems.append(f"'{k}' must be an integer >= 0, got {state[k]!r}")
        scores = None
        if state.get("scores") is not None:
            try:
                scores = SalienceScores.from_dict(state["scores"])
            except (KeyError, TypeError, ValueError) as exc:
                problems.append(f"'scores' is not a valid reading ({type(exc).__name__}: {exc})")
        if problems:
            raise TrackerStateError("tracker state is incomplete or malformed: " + "; ".join(problems[:5])
                                    + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
        saved_cfg = state.get("config") or {}
        mine_cfg = self.config.to_dict()
        # the pruning section configures the pruner, not the tracker's statistics
        changed = sorted(k for k in set(saved_cfg) | set(mine_cfg)
                         if k != "pruning" and saved_cfg.get(k) != mine_cfg.get(k))
        if changed:
            warnings.warn(
                "apt_salience: the loaded tracker state was saved with a different config for "
                + ", ".join(f"{k} ({saved_cfg.get(k)!r} -> {mine_cfg.get(k)!r})" for k in changed)
                + "; this tracker keeps its own config",
                SalienceWarning,
                stacklevel=2,
            )
        dist = process_group(self.config.sync)
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
        self._acc.load_state_dict(state)
        self._steps = int(state["steps"])
        self._publications = int(state["publications"])
        self._warned_dropped = int(state["warned_dropped"])
        self._obs.sampling = self._steps % self.config.sample_every == 0
        self._scores = scores


def attach(model: nn.Module, config: ConfigLike = None, *, scaler: Any = None) -> SalienceTracker:
    """Attach a :class:`SalienceTracker` to ``model`` (config: None, a YAML path, a dict or a SalienceConfig).

    Modifies the model in place only by registering hooks on it (its outputs are unchanged);
    ``tracker.remove()`` takes every one of them off.

    Args:
        model: the model to observe (hooks are added to its site modules and to the model itself).
        config: None (defaults), a path to a YAML file, a dict, or a :class:`~apt_salience.SalienceConfig`.
        scaler: the ``torch.amp.GradScaler`` of an fp16 run; its scale is divided out of the
            gradients inside the backward pass (the scale in force when each gradient was computed),
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
        >>> tracker.remove()
    """
    return SalienceTracker(model, config, scaler=scaler)
