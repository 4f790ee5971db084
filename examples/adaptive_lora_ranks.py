"""APT's whole method on a tiny BERT with PEFT LoRA: prune heads/neurons and grow the salient adapters' ranks.

The tuner grows the top half of the adapters (by salience) at --growths steps spread over the pruning
ramp, up to --budget times the initial LoRA parameters; the optimizer keeps training the grown weights
(no rebuild). At the end the adapters are merged and the pruned blocks removed. The task is
examples/_synthetic.py's (is the majority of the tokens from the lower half of the vocabulary?).

Run:  python examples/adaptive_lora_ranks.py [--steps 240] [--ramp 120] [--growths 3] [--budget 4] [--keep 0.6]
"""

from __future__ import annotations

import argparse

import peft
import torch
from _synthetic import accuracy, task, tiny_bert

import apt_salience
from apt_salience.tuning import lora_parameter_count

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
for flag, kind, default in (("--steps", int, 240), ("--ramp", int, 120), ("--growths", int, 3),
                            ("--budget", float, 4.0), ("--keep", float, 0.6)):
    ap.add_argument(flag, type=kind, default=default)
args = ap.parse_args()
torch.manual_seed(0)
torch.set_num_threads(1)
train_ids, train_y, test_ids, test_y = task()
model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, lora_dropout=0.0,
                                                         target_modules=["query", "value", "intermediate.dense"]))

opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
tracker = apt_salience.attach(model, apt_salience.RECOMMENDED_CONFIG)
pruner = apt_salience.AdaptivePruner(model, tracker, args.keep, ramp_steps=args.ramp, alpha=0.05)
tuner = apt_salience.AdaptiveTuner(model, tracker, opt, budget=int(args.budget * lora_parameter_count(model)),
                                   ramp_steps=args.ramp, num_growths=args.growths)
for step in range(1, args.steps + 1):
    i = torch.randint(0, train_ids.shape[0], (64,))
    loss = model(input_ids=train_ids[i], labels=train_y[i]).loss
    loss.backward()
    opt.step(); opt.zero_grad()
    tracker.step(); pruner.step()
    if tuner.step():                                                      # ranks grew at this step
        print(f"step {step:4d}  loss {loss.item():.3f}  LoRA parameters {tuner.lora_parameters:,} "
              f"(budget {tuner.budget:,})  ranks {sorted(tuner.ranks().values())}  "
              f"scheduled keep {pruner.current_keep_ratio:.3f}")
report = pruner.finalize()                                                # merges the adapters, then prunes
tracker.detach()
print(f"parameters {report.params_before:,} -> {report.params_after:,}; "
      f"test accuracy {accuracy(model, test_ids, test_y):.3f}")
