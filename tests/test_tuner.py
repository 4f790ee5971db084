"""AdaptiveTuner on PEFT LoRA models: output unchanged at growth, the optimizer's new parameters and their state,
the budget over many growth events (LoRA weights counted from shapes by the test), exact resume, and the pruner
and the tuner together in one loop (APT's whole method)."""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Tuple

import peft
import pytest
import torch
import transformers as tf
from torch import nn

import apt_salience
from apt_salience import AdaptivePruner, AdaptiveTuner, RECOMMENDED_CONFIG
from apt_salience.tuning import replace_parameters

GEN_SEED = 5


def lora_bert(seed: int = 0, r: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        max_position_embeddings=32, num_labels=2)
    base = tf.BertForSequenceClassification(cfg)
    lcfg = peft.LoraConfig(r=r, lora_alpha=4, target_modules=["query", "value", "intermediate.dense"],
                           lora_dropout=0.0, init_lora_weights=False)
    return peft.get_peft_model(base, lcfg)


def batches(n: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(GEN_SEED)
    return [(torch.randint(0, 50, (4, 7), generator=g), torch.randint(0, 2, (4,), generator=g)) for _ in range(n)]


def lora_weights(model: nn.Module) -> int:
    """LoRA A and B weights, counted from the shapes by hand."""
    return sum(p.numel() for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids).logits
    model.train(was)
    return out


def setup(model_seed: int = 0, **kw: Any) -> Tuple[nn.Module, Any, Any, AdaptiveTuner]:
    model = lora_bert(model_seed)
    model.train()
    tracker = apt_salience.attach(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, tracker, opt, AdaptiveTuner(model, tracker, opt, **kw)


def train(model: nn.Module, opt: Any, batch: Tuple[torch.Tensor, torch.Tensor]) -> None:
    model(input_ids=batch[0], labels=batch[1]).loss.backward()
    opt.step()
    opt.zero_grad()


def test_growth_keeps_the_output_and_the_optimizer_trains_the_new_parameters() -> None:
    model, tracker, opt, tuner = setup(ramp_steps=6, num_growths=3, budget=4 * lora_weights(lora_bert()))
    assert tuner.growth_steps == [2, 4, 6]
    probe = batches(1)[0][0]
    grew = 0
    for step, batch in enumerate(batches(8), 1):
        train(model, opt, batch)
        tracker.step()
        old = {n: p for n, p in model.named_parameters() if p.requires_grad}
        old_state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in old.items()}
        before = logits(model, probe)
        if not tuner.step():
            continue
        grew += 1
        torch.testing.assert_close(logits(model, probe), before, atol=1e-6, rtol=0)  # output unchanged
        live = [p for p in model.parameters() if p.requires_grad]
        held = [p for g in opt.param_groups for p in g["params"]]
        assert {id(p) for p in live} == {id(p) for p in held} and len(held) == len(live)  # new in, old out
        changed = [n for n, p in model.named_parameters() if p.requires_grad and p is not old[n]]
        assert changed and all(".lora_" in n for n in changed)
        for n in changed:
            st = opt.state[dict(model.named_parameters())[n]]
            o = old_state[n]
            corner = tuple(slice(0, s) for s in o["exp_avg"].shape)
            assert torch.equal(st["exp_avg"][corner], o["exp_avg"]) and torch.equal(st["step"], o["step"])
            assert float(st["exp_avg"].abs().sum()) == pytest.approx(float(o["exp_avg"].abs().sum()))  # zero-padded
        # a step trains the new columns of B (zero at growth, nonzero gradient through the random new A rows)
        name_b = next(n for n in changed if ".lora_B." in n)
        b = dict(model.named_parameters())[name_b]
        r_old = old[name_b].shape[1]
        assert torch.all(b.detach()[:, r_old:] == 0)
        train(model, opt, batch)
        assert b.detach()[:, r_old:].abs().sum() > 0
        tracker.step()
    assert grew == 3
    tracker.detach()


@pytest.mark.parametrize("fraction,num_growths,factor", [(0.5, 8, 3), (1.0, 6, 2), (0.25, 5, 6)])
def test_the_budget_is_never_exceeded(fraction: float, num_growths: int, factor: int) -> None:
    initial = lora_weights(lora_bert())
    budget = factor * initial - 7  # not a multiple of anything
    model, tracker, opt, tuner = setup(ramp_steps=num_growths, num_growths=num_growths, budget=budget,
                                       fraction=fraction)
    for k, batch in enumerate(batches(num_growths + 2), 1):
        train(model, opt, batch)
        tracker.step()
        tuner.step()
        n = min(k, num_growths)
        target = initial + (budget - initial) * n // num_growths  # the linear rise, by hand
        assert lora_weights(model) <= target <= budget
    assert len(tuner.events) == num_growths and lora_weights(model) > initial
    assert [e["step"] for e in tuner.events] == list(range(1, num_growths + 1))
    tracker.detach()


def test_grows_the_most_salient_adapters() -> None:
    model, tracker, opt, tuner = setup(growth_steps=[1], budget=100 * lora_weights(lora_bert()))
    train(model, opt, batches(1)[0])
    tracker.step()
    order = [n for n, _ in apt_salience.tuning.rank_adapters(tracker.scores())]
    before = tuner.ranks()
    assert tuner.step()
    after = tuner.ranks()
    grown = [n for n in order if after[n] > before[n]]
    assert grown == order[: len(order) // 2]  # APT: the top half by salience
    tracker.detach()


def test_resume_equals_an_uninterrupted_run(tmp_path: Any) -> None:
    kw: Dict[str, Any] = dict(ramp_steps=8, num_growths=4, seed=3)
    data = batches(10)
    model_a, tracker_a, opt_a, tuner_a = setup(**kw)
    for batch in data:
        train(model_a, opt_a, batch)
        tracker_a.step()
        tuner_a.step()
    model_b, tracker_b, opt_b, tuner_b = setup(**kw)
    for batch in data[:5]:  # two growths done, two to come
        train(model_b, opt_b, batch)
        tracker_b.step()
        tuner_b.step()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict(), "tracker": tracker_b.state_dict(),
                "tuner": tuner_b.state_dict()}, path)
    tracker_b.detach()
    ckpt = torch.load(path, weights_only=True)
    model_c, tracker_c, opt_c, tuner_c = setup(model_seed=1, **kw)
    tuner_c.load_state_dict(ckpt["tuner"])  # first: the model grows to the saved ranks
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    tracker_c.load_state_dict(ckpt["tracker"])
    for batch in data[5:]:
        train(model_c, opt_c, batch)
        tracker_c.step()
        tuner_c.step()
    assert tuner_c.ranks() == tuner_a.ranks() and tuner_c.events == tuner_a.events
    for (na, pa), (nc, pc) in zip(model_a.state_dict().items(), model_c.state_dict().items()):
        assert na == nc and torch.equal(pa, pc), na
    tracker_a.detach()
    tracker_c.detach()


def test_pruner_and_tuner_together_on_a_lora_model() -> None:
    """APT's whole method: prune heads / neurons and grow the salient adapters in one loop, then merge and prune."""
    model = lora_bert()
    model.train()
    tracker = apt_salience.attach(model, RECOMMENDED_CONFIG)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    initial = lora_weights(model)
    pruner = AdaptivePruner(model, tracker, 0.5, ramp_steps=6, alpha=0.5)
    tuner = AdaptiveTuner(model, tracker, opt, ramp_steps=6, num_growths=3, budget=3 * initial)
    data = batches(12)
    for batch in data:
        train(model, opt, batch)
        tracker.step()
        pruner.step()
        tuner.step()
        assert lora_weights(model) <= 3 * initial
    assert len(tuner.events) == 3 and lora_weights(model) > initial
    masks = pruner.masks
    assert masks is not None and all(bool(((m == 0) | (m == 1)).all()) for m in masks.values())
    before = logits(model, data[0][0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", apt_salience.PruningWarning)
        report = pruner.finalize()  # merges the adapters, removes the pruned blocks
    torch.testing.assert_close(logits(model, data[0][0]), before, atol=1e-5, rtol=0)
    assert report.params_after < report.params_before and report.heads_removed + report.neurons_removed > 0
    assert not any(".lora_" in n for n, _ in model.named_parameters())  # merged
    tracker.detach()


def test_replace_parameters_pads_state_and_skips_unknown() -> None:
    old = nn.Parameter(torch.ones(2, 3))
    other = nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([old, other], lr=0.1, momentum=0.9)
    old.grad, other.grad = torch.ones(2, 3), torch.ones(1)
    opt.step()
    new = nn.Parameter(torch.zeros(2, 5))
    assert replace_parameters(opt, {old: new, nn.Parameter(torch.ones(1)): nn.Parameter(torch.ones(2))}) == 1
    buf = opt.state[new]["momentum_buffer"]
    assert buf.shape == (2, 5) and torch.equal(buf[:, :3], torch.ones(2, 3)) and torch.all(buf[:, 3:] == 0)
    assert old not in opt.state and opt.param_groups[0]["params"][0] is new
    with pytest.raises(ValueError, match="cannot replace"):
        replace_parameters(opt, {new: nn.Parameter(torch.zeros(1, 5))})


def test_bad_inputs_are_refused_before_anything_changes() -> None:
    plain = tf.BertForSequenceClassification(tf.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                           num_attention_heads=4, intermediate_size=24))
    tr = apt_salience.attach(plain)
    with pytest.raises(ValueError, match="no PEFT LoRA layers"):
        AdaptiveTuner(plain, tr, torch.optim.SGD(plain.parameters(), lr=0.1), ramp_steps=4)
    tr.detach()
    model = lora_bert()
    tracker = apt_salience.attach(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    n = lora_weights(model)
    for kw, pattern in [({}, "ramp_steps must be an int >= 1"), ({"ramp_steps": 4, "budget": n - 1}, "budget must be"),
                        ({"ramp_steps": 4, "fraction": 0}, "fraction"), ({"growth_steps": [3, 2]}, "growth_steps"),
                        ({"ramp_steps": 4, "score": "x"}, "score"), ({"ramp_steps": 4, "num_growths": 0}, "num_growths")]:
        with pytest.raises(ValueError, match=pattern):
            AdaptiveTuner(model, tracker, opt, **kw)
    with pytest.raises(TypeError, match="optimizer"):
        AdaptiveTuner(model, tracker, object(), ramp_steps=4)  # type: ignore[arg-type]
    assert lora_weights(model) == n
    tracker.detach()
