"""The training loop of the command line and the demo: seeded fine-tuning and accuracy.

* :func:`finetune` ``(model, tokenizer, texts, labels, *, steps, batch_size, lr, seed, trackers=(),
  max_length=64)``: AdamW with linear warm-up and decay, seeded length-bucketed batches, a tqdm
  progress bar; every tracker in ``trackers`` sees each batch under
  ``tracker.token_mask(attention_mask)`` and its ``step()`` is called after each optimizer step.
  Returns the per-step losses.
* :func:`evaluate` ``(model, tokenizer, texts, labels) -> accuracy`` (no gradients, length-sorted
  batches, the model's train/eval mode restored).
* :func:`progress_bar`: a tqdm bar on stderr, or None without tqdm (progress is cosmetic).

Example:
    >>> progress_bar(3, "x", enabled=False) is None or True
    True
"""

from __future__ import annotations

import contextlib
import random
import sys
from typing import Any, Callable, List, Optional, Sequence

import torch
from torch import nn

__all__ = ["finetune", "evaluate", "progress_bar"]


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm progress bar on stderr (disabled unless ``enabled``), or None when tqdm is not installed.

    Args:
        total: the number of steps.
        desc: the bar's label.
        enabled: show it (a disabled bar still counts).
    """
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is cosmetic
        return None
    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=True, dynamic_ncols=True)


def finetune(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-4,
    seed: int = 0,
    trackers: Sequence[Any] = (),
    max_length: int = 64,
    warmup: float = 0.1,
    bucket: int = 16,
    progress: bool = True,
    desc: str = "fine-tune",
    on_step: Optional[Callable[[int, float], None]] = None,
) -> List[float]:
    """Fine-tune ``model`` for ``steps`` optimizer steps of ``batch_size`` seeded examples; returns the losses.

    Modifies the model in place (its weights; it is left in eval mode). AdamW (weight decay 0.01) with ``warmup`` (fraction of steps) linear warm-up, then linear
    decay to 0. Batches are drawn at random, ``bucket`` batches at a time sorted by text length
    (less padding; ``bucket=1`` turns this off); parameters with ``requires_grad=False`` are not
    trained. Every tracker in ``trackers`` observes each batch with padding masked out
    (``tracker.token_mask(attention_mask)``); ``tracker.step()`` follows each optimizer step.
    ``on_step(step, loss)`` is called after each step. Gradients are clipped to norm 1.

    Args:
        model: a sequence classifier taking the tokenizer's output and ``labels``.
        tokenizer: a Hugging Face tokenizer (called with ``padding=True, truncation=True``).
        texts: the training texts.
        labels: their class ids.
        steps: optimizer steps (0: nothing happens).
        batch_size: examples per step.
        lr: the peak learning rate.
        seed: the batch order and dropout (``torch.manual_seed``).
        trackers: objects with ``token_mask(mask)`` and ``step()`` (a tracker, a
            :class:`~apt_salience.criteria.WeightTaylor`) that observe the fine-tune.
        max_length: tokens per example.
        warmup: fraction of the steps of linear warm-up.
        bucket: batches drawn at a time and sorted by text length.
        progress: show a progress bar on stderr.
        desc: the progress bar's label.
        on_step: called as ``on_step(step, loss)`` after each optimizer step (and the trackers' ``step()``).

    Example:
        >>> from apt_salience.cli.models import load_minilm_classifier
        >>> model, tok = load_minilm_classifier()
        >>> losses = finetune(model, tok, ["good", "bad"], [2, 0], steps=1, batch_size=2, progress=False)
        >>> len(losses)
        1
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if len(texts) != len(labels) or not texts:
        raise ValueError(f"texts and labels must be non-empty and of equal length, got {len(texts)} and {len(labels)}")
    losses: List[float] = []
    if steps == 0:
        return losses
    rng = random.Random(seed)
    torch.manual_seed(seed)  # dropout
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    n_warm = max(1, int(round(warmup * steps)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / n_warm if s < n_warm else max(0.0, (steps - s) / max(1, steps - n_warm))
    )
    batches: List[List[int]] = []
    pool: List[int] = []
    model.train()
    bar = progress_bar(steps, desc, progress)
    try:
        for step in range(steps):
            if not batches:
                # length bucketing: draw `bucket` batches' worth of random examples, sort them by length,
                # cut them into batches and shuffle the batches (less padding, same examples)
                need = batch_size * max(1, bucket)
                while len(pool) < need:
                    perm = list(range(len(texts)))
                    rng.shuffle(perm)
                    pool.extend(perm)
                chunk, pool = pool[:need], pool[need:]
                if bucket > 1:
                    chunk.sort(key=lambda i: len(texts[i]))
                batches = [chunk[j : j + batch_size] for j in range(0, need, batch_size)]
                rng.shuffle(batches)
            idx = batches.pop()
            enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            y = torch.tensor([int(labels[i]) for i in idx], dtype=torch.long)
            with contextlib.ExitStack() as stack:
                for tr in trackers:
                    stack.enter_context(tr.token_mask(enc["attention_mask"]))
                out = model(**enc, labels=y)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            for tr in trackers:
                tr.step()
            loss = float(out.loss.detach())
            losses.append(loss)
            if on_step is not None:
                on_step(step, loss)
            if bar is not None:
                bar.update(1)
                if step % 10 == 0 or step == steps - 1:
                    bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    finally:
        if bar is not None:
            bar.close()
        model.eval()
    return losses


def evaluate(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], labels: Sequence[int], *,
    batch_size: int = 128, max_length: int = 64,
) -> float:
    """Accuracy of ``model`` on ``(texts, labels)``: no gradients, batches sorted by length.

    The model runs in eval mode; its train / eval mode is restored afterwards.

    Args:
        model: a sequence classifier returning ``logits``.
        tokenizer: a Hugging Face tokenizer.
        texts: the texts.
        labels: their class ids.
        batch_size: texts per forward.
        max_length: tokens per text.

    Example:
        >>> from apt_salience.cli.models import load_minilm_classifier
        >>> model, tok = load_minilm_classifier()
        >>> 0.0 <= evaluate(model, tok, ["good", "bad"], [2, 0]) <= 1.0
        True
    """
    if len(texts) != len(labels) or not texts:
        raise ValueError(f"texts and labels must be non-empty and of equal length, got {len(texts)} and {len(labels)}")
    was_training = model.training
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    correct = 0
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
                pred = model(**enc).logits.argmax(-1)
                correct += int((pred == torch.tensor([int(labels[i]) for i in idx])).sum())
    finally:
        model.train(was_training)
    return correct / len(texts)
