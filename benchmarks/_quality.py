"""The score-quality comparison behind ``docs/score_quality.md`` (run by ``benchmarks/score_quality.py``).

:func:`compare_criteria` (its signature is what ``apt-salience demo --compare`` calls)::

    compare_criteria(*, seed=0, budgets=(0.7, 0.5, 0.4), train_size=None, val_size=200,
                     test_size=400, steps=120, batch_size=16, lr=1e-4, max_length=64,
                     recovery_steps=6, recovery_lr=5e-5, options=DEFAULT_OPTIONS,
                     random_seeds=(0, 1, 2), calib_size=128, cache_dir=None,
                     recover=True, workers=1, progress=False, log=None) -> Comparison

1. splits the demo's tweets (:func:`apt_salience.cli.data.load_tweets`): a held-out test split, and
   a validation split carved from the training rows (never trained on);
2. fine-tunes all-MiniLM-L6-v2 once (:func:`apt_salience.cli.train.finetune`), with one tracker per
   ``salience.mode`` x ``kurtosis.combine`` combination and a :class:`apt_salience.criteria.WeightTaylor`
   attached at the same time (cached under ``cache_dir``);
3. computes the baselines of :mod:`apt_salience.criteria` on the fine-tuned model (Wanda's norms on
   ``calib_size`` training rows);
4. on the validation split, prunes with every column (random: seed 0) under every (allocation,
   calibration) of ``options`` at every budget (retraining-free); the *recommended* setting is the
   tracker setting and option with the best mean validation accuracy over the budgets, and every
   column's own best option is recorded too;
5. on the test split, evaluates every column (every tracker setting, magnitude, random (mean over
   ``random_seeds``), Wanda, weight-gradient Taylor) (a) under the recommended allocation and
   calibration, (b) under its own best validation option, and the paper's default (compressed +
   add, global, no calibration), at every budget, retraining-free and, with ``recover``, after
   ``recovery_steps`` fine-tuning steps of the physically pruned model. With ``cache_dir`` every
   finished evaluation is cached too, so an interrupted run resumes.

Pruned models are evaluated physically pruned (:func:`apt_salience.prune_model`, equivalent to the
masks and cheaper), ``workers`` of them at a time in forked processes that read the fine-tuned model
and the scores from a module global set before the fork (:data:`_JOB_CTX`).
:meth:`Comparison.to_markdown` renders the tables.

This file is benchmark code, not part of the installed package: import it from a source checkout
(``benchmarks/`` on ``sys.path``, as ``benchmarks/score_quality.py`` runs it, or
:func:`apt_salience.cli.demo.load_score_quality`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from apt_salience import attach, prune_model, select_blocks
from apt_salience.cli.data import load_tweets
from apt_salience.cli.models import load_minilm_classifier
from apt_salience.cli.train import evaluate, finetune
from apt_salience.criteria import ActivationNorms, WeightTaylor, magnitude_scores, random_scores, wanda_scores
from apt_salience.scores import SalienceScores

__all__ = ["TRACKER_SETTINGS", "DEFAULT_OPTIONS", "PAPER_DEFAULT", "BASELINES", "Comparison", "compare_criteria"]

logger = logging.getLogger("apt_salience")

#: Every ``salience.mode`` x ``kurtosis.combine`` combination: column name -> tracker config.
TRACKER_SETTINGS: Dict[str, Dict[str, Any]] = {
    f"{mode}+{comb}": {"salience": {"mode": mode}, "kurtosis": {"combine": comb}}
    for mode in ("compressed", "taylor", "fisher")
    for comb in ("add", "scaled")
}
#: (allocation, calibration) pairs measured on the validation split.
DEFAULT_OPTIONS: Tuple[Tuple[str, str], ...] = (
    ("global", "none"), ("global", "site_mean"), ("uniform", "none"), ("relative", "none"))
PAPER_DEFAULT = ("compressed+add", "global", "none")
BASELINES = ("magnitude", "random", "wanda", "weight_taylor")


@dataclass
class Comparison:
    """Results of :func:`compare_criteria`.

    ``val``: ``{(column, allocation, calibration, budget): accuracy}`` (validation, retraining-free);
    ``test``: ``{(column, allocation, calibration, budget, recovered): accuracy}``;
    ``dense``: ``{"val": acc, "test": acc}``; ``recommended``: (column, allocation, calibration);
    ``settings``: the arguments; ``timings``: seconds per phase.
    """

    budgets: Tuple[float, ...]
    val: Dict[Tuple[str, str, str, float], float] = field(default_factory=dict)
    test: Dict[Tuple[str, str, str, float, bool], float] = field(default_factory=dict)
    dense: Dict[str, float] = field(default_factory=dict)
    recommended: Tuple[str, str, str] = PAPER_DEFAULT
    settings: Dict[str, Any] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)
    random_runs: Dict[Tuple[str, str, float, bool], List[float]] = field(default_factory=dict)

    def columns(self) -> List[str]:
        return list(TRACKER_SETTINGS) + list(BASELINES)

    def best_option(self, column: str) -> Optional[Tuple[str, str]]:
        """The (allocation, calibration) with the best mean validation accuracy of ``column`` (None if unmeasured)."""
        opts = sorted({(k[1], k[2]) for k in self.val if k[0] == column})
        full = [o for o in opts if all((column, o[0], o[1], b) in self.val for b in self.budgets)]
        if not full:
            return None
        return max(full, key=lambda o: sum(self.val[(column, o[0], o[1], b)] for b in self.budgets))

    def best_option_row(self, budget: float, recovered: bool) -> Dict[str, float]:
        """Test accuracy of every column at its own best validation option."""
        out: Dict[str, float] = {}
        for c in self.columns():
            o = self.best_option(c)
            if o is not None and (k := (c, o[0], o[1], budget, recovered)) in self.test:
                out[c] = self.test[k]
        return out

    def test_row(self, allocation: str, calibration: str, budget: float, recovered: bool) -> Dict[str, float]:
        return {c: self.test[k] for c in self.columns() if (k := (c, allocation, calibration, budget, recovered)) in self.test}

    def meets_bar(self) -> Dict[str, Any]:
        """Whether the recommended column beats every other column at every budget (test, retraining-free)
        and stays within 5 points of dense at the largest budget."""
        col, alloc, cal = self.recommended
        beats = {}
        for b in self.budgets:
            mine = self.test.get((col, alloc, cal, b, False), float("nan"))
            others = [v for c, v in self.test_row(alloc, cal, b, False).items() if c != col]
            others += [v for c, v in self.best_option_row(b, False).items() if c != col]
            beats[b] = all(mine > v for v in others)
        top = max(self.budgets)
        gap = self.dense.get("test", float("nan")) - self.test.get((col, alloc, cal, top, False), float("nan"))
        return {"beats_every_column": beats, "gap_to_dense_at_%g" % top: gap,
                "meets": all(beats.values()) and gap <= 0.05}

    def to_markdown(self) -> str:
        """The tables: test (retraining-free, recovered), paper default, validation sweep."""
        col, alloc, cal = self.recommended
        lines: List[str] = []
        pct = lambda b: f"{round(b * 100)}%"  # noqa: E731
        cols = self.columns()
        lines.append(f"Dense accuracy: test {self.dense.get('test', float('nan')):.3f}, "
                     f"validation {self.dense.get('val', float('nan')):.3f}.")
        lines.append("")
        lines.append(f"Recommended (chosen on validation): **{col}**, allocation `{alloc}`, calibration `{cal}`.")
        lines.append("")
        for recovered in (False, True):
            if not any(k[4] == recovered for k in self.test):
                continue
            title = "after a short recovery fine-tune" if recovered else "retraining-free"
            lines.append(f"Test accuracy, {title}; every column selected with allocation `{alloc}`, "
                         f"calibration `{cal}` (random: mean of {len(self.settings.get('random_seeds', ()))} seeds):")
            lines.append("")
            lines.append("| kept | " + " | ".join(cols) + " |")
            lines.append("|---|" + "---|" * len(cols))
            for b in self.budgets:
                row = self.test_row(alloc, cal, b, recovered)
                best = max(row.values()) if row else float("nan")
                cells = []
                for c in cols:
                    v = row.get(c)
                    cells.append("" if v is None else (f"**{v:.3f}**" if v == best else f"{v:.3f}"))
                lines.append(f"| {pct(b)} | " + " | ".join(cells) + " |")
            lines.append("")
        if any(self.best_option(c) is not None for c in cols):
            for recovered in (False, True):
                rows = {b: self.best_option_row(b, recovered) for b in self.budgets}
                if not any(rows.values()):
                    continue
                title = "after a short recovery fine-tune" if recovered else "retraining-free"
                lines.append(f"Test accuracy, {title}; every column at its own best (allocation, calibration) "
                             "on validation:")
                lines.append("")
                lines.append("| kept | " + " | ".join(cols) + " |")
                lines.append("|---|" + "---|" * len(cols))
                opt_cells = []
                for c in cols:
                    o = self.best_option(c)
                    opt_cells.append("" if o is None else f"{o[0]}/{o[1]}")
                lines.append("| option | " + " | ".join(opt_cells) + " |")
                for b in self.budgets:
                    row = rows[b]
                    best = max(row.values()) if row else float("nan")
                    cells = ["" if (v := row.get(c)) is None else (f"**{v:.3f}**" if v == best else f"{v:.3f}")
                             for c in cols]
                    lines.append(f"| {pct(b)} | " + " | ".join(cells) + " |")
                lines.append("")
        pc, pa, pl = PAPER_DEFAULT
        if (pa, pl) != (alloc, cal):
            lines.append(f"The paper's default ({pc}, allocation `{pa}`, calibration `{pl}`), test accuracy:")
            lines.append("")
            lines.append("| kept | retraining-free | recovered |")
            lines.append("|---|---|---|")
            for b in self.budgets:
                a = self.test.get((pc, pa, pl, b, False))
                r = self.test.get((pc, pa, pl, b, True))
                lines.append(f"| {pct(b)} | {'' if a is None else f'{a:.3f}'} | {'' if r is None else f'{r:.3f}'} |")
            lines.append("")
        opts = sorted({(k[1], k[2]) for k in self.val})
        if opts:
            lines.append("Validation accuracy (retraining-free) of every column under every option (random: seed 0; "
                         "the recommended setting is the tracker setting and option with the best mean over the budgets):")
            lines.append("")
            lines.append("| setting | allocation | calibration | " + " | ".join(pct(b) for b in self.budgets) + " | mean |")
            lines.append("|---|---|---|" + "---|" * (len(self.budgets) + 1))
            names = sorted({k[0] for k in self.val}, key=lambda n: cols.index(n) if n in cols else 99)
            for name in names:
                for o_alloc, o_cal in opts:
                    got = [self.val.get((name, o_alloc, o_cal, b)) for b in self.budgets]
                    vals = [v for v in got if v is not None]
                    if len(vals) != len(got):
                        continue
                    mean = sum(vals) / len(vals)
                    lines.append(f"| {name} | {o_alloc} | {o_cal} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {mean:.3f} |")
            lines.append("")
        return "\n".join(lines)

    def to_json(self) -> Dict[str, Any]:
        return {
            "budgets": list(self.budgets),
            "dense": self.dense,
            "recommended": list(self.recommended),
            "val": [[*k, v] for k, v in self.val.items()],
            "test": [[*k, v] for k, v in self.test.items()],
            "random_runs": [[*k, v] for k, v in self.random_runs.items()],
            "settings": self.settings,
            "timings": self.timings,
        }


def _cache_key(settings: Mapping[str, Any]) -> str:
    keys = ("seed", "train_size", "val_size", "test_size", "steps", "batch_size", "lr", "max_length", "calib_size")
    text = json.dumps({k: settings[k] for k in keys}, sort_keys=True) + "|v2"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _prune_copy(model: nn.Module, selection: Any) -> nn.Module:
    m = copy.deepcopy(model)
    prune_model(m, selection)
    return m


#: What the evaluation jobs read (the fine-tuned model, the tokenizer, the splits, the scores); set by
#: :func:`compare_criteria` before the worker processes are forked, so they inherit it.
_JOB_CTX: Dict[str, Any] = {}


def _evaluate(m: nn.Module, split: str) -> float:
    x, y = _JOB_CTX[split]
    return evaluate(m, _JOB_CTX["tok"], x, y, max_length=_JOB_CTX["max_length"])


def _run_job(job: Tuple[str, str, str, str, float, int]) -> Tuple[Tuple[Any, ...], float, Optional[float]]:
    """One (split, column, allocation, calibration, budget, random seed): prune a copy, evaluate, maybe recover."""
    split, name, alloc, cal, b, rseed = job
    c = _JOB_CTX
    torch.set_num_threads(1)
    sc = c["readings"].get(name, c["layout"])
    spec = random_scores(c["layout"], seed=rseed) if name == "random" else c["criteria"][name]
    sel = select_blocks(sc, keep_ratio=b, kinds=("head", "neuron"), score=spec, allocation=alloc, calibration=cal)
    pruned = _prune_copy(c["model"], sel)
    acc = _evaluate(pruned, split)
    acc_rec: Optional[float] = None
    if split == "test" and c["recover"]:
        x, y = c["train"]
        finetune(pruned, c["tok"], x, y, steps=c["recovery_steps"], batch_size=c["batch_size"],
                      lr=c["recovery_lr"], seed=c["seed"] + 1000 + rseed, max_length=c["max_length"], progress=False)
        acc_rec = _evaluate(pruned, split)
    return job, acc, acc_rec


def _run_jobs(jobs: Sequence[Tuple[str, str, str, str, float, int]],
              workers: int) -> Iterator[Tuple[Tuple[Any, ...], float, Optional[float]]]:
    if workers <= 1:
        for job in jobs:
            yield _run_job(job)
        return
    import multiprocessing as mp
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with mp.get_context("fork").Pool(workers) as pool:
        yield from pool.imap_unordered(_run_job, list(jobs))


def compare_criteria(
    *,
    seed: int = 0,
    budgets: Sequence[float] = (0.7, 0.5, 0.4),
    train_size: Optional[int] = None,
    val_size: int = 200,
    test_size: int = 400,
    steps: int = 120,
    batch_size: int = 16,
    lr: float = 1e-4,
    max_length: int = 64,
    recovery_steps: int = 6,
    recovery_lr: float = 5e-5,
    options: Sequence[Tuple[str, str]] = DEFAULT_OPTIONS,
    random_seeds: Sequence[int] = (0, 1, 2),
    calib_size: int = 128,
    cache_dir: Optional[Union[str, Path]] = None,
    recover: bool = True,
    workers: int = 1,
    progress: bool = False,
    log: Optional[Callable[[str], None]] = None,
) -> Comparison:
    """Fine-tune MiniLM once with every tracker setting attached, prune with every criterion, evaluate.

    See the module docstring for the protocol. ``cache_dir`` (e.g. ``/tmp/apt_salience_quality``)
    keeps the fine-tuned weights and all scores between runs. ``log`` receives progress lines.
    ``workers`` > 1 evaluates the pruned models in that many forked processes (one thread each).
    A full run takes about 30 minutes on 2 CPU cores; ``benchmarks/score_quality.py --quick`` runs
    the pipeline on a few rows.
    """
    budgets = tuple(float(b) for b in budgets)
    for b in budgets:
        if not 0 < b <= 1:
            raise ValueError(f"budgets must be fractions in (0, 1], got {b!r}")
    for a, c in options:
        if (a, c) == ("", ""):
            raise ValueError("options must be (allocation, calibration) pairs")
    say = log or (lambda s: logger.info("%s", s))
    settings = dict(seed=seed, budgets=list(budgets), train_size=train_size, val_size=val_size, test_size=test_size,
                    steps=steps, batch_size=batch_size, lr=lr, max_length=max_length, recovery_steps=recovery_steps,
                    recovery_lr=recovery_lr, options=[list(o) for o in options], random_seeds=list(random_seeds),
                    calib_size=calib_size, recover=recover, workers=workers, torch_threads=torch.get_num_threads(),
                    machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
                    torch=torch.__version__)
    result = Comparison(budgets=budgets, settings=settings)
    t0 = time.time()

    tr_x, tr_y, te_x, te_y = load_tweets(seed, test_size=test_size)
    va_x, va_y = tr_x[:val_size], tr_y[:val_size]
    tr_x, tr_y = tr_x[val_size:], tr_y[val_size:]
    if train_size is not None:
        tr_x, tr_y = tr_x[:train_size], tr_y[:train_size]

    model, tok = load_minilm_classifier(seed=seed)
    cache: Optional[Path] = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"quality_{_cache_key(settings)}.pt"
    state: Optional[Dict[str, Any]] = None
    if cache is not None and cache.is_file():
        state = torch.load(cache, weights_only=False)
        model.load_state_dict(state["model"])
        say(f"loaded the fine-tuned model and scores from {cache}")
    else:
        trackers = {name: attach(model, cfg) for name, cfg in TRACKER_SETTINGS.items()}
        wt = WeightTaylor(model)
        say(f"fine-tuning {steps} steps x {batch_size} with {len(trackers)} trackers + weight Taylor attached")
        finetune(model, tok, tr_x, tr_y, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                      trackers=[*trackers.values(), wt], max_length=max_length, progress=progress)
        raw = {n: t.scores().to_dict() for n, t in trackers.items()}
        for t in trackers.values():
            t.detach()
        wt.detach()
        calib = tr_x[:calib_size]
        with ActivationNorms(model) as an:
            model.eval()
            with torch.no_grad():
                for i in range(0, len(calib), 64):
                    enc = tok(calib[i : i + 64], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
                    with an.token_mask(enc["attention_mask"]):
                        model(**enc)
        state = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "readings": raw,
                 "weight_taylor": wt.scores(), "norms": an.norms()}
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, cache)
    model.eval()
    result.timings["finetune_and_scores"] = time.time() - t0

    readings = {n: SalienceScores.from_dict(d) for n, d in state["readings"].items()}
    layout_scores = readings[PAPER_DEFAULT[0]]
    criteria: Dict[str, Union[str, Dict[str, Tensor]]] = {n: "outlier_aware" for n in TRACKER_SETTINGS}
    criteria["magnitude"] = magnitude_scores(model)
    criteria["wanda"] = wanda_scores(model, state["norms"])
    criteria["weight_taylor"] = state["weight_taylor"]

    ctx = dict(model=model, tok=tok, readings=readings, layout=layout_scores, criteria=criteria,
               val=(va_x, va_y), test=(te_x, te_y), train=(tr_x, tr_y), max_length=max_length,
               recover=recover and recovery_steps > 0, recovery_steps=recovery_steps, recovery_lr=recovery_lr,
               batch_size=batch_size, seed=seed)
    _JOB_CTX.clear()
    _JOB_CTX.update(ctx)
    t1 = time.time()
    result.dense = {"val": _evaluate(model, "val"), "test": _evaluate(model, "test")}
    say(f"dense accuracy: val {result.dense['val']:.3f}, test {result.dense['test']:.3f}")

    job_cache: Dict[str, List[Optional[float]]] = {}
    job_file: Optional[Path] = None
    if cache is not None:
        rec_key = f"{recovery_steps}_{recovery_lr}_{int(recover)}"
        job_file = cache.with_name(cache.stem + f"_jobs_{rec_key}.json")
        if job_file.is_file():
            job_cache = json.loads(job_file.read_text(encoding="utf-8"))

    def run(jobs: Sequence[Tuple[str, str, str, str, float, int]]) -> Iterator[Tuple[Tuple[Any, ...], float, Optional[float]]]:
        todo = [j for j in jobs if repr(j) not in job_cache]
        for j in jobs:
            if repr(j) in job_cache:
                free_acc, rec_acc = job_cache[repr(j)]
                assert free_acc is not None
                yield j, free_acc, rec_acc
        for j, acc, acc_rec in _run_jobs(todo, workers):
            job_cache[repr(j)] = [acc, acc_rec]
            if job_file is not None:
                job_file.write_text(json.dumps(job_cache), encoding="utf-8")
            yield j, acc, acc_rec

    # validation sweep: every column (random: seed 0) x option
    val_jobs = [("val", n, a, c, b, 0) for n in list(TRACKER_SETTINGS) + list(BASELINES) for a, c in options for b in budgets]
    for job, acc, _ in run(val_jobs):
        result.val[job[1:5]] = acc
        say(f"val  {job[1]:18s} {job[2]:8s} {job[3]:10s} {job[4]:.2f}: {acc:.3f}")
    result.timings["validation_sweep"] = time.time() - t1
    best = max(((n, a, c) for n in TRACKER_SETTINGS for a, c in options),
               key=lambda k: (sum(result.val[(k[0], k[1], k[2], b)] for b in budgets), -list(TRACKER_SETTINGS).index(k[0])))
    result.recommended = best
    say(f"recommended on validation: {best}")

    # test: every column under the recommended option, every column at its own best option, the paper default
    t2 = time.time()
    _, alloc, cal = best
    cols: List[Tuple[str, str, str]] = [(c, alloc, cal) for c in list(TRACKER_SETTINGS) + list(BASELINES)]
    for c in list(TRACKER_SETTINGS) + list(BASELINES):
        o = result.best_option(c)
        if o is not None and (c, o[0], o[1]) not in cols:
            cols.append((c, o[0], o[1]))
    if PAPER_DEFAULT not in cols:
        cols.append(PAPER_DEFAULT)
    test_jobs = [("test", n, a, c, b, rs) for n, a, c in cols for b in budgets
                 for rs in (list(random_seeds) if n == "random" else [0])]
    free: Dict[Tuple[str, str, str, float], List[float]] = {}
    rec: Dict[Tuple[str, str, str, float], List[float]] = {}
    for job, acc, acc_rec in run(test_jobs):
        key = job[1:5]
        free.setdefault(key, []).append(acc)
        if acc_rec is not None:
            rec.setdefault(key, []).append(acc_rec)
        say(f"test {job[1]:18s} {job[2]:8s} {job[3]:10s} {job[4]:.2f} seed {job[5]}: free {acc:.3f}"
            + (f" recovered {acc_rec:.3f}" if acc_rec is not None else ""))
    for (n, a, c, b), v in free.items():
        result.test[(n, a, c, b, False)] = sum(v) / len(v)
        if n == "random":
            result.random_runs[(a, c, b, False)] = v
    for (n, a, c, b), v in rec.items():
        result.test[(n, a, c, b, True)] = sum(v) / len(v)
        if n == "random":
            result.random_runs[(a, c, b, True)] = v
    result.timings["test"] = time.time() - t2
    result.timings["total"] = time.time() - t0
    return result
