"""Tracker state: malformed states are refused whole (nothing changes), pickling says what to do instead."""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from typing import Any, Callable, Dict

import pytest
import torch

import apt_salience
from apt_salience import TrackerStateError
from tests._models import make_batch, make_model
from tests.test_tracker_behaviour import scores_equal


def _trained(steps: int = 3) -> Any:
    model = make_model("bert")
    tracker = apt_salience.attach(model, {"update_frequency": 2})
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        inputs, mask = make_batch("bert", gen)
        with tracker.token_mask(mask):
            model(**inputs).loss.backward()
        tracker.step()
    return model, tracker


def _drop(path: str) -> Callable[[Dict[str, Any]], None]:
    def edit(state: Dict[str, Any]) -> None:
        *parents, last = path.split("/")
        d = state
        for p in parents:
            d = d[p]
        del d[last]
    return edit


def _set(path: str, value: Any) -> Callable[[Dict[str, Any]], None]:
    def edit(state: Dict[str, Any]) -> None:
        *parents, last = path.split("/")
        d = state
        for p in parents:
            d = d[p]
        d[last] = value(d[last]) if callable(value) else value
    return edit


PROBE = "bert.encoder.layer.0.attention.output.dense:in"

# (how the state is broken, what the error must name)
BROKEN = {
    "no fingerprint": (_drop("fingerprint"), "'fingerprint'"),
    "no steps": (_drop("steps"), "'steps'"),
    "no counters": (_drop("counters"), "'counters' is missing"),
    "no window step count": (_drop("counters/win_steps"), "counters.win_steps"),
    "window of the wrong size": (_set("window/head", lambda t: t[:-1]), "window.head"),
    "no EMA of a kind": (_drop("ema/neuron"), "ema.neuron"),
    "no probe": (_drop(f"probes/{PROBE}"), f"probes.{PROBE}"),
    "no stream of a probe": (_drop(f"probes/{PROBE}/step_b"), f"probes.{PROBE}.step_b"),
    "moments of the wrong size": (_set(f"probes/{PROBE}/mom_m4", lambda t: t[:3]), f"probes.{PROBE}.mom_m4"),
    "a list instead of a tensor": (_set(f"probes/{PROBE}/mom_mean", lambda t: t.tolist()), "must be a tensor"),
    "NaN in the EMA": (_set("ema/head/outlier_aware", lambda t: t * float("nan")), "non-finite"),
    "a negative step count": (_set("steps", -1), "'steps' must be an integer"),
    "a malformed reading": (_set("scores", {"step": 1, "head": {"salience": [1.0]}}), "'scores' is not a valid reading"),
    "another version": (_set("version", 99), "version 99"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_state_is_refused_whole_and_changes_nothing(case: str) -> None:
    edit, names = BROKEN[case]
    _, source = _trained(3)
    state = source.state_dict()
    edit(state)
    model, target = _trained(1)
    before = target.state_dict()
    with pytest.raises(TrackerStateError, match=names.replace(".", r"\.").replace("(", r"\(")):
        target.load_state_dict(state)
    after = target.state_dict()
    assert after["steps"] == before["steps"] == 1 and after["publications"] == before["publications"]
    for section in ("window", "probes"):
        for k, v in before[section].items():
            for f, t in (v.items() if isinstance(v, dict) else [("", v)]):
                got = after[section][k][f] if f else after[section][k]
                assert torch.equal(got, t), f"{section}.{k}.{f} changed"
    for k, d in before["ema"].items():
        for f, t in d.items():
            assert torch.equal(after["ema"][k][f], t)
    # and it keeps working as a tracker that never saw the bad state
    _, twin = _trained(1)
    for tr, m in ((target, model), (twin, twin.model)):
        inputs, mask = make_batch("bert", torch.Generator().manual_seed(5))
        with tr.token_mask(mask):
            m(**inputs).loss.backward()
        assert tr.step()
    scores_equal(target.scores(), twin.scores(), rtol=1e-6)


def test_a_good_state_still_loads_after_a_refused_one() -> None:
    _, source = _trained(3)
    good = source.state_dict()
    bad = source.state_dict()
    del bad["probes"][PROBE]
    _, target = _trained(1)
    with pytest.raises(TrackerStateError):
        target.load_state_dict(bad)
    target.load_state_dict(good)
    assert target.steps == 3
    assert torch.equal(target.state_dict()["window"]["head"], good["window"]["head"])


def test_pickling_an_attached_model_or_a_tracker_says_what_to_do() -> None:
    model, tracker = _trained(1)
    with pytest.raises(TypeError, match=r"state_dict\(\).*detach\(\)"):
        torch.save(model, io.BytesIO())
    with pytest.raises(TypeError, match=r"tracker\.state_dict\(\)"):
        pickle.dumps(tracker)
    with pytest.raises(TypeError, match=r"tracker\.state_dict\(\)"):
        copy.deepcopy(tracker)
    buf = io.BytesIO()
    torch.save(tracker.state_dict(), buf)  # the recommended way
    tracker.remove()
    torch.save(model, io.BytesIO())  # detached: the model pickles again


def test_a_state_saved_by_the_previous_tracker_resumes_exactly() -> None:
    """tests/data/tracker_state_v1.pt was saved by the tracker before it became a package (commit d6d699c),
    after 3 steps of a tiny BERT; the reading it published after a 4th step is stored beside it."""
    from pathlib import Path

    data = Path(__file__).parent / "data"
    state = torch.load(data / "tracker_state_v1.pt")
    expected = apt_salience.SalienceScores.load(data / "tracker_state_v1_next_reading.json")
    model = make_model("bert")
    tracker = apt_salience.attach(model, {"update_frequency": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same config: no warning (a pruning section is not the tracker's)
        tracker.load_state_dict(state)
    gen = torch.Generator().manual_seed(0)
    batches = [make_batch("bert", gen) for _ in range(4)]
    inputs, mask = batches[3]
    with tracker.token_mask(mask):
        model(**inputs).loss.backward()
    assert tracker.step() and tracker.steps == 4
    scores_equal(tracker.scores(), expected, rtol=1e-5)
