"""Readings (apt_salience/scores.py): typed fields, density, save / load round trips, format-1 upgrade, clear errors.

Oracles: parameter counts and density computed by hand from the tiny configs; a format-1 dict
written out literally in the shape the previous version saved; the field values the test put in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest
import torch

import apt_salience
from apt_salience.layout import BlockLayout
from apt_salience.scores import SCORES_FORMAT, BlockScores, SalienceScores
from tests._models import FFN, HEAD_DIM, HEADS, HIDDEN, make_batch, make_model

LAYERS = 2


def _reading(arch: str = "bert", cfg: Any = None, steps: int = 2) -> SalienceScores:
    model = make_model(arch)
    tracker = apt_salience.attach(model, cfg)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        inputs, mask = make_batch(arch, gen)
        with tracker.token_mask(mask):
            model(**inputs).loss.backward()
        tracker.step()
    tracker.remove()
    return tracker.scores()


def test_density_is_outlier_aware_over_hand_counted_parameters() -> None:
    s = _reading("bert")
    head = 4 * HEAD_DIM * HIDDEN  # q, k, v rows and o columns of one head
    neuron = 2 * HIDDEN  # the up row and the down column
    hidden = LAYERS * (HEADS * head + FFN * neuron) / HIDDEN
    for kind, count in (("head", head), ("neuron", neuron), ("hidden", hidden)):
        b = getattr(s, kind)
        assert bool((b.param_count == count).all()), kind
        expect = b.outlier_aware.double() / count
        assert torch.allclose(b.density.double(), expect, rtol=1e-6, atol=0), kind
    assert s.window_steps == 1.0 and s.step == 2  # update_frequency 1: the last step's window
    assert s.d_model == HIDDEN and s.architecture == "bert" and s.config == apt_salience.load_config(None)
    assert s.unobserved_sites == () and isinstance(s.fingerprint, str)


def _assert_same(a: SalienceScores, b: SalienceScores) -> None:
    assert (a.step, a.d_model, a.window_steps, a.fingerprint, a.unobserved_sites) == \
           (b.step, b.d_model, b.window_steps, b.fingerprint, b.unobserved_sites)
    assert a.layout == b.layout and a.config == b.config and a.meta == b.meta
    assert list(a.kinds()) == list(b.kinds())
    for kind, x in a.kinds().items():
        y = getattr(b, kind)
        assert x.sites == y.sites, kind
        for f in ("salience", "kurtosis", "outlier_aware", "param_count", "density", "uncertainty"):
            u, v = getattr(x, f), getattr(y, f)
            assert (u is None and v is None) or torch.equal(u, v), (kind, f)


def test_reading_round_trips_through_save_and_load(tmp_path: Path) -> None:
    scores = _reading("llama", {"uncertainty_beta": 0.7, "kurtosis": {"combine": "scaled"}})
    assert all(b.uncertainty is not None for b in scores.kinds().values())
    path = scores.save(tmp_path / "sub" / "scores.json")
    raw = json.loads(path.read_text())
    assert raw["format"] == SCORES_FORMAT == "apt_salience.scores/2" and "meta" not in raw
    back = SalienceScores.load(path)
    _assert_same(back, scores)
    assert back.config is not None and back.config.kurtosis.combine == "scaled"
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json' is not JSON"):
        SalienceScores.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="cannot read scores file"):
        SalienceScores.load(tmp_path / "missing.json")


def _block(values: Tuple[float, ...], count: float, sites: Any) -> Dict[str, Any]:
    return {"salience": list(values), "kurtosis": [0.0] * len(values), "outlier_aware": list(values),
            "param_count": [count] * len(values), "density": [v / count for v in values], "sites": sites}


#: a reading as the previous version of apt_salience saved it (format 1: the layout in ``meta``)
FORMAT_1: Dict[str, Any] = {
    "format": "apt_salience.scores/1", "step": 6, "d_model": 2,
    "meta": {"architecture": "bert", "config": {"update_frequency": 3, "ema_beta": 0.5}, "window_steps": 3.0,
             "layers": {"enc.0.o": "enc.0", "enc.0.d": "enc.0"}, "block_size": {"enc.0.o": 2, "enc.0.d": 1},
             "fingerprint": "abc123", "unobserved_sites": ["enc.0.o"]},
    "head": _block((1.0, 2.0), 16.0, [["enc.0.o", 2]]),
    "neuron": _block((3.0, 4.0, 5.0), 4.0, [["enc.0.d", 3]]),
    "hidden": _block((1.0, 1.0), 22.0, [["hidden", 2]]),
}


def test_format_1_is_upgraded_to_typed_fields() -> None:
    s = SalienceScores.from_dict(json.loads(json.dumps(FORMAT_1)))
    assert s.layout.architecture == s.architecture == "bert" and s.layout.d_model == s.d_model == 2
    assert s.layout.block_size == {"enc.0.o": 2, "enc.0.d": 1} and s.layout.layers == {"enc.0.o": "enc.0", "enc.0.d": "enc.0"}
    assert s.layout.sites == {"head": (("enc.0.o", 2),), "neuron": (("enc.0.d", 3),), "hidden": (("hidden", 2),)}
    assert s.layout.param_count["neuron"].tolist() == [4.0] * 3
    assert s.config is not None and (s.config.update_frequency, s.config.ema_beta) == (3, 0.5)
    assert (s.window_steps, s.fingerprint, s.unobserved_sites, s.step) == (3.0, "abc123", ("enc.0.o",), 6)
    assert s.neuron is not None and s.neuron.salience.tolist() == [3.0, 4.0, 5.0] and s.neuron.uncertainty is None
    # the compatibility view gives back what format 1 had
    assert {k: s.meta[k] for k in ("architecture", "layers", "block_size", "window_steps", "fingerprint")} == \
           {k: FORMAT_1["meta"][k] for k in ("architecture", "layers", "block_size", "window_steps", "fingerprint")}
    assert s.meta["unobserved_sites"] == ["enc.0.o"] and s.meta["config"]["update_frequency"] == 3
    again = SalienceScores.from_dict(s.to_dict())  # written as format 2, read back the same
    _assert_same(again, s)


def test_format_1_without_format_or_meta_is_read_with_a_derived_layout() -> None:
    old = {"step": 1, "d_model": 2, "neuron": _block((1.0, 2.0), 4.0, [["l.0.fc2", 2]])}
    s = SalienceScores.from_dict(old)
    assert s.layout.layers == {"l.0.fc2": "l.0"} and s.layout.block_size == {"l.0.fc2": 1}
    assert s.architecture is None and s.config is None and s.window_steps == 0.0 and s.meta == {
        "window_steps": 0.0, "layers": {"l.0.fc2": "l.0"}, "block_size": {"l.0.fc2": 1}, "unobserved_sites": []}


@pytest.mark.parametrize("fmt", ["apt_salience.scores/3", "apt_salience.selection/1", 2])
def test_unknown_format_names_the_readable_ones(fmt: Any) -> None:
    with pytest.raises(ValueError, match=r"scores format .* is not one this version of apt_salience reads "
                                         r"\(apt_salience.scores/1 and apt_salience.scores/2\)"):
        SalienceScores.from_dict({**FORMAT_1, "format": fmt})


def _without(d: Dict[str, Any], *path: str) -> Dict[str, Any]:
    out = json.loads(json.dumps(d))
    node = out
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return out


V2 = SalienceScores.from_dict(FORMAT_1).to_dict()


@pytest.mark.parametrize("d, message", [
    (_without(FORMAT_1, "step"), "missing field 'step'"),
    (_without(V2, "step"), "missing field 'step'"),
    (_without(FORMAT_1, "neuron", "kurtosis"), "the 'neuron' scores have no field 'kurtosis'"),
    (_without(V2, "head", "sites"), "the 'head' scores have no field 'sites'"),
    (_without(V2, "hidden", "density"), "the 'hidden' scores have no field 'density'"),
    (_without(V2, "layout"), "scores dict (format 2) is missing the field 'layout'"),
    (_without(V2, "d_model"), "scores dict (format 2) is missing the field 'd_model'"),
    ({**V2, "head": {**V2["head"], "sites": [["enc.0.o"]]}}, "the 'head' scores field 'sites' must be a list of"),
    ({**V2, "head": {**V2["head"], "salience": [1.0]}}, "the 'head' scores do not describe one number of blocks"),
    ({**V2, "head": {**V2["head"], "kurtosis": "x"}}, "the 'head' scores field 'kurtosis' must be a list of numbers"),
    ({**V2, "head": [1, 2]}, "the 'head' scores must be a dict, got list"),
    ({**V2, "config": {"update_frequency": 0}}, "scores field 'config' is not a valid tracker config"),
    ({**V2, "unobserved_sites": "enc.0.o"}, "scores field 'unobserved_sites' must be a list of site names"),
    ({**V2, "step": "six"}, "scores fields 'step' and 'd_model' must be integers"),
    ({**V2, "layout": {"layers": ["x"]}}, "scores field 'layers' must be a dict"),
    ({**FORMAT_1, "meta": [1]}, "scores field 'meta' must be a dict"),
    ([1, 2], "not an apt_salience scores dict: got a list"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_a_missing_or_malformed_field_is_a_value_error_naming_it(d: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        SalienceScores.from_dict(d)
    assert message in str(info.value)
    assert not isinstance(info.value, KeyError)


def test_meta_is_a_compatible_view_and_cannot_be_given_with_a_typed_layout() -> None:
    s = SalienceScores.from_dict(FORMAT_1)
    built = SalienceScores(step=6, d_model=2, head=s.head, neuron=s.neuron, hidden=s.hidden, meta=FORMAT_1["meta"])
    _assert_same(built, s)
    with pytest.raises(ValueError, match="either typed"):
        SalienceScores(step=6, neuron=s.neuron, meta={"layers": {}}, layout=s.layout)
    lay = BlockLayout({"neuron": (("other", 3),)}, {}, {}, 2)
    with pytest.raises(ValueError, match=r"layout has neuron sites \(\('other', 3\),\) but the neuron scores have"):
        SalienceScores(step=6, neuron=s.neuron, layout=lay)
    with pytest.raises(TypeError, match="head must be a BlockScores"):
        SalienceScores(step=1, head={"salience": [1.0]})  # type: ignore[arg-type]
    # the layout's parameter counts are the blocks' whatever the given layout held
    fresh = SalienceScores(step=6, d_model=2, head=s.head, neuron=s.neuron, hidden=s.hidden, layout=BlockLayout(
        s.layout.sites, s.layout.block_size, s.layout.layers, 2, {}, "bert"))
    assert fresh.layout == s.layout


def test_block_scores_per_site_views_and_build_checks() -> None:
    b = BlockScores.build(salience=torch.tensor([1.0, 2.0, 3.0]), kurtosis=torch.zeros(3),
                          outlier_aware=torch.tensor([2.0, 4.0, 6.0]), param_count=torch.tensor([2.0, 2.0, 4.0]),
                          sites=[("a", 1), ("b", 2)], uncertainty=torch.tensor([0.5, 0.5, 0.5]))
    assert b.density.tolist() == [1.0, 2.0, 1.5] and len(b) == 3
    assert {k: v.tolist() for k, v in b.by_site("salience").items()} == {"a": [1.0], "b": [2.0, 3.0]}
    assert BlockScores.split is BlockScores.by_site and b.split("density")["b"].tolist() == [2.0, 1.5]
    assert b.site_totals() == {"a": 1.0, "b": 5.0} and b.site_totals("uncertainty") == {"a": 0.5, "b": 1.0}
    assert BlockScores.from_dict(b.to_dict()).uncertainty.tolist() == [0.5] * 3  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="field_name must be one of salience, kurtosis"):
        b.by_site("sites")
    with pytest.raises(ValueError, match="same number of blocks"):
        BlockScores.build(salience=torch.ones(2), kurtosis=torch.zeros(2), outlier_aware=torch.ones(2),
                          param_count=torch.ones(2), sites=[("a", 3)])
    with pytest.raises(ValueError, match="param_counts must be positive and finite; entry 1 is 0.0"):
        BlockScores.build(salience=torch.ones(2), kurtosis=torch.zeros(2), outlier_aware=torch.ones(2),
                          param_count=torch.tensor([1.0, 0.0]), sites=[("a", 2)])
