"""Prune a tiny BERT to half its head+FFN parameters while fine-tuning it (APT's schedule; CPU, about a minute).

The task is synthetic: is the majority of a sequence's tokens from the lower half of the vocabulary?
The pruner ramps the kept share down (cubic) from step --start over --ramp steps, moves its masks by
--alpha at every reading, and finalize() removes the pruned heads and neurons physically.

Run:  python examples/prune_during_finetune.py [--keep 0.5] [--steps 300] [--start 60] [--ramp 120] [--alpha 0.05]
"""

from __future__ import annotations

import argparse

import torch
import transformers as tf

import apt_salience

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
for flag, kind, default in (("--keep", float, 0.5), ("--steps", int, 300), ("--start", int, 60),
                            ("--ramp", int, 120), ("--alpha", float, 0.05)):
    ap.add_argument(flag, type=kind, default=default)
args = ap.parse_args()

torch.manual_seed(0)
torch.set_num_threads(1)
VOCAB, SEQ = 40, 15
ids = torch.randint(2, VOCAB, (5120, SEQ))
labels = ((ids < (VOCAB + 2) // 2).sum(1) > SEQ // 2).long()
test_ids, test_y, train_ids, train_y = ids[:1024], labels[:1024], ids[1024:], labels[1024:]
model = tf.BertForSequenceClassification(tf.BertConfig(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
    max_position_embeddings=SEQ, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def accuracy() -> float:
    model.eval()
    with torch.no_grad():
        acc = float((model(input_ids=test_ids).logits.argmax(-1) == test_y).float().mean())
    model.train()
    return acc


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
              f"selection keeps {pruner.kept_share:.1%}  masks > 0 {pruner.alive_share:.1%}  accuracy {accuracy():.3f}")
masked = accuracy()
report = pruner.finalize()                                                # hard masks -> blocks removed
tracker.detach()
heads = [layer.attention.self.num_attention_heads for layer in model.bert.encoder.layer]
ffn = [layer.intermediate.dense.out_features for layer in model.bert.encoder.layer]
print(f"pruned: heads per layer {heads} (of 4), FFN neurons per layer {ffn} (of 128)")
print(f"parameters {report.params_before:,} -> {report.params_after:,}; test accuracy masked {masked:.3f}, "
      f"pruned {accuracy():.3f}")
