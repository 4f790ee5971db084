"""Adapter importance, the growth rule and grow_lora_rank on PEFT LoRA layers."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf
from torch import nn

import apt_salience
from apt_salience.scores import BlockScores, SalienceScores
from apt_salience.tuning import (
    adapter_importance,
    apply_rank_plan,
    grow_lora_rank,
    grown_rank,
    lora_ranks,
    plan_rank_growth,
    rank_adapters,
    rebuild_optimizer,
)

import peft  # a test dependency: a missing peft must fail, not skip

IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(4))
LABELS = torch.tensor([0, 1])


def lora_bert(r: int = 2, rslora: bool = False) -> nn.Module:
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        max_position_embeddings=32, num_labels=2)
    model = tf.BertForSequenceClassification(cfg)
    lcfg = peft.LoraConfig(r=r, lora_alpha=4, target_modules=["query", "value"], lora_dropout=0.0,
                           init_lora_weights=False, use_rslora=rslora)
    return peft.get_peft_model(model, lcfg)


def logits(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def adapter_scores(values, sites) -> SalienceScores:  # type: ignore[no-untyped-def]
    v = torch.tensor(values, dtype=torch.float32)
    b = BlockScores.build(salience=v, kurtosis=torch.zeros_like(v), outlier_aware=v * 2,
                          param_count=torch.ones_like(v), sites=sites)
    return SalienceScores(step=1, adapter=b)


def test_importance_is_sum_of_rank_salience_and_ranking() -> None:
    s = adapter_scores([1.0, 2.0, 0.5, 0.5, 4.0, 0.0, 1.0],
                       [("m.l0.q.lora_B.default", 2), ("m.l0.v.lora_B.default", 2), ("m.l1.q.lora_B.default", 3)])
    assert adapter_importance(s) == {"m.l0.q": 3.0, "m.l0.v": 1.0, "m.l1.q": 5.0}
    assert adapter_importance(s, "outlier_aware") == {"m.l0.q": 6.0, "m.l0.v": 2.0, "m.l1.q": 10.0}
    assert [n for n, _ in rank_adapters(s)] == ["m.l1.q", "m.l0.q", "m.l0.v"]
    with pytest.raises(ValueError, match="adapter"):
        adapter_importance(SalienceScores(step=1))


def test_growth_rule_values() -> None:
    assert grown_rank(8, 30, 20) == 12
    assert grown_rank(5, 3, 2) == 7  # floor(7.5)
    assert grown_rank(3, 10, 3) == 10
    assert grown_rank(4, 4, 4) == 4
    assert grown_rank(4, 1, 2) == 4  # never shrinks
    with pytest.raises(ValueError, match="old_budget"):
        grown_rank(4, 1, 0)
    with pytest.raises(ValueError, match="rank"):
        grown_rank(0, 2, 1)


def test_plan_grows_top_half_only() -> None:
    s = adapter_scores([1.0, 1.0, 9.0, 9.0, 0.0, 0.0, 3.0, 3.0, 2.0, 2.0],
                       [(f"m.{n}.lora_B.default", 2) for n in "abcde"])
    plan = plan_rank_growth(s, new_budget=5, old_budget=2)  # floor(2 * 2.5) = 5; top floor(5 / 2) = 2: b, d
    assert plan == {"m.a": 2, "m.b": 5, "m.c": 2, "m.d": 5, "m.e": 2}
    plan = plan_rank_growth(s, new_budget=5, old_budget=2, ranks={"m.b": 4})
    assert plan["m.b"] == 10
    with pytest.raises(ValueError, match="ranks names"):
        plan_rank_growth(s, 5, 2, ranks={"m.zz": 3})
    with pytest.raises(ValueError, match="fraction"):
        plan_rank_growth(s, 5, 2, fraction=0.0)


@pytest.mark.parametrize("rslora", [False, True])
def test_grow_lora_rank_keeps_outputs(rslora: bool) -> None:
    model = lora_bert(rslora=rslora)
    before = logits(model)
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    scaling = layer.scaling["default"]
    a_old = layer.lora_A["default"].weight.detach().clone()
    grow_lora_rank(layer, 6, generator=torch.Generator().manual_seed(0))
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    assert a.weight.shape == (6, 32) and b.weight.shape == (32, 6) and a.out_features == 6 and b.in_features == 6
    assert torch.equal(a.weight[:2], a_old) and torch.all(b.weight[:, 2:] == 0)
    assert a.weight[2:].abs().sum() > 0  # new A rows are random, not zero
    assert layer.r["default"] == 6 and layer.scaling["default"] == scaling
    denom = math.sqrt(6) if rslora else 6
    assert layer.lora_alpha["default"] == pytest.approx(scaling * denom)
    assert torch.allclose(logits(model), before, atol=1e-6)
    # the oracle: the adapter's delta computed by hand from the grown matrices equals the old one
    x = torch.randn(5, 32)
    new_delta = (x @ a.weight.t()) @ b.weight.t() * scaling
    old_delta = (x @ a_old.t()) @ b.weight[:, :2].t() * scaling
    assert torch.allclose(new_delta, old_delta, atol=1e-6)


def test_growth_then_training_with_rebuilt_optimizer_and_tracker() -> None:
    model = lora_bert()
    model.train()
    tracker = apt_salience.attach(model, {"ema_beta": 0.0})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=IDS, labels=LABELS).loss.backward()
    opt.step()
    opt.zero_grad()
    assert tracker.step()
    scores = tracker.scores()
    assert scores.adapter is not None
    imp = adapter_importance(scores)
    assert set(imp) == set(lora_ranks(model)) and len(imp) == 4
    plan = plan_rank_growth(scores, new_budget=3, old_budget=2)
    grown = apply_rank_plan(model, plan, generator=torch.Generator().manual_seed(1))
    top2 = [n for n, _ in rank_adapters(scores)[:2]]
    assert sorted(grown) == sorted(top2)
    assert lora_ranks(model) == {n: (3 if n in top2 else 2) for n in imp}
    low = next(n for n in imp if n not in top2)
    kept_param = model.get_submodule(low).lora_A["default"].weight  # not grown: same Parameter object
    opt2 = rebuild_optimizer(opt, model)
    assert opt2.state[kept_param]["step"] == opt.state[kept_param]["step"]  # state of untouched params carried
    tracker.refresh()
    model(input_ids=IDS, labels=LABELS).loss.backward()
    new_a = model.get_submodule(top2[0]).lora_A["default"].weight
    new_b = model.get_submodule(top2[0]).lora_B["default"].weight
    assert new_b.grad is not None and new_b.grad[:, 2:].abs().sum() > 0
    b_before = new_b.detach().clone()
    opt2.step()
    assert not torch.equal(new_b.detach(), b_before)
    assert new_a.requires_grad
    assert tracker.step()
    assert [c for _, c in tracker.scores().adapter.sites] == [lora_ranks(model)[n] for n in imp]
    tracker.detach()


def test_bad_inputs() -> None:
    model = lora_bert()
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    with pytest.raises(ValueError, match="new_rank"):
        grow_lora_rank(layer, 1)
    with pytest.raises(ValueError, match="adapter"):
        grow_lora_rank(layer, 4, adapter_name="other")
    with pytest.raises(TypeError, match="LoRA"):
        grow_lora_rank(nn.Linear(3, 3), 4)
    with pytest.raises(ValueError, match="only growth"):
        apply_rank_plan(model, {"base_model.model.bert.encoder.layer.0.attention.self.query": 1})
    with pytest.raises(ValueError, match="not in this model"):
        apply_rank_plan(model, {"nowhere.query": 4})
