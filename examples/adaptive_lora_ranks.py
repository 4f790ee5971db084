"""Adaptive LoRA ranks (APT's tuner) on a tiny BERT with PEFT LoRA adapters (CPU, well under a minute).

What it does:
1. builds a small BERT classifier from a config (no download), wraps it with PEFT LoRA
   (rank 2 on query, value, the attention output and the FFN layers) and fine-tunes it on a synthetic task (is the
   majority of the tokens from the lower half of the vocabulary?), with the tracker attached;
2. at set steps, the tuning budget grows (``Delta_t -> Delta_t'``): the adapters are ranked by
   importance (the sum over their ranks of the salience of the ``adapter`` kind) and the top
   half get ``r' = floor(r * Delta_t' / Delta_t)`` ranks. New ``lora_A`` rows are random, new
   ``lora_B`` columns zero, so the model's output does not change (checked); the optimizer is
   rebuilt and the tracker refreshed;
3. prints the rank allocation after each growth and the test accuracy.

Run:  python examples/adaptive_lora_ranks.py [--steps 240] [--grow-at 60 120 180]
"""

from __future__ import annotations

import argparse
import time

import peft
import torch
import transformers as tf

import apt_salience
from apt_salience.tuning import apply_rank_plan, lora_ranks, plan_rank_growth, rank_adapters, rebuild_optimizer

VOCAB, SEQ = 40, 15


def make_data(n: int, gen: torch.Generator):  # type: ignore[no-untyped-def]
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


def short(name: str) -> str:
    """'base_model.model.bert.encoder.layer.1.attention.self.query' -> 'L1.query'."""
    parts = name.split(".")
    i = parts.index("layer")
    rest = ".".join(parts[i + 2:])
    rest = {"attention.self.query": "query", "attention.self.value": "value", "attention.output.dense": "attn_out",
            "intermediate.dense": "ffn_up", "output.dense": "ffn_down"}.get(rest, rest)
    return f"L{parts[i + 1]}.{rest}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--grow-at", type=int, nargs="*", default=[60, 120, 180], help="steps at which the budget grows")
    ap.add_argument("--growth", type=float, default=2.0, help="Delta_t' / Delta_t at each growth step")
    ap.add_argument("--rank", type=int, default=2, help="initial LoRA rank")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    train_ids, train_y = make_data(4096, gen)
    test_ids, test_y = make_data(1024, gen)
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=SEQ, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base = tf.BertForSequenceClassification(cfg)
    lcfg = peft.LoraConfig(task_type="SEQ_CLS", r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                           target_modules=r".*layer\.\d+\.(attention\.self\.(query|value)|attention\.output\.dense|"
                                          r"intermediate\.dense|output\.dense)")
    model = peft.get_peft_model(base, lcfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    tracker = apt_salience.attach(model, {"update_frequency": 10})
    ranks = lora_ranks(model)
    budget = float(sum(ranks.values()))  # the tuning budget, in ranks (proportional to LoRA parameters here)
    print(f"LoRA on {len(ranks)} layers at rank {args.rank}; trainable parameters "
          f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}")
    t0 = time.perf_counter()
    batch = 64
    for step in range(1, args.steps + 1):
        i = torch.randint(0, train_ids.shape[0], (batch,), generator=gen)
        loss = model(input_ids=train_ids[i], labels=train_y[i]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        tracker.step()
        if step in args.grow_at:
            scores = tracker.scores()
            new_budget = budget * args.growth
            plan = plan_rank_growth(scores, new_budget=new_budget, old_budget=budget)
            top = [short(n) for n, _ in rank_adapters(scores)[: len(plan) // 2]]
            probe = test_ids[:8]
            model.eval()
            with torch.no_grad():
                before = model(input_ids=probe).logits
            grown = apply_rank_plan(model, plan, generator=gen)
            with torch.no_grad():
                after = model(input_ids=probe).logits
            model.train()
            opt = rebuild_optimizer(opt, model)
            tracker.refresh()
            budget = new_budget
            print(f"step {step:4d}  loss {loss.item():.3f}  acc {accuracy(model, test_ids, test_y):.3f}  "
                  f"budget x{args.growth:g}: grew {len(grown)} adapters (most important: {', '.join(top)}); "
                  f"max |output change| {float((after - before).abs().max()):.1e}")
            alloc = lora_ranks(model)
            print("           ranks: " + "  ".join(f"{short(n)}={r}" for n, r in alloc.items()))
    tracker.detach()
    print(f"done in {time.perf_counter() - t0:.1f}s: test accuracy {accuracy(model, test_ids, test_y):.3f}, "
          f"trainable parameters {sum(p.numel() for p in model.parameters() if p.requires_grad):,}, "
          f"total rank {sum(lora_ranks(model).values())}")


if __name__ == "__main__":
    main()
