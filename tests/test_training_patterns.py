"""Real training patterns against the brute-force oracle: one row per pattern, run on BERT and LLaMA.

The oracle (tests/_reference.py, ``MultiCapture``) records every forward's site tensors and every
gradient that reaches them, and applies the documented definitions: a forward's ``|H|`` counts once
however many backwards pass through it; ``|dL/dH|`` is summed over the backwards
(``sum |g1| + sum |g2|``, which equals ``sum |g1 + g2|`` when the partial gradients agree in sign).
Adding a pattern is one function and one row of ``PATTERNS``.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Dict, Iterator, Optional

import pytest
import torch

import apt_salience
from tests._models import make_batch, make_model
from tests._reference import MultiCapture, assert_close, discover_sites, reference_readings
from tests.test_tracker_behaviour import hook_counts, scores_equal
from tests.test_tracker_reference import block_sizes


def tracker_hooks(model: torch.nn.Module) -> int:
    """Hooks of apt_salience's tracker on the model (other hooks, e.g. the oracle's, are not counted)."""
    return sum(1 for m in model.modules() for d in (m._forward_pre_hooks, m._forward_hooks) for h in d.values()
               if str(getattr(h, "__module__", "")).startswith("apt_salience."))


class Ctx:
    """What a pattern gets: the model, its tracker, the oracle's capture and a seeded generator."""

    def __init__(self, arch: str, model: torch.nn.Module, tracker: Any, cap: Optional[MultiCapture], gen: torch.Generator):
        self.arch, self.model, self.tracker, self.cap, self.gen = arch, model, tracker, cap, gen

    @contextlib.contextmanager
    def masked(self, mask: Optional[torch.Tensor]) -> Iterator[None]:
        if self.cap is not None:
            self.cap.mask = mask
        with (self.tracker.token_mask(mask) if mask is not None else contextlib.nullcontext()):
            yield
        if self.cap is not None:
            self.cap.mask = None

    def batch(self, **kw: Any) -> Any:
        return make_batch(self.arch, self.gen, **kw)


def plain(c: Ctx) -> None:
    inputs, mask = c.batch()
    with c.masked(mask):
        loss = c.model(**inputs).loss
    loss.backward()


def retain_graph_halves(c: Ctx) -> None:
    inputs, mask = c.batch()
    with c.masked(mask):
        loss = c.model(**inputs).loss
    (loss / 2).backward(retain_graph=True)
    (loss / 2).backward()


def split_loss(c: Ctx) -> None:
    """Two parts of a loss from one forward, backpropagated one by one (their gradients differ in sign)."""
    inputs, mask = c.batch()
    with c.masked(mask):
        out = c.model(**inputs)
    out.loss.backward(retain_graph=True)
    (-0.3 * out.logits.square().mean()).backward()


def auxiliary_loss(c: Ctx) -> None:
    """An auxiliary loss on the first layer's output, backpropagated separately (reaches layer 0 only)."""
    inputs, mask = c.batch()
    with c.masked(mask):
        out = c.model(**inputs, output_hidden_states=True)
    out.hidden_states[1].square().mean().backward(retain_graph=True)
    out.loss.backward()


def two_views(c: Ctx) -> None:
    """SimCSE / R-Drop: two forwards with their own masks and lengths, one backward."""
    a, mask_a = c.batch(seq=6)
    b, mask_b = c.batch(seq=8)
    with c.masked(mask_a):
        la = c.model(**a).loss
    with c.masked(mask_b):
        lb = c.model(**b).loss
    (la + lb).backward()


def uneven_accumulation(c: Ctx) -> None:
    """Gradient accumulation over micro-batches of different sizes and lengths."""
    for batch, seq in ((3, 6), (2, 9), (4, 5)):
        inputs, mask = c.batch(batch=batch, seq=seq)
        with c.masked(mask):
            loss = c.model(**inputs).loss
        loss.backward()


def deepcopy_teacher(c: Ctx) -> None:
    """A teacher copied from the attached model (self-distillation, EMA): training the copy is not tracked."""
    teacher = copy.deepcopy(c.model)
    inputs, mask = c.batch()
    teacher(**inputs).loss.backward()  # the copy's hooks are inert
    with torch.no_grad():
        target = teacher(**inputs).logits
    assert tracker_hooks(teacher) == 0  # they removed themselves at the copy's first forward
    with c.masked(mask):
        out = c.model(**inputs)
    (out.loss + (out.logits - target).square().mean()).backward()


PATTERNS: Dict[str, Callable[[Ctx], None]] = {
    "plain": plain,
    "retain_graph_halves": retain_graph_halves,
    "split_loss": split_loss,
    "auxiliary_loss": auxiliary_loss,
    "two_views": two_views,
    "uneven_accumulation": uneven_accumulation,
    "deepcopy_teacher": deepcopy_teacher,
}


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_pattern_matches_bruteforce(arch: str, pattern: str) -> None:
    model = make_model(arch)
    sites = discover_sites(model, arch)
    tracker = apt_salience.attach(model, {"update_frequency": 1})
    cap = MultiCapture(model, sites)
    c = Ctx(arch, model, tracker, cap, torch.Generator().manual_seed(7))
    readings, records = [], []
    for _ in range(2):
        PATTERNS[pattern](c)
        records.append(cap.collect())
        model.zero_grad(set_to_none=True)
        assert tracker.step()
        readings.append(tracker.scores())
    cap.remove()
    expected = reference_readings(records, sites, block_sizes(sites, arch), 1, 0.85)
    if pattern not in ("plain", "deepcopy_teacher"):  # the pattern did what it says: several entries per site
        assert any(len(v) > 1 for v in records[0].values())
    for got, exp in zip(readings, expected):
        for kind in ("head", "neuron", "hidden"):
            for f in ("salience", "outlier_aware", "kurtosis"):
                assert_close(getattr(getattr(got, kind), f), exp[kind][f], rel=1e-4, what=f"{pattern} {kind}.{f}")
    tracker.remove()
    assert tracker_hooks(model) == 0  # (transformers keeps hooks of its own for output_hidden_states)


def test_retain_graph_halves_equal_one_backward_exactly() -> None:
    """``(l/2).backward(retain_graph=True); (l/2).backward()`` is the same step as ``l.backward()``."""
    runs = []
    for pattern in (plain, retain_graph_halves):
        model = make_model("bert")
        tracker = apt_salience.attach(model, {"update_frequency": 1})
        c = Ctx("bert", model, tracker, None, torch.Generator().manual_seed(3))
        pattern(c)
        tracker.step()
        runs.append(tracker.scores())
        tracker.remove()
    scores_equal(runs[0], runs[1], rtol=1e-6)


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("lengths", [(6, 6), (6, 9)])
def test_two_views_under_checkpointing_equal_the_plain_run(arch: str, reentrant: bool, lengths: Any) -> None:
    """Each view's mask follows its own re-computation (equal lengths: silently wrong before; different: an error)."""
    runs = []
    for ckpt in (False, True):
        model = make_model(arch)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            if reentrant:
                model.enable_input_require_grads()
            model.train()
        tracker = apt_salience.attach(model, {"update_frequency": 2})
        gen = torch.Generator().manual_seed(11)
        for _ in range(2):
            a, mask_a = make_batch(arch, gen, seq=lengths[0])
            b, mask_b = make_batch(arch, gen, seq=lengths[1])
            mask_b[2, 3:] = 0  # the views' masks differ even where the lengths agree
            if arch == "llama":
                b["labels"] = b["labels"].masked_fill(mask_b == 0, -100)
            b["attention_mask"] = mask_b
            with tracker.token_mask(mask_a):
                la = model(**a).loss
            with tracker.token_mask(mask_b):
                lb = model(**b).loss
            (la + lb).backward()
            model.zero_grad(set_to_none=True)
            tracker.step()
        runs.append(tracker)
    assert runs[0].observed_microbatches == runs[1].observed_microbatches == 2
    scores_equal(runs[0].scores(), runs[1].scores(), rtol=1e-4)
    for t in runs:
        t.remove()


def test_copy_of_attached_model_is_untracked_and_clean() -> None:
    model = make_model("bert")
    tracker = apt_salience.attach(model)
    teacher = copy.deepcopy(model)
    assert hook_counts(teacher) > 0  # inert placeholders until the copy's first forward or the tracker's next step
    gen = torch.Generator().manual_seed(0)
    inputs, _ = make_batch("bert", gen)
    teacher(**inputs).loss.backward()
    tracker.step()  # nothing was observed: the copy is not tracked
    with pytest.raises(apt_salience.TrackerStateError):
        tracker.scores()
    assert tracker.observed_microbatches == 0
    second = copy.deepcopy(model)
    tracker.step()  # removes the copy's placeholders
    assert hook_counts(second) == 0 and hook_counts(teacher) == 0
    third = copy.deepcopy(model)
    tracker.remove()  # and so does remove()
    assert hook_counts(third) == 0 and hook_counts(model) == 0
    # a copy is tracked only when a tracker is attached to it
    copied_tracker = apt_salience.attach(third, {"update_frequency": 1})
    third(**inputs).loss.backward()
    assert copied_tracker.step() and copied_tracker.observed_microbatches == 1
    copied_tracker.remove()
