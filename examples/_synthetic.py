"""The synthetic task of the pruning and tuning examples: is the majority of a sequence's tokens from the
lower half of the vocabulary? A tiny BERT classifier (from a config, no download) and its test accuracy."""

from __future__ import annotations

from typing import Tuple

import torch
import transformers as tf

VOCAB, SEQ = 40, 15


def task(n: int = 5120, n_test: int = 1024) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train ids, train labels, test ids, test labels), from torch's global seed."""
    ids = torch.randint(2, VOCAB, (n, SEQ))
    labels = ((ids < (VOCAB + 2) // 2).sum(1) > SEQ // 2).long()
    return ids[n_test:], labels[n_test:], ids[:n_test], labels[:n_test]


def tiny_bert() -> tf.BertForSequenceClassification:
    return tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=SEQ, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def accuracy(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        acc = float((model(input_ids=ids).logits.argmax(-1) == labels).float().mean())
    model.train(was)
    return acc
