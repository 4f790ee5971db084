"""Tiny Hugging Face models built from config objects (no downloads), one per architecture preset."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import transformers as tf

VOCAB = 64
HIDDEN = 32
HEADS = 4
HEAD_DIM = 8
FFN = 48


def _common_drop() -> Dict[str, Any]:
    return {}


def make_model(arch: str, seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """A tiny randomly initialised model of the given preset (``layers`` blocks), dropout off, in train mode."""
    torch.manual_seed(seed)
    if arch in ("bert", "roberta"):
        cfg_cls = tf.BertConfig if arch == "bert" else tf.RobertaConfig
        cfg = cfg_cls(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
                      intermediate_size=FFN, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      max_position_embeddings=64, num_labels=3, pad_token_id=1 if arch == "roberta" else 0)
        model_cls = tf.BertForSequenceClassification if arch == "bert" else tf.RobertaForSequenceClassification
        m = model_cls(cfg)
    elif arch in ("llama", "mistral", "qwen2"):
        cfg_cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[arch]
        cfg = cfg_cls(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
                      num_key_value_heads=2, intermediate_size=FFN, max_position_embeddings=64)
        model_cls = {"llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM, "qwen2": tf.Qwen2ForCausalLM}[arch]
        m = model_cls(cfg)
    elif arch in ("t5", "t5-gated"):
        cfg = tf.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=HEAD_DIM + 2, num_heads=HEADS, d_ff=FFN, num_layers=layers,
                          num_decoder_layers=1, dropout_rate=0.0,
                          feed_forward_proj="gated-gelu" if arch == "t5-gated" else "relu",
                          decoder_start_token_id=0, pad_token_id=0)
        m = tf.T5ForConditionalGeneration(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=layers, n_head=HEADS, n_inner=FFN, n_positions=64,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        m = tf.GPT2LMHeadModel(cfg)
    elif arch == "opt":
        cfg = tf.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
                           ffn_dim=FFN, max_position_embeddings=64, word_embed_proj_dim=HIDDEN, dropout=0.0,
                           attention_dropout=0.0, activation_dropout=0.0)
        m = tf.OPTForCausalLM(cfg)
    elif arch == "vit":
        cfg = tf.ViTConfig(hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS, intermediate_size=FFN,
                           image_size=8, patch_size=4, num_channels=3, num_labels=3, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
        m = tf.ViTForImageClassification(cfg)
    else:
        raise KeyError(arch)
    m.train()
    return m


def head_dim_of(arch: str) -> int:
    return HEAD_DIM + 2 if arch.startswith("t5") else HEAD_DIM


def make_batch(arch: str, gen: torch.Generator, batch: int = 3, seq: int = 6,
               pad: bool = True) -> Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor]]:
    """Inputs for one micro-batch and the token mask (None where the architecture takes none)."""
    if arch == "vit":
        return {"pixel_values": torch.randn(batch, 3, 8, 8, generator=gen),
                "labels": torch.randint(0, 3, (batch,), generator=gen)}, None
    ids = torch.randint(2, VOCAB, (batch, seq), generator=gen)
    if arch.startswith("t5"):
        dec = torch.randint(2, VOCAB, (batch, seq - 2), generator=gen)
        return {"input_ids": ids, "labels": dec}, None
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        mask[0, seq - 2 :] = 0
        mask[1, seq - 1 :] = 0
    if arch in ("bert", "roberta"):
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (batch,), generator=gen)}, mask
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, mask


ARCHS = ["bert", "roberta", "llama", "mistral", "qwen2", "t5", "t5-gated", "gpt2", "opt", "vit"]
