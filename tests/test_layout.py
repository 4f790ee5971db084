"""The block layout (apt_salience/layout.py): built from a model or a reading, per-site views, serialisation, checks.

Oracles: the test's own site regexes (tests/_reference.SITE_PATTERNS) and parameter counts computed
by hand from the tiny configs (tests/_models.py).
"""

from __future__ import annotations

import re
from typing import Any, Dict

import pytest
import torch

import apt_salience
from apt_salience.layout import KINDS, PRUNABLE_KINDS, BlockLayout, layer_of
from tests._models import FFN, HEADS, HIDDEN, head_dim_of, make_batch, make_model
from tests._reference import discover_sites

GATED = {"llama", "t5-gated"}
N_KV = {"llama": 2}


@pytest.mark.parametrize("arch", ["bert", "llama", "t5-gated", "gpt2"])
def test_from_model_sites_block_sizes_layers_and_hand_counted_parameters(arch: str) -> None:
    model = make_model(arch)
    lay = BlockLayout.from_model(model)
    sites = discover_sites(model, arch)
    heads = [n for n, k in sites.items() if k == "head"]
    neurons = [n for n, k in sites.items() if k == "neuron"]
    assert lay.kinds() == ("head", "neuron", "hidden") and lay.architecture == arch.replace("-gated", "")
    assert lay.sites == {"head": tuple((n, HEADS) for n in heads), "neuron": tuple((n, FFN) for n in neurons),
                         "hidden": (("hidden", HIDDEN),)}
    d_head = head_dim_of(arch)
    assert lay.block_size == {**{n: d_head for n in heads}, **{n: 1 for n in neurons}}
    assert lay.layers == {n: re.match(r"(.*?\.\d+)", n).group(1) for n in sites}  # type: ignore[union-attr]
    head = (2 + 2 * N_KV.get(arch, HEADS) / HEADS) * d_head * HIDDEN
    neuron = (3 if arch in GATED else 2) * HIDDEN
    # one hidden dim: every head and neuron site's weights over d_model (T5: the decoder's cross-attention too)
    hidden = (len(heads) * HEADS * head + len(neurons) * FFN * neuron) / HIDDEN
    for kind, value in (("head", head), ("neuron", neuron), ("hidden", hidden)):
        pc = lay.param_count[kind]
        assert pc.dtype == torch.float64 and pc.numel() == lay.num_blocks(kind) and bool((pc == value).all()), kind
    assert lay.d_model == HIDDEN


def _reading(model: torch.nn.Module, arch: str, cfg: Any = None) -> apt_salience.SalienceScores:
    tracker = apt_salience.attach(model, cfg)
    inputs, mask = make_batch(arch, torch.Generator().manual_seed(0))
    with tracker.token_mask(mask):
        model(**inputs).loss.backward()
    assert tracker.step()
    tracker.remove()
    return tracker.scores()


def test_a_reading_carries_the_models_layout_and_its_adapters() -> None:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(make_model("bert"), peft.LoraConfig(r=2, target_modules=["query", "value"]))
    scores = _reading(model, "bert")
    lay = scores.layout
    assert lay.kinds() == KINDS
    assert lay.restrict(PRUNABLE_KINDS) == BlockLayout.from_model(model) == BlockLayout.from_scores(scores)
    assert [n for n, _ in lay.sites["adapter"]] == [n for n, _ in scores.adapter.sites]  # type: ignore[union-attr]
    for kind, b in scores.kinds().items():  # one source of parameter counts: the blocks'
        assert lay.sites[kind] == tuple(b.sites) and torch.equal(lay.param_count[kind], b.param_count.double())
    assert all(lay.block_size[n] == 1 for n, _ in lay.sites["adapter"])


def test_per_site_views_and_restrict() -> None:
    lay = BlockLayout({"head": (("a.o", 2), ("b.o", 3)), "neuron": (("a.d", 4),)}, {"a.o": 2, "b.o": 2, "a.d": 1},
                      {"a.o": "a", "b.o": "b", "a.d": "a"}, 4, {"head": torch.ones(5), "neuron": torch.ones(4)})
    assert lay.by_site("head") == {"a.o": slice(0, 2), "b.o": slice(2, 5)}
    assert lay.slices("head") == lay.by_site("head") and BlockLayout.slices is BlockLayout.by_site  # deprecated alias
    assert lay.by_site("hidden") == {} and lay.num_blocks("head") == 5 and lay.num_blocks("adapter") == 0
    assert lay.site_names() == ["a.o", "b.o", "a.d"] and lay.site_names(("neuron",)) == ["a.d"]
    only = lay.restrict(("neuron",))
    assert only.kinds() == ("neuron",) and only.block_size == {"a.d": 1} and only.layers == {"a.d": "a"}
    assert list(only.param_count) == ["neuron"] and lay.restrict(("head", "neuron")) is lay


def test_to_dict_round_trip_and_malformed_dicts() -> None:
    lay = BlockLayout.from_model(make_model("gpt2"))
    assert BlockLayout.from_dict(lay.to_dict()) == lay
    d: Dict[str, Any] = lay.to_dict()
    for key in ("sites", "block_size", "layers", "d_model"):
        with pytest.raises(ValueError, match=f"block layout dict is missing the field '{key}'"):
            BlockLayout.from_dict({k: v for k, v in d.items() if k != key})
    with pytest.raises(ValueError, match=r"unknown kind\(s\) \['heads'\]"):
        BlockLayout.from_dict({**d, "sites": {"heads": [["x", 1]]}})
    with pytest.raises(ValueError, match=r"field 'sites' must map kinds to \[\[site, blocks\]"):
        BlockLayout.from_dict({**d, "sites": {"head": [["x"]]}})
    with pytest.raises(ValueError, match="must be a dict"):
        BlockLayout.from_dict([1, 2])  # type: ignore[arg-type]


def test_check_masks_names_kind_type_and_shape() -> None:
    lay = BlockLayout({"neuron": (("d", 3),)}, {"d": 1}, {"d": "l"}, 2)
    out = lay.check_masks({"neuron": torch.tensor([1, 0, 1])})
    assert out["neuron"].dtype == torch.float32 and out["neuron"].tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match=r"masks has kind 'head', which the layout does not have \(kinds: neuron\)"):
        lay.check_masks({"head": torch.ones(2)})
    with pytest.raises(TypeError, match=r"masks\['neuron'\] must be a torch.Tensor, got list"):
        lay.check_masks({"neuron": [1, 0, 1]})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"prev\['neuron'\] has shape \(4,\) but the layout has 3 neuron blocks"):
        lay.check_masks({"neuron": torch.ones(4)}, "prev")
    with pytest.raises(TypeError, match="must be a Selection or a dict"):
        lay.check_masks(torch.ones(3))  # type: ignore[arg-type]


def test_from_blocks_fills_in_what_scores_do_not_say() -> None:
    class B:  # anything with sites and param_count
        def __init__(self, sites: Any, n: int) -> None:
            self.sites, self.param_count = sites, torch.full((n,), 2.0)

    lay = BlockLayout.from_blocks({"head": B([("enc.layer.1.attn.o", 2)], 2), "neuron": B([("fc2", 3)], 3),
                                   "hidden": B([("hidden", 5)], 5)}, layers={"fc2": "block0"})
    assert lay.d_model == 5 and lay.block_size == {"fc2": 1}  # a head size is read from the model when needed
    assert lay.layers == {"enc.layer.1.attn.o": "enc.layer.1", "fc2": "block0"} and lay.architecture is None
    assert lay.param_count["neuron"].dtype == torch.float64


@pytest.mark.parametrize("name, layer", [
    ("bert.encoder.layer.3.attention.output.dense", "bert.encoder.layer.3"),
    ("decoder.block.0.layer.1.EncDecAttention.o", "decoder.block.0"),
    ("h.11.mlp.c_proj", "h.11"),
    ("mlp.fc2", "mlp"),
    ("fc2", "fc2"),
])
def test_layer_of(name: str, layer: str) -> None:
    assert layer_of(name) == layer
