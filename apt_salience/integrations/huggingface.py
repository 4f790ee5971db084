"""Hugging Face ``Trainer`` integration: :class:`SalienceCallback` and :class:`AdaptivePruningCallback`.

Importing this module imports ``transformers``; ``import apt_salience`` does not.

What the callback does, event by event:

* ``on_train_begin``: attaches a tracker to the Trainer's (unwrapped) model unless one was
  given, and, when the run resumes from a checkpoint, loads the tracker state saved there.
* ``on_step_end`` (once per optimizer step, so after all ``gradient_accumulation_steps``
  micro-batches): ``tracker.step()``. When a reading is published it asks the Trainer to log
  at this step and adds a few scalars to that log entry (see :func:`reading_scalars`).
* ``on_save``: writes the tracker state into the checkpoint folder
  (``apt_salience_tracker.pt``; ``apt_salience_tracker_rank{R}.pt`` per rank under
  torch.distributed).
* ``on_train_end``: detaches a tracker the callback attached itself (its last reading stays
  readable through ``callback.tracker.scores()``).
* With ``mask_padding=True``, a forward pre-hook on the model wraps every training forward in
  ``tracker.token_mask(attention_mask, decoder_attention_mask)`` (padding tokens excluded).

:class:`AdaptivePruningCallback` is a :class:`SalienceCallback` that also runs an
:class:`~apt_salience.AdaptivePruner` (and, with ``tune_ranks=True``, an
:class:`~apt_salience.AdaptiveTuner`) after each ``tracker.step()``, saves their state in every
checkpoint, finalizes at the end of training and writes the pruned model to ``<output_dir>/pruned``.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Callable, ContextManager, Dict, List, Mapping, Optional, Union

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..config import ConfigLike, PruningConfig, SalienceConfig, load_config, pruning_config
from ..pruner import RECOMMENDED_CONFIG, AdaptivePruner, auto_ramp_steps, plain_model
from ..scores import SalienceScores
from ..tracker import SalienceTracker, SalienceWarning, attach
from ..tuning import AdaptiveTuner

__all__ = ["SalienceCallback", "AdaptivePruningCallback", "reading_scalars", "STATE_FILE", "PRUNER_STATE_FILE",
           "state_file_name"]

logger = logging.getLogger("apt_salience")

#: Name of the tracker state inside a checkpoint folder (single process).
STATE_FILE = "apt_salience_tracker.pt"

#: Name of the pruner (and tuner) state inside a checkpoint folder (the same on every rank; written by rank 0).
PRUNER_STATE_FILE = "apt_salience_pruner.pt"


def state_file_name(rank: int = 0, world_size: int = 1) -> str:
    """File name of the tracker state in a checkpoint folder: one file per rank under torch.distributed.

    Args:
        rank: this process's rank.
        world_size: the number of processes.

    Example:
        >>> state_file_name(), state_file_name(1, 4)
        ('apt_salience_tracker.pt', 'apt_salience_tracker_rank1.pt')
    """
    if world_size <= 1:
        return STATE_FILE
    return f"apt_salience_tracker_rank{rank}.pt"


def _rank_world() -> "tuple[int, int]":
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def reading_scalars(scores: SalienceScores, *, prefix: str = "salience/", near_zero: float = 1e-3) -> Dict[str, float]:
    """A few scalars that summarise one reading, for a training log.

    For each block kind present (``head``, ``neuron``, ``hidden``, ``adapter``):
    ``{prefix}{kind}/mean_outlier_aware`` (mean outlier-aware salience), ``{prefix}{kind}/mean_salience``
    and ``{prefix}{kind}/near_zero_share`` (the share of blocks whose salience is at most
    ``near_zero`` times the kind's mean salience: candidates for pruning).

    Args:
        scores: a tracker reading.
        prefix: prepended to every key.
        near_zero: the share's threshold, relative to the kind's mean salience (>= 0).

    Example:
        >>> import torch
        >>> from apt_salience.scores import BlockScores, SalienceScores
        >>> b = BlockScores.build(salience=torch.tensor([0.0, 1.0, 3.0]), kurtosis=torch.zeros(3),
        ...                       outlier_aware=torch.tensor([1.0, 2.0, 3.0]), param_count=torch.ones(3),
        ...                       sites=[("l.0.o", 3)])
        >>> reading_scalars(SalienceScores(step=1, head=b))
        {'salience/head/mean_outlier_aware': 2.0, 'salience/head/mean_salience': 1.3333333730697632, 'salience/head/near_zero_share': 0.3333333432674408}
    """
    if not isinstance(scores, SalienceScores):
        raise TypeError(f"scores must be a SalienceScores, got {type(scores).__name__}")
    if not (isinstance(near_zero, (int, float)) and near_zero >= 0):
        raise ValueError(f"near_zero must be a number >= 0, got {near_zero!r}")
    out: Dict[str, float] = {}
    for kind, blocks in scores.kinds().items():
        if len(blocks) == 0:
            continue
        sal = blocks.salience.double()
        mean = float(sal.mean())
        out[f"{prefix}{kind}/mean_outlier_aware"] = float(blocks.outlier_aware.mean())
        out[f"{prefix}{kind}/mean_salience"] = float(blocks.salience.mean())
        out[f"{prefix}{kind}/near_zero_share"] = float((sal <= near_zero * mean).float().mean())
    return out


class SalienceCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that runs a :class:`~apt_salience.SalienceTracker` in a Trainer.

    Args:
        config: tracker config (None, a YAML path, a dict or a SalienceConfig), used when the
            callback attaches the tracker itself at ``on_train_begin``.
        tracker: an already attached tracker to drive instead (then ``config`` must be None).
        log_prefix: prefix of the logged scalar names (default ``"salience/"``).
        log_every_reading: request a Trainer log at every step that publishes a reading
            (default True); otherwise the latest reading's scalars join the next regular log.
        near_zero: threshold of the ``near_zero_share`` scalar, relative to the kind's mean salience.
        resume_from: a checkpoint folder to load the tracker state from at ``on_train_begin``;
            by default the callback looks in ``args.resume_from_checkpoint`` (a folder) and then
            in ``<output_dir>/checkpoint-<global_step>`` when the Trainer resumed.
        on_reading: optional ``fn(scores, global_step)`` called with every published reading
            (e.g. a pruner or an adapter-rank allocator).
        mask_padding: exclude padding tokens: every training forward of the model runs inside
            ``tracker.token_mask(attention_mask, decoder_attention_mask)`` taken from the forward's
            keyword arguments (default False). An encoder-decoder forward without a
            ``decoder_attention_mask`` is left unmasked (with one warning).

    The scalars are added to the Trainer's log entry (``trainer.state.log_history``) in
    ``on_log``; reporting integrations that run before this callback (tensorboard, wandb) see
    them only if the callback is placed before them, e.g.
    ``trainer.callback_handler.callbacks.insert(1, callback)`` instead of ``callbacks=[...]``.

    Example:
        >>> import contextlib, io, tempfile, torch
        >>> from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
        >>> from apt_salience.integrations.huggingface import SalienceCallback
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=4, intermediate_size=64, vocab_size=100))
        >>> data = [{"input_ids": torch.randint(0, 100, (8,)), "labels": torch.tensor(i % 2)} for i in range(8)]
        >>> callback = SalienceCallback({"update_frequency": 2})
        >>> args = TrainingArguments(tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=2,
        ...     gradient_accumulation_steps=2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
        >>> trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
        >>> with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints its logs
        ...     _ = trainer.train()
        >>> sorted(k for k in trainer.state.log_history[0] if k.startswith("salience/head"))
        ['salience/head/mean_outlier_aware', 'salience/head/mean_salience', 'salience/head/near_zero_share']
        >>> callback.tracker.scores().step, len(callback.tracker.scores().head.salience)
        (2, 8)
    """

    def __init__(
        self,
        config: ConfigLike = None,
        *,
        tracker: Optional[SalienceTracker] = None,
        log_prefix: str = "salience/",
        log_every_reading: bool = True,
        near_zero: float = 1e-3,
        resume_from: Optional[Union[str, "os.PathLike[str]"]] = None,
        on_reading: Optional[Callable[[SalienceScores, int], None]] = None,
        mask_padding: bool = False,
    ) -> None:
        if tracker is not None and not isinstance(tracker, SalienceTracker):
            raise TypeError(f"tracker must be a SalienceTracker (or None), got {type(tracker).__name__}")
        if tracker is not None and config is not None:
            raise ValueError("pass either config (the callback attaches a tracker) or tracker (already attached), "
                             "not both")
        if not isinstance(log_prefix, str):
            raise TypeError(f"log_prefix must be a str, got {type(log_prefix).__name__}")
        if not (isinstance(near_zero, (int, float)) and near_zero >= 0):
            raise ValueError(f"near_zero must be a number >= 0, got {near_zero!r}")
        if on_reading is not None and not callable(on_reading):
            raise TypeError(f"on_reading must be callable, got {type(on_reading).__name__}")
        # validate the config now, not at on_train_begin
        self.config: Optional[SalienceConfig] = load_config(config) if tracker is None else None
        self.tracker: Optional[SalienceTracker] = tracker
        self._owns_tracker = tracker is None
        self.log_prefix = log_prefix
        self.log_every_reading = bool(log_every_reading)
        self.near_zero = float(near_zero)
        self.resume_from = os.fspath(resume_from) if resume_from is not None else None
        self.on_reading = on_reading
        self.mask_padding = bool(mask_padding)
        self._mask_hooks: List[Any] = []
        self._mask_stack: List[Optional[ContextManager[Any]]] = []
        self._warned_decoder = False
        self._pending_logs: Dict[str, float] = {}
        #: the checkpoint folder the tracker state was loaded from at the last on_train_begin (or None)
        self.loaded_from: Optional[str] = None

    # ------------------------------------------------------------------ events

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Optional[torch.nn.Module] = None, **kwargs: Any) -> None:
        """Attach the tracker (unless one was given), add the padding-mask hooks, resume a checkpoint's tracker state.

        Args:
            args, state, control: the Trainer's (the ``transformers.TrainerCallback`` protocol).
            model: the Trainer's model.
            **kwargs: the Trainer's other callback arguments.
        """
        if self.tracker is None or (self._owns_tracker and not self.tracker.attached):
            if model is None:
                raise ValueError("SalienceCallback needs the Trainer's model at on_train_begin (got model=None); "
                                 "or pass an attached tracker: SalienceCallback(tracker=apt_salience.attach(model))")
            self.tracker = attach(model, self.config)
            self._owns_tracker = True
        elif not self.tracker.attached:
            raise ValueError("the tracker given to SalienceCallback is detached; attach a new one with "
                             "apt_salience.attach(model, config)")
        self._pending_logs = {}
        self.loaded_from = None
        self._remove_mask_hooks()
        if self.mask_padding:
            target = model if model is not None else self.tracker.model
            if target is None:
                raise ValueError("SalienceCallback(mask_padding=True) needs the Trainer's model at on_train_begin")
            self._install_mask_hooks(target)
        folder = self._resume_folder(args, state)
        if folder is not None:
            self._load(folder, state)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> TrainerControl:
        """``tracker.step()`` once per optimizer step; a published reading is logged at the next log.

        Args:
            args, state, control: the Trainer's (the ``transformers.TrainerCallback`` protocol).
            **kwargs: the Trainer's other callback arguments.
        """
        tracker = self._tracker()
        if tracker.step():
            scores = tracker.scores()
            self._pending_logs = reading_scalars(scores, prefix=self.log_prefix, near_zero=self.near_zero)
            if self.log_every_reading:
                control.should_log = True
            if self.on_reading is not None:
                self.on_reading(scores, state.global_step)
        return control

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: Optional[Dict[str, float]] = None, **kwargs: Any) -> None:
        """Add the latest reading's scalars (:func:`reading_scalars`) to the Trainer's log entry.

        Args:
            args, state, control: the Trainer's (the ``transformers.TrainerCallback`` protocol).
            logs: the log entry being written.
            **kwargs: the Trainer's other callback arguments.
        """
        if not self._pending_logs or logs is None or any(str(k).startswith("eval_") for k in logs):
            return
        logs.update(self._pending_logs)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending_logs)
        self._pending_logs = {}

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        """Write the tracker state into the checkpoint folder (one file per rank).

        Args:
            args, state, control: the Trainer's (the ``transformers.TrainerCallback`` protocol).
            **kwargs: the Trainer's other callback arguments.
        """
        tracker = self._tracker()
        folder = os.path.join(args.output_dir or ".", f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        rank, world = _rank_world()
        path = os.path.join(folder, state_file_name(rank, world))
        tmp = path + ".tmp"
        torch.save(tracker.state_dict(), tmp)
        os.replace(tmp, path)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        """Take the callback's hooks off (and those of a tracker it attached itself).

        Args:
            args, state, control: the Trainer's (the ``transformers.TrainerCallback`` protocol).
            **kwargs: the Trainer's other callback arguments.
        """
        SalienceCallback.remove(self)  # a subclass's remove() may take more off (the pruner's masks) than ends here

    def remove(self) -> None:
        """Take the callback's hooks off the model: its padding-mask hooks, and the hooks of a tracker it
        attached itself (a tracker passed in stays attached). Safe to call twice; ``on_train_end`` calls it,
        so call it yourself only when training stops without it (an exception in ``trainer.train()``)."""
        self._remove_mask_hooks()
        if self.tracker is not None and self._owns_tracker:
            self.tracker.remove()

    # ------------------------------------------------------------------ helpers

    def _install_mask_hooks(self, model: torch.nn.Module) -> None:
        tracker = self._tracker()

        def pre(module: torch.nn.Module, args: Any, kwargs: Dict[str, Any]) -> None:
            ctx: Optional[ContextManager[Any]] = None
            mask = kwargs.get("attention_mask")
            dec = kwargs.get("decoder_attention_mask")
            if torch.is_grad_enabled() and isinstance(mask, torch.Tensor) and mask.dim() == 2:
                cfg = getattr(module, "config", None)
                if getattr(cfg, "is_encoder_decoder", False) and not isinstance(dec, torch.Tensor):
                    if not self._warned_decoder:
                        self._warned_decoder = True
                        warnings.warn("apt_salience: mask_padding: this encoder-decoder forward has no "
                                      "decoder_attention_mask, so it is not masked; pass one in the batch",
                                      SalienceWarning, stacklevel=2)
                else:
                    ctx = tracker.token_mask(mask, dec if isinstance(dec, torch.Tensor) else None)
                    ctx.__enter__()
            self._mask_stack.append(ctx)

        def post(module: torch.nn.Module, args: Any, kwargs: Dict[str, Any], output: Any) -> None:
            if self._mask_stack:
                ctx = self._mask_stack.pop()
                if ctx is not None:
                    ctx.__exit__(None, None, None)

        self._mask_hooks = [
            model.register_forward_pre_hook(pre, with_kwargs=True),
            model.register_forward_hook(post, with_kwargs=True, always_call=True),
        ]

    def _remove_mask_hooks(self) -> None:
        while self._mask_hooks:
            self._mask_hooks.pop().remove()
        self._mask_stack = []

    def _tracker(self) -> SalienceTracker:
        if self.tracker is None:
            raise ValueError("SalienceCallback has no tracker yet: it attaches one at on_train_begin")
        return self.tracker

    def _resume_folder(self, args: TrainingArguments, state: TrainerState) -> Optional[str]:
        rank, world = _rank_world()
        name = state_file_name(rank, world)
        candidates = []
        if self.resume_from is not None:
            if not os.path.isfile(os.path.join(self.resume_from, name)):
                raise FileNotFoundError(f"SalienceCallback(resume_from={self.resume_from!r}): no {name} in that folder")
            return self.resume_from
        rfc = getattr(args, "resume_from_checkpoint", None)
        if isinstance(rfc, str) and os.path.isdir(rfc):
            candidates.append(rfc)
        if state.global_step > 0:
            candidates.append(os.path.join(args.output_dir or ".", f"checkpoint-{state.global_step}"))
        for c in candidates:
            if os.path.isfile(os.path.join(c, name)):
                return c
        if state.global_step > 0:
            warnings.warn(
                f"apt_salience: the Trainer resumed at step {state.global_step} but no tracker state ({name}) was found "
                f"in {candidates}; the salience statistics start from zero. Pass "
                "SalienceCallback(resume_from=<checkpoint folder>) to load it from elsewhere.",
                SalienceWarning,
                stacklevel=2,
            )
        return None

    def _load(self, folder: str, state: TrainerState) -> None:
        tracker = self._tracker()
        rank, world = _rank_world()
        path = os.path.join(folder, state_file_name(rank, world))
        saved = torch.load(path, map_location="cpu", weights_only=True)
        tracker.load_state_dict(saved)
        self.loaded_from = folder
        if tracker.steps != state.global_step:
            logger.info("apt_salience: tracker state from %s has %d steps; the Trainer is at step %d",
                        path, tracker.steps, state.global_step)


class AdaptivePruningCallback(SalienceCallback):
    """Prune during fine-tuning with APT's schedule (and grow LoRA ranks) inside ``trainer.train()``.

    A :class:`SalienceCallback` (the tracker's step, logs and checkpoint state are its) that, after
    every ``tracker.step()``, steps an :class:`~apt_salience.AdaptivePruner` and, with
    ``tune_ranks=True``, an :class:`~apt_salience.AdaptiveTuner` on the Trainer's optimizer. At each
    reading the log entry also gets ``pruning/budget`` (the scheduled kept share ``gamma_t``),
    ``pruning/kept_share`` (the share the latest selection keeps) and ``pruning/alive_share``
    (masks above 0), plus ``tuning/lora_parameters`` when tuning. Every checkpoint folder gets
    ``apt_salience_pruner.pt`` (masks, schedule, tuner ranks); a resumed run continues with them.
    ``on_train_end`` finalizes (hard masks, physical pruning; a PEFT model's adapters are merged
    first) and, on the main process, writes the pruned model with
    :func:`~apt_salience.save_pruned` to ``<output_dir>/<save_to>`` (read it with
    :func:`~apt_salience.load_pruned`), the tokenizer beside it. Modifies the Trainer's model in place.

    Args:
        keep_ratio, start_step, ramp_steps, alpha: the schedule (see :class:`~apt_salience.AdaptivePruner`);
            None takes the config's ``pruning:`` section. ``ramp_steps`` None there too: derived from the
            Trainer's ``max_steps`` (:func:`~apt_salience.pruner.auto_ramp_steps`).
        config: the tracker config and its ``pruning:`` section (None, a YAML path, a dict, a
            SalienceConfig). None: the setting recommended for pruning
            (:data:`~apt_salience.RECOMMENDED_CONFIG`, fisher salience + scaled kurtosis) with the
            default ``pruning:`` section.
        tune_ranks: also grow LoRA ranks (a PEFT LoRA model) over the pruning ramp.
        tuner_options: keyword arguments of :class:`~apt_salience.AdaptiveTuner` (``budget``,
            ``num_growths``, ``fraction``, ...); its ``start_step`` / ``ramp_steps`` default to the pruner's.
        save_to: folder under ``output_dir`` for the pruned model; None: not saved.
        **kwargs: the other :class:`SalienceCallback` options (``mask_padding``, ``log_prefix``, ...).

    Resuming with ``tune_ranks=True``: the Trainer loads the checkpoint's weights before any
    callback runs, so grow the model to the saved ranks first with
    ``AdaptivePruningCallback.restore_ranks(model, checkpoint_folder)``.

    Example:
        >>> import contextlib, io, tempfile, torch
        >>> from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
        >>> from apt_salience.integrations.huggingface import AdaptivePruningCallback
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=4, intermediate_size=64, vocab_size=100))
        >>> data = [{"input_ids": torch.randint(0, 100, (8,)), "labels": torch.tensor(i % 2)} for i in range(8)]
        >>> out = tempfile.mkdtemp()
        >>> callback = AdaptivePruningCallback(keep_ratio=0.5, ramp_steps=2, alpha=0.5)
        >>> args = TrainingArguments(out, max_steps=4, per_device_train_batch_size=2, report_to=[],
        ...     save_strategy="no", use_cpu=True, disable_tqdm=True)
        >>> trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
        >>> with contextlib.redirect_stdout(io.StringIO()):
        ...     _ = trainer.train()
        >>> callback.report.params_after < callback.report.params_before
        True
        >>> import os; os.path.isfile(os.path.join(out, "pruned", "apt_pruning.json"))
        True
    """

    def __init__(
        self,
        keep_ratio: Optional[float] = None,
        *,
        start_step: Optional[int] = None,
        ramp_steps: Optional[int] = None,
        alpha: Optional[float] = None,
        config: ConfigLike = None,
        tune_ranks: bool = False,
        tuner_options: Optional[Mapping[str, Any]] = None,
        save_to: Optional[str] = "pruned",
        **kwargs: Any,
    ) -> None:
        if "tracker" in kwargs:
            raise TypeError("AdaptivePruningCallback attaches its own tracker; pass config= instead of tracker=")
        cfg = load_config(config if config is not None else RECOMMENDED_CONFIG)
        super().__init__(cfg, **kwargs)
        # validate the overrides now, not at on_train_begin
        self.pruning: PruningConfig = pruning_config(cfg.pruning, keep_ratio=keep_ratio, start_step=start_step,
                                                     ramp_steps=ramp_steps, alpha=alpha)
        self.tune_ranks = bool(tune_ranks)
        self.tuner_options: Dict[str, Any] = dict(tuner_options or {})
        bad = sorted(set(self.tuner_options) - {"budget", "num_growths", "growth_steps", "fraction", "score",
                                                "adapter_name", "init_std", "seed", "start_step", "ramp_steps"})
        if bad:
            raise TypeError(f"unknown tuner_options {bad}; see apt_salience.AdaptiveTuner")
        if save_to is not None and (not isinstance(save_to, str) or not save_to):
            raise ValueError(f"save_to must be a folder name under output_dir or None, got {save_to!r}")
        self.save_to = save_to
        self.pruner: Optional[AdaptivePruner] = None
        self.tuner: Optional[AdaptiveTuner] = None
        #: the PruneReport of the last finalize (None before)
        self.report: Optional[Any] = None
        #: where the pruned model was written (None before, or when not saved)
        self.saved_to: Optional[str] = None

    @staticmethod
    def restore_ranks(model: torch.nn.Module, checkpoint: Union[str, "os.PathLike[str]"]) -> Dict[str, int]:
        """Grow ``model``'s LoRA layers to the ranks saved in a checkpoint (before ``trainer.train(resume_from_checkpoint=...)``).

        Args:
            model: the freshly built PEFT LoRA model.
            checkpoint: a checkpoint folder written with ``tune_ranks=True``.

        Returns the restored ``{layer: rank}`` (empty when the checkpoint has no tuner state). Modifies
        the model in place (the new weights are placeholders until the Trainer loads the checkpoint).
        """
        from ..tuning import grow_lora_rank, lora_ranks

        path = os.path.join(os.fspath(checkpoint), PRUNER_STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {PRUNER_STATE_FILE} in '{os.fspath(checkpoint)}'")
        saved = torch.load(path, map_location="cpu", weights_only=True).get("tuner")
        if not saved:
            return {}
        ranks = {str(k): int(v) for k, v in saved["ranks"].items()}
        adapter = str(saved.get("adapter_name", "default"))
        modules = dict(model.named_modules())
        now = lora_ranks(model, adapter)
        for name, r in ranks.items():
            if name not in modules or name not in now:
                raise ValueError(f"the checkpoint's tuner state names LoRA layer '{name}', which this model lacks")
            if r > now[name]:
                grow_lora_rank(modules[name], r, adapter_name=adapter, std=0.0)
        return ranks

    # ------------------------------------------------------------------ events

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Optional[torch.nn.Module] = None, **kwargs: Any) -> None:
        """Build the pruner (and the tuner), resuming their state from a checkpoint.

        Args:
            args, state, control: the Trainer's (the ``transformers.TrainerCallback`` protocol).
            model: the Trainer's model.
            **kwargs: the Trainer's other callback arguments.
        """
        super().on_train_begin(args, state, control, model=model, **kwargs)
        tracker = self._tracker()
        target = tracker.model
        p = self.pruning
        ramp = p.ramp_steps
        if ramp is None:
            total = int(state.max_steps or 0)
            if total <= 0:
                raise ValueError("AdaptivePruningCallback: ramp_steps is not set and the Trainer has no max_steps; "
                                 "pass ramp_steps=")
            uf = tracker.config.update_frequency if isinstance(tracker.config, SalienceConfig) else 1
            ramp = auto_ramp_steps(total, p.start_step, p.alpha, uf)
        self.pruner = AdaptivePruner(target, tracker, p.keep_ratio, start_step=p.start_step, ramp_steps=ramp,
                                     alpha=p.alpha, kinds=p.kinds, score=p.score, allocation=p.allocation,
                                     calibration=p.calibration, min_per_site=p.min_per_site)
        self.tuner = None
        if self.tune_ranks:
            optimizer = kwargs.get("optimizer")
            if optimizer is None:
                raise ValueError("AdaptivePruningCallback(tune_ranks=True) needs the Trainer's optimizer at "
                                 "on_train_begin")
            opts = {"start_step": p.start_step, "ramp_steps": ramp, **self.tuner_options}
            self.tuner = AdaptiveTuner(target, tracker, optimizer, **opts)
        self.report = None
        folder = self.loaded_from
        path = os.path.join(folder, PRUNER_STATE_FILE) if folder is not None else None
        if path is not None and os.path.isfile(path):
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if self.tuner is not None and saved.get("tuner"):
                self.tuner.load_state_dict(saved["tuner"])
            self.pruner.load_state_dict(saved["pruner"])
        elif state.global_step > 0:
            warnings.warn(f"apt_salience: the Trainer resumed at step {state.global_step} but no pruner state "
                          f"({PRUNER_STATE_FILE}) was found; the pruning schedule starts again from step 0",
                          SalienceWarning, stacklevel=2)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> TrainerControl:
        """Step the tracker, then the pruner (and the tuner); log the schedule at a mask update.

        Args:
            args, state, control: the Trainer's (the ``transformers.TrainerCallback`` protocol).
            **kwargs: the Trainer's other callback arguments.
        """
        control = super().on_step_end(args, state, control, **kwargs)
        pruner = self._pruner()
        updated = pruner.step()
        if self.tuner is not None:
            self.tuner.step()
        if updated:
            self._pending_logs.update({
                "pruning/budget": pruner.current_keep_ratio,
                "pruning/kept_share": pruner.kept_share,
                "pruning/alive_share": pruner.alive_share,
            })
            if self.tuner is not None:
                self._pending_logs["tuning/lora_parameters"] = float(self.tuner.lora_parameters)
        return control

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        """Write the tracker state, and on the main process the pruner (and tuner) state.

        Args:
            args, state, control: the Trainer's (the ``transformers.TrainerCallback`` protocol).
            **kwargs: the Trainer's other callback arguments.
        """
        super().on_save(args, state, control, **kwargs)
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir or ".", f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        blob: Dict[str, Any] = {"pruner": self._pruner().state_dict()}
        if self.tuner is not None:
            blob["tuner"] = {**self.tuner.state_dict(), "adapter_name": self.tuner.adapter_name}
        path = os.path.join(folder, PRUNER_STATE_FILE)
        torch.save(blob, path + ".tmp")
        os.replace(path + ".tmp", path)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        """Finalize (hard masks, physical pruning: modifies the model in place) and save the pruned model.

        Args:
            args, state, control: the Trainer's (the ``transformers.TrainerCallback`` protocol).
            **kwargs: the Trainer's other callback arguments.
        """
        try:
            pruner = self._pruner()
            if not pruner.finalized:
                self.report = pruner.finalize()
                logger.info("apt_salience: pruned %d heads and %d neurons (%d -> %d parameters)",
                            self.report.heads_removed, self.report.neurons_removed, self.report.params_before,
                            self.report.params_after)
            if self.save_to is not None and state.is_world_process_zero:
                from ..pruning import save_pruned

                folder = os.path.join(args.output_dir or ".", self.save_to)
                save_pruned(plain_model(self.tracker.model if self.tracker is not None else pruner.model), folder)
                tok = kwargs.get("processing_class")
                if tok is not None and callable(getattr(tok, "save_pretrained", None)):
                    tok.save_pretrained(folder)
                self.saved_to = folder
        finally:
            super().on_train_end(args, state, control, **kwargs)

    def remove(self) -> None:
        """Take every hook the callback added off the model (the pruner's masks too, when it did not
        finalize: the model is then the unpruned one); safe to call twice. ``on_train_end`` finalizes first."""
        if self.pruner is not None and not self.pruner.finalized:
            self.pruner.remove()
        super().remove()

    def _pruner(self) -> AdaptivePruner:
        if self.pruner is None:
            raise ValueError("AdaptivePruningCallback has no pruner yet: it builds one at on_train_begin")
        return self.pruner
