"""APT-style pruning during fine-tuning, on a tiny BERT and a synthetic task (CPU, about a minute).

What it does:
1. builds a small BERT classifier from a config (no download) and a synthetic task: is the
   majority of the tokens of a sequence from the lower half of the vocabulary?
2. fine-tunes it with the salience tracker attached; every ``update_frequency`` steps, once the
   warm-up is over, it selects the blocks to keep under the budget of the cubic schedule
   ``gamma_t = gamma_T + (1 - gamma_T)(1 - t/T)^3`` and moves the masks by ``alpha`` towards
   that selection (kept +alpha, pruned -alpha); blocks whose mask reached 0 stay pruned;
3. at the end it removes the masked heads and neurons physically and reports accuracy and
   parameter count before and after.

Run:  python examples/prune_during_finetune.py [--keep 0.5] [--steps 360] [--score outlier_aware]
"""

from __future__ import annotations

import argparse
import time
from typing import Dict, Optional, Tuple

import torch
import transformers as tf

import apt_salience
from apt_salience.masks import apply_masks
from apt_salience.pruning import count_parameters, prune_model
from apt_salience.selection import cubic_keep_ratio, select_blocks, update_masks

VOCAB, SEQ = 40, 15


def make_data(n: int, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(2, VOCAB, (n, SEQ), generator=gen)
    labels = ((ids < (VOCAB + 2) // 2).sum(1) > SEQ // 2).long()
    return ids, labels


def accuracy(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        pred = model(input_ids=ids).logits.argmax(-1)
    model.train(was)
    return float((pred == labels).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=float, default=0.5, help="final fraction of head+neuron parameters kept")
    ap.add_argument("--steps", type=int, default=360, help="optimizer steps in all")
    ap.add_argument("--warmup", type=int, default=120, help="dense fine-tuning steps before pruning starts")
    ap.add_argument("--prune-steps", type=int, default=120, help="T of the cubic schedule")
    ap.add_argument("--update-frequency", type=int, default=5)
    ap.add_argument("--alpha", type=float, default=0.1, help="mask step per update (APT uses 0.01 with many more steps)")
    ap.add_argument("--score", default="outlier_aware", help="BlockScores field to rank by")
    ap.add_argument("--allocation", default="global", choices=["global", "uniform"])
    ap.add_argument("--calibration", default="none", choices=["none", "site_mean"])
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    train_ids, train_y = make_data(4096, gen)
    test_ids, test_y = make_data(1024, gen)
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=SEQ, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = tf.BertForSequenceClassification(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    print(f"tiny BERT: {count_parameters(model):,} parameters; task: majority of low tokens, {SEQ} tokens")
    print(f"plan: {args.warmup} dense steps, prune to keep {args.keep:.0%} of head+neuron parameters over "
          f"{args.prune_steps} steps (cubic), then hold; {args.steps} steps in all; score={args.score}, "
          f"allocation={args.allocation}, calibration={args.calibration}")

    tracker = apt_salience.attach(model, {"update_frequency": args.update_frequency})
    handle = None
    masks: Optional[Dict[str, torch.Tensor]] = None
    dense_acc = None
    t0 = time.perf_counter()
    batch = 64
    sel = None
    for step in range(1, args.steps + 1):
        i = torch.randint(0, train_ids.shape[0], (batch,), generator=gen)
        loss = model(input_ids=train_ids[i], labels=train_y[i]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step == args.warmup:
            dense_acc = accuracy(model, test_ids, test_y)
            print(f"step {step:4d}  loss {loss.item():.3f}  dense test accuracy {dense_acc:.3f}")
        if tracker.step() and step >= args.warmup:
            gamma = cubic_keep_ratio(step - args.warmup, args.prune_steps, args.keep)
            sel = select_blocks(tracker.scores(), keep_ratio=gamma, kinds=("head", "neuron"), score=args.score,
                                allocation=args.allocation, calibration=args.calibration, min_per_site=1,
                                previous=masks)
            masks = update_masks(masks, sel, alpha=args.alpha)
            if handle is None:
                handle = apply_masks(model, masks, layout=sel.layout)
            else:
                handle.update(masks)
            if (step - args.warmup) % (4 * args.update_frequency) == 0 or step == args.steps:
                zero = {k: int((m == 0).sum()) for k, m in masks.items()}
                print(f"step {step:4d}  loss {loss.item():.3f}  gamma {gamma:.3f}  selected heads "
                      f"{int(sel.head.sum())}/{sel.head.numel()} neurons {int(sel.neuron.sum())}/{sel.neuron.numel()}"
                      f"  masks at 0: heads {zero['head']} neurons {zero['neuron']}")
    tracker.detach()
    assert sel is not None and handle is not None and masks is not None
    masked_acc = accuracy(model, test_ids, test_y)
    soft = sum(int(((m > 0) & (m < 1)).sum()) for m in masks.values())
    print(f"training done in {time.perf_counter() - t0:.1f}s; masked model test accuracy {masked_acc:.3f} "
          f"({soft} masks still between 0 and 1)")

    # physical pruning: keep exactly the blocks whose mask is not 0 (soft masks above 0 are folded to 1)
    handle.remove()
    hard = type(sel)(masks["head"] > 0, masks["neuron"] > 0, None, sel.params_kept, sel.budget, sel.params_total,
                     sel.layout, sel.kinds)
    with apply_masks(model, hard):
        hard_acc = accuracy(model, test_ids, test_y)
    before = count_parameters(model)
    report = prune_model(model, hard)
    after = count_parameters(model)
    pruned_acc = accuracy(model, test_ids, test_y)
    heads = [layer.attention.self.num_attention_heads for layer in model.bert.encoder.layer]
    ffn = [layer.intermediate.dense.out_features for layer in model.bert.encoder.layer]
    print(f"pruned: heads per layer {heads} (of 4), neurons per layer {ffn} (of 128), "
          f"{report.placeholder_heads} placeholder heads")
    pc = sel.layout.param_count
    kept_w = float(pc["head"][hard.head].sum() + pc["neuron"][hard.neuron].sum())
    print(f"parameters (all, biases and embeddings included): {before:,} -> {after:,} ({after / before:.1%}); "
          f"head+neuron weights: {sel.params_total:,.0f} -> {kept_w:,.0f} ({kept_w / sel.params_total:.1%}, "
          f"target {args.keep:.0%})")
    print(f"test accuracy: dense after warm-up {dense_acc:.3f}, masked {masked_acc:.3f}, hard masks {hard_acc:.3f}, "
          f"physically pruned {pruned_acc:.3f}")


if __name__ == "__main__":
    main()
