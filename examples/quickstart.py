"""Quick start: attach a SalienceTracker to a tiny BERT, train a few steps, print the top and bottom blocks.

Runs in seconds on a CPU, downloads nothing (the model is built from a config):

    python examples/quickstart.py
"""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification

import apt_salience


def main(steps: int = 12, accumulation: int = 2) -> apt_salience.SalienceScores:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=128, num_labels=2)
    model = BertForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    # a toy task: is token 7 in the (padded) sequence?
    def batch(n: int = 16, length: int = 12):
        ids = torch.randint(10, 200, (n, length))
        lengths = torch.randint(4, length + 1, (n,))
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        labels = torch.randint(0, 2, (n,))
        ids[labels == 1, 1] = 7
        return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}

    tracker = apt_salience.attach(model, {"update_frequency": 4, "ema_beta": 0.85})
    print(tracker)
    try:
        for step in range(steps):
            for _ in range(accumulation):  # gradient accumulation: one tracker step per optimizer step
                micro = batch()
                with tracker.token_mask(micro["attention_mask"]):  # padding excluded from the statistics
                    loss = model(**micro).loss / accumulation
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if tracker.step():
                print(f"step {step + 1}: reading published, loss {loss.item() * accumulation:.3f}")
        scores = tracker.scores()
    finally:
        tracker.detach()

    layers = {name: layer for name, layer in scores.meta["layers"].items()}
    for kind in ("head", "neuron"):
        blocks = getattr(scores, kind)
        labels = [f"{layers[name].split('.')[-1]}:{i}" for name, n in blocks.sites for i in range(n)]
        order = torch.argsort(blocks.density, descending=True)
        top = ", ".join(f"layer {labels[i]} ({blocks.density[i]:.2e})" for i in order[:3].tolist())
        bottom = ", ".join(f"layer {labels[i]} ({blocks.density[i]:.2e})" for i in order[-3:].tolist())
        print(f"{kind}s by outlier-aware density -- top: {top}")
        print(f"{kind}s by outlier-aware density -- bottom: {bottom}")
    print(f"hidden dims: {len(scores.hidden)}; densest dim {int(scores.hidden.density.argmax())}")
    return scores


if __name__ == "__main__":
    main()
