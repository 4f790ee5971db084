"""Prune a tiny BERT to half its head+FFN parameters while fine-tuning it (APT's schedule; CPU, about a minute).

The pruner ramps the kept share down (cubic) from step --start over --ramp steps, moves its masks by
--alpha at every reading, and finalize() removes the pruned heads and neurons physically. The task
(examples/_synthetic.py): is the majority of a sequence's tokens from the lower half of the vocabulary?

Run:  python examples/prune_during_finetune.py [--keep 0.5] [--steps 300] [--start 60] [--ramp 120] [--alpha 0.05]
"""

from __future__ import annotations

import argparse

import torch
from _synthetic import accuracy, task, tiny_bert

import apt_salience

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
for flag, kind, default in (("--keep", float, 0.5), ("--steps", int, 300), ("--start", int, 60),
                            ("--ramp", int, 120), ("--alpha", float, 0.05)):
    ap.add_argument(flag, type=kind, default=default)
args = ap.parse_args()
torch.manual_seed(0)
torch.set_num_threads(1)
train_ids, train_y, test_ids, test_y = task()
model = tiny_bert()

opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
tracker = apt_salience.attach(model, apt_salience.RECOMMENDED_CONFIG)   # fisher salience + scaled kurtosis
pruner = apt_salience.AdaptivePruner(model, tracker, args.keep, start_step=args.start, ramp_steps=args.ramp,
                                     alpha=args.alpha)
for step in range(1, args.steps + 1):
    i = torch.randint(0, train_ids.shape[0], (64,))
    loss = model(input_ids=train_ids[i], labels=train_y[i]).loss
    loss.backward()
    opt.step(); opt.zero_grad()
    tracker.step(); pruner.step()                                         # once per optimizer step, in this order
    if step % 60 == 0:
        print(f"step {step:4d}  loss {loss.item():.3f}  scheduled keep {pruner.current_keep_ratio:.3f}  "
              f"selection keeps {pruner.kept_share:.1%}  masks > 0 {pruner.alive_share:.1%}  "
              f"accuracy {accuracy(model, test_ids, test_y):.3f}")
masked = accuracy(model, test_ids, test_y)
report = pruner.finalize()                                                # hard masks -> blocks removed
tracker.detach()
heads = [layer.attention.self.num_attention_heads for layer in model.bert.encoder.layer]
ffn = [layer.intermediate.dense.out_features for layer in model.bert.encoder.layer]
print(f"pruned: heads per layer {heads} (of 4), FFN neurons per layer {ffn} (of 128)")
print(f"parameters {report.params_before:,} -> {report.params_after:,}; test accuracy masked {masked:.3f}, "
      f"pruned {accuracy(model, test_ids, test_y):.3f}")
