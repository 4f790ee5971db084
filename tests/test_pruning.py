"""prune_model: equals the masked model, hand-computed parameter counts, GQA groups, tracker refresh, save/load."""

from __future__ import annotations

from typing import List

import pytest
import torch
import transformers as tf
from torch import nn

import apt_salience
from apt_salience.masks import apply_masks
from apt_salience.pruning import (
    count_parameters,
    load_pruned,
    prune_model,
    pruned_shapes,
    save_pruned,
)
from apt_salience.selection import BlockLayout, Selection, select_blocks

D, HEADS, HD, FFN, KV = 32, 4, 8, 24, 2
IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(2))


def bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=50, hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS,
                        intermediate_size=FFN, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        max_position_embeddings=32, num_labels=2)
    return tf.BertForSequenceClassification(cfg).eval()


def llama(seed: int = 0, layers: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=50, hidden_size=D, num_hidden_layers=layers, num_attention_heads=HEADS,
                         num_key_value_heads=KV, intermediate_size=FFN, max_position_embeddings=32)
    return tf.LlamaForCausalLM(cfg).eval()


def out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def selection(model: nn.Module, heads: List[bool], neurons: torch.Tensor) -> Selection:
    return Selection(torch.tensor(heads), neurons, None, 0.0, 1.0, 1.0, BlockLayout.from_model(model))


def masked_output(model: nn.Module, sel: Selection) -> torch.Tensor:
    with apply_masks(model, sel):
        return out(model)


def test_bert_pruned_equals_masked_and_counts_match_hand_numbers() -> None:
    model = bert()
    heads = [True, False, True, False, False, True, True, True]  # layer 0 loses 2 heads, layer 1 one
    neurons = torch.ones(2 * FFN, dtype=torch.bool)
    neurons[[0, 5, 6, 30, 47]] = False  # 3 in layer 0, 2 in layer 1
    sel = selection(model, heads, neurons)
    expect = masked_output(model, sel)
    assert not torch.allclose(expect, out(model), atol=1e-4)  # the masks do change the output
    before = count_parameters(model)
    report = prune_model(model, sel)
    assert torch.allclose(out(model), expect, atol=1e-5)
    # head: q, k, v rows with biases + o columns = 4 * 8 * 32 + 3 * 8; neuron: up row + bias + down column = 2 * 32 + 1
    per_head, per_neuron = 4 * HD * D + 3 * HD, 2 * D + 1
    assert before - count_parameters(model) == 3 * per_head + 5 * per_neuron == report.params_removed
    assert (report.heads_removed, report.kv_heads_removed, report.neurons_removed, report.placeholder_heads) == (3, 3, 5, 0)
    layer0 = model.bert.encoder.layer[0]
    assert layer0.attention.self.num_attention_heads == 2 and layer0.attention.self.all_head_size == 2 * HD
    assert layer0.attention.self.query.weight.shape == (2 * HD, D)
    assert layer0.attention.output.dense.weight.shape == (D, 2 * HD)
    assert layer0.intermediate.dense.weight.shape == (FFN - 3, D) and layer0.output.dense.weight.shape == (D, FFN - 3)
    # weights only (what the selection's formula counts): the 4 * d_head * d_model and 2 * d_model per block
    assert sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight")) == (
        sum(p.numel() for n, p in bert().named_parameters() if n.endswith("weight")) - 3 * 4 * HD * D - 5 * 2 * D
    )


def test_selection_from_scores_prunes_by_its_own_count() -> None:
    model = bert(1)
    tracker = apt_salience.attach(model, {"ema_beta": 0.0})
    model.train()
    model(input_ids=IDS, labels=torch.tensor([0, 1])).loss.backward()
    tracker.step()
    tracker.detach()
    model.eval()
    sel = select_blocks(tracker.scores(), keep_ratio=0.6, kinds=("head", "neuron"), score="salience", min_per_site=1)
    w_before = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    expect = masked_output(model, sel)
    report = prune_model(model, sel)
    assert torch.allclose(out(model), expect, atol=1e-5)
    w_after = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    assert w_before - w_after == pytest.approx(sel.params_total - sel.params_kept)
    assert report.heads_removed == int((~sel.head).sum()) and report.neurons_removed == int((~sel.neuron).sum())


def test_llama_gqa_groups_placeholders_and_counts() -> None:
    model = llama()
    # layer 0: heads 0, 1 (all of KV group 0) go -> the group goes
    # layer 1: heads 0 and 2 go -> one query head per group stays, groups kept, n_rep 1
    # layer 2: only head 3 goes -> groups would keep 2 and 1 heads: head 3 stays as a zeroed placeholder
    heads = [False, False, True, True, False, True, False, True, True, True, True, False]
    neurons = torch.ones(3 * FFN, dtype=torch.bool)
    neurons[[1, 2, FFN + 7]] = False
    sel = selection(model, heads, neurons)
    expect = masked_output(model, sel)
    assert not torch.allclose(expect, out(model), atol=1e-4)
    before = count_parameters(model)
    report = prune_model(model, sel)
    assert torch.allclose(out(model), expect, atol=1e-5)
    a = [layer.self_attn for layer in model.model.layers]
    assert (a[0].q_proj.out_features, a[0].k_proj.out_features, a[0].v_proj.out_features) == (2 * HD, HD, HD)
    assert a[0].num_key_value_groups == 2
    assert (a[1].q_proj.out_features, a[1].k_proj.out_features, a[1].num_key_value_groups) == (2 * HD, 2 * HD, 1)
    assert (a[2].q_proj.out_features, a[2].k_proj.out_features, a[2].num_key_value_groups) == (4 * HD, 2 * HD, 2)
    assert torch.all(a[2].o_proj.weight[:, 3 * HD :] == 0)  # the placeholder contributes nothing
    # LLaMA has no biases. Query head: q rows + o columns = 2 * 8 * 32; KV head: k and v rows = 2 * 8 * 32;
    # gated neuron: gate row + up row + down column = 3 * 32
    removed = (2 + 2) * 2 * HD * D + 1 * 2 * HD * D + 3 * 3 * D
    assert before - count_parameters(model) == removed == report.params_removed
    assert (report.heads_removed, report.kv_heads_removed, report.placeholder_heads, report.neurons_removed) == (4, 1, 1, 3)


def test_empty_attention_keeps_one_zeroed_placeholder() -> None:
    model = bert()
    heads = [False] * 4 + [True] * 4
    sel = selection(model, heads, torch.ones(2 * FFN, dtype=torch.bool))
    expect = masked_output(model, sel)
    report = prune_model(model, sel)
    assert torch.allclose(out(model), expect, atol=1e-5)
    assert model.bert.encoder.layer[0].attention.self.num_attention_heads == 1
    assert report.placeholder_heads == 1 and report.heads_removed == 3


def test_tracker_refresh_reports_new_counts() -> None:
    model = llama(layers=2)
    tracker = apt_salience.attach(model, {"ema_beta": 0.0})
    heads = [False, False, True, True, True, False, True, False]
    neurons = torch.arange(2 * FFN) % 4 != 0
    sel = selection(model, heads, neurons)
    prune_model(model, sel)
    tracker.refresh()
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert tracker.step()
    s = tracker.scores()
    tracker.detach()
    assert [c for _, c in s.head.sites] == [2, 2]
    assert [c for _, c in s.neuron.sites] == [FFN - 6, FFN - 6]
    # layer 0: 2 query heads on 1 KV head -> (2 + 2 * 1/2) * 8 * 32; layer 1: 2 on 2 -> (2 + 2) * 8 * 32
    assert s.head.param_count.tolist() == [3 * HD * D] * 2 + [4 * HD * D] * 2
    assert s.neuron.param_count.tolist() == [3.0 * D] * (2 * (FFN - 6))
    assert s.hidden.param_count[0].item() == 2 * 3 * HD + 2 * 4 * HD + 3 * 2 * (FFN - 6)


@pytest.mark.parametrize("make", [bert, llama])
def test_save_and_load_round_trip(make, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = make()
    n_layers = len(BlockLayout.from_model(model).sites["head"])
    g = torch.Generator().manual_seed(5)
    heads = (torch.rand(n_layers * HEADS, generator=g) > 0.5).tolist()
    heads[:4] = [True, True, False, False]
    sel = selection(model, heads, torch.rand(n_layers * FFN, generator=g) > 0.3)
    prune_model(model, sel)
    shapes = pruned_shapes(model)
    save_pruned(model, tmp_path / "pruned")
    again = load_pruned(tmp_path / "pruned")
    assert type(again) is type(model)
    assert pruned_shapes(again) == shapes
    assert torch.allclose(out(again), out(model), atol=1e-6)
    assert count_parameters(again) == count_parameters(model)


def test_bad_inputs() -> None:
    model = bert()
    gpt = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=50, n_embd=D, n_layer=1, n_head=HEADS, n_positions=16))
    hid = torch.ones(D, dtype=torch.bool)
    hid[0] = False
    with pytest.raises(ValueError, match="hidden dimensions physically for .*'gpt2'"):  # BERT / LLaMA only
        prune_model(gpt, Selection(None, None, hid, 0.0, 1.0, 1.0, BlockLayout.from_model(gpt)))
    other = selection(llama(), [True] * 12, torch.ones(3 * FFN, dtype=torch.bool))
    with pytest.raises(ValueError, match="not in this model|another model"):
        prune_model(model, other)
    wider = tf.BertForSequenceClassification(tf.BertConfig(vocab_size=50, hidden_size=D, num_hidden_layers=2,
                                                           num_attention_heads=HEADS, intermediate_size=FFN + 8))
    sel = selection(model, [True] * 8, torch.ones(2 * FFN, dtype=torch.bool))
    before = [p.shape for p in wider.parameters()]
    with pytest.raises(ValueError, match="another model"):
        prune_model(wider, sel)
    assert [p.shape for p in wider.parameters()] == before  # nothing half-pruned
    import peft  # a test dependency: a missing peft must fail, not skip
    pm = peft.get_peft_model(bert(), peft.LoraConfig(r=2, target_modules=["dense"]))
    psel = Selection(torch.ones(8, dtype=torch.bool), torch.ones(2 * FFN, dtype=torch.bool), None, 0.0, 1.0, 1.0,
                     BlockLayout.from_model(pm))
    with pytest.raises(ValueError, match="merge_and_unload"):
        prune_model(pm, psel)


def test_pruned_model_trains_with_rebuilt_optimizer() -> None:
    model = bert()
    sel = selection(model, [True, False] * 4, torch.arange(2 * FFN) % 2 == 0)
    prune_model(model, sel)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = model.bert.encoder.layer[0].attention.self.query.weight
    w0 = w.detach().clone()
    model(input_ids=IDS, labels=torch.tensor([0, 1])).loss.backward()
    opt.step()
    assert not torch.equal(w.detach(), w0)


def _family(arch: str) -> nn.Module:
    torch.manual_seed(3)
    common = dict(vocab_size=50, hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS,
                  intermediate_size=FFN, max_position_embeddings=32)
    if arch in ("bert", "roberta"):
        cls = tf.BertConfig if arch == "bert" else tf.RobertaConfig
        cfg = cls(**common, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2, pad_token_id=1)
        return (tf.BertForSequenceClassification if arch == "bert" else tf.RobertaForSequenceClassification)(cfg).eval()
    cfg_cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[arch]
    model_cls = {"llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM, "qwen2": tf.Qwen2ForCausalLM}[arch]
    return model_cls(cfg_cls(**common, num_key_value_heads=KV)).eval()


@pytest.mark.parametrize("arch", ["roberta", "mistral", "qwen2"])
def test_other_families_prune_like_masks_and_round_trip(arch: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = _family(arch)
    tracker = apt_salience.attach(model, {"ema_beta": 0.0})
    model.train()
    kwargs = {"labels": torch.tensor([0, 1])} if arch == "roberta" else {"labels": IDS}
    model(input_ids=IDS, **kwargs).loss.backward()
    tracker.step()
    model.eval()
    sel = select_blocks(tracker.scores(), keep_ratio=0.5, kinds=("head", "neuron"), score="salience",
                        allocation="uniform", min_per_site=1)
    assert (~sel.head).any() and (~sel.neuron).any()
    with apply_masks(model, sel):
        expect = out(model)
    prune_model(model, sel)
    assert torch.allclose(out(model), expect, atol=1e-5)
    tracker.refresh()
    assert [s.num_blocks for s in tracker.sites if s.kind == "neuron"] == [
        int(m.sum()) for m in sel.by_site("neuron").values()]
    tracker.detach()
    save_pruned(model, tmp_path / arch)
    again = load_pruned(tmp_path / arch)
    assert torch.allclose(out(again), out(model), atol=1e-6)
