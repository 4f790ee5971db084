"""Hugging Face ``Trainer`` integration: :class:`SalienceCallback`.

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
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Callable, ContextManager, Dict, List, Optional, Union

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..config import ConfigLike, SalienceConfig, load_config
from ..scores import SalienceScores
from ..tracker import SalienceTracker, SalienceWarning, attach

__all__ = ["SalienceCallback", "reading_scalars", "STATE_FILE", "state_file_name"]

logger = logging.getLogger("apt_salience")

#: Name of the tracker state inside a checkpoint folder (single process).
STATE_FILE = "apt_salience_tracker.pt"


def state_file_name(rank: int = 0, world_size: int = 1) -> str:
    """File name of the tracker state in a checkpoint folder: one file per rank under torch.distributed.

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
        if not self._pending_logs or logs is None or any(str(k).startswith("eval_") for k in logs):
            return
        logs.update(self._pending_logs)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending_logs)
        self._pending_logs = {}

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
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
        self._remove_mask_hooks()
        if self.tracker is not None and self._owns_tracker:
            self.tracker.detach()

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
