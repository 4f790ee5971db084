"""The tracker's memory bound (issue 7): O(channels) state, nothing activation-sized kept, no growth.

The oracle for "the tracker's tensors" is an independent walk of the tracker object graph (every
tensor reachable from the tracker, skipping the model, its modules and the hook handles), not
``state_bytes()``; channel counts are computed by hand from the model shape.
"""

from __future__ import annotations

import gc
from typing import Any, Dict, List, Optional, Set

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

import apt_salience

HIDDEN, HEADS, FFN, LAYERS, VOCAB = 32, 4, 48, 2, 50
# per layer: head-site input (HIDDEN) + its output (HIDDEN) + neuron-site input (FFN) + its output (HIDDEN)
TRACKED_CHANNELS = LAYERS * (HIDDEN + HIDDEN + FFN + HIDDEN)


def _bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     intermediate_size=FFN, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     max_position_embeddings=128, num_labels=2)
    m = BertForSequenceClassification(cfg)
    m.train()
    return m


def _tracker_tensors(tracker: Any, include_scores: bool = True) -> List[torch.Tensor]:
    """Every tensor reachable from the tracker's own attributes (model, modules, sites and hooks excluded)."""
    found: Dict[int, torch.Tensor] = {}
    seen: Set[int] = set()
    skip = {"_model", "sites", "_hooks", "config"} | (set() if include_scores else {"_scores"})

    def visit(o: Any, depth: int = 0) -> None:
        if id(o) in seen or depth > 12:
            return
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            found[id(o)] = o
            return
        if isinstance(o, (nn.Module, str, bytes, int, float, bool, type(None), torch.device, torch.dtype)):
            return
        if type(o).__name__ == "Site":
            return
        if isinstance(o, dict):
            for v in o.values():
                visit(v, depth + 1)
            return
        if isinstance(o, (list, tuple, set)):
            for v in o:
                visit(v, depth + 1)
            return
        attrs: Dict[str, Any] = {}
        if hasattr(o, "__dict__"):
            attrs.update(vars(o))
        for cls in type(o).__mro__:
            for s in getattr(cls, "__slots__", ()):
                if hasattr(o, s):
                    attrs[s] = getattr(o, s)
        for k, v in attrs.items():
            if o is tracker and k in skip:
                continue
            if callable(v) and not isinstance(v, torch.Tensor) and not hasattr(v, "__dict__"):
                continue
            visit(v, depth + 1)

    visit(tracker)
    return list(found.values())


def _nbytes(ts: List[torch.Tensor]) -> int:
    storages: Dict[int, int] = {}
    for t in ts:
        s = t.untyped_storage()
        storages[s.data_ptr() or id(s)] = max(storages.get(s.data_ptr() or id(s), 0), s.nbytes())
    return sum(storages.values())


def _train_step(model: nn.Module, tracker: Any, batch: int, seq: int, gen: torch.Generator,
                mask: Optional[torch.Tensor] = None) -> None:
    ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    labels = torch.randint(0, 2, (batch,), generator=gen)
    if mask is not None:
        with tracker.token_mask(mask):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    else:
        loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    tracker.step()


@pytest.mark.parametrize("config", [
    None,
    {"kurtosis": {"enabled": False}},
    {"kurtosis": {"source": "output"}},
    {"salience": {"mode": "taylor"}},
])
def test_state_does_not_depend_on_batch_or_sequence_and_fits_64_bytes_per_channel(config: Any) -> None:
    gen = torch.Generator().manual_seed(0)
    sizes = {}
    for batch, seq in ((2, 8), (16, 96)):  # 16 tokens vs 1536 tokens per micro-batch
        model = _bert()
        tracker = apt_salience.attach(model, config)
        for _ in range(2):
            _train_step(model, tracker, batch, seq, gen)
        assert tracker.tracked_channels == TRACKED_CHANNELS
        state = _nbytes(_tracker_tensors(tracker, include_scores=False))
        everything = _nbytes(_tracker_tensors(tracker, include_scores=True))
        sizes[(batch, seq)] = (state, everything)
        # persistent accumulator state: at most 64 bytes per tracked channel
        assert state / TRACKED_CHANNELS <= 64, (state, state / TRACKED_CHANNELS)
        assert tracker.state_bytes() == state  # what the tracker reports is what the object graph holds
        # nothing activation-sized: even with the published reading, far below one activation of the big batch
        assert everything < batch * seq * FFN * 4 or (batch, seq) == (2, 8)
        tracker.detach()
    assert sizes[(2, 8)] == sizes[(16, 96)]


def test_lora_adapter_state_fits_64_bytes_per_channel() -> None:
    import peft  # a test dependency: a missing peft must fail, not skip
    model = peft.get_peft_model(_bert(), peft.LoraConfig(r=4, target_modules=["query", "value"]))
    tracker = apt_salience.attach(model, None)
    gen = torch.Generator().manual_seed(1)
    for batch, seq in ((2, 8), (8, 64)):
        ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
        model(input_ids=ids, labels=torch.randint(0, 2, (batch,), generator=gen)).loss.backward()
        tracker.step()
        channels = TRACKED_CHANNELS + LAYERS * 2 * 4  # + the rank-4 input of lora_B in query and value per layer
        assert tracker.tracked_channels == channels
        state = _nbytes(_tracker_tensors(tracker, include_scores=False))
        assert state / channels <= 64
        if batch == 2:
            first = state
    assert state == first
    tracker.detach()


def test_no_growth_over_1000_steps_of_a_small_model() -> None:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=16, num_labels=2)
    model = BertForSequenceClassification(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    tracker = apt_salience.attach(model, {"update_frequency": 3})
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 4, dtype=torch.long)
    mask[0, 3] = 0

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    for i in range(1, 1001):
        for micro in range(2):  # gradient accumulation, one micro-batch masked
            ids = torch.randint(0, 20, (2, 4), generator=gen)
            labels = torch.randint(0, 2, (2,), generator=gen)
            if micro:
                with tracker.token_mask(mask):
                    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            else:
                model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tracker.step()
        if i == 30:
            state_30, live_30 = _nbytes(_tracker_tensors(tracker)), live_tensors()
    assert tracker.steps == 1000
    assert tracker.observed_microbatches == 2000
    assert _nbytes(_tracker_tensors(tracker)) == state_30
    assert live_tensors() == live_30
    # nothing pending between steps: every probe's pending sums were committed and released
    assert all(p.sink_sum.grad is None and (p.sink_mom is None or p.sink_mom.grad is None)
               for p in tracker._acc.probes)
    tracker.detach()


def _activation_tensors(tokens: int, channels: Set[int]) -> List[torch.Size]:
    """Shapes of live Python tensors shaped like a site activation ([tokens, C] or [batch, seq, C])."""
    gc.collect()
    out = []
    for o in gc.get_objects():
        # real tensors only (a compiled graph elsewhere in the process leaves fake tensors with symbolic shapes)
        if type(o) in (torch.Tensor, nn.Parameter) and o.dim() >= 2 and o.shape[-1] in channels \
                and o.numel() == tokens * o.shape[-1]:
            out.append(o.shape)
    return out


@pytest.mark.parametrize("mode", ["compressed", "taylor"])
@pytest.mark.parametrize("masked", [False, True])
def test_no_activation_kept_after_backward(mode: str, masked: bool) -> None:
    model = _bert()
    tracker = apt_salience.attach(model, {"salience": {"mode": mode}})
    held: List[torch.Tensor] = []  # the detector must see these (proves it can fail)
    handles = [s.module.register_forward_hook(lambda m, a, o: held.extend([a[0], o])) for s in tracker.sites]
    gen = torch.Generator().manual_seed(3)
    batch, seq = 4, 11  # 44 tokens: no parameter has 44 rows
    ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    labels = torch.tensor([0, 1, 0, 1])
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 8:] = 0
    if masked:
        with tracker.token_mask(mask):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    else:
        loss = model(input_ids=ids, labels=labels).loss
    for h in handles:
        h.remove()
    assert len(_activation_tensors(batch * seq, {HIDDEN, FFN})) >= len(held) > 0
    held.clear()
    loss.backward()
    del loss
    alive = _activation_tensors(batch * seq, {HIDDEN, FFN})
    assert alive == [], f"activation-sized tensors still alive after backward: {alive}"
    tracker.step()
    assert tracker.observed_microbatches == 1
    tracker.detach()


def test_forward_without_backward_keeps_nothing() -> None:
    """A forward whose gradient never comes (evaluation with grad on, checkpoint re-run) must not pin activations."""
    model = _bert()
    tracker = apt_salience.attach(model, {"salience": {"mode": "taylor"}})
    out = model(input_ids=torch.randint(0, VOCAB, (3, 13)))
    assert len(tracker.sites) > 0
    del out
    assert _activation_tensors(3 * 13, {HIDDEN, FFN}) == []
    tracker.detach()


@pytest.mark.parametrize("config", [None, {"salience": {"mode": "taylor"}}])
def test_tracker_adds_no_saved_tensors_to_the_autograd_graph(config: Any) -> None:
    """Bytes autograd saves for backward, counted with saved_tensors_hooks, are the same with and without the tracker.

    (For ``taylor`` the site inputs are referenced until backward; under full fine-tuning autograd
    saves them anyway for the weight gradient, so no bytes are added.)
    """
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(5))

    def saved_bytes(with_tracker: bool) -> int:
        model = _bert()
        tracker = apt_salience.attach(model, config) if with_tracker else None
        seen: Dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=torch.tensor([0, 1, 1, 0])).loss
        loss.backward()
        if tracker is not None:
            tracker.step()
            tracker.detach()
        return sum(seen.values())

    assert saved_bytes(True) == saved_bytes(False)
