"""The ``profile`` and ``prune`` commands: the tracker and the pruner on a local model and the user's data.

* :func:`profile` runs N forward/backward steps of a local Hugging Face model on a CSV / JSONL /
  text file with the tracker attached and writes the scores and the report
  (:func:`apt_salience.cli.report.render_report`).
* :func:`prune` fine-tunes a local classifier with the adaptive pruner (or, with ``steps=0``,
  profiles briefly and prunes retraining-free), evaluates on a held-out split before and after, and
  writes the pruned model (``apt_salience.load_pruned(out)``), ``report.md`` and the density figure.

Both raise :class:`~apt_salience.cli.errors.CliError` for bad input before anything is written.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from .._version import __version__
from ..config import load_config, pruning_config
from ..pruner import RECOMMENDED_CONFIG, AdaptivePruner, auto_ramp_steps, plain_model
from ..pruning import count_parameters, save_pruned
from ..tracker import attach
from .data import read_examples
from .errors import CliError, one_line
from .models import load_model, quiet_transformers
from .report import ReportDependencyError, density_figure, render_report
from .train import evaluate, finetune, progress_bar

__all__ = ["profile", "prune"]

logger = logging.getLogger("apt_salience")


def profile(
    model_dir: "str | Path",
    data: "str | Path",
    out: "str | Path",
    *,
    task: str = "classification",
    text_column: str = "text",
    label_column: str = "label",
    steps: int = 20,
    batch_size: int = 8,
    max_length: int = 128,
    config: Optional[str] = None,
    train: bool = False,
    lr: float = 2e-5,
    seed: int = 0,
    budget: float = 0.5,
    progress: bool = True,
) -> Dict[str, Any]:
    """Run ``steps`` forward/backward steps with the tracker attached; write scores and the report into ``out``.

    Without ``train`` the weights are frozen (no weight gradient is computed: the tracker needs only
    activation gradients) and the model runs in eval mode; with ``train`` it is fine-tuned with AdamW.
    The model folder is only read. Errors are :class:`CliError`, raised before anything is written.

    Args:
        model_dir: a local Hugging Face folder (model and tokenizer).
        data: a CSV / TSV / JSONL / JSON file (or, for ``causal-lm``, a text file; see
            :func:`~apt_salience.cli.data.read_examples`).
        out: the folder for ``scores.json``, ``profile.json``, the figures and ``summary.md``.
        task: ``"classification"`` or ``"causal-lm"``.
        text_column, label_column: the columns.
        steps: forward/backward steps (one batch each).
        batch_size, max_length: examples per step, tokens per example.
        config: a tracker ``config.yaml`` (None: the defaults).
        train: also take AdamW optimizer steps at learning rate ``lr``.
        lr: the learning rate with ``train``.
        seed: the batch order and ``torch.manual_seed``.
        budget: the share of head + FFN parameters of the cut drawn on the density ranking.
        progress: a tqdm progress bar on stderr.

    Returns:
        The summary (also written as ``out/profile.json``): settings, losses, seconds, the
        architecture and ``{name: path}`` of the files written.
    """
    if task not in ("classification", "causal-lm"):
        raise CliError(f"--task must be classification or causal-lm, got {task!r}")
    for name, value in (("--steps", steps), ("--batch-size", batch_size), ("--max-length", max_length)):
        if value < 1:
            raise CliError(f"{name} must be >= 1, got {value}")
    cfg = load_config(config)  # a bad config fails before anything is loaded
    if cfg.update_frequency > steps:
        raise CliError(
            f"--steps {steps} is fewer than the config's update_frequency ({cfg.update_frequency}), so no reading "
            f"would be published; use --steps {cfg.update_frequency} or more"
        )
    texts, labels = read_examples(data, task=task, text_column=text_column, label_column=label_column)
    model, tokenizer, label_ids = load_model(model_dir, task, labels)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    if train:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt: Optional[torch.optim.Optimizer] = torch.optim.AdamW(params, lr=lr)
    else:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        opt = None
    try:
        tracker = attach(model, cfg)
    except (ValueError, TypeError) as exc:
        raise CliError(f"cannot attach the tracker to the model in '{model_dir}': {one_line(exc)}") from exc
    order: List[int] = []
    losses: List[float] = []
    published = 0
    bar = progress_bar(steps, "profile", progress)
    t0 = time.perf_counter()
    try:
        for step in range(steps):
            if len(order) < batch_size:
                perm = list(range(len(texts)))
                rng.shuffle(perm)
                order.extend(perm * max(1, math.ceil(batch_size / len(perm))))
            idx, order = order[:batch_size], order[batch_size:]
            enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            if task == "causal-lm":
                enc.pop("token_type_ids", None)
            if task == "classification":
                assert label_ids is not None
                y = torch.tensor([label_ids[i] for i in idx], dtype=torch.long)
            else:
                y = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            with tracker.token_mask(enc["attention_mask"]):
                loss = model(**enc, labels=y).loss
            loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            published += int(tracker.step())
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - t0
    scores = tracker.scores() if published else None
    tracker.detach()
    if scores is None:
        raise CliError("no salience reading was published (see the config's update_frequency / sample_every)")
    out_dir = Path(out)
    files = render_report(scores, out_dir, budget=budget, title=f"apt_salience profile of {Path(model_dir).name}")
    summary = {
        "model": str(model_dir), "data": str(data), "task": task, "steps": steps, "batch_size": batch_size,
        "max_length": max_length, "train": train, "examples": len(texts), "losses": losses, "seconds": seconds,
        "architecture": tracker.architecture, "files": {k: str(v) for k, v in files.items()},
        "apt_salience": __version__,
    }
    (out_dir / "profile.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


# ------------------------------------------------------------------------------------------------
# prune


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CliError(f"--out '{out}' exists and is not a folder; give a new folder")
    if out.is_dir() and any(out.iterdir()):
        raise CliError(f"--out '{out}' already exists and is not empty; remove it or give a new folder "
                       "(prune never overwrites a model folder)")


def _split(n: int, eval_fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = int(round(n * eval_fraction))
    if n_eval < 1 or n - n_eval < 1:
        raise CliError(f"the data has {n} usable rows: --eval-fraction {eval_fraction} leaves "
                       f"{n - n_eval} for training and {n_eval} for evaluation; both need at least one")
    return order[n_eval:], order[:n_eval]


def prune(
    model_dir: "str | Path",
    data: "str | Path",
    out: "str | Path",
    *,
    keep: float = 0.5,
    steps: int = 100,
    text_column: str = "text",
    label_column: str = "label",
    batch_size: int = 16,
    max_length: int = 128,
    lr: float = 5e-5,
    config: Optional[str] = None,
    start_step: Optional[int] = None,
    ramp_steps: Optional[int] = None,
    alpha: Optional[float] = None,
    profile_steps: int = 20,
    eval_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = True,
) -> Dict[str, Any]:
    """Prune a local classifier to ``keep`` of its head + FFN parameters; write the pruned model and ``report.md``.

    With ``steps > 0`` the model is fine-tuned for ``steps`` AdamW steps with the
    :class:`~apt_salience.AdaptivePruner` (cubic schedule, gradual masks) and finalized; with
    ``steps == 0`` the tracker observes ``profile_steps`` forward/backward passes (weights frozen) and
    the model is pruned retraining-free. Accuracy is measured on a held-out split (``eval_fraction``
    of the rows, never trained on) before and after. The tracker config defaults to the recommended
    setting for pruning; ``config`` (a YAML file) replaces it, its ``pruning:`` section included.
    Returns the summary (also ``out/prune.json``). Errors are :class:`CliError`, raised before anything is written.

    Args:
        model_dir: a local Hugging Face classifier folder (model and tokenizer).
        data: a CSV / TSV / JSONL / JSON file with ``text_column`` and ``label_column``.
        out: a new or empty folder for the pruned model, ``report.md``, ``prune.json`` and the figure.
        keep: share of head + FFN parameters kept.
        steps: fine-tuning steps with the pruner (0: retraining-free after ``profile_steps`` passes).
        text_column, label_column: the columns.
        batch_size, max_length, lr: fine-tuning (AdamW, linear warm-up and decay).
        config: a ``config.yaml`` (tracker keys and ``pruning:``); default: the recommended setting.
        start_step, ramp_steps, alpha: override the ``pruning:`` section (``ramp_steps`` None: derived).
        profile_steps: passes observed with ``steps == 0``.
        eval_fraction: share of the rows held out for the accuracy before and after.
        seed: the split and the batch order.
        progress: tqdm progress bars on stderr.
    """
    t_start = time.perf_counter()
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise CliError(f"--keep must be a fraction in (0, 1] (the share of head + FFN parameters kept), got {keep}")
    if not 0 < eval_fraction < 1:
        raise CliError(f"--eval-fraction must be in (0, 1), got {eval_fraction}")
    if steps < 0:
        raise CliError(f"--steps must be >= 0 (0: retraining-free pruning after a short profile), got {steps}")
    for name, value in (("--batch-size", batch_size), ("--max-length", max_length), ("--profile-steps", profile_steps)):
        if value < 1:
            raise CliError(f"{name} must be >= 1, got {value}")
    out_dir = Path(out)
    _check_out_dir(out_dir)
    cfg = load_config(config if config is not None else RECOMMENDED_CONFIG)  # a bad config fails before loading
    try:
        pcfg = pruning_config(cfg.pruning, keep_ratio=keep, start_step=start_step, ramp_steps=ramp_steps, alpha=alpha)
    except ValueError as exc:
        raise CliError(f"--{str(exc).split(' ', 1)[0].replace('_', '-')}: {exc}") from None
    n_obs = steps if steps > 0 else profile_steps
    if cfg.update_frequency > n_obs:
        raise CliError(f"{'--steps' if steps else '--profile-steps'} {n_obs} is fewer than the config's "
                       f"update_frequency ({cfg.update_frequency}): no reading would be published")
    if steps > 0 and pcfg.start_step >= steps:
        raise CliError(f"--start-step {pcfg.start_step} is not before the end of training (--steps {steps})")
    texts, labels = read_examples(data, task="classification", text_column=text_column, label_column=label_column)
    assert labels is not None
    train_idx, eval_idx = _split(len(texts), eval_fraction, seed)
    model, tokenizer, label_ids = load_model(model_dir, "classification", labels)
    assert label_ids is not None
    tr_x, tr_y = [texts[i] for i in train_idx], [label_ids[i] for i in train_idx]
    ev_x, ev_y = [texts[i] for i in eval_idx], [label_ids[i] for i in eval_idx]
    timings: Dict[str, float] = {}
    t = time.perf_counter()
    acc_before = evaluate(model, tokenizer, ev_x, ev_y, max_length=max_length)
    timings["evaluate before"] = time.perf_counter() - t
    params_before = count_parameters(model)
    if alpha is None and config is None and steps > 0:
        # a short run: raise the mask step so that every mask can reach 0 or 1 within the last third of the steps
        pcfg = pruning_config(pcfg, alpha=min(1.0, max(pcfg.alpha, 3.0 * cfg.update_frequency / steps)))
    try:
        tracker = attach(model, cfg)
    except (ValueError, TypeError) as exc:
        raise CliError(f"cannot attach the tracker to the model in '{model_dir}': {one_line(exc)}") from exc
    try:
        ramp = pcfg.ramp_steps or auto_ramp_steps(max(steps, 1), pcfg.start_step, pcfg.alpha, cfg.update_frequency)
        pruner = AdaptivePruner(model, tracker, pcfg.keep_ratio, start_step=pcfg.start_step,
                                             ramp_steps=ramp, alpha=pcfg.alpha, kinds=pcfg.kinds, score=pcfg.score,
                                             allocation=pcfg.allocation, calibration=pcfg.calibration,
                                             min_per_site=pcfg.min_per_site)

        def after_step(step: int, loss: float) -> None:  # finetune has already called tracker.step()
            pruner.step()

        t = time.perf_counter()
        if steps > 0:
            finetune(model, tokenizer, tr_x, tr_y, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                     trackers=[tracker], max_length=max_length, progress=progress, desc="fine-tune + prune",
                     on_step=after_step)
            timings["fine-tune with the pruner"] = time.perf_counter() - t
        else:
            _profile_steps(model, tokenizer, tracker, tr_x, tr_y, profile_steps, batch_size, max_length, seed, progress)
            timings["profile"] = time.perf_counter() - t
        scores = tracker.scores()
        t = time.perf_counter()
        report = pruner.finalize()
        timings["finalize"] = time.perf_counter() - t
    finally:
        tracker.detach()
    sel = pruner.final_selection
    assert sel is not None
    t = time.perf_counter()
    acc_after = evaluate(model, tokenizer, ev_x, ev_y, max_length=max_length)
    timings["evaluate after"] = time.perf_counter() - t
    with quiet_transformers():
        save_pruned(plain_model(model), out_dir)
        tokenizer.save_pretrained(str(out_dir))
    figure = None
    try:
        figure = density_figure(scores, out_dir / "density_ranking.png", selection=sel)
    except ReportDependencyError as exc:
        logger.warning("no density figure: %s", exc)
    timings["total"] = time.perf_counter() - t_start
    kept = sel.num_kept()
    summary: Dict[str, Any] = {
        "model": str(model_dir), "data": str(data), "out": str(out_dir), "keep": pcfg.keep_ratio, "steps": steps,
        "profile_steps": profile_steps if steps == 0 else 0, "mode": "during fine-tuning" if steps else "retraining-free",
        "schedule": {"start_step": pcfg.start_step, "ramp_steps": ramp, "alpha": pcfg.alpha,
                     "allocation": pcfg.allocation, "kinds": list(pcfg.kinds)},
        "tracker": {"salience.mode": cfg.salience.mode, "kurtosis.combine": cfg.kurtosis.combine},
        "train_examples": len(tr_x), "eval_examples": len(ev_x),
        "accuracy_before": acc_before, "accuracy_after": acc_after,
        "params_before": params_before, "params_after": report.params_after,
        "head_ffn_params_total": sel.params_total, "head_ffn_params_kept": sel.params_kept,
        "heads_kept": kept.get("head"), "heads_total": int(sel.head.numel()) if sel.head is not None else None,
        "neurons_kept": kept.get("neuron"), "neurons_total": int(sel.neuron.numel()) if sel.neuron is not None else None,
        "placeholder_heads": report.placeholder_heads, "seconds": timings, "apt_salience": __version__,
    }
    (out_dir / "prune.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    (out_dir / "report.md").write_text(_prune_markdown(summary, figure), encoding="utf-8")
    return summary


def _profile_steps(model: Any, tokenizer: Any, tracker: Any, texts: List[str], labels: List[int], steps: int,
                   batch_size: int, max_length: int, seed: int, progress: bool) -> None:
    """Forward/backward passes with the weights frozen (no optimizer step): the tracker's reading for retraining-free pruning."""
    model.eval()
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    rng = random.Random(seed)
    bar = progress_bar(steps, "profile", progress)
    try:
        for _ in range(steps):
            idx = [rng.randrange(len(texts)) for _ in range(batch_size)]
            enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            y = torch.tensor([labels[i] for i in idx], dtype=torch.long)
            with tracker.token_mask(enc["attention_mask"]):
                loss = model(**enc, labels=y).loss
            loss.backward()
            tracker.step()
            if bar is not None:
                bar.update(1)
    finally:
        hook.remove()
        for p in frozen:
            p.requires_grad_(True)
        if bar is not None:
            bar.close()


def _prune_markdown(s: Dict[str, Any], figure: Optional[Path]) -> str:
    secs = s["seconds"]
    lines = [
        f"# apt-salience prune: {Path(s['model']).name}", "",
        f"Pruned {s['mode']} to keep {s['keep']:.0%} of the head + FFN parameters "
        + (f"({s['steps']} fine-tuning steps, cubic ramp from step {s['schedule']['start_step']} over "
           f"{s['schedule']['ramp_steps']} steps, alpha {s['schedule']['alpha']})" if s["steps"]
           else f"(after a {s['profile_steps']}-step profile)")
        + f"; tracker salience.mode {s['tracker']['salience.mode']}, kurtosis.combine "
          f"{s['tracker']['kurtosis.combine']}, allocation {s['schedule']['allocation']}.", "",
        "| | before | after |", "|---|---:|---:|",
        f"| parameters (all) | {s['params_before']:,} | {s['params_after']:,} ({s['params_after'] / s['params_before']:.1%}) |",
        f"| head + FFN parameters | {s['head_ffn_params_total']:,.0f} | {s['head_ffn_params_kept']:,.0f} "
        f"({s['head_ffn_params_kept'] / s['head_ffn_params_total']:.1%}) |",
    ]
    if s["heads_total"] is not None:
        lines.append(f"| attention heads | {s['heads_total']} | {s['heads_kept']} |")
    if s["neurons_total"] is not None:
        lines.append(f"| FFN neurons | {s['neurons_total']} | {s['neurons_kept']} |")
    lines += [
        f"| held-out accuracy ({s['eval_examples']} examples) | {s['accuracy_before']:.3f} | {s['accuracy_after']:.3f} |",
        "", "Time: " + ", ".join(f"{k} {v:.1f} s" for k, v in secs.items()) + ".", "",
        f"Read the pruned model with `apt_salience.load_pruned('{s['out']}')`.", "",
    ]
    if figure is not None:
        lines += ["![density ranking](density_ranking.png)", ""]
    return "\n".join(lines)
