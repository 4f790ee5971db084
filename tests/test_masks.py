"""apply_masks against weight-edited oracles; composition with the tracker; PEFT; errors."""

from __future__ import annotations

import copy
from typing import Dict

import pytest
import torch
import transformers as tf
from torch import nn

import apt_salience
from apt_salience.masks import MaskHandle, apply_masks
from apt_salience.selection import BlockLayout, select_blocks

D, HEADS, HD, FFN = 32, 4, 8, 24


def bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=50, hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS,
                        intermediate_size=FFN, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        max_position_embeddings=32, num_labels=2)
    return tf.BertForSequenceClassification(cfg).eval()


def llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=50, hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS,
                         num_key_value_heads=2, intermediate_size=FFN, max_position_embeddings=32)
    return tf.LlamaForCausalLM(cfg).eval()


IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))


def out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def site_names(model: nn.Module) -> Dict[str, list]:
    lay = BlockLayout.from_model(model)
    return {k: [n for n, _ in v] for k, v in lay.sites.items()}


def scale_oracle(model: nn.Module, masks: Dict[str, torch.Tensor]) -> nn.Module:
    """Independent oracle: fold the masks into the weights (head / neuron: input columns; hidden: output rows)."""
    ref = copy.deepcopy(model)
    mods = dict(ref.named_modules())
    names = site_names(model)
    with torch.no_grad():
        for kind, block in (("head", HD), ("neuron", 1)):
            if kind not in masks:
                continue
            per = masks[kind].view(len(names[kind]), -1)
            for name, m in zip(names[kind], per):
                mods[name].weight.mul_(m.repeat_interleave(block)[None, :])
        if "hidden" in masks:
            for name in names["head"] + names["neuron"]:
                mods[name].weight.mul_(masks["hidden"][:, None])
                if mods[name].bias is not None:
                    mods[name].bias.mul_(masks["hidden"])
    return ref


@pytest.mark.parametrize("make", [bert, llama])
def test_masks_equal_weight_oracle(make) -> None:  # type: ignore[no-untyped-def]
    model = make()
    layout = BlockLayout.from_model(model)
    g = torch.Generator().manual_seed(3)
    masks = {
        "head": (torch.rand(2 * HEADS, generator=g) > 0.4).float(),
        "neuron": torch.rand(2 * FFN, generator=g),  # soft masks too
        "hidden": (torch.rand(D, generator=g) > 0.2).float() * 0.7,
    }
    base = out(model)
    expect = out(scale_oracle(model, masks))  # before any hook: deepcopy would copy the hooks
    h = apply_masks(model, masks, layout=layout)
    masked = out(model)
    assert not torch.allclose(masked, base)
    assert torch.allclose(masked, expect, atol=1e-5)
    h.remove()
    assert torch.equal(out(model), base)
    h.remove()  # idempotent
    assert torch.equal(out(model), base)


def test_update_changes_masks_in_place() -> None:
    model = bert()
    layout = BlockLayout.from_model(model)
    base = out(model)
    m = torch.ones(2 * FFN)
    m[::3] = 0
    expect = out(scale_oracle(model, {"neuron": m}))
    with apply_masks(model, {"neuron": torch.ones(2 * FFN)}, layout=layout) as h:
        assert torch.equal(out(model), base)  # all-ones masks change nothing, bit for bit
        h.update({"neuron": m})
        assert torch.allclose(out(model), expect, atol=1e-6)
        assert torch.equal(h.masks()["neuron"], m)
        with pytest.raises(ValueError, match="not masked"):
            h.update({"head": torch.zeros(2 * HEADS)})
    assert not h.active
    assert torch.equal(out(model), base)


def _scores(model: nn.Module, **cfg) -> apt_salience.SalienceScores:  # type: ignore[no-untyped-def]
    tracker = apt_salience.attach(model, {"ema_beta": 0.0, **cfg})
    model.train()
    model(input_ids=IDS, labels=torch.tensor([0, 1])).loss.backward()
    tracker.step()
    tracker.detach()
    model.eval()
    return tracker.scores()


def test_selection_masks_and_tracker_compose() -> None:
    model = bert()
    scores = _scores(model)
    sel = select_blocks(scores, keep_ratio=0.5, kinds=("head", "neuron"), score="salience")
    assert (~sel.head).any() and (~sel.neuron).any()
    base = out(model)
    expect = out(scale_oracle(model, sel.masks(torch.float32)))
    for order in ("masks_first", "tracker_first"):
        if order == "masks_first":
            h = apply_masks(model, sel)
            tracker = apt_salience.attach(model, {"ema_beta": 0.0})
        else:
            tracker = apt_salience.attach(model, {"ema_beta": 0.0})
            h = apply_masks(model, sel)
        model.train()
        model(input_ids=IDS, labels=torch.tensor([0, 1])).loss.backward()
        model.zero_grad()
        assert tracker.step()
        s = tracker.scores()
        # the tracker observed the masked tensors: pruned heads and neurons have zero salience
        assert torch.all(s.head.salience[~sel.head] == 0) and torch.all(s.head.salience[sel.head] > 0)
        assert torch.all(s.neuron.salience[~sel.neuron] == 0)
        model.eval()
        masked = out(model)
        assert torch.allclose(masked, expect, atol=1e-5)
        h.remove()
        assert torch.equal(out(model), base)  # masks detached, tracker still attached: bit-exact
        tracker.detach()
        assert torch.equal(out(model), base)


def test_hidden_masks_seen_by_tracker() -> None:
    model = bert()
    layout = BlockLayout.from_model(model)
    hm = torch.ones(D)
    hm[:5] = 0
    with apply_masks(model, {"hidden": hm}, layout=layout):
        s = _scores(model)
    assert torch.all(s.hidden.salience[:5] == 0) and torch.all(s.hidden.salience[5:] > 0)


def test_peft_wrapped_sites_mask_base_and_adapter() -> None:
    import peft  # a test dependency: a missing peft must fail, not skip
    model = bert()
    cfg = peft.LoraConfig(r=4, target_modules=["query", "value", "dense"], lora_alpha=8, init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg)
    scores = _scores(pm)
    assert scores.head.sites[0][0].startswith("base_model.model.")
    sel = select_blocks(scores, keep_ratio=0.5, kinds=("head", "neuron"))
    base = out(pm)
    with apply_masks(pm, sel):
        masked = out(pm)
    assert not any(m._forward_pre_hooks for m in pm.modules())
    # oracle: zero the pruned input columns of the base weight AND of lora_A at every site
    ref = copy.deepcopy(pm)
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for kind, block in (("head", HD), ("neuron", 1)):
            for name, m in sel.by_site(kind).items():
                cols = m.float().repeat_interleave(block)
                mods[name].base_layer.weight.mul_(cols[None, :])
                mods[name].lora_A["default"].weight.mul_(cols[None, :])
    assert torch.allclose(masked, out(ref), atol=1e-5)
    assert torch.equal(out(pm), base)
    # a selection made on the PEFT model applies to the merged model (prefix removed)
    merged = pm.merge_and_unload()
    with apply_masks(merged, sel):
        assert torch.allclose(out(merged), masked, atol=1e-5)


def test_masks_from_another_model_are_rejected() -> None:
    small = bert()
    scores = _scores(small)
    sel = select_blocks(scores, keep_ratio=0.5)
    with pytest.raises(ValueError, match="not in this model|another model"):
        apply_masks(llama(), sel)
    torch.manual_seed(0)
    wide = tf.BertForSequenceClassification(tf.BertConfig(vocab_size=50, hidden_size=D, num_hidden_layers=2,
                                                          num_attention_heads=HEADS, intermediate_size=FFN + 4))
    with pytest.raises(ValueError, match="another model"):
        apply_masks(wide, sel)
    with pytest.raises(ValueError, match="layout"):
        apply_masks(small, {"head": torch.ones(8)})
    with pytest.raises(ValueError, match="same model"):
        apply_masks(small, {"head": torch.ones(9)}, layout=sel.layout)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in wide.modules())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in small.modules())
    assert isinstance(apply_masks(small, sel), MaskHandle)


def test_head_block_size_read_from_model_when_an_old_scores_file_lacks_it() -> None:
    from apt_salience.scores import SalienceScores

    model = bert()
    scores = _scores(model)
    meta = {k: v for k, v in scores.meta.items() if k != "block_size"}
    old = {"format": "apt_salience.scores/1", "step": scores.step, "d_model": scores.d_model, "meta": meta,
           **{k: b.to_dict() for k, b in scores.kinds().items()}}
    sel = select_blocks(SalienceScores.from_dict(old), keep_ratio=0.5, kinds=("head", "neuron"), score="salience")
    assert not any(name in sel.layout.block_size for name, _ in sel.layout.sites["head"])
    ref = select_blocks(scores, keep_ratio=0.5, kinds=("head", "neuron"), score="salience")
    with apply_masks(model, ref):
        expect = out(model)
    with apply_masks(model, sel):
        assert torch.equal(out(model), expect)
