"""``apt_salience.cli.train``: the fine-tune loop and the accuracy of the command line and the demo.

Oracles: the model's own forward on the tokenizer's output (accuracy counted by hand), the
parameters compared before and after, and a recorder that sees what every tracker is handed.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, List

import pytest
import torch
import transformers as tf

from apt_salience.cli.train import evaluate, finetune
from tests._cli import ROWS, tokenizer

TEXTS = [t for t, _ in ROWS]
LABELS = [int(lab == "pos") for _, lab in ROWS]


def _model() -> Any:
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    cfg.num_labels = 2
    return tf.BertForSequenceClassification(cfg)


class Recorder:
    """Stands in for a tracker: records the masks it is handed and the forwards they cover."""

    def __init__(self, model: Any) -> None:
        self.masks: List[torch.Tensor] = []
        self.seen: List[torch.Tensor] = []  # attention_mask of every forward run inside token_mask
        self.steps = 0
        self._inside = False
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: Any, kwargs: Any) -> None:
        if self._inside:
            self.seen.append(kwargs["attention_mask"].clone())

    @contextlib.contextmanager
    def token_mask(self, mask: torch.Tensor) -> Iterator["Recorder"]:
        self.masks.append(mask.clone())
        self._inside = True
        try:
            yield self
        finally:
            self._inside = False

    def step(self) -> bool:
        self.steps += 1
        return True


def test_finetune_trains_the_trainable_weights_and_feeds_every_tracker() -> None:
    model = _model()
    tok = tokenizer()
    frozen = model.bert.embeddings.word_embeddings.weight
    frozen.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rec = Recorder(model)
    calls: List[int] = []
    losses = finetune(model, tok, TEXTS, LABELS, steps=3, batch_size=4, lr=1e-2, seed=1, trackers=[rec],
                      progress=False, on_step=lambda step, loss: calls.append(step))
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
    assert calls == [0, 1, 2] and rec.steps == 3
    assert len(rec.masks) == 3 and all(m.shape[0] == 4 for m in rec.masks)
    for handed, used in zip(rec.masks, rec.seen):  # the tracker's mask is the model's attention mask
        assert torch.equal(handed, used)
    assert not model.training  # left in eval mode
    after = dict(model.named_parameters())
    assert torch.equal(after["bert.embeddings.word_embeddings.weight"], before["bert.embeddings.word_embeddings.weight"])
    assert not torch.equal(after["classifier.weight"], before["classifier.weight"])
    # same seed, same run: batches, dropout and updates are seeded
    again = _model()
    again.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    assert finetune(again, tok, TEXTS, LABELS, steps=3, batch_size=4, lr=1e-2, seed=1, progress=False) == losses


def test_finetune_zero_steps_and_bad_arguments() -> None:
    model, tok = _model(), tokenizer()
    before = [p.detach().clone() for p in model.parameters()]
    assert finetune(model, tok, TEXTS, LABELS, steps=0, progress=False) == []
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for kwargs, match in [({"steps": -1}, "steps"), ({"steps": True}, "steps"), ({"steps": 1, "batch_size": 0}, "batch_size")]:
        with pytest.raises(ValueError, match=match):
            finetune(model, tok, TEXTS, LABELS, progress=False, **kwargs)
    with pytest.raises(ValueError, match="equal length"):
        finetune(model, tok, TEXTS, LABELS[:-1], steps=1, progress=False)


def test_evaluate_counts_correct_predictions_and_restores_the_mode() -> None:
    model, tok = _model(), tokenizer()
    model.train()
    with torch.no_grad():
        model.eval()
        enc = tok(TEXTS, padding=True, return_tensors="pt")
        pred = model(**enc).logits.argmax(-1).tolist()
        model.train()
    labels = [1 - p if i % 3 == 0 else p for i, p in enumerate(pred)]  # every third one wrong, by construction
    expected = sum(int(p == y) for p, y in zip(pred, labels)) / len(labels)
    assert expected == pytest.approx(6 / 10)
    assert evaluate(model, tok, TEXTS, labels, batch_size=3) == pytest.approx(expected)  # length-sorted batches of 3
    assert model.training
    with pytest.raises(ValueError, match="non-empty"):
        evaluate(model, tok, [], [])

